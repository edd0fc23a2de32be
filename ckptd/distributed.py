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
* **Writing.** Every rank snapshots its own part (its RNG streams, ``extra``, ``ck.user``; with FSDP its
  shards) and rank 0 the replicated part (model, optimizer, scheduler, scaler, progress). The background
  persist of all ranks meets on a private gloo group of ckptd (never the training thread's group):
  rank 0 opens the temporary directory, every rank writes and fsyncs its files into it (xxh3 per file),
  rank 0 gathers the file records and commits the one manifest, and tells every rank the outcome.
* **Restore.** Rank 0 lists the candidates; each rank reads and verifies its part of one; only when every
  rank verified its part do all apply it (else rank 0 quarantines it and all try the next older one).

Layout of a checkpoint written by N ranks (``manifest.json`` ``world_size: N``)::

    tensors.safetensors, state.json      the replicated state, written once (rank 0)
    rank-00000.safetensors, rank-00000.json, ... rank-0000{N-1}.*   each rank's own state

The CUDA/NCCL path (the agreement tensor on the current CUDA device) is written but untested here.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import env, exitcodes, store
from .errors import CkptdError, CorruptCheckpointError
from .state import Encoder
from .state import dumps as state_dumps

if TYPE_CHECKING:  # pragma: no cover
    from .checkpointer import Checkpointer, SaveResult

log = logging.getLogger("ckptd")

AGREE_EVERY = "CKPTD_AGREE_EVERY"  # fixed agreement period in steps (default: adaptive)
AGREE_INTERVAL = 0.05  # seconds of training between agreements (adaptive K)
AGREE_MAX_STEPS = 1000
GROUP_TIMEOUT = timedelta(minutes=10)  # ckptd's own collectives (a peer that died is noticed by torchrun first)
PER_RANK_KEYS = ("rng", "extra", "user")
DCP = ":dcp"  # the sharded tensors' entry among a rank's files (written by sharded.save)  # state that differs between ranks; the rest is replicated
NONE = -1.0e300  # "no value" in a MAX reduction


def rank_files(rank: int) -> tuple[str, str]:
    return f"rank-{rank:05d}.safetensors", f"rank-{rank:05d}.json"


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
    from . import sharded

    if not (dist.is_available() and dist.is_initialized()) or (
            dist.get_world_size() <= 1 and not sharded.is_sharded(model)):
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            log.warning("ckptd: WORLD_SIZE > 1 but torch.distributed is not initialised when the Checkpointer "
                        "first restores or steps: only rank 0 writes (replicated state), ranks do not agree on "
                        "stops; call init_process_group() first")
        return None
    return Coordinator(sharded.is_sharded(model))


class Coordinator:
    def __init__(self, sharded: bool = False) -> None:
        self.sharded = sharded  # model and optimizer go through torch.distributed.checkpoint (sharded.py)
        self.staging: Any = None
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK") or self.rank)  # this node's first rank reports
        backend = dist.get_backend()
        # The agreement runs on the job's own group, so on its device (NCCL: CUDA only; untested here).
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        # ckptd's private group for the background persist and restore: gloo (CPU objects), never used by
        # the training thread, so its collectives cannot interleave with the job's.
        self.group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
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
        self.rank_snapshot: Any = None

    # ------------------------------------------------------------------ agreement

    def listen(self, ck: Checkpointer, step: int) -> None:
        """Collect what this rank heard (control channel, signal) into ``pending``; cheap, every step."""
        now = time.monotonic()
        if self._last_step is not None and step > self._last_step:
            self._steps += step - self._last_step
            self._step_seconds += now - self._last_time
        self._last_step, self._last_time = step, now
        req = ck.channel.take() if ck.channel is not None else None
        p = self.pending
        if req is not None:
            if req.stop:
                p.stop, p.stop_reason = True, req.stop_reason or "stop"
                p.stop_deadline = req.stop_deadline
            p.save_ids += req.save_ids
            p.save_waited = p.save_waited or req.save_waited
        if ck._signal_stop is not None and not p.stop:
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
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, ids, group=self.group)
        out = [i for i in dict.fromkeys(i for got in every for i in got) if i not in self.answered]
        self.answered.update(out)
        return out

    def agree_reason(self, why_not: str | None) -> str | None:
        """Every rank adopts the first rank's reason not to write the emergency checkpoint (or none)."""
        reasons: list[Any] = [None] * self.world
        dist.all_gather_object(reasons, why_not, group=self.group)
        for r, why in enumerate(reasons):
            if why:
                return why if r == self.rank else f"rank {r}: {why}"
        return None

    # ------------------------------------------------------------------ saving

    def capture(self, ck: Checkpointer, step: int) -> list[tuple[str, bytes, Any]]:
        """Snapshot this rank's files (the save's stall): [(file name, header or bytes, data view or None)]."""
        from .checkpointer import _Snapshot

        tree = ck._capture_tree(step)
        own = {k: tree.pop(k) for k in PER_RANK_KEYS if k in tree}
        files: list[tuple[str, bytes, Any]] = []
        if self.sharded:
            from . import sharded

            tree.pop("model", None)
            tree.pop("optimizer", None)
            tensors, tree["sharded"] = sharded.split(ck.model, ck.optimizer)
            if self.staging is None:
                self.staging = sharded.Staging()
            files.append((DCP, self.staging.take(tensors), None))
        if self.rank == 0:
            enc = Encoder()
            encoded = enc.encode(tree, "")
            header, data = ck._snapshot.take(enc.tensors)
            files += [(store.TENSORS, header, data), (store.STATE, state_dumps(encoded), None)]
        enc = Encoder()
        encoded = enc.encode(own, "")
        if self.rank_snapshot is None:
            self.rank_snapshot = _Snapshot()
        header, data = self.rank_snapshot.take(enc.tensors)
        tname, jname = rank_files(self.rank)
        files += [(tname, header, data), (jname, state_dumps(encoded), None)]
        return files

    def persist(self, ck: Checkpointer, result: SaveResult, files: list[tuple[str, bytes, Any]],
                commit: dict[str, Any]) -> str | None:
        """Write this rank's files into rank 0's temporary directory; rank 0 commits when all are durable.

        Runs in every rank's writer thread; the same collectives in the same order on every rank,
        whatever fails where. Returns the path (None: already checkpointed); raises when the save failed.
        """
        name = store.checkpoint_name(result.step)
        plan: Any = None
        pending: store.PendingCheckpoint | None = None
        if self.rank == 0:
            try:
                existing = os.path.join(ck.dir, name)
                if os.path.lexists(existing) and store.inspect_checkpoint(existing).valid:
                    plan = ("exists", existing)
                else:
                    if os.path.lexists(existing):
                        store.quarantine(ck.dir, name, store.inspect_checkpoint(existing).reason)
                    pending = store.PendingCheckpoint(ck.dir, result.step)
                    plan = ("write", pending.tmp)
            except (OSError, CkptdError) as exc:
                plan = ("error", str(exc))
        plan = self._broadcast(plan)
        commit["extra"]["sharded"] = self.sharded
        if plan[0] == "exists":
            result.path, result.skipped = plan[1], f"step {result.step} is already checkpointed"
            return None
        if plan[0] == "error":
            raise CkptdError(f"checkpoint of step {result.step} not written: rank 0: {plan[1]}")
        records: dict[str, store.FileRecord] = {}
        error = ""
        try:
            part = pending or store.PendingCheckpoint.join(ck.dir, result.step, plan[1])
            pace = ck._pacer(result)
            for fname, head, data in files:
                if fname == DCP:
                    from . import sharded

                    sharded.save(head, part, self.rank, self.group, pace)
                elif data is None:
                    records[fname] = part.write_file(fname, (head,))
                else:
                    records[fname] = part.write_aligned(fname, head, data, pace)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below, whatever failed
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (OSError, CkptdError)) else str(exc)
        gathered: list[Any] = [None] * self.world if self.rank == 0 else []
        dist.gather_object((records, error), gathered if self.rank == 0 else None, dst=0, group=self.group)
        outcome: Any = None
        if self.rank == 0:
            assert pending is not None
            errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(gathered) if e]
            if errors:
                pending.abort()
                outcome = ("error", "; ".join(errors))
            else:
                try:
                    for recs, _ in gathered[1:]:
                        for fname, rec in recs.items():
                            pending.add_file(fname, rec)
                    outcome = ("ok", pending.commit(**commit))
                except (OSError, CkptdError) as exc:
                    pending.abort()
                    outcome = ("error", str(exc))
        outcome = self._broadcast(outcome)
        if outcome[0] == "error":
            raise CkptdError(f"checkpoint of step {result.step} not published: {outcome[1]}")
        return outcome[1]

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # ------------------------------------------------------------------ restoring

    def restore(self, ck: Checkpointer) -> int:
        """Every rank loads the same checkpoint: the newest one whose every part verified on its rank."""
        from .checkpointer import _announce

        names: Any = None
        if self.rank == 0:
            if os.path.isdir(ck.dir):
                store.remove_stale_temps(ck.dir)
                names = [i.name for i in reversed(store.list_checkpoints(ck.dir))]
            else:
                names = []
        names = self._broadcast(names)
        for name in names:
            info = store.inspect_checkpoint(os.path.join(ck.dir, name))
            apply, pending, why, fatal = None, None, "", ""
            try:
                if not info.valid:
                    raise CorruptCheckpointError(info.path, info.reason)
                pending = ck._stage(info)
                apply = self._sharded_apply(ck, info, pending) if info.manifest.get("sharded") else pending
            except CorruptCheckpointError as exc:
                why = exc.reason
            except FileNotFoundError:
                why = "disappeared while being read"
            except CkptdError as exc:  # verified but does not fit this model: every rank stops
                fatal = str(exc)
            except BaseException:
                if pending is not None:
                    pending.discard()  # read in place: whatever failed, this rank's tensors go back as they were
                raise
            verdicts: list[Any] = [None] * self.world
            dist.all_gather_object(verdicts, (why, fatal), group=self.group)
            bad = [(r, w) for r, (w, _) in enumerate(verdicts) if w]
            fatals = [f for _, f in verdicts if f]
            if not bad and not fatals:
                assert apply is not None
                apply()
                return ck._after_restore(info)
            if pending is not None:
                pending.discard()  # refused by a peer: this rank's tensors go back as they were
            if fatals:
                raise CkptdError(fatals[0])
            reason = "; ".join(f"rank {r}: {w}" for r, w in bad)
            if self.rank == 0 and not all(w == "disappeared while being read" for _, w in bad):
                store.quarantine(ck.dir, name, reason)
            elif self.rank == 0:
                log.info("ckptd: checkpoint %s disappeared while being read", name)
        _announce(f"ckptd: no {'valid ' if names else ''}checkpoint in {ck.dir}: starting at step 0")
        return 0

    def _sharded_apply(self, ck: Checkpointer, info: store.CheckpointInfo, pending: Any) -> Any:
        """Verify this rank's share of a sharded checkpoint's files; return what applies all of it."""
        from . import sharded
        from .state import StateDecodeError, decode

        if not self.sharded:
            raise CkptdError(f"{info.path} holds sharded state (FSDP/DTensor) but this model is not sharded; "
                             "shard it the same way (fully_shard) before restore()")
        sharded.verify_share(info, self.rank, self.world)
        try:
            rest = decode(pending.tree.get("sharded"), lambda key: None)
        except StateDecodeError as exc:
            raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None
        if not isinstance(rest, dict) or not {"model", "optimizer"} <= set(rest):
            raise CorruptCheckpointError(info.path, f"{store.STATE} lacks the sharded state's structure")

        def apply_all() -> None:
            pending()
            sharded.load(info, ck.model, ck.optimizer, rest, self.group)

        return apply_all

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
            dist.barrier(group=self.group)
            if self.local_rank == 0 and stop_launcher:
                agent = torchrun_agent()
                if agent is not None:
                    log.info("ckptd: asking the torchrun agent (pid %d) to shut down: a stopped job is not restarted",
                             agent)
                    os.kill(agent, signal.SIGTERM)
            dist.barrier(group=self.group)
        except (RuntimeError, OSError) as exc:  # a peer is gone: exit anyway
            log.warning("ckptd: ranks did not meet before exiting (%s)", exc)

    def close(self) -> None:
        if self.rank_snapshot is not None:
            self.rank_snapshot.close()


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
