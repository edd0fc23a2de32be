"""ckptd export CKPT -o model.safetensors: model weights only, loadable by safetensors alone."""

from __future__ import annotations

import argparse
import os

from .. import store
from ..errors import CkptdError, CorruptCheckpointError, StorageError
from ..progress import Progress
from . import existing_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export model weights to a .safetensors file",
                       description="Verify a checkpoint, then write its model weights (original parameter names) "
                       "to a standalone safetensors file, atomically.")
    p.add_argument("ckpt", metavar="CKPT", help="one checkpoint directory")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output file, e.g. model.safetensors")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    existing_dir(args.ckpt)
    out = os.path.abspath(args.output)
    if os.path.exists(out) and not args.force:
        raise CkptdError(f"{out} exists; pass --force to overwrite it or choose another -o")
    if not os.path.isdir(os.path.dirname(out)):
        raise CkptdError(f"directory of {out} does not exist; create it first")
    info = store.inspect_checkpoint(args.ckpt)
    with Progress("verify", info.bytes) as prog:
        info = store.verify(args.ckpt, progress=prog)
    if not info.valid:
        raise CorruptCheckpointError(args.ckpt, info.reason)
    tpath = os.path.join(args.ckpt, store.TENSORS)
    with open(tpath, "rb") as f:
        header, data_start = store.read_safetensors_header(f, tpath, os.fstat(f.fileno()).st_size)
        model = sorted(((k[len("model/"):], v) for k, v in header.items() if k.startswith("model/")),
                       key=lambda kv: kv[1]["data_offsets"][0])
        if not model:
            raise CkptdError(f"{args.ckpt} holds no model weights (it was saved without model=)")
        entries = [(k, v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in model]
        head = store.safetensors_header_bytes(entries, {"format": "pt", "ckptd_step": str(info.step)})
        total = sum(e[3] for e in entries)
        tmp = f"{out}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as dst, Progress("export", total) as prog:
                dst.write(head)
                for _, v in model:
                    a, b = v["data_offsets"]
                    f.seek(data_start + a)
                    left = b - a
                    while left:
                        chunk = f.read(min(left, store.CHUNK))
                        dst.write(chunk)
                        left -= len(chunk)
                        prog(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, out)
            store.fsync_dir(os.path.dirname(out))
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise StorageError(out, "export", exc) from exc
    print(f"exported {len(entries)} tensors to {out}")
    return 0
