"""Authenticated checkpoints: what the key costs.

    python benchmarks/bench_keyed.py --size 512M --rounds 5 --out bench-results/keyed.json

1. Hashing in memory, one buffer of the state's size fed in 16 MiB pieces (as the writer and the restore read
   feed their hashers): xxh3-128 alone (the checksum without a key), xxh3 + keyed BLAKE3 (what a keyed save or
   restore computes, `store.Hashes`), keyed BLAKE3 alone on all cores (`blake3.AUTO`) and on one, SHA-256
   (hashlib, what an HMAC-SHA256 mode would cost).
2. The disk: a file of the same size written and fsynced, its pages dropped (`POSIX_FADV_DONTNEED` on that file
   only, so other work on the machine keeps its cache), read cold; and read warm.
3. Save and restore of a ~SIZE state (`_bench_util.build_state`: a transformer-like model and Adam) with the key
   off and on, interleaved round by round: `save(block=True)` (snapshot + write + fsync + commit; pace 0),
   `restore()` cold (the checkpoint's pages dropped first) and warm, into the live model.

Ratios come from the same run; the figures of a shared machine move with its load (printed before and after).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ckptd
from _bench_util import MiB, build_state, dump_json, loadavg, parse_size, state_bytes
from ckptd import store

PIECE = 16 * MiB


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hash_pieces(h, buf: memoryview) -> None:
    for off in range(0, len(buf), PIECE):
        h.update(buf[off : off + PIECE])


def hashing(size: int, rounds: int, key: store.Key) -> dict[str, list[float]]:
    import blake3

    buf = memoryview(os.urandom(size))
    variants = {
        "xxh3-128 (checksum, no key)": lambda: hash_pieces(store.Hashes(None), buf),
        "xxh3-128 + keyed BLAKE3 (store.Hashes with a key)": lambda: hash_pieces(store.Hashes(key), buf),
        "keyed BLAKE3, all cores": lambda: hash_pieces(key.file_hasher(), buf),
        "keyed BLAKE3, 1 thread": lambda: hash_pieces(blake3.blake3(key=bytes(32)), buf),
        "SHA-256 (hashlib), 1 thread": lambda: hash_pieces(hashlib.sha256(), buf),
    }
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            out[name].append(timed(fn))
    return out


def drop_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk(size: int, rounds: int, tmp: str) -> dict[str, list[float]]:
    path = os.path.join(tmp, "raw.bin")
    data = os.urandom(size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    buf = bytearray(PIECE)
    out: dict[str, list[float]] = {"read cold": [], "read warm": []}

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    for _ in range(rounds):
        drop_file(path)
        out["read cold"].append(timed(read))
        out["read warm"].append(timed(read))
    os.unlink(path)
    return out


def save_restore(size: int, rounds: int, tmp: str, key_file: str) -> dict[str, list[float]]:
    model, opt = build_state(size)
    cks = {}
    for mode in ("off", "on"):
        cks[mode] = ckptd.Checkpointer(model, opt, dir=os.path.join(tmp, mode), key_file=key_file if mode == "on"
                                       else None, async_save=False, pace=0, keep_last=1, save_on_close=False,
                                       handle_signals=False)
    out: dict[str, list[float]] = {f"{what} key {mode}": [] for what in ("save", "restore cold", "restore warm")
                                   for mode in ("off", "on")}
    out["state bytes"] = [float(state_bytes(model, opt))]
    for r in range(rounds + 1):  # round 0: warm-up (buffers allocated, first page faults)
        for mode in (("off", "on") if r % 2 else ("on", "off")):
            ck = cks[mode]
            step = r + 1
            os.sync()
            t_save = timed(lambda ck=ck, step=step: ck.save(step=step, block=True))
            path = os.path.join(ck.dir, store.checkpoint_name(step))
            for name in os.listdir(path):
                drop_file(os.path.join(path, name))
            t_cold = timed(ck.restore)
            t_warm = timed(ck.restore)
            if r:
                out[f"save key {mode}"].append(t_save)
                out[f"restore cold key {mode}"].append(t_cold)
                out[f"restore warm key {mode}"].append(t_warm)
    for ck in cks.values():
        ck.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512M")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tmp", default=None, help="scratch directory (default: a fresh one under /tmp, removed)")
    p.add_argument("--out", default=None, help="write every sample as JSON here")
    args = p.parse_args()
    size = parse_size(args.size)
    tmp = tempfile.mkdtemp(prefix="ckptd-keyed-", dir=args.tmp)
    key_file = os.path.join(tmp, "key")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32).hex().encode())
    os.close(fd)
    key = store.Key.load(key_file)
    result = {"size": size, "rounds": args.rounds, "cpus": os.cpu_count(), "load_before": loadavg()}
    try:
        result["hashing"] = hashing(size, args.rounds, key)
        result["disk"] = disk(size, args.rounds, tmp)
        result["save_restore"] = save_restore(size, args.rounds, tmp, key_file)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    result["load_after"] = loadavg()
    med = {part: {k: statistics.median(v) for k, v in result[part].items()}
           for part in ("hashing", "disk", "save_restore")}
    print(f"== {size / MiB:.0f} MiB, {args.rounds} rounds, {os.cpu_count()} CPUs, load {result['load_before']} -> "
          f"{result['load_after']}")
    print(f"{'figure':<52} {'median':>10} {'GiB/s':>7}   min-max")
    for part in ("hashing", "disk"):
        for k, v in result[part].items():
            print(f"{k:<52} {med[part][k] * 1e3:8.1f}ms {size / med[part][k] / (1 << 30):7.2f}   "
                  f"{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}")
    sr = med["save_restore"]
    nbytes = sr["state bytes"]
    for k, v in result["save_restore"].items():
        if k != "state bytes":
            print(f"{k:<52} {sr[k] * 1e3:8.1f}ms {nbytes / sr[k] / (1 << 30):7.2f}   "
                  f"{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}")
    h, d = med["hashing"], med["disk"]
    b3, both = h["keyed BLAKE3, all cores"], h["xxh3-128 + keyed BLAKE3 (store.Hashes with a key)"]
    ratios = {
        "keyed BLAKE3 (all cores) / SHA-256 throughput": h["SHA-256 (hashlib), 1 thread"] / b3,
        "keyed BLAKE3 (all cores) / cold disk read throughput": d["read cold"] / b3,
        "xxh3+BLAKE3 / cold disk read throughput": d["read cold"] / both,
        "save: key on / off": sr["save key on"] / sr["save key off"],
        "restore cold: key on / off": sr["restore cold key on"] / sr["restore cold key off"],
        "restore warm: key on / off": sr["restore warm key on"] / sr["restore warm key off"],
    }
    result["ratios"] = ratios
    for k, v in ratios.items():
        print(f"{k:<52} {v:7.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        dump_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
