"""What a real training script needs from the library beyond step(): metrics that arrive after the step
(ck.report), state without tensors (load_state(tensors=False), DIR/latest, DIR/N), early refusal of what
cannot be saved, export with JSON state, and retention that keeps what people asked for."""

from __future__ import annotations

import json
import logging
import os

import pytest

torch = pytest.importorskip("torch")

import ckptd  # noqa: E402
from ckptd import store  # noqa: E402
from ckptd.errors import CorruptCheckpointError, NotFoundError, UnsupportedStateError  # noqa: E402
from conftest import ckptd_cli, small_model, train_steps  # noqa: E402

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_toy.py")


def names(root: str) -> list[str]:
    return [i.name for i in store.list_checkpoints(root)]


def test_report_attaches_a_metric_to_a_saved_step_durably_and_keep_best_ls_read_it(tmp_path):
    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=1, keep_last=1,
                            keep_best=["val_loss:1:min"], handle_signals=False, async_save=False)
    val = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.7}
    for n in range(1, 5):
        train_steps(model, opt, 1)
        ck.step(n)  # saves step n; its val_loss is known only afterwards, as in nanoGPT
        ck.report(n, val_loss=torch.tensor(val[n]), note="eval")
    ck.close()
    assert names(root) == [store.checkpoint_name(2), store.checkpoint_name(4)]  # the best, and the newest
    best = store.verify(os.path.join(root, store.checkpoint_name(2)))
    assert best.valid and best.metrics["val_loss"] == pytest.approx(0.3) and best.metrics["note"] == "eval"
    ls = ckptd_cli("ls", root)
    assert ls.returncode == 0 and "val_loss=0.3" in ls.stdout, ls.stdout
    with pytest.raises(NotFoundError, match="no checkpoint of step 3"):
        ckptd.Checkpointer(model=model, dir=root, handle_signals=False).report(3, val_loss=1.0)


def test_load_state_takes_dir_latest_and_dir_n_and_reads_no_tensor_data_when_asked(tmp_path):
    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=1, handle_signals=False,
                            async_save=False)
    ck.user["model_args"] = {"n_layer": 2, "n_embd": 16}
    for n in range(1, 4):
        train_steps(model, opt, 1)
        ck.step(n)
    ck.close()
    full = ckptd.load_state(os.path.join(root, "latest"))
    assert full["progress"]["step"] == 3 and torch.equal(full["model"]["0.weight"], model[0].weight.detach())
    assert ckptd.load_state(os.path.join(root, "2"))["progress"]["step"] == 2
    # Flip a byte of the tensor data: the full load refuses it, the load without tensors never reads it.
    tpath = os.path.join(root, store.checkpoint_name(3), store.TENSORS)
    with open(tpath, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        ckptd.load_state(os.path.join(root, store.checkpoint_name(3)))
    assert ckptd.load_state(os.path.join(root, "latest"))["progress"]["step"] == 2  # the newest that verifies
    meta = ckptd.load_state(os.path.join(root, store.checkpoint_name(3)), tensors=False)
    assert meta["user"]["model_args"] == {"n_layer": 2, "n_embd": 16}
    w = meta["model"]["0.weight"]
    assert w.is_meta and w.shape == model[0].weight.shape and w.dtype == torch.float32
    with pytest.raises(NotFoundError, match="no checkpoint of step 9"):
        ckptd.load_state(os.path.join(root, "9"))


def test_a_value_extra_cannot_save_is_refused_at_construction_with_the_save_message(tmp_path):
    sampler = torch.utils.data.RandomSampler(range(10))
    with pytest.raises(UnsupportedStateError, match="extra/sampler/value: value of type .*RandomSampler"):
        ckptd.Checkpointer(model=small_model()[0], dir=str(tmp_path), extra={"sampler": sampler},
                           every_steps=100, handle_signals=False)


def test_export_carries_chosen_json_state_in_the_safetensors_metadata(tmp_path):
    from safetensors import safe_open

    root = str(tmp_path / "ck")
    model, _ = small_model()
    args = {"n_layer": 2, "vocab": 65, "bias": False}
    ck = ckptd.Checkpointer(model=model, dir=root, extra={"model_args": args}, handle_signals=False)
    ck.user["lr"] = 0.5
    ck.user["w"] = torch.ones(2)
    ck.step(7)
    ck.close()
    out = str(tmp_path / "model.safetensors")
    r = ckptd_cli("export", f"{root}/latest", "-o", out, "--state", "extra/model_args", "--state", "user/lr")
    assert r.returncode == 0, r.stderr
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["extra/model_args"]) == args and json.loads(meta["user/lr"]) == 0.5
        assert torch.equal(f.get_tensor("0.weight"), model[0].weight.detach())
    r = ckptd_cli("export", f"{root}/latest", "-o", out, "--force", "--state", "user/w")
    assert r.returncode == 1 and "--state user/w is not plain JSON" in r.stderr, r.stderr
    r = ckptd_cli("export", f"{root}/latest", "-o", out, "--force", "--state", "extra/nope")
    assert r.returncode == 1 and "no 'nope'" in r.stderr, r.stderr


def test_no_retention_rule_warns_once_when_the_directory_keeps_growing(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("CKPTD_RETENTION", raising=False)
    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, dir=root, every_steps=1, handle_signals=False, async_save=False)
    with caplog.at_level(logging.WARNING, logger="ckptd"):
        for n in range(1, 31):
            ck.step(n)
        ck.close()
    said = [r.getMessage() for r in caplog.records if "no retention rule" in r.getMessage()]
    assert len(said) == 1 and f"{root} holds 20 checkpoints" in said[0] and "keep_last" in said[0]
    assert len(names(root)) == 30  # a warning, nothing deleted


def test_the_emergency_checkpoint_a_run_resumed_from_is_kept_after_the_run_finished(tmp_path):
    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False)
    ck.step(3)
    ck.save(kind="emergency", block=True)  # what a preemption leaves
    ck.close()
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=1, keep_last=2, handle_signals=False,
                            async_save=False)
    assert ck.restore() == 3
    for n in range(4, 11):
        ck.step(n)
    ck.close()
    assert names(root) == [store.checkpoint_name(n) for n in (3, 9, 10)]
    assert store.checkpoint_name(3) in store.pinned(root)
    r = ckptd_cli("prune", root, "--keep-last", "1")  # a person's prune keeps it too
    assert r.returncode == 0, r.stderr
    assert names(root) == [store.checkpoint_name(3), store.checkpoint_name(10)]


def test_a_checkpoint_asked_for_with_ckptd_save_wait_is_kept_by_keep_last(tmp_path):
    import re

    from fixtures.sup_helpers import Run, ckptd

    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [TOY, "--steps", "300", "--every-steps", "20", "--keep-last", "1",
                               "--step-delay", "0.02"])
    run.wait_event("checkpoint", timeout=60, step=20)
    r = ckptd("save", "--wait", "--dir", root, timeout=60)
    assert r.returncode == 0, r.stderr
    asked = re.search(r"checkpoint committed: (\S+) \(step (\d+)", r.stdout).group(1)
    assert run.wait(120) == 0, run.stderr()
    assert os.path.basename(asked) in names(root) and os.path.basename(asked) in store.pinned(root)
    assert names(root)[-1] == store.checkpoint_name(300)
    assert len(names(root)) == 2  # keep_last=1 still bounds the rest
