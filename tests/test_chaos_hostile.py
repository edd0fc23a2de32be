"""Hostile input beyond tests/test_hostile_input.py: a pickle payload placed as any
checkpoint file, hostile names, for restore(), load_state() and every command; no code runs, nothing
outside the root is touched, one clear line."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

import ckptd
from ckptd import store
from conftest import ckptd_cli, small_model


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fname", [store.TENSORS, store.STATE, store.MANIFEST])
def test_a_pickle_payload_as_any_checkpoint_file_runs_no_code_anywhere(make_checkpoints, tmp_path, fname):
    root = make_checkpoints([1, 2])
    marker = tmp_path / "PWNED"
    ck2 = os.path.join(root, store.checkpoint_name(2))
    with open(os.path.join(ck2, fname), "wb") as f:
        f.write(pickle.dumps(Payload(str(marker))))
    model, opt = small_model()
    assert ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False).restore() == 1
    bad = [os.path.join(root, ".quarantine", n) for n in os.listdir(os.path.join(root, ".quarantine"))][0]
    with pytest.raises(ckptd.CorruptCheckpointError):
        ckptd.load_state(bad)
    for args in (["verify", bad], ["inspect", bad], ["export", bad, str(tmp_path / "out.safetensors")],
                 ["ls", root], ["prune", "--keep-last", "1", root], ["verify", root]):
        r = ckptd_cli(*args)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 1, (args, r.stderr)
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.parametrize("name", ["../../etc", "/etc/passwd", "step-0000000001\0x", "a" * 4096,
                                  "step-000000000001/../../x"])
def test_hostile_names_are_refused_by_restore_load_state_and_the_commands(make_checkpoints, tmp_path, name):
    root = make_checkpoints([1])
    before = sorted(os.listdir(tmp_path))
    model, _ = small_model()
    for call in (lambda: ckptd.Checkpointer(model=model, dir=root,
                                            handle_signals=False).restore(os.path.join(root, name)),
                 lambda: ckptd.load_state(os.path.join(root, name))):
        with pytest.raises((ckptd.CkptdError, ValueError, OSError)):
            call()
    for args in (["verify", name], ["inspect", name], ["pin", name], ["export", name, "x.st"]):
        try:
            r = subprocess.run([sys.executable, "-m", "ckptd", *args, "--dir", root] if args[0] != "export"
                               else [sys.executable, "-m", "ckptd", *args], capture_output=True, text=True,
                               timeout=60, cwd=str(tmp_path))
        except ValueError:  # NUL cannot even be passed on a command line
            continue
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.stderr)
    assert sorted(os.listdir(tmp_path)) == before
