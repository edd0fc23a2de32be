"""What started a run: recorded in every checkpoint's manifest, compared when a run is started again.

A checkpoint's ``origin`` (manifest field, checked by ``store``) holds:

  * ``command``: (secret-looking option values replaced by ``***``, as in the supervisor's log) the words
    after ``ckptd run [options]`` (``train.py --steps 300``, or ``torchrun ... train.py``) when supervised,
    else the script's ``sys.argv``; the same words either way for ``ckptd run train.py ...``;
  * ``script`` and ``script_sha256``: the first ``*.py`` word of the command that is a file (absolute path)
    and the SHA-256 of its bytes, so an edited script is told apart from the same one;
  * ``config``: the ``ckptd run`` configuration (``--config`` file and options; ``dir`` left out), None when
    not supervised;
  * ``world_size``: ``$WORLD_SIZE`` of the trainer (1 when unset);
  * ``resume_from``: the checkpoint the run branched from (``ckptd run --resume-from``), else None.

A manifest with ``finished: true`` is the last checkpoint of a run whose script called ``close()`` after its
last step. Nothing here imports torch: the supervisor and the library both use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Sequence
from typing import Any

from . import env

SECRET_NAME = re.compile(r"key|token|secret|passw|credential|auth|cookie", re.IGNORECASE)
REDACTED = "***"
SCRIPT_HASH_LIMIT = 64 << 20  # a training script is far smaller; a bigger "script" is not hashed
FIELDS = ("command", "script", "script_sha256", "config", "world_size", "resume_from")


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every option whose name looks like a secret replaced by ``***``:
    ``--api-key=X``, ``--api-key X``, ``-password X``, ``API_TOKEN=X`` (an environment assignment, as
    ``env`` takes it)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and arg != "--":
            name, eq, _ = arg.lstrip("-").partition("=")
            if SECRET_NAME.search(name):
                if eq:
                    arg = arg[: arg.index("=") + 1] + REDACTED
                else:
                    hide_next = True
        else:
            name, eq, _ = arg.partition("=")
            if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and SECRET_NAME.search(name):
                arg = f"{name}={REDACTED}"
        out.append(arg)
    return out


def script_of(command: list[str]) -> str | None:
    """The training script a command runs: its first ``*.py`` word that is a file (absolute), else None."""
    for word in command:
        if word.endswith(".py") and os.path.isfile(word):
            return os.path.abspath(word)
    return None


def script_sha256(path: str | None) -> str | None:
    """SHA-256 of a script's bytes; None when there is none, it is unreadable or larger than SCRIPT_HASH_LIMIT."""
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > SCRIPT_HASH_LIMIT:
                return None
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def current(command: list[str], config: dict[str, Any] | None = None, world_size: int = 1,
            resume_from: str | None = None) -> dict[str, Any]:
    """The origin of a run started now with ``command``."""
    script = script_of(command)
    return {"command": redact_argv(command), "script": script, "script_sha256": script_sha256(script),
            "config": config, "world_size": world_size, "resume_from": resume_from}


def for_env(command: list[str], config: dict[str, Any], resume_from: str | None) -> str:
    """What ``ckptd run`` passes to its trainer in ``$CKPTD_ORIGIN`` (JSON)."""
    return json.dumps({"command": command, "config": config, "resume_from": resume_from}, sort_keys=True)


def from_env(argv: list[str], world_size: int) -> dict[str, Any]:
    """The trainer's origin: ``$CKPTD_ORIGIN`` when supervised, else its own ``sys.argv``."""
    raw = os.environ.get(env.ORIGIN, "")
    given: Any = None
    if raw:
        try:
            given = json.loads(raw)
        except ValueError:
            given = None
    if not isinstance(given, dict) or problem({**given, "world_size": world_size,
                                               "script": None, "script_sha256": None}):
        return current(list(argv), None, world_size, None)
    return current(given["command"], given.get("config"), world_size, given.get("resume_from"))


def problem(origin: Any) -> str:
    """The first wrong field of a recorded origin ("" when every field has its type)."""
    if not isinstance(origin, dict):
        return "is not an object"
    command = origin.get("command")
    if not isinstance(command, list) or not all(isinstance(w, str) for w in command):
        return "command is not a list of strings"
    for name in ("script", "script_sha256", "resume_from"):
        if origin.get(name) is not None and not isinstance(origin.get(name), str):
            return f"{name} is not a string"
    if origin.get("config") is not None and not isinstance(origin.get("config"), dict):
        return "config is not an object"
    ws = origin.get("world_size", 1)
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        return "world_size is not a whole number >= 1"
    return ""


def same_command(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """The same words and the same script bytes (a config that differs does not make it another command)."""
    return old is not None and old.get("command") == new.get("command") and \
        old.get("script_sha256") == new.get("script_sha256")


def differences(old: dict[str, Any] | None, new: dict[str, Any], *, world_size: bool = True) -> list[str]:
    """What differs between the origin a checkpoint recorded and this start's, one short phrase each.

    ``world_size=False``: left out (the supervisor does not know how many ranks torchrun will start).
    """
    if old is None:
        return ["the checkpoint does not record what started it (written by an older ckptd)"]
    out = []
    if old.get("command") != new.get("command"):
        out.append(f"command {shlex.join(old.get('command') or [])!r} -> {shlex.join(new.get('command') or [])!r}")
    elif old.get("script_sha256") != new.get("script_sha256") and old.get("script_sha256") and new.get("script_sha256"):
        out.append(f"script {new.get('script')} changed since (SHA-256 {old['script_sha256'][:12]} -> "
                   f"{new['script_sha256'][:12]})")
    old_cfg, new_cfg = old.get("config"), new.get("config")
    if old_cfg is not None and new_cfg is not None:
        keys = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        out.extend(f"config {k} {_short(old_cfg.get(k))} -> {_short(new_cfg.get(k))}" for k in keys)
    if world_size and old.get("world_size", 1) != new.get("world_size", 1):
        out.append(f"world size {old.get('world_size', 1)} -> {new.get('world_size', 1)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(origin: dict[str, Any] | None) -> str:
    """``'train.py --steps 300'`` of an origin, for one line of text."""
    if origin is None:
        return "an unrecorded command"
    return repr(shlex.join(origin.get("command") or []))
