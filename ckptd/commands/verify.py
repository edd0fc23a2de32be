"""ckptd verify DIR|CKPT [--json]: full checksum verification."""

from __future__ import annotations

import argparse
import os
import sys

from .. import exitcodes, store
from ..progress import Progress
from . import existing_dir, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify checksums of checkpoints",
                       description="Check every file of a checkpoint (or of every checkpoint under a directory) "
                       f"against its manifest. Exit {exitcodes.INVALID} when any is invalid.")
    p.add_argument("target", metavar="DIR|CKPT", help="checkpoint directory or one checkpoint")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    existing_dir(args.target)
    paths = list(store.iter_checkpoint_paths(args.target))
    results = []
    for path in paths:
        total = sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
        with Progress(f"verify {os.path.basename(path)}", total, enabled=None if not args.json else False) as prog:
            info = store.verify(path, progress=prog)
        results.append(info)
        if not args.json:
            status = "ok" if info.valid else f"INVALID: {info.reason}"
            print(f"{info.path}: {status}")
    if args.json:
        print_json([{"path": i.path, "step": i.step, "valid": i.valid, "reason": i.reason} for i in results])
    bad = [i for i in results if not i.valid]
    if bad:
        print(f"ckptd: {len(bad)} of {len(results)} checkpoint(s) invalid", file=sys.stderr)
        return exitcodes.INVALID
    if not results and not args.json:
        print(f"no checkpoints in {args.target}")
    return exitcodes.OK
