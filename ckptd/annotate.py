"""Metrics for a checkpoint from outside the run that wrote it: an evaluation script's results.

``ckptd.add_metrics(path, val_loss=0.31)`` records them in the checkpoint's manifest the way ``ck.report``
does inside the run (a new manifest with a new digest, written to a temporary file, fsynced and renamed over
the old one; the data files are never touched), so ``ckptd best``, ``keep_best``, ``ckptd ls`` and ``export
--best`` use them. Torch-free: a one-element tensor is taken through its ``item()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from . import store
from .errors import CkptdError, NotFoundError


def jsonable_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics a manifest can hold: numbers, strings, booleans and None, a one-element tensor as its
    value, NaN and infinities as None (the manifest stays strict JSON); anything else is left out."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if callable(getattr(v, "numel", None)) and callable(getattr(v, "item", None)) and v.numel() == 1:
            v = v.item()  # a one-element tensor, without importing torch
        if isinstance(v, (int, float, str, bool)) or v is None:
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            out[str(k)] = v
    return out


def checked_metrics(metrics: Mapping[str, Any], who: str) -> dict[str, Any]:
    """:func:`jsonable_metrics`, refusing (naming them) the values a manifest cannot hold."""
    values = jsonable_metrics(metrics)
    if len(values) != len(metrics):
        bad = ", ".join(sorted(set(map(str, metrics)) - set(values)))
        raise CkptdError(f"{who}: {bad} is not a number, string, boolean or None (a one-element tensor is fine)")
    return values


def add_metrics(path: str | os.PathLike[str], **metrics: Any) -> store.CheckpointInfo:
    """Add ``metrics`` (numbers, strings, booleans; NaN and infinities are stored as null) to the manifest of
    the checkpoint at ``path`` (a checkpoint directory, e.g. a ``path`` of ``ckptd ls --json``). Returns the
    checkpoint as it is now. NotFoundError when it is gone (retention may have removed it meanwhile),
    CorruptCheckpointError when it fails the manifest-level check, StorageError when the write fails. A checkpoint
    written with a key needs that key in ``$CKPTD_KEY_FILE`` (its manifest is authenticated, then MACed anew)."""
    path = os.fspath(path)
    if not metrics:
        raise CkptdError("add_metrics(): name at least one metric, e.g. add_metrics(path, val_loss=0.31)")
    values = checked_metrics(metrics, "add_metrics()")
    if not os.path.isdir(path):
        raise NotFoundError(f"add_metrics(): {path} is not there (removed meanwhile, or not a checkpoint directory); "
                            "`ckptd ls DIR --json` lists each checkpoint's path")
    if not os.path.lexists(os.path.join(path, store.MANIFEST)):
        raise CkptdError(f"add_metrics(): {path} is not a checkpoint (no {store.MANIFEST}); name one checkpoint, "
                         "e.g. DIR/step-000000000300")
    return store.amend_manifest(path, metrics=values, key=store.key_from_env())  # keyed: re-MACed with $CKPTD_KEY_FILE
