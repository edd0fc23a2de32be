"""Trainer for scripts/chaos_kills.py's supervisor mode: under `ckptd run`, step and save until killed.

usage: chaos_saver.py LOG PIDFILE   (LOG gets "STEP DIGEST" per committed save)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import ckptd  # noqa: E402
from chaos_kills import _model, digest, fill  # noqa: E402

log_path, pid_file = sys.argv[1], sys.argv[2]
with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
torch.set_num_threads(1)
model = _model()
ck = ckptd.Checkpointer(model=model, keep_last=2, pace=0, save_on_close=False)
step = ck.restore()
with open(log_path, "a") as log:
    while True:
        step += 1
        fill(model, step)
        ck.step(step)
        res = ck.save(kind="periodic").wait()
        if res.error is None:
            log.write(f"{step} {digest(model)}\n")
            log.flush()
