"""ckptd inspect CKPT [--json]: tensors, other state keys, manifest."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .. import store
from ..errors import CorruptCheckpointError
from . import add_dir_argument, human_bytes, print_json, resolve_checkpoint

CKPT_HELP = ("one checkpoint: a path (checkpoints/step-000000000300), DIR/latest (the newest valid one), DIR/300 "
             "(a step number), or 300 / latest / step-000000000300 looked up in --dir")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a checkpoint holds",
                       description="Show a checkpoint's tensors (name, shape, dtype), its other state keys and "
                       "its manifest. Reads headers only; use `ckptd verify` for checksums.")
    p.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    add_dir_argument(p, positional=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def read_tensor_header(path: str) -> dict[str, Any]:
    """The tensor file's header entries, each checked to carry a dtype and a shape (no ``__metadata__``)."""
    tpath = os.path.join(path, store.TENSORS)
    try:
        with open(tpath, "rb") as f:
            header, _ = store.read_safetensors_header(f, tpath, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise CorruptCheckpointError(path, f"{store.TENSORS} unreadable: {exc.strerror}") from None
    header.pop("__metadata__", None)
    for key, meta in header.items():
        dtype, shape = meta.get("dtype"), meta.get("shape")
        if not isinstance(dtype, str) or not isinstance(shape, list) or \
                not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise CorruptCheckpointError(path, f"{store.TENSORS}: tensor {key!r} lacks a valid dtype or shape "
                                         "(damaged or crafted header)")
    return header


def read_state_tree(path: str) -> Any:
    spath = os.path.join(path, store.STATE)
    try:
        raw = store.read_small(spath, store.MAX_STATE_BYTES)
    except OSError as exc:
        raise CorruptCheckpointError(path, f"{store.STATE} unreadable: {exc.strerror}") from None
    # the same bounds as restore: a hostile state.json costs neither time nor memory
    return store.load_json(raw, path, store.STATE, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)


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
    path, verified = resolve_checkpoint(args.ckpt, args.dir_option)
    info = verified or store.inspect_checkpoint(path)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    tensors = read_tensor_header(path)
    tree = read_state_tree(path)
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
