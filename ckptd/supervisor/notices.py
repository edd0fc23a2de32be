"""Cloud preemption notices: poll the platform's metadata service, post what it announces to the loop.

A spot VM is told it will go away before it does: AWS about 2 minutes ahead (IMDSv2
``spot/instance-action``), GCP about 30 s (``instance/preempted``), Azure at least 30 s (a ``Preempt``
scheduled event). A poller thread watches the one service of the cloud we run on and only posts
``("notice", Notice)`` and ``("notice_log", level, message)`` to the supervisor's queue; the core decides
(stopping.on_notice) what a notice means (stop with an emergency checkpoint, checkpoint, or log) and asks the poller to
acknowledge an Azure event once the stop is over (:meth:`Poller.acknowledge`).

``source: auto`` decides from local DMI data only (``/sys/class/dmi/id``, as cloud-init's ds-identify
does) and on any other machine starts nothing and opens no connection.

Bad answers (refused, timeouts, 401/403/5xx, malformed bodies, a deadline in the past or far in the
future, an Azure event for another VM) never become a notice: each kind of problem is logged once,
and polling backs off while the service fails. Whatever the service does, one request lasts at most its
timeout as a whole (connect, send and every read share one deadline: a server dripping bytes cannot
stretch it), and requests of one poller thread start at least ``poll`` seconds apart (a GCP server
answering ``wait_for_change`` at once cannot make it spin). Only the standard library is used
(``http.client``: no proxy from the environment is ever applied to a link-local address).

Over 600 lines on purpose: three clouds' pollers, each small, over one bounded request and one back-off.
"""

from __future__ import annotations

import calendar
import email.utils
import http.client
import io
import ipaddress
import json
import math
import os
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .config import NoticesConfig

DMI_DIR = "/sys/class/dmi/id"
DMI_DIR_ENV = "CKPTD_DMI_DIR"  # where `auto` reads DMI data (a container given the host's, tests)
LOOPBACK_ONLY_ENV = "CKPTD_NOTICES_LOOPBACK_ONLY"  # "1": refuse every endpoint that is not loopback (tests)
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
BASES = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
         "azure": "http://169.254.169.254"}

REQUEST_TIMEOUT = 2.0  # seconds for one whole request, connect to last byte (the GCP long poll adds its wait)
GCP_WAIT = 60  # seconds a GCP wait_for_change request waits for a change
GCP_MAINTENANCE_LEAD = 60.0  # seconds from a TERMINATE_ON_HOST_MAINTENANCE event to the deadline
BACKOFF_CAP = 30.0  # seconds: the longest pause between polls while the service fails
BACKOFF_POLLS = 16  # ... and at most this many poll intervals
CLOCK_SKEW = 60.0  # a deadline up to this far in the past is still a notice (clocks differ)
MAX_LEAD = 3600.0  # a deadline further ahead than this is not a preemption notice
MAX_BODY = 1 << 16  # bytes read from one answer


@dataclass(frozen=True)
class Notice:
    """What the platform announced. Times are unix seconds."""

    source: str  # aws | gcp | azure
    kind: str  # instance-action | rebalance | preempted | maintenance | Preempt | Terminate | Reboot | Redeploy
    action: str  # stop | checkpoint | log: what the config says to do about it
    received: float
    deadline: float | None  # when the machine goes away; None: not announced (rebalance)
    detail: str
    event_id: str | None = None  # Azure: acknowledged with StartRequests once the stop is over
    withdrawn: bool = False  # an earlier notice of this kind is gone (AWS rebalance)

    @property
    def lead(self) -> float | None:
        return None if self.deadline is None else round(self.deadline - self.received, 3)

    def fields(self) -> dict[str, Any]:
        out = asdict(self)
        out["lead_seconds"] = self.lead
        return out


class Problem(Exception):
    """A bad answer from the metadata service; ``kind`` groups it for logging once."""

    def __init__(self, kind: str, msg: str, failing: bool = True) -> None:
        super().__init__(msg)
        self.kind = kind
        self.failing = failing  # the service fails (back off) rather than saying something we ignore


# --- which cloud: local facts only ---------------------------------------------------------------------------


def detect(dmi_dir: str | None = None) -> tuple[str | None, str]:
    """Return (``aws``/``gcp``/``azure`` or None, why) from DMI data alone. Never touches the network."""
    dmi_dir = dmi_dir or os.environ.get(DMI_DIR_ENV) or DMI_DIR
    if not os.path.isdir(dmi_dir):
        return None, (f"no DMI data at {dmi_dir} (a container?): no cloud identified; "
                      "set notices.source to aws, gcp or azure to poll one")
    facts = {name: _read_fact(dmi_dir, name) for name in
             ("sys_vendor", "product_name", "bios_vendor", "bios_version", "chassis_asset_tag")}
    if "Amazon EC2" in (facts["sys_vendor"], facts["bios_vendor"]) or "amazon" in facts["bios_version"].lower():
        return "aws", f"DMI: sys_vendor={facts['sys_vendor']!r}, bios_vendor={facts['bios_vendor']!r} (AWS EC2)"
    if facts["product_name"] == "Google Compute Engine" or facts["bios_vendor"] == "Google":
        return "gcp", f"DMI: product_name={facts['product_name']!r} (Google Compute Engine)"
    if facts["sys_vendor"] == "Microsoft Corporation" and facts["chassis_asset_tag"] == AZURE_ASSET_TAG:
        return "azure", "DMI: sys_vendor='Microsoft Corporation' with Azure's chassis asset tag"
    return None, (f"not a known cloud VM (DMI sys_vendor={facts['sys_vendor']!r}, "
                  f"product_name={facts['product_name']!r}): no notices polled")


def _read_fact(dmi_dir: str, name: str) -> str:
    try:
        with open(os.path.join(dmi_dir, name), encoding="utf-8", errors="replace") as f:
            return f.read(256).strip()
    except OSError:
        return ""


def start(cfg: NoticesConfig, post: Callable[[tuple], None]) -> tuple[Poller | None, str]:
    """Start the poller the config asks for; returns it (None: nothing polled) and a line for the log."""
    source, why = cfg.source, ""
    if source == "off":
        return None, "cloud preemption notices: off"
    if source == "auto":
        detected, why = detect()
        if detected is None:
            return None, f"cloud preemption notices: auto: {why}"
        source, why = detected, f" (auto: {why})"
    base = cfg.endpoint or BASES[source]
    refused = _refused_endpoint(base)
    if refused:
        return None, f"cloud preemption notices: not polling {base}: {refused}"
    poller = POLLERS[source](cfg, post, base)
    poller.start()
    return poller, f"cloud preemption notices: polling {source} at {base}{why}"


def _refused_endpoint(base: str) -> str | None:
    if os.environ.get(LOOPBACK_ONLY_ENV) != "1":
        return None
    host = urllib.parse.urlsplit(base).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return None if loopback else f"{LOOPBACK_ONLY_ENV}=1 allows loopback addresses only"


# --- pollers -----------------------------------------------------------------------------------------------


class Poller:
    """One cloud's metadata service. Threads poll; results go to ``post``; nothing else is touched."""

    source = ""

    def __init__(self, cfg: NoticesConfig, post: Callable[[tuple], None], base: str) -> None:
        self.cfg = cfg
        self._post = post
        parts = urllib.parse.urlsplit(base)
        self.host, self.port = parts.hostname or "", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._logged: set[str] = set()
        self._failures = 0
        self._posted: set[str] = set()
        self._lock = threading.Lock()  # the GCP poller runs two threads
        self._acks: queue.SimpleQueue[str] = queue.SimpleQueue()

    # life cycle, called by the loop

    def start(self) -> None:
        for name, target in self._loops():
            thread = threading.Thread(target=self._guard, args=(target,), name=f"ckptd-notices-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def close(self, timeout: float = 3.0) -> None:
        """Stop polling; acknowledgements already asked for are sent first (bounded by ``timeout``)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def acknowledge(self, event_id: str) -> None:
        """Tell the platform it may go ahead with this event (Azure); a no-op elsewhere."""

    # the thread side

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        raise NotImplementedError

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave the run without a word
            self._log("error", f"cloud preemption notices: the {self.source} poller stopped after an unexpected "
                      f"error ({type(exc).__name__}: {exc}); training goes on without notices")

    def _log(self, level: str, msg: str) -> None:
        self._post(("notice_log", level, msg))

    def _notice(self, key: str, notice: Notice) -> None:
        """Post a notice once per ``key``."""
        with self._lock:
            if key in self._posted:
                return
            self._posted.add(key)
        self._post(("notice", notice))

    def _problem(self, problem: Problem) -> None:
        with self._lock:
            first = problem.kind not in self._logged
            self._logged.add(problem.kind)
        if first:
            backoff = "; polling backs off while it lasts" if problem.failing else ""
            self._log("warning", f"cloud preemption notices ({self.source}): {problem} (logged once{backoff}); "
                      "this is not a preemption notice, training goes on")
        if problem.failing:
            self._failures += 1

    def _answered(self) -> None:
        if self._failures >= 3:
            self._log("info", f"cloud preemption notices ({self.source}): the metadata service answers again")
        self._failures = 0

    def _delay(self) -> float:
        poll = self.cfg.poll
        if not self._failures:
            return poll
        cap = max(poll, min(BACKOFF_CAP, poll * BACKOFF_POLLS))
        return min(cap, poll * 2 ** min(self._failures, 20))

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _poll_then_wait(self, poll: Callable[[], None]) -> None:
        """One poll; a problem is logged once per kind and backs off only while the service fails."""
        try:
            poll()
            self._answered()
        except Problem as problem:
            self._problem(problem)
            if not problem.failing:
                self._answered()  # it answered, with something that is not a notice
        self._sleep(self._delay())

    def _request(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None,
                 timeout: float | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One HTTP request; transport failures become a :class:`Problem` named for their kind."""
        timeout = REQUEST_TIMEOUT if timeout is None else timeout
        conn = DeadlineConnection(self.host, self.port, time.monotonic() + timeout)
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(MAX_BODY)
            return resp.status, resp.headers, data
        except ConnectionRefusedError:
            raise Problem("refused", f"connection to {self.host}:{self.port} refused") from None
        except TimeoutError:
            raise Problem("timeout", f"no answer from {self.host}:{self.port} within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Problem("connection", f"request to {self.host}:{self.port} failed ({type(exc).__name__}: "
                          f"{exc})") from None
        finally:
            conn.close()

    def _status_problem(self, status: int, what: str) -> Problem:
        hint = {401: "not authorized (IMDSv2 token refused)", 403: "forbidden", 400: "bad request"}.get(status, "")
        return Problem(f"http-{status}", f"{what} answered HTTP {status}" + (f" ({hint})" if hint else ""))

    def _checked_deadline(self, deadline: float, now: float, what: str) -> float:
        if deadline < now - CLOCK_SKEW:
            raise Problem("deadline-past", f"{what} has a time {now - deadline:.0f} s in the past; ignored as stale",
                          failing=False)
        if deadline > now + MAX_LEAD:
            raise Problem("deadline-future", f"{what} has a time {deadline - now:.0f} s ahead, more than "
                          f"{MAX_LEAD:g} s; not a preemption notice", failing=False)
        return deadline


class AwsPoller(Poller):
    """IMDSv2: a session token (PUT, renewed before its TTL ends), then ``spot/instance-action`` and
    ``events/recommendations/rebalance`` every ``poll`` seconds."""

    source = "aws"
    TOKEN_TTL = 21600  # seconds asked for (1..21600)

    def __init__(self, cfg: NoticesConfig, post: Callable[[tuple], None], base: str,
                 token_ttl: int = TOKEN_TTL) -> None:
        super().__init__(cfg, post, base)
        self.token_ttl = token_ttl
        self._token: str | None = None
        self._renew_at = 0.0
        self._rebalance: str | None = None  # noticeTime of the rebalance recommendation seen last

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        return [("aws", self._run)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll_then_wait(self._poll_once)

    def _poll_once(self) -> None:
        action = self._get("/latest/meta-data/spot/instance-action")
        if action is not None:
            self._instance_action(action)
        self._rebalance_recommendation(self._get("/latest/meta-data/events/recommendations/rebalance"))

    def _get(self, path: str) -> bytes | None:
        """The body of a 200, None for a 404; a refused token is renewed once and the request repeated."""
        for attempt in (1, 2):
            status, _, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._session_token()})
            if status == 401 and attempt == 1:
                self._token = None  # expired or revoked (a restored snapshot, a clock jump): get a new one
                continue
            if status == 200:
                return body
            if status == 404:
                return None
            raise self._status_problem(status, path)
        return None

    def _session_token(self) -> str:
        now = time.monotonic()
        if self._token is None or now >= self._renew_at:
            status, _, body = self._request("PUT", "/latest/api/token",
                                            {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)})
            if status != 200 or not body.strip():
                raise self._status_problem(status, "the IMDSv2 token request")
            self._token = body.decode("ascii", "replace").strip()
            # Renewed well before the service expires it: at 80 % of the TTL, or half way for short TTLs.
            self._renew_at = now + self.token_ttl - max(self.token_ttl * 0.2, min(60.0, self.token_ttl / 2))
        return self._token

    def _instance_action(self, body: bytes) -> None:
        doc = _json_object(body, "spot/instance-action")
        action, when = doc.get("action"), doc.get("time")
        if not isinstance(action, str) or not isinstance(when, str):
            raise Problem("malformed", f"spot/instance-action without an action and a time: {_clip(body)}")
        now = time.time()
        deadline = self._checked_deadline(_iso_time(when, "spot/instance-action"), now, "spot/instance-action")
        self._notice(f"instance-action {action} {when}", Notice(
            "aws", "instance-action", self.cfg.on_notice, now, deadline, f"spot instance {action} at {when}"))

    def _rebalance_recommendation(self, body: bytes | None) -> None:
        if body is None:
            if self._rebalance is not None:
                self._post(("notice", Notice("aws", "rebalance", "log", time.time(), None,
                                             f"rebalance recommendation of {self._rebalance} withdrawn",
                                             withdrawn=True)))
                self._posted.discard(f"rebalance {self._rebalance}")
                self._rebalance = None
            return
        doc = _json_object(body, "events/recommendations/rebalance")
        when = doc.get("noticeTime")
        if not isinstance(when, str):
            raise Problem("malformed", f"rebalance recommendation without a noticeTime: {_clip(body)}")
        _iso_time(when, "events/recommendations/rebalance")
        self._rebalance = when
        self._notice(f"rebalance {when}", Notice("aws", "rebalance", self.cfg.rebalance, time.time(), None,
                                                 f"rebalance recommendation at {when}"))


class GcpPoller(Poller):
    """Compute Engine metadata: ``instance/preempted`` and ``instance/maintenance-event``, each long-polled
    with ``wait_for_change`` and ``last_etag`` in its own thread."""

    source = "gcp"
    HEADERS = {"Metadata-Flavor": "Google"}

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        return [("gcp-preempted", lambda: self._watch("preempted", self._preempted)),
                ("gcp-maintenance", lambda: self._watch("maintenance-event", self._maintenance))]

    def _watch(self, key: str, handle: Callable[[str], None]) -> None:
        etag: str | None = None
        failures = 0
        started = -math.inf
        while not self._stop.is_set():
            # At least `poll` between the starts of two requests, whatever the server does: one that answers
            # wait_for_change at once would otherwise be asked again at once, thousands of times a second.
            left = started + self.cfg.poll - time.monotonic()
            if left > 0:
                self._sleep(left)
                continue
            path = f"/computeMetadata/v1/instance/{key}"
            timeout = REQUEST_TIMEOUT
            if etag:
                path += f"?wait_for_change=true&timeout_sec={GCP_WAIT}&last_etag={urllib.parse.quote(etag)}"
                timeout += GCP_WAIT
            started = time.monotonic()
            try:
                status, headers, body = self._request("GET", path, self.HEADERS, timeout=timeout)
                if status != 200:
                    raise self._status_problem(status, f"instance/{key}")
                if headers.get("Metadata-Flavor") != "Google":
                    raise Problem("not-google", f"the answer to instance/{key} lacks 'Metadata-Flavor: Google': "
                                  "not the GCP metadata server")
                new_etag = headers.get("ETag")
                handle(body.decode("utf-8", "replace").strip())
                failures = 0
                self._answered()
                if not new_etag:
                    self._problem(Problem("no-etag", f"instance/{key} came without an ETag; polling every "
                                          f"{self.cfg.poll:g} s instead of waiting for changes", failing=False))
                elif etag and new_etag == etag and time.monotonic() - started < GCP_WAIT / 2:
                    self._problem(Problem("no-wait", f"instance/{key} answered wait_for_change at once without a "
                                          f"change; polling every {self.cfg.poll:g} s at most", failing=False))
                etag = new_etag
            except Problem as problem:
                self._problem(problem)
                if problem.failing:
                    failures += 1
                    etag = None
                    cap = max(self.cfg.poll, min(BACKOFF_CAP, self.cfg.poll * BACKOFF_POLLS))
                    self._sleep(min(cap, self.cfg.poll * 2 ** min(failures, 20)))

    def _preempted(self, value: str) -> None:
        if value == "TRUE":
            now = time.time()
            self._notice("preempted", Notice("gcp", "preempted", self.cfg.on_notice, now,
                                             now + self.cfg.gcp_deadline, "instance/preempted is TRUE"))
        elif value != "FALSE":
            raise Problem("malformed", f"instance/preempted is {value[:80]!r}, not TRUE or FALSE")

    def _maintenance(self, value: str) -> None:
        now = time.time()
        if value == "NONE":
            with self._lock:
                self._posted = {k for k in self._posted if not k.startswith("maintenance ")}
        elif value == "TERMINATE_ON_HOST_MAINTENANCE":
            self._notice(f"maintenance {value}", Notice("gcp", "maintenance", self.cfg.on_notice, now,
                                                        now + GCP_MAINTENANCE_LEAD, value))
        elif value.startswith("MIGRATE_ON_HOST_MAINTENANCE"):
            self._notice(f"maintenance {value}", Notice("gcp", "maintenance", "log", now, None,
                                                        f"{value}: live migration, training goes on"))
        else:
            raise Problem("malformed", f"instance/maintenance-event is {value[:80]!r}")


class AzurePoller(Poller):
    """Scheduled Events: ``Preempt``/``Terminate`` (and ``Reboot``/``Redeploy`` if configured) for this VM,
    deadline ``NotBefore``; acknowledged with ``StartRequests`` when the loop says the stop is over."""

    source = "azure"
    HEADERS = {"Metadata": "true"}
    EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"
    NAME = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"

    def __init__(self, cfg: NoticesConfig, post: Callable[[tuple], None], base: str) -> None:
        super().__init__(cfg, post, base)
        self.vm_name: str | None = None
        self._ignored: set[str] = set()

    def acknowledge(self, event_id: str) -> None:
        self._acks.put(event_id)
        self._wake.set()

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        return [("azure", self._run)]

    def _run(self) -> None:
        retry: list[str] = []
        while True:
            retry = self._send_acks(retry)
            if self._stop.is_set():
                break
            self._poll_then_wait(self._poll_once)

    def _poll_once(self) -> None:
        if self.vm_name is None:
            self.vm_name = self._vm_name()
        self._events()

    def _vm_name(self) -> str:
        status, _, body = self._request("GET", self.NAME, self.HEADERS)
        if status != 200:
            raise self._status_problem(status, "instance/compute/name")
        name = body.decode("utf-8", "replace").strip()
        if not name or len(name) > 256 or any(c in name for c in "\r\n\"{}"):
            raise Problem("malformed", f"instance/compute/name is {_clip(body)}")
        return name

    def _events(self) -> None:
        status, _, body = self._request("GET", self.EVENTS, self.HEADERS)
        if status != 200:
            raise self._status_problem(status, "scheduledevents")
        doc = _json_object(body, "scheduledevents")
        events = doc.get("Events")
        if not isinstance(events, list):
            raise Problem("malformed", f"scheduledevents without an Events list: {_clip(body)}")
        for ev in events:
            try:
                self._event(ev)
            except Problem as problem:  # one bad event must not hide the others
                self._problem(problem)

    def _event(self, ev: Any) -> None:
        if not isinstance(ev, dict) or not isinstance(ev.get("EventId"), str) or not ev["EventId"]:
            raise Problem("malformed", f"a scheduled event without an EventId: {_clip(json.dumps(ev).encode())}")
        event_id, kind = ev["EventId"], ev.get("EventType")
        if kind not in self.cfg.azure_events or event_id in self._posted or event_id in self._ignored:
            return
        resources = ev.get("Resources")
        if not isinstance(resources, list):
            raise Problem("malformed", f"scheduled event {event_id} has no Resources list")
        if self.vm_name not in resources:
            self._ignored.add(event_id)
            raise Problem("other-vm", f"{kind} event {event_id} is for {', '.join(map(str, resources))[:200]}, "
                          f"not this VM ({self.vm_name})", failing=False)
        now = time.time()
        not_before = ev.get("NotBefore")
        if not_before in ("", None) and ev.get("EventStatus") == "Started":
            deadline = now  # already under way: no time left
        elif isinstance(not_before, str):
            deadline = self._checked_deadline(_http_time(not_before, f"event {event_id} NotBefore"), now,
                                              f"{kind} event {event_id}")
        else:
            raise Problem("malformed", f"scheduled event {event_id} has no NotBefore")
        self._notice(event_id, Notice("azure", kind, self.cfg.on_notice, now, deadline,
                                      f"{kind} event {event_id} not before {not_before or 'now (started)'}",
                                      event_id=event_id))

    def _send_acks(self, retry: list[str]) -> list[str]:
        pending = list(retry)
        while True:
            try:
                pending.append(self._acks.get_nowait())
            except queue.Empty:
                break
        left = []
        for event_id in dict.fromkeys(pending):
            body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
            try:
                status, _, _ = self._request("POST", self.EVENTS, {**self.HEADERS, "Content-Type": "application/json"},
                                             body=body)
                if status != 200:
                    raise self._status_problem(status, "the StartRequests acknowledgement")
                self._log("info", f"cloud preemption notices (azure): acknowledged event {event_id}; "
                          "the platform may go ahead")
            except Problem as problem:
                self._problem(problem)
                if not self._stop.is_set():
                    left.append(event_id)
        return left


POLLERS: dict[str, type[Poller]] = {"aws": AwsPoller, "gcp": GcpPoller, "azure": AzurePoller}


# --- one request, one deadline -------------------------------------------------------------------------------


class DeadlineConnection(http.client.HTTPConnection):
    """``http.client`` with one deadline (monotonic) for the whole request: connect, send and each read
    get only the time left, so a server that sends a byte now and then cannot hold the poller past it
    (a socket timeout alone bounds each ``recv``, not their sum)."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        super().__init__(host, port, timeout=_left(deadline))
        self.deadline = deadline

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), _left(self.deadline))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = _DeadlineSocket(sock, self.deadline)


class _DeadlineSocket:
    """What ``http.client`` uses of a socket (sendall, makefile, close), each call given the time left."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_left(self._deadline))
        self._sock.sendall(data)  # Python >= 3.5: the timeout bounds the whole sendall

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        self._sock.close()


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self._sock.settimeout(_left(self._deadline))
        return self._sock.recv_into(b)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's deadline passed")
    return left


# --- parsing ------------------------------------------------------------------------------------------------


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise Problem("malformed", f"{what} is not JSON: {_clip(body)}") from None
    if not isinstance(doc, dict):
        raise Problem("malformed", f"{what} is not a JSON object: {_clip(body)}")
    return doc


def _iso_time(text: str, what: str) -> float:
    """``2017-09-18T08:22:00Z`` (UTC) -> unix time."""
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    raise Problem("malformed", f"{what}: time {text[:80]!r} is not like 2017-09-18T08:22:00Z")


def _http_time(text: str, what: str) -> float:
    """``Mon, 11 Apr 2022 22:26:58 GMT`` -> unix time."""
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise Problem("malformed", f"{what}: {text[:80]!r} is not like 'Mon, 11 Apr 2022 22:26:58 GMT'")
    return parsed.timestamp()


def _clip(body: bytes) -> str:
    text = body[:120].decode("utf-8", "replace")
    return repr(text) + ("..." if len(body) > 120 else "")
