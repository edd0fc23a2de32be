"""ckptd prune DIR --keep-last N [--keep-best METRIC:K[:min|max]] [--keep-every M] [--dry-run]."""

from __future__ import annotations

import argparse

from .. import retention, store
from ..errors import CkptdError
from . import existing_dir, print_json


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="delete checkpoints by a retention policy",
                       description="Delete checkpoints that no rule keeps. Always kept: the newest valid one, "
                       "pinned ones (.pins/), an emergency checkpoint no newer valid one supersedes. Invalid "
                       "checkpoints are never deleted here. Order is by step.")
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("--keep-last", type=_positive, metavar="N", help="keep the newest N valid checkpoints")
    p.add_argument("--keep-best", action="append", default=[], metavar="METRIC:K[:min|max]",
                   help="keep the best K by a metric (repeatable; default min)")
    p.add_argument("--keep-every", type=_positive, metavar="M", help="keep checkpoints whose step is a multiple of M")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    existing_dir(args.dir)
    policy = retention.Policy(keep_last=args.keep_last, keep_best=tuple(retention.Best.parse(b) for b in args.keep_best),
                              keep_every=args.keep_every)
    if not policy.active:
        raise CkptdError("prune needs a rule: --keep-last N, --keep-best METRIC:K or --keep-every M")
    keep, _ = retention.plan(store.list_checkpoints(args.dir), policy, store.pinned(args.dir))
    deleted = retention.apply(args.dir, policy, dry_run=args.dry_run)
    if args.json:
        print_json({"deleted": deleted, "dry_run": args.dry_run, "kept": keep})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for name in deleted:
        print(f"{verb} {name}")
    for name, why in sorted(keep.items()):
        print(f"kept {name} ({', '.join(why)})")
    return 0
