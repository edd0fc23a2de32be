"""Writes under directories other accounts can write: planted symlinks, FIFOs, squatted names, swapped directories.

ckptd often runs as root over a checkpoint root, a Prometheus file_sd directory or a /tmp that another account
can write (docs/reliability.md, "Threat model"). Each attack here is made by a real other account (uid 65534,
`nobody`, through `setpriv`) where the attack needs one, with real symlinks and FIFOs, against the real code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from ckptd import exitcodes, store
from ckptd.errors import ConfigError, StorageError
from ckptd.supervisor import metrics as metricsmod
from ckptd.supervisor import rundir
from ckptd.supervisor.journal import Journal, write_json_atomic
from conftest import ckptd_cli

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (util-linux) to act as another account")


def as_nobody(*cmd: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd], check=True)


@pytest.fixture
def shared(tmp_path):
    """A directory tree another account can reach (pytest's tmp_path is 0700): a base root owns, 0755."""
    base = tempfile.mkdtemp(prefix="ckptd-hostile-")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def victim_file(base: str) -> str:
    path = os.path.join(base, "victim")
    with open(path, "w") as f:
        f.write("root's secret\n")
    os.chmod(path, 0o600)
    return path


def nobody_dir(base: str, name: str, mode: int = 0o755) -> str:
    path = os.path.join(base, name)
    os.mkdir(path)
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, mode)
    return path


# ---------------------------------------------------------------------------- file_sd


@needs_root
def test_file_sd_in_a_directory_another_account_owns_is_refused_and_follows_no_planted_link(shared):
    victim = victim_file(shared)
    sd_dir = nobody_dir(shared, "file_sd")  # owned by the Prometheus account
    target = os.path.join(sd_dir, "ckptd.json")
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # what that account plants for the next pids
        as_nobody("ln", "-s", victim, f"{target}.tmp.{pid}")
    with pytest.raises(PermissionError) as e:
        metricsmod.write_sd_file(target, "127.0.0.1:9477", {})
    assert "writable by another account" in str(e.value) and "chmod go-w" in str(e.value), str(e.value)
    assert open(victim, "rb").read() == b"root's secret\n"
    assert not os.path.exists(target)


@needs_root
def test_file_sd_in_a_sticky_shared_directory_uses_an_unpredictable_temp_and_never_follows_a_link(shared):
    victim = victim_file(shared)
    sd_dir = os.path.join(shared, "sd")
    os.mkdir(sd_dir)
    os.chmod(sd_dir, 0o1777)  # like /tmp: everyone writes, nobody removes another's files
    target = os.path.join(sd_dir, "ckptd.json")
    for pid in range(os.getpid() - 5, os.getpid() + 5):
        as_nobody("ln", "-s", victim, f"{target}.tmp.{pid}")
    metricsmod.write_sd_file(target, "127.0.0.1:9477", {"job": "x"})
    assert open(victim, "rb").read() == b"root's secret\n"
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644
    assert '"127.0.0.1:9477"' in open(target).read()
    # the planted links are still there, untouched; no temporary of ours is left
    assert sorted(os.listdir(sd_dir)) == sorted(["ckptd.json"] + [f"ckptd.json.tmp.{p}" for p in
                                                                   range(os.getpid() - 5, os.getpid() + 5)])


# ---------------------------------------------------------------------------- pins


@needs_root
def test_pin_refuses_a_planted_symlink_and_never_truncates_its_target(make_checkpoints, shared):
    root = nobody_dir(shared, "ck")
    make_checkpoints([1], root=root)
    name = store.checkpoint_name(1)
    victim = victim_file(shared)
    as_nobody("mkdir", os.path.join(root, store.PINS_DIR))
    as_nobody("ln", "-s", victim, os.path.join(root, store.PINS_DIR, name))
    r = ckptd_cli("pin", os.path.join(root, name))
    assert r.returncode != 0 and "is a symlink, not a pin; remove it and pin again" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert open(victim, "rb").read() == b"root's secret\n"  # was: truncated to 0 bytes
    assert os.path.islink(os.path.join(root, store.PINS_DIR, name))  # left as it was


@needs_root
def test_a_pins_directory_that_is_a_link_is_refused_and_nothing_is_written_through_it(make_checkpoints, shared):
    root = nobody_dir(shared, "ck")
    make_checkpoints([1], root=root)
    name = store.checkpoint_name(1)
    elsewhere = os.path.join(shared, "root-only")
    os.mkdir(elsewhere, 0o700)
    as_nobody("ln", "-s", elsewhere, os.path.join(root, store.PINS_DIR))
    r = ckptd_cli("pin", os.path.join(root, name))
    assert r.returncode != 0 and "not a plain directory" in r.stderr, r.stderr
    assert os.listdir(elsewhere) == []  # was: a pin created in root's directory


# ---------------------------------------------------------------------------- the run directory


def test_a_fifo_as_a_nodes_lock_does_not_hang_status(tmp_path):
    root = tmp_path / "ck"
    node = os.path.join(rundir.ensure_run_dir(str(root), 7))
    os.mkfifo(os.path.join(node, "lock"))
    r = ckptd_cli("status", "--dir", str(root), "--node-rank", "7", timeout=60)  # was: blocked in open()
    assert r.returncode == 0 and "state:      not running" in r.stdout, r.stdout + r.stderr
    with pytest.raises(ConfigError, match="not a regular file"):  # and a run there says what is wrong
        rundir.RunLock(node).try_acquire()


@needs_root
def test_a_socket_directory_squatted_by_another_account_is_refused_with_the_fix(tmp_path, shared, monkeypatch):
    run_dir = os.path.join(tmp_path, "r" * 60, "ck" * 40, ".ckptd")  # too long for a socket in place
    os.makedirs(run_dir, mode=0o700)
    runtime = os.path.join(shared, "runtime")
    os.mkdir(runtime)
    os.chmod(runtime, 0o1777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    digest = hashlib.sha256(os.fsencode(os.path.realpath(run_dir))).hexdigest()[:16]
    squatted = os.path.join(runtime, f"ckptd-{os.getuid()}-{digest}")
    as_nobody("mkdir", "-m", "0777", squatted)
    with pytest.raises(ConfigError) as e:
        rundir.choose_socket_path(run_dir)
    msg = str(e.value)
    assert e.value.exit_code == exitcodes.CONFIG
    assert f"belongs to uid {NOBODY} (nobody)" in msg and "XDG_RUNTIME_DIR" in msg and f"rm -r {squatted}" in msg
    assert os.listdir(squatted) == []


@needs_root
def test_a_run_directory_swapped_for_a_link_after_the_start_is_never_written_through(shared):
    root = nobody_dir(shared, "ck")  # the checkpoint root belongs to the job's account; ckptd runs as root
    run_dir = rundir.ensure_run_dir(root)
    journal = Journal(os.path.join(run_dir, "journal.jsonl"), lambda: 0.0)
    journal.close()
    target = os.path.join(shared, "etc")  # a root-owned directory the other account wants written
    os.mkdir(target, 0o755)
    # the other account moves the run directory away and puts a link in its place
    as_nobody("mv", run_dir, os.path.join(root, "old"))
    as_nobody("ln", "-s", target, run_dir)
    with pytest.raises(OSError, match="is a symlink"):
        write_json_atomic(os.path.join(run_dir, "state.json"), {"x": 1})
    with pytest.raises(OSError):
        Journal(os.path.join(run_dir, "journal.jsonl"), lambda: 0.0)
    with pytest.raises(OSError):
        store.unlink_at(os.path.join(run_dir, "control.sock"), check=store.private_dir)
    # or for a directory of its own (a real directory, not a link)
    os.unlink(run_dir)
    as_nobody("mkdir", "-m", "0777", run_dir)
    with pytest.raises(PermissionError, match="not a private directory"):
        write_json_atomic(os.path.join(run_dir, "state.json"), {"x": 1})
    assert os.listdir(target) == [] and os.listdir(run_dir) == []


def test_helpers_write_durably_and_leave_no_temporary_on_error(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    store.replace_file(str(d / "a.json"), b"one", 0o640)
    store.replace_file(str(d / "a.json"), b"two", 0o640)
    assert (d / "a.json").read_bytes() == b"two" and stat.S_IMODE(os.stat(d / "a.json").st_mode) == 0o640
    os.symlink(tmp_path / "elsewhere", d / "link")
    with pytest.raises(OSError, match="symlink"):
        store.replace_file(str(d / "link" / "b"), b"x")
    assert sorted(os.listdir(d)) == ["a.json", "link"] and not os.path.exists(tmp_path / "elsewhere")


@needs_root
def test_export_into_a_shared_directory_never_writes_through_a_planted_link(make_checkpoints, shared):
    from ckptd import cli

    root = make_checkpoints([1])
    victim = victim_file(shared)
    out_dir = os.path.join(shared, "exports")
    os.mkdir(out_dir)
    os.chmod(out_dir, 0o1777)
    out = os.path.join(out_dir, "model.safetensors")
    as_nobody("ln", "-s", victim, f"{out}.tmp-{os.getpid()}")  # the temporary name export used to use
    assert cli.main(["export", os.path.join(root, store.checkpoint_name(1)), "-o", out]) == 0
    assert open(victim, "rb").read() == b"root's secret\n"  # was: the model's weights
    st = os.lstat(out)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and open(out, "rb").read(8)
    assert sorted(os.listdir(out_dir)) == ["model.safetensors", f"model.safetensors.tmp-{os.getpid()}"]


@needs_root
def test_a_running_supervisor_writes_nothing_through_a_run_directory_swapped_after_its_start(tmp_path, shared):
    import signal

    from fixtures.sup_helpers import FAST, PLAIN, Run

    root = nobody_dir(shared, "ck")  # the job's account owns the root; ckptd runs as root
    target = os.path.join(shared, "etc")
    os.mkdir(target, 0o755)
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", "--notices", "off", PLAIN])
    run.wait_event("spawn")
    run_dir = os.path.join(root, ".ckptd")
    as_nobody("mv", run_dir, os.path.join(root, "moved"))
    as_nobody("ln", "-s", target, run_dir)
    run.signal(signal.SIGTERM)  # the stop rewrites state.json (and removes the socket) at the end
    run.wait(30)
    err = run.stderr()
    assert "cannot write state.json" in err and "is a symlink" in err, err  # said, and supervision went on
    assert os.listdir(target) == []  # was: state.json (root's file, in a directory of the other account's choice)
    assert "Traceback" not in err, err


@needs_root
def test_moving_checkpoints_aside_never_goes_through_a_planted_previous_link(make_checkpoints, shared):
    root = nobody_dir(shared, "ck")
    make_checkpoints([1], root=root)
    elsewhere = os.path.join(shared, "root-only")
    os.mkdir(elsewhere, 0o700)
    as_nobody("ln", "-s", elsewhere, os.path.join(root, store.PREVIOUS_DIR))
    with pytest.raises(StorageError, match="not a plain directory"):
        store.move_aside(root, "run")
    assert os.listdir(elsewhere) == []  # nothing moved into the other account's choice of directory
    assert os.path.isdir(os.path.join(root, store.checkpoint_name(1)))
