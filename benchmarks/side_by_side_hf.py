"""The Hugging Face Trainer's own checkpoints and ckptd's CkptdTrainer, stopped by SIGTERM at one step, side by side.

    python benchmarks/side_by_side_hf.py [--stop-step 10] [--every 6]

Both run tests/fixtures/hf_trainer.py (3 epochs of 6 steps, an evaluation after each), plainly (no supervisor),
each saving every ``--every`` steps: ``native`` with ``save_strategy="steps", save_steps`` and resumed with
``trainer.train(resume_from_checkpoint=True)``, ``ckptd`` with ``CkptdTrainer`` and ``CkptdCallback(every_n_steps)``.
Each
gets SIGTERM after step ``--stop-step``, is run again to the end, and is compared with an uninterrupted run:
exit status of the stopped run, seconds from the signal to its exit, the step the rerun started from (steps
lost = stop step - that), and whether it ended bit-identical (parameters, optimizer state, learning rate).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "fixtures", "hf_trainer.py")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")} | {
    "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run(args: list[str]) -> tuple[int, str, float]:
    """Run the fixture; returns (exit status, stdout, seconds from the fixture's SIGTERM to its exit)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=ENV)
    out, signalled = "", None
    assert proc.stdout is not None
    for line in proc.stdout:
        out += line
        if line.startswith("fault term"):
            signalled = time.monotonic()
    rc = proc.wait()
    return rc, out, (time.monotonic() - signalled) if signalled else time.monotonic() - t0


def final(out: str) -> str:
    m = re.search(r"^final (.*)$", out, re.M)
    return m.group(1) if m else "(none)"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stop-step", type=int, default=10)
    p.add_argument("--every", type=int, default=6)
    a = p.parse_args()
    # The fixture's `term` fault also signals its parent (the supervisor, in the tests): here, this script.
    signal.signal(signal.SIGTERM, lambda *_: None)
    with tempfile.TemporaryDirectory() as tmp:
        _, ref, _ = run(["--dir", os.path.join(tmp, "ref"), "--out", os.path.join(tmp, "ref-out")])
        rows = []
        for name, extra in (("native", ["--native"]), ("ckptd", [])):
            d = os.path.join(tmp, name)
            args = ["--dir", d, "--out", d + "-out", "--every-steps", str(a.every), *extra,
                    "--life-file", os.path.join(tmp, name + ".life"),
                    "--faults", f"term@step:{a.stop_step},-"]
            rc, _, stop_s = run(args)
            _, out, _ = run(args)
            start = re.search(r"^start step=(\d+)", out, re.M)
            start_step = int(start.group(1)) if start else -1
            rows.append((name, rc, stop_s, start_step, a.stop_step - start_step, final(out) == final(ref)))
    print(f"SIGTERM after step {a.stop_step}, saves every {a.every} steps; uninterrupted: {final(ref)}")
    print(f"{'setup':8} {'exit':>4} {'stop_s':>7} {'resumed_at':>10} {'steps_lost':>10} {'bit_identical':>13}")
    for name, rc, stop_s, start_step, lost, same in rows:
        print(f"{name:8} {rc:>4} {stop_s:>7.2f} {start_step:>10} {lost:>10} {str(same):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
