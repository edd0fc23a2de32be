"""ckptd pin CKPT [--remove]: protect a checkpoint from retention (or lift the protection)."""

from __future__ import annotations

import argparse
import os

from .. import store
from ..errors import CorruptCheckpointError
from . import add_dir_argument, print_json, resolve_checkpoint, storage_error
from .inspect import CKPT_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pin", help="protect a checkpoint from retention",
                       description="Pin a checkpoint so that no retention rule (library, supervisor or "
                       "`ckptd prune`) deletes it. Pins live in DIR/.pins/NAME; `DIR/latest` pins the checkpoint "
                       "it names now, by its real name.")
    p.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    add_dir_argument(p, positional=False)
    p.add_argument("--remove", action="store_true", help="unpin instead")
    p.add_argument("--json", action="store_true", help="print one JSON object: name, path, pinned")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path, verified = resolve_checkpoint(args.ckpt, args.dir_option)
    path = os.path.abspath(path)
    root, name = os.path.dirname(path), os.path.basename(path)
    store.check_name(name)
    pin_path = os.path.join(root, store.PINS_DIR, name)
    if not args.remove:
        info = verified or store.inspect_checkpoint(path)
        if not info.valid:
            raise CorruptCheckpointError(path, info.reason)
    try:
        (store.unpin if args.remove else store.pin)(root, name)
    except OSError as exc:
        raise storage_error(exc, "unpin" if args.remove else "pin", pin_path) from None
    if args.json:
        print_json({"name": name, "path": path, "pinned": not args.remove})
    else:
        print(f"{'unpinned' if args.remove else 'pinned'} {name}")
    return 0
