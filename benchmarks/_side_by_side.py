"""The side-by-side comparison shared by side_by_side_lightning.py and side_by_side_hf.py.

A framework's fixture (tests/fixtures/) is run plainly: once uninterrupted, then twice per setup (``native``:
the framework's own checkpoints, ``ckptd``: the integration), the first time stopped by SIGTERM after
``--stop-step``, the second to the end. The table: exit status of the stopped run, seconds from the signal to
its exit, the step the rerun started from, steps lost, and whether it ended bit-identical.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time


def _run(script: str, env: dict[str, str], args: list[str]) -> tuple[int, str, float]:
    """Run the fixture; returns (exit status, stdout, seconds from the fixture's SIGTERM to its exit)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    out, signalled = "", None
    assert proc.stdout is not None
    for line in proc.stdout:
        out += line
        if line.startswith("fault term"):
            signalled = time.monotonic()
    rc = proc.wait()
    return rc, out, (time.monotonic() - signalled) if signalled else time.monotonic() - t0


def _final(out: str) -> str:
    m = re.search(r"^final (.*)$", out, re.M)
    return m.group(1) if m else "(none)"


def compare(script: str, env: dict[str, str], out_dir: bool = False) -> int:
    """The command line and the table; ``out_dir``: the fixture also takes ``--out DIR`` for its own output."""
    p = argparse.ArgumentParser()
    p.add_argument("--stop-step", type=int, default=10)
    p.add_argument("--every", type=int, default=6)
    a = p.parse_args()
    # The fixture's `term` fault also signals its parent (the supervisor, in the tests): here, this script.
    signal.signal(signal.SIGTERM, lambda *_: None)

    def dirs(d: str) -> list[str]:
        return ["--dir", d, *(["--out", d + "-out"] if out_dir else [])]

    with tempfile.TemporaryDirectory() as tmp:
        _, ref, _ = _run(script, env, dirs(os.path.join(tmp, "ref")))
        rows = []
        for name, extra in (("native", ["--native"]), ("ckptd", [])):
            args = [*dirs(os.path.join(tmp, name)), "--every-steps", str(a.every), *extra,
                    "--life-file", os.path.join(tmp, name + ".life"), "--faults", f"term@step:{a.stop_step},-"]
            rc, _, stop_s = _run(script, env, args)
            _, out, _ = _run(script, env, args)
            start = re.search(r"^start step=(\d+)", out, re.M)
            start_step = int(start.group(1)) if start else -1
            rows.append((name, rc, stop_s, start_step, a.stop_step - start_step, _final(out) == _final(ref)))
    print(f"SIGTERM after step {a.stop_step}, saves every {a.every} steps; uninterrupted: {_final(ref)}")
    print(f"{'setup':8} {'exit':>4} {'stop_s':>7} {'resumed_at':>10} {'steps_lost':>10} {'bit_identical':>13}")
    for name, rc, stop_s, start_step, lost, same in rows:
        print(f"{name:8} {rc:>4} {stop_s:>7.2f} {start_step:>10} {lost:>10} {str(same):>13}")
    return 0
