"""One module per subcommand; each exposes ``register(subparsers)``.

Shared here: how a command names a checkpoint directory or one checkpoint, how an ``OSError`` from
storage becomes one line with exit code 5 (or 4), and output helpers.

Naming a checkpoint (inspect, export, pin, verify):
  * a path to a checkpoint, e.g. ``checkpoints/step-000000000300``;
  * ``DIR/latest``: the newest checkpoint of DIR that verifies (checksums included), the one ``restore()`` loads;
  * ``DIR/300``: the checkpoint of step 300 in DIR;
  * a bare ``300``, ``latest`` or ``step-000000000300`` (no ``/``): looked up in ``--dir``
    (default ``$CKPTD_DIR``, else ``./checkpoints``). Write ``./300`` for a directory named 300.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
from typing import Any

from .. import exitcodes, store
from ..errors import CkptdError, CorruptCheckpointError, NotFoundError, StorageError

LATEST = "latest"
DIR_HELP = "checkpoint directory (default: $CKPTD_DIR, else ./checkpoints)"


class UsageError(CkptdError):
    """Bad command-line arguments (exit 2), found after argparse."""

    exit_code = exitcodes.USAGE


class RootGivenError(UsageError):
    """A directory of checkpoints (or an empty one) was given where one checkpoint is expected."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class CommandStorageError(StorageError):
    """A storage error outside a save: names the path, the cause and the fix (exit 5)."""

    def __init__(self, message: str, path: str, op: str, cause: OSError) -> None:
        CkptdError.__init__(self, message)
        self.path, self.op, self.errno = path, op, cause.errno


_FIXES = {
    errno.EROFS: "the file system is read-only: remount it read-write, or work on a writable copy",
    errno.ENOSPC: "the disk is full: free space (e.g. `ckptd prune`) and run it again",
    errno.EDQUOT: "the disk quota is used up: free space (e.g. `ckptd prune`) or raise the quota",
    errno.EACCES: "permission denied: run it as the directory's owner or fix the permissions",
    errno.EPERM: "operation not permitted: run it as the directory's owner or fix the permissions",
    errno.EIO: "the device reported an I/O error: check the disk (dmesg) before trusting it",
}


def storage_error(exc: OSError, op: str, path: str | None = None) -> CkptdError:
    """One-line error for an ``OSError`` met while doing ``op`` on ``path``: exit 4 when it is gone, else 5."""
    path = path or (os.fsdecode(exc.filename) if exc.filename is not None else "?")
    if exc.errno == errno.ENOENT:
        return NotFoundError(f"{op} {path}: no such file or directory; it was removed meanwhile or the path is wrong")
    name = errno.errorcode.get(exc.errno or 0, "")
    cause = f"{exc.strerror or exc}" + (f" ({name})" if name else "")
    fix = _FIXES.get(exc.errno or 0, "check the file system and run it again")
    return CommandStorageError(f"{op} failed for {path}: {cause}; {fix}", path, op, exc)


# ----------------------------------------------------------------------------- arguments


def add_dir_argument(p: argparse.ArgumentParser, positional: bool) -> None:
    """DIR as an optional positional (ls, verify, prune) and ``--dir``; or only ``--dir`` (for CKPT commands)."""
    if positional:
        p.add_argument("dir", nargs="?", metavar="DIR", help=DIR_HELP)
    p.add_argument("--dir", dest="dir_option", metavar="DIR", default=None,
                   help=DIR_HELP if not positional else "same as DIR")


def add_node_argument(p: argparse.ArgumentParser) -> None:
    """``--node-rank N`` of the client commands (save, stop, status)."""
    p.add_argument("--node-rank", type=node_rank, default=None, metavar="N",
                   help="multi-node job: talk to the `ckptd run` of node N (default: the one running on this host)")


def add_key_arguments(p: argparse.ArgumentParser) -> None:
    """``--key-file`` and ``--allow-unkeyed`` of the commands that read checkpoints (verify, inspect, export)."""
    p.add_argument("--key-file", metavar="FILE", default=None,
                   help="authenticate with this key (default $CKPTD_KEY_FILE): a checkpoint whose manifest or files "
                   "do not authenticate, or one written without a key, is refused")
    p.add_argument("--allow-unkeyed", action="store_true", default=None,
                   help="with a key: still accept checkpoints written without one (checksums only; default "
                   "$CKPTD_ALLOW_UNKEYED=1)")


def key_from(args: argparse.Namespace) -> store.Key | None:
    """The key ``--key-file`` (or $CKPTD_KEY_FILE) names, loaded; None without one. Never printed."""
    allow = args.allow_unkeyed if args.allow_unkeyed is not None else \
        os.environ.get(store.ALLOW_UNKEYED_ENV) == "1"
    path = args.key_file or os.environ.get(store.KEY_ENV) or None
    if path is None:
        if args.allow_unkeyed:
            raise UsageError("--allow-unkeyed only makes sense with a key: add --key-file FILE")
        return None
    return store.Key.load(path, allow_unkeyed=allow)


def trust_note(info: store.CheckpointInfo, key: store.Key | None) -> str:
    """What a valid checkpoint's "ok" rests on, when it is not plain checksums of an unkeyed checkpoint."""
    if info.mac_key is not None:
        return "authenticated"
    if info.keyed:
        return "checksums only: written with a key, authenticity not checked; give --key-file"
    if key is not None:
        return "not authenticated: written without a key (accepted by --allow-unkeyed)"
    return ""


def root_from(args: argparse.Namespace) -> str:
    """The checkpoint directory a command works on: DIR, ``--dir``, ``$CKPTD_DIR``, ``./checkpoints``."""
    given, option = getattr(args, "dir", None), getattr(args, "dir_option", None)
    if given is not None and option is not None:
        raise UsageError(f"give the directory either as DIR ({given}) or as --dir ({option}), not both")
    return given or option or default_dir()


def default_dir() -> str:
    return os.environ.get("CKPTD_DIR") or "checkpoints"


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return v


def node_rank(text: str) -> int:
    """argparse type: a node rank, a whole number >= 0."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"a node rank is a whole number >= 0, got {text!r}")
    return v


# ----------------------------------------------------------------------------- naming checkpoints


def existing_dir(path: str, fix: str = "give the checkpoint directory (DIR, --dir or $CKPTD_DIR)") -> str:
    if not os.path.lexists(path):
        hint = ("" if path != default_dir() or os.environ.get("CKPTD_DIR") else
                " (the default when no DIR is given and $CKPTD_DIR is unset)")
        raise NotFoundError(f"{path} does not exist{hint}; {fix}")
    if not os.path.isdir(path):
        raise NotFoundError(f"{path} is not a directory; give a checkpoint directory or a checkpoint")
    return path


def is_checkpoint(path: str) -> bool:
    """A checkpoint (valid or not) rather than a directory of checkpoints: its name or its manifest says so."""
    return bool(store.NAME_RE.match(os.path.basename(os.path.normpath(path)))) or \
        os.path.lexists(os.path.join(path, store.MANIFEST))


def is_step_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


NAME_FIX = (f"name a checkpoint, e.g. checkpoints/{store.checkpoint_name(300)}, checkpoints/latest or a step number; "
            "`ckptd ls DIR` lists them")


def resolve_checkpoint(target: str, dir_option: str | None = None, missing_fix: str = NAME_FIX,
                       key: store.Key | None = None) -> tuple[str, store.CheckpointInfo | None]:
    """The checkpoint directory ``target`` names (see the module docstring).

    Returns ``(path, info)``; ``info`` is the full verification (with ``key``, authentication) when ``latest``
    was resolved (so callers need not read the checkpoint twice), else None.
    """
    bare = os.sep not in target and target not in (".", "..")
    if bare and (dir_option is not None or target == LATEST or is_step_number(target) or not os.path.lexists(target)):
        return _in_root(dir_option or default_dir(), target, key)
    parent, leaf = os.path.split(os.path.normpath(target))
    special = leaf == LATEST or is_step_number(leaf) or bool(store.NAME_RE.match(leaf))
    if special and os.path.isdir(parent or ".") and not is_checkpoint(parent or "."):
        return _in_root(parent or ".", leaf, key)
    existing_dir(target, missing_fix)
    if not is_checkpoint(target):
        raise _root_error(target)
    return target, None


def verified(path: str, info: store.CheckpointInfo | None = None, quiet: bool = False,
             key: store.Key | None = None) -> store.CheckpointInfo:
    """The checkpoint at ``path`` verified in full (``info``: a full verification already done, e.g. by
    resolving ``DIR/latest``), with a progress bar on a terminal unless ``quiet``; CorruptCheckpointError
    when it fails."""
    from ..progress import Progress

    if info is None:
        with Progress("verify", store.inspect_checkpoint(path).bytes, enabled=False if quiet else None) as prog:
            info = store.verify(path, progress=prog, key=key)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    return info


def _in_root(root: str, leaf: str, key: store.Key | None = None) -> tuple[str, store.CheckpointInfo | None]:
    existing_dir(root)
    if leaf == LATEST:  # as store.latest_valid(), keeping the full verification's result
        for listed in reversed(store.list_checkpoints(root, key)):
            info = store.verify(listed.path, key=key) if listed.valid else listed
            if info.valid:
                return info.path, info
        raise NotFoundError(f"no valid checkpoint in {root}; `ckptd verify {root}` says why each one is invalid")
    name = store.checkpoint_name(int(leaf)) if is_step_number(leaf) else leaf
    path = os.path.join(root, name)
    if not os.path.lexists(path):
        steps = ", ".join(str(i.step) for i in store.list_checkpoints(root) if i.valid) or "none"
        what = f"no checkpoint at step {int(leaf)}" if is_step_number(leaf) else f"no checkpoint {name}"
        raise NotFoundError(f"{what} in {root} (valid steps: {steps}); `ckptd ls {root}` lists them")
    return path, None


def _root_error(path: str) -> RootGivenError:
    names = sorted((e.name for e in os.scandir(path) if store.NAME_RE.match(e.name)), reverse=True)
    marks = {store.PINS_DIR, store.QUARANTINE_DIR, ".ckptd"} & set(os.listdir(path))
    if not names and not marks:
        return RootGivenError(f"{path} is not a checkpoint (no {store.MANIFEST}) and holds no checkpoints; "
                              f"name a checkpoint, e.g. checkpoints/{store.checkpoint_name(300)}", path)
    example = os.path.join(path, names[0] if names else store.checkpoint_name(300))
    return RootGivenError(f"{path} is a checkpoint directory, not a checkpoint: name one of its checkpoints, e.g. "
                          f"{example}, {os.path.join(path, LATEST)} (the newest valid one) or a step number "
                          f"({os.path.join(path, '300')})", path)


# ----------------------------------------------------------------------------- output


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


# ----------------------------------------------------------------------------- the remote tier


def add_remote_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """``--remote URL`` and how to reach it (push, pull, ls --remote)."""
    p.add_argument("--remote", metavar="URL", default=(os.environ.get("CKPTD_REMOTE") or None) if required else None,
                   help="the object-store tier, s3://BUCKET/PREFIX (gs://, az://)"
                   + ("; default $CKPTD_REMOTE" if required else "; lists that tier instead of DIR"))
    p.add_argument("--endpoint", metavar="URL", default=None,
                   help="an S3-compatible server, e.g. http://127.0.0.1:9000 (default $AWS_ENDPOINT_URL); "
                   "credentials from the usual AWS_* variables or the instance role")
    p.add_argument("--region", default=None, help="the bucket's region (default $AWS_REGION)")
    p.add_argument("--virtual-hosted", action="store_true",
                   help="with --endpoint: bucket.host addressing (default: path-style, what most servers expect)")


def remote_from(args: argparse.Namespace) -> Any:
    """The RemoteTier that ``--remote`` names (UsageError when none is given)."""
    from ..remote import RemoteSpec, RemoteTier

    if not args.remote:
        raise UsageError("name the object-store tier: --remote s3://BUCKET/PREFIX (or set $CKPTD_REMOTE)")
    spec = RemoteSpec.parse(args.remote, args.endpoint, args.region,
                            path_style=False if args.virtual_hosted else None)
    return RemoteTier(spec)
