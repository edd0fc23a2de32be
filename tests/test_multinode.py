"""Several nodes: one `ckptd run` per node over one checkpoint directory (both "nodes" on 127.0.0.1).

The job test starts real `torchrun --nnodes 2 --nproc-per-node 1` twice (gloo on CPU); starting such a
job costs about 10 s here, so one test does the crash, the stop and the resume with one directory.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from ckptd import exitcodes, store
from ckptd.supervisor.rundir import Node, node_identity
from fixtures.sup_helpers import DIST_OFF as OFF
from fixtures.sup_helpers import DIST_TRAINER as TRAINER
from fixtures.sup_helpers import PLAIN, TORCHRUN, Run, ckptd, free_port, journal, wait_for


def start_nodes(tmp_path, root: str, port: int, trainer_args: list[str], tag: str) -> list[Run]:
    """Node K: `ckptd run --job-id mn -- torchrun --nnodes 2 --node-rank K ...` (the node rank comes from
    torchrun's own option)."""
    return [Run(tmp_path, root, [*OFF, "--job-id", "mn", "--", *TORCHRUN, "--nnodes", "2", "--node-rank", str(k),
                                 "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                                 "--max-restarts", "0", TRAINER, *trainer_args], name=f"{tag}-node{k}")
            for k in (0, 1)]


def stopped_step(run: Run, rank: int) -> int:
    lines = [line for line in run.stdout().splitlines() if line.startswith("stopped at step")]
    assert len(lines) == 1 and lines[0].endswith(f"rank={rank} code=0"), run.stdout()  # 0 under ckptd run + torchrun
    return int(lines[0].split()[3])


@pytest.mark.slow
def test_two_nodes_restart_together_after_a_rank_is_killed_stop_together_on_one_sigterm_and_resume(tmp_path):
    root = str(tmp_path / "ck")
    args = ["--every-steps", "5", "--step-delay", "0.02"]
    nodes = start_nodes(tmp_path, root, free_port(), [*args, "--steps", "100000", "--crash-rank-at", "1:14"], "a")

    # 1. rank 1 (node 1) is SIGKILLed at step 14: both nodes restart the job from the newest valid checkpoint.
    restarts = [wait_for(lambda k=k: journal(root, "restart", node=k), 90, f"node {k} restart") for k in (0, 1)]
    # The saves of steps 5 and 10 are asynchronous: under load neither may have committed before the kill (the
    # job then restarts from step 0); the restart must come from whichever is newest, on both nodes.
    newest = max((i.step for i in store.list_checkpoints(root) if i.valid and i.step <= 14), default=None)
    assert [r[0]["resume_step"] for r in restarts] == [newest, newest], restarts
    for k, run in enumerate(nodes):
        wait_for(lambda k=k, run=run: f"start_step={newest or 0} rank={k}" in run.stdout(), 60,
                 f"rank {k} resumed at {newest or 0}")
    assert "rank 1 crashing at step 14" in nodes[1].stdout()

    # 2. `ckptd save --wait` asked of node 1 (whose rank is not rank 0): every rank saves, node 1 hears of it.
    saved = ckptd("save", "--dir", root, "--node-rank", "1", "--wait", "--timeout", "60", timeout=90)
    assert saved.returncode == 0 and "checkpoint committed" in saved.stdout, saved.stdout + saved.stderr

    # 3. SIGTERM to node 1's supervisor only: every rank stops at one step, one emergency checkpoint, both exit 85.
    nodes[1].signal(signal.SIGTERM)
    assert nodes[1].wait(40) == exitcodes.PREEMPTED, nodes[1].stderr()
    assert nodes[0].wait(40) == exitcodes.PREEMPTED, nodes[0].stderr()
    step = stopped_step(nodes[0], 0)
    assert stopped_step(nodes[1], 1) == step
    info = store.inspect_checkpoint(os.path.join(root, store.checkpoint_name(step)))
    assert info.valid and info.kind == "emergency", info.reason
    assert {"rank-00000.json", "rank-00001.json"} <= set(os.listdir(info.path))
    joined = journal(root, "stop_requested")
    assert len(joined) == 1 and joined[0]["via"] == "trainer", joined  # node 0 was not asked: it joined
    assert journal(root, "end")[-1]["exit_code"] == exitcodes.PREEMPTED
    assert len(journal(root, "restart")) == len(journal(root, "restart", node=1)) == 1  # the stop restarted nothing

    # 4. Both nodes started again: every rank resumes at that step and the job finishes.
    again = start_nodes(tmp_path, root, free_port(), [*args, "--steps", str(step + 6)], "b")
    for k, run in enumerate(again):
        assert run.wait(90) == 0, run.stderr()
        assert f"start_step={step} rank={k}" in run.stdout()
    assert "digest=" in again[0].stdout()
    assert journal(root, "start")[-1]["node_rank"] == 0 and journal(root, "start", node=1)[-1]["job_id"] == "mn"


def test_a_second_job_and_a_second_supervisor_of_one_node_are_refused_clients_pick_a_node(tmp_path):
    root = str(tmp_path / "ck")
    nodes = [Run(tmp_path, root, [*OFF, "--job-id", "A", "--node-rank", str(k), PLAIN], name=f"node{k}")
             for k in (0, 1)]
    for k in (0, 1):
        wait_for(lambda k=k: journal(root, "spawn", node=k), 20, f"node {k} to start")

    other = ckptd("run", "--dir", root, *OFF, "--job-id", "B", "--node-rank", "0", PLAIN)
    assert other.returncode == exitcodes.LOCKED
    assert "in use by job 'A'" in other.stderr and "another --dir" in other.stderr, other.stderr
    single = ckptd("run", "--dir", root, *OFF, PLAIN)
    assert single.returncode == exitcodes.LOCKED and "--job-id A" in single.stderr, single.stderr
    twice = ckptd("run", "--dir", root, *OFF, "--job-id", "A", "--node-rank", "1", PLAIN)
    assert twice.returncode == exitcodes.LOCKED, twice.stderr
    assert ("node 1 of job 'A'" in twice.stderr and f"pid {nodes[1].pid}" in twice.stderr
            and "--node-rank" in twice.stderr)
    no_job = ckptd("run", "--dir", str(tmp_path / "other"), *OFF, "--", *TORCHRUN, "--nnodes", "2", "--node-rank",
                   "1", "train.py")
    assert no_job.returncode == exitcodes.CONFIG and "--job-id" in no_job.stderr, no_job.stderr

    ambiguous = ckptd("status", "--dir", root)
    assert ambiguous.returncode == exitcodes.USAGE and "--node-rank" in ambiguous.stderr, ambiguous.stderr
    status = ckptd("status", "--dir", root, "--node-rank", "1", "--json")
    assert status.returncode == 0, status.stderr
    got = json.loads(status.stdout)
    assert (got["job_id"], got["node_rank"], got["supervisor_pid"]) == ("A", 1, nodes[1].pid)
    assert ckptd("stop", "--dir", root, "--node-rank", "1").returncode == 0
    assert nodes[1].wait(20) == exitcodes.STOPPED_NO_CHECKPOINT  # a plain script: no emergency checkpoint
    assert ckptd("stop", "--dir", root).returncode == 0  # one node left: no --node-rank needed
    assert nodes[0].wait(20) == exitcodes.STOPPED_NO_CHECKPOINT
    after = ckptd("run", "--dir", root, *OFF, "--job-id", "B", PLAIN, "--seconds", "0")  # job A ended: B may
    assert after.returncode == 0, after.stderr


@pytest.mark.parametrize("job_id, rank, argv, env, expected", [
    (None, None, ["python", "train.py"], {}, Node(None, 0)),
    (None, None, ["torchrun", "--nnodes=2", "--node_rank=1", "--rdzv-id", "r7", "t.py", "--node-rank", "5"], {},
     Node("r7", 1)),
    (None, None, ["python", "-m", "torch.distributed.run", "--nnodes", "2", "t.py"],
     {"SLURM_JOB_ID": "42", "SLURM_NODEID": "1"}, Node("42", 1)),
    ("j", 3, ["torchrun", "--node-rank", "1", "t.py"], {"SLURM_JOB_ID": "42"}, Node("j", 3)),
])
def test_job_id_and_node_rank_come_from_options_torchrun_or_slurm(job_id, rank, argv, env, expected):
    assert node_identity(job_id, rank, argv, env) == expected
