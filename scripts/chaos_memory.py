"""Many SIGKILLs of a trainer under `ckptd run --memory`, each at a random step and point of a save.

    python scripts/chaos_memory.py --rounds 100 [--seed 1] [--steps 40] [--every 5] [--trainer plain|toy]
    python scripts/chaos_memory.py --snapshot-every 5 --every 50 --rounds 10 --kills 4 [--seed 1]

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

``--snapshot-every N`` (lost work against the snapshot interval): each round runs the bundled example through
the library (tests/fixtures/mem_trainer.py) under ``ckptd run --memory --every-steps EVERY`` and, when N > 0,
``--snapshot-every-steps N``; ``--kills K`` of its lives are SIGKILLed from outside, each once it has done the
work of a random number of steps (1 .. 2 x EVERY) after the step it started from, wherever it then is
(computing, copying a snapshot, persisting). Lost steps per kill = the last step the killed life finished -
the step the next life started from (the trainer's own output; the journal's ``restart`` must agree). It
checks: lost steps never above N (N > 0), every checkpoint verifies, the run ends bit-identical to an
uninterrupted one. ``--snapshot-every 0`` is the memory tier without snapshots between disk saves (before).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from ckptd import store  # noqa: E402
from fixtures import mem_plain  # noqa: E402
from fixtures.sup_helpers import journal, kill_at_steps, toy_digest, toy_reference  # noqa: E402

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


STEP_DELAY = 0.01


def kills_round(work: str, steps: int, every: int, snapshot_every: int, offsets: list[int],
                reference: str) -> tuple[list[int], str]:
    """(lost steps of each kill, '' or what broke) of one run whose lives are killed ``offsets[k]`` steps after
    their start."""
    root = os.path.join(work, "ck")
    out_path = os.path.join(work, "run.out")
    # kills that land before the next snapshot resume the same step again: not a crash loop to give up on here
    cmd = [sys.executable, "-m", "ckptd", "run", "--dir", root, "--memory", "--every-steps", str(every),
           "--same-step-crashes", "1000", "--backoff-base", "0.05", "--backoff-max", "0.2", "--metrics-addr", "off",
           "--notices", "off"]
    if snapshot_every:
        cmd += ["--snapshot-every-steps", str(snapshot_every)]
    cmd += [TRAINERS["toy"], "--steps", str(steps), "--step-delay", str(STEP_DELAY), "--print-steps"]
    with open(out_path, "w") as out, open(os.path.join(work, "run.err"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
    try:
        def read() -> str:
            with open(out_path) as f:
                return f.read()

        kills = kill_at_steps(read, offsets, lambda: proc.poll() is not None, timeout=300, relative=True)
        code = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lost = [killed.last - after.start for killed, after in kills if killed.last is not None and after.start is not None]
    if code != 0:
        return lost, f"exit {code}"
    resumed = [r["resume_step"] or 0 for r in journal(root, "restart")]  # None: no checkpoint yet, step 0
    if resumed != [after.start for _, after in kills]:
        return lost, f"the journal's restarts resumed {resumed}, the trainer started from {[a.start for _, a in kills]}"
    if snapshot_every and any(n > snapshot_every or n < 0 for n in lost):
        return lost, f"lost {lost}, more than {snapshot_every}"
    for info in store.list_checkpoints(root):
        if not store.verify(info.path).valid:
            return lost, f"{info.path} does not verify"
    if toy_digest(read(), steps) != reference:
        return lost, "not bit-identical to the uninterrupted run"
    return lost, ""


def kills_main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    steps = 120 + args.kills * 2 * args.every  # room for every kill and the work it loses
    failures: list[dict] = []
    lost: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = toy_reference(tmp, steps)
        for n in range(args.rounds):
            offsets = [rng.randint(1, 2 * args.every) for _ in range(args.kills)]
            with tempfile.TemporaryDirectory(dir=tmp) as work:
                got, why = kills_round(work, steps, args.every, args.snapshot_every, offsets, reference)
            lost += got
            if why:
                failures.append({"round": n, "offsets": offsets, "why": why})
    print(json.dumps({"trainer": "toy", "every_steps": args.every, "snapshot_every_steps": args.snapshot_every,
                      "rounds": args.rounds, "kills": len(lost), "lost_steps": lost,
                      "lost_max": max(lost, default=None),
                      "lost_median": statistics.median(lost) if lost else None,
                      "lost_mean": round(statistics.fmean(lost), 2) if lost else None,
                      "failed": len(failures), "failures": failures}, indent=1))
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--trainer", choices=sorted(TRAINERS), default="plain")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="kills from outside at random steps with this snapshot interval (0: none, disk saves only)")
    p.add_argument("--kills", type=int, default=4, help="with --snapshot-every: kills per round")
    args = p.parse_args()
    if args.snapshot_every is not None:
        return kills_main(args)
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
