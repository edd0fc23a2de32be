#!/usr/bin/env python
"""ckptd checkpoint benchmark: raw limits, torch/safetensors/DCP baselines, ckptd, targets P1-P6.

    python benchmarks/bench_checkpoint.py --sizes 256M,1G --runs 5 --out bench-results/results.json

Prints a table and writes JSON. Every figure is the median of --runs runs (min and max
kept), every baseline is measured in the same invocation, on the same disk, against the
same model-like state (nn.Module with mixed-size parameters + Adam exp_avg/exp_avg_sq).
Methods are interleaved run by run (one round = one run of every method) so that drift of
the shared machine hits all of them alike. Reads (raw read and every load/restore) are
cold: page cache dropped before each (``sync; echo 3 > /proc/sys/vm/drop_caches``); if
that is not permitted the whole run falls back to warm reads and says so. P3 (restore) is judged on
the ``restart`` part (bench_restart.py): a fresh process per restore, as a restarted run restores;
the restores inside the long-lived worker are information.

Memory-heavy parts run in subprocesses (``--worker ...``) so that peak RSS is isolated.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
READ_PAIRS = 3  # (restore, raw read of its file) pairs per round: P3's samples
sys.path.insert(0, HERE)

import _bench_util as U  # noqa: E402

warnings.filterwarnings("ignore")

MiB, GiB = U.MiB, U.GiB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =========================================================================== ckptd adapter


def ckptd_available() -> tuple[bool, str]:
    try:
        import ckptd  # noqa: F401
        from ckptd.checkpointer import Checkpointer  # noqa: F401

        return True, ""
    except Exception as e:  # library still being written
        return False, f"{type(e).__name__}: {e}"


def make_checkpointer(model: Any, opt: Any, directory: str, **extra: Any) -> Any:
    from ckptd.checkpointer import Checkpointer

    kwargs: dict[str, Any] = dict(
        model=model,
        optimizer=opt,
        scheduler=None,
        dir=directory,
        every_steps=None,
        every_seconds=None,
        async_save=True,
        keep_last=2,
    )
    kwargs.update(extra)
    params = inspect.signature(Checkpointer.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return Checkpointer(**kwargs)


def writer_idle(ck: Any) -> None:
    """Wait until the writer's queue is drained: retention runs as its next job after a commit."""
    ex = getattr(ck, "_executor", None)
    if ex is not None:
        ex.submit(lambda: None).result()


def count_fds_idle(ck: Any) -> int:
    """Open fds once the writer is idle (a count taken right after wait() can catch retention's fd)."""
    writer_idle(ck)
    return len(os.listdir("/proc/self/fd"))


def ckptd_writer_options() -> list[str]:
    """Values of Checkpointer(writer=...) if the library offers that option."""
    try:
        from ckptd.checkpointer import Checkpointer
    except Exception:
        return []
    params = inspect.signature(Checkpointer.__init__).parameters
    if "writer" not in params:
        return []
    import ckptd.checkpointer as C

    opts = getattr(C, "WRITERS", None) or ("thread", "process")
    return list(opts)


# =========================================================================== worker: baselines + ckptd


def worker_baselines(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    size = args.size
    work = args.dir
    os.makedirs(work, exist_ok=True)
    log(f"[{U.fmt_size(size)}] building model-like state")
    model, opt = U.build_state(size)
    nbytes = U.state_bytes(model, opt)
    live = U.live_state_dict(model, opt)
    flat = U.flatten_tensors(live)
    tensors = list(flat.values())
    mvs = [U.buffer_of(t) for t in tensors]
    # safetensors wants a flat str->tensor dict of distinct storages
    st_flat = {k: v for k, v in flat.items()}

    cold = not args.warm_reads
    drop_ok = True

    def before_read() -> None:
        nonlocal drop_ok
        if cold and drop_ok:
            if not U.drop_caches():
                drop_ok = False
                log("WARNING: cannot drop the page cache; reads are warm")

    def before_write(path: str) -> None:
        U.remove(path)
        os.sync()

    res: dict[str, list[float]] = {}

    def rec(name: str, value: float) -> None:
        res.setdefault(name, []).append(value)

    # ---- methods -------------------------------------------------------------------------
    raw_path = os.path.join(work, "raw.bin")

    def raw_write() -> float:
        before_write(raw_path)
        t0 = time.perf_counter()
        fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for mv in mvs:
            U.write_all(fd, mv)
        os.fsync(fd)
        os.close(fd)
        U.fsync_path(work)
        return time.perf_counter() - t0

    def raw_read() -> float:
        before_read()
        t0 = time.perf_counter()
        with open(raw_path, "rb", buffering=0) as f:
            for mv in mvs:
                U.readinto_all(f, mv)
        return time.perf_counter() - t0

    def raw_read_warm() -> float:
        with open(raw_path, "rb", buffering=0) as f:  # prime
            for mv in mvs:
                U.readinto_all(f, mv)
        t0 = time.perf_counter()
        with open(raw_path, "rb", buffering=0) as f:
            for mv in mvs:
                U.readinto_all(f, mv)
        return time.perf_counter() - t0

    # warm copy into pre-allocated (already touched) buffers; a split run's baselines part leaves the
    # copies to the ckptd part (it measures them beside ckptd's save) and so holds one state copy less
    copies = args.part != "baselines"
    first: dict[str, Any] = {}
    bufs: list[Any] = []
    if copies:
        t0 = time.perf_counter()
        bufs = [torch.empty_like(t) for t in tensors]
        for b, t in zip(bufs, tensors, strict=True):
            b.copy_(t)
        first["copy_prealloc_first_touch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        clones = [t.clone() for t in tensors]
        first["clone_fresh"] = time.perf_counter() - t0
        del clones

    def warm_copy() -> float:
        t0 = time.perf_counter()
        for b, t in zip(bufs, tensors, strict=True):
            b.copy_(t)
        return time.perf_counter() - t0

    def copy_beside() -> float:
        os.sync()  # as ck_save() does before its timer starts
        return warm_copy()

    ts_path = os.path.join(work, "torch.pt")

    def torch_save() -> float:
        before_write(ts_path)
        t0 = time.perf_counter()
        with open(ts_path, "wb") as f:
            torch.save(live, f)
            f.flush()
            os.fsync(f.fileno())
        U.fsync_path(work)
        return time.perf_counter() - t0

    def torch_load() -> float:
        before_read()
        t0 = time.perf_counter()
        sd = torch.load(ts_path, weights_only=True)
        U.copy_into_live(sd, model, opt)
        dt = time.perf_counter() - t0
        del sd
        return dt

    def torch_load_mmap() -> float:
        before_read()
        t0 = time.perf_counter()
        sd = torch.load(ts_path, weights_only=True, mmap=True)
        U.copy_into_live(sd, model, opt)
        dt = time.perf_counter() - t0
        del sd
        return dt

    st_path = os.path.join(work, "model.safetensors")

    def st_save() -> float:
        before_write(st_path)
        t0 = time.perf_counter()
        save_file(st_flat, st_path)
        U.fsync_path(st_path)
        U.fsync_path(work)
        return time.perf_counter() - t0

    def st_load() -> float:
        before_read()
        t0 = time.perf_counter()
        sd = load_file(st_path)
        with torch.no_grad():
            for k, t in flat.items():
                t.copy_(sd[k])
        dt = time.perf_counter() - t0
        del sd
        return dt

    dcp_path = os.path.join(work, "dcp")
    dcp_a_path = os.path.join(work, "dcp_async")
    dcp_c_path = os.path.join(work, "dcp_async_cached")

    def dcp_save() -> float:
        before_write(dcp_path)
        t0 = time.perf_counter()
        dcp.save(live, storage_writer=FileSystemWriter(dcp_path, sync_files=True))
        U.fsync_path(dcp_path)
        U.fsync_path(work)
        return time.perf_counter() - t0

    def dcp_async(path: str, stager: Any = None) -> tuple[float, float]:
        before_write(path)
        t0 = time.perf_counter()
        kw: dict[str, Any] = {}
        if stager is not None:
            kw["async_stager"] = stager
        fut = dcp.async_save(live, storage_writer=FileSystemWriter(path, sync_files=True), **kw)
        t1 = time.perf_counter()
        up = getattr(fut, "upload_completion", fut)
        up.result()
        U.fsync_path(path)
        U.fsync_path(work)
        return t1 - t0, time.perf_counter() - t0

    # --part: "all" runs every method in each round; "baselines" / "ckptd" run one side, in two
    # processes, when the machine cannot hold both sides' buffers at once (see resources()).
    base_part = args.part in ("all", "baselines")
    stager = None
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if base_part:
            stager = DefaultStager(StagingOptions(False, False, False, False))
    except Exception as e:  # pragma: no cover
        log(f"DCP DefaultStager unavailable: {e}")

    def dcp_load() -> float:
        before_read()
        t0 = time.perf_counter()
        dcp.load(live, storage_reader=FileSystemReader(dcp_path))
        return time.perf_counter() - t0

    # ---- ckptd ---------------------------------------------------------------------------
    ok, why = ckptd_available()
    ck = None
    ck_dir = os.path.join(work, "ckptd")
    ck_first: dict[str, float] = {}
    step_no = [0]
    if ok and not args.no_ckptd and args.part in ("all", "ckptd"):
        try:
            ck = make_checkpointer(model, opt, ck_dir)
        except Exception as e:
            ok, why = False, f"Checkpointer() failed: {type(e).__name__}: {e}"
            ck = None

    def ck_save() -> tuple[float, float]:
        os.sync()
        step_no[0] += 1
        t0 = time.perf_counter()
        ck.save(step_no[0], kind="manual")
        t1 = time.perf_counter()
        ck.wait()
        return t1 - t0, time.perf_counter() - t0

    def ck_restore() -> float:
        before_read()
        t0 = time.perf_counter()
        ck.restore()
        return time.perf_counter() - t0

    def raw_read_ckpt() -> float:
        """Raw read of the very file restore() reads (same extents, same age in any lower cache)."""
        import ckptd

        path = os.path.join(ckptd.latest_valid(ck_dir).path, "tensors.safetensors")
        scratch = memoryview(bytearray(1 << 20))
        before_read()
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            head = int.from_bytes(f.read(8), "little")
            U.readinto_all(f, scratch[:head])
            for mv in mvs:
                U.readinto_all(f, mv)
        return time.perf_counter() - t0

    # ---- warm-up round (untimed; ckptd's first save = cold buffers, reported apart) -------
    load0 = U.loadavg()
    log(f"[{U.fmt_size(size)}] warm-up round ({nbytes / MiB:.0f} MiB, {len(tensors)} tensors)")
    fa = fc = None
    if base_part:
        raw_write()
        raw_read()
        torch_save()
        torch_load()
        st_save()
        st_load()
        dcp_save()
        dcp_load()
        fa = dcp_async(dcp_a_path)
        fc = dcp_async(dcp_c_path, stager) if stager is not None else None
    if ck is not None:
        try:
            s, c = ck_save()
            ck_first = {"stall": s, "commit": c}
            r = ck_restore()
            ck_first["restore"] = r
        except Exception as e:
            import traceback

            traceback.print_exc()
            ok, why, ck = False, f"ckptd save/restore failed: {type(e).__name__}: {e}", None
    if base_part:
        first.update(dcp_async_first_stall=fa[0] if fa else None, dcp_async_cached_first_stall=fc[0] if fc else None)
    if ck is not None:
        first["ckptd_first"] = ck_first

    for r in range(args.runs):
        log(f"[{U.fmt_size(size)}] round {r + 1}/{args.runs}" + ("" if args.part == "all" else f" ({args.part})"))
        if base_part:
            rec("raw_write_fsync", raw_write())
            rec("raw_read", raw_read())
            rec("raw_read_warm", raw_read_warm())
            if ck is None and copies:  # with ckptd in this process, the warm copy is measured beside its save
                rec("warm_copy", warm_copy())
            rec("torch_save_fsync", torch_save())
            rec("torch_load", torch_load())
            rec("torch_load_mmap", torch_load_mmap())
            rec("safetensors_save_fsync", st_save())
            rec("safetensors_load", st_load())
            rec("dcp_save", dcp_save())
            s, t = dcp_async(dcp_a_path)
            rec("dcp_async_stall", s)
            rec("dcp_async_total", t)
            if stager is not None:
                s, t = dcp_async(dcp_c_path, stager)
                rec("dcp_async_cached_stall", s)
                rec("dcp_async_cached_total", t)
            rec("dcp_load", dcp_load())
        if ck is not None:
            # The warm copy is measured beside the stall, under its conditions: os.sync() first, destination
            # written once per round like ckptd's buffer, order alternating. On this VM the first access to
            # memory left untouched for seconds is up to 1.5x slower, growing with the pause (see
            # docs/performance.md), so a destination written more recently would flatter the baseline.
            if r % 2 == 0:
                rec("warm_copy", copy_beside())
            s, c = ck_save()
            rec("ckptd_stall", s)
            rec("ckptd_commit", c)
            if r % 2 == 1:
                rec("warm_copy", copy_beside())
            writer_idle(ck)  # retention (deleting the oldest checkpoint) must not overlap a timed read
            # READ_PAIRS pairs per round, the order alternating so neither read profits from the other in
            # a lower (host) cache. Single cold reads of this shared disk range over 2-4x (slow phases
            # of the host), so P3 gets more samples than one pair per round.
            for i in range(READ_PAIRS):
                if (r * READ_PAIRS + i) % 2 == 0:
                    rec("raw_read_ckpt", raw_read_ckpt())
                    rec("ckptd_restore", ck_restore())
                else:
                    rec("ckptd_restore", ck_restore())
                    rec("raw_read_ckpt", raw_read_ckpt())
        gc.collect()

    if ck is not None:
        ck.close()
    if stager is not None:
        stager.close()
    for p in (raw_path, ts_path, st_path, dcp_path, dcp_a_path, dcp_c_path, ck_dir):
        U.remove(p)
    return {
        "loadavg": [load0, U.loadavg()],
        "size_target": size,
        "state_bytes": nbytes,
        "tensors": len(tensors),
        "reads": "cold (page cache dropped before each read)" if (cold and drop_ok) else "warm",
        "drop_caches_ok": drop_ok,
        "ckptd": ok and ck is not None,
        "ckptd_unavailable_reason": None if ok else why,
        "first": first,
        "figures": {k: U.summarize(v) for k, v in res.items()},
    }


# =========================================================================== worker: memory (P5)


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
    ok, why = ckptd_available()
    if not ok:
        return {"skipped": why}
    model, opt = U.build_state(args.size)
    nbytes = U.state_bytes(model, opt)
    gc.collect()
    out: dict[str, Any] = {"state_bytes": nbytes}
    if args.phase == "save":
        base = U.rss()
        U.reset_hwm()
        ck = make_checkpointer(model, opt, args.dir)
        samples = []
        n = args.saves
        fds0 = None
        for i in range(n):
            ck.save(i + 1, kind="manual")
            ck.wait()
            samples.append(U.rss())
            if i == 4:
                fds0 = count_fds_idle(ck)
            if n >= 20 and (i + 1) % 20 == 0:
                log(f"[{U.fmt_size(args.size)}] memory: {i + 1}/{n} saves, rss {U.rss() / MiB:.0f} MiB")
        out.update(
            base_rss=base,
            peak_extra_rss=U.hwm() - base,
            rss_after_each_save=samples,
            fds_after_5=fds0,
            fds_end=count_fds_idle(ck),
            threads_end=threading.active_count(),
            saves=n,
        )
        if n >= 20:
            k = min(10, n // 4)
            tail = samples[k:]
            xs = list(range(len(tail)))
            mx, my = statistics.fmean(xs), statistics.fmean(tail)
            slope = (sum((x - mx) * (y - my) for x, y in zip(xs, tail, strict=True))
                     / max(1e-9, sum((x - mx) ** 2 for x in xs)))
            out["growth_bytes"] = samples[-1] - samples[k - 1]
            out["growth_slope_bytes_per_save"] = slope
        ck.close()
    else:  # restore in a fresh process, the restart case
        base = U.rss()
        U.drop_caches()
        U.reset_hwm()
        ck = make_checkpointer(model, opt, args.dir)
        t0 = time.perf_counter()
        ck.restore()
        out.update(base_rss=base, peak_extra_rss=U.hwm() - base, restore_s=time.perf_counter() - t0)
        ck.close()
    return out


# =========================================================================== worker: overlap (P4 + thread vs process)


def worker_overlap(args: argparse.Namespace) -> dict[str, Any]:
    from multiprocessing import shared_memory

    import numpy as np
    import torch

    import _writer_proto as W

    torch.set_num_threads(1)
    model, opt = U.build_state(args.size)
    nbytes = U.state_bytes(model, opt)
    tensors = list(U.flatten_tensors(U.live_state_dict(model, opt)).values())
    step = U.make_trainer(args.hidden, args.batch)
    for _ in range(30):
        step()
    work = args.dir
    os.makedirs(work, exist_ok=True)

    # shared buffer for the prototypes (same buffer for thread and process: fair)
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    flatbuf = np.ndarray((nbytes,), dtype=np.uint8, buffer=shm.buf)
    flat_t = torch.from_numpy(flatbuf)

    def snapshot() -> float:
        t0 = time.perf_counter()
        off = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            # flat_t is deleted only at the end (so shm.close() finds no exported buffer), after the last snapshot()
            flat_t[off : off + n].copy_(t.detach().reshape(-1).view(torch.uint8))  # noqa: F821
            off += n
        return time.perf_counter() - t0

    snapshot()  # touch
    tw = W.ThreadWriter(shm.name)
    pw = W.ProcessWriter(shm.name)
    path = os.path.join(work, "proto.bin")

    variants: dict[str, Callable[[], tuple[Callable[[], bool], Callable[[], None], float]]] = {}

    def proto(writer: Any, do_hash: Any) -> Callable[[], tuple[Callable[[], bool], Callable[[], None], float]]:
        def start() -> tuple[Callable[[], bool], Callable[[], None], float]:
            U.remove(path)
            os.sync()
            stall = snapshot()
            writer.start(nbytes, path, do_hash)
            return writer.in_flight, writer.wait, stall

        return start

    variants["proto_thread"] = proto(tw, False)
    variants["proto_thread_xxh3"] = proto(tw, True)
    variants["proto_process"] = proto(pw, False)
    variants["proto_process_xxh3"] = proto(pw, True)
    variants["proto_thread_odirect"] = proto(tw, "direct")
    variants["proto_process_odirect"] = proto(pw, "direct")

    # DCP async_save (thread executor, default) on the same big state
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(False, False, False, False))
        live = U.live_state_dict(model, opt)
        dpath = os.path.join(work, "dcp_async")

        def dcp_start() -> tuple[Callable[[], bool], Callable[[], None], float]:
            U.remove(dpath)
            os.sync()
            t0 = time.perf_counter()
            fut = dcp.async_save(live, storage_writer=FileSystemWriter(dpath, sync_files=True), async_stager=stager)
            stall = time.perf_counter() - t0
            up = getattr(fut, "upload_completion", fut)
            return (lambda: not up.done()), (lambda: up.result()), stall

        variants["dcp_async_save"] = dcp_start
    except Exception as e:
        log(f"DCP unavailable for overlap: {e}")

    ok, why = ckptd_available()
    cks: list[Any] = []
    if ok and not args.no_ckptd:
        writer_opts = ckptd_writer_options()
        # ckptd as configured by default (paced background persist), and at full speed for comparison
        configs: list[tuple[str, dict[str, Any]]] = [("ckptd", {}), ("ckptd pace=0 (info)", {"pace": 0})]
        if writer_opts:
            configs = [(f"ckptd_writer_{w}", {"writer": w}) for w in writer_opts]
        for name, extra in configs:
            try:
                ck = make_checkpointer(model, opt, os.path.join(work, name), **extra)
                ck.save(0, kind="manual")  # first save allocates the buffers
                ck.wait()
                cks.append(ck)
            except Exception as e:
                log(f"{name}: unavailable ({type(e).__name__}: {e})")
                continue
            counter = [0]

            def ck_start(ck: Any = ck,
                         counter: list[int] = counter) -> tuple[Callable[[], bool], Callable[[], None], float]:
                os.sync()
                counter[0] += 1
                t0 = time.perf_counter()
                res = ck.save(counter[0], kind="manual")
                stall = time.perf_counter() - t0
                # Poll, as a training loop does: wait() would tell a paced persist to hurry.
                return (lambda: not res.done()), ck.wait, stall

            variants[name] = ck_start

    base_steps: list[float] = []
    out: dict[str, Any] = {"state_bytes": nbytes, "variants": {}, "loadavg": [U.loadavg()]}
    per: dict[str, dict[str, list[float]]] = {
        k: {"steps": [], "persist_s": [], "stall_s": [], "step_count": []} for k in variants}
    for r in range(args.runs):
        log(f"[{U.fmt_size(args.size)}] overlap round {r + 1}/{args.runs}")
        for name, start in variants.items():
            os.sync()
            time.sleep(0.05)
            base_steps += U.time_steps(step, args.base_steps)
            in_flight, wait, stall = start()
            t0 = time.perf_counter()
            steps, _wall = U.time_steps_while(step, in_flight)
            wait()
            per[name]["persist_s"].append(time.perf_counter() - t0 + stall)
            per[name]["stall_s"].append(stall)
            per[name]["steps"] += steps
            per[name]["step_count"].append(len(steps))
    base_med = statistics.median(base_steps)
    base_mean = statistics.fmean(base_steps)
    out["baseline_step"] = {"median": base_med, "mean": base_mean, "n": len(base_steps)}
    for name, d in per.items():
        s = d["steps"]
        if not s:
            out["variants"][name] = {"error": "no step overlapped the persist"}
            continue
        out["variants"][name] = {
            "step_median": statistics.median(s),
            "step_mean": statistics.fmean(s),
            "step_p90": sorted(s)[int(0.9 * (len(s) - 1))],
            "ratio_median": statistics.median(s) / base_med,
            "ratio_mean": statistics.fmean(s) / base_mean,
            "overlapped_steps": len(s),
            "persist_s": U.summarize(d["persist_s"]),
            "persist_GBps": nbytes / 1e9 / statistics.median(d["persist_s"]),
            "stall_s": U.summarize(d["stall_s"]),
        }
    out["loadavg"].append(U.loadavg())
    tw.close()
    pw.close()
    for ck in cks:
        ck.close()
    del flat_t, flatbuf
    shm.close()
    shm.unlink()
    U.remove(work)
    return out


# =========================================================================== worker: P6 (SIGTERM)


def worker_p6(args: argparse.Namespace) -> dict[str, Any]:
    ok, why = ckptd_available()
    if not ok:
        return {"skipped": why}
    trainer = os.path.join(HERE, "_p6_trainer.py")
    res: dict[str, Any] = {}
    for variant in ("warm", "cold"):
        sig_to_manifest, sig_to_exit, rcs, errors = [], [], [], []
        runs = args.runs if variant == "warm" else max(1, min(3, args.runs))
        for r in range(runs):
            d = os.path.join(args.dir, f"p6-{variant}-{r}")
            U.remove(d)
            os.makedirs(d)
            os.sync()
            env = dict(os.environ)
            env["PYTHONPATH"] = U.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
            p = subprocess.Popen(
                [sys.executable, trainer, "--dir", d, "--size", str(args.size), "--variant", variant],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            line = p.stdout.readline()
            if not line.startswith("READY"):
                p.kill()
                errors.append(f"trainer did not start: {line!r} {p.stderr.read()[-2000:]}")
                continue
            before = set(os.listdir(d))
            time.sleep(0.5)
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGTERM)
            t_manifest = None
            while True:
                rc = p.poll()
                if t_manifest is None:
                    for name in os.listdir(d):
                        if (name not in before and not name.startswith(".")
                                and os.path.exists(os.path.join(d, name, "manifest.json"))):
                            t_manifest = time.monotonic() - t0
                if rc is not None:
                    break
                if time.monotonic() - t0 > 120:
                    p.kill()
                    errors.append("trainer did not exit within 120 s")
                    break
                time.sleep(0.002)
            t_exit = time.monotonic() - t0
            err = p.stderr.read()
            rcs.append(p.returncode)
            if t_manifest is None:
                errors.append(f"no new manifest.json; rc={p.returncode}; stderr tail: {err[-1500:]}")
            else:
                sig_to_manifest.append(t_manifest)
                sig_to_exit.append(t_exit)
            U.remove(d)
        res[variant] = {
            "signal_to_manifest_s": U.summarize(sig_to_manifest),
            "signal_to_exit_s": U.summarize(sig_to_exit),
            "exit_codes": rcs,
            "errors": errors,
        }
        log(f"P6 {variant}: manifest {U.summarize(sig_to_manifest)['median']} "
            f"exit {U.summarize(sig_to_exit)['median']} rc {rcs}")
    return res


# =========================================================================== orchestration


def run_worker(name: str, size: int, args: argparse.Namespace, workdir: str,
               extra: list[str] | None = None) -> dict[str, Any]:
    out = os.path.join(workdir, f"result-{name}-{size}.json")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--size",
        str(size),
        "--runs",
        str(args.runs),
        "--dir",
        os.path.join(workdir, f"{name}-{size}"),
        "--worker-out",
        out,
        "--hidden",
        str(args.hidden),
        "--batch",
        str(args.batch),
        "--base-steps",
        str(args.base_steps),
    ]
    if args.warm_reads:
        cmd.append("--warm-reads")
    if args.no_ckptd:
        cmd.append("--no-ckptd")
    cmd += extra or []
    t0 = time.perf_counter()
    p = subprocess.run(cmd)
    if p.returncode != 0 or not os.path.exists(out):
        return {"error": f"worker {name} exited with {p.returncode}"}
    with open(out) as f:
        r = json.load(f)
    r["_wall_s"] = time.perf_counter() - t0
    r["_max_rss_children"] = U.children_hwm()
    os.unlink(out)
    return r


# Memory the baselines worker needs, in state sizes. All in one process: the state, the warm-copy
# buffers, ckptd's snapshot, DCP's reused stager and one transient copy (torch.load, DCP's default
# staging) = 5, plus room for the page cache the reads measure. Split: each side holds ~3 (baselines:
# state, stager, transient; ckptd: state, copy buffers, snapshot), plus page cache. Below 7 x the state
# the all-in-one run thrashed at 4 GiB on a 24 GiB machine (the warm copy ran at 6 GB/s instead of 9-10).
MEM_ALL, MEM_SPLIT, DISK_FACTOR = 7.0, 4.5, 9.0


def resources(size: int, workdir: str) -> tuple[str, str]:
    """("all" | "split" | "skip", why) for this size on this machine (memory and disk)."""
    avail = psutil.virtual_memory().available
    free = shutil.disk_usage(workdir).free
    if free < DISK_FACTOR * size:
        return "skip", (f"needs ~{DISK_FACTOR * size / GiB:.0f} GiB free in {workdir}, {free / GiB:.1f} GiB free; "
                        "pass --tmp on a larger disk")
    if avail >= MEM_ALL * size + GiB:
        return "all", ""
    have = f"{avail / GiB:.1f} GiB available"
    if avail >= MEM_SPLIT * size + GiB:
        return "split", f"{have}, under {MEM_ALL * size / GiB + 1:.0f} GiB"
    return "skip", f"needs ~{MEM_SPLIT * size / GiB + 1:.0f} GiB of available memory, {have}; choose smaller --sizes"


def merge_parts(base: dict[str, Any], ck: dict[str, Any]) -> dict[str, Any]:
    """One baselines result from the two processes of a split run."""
    if "figures" not in base or "figures" not in ck:
        return base if "figures" not in base else ck
    out = dict(base)
    out["figures"] = {**base["figures"], **ck["figures"]}
    out["first"] = {**base["first"], **ck["first"]}
    for k in ("ckptd", "ckptd_unavailable_reason"):
        out[k] = ck[k]
    out["loadavg"] = base["loadavg"] + ck["loadavg"]
    return out


def machine_info(workdir: str) -> dict[str, Any]:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:
            return repr(e)

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "lscpu": sh("lscpu | grep -E 'Model name|^CPU\\(s\\)|Thread|Core|Socket|L2|L3|Hypervisor'"),
        "mem": sh("free -g | head -2"),
        "df": sh(f"df -hT {workdir}"),
        "mount": sh(f"findmnt -no SOURCE,FSTYPE,OPTIONS -T {workdir}"),
        "disk": sh("lsblk -d -o NAME,SIZE,ROTA,MODEL,SCHED 2>/dev/null"),
        "kernel": platform.release(),
    }


def med(d: dict[str, Any], key: str) -> float | None:
    f = d.get("figures", {}).get(key)
    return f["median"] if f else None


def evaluate(size_res: dict[str, Any]) -> list[dict[str, Any]]:
    """Compute every target ratio for one size; returns rows (target, figure, limit, ratio, verdict)."""
    b = size_res.get("baselines", {})
    nb = b.get("state_bytes", 0)
    rows: list[dict[str, Any]] = []

    def row(tid: str, what: str, value: float | None, limit: float | None, ratio_desc: str, ratio: float | None,
            ok: bool | None) -> None:
        rows.append({"target": tid, "check": what, "value": value, "limit": limit, "ratio": ratio,
                     "ratio_desc": ratio_desc, "pass": ok})

    stall = med(b, "ckptd_stall")
    copy = med(b, "warm_copy")
    tsave = med(b, "torch_save_fsync")
    dstall = [x for x in (med(b, "dcp_async_stall"), med(b, "dcp_async_cached_stall")) if x is not None]
    if stall is not None:
        lim = 1.3 * copy + 0.010
        row("P1", "stall <= 1.3 x warm copy + 10 ms", stall, lim, "stall/(warm copy)", stall / copy, stall <= lim)
        row("P1", "stall <= 0.1 x torch.save+fsync", stall, 0.1 * tsave, "stall/torch.save", stall / tsave,
            stall <= 0.1 * tsave)
        if dstall:
            best = min(dstall)
            row("P1", "stall < DCP async_save stall (best of default/cached stager)", stall, best, "stall/DCP stall",
                stall / best, stall < best)
    commit = med(b, "ckptd_commit")
    raww = med(b, "raw_write_fsync")
    if commit is not None:
        thr = nb / commit
        row("P2", "durable save GB/s >= 0.9 x raw write+fsync", thr / 1e9, 0.9 * nb / raww / 1e9, "ckptd/raw",
            raww / commit, raww / commit >= 0.9)
        row("P2", "durable save GB/s >= 1.1 x torch.save+fsync", thr / 1e9, 1.1 * nb / tsave / 1e9, "ckptd/torch.save",
            tsave / commit, tsave / commit >= 1.1)
    rest = med(b, "ckptd_restore")
    rawr = med(b, "raw_read_ckpt") or med(b, "raw_read")
    tload = med(b, "torch_load")
    restart = size_res.get("restart", {})
    rows.extend(restart.get("targets", []))  # P3: a fresh process per restore, as a restarted run (bench_restart.py)
    if rest is not None:  # restores inside this long-lived process, its buffer there: information since then
        row("P3", "(info) in-process restore GB/s vs 0.85 x raw read", nb / rest / 1e9, 0.85 * nb / rawr / 1e9,
            "ckptd/raw", rawr / rest, None)
        row("P3", "(info) in-process restore vs torch.load", rest, tload, "torch.load/ckptd", tload / rest, None)
    ov = size_res.get("overlap", {}).get("variants", {})
    for name, v in ov.items():
        if name.startswith("ckptd") and "ratio_median" in v:
            info = "(info)" in name
            row("P4", f"{name}: overlapped step <= 1.10 x baseline (median; mean ratio {v['ratio_mean']:.3f})",
                v["step_median"], None, "median step ratio", v["ratio_median"],
                None if info else v["ratio_median"] <= 1.10)
            if not info and raww is not None:
                per = v["persist_s"]["median"]
                row("P2", f"(info) {name}: background persist beside training (paced) vs raw write+fsync",
                    nb / per / 1e9, None, "ckptd/raw", raww / per, None)
    mem = size_res.get("memory_save", {})
    if "peak_extra_rss" in mem:
        lim = mem["state_bytes"] + 256 * MiB
        row("P5", "peak extra RSS (saves) <= state + 256 MiB", mem["peak_extra_rss"] / MiB, lim / MiB, "peak/state",
            mem["peak_extra_rss"] / mem["state_bytes"], mem["peak_extra_rss"] <= lim)
    memr = size_res.get("memory_restore", {})
    if "peak_extra_rss" in memr:
        lim = memr["state_bytes"] + 256 * MiB
        row("P5", "peak extra RSS (restore, fresh process) <= state + 256 MiB", memr["peak_extra_rss"] / MiB,
            lim / MiB, "peak/state", memr["peak_extra_rss"] / memr["state_bytes"], memr["peak_extra_rss"] <= lim)
    return rows


def evaluate_global(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    g = results.get("growth", {})
    if "growth_bytes" in g:
        ok = g["growth_bytes"] <= 16 * MiB and g["growth_slope_bytes_per_save"] * g["saves"] <= 16 * MiB
        rows.append({"target": "P5",
                     "check": f"no RSS growth over {g['saves']} saves ({U.fmt_size(g['state_bytes'])}); "
                              f"fds {g.get('fds_after_5')}->{g.get('fds_end')}",
                     "value": g["growth_bytes"] / MiB, "limit": 16.0, "ratio": g["growth_slope_bytes_per_save"] / 1024,
                     "ratio_desc": "slope KiB/save", "pass": ok and g.get("fds_end") == g.get("fds_after_5")})
    p6 = results.get("p6", {})
    w = p6.get("warm", {})
    size = results.get("p6_size")
    b = results.get("sizes", {}).get(str(size), {}).get("baselines") if size else None
    if w and w.get("signal_to_manifest_s", {}).get("median") is not None and b and med(b, "ckptd_stall") is not None:
        raw_bw = b["state_bytes"] / med(b, "raw_write_fsync")
        lim = med(b, "ckptd_stall") + 1.1 * b["state_bytes"] / raw_bw + 1.0
        v = w["signal_to_manifest_s"]["median"]
        rows.append({"target": "P6",
                     "check": "SIGTERM -> checkpoint durable (manifest published) <= P1 stall "
                              "+ 1.1 x size/raw write BW + 1 s (buffers warm)",
                     "value": v, "limit": lim, "ratio": v / lim, "ratio_desc": "value/limit", "pass": v <= lim})
        e = w["signal_to_exit_s"]["median"]
        rows.append({"target": "P6", "check": "(info) SIGTERM -> process exited (85), buffers warm", "value": e,
                     "limit": lim, "ratio": e / lim, "ratio_desc": "value/limit", "pass": e <= lim})
        c = p6.get("cold", {}).get("signal_to_manifest_s", {}).get("median")
        if c is not None:
            rows.append({"target": "P6",
                         "check": "(info) SIGTERM -> durable, emergency save is the process's first save "
                                  "(cold buffers)",
                         "value": c, "limit": lim, "ratio": c / lim, "ratio_desc": "value/limit", "pass": c <= lim})
    elif p6:
        rows.append({"target": "P6", "check": "SIGTERM emergency save", "value": None, "limit": None, "ratio": None,
                     "ratio_desc": "", "pass": None, "note": json.dumps(p6)[:500]})
    return rows


FIG_ORDER = [
    ("raw_write_fsync", "raw write + fsync", "w"),
    ("raw_read", "raw read (into pre-allocated)", "r"),
    ("raw_read_warm", "raw read, page cache (info)", "r"),
    ("warm_copy", "copy into pre-allocated buffers", "c"),
    ("torch_save_fsync", "torch.save + fsync", "w"),
    ("torch_load", "torch.load + copy into model", "r"),
    ("torch_load_mmap", "torch.load(mmap=True) + copy", "r"),
    ("safetensors_save_fsync", "safetensors save + fsync", "w"),
    ("safetensors_load", "safetensors load + copy", "r"),
    ("dcp_save", "DCP save (fsync)", "w"),
    ("dcp_async_stall", "DCP async_save: stall", "s"),
    ("dcp_async_total", "DCP async_save: to durable", "w"),
    ("dcp_async_cached_stall", "DCP async_save cached stager: stall", "s"),
    ("dcp_async_cached_total", "DCP async_save cached stager: durable", "w"),
    ("dcp_load", "DCP load (in place)", "r"),
    ("ckptd_stall", "ckptd save(): stall", "s"),
    ("ckptd_commit", "ckptd request -> durable commit", "w"),
    ("ckptd_restore", "ckptd restore() again, same process (info)", "r"),
    ("raw_read_ckpt", "raw read of that checkpoint file (P3 base)", "r"),
]


def fmt_t(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for size, sr in results["sizes"].items():
        b = sr.get("baselines", {})
        if sr.get("skipped"):
            lines.append(f"\n== {U.fmt_size(int(size))}: skipped: {sr['skipped']}")
            continue
        if "figures" not in b:
            lines.append(f"\n== {U.fmt_size(int(size))}: baselines " + ("not run" if not b else f"failed: {b}"))
        else:
            lines.extend(render_baselines(size, b))
        lines.extend(render_rest(sr))
    lines.extend(render_global(results))
    return "\n".join(lines)


def render_baselines(size: str, b: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    nb = b["state_bytes"]
    lines.append(f"\n== state {U.fmt_size(int(size))} ({nb / MiB:.0f} MiB, {b['tensors']} tensors), "
                 f"runs={b['figures']['raw_write_fsync']['n']}, reads: {b['reads']}")
    if b.get("split"):
        lines.append(f"(two processes: baselines, then ckptd with its own warm copy; {b['split']})")
    lines.append(f"{'figure':44s} {'median':>10s} {'min':>10s} {'max':>10s} {'GB/s':>7s}")
    for key, label, _kind in FIG_ORDER:
        f = b["figures"].get(key)
        if not f:
            continue
        gbps = nb / 1e9 / f["median"] if f["median"] else 0
        lines.append(f"{label:44s} {fmt_t(f['median']):>10s} {fmt_t(f['min']):>10s} {fmt_t(f['max']):>10s} {gbps:7.2f}")
    fi = b.get("first", {})
    lines.append(f"{'first copy into fresh empty_like (page faults)':44s} "
                 f"{fmt_t(fi.get('copy_prealloc_first_touch')):>10s}")
    lines.append(f"{'clone() into fresh memory':44s} {fmt_t(fi.get('clone_fresh')):>10s}")
    lines.append(f"{'DCP async_save first stall':44s} {fmt_t(fi.get('dcp_async_first_stall')):>10s}")
    cf = fi.get("ckptd_first") or {}
    if cf:
        lines.append(f"{'ckptd FIRST save: stall (buffers allocated)':44s} {fmt_t(cf.get('stall')):>10s}")
        lines.append(f"{'ckptd FIRST save: request -> durable':44s} {fmt_t(cf.get('commit')):>10s}")
    if not b.get("ckptd"):
        lines.append(f"ckptd not measured: {b.get('ckptd_unavailable_reason')}")
    la = b.get("loadavg")
    if la:
        lines.append(f"load average before/after this part: {la[0]} / {la[1]}")
    return lines


def render_rest(sr: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if True:
        ov = sr.get("overlap", {})
        if "variants" in ov:
            bs = ov["baseline_step"]
            lines.append(f"-- step-time inflation (1-thread training step, "
                         f"baseline median {bs['median'] * 1000:.2f} ms, mean {bs['mean'] * 1000:.2f} ms, "
                         f"n={bs['n']}; load avg {' / '.join(ov.get('loadavg', []))})")
            lines.append(f"{'background persist':28s} {'ratio med':>9s} {'ratio mean':>10s} {'p90 ms':>8s} "
                         f"{'steps':>6s} {'persist':>9s} {'GB/s':>6s}")
            for name, v in ov["variants"].items():
                if "ratio_median" not in v:
                    lines.append(f"{name:28s} {v}")
                    continue
                lines.append(
                    f"{name:28s} {v['ratio_median']:9.3f} {v['ratio_mean']:10.3f} {v['step_p90'] * 1000:8.2f} "
                    f"{v['overlapped_steps']:6d} {fmt_t(v['persist_s']['median']):>9s} {v['persist_GBps']:6.2f}"
                )
        rs = sr.get("restart", {})
        if "figures" in rs:
            import bench_restart

            lines.extend(bench_restart.render_size(int(rs["size"]), rs)[:-len(rs["targets"])])
        for key in ("memory_save", "memory_restore"):
            m = sr.get(key, {})
            if "peak_extra_rss" in m:
                lines.append(f"{key}: peak extra RSS {m['peak_extra_rss'] / MiB:.0f} MiB "
                             f"(state {m['state_bytes'] / MiB:.0f} MiB)")
            elif m:
                lines.append(f"{key}: {m.get('skipped') or m.get('error')}")
    return lines


def render_global(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    g = results.get("growth", {})
    if "growth_bytes" in g:
        lines.append(f"\n== growth: {g['saves']} saves of {g['state_bytes'] / MiB:.0f} MiB: "
                     f"RSS growth {g['growth_bytes'] / MiB:.1f} MiB, "
                     f"slope {g['growth_slope_bytes_per_save'] / 1024:.1f} KiB/save, "
                     f"fds {g.get('fds_after_5')} -> {g.get('fds_end')}")
    p6 = results.get("p6", {})
    for var, v in p6.items():
        if isinstance(v, dict) and "signal_to_exit_s" in v:
            m, e = v["signal_to_manifest_s"], v["signal_to_exit_s"]
            lines.append(f"== P6 SIGTERM ({var} buffers, {U.fmt_size(results['p6_size'])}): "
                         f"signal->manifest {fmt_t(m['median'])} [{fmt_t(m['min'])}..{fmt_t(m['max'])}], "
                         f"signal->exit {fmt_t(e['median'])} [{fmt_t(e['min'])}..{fmt_t(e['max'])}], "
                         f"exit codes {v['exit_codes']}" + (f", errors: {v['errors'][:1]}" if v["errors"] else ""))
    lines.append("\n== targets")
    for size, sr in results["sizes"].items():
        for r in sr.get("targets", []):
            lines.append(_target_line(U.fmt_size(int(size)), r))
    for r in results.get("targets_global", []):
        lines.append(_target_line("-", r))
    if not any(sr.get("targets") for sr in results["sizes"].values()):
        lines.append("(no ckptd figures: targets not evaluated)")
    return lines


def _target_line(size: str, r: dict[str, Any]) -> str:
    verdict = {True: "PASS", False: "MISS", None: "info"}[r["pass"]]
    val = r["value"]
    vs = "-" if val is None else (f"{val:.4g}")
    ls = "-" if r["limit"] is None else f"{r['limit']:.4g}"
    rs = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
    return f"{verdict:4s} {r['target']} [{size:>4s}] {r['check']}: value {vs} limit {ls}; {r['ratio_desc']} = {rs}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G",
                    help="comma-separated state sizes (default 256M,1G; add 4G explicitly)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per figure (median, min, max); >= 5 for reporting")
    ap.add_argument("--out", default="bench-results/results.json")
    ap.add_argument("--tmp", default=None,
                    help="scratch directory on the disk under test "
                         "(default: a new dir under /work or the repo's parent)")
    ap.add_argument("--warm-reads", action="store_true",
                    help="do not drop the page cache before reads (all reads warm)")
    ap.add_argument("--no-ckptd", action="store_true", help="baselines only")
    ap.add_argument("--split", action="store_true",
                    help="run baselines and ckptd in two processes (automatic when memory is short for one)")
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: baselines,overlap,memory,restart,growth,p6")
    ap.add_argument("--restart-rounds", type=int, default=10,
                    help="rounds of the restart part (bench_restart.py: a fresh process per restore)")
    ap.add_argument("--growth-saves", type=int, default=100)
    ap.add_argument("--p6-size", default="1G")
    ap.add_argument("--hidden", type=int, default=768, help="P4 training MLP width")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--base-steps", type=int, default=40, help="baseline steps measured before each overlapped persist")
    # worker-only
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="save", help=argparse.SUPPRESS)
    ap.add_argument("--part", default="all", choices=["all", "baselines", "ckptd"], help=argparse.SUPPRESS)
    ap.add_argument("--saves", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        workers = {"baselines": worker_baselines, "memory": worker_memory, "overlap": worker_overlap, "p6": worker_p6}
        fn = workers[args.worker]
        res = fn(args)
        U.dump_json(args.worker_out, res)
        return 0

    sizes = [U.parse_size(s) for s in args.sizes.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    base = args.tmp or ("/work" if os.path.isdir("/work") else os.path.dirname(U.REPO_ROOT))
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="ckptd-bench-", dir=base)
    t_start = time.perf_counter()
    ok, why = ckptd_available()
    results: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(workdir),
        "scratch_dir": workdir,
        "runs": args.runs,
        "ckptd_available": ok,
        "ckptd_unavailable_reason": why or None,
        "sizes": {},
    }
    log(f"scratch dir {workdir}; ckptd available: {ok} {why}")
    try:
        for size in sizes:
            sr: dict[str, Any] = {}
            results["sizes"][str(size)] = sr
            mode, why_not = resources(size, workdir)
            if args.split and mode == "all":
                mode, why_not = "split", "--split"
            if mode == "skip":
                log(f"[{U.fmt_size(size)}] skipped: {why_not}")
                sr["skipped"] = why_not
                continue
            if "baselines" not in skip:
                if mode == "split":
                    log(f"[{U.fmt_size(size)}] {why_not}: baselines and ckptd run in two processes, "
                        "one after the other")
                    sr["baselines"] = merge_parts(run_worker("baselines", size, args, workdir, ["--part", "baselines"]),
                                                  run_worker("baselines", size, args, workdir, ["--part", "ckptd"]))
                    sr["baselines"]["split"] = why_not
                else:
                    sr["baselines"] = run_worker("baselines", size, args, workdir)
            if "overlap" not in skip:
                sr["overlap"] = run_worker("overlap", size, args, workdir)
            if ok and not args.no_ckptd and "memory" not in skip:
                mdir = os.path.join(workdir, f"mem-{size}")
                sr["memory_save"] = run_worker("memory", size, args, workdir,
                                               ["--phase", "save", "--saves", "3", "--dir", mdir])
                sr["memory_restore"] = run_worker("memory", size, args, workdir, ["--phase", "restore", "--dir", mdir])
                U.remove(mdir)
            if ok and not args.no_ckptd and "restart" not in skip:
                import bench_restart

                sr["restart"] = bench_restart.measure_size(size, args.restart_rounds, workdir)
            sr["targets"] = evaluate(sr)
        if ok and not args.no_ckptd and "growth" not in skip and sizes:
            gsize = min(sizes)
            gdir = os.path.join(workdir, "growth")
            results["growth"] = run_worker("memory", gsize, args, workdir,
                                           ["--phase", "save", "--saves", str(args.growth_saves), "--dir", gdir])
            U.remove(gdir)
        if ok and not args.no_ckptd and "p6" not in skip:
            p6size = U.parse_size(args.p6_size)
            results["p6_size"] = p6size
            if str(p6size) not in results["sizes"]:
                log(f"P6 size {U.fmt_size(p6size)} has no baseline run; P6 limit uses the nearest size's bandwidth")
            results["p6"] = run_worker("p6", p6size, args, workdir, ["--dir", os.path.join(workdir, "p6")])
        results["targets_global"] = evaluate_global(results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    return U.report(args.out, results, render(results))


if __name__ == "__main__":
    sys.exit(main())
