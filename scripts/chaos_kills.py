#!/usr/bin/env python3
"""Random SIGKILLs during saves: trainer, `ckptd prune` and supervisor.

    python scripts/chaos_kills.py --count 1000 --json kills.json

Each round kills a process at a uniformly random moment of its save path and then checks, as the next
start would find the directory:
  * every checkpoint visible under its final name verifies byte for byte (0 torn checkpoints accepted);
  * the newest valid one restores, and its values equal the digest recorded when it was saved;
  * the newest valid checkpoint never goes backwards (nothing committed is lost);
  * no temporary or trash directory survives the next start (restore / `ckptd prune` / `ckptd run`).

Modes (``--modes``, default all, the count split 80/10/10): ``trainer`` forks a saver that steps and saves
(alternately async and blocking; keep_last=2, so every commit is followed by a retention delete) and is
killed within one measured save cycle (snapshot, write, fsync, manifest, rename, retention);
``prune`` kills `ckptd prune --keep-last 1` within its measured duration; ``supervisor`` SIGKILLs
`ckptd run` (the trainer dies with it by PDEATHSIG) while its trainer saves, then checks as a new
`ckptd run` would. Prints one JSON report; exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from _report import emit  # scripts/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SUP_SAVER = os.path.join(HERE, "chaos_saver.py")


def _model():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))  # ~1 MiB


def fill(model, step: int) -> None:
    """The values of step ``step``: every tensor different, all a function of the step only."""
    import torch

    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def digest(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_forever(ck, model, log_path: str, tick=None, manual_every: int = 0) -> None:
    """Resume, then step and save until killed: the values of ``fill``; every ``manual_every``-th save
    manual; ``tick()`` once each save started; "STEP DIGEST" logged for each committed one."""
    step = ck.restore()
    with open(log_path, "a") as log:
        while True:
            step += 1
            fill(model, step)
            ck.step(step)
            res = ck.save(kind="manual" if manual_every and step % manual_every == 0 else "periodic")
            if tick is not None:
                tick()
            res.wait()
            if res.error is None:
                log.write(f"{step} {digest(model)}\n")
                log.flush()


def _saver(root: str, w: int, log_path: str, async_save: bool) -> None:
    """Child: the save loop in ``root``; a byte on the pipe per cycle."""
    import torch

    import ckptd

    torch.set_num_threads(1)
    model = _model()
    ck = ckptd.Checkpointer(model=model, dir=root, keep_last=2, async_save=async_save, pace=0,
                            handle_signals=False, save_on_close=False)
    save_forever(ck, model, log_path, tick=lambda: os.write(w, b"."), manual_every=3)


def _recorded(log_path: str) -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        with open(log_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    out[int(parts[0])] = parts[1]
    except FileNotFoundError:
        pass
    return out


class Checker:
    """What the next start must find; counts every figure of the report."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.rounds = 0
        self.phase: dict[str, int] = {}
        self.verified = 0
        self.last_step: dict[str, int] = {}

    def check(self, mode: str, root: str, log_path: str | None, phase: str) -> None:
        import ckptd
        from ckptd import store

        self.rounds += 1
        self.phase[phase] = self.phase.get(phase, 0) + 1
        tag = f"{mode} round {self.rounds} ({phase})"
        listed = store.list_checkpoints(root)
        for info in listed:
            full = store.verify(info.path)
            self.verified += 1
            if not full.valid:
                self.failures.append(f"{tag}: torn checkpoint visible: {info.name}: {full.reason}")
        if not listed:
            self.failures.append(f"{tag}: no checkpoint left")
            return
        model = _model()
        ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
        step = ck.restore()  # the next start: removes temps of dead writers, quarantines nothing valid
        ck.close()
        if step != listed[-1].step:
            self.failures.append(f"{tag}: restored step {step}, newest valid is {listed[-1].step}")
        got = digest(model)
        want = _model()
        fill(want, step)
        if got != digest(want):
            self.failures.append(f"{tag}: step {step} restored with wrong values")
        if log_path is not None:
            rec = _recorded(log_path).get(step)
            if rec is not None and rec != got:
                self.failures.append(f"{tag}: step {step} differs from the digest recorded at its save")
        if step < self.last_step.get(root, 0):
            self.failures.append(f"{tag}: newest valid step went back from {self.last_step[root]} to {step}")
        self.last_step[root] = step
        left = [n for n in os.listdir(root) if n.startswith((store.TMP_PREFIX, store.TRASH_PREFIX))]
        if left:
            self.failures.append(f"{tag}: temporary entries survived the next start: {left}")
        if os.path.exists(os.path.join(root, store.QUARANTINE_DIR)):
            self.failures.append(f"{tag}: a valid checkpoint was quarantined")


def _phase(root: str) -> str:
    """Where the kill landed, as the directory shows it."""
    from ckptd import store

    names = os.listdir(root) if os.path.isdir(root) else []
    if any(n.startswith(store.TMP_PREFIX) for n in names):
        tmp = [n for n in names if n.startswith(store.TMP_PREFIX)][0]
        files = os.listdir(os.path.join(root, tmp))
        return "manifest-rename" if store.MANIFEST in files else ("state" if store.STATE in files else "write")
    if any(n.startswith(store.TRASH_PREFIX) for n in names):
        return "retention"
    return "between"


def _fork_saver(root: str, log_path: str, async_save: bool) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            _saver(root, w, log_path, async_save)
        finally:
            os._exit(1)
    os.close(w)
    return pid, r


def _cycle_seconds(root: str, log_path: str) -> float:
    """Median time of one save cycle of the saver (calibration, in a scratch directory)."""
    pid, r = _fork_saver(root, log_path, False)
    stamps = []
    while len(stamps) < 25:
        ready, _, _ = select.select([r], [], [], 60)
        if not ready:
            break
        os.read(r, 1)
        stamps.append(time.monotonic())
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)
    gaps = sorted(b - a for a, b in zip(stamps[5:], stamps[6:], strict=False))
    return gaps[len(gaps) // 2]


def trainer_rounds(n: int, work: str, rng: random.Random, chk: Checker) -> dict:
    root, log_path = os.path.join(work, "trainer"), os.path.join(work, "trainer.log")
    cycle = _cycle_seconds(os.path.join(work, "calib"), os.path.join(work, "calib.log"))
    for i in range(n):
        pid, r = _fork_saver(root, log_path, async_save=bool(i % 2))
        ready, _, _ = select.select([r], [], [], 60)
        if not ready:
            chk.failures.append(f"trainer round {i}: saver did not start")
        os.read(r, 1)
        select.select([], [], [], rng.uniform(0, cycle))  # a uniformly random moment of one save cycle
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        chk.check("trainer", root, log_path, _phase(root))
    return {"rounds": n, "cycle_seconds": round(cycle, 4)}


def _make_store_checkpoints(root: str, first: int, count: int) -> None:
    """Small real checkpoints written through the store (values of ``fill``), fast enough for every round."""
    import torch

    import ckptd

    model = _model()
    ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False, async_save=False)
    for s in range(first, first + count):
        fill(model, s)
        ck.step(s)
        ck.save(kind="periodic")
    ck.close()
    del torch


def prune_rounds(n: int, work: str, rng: random.Random, chk: Checker) -> dict:
    from ckptd import store

    root = os.path.join(work, "prune")
    cmd = [sys.executable, "-m", "ckptd", "prune", "--keep-last", "1", root]
    step = 1
    durations = []
    for i in range(n):
        _make_store_checkpoints(root, step, 4)
        step += 4
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        if i < 3:  # calibrate on full runs first
            proc.wait()
            durations.append(time.monotonic() - t0)
            chk.check("prune", root, None, "completed")
            continue
        time.sleep(rng.uniform(0, max(durations)))
        proc.kill()
        proc.wait()
        chk.check("prune", root, None, _phase(root) if proc.returncode < 0 else "completed")
    return {"rounds": n, "prune_seconds": round(max(durations), 3), "store": store.FORMAT}


def supervisor_rounds(n: int, work: str, rng: random.Random, chk: Checker) -> dict:
    from ckptd import store

    root, log_path = os.path.join(work, "sup"), os.path.join(work, "sup.log")
    pid_file = os.path.join(work, "sup-saver.pid")
    for i in range(n):
        before = max((c.step for c in store.list_checkpoints(root)), default=0) if os.path.isdir(root) else 0
        proc = subprocess.Popen([sys.executable, "-m", "ckptd", "run", "--dir", root, "--notices", "off",
                                 "--metrics-addr", "off", SUP_SAVER, log_path, pid_file],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the trainer is saving: a step newer than at start was logged
            if max(_recorded(log_path), default=0) > before:
                break
            time.sleep(0.01)
        else:
            chk.failures.append(f"supervisor round {i}: trainer never saved")
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()
        proc.wait()
        with open(pid_file) as f:
            trainer = int(f.read())
        _wait_gone(trainer)
        chk.check("supervisor", root, log_path, _phase(root))
    return {"rounds": n}


def _wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            if st[st.rfind(")") + 2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.01)
    raise RuntimeError(f"trainer pid {pid} outlived its supervisor's SIGKILL by {timeout} s")


def run(count: int, modes: list[str], seed: int = 1234, work: str | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ckptd-chaos-kills-")
    rng = random.Random(seed)
    chk = Checker()
    share = {"trainer": 0.8, "prune": 0.1, "supervisor": 0.1}
    total = sum(share[m] for m in modes)
    t0 = time.monotonic()
    report: dict = {"count": count, "seed": seed, "modes": {}}
    try:
        for m in modes:
            n = max(1, round(count * share[m] / total))
            fn = {"trainer": trainer_rounds, "prune": prune_rounds, "supervisor": supervisor_rounds}[m]
            report["modes"][m] = fn(n, work, rng, chk)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    report.update(kills=chk.rounds, phases=chk.phase, checkpoints_verified=chk.verified,
                  failures=chk.failures[:50], failed=len(chk.failures), seconds=round(time.monotonic() - t0, 1))
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000, help="SIGKILLs in all (default 1000)")
    p.add_argument("--modes", default="trainer,prune,supervisor", help="comma-separated: trainer,prune,supervisor")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args()
    report = run(a.count, a.modes.split(","), a.seed)
    return emit(report, a.json)


if __name__ == "__main__":
    sys.exit(main())
