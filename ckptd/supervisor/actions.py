"""What the supervisor's core (core.py) is told, and what it answers: typed events in, typed actions out.

The loop (loop.py) turns selector callbacks, queued signals, notices and timers into :class:`Event`
values, hands each to :meth:`Core.handle` with a :class:`View` of the moment (the clocks, the connected
trainers, the newest valid checkpoint), and carries out the :class:`Action` values it gets back, in order.
The core never touches a process, a socket or a file; tests drive it with made-up views.

Some actions have a result the core needs: :class:`Spawn` is answered by :class:`Spawned` or
:class:`SpawnFailed`, :class:`Rescan` by :class:`Rescanned`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .control import Peer
from .notices import Notice
from .policy import ExitStatus


@dataclass(frozen=True)
class View:
    """The world as the loop sees it when it hands the core an event."""

    now: float  # monotonic
    wall: float  # unix time
    trainers: tuple[Peer, ...] = ()  # connected trainers (control.ControlServer.trainers())
    latest_step: int | None = None  # step of the newest valid checkpoint (watch.CheckpointView.latest())


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The run begins: start the first child."""


@dataclass(frozen=True)
class Spawned:
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    error: str  # the OSError, as the journal records it
    message: str  # what the log says


@dataclass(frozen=True)
class ChildExited:
    """The child's main process was reaped (its leftovers already killed, its last messages read)."""

    status: ExitStatus
    oom_kills: int = 0  # our cgroup's OOM kills during this life
    system_oom_kills: int = 0  # the machine's OOM kills during this life
    leftovers: int = 0  # processes of the child's group killed after it
    stderr_tail: tuple[bytes, ...] = ()  # the child's last stderr lines


@dataclass(frozen=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True)
class ScheduledSave:
    label: str  # the schedule that fired (schedule.py)


@dataclass(frozen=True)
class NoticeReceived:
    notice: Notice


@dataclass(frozen=True)
class TrainerMessage:
    peer: Peer
    msg: dict[str, Any]


@dataclass(frozen=True)
class ControlRequest:
    """A message from a client of the control socket (`ckptd save`, `ckptd stop`, `ckptd status`)."""

    peer: Peer
    msg: dict[str, Any]


@dataclass(frozen=True)
class PeerClosed:
    peer: Peer


@dataclass(frozen=True)
class Rescanned:
    """The checkpoint directory was read again."""

    added: tuple[tuple[str, int, str, float], ...] = ()  # (name, step, kind, created) of new valid checkpoints
    latest: tuple[str, int, str, float] | None = None  # the newest valid checkpoint
    emergency: tuple[int, float] | None = None  # (step, created): the checkpoint a Rescan asked about is emergency


@dataclass(frozen=True)
class Timer:
    """Time passed: deadlines (grace, backoff, hang) are checked against ``View.now``."""


Event = (Start | Spawned | SpawnFailed | ChildExited | SignalReceived | ScheduledSave | NoticeReceived
         | TrainerMessage | ControlRequest | PeerClosed | Rescanned | Timer)


# --- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start the child (its environment says restart number ``restarts``)."""

    restarts: int


@dataclass(frozen=True)
class SignalChild:
    """Signal the child's main process (a script that does not use the library; a hang; a second stop)."""

    signum: int


@dataclass(frozen=True)
class Kill:
    """SIGKILL the child's process group, then journal a ``kill`` event saying ``why`` and how many died."""

    why: str


@dataclass(frozen=True)
class DumpStacks:
    """A hang: signal ``asked`` for their stacks; at ``due`` (monotonic; None: nobody was asked) read the
    dumps of ``dumped`` (every trainer) into the log, ``hung`` named as the silent ones."""

    hung: tuple[Peer, ...]
    dumped: tuple[Peer, ...]
    asked: tuple[Peer, ...]
    due: float | None


@dataclass(frozen=True)
class Send:
    """A control-channel message; ``close``: close the connection once it is sent (a client's answer)."""

    peer: Peer
    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    close: bool = False


@dataclass(frozen=True)
class SendStatus:
    """Answer ``ckptd status``: the published status snapshot, then close."""

    peer: Peer


@dataclass(frozen=True)
class Record:
    """Log (unless ``quiet``), journal and count one event; ``lines``: a block for the text log only."""

    level: str
    event: str
    msg: str
    fields: dict[str, Any] = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    quiet: bool = False


@dataclass(frozen=True)
class Journal:
    """A journal record only (not logged, not counted by the metrics)."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Log:
    """A text log line only (not journaled)."""

    level: str
    event: str
    msg: str


@dataclass(frozen=True)
class Metric:
    """Call ``RunMetrics.<method>(*args)`` (metrics.py)."""

    method: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ServiceStopping:
    """Tell systemd the run is stopping (service.py)."""

    reason: str


@dataclass(frozen=True)
class SaveState:
    """Rewrite the run directory's state.json."""


@dataclass(frozen=True)
class Rescan:
    """Read the checkpoint directory now; ``emergency_step``: answer whether that step's checkpoint is an
    emergency one (:attr:`Rescanned.emergency`)."""

    emergency_step: int | None = None


@dataclass(frozen=True)
class Committed:
    """A trainer reported a committed checkpoint: journal ``record`` unless that name is journaled already
    (``replaced``: written again under the same name, the state at close()), then rewrite state.json."""

    name: str
    record: Record
    replaced: bool = False


@dataclass(frozen=True)
class Prune:
    """Names the trainer's retention announced it deletes (so their removal is journaled as expected)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Pin:
    """Pin a checkpoint a person asked for (store.pin)."""

    name: str


@dataclass(frozen=True)
class Acknowledge:
    """Let the platform go ahead with a notice's event (Azure StartRequests)."""

    event_id: str


@dataclass(frozen=True)
class Requeue:
    """Run ``scontrol requeue`` for this SLURM job."""


@dataclass(frozen=True)
class Reload:
    """SIGHUP: read the config file again."""


@dataclass(frozen=True)
class Exit:
    """The run is over: the supervisor exits with ``code`` once its shutdown is done."""

    code: int


Action = (Spawn | SignalChild | Kill | DumpStacks | Send | SendStatus | Record | Journal | Log | Metric
          | ServiceStopping | SaveState | Rescan | Committed | Prune | Pin | Acknowledge | Requeue | Reload | Exit)
