"""Choose the object-store client by measuring it: obstore, boto3 (classic transfer manager and with the AWS CRT)
and s3fs upload and download the same file to and from a real S3 server.

    scripts/s3-server.sh up /tmp/s3 19600 13300 16789 4294967296    # a 4 GiB in-memory store
    python benchmarks/bench_s3_clients.py --size 256M --rounds 3
    scripts/s3-server.sh down /tmp/s3

Each client uses parallel multipart transfers (8 MiB parts, 8 at a time) where it offers them. Prints one
row per client and direction: median and worst MiB/s of the rounds; ``--json`` for the raw figures. A client
that is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

MiB = 1 << 20
PART = 8 * MiB
CONCURRENCY = 8


def _size(text: str) -> int:
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(float(t[:-1]) * mult[t[-1]]) if t[-1] in mult else int(t)


def obstore_client(endpoint: str, bucket: str, key: str, secret: str) -> tuple[Callable, Callable]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=endpoint, access_key_id=key, secret_access_key=secret, region="us-east-1",
                    virtual_hosted_style_request=False, client_options={"allow_http": True})

    def up(path: str, name: str) -> None:
        with open(path, "rb") as f:
            obstore.put(store, name, f, chunk_size=PART, max_concurrency=CONCURRENCY)

    def down(name: str, path: str) -> None:
        size = obstore.head(store, name)["size"]
        starts = list(range(0, size, PART))
        ends = [min(s + PART, size) for s in starts]
        with open(path, "wb") as f:
            for i in range(0, len(starts), CONCURRENCY * 4):  # bounded memory: 32 parts in flight
                for s, buf in zip(starts[i:i + CONCURRENCY * 4],
                                  obstore.get_ranges(store, name, starts=starts[i:i + CONCURRENCY * 4],
                                                     ends=ends[i:i + CONCURRENCY * 4]), strict=True):
                    f.seek(s)
                    f.write(memoryview(buf))

    return up, down


def boto3_client(endpoint: str, bucket: str, key: str, secret: str, crt: bool = False) -> tuple[Callable, Callable]:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                      region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                                                             max_pool_connections=CONCURRENCY * 2))
    cfg = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=CONCURRENCY,
                         preferred_transfer_client="crt" if crt else "classic")

    def up(path: str, name: str) -> None:
        s3.upload_file(path, bucket, name, Config=cfg)

    def down(name: str, path: str) -> None:
        s3.download_file(bucket, name, path, Config=cfg)

    return up, down


def s3fs_client(endpoint: str, bucket: str, key: str, secret: str) -> tuple[Callable, Callable]:
    import s3fs

    fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})

    def up(path: str, name: str) -> None:
        fs.put_file(path, f"{bucket}/{name}", chunksize=PART)

    def down(name: str, path: str) -> None:
        fs.get_file(f"{bucket}/{name}", path)

    return up, down


CLIENTS = {
    "obstore": obstore_client,
    "boto3": boto3_client,
    "boto3-crt": lambda *a: boto3_client(*a, crt=True),
    "s3fs": s3fs_client,
}


def _rounds(name: str, up: Callable, down: Callable, remove: Callable, src: str, dst: str, size: int, rounds: int,
            rows: dict[str, list[float]]) -> None:
    for r in range(rounds):
        obj = f"{name}/{r}"
        t0 = time.perf_counter()
        up(src, obj)
        rows["upload"].append(size / MiB / (time.perf_counter() - t0))
        if os.path.exists(dst):
            os.unlink(dst)
        t0 = time.perf_counter()
        down(obj, dst)
        rows["download"].append(size / MiB / (time.perf_counter() - t0))
        if os.path.getsize(dst) != size:
            raise RuntimeError(f"downloaded {os.path.getsize(dst)} bytes, expected {size}")
        remove(obj)  # a full Ceph OSD blocks writes rather than failing them: keep the server's store empty


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", default="http://127.0.0.1:19600")
    p.add_argument("--key", default="ckptdkey")
    p.add_argument("--secret", default="ckptdsecret")
    p.add_argument("--size", default="256M")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import boto3  # only to make the bucket and remove what each round wrote

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    admin = boto3.client("s3", endpoint_url=args.endpoint, aws_access_key_id=args.key,
                         aws_secret_access_key=args.secret, region_name="us-east-1")
    admin.create_bucket(Bucket=bucket)

    def remove(obj: str) -> None:
        admin.delete_object(Bucket=bucket, Key=obj)
    size = _size(args.size)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
        with open(src, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        for name in args.clients.split(","):
            try:
                up, down = CLIENTS[name](args.endpoint, bucket, args.key, args.secret)
            except ImportError as exc:
                print(f"{name}: not installed ({exc}); skipped", file=sys.stderr)
                continue
            rows = results.setdefault(name, {"upload": [], "download": []})
            try:
                _rounds(name, up, down, remove, src, dst, size, args.rounds, rows)
            except Exception as exc:  # a client that cannot talk to this server: say so, measure the others
                print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                del results[name]
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'client':<10} {'direction':<9} {'median MiB/s':>12} {'worst MiB/s':>11}   "
          f"({args.size}, {args.rounds} rounds)")
    for name, rows in results.items():
        for direction, v in rows.items():
            print(f"{name:<10} {direction:<9} {statistics.median(v):>12.0f} {min(v):>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
