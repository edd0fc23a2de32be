"""ckptd lineage CKPT [--root DIR]... [--no-check] [--json]: where a checkpoint's run came from, back to the first run.

The chain is read from the named checkpoint's own manifest (``lineage``: every branch point back to the first
run, at most ``lineage.MAX_HOPS``, copied forward at each branch), so a parent deleted since is still
described. Each parent is then looked at, read-only, to say whether it is still there: its manifest is read
(bounded, no link followed) only when the recorded directory lies inside a root the user named (``--root``,
default: the directory that holds the named checkpoint's run directory, where sibling runs live); a parent
elsewhere is shown as recorded and marked ``outside``, never opened. ``--no-check`` opens nothing at all.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import store
from ..errors import CorruptCheckpointError
from ..supervisor.log import escape  # recorded paths and phrases reach a terminal: no control characters
from . import add_dir_argument, print_json, resolve_checkpoint
from .inspect import CKPT_HELP

STATUS = {
    "present": "present",
    "amended": "present; metrics added to its manifest since",
    "replaced": "REPLACED: another checkpoint of that name is there now",
    "gone": "GONE (deleted or moved)",
    "invalid": "INVALID",
    "outside": "not checked: outside the roots",
    "unchecked": "not checked",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="where a checkpoint's run came from (branches, stages)",
                       description="Walk back from CKPT through the branch points recorded in its manifest to the "
                       "first run: directory, checkpoint, step and stage of each parent, what was restored and what "
                       "changed at each hop, and whether each parent is still there. Parents are opened (read-only) "
                       "only inside --root (default: the directory holding CKPT's run directory).")
    p.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    add_dir_argument(p, positional=False)
    p.add_argument("--root", action="append", default=None, metavar="DIR",
                   help="a directory under which parents may be opened to check them (repeatable)")
    p.add_argument("--no-check", action="store_true", help="open no parent: show the record only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _inside(path: str, roots: list[str]) -> bool:
    """``path``, with every link in it resolved, lies inside one of ``roots`` (resolved too)."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def check_parent(hop: dict[str, Any], roots: list[str] | None) -> tuple[str, str]:
    """(status, reason) of a recorded parent checkpoint; ``roots`` None: not checked."""
    path = os.path.join(hop["dir"], hop["name"])
    if roots is None:
        return "unchecked", ""
    if not _inside(hop["dir"], roots):
        return "outside", ""
    if not os.path.lexists(path):
        return "gone", ""
    info = store.inspect_checkpoint(path)
    if not info.valid:
        return "invalid", info.reason
    if hop["digest"] is None or info.manifest.get("digest") == hop["digest"]:
        return "present", ""  # (no digest recorded: nothing to compare)
    if hop["files_digest"] is not None and store.files_digest(info.manifest) == hop["files_digest"]:
        return "amended", ""
    return "replaced", f"step {info.step}, created {info.created:.0f}"


def walk(path: str, roots: list[str] | None) -> dict[str, Any]:
    """The lineage of the checkpoint at ``path`` as one JSON-able object."""
    info = store.inspect_checkpoint(path)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    record = info.lineage or {"hops": [], "truncated": False}
    hops = []
    for h in record["hops"]:
        status, reason = check_parent(h, roots)
        hops.append({"dir": h["dir"], "name": h["name"], "path": os.path.join(h["dir"], h["name"]), "step": h["step"],
                     "stage": h["stage"], "run_id": h["run_id"], "digest": h["digest"], "restored": h["parts"],
                     "changed": h["changed"], "status": status, "reason": reason})
    first = hops[-1]["dir"] if hops else os.path.dirname(os.path.abspath(path))
    return {"checkpoint": {"path": os.path.abspath(path), "dir": os.path.dirname(os.path.abspath(path)),
                           "name": info.name, "step": info.step, "kind": info.kind, "stage": info.stage,
                           "origin": info.origin},
            "hops": hops, "truncated": record["truncated"], "first_run": None if record["truncated"] else first,
            "roots": roots}


def run(args: argparse.Namespace) -> int:
    path, _ = resolve_checkpoint(args.ckpt, args.dir_option)
    path = os.path.abspath(path)
    if args.no_check:
        roots = None
    else:
        given = args.root or [os.path.dirname(os.path.dirname(path))]
        roots = [os.path.realpath(r) for r in given]
    out = walk(path, roots)
    if args.json:
        print_json(out)
        return 0
    c = out["checkpoint"]
    print(f"{escape(c['path'])}  step {c['step']}  stage {c['stage'] or '-'}  ({c['kind']})")
    for h in out["hops"]:
        status = STATUS[h["status"]] + (f" ({escape(h['reason'])})" if h["reason"] else "")
        print(f"  <- {escape(h['path'])}  step {h['step']}  stage {h['stage'] or '-'}  [{status}]")
        print(f"       restored: {', '.join(h['restored'])}")
        if h["changed"]:
            print(f"       changed: {escape('; '.join(h['changed']))}")
    if out["truncated"]:
        print("  <- ... (older branch points not recorded: the chain is longer than the record keeps)")
    elif not out["hops"]:
        print("  the first run: not branched from another checkpoint")
    else:
        print(f"  first run: {escape(out['first_run'])}")
    return 0
