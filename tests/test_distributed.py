"""Several ranks (gloo on CPU, real processes): per-rank state, one stop at one step, one commit.

Starting a gloo job costs seconds here, so each test does several things with one job.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys

import pytest

from ckptd import exitcodes, store
from conftest import ROOT
from fixtures.sup_helpers import DIST_OFF as OFF
from fixtures.sup_helpers import DIST_TRAINER as TRAINER
from fixtures.sup_helpers import FIXTURES, TORCHRUN, Run, ckptd, journal, run_ranks, wait_for

WORKER = os.path.join(FIXTURES, "dist_worker.py")


def run_workers(scenario: str, root: str, world: int = 2, env: dict[str, str] | None = None,
                timeout: float = 120) -> list[dict]:
    """Start ``world`` ranks of tests/fixtures/dist_worker.py; return their JSON lines."""
    return sorted(run_ranks([WORKER, scenario, root], world, env, timeout), key=lambda d: d["rank"])


def digest(text: str) -> str:
    return next(line.split()[0] for line in text.splitlines() if line.startswith("digest="))


@pytest.mark.slow
def test_ddp_sigterm_stops_every_rank_at_one_step_exits_85_not_restarted_and_resumes_bit_identical(tmp_path):
    # Enough steps that the stop lands long before the end however slowly this test reacts (`status` hears of
    # steps about once a second, and a busy machine delays the SIGTERM); the stop ends the run early anyway.
    steps = 400
    ref = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", TRAINER, "--steps", str(steps)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CKPTD_DIR": str(tmp_path / "ref")})
    assert ref.returncode == 0, ref.stderr
    root = str(tmp_path / "ck")
    argv = [*OFF, "--", *TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "2", TRAINER,
            "--steps", str(steps), "--step-delay", "0.03"]
    run = Run(tmp_path, root, argv)
    at = random.randint(3, 25)
    wait_for(lambda: _live_step(root) >= at, 90, f"step {at}")
    run.signal(signal.SIGTERM)
    assert run.wait(40) == exitcodes.PREEMPTED, run.stderr()
    out = run.stdout()
    # Both ranks write to one pipe: their lines can run together, so find the records, not the lines.
    stopped = sorted(re.findall(r"stopped at step (\d+) rank=(\d+) code=(\d+)", out), key=lambda m: m[1])
    assert len(stopped) == 2, out
    step = int(stopped[0][0])
    # Under `ckptd run` the ranks exit 0 after the emergency checkpoint, so torchrun ends quietly (no restart,
    # no SignalException traceback, no exit 1); `ckptd run` judges the stop by the checkpoint and exits 85.
    assert stopped == [(str(step), "0", "0"), (str(step), "1", "0")]
    err = run.stderr()
    assert "Traceback" not in err and "SignalException" not in err and "death signal" not in err, err
    assert not [x for x in err.splitlines() if "ckptd[" in x and " warning: " in x], err
    assert journal(root, "exit")[-1]["reason"] == "preempted" and journal(root, "exit")[-1]["code"] == 0
    assert out.count("start_step=0") == 2, "torchrun --max-restarts started the stopped ranks again"
    notice, ck = journal(root, "notice")[-1], journal(root, "checkpoint")[-1]
    assert ck["kind"] == "emergency" and ck["step"] == step
    assert ck["time"] >= notice["time"]  # made for this stop; within the grace, or the run would not exit 85
    names = set(os.listdir(os.path.join(root, store.checkpoint_name(step))))
    assert {"rank-00000.json", "rank-00001.safetensors", "tensors.safetensors"} <= names
    again = Run(tmp_path, root, argv[:-2] + ["--step-delay", "0"], name="again")
    assert again.wait(90) == 0, again.stderr()
    assert f"start_step={step} rank=1" in again.stdout()
    assert digest(again.stdout()) == digest(ref.stdout)
    # Replicated DDP state restores, steps and saves without the DCP stack (~1.2 s of CPU per rank to import).
    assert "dcp=False" in again.stdout(), again.stdout()


def _live_step(root: str) -> int:
    r = ckptd("status", "--dir", root, "--json")
    return (json.loads(r.stdout).get("step") or 0) if r.returncode == 0 else 0


# A run restarted without torch.distributed: restore, one step, a save; then whether the DCP stack was imported
# (torch.distributed.tensor may be: torch.optim imports it at the first step).
SOLO_RESTART = """
import sys
import ckptd
from conftest import small_model, train_steps
model, opt = small_model(seed=3)
ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=sys.argv[1], save_on_close=False, handle_signals=False)
step = ck.restore()
train_steps(model, opt, 1)
ck.step(step + 1)
ck.save(block=True)
ck.close()
print("restored", step, "saved", step + 1)
print("imported", sorted(m for m in sys.modules if m.startswith(("torch.distributed.checkpoint", "ckptd.sharded"))))
"""


def test_a_single_process_restores_steps_and_saves_without_importing_the_distributed_checkpoint_stack(
        make_checkpoints):
    # detect() used to import sharded.py, hence torch.distributed.checkpoint, to ask whether a plain model was
    # sharded: tens of milliseconds of every restart's restore (docs/performance.md, "Restore at restart").
    root = make_checkpoints([10])
    p = subprocess.run([sys.executable, "-c", SOLO_RESTART, root], capture_output=True, text=True, timeout=120,
                       cwd=os.path.join(ROOT, "tests"),
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])})
    assert p.returncode == 0, p.stderr
    assert "restored 10 saved 11" in p.stdout
    assert "imported []" in p.stdout, p.stdout
    assert store.latest_valid(root).step == 11


@pytest.mark.parametrize("rank_env", ["RANK", "no RANK"])
def test_each_rank_restores_its_own_state_and_a_damaged_rank_file_falls_back_for_every_rank(tmp_path, rank_env):
    """``no RANK``: the ranks have no $RANK (Lightning's own launcher starts them so); each still saves and
    restores its own part, by its rank in torch.distributed."""
    root = str(tmp_path / "ck")
    out = run_workers("restore_fallback", root, env={"DROP_RANK_ENV": "1" if rank_env == "no RANK" else "0"})
    assert [o["step"] for o in out] == [5, 5]  # step 10's rank-1 file is damaged: both ranks take step 5
    assert [o["seen"] for o in out] == [80, 80]
    assert all(o["rng_ok"] for o in out), out  # each rank's own torch stream, not rank 0's
    quarantined = os.listdir(os.path.join(root, store.QUARANTINE_DIR))
    assert len(quarantined) == 1 and quarantined[0].startswith("step-000000000010")
    note = json.load(open(os.path.join(root, store.QUARANTINE_DIR, quarantined[0], "QUARANTINE.json")))
    assert "rank 1" in note["reason"] and "rank-00001.safetensors" in note["reason"]


@pytest.mark.parametrize("every", ["1", ""])
def test_agreement_runs_every_step_only_when_fixed_so_and_adaptively_keeps_off_the_common_path(tmp_path, every):
    # The cost per step is a benchmark figure (docs/performance.md); here the rule that keeps it small:
    # with fast steps the adaptive period K grows until agreeing is rare, and both ranks use the same K.
    n = 1000
    out = run_workers("agree_cost", str(tmp_path / "ck"), env={"CKPTD_AGREE_EVERY": every, "AGREE_STEPS": str(n)})
    print(f"CKPTD_AGREE_EVERY={every or 'adaptive'}: {max(o['seconds_per_step'] for o in out) * 1e6:.0f} us "
          f"per step, {out[0]['agreements']} agreements, K={out[0]['k']}")
    assert out[0]["k"] == out[1]["k"] and out[0]["agreements"] == out[1]["agreements"]
    if every == "1":
        assert out[0]["k"] == 1 and out[0]["agreements"] >= n
    else:
        assert out[0]["k"] > 10 and out[0]["agreements"] <= n // 10, out


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_resume_bit_exact_fall_back_on_a_damaged_shard_and_reshard_2_1_2(tmp_path):
    root = str(tmp_path / "ck")
    first = run_workers("fsdp_resume", root)
    a = first[0]
    assert {"dcp.json", "shard-00000.bin", "shard-00001.bin", "rank-00001.json"} <= set(a["names"])
    assert "tensors.safetensors" in a["names"] and "model" not in json.dumps(a["names"])
    assert a["start"] == 6 and a["resumed"] == a["ref"], a  # resumed from 6 ends where 0->10 ended
    fb = [o for o in first if "fallback" in o]
    assert [o["fallback"] for o in fb] == [3, 3]  # 9's and 6's rank-1 shards damaged: step 3 on both ranks
    assert len(os.listdir(os.path.join(root, store.QUARANTINE_DIR))) == 2
    at3 = fb[0]["at"]
    one = run_workers("fsdp_reshard", root, world=1)[0]  # 2 ranks -> 1
    assert one["start"] == 3 and one["loaded"] == at3
    two = run_workers("fsdp_reshard", root, world=2)  # 1 rank -> 2
    assert [o["start"] for o in two] == [4, 4] and two[0]["loaded"] == one["saved"]
    r = ckptd("verify", "--dir", root)
    assert r.returncode == 0, r.stdout + r.stderr
    out = str(tmp_path / "model.safetensors")  # export consolidates the 2 ranks' shards of step 3
    r = ckptd("export", os.path.join(root, store.checkpoint_name(3)), "-o", out)
    assert r.returncode == 0 and "consolidated from 2 shards" in r.stdout, r.stdout + r.stderr
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    for name, value in sorted(load_file(out).items()):
        h.update(name.encode())
        h.update(value.tobytes())
    assert h.hexdigest()[:16] == at3
