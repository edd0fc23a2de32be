"""The library's side of a deadline (checkpointer.py `_emergency_stop`, stopping.py `SaveTimes`): never start an
emergency checkpoint that cannot finish before the stop's deadline; a save in flight hurries and counts."""

from __future__ import annotations

import logging
import os
import time

import pytest

from ckptd import exitcodes, store

torch = pytest.importorskip("torch")
import ckptd  # noqa: E402
from ckptd import stopping  # noqa: E402

pytestmark = pytest.mark.kind("unit")


def make(tmp_path, width: int = 16, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    return ckptd.Checkpointer(model=model, dir=str(tmp_path / "ck"), handle_signals=False, **kw), model


def test_the_estimate_is_the_longest_of_the_last_three_saves_times_1_5_plus_1_s(tmp_path):
    ck, _ = make(tmp_path)
    assert ck.emergency_save_estimate() is None  # no save of this process yet
    for n in range(1, 6):
        ck.step(n)
        ck.save(block=True)
    recent = ck._save_times.recent
    assert len(recent) == stopping.EMERGENCY_HISTORY == 3 and all(0 < r < 5 for r in recent)
    assert ck.emergency_save_estimate() == pytest.approx(max(recent) * 1.5 + 1.0)
    ck.close()


def test_a_save_that_does_not_fit_before_the_deadline_is_not_started_and_exits_86(tmp_path, caplog):
    ck, _ = make(tmp_path)
    ck.step(10)
    ck.save(block=True)
    ck._save_times.recent = [2.0]  # the run's saves took 2 s: 2 x 1.5 + 1 = 4 s needed
    ck.step(11)
    with caplog.at_level(logging.ERROR, logger="ckptd"), pytest.raises(SystemExit) as exit_:
        ck._emergency_stop("aws instance-action notice", deadline=time.time() + 3.0)
    assert exit_.value.code == exitcodes.STOPPED_NO_CHECKPOINT
    assert [i.step for i in store.list_checkpoints(ck.dir)] == [10]  # the last committed one stays
    assert not [n for n in os.listdir(ck.dir) if n.startswith(".tmp-")]
    assert "not starting the emergency checkpoint of step 11" in caplog.text
    assert "a save needs about 4.0 s" in caplog.text and "(step 10) is kept" in caplog.text


def test_a_save_that_fits_is_written_and_exits_85(tmp_path):
    ck, _ = make(tmp_path)
    ck.step(10)
    ck.save(block=True)
    ck._save_times.recent = [2.0]
    ck.step(11)
    with pytest.raises(SystemExit) as exit_:
        ck._emergency_stop("gcp preempted notice", deadline=time.time() + 4.5)
    assert exit_.value.code == exitcodes.PREEMPTED
    latest = store.list_checkpoints(ck.dir)[-1]
    assert (latest.step, latest.kind, latest.valid) == (11, "emergency", True)


def test_without_a_save_to_estimate_from_one_second_must_be_left(tmp_path):
    ck, _ = make(tmp_path)
    ck.step(3)
    with pytest.raises(SystemExit) as exit_:
        ck._emergency_stop("notice", deadline=time.time() + 0.5)
    assert exit_.value.code == exitcodes.STOPPED_NO_CHECKPOINT and not os.path.exists(ck.dir)


def test_a_periodic_save_in_flight_hurries_and_counts_as_the_emergency_checkpoint(tmp_path):
    """A paced persist of 64 MiB would take seconds; the stop makes it go full speed, and since it is
    of the same step, it is the emergency checkpoint: one write, not two, and its time enters the estimate."""
    ck, _ = make(tmp_path, width=4096, pace=100.0)  # 4096 x 4096 float32 = 64 MiB
    ck.step(1)
    ck.save(block=True)  # unpaced: the reference duration
    unpaced = ck._save_times.recent[0]
    ck.step(2)
    inflight = ck.save(kind="periodic")
    assert not inflight.done()
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        ck._emergency_stop("aws instance-action notice", deadline=time.time() + 120)
    elapsed = time.monotonic() - t0
    assert exit_.value.code == exitcodes.PREEMPTED
    assert inflight.done() and inflight.error is None
    infos = store.list_checkpoints(ck.dir)
    assert [(i.step, i.kind) for i in infos] == [(1, "manual"), (2, "periodic")]  # no second write of step 2
    # Paced at 100, the persist would take ~100 x its unpaced time; it took a small multiple of it.
    assert elapsed < 10 * unpaced + 1.0, (elapsed, unpaced)
    assert len(ck._save_times.recent) == 2  # the hurried save counts for the next estimate
