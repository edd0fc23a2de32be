"""The on-disk store: commit protocol, verification, quarantine, names, permissions."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import stat
import sys
import threading

import pytest
import torch

import ckptd
from ckptd import store
from ckptd.errors import CkptdError
from conftest import ckptd_cli, small_model, train_steps

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes


def test_commit_publishes_complete_checkpoint_with_manifest(make_checkpoints):
    root = make_checkpoints([5])
    path = os.path.join(root, "step-000000000005")
    assert sorted(os.listdir(path)) == ["manifest.json", "state.json", "tensors.safetensors"]
    m = json.load(open(os.path.join(path, "manifest.json")))
    assert m["format"] == store.FORMAT and m["step"] == 5 and m["kind"] == "periodic"
    assert set(m["files"]) == {"state.json", "tensors.safetensors"}
    for fname, rec in m["files"].items():
        assert rec["bytes"] == os.path.getsize(os.path.join(path, fname))
        assert len(rec["xxh3_128"]) == 32
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["ckptd"] == ckptd.__version__
    assert "loss" in m["metrics"] and m["digest"]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]


def test_new_files_are_never_world_writable(make_checkpoints):
    old = os.umask(0)
    try:
        root = make_checkpoints([1])
    finally:
        os.umask(old)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, n)).st_mode
            assert not mode & stat.S_IWOTH, n


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "step-1/../../x", ""])
def test_names_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(CkptdError, match="invalid checkpoint or file name"):
        store.delete(str(tmp_path), name)
    with pytest.raises(CkptdError):
        store.quarantine(str(tmp_path), name, "x")


def test_file_names_in_manifest_cannot_escape(make_checkpoints):
    root = make_checkpoints([3])
    path = os.path.join(root, "step-000000000003")
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    m["files"]["../../etc/passwd"] = {"bytes": 1, "xxh3_128": "0"}
    m["digest"] = store._digest(m)
    json.dump(m, open(mpath, "w"))
    info = store.verify(path)
    assert not info.valid and "bad file entry" in info.reason


def test_tensor_file_loads_with_safetensors_alone(make_checkpoints):
    from safetensors import safe_open

    root = make_checkpoints([2])
    with safe_open(os.path.join(root, "step-000000000002", "tensors.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert "model/0.weight" in keys and any(k.startswith("optimizer/state/") for k in keys)
        assert f.get_tensor("model/0.weight").shape == (16, 8)


def test_list_orders_by_step_not_name(make_checkpoints, tmp_path):
    root = make_checkpoints([9, 10, 100, 1000, 99])
    assert [i.step for i in store.list_checkpoints(root)] == [9, 10, 99, 100, 1000]
    assert store.latest_valid(root).step == 1000


def test_existing_checkpoint_is_never_overwritten(make_checkpoints):
    root = make_checkpoints([4])
    before = open(os.path.join(root, "step-000000000004", "manifest.json"), "rb").read()
    with store.PendingCheckpoint(root, 4) as p:
        p.write_file("tensors.safetensors", [b"x"])
        with pytest.raises(CkptdError, match="already exists"):
            p.commit(kind="manual")
    assert open(os.path.join(root, "step-000000000004", "manifest.json"), "rb").read() == before
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]


# ---------------------------------------------------------------------------- corruption


def _truncate(path):
    f = os.path.join(path, "tensors.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)


def _flip_byte(path):
    f = os.path.join(path, "tensors.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) - 100)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x01]))


def _flip_state_byte(path):
    f = os.path.join(path, "state.json")
    data = bytearray(open(f, "rb").read())
    i = data.index(b'"step":') + 7
    data[i] = ord("9") if data[i] != ord("9") else ord("8")
    open(f, "wb").write(bytes(data))


def _delete_file(path):
    os.unlink(os.path.join(path, "state.json"))


def _garble_manifest(path):
    f = os.path.join(path, "manifest.json")
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x20
    open(f, "wb").write(bytes(data))


def _edit_manifest(path):  # valid JSON, but not what was committed
    f = os.path.join(path, "manifest.json")
    m = json.load(open(f))
    m["metrics"]["loss"] = 0.0
    json.dump(m, open(f, "w"))


def _delete_manifest(path):
    os.unlink(os.path.join(path, "manifest.json"))


def _plant_symlink(path):
    os.symlink("/etc/passwd", os.path.join(path, "extra"))


def _replace_with_symlink(path):
    f = os.path.join(path, "state.json")
    os.rename(f, f + ".real")
    os.symlink(f + ".real", f)


CORRUPTIONS = {
    "truncate": (_truncate, "bytes"),
    "flip-byte": (_flip_byte, "checksum"),
    "flip-state-byte": (_flip_state_byte, "checksum"),
    "delete-file": (_delete_file, "missing"),
    "garble-manifest": (_garble_manifest, "manifest"),
    "edit-manifest": (_edit_manifest, "digest"),
    "delete-manifest": (_delete_manifest, "manifest.json is missing"),
    "plant-symlink": (_plant_symlink, "symlink"),
    "file-is-symlink": (_replace_with_symlink, "symlink"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.kind("system")
def test_corruption_detected_by_verify_and_skipped_by_restore(make_checkpoints, case, caplog):
    corrupt, reason = CORRUPTIONS[case]
    root = make_checkpoints([10, 20])
    newest = os.path.join(root, "step-000000000020")
    corrupt(newest)

    r = ckptd_cli("verify", root)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "step-000000000020: INVALID" in r.stdout and reason in r.stdout
    assert "step-000000000010: ok" in r.stdout

    model, opt = small_model(seed=99)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
    with caplog.at_level("WARNING", logger="ckptd"):
        assert ck.restore() == 10
    assert any("step-000000000020" in r.message and "quarantine" in r.message for r in caplog.records)
    assert not os.path.exists(newest)
    (qname,) = os.listdir(os.path.join(root, ".quarantine"))
    note = json.load(open(os.path.join(root, ".quarantine", qname, "QUARANTINE.json")))
    assert note["name"] == "step-000000000020" and reason.split()[0] in note["reason"]
    assert [i.step for i in store.list_checkpoints(root)] == [10]


def test_restore_when_every_checkpoint_is_corrupt_starts_from_zero_with_model_untouched(make_checkpoints):
    root = make_checkpoints([10])
    _flip_byte(os.path.join(root, "step-000000000010"))
    model, opt = small_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
    assert ck.restore() == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_leftover_temp_directory_is_removed_and_not_listed(make_checkpoints):
    root = make_checkpoints([1])
    dead = os.path.join(root, f".tmp-step-000000000002-{os.uname().nodename}-999999999-abcd0123")
    os.mkdir(dead)
    open(os.path.join(dead, "tensors.safetensors"), "wb").write(b"partial")
    assert [i.step for i in store.list_checkpoints(root)] == [1]
    model, opt = small_model()
    ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False).restore()
    assert not os.path.exists(dead)


def test_restore_explicit_path_refuses_corrupt_without_quarantining(make_checkpoints):
    root = make_checkpoints([7])
    path = os.path.join(root, "step-000000000007")
    _flip_byte(path)
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(root) + "-branch", handle_signals=False)
    with pytest.raises(ckptd.CorruptCheckpointError, match="checksum"):
        ck.restore(path)
    assert os.path.isdir(path)


def test_restore_refuses_a_different_model_with_a_clear_error(make_checkpoints):
    root = make_checkpoints([3])
    model, opt = small_model(width=32)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False)
    with pytest.raises(CkptdError, match="does not fit this model"):
        ck.restore()
    assert os.path.isdir(os.path.join(root, "step-000000000003"))  # not quarantined: it is fine


def test_unsupported_state_names_the_path(tmp_path):
    model, opt = small_model()
    with pytest.raises(ckptd.UnsupportedStateError, match="extra/cfg/value/fn"):  # at construction already
        ckptd.Checkpointer(model=model, dir=str(tmp_path), extra={"cfg": {"fn": object()}}, handle_signals=False)
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path), handle_signals=False, save_on_close=False)
    ck.extra["cfg"] = {"fn": object()}  # put there later: the save refuses it, with the same message
    ck.step(1)
    with pytest.raises(ckptd.UnsupportedStateError, match="extra/cfg/value/fn"):
        ck.save(block=True)
    assert not os.path.exists(os.path.join(tmp_path, "step-000000000001"))
    ck.close()


def test_state_round_trips_types_without_pickle(tmp_path):
    import numpy as np

    model, opt = small_model()
    train_steps(model, opt, 1)
    value = {"t": (1, 2.5, "x"), 3: [None, True], "nan": float("nan"), "np": np.arange(3, dtype=np.int16),
             "scalar": np.float32(1.5), "bytes": b"\x00\x01", "dtype": torch.bfloat16,
             "bf": torch.ones(2, dtype=torch.bfloat16)}
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path), extra={"v": value}, handle_signals=False)
    ck.user["best"] = 0.25
    ck.step(1)
    ck.save(block=True)
    ck.close()
    state = ckptd.load_state(os.path.join(tmp_path, "step-000000000001"))
    got = state["extra"]["v"]["value"]
    assert got["t"] == (1, 2.5, "x") and got[3] == [None, True] and got["nan"] != got["nan"]
    assert got["np"].dtype == np.int16 and list(got["np"]) == [0, 1, 2]
    assert got["scalar"] == np.float32(1.5) and got["scalar"].dtype == np.float32
    assert got["bytes"] == b"\x00\x01" and got["dtype"] is torch.bfloat16 and got["bf"].dtype == torch.bfloat16
    ck2 = ckptd.Checkpointer(model=small_model()[0], optimizer=None, dir=str(tmp_path), extra={"v": None},
                             handle_signals=False)
    assert ck2.restore() == 1
    assert ck2.user == {"best": 0.25} and ck2.extra["v"]["t"] == (1, 2.5, "x")


def test_read_into_fills_views_in_file_order_hashes_all_and_refuses_a_short_file(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "READ_CHUNK", 4096)  # many requests in flight at once, split views
    monkeypatch.setattr(store, "MAX_IOV", 8)  # and groups capped by their number of buffers
    data = os.urandom(3 + 600 * 5 + 3 * 4096 + 7 + 70_000)
    path = tmp_path / "blob"
    path.write_bytes(b"HEAD" + data)
    sizes = [3] + [5] * 600 + [3 * 4096 + 7, 70_000]
    views = [memoryview(bytearray(n)) for n in sizes]
    h = store.new_hasher()
    fd = os.open(path, os.O_RDONLY)
    try:
        end = store.read_into(fd, 4, iter(views), h, str(path))
    finally:
        os.close(fd)
    assert end == 4 + len(data)
    assert b"".join(bytes(v) for v in views) == data
    assert h.hexdigest() == store.digest_bytes(data)

    path.write_bytes(b"HEAD" + data[:-100])  # 100 bytes short
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ckptd.CorruptCheckpointError, match="ends early"):
            store.read_into(fd, 4, iter([memoryview(bytearray(n)) for n in sizes]), store.new_hasher(), str(path))
    finally:
        os.close(fd)


def test_read_into_runs_during_once_and_stops_on_its_error(tmp_path, monkeypatch):
    # Restore reads its state.json in read_into's thread while the tensor file is read; an error there
    # (a corrupt state.json) ends the read and is raised, after the requests in flight finished.
    monkeypatch.setattr(store, "READ_CHUNK", 4096)
    data = os.urandom(64 * 1024)
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        calls = []
        buf = bytearray(len(data))
        h = store.new_hasher()
        switch = sys.getswitchinterval()
        assert store.read_into(fd, 0, [memoryview(buf)], h, path,
                               during=lambda: calls.append(sys.getswitchinterval())) == len(data)
        assert calls == [pytest.approx(store.DURING_SWITCH)]
        assert bytes(buf) == data and h.hexdigest() == store.digest_bytes(data)
        assert sys.getswitchinterval() == switch  # lowered only while during() ran
        calls.clear()
        assert store.read_into(fd, 0, [memoryview(buf)], h, path, during=lambda: calls.append(1)) == len(data)
        assert calls == [1]
        assert store.read_into(fd, 0, [], store.new_hasher(), path, during=lambda: calls.append(2)) == 0
        assert calls == [1, 2]  # nothing to read: still called, once

        def boom() -> None:
            raise ValueError("state.json is damaged")

        with pytest.raises(ValueError, match="damaged"):
            store.read_into(fd, 0, [memoryview(bytearray(len(data)))], store.new_hasher(), path, during=boom)
        assert sys.getswitchinterval() == switch
    finally:
        os.close(fd)


def test_the_short_switch_interval_nests_across_threads_and_the_last_one_out_restores_it():
    # Two restores in two threads: the second must not save the first one's lowered interval as "the"
    # interval and put that back at the end.
    switch = sys.getswitchinterval()
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with store._short_switch():
            inside.set()
            assert leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with store._short_switch():
        assert sys.getswitchinterval() == pytest.approx(store.DURING_SWITCH)
    assert sys.getswitchinterval() == pytest.approx(store.DURING_SWITCH)  # the other thread is still inside
    leave.set()
    t.join()
    assert sys.getswitchinterval() == switch


def _resident_pages(path: str, length: int) -> list[bool]:
    """Which pages of the file's first ``length`` bytes are in the page cache (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((length + page - 1) // page)
            assert libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
            return [b & 1 == 1 for b in vec.raw]
        finally:
            libc.munmap(addr, length)
    finally:
        os.close(fd)


def test_prefetch_starts_the_disk_on_the_start_of_the_data_and_stops_when_asked(tmp_path, monkeypatch):
    # Restore plans where each byte goes while store.Prefetch gets the first bytes of the data section
    # off the disk (into the page cache, through the same open file), and stops once the real read starts.
    monkeypatch.setattr(store, "RESTORE_PREFETCH", 1 << 20)
    monkeypatch.setattr(store, "PREFETCH_PIECE", 256 << 10)
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped from the page cache
        assert not any(_resident_pages(path, 8 << 20))
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead beyond what is asked for
        prefetch = store.Prefetch(fd, 4096, 8 << 20)
        prefetch.join()
        resident = _resident_pages(path, 8 << 20)
        assert all(resident[4096 // page : (4096 + (1 << 20)) // page])  # the first MiB after the header
        assert not any(resident[(4 << 20) // page :])  # and not the whole file

        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        monkeypatch.setattr(store, "RESTORE_PREFETCH", 8 << 20)
        sent = []
        real = os.sendfile

        began, stopped = threading.Event(), threading.Event()

        def slow_sendfile(out, in_, offset, count):
            sent.append(offset)
            began.set()
            assert stopped.wait(10)  # stop() arrives during the first piece
            return real(out, in_, offset, count)

        monkeypatch.setattr(os, "sendfile", slow_sendfile)
        prefetch = store.Prefetch(fd, 0, 8 << 20)
        assert began.wait(10)
        prefetch.stop()
        stopped.set()
        prefetch.join()
        assert sent == [0]  # no piece after the one in progress

        monkeypatch.setattr(os, "sendfile", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        prefetch = store.Prefetch(fd, 0, 8 << 20)  # a failure is the real read's to report, not the prefetch's
        prefetch.join()
    finally:
        os.close(fd)


_OUT_OF_FDS = r"""
import os, sys
from ckptd import store
root, ckpt, spare = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
for _ in range(spare):
    os.close(held.pop())
call = (lambda: [(i.valid, i.reason) for i in store.list_checkpoints(root)]) if spare else (lambda: store.verify(ckpt))
try:
    print("RESULT", call())
except OSError as exc:
    print("RAISED", exc.errno)
"""


@pytest.mark.parametrize("spare", [1, 0], ids=["list_checkpoints", "verify"])
@pytest.mark.kind("system")
def test_out_of_file_descriptors_never_makes_a_checkpoint_invalid(make_checkpoints, spare):
    """A real RLIMIT_NOFILE, every descriptor taken (one left for the listing itself): the reader's own
    EMFILE is raised, never reported as "manifest.json unreadable" of a healthy checkpoint."""
    import resource
    import subprocess

    root = make_checkpoints([1])
    ckpt = os.path.join(root, store.checkpoint_name(1))
    r = subprocess.run([sys.executable, "-c", _OUT_OF_FDS, root, ckpt, str(spare)], capture_output=True, text=True,
                       timeout=60, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    assert r.stdout.strip() == f"RAISED {errno.EMFILE}", r.stdout + r.stderr
    assert store.verify(ckpt).valid  # and it is healthy
