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
"""

from __future__ import annotations

import ctypes
import mmap
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

from . import __version__, env, exitcodes, origin, protocol, retention, store
from .channel import TrainerChannel, connect_from_env
from .errors import CkptdError, CorruptCheckpointError, NotFoundError
from .data import DataLoader as ResumableLoader
from .state import (DTYPES, TORCH_DTYPES, Encoder, StateDecodeError, capture_rng, check_rng, decode,
                    restore_rng)
from .state import dumps as state_dumps

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


PARALLEL_COPY_BYTES = 32 << 20

_in_flight_hurry: set[threading.Event] = set()  # hurry events of the persists queued or running


# The emergency stop's deadline rule: start the save only when the time left before the deadline is at least
# the longest of the last EMERGENCY_HISTORY durable saves x EMERGENCY_FACTOR + EMERGENCY_MARGIN seconds.
EMERGENCY_HISTORY = 3
EMERGENCY_FACTOR = 1.5
EMERGENCY_MARGIN = 1.0

# A stop that has waited this long for a safe point (ck.step(), ck.poll(), the end of an epoch of
# ck.epochs()) is reported once, with the script's line it waits in: a loop there needs ck.poll().
STOP_WAIT_WARN_SECONDS = 3.0
STOP_WATCH_INTERVAL = 0.25

def _hurry_at_exit() -> None:
    """The script has ended and the interpreter waits for the writer: no more pauses."""
    for hurry in list(_in_flight_hurry):
        hurry.set()


# Runs when the main thread has finished, before the interpreter joins the writer threads
# (concurrent.futures joins its workers from the same hook; later registrations run first).
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_hurry_at_exit)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


COPY_THREADS = max(1, min(4, os.cpu_count() or 1))  # the loop is blocked during the copy anyway


def _copy_into(dests: list[tuple[str, torch.Tensor]], tensors: Mapping[str, torch.Tensor]) -> None:
    for k, dest in dests:
        t = tensors[k]
        if not t.numel():
            continue
        if t.is_cpu and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
            # libc memmove: 1.3-1.4x faster than torch's copy_ for these sizes here (docs/performance.md,
            # P1); ctypes releases the GIL, so the copy threads run in parallel. Same dtype and shape:
            # the bytes are the value.
            ctypes.memmove(dest.data_ptr(), t.data_ptr(), _nbytes(t))
        else:
            dest.copy_(t, non_blocking=t.is_cuda)


class _Snapshot:
    """Host buffer reused across saves; tensors laid out as a safetensors data section.

    The buffer is page-aligned (anonymous mmap with transparent huge pages, or pinned memory when CUDA
    tensors are saved) so the writer can use O_DIRECT. Every slice is aligned for its dtype (and most to a
    cache line), so it is viewed as that dtype without a copy. The layout,
    header and destination views are cached while the state's structure does not change.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.allocations = 0
        self._signature: tuple[Any, ...] | None = None
        self._header = b""
        self._dests: list[tuple[str, torch.Tensor]] = []
        self._parts: list[list[tuple[str, torch.Tensor]]] = []
        self._total = 0
        self._helper: ThreadPoolExecutor | None = None

    def _allocate(self, nbytes: int, pinned: bool) -> None:
        self.buffer = None  # free the old one before allocating the new
        self._signature = None
        nbytes = max(nbytes, 1)
        if pinned:
            raw = torch.empty(nbytes + store.ALIGN, dtype=torch.uint8, pin_memory=True)
            shift = -raw.data_ptr() % store.ALIGN
            self.buffer = raw[shift : shift + nbytes]
        else:
            # Shared anonymous memory (Python's default for mmap(-1)): forked children (DataLoader
            # workers) share it instead of marking it copy-on-write, so saves after a fork pay no COW
            # faults. Private anonymous memory with transparent huge pages was tried: its copy was not
            # faster (slower after a pause on this VM; docs/performance.md).
            mem = mmap.mmap(-1, nbytes)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    mem.madvise(mmap.MADV_HUGEPAGE)  # effective only where shmem THP is set to "advise"
                except OSError:
                    pass
            self.buffer = torch.frombuffer(mem, dtype=torch.uint8)
        self.allocations += 1

    def helper(self) -> ThreadPoolExecutor:
        """Copy threads, started once and kept (starting threads costs ~8 ms each on a busy VM)."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=max(1, COPY_THREADS - 1), thread_name_prefix="ckptd-copy")
        return self._helper

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None
        self.buffer, self._dests, self._parts, self._signature = None, [], [], None

    def prewarm(self, nbytes: int, pinned: bool) -> None:
        """Allocate and touch the buffer ahead of the first save (first-touch page faults are slow)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            self._allocate(nbytes, pinned)
            assert self.buffer is not None
            self.buffer.zero_()

    def take(self, tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, memoryview]:
        """Copy ``tensors`` into the buffer (the save's stall); returns (header, data view)."""
        signature = tuple((k, t.dtype, tuple(t.shape)) for k, t in tensors.items())
        cuda = any(t.is_cuda for t in tensors.values())
        if signature != self._signature or self.buffer is None:
            # Tensors whose size is a multiple of 64 bytes first: each then starts cache-line aligned
            # (unaligned destinations copy ~25% slower). The rest by element size, largest first, which
            # keeps every slice naturally aligned for its dtype. No gaps: safetensors allows none.
            order = sorted(tensors, key=lambda k: (_nbytes(tensors[k]) % 64 != 0, -tensors[k].element_size()))
            entries = [(k, DTYPES[tensors[k].dtype], list(tensors[k].shape), _nbytes(tensors[k])) for k in order]
            total = sum(e[3] for e in entries)
            if self.buffer is None or self.buffer.numel() < total or (cuda and not self.buffer.is_pinned()):
                self._allocate(total, cuda)
            buf = self.buffer
            assert buf is not None
            self._header = store.safetensors_header_bytes(entries, {"format": "ckptd"}, align=store.ALIGN)
            self._dests, off = [], 0
            for k, _, shape, n in entries:
                t = tensors[k]
                self._dests.append((k, buf[off : off + n].view(t.dtype).view(t.shape)))
                off += n
            self._total, self._signature = total, signature
            self._parts = [[] for _ in range(COPY_THREADS)]
            loads = [0] * COPY_THREADS
            for k, dest in sorted(self._dests, key=lambda kd: -_nbytes(kd[1])):  # largest first: greedy balance
                i = loads.index(min(loads))
                self._parts[i].append((k, dest))
                loads[i] += _nbytes(dest)
        if cuda or self._total < PARALLEL_COPY_BYTES or COPY_THREADS < 2:
            _copy_into(self._dests, tensors)
        else:
            # The loop is blocked anyway: copy with COPY_THREADS threads (memmove releases the GIL).
            others = [self.helper().submit(_copy_into, part, tensors) for part in self._parts[1:]]
            try:
                _copy_into(self._parts[0], tensors)
            finally:
                for f in others:
                    f.result()
        if cuda:  # the non_blocking copies were queued on each device's current stream
            for device in {t.device for t in tensors.values() if t.is_cuda}:
                torch.cuda.current_stream(device).synchronize()
        assert self.buffer is not None
        return self._header, memoryview(self.buffer.numpy()).cast("B")[: self._total]


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
        keep_last: int | None = None,
        keep_best: Iterable[str] = (),
        keep_every: int | None = None,
        save_on_close: bool = True,
        async_save: bool = True,
        pace: float = DEFAULT_PACE,
        on_error: str = "log",
        handle_signals: bool = True,
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
        for name, v in (("every_steps", self.every_steps), ("every_seconds", self.every_seconds)):
            if v is not None and v <= 0:
                raise CkptdError(f"{name} must be > 0, got {v}")
        self.policy = retention.Policy(
            keep_last=env.get_int(env.KEEP_LAST) or keep_last,
            keep_best=tuple(retention.Best.parse(b) for b in keep_best),
            keep_every=keep_every,
        )
        self.save_on_close = save_on_close
        self.async_save = async_save
        self.pace = float(pace)
        self.on_error = on_error
        self.rank = int(os.environ.get("RANK", "0") or 0)
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.writes = world_size <= 1 or self.rank == 0
        self.origin = origin.from_env(sys.argv, max(world_size, 1))  # recorded in every manifest
        _check_extra(self.extra)  # a value that cannot be saved fails here, not at the first save
        self._growth_warned = False
        self.epoch: int | None = None
        self.metrics: dict[str, Any] = {}
        self.resumed_from: str | None = None
        self.stats: dict[str, Any] = {"saves": 0, "failed": 0, "coalesced": 0, "skipped": 0,
                                      "last_stall_seconds": None, "last_persist_seconds": None}
        self._step: int | None = None
        self._committed_step: int | None = None
        # step() or an epoch's end ran in this process: only then may close() save a final state or mark the
        # run finished
        # (a script that only restores, evaluates and closes must leave the run's checkpoints as they are)
        self._stepped = False
        self._last_save_time = time.monotonic()
        self._snapshot = _Snapshot()
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
        self._stop_seen: float | None = None  # when the stop watcher first saw a stop pending
        self._stop_warned = False
        self._loop_thread: int | None = None
        self._from_poll = False  # the emergency save in progress was asked for in poll()
        self._watch: threading.Event | None = None
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
                return None
            return self.save(kind="periodic")
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
        self._loop_thread = threading.get_ident()
        if self._watch is None and self._dist is None:
            self._start_stop_watch()

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
        dist.listen(self, step)
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
        if self._dist is not None:  # this rank's files; rank 0's include the replicated state
            header, data, state_json = self._dist.capture(self, step), memoryview(b""), b""
            result.bytes = sum(len(h) + (len(d) if d is not None else 0) for _, h, d in header)
        else:
            encoder = Encoder()
            tree = encoder.encode(self._capture_tree(step, at_boundary=self._from_poll), "")
            header, data = self._snapshot.take(encoder.tensors)
            state_json = state_dumps(tree)  # refuses what restore would refuse (store's bounds on state.json)
            result.bytes = len(header) + len(data) + len(state_json)
            result._digest = _small_digest(state_json, encoder.tensors)
        result.stall_seconds = time.perf_counter() - t0
        self.stats["last_stall_seconds"] = result.stall_seconds
        self._last_save_time = time.monotonic()
        executor = self._writer()
        _in_flight_hurry.add(result._hurry)
        result._future = executor.submit(self._persist, result, header, data, state_json, dict(self.metrics),
                                         self.epoch, replace)
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

    def restore(self, path: str | os.PathLike[str] | None = None) -> int:
        """Load the newest checkpoint that verifies; return its step (0 when there is none).

        Invalid checkpoints met on the way are moved to ``.quarantine/`` with the reason, with a
        warning, and the next older one is tried. With ``path`` (e.g. to branch a new run from
        another run's checkpoint), exactly that checkpoint is loaded or CorruptCheckpointError raised.
        A candidate is read into a staging buffer and verified completely before any of the run's
        tensors is written, so one that fails leaves them exactly as they were. Says on one line
        what it did (see :func:`_announce`).
        """
        self.wait()
        self._restore_started = time.perf_counter()
        if path is not None:
            info = store.inspect_checkpoint(os.fspath(path))
            if not info.valid:
                raise CorruptCheckpointError(info.path, info.reason)
            self._load(info)
            return self._after_restore(info)
        branch = os.environ.get(env.RESUME_FROM) or None
        if self._coordinate() is not None:  # every rank loads the same checkpoint, its own part of it
            step = self._dist.restore(self)
            if self._committed_step is None and branch is not None:  # nothing of its own: the branch point
                return self.restore(branch)
            return step
        if not os.path.isdir(self.dir):
            if branch is not None:
                return self.restore(branch)
            _announce(f"ckptd: no checkpoint in {self.dir}: starting at step 0")
            return 0
        if self.writes:
            store.remove_stale_temps(self.dir)
        candidates = list(reversed(store.list_checkpoints(self.dir)))
        for info in candidates:
            try:
                if not info.valid:
                    raise CorruptCheckpointError(info.path, info.reason)
                self._load(info)
            except CorruptCheckpointError as exc:
                self._set_aside(info, exc.reason)
                continue
            except FileNotFoundError:
                log.info("ckptd: checkpoint %s disappeared while being read (moved by another process)", info.path)
                continue
            return self._after_restore(info)
        if branch is not None:  # `ckptd run --resume-from`: the run has nothing of its own yet
            return self.restore(branch)
        _announce(f"ckptd: no {'valid ' if candidates else ''}checkpoint in {self.dir}: starting at step 0")
        return 0

    def _set_aside(self, info: store.CheckpointInfo, reason: str) -> None:
        """Quarantine an invalid checkpoint; a rank that does not write only skips it (rank 0 moves it)."""
        if self.writes:
            store.quarantine(self.dir, info.name, reason)
        else:
            log.warning("ckptd: checkpoint %s is invalid (%s); skipped (rank %d leaves it to rank 0)",
                        info.name, reason, self.rank)

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
        if self._dist is not None or self._committed_digest is None:
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
            store.amend_manifest(path, finished=True)  # no rewrite when it is already marked
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
        values = _jsonable_metrics(metrics)
        if len(values) != len(metrics):
            bad = ", ".join(sorted(set(map(str, metrics)) - set(values)))
            raise CkptdError(f"ck.report(): {bad} is not a number, string, boolean or None (a one-element "
                             "tensor is fine)")
        self.wait()
        self._report_failures()
        if not self.writes:
            return
        path = os.path.join(self.dir, store.checkpoint_name(step))
        if not os.path.isdir(path):
            raise NotFoundError(f"ck.report(): no checkpoint of step {step} in {self.dir}; report metrics of a "
                                "step that was saved (ck.step(n) saved it when due, or call ck.save() first)")
        # On the writer thread: after the library's own retention of the last save, never beside it.
        self._writer().submit(store.amend_manifest, path, metrics=values).result()
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

    def _start_prewarm(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """At the first step (or restore), size the state and prepare the snapshot buffer in the background."""
        if tensors is None:
            tensors = self._live_tensors()
        if not tensors:  # nothing to save, or a value save() will report with the full message
            self._prewarm = Future()
            self._prewarm.set_result(None)
            return
        nbytes = sum(_nbytes(t) for t in tensors.values())
        pinned = any(t.is_cuda for t in tensors.values())
        self._prewarm = self._writer().submit(self._snapshot.prewarm, nbytes, pinned)

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

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptd-writer",
                                                initializer=store.lower_thread_priority)
        return self._executor

    def _persist(self, result: SaveResult, header: bytes, data: memoryview, state_json: bytes,
                 metrics: dict[str, Any], epoch: int | None, replace: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            fields = {"kind": result.kind, "metrics": _jsonable_metrics(metrics), "extra": {
                "epoch": epoch, "versions": {"ckptd": __version__, "torch": torch.__version__},
                "run_id": os.environ.get(env.RUN_ID, ""), "origin": self.origin}}
            if self._dist is not None:  # every rank writes its files; rank 0 commits them all at once
                fields["extra"]["world_size"] = self._dist.world
                result.path = self._dist.persist(self, result, header, fields)
            else:
                result.path = self._write_local(result, header, data, state_json, fields, replace)
                result._replaced = replace and result.path is not None
            if result.path is None:  # this step is already checkpointed
                result.path = os.path.join(self.dir, store.checkpoint_name(result.step))
                self._committed_step = result.step
                self._notify_saved(result)
                return
        except BaseException as exc:  # noqa: BLE001 - reported at the next step(); never published
            result.error = exc
            with self._lock:
                self._failures.append(exc)
            if self.channel is not None and (self._dist is None or self._dist.local_rank == 0):  # one per node
                self.channel.send(protocol.SAVE_FAILED, step=result.step, kind=result.kind,
                                  request_id=",".join(result.request_ids), request_ids=result.request_ids,
                                  error=str(exc), errno=getattr(exc, "errno", None))
            return
        result.persist_seconds = time.perf_counter() - t0
        self.stats["saves"] += 1
        self.stats["last_persist_seconds"] = result.persist_seconds
        # What a save of this state costs when nobody paces it: the emergency stop's deadline estimate.
        recent = self.stats.setdefault("recent_save_seconds", [])
        recent.append(round(result.stall_seconds + result.persist_seconds - result.paused_seconds, 6))
        del recent[:-EMERGENCY_HISTORY]
        self._committed_step = result.step
        self._committed_digest = result._digest
        self._notify_saved(result)

    def _write_local(self, result: SaveResult, header: bytes, data: memoryview, state_json: bytes,
                     fields: dict[str, Any], replace: bool = False) -> str | None:
        """One process writes the whole checkpoint; None when a valid one of this step exists (unless
        ``replace``: the state at close() that work after the step's save changed)."""
        name = store.checkpoint_name(result.step)
        existing = os.path.join(self.dir, name)
        if os.path.lexists(existing):
            info = store.inspect_checkpoint(existing)
            if info.valid and not replace:
                result.skipped = f"step {result.step} is already checkpointed"
                return None
            if not info.valid:
                store.quarantine(self.dir, name, info.reason)
        with store.PendingCheckpoint(self.dir, result.step) as pending:
            pending.write_aligned(store.TENSORS, header, data, self._pacer(result))
            pending.write_file(store.STATE, (state_json,))
            return pending.commit(**fields, replace=replace)

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
        if self.channel is not None and (self._dist is None or self._dist.local_rank == 0):  # one word per node
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
            deleted = retention.apply(self.dir, self.policy, pins, before_delete=self._tell_pruning)
        except (OSError, CkptdError) as exc:
            log.warning("ckptd: retention skipped: %s", exc)
            return
        if deleted:
            log.info("ckptd: retention removed %s", ", ".join(deleted))

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
        self._stop_reached()
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
            dist.close()
        raise SystemExit(exit_code)

    def _start_stop_watch(self) -> None:
        self._watch = threading.Event()
        threading.Thread(target=self._stop_watch, args=(self._watch,), name="ckptd-stop-watch", daemon=True).start()

    def _stop_watch(self, closed: threading.Event) -> None:
        """Reports, once, a stop that waits for a safe point: the loop is in code that calls neither
        ck.step() nor ck.poll() (an evaluation loop, a long data setup). Reads flags only."""
        while not closed.wait(STOP_WATCH_INTERVAL):
            if self._dist is not None:
                return  # several ranks: a stop waits for the next agreement step, by design
            stop = self.channel.peek_stop() if self.channel is not None else None
            if self._signal_stop is None and not (stop is not None and stop.stop):
                continue
            now = time.monotonic()
            if self._stop_seen is None:
                self._stop_seen = now
            waited = now - self._stop_seen
            if self._stop_warned or waited < STOP_WAIT_WARN_SECONDS:
                continue
            self._stop_warned = True
            where = _script_location(sys._current_frames().get(self._loop_thread or 0))
            msg = (f"a stop has waited {waited:.1f} s for a safe point: the script is in {where}, which calls neither "
                   "ck.step() nor ck.poll(); call ck.poll() in that loop (e.g. once per evaluation batch) so a stop "
                   "is handled there (it saves the last step's state and RNG streams)")
            self._warn("stop_wait", msg, step=self._step, seconds=round(waited, 3), where=where)

    def _stop_reached(self) -> None:
        """A stop reached a safe point: say how long it waited, when the watch reported it; the watch says
        nothing more (the emergency save that follows may take seconds: that is not a wait for a safe point)."""
        seen, warned = self._stop_seen, self._stop_warned
        self._stop_warned = True
        if seen is None or not warned:
            return
        waited = time.monotonic() - seen
        self._warn("stop_wait", f"the stop reached a safe point after waiting {waited:.1f} s", step=self._step,
                   seconds=round(waited, 3), reached=True)

    def _warn(self, event: str, msg: str, **fields: Any) -> None:
        """A warning for the run: the supervisor logs and journals it (protocol.WARNING); without one, the log."""
        if self.channel is None:
            log.warning("ckptd: %s", msg)
        elif self._dist is None or self._dist.local_rank == 0:  # one word per node
            self.channel.send(protocol.WARNING, event=event, message=msg, **fields)

    def emergency_save_estimate(self) -> float | None:
        """Seconds an emergency checkpoint is expected to need: the longest of this run's last
        ``EMERGENCY_HISTORY`` durable saves (snapshot + unpaced persist) x ``EMERGENCY_FACTOR`` +
        ``EMERGENCY_MARGIN``. None before the first durable save of this process."""
        recent = self.stats.get("recent_save_seconds") or []
        return max(recent) * EMERGENCY_FACTOR + EMERGENCY_MARGIN if recent else None

    def _too_late(self, step: int | None, deadline: float | None) -> str | None:
        """Why the emergency checkpoint must not be started before ``deadline``, or None when it fits."""
        if deadline is None or step is None or step == self._committed_step:
            return None  # no deadline, nothing to save, or the save just waited for was this very step
        left = deadline - time.time()
        estimate = self.emergency_save_estimate()
        need = EMERGENCY_MARGIN if estimate is None else estimate
        if left >= need:
            return None
        how = (f"about {need:.1f} s (the longest of the last {len(self.stats['recent_save_seconds'])} saves x "
               f"{EMERGENCY_FACTOR:g} + {EMERGENCY_MARGIN:g} s)" if estimate is not None else
               f"at least {need:g} s (no save of this run to estimate from)")
        kept = (f"step {self._committed_step}" if self._committed_step is not None else
                os.path.basename(self.resumed_from) if self.resumed_from else "none")
        return (f"not starting the emergency checkpoint of step {step}: {max(left, 0.0):.1f} s left before the "
                f"deadline, a save needs {how}; the last committed checkpoint ({kept}) is kept")

    def _shutdown(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._snapshot.close()
        if self._dist is not None:
            self._dist.close()
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()
        if self.channel is not None:
            self.channel.close()

    # ------------------------------------------------------------------ restoring internals

    def _load(self, info: store.CheckpointInfo) -> None:
        """Read, verify, then apply one checkpoint. Until every byte has verified and the state has
        decoded, nothing of the run changes for good: CPU tensors read in place are put back from the
        undo log on any failure (CorruptCheckpointError otherwise), objects are not touched before apply."""
        self._stage(info)()

    def _stage(self, info: store.CheckpointInfo) -> _Pending:
        """Read and verify one checkpoint (this rank's part of it); returns what applies it (call it) or
        puts the run's tensors back as they were (``discard()``; a rank whose peers refused the candidate).

        A checkpoint written by several ranks holds the replicated state once and each rank's own
        state (RNG streams, ``extra``, ``user``) in ``rank-NNNNN.*``: this rank's part replaces those keys.
        """
        trees: list[dict[str, Any]] = []  # state.json, read and parsed while the tensor file is read
        staged = _read_tensors(info, self._live_tensors(), check=self._check_model_keys, staging=self._staging,
                               during=lambda: trees.append(_read_state_json(info)))
        tree = trees[0]
        try:
            merged = decode(tree, staged.source.__getitem__)  # after the read: NumPy scalars are values from bytes
            own = _read_rank_part(info, self.rank)
            if own is not None:
                merged.update(own)
            _check_state(merged, info)  # every tag, before applying (the RNG states need the tensor data)
        except StateDecodeError as exc:
            staged.rollback()  # the run's tensors go back as they were, whatever failed
            raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None
        except BaseException:
            staged.rollback()
            raise

        def apply() -> None:
            redecode = bool(staged.copies)  # staged (CUDA) tensors: the state must name the live ones
            staged.apply(self._snapshot.helper() if COPY_THREADS > 1 else None)
            state = merged
            if redecode:
                state = decode(tree, staged.result.__getitem__)
                if own is not None:
                    state.update(own)
            self._apply_tree(state)
            self._restored_tensors = staged.result

        return _Pending(apply, staged.rollback, tree)

    def _staging(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """Host memory to read a candidate into before it verified: the reused snapshot buffer when this
        rank saves (restore then doubles as its prewarm), else a temporary buffer."""
        if not self.writes:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        if self._prewarm is not None:
            self._prewarm.result()
        snap = self._snapshot
        if snap.buffer is None or snap.buffer.numel() < nbytes or (pinned and not snap.buffer.is_pinned()):
            snap._allocate(nbytes, pinned)  # no zeroing: the read touches every page
        assert snap.buffer is not None
        return snap.buffer[:nbytes]

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        """The run's current tensors under their checkpoint keys: restore copies verified data into them."""
        enc = Encoder()
        try:
            enc.encode(self._capture_tree(0), "")
        except CkptdError:
            return {}
        return enc.tensors

    def _check_model_keys(self, path: str, entries: list[store.TensorEntry]) -> None:
        if self.model is None or (self._dist is not None and self._dist.sharded):
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

    def _apply_tree(self, state: dict[str, Any]) -> None:
        """Apply a decoded state that :func:`_check_state` accepted."""
        if self.model is not None:
            model_state = state.get("model", {})
            if any(not isinstance(v, torch.Tensor) for v in model_state.values()):
                self.model.load_state_dict(model_state)  # modules with extra (non-tensor) state
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None and name in state:
                obj.load_state_dict(state[name])
        for name, entry in state.get("extra", {}).items():
            obj = self.extra.get(name)
            if "stateful" in entry and obj is not None and hasattr(obj, "load_state_dict"):
                obj.load_state_dict(entry["stateful"])
            elif "value" in entry:
                self.extra[name] = entry["value"]
        self.user.clear()
        self.user.update(state.get("user") or {})
        self.metrics = dict(state.get("metrics") or {})
        restore_rng(state.get("rng") or {})
        progress = state["progress"]
        self.epoch = progress.get("epoch")
        self._epoch_done = progress.get("epoch_done") is True
        self._resumed_epoch = (self.epoch, self._epoch_done) if self.epoch is not None else None
        self._restored_step = progress["step"]

    def _after_restore(self, info: store.CheckpointInfo) -> int:
        step = self._restored_step
        tensors, self._restored_tensors = self._restored_tensors, {}
        self._step = self._committed_step = step
        self._jump_base = step
        self._last_save_time = time.monotonic()
        self._safe_point()  # the restored streams are the boundary until the first step()
        enc = Encoder()
        try:  # the state now is the checkpoint's: close() saves only if it changes
            self._committed_digest = _small_digest(state_dumps(enc.encode(self._capture_tree(step), "")), enc.tensors)
        except CkptdError:
            self._committed_digest = None
        if os.path.dirname(os.path.abspath(info.path)) == self.dir:
            self.resumed_from = info.name
            if info.kind == "emergency" and self.writes:
                self._keep_emergency(info)
        _announce(f"ckptd: resumed from step {step}: {info.path}" + _resume_notes(info, self.origin))
        if self._prewarm is None and self.async_save and self.writes:
            self._start_prewarm(tensors)  # the state's size is known now; the first save will not page-fault
        if self.channel is not None:
            self.channel.send(protocol.RESTORED, step=step, path=info.path,
                              seconds=round(time.perf_counter() - self._restore_started, 6))
        return step


def _small_digest(state_json: bytes, tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state's small part: state.json (counters, scheduler, optimizer hyperparameters, extra,
    user, Python RNG) and the RNG tensors (torch, NumPy, CUDA; a few KB)."""
    h = store.new_hasher()
    h.update(state_json)
    for key in sorted(k for k in tensors if k.startswith("rng/")):
        t = tensors[key].detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, threading) if m.__file__)


def _script_location(frame: Any) -> str:
    """``file:line in function`` of the innermost frame of the script (not torch, ckptd or the stdlib), and
    of the script's frame that called it."""
    own = os.path.dirname(os.path.abspath(__file__)) + os.sep
    found: list[str] = []
    while frame is not None and len(found) < 2:
        fname = frame.f_code.co_filename
        if not fname.startswith((own, *_LIBRARY_DIRS)) and not fname.startswith("<"):
            found.append(f"{fname}:{frame.f_lineno} in {frame.f_code.co_name}()")
        frame = frame.f_back
    return ", called from ".join(found) or "code outside the script"


def _announce(line: str) -> None:
    """The one line restore() always says: an INFO record when logging is configured for the ``ckptd``
    logger (it or an ancestor has a handler), else printed to stderr, so a plain script shows it too
    (logging's last-resort handler would only show warnings)."""
    if log.hasHandlers():
        log.info("%s", line)
    else:
        # One write with its newline: the ranks of a job share one stderr, and print() writes the text and the
        # newline apart, so two ranks' lines ran together.
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _check_state(state: Any, info: store.CheckpointInfo) -> None:
    """Types of every part of a decoded state that restore applies (StateDecodeError naming it)."""
    if not isinstance(state, dict):
        raise StateDecodeError("the state is not an object")
    progress = state.get("progress")
    if not isinstance(progress, dict) or progress.get("step") != info.step or isinstance(progress.get("step"), bool):
        raise StateDecodeError(f"progress/step is not the manifest's step {info.step}")
    epoch = progress.get("epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        raise StateDecodeError(f"progress/epoch {epoch!r} is not an integer")
    for name in ("extra", "user", "metrics", "model"):
        if not isinstance(state.get(name, {}), dict):
            raise StateDecodeError(f"{name} is not an object")
    if not all(isinstance(e, dict) for e in state.get("extra", {}).values()):
        raise StateDecodeError("extra holds an entry that is not an object")
    check_rng(state.get("rng") or {})


@dataclass
class _Staged:
    """A verified tensor file, read but not yet applied.

    ``source``: every tensor's verified data (live CPU tensors read in place, staging views, or fresh
    tensors where no live tensor of that key, dtype and shape exists). ``result``: what the state
    holds after :meth:`apply` (the live tensors, or the same fresh tensors). ``undo``: (address in a
    live tensor, address of the backup of its bytes from before the read, length) for the tensors read
    in place; :meth:`rollback` puts them back, in reverse file order (right for tensors that share
    memory too). The addresses stay valid: ``result`` holds the live tensors, ``buffer`` the backups.
    """

    source: dict[str, torch.Tensor]
    result: dict[str, torch.Tensor]
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (live target, staging view): copied in on apply
    undo: list[tuple[int, int, int]] = field(default_factory=list)  # (live address, backup address, bytes)
    buffer: torch.Tensor | None = None  # the staging buffer the backups and staged copies live in

    def apply(self, pool: ThreadPoolExecutor | None = None) -> None:
        """Copy the staged data into the live tensors (libc memmove over up to COPY_THREADS threads)."""
        _copy_pairs(self.copies, pool)
        self.copies, self.undo = [], []

    def rollback(self) -> None:
        """Leave the live tensors as they were before the read (a candidate that failed or was refused)."""
        for live, backup, n in reversed(self.undo):
            ctypes.memmove(live, backup, n)
        self.copies, self.undo = [], []


class _Pending:
    """A staged checkpoint: call it to apply, or ``discard()`` it (the run's tensors go back as they were).
    ``tree``: its state.json, parsed."""

    def __init__(self, apply: Callable[[], None], discard: Callable[[], None], tree: dict[str, Any]) -> None:
        self._apply, self.discard, self.tree = apply, discard, tree

    def __call__(self) -> None:
        self._apply()


class _Backup:
    """Copies, in file order and ahead of the reader, the bytes of each live tensor about to be read in
    place into its backup (the reused snapshot buffer). ``ready(end)`` blocks a read request until
    everything before file offset ``end`` is backed up; :meth:`finish` stops and returns the undo log
    of what was backed up.

    The copy keeps at most ``LEAD`` bytes ahead of the reader's requests: the same memory copy in one
    burst at the start (on two cores, beside the reader and the hashing) slowed the read more than
    spread out in step with it (docs/performance.md, "Restore: read in place with an undo log").
    """

    LEAD = 2 * store.READ_CHUNK

    def __init__(self, plan: UndoPlan) -> None:
        self._plan = plan  # (file end offset, live address, backup address, bytes) per piece, in file order
        self._done = 0  # entries of the plan backed up
        self._covered = 0  # file offset up to which reads may go
        self._wanted = 0  # file offset the reader's newest request ends at
        self._stop = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ckptd-restore-backup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i, (end, live, backup, n) in enumerate(self._plan):
                with self._cond:
                    while not self._stop and self._covered >= self._wanted + self.LEAD:
                        self._cond.wait()
                    if self._stop:
                        return
                if n:
                    ctypes.memmove(backup, live, n)
                with self._cond:
                    self._done, self._covered = i + 1, end
                    self._cond.notify_all()
        except BaseException as exc:  # pragma: no cover - memmove does not fail
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def ready(self, end: int) -> None:
        with self._cond:
            self._wanted = max(self._wanted, end)
            self._cond.notify_all()
            while self._covered < end and self._error is None and self._done < len(self._plan):
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def finish(self) -> list[tuple[int, int, int]]:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        return [(live, backup, n) for _, live, backup, n in self._plan[: self._done] if n]


def _copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], pool: ThreadPoolExecutor | None = None) -> None:
    fast = [(d, s) for d, s in pairs if d.is_cpu and d.is_contiguous() and s.numel()]
    slow = [(d, s) for d, s in pairs if not (d.is_cpu and d.is_contiguous())]
    total = sum(_nbytes(s) for _, s in fast)
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(COPY_THREADS)]
    loads = [0] * COPY_THREADS
    for d, s in sorted(fast, key=lambda ds: -_nbytes(ds[1])):  # largest first: greedy balance
        i = loads.index(min(loads))
        parts[i].append((d, s))
        loads[i] += _nbytes(s)

    def run(part: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for d, s in part:
            ctypes.memmove(d.data_ptr(), s.data_ptr(), _nbytes(s))  # same dtype and shape: bytes are the value

    if total < PARALLEL_COPY_BYTES or COPY_THREADS < 2 or pool is None:
        run([p for part in parts for p in part])
    else:
        others = [pool.submit(run, part) for part in parts[1:]]
        try:
            run(parts[0])
        finally:
            for f in others:
                f.result()
    with torch.no_grad():
        for d, s in slow:
            d.copy_(s, non_blocking=d.is_cuda)
    for device in {d.device for d, _ in slow if d.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


STAGING_ALIGN = 64  # every staged tensor starts cache-line aligned (and so aligned for its dtype)


def _read_tensors(info: store.CheckpointInfo, live: Mapping[str, torch.Tensor],
                  check: Callable[[str, list[store.TensorEntry]], None] | None = None,
                  staging: Callable[[int, bool], torch.Tensor] | None = None, fname: str = store.TENSORS,
                  during: Callable[[], None] | None = None) -> _Staged:
    """Read and verify a checkpoint's tensor file; ``live`` ends as it was unless it verified.

    Order: the header is read and checked structurally (store.parse_safetensors_header: known
    dtypes, shapes matching byte spans that tile the file, so nothing allocated can exceed the
    file); ``check(path, entries)`` may refuse it (a different model), which counts only once the
    whole file's checksum matched (else the checkpoint is corrupt, whatever its header says). Then
    every byte is read (store.read_into, checksummed in file order): data for a live tensor of the
    same key, dtype and shape into ``staging(nbytes, pinned)``, everything else into fresh tensors.
    ``during()`` runs while the data is being read (store.read_into); what it raises, like a
    mismatch, puts ``live`` back as it was.
    Raises CorruptCheckpointError unless the whole file matches the manifest's size and checksum.
    """
    path = os.path.join(info.path, fname)
    if fname not in info.manifest["files"]:
        raise CorruptCheckpointError(info.path, f"{fname} is not listed in the manifest")
    rec = info.manifest["files"][fname]
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    staged: _Staged | None = None
    prefetch: store.Prefetch | None = None
    try:
        size = os.fstat(fd).st_size
        if size != rec["bytes"]:
            raise CorruptCheckpointError(info.path, f"{fname} is {size} bytes, manifest says {rec['bytes']}")
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            lead, body = store.read_header_bytes(f, path, size)
        h = store.new_hasher()
        h.update(lead)
        h.update(body)
        data_start = 8 + len(body)
        prefetch = store.Prefetch(fd, data_start, size) if store.RESTORE_PREFETCH else None
        try:
            _, entries = store.parse_safetensors_header(body, info.path, size - data_start)
            if check is not None:
                check(info.path, entries)
        except CkptdError:
            # Believe nothing the header says until the bytes verified: a damaged header is corruption.
            _hash_rest(fd, data_start, size, h, path)
            if h.hexdigest() != rec[store.HASH]:
                raise CorruptCheckpointError(info.path, f"{fname} checksum mismatch "
                                                        "(content altered or corrupted)") from None
            raise
        staged, views, undo = _plan(entries, live, staging)
        backup = None
        if any(n for _, _, _, n in undo):
            backup = _Backup([(data_start + end, a, b, n) for end, a, b, n in undo])
        if prefetch is not None:
            prefetch.stop()
        try:
            end = store.read_into(fd, data_start, views, h, path, ready=backup.ready if backup else None,
                                  during=during)
        finally:
            if backup is not None:
                staged.undo = backup.finish()
        if h.hexdigest() != rec[store.HASH] or end != size:
            raise CorruptCheckpointError(info.path, f"{fname} checksum mismatch (content altered or corrupted)")
    except BaseException:
        if staged is not None:
            staged.rollback()  # a failed candidate leaves the run's tensors as they were
        raise
    finally:
        if prefetch is not None:
            prefetch.stop()
            prefetch.join()
        os.close(fd)
    return staged


UndoPlan = list[tuple[int, int, int, int]]


def _bytes_at(address: int, n: int) -> memoryview:
    """A writable byte view of ``n`` bytes of memory at ``address`` (a tensor's, kept alive by the caller):
    a quarter of the cost of going through ``Tensor.numpy()``, which counts for thousands of tensors."""
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


def _plan(entries: list[store.TensorEntry], live: Mapping[str, torch.Tensor],
          staging: Callable[[int, bool], torch.Tensor] | None) -> tuple[_Staged, list[memoryview], UndoPlan]:
    """Where each tensor's bytes go (views, in file order), and the undo plan for :class:`_Backup`.

    A live CPU tensor of the same key, dtype and shape is read in place, its old bytes first copied
    to a slice of the staging buffer (the undo log); another live tensor (CUDA, non-contiguous) is
    read into a staging slice and copied in on apply; anything else into a fresh tensor. The undo
    plan lists, in file order, (end offset in the data section, live address, backup address, bytes)
    in pieces of at most store.READ_CHUNK (so the copy keeps pace with the reader even for one huge
    tensor), and (end, 0, 0, 0) for a tensor that needs no backup. Addresses, not tensor slices: the
    plan of a state with thousands of tensors is made before the first byte is read.
    """
    layout: list[tuple[store.TensorEntry, torch.dtype, torch.Tensor | None, int]] = []
    off = 0
    for e in entries:
        dtype = TORCH_DTYPES[e.dtype]
        target = live.get(e.key) if staging is not None else None
        if target is not None and (target.dtype != dtype or tuple(target.shape) != e.shape):
            target = None  # e.g. optimizer state of another shape: load_state_dict replaces it
        layout.append((e, dtype, target, off if target is not None else -1))
        if target is not None:
            off += -(-(e.end - e.start) // STAGING_ALIGN) * STAGING_ALIGN
    pinned = any(t is not None and t.is_cuda for _, _, t, _ in layout)
    buf = staging(max(off, 1), pinned) if off and staging is not None else None
    base = buf.data_ptr() if buf is not None else 0
    staged = _Staged({}, {}, [], buffer=buf)
    views: list[memoryview] = []
    undo: UndoPlan = []
    step = store.READ_CHUNK
    for e, dtype, target, at in layout:
        n = e.end - e.start
        if target is None:
            src = torch.empty(e.shape, dtype=dtype)  # bounded: the header's spans tile the file
            staged.result[e.key] = src
            undo.append((e.end, 0, 0, 0))
            dest = src.data_ptr()
        else:
            assert buf is not None
            staged.result[e.key] = target
            if target.is_cpu and target.is_contiguous():
                src = target  # in place; the slot keeps the old bytes until apply
                dest = target.data_ptr()
                undo.extend((e.start + min(i + step, n), dest + i, base + at + i, min(step, n - i))
                            for i in range(0, n, step))
            else:
                src = buf[at : at + n].view(dtype).view(e.shape)
                staged.copies.append((target, src))
                undo.append((e.end, 0, 0, 0))
                dest = base + at
        staged.source[e.key] = src
        if n:
            views.append(_bytes_at(dest, n))
    return staged, views, undo


def _hash_rest(fd: int, offset: int, size: int, h: Any, path: str) -> None:
    """Feed the file's bytes from ``offset`` to ``h`` through a small buffer (nothing kept)."""
    buf = memoryview(bytearray(store.CHUNK))
    while offset < size:
        n = os.preadv(fd, [buf[: min(len(buf), size - offset)]], offset)
        if n == 0:
            raise CorruptCheckpointError(os.path.dirname(path), f"{store.TENSORS} ends early (truncated)")
        h.update(buf[:n])
        offset += n


def _read_state_json(info: store.CheckpointInfo) -> Any:
    """state.json parsed (checksum verified first)."""
    files = info.manifest["files"]
    for fname in (store.TENSORS, store.STATE):
        if fname not in files:
            raise CorruptCheckpointError(info.path, f"{fname} is not listed in the manifest")
    raw = store.read_small(os.path.join(info.path, store.STATE), store.MAX_STATE_BYTES)
    if store.digest_bytes(raw) != files[store.STATE][store.HASH]:
        raise CorruptCheckpointError(info.path, f"{store.STATE} checksum mismatch")
    tree = store.load_json(raw, info.path, store.STATE, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(info.path, f"{store.STATE} is not a JSON object")
    return tree


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


def _read_rank_part(info: store.CheckpointInfo, rank: int) -> dict[str, Any] | None:
    """This rank's own state in a checkpoint written by several ranks (decoded, checksums verified);
    None for a single-process checkpoint. A rank the checkpoint has no part for (the job grew) keeps
    its fresh RNG streams and objects, with a warning."""
    world = info.manifest.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool):
        return None
    tname, jname = f"rank-{rank:05d}.safetensors", f"rank-{rank:05d}.json"
    files = info.manifest["files"]
    if tname not in files or jname not in files:
        log.warning("ckptd: %s was written by %d ranks and holds no state of rank %d: its RNG streams and "
                    "extra objects start fresh", info.name, world, rank)
        return None
    raw = store.read_small(os.path.join(info.path, jname), store.MAX_STATE_BYTES)
    if store.digest_bytes(raw) != files[jname][store.HASH]:
        raise CorruptCheckpointError(info.path, f"{jname} checksum mismatch")
    tree = store.load_json(raw, info.path, jname, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(info.path, f"{jname} is not a JSON object")
    staged = _read_tensors(info, {}, fname=tname)
    try:
        return decode(tree, staged.result.__getitem__)
    except StateDecodeError as exc:
        raise CorruptCheckpointError(info.path, f"{jname}: {exc}") from None


def _state_without_tensors(info: store.CheckpointInfo, tree: dict[str, Any]) -> dict[str, Any]:
    """The state with every tensor a meta tensor (dtype, shape), from the tensor file's header only."""
    tpath = os.path.join(info.path, store.TENSORS)
    fd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            _, body = store.read_header_bytes(f, tpath, size)
    finally:
        os.close(fd)
    _, entries = store.parse_safetensors_header(body, info.path, size - 8 - len(body))
    metas = {e.key: torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype], device="meta") for e in entries}

    def lookup(key: str) -> torch.Tensor:
        if key not in metas:
            raise StateDecodeError(f"tensor {key} is not in {store.TENSORS}")
        return metas[key]

    try:
        return decode(_numpy_as_tensors(tree), lookup)
    except StateDecodeError as exc:
        raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None


def _numpy_as_tensors(tree: Any) -> Any:
    """The state tree with NumPy arrays and scalars tagged as tensors (a meta tensor has no NumPy form)."""
    if isinstance(tree, list):
        return [_numpy_as_tensors(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, val), = tree.items()
        if tag == "__np":
            return {"__t": val}
        if tag == "__npscalar" and isinstance(val, list) and len(val) == 2:
            return {"__t": val[1]}
    return {k: _numpy_as_tensors(v) for k, v in tree.items()}


def _jsonable_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or v is None:
            if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
                v = None  # JSON has no NaN/inf; the manifest stays strict JSON
            out[str(k)] = v
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


def resolve(path: str | os.PathLike[str]) -> str:
    """A checkpoint path as the CLI names one: a checkpoint directory, ``DIR/latest`` (the newest checkpoint
    of DIR that verifies, checksums included) or ``DIR/N`` (the checkpoint of step N in DIR)."""
    path = os.fspath(path)
    parent, leaf = os.path.split(os.path.normpath(path))
    if os.path.isdir(path) and (os.path.lexists(os.path.join(path, store.MANIFEST)) or store.NAME_RE.match(leaf)):
        return path
    if leaf == "latest" and os.path.isdir(parent or "."):
        info = store.latest_valid(parent or ".")
        if info is None:
            raise NotFoundError(f"no valid checkpoint in {parent or '.'}; `ckptd verify {parent or '.'}` says why "
                                "each one is invalid")
        return info.path
    if leaf.isascii() and leaf.isdigit() and os.path.isdir(parent or "."):
        named = os.path.join(parent or ".", store.checkpoint_name(int(leaf)))
        if not os.path.isdir(named):
            raise NotFoundError(f"no checkpoint of step {int(leaf)} in {parent or '.'}; `ckptd ls {parent or '.'}` "
                                "lists them")
        return named
    if not os.path.lexists(path):
        raise NotFoundError(f"{path} does not exist; name a checkpoint (DIR/step-N), DIR/latest or DIR/N")
    return path


def load_state(path: str | os.PathLike[str], *, tensors: bool = True) -> dict[str, Any]:
    """Load a checkpoint's whole state as a dict of plain objects and tensors (verifies checksums).

    For evaluation scripts and tools: ``ckptd.load_state(p)["model"]`` is a state_dict. ``path`` is a
    checkpoint, ``DIR/latest`` or ``DIR/N`` (as the CLI takes them). ``tensors=False``: only the
    manifest, ``state.json`` (checksummed) and the tensor file's header are read; every tensor is a
    'meta'`` tensor of its dtype and shape (NumPy arrays and scalars too): no tensor data is read nor
    checksummed - cheap, e.g. to rebuild a model from arguments saved in ``extra`` or ``ck.user``.
    """
    info = store.inspect_checkpoint(resolve(path))
    if not info.valid:
        raise CorruptCheckpointError(info.path, info.reason)
    tree = _read_state_json(info)
    if not tensors:
        return _state_without_tensors(info, tree)
    staged = _read_tensors(info, {})  # fresh tensors, checksums verified
    try:
        state = decode(tree, staged.result.__getitem__)
    except StateDecodeError as exc:
        raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None
    own = _read_rank_part(info, 0)  # written by several ranks: rank 0's own state
    if own is not None:
        state.update(own)
    return state
