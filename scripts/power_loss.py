#!/usr/bin/env python3
"""Power loss at every point of the commit protocol: only what was fsynced may survive.

    python scripts/power_loss.py --count 20 --json power.json

A recorder wraps this process's ``os`` mutations and syncs (open with O_CREAT, write, fsync, mkdir,
rename and replace, also relative to directory descriptors, unlink, rmdir) and ckptd's
``store.rename_exchange`` (renameat2 RENAME_EXCHANGE through ctypes, which no ``os`` function sees) for
everything under one base directory. It keeps two views of the tree:

* the **synced** view, which is all a power loss is guaranteed to leave: a file's bytes as of its last
  ``fsync``, a directory's entries as of its last ``fsync`` (a new file or directory never synced is
  empty; an entry never made durable by an fsync of its directory is gone), and everything that
  existed before recording began;
* the **current** view, what the running process sees. A file or directory that is no longer in the
  tree (unlinked, or renamed over) keeps, as its current contents, what it held when it left: unlinking
  or replacing a name never changes the bytes of the inode behind it, so a crash state in which the old
  name survives (its directory's entry not yet durable) finds that inode as it was, never emptied.

Files and directories are told apart by incarnation, not by inode number alone: a file system reuses
the number of a freed inode for the next one it creates, and a name that a synced listing still holds
must keep meaning the freed inode (a journaled file system never frees an inode before the removal of
its last name is durable), never the new file that happens to get its number.

After every recorded call ("a point") it stores both. Then, for every point, it rebuilds crash states
in fresh directories - the synced view exactly (LevelDB's fault-injection env: drop unsynced data), and
mixtures where each directory and file independently is synced, current, torn (a prefix of its current
bytes) or, for files, zero-filled to its current size (ext4 data=writeback) - and checks what the next
start must find:

* every checkpoint visible under its final name verifies (except ones the scenario planted as damaged);
* the newest valid step is at least the newest step whose ``save()`` had returned (a commit is durable);
* a pin that ``pin()`` returned is still there;
* the next start removes every temp and trash entry; the synced view restores the right values.

The scenario (``scenario``): saves into a root that does not exist yet, retention deletes (keep_last=2),
``pin``, ``retention.apply`` as `ckptd prune` runs it, a damaged checkpoint quarantined by ``restore()``,
and ``close()`` after work that followed the last save: it saves that step again, swaps the new checkpoint
in for the old one (``store.rename_exchange``) and marks it finished (``store.amend_manifest``).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from _report import count_seed_main  # scripts/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))

Ino = tuple  # (st_ino, incarnation): one inode from its creation to its removal
Tree = dict  # {"dirs": {Ino: {name: (Ino, is_dir)}}, "files": {Ino: bytes}, "base": Ino}


class Recorder:
    """Wraps ``os`` functions while active; see the module docstring."""

    WRAPPED = ("open", "write", "fsync", "mkdir", "rename", "replace", "unlink", "rmdir")
    EXCHANGE = "exchange"  # ckptd.store.rename_exchange: a point between the swap and the fsync of the root

    def __init__(self, base: str) -> None:
        self.base = os.path.realpath(base)
        self.lock = threading.RLock()
        self.points: list[tuple[str, Tree, Tree, dict[str, Any]]] = []
        self.marks: dict[str, Any] = {}
        self.orig: dict[str, Callable] = {}
        self.busy = threading.local()
        self.incarnation: dict[int, int] = {}  # st_ino -> its current incarnation
        self.alive: set[int] = set()  # st_ino of everything in the tree at the last scan (or created since)
        self.last_dirs: dict[Ino, dict[str, tuple[Ino, bool]]] = {}  # every incarnation's latest listing
        self.last_files: dict[Ino, bytes] = {}  # every incarnation's latest bytes
        cur = self._scan()
        self.synced_dirs = dict(cur["dirs"])
        self.synced_files = dict(cur["files"])
        self.base_ino = cur["base"]

    # --------------------------------------------------------------- views
    def _id(self, st_ino: int) -> Ino:
        """The incarnation of inode number ``st_ino`` in the tree now: a number not in the tree at the last
        scan is a new inode (created by a call not recorded, e.g. builtins.open, or reusing a freed number)."""
        if st_ino not in self.alive:
            self._new(st_ino)
        return (st_ino, self.incarnation[st_ino])

    def _new(self, st_ino: int) -> None:
        """A file or directory was just created with number ``st_ino``: a new incarnation, nothing synced."""
        self.incarnation[st_ino] = self.incarnation.get(st_ino, 0) + 1
        self.alive.add(st_ino)

    def _scan(self) -> Tree:
        """The current view; it also lists, as they last were, files and directories no longer in the tree."""
        dirs: dict[Ino, dict[str, tuple[Ino, bool]]] = {}
        files: dict[Ino, bytes] = {}
        seen: set[int] = set()

        def walk(path: str, ino: Ino) -> None:
            listing = {}
            for e in os.scandir(path):
                st = e.stat(follow_symlinks=False)
                isdir = e.is_dir(follow_symlinks=False)
                child = self._id(st.st_ino)
                seen.add(st.st_ino)
                listing[e.name] = (child, isdir)
                if isdir:
                    walk(e.path, child)
                else:
                    with open(e.path, "rb") as f:
                        files[child] = f.read()
            dirs[ino] = listing

        base_st = os.lstat(self.base).st_ino
        base_ino = self._id(base_st)
        seen.add(base_st)
        walk(self.base, base_ino)
        self.alive = seen
        self.last_dirs.update(dirs)
        self.last_files.update(files)
        return {"dirs": dict(self.last_dirs), "files": dict(self.last_files), "base": base_ino}

    def _inside(self, path: str) -> bool:
        return path == self.base or path.startswith(self.base + os.sep)

    def _path(self, path: Any, dir_fd: int | None = None) -> str | None:
        if isinstance(path, int):
            try:
                return os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return None
        path = os.fsdecode(path)
        if dir_fd is not None:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.abspath(path)

    # --------------------------------------------------------------- recording
    def _point(self, label: str) -> None:
        self.points.append((label, self._scan(), {"dirs": dict(self.synced_dirs), "files": dict(self.synced_files),
                                                  "base": self.base_ino}, dict(self.marks)))

    def mark(self, key: str, value: Any) -> None:
        """Record a promise made (a save returned, a pin was set); checked at every later point."""
        with self.lock:
            self.marks[key] = value
            self._point(f"mark {key}={value}")

    def _call(self, name: str, *args: Any, **kw: Any) -> Any:
        fn = self.orig[name]
        if getattr(self.busy, "on", False):
            return fn(*args, **kw)
        with self.lock:
            self.busy.on = True
            try:
                return self._record(name, fn, *args, **kw)
            finally:
                self.busy.on = False

    def _record(self, name: str, fn: Callable, *args: Any, **kw: Any) -> Any:
        if name == "open":
            path = self._path(args[0], kw.get("dir_fd"))
            flags = args[1] if len(args) > 1 else kw.get("flags", 0)
            if path is None or not self._inside(path) or not flags & os.O_CREAT:
                return fn(*args, **kw)
            existed = os.path.lexists(path)
            fd = fn(*args, **kw)
            if not existed:
                self._new(os.fstat(fd).st_ino)
            self._point(f"create {os.path.relpath(path, self.base)}")
            return fd
        if name in ("write", "fsync"):
            path = self._path(args[0])
            if path is None or not self._inside(path):
                return fn(*args, **kw)
            result = fn(*args, **kw)
            if name == "fsync":
                st = os.fstat(args[0])
                if os.path.isdir(path):
                    self.synced_dirs[self._id(st.st_ino)] = self._scan_dir(path)
                else:
                    with open(path, "rb") as f:
                        self.synced_files[self._id(st.st_ino)] = f.read()
            self._point(f"{name} {os.path.relpath(path, self.base)}")
            return result
        src = self._path(args[0], kw.get("src_dir_fd", kw.get("dir_fd")))
        if src is None or not self._inside(src):
            return fn(*args, **kw)
        result = fn(*args, **kw)
        if name == "mkdir":
            self._new(os.lstat(src).st_ino)
        self._point(f"{name} {os.path.relpath(src, self.base)}")
        return result

    def _scan_dir(self, path: str) -> dict[str, tuple[Ino, bool]]:
        return {e.name: (self._id(e.stat(follow_symlinks=False).st_ino), e.is_dir(follow_symlinks=False))
                for e in os.scandir(path)}

    def __enter__(self) -> Recorder:
        from ckptd import store

        for name in self.WRAPPED:
            self.orig[name] = getattr(os, name)
            setattr(os, name, (lambda n: lambda *a, **k: self._call(n, *a, **k))(name))
        self.orig[self.EXCHANGE] = store.rename_exchange
        store.rename_exchange = lambda *a, **k: self._call(self.EXCHANGE, *a, **k)
        self._point("start")
        return self

    def __exit__(self, *exc: object) -> None:
        from ckptd import store

        for name, fn in self.orig.items():
            if name == self.EXCHANGE:
                store.rename_exchange = fn
            else:
                setattr(os, name, fn)


# ------------------------------------------------------------------- crash states


def materialize(dest: str, synced: Tree, current: Tree, rng: random.Random | None) -> dict[str, int]:
    """Build a crash state in ``dest``: synced only when ``rng`` is None, else a random mixture."""
    used = {"synced": 0, "current": 0, "torn": 0, "zeros": 0}

    def pick_dir(ino: Ino) -> dict[str, tuple[Ino, bool]]:
        choice = "synced" if rng is None else rng.choice(["synced", "current"])
        used[choice] += 1
        if choice == "current" and ino in current["dirs"]:
            return current["dirs"][ino]
        return synced["dirs"].get(ino, {})

    def pick_file(ino: Ino) -> bytes:
        old, new = synced["files"].get(ino, b""), current["files"].get(ino, b"")
        if rng is None or old == new:
            return old
        choice = rng.choice(["synced", "current", "torn", "zeros"])
        used[choice] += 1
        if choice == "current":
            return new
        if choice == "torn":
            return new[: rng.randrange(len(new) + 1)]
        if choice == "zeros":
            return bytes(len(new))
        return old

    seen: set[Ino] = set()

    def build(path: str, ino: Ino) -> None:
        seen.add(ino)
        for name, (child, isdir) in pick_dir(ino).items():
            if child in seen:
                continue  # a directory reached twice through a mixture: keep the first
            target = os.path.join(path, name)
            if isdir:
                os.mkdir(target)
                build(target, child)
            else:
                with open(target, "wb") as f:
                    f.write(pick_file(child))

    os.mkdir(dest)
    build(dest, synced["base"])
    return used


def check_state(base: str, marks: dict[str, Any], full_restore: bool) -> list[str]:
    """What the next start must find in a crash state rooted at ``base``."""
    from ckptd import retention, store

    root = os.path.join(base, "ck")
    problems = []
    committed = marks.get("committed", 0)
    if not os.path.isdir(root):
        return [f"the checkpoint root is gone (step {committed} was committed)"] if committed else []
    for info in store.list_checkpoints(root):
        if info.name in marks.get("damaged", ()):
            continue
        full = store.verify(info.path)
        if not full.valid:
            problems.append(f"visible checkpoint {info.name} does not verify: {full.reason}")
    newest = store.latest_valid(root)
    if committed and (newest is None or newest.step < committed):
        problems.append(f"step {committed} was committed, newest valid is {newest and newest.step}")
    pin = marks.get("pinned")
    if pin and pin not in store.pinned(root):
        problems.append(f"pin of {pin} lost")
    store.remove_stale_temps(root)
    retention.remove_stale_trash(root)
    left = [n for n in os.listdir(root) if n.startswith((store.TMP_PREFIX, store.TRASH_PREFIX))]
    if left:
        problems.append(f"left after the next start: {left}")
    if full_restore and newest is not None:
        import chaos_kills

        model = chaos_kills_model()
        import ckptd

        ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
        step = ck.restore()
        ck.close()
        want = chaos_kills_model()
        chaos_kills.fill(want, step)
        if step < committed or chaos_kills.digest(model) != chaos_kills.digest(want):
            problems.append(f"restore gave step {step} with {'right' if step >= committed else 'wrong'} values")
    return problems


def chaos_kills_model():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))


# ------------------------------------------------------------------- scenario


def scenario(base: str, rec: Recorder) -> None:
    import torch

    import chaos_kills
    import ckptd
    from ckptd import retention, store

    root = os.path.join(base, "ck")  # does not exist yet: the first save creates it
    model = chaos_kills_model()
    ck = ckptd.Checkpointer(model=model, dir=root, keep_last=2, async_save=False, pace=0,
                            handle_signals=False, save_on_close=True)
    for step in (1, 2, 3, 4):
        chaos_kills.fill(model, step)
        ck.step(step)
        res = ck.save(kind="periodic").wait()
        assert res.error is None, res.error
        rec.mark("committed", step)
    ck.wait()
    ck._writer().submit(lambda: None).result()  # retention of the last save has run
    store.pin(root, store.checkpoint_name(3))
    rec.mark("pinned", store.checkpoint_name(3))
    retention.apply(root, retention.Policy(keep_last=1))  # `ckptd prune --keep-last 1`: the pin keeps step 3
    rec.mark("pinned", None)
    store.unpin(root, store.checkpoint_name(3))
    retention.apply(root, retention.Policy(keep_last=1))  # now step 3 goes
    # A damaged checkpoint newer than all (a bad disk, say), durable on its own; restore quarantines it.
    bad = os.path.join(root, store.checkpoint_name(9))
    rec.mark("damaged", [store.checkpoint_name(9)])
    shutil.copytree(os.path.join(root, store.checkpoint_name(4)), bad)
    with open(os.path.join(bad, store.TENSORS), "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff")
        f.flush()
    for p in (os.path.join(bad, store.TENSORS), bad, root):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    ck2 = ckptd.Checkpointer(model=chaos_kills_model(), dir=root, handle_signals=False, save_on_close=False)
    assert ck2.restore() == 4
    ck2.close()
    # Work after the last save (the end of an epoch) moved the RNG: close() saves step 4 again, swaps it
    # in for the old one (store.rename_exchange), removes the old one and marks the new one finished.
    torch.rand(1)
    ck.close()
    assert any(label.startswith(Recorder.EXCHANGE) for label, *_ in rec.points), "close() did not replace step 4"


def run(count: int, seed: int = 15, work: str | None = None) -> dict:
    """Record the scenario once; check the synced state and ``count`` mixtures at every point."""
    import torch

    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ckptd-power-")
    t0 = time.monotonic()
    base = os.path.join(work, "base")
    os.mkdir(base)
    try:
        with Recorder(base) as rec:
            scenario(base, rec)
        rng = random.Random(seed)
        failures: list[str] = []
        states = 0
        kinds: dict[str, int] = {}
        for i, (label, current, synced, marks) in enumerate(rec.points):
            for j in range(count + 1):
                dest = os.path.join(work, f"crash-{i}-{j}")
                used = materialize(dest, synced, current, None if j == 0 else rng)
                for k, v in used.items():
                    kinds[k] = kinds.get(k, 0) + v
                for p in check_state(dest, marks, full_restore=(j == 0)):
                    failures.append(f"point {i} ({label}), {'synced state' if j == 0 else f'mixture {j}'}: {p}")
                shutil.rmtree(dest)
                states += 1
        syscalls: dict[str, int] = {}
        for label, *_ in rec.points[1:]:
            op = label.split()[0]
            syscalls[op] = syscalls.get(op, 0) + 1
        return {"points": len(rec.points), "recorded_calls": syscalls, "crash_states": states,
                "mixture_choices": kinds, "failed": len(failures), "failures": failures[:40],
                "seconds": round(time.monotonic() - t0, 1)}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    return count_seed_main(__doc__, run, 20, "random mixtures per point besides the synced state")


if __name__ == "__main__":
    sys.exit(main())
