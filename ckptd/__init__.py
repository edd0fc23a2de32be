"""ckptd: fault-tolerant training for PyTorch.

Inside a training script::

    import ckptd
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, every_steps=100)
    start = ck.restore()
    for step in range(start, total_steps):
        loss = train_step()
        ck.step(step + 1, metrics={"loss": loss.item()})
    ck.close()

The package imports torch lazily: the supervisor (``ckptd run``) and the
inspection commands import ``ckptd`` without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CkptdError,
    ConfigError,
    CorruptCheckpointError,
    NotFoundError,
    StorageError,
    UnsupportedStateError,
)
from .version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .annotate import add_metrics
    from .checkpointer import Checkpointer, SaveResult
    from .data import DataLoader
    from .store import CheckpointInfo

__all__ = [
    "Checkpointer",
    "DataLoader",
    "SaveResult",
    "CheckpointInfo",
    "list_checkpoints",
    "latest_valid",
    "load_state",
    "add_metrics",
    "CkptdError",
    "ConfigError",
    "CorruptCheckpointError",
    "NotFoundError",
    "StorageError",
    "UnsupportedStateError",
    "__version__",
]

_LAZY = {
    "Checkpointer": "ckptd.checkpointer",
    "SaveResult": "ckptd.checkpointer",
    "DataLoader": "ckptd.data",
    "load_state": "ckptd.restore",
    "add_metrics": "ckptd.annotate",
    "CheckpointInfo": "ckptd.store",
    "list_checkpoints": "ckptd.store",
    "latest_valid": "ckptd.store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptd' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
