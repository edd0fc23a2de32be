#!/usr/bin/env python3
"""Hygiene: many start/exit cycles of the child under one `ckptd run`.

    python scripts/hygiene.py --count 1000 --json hygiene.json

The child (scripts/hygiene_child.py) lives 20 ms and exits 1; `ckptd run` restarts it with a tiny
backoff and budgets large enough never to give up. Every 25 cycles (counted from the journal's
restart entries) the supervisor's open file descriptors, RSS and zombie children are sampled from /proc;
an fd or a zombie counts only when it is still there after the supervisor has started two more children
(see _sample). Must hold: no zombie is left unreaped, the fd count does not grow, RSS stays flat (growth
after the first 100 cycles under 8 MiB).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from _report import emit  # scripts/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CHILD = os.path.join(HERE, "hygiene_child.py")


def _restarts(root: str) -> int:
    try:
        with open(os.path.join(root, ".ckptd", "journal.jsonl"), "rb") as f:
            return f.read().count(b'"event":"restart"')
    except FileNotFoundError:
        return 0


def _fds(pid: int) -> collections.Counter:
    """The supervisor's open fds by what they point to (a pipe or socket has its own inode), counted.

    Not by number: the supervisor's spare descriptor (/dev/null, supervisor/reserve.py) is closed around each
    child exit and opened again at the lowest free number, which moves with the child's pipes; it is one
    descriptor held for good whatever its number.
    """
    out: collections.Counter = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[os.readlink(f"/proc/{pid}/fd/{fd}")] += 1
        except OSError:
            pass  # closed while listed
    return out


def _looks(pid: int, n: int = 3) -> list[collections.Counter]:
    """``n`` listings of :func:`_fds`, 10 ms apart."""
    out = []
    for i in range(n):
        if i:
            time.sleep(0.01)
        out.append(_fds(pid))
    return out


SPARE = os.devnull  # the supervisor's spare descriptor points here, beside the child's stdio (reserve.py)


def _held(first: list[collections.Counter], later: list[collections.Counter]) -> collections.Counter:
    """What was open in every listing of ``first`` and of ``later``: a descriptor opened and closed again
    (a state file being replaced, the run directory opened to fsync it) is gone from one of them. The spare
    ``/dev/null`` is the exception, the other way: the supervisor closes it for a moment around each child
    exit, so a listing in that moment shows one fewer; it counts as the most seen."""
    every = first + later
    out = every[0].copy()
    for c in every[1:]:
        out &= c
    out[SPARE] = max(c[SPARE] for c in every)
    return +out


def _zombies(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of the exited, not yet reaped children of ``pid``."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            rest = st[st.rfind(")") + 2:].split()
            if rest[0] == "Z" and int(rest[1]) == pid:
                out.add((int(d), rest[19]))
    return out


def _sample(pid: int, root: str, proc: subprocess.Popen) -> dict:
    """What the supervisor holds for good: fds and zombies seen now AND after it has started two more children.

    One reading cannot tell a leak from the current life: the child that exited a moment ago is a zombie
    until the supervisor's loop runs, and its stderr pipe is open until then (under load, for as long as the
    machine keeps the loop off the CPU). Before it starts child n+2 the supervisor has reaped child n+1 and
    closed its pipe, so whatever of this moment is still there then, by pid and start time or by fd number
    and inode, is kept: a leak. Progress, not time, ends the wait (a deadline only bounds a stuck run).
    """
    fds, zombies = _looks(pid), _zombies(pid)
    n = _restarts(root)
    deadline = time.monotonic() + 120
    while _restarts(root) < n + 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    held = _held(fds, _looks(pid))
    return {"fds": sum(held.values()), "held": held, "rss_kib": rss, "zombies": len(zombies & _zombies(pid))}


def run(count: int, work: str | None = None) -> dict:
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ckptd-hygiene-")
    root = os.path.join(work, "ck")
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "ckptd", "run", "--dir", root, "--notices", "off", "--metrics-addr", "off",
           "--backoff-base", "0.001", "--backoff-max", "0.005", "--max-restarts", "1000000",
           "--restart-window", "1", "--start-failures", "1000000", "--same-step-crashes", "1000000", CHILD]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    samples = []
    failures = []
    try:
        next_at = 25
        while True:
            n = _restarts(root)
            if proc.poll() is not None:
                failures.append(f"`ckptd run` exited {proc.returncode} after {n} cycles")
                break
            if n >= next_at:
                s = _sample(proc.pid, root, proc)
                s["cycles"] = n
                samples.append(s)
                next_at += 25
                if n >= count:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    if samples:
        base = [s for s in samples if s["cycles"] >= min(100, samples[-1]["cycles"])][0]
        if max(s["zombies"] for s in samples) > 0:
            failures.append(f"zombies left unreaped: {[s['zombies'] for s in samples]}")
        if samples[-1]["fds"] > samples[0]["fds"]:
            more = dict(samples[-1]["held"] - samples[0]["held"])
            failures.append(f"fds grew from {samples[0]['fds']} to {samples[-1]['fds']}: {more}")
        growth = samples[-1]["rss_kib"] - base["rss_kib"]
        if growth > 8192:
            failures.append(f"RSS grew by {growth} KiB after cycle {base['cycles']}")
    return {"cycles": samples[-1]["cycles"] if samples else 0, "samples": len(samples),
            "fds_first_last": [samples[0]["fds"], samples[-1]["fds"]] if samples else None,
            "rss_kib_first_last": [samples[0]["rss_kib"], samples[-1]["rss_kib"]] if samples else None,
            "rss_kib_max": max((s["rss_kib"] for s in samples), default=None),
            "zombies_max": max((s["zombies"] for s in samples), default=None),
            "seconds": round(time.monotonic() - t0, 1), "failed": len(failures), "failures": failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args()
    report = run(a.count)
    return emit(report, a.json)


if __name__ == "__main__":
    sys.exit(main())
