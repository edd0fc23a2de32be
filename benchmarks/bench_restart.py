#!/usr/bin/env python
"""Restore as a restarted run sees it: one fresh process per measurement, the checkpoint's pages dropped.

    python benchmarks/bench_restart.py --sizes 256M,1G --rounds 10 --out bench-results/restart.json

A run restores once, right after it starts (a crash, a preemption, a requeue): in a new Python process,
with a model and an optimizer that were just built (no optimizer state yet), no snapshot buffer, and a
page cache that does not hold the checkpoint. Per size, a checkpoint of the model-like state of
bench_checkpoint.py (model + Adam) is written once by ckptd and once by ``torch.save``; then each round
starts one fresh process per method, in an order rotated round by round. Each process builds the fresh
model and optimizer, drops the page cache of the files it reads (``os.sync()`` + ``posix_fadvise
(DONTNEED)``, no root needed; ``fincore`` confirms what stayed), and times:

- ``raw``: the checkpoint's tensor file read into newly allocated memory (``torch.empty`` + ``readinto`` of
  64 MiB pieces): the disk and the page faults, nothing else;
- ``torch.load``: ``torch.load(weights_only=True)`` of the same state, then the model's and the
  optimizer's ``load_state_dict``;
- ``ckptd``: ``Checkpointer(...)`` + ``restore()`` (checksums of every byte, undo log, the state applied).

For the last two it also times, from the same start, the end of the first training step after the restore
(gradients allocated and filled, Adam's step, ``ck.step()``), while ckptd prepares its snapshot buffer for
the first save in the background, as in a run. Targets (docs/performance.md, P3): ckptd's restore >= 0.85 x
the raw read's speed and faster than ``torch.load``, on the medians and on the worst samples.
``bench_checkpoint.py`` runs this as its ``restart`` part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _bench_util as U  # noqa: E402

MiB, GiB = U.MiB, U.GiB
METHODS = ("raw", "torch_load", "ckptd")
LABELS = {
    "raw": "raw read into fresh memory",
    "torch_load": "torch.load + load_state_dict",
    "ckptd": "ckptd Checkpointer() + restore()",
}
P3_RATIO = 0.85
RESTORED_STEP = 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =========================================================================== the measured processes


def first_step(model: Any, opt: Any) -> None:
    """What the first training step after a restore does to memory: gradients allocated and written (a
    backward pass), then Adam's step over the restored moments."""
    import torch

    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-4)
    opt.step()


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out: dict[str, Any] = {"method": args.child, "loadavg": U.loadavg()}
    ckpt = os.path.join(args.ckpt_dir, os.listdir(args.ckpt_dir)[0])
    tensors = os.path.join(ckpt, "tensors.safetensors")
    if args.child == "raw":
        files = [tensors]
    elif args.child == "torch_load":
        files = [args.pt]
    else:
        files = [os.path.join(ckpt, f) for f in os.listdir(ckpt)]
    model = opt = None
    if args.child != "raw":
        model, opt = U.fresh_state(args.size)
    if args.child == "ckptd":
        t0 = time.perf_counter()
        from ckptd import Checkpointer  # the library's modules: imported at a script's top, timed apart

        out["import_s"] = time.perf_counter() - t0
    U.drop_file_cache(files)
    out["resident_after_drop"] = U.resident_bytes(files)
    if args.child == "raw":
        t0 = time.perf_counter()
        buf = torch.empty(os.path.getsize(tensors), dtype=torch.uint8)
        with open(tensors, "rb", buffering=0) as f:
            U.readinto_all(f, memoryview(buf.numpy()))
        out["restore_s"] = time.perf_counter() - t0
        return out
    if args.child == "torch_load":
        t0 = time.perf_counter()
        sd = torch.load(args.pt, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        del sd
        out["restore_s"] = time.perf_counter() - t0
        first_step(model, opt)
        out["first_step_s"] = time.perf_counter() - t0
        return out
    t0 = time.perf_counter()
    ck = Checkpointer(model=model, optimizer=opt, dir=args.ckpt_dir, save_on_close=False)
    step = ck.restore()
    out["restore_s"] = time.perf_counter() - t0
    first_step(model, opt)
    ck.step(step + 1)
    out["first_step_s"] = time.perf_counter() - t0
    if ck._prewarm is not None:  # the snapshot buffer of the first save, prepared in the background
        ck._prewarm.result()
    out["buffer_ready_s"] = time.perf_counter() - t0
    if step != RESTORED_STEP:
        raise SystemExit(f"ckptd restored step {step}, expected {RESTORED_STEP}")
    ck.close()
    return out


# =========================================================================== orchestration


def write_state(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint (ckptd) and the torch.save file of one state, written in a process of their own."""
    import torch

    from ckptd import Checkpointer

    model, opt = U.build_state(args.size)
    ck = Checkpointer(model=model, optimizer=opt, dir=args.ckpt_dir, save_on_close=False, handle_signals=False)
    ck.save(RESTORED_STEP, block=True)
    ck.close()
    with open(args.pt, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return {"state_bytes": U.state_bytes(model, opt), "tensors": U.tensor_count(model, opt)}


def prepare(size: int, work: str) -> dict[str, Any]:
    return run_child("prepare", size, work)


def _child_env() -> dict[str, str]:
    """The environment of a plain script: nothing of a ckptd supervisor (no control socket, no schedule)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}


def run_child(method: str, size: int, work: str) -> dict[str, Any]:
    out = os.path.join(work, f"child-{method}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--size", str(size),
           "--ckpt-dir", os.path.join(work, "ckpt"), "--pt", os.path.join(work, "state.pt"), "--child-out", out]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if p.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"{method} process ({U.fmt_size(size)}) exited with {p.returncode}:\n{p.stderr[-3000:]}")
    with open(out) as f:
        r = json.load(f)
    os.unlink(out)
    return r


def measure_size(size: int, rounds: int, base: str, warmup: int = 1) -> dict[str, Any]:
    """Every method in a fresh process per sample, ``rounds`` rounds (after ``warmup`` untimed ones)."""
    work = tempfile.mkdtemp(prefix=f"ckptd-restart-{U.fmt_size(size)}-", dir=base)
    try:
        log(f"[{U.fmt_size(size)}] writing the checkpoint and the torch.save file")
        res: dict[str, Any] = {"size": size, **prepare(size, work)}
        res["loadavg_start"] = U.loadavg()
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for r in range(-warmup, rounds):
            order = METHODS[r % len(METHODS):] + METHODS[: r % len(METHODS)]
            for m in order:
                s = run_child(m, size, work)
                if r >= 0:
                    samples[m].append(s)
            if r >= 0:
                log(f"[{U.fmt_size(size)}] round {r + 1}/{rounds}: " + ", ".join(
                    f"{m} {samples[m][-1]['restore_s'] * 1000:.0f} ms" for m in METHODS) + f"; load {U.loadavg()}")
        res["loadavg_end"] = U.loadavg()
        res["samples"] = samples
        res["figures"] = figures(samples)
        res["targets"] = targets(res["figures"])
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def figures(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, ss in samples.items():
        for key in ("restore_s", "first_step_s", "buffer_ready_s", "import_s"):
            vals = [s[key] for s in ss if s.get(key) is not None]
            if vals:
                out[f"{m}.{key}"] = U.summarize(vals)
    paired = [r["restore_s"] / c["restore_s"] for r, c in zip(samples["raw"], samples["ckptd"], strict=True)]
    out["paired_raw_over_ckptd"] = U.summarize(paired)
    resident = [s.get("resident_after_drop") for ss in samples.values() for s in ss]
    out["resident_after_drop_max"] = max((x for x in resident if x is not None), default=None)
    return out


def targets(f: dict[str, Any]) -> list[dict[str, Any]]:
    """P3 on the fresh-process rows: medians and worst samples; the first step as information."""
    rows: list[dict[str, Any]] = []
    ck, raw, tl = f["ckptd.restore_s"], f["raw.restore_s"], f["torch_load.restore_s"]
    for stat, name in (("median", "median"), ("max", "worst")):
        ratio = raw[stat] / ck[stat]
        rows.append({"target": "P3", "check": f"fresh-process restore >= {P3_RATIO} x raw read into fresh memory "
                     f"({name})", "value": ck[stat], "limit": raw[stat] / P3_RATIO, "ratio": ratio,
                     "ratio_desc": "raw/ckptd", "pass": ratio >= P3_RATIO})
        ratio = tl[stat] / ck[stat]
        rows.append({"target": "P3", "check": f"fresh-process restore faster than torch.load + load_state_dict "
                     f"({name})", "value": ck[stat], "limit": tl[stat], "ratio": ratio,
                     "ratio_desc": "torch.load/ckptd", "pass": ratio > 1})
    cs, ts = f.get("ckptd.first_step_s"), f.get("torch_load.first_step_s")
    if cs and ts:
        for stat, name in (("median", "median"), ("max", "worst")):
            rows.append({"target": "P3", "check": f"(info) restore start -> end of the first training step, "
                         f"against torch.load's ({name})", "value": cs[stat], "limit": ts[stat],
                         "ratio": ts[stat] / cs[stat], "ratio_desc": "torch.load/ckptd", "pass": None})
    return rows


def fmt_t(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def render_size(size: int, res: dict[str, Any]) -> list[str]:
    f = res["figures"]
    n = f["ckptd.restore_s"]["n"]
    lines = [f"== restart restore, {U.fmt_size(size)} ({res['state_bytes'] / MiB:.0f} MiB, {res['tensors']} "
             f"tensors): a fresh process per sample, page cache of the files dropped, {n} rounds; load average "
             f"{res['loadavg_start']} -> {res['loadavg_end']}",
             f"{'':40s} {'median':>8s} {'worst':>8s} {'best':>8s} {'GB/s':>6s}  {'to 1st step':>11s} {'worst':>8s}"]
    for m in METHODS:
        r = f[f"{m}.restore_s"]
        s = f.get(f"{m}.first_step_s") or {}
        lines.append(f"{LABELS[m]:40s} {fmt_t(r['median']):>8s} {fmt_t(r['max']):>8s} {fmt_t(r['min']):>8s} "
                     f"{res['state_bytes'] / 1e9 / r['median']:6.2f}  {fmt_t(s.get('median')):>11s} "
                     f"{fmt_t(s.get('max')):>8s}")
    extra = []
    if "ckptd.buffer_ready_s" in f:
        extra.append(f"ckptd snapshot buffer ready {fmt_t(f['ckptd.buffer_ready_s']['median'])} after the start")
    if "ckptd.import_s" in f:
        extra.append(f"import of ckptd.Checkpointer {fmt_t(f['ckptd.import_s']['median'])} (not in the times)")
    extra.append(f"paired raw/ckptd median {f['paired_raw_over_ckptd']['median']:.3f}")
    if f.get("resident_after_drop_max") is not None:
        extra.append(f"page cache left after the drop <= {f['resident_after_drop_max'] / MiB:.1f} MiB")
    lines.append("; ".join(extra))
    for t in res["targets"]:
        lines.append(target_line(U.fmt_size(size), t))
    return lines


def target_line(size: str, r: dict[str, Any]) -> str:
    verdict = {True: "PASS", False: "MISS", None: "info"}[r["pass"]]
    return (f"{verdict:4s} {r['target']} [{size:>4s}] {r['check']}: value {r['value']:.4g} limit {r['limit']:.4g}; "
            f"{r['ratio_desc']} = {r['ratio']:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G", help="comma-separated state sizes (default 256M,1G; 4G optional)")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds: one sample of each method per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the interpreter's files cached)")
    ap.add_argument("--out", default="bench-results/restart.json")
    ap.add_argument("--tmp", default=None, help="scratch directory on the disk under test (default: under /work)")
    ap.add_argument("--child", choices=(*METHODS, "prepare"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    ap.add_argument("--pt", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        U.dump_json(args.child_out, write_state(args) if args.child == "prepare" else child(args))
        return 0
    base = args.tmp or ("/work" if os.path.isdir("/work") else os.path.dirname(U.REPO_ROOT))
    results: dict[str, Any] = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": args.rounds,
                               "cpus": os.cpu_count(), "sizes": {}}
    t0 = time.perf_counter()
    lines: list[str] = []
    for size in (U.parse_size(s) for s in args.sizes.split(",") if s.strip()):
        need = 3.5 * size + GiB  # the fresh state, the restored moments, the snapshot buffer, the page cache
        avail = psutil.virtual_memory().available
        if avail < need or shutil.disk_usage(base).free < 2.5 * size:
            why = f"needs ~{need / GiB:.1f} GiB of memory ({avail / GiB:.1f} available) and 2.5 x the state on disk"
            log(f"[{U.fmt_size(size)}] skipped: {why}")
            results["sizes"][str(size)] = {"skipped": why}
            continue
        res = measure_size(size, args.rounds, base, args.warmup)
        results["sizes"][str(size)] = res
        lines += render_size(size, res) + [""]
    results["wall_s"] = time.perf_counter() - t0
    return U.report(args.out, results, "\n".join(lines).rstrip())


if __name__ == "__main__":
    sys.exit(main())
