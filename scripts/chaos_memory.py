"""Many SIGKILLs of a trainer under `ckptd run --memory`, each at a random step and point of a save.

    python scripts/chaos_memory.py --rounds 100 [--seed 1] [--steps 40] [--every 5]

Each round runs the bundled example (tests/fixtures/mem_trainer.py) under `ckptd run --memory`; its first
life kills itself at a random save's step, in one of three points: the snapshot copied into its memory slot
with the seqlock still open (``sealing``), the disk save half written (``persist``), the checkpoint committed
(``committed``). It checks: every checkpoint left verifies, the restart resumes from the killed step (persist,
committed) or the one before it (sealing: the torn slot is never used), lost steps never exceed one
snapshot interval, and the run ends bit-identical to an uninterrupted one. Prints a JSON report; exit 1 on
any failure. The CI test (tests/test_memtier.py) runs one kill of each point.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fixtures.sup_helpers import journal, toy_digest, toy_reference  # noqa: E402

from ckptd import store  # noqa: E402

TRAINER = os.path.join(ROOT, "tests", "fixtures", "mem_trainer.py")
POINTS = ("sealing", "persist", "committed")


def one(work: str, steps: int, every: int, at: int, point: str, reference: str) -> str:
    """'' when the round held every promise, else what broke."""
    root = os.path.join(work, "ck")
    cmd = [sys.executable, "-m", "ckptd", "run", "--dir", root, "--memory", "--backoff-base", "0.05",
           "--backoff-max", "0.2", "--metrics-addr", "off", "--notices", "off", TRAINER, "--steps", str(steps),
           "--every-steps", str(every), "--kill-at", str(at), "--kill-point", point]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return f"exit {out.returncode}: {out.stderr[-500:]}"
    restarts = journal(root, "restart")
    if not restarts:
        return "no restart"
    expect = at - every if point == "sealing" else at
    r = restarts[0]
    if r["resume_step"] != expect:
        return f"resumed from {r['resume_step']}, expected {expect}"
    if r["crash_step"] - r["resume_step"] > every:
        return f"lost {r['crash_step'] - r['resume_step']} steps > {every}"
    for info in store.list_checkpoints(root):
        if not store.verify(info.path).valid:
            return f"{info.path} does not verify"
    if toy_digest(out.stdout, steps) != reference:
        return "not bit-identical to the uninterrupted run"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    args = p.parse_args()
    rng = random.Random(args.seed)
    failures: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = toy_reference(tmp, args.steps)
        for n in range(args.rounds):
            at = args.every * rng.randint(2, args.steps // args.every - 1)
            point = rng.choice(POINTS)
            with tempfile.TemporaryDirectory(dir=tmp) as work:
                why = one(work, args.steps, args.every, at, point, reference)
            if why:
                failures.append({"round": n, "step": at, "point": point, "why": why})
    print(json.dumps({"rounds": args.rounds, "failed": len(failures), "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
