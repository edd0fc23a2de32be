"""Many SIGKILLs of a trainer under `ckptd run --memory`, each at a random step and point of a save.

    python scripts/chaos_memory.py --rounds 100 [--seed 1] [--steps 40] [--every 5] [--trainer plain|toy]

Each round runs a trainer under `ckptd run --memory` (``toy``: the bundled example through the library,
tests/fixtures/mem_trainer.py, ~20 s a round here; ``plain``, the default: the torch-free
tests/fixtures/mem_plain.py, which snapshots and saves as the library does, ~3 s a round); its first
life kills itself at a random save's step, in one of three points: the snapshot copied into its memory slot
with the seqlock still open (``sealing``), the disk save half written (``persist``), the checkpoint committed
(``committed``). It checks: every checkpoint left verifies, the restart resumes from the killed step (persist,
committed) or the one before it (sealing: the torn slot is never used), lost steps never exceed one
snapshot interval, and the run ends bit-identical to an uninterrupted one (toy; plain: every checkpoint holds
exactly its step's bytes). The toy's kill lands in the first save at or after the drawn step (a save
coalesced behind a slow disk is no snapshot), so its expectations follow the step it printed. Prints a JSON
report; exit 1 on any failure. The CI test (tests/test_memtier.py) runs one kill of each point.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from ckptd import store  # noqa: E402
from fixtures import mem_plain  # noqa: E402
from fixtures.sup_helpers import journal, toy_digest, toy_reference  # noqa: E402

TRAINERS = {"toy": os.path.join(ROOT, "tests", "fixtures", "mem_trainer.py"),
            "plain": os.path.join(ROOT, "tests", "fixtures", "mem_plain.py")}
POINTS = ("sealing", "persist", "committed")


def one(work: str, trainer: str, steps: int, every: int, at: int, point: str, reference: str) -> str:
    """'' when the round held every promise, else what broke."""
    root = os.path.join(work, "ck")
    cmd = [sys.executable, "-m", "ckptd", "run", "--dir", root, "--memory", "--backoff-base", "0.05",
           "--backoff-max", "0.2", "--metrics-addr", "off", "--notices", "off", TRAINERS[trainer],
           "--steps", str(steps), "--every-steps" if trainer == "toy" else "--every", str(every),
           "--kill-at", str(at), "--kill-point", point]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return f"exit {out.returncode}: {out.stderr[-500:]}"
    restarts = journal(root, "restart")
    if not restarts:
        return "no restart"
    m = re.search(rf"fault kill at {point} of step (\d+)", out.stdout)
    if m is None:
        return "no kill"
    killed = int(m.group(1))
    events = journal(root)
    first = next(n for n, e in enumerate(events) if e["event"] == "restart")
    saved = [e["step"] for e in events[:first] if e["event"] == "checkpoint" and e["step"] < killed]
    expect = max(saved, default=0) if point == "sealing" else killed
    r = restarts[0]
    if r["resume_step"] != expect:
        return f"resumed from {r['resume_step']}, expected {expect}"
    if r["crash_step"] - r["resume_step"] > every:
        return f"lost {r['crash_step'] - r['resume_step']} steps > {every}"
    if point == "sealing" and trainer == "plain" and expect != killed - every:
        return f"sealing: the snapshot before {killed} was not {killed - every}"
    for info in store.list_checkpoints(root):
        if not store.verify(info.path).valid:
            return f"{info.path} does not verify"
        if trainer == "plain":
            with open(os.path.join(info.path, store.TENSORS), "rb") as f:
                if f.read() != mem_plain.header() + mem_plain.content(info.step):
                    return f"{info.path} does not hold step {info.step}'s bytes"
    if trainer == "toy" and toy_digest(out.stdout, steps) != reference:
        return "not bit-identical to the uninterrupted run"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--trainer", choices=sorted(TRAINERS), default="plain")
    args = p.parse_args()
    rng = random.Random(args.seed)
    failures: list[dict] = []
    counts = {p: 0 for p in POINTS}
    with tempfile.TemporaryDirectory() as tmp:
        reference = toy_reference(tmp, args.steps) if args.trainer == "toy" else ""
        for n in range(args.rounds):
            at = args.every * rng.randint(2, args.steps // args.every - 1)
            point = rng.choice(POINTS)
            counts[point] += 1
            with tempfile.TemporaryDirectory(dir=tmp) as work:
                why = one(work, args.trainer, args.steps, args.every, at, point, reference)
            if why:
                failures.append({"round": n, "step": at, "point": point, "why": why})
    print(json.dumps({"trainer": args.trainer, "rounds": args.rounds, "points": counts, "failed": len(failures),
                      "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
