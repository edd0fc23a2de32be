"""Branches and stages: restore(path=, parts=, stage=), the lineage in every manifest, `ckptd lineage`,
`ckptd ls --stage/--tree`, `ckptd run --resume-from --resume-parts --stage`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ckptd
from ckptd import cli, exitcodes, lineage, store
from conftest import ckptd_cli, resign, small_model, train_steps
from fixtures.sup_helpers import Run

pytestmark = pytest.mark.kind("unit")
def ckptd_run(tmp_path, root: str, *args: str, name: str) -> Run:
    return Run(tmp_path, root, list(args), name=name)


TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_toy.py")


def _run(root: str, steps, stage: str | None = None, metrics=None, seed: int = 0) -> None:
    model, opt = small_model(seed)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, stage=stage,
                            save_on_close=False)
    for s in steps:
        train_steps(model, opt, 1)
        ck.step(s, metrics=(metrics or {}).get(s, {"loss": 1.0 / s}))
        ck.save(block=True)
    ck.close()


def _tree_of(root: str) -> dict[str, bytes | None]:
    """Every entry under ``root`` with its bytes (directories: None): what 'nothing written there' compares."""
    out: dict[str, bytes | None] = {}
    for here, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(here, d), root)] = None
        for f in files:
            with open(os.path.join(here, f), "rb") as fh:
                out[os.path.relpath(os.path.join(here, f), root)] = fh.read()
    return out


def _manifest(path: str) -> dict:
    with open(os.path.join(path, store.MANIFEST)) as f:
        return json.load(f)


def test_a_branch_with_a_new_learning_rate_records_its_parent_in_every_manifest_and_leaves_the_parent_alone(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run(a, [1, 2, 3], stage="sft")
    store.pin(a, store.checkpoint_name(2))
    before = _tree_of(a)
    parent = os.path.join(a, store.checkpoint_name(3))
    parent_state = ckptd.load_state(parent)

    model, opt = small_model(seed=7)  # other initial weights: the restore must replace them
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=b, handle_signals=False, stage="rl", keep_last=1)
    assert ck.restore(f"{a}/latest", parts=("model", "optimizer")) == 0  # no progress restored: step 0
    assert ck.branched
    assert all(torch.equal(v, parent_state["model"][k]) for k, v in model.state_dict().items())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], parent_state["optimizer"]["state"][0]["exp_avg"])
    for group in opt.param_groups:  # the documented way: optimizer state restored, hyperparameters of this run
        group["lr"] = 1e-3
    for s in (1, 2, 3):
        train_steps(model, opt, 1)
        ck.step(s)
        ck.save(block=True)
    ck.close()

    mine = store.list_checkpoints(b)
    assert [i.step for i in mine] == [3]  # keep_last=1 ran here, in the branch's own directory only
    saved = ckptd.load_state(mine[0].path)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 1e-3
    m = _manifest(mine[0].path)
    assert m["stage"] == "rl"
    (hop,) = m["lineage"]["hops"]
    pm = _manifest(parent)
    assert (hop["dir"], hop["name"], hop["step"], hop["stage"]) == (a, store.checkpoint_name(3), 3, "sft")
    assert hop["digest"] == pm["digest"] and hop["files_digest"] == store.files_digest(pm)
    assert hop["parts"] == ["model", "optimizer"]
    assert "stage sft -> rl" in hop["changed"] and "optimizer lr 0.01 -> 0.001" in hop["changed"], hop
    assert m["origin"]["resume_from"] == parent
    assert _tree_of(a) == before  # nothing written, deleted or pinned in the parent's directory


def test_parts_choose_what_a_branch_takes_and_bad_parts_are_refused(tmp_path):
    a = str(tmp_path / "a")
    _run(a, [4])
    parent = ckptd.load_state(os.path.join(a, store.checkpoint_name(4)))
    model, opt = small_model(seed=3)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path / "w"), handle_signals=False)
    ck.user["note"] = "mine"
    assert ck.restore(os.path.join(a, store.checkpoint_name(4)), parts=["model"]) == 0
    assert all(torch.equal(v, parent["model"][k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {} and ck.user == {"note": "mine"}  # fresh optimizer, own user state
    ck.close()
    model, opt = small_model(seed=3)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path / "all"), handle_signals=False)
    assert ck.restore(os.path.join(a, "4")) == 4  # everything, the step included
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], parent["optimizer"]["state"][0]["exp_avg"])
    with pytest.raises(ckptd.CkptdError, match="choose from model, optimizer"):
        ck.restore(os.path.join(a, "4"), parts=("model", "weights"))
    ck.close()


def test_a_restarted_branch_resumes_its_own_checkpoints_and_another_run_there_is_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run(a, [5])
    point = os.path.join(a, store.checkpoint_name(5))
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=b, handle_signals=False)
    assert ck.restore(point) == 5
    train_steps(model, opt, 1)
    ck.step(6)
    ck.close()
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=b, handle_signals=False)
    assert ck.restore(point) == 6  # the same script started again: its own newest, not the branch point again
    assert not ck.branched
    assert ck.lineage["hops"][0]["name"] == store.checkpoint_name(5)  # the run keeps its lineage
    ck.close()
    other = str(tmp_path / "other")
    _run(other, [1])
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=other, handle_signals=False)
    with pytest.raises(ckptd.CkptdError, match="already holds another run's checkpoints"):
        ck.restore(point)
    ck.close()
    with pytest.raises(ckptd.NotFoundError, match="does not exist"):
        ckptd.Checkpointer(dir=str(tmp_path / "c"), handle_signals=False).restore(str(tmp_path / "gone" / "step-1"))


def test_stages_are_recorded_listed_and_restore_stage_takes_the_newest_or_the_best(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(str(runs / "sft1"), [1, 2], stage="sft", metrics={1: {"val": 0.2}, 2: {"val": 0.5}})
    _run(str(runs / "sft2"), [1, 2, 3], stage="sft", metrics={1: {"val": 0.4}, 2: {"val": 0.3}, 3: {"val": 0.9}})
    _run(str(runs / "pre"), [9], stage="pretrain")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(runs / "rl"), handle_signals=False, stage="rl")
    assert ck.restore(stage="sft") == 3  # the newest checkpoint of stage sft (sft2 wrote last)
    assert ck.lineage["hops"][0]["dir"] == str(runs / "sft2")
    train_steps(model, opt, 1)
    ck.step(4)
    ck.close()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(runs / "rl2"), handle_signals=False, stage="rl")
    assert ck.restore(stage="sft", metric="val") == 1  # best by val (min): sft1 step 1
    assert ck.lineage["hops"][0]["dir"] == str(runs / "sft1")
    ck.close()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(runs / "rl3"), handle_signals=False)
    with pytest.raises(ckptd.NotFoundError, match="no valid checkpoint of stage 'dpo'"):
        ck.restore(stage="dpo")
    ck.close()
    with pytest.raises(ckptd.CkptdError, match="not a stage name"):
        ckptd.Checkpointer(dir=str(runs / "x"), stage="../etc", handle_signals=False)
    assert cli.main(["ls", str(runs / "sft2"), "--stage", "sft", "--json"]) == 0
    assert [i["stage"] for i in json.loads(capsys.readouterr().out)] == ["sft"] * 3
    assert cli.main(["ls", str(runs / "sft2"), "--stage", "rl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    shutil.rmtree(runs / "sft1")
    shutil.rmtree(runs / "sft2")
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(runs / "rl"), handle_signals=False, stage="rl")
    assert ck.restore(stage="sft") == 4  # restarted: its own newest; the sft runs are not even looked for
    ck.close()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(runs / "pre"), handle_signals=False)
    with pytest.raises(ckptd.CkptdError, match="not a branch of stage 'sft'"):
        ck.restore(stage="sft")
    ck.close()


def test_lineage_walks_back_to_the_first_run_and_shows_a_deleted_parent_as_gone(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(str(runs / "a"), [10], stage="pretrain")
    for child, parent, stage in (("b", "a", "sft"), ("c", "b", "rl")):
        model, opt = small_model()
        ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(runs / child), handle_signals=False, stage=stage)
        start = ck.restore(f"{runs / parent}/latest")
        train_steps(model, opt, 1)
        ck.step(start + 1)
        ck.close()
    assert cli.main(["lineage", f"{runs / 'c'}/latest", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"]["stage"] == "rl" and out["checkpoint"]["step"] == 12
    assert [(h["dir"], h["step"], h["stage"], h["status"]) for h in out["hops"]] == [
        (str(runs / "b"), 11, "sft", "present"), (str(runs / "a"), 10, "pretrain", "present")]
    assert out["first_run"] == str(runs / "a") and out["truncated"] is False
    assert cli.main(["diff", f"{runs / 'b'}/latest", f"{runs / 'c'}/latest", "--json"]) == 0
    rows = {r["key"]: (r["a"], r["b"]) for r in json.loads(capsys.readouterr().out)["manifest"]}
    assert rows["stage"] == ("sft", "rl")
    assert rows["branched_from"] == (str(runs / "a" / store.checkpoint_name(10)),
                                     str(runs / "b" / store.checkpoint_name(11)))
    ckptd.add_metrics(os.path.join(runs / "b", store.checkpoint_name(11)), val=0.1)  # a new manifest digest
    store.delete(str(runs / "a"), store.checkpoint_name(10))
    assert cli.main(["lineage", f"{runs / 'c'}/latest"]) == 0
    text = capsys.readouterr().out
    assert "stage sft  [present; metrics added to its manifest since]" in text
    assert "stage pretrain  [GONE (deleted or moved)]" in text and f"first run: {runs / 'a'}" in text
    assert cli.main(["ls", "--tree", str(runs)]) == 0
    tree = capsys.readouterr().out.splitlines()
    assert tree[0].startswith("b  stage sft") and tree[1].startswith("  `- c  stage rl")
    assert f"<- {runs / 'a' / store.checkpoint_name(10)} (step 10)" in tree[0]  # the parent, gone, as recorded


def test_a_hostile_lineage_is_bounded_and_never_opened_outside_the_roots(tmp_path, capsys):
    outside = str(tmp_path / "elsewhere" / "secret")
    _run(outside, [1])
    runs = tmp_path / "runs"
    _run(str(runs / "x"), [2])
    ckpt = os.path.join(runs / "x", store.checkpoint_name(2))
    m = _manifest(ckpt)
    hop = {"dir": outside, "name": store.checkpoint_name(1), "step": 1, "digest": None, "files_digest": None,
           "stage": None, "run_id": "", "parts": ["model"], "changed": ["\x1b[31mred"]}
    cycle = {**hop, "dir": str(runs / "x"), "name": store.checkpoint_name(2), "step": 2}

    def write(lin: dict) -> None:
        m["lineage"] = lin
        with open(os.path.join(ckpt, store.MANIFEST), "w") as f:
            json.dump(m, f)
        resign(ckpt)

    write({"hops": [hop] * (lineage.MAX_HOPS + 1), "truncated": False})
    info = store.inspect_checkpoint(ckpt)
    assert not info.valid and "lineage hops is not a list of 1 to 64" in info.reason
    assert cli.main(["lineage", ckpt]) == exitcodes.INVALID
    assert "lineage hops" in capsys.readouterr().err
    write({"hops": [{**hop, "changed": ["x" * 10_000]}], "truncated": False})
    assert "changed is not a list" in store.inspect_checkpoint(ckpt).reason
    write({"hops": [hop, cycle, hop, cycle], "truncated": False})  # points outside, and back at itself
    assert cli.main(["lineage", ckpt, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["status"] for h in out["hops"]] == ["outside", "present", "outside", "present"]
    assert cli.main(["lineage", ckpt, "--root", str(tmp_path)]) == 0  # the user names a wider root
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\\x1b[31mred" in text
    assert f"{outside}/{store.checkpoint_name(1)}  step 1  stage -  [present]" in text  # opened there only
    assert cli.main(["ls", "--tree", str(runs)]) == 0
    assert capsys.readouterr().out.count("x  stage") == 1  # a run whose recorded parent is itself: shown once


@pytest.mark.kind("system")
def test_ckptd_run_resume_from_with_parts_and_stage_and_the_commands_on_it(tmp_path):
    runs = tmp_path / "runs"
    a, b = str(runs / "a"), str(runs / "b")
    assert ckptd_run(tmp_path, a, "--stage", "sft", TOY, "--steps", "100", name="a").wait(120) == 0
    before = _tree_of(a)
    run = ckptd_run(tmp_path, b, "--resume-from", f"{a}/latest", "--resume-parts", "model", "--stage", "rl",
                    TOY, "--steps", "60", name="b")
    assert run.wait(120) == 0, run.stderr()
    assert "start_step=0" in run.stdout() and "final_step=60" in run.stdout()
    assert "restored: model" in run.stderr()
    assert _tree_of(a) == before
    r = ckptd_cli("lineage", f"{b}/latest", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (hop,) = out["hops"]
    assert (hop["dir"], hop["step"], hop["stage"], hop["restored"], hop["status"]) == (a, 100, "sft", ["model"],
                                                                                      "present")
    assert "stage sft -> rl" in hop["changed"] and any(c.startswith("command ") for c in hop["changed"])
    r = ckptd_cli("ls", b, "--stage", "rl", "--json")
    assert r.returncode == 0 and {i["stage"] for i in json.loads(r.stdout)} == {"rl"}
    r = ckptd_cli("ls", "--tree", str(runs), "--json")
    assert {d["dir"]: (d["parent"] or {}).get("dir") for d in json.loads(r.stdout)} == {a: None, b: a}
    r = ckptd_cli("run", "--dir", str(tmp_path / "c"), "--resume-from", str(runs / "none" / "latest"), TOY)
    assert r.returncode == exitcodes.NOT_FOUND and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = ckptd_cli("run", "--dir", str(tmp_path / "c"), "--resume-from", f"{a}/latest", "--resume-parts", "brain", TOY)
    assert r.returncode == exitcodes.USAGE and "choose from model" in r.stderr


def test_a_branch_with_a_fresh_scheduler_follows_the_new_learning_rate_schedule(tmp_path):
    """The README's recipe: build optimizer and scheduler with the new run's learning rate, restore the model and
    the optimizer (its moments; load_state_dict brings back the checkpoint's lr), set the lr again: the schedule
    is then the new run's, step for step."""
    a = str(tmp_path / "a")
    _run(a, [3])

    def build(lr: float):
        model, opt = small_model(seed=1)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = lr
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

    def lrs(opt, sched, model) -> list[float]:
        out = []
        for _ in range(4):
            train_steps(model, opt, 1)
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    model, opt, sched = build(1e-3)
    wanted = lrs(opt, sched, model)
    model, opt, sched = build(1e-3)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, dir=str(tmp_path / "b"),
                            handle_signals=False)
    ck.restore(os.path.join(a, "3"), parts=("model", "optimizer"))
    assert opt.param_groups[0]["lr"] == 1e-2  # the checkpoint's, from load_state_dict
    for group in opt.param_groups:
        group["lr"] = 1e-3
    assert lrs(opt, sched, model) == wanted
    assert opt.state_dict()["state"][0]["step"] > 4  # the moments went on from the checkpoint's
    ck.close()


@pytest.mark.kind("system")
def test_the_example_pipeline_branches_from_a_best_exports_the_best_b_and_a_rerun_redoes_nothing(tmp_path):
    from safetensors.torch import load_file

    root = str(tmp_path / "runs")
    script = os.path.join(os.path.dirname(TOY), "pipeline.py")

    def pipeline() -> dict[str, str]:
        r = subprocess.run([sys.executable, script, root], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return dict(w.split("=", 1) for line in r.stdout.splitlines() for w in line.split() if "=" in w and
                    w.split("=", 1)[0] in ("a_best", "chosen"))

    said = pipeline()
    a = [i for i in store.list_checkpoints(os.path.join(root, "a")) if i.valid]
    a_best = min(a, key=lambda i: (i.metrics["val_loss"], -i.step))
    assert said["a_best"] == a_best.path
    bs = {lr: store.list_checkpoints(os.path.join(root, f"b-lr{lr}")) for lr in ("0.003", "0.0003")}
    for lr, infos in bs.items():
        for info in infos:
            (hop,) = info.lineage["hops"]
            assert (hop["dir"], hop["name"], hop["parts"]) == (os.path.join(root, "a"), a_best.name,
                                                               ["model", "optimizer"])
            assert hop["files_digest"] == store.files_digest(a_best.manifest) and info.stage == "b"
            assert any(c.startswith("optimizer lr ") and c.endswith(f"-> {lr}") for c in hop["changed"]), hop
    chosen = min((i for infos in bs.values() for i in infos), key=lambda i: i.metrics["val_loss"])
    assert said["chosen"] == chosen.path
    for stage, want in (("b", chosen.path), ("a", a_best.path)):  # the same choice from the command line
        r = ckptd_cli("best", root, "--stage", stage, "--metric", "val_loss", "--path")
        assert r.returncode == 0 and r.stdout.strip() == want, (r.stdout, r.stderr)
    exported = load_file(os.path.join(root, "best-b.safetensors"))
    want = ckptd.load_state(chosen.path)["model"]
    assert set(exported) == set(want) and all(torch.equal(exported[k], want[k]) for k in want)
    before = {d: [(i.name, i.manifest["digest"]) for i in store.list_checkpoints(os.path.join(root, d))]
              for d in ("a", "b-lr0.003", "b-lr0.0003")}
    assert pipeline() == said  # every run resumes its own end: nothing trained, evaluated or chosen anew
    assert {d: [(i.name, i.manifest["digest"]) for i in store.list_checkpoints(os.path.join(root, d))]
            for d in before} == before


def test_the_record_helpers_name_changed_hyperparameters_per_group_and_parse_parts():
    before = [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}, {"lr": 0.01, "params": [1]}]
    after = [{"lr": 0.01, "betas": (0.9, 0.95), "params": [0]}, {"lr": 0.001, "params": [1]}, {"lr": 1.0}]
    assert lineage.hyperparameter_changes(before, after) == [
        "optimizer group 0 betas (0.9, 0.999) -> (0.9, 0.95)", "optimizer group 1 lr 0.01 -> 0.001",
        "optimizer param groups 2 -> 3"]
    assert lineage.hyperparameter_changes([{"lr": torch.tensor(0.1)}], [{"lr": 0.2}]) == []  # not a plain value
    assert lineage.check_parts("optimizer,model") == ("model", "optimizer")
    assert lineage.check_parts(None) == lineage.PARTS
    for bad in ((), "", ["model", 3]):
        with pytest.raises(ckptd.CkptdError, match="choose from"):
            lineage.check_parts(bad)
    long = {"hops": [{"dir": "/r", "name": store.checkpoint_name(1), "step": 1, "digest": None, "files_digest": None,
                      "stage": None, "run_id": "", "parts": ["model"], "changed": []}] * lineage.MAX_HOPS,
            "truncated": False}
    new = lineage.extend({**long["hops"][0], "step": 2}, long)
    assert len(new["hops"]) == lineage.MAX_HOPS and new["truncated"] and new["hops"][0]["step"] == 2
    assert lineage.problem(new) == ""
