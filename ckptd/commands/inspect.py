"""ckptd inspect CKPT [--json]: tensors, other state keys, manifest."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .. import store
from ..errors import CorruptCheckpointError
from . import existing_dir, human_bytes, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a checkpoint holds",
                       description="Show a checkpoint's tensors (name, shape, dtype), its other state keys and "
                       "its manifest. Reads headers only; use `ckptd verify` for checksums.")
    p.add_argument("ckpt", metavar="CKPT", help="one checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def read_tensor_header(path: str) -> dict[str, Any]:
    tpath = os.path.join(path, store.TENSORS)
    with open(tpath, "rb") as f:
        header, _ = store.read_safetensors_header(f, tpath, os.fstat(f.fileno()).st_size)
    header.pop("__metadata__", None)
    return header


def state_outline(tree: Any, prefix: str = "", out: list[str] | None = None, depth: int = 0) -> list[str]:
    """Non-tensor leaves and containers of the state tree, as path = value lines."""
    out = [] if out is None else out
    if isinstance(tree, dict) and len(tree) == 1 and next(iter(tree)).startswith("__"):
        tag, val = next(iter(tree.items()))
        if tag not in ("__t", "__np"):
            out.append(f"{prefix} = {json.dumps(val)[:80]}")
        return out
    if isinstance(tree, dict) and depth < 4:
        for k, v in tree.items():
            state_outline(v, f"{prefix}/{k}" if prefix else k, out, depth + 1)
    elif isinstance(tree, list) and depth < 4 and len(tree) <= 16:
        for i, v in enumerate(tree):
            state_outline(v, f"{prefix}/{i}", out, depth + 1)
    else:
        out.append(f"{prefix} = {json.dumps(tree)[:80]}")
    return out


def run(args: argparse.Namespace) -> int:
    existing_dir(args.ckpt)
    info = store.inspect_checkpoint(args.ckpt)
    if not info.valid:
        raise CorruptCheckpointError(args.ckpt, info.reason)
    tensors = read_tensor_header(args.ckpt)
    tree = json.loads(store.read_small(os.path.join(args.ckpt, store.STATE), store.MAX_STATE_BYTES))
    if args.json:
        print_json({"manifest": info.manifest, "tensors": {k: {"dtype": v["dtype"], "shape": v["shape"]}
                                                            for k, v in tensors.items()},
                    "state": state_outline(tree)})
        return 0
    print(f"checkpoint {info.path}")
    print(f"  step {info.step}  kind {info.kind}  epoch {info.epoch}  size {human_bytes(info.bytes)}")
    print(f"\ntensors ({len(tensors)}):")
    for k, v in tensors.items():
        print(f"  {k:<60} {v['dtype']:<5} {v['shape']}")
    print("\nother state:")
    for line in state_outline(tree):
        print(f"  {line}")
    print("\nmanifest:")
    print(json.dumps(info.manifest, indent=1, sort_keys=True))
    return 0
