"""ck.step() overhead with metrics on vs off, at 1000 steps/s, under a real `ckptd run` (docs/performance.md).

    python benchmarks/bench_step_metrics.py [--steps 5000] [--rounds 4]

Each round starts `ckptd run --metrics-addr 127.0.0.1:0` (the supervisor serves metrics; the trainer sends the
metrics given to ck.step in its heartbeat) and `ckptd run --metrics-addr off` (CKPTD_METRICS=0: the heartbeat
carries no metrics), alternating which goes first. The trainer paces itself to one step per millisecond and times
every ck.step(n, metrics={"loss": ..., "lr": ...}) call with perf_counter; no saves are due during the window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(steps: int) -> None:
    import torch

    import ckptd

    model = torch.nn.Linear(8, 8)
    ck = ckptd.Checkpointer(model=model, save_on_close=False, handle_signals=False)
    ck.restore()
    times = []
    period = 1e-3
    next_t = time.perf_counter()
    for n in range(1, steps + 1):
        next_t += period
        while time.perf_counter() < next_t:  # 1000 steps/s: the "training" between steps is a wait
            pass
        t0 = time.perf_counter()
        ck.step(n, metrics={"loss": 1.0 / n, "lr": 1e-3})
        times.append(time.perf_counter() - t0)
    ck.close()
    print("RESULT " + json.dumps({"times": times}), flush=True)


def one(mode: str, steps: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-") as tmp:
        addr = "127.0.0.1:0" if mode == "on" else "off"
        out = subprocess.run([sys.executable, "-m", "ckptd", "run", "--dir", os.path.join(tmp, "ck"),
                              "--metrics-addr", addr, "--", sys.executable, os.path.abspath(__file__), "--child",
                              "--steps", str(steps)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and line, out.stderr[-2000:]
    return json.loads(line[0][7:])["times"][500:]  # the first half second warms up


def summary(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e6  # noqa: E731
    return {"mean_us": statistics.fmean(s) * 1e6, "p50_us": pick(0.5), "p99_us": pick(0.99),
            "p999_us": pick(0.999), "max_us": s[-1] * 1e6, "n": len(s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.steps)
        return 0
    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            results[mode].append(summary(one(mode, args.steps)))
    print(f"ck.step() at 1000 steps/s, {args.steps} steps per run (first 500 dropped), {args.rounds} rounds")
    print(f"{'metrics':<8} {'mean us':>8} {'p50 us':>7} {'p99 us':>7} {'p99.9 us':>9} {'max us':>8}   "
          "(median of rounds)")
    for mode, rows in results.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"{mode:<8} {med['mean_us']:8.2f} {med['p50_us']:7.2f} {med['p99_us']:7.2f} {med['p999_us']:9.2f} "
              f"{med['max_us']:8.1f}")
    print("per round:", json.dumps({m: [{k: round(v, 2) for k, v in row.items()} for row in rows]
                                     for m, rows in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
