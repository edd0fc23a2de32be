"""The long runs' common ending: print the JSON report, optionally write it to a file, exit 1 on failures."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def emit(report: dict[str, Any], path: str | None) -> int:
    text = json.dumps(report, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return 1 if report["failed"] else 0


def count_seed_main(doc: str, run: Callable[[int, int], dict[str, Any]], count_default: int, count_help: str) -> int:
    """The command line of a long run that takes ``--count``, ``--seed`` and ``--json``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=count_default, help=count_help)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args()
    return emit(run(a.count, a.seed), a.json)
