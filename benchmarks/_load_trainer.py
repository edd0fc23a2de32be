"""Trainer for bench_metrics_load.py: a fixed CPU-bound step (1 thread), ck.step() each step, and every
step's duration appended (as text) to $LOAD_STEPS_FILE in batches."""

import os
import time

import torch

import ckptd

torch.set_num_threads(1)
torch.manual_seed(0)
a, b = torch.randn(384, 384), torch.randn(384, 384)
model = torch.nn.Linear(8, 8)
ck = ckptd.Checkpointer(model=model, save_on_close=False, handle_signals=True)
out = open(os.environ["LOAD_STEPS_FILE"], "a")
buf = []
for step in range(1, 10_000_000):
    t0 = time.perf_counter()
    for _ in range(8):
        a = torch.tanh(a @ b)
    ck.step(step, metrics={"loss": float(a[0, 0])})
    buf.append(f"{time.time():.6f} {time.perf_counter() - t0:.6f}\n")
    if len(buf) >= 50:
        out.write("".join(buf))
        out.flush()
        buf.clear()
