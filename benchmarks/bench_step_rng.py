"""What ck.step() pays for recording the RNG streams and loader positions at every step (docs/performance.md).

    python benchmarks/bench_step_rng.py [--steps 20000] [--rounds 5]

A step boundary records Python's, NumPy's and torch's CPU RNG states (and every CUDA device's, when CUDA is
initialised) and the position of each ckptd.DataLoader in ``extra``, so that a checkpoint written by
``poll()`` during evaluation stores the streams as they were at the step's end. This measures, in one
process and with no save due: the recording alone (``capture_rng()`` plus the loaders' ``state_dict()``),
and the whole ``ck.step()`` call, with the median and 99th percentile of each, alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def measure(steps: int, rounds: int) -> dict[str, float]:
    import torch

    import ckptd
    from ckptd.state import capture_rng

    data = torch.utils.data.TensorDataset(torch.arange(1024))
    loader = ckptd.DataLoader(data, batch_size=8, shuffle=True)
    model = torch.nn.Linear(8, 8)
    with tempfile.TemporaryDirectory() as d:
        ck = ckptd.Checkpointer(model=model, extra={"loader": loader}, dir=d, save_on_close=False,
                                handle_signals=False)
        ck.restore()
        record, step = [], []
        for _ in range(rounds):
            for _ in range(steps // rounds):
                t0 = time.perf_counter()
                capture_rng()
                loader.state_dict()
                record.append(time.perf_counter() - t0)
            for _ in range(steps // rounds):
                t0 = time.perf_counter()
                ck.step()
                step.append(time.perf_counter() - t0)
        ck.close()

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[int(p * (len(xs) - 1))] * 1e6

    return {"record_median_us": statistics.median(record) * 1e6, "record_p99_us": q(record, 0.99),
            "step_median_us": statistics.median(step) * 1e6, "step_p99_us": q(step, 0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    result = measure(args.steps, args.rounds)
    print("  ".join(f"{k}={v:.1f}" for k, v in result.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
