"""What both framework integrations share: retention arguments in a framework's words, metrics in ckptd's."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import CkptdError


def keep_best_rules(monitor: str | None, mode: str, save_top_k: int | None, keep_best: Iterable[str]) -> list[str]:
    """``ModelCheckpoint``'s top-k (``monitor``, ``mode``, ``save_top_k``) as ckptd ``keep_best`` rules.

    ``save_top_k=-1`` or None keeps every checkpoint by that metric (no rule); 0 is refused, because ckptd always
    keeps the newest valid checkpoint to resume from.
    """
    rules = list(keep_best)
    if mode not in ("min", "max"):
        raise CkptdError(f"mode must be 'min' or 'max', got {mode!r}")
    if save_top_k is not None and (isinstance(save_top_k, bool) or not isinstance(save_top_k, int)
                                   or save_top_k == 0 or save_top_k < -1):
        raise CkptdError(f"save_top_k must be a positive int or -1 (keep all), got {save_top_k!r}: ckptd always "
                         "keeps the newest valid checkpoint, so 0 is not possible")
    if save_top_k is not None and save_top_k > 0:
        if not monitor:
            raise CkptdError("save_top_k needs monitor= (the metric to rank checkpoints by); keep_last=N keeps the "
                             "newest N without a metric")
        rules.append(f"{monitor}:{save_top_k}:{mode}")
    return rules


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The one-element values among a framework's logged metrics, as numbers: the supervisor's heartbeat carries
    plain numbers only (``ckptd_train_metric``). On a GPU each is one device sync, as for a progress bar."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = value
        elif hasattr(value, "numel") and value.numel() == 1:
            out[str(name)] = value.item()
    return out
