"""Trainer for the P6 benchmark: a 1 GiB model-like state under ckptd.Checkpointer.

Prints READY once training runs; on SIGTERM the library takes an emergency
checkpoint at the next ck.step() and exits with code 85 (PREEMPTED).
--variant warm: one save before READY (buffers allocated, as after a periodic save);
--variant cold: the emergency save is the first save of the process.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import _bench_util as U  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--variant", default="warm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bench_checkpoint import make_checkpointer

    model, opt = U.build_state(args.size)
    ck = make_checkpointer(model, opt, args.dir)
    if args.variant == "warm":
        ck.save(0, kind="manual")
        ck.wait()
    step = U.make_trainer(256, 32)
    i = 0
    announced = False
    while True:
        step()
        i += 1
        ck.step(i)
        if not announced and i >= 5:
            print("READY", flush=True)
            announced = True


if __name__ == "__main__":
    sys.exit(main())
