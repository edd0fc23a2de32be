"""Metrics for a checkpoint from outside the run that wrote it: an evaluation script's results.

``ckptd.add_metrics(path, val_loss=0.31)`` records them in the checkpoint's manifest the way ``ck.report``
does inside the run (a new manifest with a new digest, written to a temporary file, fsynced and renamed over
the old one; the data files are never touched), so ``ckptd best``, ``keep_best``, ``ckptd ls`` and ``export
--best`` use them. Torch-free: a one-element tensor is taken through its ``item()``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from . import store
from .errors import CkptdError, NotFoundError


def add_metrics(path: str | os.PathLike[str], **metrics: Any) -> store.CheckpointInfo:
    """Add ``metrics`` (numbers, strings, booleans; NaN and infinities are stored as null) to the manifest of
    the checkpoint at ``path`` (a checkpoint directory, e.g. a ``path`` of ``ckptd ls --json``). Returns the
    checkpoint as it is now. NotFoundError when it is gone (retention may have removed it meanwhile),
    CorruptCheckpointError when it fails the manifest-level check, StorageError when the write fails."""
    path = os.fspath(path)
    if not metrics:
        raise CkptdError("add_metrics(): name at least one metric, e.g. add_metrics(path, val_loss=0.31)")
    values: dict[str, Any] = {}
    for name, v in metrics.items():
        if hasattr(v, "item") and callable(v.item) and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None  # JSON has no NaN or infinity: the manifest stays strict JSON
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise CkptdError(f"add_metrics(): {name}={v!r} is not a number, string, boolean or None "
                             "(a one-element tensor is fine)")
        values[name] = v
    if not os.path.isdir(path):
        raise NotFoundError(f"add_metrics(): {path} is not there (removed meanwhile, or not a checkpoint directory); "
                            "`ckptd ls DIR --json` lists each checkpoint's path")
    if not os.path.lexists(os.path.join(path, store.MANIFEST)):
        raise CkptdError(f"add_metrics(): {path} is not a checkpoint (no {store.MANIFEST}); name one checkpoint, "
                         "e.g. DIR/step-000000000300")
    return store.amend_manifest(path, metrics=values)
