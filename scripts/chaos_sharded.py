#!/usr/bin/env python3
"""SIGKILL of random ranks during sharded (FSDP2) saves: no torn checkpoint is ever visible.

    python scripts/chaos_sharded.py --count 50 --json sharded.json

A 2-rank FSDP2 job (gloo, CPU; AdamW; ranks forked from this process after torch is imported, so a
start costs well under a second) saves every step in the background (``every_steps=1``, ``keep_last=2``:
saves run back to back, a periodic save due while one persists is coalesced, and every commit is
followed by a retention delete). The state after step n is a function of n only (each step's data is
seeded by the step), and rank 0 reports the digest of the full model and optimizer state after every
step, before ``ck.step(n)`` snapshots it. Each round waits for 1-3 saves to start, SIGKILLs a random rank
at a uniformly random moment of one measured save cycle, then the other rank at a random moment of the
next one (unless it already exited: a rank whose peer died fails in its next collective), and checks as
the next start finds the directory:

  * every checkpoint visible under its final name verifies byte for byte, shard files included
    (``store.list_checkpoints`` + ``store.verify``): 0 torn checkpoints accepted;
  * the newest valid step never goes back;
  * the next start (the next round's 2 ranks; every 4th round, and after the last kill, a 1-rank load
    that reshards 2 -> 1) restores exactly the newest valid step, to the digest reported when that step
    was saved; no temporary or trash directory survives it; nothing is quarantined;
  * a step reached in two lives has the same digest in both (resume is exact).

Prints one JSON report; exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import signal
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _report import emit  # noqa: E402
from fixtures.sup_helpers import free_port  # noqa: E402

WIDTH = 256  # Linear(64, 256), Linear(256, 256), Linear(256, 16): ~86k parameters, ~1 MiB with AdamW's state


def build() -> tuple[Any, Any]:
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                                torch.nn.ReLU(), torch.nn.Linear(WIDTH, 16))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: Any, opt: Any, step: int, rank: int) -> None:
    import torch

    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step * 7919 + rank))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def digest(model: Any, opt: Any) -> str:
    """Hash of the full (gathered) parameters and optimizer state; collective, the same on every world size."""
    h = hashlib.sha256()

    def add(name: str, t: Any) -> None:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).numpy().tobytes())

    for name, p in model.named_parameters():
        add(name, p)
        state = opt.state.get(p, {})
        for k in sorted(state):
            add(f"{name}/{k}", state[k])
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- a rank (forked child)


def _rank(rank: int, world: int, port: int, root: str, w: int | None, log_path: str, train: bool) -> None:
    import torch
    import torch.distributed as dist

    import ckptd
    from ckptd import store

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for k in [k for k in os.environ if k.startswith("CKPTD_")]:
        del os.environ[k]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))

    def send(**msg: Any) -> None:
        if w is not None:
            os.write(w, (json.dumps(msg) + "\n").encode())

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    model, opt = build()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=1, keep_last=2, pace=0,
                            handle_signals=False, save_on_close=False)
    step = ck.restore()
    d = digest(model, opt)
    names = os.listdir(root) if os.path.isdir(root) else []
    send(restored=step, digest=d, left=[n for n in names if n.startswith((store.TMP_PREFIX, store.TRASH_PREFIX))],
         quarantined=store.QUARANTINE_DIR in names)
    if not train:
        ck.close()
        dist.destroy_process_group()
        return
    while True:
        step += 1
        train_step(model, opt, step, rank)
        send(state=step, digest=digest(model, opt))
        if ck.step(step) is not None:
            send(save=step, t=time.monotonic())


def _fork_rank(rank: int, world: int, port: int, root: str, log_path: str, train: bool) -> tuple[int, int | None]:
    r, w = os.pipe() if rank == 0 else (None, None)
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            if r is not None:
                os.close(r)
            _rank(rank, world, port, root, w, log_path, train)
        except BaseException as exc:  # noqa: BLE001 - a peer died: leave as a killed rank would
            code = 3
            print(f"rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    if w is not None:
        os.close(w)
    return pid, r


class Lines:
    """JSON lines from rank 0's pipe, read while waiting."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, b"", False

    def pump(self, until: float, stop: Any = None) -> list[dict]:
        """Read until ``until`` (monotonic), EOF, or ``stop(msg)`` is true for a message read."""
        out: list[dict] = []
        while not self.eof:
            left = until - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                break
            data = os.read(self.fd, 65536)
            if not data:
                self.eof = True
                break
            self.buf += data
            *lines, self.buf = self.buf.split(b"\n")
            for line in lines:
                out.append(json.loads(line))
            if stop is not None and any(stop(m) for m in out):
                break
        return out


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


# ----------------------------------------------------------------------------- the loop


class Chaos:
    def __init__(self, work: str, seed: int) -> None:
        self.root = os.path.join(work, "ck")
        self.log = os.path.join(work, "ranks.log")
        self.rng = random.Random(seed)
        self.failures: list[str] = []
        self.states: dict[int, str] = {}  # step -> digest reported before ck.step(step)
        self.newest = 0  # newest valid step after the last kill
        self.expect: int | None = None  # what the next start must restore
        self.phases: dict[str, int] = {}
        self.first_killed = {"0": 0, "1": 0}
        self.loads = {"1": 0, "2": 0}
        self.verified = 0
        self.kills = 0
        self.peer_exited = 0  # rounds whose second rank exited by itself before its kill
        self.saves_started = 0
        self.cycle = 0.0

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def _record(self, msgs: list[dict], tag: str) -> None:
        for m in msgs:
            if "state" in m:
                old = self.states.setdefault(m["state"], m["digest"])
                if old != m["digest"]:
                    self.fail(f"{tag}: step {m['state']} reached again with another state (resume not exact)")
            elif "save" in m:
                self.saves_started += 1

    def _check_start(self, m: dict | None, tag: str, world: int) -> None:
        """What the next start found (rank 0's first message)."""
        if m is None or "restored" not in m:
            self.fail(f"{tag}: the {world}-rank start did not report its restore ({self._log_tail()})")
            return
        self.loads[str(world)] += 1
        if self.expect is not None:
            if m["restored"] != self.expect:
                self.fail(f"{tag}: restored step {m['restored']}, newest valid is {self.expect}")
            elif self.expect and self.states.get(self.expect) != m["digest"]:
                self.fail(f"{tag}: step {self.expect} restored ({world} rank(s)) with values other than saved")
        if m["left"]:
            self.fail(f"{tag}: temporary entries survived the next start: {m['left']}")
        if m["quarantined"]:
            self.fail(f"{tag}: a checkpoint was quarantined (a valid one, or a torn one was visible)")
        self.expect = None

    def _log_tail(self) -> str:
        try:
            with open(self.log) as f:
                return " | ".join(f.read().splitlines()[-3:])
        except OSError:
            return "no rank log"

    def load_1(self, tag: str) -> None:
        """A 1-rank start: restores (2 -> 1 resharding) and reports; nothing written."""
        pid, r = _fork_rank(0, 1, free_port(), self.root, self.log, train=False)
        assert r is not None
        lines = Lines(r)
        msgs = lines.pump(time.monotonic() + 120, lambda m: "restored" in m)
        self._check_start(next((m for m in msgs if "restored" in m), None), tag, 1)
        if not _gone(pid, 60):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.fail(f"{tag}: the 1-rank load did not exit")
        os.close(r)

    def round(self, i: int, calibrate: bool) -> None:
        tag = f"round {i}"
        port = free_port()
        pids = []
        r = None
        for rank in (0, 1):
            pid, fd = _fork_rank(rank, 2, port, self.root, self.log, train=True)
            pids.append(pid)
            r = fd if fd is not None else r
        assert r is not None
        lines = Lines(r)
        try:
            msgs = lines.pump(time.monotonic() + 120, lambda m: "restored" in m)
            start = next((m for m in msgs if "restored" in m), None)
            self._check_start(start, tag, 2)
            self._record(msgs, tag)
            want = 12 if calibrate else self.rng.randint(1, 3)
            saves: list[float] = []
            deadline = time.monotonic() + 120
            while len(saves) < want and time.monotonic() < deadline and not lines.eof:
                got = lines.pump(deadline, lambda m: "save" in m)
                self._record(got, tag)
                saves += [m["t"] for m in got if "save" in m]
            if len(saves) < want:
                self.fail(f"{tag}: only {len(saves)} of {want} saves started ({self._log_tail()})")
            if calibrate:
                gaps = sorted(b - a for a, b in zip(saves[2:], saves[3:], strict=False))
                self.cycle = gaps[len(gaps) // 2] if gaps else 0.05
            first = self.rng.randrange(2)
            self._record(lines.pump(time.monotonic() + self.rng.uniform(0, self.cycle)), tag)
            os.kill(pids[first], signal.SIGKILL)
            self.first_killed[str(first)] += 1
            self.kills += 1
            other = pids[1 - first]
            self._record(lines.pump(time.monotonic() + self.rng.uniform(0, self.cycle)), tag)
            if os.waitpid(other, os.WNOHANG)[0]:
                pids.remove(other)  # it exited by itself: its next collective failed
                self.peer_exited += 1
            else:
                os.kill(other, signal.SIGKILL)
                self.kills += 1
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
            self._record(lines.pump(time.monotonic() + 0.5), tag)  # what rank 0 wrote before it died
            os.close(r)
        self.check(tag)

    def check(self, tag: str) -> None:
        """The directory as the next start finds it (no process of the job is alive)."""
        from ckptd import store

        phase = _phase(self.root)
        self.phases[phase] = self.phases.get(phase, 0) + 1
        listed = store.list_checkpoints(self.root) if os.path.isdir(self.root) else []
        for info in listed:
            full = store.verify(info.path)
            self.verified += 1
            if not full.valid:
                self.fail(f"{tag} ({phase}): torn checkpoint visible: {info.name}: {full.reason}")
        newest = listed[-1].step if listed else 0
        if newest < self.newest:
            self.fail(f"{tag} ({phase}): newest valid step went back from {self.newest} to {newest}")
        if newest and newest not in self.states:
            self.fail(f"{tag} ({phase}): step {newest} was committed but never reported before its save")
        self.newest = newest
        self.expect = newest


def _phase(root: str) -> str:
    """Where the kills landed, as the directory shows it."""
    from ckptd import store

    names = os.listdir(root) if os.path.isdir(root) else []
    tmps = [n for n in names if n.startswith(store.TMP_PREFIX)]
    if tmps:
        files = os.listdir(os.path.join(root, tmps[0]))
        if store.MANIFEST in files:
            return "manifest-rename"
        return "shards" if any(f.startswith(("shard-", "rank-", "dcp")) for f in files) else "open"
    if any(n.startswith(store.TRASH_PREFIX) for n in names):
        return "retention"
    return "between"


def run(count: int, seed: int = 15, work: str | None = None) -> dict:
    import torch
    import torch.distributed.checkpoint  # imported once here, inherited by every forked rank
    import torch.distributed.fsdp

    import ckptd.checkpointer
    import ckptd.distributed
    import ckptd.sharded  # noqa: F401

    del torch
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ckptd-chaos-sharded-")
    os.makedirs(work, exist_ok=True)
    chaos = Chaos(work, seed)
    t0 = time.monotonic()
    try:
        for i in range(count):
            chaos.round(i, calibrate=i == 0)
            if i % 4 == 3 or i == count - 1:
                chaos.load_1(f"after round {i}")
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return {"seed": seed, "rounds": count, "kills": chaos.kills, "peer_exited_first": chaos.peer_exited,
            "first_killed_rank": chaos.first_killed,
            "phases": chaos.phases, "save_cycle_seconds": round(chaos.cycle, 4), "saves_started": chaos.saves_started,
            "steps_reported": len(chaos.states), "newest_step": chaos.newest, "loads": chaos.loads,
            "checkpoints_verified": chaos.verified, "failures": chaos.failures[:50], "failed": len(chaos.failures),
            "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=50, help="rounds: each SIGKILLs a random rank, then the other")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--work", help="keep the checkpoints and the ranks' log here (default: a removed temp dir)")
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args()
    return emit(run(a.count, a.seed, a.work), a.json)


if __name__ == "__main__":
    sys.exit(main())
