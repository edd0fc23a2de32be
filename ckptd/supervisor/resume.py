"""What `ckptd run` starts: resume the run in DIR, start a new one, or nothing (the run finished).

Pure: :func:`plan` takes what DIR holds and how this run was started, and returns a :class:`Plan` (or
raises :class:`StartRefused`); the loop carries it out. Nothing here imports torch.

  * DIR holds no checkpoint: a new run (from ``--resume-from CKPT`` when given: a branch).
  * its newest checkpoint is the end of a finished run (``finished`` in its manifest): the same command
    (words and script bytes) does nothing and says so (exit 0); another command is refused, naming what
    differs and the three ways on (``--fresh``, ``--resume-from DIR/latest``, another ``--dir``).
  * else the run resumes, and the line says what differs from the command that wrote the checkpoint.
  * ``--fresh``: the old checkpoints are moved aside (never deleted) and a new run starts; refused when
    that is ambiguous: an unfinished run of this very command (a restart that replays ``--fresh`` would
    throw its progress away), or a multi-node job (every node would move the same directory).
  * ``--resume-from`` into a DIR that holds another run is refused unless ``--fresh`` moves it aside;
    the branch's own checkpoints (their origin names the same branch point) are resumed as usual.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .. import exitcodes, origin
from ..errors import CkptdError


class StartRefused(CkptdError):
    """`ckptd run` will not guess what the user wants (exit 2, like a bad command line)."""

    exit_code = exitcodes.USAGE


class Action(enum.Enum):
    NEW = "new"  # nothing to resume (or a branch from --resume-from)
    RESUME = "resume"
    FINISHED = "finished"  # nothing to do
    FRESH = "fresh"  # move the old checkpoints aside, then a new run


@dataclass
class Plan:
    action: Action
    line: str
    differences: list[str] = field(default_factory=list)


def plan(dir: str, latest: Any, now: dict[str, Any], *, fresh: bool = False, resume_from: str | None = None,
         multi_node: bool = False, writer_busy: str = "") -> Plan:
    """Decide what to start. ``latest``: DIR's newest valid checkpoint (store.CheckpointInfo) or None;
    ``now``: this start's origin (origin.current); ``writer_busy``: why DIR is being written by someone else
    ("" when it is not)."""
    branch = f" from {resume_from}" if resume_from else ""
    if fresh:
        if latest is None:
            return Plan(Action.NEW, f"new run in {dir}{branch} (--fresh: no checkpoint to move aside)")
        if multi_node:
            raise StartRefused(f"--fresh with a multi-node job is ambiguous: every node's `ckptd run` would move "
                               f"{dir} aside; move the old checkpoints yourself (or use a new --dir) and start "
                               "without --fresh")
        if writer_busy:
            raise StartRefused(f"--fresh refused: {writer_busy}; stop that writer first, or use another --dir")
        if not latest.finished and origin.same_command(latest.origin, now):
            raise StartRefused(
                f"--fresh refused: {dir} holds an unfinished run of this same command (step {latest.step}); a "
                "restart that replays --fresh would lose it. Without --fresh `ckptd run` resumes it; to start "
                f"over, move {dir} aside or use another --dir")
        return Plan(Action.FRESH, f"new run in {dir}{branch}; the previous run's checkpoints (newest: step "
                                  f"{latest.step}) are moved aside")
    if latest is None:
        if resume_from:
            return Plan(Action.NEW, f"new run in {dir}, branched from {resume_from}")
        return Plan(Action.NEW, f"new run in {dir}: no checkpoint to resume")
    recorded = latest.origin or {}
    if resume_from and recorded.get("resume_from") != resume_from:
        raise StartRefused(f"--resume-from refused: {dir} already holds another run (newest checkpoint: step "
                           f"{latest.step}); add --fresh to move it aside, or branch into another --dir")
    diff = origin.differences(latest.origin, now, world_size=False)
    if latest.finished:
        if origin.same_command(latest.origin, now):
            return Plan(Action.FINISHED, f"the run in {dir} finished at step {latest.step} ({latest.name}) with this "
                                         "same command: nothing to do; --fresh starts it again as a new run",
                        diff)
        raise StartRefused(
            f"{dir} holds a finished run (step {latest.step}, started as {origin.describe(latest.origin)}) and "
            f"this command differs ({'; '.join(diff)}): resuming would continue that run, not start this one. "
            f"--fresh starts a new run (the old checkpoints are moved aside), --resume-from {dir}/latest continues "
            "the finished run under this command, or use another --dir")
    line = f"resuming the run in {dir} at step {latest.step} ({latest.kind}, {latest.name})"
    if diff:
        line += "; differs from the command that wrote it: " + "; ".join(diff)
    return Plan(Action.RESUME, line, diff)
