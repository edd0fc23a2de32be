"""Damaged and crafted checkpoints: restore falls back, never half-writes the model, never writes
outside the root; listing never raises; hostile sizes are refused before they cost memory."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import ckptd
from ckptd import state, store
from ckptd.errors import CkptdError, CorruptCheckpointError
from conftest import ROOT, resign, small_model, train_steps

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes

NEWEST, OLDER = "step-000000000020", "step-000000000010"


def _tensor_file(ckpt: str) -> str:
    return os.path.join(ckpt, store.TENSORS)


def _edit_header(ckpt: str, edit) -> None:
    """Rewrite the JSON header in place (same length, padded with spaces); the data is untouched."""
    path = _tensor_file(ckpt)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        body = edit(header)
        body = body if isinstance(body, bytes) else json.dumps(header, separators=(",", ":")).encode()
        assert len(body) <= n
        f.seek(8)
        f.write(body + b" " * (n - len(body)))


def _flip_data_byte(ckpt: str, back: int = 100) -> None:
    path = _tensor_file(ckpt)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - back)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))


def _checkpointer(root: str, seed: int = 99, **kw) -> tuple[ckptd.Checkpointer, torch.nn.Module]:
    model, opt = small_model(seed=seed)
    return ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False,
                              **kw), model


def _set_shape(shape):
    def edit(h):
        h["model/0.weight"]["shape"] = shape
    return edit


def _drop_shape(h):
    del h["model/0.weight"]["shape"]


HEADER_EDITS = {
    "17x8": _set_shape([17, 8]),  # the two-byte edit: `[16,8]` -> `[17,8]`
    "negative": _set_shape([-16, 8]),
    "non-numeric": _set_shape(["16", 8]),
    "missing": _drop_shape,
    "huge": _set_shape([1 << 40, 1 << 40]),  # 4 TiB and more, were it believed
}


# ---------------------------------------------------------------------------- restore


def test_two_byte_shape_edit_is_corruption_not_a_different_model(make_checkpoints):
    root = make_checkpoints([10, 20])
    path = _tensor_file(os.path.join(root, NEWEST))
    data = open(path, "rb").read()
    old = b'"model/0.weight":{"dtype":"F32","shape":[16,8]'
    assert data.count(old) == 1
    open(path, "r+b").write(data.replace(old, old.replace(b"[16,8]", b"[17,8]")))
    ck, _ = _checkpointer(root)
    assert ck.restore() == 10
    assert not os.path.exists(os.path.join(root, NEWEST))
    (qname,) = os.listdir(os.path.join(root, ".quarantine"))
    assert "checksum mismatch" in json.load(open(os.path.join(root, ".quarantine", qname, "QUARANTINE.json")))["reason"]


@pytest.mark.parametrize("case", sorted(HEADER_EDITS))
def test_damaged_tensor_header_is_quarantined_and_the_previous_checkpoint_used(make_checkpoints, case):
    root = make_checkpoints([10, 20])
    _edit_header(os.path.join(root, NEWEST), HEADER_EDITS[case])
    ck, model = _checkpointer(root)
    assert ck.restore() == 10  # no RuntimeError / TypeError / huge allocation
    assert [i.step for i in store.list_checkpoints(root)] == [10]
    assert os.listdir(os.path.join(root, ".quarantine"))
    assert torch.equal(model[0].weight, ckptd.load_state(os.path.join(root, OLDER))["model"]["0.weight"])


@pytest.mark.parametrize("case", sorted(HEADER_EDITS))
def test_re_signed_invalid_header_is_corrupt_for_verify_and_restore(make_checkpoints, case):
    root = make_checkpoints([10, 20])
    newest = os.path.join(root, NEWEST)
    _edit_header(newest, HEADER_EDITS[case])
    resign(newest)  # the checksums match now; the header itself is still impossible
    info = store.verify(newest)
    assert not info.valid and "model/0.weight" in info.reason
    ck, _ = _checkpointer(root)
    assert ck.restore() == 10
    assert not os.path.exists(newest)


def _snapshot(model, opt=None):
    out = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def test_every_checkpoint_damaged_restores_nothing_and_leaves_the_model_bit_identical(make_checkpoints):
    root = make_checkpoints([10, 20, 30])
    _flip_data_byte(os.path.join(root, "step-000000000030"))
    _edit_header(os.path.join(root, NEWEST), HEADER_EDITS["17x8"])
    _flip_data_byte(os.path.join(root, OLDER), back=8)  # in the last tensor
    model, opt = small_model(seed=5)
    opt.zero_grad()
    model(torch.randn(2, 8)).sum().backward()
    opt.step()  # live optimizer state exists too: a restore target
    before = _snapshot(model)
    before_opt = {(i, k): v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
    assert ck.restore() == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    after_opt = {(i, k): v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    assert all(torch.equal(v, after_opt[k]) for k, v in before_opt.items())
    assert store.list_checkpoints(root) == []


@pytest.mark.parametrize("damaged", [False, True])
def test_undo_log_in_step_with_many_small_reads_restores_or_rolls_back_exactly(tmp_path, monkeypatch, damaged):
    # The undo-log copy keeps only LEAD bytes ahead of the reader, and the first request is small:
    # shrunk here so that a small model takes dozens of requests and the copy waits on the reader.
    from ckptd import restore

    monkeypatch.setattr(store, "READ_CHUNK", 1024)  # below the 4 KiB tensors: each is backed up in pieces
    monkeypatch.setattr(store, "FIRST_READ", 512)
    monkeypatch.setattr(restore._Backup, "LEAD", 2048)
    root = str(tmp_path / "ck")
    model, opt = small_model(seed=1, width=128)  # ~1 k floats per layer: about 30 read requests
    train_steps(model, opt, 2)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
    ck.step(10)
    ck.save(block=True)
    ck.close()
    saved = _snapshot(model)
    if damaged:
        _flip_data_byte(os.path.join(root, OLDER), back=8)  # found only after every other byte was read
    live, live_opt = small_model(seed=2, width=128)
    train_steps(live, live_opt, 1)
    before = _snapshot(live)
    ck2 = ckptd.Checkpointer(model=live, optimizer=live_opt, dir=root, handle_signals=False, save_on_close=False)
    assert ck2.restore() == (0 if damaged else 10)
    want = before if damaged else saved
    after = live.state_dict()
    assert all(torch.equal(want[k], after[k]) for k in want)
    ck2.close()


def test_the_undo_plan_backs_up_a_large_tensor_in_read_sized_pieces(monkeypatch):
    # One plan entry per tensor made the first read request wait for the copy of a whole (say 1 GiB)
    # tensor; pieces of at most READ_CHUNK keep the copy in step with the reader.
    from ckptd.restore import _plan

    monkeypatch.setattr(store, "READ_CHUNK", 4096)
    live = {"a": torch.arange(2500, dtype=torch.float32), "b": torch.zeros(3)}
    entries = [store.TensorEntry("a", "F32", (2500,), 0, 10000), store.TensorEntry("b", "F32", (3,), 10000, 10012)]
    buf = torch.empty(20000, dtype=torch.uint8)
    staged, views, undo = _plan(entries, {"a": live["a"]}, lambda n, pinned: buf[:n])
    assert staged.source["a"] is live["a"] and len(views[0]) == 10000
    views[0][:4] = bytes(4)  # the view is the live tensor's memory: read in place
    assert live["a"][0].item() == 0.0 and live["a"][1].item() == 1.0
    assert [end for end, *_ in undo] == [4096, 8192, 10000, 10012]
    assert [n for *_, n in undo] == [4096, 4096, 1808, 0] and undo[3][1:] == (0, 0, 0)
    assert undo[1][1] == live["a"].data_ptr() + 4096 and undo[1][2] == buf.data_ptr() + 4096
    assert staged.source["b"] is not live["b"] and len(views[1]) == 12  # not live here: a fresh tensor


@pytest.mark.parametrize("escaped", [False, True])
def test_numpy_scalars_restore_as_saved_although_state_json_is_read_while_the_tensors_are_read(
        tmp_path, monkeypatch, escaped):
    # state.json is read during the tensor read; a NumPy scalar is a value taken from tensor bytes,
    # so it must come from the verified bytes, not from what the run held before. Escaped: the tag
    # written with a JSON escape (a re-signed state), which a search of the raw bytes for it missed.
    import threading

    import numpy as np

    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False,
                            extra={"v": {"s": np.float32(2.5), "i": np.int32(7)}})
    ck.step(1)
    ck.save(block=True)
    ck.close()
    if escaped:
        ckpt = store.list_checkpoints(root)[-1].path
        with open(os.path.join(ckpt, store.STATE), "rb") as f:
            raw = f.read()
        assert b'"__npscalar"' in raw
        resign(ckpt, {store.STATE: raw.replace(b'"__npscalar"', b'"\\u005f_npscalar"')})
    read_into = store.read_into

    def decode_first(fd, offset, views, h, path, ready=None, during=None):  # no byte read before decoding ends
        decoded = threading.Event()

        def during_then_read() -> None:
            try:
                during()
            finally:
                decoded.set()

        def after_decoding(end: int) -> None:
            assert decoded.wait(60)
            if ready is not None:
                ready(end)

        if during is None:
            return read_into(fd, offset, views, h, path, ready=ready)
        return read_into(fd, offset, views, h, path, ready=after_decoding, during=during_then_read)

    monkeypatch.setattr(store, "read_into", decode_first)
    model2, opt2 = small_model(seed=3)
    ck2 = ckptd.Checkpointer(model=model2, optimizer=opt2, dir=root, handle_signals=False, save_on_close=False,
                             extra={"v": {"s": np.float32(-1.0), "i": np.int32(-9)}})
    assert ck2.restore() == 1
    got = ck2.extra["v"]
    assert got["s"] == 2.5 and got["s"].dtype == np.float32 and got["i"] == 7 and got["i"].dtype == np.int32
    ck2.close()


class _Tied(torch.nn.Module):
    """An embedding and an output layer that share one weight (two keys, one memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32)
        self.out = torch.nn.Linear(32, 64, bias=False)
        self.out.weight = self.emb.weight


@pytest.mark.parametrize("damaged", [False, True])
def test_tensors_that_share_memory_restore_and_roll_back_exactly(tmp_path, damaged):
    # Restore reads verified-to-be tensors in place with an undo log; a failed candidate puts the old
    # bytes back in reverse order, which must also be right when two keys write the same memory.
    root = str(tmp_path / "ck")
    model = _Tied()
    ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False, async_save=False)
    with torch.no_grad():
        model.emb.weight.fill_(1.5)
    ck.step(10)
    ck.save()
    ck.close()
    if damaged:
        _flip_data_byte(os.path.join(root, OLDER), back=8)
    live = _Tied()
    with torch.no_grad():
        live.emb.weight.copy_(torch.arange(64 * 32, dtype=torch.float32).view(64, 32))
    before = live.emb.weight.detach().clone()
    ck2 = ckptd.Checkpointer(model=live, dir=root, handle_signals=False, save_on_close=False)
    assert ck2.restore() == (0 if damaged else 10)
    assert live.out.weight.data_ptr() == live.emb.weight.data_ptr()  # still tied
    want = before if damaged else torch.full((64, 32), 1.5)
    assert torch.equal(live.emb.weight.detach(), want)
    ck2.close()


def test_the_undo_log_is_replayed_backwards_so_a_backup_taken_after_an_aliased_read_is_undone_too():
    from ckptd.restore import Staged

    live = torch.arange(16, dtype=torch.float32)
    first = live.clone().view(torch.uint8)  # backup of key a, taken before its read
    live.fill_(7.0)  # key a read in place
    second = live.clone().view(torch.uint8)  # backup of key b (same memory), taken after a's read
    undo = [(live.data_ptr(), b.data_ptr(), 64) for b in (first, second)]
    Staged({}, {}, [], undo=undo).rollback()
    assert torch.equal(live, torch.arange(16, dtype=torch.float32))


def test_verified_checkpoint_of_another_model_is_left_alone(make_checkpoints):
    root = make_checkpoints([3])
    model, opt = small_model(width=32)
    before = _snapshot(model)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False)
    with pytest.raises(CkptdError, match="does not fit this model"):
        ck.restore()
    assert os.path.isdir(os.path.join(root, "step-000000000003"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.kind("system")
def test_restore_says_one_line_on_stderr_without_logging_configured(make_checkpoints, tmp_path):
    root = make_checkpoints([4])
    code = ("import sys; sys.path.insert(0, 'tests'); import ckptd; from conftest import small_model; "
            "m, o = small_model(); print(ckptd.Checkpointer(model=m, optimizer=o, dir=sys.argv[1], "
            "handle_signals=False, save_on_close=False).restore())")
    r = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr
    (line,) = r.stderr.splitlines()  # one line (it goes on to say that another command wrote the checkpoint)
    assert line.startswith(f"ckptd: resumed from step 4: {os.path.join(root, 'step-000000000004')}"), line
    empty = str(tmp_path / "empty")
    r = subprocess.run([sys.executable, "-c", code, empty], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr
    assert r.stderr.splitlines() == [f"ckptd: no checkpoint in {empty}: starting at step 0"]


# ---------------------------------------------------------------------------- symlinks


def _tree(path):
    return sorted((os.path.relpath(os.path.join(d, n), path), os.lstat(os.path.join(d, n)).st_mtime_ns)
                  for d, dirs, files in os.walk(path) for n in dirs + files)


def test_quarantine_of_a_symlinked_step_directory_writes_nothing_outside_the_root(make_checkpoints, tmp_path):
    root = make_checkpoints([10])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    before = _tree(str(outside))
    os.symlink(outside, os.path.join(root, NEWEST))
    ck, _ = _checkpointer(root)
    assert ck.restore() == 10
    assert _tree(str(outside)) == before
    assert not os.path.lexists(os.path.join(root, NEWEST))
    names = os.listdir(os.path.join(root, ".quarantine"))
    link = [n for n in names if not n.endswith(".json")]
    assert len(link) == 1 and os.path.islink(os.path.join(root, ".quarantine", link[0]))
    assert f"{link[0]}.QUARANTINE.json" in names


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_quarantine_that_is_not_a_directory_still_falls_back_to_the_older_checkpoint_and_says_why_once(
        make_checkpoints, tmp_path, caplog, kind):
    root = make_checkpoints([10, 20, 30])
    _flip_data_byte(os.path.join(root, NEWEST))  # step 20
    _flip_data_byte(os.path.join(root, store.checkpoint_name(30)))
    outside = tmp_path / "outside"
    outside.mkdir()
    quarantine = os.path.join(root, ".quarantine")
    if kind == "symlink":
        os.symlink(outside, quarantine)
    else:
        with open(quarantine, "w") as f:
            f.write("not a directory")
    ck, model = _checkpointer(root)
    with caplog.at_level("WARNING", logger="ckptd"):
        assert ck.restore() == 10  # was: CkptdError, and `ckptd run` restarted the trainer into it again
    assert torch.equal(model[0].weight, ckptd.load_state(os.path.join(root, OLDER))["model"]["0.weight"])
    assert os.listdir(outside) == []  # nothing moved through the link
    assert os.path.isdir(os.path.join(root, NEWEST))  # left in place (invalid, skipped by every reader)
    why = [r.getMessage() for r in caplog.records if "is not a plain directory" in r.getMessage()]
    assert len(why) == 1 and "remove it" in why[0], why


def test_prune_and_temp_cleanup_remove_links_never_their_targets(make_checkpoints, tmp_path):
    root = make_checkpoints([10])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    before = _tree(str(outside))
    os.symlink(outside, os.path.join(root, NEWEST))
    os.symlink(outside, os.path.join(root, ".trash-x"))
    os.symlink(outside, os.path.join(root, ".tmp-step-000000000021-otherhost-1-abcdef01"))
    os.utime(os.path.join(root, ".tmp-step-000000000021-otherhost-1-abcdef01"), (0, 0), follow_symlinks=False)
    assert store.delete(root, NEWEST)
    assert sorted(store.remove_stale_temps(root)) == [".tmp-step-000000000021-otherhost-1-abcdef01", ".trash-x"]
    assert _tree(str(outside)) == before
    assert sorted(os.listdir(root)) == [OLDER]


# ---------------------------------------------------------------------------- ranks

RESTORER = """
import os, sys, time
sys.path.insert(0, 'tests')
import ckptd
from conftest import small_model
go = sys.argv[2]
deadline = time.monotonic() + 60
while not os.path.exists(go):  # start together: the race is the point
    if time.monotonic() > deadline:
        sys.exit('no go signal')
    time.sleep(0.001)
m, o = small_model(seed=1)
print(ckptd.Checkpointer(model=m, optimizer=o, dir=sys.argv[1], handle_signals=False, save_on_close=False).restore())
"""


def _race(root, tmp_path, envs):
    go = str(tmp_path / "go")
    procs = [subprocess.Popen([sys.executable, "-c", RESTORER, root, go], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **e}) for e in envs]
    open(go, "w").close()
    outs = [p.communicate(timeout=240) for p in procs]  # bounds a stuck run only: ~35 s under load
    return [(p.returncode, out.strip(), err) for p, (out, err) in zip(procs, outs, strict=True)]


@pytest.mark.kind("system")
def test_concurrent_restores_of_a_corrupt_directory_all_fall_back_without_errors(make_checkpoints, tmp_path):
    root = make_checkpoints([10, 20, 30])
    _flip_data_byte(os.path.join(root, NEWEST))
    _flip_data_byte(os.path.join(root, "step-000000000030"))
    # two writers racing to quarantine, and rank 1 of a pair reading while they move things
    results = _race(root, tmp_path, [{"WORLD_SIZE": "1"}] * 2 + [{"WORLD_SIZE": "2", "RANK": str(r)} for r in (0, 1)])
    assert [(rc, out) for rc, out, _ in results] == [(0, "10")] * 4, [err for *_, err in results]
    assert [i.step for i in store.list_checkpoints(root)] == [10]
    assert len(os.listdir(os.path.join(root, ".quarantine"))) == 2


@pytest.mark.kind("system")
def test_ranks_that_do_not_write_move_nothing(make_checkpoints, tmp_path):
    root = make_checkpoints([10, 20])
    _flip_data_byte(os.path.join(root, NEWEST))
    dead = os.path.join(root, f".tmp-step-000000000030-{os.uname().nodename}-999999999-abcd0123")
    os.mkdir(dead)
    results = _race(root, tmp_path, [{"WORLD_SIZE": "4", "RANK": str(r)} for r in (1, 3)])
    assert [(rc, out) for rc, out, _ in results] == [(0, "10")] * 2, [err for *_, err in results]
    assert sorted(os.listdir(root)) == sorted([OLDER, NEWEST, os.path.basename(dead)])


def test_quarantine_that_lost_the_race_is_not_an_error(make_checkpoints):
    root = make_checkpoints([10])
    assert store.quarantine(root, OLDER, "first") is not None
    assert store.quarantine(root, OLDER, "second") is None


# ---------------------------------------------------------------------------- state encoding


def _state_with(ckpt: str, edit) -> None:
    spath = os.path.join(ckpt, store.STATE)
    tree = json.load(open(spath))
    edit(tree)
    open(spath, "w").write(json.dumps(tree))
    resign(ckpt)


BAD_TAGS = {
    "dtype-module": {"__dtype": "os"},
    "dtype-function": {"__dtype": "load"},
    "npscalar-object": {"__npscalar": ["|O", "model/0.bias"]},
    "float": {"__float": "1e5"},
    "device": {"__device": "cuda:0 or anything"},
    "tensor-missing": {"__t": "no/such/tensor"},
    "tensor-not-a-name": {"__t": ["x"]},
    "bytes": {"__bytes": "!!not base64"},
    "dict-key-unhashable": {"__dict": [[{"a": 1}, 2]]},
    "tuple": {"__tuple": "abc"},
}


@pytest.mark.parametrize("case", sorted(BAD_TAGS))
def test_state_tags_decode_only_from_fixed_tables(case):
    with pytest.raises(state.StateDecodeError, match="user/x"):
        state.decode({"user": {"x": BAD_TAGS[case]}}, {"model/0.bias": torch.zeros(4)}.__getitem__)


def test_dtype_tag_decodes_every_torch_dtype_and_nothing_else():
    assert state.decode({"__dtype": "bfloat16"}, {}.__getitem__) is torch.bfloat16
    assert all(isinstance(v, torch.dtype) for v in state.TORCH_DTYPE_NAMES.values())
    for name in ("os", "load", "nn", "Tensor", "float32 "):
        with pytest.raises(state.StateDecodeError):
            state.decode({"__dtype": name}, {}.__getitem__)


@pytest.mark.parametrize("case", ["dtype-module", "npscalar-object", "tensor-missing"])
def test_re_signed_state_with_a_bad_tag_is_quarantined_with_the_run_untouched(make_checkpoints, case):
    root = make_checkpoints([10, 20])
    newest = os.path.join(root, NEWEST)
    _state_with(newest, lambda t: t["scheduler" if "scheduler" in t else "user"].update({"x": BAD_TAGS[case]}))
    with pytest.raises(CorruptCheckpointError, match="user/x"):
        ckptd.load_state(newest)
    ck, _ = _checkpointer(root)
    assert ck.restore() == 10
    assert not os.path.exists(newest)


def test_re_signed_state_with_a_bad_rng_or_progress_is_refused_before_the_model_is_written(make_checkpoints):
    root = make_checkpoints([10])
    ckpt = os.path.join(root, OLDER)
    _state_with(ckpt, lambda t: t["rng"].update({"python": [3, [1, 2], None]}))
    model, opt = small_model(seed=5)
    before = _snapshot(model)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
    assert ck.restore() == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- hostile sizes

MEASURE = """
import resource, sys, time, json
sys.path.insert(0, 'tests')
import ckptd
from ckptd import store
what, path = sys.argv[1], sys.argv[2]
load_state = ckptd.load_state  # imports torch now, outside what is measured
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.process_time()  # CPU time: what refusing costs, whatever else the machine is doing
try:
    if what == 'load_state':
        load_state(path)
        result = 'loaded'
    elif what == 'verify':
        result = store.verify(path).reason
    else:
        result = store.inspect_checkpoint(path).reason
except ckptd.CorruptCheckpointError as exc:
    result = exc.reason
print(json.dumps({'reason': result, 'seconds': time.process_time() - t0,
                  'rss_mib': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def _measure(what: str, path: str) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, what, path], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.kind("system")
def test_state_json_of_many_empty_lists_is_refused_quickly_without_memory(make_checkpoints):
    root = make_checkpoints([10])
    ckpt = os.path.join(root, OLDER)
    blob = b"[" + b",".join([b"[]"] * (store.MAX_STATE_VALUES + 10)) + b"]"  # 12 MB, ~400 MB once parsed
    open(os.path.join(ckpt, store.STATE), "wb").write(blob)
    resign(ckpt)
    for what in ("load_state", "verify"):
        got = _measure(what, ckpt)
        assert "JSON values, more than" in got["reason"], got
        assert got["rss_mib"] < 100 and got["seconds"] < 10, got


@pytest.mark.kind("system")
def test_header_of_many_empty_tensors_is_refused_quickly_without_memory(make_checkpoints):
    root = make_checkpoints([10])
    ckpt = os.path.join(root, OLDER)
    entries = b",".join(b'"%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                        for i in range(store.MAX_TENSORS + 10))
    body = b"{" + entries + b"}"
    open(_tensor_file(ckpt), "wb").write(struct.pack("<Q", len(body)) + body)
    resign(ckpt)
    for what in ("load_state", "verify"):
        got = _measure(what, ckpt)
        assert f"more than the {store.MAX_TENSORS} tensors allowed" in got["reason"], got
        assert got["rss_mib"] < 100 and got["seconds"] < 10, got


def test_deeply_nested_state_is_refused_at_save_time_not_at_restore(tmp_path):
    model, _ = small_model()
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path), handle_signals=False, save_on_close=False)
    deep: list = []
    for _ in range(store.MAX_STATE_DEPTH + 5):
        deep = [deep]
    ck.user["deep"] = deep
    ck.step(1)
    with pytest.raises(ckptd.UnsupportedStateError, match="nested more than"):
        ck.save(block=True)
    ck.close()
    assert store.list_checkpoints(str(tmp_path)) == []


# ---------------------------------------------------------------------------- manifests (store side)


def _manifest_with(ckpt: str, edit, resign: bool = True) -> None:
    mpath = os.path.join(ckpt, store.MANIFEST)
    m = json.load(open(mpath))
    edit(m)
    if resign:
        m["digest"] = store._digest(m)
    open(mpath, "w").write(json.dumps(m))


MANIFEST_EDITS = {
    "created-yesterday": (lambda m: m.update(created="yesterday"), "created"),
    "metrics-list": (lambda m: m.update(metrics=[1, 2]), "metrics"),
    "metrics-nested": (lambda m: m.update(metrics={"loss": {"a": 1}}), "metrics"),
    "step-text": (lambda m: m.update(step="x"), "step"),
    "step-bool": (lambda m: m.update(step=True), "step"),
    "files-list": (lambda m: m.update(files=["tensors.safetensors"]), "file list"),
    "file-bytes-text": (lambda m: m["files"]["state.json"].update(bytes="12"), "bad file entry"),
    "file-hash-missing": (lambda m: m["files"]["state.json"].pop("xxh3_128"), "bad file entry"),
    "kind-list": (lambda m: m.update(kind=["periodic"]), "kind"),
    "epoch-text": (lambda m: m.update(epoch="1"), "epoch"),
    "versions-number": (lambda m: m.update(versions=3), "versions"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_listing_never_raises_on_manifest_content(make_checkpoints, case):
    edit, reason = MANIFEST_EDITS[case]
    root = make_checkpoints([10, 20])
    _manifest_with(os.path.join(root, NEWEST), edit)
    infos = store.list_checkpoints(root)
    bad = [i for i in infos if i.name == NEWEST][0]
    assert not bad.valid and reason in bad.reason
    ck, _ = _checkpointer(root)
    assert ck.restore() == 10


def test_100k_deep_manifest_is_invalid_not_a_recursion_error(make_checkpoints):
    root = make_checkpoints([10])
    bad = os.path.join(root, NEWEST)
    os.mkdir(bad)
    for body in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        open(os.path.join(bad, store.MANIFEST), "wb").write(body)
        info = [i for i in store.list_checkpoints(root) if i.name == NEWEST][0]
        assert not info.valid and "manifest.json" in info.reason, info.reason
    r = store.verify(bad)
    assert not r.valid


def test_non_ascii_digits_are_not_a_step_name(make_checkpoints):
    root = make_checkpoints([2])
    os.rename(os.path.join(root, "step-000000000002"), os.path.join(root, "step-" + "\u0660" * 11 + "\u0662"))
    assert store.list_checkpoints(root) == []
    with pytest.raises(CkptdError):
        store.check_name("step-" + "\u0660" * 11 + "\u0662")
