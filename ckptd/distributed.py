"""Several ranks, one checkpoint: agreement at safe points, per-rank state, one commit.

When ``torch.distributed`` is initialised with more than one rank, a :class:`Checkpointer` gets a
:class:`Coordinator` (at its first ``restore()`` or ``step()``, which every rank calls):

* **Agreement.** Ranks hear stop and save requests at different moments (each has its own control
  connection and signal handler). They act on them only at *agreement steps*: a small all-reduce (MAX,
  7 numbers) on the job's own process group, folded into ``ck.step()``. Every rank then takes the same
  decision at the same step: the emergency checkpoint of step N, a manual save, a periodic save, or
  nothing. Agreement steps are the first ``step()``, every ``every_steps`` multiple, and every K steps in
  between, with K chosen so that agreeing costs little: K = AGREE_INTERVAL / (the slowest rank's mean
  step time), between 1 and AGREE_MAX_STEPS, recomputed at each agreement from the reduced figures (so
  every rank computes the same K). ``CKPTD_AGREE_EVERY=K`` fixes K. A stop is therefore acted on at most
  about AGREE_INTERVAL seconds (or K steps) after it reached the slowest rank, and no rank ever enters
  a collective that a peer skipped: every rank calls ``step()`` with the same sequence of step numbers.
* **Writing and restoring** go through the same code as one process (persist.py, restore.py), with
  this Coordinator's :class:`ranks.Replicated` or :class:`ranks.Sharded` strategy: every rank snapshots
  its own part (its RNG streams, ``extra``, ``ck.user``; with FSDP its shards) and rank 0 the
  replicated part (model, optimizer, scheduler, scaler, progress); the background persist of all ranks
  meets on a private gloo group of ckptd (never the training thread's group): rank 0 opens the temporary
  directory, every rank writes and fsyncs its files into it (xxh3 per file), rank 0 gathers the file
  records and commits the one manifest, and tells every rank the outcome. A restore: rank 0 lists the
  candidates; each rank reads and verifies its part of one; only when every rank verified its part do
  all apply it (else rank 0 quarantines it and all try the next older one).

Layout of a checkpoint written by N ranks (``manifest.json`` ``world_size: N``)::

    tensors.safetensors, state.json      the replicated state, written once (rank 0)
    rank-00000.safetensors, rank-00000.json, ... rank-0000{N-1}.*   each rank's own state

The CUDA/NCCL path (the agreement tensor on the current CUDA device) is written but untested here.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import env, exitcodes
from .channel import Requests
from .errors import CkptdError
from .ranks import Replicated, Sharded

log = logging.getLogger("ckptd")

AGREE_EVERY = "CKPTD_AGREE_EVERY"  # fixed agreement period in steps (default: adaptive)
AGREE_INTERVAL = 0.05  # seconds of training between agreements (adaptive K)
AGREE_MAX_STEPS = 1000
NONE = -1.0e300  # "no value" in a MAX reduction


@dataclass
class Decision:
    """What every rank does at an agreement step (identical on all ranks)."""

    stop: bool = False
    save: bool = False
    save_waited: bool = False
    due: bool = False
    busy: bool = False
    deadline: float | None = None


@dataclass
class Pending:
    """What this rank heard since the last agreement."""

    stop_reason: str = ""
    stop: bool = False
    stop_deadline: float | None = None
    save_ids: list[str] = field(default_factory=list)
    save_waited: bool = False


def detect(model: Any = None) -> Coordinator | None:
    """A Coordinator when torch.distributed runs with more than one rank, or the model is sharded
    (DTensor parameters, even on one rank). Collective: every rank calls it at the same point."""
    if not (dist.is_available() and dist.is_initialized()) or (
            dist.get_world_size() <= 1 and not _sharded(model)):
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            log.warning("ckptd: WORLD_SIZE > 1 but torch.distributed is not initialised when the Checkpointer "
                        "first restores or steps: only rank 0 writes (replicated state), ranks do not agree on "
                        "stops; call init_process_group() first")
        return None
    return Coordinator(_sharded(model))


def _sharded(model: Any) -> bool:
    """Whether the model's parameters are DTensors. None exists before torch.distributed.tensor is imported,
    and the check asks that module's DTensor itself, so a plain model (one process, or DDP, where
    init_process_group already imported torch.distributed.tensor) costs no import of the DCP stack
    (sharded.py): ~60 ms at a single process's restore, its first step (docs/performance.md, "Restore at
    restart"); ~1.2 s of CPU in each DDP rank."""
    tensor = sys.modules.get("torch.distributed.tensor")
    if model is None or tensor is None:
        return False
    return any(isinstance(p, tensor.DTensor) for p in model.parameters())


class Coordinator:
    """The ranks' agreement at safe points; ``ranks``, how they save and restore together (ranks.py)."""

    def __init__(self, sharded: bool = False) -> None:
        # sharded: model and optimizer go through torch.distributed.checkpoint (sharded.py)
        self.ranks: Replicated = Sharded() if sharded else Replicated()
        backend = dist.get_backend()
        # The agreement runs on the job's own group, so on its device (NCCL: CUDA only; untested here).
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.fixed = env.get_int(AGREE_EVERY)
        if self.fixed is not None and self.fixed < 1:
            raise CkptdError(f"{AGREE_EVERY} must be >= 1, got {self.fixed}")
        self.every = self.fixed or 1
        self.next_at: int | None = None  # step of the next agreement (None: the next step() agrees)
        self._last_step: int | None = None
        self._last_time = 0.0
        self._steps = 0
        self._step_seconds = 0.0
        self.pending = Pending()
        self.answered: set[str] = set()  # save request ids already turned into a checkpoint
        self.stats = {"agreements": 0, "agree_seconds": 0.0}
        self._buf = torch.zeros(7, dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------------ agreement

    def listen(self, step: int, req: Requests | None, signalled: bool) -> None:
        """Collect what this rank heard (``req`` from the control channel, a stop signal) into ``pending``;
        cheap, every step."""
        now = time.monotonic()
        if self._last_step is not None and step > self._last_step:
            self._steps += step - self._last_step
            self._step_seconds += now - self._last_time
        self._last_step, self._last_time = step, now
        p = self.pending
        if req is not None:
            if req.stop:
                p.stop, p.stop_reason = True, req.stop_reason or "stop"
                p.stop_deadline = req.stop_deadline
            p.save_ids += req.save_ids
            p.save_waited = p.save_waited or req.save_waited
        if signalled and not p.stop:
            p.stop, p.stop_reason = True, "signal"

    def due(self, step: int, every_steps: int | None) -> bool:
        """Whether ``step`` is an agreement step (the same answer on every rank)."""
        if self.next_at is None or step >= self.next_at:
            return True
        return bool(every_steps and step % every_steps == 0)

    def agree(self, step: int, *, due_seconds: bool, busy: bool) -> Decision:
        """The all-reduce: every rank learns whether any rank wants a stop or a save."""
        t0 = time.perf_counter()
        p = self.pending
        mean = self._step_seconds / self._steps if self._steps else 0.0
        b = self._buf
        b.copy_(torch.tensor([float(p.stop), float(bool(p.save_ids)), float(p.save_waited), float(due_seconds),
                              float(busy), -p.stop_deadline if p.stop_deadline is not None else NONE, mean],
                             dtype=torch.float64))
        dist.all_reduce(b, op=dist.ReduceOp.MAX)
        v = b.tolist()
        if not self.fixed:  # the same K on every rank: it is computed from reduced figures only
            self.every = max(1, min(AGREE_MAX_STEPS, int(AGREE_INTERVAL / v[6]) if v[6] > 0 else 1))
        self.next_at = step + self.every
        self._steps, self._step_seconds = 0, 0.0
        self.stats["agreements"] += 1
        self.stats["agree_seconds"] += time.perf_counter() - t0
        return Decision(stop=v[0] > 0, save=v[1] > 0, save_waited=v[2] > 0, due=v[3] > 0, busy=v[4] > 0,
                        deadline=-v[5] if v[5] > NONE / 2 else None)

    def take_saves(self) -> tuple[list[str], bool]:
        p = self.pending
        ids, waited = p.save_ids, p.save_waited
        p.save_ids, p.save_waited = [], False
        return ids, waited

    def gather_ids(self, ids: list[str]) -> list[str]:
        """Every rank's save request ids (one request reaches the ranks at different steps): the union,
        less those an earlier save already answered; a late copy of an answered one is dropped."""
        every = self.ranks.verdicts(ids)
        out = [i for i in dict.fromkeys(i for got in every for i in got) if i not in self.answered]
        self.answered.update(out)
        return out

    def agree_reason(self, why_not: str | None) -> str | None:
        """Every rank adopts the first rank's reason not to write the emergency checkpoint (or none)."""
        for r, why in enumerate(self.ranks.verdicts(why_not)):
            if why:
                return why if r == self.ranks.rank else f"rank {r}: {why}"
        return None

    # ------------------------------------------------------------------ stopping

    def before_exit(self, stop_launcher: bool = True) -> None:
        """After the emergency checkpoint (or the decision not to write one), before exiting 85/86.

        Every rank ignores SIGTERM from here (the launcher may now signal the ranks still exiting), then
        local rank 0 of each node tells a torchrun agent to shut down, so that ``--max-restarts`` does not
        start the ranks again after a stop; a barrier on each side keeps any rank from exiting before that.
        ``stop_launcher=False``: the ranks exit 0 (:func:`clean_stop_exit_code`), which ends the agent without
        a restart, so it is not signalled (a signalled agent prints a traceback and exits 1).
        """
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:
            pass
        try:
            self.ranks.barrier()
            if self.ranks.local_rank == 0 and stop_launcher:
                agent = torchrun_agent()
                if agent is not None:
                    log.info("ckptd: asking the torchrun agent (pid %d) to shut down: a stopped job is not restarted",
                             agent)
                    os.kill(agent, signal.SIGTERM)
            self.ranks.barrier()
        except (RuntimeError, OSError) as exc:  # a peer is gone: exit anyway
            log.warning("ckptd: ranks did not meet before exiting (%s)", exc)


def clean_stop_exit_code(code: int) -> int:
    """The exit code of a rank after a stop whose outcome is ``code``.

    Under ``ckptd run`` (``CKPTD_CONTROL`` set: the supervisor judges the stop by its emergency checkpoint and
    exits 85 itself) and a torchrun agent, a stop with its emergency checkpoint committed exits 0: torchrun
    then ends as succeeded, starts no rank again and prints nothing, where a rank's 85 (a failure to it) or a
    signal to the agent made it print a traceback and exit 1. Without a supervisor the ranks exit ``code``.
    """
    if code == exitcodes.PREEMPTED and os.environ.get(env.CONTROL) and torchrun_agent() is not None:
        return 0
    return code


def torchrun_agent() -> int | None:
    """The pid of the torchrun (torch.distributed.elastic) agent that started this rank, if any."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return None
    return ppid if b"torchrun" in cmd or b"torch.distributed.run" in cmd or b"torch.distributed.launch" in cmd \
        else None
