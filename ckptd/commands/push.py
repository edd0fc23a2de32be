"""ckptd push CKPT --remote URL: copy a checkpoint to the object-store tier (see ckptd/remote.py)."""

from __future__ import annotations

import argparse

from .. import store
from ..errors import CorruptCheckpointError
from ..progress import Progress
from . import add_dir_argument, add_remote_arguments, print_json, remote_from, resolve_checkpoint
from .inspect import CKPT_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="copy a checkpoint to the object-store tier",
                       description="Upload one checkpoint to the object-store tier under a key prefix of its own; "
                       "the bytes sent are checked against the manifest's checksums and the manifest is written "
                       "last, only if absent: a cut-short upload never shows as a checkpoint there.")
    p.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    add_dir_argument(p, positional=False)
    add_remote_arguments(p, required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tier = remote_from(args)
    path, _ = resolve_checkpoint(args.ckpt, args.dir_option)
    info = store.inspect_checkpoint(path)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    with Progress("upload", info.bytes, enabled=False if args.json else None) as prog:
        rc = tier.upload(path, progress=prog)
    if args.json:
        print_json({**rc.as_json(), "url": f"{tier.spec.url}/{rc.key}", "local": path})
    else:
        print(f"uploaded {path} to {tier.spec.url}/{rc.key} ({rc.bytes} bytes)")
    return 0
