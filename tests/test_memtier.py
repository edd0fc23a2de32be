"""The memory tier (ckptd/memtier.py, memory.py, supervisor/memory.py): seqlocked slots in a memfd the supervisor
holds; a snapshot the trainer died before committing is written by the supervisor before the restart.

The many-kills version is scripts/chaos_memory.py."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import struct
import threading

import pytest

from ckptd import env, exitcodes, memtier, store
from ckptd.errors import CkptdError
from ckptd.supervisor.config import resolve
from fixtures import mem_plain
from fixtures.sup_helpers import FIXTURES, Run, kill_at_steps, lives, toy_digest, toy_reference, wait_for
from fixtures.sup_helpers import ckptd as ckptd_cli

MEM_TRAINER = os.path.join(FIXTURES, "mem_trainer.py")
MEM_PLAIN = os.path.join(FIXTURES, "mem_plain.py")
FAST = ["--backoff-base", "0.05", "--backoff-max", "0.2", "--metrics-addr", "off", "--notices", "off"]
STEPS, EVERY = 40, 10


def sealed_region(step: int, data: bytes, state: bytes = b'{"s":1}', header: bytes = b"H" * 4096) -> memtier.Region:
    region = memtier.Region(memtier.create())
    region.ensure(len(data))
    i = region.next_slot()
    region.begin(i, step)
    view = region.data_area(i)
    view[: len(data)] = data
    view.release()
    assert region.seal(i, step, header, state, len(data), {"kind": "periodic", "metrics": {"loss": 0.5},
                                                           "extra": {"epoch": 1, "files": "forged"}}, False)
    return region


@pytest.mark.kind("unit")
def test_a_sealed_slot_is_found_and_a_torn_or_corrupt_one_never_is():
    region = sealed_region(7, b"a" * 5000)
    pending, _ = memtier.newest_sealed(region.fd)
    assert pending is not None and pending.step == 7
    i = region.next_slot()  # the other slot: step 8 begun, never sealed (the writer died in the copy)
    region.begin(i, 8)
    pending, notes = memtier.newest_sealed(region.fd)
    assert pending.step == 7 and f"slot {i}: torn (the writer died in it)" in notes
    # a writer entered the sealed slot again and died before changing a byte: its meta and checksums still
    # match, but the open seqlock alone says it may be torn
    region.begin(1 - i, 7)
    assert memtier.newest_sealed(region.fd)[0] is None
    region.seal(1 - i, 7, b"H" * 4096, b'{"s":1}', 5000, {"kind": "periodic"}, False)
    assert memtier.newest_sealed(region.fd)[0].step == 7
    # a byte of the sealed data changed after sealing: its checksum no longer matches, it is never used
    assert region.layout is not None and region.mm is not None
    region.mm[region.layout.data(pending.slot) + 4999] = ord("b")
    pending, notes = memtier.newest_sealed(region.fd)
    assert pending is None and f"slot {1 - i}: checksum mismatch" in notes
    os.close(region.fd)


@pytest.mark.kind("unit")
def test_status_and_metrics_show_each_slots_snapshot_from_its_header_without_mapping_the_region():
    from prometheus_client import CollectorRegistry

    from ckptd.supervisor.clock import FakeClock
    from ckptd.supervisor.memory import MemoryHold
    from ckptd.supervisor.metrics import RunMetrics

    hold = MemoryHold(memtier.create())
    assert hold.describe()["slots"] == [] and hold.describe()["newest_snapshot_step"] is None  # not laid out yet
    region = memtier.Region(hold.fd)
    region.ensure(5000)
    i = region.next_slot()
    region.begin(i, 7)
    region.seal(i, 7, b"H" * 4096, b'{"s":1}', 5000, {"kind": "periodic"}, False)
    region.begin(1 - i, 8)  # a writer in the other slot (or dead in it)
    described = hold.describe()
    assert described["slot_bytes"] == region.layout.data_cap and described["newest_snapshot_step"] == 7
    assert sorted((s["state"], s["step"]) for s in described["slots"]) == [("open", 8), ("sealed", 7)]
    reg = CollectorRegistry()
    metrics = RunMetrics(reg, FakeClock())
    assert reg.get_sample_value("ckptd_memory_snapshot_step") != reg.get_sample_value("ckptd_memory_snapshot_step")
    metrics.memory(described["region_bytes"], described["slot_bytes"], described["newest_snapshot_step"])
    assert reg.get_sample_value("ckptd_memory_snapshot_step") == 7
    assert reg.get_sample_value("ckptd_memory_slot_bytes") == region.layout.data_cap
    assert reg.get_sample_value("ckptd_memory_region_bytes") == region.layout.size
    hold.close()


@pytest.mark.kind("unit")
def test_a_slot_whose_meta_points_outside_its_area_is_refused():
    region = sealed_region(3, b"x" * 100)
    assert region.layout is not None and region.mm is not None
    head = region.layout.head(0)
    n = struct.unpack_from("<Q", region.mm, region.layout.slot(0) + memtier.META_LEN_OFF)[0]
    meta = json.loads(bytes(region.mm[head : head + n]))
    meta["blobs"]["state"][0] = region.layout.head_cap  # state.json "beyond" the head area: into the data area
    raw = json.dumps(meta, separators=(",", ":")).encode()
    region.mm[head : head + len(raw)] = raw
    struct.pack_into("<Q", region.mm, region.layout.slot(0) + memtier.META_LEN_OFF, len(raw))
    pending, notes = memtier.newest_sealed(region.fd)
    assert pending is None and "slot 0: blob 'state' out of bounds" in notes
    os.close(region.fd)


@pytest.mark.kind("unit")
def test_the_supervisor_writes_a_pending_snapshot_as_a_checkpoint_that_verifies(tmp_path):
    data = os.urandom(10000)
    header = store.safetensors_header_bytes([("w", "U8", [len(data)], len(data))], {"format": "ckptd"},
                                            align=store.ALIGN)
    region = sealed_region(12, data, b'{"progress":{"step":12}}', header)
    root = str(tmp_path / "ck")
    path, pending, why = memtier.persist_pending(region.fd, root)
    assert path == os.path.join(root, store.checkpoint_name(12)) and why == ""
    info = store.verify(path)
    assert info.valid, info.reason
    with open(os.path.join(path, store.TENSORS), "rb") as f:
        assert f.read() == header + data
    manifest = json.load(open(os.path.join(path, store.MANIFEST)))
    assert manifest["kind"] == "periodic" and manifest["metrics"] == {"loss": 0.5} and manifest["epoch"] == 1
    assert manifest["files"].keys() == {store.TENSORS, store.STATE}  # a field outside the known ones is dropped
    # once on disk, never again
    assert memtier.persist_pending(region.fd, root)[0] is None
    os.close(region.fd)


@pytest.mark.kind("unit")
def test_the_trainer_refuses_a_descriptor_that_is_not_ckptds_region(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(CkptdError, match="not ckptd's memory region"):
            memtier.Region.from_env(str(fd))
    finally:
        os.close(fd)
    with pytest.raises(CkptdError, match="not an open descriptor"):
        memtier.Region.from_env("999")


@pytest.mark.kind("unit")
def test_the_checkpointers_snapshot_is_the_slot_and_its_disk_checkpoint_has_the_same_bytes(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import ckptd
    from conftest import small_model, train_steps

    fd = memtier.create()
    monkeypatch.setenv(env.MEMORY_FD, str(fd))
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path / "ck"), handle_signals=False)
    train_steps(model, opt, 2)
    ck.step(1)
    ck.save(block=True)
    region = ck._memory.region
    lo, hi = region.layout.data(0), region.layout.data(1) + region.layout.data_cap
    base = torch.frombuffer(region.mm, dtype=torch.uint8).data_ptr()
    for snap in ck._memory.snaps:
        if snap.buffer is not None and snap._dests:  # the snapshot's one copy went into a slot, nowhere else
            assert base + lo <= snap.buffer.data_ptr() < base + hi
    pending, _ = memtier.newest_sealed(fd)
    assert pending is not None and pending.step == 1
    other = str(tmp_path / "other")
    path, _, _ = memtier.persist_pending(fd, other)  # what the supervisor would write from the slot
    ck.close()
    mine = json.load(open(os.path.join(str(tmp_path / "ck"), store.checkpoint_name(1), store.MANIFEST)))
    theirs = json.load(open(os.path.join(path, store.MANIFEST)))
    assert mine["files"] == theirs["files"]  # the same files, the same checksums
    os.close(fd)


def _restart_restores(tmp_path, fd, caplog, corrupt: bool) -> str:
    """Life 1 saves step 3 (slot + disk); life 2 (a fresh model) restores; the line it said."""
    torch = pytest.importorskip("torch")
    import ckptd
    from conftest import small_model, train_steps

    root = str(tmp_path / "ck")
    model, opt = small_model()
    train_steps(model, opt, 3)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False)
    ck.step(3)
    ck.save(block=True)
    ck.close()
    if corrupt:  # the slot's copy of step 3 differs from the checkpoint on disk by one byte
        region = memtier.Region(fd)
        pending, _ = memtier.newest_sealed(fd)
        region.source(3)
        assert region.mm is not None and region.layout is not None
        region.mm[region.layout.data(pending.slot)] ^= 0xFF
    fresh, fresh_opt = small_model(seed=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, "ckptd"):
        ck2 = ckptd.Checkpointer(model=fresh, optimizer=fresh_opt, dir=root, handle_signals=False)
        assert ck2.restore() == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ck2.close()
    return caplog.text


@pytest.mark.kind("unit")
def test_a_restart_restores_from_the_memory_tier_when_its_snapshot_matches_the_checkpoint(tmp_path, monkeypatch,
                                                                                        caplog):
    fd = memtier.create()
    monkeypatch.setenv(env.MEMORY_FD, str(fd))
    text = _restart_restores(tmp_path, fd, caplog, corrupt=False)
    assert "resumed from step 3" in text and "(from the memory tier)" in text
    os.close(fd)


@pytest.mark.kind("unit")
def test_a_memory_snapshot_that_does_not_match_its_checkpoint_is_not_used_and_the_disk_is(tmp_path, monkeypatch,
                                                                                        caplog):
    fd = memtier.create()
    monkeypatch.setenv(env.MEMORY_FD, str(fd))
    text = _restart_restores(tmp_path, fd, caplog, corrupt=True)
    assert "does not match its checkpoint" in text and "reading it from disk" in text
    assert "resumed from step 3" in text and "(from the memory tier)" not in text
    assert store.verify(os.path.join(str(tmp_path / "ck"), store.checkpoint_name(3))).valid  # never set aside
    os.close(fd)


def _restart_of(run: Run) -> dict:
    return run.events("restart")[0]


@pytest.mark.kind("system")
@pytest.mark.parametrize("point", ["persist", "sealing", "committed"])
def test_a_sigkill_in_a_save_never_leaves_a_torn_checkpoint_and_loses_only_the_steps_after_the_snapshot(tmp_path,
                                                                                                       point):
    # A torch-free trainer saving as the library does, killed (SIGKILL) in the save of step 20 at `point`: the
    # supervisor writes the sealed snapshot the trainer did not commit (persist), never a torn one (sealing:
    # the slot of step 10 is the newest good one), nothing twice (committed).
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--memory", MEM_PLAIN, "--steps", "40", "--every", str(EVERY),
                               "--kill-at", "20", "--kill-point", point])
    assert run.wait(60) == 0, run.stderr()
    assert f"fault kill at {point} of step 20" in run.stdout()
    restart = _restart_of(run)
    assert restart["resume_step"] == (10 if point == "sealing" else 20), restart
    assert [e["step"] for e in run.events("memory_persisted")] == ([20] if point == "persist" else [])
    for info in store.list_checkpoints(root):  # every checkpoint verifies and holds exactly its step's bytes
        assert store.verify(info.path).valid, info
        with open(os.path.join(info.path, store.TENSORS), "rb") as f:
            assert f.read() == mem_plain.header() + mem_plain.content(info.step)
    assert "final_step=40" in run.stdout()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return toy_reference(str(tmp_path_factory.mktemp("ref")), STEPS)


@pytest.mark.kind("system")
def test_the_library_killed_while_persisting_resumes_that_snapshot_from_memory_and_ends_bit_identical(tmp_path,
                                                                                                   reference):
    # The real library (the bundled example) SIGKILLed while persisting the save of step 20 (or the first one
    # after it, if that one was coalesced behind a slow disk): the restart resumes that step, read from the
    # memory tier's slot, and the run ends bit-identical to an uninterrupted one.
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--memory", MEM_TRAINER, "--steps", str(STEPS), "--every-steps", str(EVERY),
                               "--step-delay", "0.01", "--kill-at", "20", "--kill-point", "persist"])
    assert run.wait(120) == 0, run.stderr()
    killed = int(re.search(r"fault kill at persist of step (\d+)", run.stdout()).group(1))
    restart = _restart_of(run)
    assert restart["resume_step"] == killed, restart
    assert [e["step"] for e in run.events("memory_persisted")] == [killed]
    assert re.search(rf"resumed from step {killed}: \S+ \(from the memory tier\)", run.stderr())
    for info in store.list_checkpoints(root):
        assert store.verify(info.path).valid, info
    assert toy_digest(run.stdout(), STEPS) == reference


# ----------------------------------------------------------------------------- snapshot_every_steps

SNAP, DISK = 5, 50  # a snapshot into memory every 5 steps, a disk save every 50


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Digests of uninterrupted, unsupervised runs of the bundled example, by number of steps."""
    cache: dict[int, str] = {}

    def of(steps: int) -> str:
        if steps not in cache:
            cache[steps] = toy_reference(str(tmp_path_factory.mktemp(f"ref{steps}")), steps)
        return cache[steps]

    return of


@pytest.mark.kind("unit")
def test_snapshot_every_steps_without_the_memory_tier_is_refused_naming_the_fix(tmp_path, monkeypatch):
    with pytest.raises(CkptdError, match="add --memory"):
        resolve(None, {"snapshot_every_steps": "5"})
    assert resolve(None, {"snapshot_every_steps": "5", "memory": True}).snapshot_every_steps == 5
    pytest.importorskip("torch")
    import ckptd

    monkeypatch.delenv(env.MEMORY_FD, raising=False)
    with pytest.raises(CkptdError, match=r"`ckptd run --memory`"):
        ckptd.Checkpointer(dir=str(tmp_path / "ck"), snapshot_every_steps=5, handle_signals=False)
    monkeypatch.setenv(env.SNAPSHOT_EVERY_STEPS, "5")  # what `ckptd run` passes on: refused the same way
    with pytest.raises(CkptdError, match="snapshot_every_steps=5"):
        ckptd.Checkpointer(dir=str(tmp_path / "ck"), handle_signals=False)


@pytest.mark.kind("system")
def test_ckptd_run_refuses_snapshot_every_steps_without_memory_in_one_line_and_starts_nothing(tmp_path):
    root = tmp_path / "ck"
    r = ckptd_cli("run", "--dir", str(root), "--snapshot-every-steps", "5", MEM_PLAIN)
    assert r.returncode == exitcodes.USAGE, r.stderr
    assert r.stderr.count("\n") == 1 and "snapshot_every_steps" in r.stderr and "--memory" in r.stderr
    config = tmp_path / "c.yaml"
    config.write_text("snapshot_every_steps: 5\n")
    r = ckptd_cli("run", "--config", str(config), "--dir", str(root), MEM_PLAIN)
    assert r.returncode == exitcodes.CONFIG and r.stderr.count("\n") == 1 and "--memory" in r.stderr, r.stderr
    assert not root.exists()  # nothing started


def _snapshotting(tmp_path, monkeypatch, **kw):
    """A trainer's Checkpointer on a fresh memory region (as under `ckptd run --memory`), disk saves every DISK
    steps and snapshots every SNAP: (region fd, directory, model, optimizer, checkpointer)."""
    import ckptd
    from conftest import small_model

    fd = memtier.create()
    monkeypatch.setenv(env.MEMORY_FD, str(fd))
    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=DISK, snapshot_every_steps=SNAP,
                            handle_signals=False, **kw)
    return fd, root, model, opt, ck


@pytest.mark.kind("unit")
def test_snapshots_go_into_memory_between_disk_saves_and_the_supervisors_write_of_the_newest_restores(tmp_path,
                                                                                                       monkeypatch):
    torch = pytest.importorskip("torch")
    import ckptd
    from conftest import small_model, train_steps

    fd, root, model, opt, ck = _snapshotting(tmp_path, monkeypatch)
    at_10 = {}
    for step in range(1, 13):
        train_steps(model, opt, 1)
        ck.step(step)
        if step == 10:
            at_10 = {k: v.clone() for k, v in model.state_dict().items()}  # steps 11, 12 move on from it
    assert ck.stats["snapshots"] == 2 and ck.stats["saves"] == 0
    assert not os.path.isdir(root) or store.list_checkpoints(root) == []  # nothing committed to disk
    pending, notes = memtier.newest_sealed(fd)
    assert pending is not None and pending.step == 10, notes
    ck._shutdown()  # the process "dies": nothing more is saved
    path, _, why = memtier.persist_pending(fd, root)  # what the supervisor does before the restart
    assert path is not None and store.verify(path).valid, why
    fresh, fresh_opt = small_model(seed=1)
    ck2 = ckptd.Checkpointer(model=fresh, optimizer=fresh_opt, dir=root, handle_signals=False)
    assert ck2.restore() == 10
    assert ck2._restored_from_memory == store.checkpoint_name(10)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, at_10[name]), name
    ck2.close()
    os.close(fd)


@pytest.mark.kind("unit")
def test_a_snapshot_never_overwrites_the_slot_a_disk_save_in_flight_still_writes_from(tmp_path, monkeypatch):
    # Disk save of step 50 into slot A, held back on the writer thread; snapshot 55 goes into slot B; snapshot
    # 60 would take slot A, the disk save's bytes: it waits for that save instead, so checkpoint 50 holds step
    # 50's weights, not step 60's.
    torch = pytest.importorskip("torch")
    import ckptd
    from conftest import small_model, train_steps

    fd, root, model, opt, ck = _snapshotting(tmp_path, monkeypatch, pace=0)
    for step in range(1, 50):
        train_steps(model, opt, 1)
        ck.step(step)
    ck.wait()
    gate = threading.Event()
    ck._writer().submit(gate.wait)  # the disk save of step 50 queues behind this: in flight until the gate opens
    train_steps(model, opt, 1)
    at_50 = {k: v.clone() for k, v in model.state_dict().items()}
    ck.step(50)
    for step in range(51, 60):
        train_steps(model, opt, 1)
        ck.step(step)  # snapshot 55 into the other slot: no wait (else this blocks until the deadline below)
    assert ck.stats["snapshot_waits"] == 0 and ck.stats["snapshots"] >= 10
    train_steps(model, opt, 1)
    stepped = threading.Thread(target=ck.step, args=(60,))
    stepped.start()
    wait_for(lambda: ck.stats["snapshot_waits"] == 1 or not stepped.is_alive(), 60, "snapshot 60 waiting or done")
    gate.set()
    stepped.join(60)
    assert not stepped.is_alive()
    assert ck.stats["snapshot_waits"] == 1
    assert memtier.newest_sealed(fd)[0].step == 60
    fresh, fresh_opt = small_model(seed=1)
    ck._shutdown()
    monkeypatch.delenv(env.MEMORY_FD)
    ck2 = ckptd.Checkpointer(model=fresh, optimizer=fresh_opt, dir=root, handle_signals=False)
    assert ck2.restore(os.path.join(root, store.checkpoint_name(50))) == 50
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, at_50[name]), name
    ck2.close()
    os.close(fd)


@pytest.mark.kind("system")
def test_sigkills_at_random_steps_lose_at_most_one_snapshot_interval_and_the_run_ends_bit_identical(tmp_path,
                                                                                                   references):
    # `ckptd run --memory --every-steps 50 --snapshot-every-steps 5`; each of three lives SIGKILLed from outside
    # once it has done the work of a random step (wherever it then is: computing, copying a snapshot,
    # persisting). Lost work = the last step that life finished - the step the next life starts from.
    steps, seed = 150, int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(12, 110), 3))
    # each beyond the work the kill before it can lose
    while any(b - a < 12 for a, b in zip(targets, targets[1:], strict=False)):
        targets = sorted(rng.sample(range(12, 110), 3))
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--memory", "--every-steps", str(DISK), "--snapshot-every-steps", str(SNAP),
                               MEM_TRAINER, "--steps", str(steps), "--step-delay", "0.02", "--print-steps"])
    kills = kill_at_steps(run.stdout, targets, lambda: run.proc.poll() is not None)
    assert run.wait(180) == 0, run.stderr()
    said = f"seed {seed}, targets {targets}"
    assert kills, f"no life was killed ({said}); stdout:\n{run.stdout()}"
    lost = [killed.last - after.start for killed, after in kills]
    assert all(0 <= n <= SNAP for n in lost), (lost, said)
    restarts = run.events("restart")
    assert [r["resume_step"] for r in restarts] == [after.start for _, after in kills], (restarts, said)
    persisted = {e["step"] for e in run.events("memory_persisted")}
    assert {after.start for _, after in kills if after.start % DISK} <= persisted, said  # memory-only snapshots
    for info in store.list_checkpoints(root):
        assert store.verify(info.path).valid, info
    assert toy_digest(run.stdout(), steps) == references(steps), said


@pytest.mark.kind("system")
def test_a_kill_while_a_snapshot_is_copied_resumes_from_the_previous_slot(tmp_path, references):
    # Killed (SIGKILL) while the memory-only snapshot of step 35 is copied into its slot (seqlock open): the
    # other slot still holds step 30's, which the supervisor writes and the restart resumes from (read from
    # memory); 5 steps lost, and the run ends bit-identical.
    steps = 60
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--memory", "--every-steps", str(DISK), "--snapshot-every-steps", str(SNAP),
                               MEM_TRAINER, "--steps", str(steps), "--kill-at", "35", "--kill-point", "sealing",
                               "--print-steps"])
    assert run.wait(120) == 0, run.stderr()
    assert "fault kill at sealing of step 35" in run.stdout()
    first, second = lives(run.stdout())[:2]
    assert first.last == 35 and second.start == 30
    assert [r["resume_step"] for r in run.events("restart")] == [30]
    assert [e["step"] for e in run.events("memory_persisted")] == [30]
    assert re.search(r"resumed from step 30: \S+ \(from the memory tier\)", run.stderr())
    for info in store.list_checkpoints(root):
        assert store.verify(info.path).valid, info
    assert toy_digest(run.stdout(), steps) == references(steps)
    # the slots as the run left them: step 60's snapshot, then close()'s final save of step 60 in the other slot
    status = ckptd_cli("status", "--dir", root)
    line = next(x for x in status.stdout.splitlines() if x.startswith("memory:"))
    assert line.count("sealed step 60") == 2 and "1 snapshot(s) written" in line, line
