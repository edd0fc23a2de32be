"""supervisor/notices.py: which cloud (DMI only), each cloud's poller against a strict local fake, bad answers,
and the `notices:`/`slurm:` config sections. End-to-end runs are in test_notices_run.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml

from ckptd import exitcodes
from ckptd.errors import ConfigError
from ckptd.supervisor import notices
from ckptd.supervisor.config import NoticesConfig, resolve
from fixtures.fake_metadata import FakeMetadata, free_port, iso
from fixtures.sup_helpers import ckptd, hold, wait_for

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes


class Posted:
    """Collects what a poller posts to the loop's queue."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.lock = threading.Lock()

    def __call__(self, event: tuple) -> None:
        with self.lock:
            self.items.append(event)

    def notices(self) -> list[notices.Notice]:
        with self.lock:
            return [e[1] for e in self.items if e[0] == "notice"]

    def logs(self) -> list[str]:
        with self.lock:
            return [e[2] for e in self.items if e[0] == "notice_log"]


@pytest.fixture
def fake(request):
    servers = []

    def make(cloud: str) -> FakeMetadata:
        servers.append(FakeMetadata(cloud))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def poller(cloud: str, url: str, token_ttl: int | None = None, **cfg):
    posted = Posted()
    cfg.setdefault("poll", 0.05)
    extra = {"token_ttl": token_ttl} if token_ttl else {}
    return notices.POLLERS[cloud](NoticesConfig(source=cloud, endpoint=url, **cfg), posted, url, **extra), posted


# --- which cloud --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("facts, expected", [
    ({"sys_vendor": "Amazon EC2", "bios_vendor": "Amazon EC2", "product_name": "g5.xlarge"}, "aws"),
    ({"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, "aws"),
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine", "bios_vendor": "Google"}, "gcp"),
    ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"}, "azure"),
    ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "0000-on-premises"}, None),  # Hyper-V, not Azure
    ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, None),
    ({"sys_vendor": "Dell Inc.", "product_name": "PowerEdge R750"}, None),
])
def test_auto_names_the_cloud_from_dmi_facts_only(tmp_path, facts, expected):
    for name, value in facts.items():
        (tmp_path / name).write_text(value + "\n")
    source, why = notices.detect(str(tmp_path))
    assert source == expected, why


def test_auto_without_dmi_data_polls_nothing_and_says_how_to_choose(tmp_path, monkeypatch):
    monkeypatch.setenv(notices.DMI_DIR_ENV, str(tmp_path / "absent"))
    poller_, line = notices.start(NoticesConfig(source="auto"), Posted())
    assert poller_ is None and "no DMI data" in line and "notices.source" in line
    assert not [t for t in threading.enumerate() if t.name.startswith("ckptd-notices")]


def test_the_loopback_guard_refuses_any_other_endpoint(monkeypatch):
    monkeypatch.setenv(notices.LOOPBACK_ONLY_ENV, "1")
    for cfg in (NoticesConfig(source="aws"), NoticesConfig(source="azure", endpoint="http://10.0.0.1:80")):
        poller_, line = notices.start(cfg, Posted())
        assert poller_ is None and "loopback" in line, line


# --- AWS ----------------------------------------------------------------------------------------------------


def test_aws_token_is_put_with_its_ttl_and_renewed_before_it_expires(fake):
    imds = fake("aws")
    p, posted = poller("aws", imds.url, token_ttl=1)
    p.start()
    try:
        wait_for(lambda: imds.count("/latest/api/token", "PUT") >= 3, 10, "three token PUTs")
        wait_for(lambda: imds.count("instance-action") >= 20, 10, "polls")
    finally:
        p.close()
    assert set(imds.token_ttls) == {"1"} and not imds.violations
    assert not [r for r in imds.requests if r.get("unauthorized")], "a GET used an expired token"
    assert not posted.notices() and not posted.logs()


def test_aws_spot_notice_carries_its_deadline_and_a_revoked_token_is_replaced(fake):
    imds = fake("aws")
    p, posted = poller("aws", imds.url)
    p.start()
    try:
        wait_for(lambda: imds.count("instance-action") >= 2, 10, "polls")
        imds.set(tokens={})  # every token revoked (a snapshot restore): the next GET gets 401
        when = time.time() + 120
        imds.set(instance_action={"action": "terminate", "time": iso(when)})
        n = wait_for(posted.notices, 10, "the notice")[0]
        polls = imds.count("instance-action")
        wait_for(lambda: imds.count("instance-action") >= polls + 3, 10, "more polls of the same notice")
    finally:
        p.close()
    assert (n.source, n.kind, n.action) == ("aws", "instance-action", "stop")
    assert n.deadline == int(when) and 115 < n.lead <= 120
    assert len(posted.notices()) == 1 and not posted.logs() and not imds.violations


def test_aws_rebalance_recommendation_then_withdrawn(fake):
    imds = fake("aws")
    p, posted = poller("aws", imds.url, rebalance="checkpoint")
    p.start()
    try:
        imds.set(rebalance={"noticeTime": iso(time.time())})
        wait_for(posted.notices, 10, "the rebalance notice")
        imds.set(rebalance=None)
        wait_for(lambda: len(posted.notices()) == 2, 10, "the withdrawal")
    finally:
        p.close()
    first, second = posted.notices()
    assert (first.kind, first.action, first.deadline, first.withdrawn) == ("rebalance", "checkpoint", None, False)
    assert second.withdrawn and second.action == "log"


# --- bad answers: logged once per kind, never a notice, polling backs off -----------------------------------


CLOUDS = ("aws", "gcp", "azure")


@pytest.mark.parametrize("mode, words", [
    ("500", "HTTP 500"), ("401", "HTTP 401"), ("403", "HTTP 403"), ("garbage", ""), ("hang", "no answer"),
])
def test_a_failing_service_is_logged_once_backed_off_and_never_a_notice(fake, monkeypatch, mode, words):
    """All three clouds at once, each against its own misbehaving fake."""
    monkeypatch.setattr(notices, "REQUEST_TIMEOUT", 0.2)
    runs = []
    for cloud in CLOUDS:
        svc = fake(cloud)
        svc.set(mode=mode)
        runs.append((cloud, svc, *poller(cloud, svc.url)))
    for _, _, p, _ in runs:
        p.start()
    # the window in which requests are counted (a healthy poller makes ~24 polls here); never a notice in it
    hold(lambda: [assert_no_notice(cloud, posted) for cloud, _, _, posted in runs], 1.2)
    for cloud, svc, p, posted in runs:
        p.close(timeout=0.3)
        svc.release()
        logs = posted.logs()
        assert not posted.notices(), (cloud, posted.notices())
        assert len(logs) == 1, (cloud, logs)  # once, however many polls failed
        assert words in logs[0] and "not a preemption notice" in logs[0], (cloud, logs)
        assert len(svc.requests) <= 12, f"{cloud}: {len(svc.requests)} requests in 1.2 s: no backoff"


def test_connection_refused_is_logged_once_and_never_a_notice():
    runs = [poller(cloud, f"http://127.0.0.1:{free_port()}") for cloud in CLOUDS]
    for p, _ in runs:
        p.start()
    hold(lambda: [assert_no_notice("refused", posted) for _, posted in runs], 1.0)
    for p, posted in runs:
        p.close()
        assert not posted.notices()
        assert len(posted.logs()) == 1 and "refused" in posted.logs()[0], posted.logs()


@pytest.mark.parametrize("when, kind", [(-7200, "past"), (3 * 86400, "ahead")])
def test_aws_a_time_in_the_past_or_far_future_is_no_notice(fake, when, kind):
    imds = fake("aws")
    imds.set(instance_action={"action": "terminate", "time": iso(time.time() + when)})
    p, posted = poller("aws", imds.url)
    p.start()
    wait_for(lambda: imds.count("instance-action") >= 10, 10, "polls")
    p.close()
    assert not posted.notices()
    assert len(posted.logs()) == 1 and kind in posted.logs()[0], posted.logs()


def test_aws_malformed_instance_action_is_no_notice(fake):
    imds = fake("aws")
    imds.set(raw_instance_action=b'{"action": "terminate"}')  # no time
    p, posted = poller("aws", imds.url)
    p.start()
    wait_for(lambda: imds.count("instance-action") >= 3, 10, "polls")
    imds.set(raw_instance_action=b'{"action": "terminate", "time": "soon"}')
    seen = imds.count("instance-action")
    wait_for(lambda: imds.count("instance-action") >= seen + 2, 10, "polls")
    p.close()
    assert not posted.notices()
    assert len(posted.logs()) == 1, posted.logs()  # one kind of problem (malformed), logged once


# --- GCP ----------------------------------------------------------------------------------------------------


def test_gcp_long_polls_with_etag_and_the_deadline_is_the_notice_plus_the_configured_lead(fake):
    gce = fake("gcp")
    p, posted = poller("gcp", gce.url, gcp_deadline=25.0)
    p.start()
    try:
        wait_for(lambda: [r for r in gce.requests if "wait_for_change=true" in r["path"] and "preempted" in r["path"]],
                 10, "a long poll")
        before = len(gce.requests)

        def waiting_on_the_server() -> None:
            assert len(gce.requests) - before <= 2  # a long poll, not polling

        hold(waiting_on_the_server, 0.5)
        flipped = time.time()
        gce.set_gcp("preempted", "TRUE")
        n = wait_for(posted.notices, 5, "the notice")[0]
        gce.set_gcp("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
        m = wait_for(lambda: posted.notices()[1:], 5, "the maintenance notice")[0]
    finally:
        p.close(timeout=0.2)
        gce.release()
    assert n.received - flipped < 1.0
    assert (n.source, n.kind, n.action) == ("gcp", "preempted", "stop") and n.lead == 25.0
    assert (m.kind, m.action, m.deadline) == ("maintenance", "log", None)  # a live migration stops nothing
    waits = [r["path"] for r in gce.requests if "wait_for_change" in r["path"]]
    assert all("last_etag=" in w and "timeout_sec=" in w for w in waits)
    assert not gce.violations


def test_gcp_a_server_answering_wait_for_change_at_once_is_asked_at_most_once_per_poll_interval(fake):
    """The server ignores wait_for_change and answers at once, unchanged: each watcher still starts its
    requests at least `poll` apart (a machine under load only makes fewer), and says so once."""
    gce = fake("gcp")
    gce.set(mode="eager")
    poll = 0.2
    p, posted = poller("gcp", gce.url, poll=poll)
    t0 = time.monotonic()
    p.start()
    try:
        wait_for(lambda: gce.count("/instance/") >= 12, 30, "a dozen requests")
    finally:
        p.close(timeout=3)
    elapsed = time.monotonic() - t0
    n = gce.count("/instance/")
    assert n <= 2 * (elapsed / poll + 1), f"{n} requests in {elapsed:.2f} s from 2 watchers polling every {poll} s"
    said = [line for line in posted.logs() if "answered wait_for_change at once" in line]
    assert len(said) == 1, posted.logs()  # logged once
    assert not posted.notices()


def test_one_request_is_bounded_as_a_whole_however_slowly_the_server_drips_its_answer(fake, monkeypatch):
    """A byte every 0.25 s keeps every single read well inside the timeout; the request still ends at its
    deadline (REQUEST_TIMEOUT from its start), long before the answer would be complete."""
    monkeypatch.setattr(notices, "REQUEST_TIMEOUT", 1.0)
    imds = fake("aws")
    imds.set(mode="drip")
    p, posted = poller("aws", imds.url)
    p.start()
    try:
        wait_for(posted.logs, 30, "the poller to give up on the dripping answer")
        wait_for(imds.drip_done.is_set, 30, "the poller to hang up")
    finally:
        p.close(timeout=0.5)
        imds.release()
    assert "no answer" in posted.logs()[0] and "not a preemption notice" in posted.logs()[0], posted.logs()
    assert imds.drip_sent < imds.drip_total, (imds.drip_sent, imds.drip_total)  # cut off, not read to the end
    assert not posted.notices()


# --- Azure --------------------------------------------------------------------------------------------------


def test_azure_acts_on_this_vms_preempt_only_and_acknowledges_it(fake):
    az = fake("azure")
    az.add_azure_event("Preempt", time.time() + 40, resources=["some-other-vm"])
    az.add_azure_event("Freeze", time.time() + 40)
    p, posted = poller("azure", az.url)
    p.start()
    try:
        wait_for(lambda: az.count("scheduledevents") >= 5, 10, "polls")
        assert not posted.notices()
        not_before = time.time() + 35
        event_id = az.add_azure_event("Preempt", not_before)
        n = wait_for(posted.notices, 10, "the notice")[0]
        p.acknowledge(event_id)
        wait_for(lambda: az.acks, 5, "the acknowledgement")
    finally:
        p.close()
    assert (n.source, n.kind, n.event_id) == ("azure", "Preempt", event_id)
    assert n.deadline == int(not_before)
    assert az.acks == [{"StartRequests": [{"EventId": event_id}]}] and not az.violations
    assert len(posted.notices()) == 1
    other = [m for m in posted.logs() if "some-other-vm" in m]
    assert len(other) == 1 and "not this VM (ckptd-test-vm)" in other[0]
    assert az.count("compute/name") == 1


def test_azure_close_sends_an_acknowledgement_still_owed(fake):
    az = fake("azure")
    event_id = az.add_azure_event("Terminate", time.time() + 300)
    p, posted = poller("azure", az.url, poll=5.0)
    p.start()
    wait_for(posted.notices, 10, "the notice")
    p.acknowledge(event_id)
    p.close()
    assert az.acks == [{"StartRequests": [{"EventId": event_id}]}]


def test_azure_bad_not_before_is_no_notice(fake):
    az = fake("azure")
    az.events.append({"EventId": "e1", "EventType": "Preempt", "Resources": [az.vm_name],
                      "EventStatus": "Scheduled", "NotBefore": "tomorrow-ish"})
    az.add_azure_event("Preempt", time.time() - 86400)
    p, posted = poller("azure", az.url)
    p.start()
    wait_for(lambda: az.count("scheduledevents") >= 10, 10, "polls")
    p.close()
    assert not posted.notices()
    assert len(posted.logs()) == 2, posted.logs()  # malformed, and in the past: two kinds, each once


# --- config -------------------------------------------------------------------------------------------------


@pytest.mark.kind("system")
def test_notices_and_slurm_sections_in_the_file_flags_win_and_config_show_prints_them(tmp_path):
    path = tmp_path / "ckptd.yaml"
    path.write_text("grace: 10\nnotices:\n  source: aws\n  endpoint: http://127.0.0.1:9/\n  poll: 0.5\n"
                    "  rebalance: checkpoint\nslurm:\n  requeue: true\n")
    cfg = resolve(str(path), {"notices.poll": "2", "notices.on_notice": "checkpoint"})
    assert (cfg.notices.source, cfg.notices.endpoint, cfg.notices.poll) == ("aws", "http://127.0.0.1:9", 2.0)
    assert (cfg.notices.rebalance, cfg.notices.on_notice, cfg.slurm.requeue) == ("checkpoint", "checkpoint", True)
    assert resolve(None, {}).notices == NoticesConfig() and NoticesConfig().source == "auto"
    r = ckptd("config", "show", "--config", str(path), "--notices", "gcp", "--notice-gcp-deadline", "20")
    shown = yaml.safe_load(r.stdout)
    assert shown["notices"]["source"] == "gcp" and shown["notices"]["gcp_deadline"] == 20
    assert shown["slurm"] == {"requeue": True}
    r = ckptd("config", "show", "--json", "--slurm-requeue", "--notice-azure-event", "Reboot")
    data = json.loads(r.stdout)
    assert data["slurm"]["requeue"] is True and data["notices"]["azure_events"] == ["Reboot"]
    assert ckptd("config", "check", str(path)).returncode == 0


@pytest.mark.parametrize("text, words", [
    ("notices:\n  source: ibm\n", [".yaml:2:", "key 'notices.source'", "aws, gcp, azure"]),
    ("grace: 1\nnotices:\n  sorce: aws\n",
     [".yaml:3:", "unknown key 'notices.sorce'", "did you mean 'notices.source'"]),
    ("source: aws\n", [".yaml:1:", "unknown key 'source'", "'notices:' section"]),
    ("notices: aws\n", [".yaml:1:", "section 'notices' must be a mapping"]),
    ("notices:\n  poll: 0\n", [".yaml:2:", "notices.poll", "> 0"]),
    ("notices:\n  endpoint: 169.254.169.254\n", ["notices.endpoint", "base URL"]),
    ("notices:\n  on_notice: pray\n", ["notices.on_notice", "stop, checkpoint"]),
    ("notices:\n  rebalance: ignore\n", ["notices.rebalance", "log, checkpoint, stop"]),
    ("notices:\n  azure_events: [Freeze]\n", ["notices.azure_events", "Preempt"]),
    ("slurm:\n  requeue: maybe\n", [".yaml:2:", "slurm.requeue", "true or false"]),
    ("notices:\n  poll: 1\n  poll: 2\n", [".yaml:3:", "'notices.poll' appears twice"]),
])
@pytest.mark.kind("system")
def test_bad_section_values_name_the_dotted_key_and_line(tmp_path, text, words):
    path = tmp_path / "ckptd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve(str(path), {})
    for w in words:
        assert w in str(err.value), str(err.value)
    assert err.value.exit_code == exitcodes.CONFIG
    r = ckptd("config", "check", str(path))
    assert r.returncode == exitcodes.CONFIG and r.stderr.count("\n") == 1


@pytest.mark.kind("system")
def test_a_bad_notice_flag_is_a_usage_error(tmp_path):
    for flags, words in ((["--notices", "ibm"], "option --notices"), (["--notice-poll", "-1"], "--notice-poll"),
                         (["--on-notice", "pray"], "--on-notice"), (["--notice-endpoint", "ftp://x"], "base URL")):
        r = ckptd("run", *flags, "--dir", str(tmp_path / "ck"), "--", "true")
        assert r.returncode == exitcodes.USAGE and words in r.stderr, (flags, r.stderr)
    assert not (tmp_path / "ck").exists()


def assert_no_notice(what: str, posted) -> None:
    assert not posted.notices(), (what, posted.notices())
