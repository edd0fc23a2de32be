"""ckptd pull [DIR] --remote URL [--step N]: copy a checkpoint of the object-store tier into DIR."""

from __future__ import annotations

import argparse
import sys

from ..errors import CorruptCheckpointError, NotFoundError
from ..progress import Progress
from . import add_dir_argument, add_remote_arguments, print_json, remote_from, root_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="copy a checkpoint of the object-store tier into DIR",
                       description="Download the newest remote checkpoint whose manifest verifies (or that of "
                       "--step N) into DIR, checking every byte against the manifest before it becomes visible. "
                       "One that fails the check is skipped, with a warning, for the next older one (without "
                       "--step). A valid local checkpoint of the same step is kept as it is.")
    add_dir_argument(p, positional=True)
    add_remote_arguments(p, required=True)
    p.add_argument("--step", type=int, default=None, metavar="N", help="the checkpoint of step N (default: newest)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tier = remote_from(args)
    root = root_from(args)
    listed = [c for c in tier.checkpoints() if c.valid and (args.step is None or c.step == args.step)]
    if not listed:
        what = f"no valid checkpoint of step {args.step}" if args.step is not None else "no valid checkpoint"
        raise NotFoundError(f"{what} on {tier.spec.url}; `ckptd ls --remote {tier.spec.url}` lists what is there")
    for rc in reversed(listed):
        try:
            with Progress(f"download {rc.key}", rc.bytes, enabled=False if args.json else None) as prog:
                info = tier.download(rc, root, progress=prog)
        except CorruptCheckpointError as exc:
            print(f"ckptd: {tier.spec.url}/{rc.key}: {exc.reason}; taking the next older one", file=sys.stderr)
            continue
        if args.json:
            print_json({**rc.as_json(), "url": f"{tier.spec.url}/{rc.key}", "local": info.path})
        else:
            print(f"downloaded {tier.spec.url}/{rc.key} to {info.path}")
        return 0
    raise CorruptCheckpointError(tier.spec.url, "every candidate failed verification; nothing was downloaded")
