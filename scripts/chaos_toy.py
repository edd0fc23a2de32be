"""examples/train_toy.py with an observer, for scripts/chaos_supervisor.py.

usage: chaos_toy.py STEPLOG [train_toy.py arguments]
Appends "restore PID N" after restore() and "step PID N" at every ck.step(), unbuffered (os.write), so the
chaos driver knows each life's resume step and the last step it completed, whatever kills it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import ckptd
import train_toy

fd = os.open(sys.argv.pop(1), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
pid = os.getpid()
_restore, _step = ckptd.Checkpointer.restore, ckptd.Checkpointer.step


def restore(self, *a, **k):
    n = _restore(self, *a, **k)
    os.write(fd, f"restore {pid} {n}\n".encode())
    return n


def step(self, n, *a, **k):
    os.write(fd, f"step {pid} {n}\n".encode())  # step n completed; before the safe point acts on it
    return _step(self, n, *a, **k)


ckptd.Checkpointer.restore, ckptd.Checkpointer.step = restore, step
sys.exit(train_toy.main(sys.argv[1:]))
