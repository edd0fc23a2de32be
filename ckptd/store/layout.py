"""The names of everything in a checkpoint root, and the modes it is created with.

::

    ROOT/
      step-000000001200/          one directory per checkpoint, visible only when complete
        tensors.safetensors       every tensor (safetensors format, loadable by `safetensors` alone)
        state.json                structure and non-tensor state (JSON; tensors referenced by key)
        dcp.json, shard-NNNNN.bin a sharded checkpoint's tensor map and each rank's shards
        manifest.json             written last: format, step, kind, files with size + xxh3-128, digest
      .tmp-step-...-HOST-PID-XXXXXXXX/  a checkpoint being written (removed at start when its writer is gone)
      .trash-step-...-XXXXXXXX/   a checkpoint being deleted (out of sight first, then removed)
      .quarantine/NAME-TIME/      checkpoints that failed verification, with QUARANTINE.json saying why
      .pins/NAME                  pinned checkpoints (never deleted by retention)
      .previous/LABEL-TIME/       an earlier run's checkpoints, moved aside by ``ckptd run --fresh``

Every module of the store builds and recognises these names here, and only here.
"""

from __future__ import annotations

import os
import re
import socket
import uuid

from ..errors import CkptdError

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
DCP_JSON = "dcp.json"  # a sharded checkpoint's tensor map (ckptd/sharded.py writes it: JSON, never pickled)
SHARD_FILE_RE = re.compile(r"^shard-([0-9]{5,})\.bin$")
QUARANTINE_DIR = ".quarantine"
PINS_DIR = ".pins"
REMOTE_MARK = ".remote-committed.json"  # the newest checkpoint the uploader committed remotely (uploader.py)
PREVIOUS_DIR = ".previous"  # `ckptd run --fresh` moves an old run's checkpoints here, never deletes them
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

NAME_RE = re.compile(r"^step-([0-9]{12,20})$")  # ASCII digits only: \\d also matches e.g. Arabic-Indic digits
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A writer's temporary directory: TMP_PREFIX + checkpoint name + host + pid + random (see temp_name).
TMP_RE = re.compile(r"^\.tmp-step-[0-9]+-(.+)-([0-9]+)-[0-9a-f]{8}$")

FILE_MODE = 0o644  # further reduced by the umask; never world-writable
DIR_MODE = 0o755
CHUNK = 8 << 20  # buffered write/read/hash granularity


def checkpoint_name(step: int) -> str:
    if not isinstance(step, int) or step < 0:
        raise CkptdError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step-{step:012d}"


def check_name(name: str) -> str:
    """Refuse names that could escape the root (``..``, separators, hidden files)."""
    if not isinstance(name, str) or not (NAME_RE.match(name) or FILE_RE.match(name)) or name in (".", ".."):
        raise CkptdError(f"invalid checkpoint or file name {name!r}: names are plain words like step-000000001200, "
                         "without '/', '..' or a leading dot")
    return name


def shard_file(rank: int) -> str:
    """A sharded checkpoint's file of one rank's shards."""
    return f"shard-{rank:05d}.bin"


def temp_name(name: str) -> str:
    """A temporary entry of this process for checkpoint ``name``: host and pid say whether its writer still
    lives (maintenance.remove_stale_temps), the random part keeps two of one process apart."""
    return f"{TMP_PREFIX}{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def trash_name(name: str) -> str:
    """Where checkpoint ``name`` goes out of sight before its files are removed."""
    return f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
