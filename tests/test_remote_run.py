"""`ckptd run --remote`: the supervisor's background uploader against a real S3 server (Ceph RGW,
tests/fixtures/s3.py), restore on a fresh machine from the remote tier, and `--stop-upload wait`.

What is proven: each new local checkpoint is uploaded by the supervisor (journal, status, /metrics say which
tier holds the newest one and how far the remote tier lags); a server that accepts connections and never
answers delays neither training nor a stop; a run whose local directory is lost resumes on another machine from
the remote tier and ends bit-identical to an uninterrupted run; with `--stop-upload wait` a stop exits only once
its emergency checkpoint is on the remote tier, and says so when the deadline ran out first.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest

from ckptd import exitcodes, store
from fixtures.s3 import KEY, SECRET, s3_server  # noqa: F401  (fixture)
from fixtures.sup_helpers import FAST, TRAINER, Run, ckptd, free_port, http_get, journal, wait_for

CREDENTIALS = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}


def _metric(port: int, name: str) -> float:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not served")


def _tier(server, url: str, monkeypatch):
    from ckptd.remote import RemoteSpec, RemoteTier

    for k, v in CREDENTIALS.items():  # this process reads the tier too, with the standard variables
        monkeypatch.setenv(k, v)

    return RemoteTier(RemoteSpec.parse(url, server.endpoint, "us-east-1"), timeout_s=10, max_retries=1)


def _step(name: str) -> int:
    return int(store.NAME_RE.match(name).group(1))


def _status(root: str) -> dict:
    r = ckptd("status", "--dir", root, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_run_remote_uploads_each_new_checkpoint_says_which_tier_holds_the_newest_and_a_hung_server_delays_no_stop(
        s3_server, tmp_path, monkeypatch):
    url = f"s3://{s3_server.bucket()}/run"
    root = str(tmp_path / "ck")
    port = free_port()
    # The endpoint and region come from the options (not $AWS_ENDPOINT_URL); the credentials from the environment.
    run = Run(tmp_path, root, [*FAST, "--notices", "off", "--metrics-addr", f"127.0.0.1:{port}", "--every-steps",
                               "50", "--remote", url, "--remote-endpoint", s3_server.endpoint, "--remote-region",
                               "us-east-1", TRAINER, "--steps", "10000000"], env=CREDENTIALS)
    frozen = False
    try:
        first = run.wait_event("upload_committed", timeout=60)
        assert run.events("upload_started")[0]["checkpoint"] == first["checkpoint"]
        remote = {c.step: c for c in _tier(s3_server, url, monkeypatch).checkpoints()}
        assert remote[first["step"]].valid and first["key"] == remote[first["step"]].key
        with open(os.path.join(root, first["checkpoint"], store.MANIFEST), "rb") as f:
            assert f.read() == remote[first["step"]].raw_manifest  # the same checkpoint on both tiers
        st = _status(root)["remote"]
        assert st["url"] == url and st["remote_step"] >= first["step"] and st["failures"] == 0, st
        assert wait_for(lambda: _metric(port, "ckptd_remote_upload_bytes_total") >= first["bytes"] > 0, 20)
        assert math.isfinite(_metric(port, "ckptd_remote_lag_steps"))
        with open(f"/proc/{run.pid}/maps") as f:
            assert "torch" not in f.read()  # the supervisor still never loads torch
        # The server hangs (accepts, never answers): training goes on, the lag grows and is reported.
        s3_server.freeze_gateway()
        frozen = True
        wait_for(lambda: _metric(port, "ckptd_remote_lag_steps") >= 200, 60, "the remote lag to grow")
        assert _metric(port, "ckptd_remote_lag_seconds") > 0
        st = _status(root)["remote"]
        assert st["newest_checkpoint_on"] == "local only" and st["lag_steps"] >= 200, st
        r = ckptd("status", "--dir", root)
        assert f"remote:     {url}: newest checkpoint on local only" in r.stdout, r.stdout
        # Nor is a restart: the child killed, restarted at once, and its checkpoints go on.
        os.kill(_status(root)["child_pid"], signal.SIGKILL)
        run.wait_event("restart", timeout=30)
        seen = len(journal(root, "checkpoint"))
        wait_for(lambda: len(journal(root, "checkpoint")) > seen, 30, "a checkpoint after the restart")
        # A stop is not delayed by the hung upload: the emergency checkpoint commits locally and the run exits
        # while the server still answers nothing (each request's own limit is 60 s, then retries).
        run.signal(signal.SIGTERM)
        assert run.wait(45) == exitcodes.PREEMPTED, run.stderr()
        assert [e for e in journal(root, "checkpoint") if e.get("kind") == "emergency"], run.stderr()
    finally:
        if frozen:
            s3_server.thaw_gateway()
    text = run.stderr() + json.dumps(journal(root))
    assert SECRET not in text and "committed on the remote tier" in text


@pytest.mark.kind("unit")
def test_remote_settings_are_checked_and_no_credential_is_ever_echoed():
    from ckptd.errors import ConfigError
    from ckptd.supervisor import config as configmod

    cfg = configmod.resolve(None, {"remote": "s3://bucket/runs/a/", "stop_upload": "wait",
                                   "remote_endpoint": "http://127.0.0.1:9000"})
    assert (cfg.remote, cfg.stop_upload, cfg.remote_endpoint) == ("s3://bucket/runs/a", "wait", "http://127.0.0.1:9000")
    for key, value in (("remote", "s3://AKIAXX:hunter2secret@bucket/p"),
                       ("remote_endpoint", "http://AKIAXX:hunter2secret@127.0.0.1:9000")):
        with pytest.raises(ConfigError, match="holds credentials") as err:
            configmod.resolve(None, {key: value})
        assert "hunter2secret" not in str(err.value)
    with pytest.raises(ConfigError, match="s3://BUCKET/PREFIX"):
        configmod.resolve(None, {"remote": "/local/path"})
    with pytest.raises(ConfigError, match="skip, wait"):
        configmod.resolve(None, {"stop_upload": "maybe"})


@pytest.mark.kind("unit")
def test_the_remote_tiers_retention_is_its_own_and_needs_a_remote_tier(tmp_path):
    from ckptd.supervisor import config as configmod
    from ckptd.supervisor.config import ConfigError, OptionError
    from ckptd.supervisor.uploads import remote_policy

    cfg = configmod.resolve(None, {"remote": "s3://b/p", "keep_last": 1, "remote_keep_last": 5,
                                   "remote_keep_best": ["val_loss:2:min"]})
    policy = remote_policy(cfg)
    assert (policy.keep_last, [(b.metric, b.k, b.mode) for b in policy.keep_best]) == (5, [("val_loss", 2, "min")])
    assert cfg.keep_last == 1 and cfg.as_dict()["remote_keep_best"] == ["val_loss:2:min"]
    with pytest.raises(OptionError, match="set remote too"):
        configmod.resolve(None, {"remote_keep_last": 2})
    assert cfg.upload_hold  # with a remote tier, local retention waits for the upload unless told not to
    assert not configmod.resolve(None, {"remote": "s3://b/p", "prune_before_upload": True}).upload_hold
    with pytest.raises(OptionError, match="prune_before_upload is about the remote tier"):
        configmod.resolve(None, {"prune_before_upload": True})
    path = tmp_path / "ckptd.yaml"
    path.write_text("remote_keep_every: 10\n")
    with pytest.raises(ConfigError, match="set remote too"):
        configmod.resolve(str(path), {})


@pytest.mark.kind("unit")
def test_the_emergency_upload_is_tried_only_when_its_estimate_at_the_measured_rate_fits_80_percent_of_the_time_left():
    from ckptd.supervisor.uploads import emergency_upload

    mib = 2**20
    d = emergency_upload("step-000000000007", 80 * mib, 10 * mib, 10.0, on_remote=False)  # 8 s of 10: fits
    assert d.attempt and d.estimate_seconds == 8.0 and d.reason.startswith("fits: 80.0 MiB at the measured 10.0 MiB/s")
    d = emergency_upload("step-000000000007", 81 * mib, 10 * mib, 10.0, on_remote=False)  # 8.1 s of 10: not
    assert not d.attempt and d.reason.startswith("does not fit") and "8.1 s, 10.0 s left" in d.reason
    assert emergency_upload("s", 1, 10 * mib, 10.0, on_remote=True).reason == "already on the remote tier"
    assert not emergency_upload("s", 1, None, 10.0, on_remote=False).attempt  # nothing measured yet
    assert not emergency_upload("s", 1, 10 * mib, -0.5, on_remote=False).attempt  # the deadline has passed


@pytest.mark.kind("unit")
def test_the_measured_transfer_rate_leaves_out_the_pacing_pauses_and_covers_the_last_three_uploads():
    from ckptd.uploader import UploadStatus

    st = UploadStatus()
    assert st.transfer_rate() is None
    st.history = [{"bytes": 1000, "seconds": 9.0, "transfer_seconds": 1.0}] + \
        [{"bytes": 300, "seconds": 2.0, "transfer_seconds": 1.0}] * 3
    assert st.transfer_rate() == 300.0


def test_restore_takes_a_newer_remote_checkpoint_into_an_empty_or_older_directory_and_a_newer_local_one_wins(
        s3_server, tmp_path, monkeypatch, capsys, caplog):
    import logging

    import torch

    import ckptd

    caplog.set_level(logging.INFO, "ckptd")

    def said() -> str:  # restore()'s line: a log record where logging has a handler (here, pytest's), else stderr
        text = capsys.readouterr().err + caplog.text
        caplog.clear()
        return text

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_server.bucket()}/lib"
    tier = _tier(s3_server, url, monkeypatch)
    a = str(tmp_path / "a")

    def trained(step: int) -> torch.nn.Linear:
        torch.manual_seed(step)
        return torch.nn.Linear(16, 16)

    for step in (1, 2):
        ck = ckptd.Checkpointer(model=trained(step), dir=a, handle_signals=False, save_on_close=False)
        ck.step(step)
        ck.save(block=True)
        ck.close()
    tier.upload(os.path.join(a, store.checkpoint_name(2)))
    # A fresh machine: nothing local. The remote checkpoint is downloaded, verified, restored; the line says so.
    fresh = str(tmp_path / "fresh")
    model = torch.nn.Linear(16, 16)
    ck = ckptd.Checkpointer(model=model, dir=fresh, handle_signals=False, remote=url)
    said()
    assert ck.restore() == 2
    line = said()
    assert "resumed from step 2" in line and f"(remote tier: {url}/step-000000000002." in line, line
    assert torch.equal(model.weight, trained(2).weight)
    assert store.verify(os.path.join(fresh, store.checkpoint_name(2))).valid
    ck.close()
    # An older local directory (step 1 only): the newer remote checkpoint wins.
    older = str(tmp_path / "older")
    os.makedirs(older)
    import shutil

    shutil.copytree(os.path.join(a, store.checkpoint_name(1)), os.path.join(older, store.checkpoint_name(1)))
    ck = ckptd.Checkpointer(model=torch.nn.Linear(16, 16), dir=older, handle_signals=False, remote=url)
    assert ck.restore() == 2 and "(remote tier:" in said()
    ck.close()
    # A newer valid local checkpoint (step 3, not uploaded) wins over the remote one; nothing is downloaded.
    ck = ckptd.Checkpointer(model=trained(3), dir=a, handle_signals=False, save_on_close=False)
    ck.step(3)
    ck.save(block=True)
    ck.close()
    ck = ckptd.Checkpointer(model=torch.nn.Linear(16, 16), dir=a, handle_signals=False, remote=url)
    said()
    assert ck.restore() == 3
    line = said()
    assert "resumed from step 3" in line and "(local tier)" in line, line
    ck.close()
    # The remote tier unreachable: with a valid local checkpoint, restore goes on from it (said); with none, it
    # refuses to start at step 0.
    dead = "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    from ckptd.remote import RemoteError, RemoteSpec

    spec = RemoteSpec.parse(url, dead, "us-east-1")
    ck = ckptd.Checkpointer(model=torch.nn.Linear(16, 16), dir=a, handle_signals=False, remote=spec)
    assert ck.restore() == 3
    ck.close()
    ck = ckptd.Checkpointer(model=torch.nn.Linear(16, 16), dir=str(tmp_path / "empty"), handle_signals=False,
                            remote=spec)
    with pytest.raises(RemoteError, match="will not start at step 0"):
        ck.restore()
    ck.close()


def test_a_run_whose_local_directory_is_lost_resumes_on_another_machine_from_the_remote_tier_bit_identically(
        s3_server, tmp_path):
    from fixtures.sup_helpers import TOY, toy_digest, toy_reference

    steps = 300
    want = toy_reference(str(tmp_path / "reference"), steps)
    url = f"s3://{s3_server.bucket()}/toy"
    env = {**s3_server.env, "TOY_STEP_DELAY": "0.02"}
    a = str(tmp_path / "machine-a")
    run = Run(tmp_path, a, [*FAST, "--notices", "off", "--metrics-addr", "off", "--remote", url, TOY, "--steps",
                            str(steps), "--every-steps", "50"], env=env, name="a")
    committed = run.wait_event("upload_committed", timeout=60)
    run.signal(signal.SIGTERM)
    assert run.wait(60) == exitcodes.PREEMPTED, run.stderr()
    assert 0 < committed["step"] < steps
    import shutil

    shutil.rmtree(a)  # the machine is gone, and its disk with it
    b = str(tmp_path / "machine-b")
    run = Run(tmp_path, b, [*FAST, "--notices", "off", "--metrics-addr", "off", "--remote", url, TOY, "--steps",
                            str(steps), "--every-steps", "50"], env={**s3_server.env}, name="b")
    assert run.wait(120) == 0, run.stderr()
    out = run.stdout()
    start = int(out.split("start_step=")[1].split()[0])
    assert start >= committed["step"], out  # the newest checkpoint committed on the remote tier (or a newer one)
    assert f"resumed from step {start}" in run.stderr() and f"(remote tier: {url}/" in run.stderr(), run.stderr()
    assert toy_digest(out, steps) == want


def test_stop_upload_wait_exits_only_once_the_emergency_checkpoint_is_remote_and_says_when_the_deadline_ran_out(
        s3_server, tmp_path, monkeypatch):
    url = f"s3://{s3_server.bucket()}/stop"
    tier = _tier(s3_server, url, monkeypatch)
    opts = ["--notices", "off", "--metrics-addr", "off", "--every-steps", "50", "--force-grace", "1",
            "--remote", url, "--stop-upload", "wait"]
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*opts, "--grace", "30", TRAINER, "--steps", "10000000"], env=s3_server.env)
    run.wait_event("upload_committed", timeout=60)
    run.signal(signal.SIGTERM)
    assert run.wait(60) == exitcodes.PREEMPTED, run.stderr()
    listed = {c.step: c for c in tier.checkpoints() if c.valid}  # read once the run has exited
    emergency = [e for e in journal(root, "checkpoint") if e.get("kind") == "emergency"][-1]
    waited = journal(root, "remote_wait")
    assert [(w["uploaded"], w["checkpoint"]) for w in waited] == [(True, emergency["name"])], run.stderr()
    assert emergency["step"] in listed and listed[emergency["step"]].kind == "emergency"
    # The server hangs: the wait ends at the stop's deadline (the grace), says so, and the run still exits 85.
    s3_server.freeze_gateway()
    try:
        root = str(tmp_path / "ck2")
        run = Run(tmp_path, root, [*opts, "--grace", "4", TRAINER, "--steps", "10000000"], env=s3_server.env,
                  name="frozen")
        wait_for(lambda: journal(root, "checkpoint"), 30, "a first local checkpoint")
        run.signal(signal.SIGTERM)
        assert run.wait(45) == exitcodes.PREEMPTED, run.stderr()
    finally:
        s3_server.thaw_gateway()
    waited = journal(root, "remote_wait")
    assert len(waited) == 1 and not waited[0]["uploaded"] and waited[0]["reason"] == "deadline", waited
    assert "the stop's deadline ran out" in run.stderr() and "local tier only" in run.stderr()


def test_local_retention_keeps_every_checkpoint_not_yet_uploaded_while_the_server_is_down_and_trims_once_it_returns(
        s3_server, tmp_path, monkeypatch):
    url = f"s3://{s3_server.bucket()}/hold"
    tier = _tier(s3_server, url, monkeypatch)
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--notices", "off", "--metrics-addr", "off", "--every-steps", "50",
                               "--keep-last", "2", "--remote", url, TRAINER, "--steps", "10000000"],
              env=s3_server.env)

    def local() -> list[str]:
        return [i.name for i in store.list_checkpoints(root) if i.valid]

    down = False
    try:
        first = run.wait_event("upload_committed", timeout=60)
        s3_server.kill_gateway()  # every upload from now on fails (connection refused), retried with backoff
        down = True
        # Retention (keep 2) runs at each new checkpoint and keeps back every one newer than the remote tier's
        # newest; the journal and status say so.
        wait_for(lambda: len([n for n in local() if _step(n) > first["step"]]) >= 6, 90,
                 "six local checkpoints newer than the remote tier's")
        remote_step = _status(root)["remote"]["remote_step"]
        made = [e["name"] for e in journal(root, "checkpoint")]
        newer = [n for n in made if _step(n) > remote_step]
        assert set(newer) <= set(local()), (newer, local())  # not one of them deleted
        assert len(local()) > 4
        held = journal(root, "retention_held")
        assert held and held[-1]["names"] and held[-1]["remote_step"] == remote_step, held
        st = _status(root)["remote"]
        assert st["held_for_upload"] and st["newest_checkpoint_on"] == "local only", st
        assert "until uploaded" in ckptd("status", "--dir", root).stdout
        # The server returns: the uploader catches up (the newest local checkpoint), and retention then lets go
        # of everything it covers: back to the last 2 (and what is newer than the remote tier's newest).
        s3_server.start_gateway()
        down = False
        caught_up = run.wait_event("upload_committed", timeout=120, count=2)
        assert caught_up["step"] >= max(_step(n) for n in newer)
        wait_for(lambda: not set(newer[:-2]) & set(local()), 60, "retention to trim the held checkpoints")
        covered = lambda: store.remote_mark(root, url) or (0, 0.0)  # noqa: E731  (what the uploader recorded)
        wait_for(lambda: len([n for n in local() if _step(n) <= covered()[0]]) <= 2, 60,
                 "the last 2 of what the remote tier covers, no more")
    finally:
        if down:
            s3_server.start_gateway()
        run.signal(signal.SIGTERM)
        run.wait(60)
    # Nothing torn on the remote tier: every checkpoint there has its manifest and every file at its size.
    listed = tier.checkpoints()
    assert listed and all(c.valid for c in listed), [(c.key, c.reason) for c in listed if not c.valid]


def test_an_emergency_upload_before_a_notices_deadline_is_tried_only_when_the_measured_rate_says_it_fits(
        s3_server, tmp_path, monkeypatch):
    from ckptd.supervisor import notices
    from fixtures.fake_metadata import FakeMetadata
    from fixtures.slow_proxy import SlowProxy

    # The link to the real server passes at most 2 MiB/s (a real throttled socket): an upload of N MiB takes at
    # least N/2 s on any machine, so the measured rate can only say "too slow" for the short deadline below.
    link = SlowProxy(s3_server.port, 2 << 20)
    bucket = s3_server.bucket()

    def preempted(name: str, payload: int, deadline: float) -> tuple[Run, str, dict]:
        """A run whose checkpoints carry ``payload`` bytes, stopped by a GCP notice with ``deadline`` s once an
        upload has measured the rate."""
        gce = FakeMetadata("gcp")
        root = str(tmp_path / name)
        size_file = tmp_path / f"{name}.size"
        size_file.write_text(str(payload))
        run = Run(tmp_path, root, [*FAST, "--notices", "gcp", "--notice-endpoint", gce.url, "--notice-poll", "0.1",
                                   "--notice-gcp-deadline", str(deadline), "--metrics-addr", "off", "--every-steps",
                                   "100", "--keep-last", "2", "--remote", f"s3://{bucket}/{name}",
                                   "--remote-endpoint", link.endpoint, TRAINER, "--steps", "10000000",
                                   "--payload-size-file", str(size_file)],
                  env={**s3_server.env, notices.LOOPBACK_ONLY_ENV: "1"}, name=name)
        try:
            run.wait_event("upload_committed", timeout=120)
            gce.set_gcp("preempted", "TRUE")
            assert run.wait(90) is not None, run.stderr()
        finally:
            gce.close()
        return run, root, _status(root)

    try:
        # A generous deadline: the emergency checkpoint (1 MiB, about 0.5 s here) is uploaded at full speed and
        # committed before the exit.
        run, root, st = preempted("generous", 1 << 20, 60)
        assert run.wait(0) == exitcodes.PREEMPTED, run.stderr()
        emergency = [e for e in journal(root, "checkpoint") if e.get("kind") == "emergency"][-1]
        decided = journal(root, "emergency_upload")
        assert len(decided) == 1 and decided[0]["checkpoint"] == emergency["name"], decided
        d = decided[0]
        if d["attempt"]:  # the usual case: the paced background upload of it had not finished
            assert d["reason"].startswith("fits") and d["estimate_seconds"] <= 0.8 * d["seconds_left"], d
            assert 0 < d["bytes_per_second"] <= 2 << 20 and d["bytes"] >= 1 << 20, d
            assert [w["uploaded"] for w in journal(root, "remote_wait")] == [True], run.stderr()
        else:
            assert d["reason"] == "already on the remote tier" and not journal(root, "remote_wait"), d
        assert st["remote"]["emergency_upload"]["checkpoint"] == emergency["name"]
        tier = _tier(s3_server, f"s3://{bucket}/generous", monkeypatch)
        listed = {c.step: c for c in tier.checkpoints() if c.valid}  # the uploader is not waited for at the exit
        assert listed[emergency["step"]].kind == "emergency"
        # A deadline too short for the measured rate: 8 MiB need at least 4 s at 2 MiB/s, the notice leaves 4 s.
        # No upload is tried; the journal, the log and status say why with the figures; the run exits at once.
        run, root, st = preempted("short", 8 << 20, 4)
    finally:
        link.close()
    assert run.wait(0) == exitcodes.PREEMPTED, run.stderr()
    decided = journal(root, "emergency_upload")
    assert len(decided) == 1 and not decided[0]["attempt"], decided
    d = decided[0]
    assert d["reason"].startswith("does not fit") and "MiB/s" in d["reason"], d
    assert d["estimate_seconds"] >= 4 > d["seconds_left"] > 0 and d["bytes"] >= 8 << 20, d
    assert not journal(root, "remote_wait")  # nothing waited for
    assert st["remote"]["emergency_upload"] == {k: v for k, v in d.items() if k in st["remote"]["emergency_upload"]}
    assert "not uploading" in run.stderr() and "does not fit" in run.stderr()
