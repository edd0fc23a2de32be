"""ckptd ls [DIR] [--json]: one row per checkpoint."""

from __future__ import annotations

import argparse

from .. import store
from . import add_dir_argument, existing_dir, format_metrics, human_bytes, human_time, print_json, root_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list checkpoints", description="List the checkpoints under DIR, oldest first "
                       "(by step). The MANIFEST column (`valid` in --json) is the manifest-level check: "
                       "files listed, present and of their sizes, no data read; `ckptd verify` checks every byte.")
    add_dir_argument(p, positional=True)
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = existing_dir(root_from(args))
    infos = store.list_checkpoints(root)
    pins = store.pinned(root)
    if args.json:
        print_json([dict(i.as_json(), pinned=i.name in pins) for i in infos])
        return 0
    if not infos:
        print(f"no checkpoints in {root}")
        return 0
    width = max(len("NAME"), *(len(i.name) for i in infos))
    # The column is the manifest-level check (files listed, present, of their sizes): it reads no data, so a
    # flipped byte shows `ok` here and fails `ckptd verify`. Named for what it checks (`--help` says it too).
    print(f"{'NAME':<{width}}  {'STEP':>10}  {'KIND':<9}  {'CREATED':<19}  {'SIZE':>10}  {'MANIFEST':<8}  METRICS")
    for i in infos:
        valid = "ok" if i.valid else "BAD"
        extra = format_metrics(i.metrics) if i.valid else i.reason
        pin = (" [pinned]" if i.name in pins else "") + (" [finished]" if i.finished else "")
        print(f"{i.name:<{width}}  {i.step:>10}  {i.kind:<9}  {human_time(i.created):<19}  {human_bytes(i.bytes):>10}  "
              f"{valid:<8}  {extra}{pin}")
    return 0
