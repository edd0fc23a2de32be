"""How the ranks of a job cooperate on one checkpoint: the collective steps of a save and a restore.

The save path (``persist.write``) and the restore loop (``restore.newest``) are written once, over these
steps; a strategy says how they happen:

* :class:`Solo` - one process (or a rank that does not write, without torch.distributed): every step is
  local; a value agreed on is the one computed here.
* :class:`Replicated` - several ranks with the same model, over ckptd's private gloo group: the leader
  (rank 0) decides and broadcasts (:meth:`~Solo.agree`), verdicts are all-gathered (:meth:`~Solo.verdicts`),
  commit records gathered to the leader (:meth:`~Solo.gather`).
* :class:`Sharded` - the same, and the model and optimizer are DTensor shards that go through
  torch.distributed.checkpoint (sharded.py) as collectives of their own.

A strategy knows nothing of the Checkpointer; it moves values between ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from . import store

GROUP_TIMEOUT = timedelta(minutes=10)  # ckptd's own collectives (a peer that died is noticed by torchrun first)

T = TypeVar("T")


def rank_files(rank: int) -> tuple[str, str]:
    """A rank's own files in a checkpoint written by several ranks (its RNG streams, ``extra``, ``user``)."""
    return f"rank-{rank:05d}.safetensors", f"rank-{rank:05d}.json"


class Solo:
    """One process: the collective steps are local.

    ``leader``: this process writes (removes stale temporaries, opens and commits the temporary directory,
    quarantines); a rank of a job without torch.distributed that is not rank 0 only reads.
    """

    world = 1
    sharded = False
    per_rank = False  # a checkpoint of several parts: the replicated state once, and each rank's own files

    def __init__(self, rank: int = 0, leader: bool = True) -> None:
        self.rank, self.leader, self.local_rank = rank, leader, 0

    def agree(self, decide: Callable[[], T]) -> T:
        """Agree on a value the leader decides (the candidates, where to write, the outcome of a commit)."""
        return decide()

    def verdicts(self, mine: T) -> list[T]:
        """Every rank's value, in rank order (each rank's verdict on a candidate)."""
        return [mine]

    def gather(self, mine: T) -> list[T]:
        """Every rank's value at the leader, in rank order (the records of the files each rank wrote);
        ``[]`` elsewhere."""
        return [mine]

    def barrier(self) -> None:
        pass

    def who(self, rank: int, what: str) -> str:
        """``what`` as said of ``rank`` (one process: no rank to name)."""
        return what


class Replicated(Solo):
    """Several ranks over ckptd's private gloo group (never the training thread's group, so its collectives
    cannot interleave with the job's); every rank calls each step in the same order."""

    per_rank = True

    def __init__(self) -> None:
        super().__init__(dist.get_rank(), dist.get_rank() == 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK") or self.rank)  # this node's first rank reports
        self.world = dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)

    def agree(self, decide: Callable[[], T]) -> T:
        box: list[Any] = [decide() if self.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def verdicts(self, mine: T) -> list[T]:
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        return every

    def gather(self, mine: T) -> list[T]:
        every: list[Any] = [None] * self.world if self.leader else []
        dist.gather_object(mine, every if self.leader else None, dst=0, group=self.group)
        return every

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def who(self, rank: int, what: str) -> str:
        return f"rank {rank}: {what}"


class Sharded(Replicated):
    """Replicated, and the model and optimizer are sharded (FSDP2 / DTensor): their tensors are saved and
    loaded by torch.distributed.checkpoint, collectively, on the same group."""

    sharded = True

    def save_shards(self, tensors: dict[str, Any], part: store.PendingCheckpoint, pace: store.Pace | None) -> None:
        from . import sharded

        sharded.save(tensors, part, self.rank, self.group, pace)

    def load_shards(self, info: store.CheckpointInfo, model: Any, optimizer: Any, rest: dict[str, Any]) -> None:
        from . import sharded

        sharded.load(info, model, optimizer, rest, self.group)
