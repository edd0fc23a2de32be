"""ckptd status [--dir DIR] [--json]: state, pids, step, last checkpoint, restarts, uptime.

Asks the running supervisor (its published status and recent events); when none runs, reads the run
directory's state file and journal. The journal also gives the restart counts across `ckptd run`s.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .. import protocol
from ..errors import CkptdError, NotFoundError
from ..supervisor.client import ControlClient, default_dir
from ..supervisor.journal import JOURNAL_NAME, STATE_NAME, read_journal, read_json
from ..supervisor.rundir import node_run_dir, pick_node, supervisor_pid
from . import add_node_argument, human_time, print_json

RECENT = 8  # journal events shown
# The fields a `recent` line shows first, in this order; an event with none of them shows its other plain fields.
SHOWN = ("pid", "step", "source", "kind", "action", "reason", "code", "signal", "name", "by", "resume_step",
         "lost_steps", "delay", "committed", "margin_seconds", "exit_code")
HIDDEN = ("time", "event", "run_id")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the state of a supervised run",
                       description="Show a run's state, pids, step, last checkpoint, restarts and uptime. Works "
                       "from the journal and state file in DIR/.ckptd when no supervisor runs.")
    p.add_argument("--dir", default=None, help="checkpoint directory of the run (default: $CKPTD_DIR or ./checkpoints)")
    add_node_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def collect(root: str, node_rank: int | None = None) -> dict[str, Any]:
    if not os.path.isdir(protocol.run_dir(root)):
        raise NotFoundError(f"{root} has no run directory ({protocol.RUN_DIR_NAME}/): "
                            "it was never supervised by `ckptd run`")
    rank = pick_node(root, node_rank)  # multi-node: this node's supervisor (node 0's run dir when none runs)
    run_dir = node_run_dir(root, rank)
    if not os.path.isdir(run_dir):
        raise NotFoundError(f"{root} has no run directory for node {rank} ({os.path.relpath(run_dir, root)}/): "
                            "no `ckptd run` of that node ever ran here; check --node-rank")
    events = list(read_journal(os.path.join(run_dir, JOURNAL_NAME)))
    live = None
    if supervisor_pid(root, rank) is not None:
        try:
            with ControlClient(root, timeout=5.0, node_rank=rank) as client:
                client.send(protocol.STATUS)
                live = next((m for m in client.replies(time.monotonic() + 5.0) if m["type"] == protocol.STATUS), None)
        except (CkptdError, OSError, TimeoutError):
            live = None
    data = dict(live or read_json(os.path.join(run_dir, STATE_NAME)) or {})
    data.pop("type", None)
    data["running"] = live is not None
    if live is None:
        data["last_state"] = data.get("state")
        data["state"] = "not running"
        data["child_pid"] = None
    starts = [e for e in events if e.get("event") == "start"]
    since = starts[-1]["time"] if starts else 0
    data["restarts_total"] = sum(1 for e in events if e.get("event") == "restart")
    data["restarts_this_run"] = sum(1 for e in events if e.get("event") == "restart" and e["time"] >= since)
    data.setdefault("restarts", data["restarts_this_run"])
    # A live supervisor serves its recent events (snapshot.StatusBoard: also those its journal could not keep).
    recent = live.get("recent_events") if live is not None else None
    data["recent_events"] = (recent if isinstance(recent, list) else events)[-RECENT:]
    data["dir"] = os.path.abspath(root)
    return data


def run(args: argparse.Namespace) -> int:
    data = collect(args.dir or default_dir(), args.node_rank)
    if args.json:
        print_json(data)
        return 0
    ck = data.get("last_checkpoint") or {}
    started = data.get("started")
    pids = f"supervisor {data.get('supervisor_pid')}, child {data.get('child_pid') or '-'}" if data["running"] else "-"
    trainers = (", ".join(f"{t['pid']} (rank {t['rank']})" for t in data.get("trainers") or [])
                if data["running"] else "")
    rows = [
        ("dir", data["dir"]),
        ("state", data["state"] + (f" (last: {data.get('last_state')}, exit code {data.get('exit_code')})"
                                   if not data["running"] and data.get("last_state") else "")),
        ("run id", data.get("run_id") or "-"),
        *([("job", f"{data['job_id']}, node {data.get('node_rank')}")] if data.get("job_id") else []),
        ("pids", pids + (f"; trainers {trainers}" if trainers else "")),
        ("step", str(data.get("step") if data.get("step") is not None else "-")),
        ("checkpoint", f"{ck.get('name')} (step {ck.get('step')}, {ck.get('kind')}, {human_time(ck.get('time') or 0)})"
                       if ck else "none"),
        ("restarts", f"{data.get('restarts')} in this run, {data['restarts_total']} in the journal"),
        ("uptime", _duration(data.get("uptime")) if data["running"] else
         f"- (started {human_time(started or 0)})"),
    ]
    if data.get("notice"):
        rows.append(("notice", _notice_line(data["notice"])))
    if data.get("remote"):
        rows.append(("remote", _remote_line(data["remote"])))
    if data.get("memory"):
        m = data["memory"]
        rows.append(("memory", _memory_line(m)))
    if data["running"] and data.get("metrics"):
        rows.append(("metrics", _metrics_line(data["metrics"])))
    for key, value in rows:
        print(f"{key + ':':<12}{value}")
    if data["recent_events"]:
        print("recent:")
        for e in data["recent_events"]:
            print(f"  {human_time(e.get('time', 0))}  {e.get('event'):<16} {_event_fields(e)}")
    return 0


def _event_fields(e: dict[str, Any]) -> str:
    """``key=value`` of a journal event for its `recent` line: never empty when the event has fields."""
    shown = [k for k in SHOWN if e.get(k) is not None]
    if not shown:
        shown = [k for k, v in e.items() if k not in HIDDEN and isinstance(v, (str, int, float)) and v != ""][:6]
    return " ".join(f"{k}={str(e[k])[:80]}" for k in shown)


def _notice_line(n: dict[str, Any]) -> str:
    """A cloud preemption notice: pending (with the time left) or how it ended."""
    line = f"{n.get('source')} {n.get('kind')} ({n.get('action')})"
    deadline = n.get("deadline")
    if isinstance(deadline, (int, float)):
        left = deadline - time.time()
        line += f", deadline {human_time(deadline)}" + (f" (in {left:.0f} s)" if left >= 0 else " (passed)")
    if n.get("pending"):
        return "PENDING: " + line
    if n.get("committed"):
        margin = n.get("margin_seconds")
        return line + "; emergency checkpoint committed" + (f" {margin:.1f} s before it" if margin is not None else "")
    return line + ("; no emergency checkpoint" + (f": {n['no_checkpoint']}" if n.get("no_checkpoint") else "")
                   if n.get("exit_code") is not None else "")


def _remote_line(r: dict[str, Any]) -> str:
    """The object-store tier: which tier holds the newest checkpoint, the lag, an upload under way, failures."""
    line = f"{r.get('url')}: newest checkpoint on {r.get('newest_checkpoint_on')}"
    if r.get("remote_step") is not None:
        line += f" (remote step {r['remote_step']}"
        line += f", {r.get('lag_steps')} steps and {r.get('lag_seconds', 0):.0f} s behind)" \
            if r.get("newest_checkpoint_on") == "local only" else ")"
    if r.get("uploading"):
        line += f"; uploading {r['uploading']}"
    if r.get("failures_in_a_row"):
        line += f"; {r['failures_in_a_row']} failures in a row, last: {str(r.get('last_error'))[:200]}"
    held = r.get("held_for_upload") or []
    if held:
        line += f"; retention keeps {len(held)} local checkpoint(s) until uploaded"
    emergency = r.get("emergency_upload")
    if emergency:
        line += f"; at the stop: {'uploaded' if emergency.get('attempt') else 'not uploaded'} " \
                f"{emergency.get('checkpoint') or ''} ({str(emergency.get('reason'))[:200]})"
    return line


def _memory_line(m: dict[str, Any]) -> str:
    """The memory tier: the region's size, each slot's snapshot (headers, not verified), what the supervisor wrote."""
    def number(v: Any) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    line = f"{number(m.get('region_bytes')) / 2**20:.1f} MiB region"
    if number(m.get("slot_bytes")):
        line += f" (two slots of {number(m['slot_bytes']) / 2**20:.1f} MiB)"
    slots = [s for s in m.get("slots") or [] if isinstance(s, dict)]
    if slots:
        line += "; " + ", ".join(f"slot {number(s.get('slot'))}: " + (
            f"{s['state']} step {number(s.get('step'))}" if s.get("state") in ("sealed", "open") else "empty")
            for s in slots[:2])
    return line + f"; {number(m.get('persisted'))} snapshot(s) written after the trainer died"


def _metrics_line(m: dict[str, Any]) -> str:
    """The Prometheus endpoint: where it serves, or why not (docs/metrics.md)."""
    if m.get("state") == "serving":
        return f"{m.get('url')} (goodput {m.get('goodput_ratio', 0):.2f})" + (
            f"; file_sd {m['sd_file']}" if m.get("sd_file") else "")
    if m.get("state") == "unavailable":
        return f"unavailable: {m.get('error')}"
    return "off"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
