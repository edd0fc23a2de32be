"""Trainer for bench_notice.py: a state of SIZE bytes (fp32 tensors of 64 MiB) under ckptd.Checkpointer.

Each step changes one tensor in place and sleeps ``--step-delay``; periodic saves every ``--every-steps``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import ckptd

PIECE = 64 << 20


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, required=True, help="bytes of state")
    p.add_argument("--every-steps", type=int, default=20)
    p.add_argument("--step-delay", type=float, default=0.05)
    args = p.parse_args()
    torch.manual_seed(0)
    n = max(1, args.size // PIECE)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(PIECE // 4), requires_grad=False)
                                    for _ in range(n)])
    ck = ckptd.Checkpointer(model=model, every_steps=args.every_steps, keep_last=2)
    start = ck.restore()
    for step in range(start, 10**9):
        with torch.no_grad():
            model[step % n].add_(1.0)
        time.sleep(args.step_delay)
        ck.step(step + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
