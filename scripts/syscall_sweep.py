#!/usr/bin/env python3
"""Syscall-boundary sweep: kill at, or fail with ENOSPC / EIO / EDQUOT, the N-th
write, fsync, close, rename, mkdir, unlink and open of a save, of retention and of `ckptd prune`.

    python scripts/syscall_sweep.py --count 0 --json sweep.json     # every N, every fault (the long run)
    python scripts/syscall_sweep.py --count 60                       # a sample of 60 cases per operation

A child (scripts/sweep_child.py) imports everything, then waits; `strace -f -p` attaches to it with
``-e inject=SYSCALL:error=ERRNO:when=N`` (or ``signal=SIGKILL``) and the child runs the operation. A dry
run under ``strace -y`` first lists which calls of each syscall touch the checkpoint root, so N ranges
exactly over the operation's own calls. After each case, what the next start must find:
  * the child either succeeded, or said one line naming the error (never a traceback), or was killed;
  * every visible checkpoint verifies; the newest valid one is the newest committed one (the new one
    only when the save succeeded); nothing is lost that retention should keep;
  * after the next start's cleanup (remove_stale_temps / remove_stale_trash) no temp or trash remains.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from _report import count_seed_main  # scripts/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "sweep_child.py")
GROUPS = {"write": ["write", "pwrite64", "writev"], "fsync": ["fsync", "fdatasync"], "close": ["close"],
          "rename": ["rename", "renameat", "renameat2"], "mkdir": ["mkdir", "mkdirat"],
          "unlink": ["unlink", "unlinkat", "rmdir"], "open": ["openat", "open"]}
FAULTS = ["kill", "ENOSPC", "EIO", "EDQUOT"]
OPS = {"save": (1, 2), "retention": (1, 2, 3), "prune": (1, 2, 3)}


def make_template(root: str, steps: tuple[int, ...]) -> None:
    from ckptd import store

    for s in steps:
        with store.PendingCheckpoint(root, s) as p:
            p.write_file(store.TENSORS, [store.safetensors_header_bytes([("w", "U8", [16], 16)]), bytes(16)])
            p.write_file(store.STATE, [b'{"step": %d}' % s])
            p.commit(kind="periodic")


def _attach_run(root: str, op: str, strace_args: list[str]) -> tuple[int, str]:
    child = subprocess.Popen([sys.executable, CHILD, root, op], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
    assert child.stdout.readline().strip() == "ready"
    tracer = subprocess.Popen(["strace", "-f", "-qqq", "-p", str(child.pid), *strace_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # attached: the kernel shows a tracer
        with open(f"/proc/{child.pid}/status") as f:
            if re.search(r"^TracerPid:\s*[1-9]", f.read(), re.M):
                break
        time.sleep(0.005)
    child.stdin.write("go\n")
    child.stdin.flush()
    try:
        _, err = child.communicate(timeout=60)
    finally:
        tracer.wait(timeout=30)
    return child.returncode, err


def plan(work: str, op: str) -> list[tuple[str, str, int]]:
    """(group, syscall, N) for every call of the operation that touches the root (main thread)."""
    root = os.path.join(work, "dry", "ck")
    shutil.rmtree(os.path.join(work, "dry"), ignore_errors=True)
    make_template(root, OPS[op])
    log = os.path.join(work, "dry.log")
    names = sorted({s for g in GROUPS.values() for s in g})
    code, err = _attach_run(root, op, ["-y", "-o", log, "-e", "trace=" + ",".join(names)])
    assert code == 0, err
    seen: dict[str, int] = {}
    cases = []
    with open(log) as f:
        for line in f:
            m = re.match(r"^(\d+)\s+(\w+)\(", line)
            if not m or "resumed>" in line:
                continue
            sc = m.group(2)
            seen[sc] = seen.get(sc, 0) + 1
            if root in line or (sc == "close" and "/ck" in line and os.path.dirname(root) in line):
                group = next(g for g, scs in GROUPS.items() if sc in scs)
                cases.append((group, sc, seen[sc]))
    return cases


def check(root: str, op: str, fault: str, code: int, err: str) -> list[str]:
    from ckptd import retention, store

    problems = []
    if "Traceback" in err:
        problems.append(f"a traceback instead of a clear error: {err.strip().splitlines()[-1]}")
    elif fault == "kill":
        if code not in (-9, 0):
            problems.append(f"exit {code} after a kill: {err.strip()[-200:]}")
    elif code not in (0, 5, 1):
        problems.append(f"exit {code}: {err.strip()[-200:]}")
    elif code != 0 and not re.search(r"(ENOSPC|EIO|EDQUOT|No space|Input/output|quota)", err):
        problems.append(f"the error does not name the cause: {err.strip()[-200:]}")
    listed = store.list_checkpoints(root)
    for info in listed:
        if not store.verify(info.path).valid:
            problems.append(f"visible checkpoint {info.name} does not verify")
    newest = store.latest_valid(root)
    want = 3 if (op != "save" or code == 0) else 2
    if newest is None or newest.step < min(want, 2) or (op != "save" and newest.step != 3):
        problems.append(f"newest valid is {newest and newest.step}, expected {want}")
    if op == "save" and code == 0 and (newest is None or newest.step != 3):
        problems.append("the save said it succeeded but step 3 is not the newest valid checkpoint")
    store.remove_stale_temps(root)
    retention.remove_stale_trash(root)
    left = [n for n in os.listdir(root) if n.startswith((store.TMP_PREFIX, store.TRASH_PREFIX))]
    if left:
        problems.append(f"left after the next start: {left}")
    return problems


def run(count: int, seed: int = 15, work: str | None = None, ops: tuple[str, ...] = tuple(OPS)) -> dict:
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ckptd-sweep-")
    rng = random.Random(seed)
    t0 = time.monotonic()
    report: dict = {"ops": {}, "failures": []}
    try:
        for op in ops:
            calls = plan(work, op)
            cases = [(c, f) for c in calls for f in FAULTS]
            if count:
                cases = rng.sample(cases, min(count, len(cases)))
            outcomes: dict[str, int] = {}
            for (group, sc, n), fault in cases:
                case_dir = os.path.join(work, "case")
                shutil.rmtree(case_dir, ignore_errors=True)
                root = os.path.join(case_dir, "ck")
                make_template(root, OPS[op])
                spec = f"inject={sc}:" + ("signal=SIGKILL" if fault == "kill" else f"error={fault}") + f":when={n}"
                code, err = _attach_run(root, op, ["-o", "/dev/null", "-e", f"trace={sc}", "-e", spec])
                key = "killed" if code == -9 else ("ok" if code == 0 else "clear error")
                outcomes[key] = outcomes.get(key, 0) + 1
                for p in check(root, op, fault, code, err):
                    report["failures"].append(f"{op}: {fault} at {sc} #{n} ({group}): {p}")
            per_group: dict[str, int] = {}
            for g, _, _ in calls:
                per_group[g] = per_group.get(g, 0) + 1
            report["ops"][op] = {"calls": per_group, "cases": len(cases), "outcomes": outcomes}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    report["cases"] = sum(v["cases"] for v in report["ops"].values())
    report["failed"] = len(report["failures"])
    report["failures"] = report["failures"][:40]
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def main() -> int:
    return count_seed_main(__doc__, run, 0, "cases per operation, sampled; 0 = every N and fault")


if __name__ == "__main__":
    sys.exit(main())
