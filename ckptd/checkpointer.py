"""The trainer library: capture, save, restore and talk to the supervisor.

    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched,
                            extra={"sampler": sampler}, every_steps=100)
    start = ck.restore()          # step to continue from; 0 when no valid checkpoint exists
    for step in range(start, total_steps):
        loss = train_one_step()
        ck.step(step + 1, metrics={"loss": loss.item()})   # safe point
    ck.close()                    # finishes any save in flight, writes the final checkpoint

A save copies every tensor into host buffers allocated once and reused
(pinned when CUDA is in use), returns to the training loop, and persists in a
background thread: write + checksum, fsync, manifest last, atomic rename.
At most one save is in flight. A periodic save that comes due while one is in
flight is skipped (counted in ``stats["coalesced"]``) and tried at the next due
point; manual, emergency and final saves wait for the one in flight.

This module is the Checkpointer: the public API, when to save (steps, epochs, requests from the
supervisor, agreement between ranks) and the emergency stop, and what its objects' state is (captured
for a save, applied after a restore). It is longer than the others because those share one object's
state (the step, the save in flight, the committed step, the safe point); the work they hand out lives
beside it: snapshot.py (the save's copy), persist.py (writing and committing), restore.py (the candidate
loop and the reader), ranks.py (how ranks cooperate), distributed.py (agreement), stopping.py.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import env, exitcodes, lineage, origin, persist, protocol, retention, store
from .annotate import checked_metrics, jsonable_metrics
from .channel import TrainerChannel, connect_from_env
from .data import DataLoader as ResumableLoader
from .errors import CkptdError, CorruptCheckpointError, NotFoundError
from .memory import MemoryTier
from .ranks import Sharded, Solo, rank_files
from .remote import RemoteError, RemoteSpec, spec_from_env
from .restore import (
    Prepared,
    Restored,
    announce,
    check_state,
    newest,
    read_rank_part,
    read_state_json,
    read_tensors,
    resolve,
)
from .snapshot import COPY_THREADS, Snapshot, nbytes
from .state import DTYPES, Encoder, StateDecodeError, capture_rng, decode, restore_rng
from .state import dumps as state_dumps
from .stopping import SaveTimes, StopWatch
from .version import __version__

log = logging.getLogger("ckptd")

DEFAULT_DIR = "checkpoints"
# docs/performance.md, P4: steps beside a full-speed persist ran 1.14-1.22 x slower on the 2-core
# machine; paced 2.0 (a third of the disk), 1.03 x.
DEFAULT_PACE = 2.0


@dataclass
class SaveResult:
    """What one save did. ``done()``/``result()`` follow the background persist."""

    step: int
    kind: str
    path: str | None = None
    bytes: int = 0
    stall_seconds: float = 0.0  # time the training loop was blocked (snapshot)
    persist_seconds: float = 0.0  # background write + fsync + commit
    paused_seconds: float = 0.0  # of which paused to spare the training loop (``pace``)
    skipped: str = ""  # why nothing was written ("" when a checkpoint was written)
    error: BaseException | None = None
    request_ids: list[str] = field(default_factory=list)
    _future: Future | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)  # the small state's digest (close() compares it)
    _replaced: bool = field(default=False, repr=False)  # it replaced the checkpoint of its step (close())
    _hurry: threading.Event = field(default_factory=threading.Event, repr=False)
    _slot: int | None = field(default=None, repr=False)  # the memory tier's slot the persist writes from

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self) -> SaveResult:
        """Block until durable or failed; a paced background persist goes full speed from here."""
        self._hurry.set()
        if self._future is not None:
            self._future.result()
        return self

    @property
    def ok(self) -> bool:
        return self.error is None


_in_flight_hurry: set[threading.Event] = set()  # hurry events of the persists queued or running


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the job's world size: torch.distributed's once it runs (a launcher may start ranks
    without ``$RANK``, as Lightning's own does), else ``$RANK`` and ``$WORLD_SIZE`` (torchrun sets both)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _hurry_at_exit() -> None:
    """The script has ended and the interpreter waits for the writer: no more pauses."""
    for hurry in list(_in_flight_hurry):
        hurry.set()


# Runs when the main thread has finished, before the interpreter joins the writer threads
# (concurrent.futures joins its workers from the same hook; later registrations run first).
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_hurry_at_exit)


class Checkpointer:
    """Full training state to durable, checksummed checkpoints and back.

    Args:
        model, optimizer, scheduler, scaler: saved with ``state_dict()`` and restored
            with ``load_state_dict()`` (the model is read straight into its own tensors).
        extra: ``{name: obj}``; objects with ``state_dict()``/``load_state_dict()`` (samplers,
            stateful loaders, counters) are restored in place; plain JSON-able values are saved
            and, after ``restore()``, found again in ``ck.extra[name]``.
        dir: checkpoint root; None means ``$CKPTD_DIR`` (set by ``ckptd run``), else ``./checkpoints``.
        every_steps / every_seconds: periodic saves (``ckptd run`` overrides them via the environment).
        snapshot_every_steps: with the memory tier (``ckptd run --memory``; refused without it), a snapshot into
            memory every N steps, not committed to disk, so a crash loses at most N steps: the supervisor writes
            the newest verified snapshot as a checkpoint before the restart (docs/memory-tier.md). Default
            ``$CKPTD_SNAPSHOT_EVERY_STEPS`` (``ckptd run --snapshot-every-steps``).
        keep_last / keep_best / keep_every: retention applied after each commit
            (``keep_best`` items are ``"metric:K[:min|max]"``).
        save_on_close: write a ``final`` checkpoint at ``close()`` when the last step is not saved.
        async_save: persist in the background (default); False blocks until durable.
        pace: a background persist pauses ``pace`` x the time of each write request (16 MiB)
            after it, so it uses about 1/(1+pace) of the disk and leaves memory bandwidth and the
            second core to the training loop (default 2.0: a third of the disk's speed). A save
            somebody waits for goes full speed from that moment: ``wait()``, ``block=True``,
            ``async_save=False``, ``close()``, an emergency stop, ``restore()``, a manual save
            behind it, ``save(hurry=True)``, ``ckptd save --wait``, the end of the script.
            0 = always full speed.
        on_error: ``"log"`` (default: warn, count, keep training, retry at the next due save)
            or ``"raise"`` (the failed save's StorageError is raised from ``step()``).
        handle_signals: turn SIGTERM into an emergency checkpoint at the next ``step()``.
        remote: the object-store tier ``restore()`` takes a newer checkpoint from (``"s3://BUCKET/PREFIX"``
            or a ``ckptd.remote.RemoteSpec``); None means ``$CKPTD_REMOTE`` (set by ``ckptd run --remote``),
            else none. Uploads are the supervisor's work (docs/remote.md).
        stage: the run's stage name (``"sft"``, ``"rl"``), recorded in every manifest; default
            ``$CKPTD_STAGE`` (``ckptd run --stage``), else none. ``ckptd ls --stage`` and
            ``restore(stage=...)`` find checkpoints by it.
        key_file: authenticated checkpoints (off by default): a file holding the key (mode 0600, at least 32
            bytes; default ``$CKPTD_KEY_FILE``, which ``ckptd run --key-file`` sets). Every file saved gets a
            keyed BLAKE3 and the manifest a MAC; ``restore()`` refuses (sets aside, like a corrupt one) a
            checkpoint that does not authenticate with it, and one written without a key.
        allow_unkeyed: with a key, still accept checkpoints written without one (checksums only; default
            ``$CKPTD_ALLOW_UNKEYED=1``), e.g. to continue a run from before the key.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        extra: Mapping[str, Any] | None = None,
        dir: str | os.PathLike[str] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        snapshot_every_steps: int | None = None,
        keep_last: int | None = None,
        keep_best: Iterable[str] = (),
        keep_every: int | None = None,
        save_on_close: bool = True,
        async_save: bool = True,
        pace: float = DEFAULT_PACE,
        on_error: str = "log",
        handle_signals: bool = True,
        remote: str | RemoteSpec | None = None,
        stage: str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        allow_unkeyed: bool | None = None,
    ) -> None:
        if on_error not in ("log", "raise"):
            raise CkptdError(f"on_error must be 'log' or 'raise', got {on_error!r}")
        if isinstance(pace, bool) or not isinstance(pace, (int, float)) or not 0 <= pace <= 100:
            raise CkptdError(f"pace must be a number from 0 (full speed) to 100, got {pace!r}")
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.extra: dict[str, Any] = dict(extra or {})
        self.user: dict[str, Any] = {}  # JSON-able values you want saved and restored
        env_dir = os.environ.get(env.DIR) or None
        self.dir = os.path.abspath(os.fspath(dir) if dir is not None else (env_dir or DEFAULT_DIR))
        if dir is not None and env_dir and os.path.abspath(env_dir) != self.dir:
            log.warning("ckptd: dir=%s differs from CKPTD_DIR=%s set by ckptd run; the supervisor will not see "
                        "these checkpoints", self.dir, env_dir)
        self.every_steps = env.get_int(env.EVERY_STEPS) or every_steps
        self.every_seconds = env.get_float(env.EVERY_SECONDS) or every_seconds
        self.snapshot_every_steps = env.get_int(env.SNAPSHOT_EVERY_STEPS) or snapshot_every_steps
        for name, v in (("every_steps", self.every_steps), ("every_seconds", self.every_seconds),
                        ("snapshot_every_steps", self.snapshot_every_steps)):
            if v is not None and v <= 0:
                raise CkptdError(f"{name} must be > 0, got {v}")
        if self.snapshot_every_steps and not os.environ.get(env.MEMORY_FD):
            raise CkptdError(f"snapshot_every_steps={self.snapshot_every_steps} snapshots into the memory tier, which "
                             "only `ckptd run --memory` provides: run the script under `ckptd run --memory`, or leave "
                             "snapshot_every_steps out")
        self.policy = retention.Policy(
            keep_last=env.get_int(env.KEEP_LAST) or keep_last,
            keep_best=tuple(retention.Best.parse(b) for b in keep_best),
            keep_every=keep_every,
        )
        # The object-store tier restore() takes a newer checkpoint from (a fresh machine); `ckptd run --remote`
        # passes it in CKPTD_REMOTE. Uploading is the supervisor's work, not the library's.
        self.remote = (RemoteSpec.parse(remote) if isinstance(remote, str) else remote) if remote is not None \
            else spec_from_env()
        self._remote_restore: tuple[str, str] = ("", "")  # (checkpoint name downloaded, what the line says)
        self.save_on_close = save_on_close
        self.async_save = async_save
        self.pace = float(pace)
        self.on_error = on_error
        self.key = _load_key(key_file, allow_unkeyed)  # never logged; None: checksums only
        self.rank, world_size = _rank_and_world()
        self.writes = world_size <= 1 or self.rank == 0
        self.origin = origin.from_env(sys.argv, max(world_size, 1))  # recorded in every manifest
        env_stage = lineage.check_stage(os.environ.get(env.STAGE) or None, f"${env.STAGE}")
        self.stage = lineage.check_stage(stage) or env_stage  # recorded in every manifest
        if stage is not None and env_stage is not None and stage != env_stage:
            log.warning("ckptd: stage=%r differs from %s=%r set by ckptd run; recording %r", stage, env.STAGE,
                        env_stage, stage)
        self.lineage: dict[str, Any] | None = None  # where this run branched from (lineage.py), in every manifest
        self.branched = False  # the last restore() started this run from another run's checkpoint (not a resume)
        self._parent_groups: Any = None  # the parent checkpoint's optimizer hyperparameters (a branch)
        self._lr_hook: Any = None
        _check_extra(self.extra)  # a value that cannot be saved fails here, not at the first save
        self._growth_warned = False
        # Under `ckptd run --remote` (unless --prune-before-upload) the remote tier is the durable one: retention
        # keeps every local checkpoint it does not cover yet (the supervisor's uploader records what it holds).
        self._upload_hold = os.environ.get(env.UPLOAD_HOLD) == "1" and self.remote is not None
        self._held: list[str] = []
        self.epoch: int | None = None
        self.metrics: dict[str, Any] = {}
        self.resumed_from: str | None = None
        self.stats: dict[str, Any] = {"saves": 0, "failed": 0, "coalesced": 0, "skipped": 0,
                                      "last_stall_seconds": None, "last_persist_seconds": None,
                                      # memory-only snapshots (snapshot_every_steps), and those that first waited
                                      # for the disk save still writing from the slot they take
                                      "snapshots": 0, "snapshot_waits": 0}
        self._save_times = SaveTimes()  # the emergency stop's estimate of what a save costs
        self._step: int | None = None
        self._committed_step: int | None = None
        # step() or an epoch's end ran in this process: only then may close() save a final state or mark the
        # run finished
        # (a script that only restores, evaluates and closes must leave the run's checkpoints as they are)
        self._stepped = False
        self._last_save_time = time.monotonic()
        self._snapshot = Snapshot()
        self._rank_snapshot: Snapshot | None = None  # several ranks: this rank's own part
        # `ckptd run --memory`: snapshots go into the supervisor's memory region, which outlives this process
        self._memory = MemoryTier.from_env(self._snapshot, max(world_size, 1)) if self.writes else None
        self._restored_from_memory: str | None = None  # the checkpoint the last restore read from the memory tier
        self._snapshots_off_said = False
        self._shard_staging: Any = None  # sharded model: sharded.Staging, host copies of the DTensor shards
        self._executor: ThreadPoolExecutor | None = None
        self._prewarm: Future | None = None
        self._inflight: SaveResult | None = None
        self._failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._signal_stop: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._closed = False
        self._last_heartbeat = 0.0
        self._dist: Any = None  # distributed.Coordinator once torch.distributed runs several ranks
        self._solo = Solo(self.rank, leader=self.writes)  # how one process saves and restores (ranks.py)
        self._dist_checked = False
        self._send_metrics = os.environ.get(env.METRICS, "1") != "0"  # the supervisor serves metrics
        self._restore_started = 0.0
        self._epoch_done = False  # the end-of-epoch work of ``epoch`` has run (Checkpointer.epochs)
        self._in_epochs = False
        self._resumed_epoch: tuple[int, bool] | None = None  # (epoch, done) from restore(), for epochs()
        self._deferred = False  # a periodic save due at an epoch's last step, taken at that epoch's end
        self._boundary: tuple[dict[str, Any], dict[str, Any]] | None = None  # (RNG, loaders) at the last safe point
        self._jump_base: int | None = None  # the restored step, until the first step() after it
        self._committed_digest: str | None = None  # small state (JSON + RNG) of the newest checkpoint
        self._from_poll = False  # the emergency save in progress was asked for in poll()
        self._watch = StopWatch(self._stop_pending, lambda msg, **fields: self._warn("stop_wait", msg,
                                                                                     step=self._step, **fields))
        self.channel: TrainerChannel | None = connect_from_env(
            os.environ.get(env.CONTROL), rank=self.rank, restart_count=env.get_int(env.RESTART_COUNT) or 0)
        if handle_signals:
            self._install_signals()

    # ------------------------------------------------------------------ public API

    @property
    def current_step(self) -> int | None:
        return self._step

    def step(self, step: int | None = None, metrics: Mapping[str, Any] | None = None,
             epoch: int | None = None) -> SaveResult | None:
        """Safe point after ``step`` completed steps: heartbeat, honour requests, save when due.

        ``step`` defaults to the last step + 1 (the restored step + 1 after ``restore()``, 1 in a new run).
        After a stop request (``ckptd stop``, SIGTERM, a preemption notice) this writes an
        emergency checkpoint and raises ``SystemExit(85)`` so the script stops.
        """
        if step is None:
            step = (self._step or 0) + 1
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CkptdError(f"ck.step() takes the number of completed steps (int >= 0), got {step!r}")
        self._check_jump(step)
        self._step = step
        self._stepped = True
        if metrics is not None:
            self.metrics = dict(metrics)
        if epoch is not None:
            self.epoch = epoch
        self._report_failures()
        now = time.monotonic()
        self._heartbeat(step, now)
        self._safe_point()
        if self._prewarm is None and self.async_save and self.writes and (
                self.every_steps or self.every_seconds or self.channel is not None or self.save_on_close):
            self._start_prewarm()
        if self._coordinate() is not None:  # several ranks: act only on what all agreed (distributed.py)
            return self._step_agreed(step, now)
        requests = self.channel.take() if self.channel is not None else None
        if self._signal_stop is not None or (requests is not None and requests.stop):
            self._emergency_stop(requests.stop_reason if requests and requests.stop else "signal",
                                 requests.stop_deadline if requests and requests.stop else None)
        if requests is not None and requests.save:
            # `ckptd save --wait`: a person or script waits for it, so no pacing
            return self.save(kind="manual", request_ids=requests.save_ids, hurry=requests.save_waited)
        if self._due(step, now):
            if self._epoch_end_pending():
                self._deferred = True  # saved at this epoch's end, with the end-of-epoch work in it
                self._snapshot_if_due(step)
                return None
            result = self.save(kind="periodic")
            if result.skipped:  # coalesced behind the save in flight: the memory tier still takes this step
                self._snapshot_if_due(step)
            return result
        self._snapshot_if_due(step)
        return None

    def epochs(self, start: int, stop: int) -> Iterator[int]:
        """The epochs ``start .. stop - 1`` (like ``range``), continued where a restored checkpoint left off.

            for epoch in ck.epochs(1, args.epochs + 1):
                train(...)             # ck.step() after each batch of a ckptd.DataLoader in ``extra``
                test(...)              # ck.poll() per batch: a stop here resumes with this epoch's test
                scheduler.step()

        The end of each epoch (when the loop body has run) is a safe point: a stop that came during the
        end-of-epoch work is handled there, and a periodic save that came due at the epoch's last step is
        taken there, so the checkpoint holds the work the epoch's end did (evaluation, ``scheduler.step()``).
        A checkpoint of a step inside the epoch (or of its last step, or from ``poll()`` during the end-of-epoch
        work) resumes in that epoch: the loader yields the epoch's remaining batches, possibly none, and the
        end-of-epoch work runs once. Each ``ckptd.DataLoader`` in ``extra`` gets ``set_epoch(epoch)``.
        """
        epoch = start
        if self._resumed_epoch is not None:
            restored, done = self._resumed_epoch
            epoch = restored + 1 if done else restored
        self._resumed_epoch = None
        self._in_epochs = True
        try:
            while epoch < stop:
                self._begin_epoch(epoch)
                yield epoch
                self._end_epoch()
                epoch += 1
            self._stepped = True  # the loop ran to its end (even with no epoch left): close() marks the run finished
        finally:
            self._in_epochs = False

    def _begin_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_done = epoch, False
        for loader in self._loaders():
            loader.set_epoch(epoch)
        if self._boundary is not None:
            self._boundary = (self._boundary[0], self._loader_states())

    def _end_epoch(self) -> None:
        """The safe point after an epoch's end-of-epoch work."""
        self._epoch_done = True
        self._stepped = True  # the end-of-epoch work ran here: training work close() must keep
        step = self._step
        if step is None:
            return  # nothing trained yet: nothing to save
        now = time.monotonic()
        self._heartbeat(step, now)
        self._safe_point()
        deferred, self._deferred = self._deferred, False
        if self._dist is not None:  # every rank deferred the agreed save at the same step: all save it now
            if deferred and step != self._committed_step:
                self.wait()
                self.save(kind="periodic")
            return
        requests = self.channel.take() if self.channel is not None else None
        if self._signal_stop is not None or (requests is not None and requests.stop):
            self._emergency_stop(requests.stop_reason if requests and requests.stop else "signal",
                                 requests.stop_deadline if requests and requests.stop else None)
        if requests is not None and requests.save:
            self.save(kind="manual", request_ids=requests.save_ids, hurry=requests.save_waited)
        elif deferred or self._due(step, now):
            self.save(kind="periodic")

    def _loaders(self) -> list[ResumableLoader]:
        return [obj for obj in self.extra.values() if isinstance(obj, ResumableLoader)]

    def _loader_states(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.extra.items() if isinstance(obj, ResumableLoader)}

    def _epoch_end_pending(self) -> bool:
        """Inside ck.epochs() at the last step of an epoch: its end-of-epoch work is still to come."""
        return self._in_epochs and any(loader.at_end for loader in self._loaders())

    def _safe_point(self) -> None:
        """What a step boundary records: the RNG streams and the loaders' positions (a few KB), which a
        checkpoint written later by poll() stores, so work between safe points (evaluation drawing random
        numbers, a DataLoader.__iter__ drawing a seed) does not leak into it; and a stop pending since now
        has not waited for a safe point."""
        self._boundary = (capture_rng(), self._loader_states())
        self._watch.loop_thread = threading.get_ident()
        if not self._watch.started and self._dist is None:
            self._watch.start()

    def _check_jump(self, step: int) -> None:
        """Say so when the first step after a resume skips steps (e.g. a loader yielding nothing for an epoch)."""
        base, self._jump_base = self._jump_base, None
        if base is None or step <= base + 1:
            return
        msg = (f"the first step after resuming from step {base} is step {step}: steps {base + 1}..{step - 1} did "
               "not run (a data loader that yields nothing after the resume, or a step counter not derived from "
               "the restored step); the run continues")
        self._warn("step_jump", msg, step=step, restored_step=base)

    def poll(self) -> None:
        """A safe point between steps, for long stretches without ``step()`` (validation, data setup).

        Cheap enough to call every batch: it sends a heartbeat (rate-limited, so ``--hang-timeout`` does
        not fire) and, when a stop is pending (``ckptd stop``, SIGTERM, a preemption notice), writes the
        emergency checkpoint of the last completed step with the state as it is now and raises
        ``SystemExit(85)``. Save requests wait for the next ``step()``. Does nothing before the first
        ``step()`` or ``restore()`` (there is no completed step to save yet).
        """
        if self._closed:
            return
        step = self._step
        now = time.monotonic()
        if step is not None:
            self._heartbeat(step, now)
        stop = self.channel.peek_stop() if self.channel is not None else None
        if self._dist is not None:
            return  # several ranks: a stop is agreed and written at the next step(), never alone
        if step is not None and (self._signal_stop is not None or (stop is not None and stop.stop)):
            requests = self.channel.take() if self.channel is not None else None
            # The state as it is, but the RNG streams and loader positions of the last safe point: code
            # since then (evaluation) may have drawn from them and will run again after the resume.
            self._emergency_stop(requests.stop_reason if requests and requests.stop else "signal",
                                 requests.stop_deadline if requests and requests.stop else None, from_poll=True)

    def heartbeat(self) -> None:
        """A heartbeat only (rate-limited, for ``--hang-timeout``), for work between a step and its safe point.

        A framework integration calls it where neither ``step()`` nor ``poll()`` fits: after an optimizer step
        whose safe point comes only once the loop's work after it is done (the Hugging Face Trainer's logging,
        evaluation and epoch end), a checkpoint written here would hold the new weights under the last step's
        number. A stop waits for the next ``step()``. Does nothing before the first ``step()`` or ``restore()``.
        """
        if not self._closed and self._step is not None:
            self._heartbeat(self._step, time.monotonic())

    def _heartbeat(self, step: int, now: float) -> None:
        if self.channel is not None and now - self._last_heartbeat >= 1.0:
            self._last_heartbeat = now
            # The metrics given to step() travel here, batched: at most once a second, not per step.
            extra = {"metrics": _heartbeat_metrics(self.metrics)} if self._send_metrics and self.metrics else {}
            self.channel.send(protocol.HEARTBEAT, step=step, time=time.time(), **extra)

    def _coordinate(self) -> Any:
        """The distributed.Coordinator, set up at the first restore() or step() (all ranks call them)."""
        if not self._dist_checked:
            self._dist_checked = True
            from . import distributed

            self._dist = distributed.detect(self.model)
        return self._dist

    def _step_agreed(self, step: int, now: float) -> SaveResult | None:
        """step() with several ranks: act on requests only at agreement steps, all ranks alike."""
        dist = self._dist
        dist.listen(step, self.channel.take() if self.channel is not None else None, self._signal_stop is not None)
        if not dist.due(step, self.every_steps):
            return None
        busy = self._inflight is not None and not self._inflight.done()
        due_seconds = bool(self.every_seconds and now - self._last_save_time >= self.every_seconds)
        decision = dist.agree(step, due_seconds=due_seconds, busy=busy)
        if decision.stop:
            self._emergency_stop(dist.pending.stop_reason or "a stop reached another rank", decision.deadline)
        if decision.save:
            ids, waited = dist.take_saves()
            self.wait()  # before ckptd's group is used from this thread
            ids = dist.gather_ids(ids)
            if not ids:  # late copies of requests an earlier save answered
                return None
            return self.save(kind="manual", request_ids=ids, hurry=decision.save_waited or waited)
        periodic = decision.due or bool(self.every_steps and step % self.every_steps == 0)
        if periodic and step != self._committed_step:
            if decision.busy:
                self.stats["coalesced"] += 1
                return None
            if self._epoch_end_pending():  # the same on every rank: DistributedSampler gives equal lengths
                self._deferred = True
                return None
            return self.save(kind="periodic")
        return None

    def save(self, step: int | None = None, kind: str = "manual", *, block: bool | None = None,
             hurry: bool = False, request_ids: list[str] | None = None, replace: bool = False) -> SaveResult:
        """Checkpoint now. Returns once the state is snapshotted (async) or durable (sync/``block``).

        ``hurry=True``: persist in the background without pacing (see ``pace``).
        """
        step = self._step if step is None else step
        if step is None:
            raise CkptdError("nothing to save yet: call ck.step(n) first or pass save(step=n)")
        if kind not in store.KINDS:
            raise CkptdError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(store.KINDS)}")
        self._step = step
        result = SaveResult(step=step, kind=kind, request_ids=list(request_ids or []))
        block = block if block is not None else not self.async_save
        if hurry or block:
            result._hurry.set()  # somebody waits for this one: no pacing
        if not self.writes and self._dist is None:
            result.skipped = f"rank {self.rank} does not write checkpoints"
            return result
        busy = self._inflight is not None and not self._inflight.done()
        if busy and kind == "periodic":
            self.stats["coalesced"] += 1
            result.skipped = "a save is already in flight"
            return result
        self.wait()
        replace = replace and self._dist is None and step == self._committed_step
        if not replace and step == self._committed_step and \
                os.path.isdir(os.path.join(self.dir, store.checkpoint_name(step))):
            self.stats["skipped"] += 1
            result.skipped = f"step {step} is already checkpointed"
            result.path = os.path.join(self.dir, store.checkpoint_name(step))
            self._notify_saved(result)
            return result
        if self._prewarm is not None:
            self._prewarm.result()  # usually long done; never allocate the buffer twice
        t0 = time.perf_counter()
        fields = self._fields(kind, dict(self.metrics), self.epoch)
        files = self._capture_files(step, result, fields)
        result.bytes = sum(f.size for f in files)
        result.stall_seconds = time.perf_counter() - t0
        self.stats["last_stall_seconds"] = result.stall_seconds
        self._last_save_time = time.monotonic()
        executor = self._writer()
        _in_flight_hurry.add(result._hurry)
        result._future = executor.submit(self._persist, result, files, fields, replace)
        result._future.add_done_callback(lambda _: _in_flight_hurry.discard(result._hurry))
        self._inflight = result
        if self.writes and (self.policy.active or not self._growth_warned):  # after the commit, outside wait()
            executor.submit(self._apply_retention)
        if block:
            self.wait()
            self._report_failures()
        return result

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable or failed."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.wait()

    def restore(self, path: str | os.PathLike[str] | None = None, *, parts: Iterable[str] | None = None,
                stage: str | None = None, metric: str | None = None) -> int:
        """Load the newest checkpoint that verifies; return the step to continue from (0 when there is none).

        Invalid checkpoints met on the way are moved to ``.quarantine/`` with the reason, with a
        warning, and the next older one is tried. A candidate is read into a staging buffer and verified
        completely before any of the run's tensors is written, so one that fails leaves them exactly as they
        were. Says on one line what it did (see :func:`restore.announce`).

        ``path`` (a checkpoint, ``DIR/latest`` or ``DIR/N``): in this run's directory, exactly that checkpoint
        is loaded or CorruptCheckpointError raised. Elsewhere it is a *branch point*: this run starts from it
        while its directory holds no checkpoint of its own, and records it in every manifest (``lineage``);
        once it has checkpoints of its own (a restart), those are resumed. A directory that holds another
        run's checkpoints is refused. Nothing is written, deleted or pinned in the parent's directory.
        ``parts``: what a branch takes (default everything): names from ``lineage.PARTS`` (``model``,
        ``optimizer``, ``scheduler``, ``scaler``, ``extra``, ``user``, ``rng``, ``progress``); without
        ``progress`` the step starts at 0. ``stage`` (with ``metric="val_loss[:min|max]"`` for its best
        checkpoint, else its newest): branch from a checkpoint of that stage found in the directories next
        to this run's (or under ``path``, a directory).
        """
        wanted = lineage.check_parts(parts)
        if stage is not None:
            lineage.check_stage(stage, "restore(stage=...)")
        elif metric is not None:
            raise CkptdError("restore(metric=...) picks the best checkpoint of a stage: give stage= too")
        self.wait()
        self._restore_started = time.perf_counter()
        if stage is not None:  # a restart of the branch resumes its own checkpoints: look for the stage's only if none
            where = path

            def pick() -> str:
                return self._stage_checkpoint(stage, metric, where)

            return self._branch(pick, wanted, stage)
        if path is not None:
            target = os.path.abspath(resolve(path))
            if os.path.dirname(target) != self.dir:
                return self._branch(lambda: target, wanted, None)
            info = store.inspect_checkpoint(target, self.key)
            if not info.valid:
                raise CorruptCheckpointError(info.path, info.reason)
            return self._after_restore(info, self._stage(info, wanted).apply())
        branch = os.environ.get(env.RESUME_FROM) or None
        self._coordinate()  # several ranks: every rank loads the same checkpoint, its own part of it
        if self.remote is not None:  # the leader downloads a newer remote checkpoint; every rank hears the outcome
            error, name, note = self._ranks().agree(self._fetch_remote)
            if error:
                raise RemoteError(error)
            self._remote_restore = (name, note)
        found = newest(self._ranks(), self.dir, self._stage, quiet=branch is not None, key=self.key)
        if found is not None:
            return self._after_restore(*found)
        if branch is not None:  # `ckptd run --resume-from`: the run has nothing of its own yet
            if parts is None:
                wanted = lineage.check_parts(os.environ.get(env.RESUME_PARTS) or None)
            return self._restore_branch(os.path.abspath(branch), wanted)
        return 0

    def _fetch_remote(self) -> tuple[str, str, str]:
        """(error, name downloaded, note for restore()'s line): the newest remote checkpoint that verifies, into
        ``dir``, when it is newer than every valid local one. An unreadable remote tier is an error only when the
        local tier holds no valid checkpoint (starting again at step 0 would silently lose the run)."""
        from .remote import RemoteTier

        assert self.remote is not None
        url = self.remote.url
        try:
            got = RemoteTier(self.remote).fetch_newer(self.dir, lambda m: log.warning("ckptd: %s", m))
        except RemoteError as exc:
            if os.path.isdir(self.dir) and any(i.valid for i in store.list_checkpoints(self.dir)):
                log.warning("ckptd: %s; restoring from the local tier", exc)
                return "", "", "local tier; the remote tier could not be read"
            return f"{exc}; restore() will not start at step 0 while the remote tier may hold the run", "", ""
        except CkptdError as exc:
            return str(exc), "", ""
        if got is None:
            return "", "", "local tier"
        info, rc, seconds = got
        return "", info.name, (f"remote tier: {url}/{rc.key}, {rc.bytes} bytes downloaded and verified in "
                               f"{seconds:.1f} s")
    def _stage_checkpoint(self, stage: str, metric: str | None, where: str | os.PathLike[str] | None) -> str:
        """The checkpoint ``restore(stage=...)`` branches from: among the valid checkpoints of that stage in the
        run directories under ``where`` (default: the directory that holds this run's; this run's own directory
        is left out), the best by ``metric`` or else the newest (by time written)."""
        base = os.path.abspath(os.fspath(where)) if where is not None else os.path.dirname(self.dir)
        infos = [i for run, found in store.list_runs(base) if os.path.abspath(run) != self.dir
                 for i in found if i.valid and i.stage == stage]
        if not infos:
            raise NotFoundError(f"restore(stage={stage!r}): no valid checkpoint of stage {stage!r} in the run "
                                f"directories under {base}; `ckptd ls --tree {base}` shows the stages there")
        if metric is None:
            return max(infos, key=lambda i: (i.created, i.step)).path
        name, sep, mode = metric.rpartition(":")
        if not sep or mode not in ("min", "max"):
            name, mode = metric, "min"
        ranked = retention.ranked(infos, name, mode)
        if not ranked:
            raise NotFoundError(f"restore(stage={stage!r}, metric={metric!r}): no checkpoint of stage {stage!r} "
                                f"under {base} has the metric {name!r}; attach it with ck.report or ckptd.add_metrics")
        return ranked[0].path

    def _branch(self, point: Callable[[], str], parts: tuple[str, ...], stage: str | None) -> int:
        """A branch (``restore(path)`` outside this run's directory, or ``restore(stage=...)``): the branch point
        ``point()`` while the run has no checkpoint of its own; afterwards (a restart) the run's own newest, when
        it is this branch's (the same branch point, or for ``stage`` a branch point of that stage)."""
        mine = [i for i in store.list_checkpoints(self.dir) if i.valid] if os.path.isdir(self.dir) else []
        if mine:
            hops = (mine[-1].lineage or {}).get("hops") or [{}]
            first = hops[0]
            recorded = os.path.join(first.get("dir", ""), first.get("name", ""))
            ours = first.get("stage") == stage if stage is not None else recorded == point()
            if not ours:
                said = f"branched from {recorded}" if first else "a run not branched from anything"
                wanted = f"a branch of stage {stage!r}" if stage is not None else f"a branch of {point()}"
                raise CkptdError(f"{self.dir} already holds another run's checkpoints (newest: step {mine[-1].step}, "
                                 f"{said}), not {wanted}; branch into an empty directory (dir=...) or move those "
                                 "checkpoints aside")
            self._coordinate()
            found = newest(self._ranks(), self.dir, self._stage, quiet=True)
            if found is not None:
                return self._after_restore(*found)
        return self._restore_branch(point(), parts)

    def _restore_branch(self, target: str, parts: tuple[str, ...]) -> int:
        """Load ``parts`` of another run's checkpoint into this new run and record the branch point."""
        info = store.inspect_checkpoint(target)
        if not info.valid:
            raise CorruptCheckpointError(info.path, info.reason)
        if info.manifest.get("sharded") and parts != lineage.PARTS:
            raise CkptdError(f"{info.path} is a sharded (FSDP) checkpoint: restore(parts=...) takes all of it; "
                             "leave parts out")
        restored = self._stage(info, parts).apply()
        changed = origin.differences(info.origin, self.origin)
        if info.stage != self.stage:
            changed.insert(0, f"stage {info.stage or '(none)'} -> {self.stage or '(none)'}")
        hop = lineage.hop(os.path.dirname(info.path), info.manifest, info.name, store.files_digest(info.manifest),
                          parts, changed)
        self.lineage = lineage.extend(hop, info.lineage)
        self.branched = True
        self.origin = {**self.origin, "resume_from": info.path}
        self._watch_hyperparameters()
        return self._after_restore(info, restored, parts=parts)

    def _watch_hyperparameters(self) -> None:
        """At the branch's first optimizer step, record the hyperparameters it changed (a learning rate set
        after restore(), a fresh optimizer's) among the branch point's ``changed``."""
        if self._lr_hook is not None:
            self._lr_hook.remove()
            self._lr_hook = None
        if self.optimizer is None or self._parent_groups is None or \
                not hasattr(self.optimizer, "register_step_pre_hook"):
            return
        before = self._parent_groups

        def first_step(opt: Any, args: Any, kwargs: Any) -> None:
            if self._lr_hook is not None:
                self._lr_hook.remove()
                self._lr_hook = None
            now = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            self.lineage = lineage.with_changes(self.lineage, lineage.hyperparameter_changes(before, now))

        self._lr_hook = self.optimizer.register_step_pre_hook(first_step)

    def close(self) -> None:
        """Finish the save in flight and, with ``save_on_close``, save the state as it is now when it is not
        the newest checkpoint's: a step not saved yet, or work done after the last saved step (the end of an
        epoch: evaluation, ``scheduler.step()``), found by comparing the small state (counters, scheduler,
        optimizer hyperparameters, ``extra``, ``user``, RNG streams) with the checkpoint's."""
        if self._closed:
            return
        try:
            self.wait()
            if self.save_on_close and self._stepped and self._step is not None and self._changed_since_commit():
                self.save(kind="final", block=True, replace=True)
            self._report_failures()
            self._mark_finished()
        finally:
            self._shutdown()

    def _changed_since_commit(self) -> bool:
        if self._step != self._committed_step:
            return True
        if self._dist is not None or self._committed_digest is None or self._step is None:
            return False  # several ranks: each has its own small state; the step decides
        enc = Encoder()
        try:
            tree = enc.encode(self._capture_tree(self._step), "")
            return _small_digest(state_dumps(tree), enc.tensors) != self._committed_digest
        except CkptdError:
            return False  # a state save() would refuse: nothing to compare

    def _mark_finished(self) -> None:
        """close() after the last step: the newest checkpoint, when it holds that step, says the run finished
        (``ckptd run`` then does not start the same command again; restore() says so)."""
        if not self.writes or not self._stepped or self._step is None or self._step != self._committed_step:
            return
        path = os.path.join(self.dir, store.checkpoint_name(self._step))
        try:
            store.amend_manifest(path, finished=True, key=self.key)  # no rewrite when it is already marked
        except CorruptCheckpointError:
            return  # not a checkpoint to mark: restore() will set it aside
        except (CkptdError, OSError) as exc:
            log.warning("ckptd: could not mark %s as the end of the run: %s", path, exc)

    def report(self, step: int, **metrics: Any) -> None:
        """Attach metrics known only after step ``step`` was saved (e.g. ``val_loss``) to its checkpoint.

        Waits for the save in flight, then rewrites the checkpoint's manifest with the metrics added
        (durably: temp, fsync, rename; checksummed by the manifest's digest). Retention's ``keep_best``,
        ``ckptd ls`` and ``ckptd inspect`` read them from there. Raises NotFoundError when there is no
        checkpoint of ``step``; does nothing on a rank that does not write checkpoints.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CkptdError(f"ck.report() takes the step of a saved checkpoint (int >= 0), got {step!r}")
        values = checked_metrics(metrics, "ck.report()")
        self.wait()
        self._report_failures()
        if not self.writes:
            return
        path = os.path.join(self.dir, store.checkpoint_name(step))
        if not os.path.isdir(path):
            raise NotFoundError(f"ck.report(): no checkpoint of step {step} in {self.dir}; report metrics of a "
                                "step that was saved (ck.step(n) saved it when due, or call ck.save() first)")
        # On the writer thread: after the library's own retention of the last save, never beside it.
        self._writer().submit(store.amend_manifest, path, metrics=values, key=self.key).result()
        if self.policy.active:  # keep_best may now keep (or no longer keep) something
            self._writer().submit(self._apply_retention)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # never write a "final" checkpoint of a loop that failed mid-step
            try:
                self.wait()
            finally:
                self._shutdown()

    # ------------------------------------------------------------------ saving internals

    def _due(self, step: int, now: float) -> bool:
        if step == self._committed_step:
            return False
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds and now - self._last_save_time >= self.every_seconds)

    def _snapshot_if_due(self, step: int) -> None:
        """``snapshot_every_steps``: a snapshot of ``step`` into the memory tier, sealed, not committed; the
        supervisor writes the newest one as a checkpoint if this process dies (docs/memory-tier.md)."""
        every = self.snapshot_every_steps
        if not every or step % every or step == self._committed_step or not self.writes:
            return
        memory = self._memory
        if memory is None or self._dist is not None:
            if not self._snapshots_off_said:
                self._snapshots_off_said = True
                log.warning("ckptd: snapshot_every_steps=%d has no effect: the memory tier is off for this process "
                            "(said above); a crash loses up to a disk save interval", every)
            return
        if self._prewarm is not None:
            self._prewarm.result()  # usually long done; never lay the region out twice
        inflight = self._inflight if self._inflight is not None and not self._inflight.done() else None

        def wait() -> None:  # the save in flight writes from the slot this snapshot takes: it finishes first
            self.stats["snapshot_waits"] += 1
            self.wait()  # ends its pacing too

        taken = memory.capture(self._capture_tree(step), step, self._fields("periodic", dict(self.metrics), self.epoch),
                               self.key is not None, self._snapshot.helper,
                               inflight._slot if inflight is not None else None, wait)
        if taken is None:
            self._memory = None  # off for this life (said once); today's private buffer from here on
            return
        self.stats["snapshots"] += 1

    def _start_prewarm(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """At the first step (or restore), size the state and prepare the snapshot buffer in the background."""
        if tensors is None:
            tensors = self._live_tensors()
        if not tensors:  # nothing to save, or a value save() will report with the full message
            self._prewarm = Future()
            self._prewarm.set_result(None)
            return
        size = sum(nbytes(t) for t in tensors.values())
        pinned = any(t.is_cuda for t in tensors.values())
        memory = self._memory if not pinned else None
        if memory is not None:  # the region's pages are allocated (touched) by prepare: the same prewarm
            def prepare() -> None:
                if not memory.prepare(size):
                    self._snapshot.prewarm(size, pinned)

            self._prewarm = self._writer().submit(prepare)
            return
        self._prewarm = self._writer().submit(self._snapshot.prewarm, size, pinned)

    def _capture_tree(self, step: int, at_boundary: bool = False) -> dict[str, Any]:
        """The state to save; ``at_boundary``: the RNG streams and loader positions of the last safe point."""
        boundary = self._boundary if at_boundary else None
        extra: dict[str, Any] = {}
        for name, obj in self.extra.items():
            if boundary is not None and name in boundary[1]:
                extra[name] = {"stateful": boundary[1][name]}
            elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
                extra[name] = {"stateful": obj.state_dict()}
            else:
                extra[name] = {"value": obj}
        progress: dict[str, Any] = {"step": step, "epoch": self.epoch}
        if self._epoch_done:
            progress["epoch_done"] = True
        tree: dict[str, Any] = {"progress": progress, "rng": boundary[0] if boundary is not None else capture_rng(),
                                "extra": extra, "user": self.user, "metrics": self.metrics}
        for name in ("model", "optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None:
                tree[name] = obj.state_dict()
        return tree

    def _capture_files(self, step: int, result: SaveResult, fields: dict[str, Any]) -> list[persist.File]:
        """Snapshot what this process writes (the save's stall). One process: the whole state (and its small
        state's digest, for close()). Several ranks: each rank its own part (``rank-NNNNN.*``), the leader
        the replicated rest, and a sharded model's shards through torch.distributed.checkpoint."""
        tree = self._capture_tree(step, at_boundary=self._from_poll)
        ranks = self._ranks()
        if self._memory is not None and not ranks.per_rank:
            taken = self._memory.capture(tree, step, fields, self.key is not None, self._snapshot.helper)
            if taken is not None:
                result._digest = _small_digest(taken.files[1].head, taken.tensors)
                result._slot = taken.slot
                return taken.files
            self._memory = None  # off for this life (said once); today's private buffer from here on
        if not ranks.per_rank:
            files, tensors = persist.encode(tree, self._snapshot, (store.TENSORS, store.STATE))
            result._digest = _small_digest(files[1].head, tensors)
            return files
        own = {k: tree.pop(k) for k in persist.PER_RANK_KEYS if k in tree}
        files = []
        if ranks.sharded:
            from . import sharded

            tree.pop("model", None)
            tree.pop("optimizer", None)
            tensors, tree["sharded"] = sharded.split(self.model, self.optimizer)
            if self._shard_staging is None:
                self._shard_staging = sharded.Staging()
            files.append(persist.File(persist.DCP, self._shard_staging.take(tensors)))
        if ranks.leader:
            files += persist.encode(tree, self._snapshot, (store.TENSORS, store.STATE))[0]
        if self._rank_snapshot is None:
            self._rank_snapshot = Snapshot()
        return files + persist.encode(own, self._rank_snapshot, rank_files(ranks.rank))[0]

    def _ranks(self) -> Solo:
        """How this process cooperates with the job's other ranks on a save or restore (ranks.py)."""
        return self._dist.ranks if self._dist is not None else self._solo

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptd-writer",
                                                initializer=store.lower_thread_priority)
        return self._executor

    def _fields(self, kind: str, metrics: dict[str, Any], epoch: int | None) -> dict[str, Any]:
        """A save's manifest fields besides the files (the memory tier keeps them with the snapshot)."""
        ranks = self._ranks()
        extra: dict[str, Any] = {"epoch": epoch, "versions": {"ckptd": __version__, "torch": torch.__version__},
                                 "run_id": os.environ.get(env.RUN_ID, ""), "origin": self.origin,
                                 "stage": self.stage, "lineage": self.lineage}
        if ranks.per_rank:
            extra.update(world_size=ranks.world, sharded=ranks.sharded)
        return {"kind": kind, "metrics": jsonable_metrics(metrics), "extra": extra}

    def _persist(self, result: SaveResult, files: list[persist.File], fields: dict[str, Any],
                 replace: bool = False) -> None:
        """The writer thread's half of a save: every rank writes its files, the leader commits them all at once
        (persist.write); the outcome is recorded on ``result`` and said to the supervisor."""
        t0 = time.perf_counter()
        ranks = self._ranks()
        try:
            result.path = persist.write(ranks, self.dir, result.step, files, fields, self._pacer(result), replace,
                                        self.key)
            result._replaced = replace and result.path is not None
            if result.path is None:  # this step is already checkpointed
                result.skipped = f"step {result.step} is already checkpointed"
                result.path = os.path.join(self.dir, store.checkpoint_name(result.step))
                self._committed_step = result.step
                self._notify_saved(result)
                return
        except BaseException as exc:  # noqa: BLE001 - reported at the next step(); never published
            result.error = exc
            with self._lock:
                self._failures.append(exc)
            if self.channel is not None and ranks.local_rank == 0:  # one word per node
                self.channel.send(protocol.SAVE_FAILED, step=result.step, kind=result.kind,
                                  request_id=",".join(result.request_ids), request_ids=result.request_ids,
                                  error=str(exc), errno=getattr(exc, "errno", None))
            return
        result.persist_seconds = time.perf_counter() - t0
        self.stats["saves"] += 1
        self.stats["last_persist_seconds"] = result.persist_seconds
        # What a save of this state costs when nobody paces it: the emergency stop's deadline estimate.
        self._save_times.record(result.stall_seconds + result.persist_seconds - result.paused_seconds)
        self._committed_step = result.step
        self._committed_digest = result._digest
        self._notify_saved(result)

    def _pacer(self, result: SaveResult) -> store.Pace | None:
        """Pause ``pace`` x each write request's time, until somebody waits for the save."""
        if self.pace <= 0:
            return None
        factor, hurry = self.pace, result._hurry

        def pause(seconds: float) -> None:
            if not hurry.is_set():
                t0 = time.monotonic()
                hurry.wait(seconds * factor)
                result.paused_seconds += time.monotonic() - t0

        return pause

    def _notify_saved(self, result: SaveResult) -> None:
        if self.channel is not None and self._ranks().local_rank == 0:  # one word per node
            self.channel.send(protocol.SAVED, step=result.step, path=result.path, kind=result.kind,
                              request_id=",".join(result.request_ids), request_ids=result.request_ids,
                              bytes=result.bytes,
                              seconds=result.stall_seconds + result.persist_seconds,
                              paused_seconds=result.paused_seconds, stall_seconds=result.stall_seconds,
                              **({"replaced": True} if result._replaced else {}))

    def _keep_emergency(self, info: store.CheckpointInfo) -> None:
        """The emergency checkpoint a run resumed from is pinned: no retention rule deletes it, only a person
        (``ckptd pin --remove``), so the point where the run was interrupted stays inspectable."""
        try:
            if info.name not in store.pinned(self.dir):
                store.pin(self.dir, info.name)
        except OSError as exc:
            log.warning("ckptd: could not pin %s (the emergency checkpoint this run resumed from): %s", info.name, exc)

    def _apply_retention(self) -> None:
        if not self.policy.active:
            self._warn_growth()
            return
        pins = {self.resumed_from} if self.resumed_from else set()
        try:
            hold = retention.UploadHold(store.remote_mark(self.dir, self.remote.url)) \
                if self._upload_hold and self.remote is not None else None
            deleted = retention.apply(self.dir, self.policy, pins, before_delete=self._tell_pruning, hold=hold,
                                      on_held=self._note_held)
        except (OSError, CkptdError) as exc:
            log.warning("ckptd: retention skipped: %s", exc)
            return
        if deleted:
            log.info("ckptd: retention removed %s", ", ".join(deleted))

    def _note_held(self, names: list[str]) -> None:
        if names and names != self._held:
            log.info("ckptd: retention keeps %s until the remote tier has them", ", ".join(names))
        self._held = names

    def _tell_pruning(self, names: list[str]) -> None:
        """Before retention deletes: the supervisor then records these deletions as expected, not as someone
        else's."""
        if self.channel is not None:
            self.channel.send(protocol.PRUNING, names=names)

    def _warn_growth(self) -> None:
        """No retention rule here nor in the supervisor: say once that the directory keeps growing."""
        if self._growth_warned or os.environ.get(env.RETENTION) == "1":
            return
        try:
            said = retention.growth_warning(store.list_checkpoints(self.dir), self.policy)
        except (OSError, CkptdError):
            return
        if said:
            self._growth_warned = True
            log.warning("ckptd: %s", said)

    def _report_failures(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, []
        for exc in failures:
            self.stats["failed"] += 1
            if self.on_error == "raise" or not isinstance(exc, (CkptdError, OSError)):
                raise exc
            log.error("ckptd: checkpoint failed and was not published (%s); training continues, "
                      "the next due save tries again", exc)

    # ------------------------------------------------------------------ stopping

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            return  # the script has its own handler; leave it alone
        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal_stop is not None:  # second signal: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signal_stop = signum  # only record; the next step() does the work

    def _emergency_stop(self, reason: str, deadline: float | None = None, from_poll: bool = False) -> None:
        """Write the emergency checkpoint of the current step and exit 85, or exit 86 saying why not.

        ``deadline`` (unix time, from the supervisor's ``stop``: a cloud notice or the grace period):
        a save that cannot finish by then is not started (:meth:`_too_late`); the last committed
        checkpoint stays the one to resume from. ``from_poll``: the checkpoint holds the RNG streams and
        loader positions of the last safe point (:meth:`_safe_point`).
        """
        step = self._step
        self._watch.reached()
        log.warning("ckptd: stop requested (%s); writing an emergency checkpoint of step %s", reason, step)
        self._from_poll = from_poll
        code = exitcodes.PREEMPTED
        why_not: str | None = None
        try:
            self.wait()  # the save in flight hurries; its time counts against the deadline, it may be this step
            self._report_failures()
            why_not = self._too_late(step, deadline)
            if self._dist is not None:  # all ranks write it, or none does
                why_not = self._dist.agree_reason(why_not)
            if why_not is None:
                # The step's checkpoint exists but work after it changed the state (an epoch's end: evaluation,
                # scheduler.step()): the emergency checkpoint replaces it, or that work would be lost.
                replace = step is not None and step == self._committed_step and self._changed_since_commit()
                result = self.save(kind="emergency", block=True, replace=replace)
                if result.error is not None:
                    raise result.error
            else:
                log.error("ckptd: %s", why_not)
                code = exitcodes.STOPPED_NO_CHECKPOINT
        except (CkptdError, OSError) as exc:
            log.error("ckptd: emergency checkpoint failed: %s", exc)
            code = exitcodes.STOPPED_NO_CHECKPOINT
            why_not = f"the emergency checkpoint failed: {exc}"
        if self.channel is not None:
            self.channel.send(protocol.STOPPING, step=step, exit_code=code, reason=why_not)
        dist, self._dist = self._dist, None
        self._shutdown()  # restores the signal handlers: before_exit() then ignores SIGTERM
        exit_code = code
        if dist is not None:
            from .distributed import clean_stop_exit_code

            exit_code = clean_stop_exit_code(code)  # 0 under `ckptd run` + torchrun: torchrun ends quietly
            dist.before_exit(stop_launcher=exit_code != 0)
        raise SystemExit(exit_code)

    def _stop_pending(self) -> bool | None:
        """For the stop watch (its thread): whether a stop waits for a safe point; None with several ranks,
        where a stop waits for the next agreement step by design."""
        if self._dist is not None:
            return None
        stop = self.channel.peek_stop() if self.channel is not None else None
        return self._signal_stop is not None or (stop is not None and stop.stop)

    def _warn(self, event: str, msg: str, **fields: Any) -> None:
        """A warning for the run: the supervisor logs and journals it (protocol.WARNING); without one, the log."""
        if self.channel is None:
            log.warning("ckptd: %s", msg)
        elif self._ranks().local_rank == 0:  # one word per node
            self.channel.send(protocol.WARNING, event=event, message=msg, **fields)

    def emergency_save_estimate(self) -> float | None:
        """Seconds an emergency checkpoint is expected to need: the longest of this run's last
        ``stopping.EMERGENCY_HISTORY`` durable saves (snapshot + unpaced persist) x ``EMERGENCY_FACTOR`` +
        ``EMERGENCY_MARGIN``. None before the first durable save of this process."""
        return self._save_times.estimate()

    def _too_late(self, step: int | None, deadline: float | None) -> str | None:
        """Why the emergency checkpoint must not be started before ``deadline``, or None when it fits."""
        if deadline is None or step is None or step == self._committed_step:
            return None  # no deadline, nothing to save, or the save just waited for was this very step
        kept = (f"step {self._committed_step}" if self._committed_step is not None else
                os.path.basename(self.resumed_from) if self.resumed_from else "none")
        return self._save_times.too_late(step, deadline - time.time(), kept)

    def _shutdown(self) -> None:
        self._closed = True
        if self._lr_hook is not None:  # a branch that never stepped: the optimizer keeps no hook of ours
            self._lr_hook.remove()
            self._lr_hook = None
        self._watch.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._snapshot.close()
        if self._rank_snapshot is not None:
            self._rank_snapshot.close()
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()
        if self.channel is not None:
            self.channel.close()

    # ------------------------------------------------------------------ restoring internals

    def _stage(self, info: store.CheckpointInfo, parts: tuple[str, ...] = lineage.PARTS) -> Prepared:
        """Read and verify one checkpoint (this rank's part of it); returns what applies it or puts the run's
        tensors back as they were (a rank whose peers refused the candidate). Until every byte has verified
        and the state has decoded, nothing of the run changes for good: CPU tensors read in place are put
        back from the undo log on any failure (CorruptCheckpointError otherwise), objects are not touched
        before apply.

        A checkpoint written by several ranks holds the replicated state once and each rank's own
        state (RNG streams, ``extra``, ``user``) in ``rank-NNNNN.*``: this rank's part replaces those keys.
        """
        trees: list[dict[str, Any]] = []  # state.json, read and parsed while the tensor file is read
        live = self._live_tensors()
        if parts != lineage.PARTS:  # the parts not taken keep their tensors: none is read into
            live = {k: v for k, v in live.items() if k.split("/", 1)[0] in parts}
        check = self._check_model_keys if "model" in parts else None
        memory = self._memory.source(info, self.dir) if self._memory is not None else None
        try:
            staged = read_tensors(info, live, check=check, staging=self._staging,
                                  during=lambda: trees.append(read_state_json(info, memory and memory.state)),
                                  source=(memory.fd, memory.offset, memory.size) if memory is not None else None)
        except CorruptCheckpointError as exc:
            if memory is None:
                raise
            log.warning("ckptd: the memory tier's snapshot of step %d does not match its checkpoint (%s); reading "
                        "it from disk", info.step, exc)
            memory, trees = None, []
            staged = read_tensors(info, live, check=check, staging=self._staging,
                                  during=lambda: trees.append(read_state_json(info)))
        self._restored_from_memory = info.name if memory is not None else None
        tree = trees[0]
        try:
            merged = decode(tree, staged.source.__getitem__)  # after the read: NumPy scalars are values from bytes
            own = read_rank_part(info, self.rank)
            if own is not None:
                merged.update(own)
            check_state(merged, info)  # every tag, before applying (the RNG states need the tensor data)
        except StateDecodeError as exc:
            staged.rollback()  # the run's tensors go back as they were, whatever failed
            raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None
        except BaseException:
            staged.rollback()
            raise

        def apply() -> Restored:
            redecode = bool(staged.copies)  # staged (CUDA) tensors: the state must name the live ones
            staged.apply(self._snapshot.helper() if COPY_THREADS > 1 else None)
            state = merged
            if redecode:
                state = decode(tree, staged.result.__getitem__)
                if own is not None:
                    state.update(own)
            return Restored(self._apply_tree(state, parts), staged.result)

        prepared = Prepared(apply, staged.rollback, tree)
        if info.manifest.get("sharded"):
            try:
                return self._with_shards(info, prepared)
            except BaseException:
                prepared.discard()
                raise
        return prepared

    def _with_shards(self, info: store.CheckpointInfo, prepared: Prepared) -> Prepared:
        """A sharded checkpoint: verify this rank's share of its files; applying it also loads the shards."""
        from . import sharded

        ranks = self._ranks()
        if not isinstance(ranks, Sharded):
            raise CkptdError(f"{info.path} holds sharded state (FSDP/DTensor) but this model is not sharded; "
                             "shard it the same way (fully_shard) before restore()")
        sharded.verify_share(info, ranks.rank, ranks.world)
        try:
            rest = decode(prepared.tree.get("sharded"), lambda key: None)  # type: ignore[arg-type,return-value]
        except StateDecodeError as exc:
            raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None
        if not isinstance(rest, dict) or not {"model", "optimizer"} <= set(rest):
            raise CorruptCheckpointError(info.path, f"{store.STATE} lacks the sharded state's structure")

        def apply_all() -> Restored:
            restored = prepared.apply()
            ranks.load_shards(info, self.model, self.optimizer, rest)
            return restored

        return Prepared(apply_all, prepared.discard, prepared.tree)

    def _staging(self, size: int, pinned: bool) -> torch.Tensor:
        """Host memory to read a candidate into before it verified: the reused snapshot buffer when this
        rank saves (restore then doubles as its prewarm), else a temporary buffer."""
        if not self.writes:
            return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        if self._prewarm is not None:
            self._prewarm.result()
        snap = self._snapshot
        if self._memory is not None:
            self._memory.lend()  # the first slot's buffer holds a candidate now, no longer a snapshot
        if snap.buffer is None or snap.buffer.numel() < size or (pinned and not snap.buffer.is_pinned()):
            snap.allocate(size, pinned)  # no zeroing: the read touches every page
        assert snap.buffer is not None
        return snap.buffer[:size]

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        """The run's current tensors under their checkpoint keys: restore copies verified data into them."""
        enc = Encoder()
        try:
            enc.encode(self._capture_tree(0), "")
        except CkptdError:
            return {}
        return enc.tensors

    def _check_model_keys(self, path: str, entries: list[store.TensorEntry]) -> None:
        if self.model is None or self._ranks().sharded:
            return  # sharded: the model's shards are checked by torch.distributed.checkpoint's load planner
        model_sd = self.model.state_dict()
        saved = {e.key[6:]: e for e in entries if e.key.startswith("model/")}
        wanted = {k for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
        missing, unexpected = wanted - set(saved), set(saved) - wanted
        problems = []
        if missing:
            problems.append(f"missing from checkpoint: {', '.join(sorted(missing)[:5])}")
        if unexpected:
            problems.append(f"not in the model: {', '.join(sorted(unexpected)[:5])}")
        for k in sorted(wanted & set(saved)):
            t, e = model_sd[k], saved[k]
            if tuple(t.shape) != e.shape or DTYPES.get(t.dtype) != e.dtype:
                problems.append(f"{k}: checkpoint has {e.dtype}{list(e.shape)}, "
                                f"model has {DTYPES.get(t.dtype)}{list(t.shape)}")
                break
        if problems:
            raise CkptdError(f"checkpoint {path} does not fit this model ({'; '.join(problems)}); "
                             "build the same model architecture, or start a new run in another --dir")

    def _apply_tree(self, state: dict[str, Any], parts: tuple[str, ...] = lineage.PARTS) -> int:
        """Apply ``parts`` of a decoded state that :func:`restore.check_state` accepted; returns its step (0
        without ``progress``: a run that starts counting anew)."""
        opt_state = state.get("optimizer")
        self._parent_groups = opt_state.get("param_groups") if isinstance(opt_state, dict) else None
        if self.model is not None and "model" in parts:
            model_state = state.get("model", {})
            if any(not isinstance(v, torch.Tensor) for v in model_state.values()):
                self.model.load_state_dict(model_state)  # modules with extra (non-tensor) state
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None and name in state and name in parts:
                obj.load_state_dict(state[name])
        for name, entry in state.get("extra", {}).items() if "extra" in parts else ():
            obj = self.extra.get(name)
            if "stateful" in entry and obj is not None and hasattr(obj, "load_state_dict"):
                obj.load_state_dict(entry["stateful"])
            elif "value" in entry:
                self.extra[name] = entry["value"]
        if "user" in parts:
            self.user.clear()
            self.user.update(state.get("user") or {})
        if "rng" in parts:
            restore_rng(state.get("rng") or {})
        if "progress" not in parts:
            self.epoch, self._epoch_done, self._resumed_epoch = None, False, None
            return 0
        self.metrics = dict(state.get("metrics") or {})
        progress = state["progress"]
        self.epoch = progress.get("epoch")
        self._epoch_done = progress.get("epoch_done") is True
        self._resumed_epoch = (self.epoch, self._epoch_done) if self.epoch is not None else None
        return int(progress["step"])

    def _after_restore(self, info: store.CheckpointInfo, restored: Restored,
                       parts: tuple[str, ...] | None = None) -> int:
        """``parts``: a branch (another run's checkpoint), of which those were restored."""
        step = restored.step
        self._step = step
        self._jump_base = step
        self._last_save_time = time.monotonic()
        self._safe_point()  # the restored streams are the boundary until the first step()
        if parts is not None:  # this run's directory holds nothing yet: its first save is its own
            self._committed_step, self._committed_digest = None, None
        else:
            self.branched = False
            self._committed_step = step
            enc = Encoder()
            try:  # the state now is the checkpoint's: close() saves only if it changes
                self._committed_digest = _small_digest(state_dumps(enc.encode(self._capture_tree(step), "")),
                                                       enc.tensors)
            except CkptdError:
                self._committed_digest = None
            self.lineage = info.lineage  # the same run: where it branched from stays recorded
            if self.stage is None:
                self.stage = info.stage
        if parts is None and os.path.dirname(os.path.abspath(info.path)) == self.dir:
            self.resumed_from = info.name
            if info.kind == "emergency" and self.writes:
                self._keep_emergency(info)
        tier = " (from the memory tier)" if self._restored_from_memory == info.name else ""
        if self.remote is not None:
            name, note = self._remote_restore
            tier = f" ({note})" if name and name == info.name else " (local tier)" if name else \
                f" ({note or 'local tier'})"
        if parts is not None:
            taken = "everything" if parts == lineage.PARTS else ", ".join(parts)
            announce(f"ckptd: branched from step {info.step} of {info.path} (restored: {taken}); this run continues "
                     f"at step {step} in {self.dir}" + _resume_notes(info, self.origin))
        else:
            announce(f"ckptd: resumed from step {step}: {info.path}{tier}" + _resume_notes(info, self.origin))
        if self._prewarm is None and self.async_save and self.writes:
            self._start_prewarm(restored.tensors)  # the state's size is known now; the first save will not page-fault
        if self.channel is not None:
            self.channel.send(protocol.RESTORED, step=step, path=info.path,
                              seconds=round(time.perf_counter() - self._restore_started, 6))
        return step


def _load_key(key_file: str | os.PathLike[str] | None, allow_unkeyed: bool | None) -> store.Key | None:
    """The key of authenticated checkpoints: ``key_file``, else ``$CKPTD_KEY_FILE``; None for neither."""
    env_path = os.environ.get(store.KEY_ENV) or None
    if allow_unkeyed is None:
        allow_unkeyed = os.environ.get(store.ALLOW_UNKEYED_ENV) == "1"
    if key_file is None:
        return store.Key.load(env_path, allow_unkeyed) if env_path else None
    path = os.path.abspath(os.fspath(key_file))
    if env_path and os.path.abspath(env_path) != path:
        log.warning("ckptd: key_file=%s differs from CKPTD_KEY_FILE=%s; using key_file", path, env_path)
    return store.Key.load(path, allow_unkeyed)


def _small_digest(state_json: bytes, tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state's small part: state.json (counters, scheduler, optimizer hyperparameters, extra,
    user, Python RNG) and the RNG tensors (torch, NumPy, CUDA; a few KB)."""
    h = store.new_hasher()
    h.update(state_json)
    for key in sorted(k for k in tensors if k.startswith("rng/")):
        t = tensors[key].detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


MAX_HEARTBEAT_METRICS = 32


def _heartbeat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The plain numbers among the metrics given to step() (``loss.item()``, not tensors), for the supervisor."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(name)[:64]] = float(value)
            if len(out) >= MAX_HEARTBEAT_METRICS:
                break
    return out


def _check_extra(extra: Mapping[str, Any]) -> None:
    """Refuse at construction what a save would refuse: a plain ``extra`` value that cannot be stored (an
    object with ``state_dict()``/``load_state_dict()`` is asked for its state at each save instead)."""
    for name, obj in extra.items():
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            Encoder().encode(obj, f"extra/{name}/value")  # UnsupportedStateError: the message a save would give


def _resume_notes(info: store.CheckpointInfo, now: dict[str, Any]) -> str:
    """What restore()'s line adds: that the run had finished there, and what differs from the run that
    wrote the checkpoint (command, script, ckptd config, world size)."""
    notes = ""
    if info.finished:
        notes += " (that run had finished: its script called close() after its last step)"
    diff = origin.differences(info.origin, now)
    if diff:
        notes += "; differs from the run that wrote it: " + "; ".join(diff)
    return notes


