"""Command-line errors and checkpoint names, through the real entry point.

Every error is one line on stderr that names the problem and the fix, with a documented exit code:
usage errors 2, not found 4, invalid checkpoint 3, storage 5. Storage errors are real: a tmpfs remounted
read-only and a tmpfs with every block and inode used, both in a private mount namespace (root only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from ckptd import exitcodes, store
from conftest import ROOT, ckptd_cli, resign, small_model, train_steps, wait_for

S = store.checkpoint_name  # S(300) == "step-000000000300"


def cli(*args: str, env: dict[str, str] | None = None, cwd: str = ROOT,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `ckptd` entry point; ``env`` is added to this process's environment."""
    full = {k: v for k, v in os.environ.items() if k != "CKPTD_DIR"}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True,
                          timeout=timeout, env=full, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def flip_byte(path: str, offset: int = -1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------ naming a checkpoint


@pytest.mark.parametrize("cmd", [["inspect"], ["export", "-o", "OUT"], ["pin"]])
def test_a_root_where_a_checkpoint_is_expected_says_it_is_a_root(make_checkpoints, tmp_path, cmd):
    root = make_checkpoints([100, 300])
    argv = [str(tmp_path / "m.safetensors") if a == "OUT" else a for a in cmd]
    r = cli(argv[0], root, *argv[1:])
    one_line_error(r, exitcodes.USAGE, f"{root} is a checkpoint directory, not a checkpoint",
                   f"{root}/{S(300)}", f"{root}/latest", "step number")
    assert "manifest.json is missing" not in r.stderr


def test_latest_and_step_numbers_name_checkpoints_everywhere(make_checkpoints, tmp_path):
    root = make_checkpoints([100, 200, 300])
    flip_byte(os.path.join(root, S(300), store.TENSORS))  # the newest does not verify: latest is 200

    def step_of(*args, env=None):
        r = cli("inspect", *args, "--json", env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["manifest"]["step"]

    assert step_of(f"{root}/latest") == 200
    assert step_of(f"{root}/100") == 100
    assert step_of("100", "--dir", root) == 100
    assert step_of("latest", env={"CKPTD_DIR": root}) == 200
    assert step_of(S(100), "--dir", root) == 100
    r = cli("export", f"{root}/latest", "-o", str(tmp_path / "m.safetensors"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"] == os.path.join(root, S(200))
    r = cli("verify", f"{root}/200")
    assert r.returncode == 0 and f"{S(200)}: ok" in r.stdout, r.stderr
    r = cli("verify", "300", "--dir", root)
    assert r.returncode == exitcodes.INVALID and "checksum mismatch" in r.stdout
    r = cli("pin", f"{root}/latest")
    assert r.returncode == 0 and os.path.exists(os.path.join(root, ".pins", S(200))), r.stderr
    assert cli("pin", "--remove", "200", "--dir", root).returncode == 0
    assert not os.path.exists(os.path.join(root, ".pins", S(200)))
    one_line_error(cli("inspect", f"{root}/250"), exitcodes.NOT_FOUND, "no checkpoint at step 250", "100, 200, 300")
    one_line_error(cli("inspect", "250", "--dir", root), exitcodes.NOT_FOUND, "no checkpoint at step 250")


def test_latest_with_no_valid_checkpoint_is_not_found(make_checkpoints):
    root = make_checkpoints([1])
    flip_byte(os.path.join(root, S(1), store.TENSORS))
    one_line_error(cli("inspect", f"{root}/latest"), exitcodes.NOT_FOUND, "no valid checkpoint", "ckptd verify")


def test_ls_shows_each_checkpoints_name(make_checkpoints):
    root = make_checkpoints([7, 8])
    r = cli("ls", root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STEP", "KIND"]
    assert [line.split()[:2] for line in lines[1:]] == [[S(7), "7"], [S(8), "8"]]
    assert [row["name"] for row in json.loads(cli("ls", root, "--json").stdout)] == [S(7), S(8)]


def test_ls_verify_prune_default_to_ckptd_dir_then_checkpoints(make_checkpoints, tmp_path):
    root = make_checkpoints([1, 2, 3], root=tmp_path / "work" / "checkpoints")
    env = {"CKPTD_DIR": root}
    assert S(3) in cli("ls", env=env).stdout
    r = cli("verify", env=env)
    assert r.returncode == 0 and r.stdout.count(": ok") == 3, r.stderr
    r = cli("prune", "--keep-last", "2", env=env)
    assert r.returncode == 0 and f"deleted {S(1)}" in r.stdout, r.stderr
    # without $CKPTD_DIR: ./checkpoints, as `ckptd run`, save, stop and status do
    cwd = str(tmp_path / "work")
    assert [row["step"] for row in json.loads(cli("ls", "--json", cwd=cwd).stdout)] == [2, 3]
    assert cli("verify", cwd=cwd).returncode == 0
    assert cli("prune", "--keep-last", "1", cwd=cwd).returncode == 0
    assert sorted(os.listdir(root)) == [S(3)]
    r = cli("ls", cwd=str(tmp_path))
    one_line_error(r, exitcodes.NOT_FOUND, "checkpoints does not exist", "CKPTD_DIR")


# ------------------------------------------------------------------ usage errors exit 2


def test_usage_errors_exit_2_with_one_line(tmp_path, make_checkpoints):
    root = make_checkpoints([1])
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    run_dir = str(tmp_path / "run-ck")
    cases = [
        (["run", "--dir", run_dir, "--grace", "-1", str(script)], "option --grace"),
        (["run", "--dir", run_dir, "--every", "1e-9", str(script)], ">= 1"),
        (["config", "show", "--grace", "-1"], "option --grace"),
        (["prune", root], "--keep-last"),
        (["prune", root, "--keep-best", "loss"], "METRIC:K"),
        (["save", "--timeout", "-1"], "--timeout"),
        (["stop", "--timeout", "nan"], "--timeout"),
        (["run", "--dir", run_dir, str(tmp_path)], "is a directory"),
        (["ls", root, "--dir", root], "either"),
    ]
    for argv, words in cases:
        one_line_error(cli(*argv), exitcodes.USAGE, words)
    assert not os.path.exists(run_dir)  # nothing was started
    assert os.listdir(root) == [S(1)]


def test_a_negative_node_rank_is_a_usage_error(tmp_path):
    root = str(tmp_path / "ck")
    for command in ("status", "save", "stop"):
        r = cli(command, "--node-rank", "-1", "--dir", root)
        one_line_error(r, exitcodes.USAGE, "--node-rank", "whole number >= 0", "'-1'")
    assert not os.path.exists(root)  # no .ckptd/node--1 looked for or made


# ------------------------------------------------------------------ one line instead of tracebacks


def test_verify_reports_a_stray_file_and_a_dangling_link_named_like_checkpoints(make_checkpoints, tmp_path):
    root = make_checkpoints([1])
    with open(os.path.join(root, S(9)), "w") as f:
        f.write("not a checkpoint")
    os.symlink(str(tmp_path / "gone"), os.path.join(root, S(10)))
    r = cli("verify", root)
    one_line_error(r, exitcodes.INVALID, "2 of 3 checkpoint(s) invalid")
    assert f"{S(1)}: ok" in r.stdout
    assert re.search(rf"{S(9)}: INVALID: .*not a directory", r.stdout), r.stdout
    assert re.search(rf"{S(10)}: INVALID: .*symlink", r.stdout), r.stdout
    r = cli("verify", root, "--json")
    assert r.returncode == exitcodes.INVALID and [x["valid"] for x in json.loads(r.stdout)] == [True, False, False]


@pytest.mark.parametrize("field", ["dtype", "shape"])
def test_a_tensor_header_entry_without_dtype_or_shape_is_one_line(make_checkpoints, tmp_path, field):
    root = make_checkpoints([1])
    ckpt = os.path.join(root, S(1))
    tpath = os.path.join(ckpt, store.TENSORS)
    with open(tpath, "r+b") as f:
        data = f.read()
        m = re.search(rb'"dtype":"[A-Z0-9]+",' if field == "dtype" else rb'"shape":\[[0-9,]*\],', data)
        f.seek(m.start())
        f.write(b" " * (m.end() - m.start()))  # same length: the header stays valid JSON
    # inspect reads headers only (sizes still match); export verifies, so sign the altered file
    r = cli("inspect", ckpt)
    one_line_error(r, exitcodes.INVALID, ckpt)
    resign(ckpt)
    one_line_error(cli("inspect", ckpt), exitcodes.INVALID, ckpt)
    r = cli("export", ckpt, "-o", str(tmp_path / "m.safetensors"))
    one_line_error(r, exitcodes.INVALID, ckpt)
    assert not (tmp_path / "m.safetensors").exists()


def test_non_utf8_names_are_escaped_not_a_traceback(make_checkpoints, tmp_path):
    odd = os.path.join(os.fsencode(str(tmp_path)), b"run-\xff")
    os.mkdir(odd)
    root = make_checkpoints([1, 2], root=os.fsdecode(os.path.join(odd, b"ck")))
    with open(os.path.join(os.fsencode(root), os.fsencode(S(2)), b"junk-\xfe"), "w") as f:
        f.write("x")
    env = {"PYTHONIOENCODING": "utf-8:strict"}
    r = cli("ls", root, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "junk-\\xfe" in r.stdout
    r = cli("verify", root, env=env)
    assert r.returncode == exitcodes.INVALID and "Traceback" not in r.stderr, r.stderr
    assert "run-\\xff" in r.stdout and "junk-\\xfe" in r.stdout
    r = cli("ls", os.path.join(root, "nope"), env=env)
    one_line_error(r, exitcodes.NOT_FOUND, "run-\\xff")
    r = cli("ls", root, "--json", env=env)
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 2


# ------------------------------------------------------------------ verify beside a deleting run


def test_verify_while_a_run_deletes_old_checkpoints_reports_no_corruption(tmp_path):
    """A real writer (Checkpointer with keep_last=2) saves and deletes while `ckptd verify DIR` runs, again and
    again."""
    import ckptd

    root = str(tmp_path / "ck")
    model, opt = small_model(width=16384)  # ~3 MB with Adam state: verifying takes long enough to be overtaken
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, keep_last=2, save_on_close=False,
                                    handle_signals=False, async_save=False)
            step = 0
            while not stop.is_set():
                step += 1
                train_steps(model, opt, 1)
                ck.step(step)
                ck.save(block=True)
            ck.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_for(lambda: len([n for n in os.listdir(root) if n.startswith("step-")]) >= 2 if os.path.isdir(root)
                 else False, 60, "the first checkpoints")
        vanished = runs = 0
        deadline_runs = 60
        while runs < deadline_runs and (runs < 15 or vanished < 3):
            r = cli("verify", root)
            runs += 1
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert "Traceback" not in r.stderr and "INVALID" not in r.stdout, r.stderr
            vanished += r.stdout.count("deleted while verifying")
        assert vanished >= 1, f"no checkpoint vanished during {runs} verifications: the race was not exercised"
        assert not errors, errors
    finally:
        stop.set()
        t.join(60)


# ------------------------------------------------------------------ stale trash


def test_prune_removes_trash_a_killed_prune_left_without_following_links(make_checkpoints, tmp_path):
    root = make_checkpoints([1, 2, 3])
    # what a prune killed between its rename and its rmtree leaves behind
    os.rename(os.path.join(root, S(1)), os.path.join(root, f".trash-{S(1)}-deadbeef"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("must survive")
    os.symlink(str(outside), os.path.join(root, ".trash-evil-link"))
    r = cli("prune", root, "--keep-last", "3", "--dry-run")
    assert r.returncode == 0 and f".trash-{S(1)}-deadbeef" in os.listdir(root)  # a dry run deletes nothing
    r = cli("prune", root, "--keep-last", "3")
    assert r.returncode == 0, r.stderr
    assert f"removed leftover .trash-{S(1)}-deadbeef" in r.stdout
    assert sorted(os.listdir(root)) == [".trash-evil-link", S(2), S(3)]
    assert (outside / "keep.txt").read_text() == "must survive"


def test_remove_stale_trash_is_lstat_only(tmp_path):
    from ckptd import retention

    root = tmp_path / "ck"
    (root / ".trash-a" / "sub").mkdir(parents=True)
    (root / ".trash-a" / "sub" / "f").write_text("x")
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("keep")
    os.symlink(str(target), root / ".trash-a" / "link")  # a link inside the trash: removed, not followed
    os.symlink(str(target), root / ".trash-b")
    (root / ".trash-file").write_text("a file is not trash ckptd makes")
    assert retention.remove_stale_trash(str(root)) == [".trash-a"]
    assert sorted(os.listdir(root)) == [".trash-b", ".trash-file"] and (target / "f").read_text() == "keep"
    assert retention.remove_stale_trash(str(tmp_path / "missing")) == []


# ------------------------------------------------------------------ storage errors


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


# Runs inside `unshare -m` (a private mount namespace): mounts a small tmpfs at MNT, copies SRC into MNT/ck,
# then makes it read-only or fills every block and inode, runs each command and prints the results as JSON.
NS_DRIVER = r'''
import errno, json, os, shutil, subprocess, sys
src, mnt, mode, out = sys.argv[1:5]
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=64", "tmpfs", mnt], check=True)
root = os.path.join(mnt, "ck")
shutil.copytree(src, root, symlinks=True)
if mode == "ro":
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
else:
    with open(os.path.join(mnt, "fill"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    for i in range(1000):
        try:
            open(os.path.join(mnt, f"inode-{i}"), "w").close()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
    else:
        raise AssertionError("could not use up the inodes")
def ckptd(*args):
    r = subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=120)
    return {"code": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
c1, c2 = os.path.join(root, "step-000000000001"), os.path.join(root, "step-000000000002")
res = {
    "ls": ckptd("ls", root),
    "verify": ckptd("verify", root),
    "inspect": ckptd("inspect", root + "/latest"),
    "prune-dry": ckptd("prune", root, "--keep-last", "1", "--dry-run"),
    "export-out": ckptd("export", c2, "-o", out),
    "export-in": ckptd("export", c2, "-o", os.path.join(root, "m.safetensors")),
    "pin": ckptd("pin", c2),
    "unpin": ckptd("pin", "--remove", c1),
    "prune": ckptd("prune", root, "--keep-last", "1"),
}
res["listing"] = sorted(os.listdir(root))
print(json.dumps(res))
'''


def _in_namespace(make_checkpoints, tmp_path, mode: str) -> dict:
    src = make_checkpoints([1, 2, 3])
    store.pin(src, S(1))  # so that unpin has a file to remove
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "exported.safetensors"
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", NS_DRIVER, src, str(mnt), mode, str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["root"] = os.path.join(str(mnt), "ck")
    return res


def _ok(res: dict, *names: str) -> None:
    for n in names:
        assert res[n]["code"] == 0 and "Traceback" not in res[n]["stderr"], (n, res[n])


def _storage(res: dict, name: str, *words: str) -> None:
    r = res[name]
    assert r["code"] == exitcodes.STORAGE, (name, r)
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r["stderr"], (name, r["stderr"])
    for w in words:
        assert w in lines[0], (name, w, lines[0])


@pytest.mark.skipif(not _can_unshare(), reason="needs root and mount namespaces (unshare -m) for a read-only tmpfs")
def test_every_store_command_on_a_read_only_directory(make_checkpoints, tmp_path):
    res = _in_namespace(make_checkpoints, tmp_path, "ro")
    root = res["root"]
    _ok(res, "ls", "verify", "inspect", "prune-dry", "export-out")  # reading needs no write access
    assert res["verify"]["stdout"].count(": ok") == 3 and f"would delete {S(2)}" in res["prune-dry"]["stdout"]
    assert os.path.getsize(tmp_path / "exported.safetensors") > 0
    fix = "remount it read-write"
    _storage(res, "export-in", "EROFS", f"{root}/m.safetensors", fix)
    _storage(res, "pin", "EROFS", f"{root}/.pins/{S(2)}", fix)
    _storage(res, "unpin", "EROFS", f"{root}/.pins/{S(1)}", fix)
    _storage(res, "prune", "EROFS", f"{root}/{S(2)}", fix)
    assert res["listing"] == [".pins", S(1), S(2), S(3)]


@pytest.mark.skipif(not _can_unshare(), reason="needs root and mount namespaces (unshare -m) for a full tmpfs")
def test_every_store_command_on_a_full_directory(make_checkpoints, tmp_path):
    res = _in_namespace(make_checkpoints, tmp_path, "full")
    root = res["root"]
    _ok(res, "ls", "verify", "inspect", "prune-dry", "export-out", "unpin")
    fix = "free space"
    _storage(res, "export-in", "ENOSPC", f"{root}/m.safetensors", fix)
    _storage(res, "pin", "ENOSPC", f"{root}/.pins/{S(2)}", fix)
    _ok(res, "prune")  # deleting needs no space: prune is how a full disk gets room again
    assert f"deleted {S(1)}" in res["prune"]["stdout"] and f"deleted {S(2)}" in res["prune"]["stdout"]
    assert res["listing"] == [".pins", S(3)]  # and no temp file of the failed export is left


def test_an_error_naming_a_path_with_a_newline_and_terminal_escapes_is_one_escaped_line(tmp_path):
    forged = "\n2026-01-01T00:00:00.000 ckptd[1] info: checkpoint committed: step-999 (FORGED)\x1b[2J\r"
    r = ckptd_cli("ls", "--dir", str(tmp_path / f"ck{forged}"))
    assert r.returncode == exitcodes.NOT_FOUND, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ckptd: error: "), repr(r.stderr)
    assert "\x1b" not in r.stderr and "\r" not in r.stderr and "ck\\n2026-01-01T00:00:00.000" in r.stderr
