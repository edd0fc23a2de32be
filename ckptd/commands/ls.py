"""ckptd ls [DIR] [--json]: one row per checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from .. import store
from . import (
    UsageError,
    add_dir_argument,
    add_remote_arguments,
    existing_dir,
    format_metrics,
    human_bytes,
    human_time,
    print_json,
    remote_from,
    root_from,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list checkpoints", description="List the checkpoints under DIR, oldest first "
                       "(by step). The MANIFEST column (`valid` in --json) is the manifest-level check: "
                       "files listed, present and of their sizes, no data read; `ckptd verify` checks every byte.")
    add_dir_argument(p, positional=True)
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    add_remote_arguments(p, required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.remote:
        if args.dir is not None or args.dir_option is not None:
            raise UsageError("give either DIR (the local tier) or --remote URL (the object-store tier), not both")
        return _remote(args)
    root = existing_dir(root_from(args))
    infos = store.list_checkpoints(root)
    pins = store.pinned(root)
    if args.json:
        print_json([dict(i.as_json(), pinned=i.name in pins) for i in infos])
        return 0
    if not infos:
        print(f"no checkpoints in {root}")
        return 0
    # The column is the manifest-level check (files listed, present, of their sizes): it reads no data, so a
    # flipped byte shows `ok` here and fails `ckptd verify`. Named for what it checks (`--help` says it too).
    _table("NAME", [(i.name, i, (" [pinned]" if i.name in pins else "") + (" [finished]" if i.finished else ""))
                    for i in infos])
    return 0


def _table(head: str, rows: list[tuple[str, Any, str]]) -> None:
    """One line per checkpoint (local CheckpointInfo or RemoteCheckpoint): ``(name, checkpoint, marks)``."""
    width = max(len(head), *(len(name) for name, _, _ in rows))
    print(f"{head:<{width}}  {'STEP':>10}  {'KIND':<9}  {'CREATED':<19}  {'SIZE':>10}  {'MANIFEST':<8}  METRICS")
    for name, c, marks in rows:
        extra = format_metrics(c.metrics) if c.valid else c.reason
        print(f"{name:<{width}}  {c.step:>10}  {c.kind:<9}  {human_time(c.created):<19}  {human_bytes(c.bytes):>10}  "
              f"{'ok' if c.valid else 'BAD':<8}  {extra}{marks}")


def _remote(args: argparse.Namespace) -> int:
    """``ckptd ls --remote URL``: the checkpoints of the object-store tier (those with a manifest)."""
    tier = remote_from(args)
    rows = tier.checkpoints()
    if args.json:
        print_json([dict(r.as_json(), url=f"{tier.spec.url}/{r.key}") for r in rows])
        return 0
    if not rows:
        print(f"no checkpoints on {tier.spec.url}")
        return 0
    _table("KEY", [(r.key, r, " [finished]" if r.manifest.get("finished") is True else "") for r in rows])
    return 0
