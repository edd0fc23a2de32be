"""ckptd pin CKPT [--remove]: protect a checkpoint from retention (or lift the protection)."""

from __future__ import annotations

import argparse
import os

from .. import store
from ..errors import CorruptCheckpointError
from . import existing_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pin", help="protect a checkpoint from retention",
                       description="Pin a checkpoint so that no retention rule (library, supervisor or "
                       "`ckptd prune`) deletes it. Pins live in DIR/.pins/NAME.")
    p.add_argument("ckpt", metavar="CKPT", help="one checkpoint directory, e.g. checkpoints/step-000000001200")
    p.add_argument("--remove", action="store_true", help="unpin instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    existing_dir(args.ckpt)
    path = os.path.abspath(args.ckpt)
    root, name = os.path.dirname(path), os.path.basename(path)
    store.check_name(name)
    if args.remove:
        store.unpin(root, name)
        print(f"unpinned {name}")
        return 0
    info = store.inspect_checkpoint(path)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    store.pin(root, name)
    print(f"pinned {name}")
    return 0
