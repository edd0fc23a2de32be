"""supervisor/process.py with real processes: what the supervisor may signal and reap.

Each case runs in a fresh interpreter: ``Processes.setup()`` makes its process a child subreaper, which must
not leak into the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

# A supervisor that already has two children when it starts (bash's `> >(tee log)` makes one): one that has
# exited (a zombie nobody has reaped) and one that runs. Then a run whose trainer leaves a worker behind.
SCRIPT = r"""
import json, os, sys, time
from ckptd.supervisor.process import Processes, process_state

done = os.fork()
if done == 0:
    os._exit(7)
alive = os.fork()
if alive == 0:
    time.sleep(60)
    os._exit(0)
while process_state(done) != "Z":
    time.sleep(0.01)

procs = Processes()
procs.setup()
r, w = os.pipe()
os.set_inheritable(w, True)
trainer = procs.spawn([sys.executable, "-c", "import os, subprocess, sys; "
                       "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                       f"os.write({w}, str(p.pid).encode())"], dict(os.environ, PYTHONPATH=os.getcwd()), 0.0)
os.close(w)
worker = int(os.read(r, 100))
reaped = []
deadline = time.monotonic() + 60
while trainer.pid not in reaped and time.monotonic() < deadline:
    reaped += [s.pid for s in procs.reap()]
    time.sleep(0.01)
killed = procs.kill_all(trainer)
while worker not in reaped and time.monotonic() < deadline:
    reaped += [s.pid for s in procs.reap()]
    time.sleep(0.01)
again = procs.kill_all(trainer)
print(json.dumps({"reaped": reaped, "trainer": trainer.pid, "worker": worker, "killed": killed, "again": again,
                  "done": process_state(done), "alive": process_state(alive)}))
procs.shutdown()
os.kill(alive, 9)
"""


def test_children_the_supervisor_had_before_it_started_are_never_killed_nor_reaped(tmp_path):
    # output to files: a pipe would be held open by the sleepers until they end
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        code = subprocess.run([sys.executable, "-c", SCRIPT], stdout=out, stderr=err, timeout=120).returncode
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert code == 0, stderr
    got = json.loads(stdout)
    # the run's own processes: the trainer reaped, its orphaned worker killed (counted once) and reaped
    assert got["trainer"] in got["reaped"] and got["worker"] in got["reaped"], got
    assert got["killed"] == 1 and got["again"] == 0, got
    # the children it already had: the exited one is still unreaped, the running one still runs
    assert got["done"] == "Z" and got["alive"] in ("S", "R"), got
