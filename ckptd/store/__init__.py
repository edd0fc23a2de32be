"""The on-disk checkpoint store: the only code that writes checkpoint files.

A package laid out by concern, each module importing only those above it in this list:

    layout       the names of every file and directory in a root, and the modes they are created with
    auth         the key of authenticated checkpoints (optional): a private key file, keyed BLAKE3
    format       what the bytes mean: the manifest, bounded JSON, dcp.json, the safetensors header
    writer       durable writes: fsync, atomic no-follow replacement, the checkpoint commit
    catalog      what a root holds and what of it is valid: list, inspect, verify
    maintenance  after the commit: amend, pin, quarantine, delete, move aside; stale temporaries
    reader       the restore read engine (imports nothing of the store; loaded on first use, below)

This module only hands their names on, so ``from ckptd import store; store.X`` and ``from .store import X``
reach every one. Nothing here imports torch: the supervisor and the inspection commands use the store.

Two things keep the package behaving as the single module it was:

- ``reader``'s names are loaded when first used (PEP 562 ``__getattr__``): restoring lowers the interpreter's
  switch interval process-wide, and a process that never restores (the supervisor) never loads that code.
- Assigning a name here (``store.READ_CHUNK = ...``, a test's ``monkeypatch.setattr(store, ...)``, a fault
  injector replacing ``store.rename_exchange``) assigns it in every submodule that holds the same object
  under that name, so the code that uses it sees the new value, as it did in one module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .auth import ALG, ALLOW_UNKEYED_ENV, KEY_ENV, MAC_FIELD, Key
from .auth import from_env as key_from_env
from .catalog import (
    RESOURCE_ERRNOS,
    CheckpointInfo,
    advise_sequential,
    check_metadata,
    check_structure,
    hash_file,
    hash_file_with,
    inspect_checkpoint,
    iter_checkpoint_paths,
    latest_valid,
    list_checkpoints,
    list_runs,
    parse_manifest,
    read_dcp_json,
    read_manifest,
    read_range,
    read_small,
    verify,
)
from .format import (
    ALIGN,
    DTYPE_SIZES,
    FORMAT,
    HASH,
    KINDS,
    MAX_DCP_JSON_BYTES,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_KEY_CHARS,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
    MAX_STATE_BYTES,
    MAX_STATE_DEPTH,
    MAX_STATE_VALUES,
    MAX_TENSORS,
    SHARD_SEP,
    Hashes,
    TensorEntry,
    authentication_problem,
    dcp_problem,
    digest_bytes,
    encode_manifest,
    files_digest,
    json_bounds_problem,
    load_json,
    manifest_canonical,
    manifest_digest,
    manifest_problem,
    new_hasher,
    parse_safetensors_header,
    read_header_bytes,
    read_safetensors_header,
    record_problem,
    safetensors_header_bytes,
    sign_manifest,
)
from .layout import (
    CHUNK,
    DCP_JSON,
    DIR_MODE,
    FILE_MODE,
    FILE_RE,
    MANIFEST,
    NAME_RE,
    PINS_DIR,
    PREVIOUS_DIR,
    QUARANTINE_DIR,
    REMOTE_MARK,
    SHARD_FILE_RE,
    STATE,
    TENSORS,
    TMP_PREFIX,
    TMP_RE,
    TRASH_PREFIX,
    check_name,
    checkpoint_name,
    shard_file,
    temp_name,
    trash_name,
)
from .maintenance import (
    amend_manifest,
    clear_remote_mark,
    delete,
    live_writer,
    mark_remote,
    move_aside,
    pin,
    pinned,
    quarantine,
    remote_mark,
    remove_stale_temps,
    unpin,
)
from .writer import (
    DIRECT_CHUNK,
    RENAME_EXCHANGE,
    DirCheck,
    FileRecord,
    HashPipe,
    Pace,
    PendingCheckpoint,
    fsync_dir,
    fsync_parent_once,
    fsync_path,
    is_aligned,
    lower_thread_priority,
    open_at,
    open_dir,
    private_dir,
    remove_tree,
    rename_exchange,
    replace_file,
    replace_file_at,
    replacing,
    replacing_at,
    subdir_at,
    unlink_at,
    unshared_dir,
    write_fully,
)

if TYPE_CHECKING:  # what type checkers see; at run time these come from __getattr__ below
    from .reader import (
        DURING_SWITCH,
        FIRST_READ,
        MAX_IOV,
        PREFETCH_PIECE,
        READ_CHUNK,
        READERS,
        RESTORE_PREFETCH,
        Prefetch,
        read_into,
    )

_digest = manifest_digest  # their names when the store was one module (ckptd/remote.py uses them)
_manifest_problem = manifest_problem

# name -> submodule that defines it, loaded on first use
_LAZY = {name: "reader" for name in (
    "READ_CHUNK", "FIRST_READ", "READERS", "RESTORE_PREFETCH", "PREFETCH_PIECE", "DURING_SWITCH", "MAX_IOV",
    "read_into", "Prefetch", "_short_switch",
)}

__all__ = [
    # layout
    "CHUNK", "DCP_JSON", "DIR_MODE", "FILE_MODE", "FILE_RE", "MANIFEST", "NAME_RE", "PINS_DIR", "PREVIOUS_DIR",
    "QUARANTINE_DIR", "REMOTE_MARK", "SHARD_FILE_RE", "STATE", "TENSORS", "TMP_PREFIX", "TMP_RE", "TRASH_PREFIX",
    "check_name", "checkpoint_name", "shard_file", "temp_name", "trash_name",
    # auth
    "ALG", "ALLOW_UNKEYED_ENV", "KEY_ENV", "MAC_FIELD", "Key", "key_from_env",
    # format
    "ALIGN", "DTYPE_SIZES", "FORMAT", "HASH", "KINDS", "MAX_DCP_JSON_BYTES", "MAX_DIMS", "MAX_HEADER_BYTES",
    "MAX_KEY_CHARS", "MAX_MANIFEST_BYTES", "MAX_MANIFEST_DEPTH", "MAX_STATE_BYTES", "MAX_STATE_DEPTH",
    "Hashes", "MAX_STATE_VALUES", "MAX_TENSORS", "SHARD_SEP", "TensorEntry", "authentication_problem", "dcp_problem",
    "digest_bytes", "encode_manifest", "files_digest", "json_bounds_problem", "load_json", "manifest_canonical",
    "manifest_digest", "manifest_problem", "new_hasher", "parse_safetensors_header", "read_header_bytes",
    "read_safetensors_header", "record_problem", "safetensors_header_bytes", "sign_manifest",
    # writer
    "DIRECT_CHUNK", "RENAME_EXCHANGE", "DirCheck", "FileRecord", "HashPipe", "Pace", "PendingCheckpoint",
    "fsync_dir", "fsync_parent_once", "fsync_path", "is_aligned", "lower_thread_priority", "open_at", "open_dir",
    "private_dir", "remove_tree", "rename_exchange", "replace_file", "replace_file_at", "replacing", "replacing_at",
    "subdir_at", "unlink_at", "unshared_dir", "write_fully",
    # catalog
    "RESOURCE_ERRNOS", "CheckpointInfo", "advise_sequential", "check_metadata", "check_structure", "hash_file",
    "hash_file_with", "inspect_checkpoint", "iter_checkpoint_paths", "latest_valid", "list_checkpoints", "list_runs",
    "parse_manifest", "read_dcp_json", "read_manifest", "read_range", "read_small", "verify",
    # maintenance
    "amend_manifest", "clear_remote_mark", "delete", "live_writer", "mark_remote", "move_aside", "pin", "pinned",
    "quarantine", "remote_mark", "remove_stale_temps", "unpin",
    # reader (loaded on first use)
    "FIRST_READ", "DURING_SWITCH", "MAX_IOV", "PREFETCH_PIECE", "Prefetch", "READERS", "READ_CHUNK",
    "RESTORE_PREFETCH", "read_into",
]


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later uses find it here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_UNSET = object()


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and name not in self.__dict__:
            __getattr__(name)  # its home is loaded before the name is replaced there
        old = self.__dict__.get(name, _UNSET)
        if old is not _UNSET:
            prefix = f"{__name__}."
            for modname, mod in list(sys.modules.items()):
                if modname.startswith(prefix) and mod is not None and vars(mod).get(name, _UNSET) is old:
                    setattr(mod, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
