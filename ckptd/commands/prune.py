"""ckptd prune [DIR] --keep-last N [--keep-best METRIC:K[:min|max]] [--keep-every M] [--dry-run]."""

from __future__ import annotations

import argparse
import os

from .. import retention, store
from ..errors import CkptdError
from . import (
    UsageError,
    add_dir_argument,
    add_remote_arguments,
    existing_dir,
    print_json,
    remote_from,
    root_from,
    storage_error,
)

RULES = "--keep-last N, --keep-best METRIC:K[:min|max] or --keep-every M"


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _best(text: str) -> retention.Best:
    try:
        return retention.Best.parse(text)
    except CkptdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="delete checkpoints by a retention policy",
                       description="Delete checkpoints that no rule keeps. Always kept: the newest valid one, "
                       "pinned ones (.pins/), an emergency checkpoint no newer valid one supersedes. Invalid "
                       "checkpoints are never deleted here. Order is by step. Also removes the .trash-* "
                       "directories an interrupted deletion left behind (not with --dry-run).")
    add_dir_argument(p, positional=True)
    p.add_argument("--keep-last", type=_positive, metavar="N", help="keep the newest N valid checkpoints")
    p.add_argument("--keep-best", type=_best, action="append", default=[], metavar="METRIC:K[:min|max]",
                   help="keep the best K by a metric (repeatable; default min)")
    p.add_argument("--keep-every", type=_positive, metavar="M", help="keep checkpoints whose step is a multiple of M")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_remote_arguments(p, required=False)
    p.add_argument("--stale-hours", type=float, default=24.0, metavar="H",
                   help="with --remote: also remove objects of uploads that never committed (no manifest) and "
                   "were last written more than H hours ago (default 24)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = retention.Policy(keep_last=args.keep_last, keep_best=tuple(args.keep_best), keep_every=args.keep_every)
    if not policy.active:
        raise UsageError(f"prune needs a rule: {RULES}")
    if args.remote:
        return _remote(args, policy)
    root = existing_dir(root_from(args))
    leftovers: list[str] = []
    if not args.dry_run:
        try:
            leftovers = retention.remove_stale_trash(root)
        except OSError as exc:
            raise storage_error(exc, "prune: remove leftover trash") from None
    keep, doomed = retention.plan(store.list_checkpoints(root), policy, store.pinned(root))
    verb = "would delete" if args.dry_run else "deleted"
    for name in leftovers if not args.json else ():
        print(f"removed leftover {name}")
    deleted: list[str] = []
    for info in doomed:
        if not args.dry_run:
            try:
                if not store.delete(root, info.name):
                    continue  # already gone (another prune, a running job's retention)
            except OSError as exc:
                done = f" after deleting {len(deleted)} other(s)" if deleted else ""
                raise storage_error(exc, f"prune: delete{done}", os.path.join(root, info.name)) from None
        deleted.append(info.name)
        if not args.json:
            print(f"{verb} {info.name}")
    if args.json:
        print_json({"deleted": deleted, "dry_run": args.dry_run, "kept": keep, "removed_leftovers": leftovers})
        return 0
    for name, why in sorted(keep.items()):
        print(f"kept {name} ({', '.join(why)})")
    return 0


def _remote(args: argparse.Namespace, policy: retention.Policy) -> int:
    """``ckptd prune --remote URL ...``: the same rules on the object-store tier (manifest deleted first)."""
    if args.dir is not None or args.dir_option is not None:
        raise UsageError("give either DIR (the local tier) or --remote URL (the object-store tier), not both")
    if not (args.stale_hours > 0):
        raise UsageError(f"--stale-hours must be > 0, got {args.stale_hours}")
    tier = remote_from(args)
    keep, deleted, stale = tier.prune(policy, dry_run=args.dry_run, stale_after=args.stale_hours * 3600)
    if args.json:
        print_json({"deleted": [c.key for c in deleted], "dry_run": args.dry_run, "kept": keep,
                    "removed_uncommitted": stale})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for c in deleted:
        print(f"{verb} {tier.spec.url}/{c.key}")
    for key in stale:
        print(f"{'would remove' if args.dry_run else 'removed'} uncommitted upload {tier.spec.url}/{key}")
    for key, why in sorted(keep.items()):
        print(f"kept {key} ({', '.join(why)})")
    return 0
