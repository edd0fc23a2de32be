"""Retention: keep-last, best-K, every-M, pins, emergency; never the newest valid; order by step."""

from __future__ import annotations

import os

import pytest

from ckptd import retention, store
from ckptd.errors import CkptdError
from ckptd.store import CheckpointInfo

pytestmark = pytest.mark.kind("unit")


def info(step, kind="periodic", valid=True, created=None, **metrics):
    return CheckpointInfo(name=f"step-{step:012d}", path="", step=step, kind=kind, valid=valid,
                          created=float(step if created is None else created), metrics=metrics)


def kept(infos, policy, pinned=()):
    keep, doomed = retention.plan(infos, policy, pinned)
    assert set(keep).isdisjoint(i.name for i in doomed)
    return sorted(int(n.split("-")[1]) for n in keep)


def test_keep_last_orders_by_step_across_digit_counts():
    infos = [info(s) for s in (1000, 9, 99, 100, 10)]  # listing order is irrelevant
    assert kept(infos, retention.Policy(keep_last=2)) == [100, 1000]


def test_order_is_by_step_even_when_created_times_disagree():
    infos = [info(5, created=100), info(50, created=1)]
    assert kept(infos, retention.Policy(keep_last=1)) == [50]


def test_newest_valid_is_kept_even_when_it_is_not_best():
    infos = [info(1, loss=0.1), info(2, loss=0.2), info(3, loss=0.9)]
    assert kept(infos, retention.Policy(keep_best=(retention.Best("loss", 1, "min"),))) == [1, 3]


def test_keep_best_min_and_max():
    infos = [info(s, acc=a) for s, a in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.1))]
    assert kept(infos, retention.Policy(keep_best=(retention.Best.parse("acc:2:max"),))) == [2, 3, 4]
    assert kept(infos, retention.Policy(keep_best=(retention.Best.parse("acc:1"),))) == [4]


def test_keep_every_and_pins():
    infos = [info(s) for s in range(1, 11)]
    assert kept(infos, retention.Policy(keep_last=1, keep_every=4)) == [4, 8, 10]
    assert kept(infos, retention.Policy(keep_last=1), pinned={"step-000000000003"}) == [3, 10]


def test_emergency_kept_until_superseded():
    infos = [info(1), info(2, kind="emergency"), info(3, valid=False)]
    assert kept(infos, retention.Policy(keep_last=1)) == [2]
    infos.append(info(4))
    assert kept(infos, retention.Policy(keep_last=1)) == [4]


def test_invalid_checkpoints_are_never_deleted_and_do_not_count():
    infos = [info(1), info(2), info(3, valid=False)]
    keep, doomed = retention.plan(infos, retention.Policy(keep_last=1))
    assert [i.step for i in doomed] == [1]
    assert "step-000000000002" in keep


def test_no_policy_deletes_nothing():
    assert retention.plan([info(1), info(2)], retention.Policy())[1] == []


@pytest.mark.parametrize("bad", ["loss", "loss:0", "loss:x", ":3", "loss:2:median"])
def test_bad_keep_best_is_a_clear_error(bad):
    with pytest.raises(CkptdError, match="METRIC:K"):
        retention.Best.parse(bad)


def test_an_upload_hold_keeps_every_checkpoint_newer_than_the_remote_tiers_newest_and_says_which():
    infos = [info(s) for s in (1, 2, 3, 4, 5, 6)]
    policy = retention.Policy(keep_last=2)
    keep, doomed = retention.plan(infos, policy, hold=retention.UploadHold(None))  # nothing is remote yet
    assert not doomed and retention.held(keep) == [f"step-{s:012d}" for s in (1, 2, 3, 4)]
    keep, doomed = retention.plan(infos, policy, hold=retention.UploadHold((3, 3.0)))
    # 1-3 are covered by the remote step 3 (an older one is never uploaded: the uploader takes the newest)
    assert [i.step for i in doomed] == [1, 2, 3] and retention.held(keep) == ["step-000000000004"]
    keep, doomed = retention.plan(infos, policy, hold=retention.UploadHold((4, 3.5)))  # step 4, created later
    assert [i.step for i in doomed] == [1, 2, 3] and retention.held(keep) == ["step-000000000004"]
    keep, doomed = retention.plan(infos, policy, hold=retention.UploadHold((9, 9.0)))
    assert [i.step for i in doomed] == [1, 2, 3, 4] and retention.held(keep) == []


def test_the_remote_record_is_read_for_its_own_tier_only_and_anything_odd_in_it_holds_everything(tmp_path):
    root = str(tmp_path)
    assert store.remote_mark(root, "s3://b/p") is None
    store.mark_remote(root, "s3://b/p", "step-000000000007.ab", 7, 7.5)
    assert store.remote_mark(root, "s3://b/p") == (7, 7.5)
    assert store.remote_mark(root, "s3://b/other") is None
    path = os.path.join(root, store.REMOTE_MARK)
    for bad in ('{"url": "s3://b/p", "step": "7", "created": 1}', "[]", "x" * 5000, '{"url": "s3://b/p"}'):
        with open(path, "w") as f:
            f.write(bad)
        assert store.remote_mark(root, "s3://b/p") is None, bad
    os.unlink(path)
    os.symlink(os.path.join(root, "elsewhere.json"), path)
    with open(os.path.join(root, "elsewhere.json"), "w") as f:
        f.write('{"url": "s3://b/p", "key": "k", "step": 99, "created": 99.0}')
    assert store.remote_mark(root, "s3://b/p") is None  # a link is never followed
    store.mark_remote(root, "s3://b/p", "k2", 8, 8.0)  # replaces the link itself, not its target
    assert not os.path.islink(path) and store.remote_mark(root, "s3://b/p") == (8, 8.0)
    store.clear_remote_mark(root)
    assert store.remote_mark(root, "s3://b/p") is None


def test_library_retention_under_an_uploader_keeps_what_the_remote_tier_lacks_until_it_is_recorded(
        tmp_path, monkeypatch):
    import ckptd
    from conftest import small_model

    url = "s3://bucket/run"
    monkeypatch.setenv("CKPTD_REMOTE", url)  # what `ckptd run --remote` hands its child
    monkeypatch.setenv("CKPTD_UPLOAD_HOLD", "1")
    root = str(tmp_path / "ck")
    model, opt = small_model()

    def steps(*numbers: int, keep_last: int = 2) -> list[int]:
        """Save these steps; close() waits for the retention that runs after each commit on the writer thread."""
        ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=1, keep_last=keep_last,
                                handle_signals=False, async_save=False, save_on_close=False)
        for s in numbers:
            ck.step(s)
        ck.close()
        return [i.step for i in store.list_checkpoints(root)]

    assert steps(1, 2, 3, 4) == [1, 2, 3, 4]  # nothing is on the remote tier yet
    three = store.read_manifest(os.path.join(root, store.checkpoint_name(3)))
    store.mark_remote(root, url, "step-000000000003.x", 3, three["created"])  # what the uploader records
    assert steps(5) == [4, 5]  # 4: kept by keep_last 2 and not yet remote; 1-3: covered
    assert steps(6, 7) == [4, 5, 6, 7]
    monkeypatch.setenv("CKPTD_UPLOAD_HOLD", "")  # --prune-before-upload: retention as without a remote tier
    assert steps(8, keep_last=1) == [8]


def test_apply_on_real_checkpoints_respects_pins_files(make_checkpoints):
    root = make_checkpoints([8, 9, 10, 11, 100, 101])
    store.pin(root, "step-000000000009")
    deleted = retention.apply(root, retention.Policy(keep_last=2))
    assert sorted(deleted) == ["step-000000000008", "step-000000000010", "step-000000000011"]
    assert [i.step for i in store.list_checkpoints(root)] == [9, 100, 101]
    assert not [n for n in os.listdir(root) if n.startswith(store.TRASH_PREFIX)]


def test_library_applies_retention_after_each_commit_and_pins_resumed_from(tmp_path):
    import ckptd
    from conftest import small_model

    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=1, keep_last=2, handle_signals=False,
                            async_save=False)
    for s in range(1, 6):
        ck.step(s)
    ck.close()
    assert [i.step for i in store.list_checkpoints(root)] == [4, 5]
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, every_steps=1, keep_last=2, handle_signals=False,
                            async_save=False)
    start = ck.restore()
    for s in range(start + 1, start + 5):
        ck.step(s)
    ck.close()
    assert [i.step for i in store.list_checkpoints(root)] == [5, 8, 9]  # 5: the run resumed from it
