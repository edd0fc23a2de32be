"""ckptd ls [DIR] [--stage NAME] [--tree] [--json]: one row per checkpoint, or the tree of runs under DIR."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import lineage, store
from ..errors import CkptdError
from ..supervisor.log import escape
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
    p.add_argument("--stage", metavar="NAME", default=None, help="only the checkpoints of this stage")
    p.add_argument("--tree", action="store_true",
                   help="DIR holds runs (one directory each): show them as a tree of branches, each with its stage, "
                   "steps and where it branched from")
    add_remote_arguments(p, required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.remote:
        if args.dir is not None or args.dir_option is not None:
            raise UsageError("give either DIR (the local tier) or --remote URL (the object-store tier), not both")
        return _remote(args)
    if args.stage is not None:
        try:
            lineage.check_stage(args.stage, "--stage")
        except CkptdError as exc:
            raise UsageError(str(exc)) from None
    root = existing_dir(root_from(args))
    if args.tree:
        return _tree(root, args)
    infos = store.list_checkpoints(root)
    if args.stage is not None:
        infos = [i for i in infos if i.stage == args.stage]
    pins = store.pinned(root)
    if args.json:
        print_json([dict(i.as_json(), pinned=i.name in pins) for i in infos])
        return 0
    if not infos:
        print(f"no checkpoints in {root}" + (f" of stage {args.stage}" if args.stage is not None else ""))
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


def _tree(root: str, args: argparse.Namespace) -> int:
    """``ckptd ls --tree ROOT``: each run directory under ROOT (ROOT itself and its subdirectories), its stage,
    steps, and the run it branched from (from its newest valid checkpoint's lineage), children under parents."""
    runs: list[dict[str, Any]] = []
    for path, infos in store.list_runs(root):
        valid = [i for i in infos if i.valid]
        newest = valid[-1] if valid else None
        hops = (newest.lineage or {}).get("hops") if newest is not None else None
        parent = hops[0] if hops else None
        stages = sorted({i.stage for i in valid if i.stage})
        if args.stage is not None and args.stage not in stages:
            continue
        runs.append({"dir": os.path.abspath(path), "stage": newest.stage if newest else None, "stages": stages,
                     "checkpoints": len(infos), "valid": len(valid),
                     "steps": [valid[0].step, valid[-1].step] if valid else None,
                     "newest": newest.path if newest else None, "finished": bool(newest and newest.finished),
                     "parent": None if parent is None else {
                         "dir": parent["dir"], "name": parent["name"], "step": parent["step"],
                         "stage": parent["stage"], "changed": parent["changed"], "restored": parent["parts"]}})
    if args.json:
        print_json(runs)
        return 0
    if not runs:
        print(f"no runs with checkpoints under {root}")
        return 0
    by_dir = {r["dir"]: r for r in runs}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for r in runs:
        up = r["parent"]["dir"] if r["parent"] and r["parent"]["dir"] in by_dir and r["parent"]["dir"] != r["dir"] \
            else None
        children.setdefault(up, []).append(r)
    shown: set[str] = set()

    def show(r: dict[str, Any], depth: int) -> None:
        if r["dir"] in shown:  # a cycle in recorded parents: each run once
            return
        shown.add(r["dir"])
        steps = f"steps {r['steps'][0]}..{r['steps'][1]}" if r["steps"] else "no valid checkpoint"
        line = f"{'  ' * depth}{'`- ' if depth else ''}{escape(os.path.relpath(r['dir'], root))}  " \
               f"stage {r['stage'] or '-'}  {steps} ({r['valid']} valid){' [finished]' if r['finished'] else ''}"
        p = r["parent"]
        if p:
            where = p["name"] if depth else os.path.join(p["dir"], p["name"])
            line += f"  <- {escape(where)} (step {p['step']})"
            if p["changed"]:
                line += f": {escape('; '.join(p['changed'][:3]))}"
        print(line)
        for child in children.get(r["dir"], []):
            show(child, depth + 1)

    for r in children.get(None, []):
        show(r, 0)
    for r in runs:  # runs only reachable through a cycle of recorded parents
        show(r, 0)
    return 0
