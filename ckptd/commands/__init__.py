"""One module per subcommand; each exposes ``register(subparsers)``."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from ..errors import NotFoundError


def existing_dir(path: str) -> str:
    if not os.path.exists(path):
        raise NotFoundError(f"{path} does not exist; give the checkpoint directory (e.g. ./checkpoints)")
    if not os.path.isdir(path):
        raise NotFoundError(f"{path} is not a directory; give a checkpoint directory or a checkpoint")
    return path


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1, sort_keys=True, default=str)
    sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))
