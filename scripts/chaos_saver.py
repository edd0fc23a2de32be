"""Trainer for scripts/chaos_kills.py's supervisor mode: under `ckptd run`, step and save until killed.

usage: chaos_saver.py LOG PIDFILE   (LOG gets "STEP DIGEST" per committed save)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import ckptd
from chaos_kills import _model, save_forever

log_path, pid_file = sys.argv[1], sys.argv[2]
with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
torch.set_num_threads(1)
model = _model()
save_forever(ckptd.Checkpointer(model=model, keep_last=2, pace=0, save_on_close=False), model, log_path)
