"""ckptd best / export --best / diff through the real entry point, on checkpoints made by the real library."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

import ckptd
from ckptd import exitcodes, store
from conftest import ckptd_cli, small_model, train_steps


def _flip_a_tensor_byte(ckpt: str) -> None:
    path = os.path.join(ckpt, store.TENSORS)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def test_best_names_the_best_by_min_or_max_a_tie_goes_to_the_newer_and_reported_metrics_count(make_checkpoints):
    root = make_checkpoints([1, 2, 3, 4], metrics={1: {"val_loss": 0.5, "acc": 0.7}, 2: {"val_loss": 0.3, "acc": 0.9},
                                                   3: {"val_loss": 0.3, "acc": 0.8}, 4: {"loss": 0.1}})
    r = ckptd_cli("best", root, "--metric", "val_loss", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["step"], d["value"], d["mode"], d["candidates"]) == (3, 0.3, "min", 3), d  # tie of 2 and 3: newer
    r = ckptd_cli("best", root, "--metric", "acc:max", "--path")
    assert r.returncode == 0 and r.stdout == os.path.join(root, store.checkpoint_name(2)) + "\n", (r.stdout, r.stderr)
    # A metric attached after the save (ck.report) takes part: step 4 gets the lowest val_loss.
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
    ck.report(4, val_loss=0.1)
    ck.close()
    r = ckptd_cli("best", "--dir", root, "--metric", "val_loss:min")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(os.path.join(root, store.checkpoint_name(4)) + "  step 4  val_loss=0.1 "), r.stdout


def test_best_skips_a_damaged_best_for_the_next_and_deletes_nothing(make_checkpoints):
    root = make_checkpoints([1, 2, 3], metrics={1: {"val_loss": 0.5}, 2: {"val_loss": 0.2}, 3: {"val_loss": 0.4}})
    damaged = os.path.join(root, store.checkpoint_name(2))
    _flip_a_tensor_byte(damaged)  # the manifest still checks; only the full verification sees it
    r = ckptd_cli("best", root, "--metric", "val_loss", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["step"] == 3 and [s["name"] for s in d["skipped"]] == [store.checkpoint_name(2)], d
    assert "fails verification" in r.stderr and store.checkpoint_name(2) in r.stderr
    assert os.path.isdir(damaged)  # named, never removed by a read-only command
    r = ckptd_cli("best", root, "--metric", "val_loss", "--no-verify", "--path")  # the manifest-level answer
    assert r.stdout.strip() == damaged


def test_best_without_the_metric_says_which_metrics_exist_and_exits_4(make_checkpoints):
    root = make_checkpoints([1, 2])
    r = ckptd_cli("best", root, "--metric", "val_loss")
    assert r.returncode == exitcodes.NOT_FOUND and r.stdout == ""
    assert "has the metric 'val_loss'" in r.stderr and "metrics present: loss" in r.stderr and "ck.report" in r.stderr
    r = ckptd_cli("best", root, "--metric", "val loss:max")
    assert r.returncode == exitcodes.USAGE and "bad metric" in r.stderr


def test_export_best_exports_the_weights_of_the_best_checkpoint(make_checkpoints, tmp_path):
    root = make_checkpoints([1, 2, 3], metrics={1: {"acc": 0.5}, 2: {"acc": 0.9}, 3: {"acc": 0.6}})
    out = str(tmp_path / "best.safetensors")
    r = ckptd_cli("export", root, "--best", "acc:max", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "best by acc (max): step-000000000002" in r.stdout
    want = ckptd.load_state(os.path.join(root, store.checkpoint_name(2)))["model"]
    got = load_file(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    other = ckptd.load_state(os.path.join(root, store.checkpoint_name(3)))["model"]
    assert any(not torch.equal(got[k], other[k]) for k in other)  # the choice mattered
    r = ckptd_cli("export", "-o", str(tmp_path / "x.safetensors"))
    assert r.returncode == exitcodes.USAGE and "--best" in r.stderr


def test_diff_shows_steps_metrics_state_and_which_tensors_changed_with_their_largest_difference(tmp_path):
    root = str(tmp_path / "ck")
    model, opt = small_model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, dir=root, handle_signals=False,
                            save_on_close=False, extra={"frozen": torch.ones(3)})
    train_steps(model, opt, 1)
    ck.step(1, metrics={"loss": 1.0})
    ck.save(block=True)
    a_model = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, 1)
    sched.step()
    ck.step(2, metrics={"loss": 0.5, "acc": 0.9})
    ck.save(block=True)
    ck.close()
    a, b = (os.path.join(root, store.checkpoint_name(s)) for s in (1, 2))
    r = ckptd_cli("diff", a, b, "--values", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"key": "step", "a": 1, "b": 2, "in": "both"} in d["manifest"]
    assert {"key": "acc", "a": None, "b": 0.9, "in": "b"} in d["metrics"]
    assert any(row["key"] == "scheduler/last_epoch" and (row["a"], row["b"]) == (0, 1)
               for row in d["state"]), d["state"]
    t = d["tensors"]
    model_keys = {f"model/{k}" for k in a_model}
    assert model_keys <= set(t["changed"]) and "extra/frozen" not in t["changed"] and t["same"] >= 1, t
    b_model = model.state_dict()
    for k in a_model:
        want = float((a_model[k].double() - b_model[k].double()).abs().max())
        assert abs(t["max_abs_diff"][f"model/{k}"] - want) <= 1e-12 * max(1.0, want), (k, want, t["max_abs_diff"])
    r = ckptd_cli("diff", a, a)
    assert r.returncode == 0 and "0 changed" in r.stdout and "the same state" in r.stdout, r.stdout
    r = ckptd_cli("diff", "--dir", root, "1", "2")
    assert r.returncode == 0 and "changed: model/0.weight" in r.stdout and "step: 1 -> 2" in r.stdout, r.stdout


def test_diff_of_another_architecture_lists_reshaped_and_missing_tensors_and_refuses_damaged_bytes(tmp_path):
    roots = []
    for width, depth in ((16, 1), (32, 2)):
        root = str(tmp_path / f"w{width}")
        torch.manual_seed(0)
        layers = [torch.nn.Linear(8, width)] + [torch.nn.Linear(width, width) for _ in range(depth - 1)]
        model = torch.nn.Sequential(*layers)
        ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
        ck.step(1)
        ck.save(block=True)
        ck.close()
        roots.append(os.path.join(root, store.checkpoint_name(1)))
    r = ckptd_cli("diff", *roots, "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["tensors"]
    assert t["only_b"] == ["model/1.bias", "model/1.weight"] and t["only_a"] == []
    assert {x["name"] for x in t["reshaped"]} == {"model/0.weight", "model/0.bias"}
    _flip_a_tensor_byte(roots[1])
    r = ckptd_cli("diff", *roots)
    assert r.returncode != 0 and "checksum" in r.stderr.lower() and roots[1] in r.stderr, r.stderr


def test_the_evaluation_example_records_metrics_that_best_and_keep_best_then_use(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    root = str(tmp_path / "ck")
    env = {**os.environ, "CKPTD_DIR": root}
    ex = os.path.join(ROOT, "examples")
    subprocess.run([sys.executable, os.path.join(ex, "train_toy.py"), "--steps", "200", "--keep-last", "10"],
                   check=True, env=env, capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, os.path.join(ex, "evaluate_toy.py"), root], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # One line per checkpoint (every 50 steps, less those coalesced behind a save in flight; 200 always stays)
    steps = [i.step for i in ckptd.list_checkpoints(root) if i.valid]
    assert 200 in steps and len(r.stdout.splitlines()) == len(steps) >= 2, (r.stdout, steps)
    # The recorded values are what the evaluation computes from each checkpoint's weights.
    sys.path.insert(0, ex)
    try:
        from evaluate_toy import build, evaluate, held_out
    finally:
        sys.path.remove(ex)
    x, y = held_out()
    model = build(1)[0]
    want = {}
    for info in ckptd.list_checkpoints(root):
        model.load_state_dict(ckptd.load_state(info.path)["model"])
        want[info.step] = evaluate(model, x, y)
        assert info.metrics["val_loss"] == want[info.step]["val_loss"], (info.step, info.metrics)
        assert "loss" in info.metrics  # the training's own metric stays
    again = subprocess.run([sys.executable, os.path.join(ex, "evaluate_toy.py"), root], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == "", again.stdout  # evaluated ones are not evaluated twice
    best = min(want, key=lambda s: (want[s]["val_loss"], -s))
    r = ckptd_cli("best", root, "--metric", "val_loss", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["step"] == best, (r.stdout, r.stderr, want)
    r = ckptd_cli("prune", root, "--keep-last", "1", "--keep-best", "val_acc:1:max")
    assert r.returncode == 0, r.stderr
    best_acc = max(want, key=lambda s: (want[s]["val_acc"], s))
    assert {i.step for i in ckptd.list_checkpoints(root)} == {200, best_acc}


def test_add_metrics_refuses_what_a_manifest_cannot_hold_and_names_a_missing_checkpoint(make_checkpoints):
    import pytest

    root = make_checkpoints([1])
    path = os.path.join(root, store.checkpoint_name(1))
    info = ckptd.add_metrics(path, val_loss=torch.tensor(0.25), note="ok", bad=float("nan"))
    assert info.metrics["val_loss"] == 0.25 and info.metrics["note"] == "ok" and info.metrics["bad"] is None
    assert store.verify(path).valid  # a new manifest under a new digest; the data untouched
    with pytest.raises(ckptd.CkptdError, match="is not a number"):
        ckptd.add_metrics(path, val_loss=[1, 2])
    with pytest.raises(ckptd.NotFoundError, match="removed meanwhile"):
        ckptd.add_metrics(os.path.join(root, store.checkpoint_name(2)), val_loss=1.0)
    with pytest.raises(ckptd.CkptdError, match="is not a checkpoint"):
        ckptd.add_metrics(root, val_loss=1.0)
