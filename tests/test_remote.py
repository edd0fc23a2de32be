"""The object-store tier against a real S3 server (Ceph RGW, tests/fixtures/s3.py): push, pull, ls --remote.

What is proven: a checkpoint pushed from one directory and pulled into an empty one by another process resumes
a run bit-identically; a remote checkpoint exists only with its manifest (a cut-short upload, objects without a
manifest, bytes that do not match the manifest: never visible, never pulled); damaged remote bytes are caught
by the download's checks and the next older checkpoint is taken; a gateway killed in the middle of an upload
fails the push in bounded time, leaves nothing visible, and the push succeeds once the gateway is back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import ckptd
from ckptd import exitcodes, store
from conftest import ROOT
from fixtures.s3 import s3_server  # noqa: F401  (fixture)
from fixtures.sup_helpers import wait_for

TOY = os.path.join(ROOT, "examples", "train_toy.py")


def cli(server, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "AWS_"))}, **server.env}
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _toy(server, directory: str, steps: int, *extra: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}, "CKPTD_DIR": directory}
    out = subprocess.run([sys.executable, TOY, "--steps", str(steps), *extra], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return re.search(r"final_step=\d+ digest=\w+", out.stdout).group(0)


def test_push_then_pull_into_an_empty_directory_of_another_process_resumes_bit_identically(s3_server, tmp_path):
    url = f"s3://{s3_server.bucket()}/runs/toy"
    want = _toy(s3_server, str(tmp_path / "uninterrupted"), 100)
    first = str(tmp_path / "machine-a")
    _toy(s3_server, first, 100, "--every-steps", "25", "--keep-last", "4")
    # A checkpoint from the middle of the run goes to the remote tier (which steps exist depends on how many
    # periodic saves were coalesced behind one in flight: the newest below 100).
    mid = max(i.step for i in store.list_checkpoints(first) if i.valid and i.step < 100)
    r = cli(s3_server, "push", os.path.join(first, str(mid)), "--remote", url, "--json")
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    assert pushed["step"] == mid and pushed["valid"]
    assert pushed["url"].startswith(f"{url}/{store.checkpoint_name(mid)}."), pushed
    second = str(tmp_path / "machine-b")  # the new machine: nothing local
    r = cli(s3_server, "pull", second, "--remote", url)
    assert r.returncode == 0, r.stderr
    local = os.path.join(second, store.checkpoint_name(mid))
    assert r.stdout.strip().endswith(local)
    with open(os.path.join(first, store.checkpoint_name(mid), store.MANIFEST), "rb") as a, \
            open(os.path.join(local, store.MANIFEST), "rb") as b:
        assert a.read() == b.read()  # the same manifest, byte for byte: the same checkpoint on both tiers
    assert store.verify(local).valid and not [n for n in os.listdir(second) if n.startswith(".")]
    got = _toy(s3_server, second, 100, "--every-steps", "25")  # resumes at `mid` from the pulled checkpoint
    assert got == want


def test_only_a_checkpoint_with_its_manifest_exists_and_damaged_remote_bytes_are_never_pulled(
        s3_server, make_checkpoints, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/ck"
    root = make_checkpoints([1, 2])
    s3 = s3_server.client()
    # Objects of an upload that never committed (no manifest): no checkpoint for any reader.
    s3.put_object(Bucket=bucket, Key="ck/step-000000000009.0123456789abcdef/tensors.safetensors", Body=b"x" * 100)
    r = cli(s3_server, "ls", "--remote", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout
    r = cli(s3_server, "pull", str(tmp_path / "empty"), "--remote", url)
    assert r.returncode == exitcodes.NOT_FOUND and "no valid checkpoint" in r.stderr, r.stderr
    for step in (1, 2):
        assert cli(s3_server, "push", os.path.join(root, str(step)), "--remote", url).returncode == 0
    rows = {row["step"]: row for row in json.loads(cli(s3_server, "ls", "--remote", url, "--json").stdout)}
    assert sorted(rows) == [1, 2] and all(row["valid"] for row in rows.values())
    # The server honours the conditional put the remote commit relies on.
    manifest_key = f"ck/{rows[2]['key']}/manifest.json"
    with pytest.raises(Exception, match="PreconditionFailed|412"):
        s3.put_object(Bucket=bucket, Key=manifest_key, Body=b"{}", IfNoneMatch="*")
    # Step 2's tensor bytes replaced by others of the same size: the listing (sizes) cannot see it, the pull can.
    tkey = f"ck/{rows[2]['key']}/tensors.safetensors"
    body = bytearray(s3.get_object(Bucket=bucket, Key=tkey)["Body"].read())
    body[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=tkey, Body=bytes(body))
    dest = str(tmp_path / "dest")
    r = cli(s3_server, "pull", dest, "--remote", url, "--json")
    assert r.returncode == 0, r.stderr
    assert "tensors.safetensors does not match its checksum" in r.stderr and "taking the next older" in r.stderr
    assert json.loads(r.stdout)["step"] == 1
    assert sorted(os.listdir(dest)) == [store.checkpoint_name(1)]  # nothing of step 2, no temporary left
    # An altered manifest (a value changed, its digest not): listed as BAD with the reason, never pulled.
    m = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    m["metrics"]["loss"] = 0.0
    s3.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(m).encode())
    rows = {row["step"]: row for row in json.loads(cli(s3_server, "ls", "--remote", url, "--json").stdout)}
    assert not rows[2]["valid"] and "digest mismatch" in rows[2]["reason"], rows[2]
    r = cli(s3_server, "pull", str(tmp_path / "d2"), "--remote", url, "--step", "2")
    assert r.returncode == exitcodes.NOT_FOUND


def test_a_checkpoint_whose_bytes_differ_from_its_manifest_is_not_committed_remotely(
        s3_server, make_checkpoints):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/ck"
    root = make_checkpoints([1])
    tensors = os.path.join(root, store.checkpoint_name(1), store.TENSORS)
    with open(tensors, "r+b") as f:  # damaged on the local disk after its commit: same size, other bytes
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    r = cli(s3_server, "push", os.path.join(root, "1"), "--remote", url)
    assert r.returncode == exitcodes.INVALID, (r.returncode, r.stdout)
    assert "does not match its checksum" in r.stderr and "nothing was committed remotely" in r.stderr, r.stderr
    listed = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert listed == []  # not committed, and what was sent is removed


def test_a_gateway_killed_during_an_upload_fails_the_push_leaves_nothing_visible_and_the_push_succeeds_after(
        s3_server, tmp_path):
    import torch

    bucket = s3_server.bucket()
    url = f"s3://{bucket}/big"
    root = str(tmp_path / "ck")
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(48)])  # ~192 MiB of weights
    ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
    ck.step(1)
    ck.save(block=True)
    ck.close()
    s3 = s3_server.client()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "AWS_"))}, **s3_server.env}
    push = subprocess.Popen([sys.executable, "-m", "ckptd", "push", os.path.join(root, "1"), "--remote", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    killed = False
    try:
        # The tensor file's multipart upload is under way (a part or more sent): kill the gateway then.
        wait_for(lambda: push.poll() is not None or s3.list_multipart_uploads(Bucket=bucket).get("Uploads"),
                 timeout=120, what="the multipart upload to start")
        assert push.poll() is None, push.communicate()
        s3_server.kill_gateway()
        killed = True
        t0 = time.monotonic()
        out, err = push.communicate(timeout=300)
    finally:
        if push.poll() is None:
            push.send_signal(signal.SIGKILL)
            push.wait()
        if killed:
            s3_server.start_gateway()
    assert push.returncode == exitcodes.STORAGE, (push.returncode, out, err)
    assert "remote upload failed" in err and "Traceback" not in err, err
    assert time.monotonic() - t0 < 240  # bounded: per-request timeouts and a bounded number of retries
    r = cli(s3_server, "ls", "--remote", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout  # nothing torn became visible
    r = cli(s3_server, "push", os.path.join(root, "1"), "--remote", url)
    assert r.returncode == 0, r.stderr
    r = cli(s3_server, "pull", str(tmp_path / "new"), "--remote", url)
    assert r.returncode == 0, r.stderr
    assert store.verify(os.path.join(tmp_path, "new", store.checkpoint_name(1))).valid


def test_the_background_uploader_keeps_the_remote_tier_current_and_catches_up_after_the_server_returns(
        s3_server, tmp_path, monkeypatch):
    """Local first, then upload: saves go on while the gateway is down; the uploader reports the failures, backs
    off, and uploads the newest checkpoint once the gateway is back. Only complete checkpoints ever show."""
    import torch

    from ckptd.remote import RemoteSpec, RemoteTier
    from ckptd.uploader import Uploader

    for k, v in s3_server.env.items():  # credentials from the standard environment variables
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_server.bucket()}/bg"
    root = str(tmp_path / "ck")
    events: list[tuple[str, dict]] = []
    model = torch.nn.Linear(64, 64)
    ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
    for step in (1, 2, 3):
        ck.step(step)
        ck.save(block=True)
    tier = RemoteTier(RemoteSpec.parse(url, s3_server.endpoint, "us-east-1"), timeout_s=10, max_retries=1)
    up = Uploader(tier, root, pace=0.5, on_event=lambda n, f: events.append((n, f)), backoff_base=0.2,
                  backoff_max=1.0, rescan=0.5).start()
    try:
        assert up.wait_uploaded(3, timeout=60), (up.status, str(events)[-3000:])
        assert [c.step for c in tier.checkpoints()] == [3]  # the newest only: 1 and 2 were never worth the bandwidth
        assert up.status.lag_steps == 0 and up.status.lag_seconds(time.time()) == 0.0
        s3_server.kill_gateway()
        try:
            ck.step(4)
            ck.save(block=True)  # training does not wait for the remote tier
            up.notify()
            wait_for(lambda: up.status.errors_in_a_row >= 2, timeout=120, what="retried failures")
            assert up.status.remote_step == 3 and up.status.lag_steps == 1
            assert up.status.lag_seconds(time.time()) > 0
            assert [n for n, _ in events].count("upload_failed") >= 2 and "upload failed" in up.status.last_error
        finally:
            s3_server.start_gateway()
        assert up.wait_uploaded(4, timeout=120), (up.status, events)
        assert [c.step for c in tier.checkpoints() if c.valid] == [3, 4]
        assert up.status.errors_in_a_row == 0 and up.status.lag_steps == 0
        got = tier.download(tier.latest_valid(), str(tmp_path / "elsewhere"))
        assert store.verify(got.path).valid and got.step == 4
    finally:
        up.close()
        ck.close()


def test_prune_remote_applies_the_rules_and_removes_only_stale_uncommitted_uploads(
        s3_server, make_checkpoints):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/p"
    root = make_checkpoints([1, 2, 3, 4], metrics={1: {"val": 0.1}, 2: {"val": 0.5}, 3: {"val": 0.4}, 4: {"val": 0.9}})
    for step in (1, 2, 3, 4):
        assert cli(s3_server, "push", os.path.join(root, str(step)), "--remote", url).returncode == 0
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="p/step-000000000007.00000000deadbeef/tensors.safetensors", Body=b"partial")
    r = cli(s3_server, "prune", "--remote", url, "--keep-last", "1", "--keep-best", "val:1", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert len(plan["deleted"]) == 2 and plan["removed_uncommitted"] == []  # just written: not stale
    assert len(json.loads(cli(s3_server, "ls", "--remote", url, "--json").stdout)) == 4  # dry run: nothing gone
    r = cli(s3_server, "prune", "--remote", url, "--keep-last", "1", "--keep-best", "val:1", "--stale-hours",
            "0.0001", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(cli(s3_server, "ls", "--remote", url, "--json").stdout)
    assert sorted(row["step"] for row in rows) == [1, 4]  # best val (min) and the newest
    assert json.loads(r.stdout)["removed_uncommitted"] == ["step-000000000007.00000000deadbeef"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 2 * 3 and not any("step-000000000007" in k for k in keys), keys  # 2 checkpoints x 3 files


def test_verify_remote_reads_every_byte_of_each_checkpoint_and_names_the_damaged_one(s3_server, make_checkpoints):
    """`ckptd verify --remote`: each checkpoint of the tier (one with a manifest; the objects of an upload without one
    are no checkpoint) is read back from the server and checked against its manifest's checksums. Tensor bytes
    replaced by others of the same size, which the listing (sizes) cannot see, make that checkpoint INVALID (exit
    3); the other stays ok."""
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/v"
    root = make_checkpoints([1, 2])
    for step in (1, 2):
        assert cli(s3_server, "push", os.path.join(root, str(step)), "--remote", url).returncode == 0
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="v/step-000000000009.0123456789abcdef/tensors.safetensors", Body=b"x" * 100)
    r = cli(s3_server, "verify", "--remote", url, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["step"], row["valid"]) for row in rows] == [(1, True), (2, True)], rows
    key = rows[1]["key"]
    tkey = f"v/{key}/tensors.safetensors"
    body = bytearray(s3.get_object(Bucket=bucket, Key=tkey)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=tkey, Body=bytes(body))
    listed = json.loads(cli(s3_server, "ls", "--remote", url, "--json").stdout)
    assert all(row["valid"] for row in listed)  # the manifest-level check reads no data
    r = cli(s3_server, "verify", "--remote", url)
    assert r.returncode == exitcodes.INVALID, (r.returncode, r.stdout, r.stderr)
    assert f"{url}/{rows[0]['key']}: ok" in r.stdout, r.stdout
    assert f"{url}/{key}: INVALID: tensors.safetensors does not match its checksum" in r.stdout, r.stdout
    assert "1 of 2 remote checkpoint(s) invalid" in r.stderr, r.stderr
    r = cli(s3_server, "verify", str(root), "--remote", url)
    assert r.returncode == exitcodes.USAGE and "not both" in r.stderr, r.stderr


def _on_a_terminal(server, argv: list[str]) -> tuple[int, str, str]:
    """Run ``python argv`` with stderr on a terminal (a pty): (exit status, what it drew there, its stdout)."""
    import pty

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "AWS_"))}, **server.env}
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                             env=env, cwd=ROOT)
    finally:
        os.close(slave)
    drawn = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not data:
                break
            drawn.append(data)
        out = p.communicate(timeout=180)[0]
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, b"".join(drawn).decode(errors="replace"), out.decode(errors="replace")


def test_a_download_draws_its_progress_on_a_terminal_and_is_quiet_when_piped(s3_server, tmp_path):
    """`ckptd pull` and restore() from the remote tier (a fresh directory): with stderr on a terminal each draws
    the download's progress line, to 100 %; with stderr piped neither writes one."""
    import torch

    url = f"s3://{s3_server.bucket()}/tty"
    a = str(tmp_path / "a")
    torch.manual_seed(0)
    ck = ckptd.Checkpointer(model=torch.nn.Linear(64, 64), dir=a, handle_signals=False, save_on_close=False)
    ck.step(5)
    ck.save(block=True)
    ck.close()
    r = cli(s3_server, "push", os.path.join(a, "5"), "--remote", url, "--json")
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)["key"]
    restore = ("import sys, torch, ckptd; ck = ckptd.Checkpointer(model=torch.nn.Linear(64, 64), dir=sys.argv[1], "
               f"handle_signals=False, remote={url!r}); print(ck.restore()); ck.close()")
    for name, argv in (("pull", ["-m", "ckptd", "pull", str(tmp_path / "pulled"), "--remote", url]),
                       ("restore", ["-c", restore, str(tmp_path / "restored")])):
        rc, drawn, out = _on_a_terminal(s3_server, argv)
        assert rc == 0, (name, drawn, out)
        assert re.search(rf"download {re.escape(key)} \[#{{30}}\] 100\.0%", drawn), (name, drawn)
        again = [arg.replace("pulled", "pulled2").replace("restored", "restored2") for arg in argv]  # empty again
        piped = subprocess.run([sys.executable, *again], capture_output=True, text=True, timeout=180, cwd=ROOT,
                               env={**{k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "AWS_"))},
                                    **s3_server.env})
        assert piped.returncode == 0, (name, piped.stderr)
        assert "download " not in piped.stderr and "\r" not in piped.stderr, (name, piped.stderr)
    assert out.strip() == "5"


def test_the_remote_tier_has_its_own_retention_applied_after_each_upload(s3_server, tmp_path, monkeypatch):
    """`remote_keep_last: 2` (`ckptd run --remote-keep-last 2`), the local tier without a rule: after each upload
    commits, the remote tier is pruned to its newest 2 checkpoints (no object of a deleted one is left), reported as
    `remote_pruned`; the local tier keeps all 4."""
    import torch

    from ckptd.supervisor import config as configmod
    from ckptd.supervisor.uploads import RemoteUploads

    for k, v in s3_server.env.items():  # credentials and endpoint from the standard environment variables
        monkeypatch.setenv(k, v)
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/rt"
    root = str(tmp_path / "ck")
    cfg = configmod.resolve(None, {"remote": url, "remote_keep_last": 2, "dir": root})
    posted: list[tuple] = []
    uploads = RemoteUploads(cfg, root, posted.append)
    uploads.start()
    ck = ckptd.Checkpointer(model=torch.nn.Linear(16, 16), dir=root, handle_signals=False, save_on_close=False)
    try:
        for step in (1, 2, 3, 4):
            ck.step(step)
            ck.save(block=True)
            uploads.notify()
            assert uploads.uploader.wait_uploaded(step, timeout=120), (uploads.uploader.status, posted)
        wait_for(lambda: [c.step for c in uploads.tier.checkpoints()] == [3, 4], 60, "the remote tier pruned to 2")
    finally:
        uploads.close()
        ck.close()
    assert [i.step for i in store.list_checkpoints(root)] == [1, 2, 3, 4]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted({k.split("/")[1].split(".")[0] for k in keys}) == [store.checkpoint_name(3),
                                                                     store.checkpoint_name(4)], keys
    pruned = [e[2] for e in posted if e[1] == "remote_pruned"]
    assert sorted(s for fields in pruned for s in fields["steps"]) == [1, 2], posted
    level, msg, quiet = uploads.record("remote_pruned", pruned[0])
    assert level == "info" and "remote retention deleted" in msg and not quiet


def test_inspect_remote_shows_what_the_local_inspect_shows_without_reading_the_tensor_data(s3_server, make_checkpoints):
    """`ckptd inspect --remote URL CKPT` (latest, a step number, an upload's key): the manifest, the tensor header (a
    ranged read) and state.json of the remote checkpoint, the same as `ckptd inspect` of the local one shows."""
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/i"
    root = make_checkpoints([1, 2])
    keys = {}
    for step in (1, 2):
        r = cli(s3_server, "push", os.path.join(root, str(step)), "--remote", url, "--json")
        assert r.returncode == 0, r.stderr
        keys[step] = json.loads(r.stdout)["key"]
    for step, name in ((2, "latest"), (1, "1"), (1, keys[1])):
        local = cli(s3_server, "inspect", os.path.join(root, str(step)), "--json")
        assert local.returncode == 0, local.stderr
        r = cli(s3_server, "inspect", "--remote", url, name, "--json")
        assert r.returncode == 0, (name, r.stderr)
        assert json.loads(r.stdout) == json.loads(local.stdout), name
    r = cli(s3_server, "inspect", "--remote", url, "2")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint {url}/{keys[2]}" in r.stdout and "no data read" in r.stdout and "tensors (" in r.stdout
    r = cli(s3_server, "inspect", "--remote", url, "7")
    assert r.returncode == exitcodes.NOT_FOUND and "no checkpoint 7" in r.stderr, r.stderr


def test_a_checkpoint_whose_manifest_is_deleted_between_the_listing_and_its_read_is_not_listed(
        s3_server, make_checkpoints, monkeypatch):
    """A reader lists the tier while retention (another process's uploader) deletes a checkpoint: the manifest the
    listing named is gone when the reader fetches it. That checkpoint no longer exists: it is left out, not an
    error (the uploader's own wait for its pruning failed so under load)."""
    from ckptd.remote import RemoteSpec, RemoteTier

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_server.bucket()}/gone"
    root = make_checkpoints([1, 2])
    for step in (1, 2):
        assert cli(s3_server, "push", os.path.join(root, str(step)), "--remote", url).returncode == 0
    tier = RemoteTier(RemoteSpec.parse(url, s3_server.endpoint, "us-east-1"), timeout_s=10, max_retries=1)
    doomed = tier.checkpoints()[0]
    real_list = tier._obs.list

    def list_then_delete(*args, **kwargs):  # the deletion lands right after the listing, as retention's would
        batches = list(real_list(*args, **kwargs))
        tier.delete(doomed)
        return batches

    class Obs:  # obstore itself, but for the listing
        list = staticmethod(list_then_delete)

        def __getattr__(self, name):
            return getattr(real_obs, name)

    real_obs, tier._obs = tier._obs, Obs()
    assert [c.step for c in tier.checkpoints()] == [2]
