"""The long runs' common ending: print the JSON report, optionally write it to a file, exit 1 on failures."""

from __future__ import annotations

import json
from typing import Any


def emit(report: dict[str, Any], path: str | None) -> int:
    text = json.dumps(report, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return 1 if report["failed"] else 0
