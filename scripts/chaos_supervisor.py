#!/usr/bin/env python3
"""Supervisor chaos: `ckptd run` of examples/train_toy.py through random events.

    python scripts/chaos_supervisor.py --count 200 --json sup.json

Events, drawn uniformly while the trainer trains: SIGTERM to the trainer; SIGKILL to the trainer;
SIGKILL to `ckptd run` (its trainer dies with it) followed by a new `ckptd run`, as systemd would start
one; SIGSTOP of the trainer past --hang-timeout; an AWS spot notice from the local fake metadata service
(tests/fixtures/fake_metadata.py, loopback only); `ckptd save --wait`; `ckptd stop`. After every event that
ends `ckptd run` (exit 85) a new one is started. Then the run is let finish, and:
  * its final model and optimizer (the last checkpoint's tensors) are bit-identical to an uninterrupted
    run's, and so is the digest train_toy prints;
  * lost steps (a life's last completed step minus the next life's resume step, from an observer in
    scripts/chaos_toy.py): 0 per SIGTERM / notice / stop; after a SIGKILL / hang / supervisor kill the next
    life resumes from exactly the newest valid checkpoint there was at the kill (the trainer is stopped with
    SIGSTOP first, so none can be committed in between); how many steps that loses (the save interval plus
    the steps run while the save in flight persisted) is reported, not bounded: it grows with load;
  * the journal accounts for every event (an exit, hang, notice, stop or checkpoint entry for each, a
    new start after each supervisor kill);
  * goodput: ckptd's own (ckptd_goodput_ratio's figures, kept across runs in .ckptd/state.json) and
    steps kept / steps computed from the observer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from _report import emit  # scripts/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOY = os.path.join(REPO, "examples", "train_toy.py")
WRAP = os.path.join(HERE, "chaos_toy.py")
EVENTS = ["sigterm", "sigkill", "kill_supervisor", "sigstop", "notice", "save", "stop"]
EVERY = 25
# Longer than a life's start on a busy machine (the docs' rule for --hang-timeout): the hang watch starts at
# the trainer's hello, and the library then still imports torch.distributed and restores before the first
# heartbeat. A life killed as hung before its first step counts as a start failure; three in a row give up.
HANG_TIMEOUT = 10


def _toy_args(steps: int, delay: float) -> list[str]:
    return ["--steps", str(steps), "--every-steps", str(EVERY), "--step-delay", str(delay)]


def _steplog(path: str) -> list[tuple[str, int, int]]:
    try:
        with open(path) as f:
            return [(p[0], int(p[1]), int(p[2])) for p in (line.split() for line in f) if len(p) == 3]
    except FileNotFoundError:
        return []


def _journal(root: str) -> list[dict]:
    out = []
    try:
        with open(os.path.join(root, ".ckptd", "journal.jsonl")) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return out


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def _tensors(path: str) -> dict:
    import ckptd

    state = ckptd.load_state(path)
    return {k: state[k] for k in ("model", "optimizer") if k in state}


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def reference(work: str, steps: int) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    d = os.path.join(work, "ref")
    out = subprocess.run([sys.executable, TOY, "--dir", d, *_toy_args(steps, 0)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    from ckptd import store

    return re.search(r"digest=(\w+)", out.stdout).group(1), _tensors(store.list_checkpoints(d)[-1].path)


class Chaos:
    def __init__(self, work: str, steps: int, delay: float, rng: random.Random) -> None:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from fixtures.fake_metadata import FakeMetadata

        self.fake = FakeMetadata("aws")
        self.root = os.path.join(work, "ck")
        self.steplog = os.path.join(work, "steps.log")
        self.work, self.steps, self.delay, self.rng = work, steps, delay, rng
        self.env = {**os.environ, "CKPTD_NOTICES_LOOPBACK_ONLY": "1"}
        self.runs: list[subprocess.Popen] = []
        self.outputs: list[str] = []
        self.done: list[tuple[str, int]] = []  # (event, journal length before it)
        self.expected: dict[int, int] = {}  # index in done -> the step the next life must resume from

    def start(self) -> subprocess.Popen:
        out = open(os.path.join(self.work, f"run-{len(self.runs)}.out"), "w")
        err = open(os.path.join(self.work, f"run-{len(self.runs)}.err"), "w")
        cmd = [sys.executable, "-m", "ckptd", "run", "--dir", self.root, "--keep-last", "3",
               "--grace", "20", "--force-grace", "1", "--backoff-base", "0.05", "--backoff-max", "0.2",
               "--max-restarts", "1000", "--same-step-crashes", "1000", "--hang-timeout", str(HANG_TIMEOUT),
               "--hang-grace", "1",
               "--notices", "aws", "--notice-endpoint", self.fake.url, "--notice-poll", "0.1",
               "--metrics-addr", "127.0.0.1:0", WRAP, self.steplog, *_toy_args(self.steps, self.delay)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=self.env, cwd=REPO)
        self.runs.append(proc)
        self.outputs.append(out.name)
        return proc

    def trainer(self) -> int | None:
        """Pid of the current life, once it has trained a step past its resume point."""
        lines = _steplog(self.steplog)
        if not lines or lines[-1][0] != "step":
            return None
        pid = lines[-1][1]
        resumed = [n for kind, p, n in lines if kind == "restore" and p == pid]
        if not resumed or lines[-1][2] <= resumed[-1]:
            return None
        return pid if _alive(pid) else None  # a zombie of the previous life is not the trainer

    def inject(self, event: str) -> None:
        from ckptd import store
        from fixtures.sup_helpers import freeze

        proc = self.runs[-1]
        pid = _wait(lambda: proc.poll() is None and self.trainer(), 60, "training")
        time.sleep(self.rng.uniform(0.1, 1.0))
        pid = _wait(lambda: proc.poll() is None and self.trainer(), 60, "training")
        self.done.append((event, len(_journal(self.root))))
        if event in ("sigkill", "sigstop", "kill_supervisor"):
            # What a kill loses is judged exactly, not by a bound in steps that a busy machine breaks (a save in
            # flight persists for as long as the machine keeps its writer off the CPU): with the trainer stopped
            # nothing more can be committed, so the next life must resume from the newest valid checkpoint now.
            if not freeze(pid):
                raise RuntimeError(f"{event}: trainer pid {pid} ended before it could be stopped")
            self.expected[len(self.done) - 1] = max((i.step for i in store.list_checkpoints(self.root) if i.valid),
                                                    default=0)
        if event == "sigterm":
            os.kill(pid, signal.SIGTERM)
        elif event == "sigkill":
            os.kill(pid, signal.SIGKILL)
        elif event == "sigstop":
            pass  # stopped above, and left so: past --hang-timeout the supervisor kills and restarts it
        elif event == "kill_supervisor":
            proc.kill()
            proc.wait()
            _wait(lambda: not _alive(pid), 20, "the trainer to die with its supervisor")
        elif event == "notice":
            self.fake.set(instance_action={"action": "terminate", "time": _iso(time.time() + 60)})
        elif event == "save":
            r = subprocess.run([sys.executable, "-m", "ckptd", "save", "--wait", "--dir", self.root],
                               capture_output=True, text=True, timeout=60, cwd=REPO)
            assert r.returncode == 0, r.stderr
        elif event == "stop":
            subprocess.run([sys.executable, "-m", "ckptd", "stop", "--dir", self.root], capture_output=True,
                           timeout=60, cwd=REPO)
        if event in ("sigterm", "notice", "stop"):
            code = proc.wait(60)
            assert code == 85, f"{event}: `ckptd run` exited {code}, not 85"
            self.fake.set(instance_action=None)
        if event in ("sigterm", "notice", "stop", "kill_supervisor"):
            self.start()  # as systemd (or the replacement VM) would
        elif event in ("sigkill", "sigstop"):
            _wait(lambda: self.trainer() not in (None, pid), 120, f"a new trainer after {event}")

    def close(self) -> None:
        for p in self.runs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.fake.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rfind(")") + 2] != "Z"
    except OSError:
        return False


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def account(chaos: Chaos) -> dict:
    """Lost steps per event from the observer's log; journal entries per event."""
    lines = _steplog(chaos.steplog)
    lives: list[dict] = []
    for kind, pid, n in lines:
        if not lives or lives[-1]["pid"] != pid:
            lives.append({"pid": pid, "resume": None, "last": None})
        if kind == "restore":
            lives[-1]["resume"] = n
        else:
            lives[-1]["last"] = n if lives[-1]["last"] is None else max(lives[-1]["last"], n)
    lost = []
    for a, b in zip(lives, lives[1:], strict=False):
        lost.append((a["last"] if a["last"] is not None else a["resume"] or 0) - (b["resume"] or 0))
    journal = _journal(chaos.root)
    per_event: dict[str, list[int]] = {}
    missing = []
    # lives[k] ends with the k-th life-ending event, in order (save ends no life)
    ending = [e for e, _ in chaos.done if e != "save"]
    for i, (event, at) in enumerate(chaos.done):
        after = [e.get("event") for e in journal[at:]]
        want = {"sigterm": "exit", "sigkill": "exit", "sigstop": "hang", "notice": "notice", "stop": "stop_requested",
                "save": "checkpoint", "kill_supervisor": "start"}[event]
        if want not in after:
            missing.append(f"event {i} ({event}): no {want} entry in the journal after it")
    for event, n in zip(ending, lost, strict=False):
        per_event.setdefault(event, []).append(n)
    wrong = []
    ending_at = [i for i, (e, _) in enumerate(chaos.done) if e != "save"]
    for k, i in enumerate(ending_at):
        want = chaos.expected.get(i)
        got = lives[k + 1]["resume"] if k + 1 < len(lives) else None
        if want is not None and got != want:
            wrong.append(f"event {i} ({chaos.done[i][0]}): the next life resumed from step {got}, not from the "
                           f"newest valid checkpoint at the kill (step {want})")
    computed = sum((lv["last"] or 0) - (lv["resume"] or 0) for lv in lives)
    return {"lives": len(lives), "lost_steps": {e: {"n": len(v), "max": max(v), "total": sum(v)}
                                                for e, v in per_event.items()},
            "lost_by_event": per_event, "journal_missing": missing, "resume_wrong": wrong,
            "steps_computed": computed}


def run(count: int, steps: int, delay: float, seed: int = 15, work: str | None = None) -> dict:
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ckptd-chaos-sup-")
    rng = random.Random(seed)
    t0 = time.monotonic()
    ref_digest, ref_tensors = reference(work, steps)
    chaos = Chaos(work, steps, delay, rng)
    failures: list[str] = []
    try:
        chaos.start()
        for i in range(count):
            if chaos.runs[-1].poll() is not None:
                failures.append(f"the run ended before event {i} (raise --steps)")
                break
            chaos.inject(rng.choice(EVENTS))
        code = chaos.runs[-1].wait(timeout=900)
        wall = time.monotonic() - t0
        from ckptd import store

        with open(chaos.outputs[-1]) as f:
            final = re.search(r"final_step=(\d+) digest=(\w+)", f.read())
        if code != 0 or not final:
            failures.append(f"the last `ckptd run` exited {code} without finishing")
        elif int(final.group(1)) != steps or final.group(2) != ref_digest:
            failures.append(f"final digest {final.group(2)} at step {final.group(1)} != uninterrupted {ref_digest}")
        last = store.list_checkpoints(chaos.root)[-1]
        if last.step != steps or not _equal(_tensors(last.path), ref_tensors):
            failures.append("the final checkpoint's model/optimizer differ from the uninterrupted run's")
        acc = account(chaos)
        for e, v in acc["lost_by_event"].items():
            # A stop loses nothing. A kill loses the steps since the last commit, and account() checked that
            # the next life resumed from exactly that commit; how many steps that is (up to the save interval
            # plus the steps run while the save in flight persisted) is reported, not bounded: it grows with load.
            if e in ("sigterm", "notice", "stop") and max(v) > 0:
                failures.append(f"{e}: lost {max(v)} steps (none allowed): {v}")
        failures += acc["journal_missing"] + acc["resume_wrong"]
        try:
            with open(os.path.join(chaos.root, ".ckptd", "state.json")) as f:
                g = (json.load(f).get("metrics") or {}).get("goodput") or {}
            goodput = round(g["productive_seconds"] / g["wall_seconds"], 3) if g.get("wall_seconds") else None
        except (OSError, ValueError, KeyError):
            goodput = None
        events: dict[str, int] = {}
        for e, _ in chaos.done:
            events[e] = events.get(e, 0) + 1
        return {"events": len(chaos.done), "by_event": events, "steps": steps, "step_delay": delay,
                "every_steps": EVERY, "ckptd_runs": len(chaos.runs), "lives": acc["lives"],
                "lost_steps": acc["lost_steps"], "steps_computed": acc["steps_computed"],
                "goodput_steps": round(steps / max(acc["steps_computed"], 1), 3),
                "goodput_ckptd": goodput, "wall_seconds": round(wall, 1),
                "failed": len(failures), "failures": failures[:40]}
    finally:
        chaos.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20, help="random events (default 20)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: 150 per event, at least 3000)")
    p.add_argument("--step-delay", type=float, default=0.004)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args()
    report = run(a.count, a.steps or max(3000, 150 * a.count), a.step_delay, a.seed)
    return emit(report, a.json)


if __name__ == "__main__":
    sys.exit(main())
