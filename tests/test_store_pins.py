"""Pins are created without following a link: ckptd may pin as root in a directory other accounts can write."""

from __future__ import annotations

import os

import pytest

from ckptd import store

pytestmark = pytest.mark.kind("unit")


def test_pin_refuses_a_planted_link_and_leaves_its_target_alone(tmp_path):
    root = tmp_path / "ck"
    (root / store.PINS_DIR).mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    name = store.checkpoint_name(5)
    os.symlink(victim, root / store.PINS_DIR / name)
    with pytest.raises(OSError):
        store.pin(str(root), name)
    assert victim.read_text() == "keep me"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(elsewhere, other / store.PINS_DIR)  # .pins itself a link
    with pytest.raises(OSError):
        store.pin(str(other), name)
    assert os.listdir(elsewhere) == []
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    store.pin(str(fresh), name)  # no .pins yet: created, then the pin in it
    assert store.pinned(str(fresh)) == {name}
