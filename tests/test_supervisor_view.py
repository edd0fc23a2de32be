"""The supervisor's view of the checkpoint directory (supervisor/watch.py CheckpointView), on real checkpoints."""

from __future__ import annotations

import os
import shutil

import pytest

from ckptd import store
from ckptd.supervisor.watch import CheckpointView

pytestmark = pytest.mark.kind("unit")


def test_a_checkpoint_deleted_while_it_is_listed_is_removed_not_invalid(make_checkpoints, monkeypatch):
    # Retention (the trainer's or a person's) deletes a checkpoint between the listing of names and the read of
    # its manifest: it reads as "unreadable: No such file or directory". That is a removal, never an invalid
    # checkpoint (a false warning in the user's log and a false checkpoint_invalid in the journal).
    root = make_checkpoints([10, 20, 30])
    view = CheckpointView(root)
    assert sorted(i.step for i in view.refresh().added) == [10, 20, 30]

    real = store.list_checkpoints
    doomed = os.path.join(root, "step-000000000010")

    def listing_then_deletion(path, *a, **kw):
        names = [e for e in os.listdir(path) if store.NAME_RE.match(e)]
        shutil.rmtree(doomed)  # the deletion lands inside the listing: the name was seen, the files are gone
        infos = real(path, *a, **kw)
        missing = [n for n in names if n not in {i.name for i in infos}]
        return infos + [store.inspect_checkpoint(os.path.join(path, n)) for n in missing]

    monkeypatch.setattr(store, "list_checkpoints", listing_then_deletion)
    changes = view.refresh()
    assert changes.removed == ["step-000000000010"]
    assert changes.invalid == [], [(i.name, i.reason) for i in changes.invalid]
    assert sorted(view.valid) == ["step-000000000020", "step-000000000030"]


def test_a_damaged_checkpoint_that_is_still_there_is_reported_invalid(make_checkpoints):
    root = make_checkpoints([10, 20])
    view = CheckpointView(root)
    view.refresh()
    os.unlink(os.path.join(root, "step-000000000020", "manifest.json"))
    changes = view.refresh()
    assert changes.removed == ["step-000000000020"]
    assert [i.name for i in changes.invalid] == ["step-000000000020"]
