"""The metrics endpoint of a real `ckptd run` (torch-free fixture trainer): port 0 shown in status and the
journal, /healthz (and no /status: that is `ckptd status`, owner-only), the file_sd entry written and removed, a
busy port that does not stop training, a run that gave up served for `--metrics-linger`, and `off`."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from ckptd import exitcodes
from fixtures.sup_helpers import FAST, PLAIN, TRAINER, Run, ckptd, http_get, wait_for

get = http_get


def status(root: str) -> dict:
    r = ckptd("status", "--dir", root, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def sample(body: bytes, line_start: str) -> float | None:
    for line in body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_port_0_is_shown_in_status_and_journal_and_the_sd_entry_lives_as_long_as_the_run(tmp_path):
    root, sd_dir = str(tmp_path / "ck"), tmp_path / "sd"
    sd_dir.mkdir()
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "127.0.0.1:0", "--metrics-sd-file", f"{sd_dir}/",
                               "--every-steps", "20", TRAINER, "--steps", "100000", "--send-metrics"])
    start = run.wait_event("start")
    addr = start["metrics"]["addr"]
    assert start["metrics"]["state"] == "serving" and addr.startswith("127.0.0.1:") and not addr.endswith(":0")
    base = f"http://{addr}"
    wait_for(lambda: (sample(get(base + "/metrics")[1], "ckptd_last_checkpoint_step") or -1) >= 20, 20,
             "a checkpoint to show in the metrics")
    body = get(base + "/metrics")[1]
    assert sample(body, 'ckptd_train_metric{name="loss"}') is not None and sample(body, "ckptd_child_up") == 1
    st = status(root)
    assert st["metrics"]["addr"] == addr and st["metrics"]["url"] == base + "/metrics"
    r = ckptd("status", "--dir", root)
    assert f"metrics:    {base}/metrics" in r.stdout, r.stdout
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/status")[0] == 404  # the run's details: `ckptd status`, over the owner-only socket
    assert st["run_id"] and st["running"] is True
    [sd_file] = os.listdir(sd_dir)
    assert json.loads((sd_dir / sd_file).read_text()) == [{"targets": [addr], "labels": {}}]
    assert st["metrics"]["sd_file"] == str(sd_dir / sd_file)
    run.signal(signal.SIGTERM)
    assert run.wait() == exitcodes.PREEMPTED
    assert os.listdir(sd_dir) == []
    try:
        socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1])), timeout=1).close()
        raise AssertionError("the endpoint still listens after the run ended")
    except OSError:
        pass


def test_a_busy_port_never_stops_training_one_warning_and_status_says_unavailable(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    root = str(tmp_path / "ck")
    try:
        run = Run(tmp_path, root, [*FAST, "--metrics-addr", f"127.0.0.1:{port}", TRAINER, "--steps", "100000"])
        run.wait_event("spawn")
        st = wait_for(lambda: status(root) if status(root).get("trainers") else None, 20, "the trainer")
        assert st["state"] == "running" and st["metrics"]["state"] == "unavailable"
        assert f"127.0.0.1:{port}" in st["metrics"]["error"]
        [line] = [x for x in ckptd("status", "--dir", root).stdout.splitlines() if x.startswith("metrics:")]
        assert "unavailable: cannot listen on" in line, line
        run.signal(signal.SIGTERM)
        assert run.wait() == exitcodes.PREEMPTED
    finally:
        holder.close()
    assert run.stderr().count("metrics unavailable") == 1, run.stderr()


def test_a_run_that_gave_up_is_served_for_the_linger_time_with_healthz_503_and_a_signal_ends_it(tmp_path):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "127.0.0.1:0", "--metrics-linger", "60", PLAIN, "--crash"])
    addr = run.wait_event("start")["metrics"]["addr"]
    run.wait_event("give_up")
    base = f"http://{addr}"
    code, _ = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(base + "/healthz")), 10, "healthz 503")
    body = get(base + "/metrics")[1]
    assert sample(body, 'ckptd_state{state="gave_up"}') == 1 and sample(body, "ckptd_child_up") == 0
    t0 = time.monotonic()
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.GAVE_UP and time.monotonic() - t0 < 30  # not the 60 s linger


def test_metrics_off_serves_nothing_and_tells_the_trainer(tmp_path):
    root = str(tmp_path / "ck")
    out = tmp_path / "env.txt"
    run = Run(tmp_path, root, ["--metrics-addr", "off", "--", "sh", "-c", f'echo "$CKPTD_METRICS" > {out}'])
    assert run.wait() == 0
    assert out.read_text().strip() == "0"
    assert run.events("start")[0]["metrics"]["state"] == "off"
    assert " info: serving metrics" not in run.stderr() and "metrics unavailable" not in run.stderr()


def test_the_real_library_sends_its_loss_and_save_timings_to_the_supervisor(tmp_path):
    """examples/train_toy.py (torch, ckptd.Checkpointer): ck.step(metrics={"loss": ...}) reaches
    ckptd_train_metric; its saves' stall and duration and sizes reach the histograms; a resumed run reports
    its restore time."""
    toy = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_toy.py")
    first = str(tmp_path / "ck")
    for life, steps in enumerate((120, 240)):
        # The second life continues the finished first run with more steps: a branch from its newest checkpoint
        # (`ckptd run` refuses to extend a finished run in place under another command).
        root = first if life == 0 else str(tmp_path / "ck-longer")
        branch = [] if life == 0 else ["--resume-from", os.path.join(first, "latest")]
        run = Run(tmp_path, root, [*FAST, *branch, "--metrics-addr", "127.0.0.1:0", "--metrics-linger", "30", toy,
                                   "--steps", str(steps), "--every-steps", "50", "--step-delay", "0.01"],
                  name=f"toy{life}")
        addr = run.wait_event("start")["metrics"]["addr"]
        run.wait_event("end", timeout=60)
        body = wait_for(lambda addr=addr: (lambda r: r[1] if r[0] == 503 else None)(get(f"http://{addr}/healthz")) and
                        get(f"http://{addr}/metrics")[1], 10, "the finished run's metrics")
        assert sample(body, 'ckptd_state{state="finished"}') == 1
        loss = sample(body, 'ckptd_train_metric{name="loss"}')
        assert loss is not None and loss > 0
        assert sample(body, "ckptd_checkpoint_stall_seconds_count") >= 2
        assert sample(body, "ckptd_checkpoint_duration_seconds_count") >= 2
        assert sample(body, "ckptd_checkpoint_bytes") > 1000
        restore = sample(body, "ckptd_restore_seconds")
        assert (restore != restore) if life == 0 else 0 < restore < 10  # NaN before any restore
        run.signal(signal.SIGTERM)  # ends the linger
        assert run.wait(10) == 0
