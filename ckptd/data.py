"""A DataLoader whose position is part of the checkpoint: the same batches after a resume at any step.

    train_loader = ckptd.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=2)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, extra={"loader": train_loader})

A drop-in for ``torch.utils.data.DataLoader`` (map-style datasets). Its state is three numbers in JSON -
``{"epoch", "position", "seed"}``, ``position`` being the batches handed to the loop in that epoch - and the
order of an epoch is a function of ``(seed, epoch)`` only:

* ``shuffle=True``: a permutation drawn from a ``torch.Generator`` seeded with ``seed + epoch`` (the rule
  ``DistributedSampler`` uses). ``seed`` defaults to ``torch.initial_seed()`` at construction, so a script's
  ``torch.manual_seed(args.seed)`` still picks the order; the checkpoint keeps the seed.
* ``sampler=DistributedSampler(...)`` (or any sampler with ``set_epoch``): ``set_epoch(epoch)`` before each
  epoch; each rank keeps its own order and position.
* otherwise the dataset's order.

After ``load_state_dict`` the next iteration continues the saved epoch after its first ``position``
batches (none are loaded: the skipped indices are dropped before the batch sampler), so it may yield
nothing when the epoch's last step was the one saved; the iteration after a completed one starts the next
epoch, unless ``set_epoch`` (called by ``Checkpointer.epochs``) names the epoch.

The global RNG is never touched: torch's ``DataLoader.__iter__`` draws the workers' base seed from the
global torch RNG unless the loader has a generator, so this loader has one, seeded per epoch from
``(seed, epoch)``, which also makes workers' seeds the same in every run of an epoch.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data

from .errors import CkptdError

# The workers' base seed comes from a stream apart from the permutation's (both from seed and epoch).
WORKER_SEED_SALT = 0x5DEECE66D
_SEED_MASK = (1 << 63) - 1
_TORCH_PARAMS = list(inspect.signature(torch.utils.data.DataLoader.__init__).parameters)[1:]


class _EpochSampler(torch.utils.data.Sampler):
    """The indices of one epoch of the owning loader, without the first ``skip`` (already trained)."""

    def __init__(self, n: int, shuffle: bool, inner: Any) -> None:
        self.n, self.shuffle, self.inner = n, shuffle, inner
        self.epoch, self.seed, self.skip = 0, 0, 0

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.n

    def __iter__(self) -> Iterator[int]:
        if self.inner is not None:
            if hasattr(self.inner, "set_epoch"):
                self.inner.set_epoch(self.epoch)
            order: Any = iter(self.inner)
        elif self.shuffle:
            g = torch.Generator().manual_seed((self.seed + self.epoch) & _SEED_MASK)
            order = iter(torch.randperm(self.n, generator=g).tolist())
        else:
            order = iter(range(self.n))
        return itertools.islice(order, self.skip, None)


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` with a resumable position (see the module docstring).

    Takes torch's arguments, plus ``seed`` (the shuffle's seed; default ``torch.initial_seed()``).
    Not supported (a CkptdError says so): ``batch_sampler``, iterable-style datasets, and a ``generator``
    together with ``seed``.
    """

    def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        if len(args) > len(_TORCH_PARAMS):
            raise TypeError(f"ckptd.DataLoader takes at most {len(_TORCH_PARAMS)} positional arguments")
        kw = dict(zip(_TORCH_PARAMS, args, strict=False))  # args may stop short of the parameters
        for k, v in kwargs.items():
            if k in kw:
                raise TypeError(f"ckptd.DataLoader got multiple values for argument {k!r}")
            kw[k] = v
        dataset: Any = kw.get("dataset")
        if kw.get("batch_sampler") is not None:
            raise CkptdError("ckptd.DataLoader does not take batch_sampler (its position is counted in batches of "
                             "batch_size); pass sampler= and batch_size= instead, or checkpoint your batch sampler "
                             "through Checkpointer(extra=...)")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise CkptdError("ckptd.DataLoader needs a map-style dataset (with __len__ and __getitem__); an "
                             "iterable dataset's position must be checkpointed by the dataset itself")
        generator = kw.pop("generator", None)
        if generator is not None and seed is not None:
            raise CkptdError("ckptd.DataLoader: pass seed= or generator=, not both (the generator's initial seed "
                             "becomes the seed)")
        sampler, shuffle = kw.pop("sampler", None), bool(kw.pop("shuffle", None))
        if sampler is not None and shuffle:
            raise CkptdError("ckptd.DataLoader: sampler and shuffle=True are mutually exclusive (as in torch); "
                             "shuffle in the sampler, e.g. DistributedSampler(dataset, shuffle=True)")
        if seed is None:
            seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise CkptdError(f"ckptd.DataLoader: seed must be an int >= 0, got {seed!r}")
        self._epoch_sampler = _EpochSampler(len(dataset), shuffle, sampler)
        self._epoch_sampler.seed = seed
        super().__init__(sampler=self._epoch_sampler, generator=torch.Generator(), **kw)
        self.epoch, self.position, self.seed = 0, 0, seed
        self._ran_out = False  # the iteration of ``epoch`` ended in this process: the next one starts epoch + 1

    # The generator is the loader's own, reseeded from (seed, epoch) at each iteration: kept out of the instance's
    # public attributes, so that a copy rebuilt from them (Lightning's DDP puts a DistributedSampler into the train
    # loader that way) gets the seed alone, not the seed and a generator, which the constructor refuses.
    @property
    def generator(self) -> torch.Generator:
        return self._generator

    @generator.setter
    def generator(self, value: torch.Generator) -> None:
        self._generator = value

    # ------------------------------------------------------------------ position

    @property
    def at_end(self) -> bool:
        """Every batch of the current epoch has been handed to the loop."""
        return self.position >= len(self)

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next: from its saved position when it is the epoch in progress, else from the start."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise CkptdError(f"set_epoch takes an int, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        self._ran_out = False

    # torch annotates __iter__ with its private iterator class; this one wraps that iterator to count batches.
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self._ran_out:
            self.epoch, self.position, self._ran_out = self.epoch + 1, 0, False
        s = self._epoch_sampler
        s.epoch, s.seed = self.epoch, self.seed
        s.skip = self.position * (self.batch_size if self.batch_size is not None else 1)
        # Worker seeds from (seed, epoch), never from the global torch RNG (DataLoader.__iter__ draws one).
        self.generator.manual_seed(((self.seed + self.epoch) ^ WORKER_SEED_SALT) & _SEED_MASK)
        return self._count(super().__iter__())

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self.position += 1
            yield batch
        self._ran_out = True

    # ------------------------------------------------------------------ checkpointed state

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("epoch", "position", "seed"):
            v = state.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and k != "epoch"):
                raise CkptdError(f"ckptd.DataLoader state: {k} must be an int{'' if k == 'epoch' else ' >= 0'}, "
                                 f"got {v!r}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._ran_out = False
