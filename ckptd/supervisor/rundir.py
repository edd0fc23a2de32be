"""The run directory ``<root>/.ckptd/``: owner-only, one job at a time, one supervisor per node, the socket.

A checkpoint directory serves one *job*. A single-node run (no job id) is a job of one node. A
multi-node job runs one ``ckptd run`` per node, all with the same job id (``--job-id``, else
``$SLURM_JOB_ID``, else torchrun's ``--rdzv-id``) and each with its own node rank (``--node-rank``,
else torchrun's ``--node-rank``, else ``$SLURM_NODEID``, else 0). Each node has its own run directory:
``<root>/.ckptd/`` for node 0 (the same place as a single-node run) and ``<root>/.ckptd/node-K/`` for
node K, each with its lock, socket, journal and state file. ``<root>/.ckptd/job.json`` records the job
that last started there; a supervisor starting while another job's supervisors hold their locks is
refused. Starters serialise on ``<root>/.ckptd/job.lock`` (held for milliseconds) so that check and
lock are one step.

Unix socket paths are limited to 107 bytes; when ``<run dir>/control.sock`` is longer, the socket
goes in a 0700 directory under ``$XDG_RUNTIME_DIR`` (or ``/tmp``) and its real path is recorded in
``<run dir>/control.path`` for clients.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .. import exitcodes, protocol, store
from ..errors import CkptdError, ConfigError, LockedError, NotRunningError
from .journal import LOCK_NAME, SOCKET_PATH_NAME, read_json, write_json_atomic, write_text_atomic

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL
NODE_PREFIX = "node-"  # <root>/.ckptd/node-K/: the run directory of node K > 0
JOB_RECORD = "job.json"
JOB_GATE = "job.lock"
LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


class NodeChoiceError(CkptdError):
    """Several nodes' supervisors run here and the command did not say which one (exit 2)."""

    exit_code = exitcodes.USAGE


@dataclass(frozen=True)
class Node:
    """Which job this supervisor belongs to, and which node of it it supervises."""

    job_id: str | None  # None: a single-node run
    rank: int = 0

    def describe(self) -> str:
        return f"node {self.rank} of job {self.job_id!r}" if self.job_id is not None else "a single-node run"


def launcher_options(argv: list[str]) -> dict[str, str]:
    """torchrun's ``--node-rank``, ``--nnodes`` and ``--rdzv-id`` (either spelling) from the child's argv.

    Only words after the launcher and before the training script (the first ``*.py``) are read.
    """
    start = next((i for i, w in enumerate(argv) if os.path.basename(w) in LAUNCHERS), None)
    out: dict[str, str] = {}
    if start is None:
        return out
    words = argv[start + 1:]
    for i, word in enumerate(words):
        if word.endswith(".py"):
            break
        if not word.startswith("--"):
            continue
        name, eq, value = word[2:].partition("=")
        name = name.replace("-", "_")
        if name in ("node_rank", "nnodes", "rdzv_id") and name not in out:
            if eq or i + 1 < len(words):
                out[name] = value if eq else words[i + 1]
    return out


def node_identity(job_id: str | None, node_rank: int | None, argv: list[str],
                  environ: Mapping[str, str] = os.environ) -> Node:
    """This supervisor's job and node (the module docstring gives the order of the defaults)."""
    opts = launcher_options(argv)
    job = job_id or environ.get("SLURM_JOB_ID") or opts.get("rdzv_id") or None
    if node_rank is None:
        raw, where = next(((v, w) for v, w in ((opts.get("node_rank"), "torchrun --node-rank"),
                                                (environ.get("SLURM_NODEID"), "$SLURM_NODEID")) if v), ("0", ""))
        try:
            node_rank = int(raw)
            if node_rank < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"node rank {raw!r} (from {where}) is not a whole number >= 0; "
                              "give this node's rank with --node-rank N") from None
    nnodes = opts.get("nnodes", "1").rpartition(":")[2]
    if job is None and (node_rank > 0 or (nnodes.isdigit() and int(nnodes) > 1)):
        what = f"node rank {node_rank}" if node_rank > 0 else f"torchrun --nnodes {opts['nnodes']}"
        raise ConfigError(f"{what} means a multi-node job, which needs a job id so that its nodes can share "
                          "the checkpoint directory and another job cannot: give every node's `ckptd run` "
                          "the same --job-id (under SLURM, $SLURM_JOB_ID is used; torchrun's --rdzv-id also works)")
    return Node(job, node_rank)


def node_run_dir(root: str, node_rank: int = 0) -> str:
    """Node 0's run directory is ``<root>/.ckptd/`` (as for a single-node run); node K's is ``.ckptd/node-K/``."""
    base = protocol.run_dir(root)
    return base if node_rank == 0 else os.path.join(base, f"{NODE_PREFIX}{node_rank}")


def ensure_run_dir(root: str, node_rank: int = 0) -> str:
    """Create ``root`` and the node's 0700 run directory; refuse one owned by someone else."""
    base = protocol.run_dir(root)
    path = node_run_dir(root, node_rank)
    try:
        os.makedirs(root, exist_ok=True)
        os.makedirs(base, mode=0o700, exist_ok=True)
        _check_private_dir(base)
        if path != base:
            os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the checkpoint directory {root}: {exc.strerror}; "
                          "check --dir and its permissions") from None
    if path != base:  # node 0's is the base, checked above
        _check_private_dir(path)
    return path


def _check_private_dir(path: str, fix: str = "remove it or pick another --dir") -> None:
    """``path`` is a real directory (not a link) owned by us; made 0700 through the descriptor that was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        kind = "a symlink" if os.path.islink(path) else exc.strerror
        raise ConfigError(f"{path} is not a directory ({kind}); {fix}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{path} belongs to uid {st.st_uid}{_user(st.st_uid)}, not to uid {os.geteuid()}"
                              f"{_user(os.geteuid())} who runs ckptd (another account may have created it to "
                              f"intercept or block this run); {fix}")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _user(uid: int) -> str:
    import pwd

    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""


def _open_lock(path: str, flags: int, check: store.DirCheck | None = None) -> int:
    """The lock file as a regular file, never through a link and never blocking (a FIFO planted there would
    hang an open without O_NONBLOCK); ConfigError naming it otherwise. ``check``: what its directory must be
    (the supervisor's own locks: store.private_dir, on the descriptor the file is opened relative to)."""
    try:
        fd = store.open_at(path, flags | os.O_NONBLOCK, 0o600, check=check)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symlink, not a lock file; remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is not a regular file (a FIFO or device?), so no supervisor holds it; remove it")
    os.set_blocking(fd, True)
    return fd


class RunLock:
    """An exclusive ``fcntl`` lock on ``<run dir>/lock``, holding "PID HOST". Freed by the kernel on death."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None

    def try_acquire(self) -> tuple[int | None, str] | None:
        """Take the lock (None), or return the owner (pid, host) that holds it."""
        fd = _open_lock(self.path, os.O_RDWR | os.O_CREAT, store.private_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                return _read_owner(fd)
            finally:
                os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class JobLock:
    """This node's :class:`RunLock`, taken only when no other job's supervisor runs in ``root``."""

    def __init__(self, root: str, node: Node) -> None:
        self.root, self.node = root, node
        self.lock: RunLock | None = None

    def acquire(self) -> None:
        base = protocol.run_dir(self.root)
        run_dir = ensure_run_dir(self.root, self.node.rank)
        gate = _open_lock(os.path.join(base, JOB_GATE), os.O_RDWR | os.O_CREAT, store.private_dir)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)  # other starters hold it for milliseconds
            record = read_json(os.path.join(base, JOB_RECORD)) or {}
            running = live_nodes(self.root)
            theirs = record.get("job_id") if isinstance(record.get("job_id"), str) else None
            if running and theirs != self.node.job_id:
                raise LockedError(self._other_job(theirs, running))
            lock = RunLock(run_dir)
            owner = lock.try_acquire()
            if owner is not None:
                raise LockedError(self._same_node(owner))
            self.lock = lock
            write_json_atomic(os.path.join(base, JOB_RECORD), {"job_id": self.node.job_id, "since": time.time()})
        finally:
            os.close(gate)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _same_node(self, owner: tuple[int | None, str]) -> str:
        pid, host = owner
        root = self.root
        if self.node.job_id is None:
            return (f"another `ckptd run` (pid {pid or '?'}{_on(host)}) already supervises {root}; "
                    f"stop it with `ckptd stop --dir {root}` or use another --dir")
        return (f"{self.node.describe()} in {root} is already supervised by `ckptd run` pid {pid or '?'}{_on(host)}; "
                "run one `ckptd run` per node, each with its own --node-rank (0 to N-1), or stop that one with "
                f"`ckptd stop --dir {root} --node-rank {self.node.rank}`")

    def _other_job(self, theirs: str | None, others: dict[int, tuple[int | None, str]]) -> str:
        running = ", ".join(f"node {r} (pid {pid or '?'}{_on(host)})" for r, (pid, host) in sorted(others.items()))
        owner = f"job {theirs!r}" if theirs is not None else "a single-node `ckptd run`"
        same = (f"; if this is another node of that job, give it --job-id {theirs}" if theirs is not None
                else "; if this is a node of the same job, restart that run with --job-id like this one")
        return (f"{self.root} is in use by {owner}: {running}; one checkpoint directory serves one job "
                f"(this is {self.node.describe()}): use another --dir, or stop that job first "
                f"(`ckptd stop --dir {self.root}`){same}")


def _on(host: str) -> str:
    return f" on {host}" if host and host != socket.gethostname() else ""


def _read_owner(fd: int) -> tuple[int | None, str]:
    try:
        words = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        return None, ""
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, words[1] if len(words) > 1 else ""


def _lock_owner(path: str) -> tuple[int | None, str] | None:
    """(pid, host) of whoever holds the lock at ``path``, or None when nobody does."""
    try:
        fd = _open_lock(path, os.O_RDONLY)
    except (OSError, ConfigError):
        return None  # missing, a link, a FIFO...: not a lock anyone holds
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_owner(fd)
    finally:
        os.close(fd)
    return None


def live_nodes(root: str) -> dict[int, tuple[int | None, str]]:
    """Node rank -> (pid, host) of every supervisor running in ``root``."""
    base = protocol.run_dir(root)
    ranks = [0]
    try:
        ranks += sorted(int(n[len(NODE_PREFIX):]) for n in os.listdir(base)
                        if n.startswith(NODE_PREFIX) and n[len(NODE_PREFIX):].isdigit())
    except OSError:
        return {}
    out = {}
    for rank in ranks:
        owner = _lock_owner(os.path.join(node_run_dir(root, rank), LOCK_NAME))
        if owner is not None:
            out[rank] = owner
    return out


def supervisor_pid(root: str, node_rank: int = 0) -> int | None:
    """Pid of the supervisor of ``root``'s node ``node_rank`` (-1: running, pid unknown), or None."""
    owner = _lock_owner(os.path.join(node_run_dir(root, node_rank), LOCK_NAME))
    return None if owner is None else owner[0] or -1


def pick_node(root: str, node_rank: int | None = None) -> int:
    """The node a client command talks to: the one asked for, else the one running (on this host), else 0."""
    if node_rank is not None:
        return node_rank
    live = live_nodes(root)
    if len(live) <= 1:
        return next(iter(live), 0)
    here = [r for r, (_, host) in live.items() if host == socket.gethostname()]
    if len(here) == 1:
        return here[0]
    ranks = ", ".join(str(r) for r in (here or sorted(live)))
    raise NodeChoiceError(f"several nodes of the job in {os.path.abspath(root)} are supervised "
                          f"{'on this host' if here else 'elsewhere'} (node ranks {ranks}); say which with "
                          "--node-rank N (a stop or save asked of one node reaches the whole job)")


def choose_socket_path(run_dir: str) -> str:
    """Where this run's socket goes; records a fallback location in the run directory."""
    record = os.path.join(run_dir, SOCKET_PATH_NAME)
    default = protocol.default_socket_path(run_dir)
    if len(os.fsencode(default)) <= SUN_PATH_MAX:
        store.unlink_at(record, check=store.private_dir)
        return default
    digest = hashlib.sha256(os.fsencode(os.path.realpath(run_dir))).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.access(base, os.W_OK):
        base = tempfile.gettempdir()
    private = os.path.join(base, f"ckptd-{os.getuid()}-{digest}")
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        pass
    # The name is predictable: in a shared /tmp another account can take it first. Refused (never used),
    # and the message says how to get past it.
    _check_private_dir(private, f"remove it (`rm -r {private}`), or set XDG_RUNTIME_DIR to a directory only "
                                f"uid {os.geteuid()} can write (e.g. /run/user/{os.geteuid()}), or use a shorter "
                                f"--dir so that the socket fits in {run_dir}")
    path = os.path.join(private, protocol.SOCKET_NAME)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"no usable control socket path: {path} is over {SUN_PATH_MAX} bytes; "
                          "set XDG_RUNTIME_DIR to a short directory")
    write_text_atomic(record, path + "\n")
    return path


def find_socket_path(root: str, node_rank: int | None = None) -> str:
    """The control socket of ``root``'s supervisor (of one node: see :func:`pick_node`); NotRunningError if none."""
    rank = pick_node(root, node_rank)
    run_dir = node_run_dir(root, rank)
    if supervisor_pid(root, rank) is None:
        which = f" node {rank} of" if node_rank is not None or rank else ""
        raise NotRunningError(f"no `ckptd run` is supervising{which} {os.path.abspath(root)} "
                              "(wrong --dir" + (" or --node-rank" if which else "") +
                              "? start one with `ckptd run --dir DIR script.py`)")
    try:
        return store.read_small(os.path.join(run_dir, SOCKET_PATH_NAME), 4096).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return protocol.default_socket_path(run_dir)
    except (OSError, CkptdError) as exc:
        raise NotRunningError(f"cannot read {os.path.join(run_dir, SOCKET_PATH_NAME)} "
                              f"({getattr(exc, 'strerror', None) or exc}); remove it and restart `ckptd run`") from None
