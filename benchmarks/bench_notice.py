"""Time from a cloud preemption notice to the committed emergency checkpoint, under the real `ckptd run`.

    python benchmarks/bench_notice.py                     # the example and a 1 GiB state, 5 and 3 runs
    python benchmarks/bench_notice.py --cases example --runs 3 --out bench-results/notice.json

A strict fake AWS metadata service (tests/fixtures/fake_metadata.py) on 127.0.0.1 announces a spot
interruption 120 s ahead once the run has committed a periodic checkpoint (so the deadline estimate has a
save to go by), at a random moment between two saves. From the supervisor's journal:

- notice -> seen: the fake starts answering ``spot/instance-action`` until the poller has read it
  (``--notice-poll``, default 1 s: the default config);
- seen -> committed: the stop goes to the trainer, which takes it at its next ``ck.step()``, waits for a
  save in flight (hurried), writes the emergency checkpoint at full speed and reports it;
- notice -> committed (the figure that matters against the 120 s AWS / 30 s GCP / 30 s Azure lead), and
  notice -> `ckptd run` exited 85.

Everything runs with CKPTD_NOTICES_LOOPBACK_ONLY=1: nothing but the local fake is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from ckptd.supervisor import notices  # noqa: E402
from fixtures.fake_metadata import FakeMetadata, iso  # noqa: E402

CASES = {
    "example": [os.path.join(ROOT, "examples", "train_toy.py"), "--steps", "1000000", "--every-steps", "50",
                "--step-delay", "0.02"],
    "1G": [os.path.join(HERE, "_notice_trainer.py"), "--size", str(1 << 30), "--every-steps", "40",
           "--step-delay", "0.05"],
}
LEAD = 120.0


def journal(root: str) -> list[dict]:
    path = os.path.join(root, ".ckptd", "journal.jsonl")
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def one_run(case: str, workdir: str, poll: float, rng: random.Random) -> dict:
    imds = FakeMetadata("aws")
    root = os.path.join(workdir, f"{case}-{time.monotonic_ns()}")
    cmd = [sys.executable, "-m", "ckptd", "run", "--dir", root, "--notices", "aws", "--notice-endpoint", imds.url,
           "--notice-poll", str(poll), *CASES[case]]
    err = open(os.path.join(workdir, "stderr.txt"), "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                            env={**os.environ, notices.LOOPBACK_ONLY_ENV: "1"})
    try:
        first = wait(lambda: [e for e in journal(root) if e["event"] == "checkpoint"], 600, "a periodic checkpoint")[0]
        time.sleep(rng.uniform(0.0, 2.0))  # a random moment: maybe during the next periodic save
        announced = time.time()
        imds.set(instance_action={"action": "terminate", "time": iso(announced + LEAD)})
        code = proc.wait(LEAD + 60)
        exited = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
        imds.close()
        err.close()
    events = journal(root)
    notice = next(e for e in events if e["event"] == "notice" and e.get("source") == "aws")
    emergency = [e for e in events if e["event"] == "checkpoint" and e.get("kind") == "emergency"]
    result = next(e for e in events if e["event"] == "notice_result")
    periodic = [e for e in events if e["event"] == "checkpoint" and e.get("kind") != "emergency"]
    out = {
        "case": case, "exit_code": code, "step": result.get("step"), "committed": result.get("committed"),
        "margin_seconds": result.get("margin_seconds"),
        "notice_to_seen": notice["received"] - announced,
        "seen_to_committed": (emergency[0]["time"] - notice["received"]) if emergency else None,
        "notice_to_committed": (emergency[0]["time"] - announced) if emergency else None,
        "notice_to_exit": exited - announced,
        "periodic_save_seconds": [e.get("seconds") for e in periodic][:5],
        "emergency_save_seconds": emergency[0].get("seconds") if emergency else None,
        "first_checkpoint_step": first.get("step"),
    }
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="example,1G")
    p.add_argument("--runs", default="5,3", help="runs per case (one number, or one per case)")
    p.add_argument("--poll", type=float, default=1.0, help="--notice-poll of the runs (default 1: the default)")
    p.add_argument("--tmp", default=None, help="scratch directory (default: a fresh one under /work or /tmp)")
    p.add_argument("--out", default=None, help="write every sample as JSON here")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    cases = args.cases.split(",")
    runs = [int(r) for r in args.runs.split(",")]
    runs += [runs[-1]] * (len(cases) - len(runs))
    base = args.tmp or ("/work" if os.path.isdir("/work") else None)
    workdir = tempfile.mkdtemp(prefix="ckptd-bench-notice-", dir=base)
    rng = random.Random(args.seed)
    samples: list[dict] = []
    try:
        for case, n in zip(cases, runs, strict=False):
            for i in range(n):
                s = one_run(case, workdir, args.poll, rng)
                samples.append(s)
                print(f"{case} run {i + 1}/{n}: exit {s['exit_code']}, notice->seen {s['notice_to_seen']:.2f} s, "
                      f"seen->committed {s['seen_to_committed']:.2f} s, notice->committed "
                      f"{s['notice_to_committed']:.2f} s, margin {s['margin_seconds']:.1f} s, "
                      f"notice->exit {s['notice_to_exit']:.2f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n| case | runs | notice -> seen | seen -> committed | notice -> committed | notice -> exit 85 | "
          f"margin of a {LEAD:g} s notice |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        rows = [s for s in samples if s["case"] == case]
        def med(key: str, rows: list[dict] = rows) -> str:
            vals = [r[key] for r in rows if r[key] is not None]
            return f"{statistics.median(vals):.2f} s ({min(vals):.2f}-{max(vals):.2f})" if vals else "-"
        print(f"| {case} | {len(rows)} | {med('notice_to_seen')} | {med('seen_to_committed')} | "
              f"{med('notice_to_committed')} | {med('notice_to_exit')} | {med('margin_seconds')} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"poll": args.poll, "lead": LEAD, "loadavg": os.getloadavg(), "samples": samples}, f, indent=1)
    return 0 if all(s["exit_code"] == 85 and s["committed"] for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
