"""`ckptd run` configuration: one schema for the YAML file and the command line.

Every option has a key in the YAML file (``yaml.safe_load`` semantics) and a
``--flag`` on the command line; flags override the file. Each value is parsed
and checked once here, so a bad value is a :class:`~ckptd.errors.ConfigError`
that names the key (and the file line) before anything is started: exit 78 for
the file, and :class:`OptionError` (exit 2, a usage error) for a command-line flag.

    >>> cfg = resolve(None, {"every_steps": "100", "grace": "10"})
    >>> cfg.every_steps, cfg.grace
    (100, 10.0)

Sections (``notices:``, ``slurm:``, ``metrics:``) are YAML mappings in the file; their keys are
spelled ``section.key`` everywhere else (errors, :data:`OPTIONS`), and the values
live in a frozen dataclass per section (``cfg.notices.source``):

    >>> resolve(None, {"notices.source": "off"}).notices.source
    'off'
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import reprlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import exitcodes
from ..errors import ConfigError

# The shortest interval `every` accepts: a checkpoint is at least a full write and fsync of the state.
MIN_EVERY_SECONDS = 1.0

# Bounds on a config file (a real one is a few hundred bytes, a few dozen YAML nodes): a YAML alias bomb of
# 456 bytes expands to 9**9 values; refused by counting nodes with aliases expanded, before constructing.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 10_000
MAX_CONFIG_DEPTH = 32
MAX_SHOWN = 80  # characters of a value shown in an error message
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = MAX_SHOWN
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 3, 6, 6
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: nothing a path, name or URL needs

# Signals a user may pick as "checkpoint and exit for requeue" (SLURM: --signal=B:USR1@120).
REQUEUE_SIGNALS = ("USR1", "USR2")

NOTICE_SOURCES = ("auto", "aws", "gcp", "azure", "off")
AZURE_EVENT_TYPES = ("Preempt", "Terminate", "Reboot", "Redeploy")


class OptionError(ConfigError):
    """A bad value given on the command line: a usage error (exit 2); a bad value in the file stays exit 78."""

    exit_code = exitcodes.USAGE


@dataclass(frozen=True)
class NoticesConfig:
    """``notices:`` - the cloud's own preemption notices (supervisor/notices.py)."""

    source: str = "auto"  # auto | aws | gcp | azure | off
    endpoint: str | None = None  # base URL of the metadata service (tests, unusual clouds)
    poll: float = 1.0  # seconds between polls (AWS, Azure); GCP long-polls
    rebalance: str = "log"  # AWS rebalance recommendation: log | checkpoint | stop
    on_notice: str = "stop"  # stop: emergency checkpoint, exit 85 | checkpoint: checkpoint, keep training
    gcp_deadline: float = 30.0  # GCP gives no time: the deadline is this long after the notice
    azure_events: tuple[str, ...] = ("Preempt", "Terminate")  # Azure event types acted on


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics:`` - the Prometheus endpoint the supervisor serves (supervisor/metrics.py, docs/metrics.md)."""

    addr: str | None = "127.0.0.1:9477"  # HOST:PORT; None (`off`) serves nothing; port 0 picks a free one
    sd_file: str | None = None  # Prometheus file_sd entry for this run (a file, or a directory: one file per run)
    linger: float = 0.0  # seconds the endpoint stays up after the run ended, for a last scrape


@dataclass(frozen=True)
class SlurmConfig:
    """``slurm:`` - what to do under SLURM."""

    requeue: bool = False  # `scontrol requeue $SLURM_JOB_ID` after an emergency checkpoint


SECTIONS: dict[str, type] = {"notices": NoticesConfig, "slurm": SlurmConfig, "metrics": MetricsConfig}


@dataclass(frozen=True)
class Config:
    dir: str = "checkpoints"
    every_steps: int | None = None
    every: float | None = None
    cron: str | None = None
    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: tuple[tuple[str, int, str], ...] = ()
    grace: float = 25.0
    force_grace: float = 5.0
    max_restarts: int = 10
    restart_window: float = 3600.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    same_step_crashes: int = 3
    no_restart_exit_codes: tuple[int, ...] = ()
    hang_timeout: float = 0.0
    hang_grace: float = 5.0
    start_failures: int = 3
    requeue_signal: str | None = None
    log_format: str = "text"
    job_id: str | None = None  # several nodes' `ckptd run` of one job share the directory (rundir.py)
    node_rank: int | None = None  # this node's rank in the job (default: torchrun's --node-rank, $SLURM_NODEID, 0)
    remote: str | None = None  # the object-store tier, s3://BUCKET/PREFIX: every new checkpoint is uploaded
    remote_endpoint: str | None = None  # an S3-compatible server (default $AWS_ENDPOINT_URL)
    remote_region: str | None = None  # default $AWS_REGION
    remote_virtual_hosted: bool = False  # with an endpoint: bucket.host addressing instead of path-style
    stop_upload: str = "skip"  # skip | wait: a stop exits only once its checkpoint is on the remote tier
    prune_before_upload: bool = False  # local retention may delete checkpoints the remote tier does not cover yet
    remote_keep_last: int | None = None  # retention of the remote tier, apart from the local one's keep_*
    remote_keep_every: int | None = None
    remote_keep_best: tuple[tuple[str, int, str], ...] = ()
    key_file: str | None = None  # authenticated checkpoints: the key's file, given to the trainer as CKPTD_KEY_FILE
    allow_unkeyed: bool = False  # with a key, still accept checkpoints written without one (CKPTD_ALLOW_UNKEYED=1)
    memory: bool = False  # the memory tier: snapshots in memory the supervisor holds (docs/memory-tier.md)
    snapshot_every_steps: int | None = None  # with memory: a snapshot into memory every N steps, between disk saves
    notices: NoticesConfig = NoticesConfig()
    slurm: SlurmConfig = SlurmConfig()
    metrics: MetricsConfig = MetricsConfig()

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["keep_best"] = [f"{m}:{k}:{mode}" for m, k, mode in self.keep_best]
        out["remote_keep_best"] = [f"{m}:{k}:{mode}" for m, k, mode in self.remote_keep_best]
        out["no_restart_exit_codes"] = list(self.no_restart_exit_codes)
        out["notices"]["azure_events"] = list(self.notices.azure_events)
        return out

    @property
    def retention_enabled(self) -> bool:
        return bool(self.keep_last or self.keep_every or self.keep_best)

    @property
    def upload_hold(self) -> bool:
        """Local retention keeps what the remote tier does not cover yet (the remote tier is the durable one)."""
        return bool(self.remote) and not self.prune_before_upload

    @property
    def remote_retention_enabled(self) -> bool:
        return bool(self.remote_keep_last or self.remote_keep_every or self.remote_keep_best)


# --- value parsers: (raw value, where) -> parsed value; raise ValueError with the reason -----------------


def _int(minimum: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool) or isinstance(raw, float):
            raise ValueError(f"expected a whole number >= {minimum}, got {show(raw)}")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number >= {minimum}, got {show(raw)}") from None
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _seconds(allow_zero: bool = False, minimum: float = 0.0) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError(f"expected seconds as a number, got {show(raw)}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected seconds as a number, got {show(raw)}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number of seconds, got {show(raw)}")
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"must be {'>= 0' if allow_zero else '> 0'} seconds, got {show(raw)}")
        if minimum and value < minimum:
            raise ValueError(f"must be >= {minimum:g} s (the shortest interval allowed), got {show(raw)}")
        return value

    return parse


def show(value: Any) -> str:
    """``value`` for an error message, bounded: at most MAX_SHOWN characters of its repr, built without expanding
    more than that (a 456-byte YAML alias bomb is a list of 9**9 items; its full repr never ends)."""
    return _SHOW.repr(value)


def control_character(text: str) -> str:
    """Why ``text`` cannot go into a unit file, a log line or a terminal as it is (``""`` when it can)."""
    m = _CONTROL.search(text)
    if m is None:
        return ""
    return (f"holds a control character ({m.group()!r} at position {m.start()}); a newline would start a new line "
            "(a new directive in a unit file, a forged line in a log): use a value without one")


def _string(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"expected a non-empty string, got {show(raw)}")
    problem = control_character(raw)
    if problem:
        raise ValueError(f"{show(raw)} {problem}")
    return raw


def _key_file(raw: Any) -> str:
    """A key file's absolute path, after the checks the trainer makes (a private regular file, 32+ bytes), so a
    bad one stops the run before anything starts; the key itself is not kept here."""
    from ..store.auth import Key

    path = os.path.abspath(_string(raw))
    try:
        Key.load(path)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return path


def _cron(raw: Any) -> str:
    expr = _string(raw)
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expr)
    except ValueError as exc:
        raise ValueError(f"not a crontab expression ({exc}); example: '*/30 * * * *'") from None
    return expr


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {show(raw)}")
        return str(raw)

    return parse


def _signal_name(raw: Any) -> str:
    name = _string(raw).upper().removeprefix("SIG")
    if name not in REQUEUE_SIGNALS:
        raise ValueError(f"expected one of {', '.join(REQUEUE_SIGNALS)}, got {show(raw)}")
    return name


def _addr(raw: Any) -> str:
    text = str(raw).strip() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
    if not text:
        raise ValueError(f"expected HOST:PORT or PORT, got {show(raw)}")
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 0-65535, got {show(raw)}")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def _metrics_addr(raw: Any) -> str | None:
    """``off`` (or YAML false) disables the endpoint; else HOST:PORT as :func:`_addr`."""
    if raw is False or (isinstance(raw, str) and raw.strip().lower() == "off"):
        return None
    return _addr(raw)


def _bool(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"expected true or false, got {show(raw)}")
    return raw


def _url(raw: Any) -> str:
    import urllib.parse

    text = _string(raw).strip().rstrip("/")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected a base URL like http://127.0.0.1:8080, got {show(raw)}")
    try:
        _ = parts.port  # reading it checks it: a port that is not a number or out of range raises
    except ValueError:
        raise ValueError(f"bad port in {show(raw)}") from None
    return text


def _remote_checked(raw: Any, check_name: str) -> str:
    """``raw`` as a string, stripped, checked by ``ckptd.remote.<check_name>`` (its error, as a ValueError)."""
    from .. import remote
    from ..errors import CkptdError

    text = _string(raw).strip()
    try:
        getattr(remote, check_name)(text)
    except CkptdError as exc:
        raise ValueError(str(exc)) from None
    return text


def _remote(raw: Any) -> str:
    return _remote_checked(raw, "check_url").rstrip("/")


def _endpoint(raw: Any) -> str:
    return _remote_checked(raw, "check_endpoint")


def _list(item: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def parse(raw: Any) -> tuple:
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        return tuple(item(x) for x in items)

    return parse


def _exit_code(raw: Any) -> int:
    code = _int(1)(raw)
    if code > 255:
        raise ValueError(f"exit codes are 1-255, got {code}")
    return code


def _job_id(raw: Any) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)  # `job_id: 12345` in YAML
    return _string(raw).strip()


def _keep_best(raw: Any) -> tuple[str, int, str]:
    if isinstance(raw, dict):
        metric, k, mode = raw.get("metric"), raw.get("k"), raw.get("mode", "min")
    elif isinstance(raw, str) and raw.count(":") in (1, 2):
        metric, k, *rest = raw.split(":")
        mode = rest[0] if rest else "min"
    else:
        raise ValueError(f"expected METRIC:K[:min|max] (e.g. loss:3:min), got {show(raw)}")
    return (_string(metric), _int(1)(k), _choice("min", "max")(mode))


@dataclass(frozen=True)
class Option:
    key: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "N"
    append: bool = False
    flag: str = ""
    switch: bool = False  # a flag without a value that sets true

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-").replace(".", "-")

    @property
    def dest(self) -> str:
        return self.key.replace(".", "__")


OPTIONS: tuple[Option, ...] = (
    Option("dir", _string, "checkpoint root directory (default: ./checkpoints)", "DIR"),
    Option("every_steps", _int(1), "the library saves every N steps (env CKPTD_EVERY_STEPS)"),
    Option("every", _seconds(minimum=MIN_EVERY_SECONDS),
           f"ask the trainer for a checkpoint every SECONDS (>= {MIN_EVERY_SECONDS:g})", "SECONDS"),
    Option("cron", _cron, "ask the trainer for a checkpoint on a crontab schedule (local time)", "EXPR"),
    Option("keep_last", _int(1), "retention: keep the newest N checkpoints"),
    Option("keep_every", _int(1), "retention: also keep every checkpoint whose step is a multiple of N"),
    Option("keep_best", _list(_keep_best), "retention: also keep the K best by METRIC (repeatable)",
           "METRIC:K:MODE", append=True),
    Option("grace", _seconds(), "seconds a stopped trainer gets to checkpoint and exit (default 25)", "SECONDS"),
    Option("force_grace", _seconds(), "grace after a second SIGTERM/SIGINT (default 5)", "SECONDS"),
    Option("max_restarts", _int(0), "restarts allowed within --restart-window (default 10)"),
    Option("restart_window", _seconds(), "window of the restart budget (default 3600)", "SECONDS"),
    Option("backoff_base", _seconds(), "first restart delay; doubles per failure (default 1)", "SECONDS"),
    Option("backoff_max", _seconds(), "cap of the restart delay (default 60)", "SECONDS"),
    Option("same_step_crashes", _int(1), "give up when the same step crashes N times in a row (default 3)"),
    Option("no_restart_exit_codes", _list(_exit_code), "child exit code that ends the run at once (repeatable)",
           "CODE", append=True, flag="--no-restart-exit-code"),
    Option("hang_timeout", _seconds(allow_zero=True), "restart a trainer silent this long; 0 = off (default)",
           "SECONDS"),
    Option("hang_grace", _seconds(), "seconds a hung trainer gets after SIGTERM before SIGKILL (default 5); "
           "its stacks are dumped first", "SECONDS"),
    Option("start_failures", _int(1), "give up when the script fails N times in a row before its first "
           "step (default 3)"),
    Option("requeue_signal", _signal_name, "signal meaning 'checkpoint and exit for requeue' (USR1|USR2)", "SIG"),
    Option("log_format", _choice("text", "json"), "stderr log format: text (default) or json", "FORMAT"),
    Option("job_id", _job_id, "multi-node: the job this node belongs to, the same on every node's `ckptd run` "
           "(default: $SLURM_JOB_ID, else torchrun's --rdzv-id; none: a single-node run)", "ID"),
    Option("node_rank", _int(0), "multi-node: this node's rank in the job (default: torchrun's --node-rank, "
           "else $SLURM_NODEID, else 0)"),
    Option("remote", _remote, "the object-store tier: upload every new checkpoint to s3://BUCKET/PREFIX (gs://, "
           "az://) in the background; credentials from AWS_* variables, a profile or the instance role", "URL"),
    Option("remote_endpoint", _endpoint, "an S3-compatible server for --remote, e.g. http://127.0.0.1:9000 (default "
           "$AWS_ENDPOINT_URL)", "URL"),
    Option("remote_region", _string, "the bucket's region (default $AWS_REGION)", "REGION"),
    Option("remote_virtual_hosted", _bool, "with --remote-endpoint: bucket.host addressing (default: path-style)",
           switch=True),
    Option("stop_upload", _choice("skip", "wait"), "on a stop: wait = exit only once the emergency checkpoint is "
           "on the remote tier (bounded by the stop's deadline); skip = exit once it is local (default)", "MODE"),
    Option("prune_before_upload", _bool, "with --remote: local retention (--keep-*) may delete checkpoints not yet "
           "on the remote tier (default: each is kept until an upload covers it; a remote tier that stays "
           "unreachable then grows the local directory)", switch=True),
    Option("remote_keep_last", _int(1), "retention of the remote tier (after each upload; apart from --keep-*, which "
           "is the local tier's): keep the newest N remote checkpoints"),
    Option("remote_keep_every", _int(1), "remote retention: also keep every remote checkpoint whose step is a "
           "multiple of N"),
    Option("remote_keep_best", _list(_keep_best), "remote retention: also keep the K best remote checkpoints by "
           "METRIC (repeatable)", "METRIC:K:MODE", append=True),
    Option("key_file", _key_file, "authenticated checkpoints: key file (mode 0600, 32+ bytes) the trainer MACs every "
           "checkpoint with and restores only what authenticates with (env CKPTD_KEY_FILE)", "FILE"),
    Option("allow_unkeyed", _bool, "with key_file: still resume from checkpoints written without a key "
           "(env CKPTD_ALLOW_UNKEYED=1)", switch=True),
    Option("memory", _bool, "the memory tier: the trainer snapshots into memory this supervisor holds, and a "
           "snapshot the trainer died before committing is written before the restart (docs/memory-tier.md)",
           switch=True),
    Option("snapshot_every_steps", _int(1), "with --memory: the trainer snapshots into memory every N steps, more "
           "often than it saves to disk (every_steps); a crash loses at most N steps (env CKPTD_SNAPSHOT_EVERY_STEPS)"),
    Option("notices.source", _choice(*NOTICE_SOURCES), "cloud preemption notices to poll: auto (default: the cloud "
           "this machine's DMI data names, none elsewhere), aws, gcp, azure or off", "SOURCE", flag="--notices"),
    Option("notices.endpoint", _url, "base URL of the metadata service (default: the cloud's own)", "URL",
           flag="--notice-endpoint"),
    Option("notices.poll", _seconds(), "seconds between metadata polls, AWS and Azure (default 1)", "SECONDS",
           flag="--notice-poll"),
    Option("notices.rebalance", _choice("log", "checkpoint", "stop"), "AWS rebalance recommendation: log "
           "(default), checkpoint or stop", "ACTION", flag="--notice-rebalance"),
    Option("notices.on_notice", _choice("stop", "checkpoint"), "on a preemption notice: stop (emergency checkpoint, "
           "exit 85; default) or checkpoint (and keep training)", "ACTION", flag="--on-notice"),
    Option("notices.gcp_deadline", _seconds(), "GCP: seconds from the preemption notice to the deadline (default 30)",
           "SECONDS", flag="--notice-gcp-deadline"),
    Option("notices.azure_events", _list(_choice(*AZURE_EVENT_TYPES)), "Azure scheduled event type acted on "
           "(repeatable; default Preempt and Terminate)", "TYPE", append=True, flag="--notice-azure-event"),
    Option("metrics.addr", _metrics_addr, "serve Prometheus metrics and /healthz on HOST:PORT (default "
           "127.0.0.1:9477; host defaults to 127.0.0.1; port 0 picks a free one) or 'off'", "HOST:PORT",
           flag="--metrics-addr"),
    Option("metrics.sd_file", _string, "write this run's target in Prometheus file_sd format to PATH (a file, or "
           "a directory for one file per run); removed at exit", "PATH", flag="--metrics-sd-file"),
    Option("metrics.linger", _seconds(allow_zero=True), "keep serving metrics this long after the run ended, "
           "so Prometheus scrapes its last state (default 0)", "SECONDS", flag="--metrics-linger"),
    Option("slurm.requeue", _bool, "under SLURM: `scontrol requeue $SLURM_JOB_ID` after an emergency checkpoint",
           switch=True, flag="--slurm-requeue"),
)
BY_KEY = {o.key: o for o in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per option; values stay strings until :func:`resolve`."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file; command-line options override it")
    for opt in OPTIONS:
        if opt.switch:
            parser.add_argument(opt.cli, dest=opt.dest, help=opt.help, default=None, action="store_const", const=True)
        else:
            parser.add_argument(opt.cli, dest=opt.dest, metavar=opt.metavar, help=opt.help, default=None,
                                action="append" if opt.append else "store")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {o.key: getattr(args, o.dest) for o in OPTIONS if getattr(args, o.dest, None) is not None}


def load_file(path: str) -> dict[str, tuple[Any, int]]:
    """Read a YAML mapping; return ``{key: (value, line)}``. Unknown/duplicate keys are errors.

    A section (``notices:``) is a mapping whose keys come back as ``notices.source``.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a config is a YAML file of key: value lines") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES} bytes; a config is a short YAML file of key: value")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        problem = _size_problem(root)  # before construction: aliases are expanded only by counting here
        if problem:
            raise ConfigError(f"{path}: {problem}; a config is a short mapping of key: value (no deep nesting, "
                              "no aliases that multiply values)")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())[:500]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply; a config is a short mapping of key: value") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: the config must be a mapping of key: value")
    out: dict[str, tuple[Any, int]] = {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in SECTIONS:
            _check_new(path, line, key, out, top_level=True)
            out[key] = (None, line)  # marks the section as seen (duplicates); holds no value itself
            section = data[key]
            if section is None:
                continue  # `notices:` with nothing under it keeps the defaults
            if not isinstance(value_node, yaml.MappingNode) or not isinstance(section, dict):
                raise ConfigError(f"{path}:{line}: section '{key}' must be a mapping of key: value, e.g. "
                                  f"'{key}:' then '  {_section_keys(key)[0]}: ...' on the next line")
            for sub_node, _ in value_node.value:
                full, sub_line = f"{key}.{sub_node.value}", sub_node.start_mark.line + 1
                _check_new(path, sub_line, full, out)
                out[full] = (section[sub_node.value], sub_line)
            continue
        _check_new(path, line, key, out, top_level=True)
        out[key] = (data[key], line)
    return {k: v for k, v in out.items() if k not in SECTIONS}


def _size_problem(root: Any) -> str:
    """Why the composed YAML is too big once its aliases are expanded (``""`` if it is not): nodes are counted
    as construction would multiply them (an alias counts its whole anchored subtree again), each subtree once."""
    import yaml

    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes with aliases expanded, height)

    def measure(node: Any, depth: int) -> tuple[int, int]:
        if depth > MAX_CONFIG_DEPTH:
            raise _TooBig(f"YAML nested more than {MAX_CONFIG_DEPTH} levels deep (or an alias refers to itself)")
        done = memo.get(id(node))
        if done is not None:
            if depth + done[1] > MAX_CONFIG_DEPTH:
                raise _TooBig(f"YAML nested more than {MAX_CONFIG_DEPTH} levels deep")
            return done
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        count, height = 1, 0
        for child in children:
            c, h = measure(child, depth + 1)
            count, height = count + c, max(height, h + 1)
            if count > MAX_CONFIG_NODES:
                raise _TooBig(f"YAML holds more than {MAX_CONFIG_NODES} values once its aliases are expanded")
        memo[id(node)] = (count, height)
        return count, height

    if root is None:
        return ""
    try:
        measure(root, 0)
    except _TooBig as exc:
        return str(exc)
    return ""


class _TooBig(Exception):
    pass


def _section_keys(section: str) -> list[str]:
    return [k.split(".", 1)[1] for k in BY_KEY if k.startswith(section + ".")]


def _check_new(path: str, line: int, key: str, seen: dict[str, tuple[Any, int]], top_level: bool = False) -> None:
    known = [k for k in BY_KEY if "." not in k] + list(SECTIONS) if top_level else list(BY_KEY)
    if key not in known:
        hint = difflib.get_close_matches(str(key).replace("-", "_"), known + list(BY_KEY), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"
        if hint and top_level and "." in hint[0]:
            section, sub = hint[0].split(".", 1)
            fix = f"did you mean '{sub}' in the '{section}:' section?"
        shown = key if len(str(key)) <= MAX_SHOWN and not control_character(str(key)) else show(key)
        raise ConfigError(f"{path}:{line}: unknown key '{shown}'; {fix}")
    if key in seen:
        raise ConfigError(f"{path}:{line}: key '{key}' appears twice (first on line {seen[key][1]})")


def resolve(config_file: str | None, overrides: dict[str, Any]) -> Config:
    """Merge defaults < file < command line, check every value, and return the effective config."""
    values: dict[str, Any] = {}
    if config_file:
        for key, (raw, line) in load_file(config_file).items():
            if raw is None:
                continue  # `key:` with no value keeps the default
            values[key] = _parse(BY_KEY[key], raw, f"{config_file}:{line}: key '{key}'")
    for key, raw in overrides.items():
        opt = BY_KEY[key]
        where = f"option {opt.cli}"
        if opt.append:
            values[key] = tuple(v for item in raw for v in _parse(opt, item, where, OptionError))
        else:
            values[key] = _parse(opt, raw, where, OptionError)
    cfg = _build(values)
    if cfg.backoff_max < cfg.backoff_base:
        error = OptionError if {"backoff_base", "backoff_max"} & set(overrides) else ConfigError
        raise error(f"backoff_max ({cfg.backoff_max}) is below backoff_base ({cfg.backoff_base}); raise it")
    if cfg.prune_before_upload and not cfg.remote:
        error = OptionError if "prune_before_upload" in overrides else ConfigError
        raise error("prune_before_upload is about the remote tier's uploads: set remote too (--remote "
                    "s3://BUCKET/PREFIX) or drop it")
    if cfg.remote_retention_enabled and not cfg.remote:
        keys = {"remote_keep_last", "remote_keep_every", "remote_keep_best"}
        error = OptionError if keys & set(overrides) else ConfigError
        raise error("remote_keep_last/remote_keep_every/remote_keep_best are the remote tier's retention: set remote "
                    "too (--remote s3://BUCKET/PREFIX), or use keep_last/keep_every/keep_best for the local tier")
    if cfg.snapshot_every_steps and not cfg.memory:
        error = OptionError if {"snapshot_every_steps", "memory"} & set(overrides) else ConfigError
        raise error("snapshot_every_steps snapshots into the memory tier, which is off: add --memory (memory: true), "
                    "or leave snapshot_every_steps out")
    return cfg


def _build(values: dict[str, Any]) -> Config:
    """``{"grace": 5.0, "notices.source": "aws"}`` -> ``Config(grace=5.0, notices=NoticesConfig(source="aws"))``."""
    top = {k: v for k, v in values.items() if "." not in k}
    for section, cls in SECTIONS.items():
        sub = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(section + ".")}
        top[section] = cls(**sub)
    return Config(**top)


def _parse(opt: Option, raw: Any, where: str, error: type[ConfigError] = ConfigError) -> Any:
    try:
        return opt.parse(raw)
    except ValueError as exc:
        raise error(f"{where}: {exc}") from None


def signal_number(name: str | None) -> int | None:
    return None if name is None else int(getattr(signal, "SIG" + name))


def absolute(cfg: Config) -> Config:
    return dataclasses.replace(cfg, dir=os.path.abspath(cfg.dir))

