#!/usr/bin/env python
"""Sharded (FSDP2) save and restore: ckptd against torch.distributed.checkpoint's own save/async_save/load.

    python benchmarks/bench_sharded.py --size 256M --worlds 2,4 --rounds 5 --json bench-results/sharded.json

One job per world size (N ranks on gloo, CPU, one intra-op thread each, started as subprocesses like
torchrun would), on one FSDP2 state: a model-like module (benchmarks/_bench_util.ModelLike, every block
and the root ``fully_shard``ed) with Adam's two moments, ``--size`` in all (parameters + moments, summed
over ranks). In each round every method runs once, in an order rotated round by round, so drift of the
shared machine hits all alike; medians over the rounds, min-max kept, ratios from the same run.

Methods (times are barrier to barrier, i.e. the slowest rank; "blocked" is the slowest rank's time until
the call returned, i.e. what the training loop waits for):

  ckptd.save        ``ck.save(block=True)``: snapshot into reused host copies, DCP planning with ckptd's
                    StorageWriter, every rank's shard + fsync + xxh3, one manifest commit (rename, fsync)
  ckptd.async       ``ck.save()`` then ``.wait()`` (``pace=0``: the background write is not slowed)
  dcp.save          ``dcp.save(get_state_dict(model, opt), checkpoint_id=DIR)``: FileSystemWriter defaults
                    (one file per rank, fsync, 1 thread)
  dcp.async_save    ``dcp.async_save(...)`` then ``.result()`` (thread; staging into fresh CPU copies)
  dcp.async_cached  the same with one ``DefaultStager`` (no pinned or shared memory: CPU only) passed to
                    every save: staging into the copies of the previous save (its storage cache), as ckptd
                    does (``FileSystemWriter(cache_staged_state_dict=True)`` pins memory, which needs CUDA)
  ckptd.restore     ``ck.restore()`` of the checkpoint ckptd.save wrote: checksums of every file (each rank
                    a share), DCP load with ckptd's StorageReader into host copies, ``set_state_dict``
  dcp.load          ``dcp.load`` of dcp.save's checkpoint into ``get_state_dict``'s tensors, then
                    ``set_state_dict`` (the documented recipe; no checksums)

Reads are warm (the checkpoint was just written) unless ``--cold``, which drops the page cache before each
load (``echo 3 > /proc/sys/vm/drop_caches``: root only, and it slows everything else on the machine).
Prints a table; ``--json FILE`` writes every sample.
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
from statistics import median
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from fixtures.sup_helpers import free_port  # noqa: E402

SAVES = ("ckptd.save", "ckptd.async", "dcp.save", "dcp.async_save", "dcp.async_cached")
LOADS = {"ckptd.save": "ckptd.restore", "dcp.save": "dcp.load"}  # each sync save is followed by its load


# =========================================================================== one rank


def _build(total_bytes: int) -> tuple[Any, Any]:
    import torch
    from torch.distributed.fsdp import fully_shard

    import _bench_util as U

    torch.manual_seed(0)
    with torch.no_grad():
        model = U.ModelLike(total_bytes // 3)
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    for p in model.parameters():
        p.grad = p.detach() * 1e-3
    opt.step()  # the moments exist, sharded like the parameters
    for p in model.parameters():
        p.grad = None
    return model, opt


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import _bench_util as U
    import ckptd

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = _build(a.size)
    local = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else 0
                for t in [*model.parameters(), *(v for s in opt.state.values() for v in s.values())])
    total = torch.tensor([float(local)], dtype=torch.float64)
    dist.all_reduce(total)
    base = os.path.join(a.dir, f"w{world}")
    ck_dir = os.path.join(base, "ckptd")
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=ck_dir, pace=0, handle_signals=False, save_on_close=False)
    ck.restore()  # empty: sets up the ranks' coordination (as a job's first restore does)
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cached = DefaultStager(StagingOptions(False, False, False, False))
    samples: dict[str, list[float]] = {m: [] for m in (*SAVES, *LOADS.values())}
    blocked: dict[str, list[float]] = {m: [] for m in ("ckptd.async", "dcp.async_save", "dcp.async_cached")}
    slowest = torch.zeros(1, dtype=torch.float64)

    def worst(x: float) -> float:
        slowest[0] = x
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest[0])

    def clean() -> None:
        dist.barrier()
        if rank == 0:
            for name in os.listdir(base):
                if name != "ckptd":
                    shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            for name in os.listdir(ck_dir):
                shutil.rmtree(os.path.join(ck_dir, name), ignore_errors=True)
        dist.barrier()

    def cold() -> None:
        if a.cold:
            dist.barrier()
            if rank == 0 and not U.drop_caches():
                raise SystemExit("--cold needs root: cannot write /proc/sys/vm/drop_caches")
            dist.barrier()

    step = 0
    for rnd in range(a.warmup + a.rounds):
        order = list(SAVES[rnd % len(SAVES):] + SAVES[:rnd % len(SAVES)])
        for method in order:
            step += 1
            path = os.path.join(base, f"{method}-{step}")
            dist.barrier()
            t0 = time.perf_counter()
            if method == "ckptd.save":
                res = ck.save(step=step, block=True)
            elif method == "ckptd.async":
                res = ck.save(step=step)
                t_call = time.perf_counter() - t0
                res.wait()
            elif method == "dcp.save":
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            else:
                msd, osd = get_state_dict(model, opt)
                if method == "dcp.async_cached":
                    fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, async_stager=cached)
                else:
                    fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path)
                t_call = time.perf_counter() - t0
                fut.result()
            dist.barrier()
            dt = time.perf_counter() - t0
            if method.startswith("ckptd") and res.error is not None:
                raise SystemExit(f"{method} failed: {res.error}")
            if rnd >= a.warmup:
                samples[method].append(worst(dt))
                if method in blocked:
                    blocked[method].append(worst(t_call))
            load = LOADS.get(method)
            if load:
                cold()
                dist.barrier()
                t0 = time.perf_counter()
                if load == "ckptd.restore":
                    got = ck.restore()
                    if got != step:
                        raise SystemExit(f"ckptd.restore loaded step {got}, expected {step}")
                else:
                    msd, osd = get_state_dict(model, opt)
                    sd = {"model": msd, "optim": osd}
                    dcp.load(sd, checkpoint_id=path)
                    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
                dist.barrier()
                dt = time.perf_counter() - t0
                if rnd >= a.warmup:
                    samples[load].append(worst(dt))
            clean()
    ck.close()
    cached.close()
    if rank == 0:
        print(json.dumps({"world": world, "state_bytes": int(total[0]), "samples": samples, "blocked": blocked}),
              flush=True)
    dist.destroy_process_group()


# =========================================================================== the driver


def run_job(world: int, a: argparse.Namespace) -> dict[str, Any]:
    port = str(free_port())
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--size", str(a.size), "--rounds", str(a.rounds),
            "--warmup", str(a.warmup), "--dir", a.dir] + (["--cold"] if a.cold else [])
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        for k in [k for k in env if k.startswith("CKPTD_")]:
            del env[k]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = None
    for rank, p in enumerate(procs):
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"rank {rank} of the {world}-rank job failed:\n{stderr[-3000:]}")
        for line in stdout.splitlines():
            if line.startswith("{"):
                out = json.loads(line)
    assert out is not None
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| ranks | method | median s | min-max s | GiB/s | blocked (median) | ckptd / DCP time |",
             "|---|---|---|---|---|---|---|"]
    pairs = {"ckptd.save": "dcp.save", "ckptd.async": "dcp.async_save", "ckptd.restore": "dcp.load"}
    for r in results:
        s, b, gib = r["samples"], r["blocked"], r["state_bytes"] / (1 << 30)
        for m in ("ckptd.save", "dcp.save", "ckptd.async", "dcp.async_save", "dcp.async_cached", "ckptd.restore",
                  "dcp.load"):
            xs = s[m]
            ratio = f"{median(xs) / median(s[pairs[m]]):.2f}" if m in pairs else ""
            if m == "ckptd.async":
                cached = s["dcp.async_cached"]
                ratio += (f" (blocked {median(b[m]) / median(b['dcp.async_save']):.2f};"
                          f" vs cached {median(xs) / median(cached):.2f},"
                          f" blocked {median(b[m]) / median(b['dcp.async_cached']):.2f})")
            blk = f"{median(b[m]) * 1000:.0f} ms" if m in b else ""
            lines.append(f"| {r['world']} | {m} | {median(xs):.3f} | {min(xs):.3f}-{max(xs):.3f} | "
                         f"{gib / median(xs):.2f} | {blk} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    import _bench_util as U

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=U.parse_size, default=U.parse_size("256M"), help="state in all (default 256M)")
    p.add_argument("--worlds", default="2,4", help="rank counts, one job each (default 2,4)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first rounds (default 1)")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir in /tmp)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each load (root)")
    p.add_argument("--json", help="write every sample here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    own = a.dir is None
    a.dir = a.dir or tempfile.mkdtemp(prefix="ckptd-bench-sharded-")
    info = {"size": a.size, "rounds": a.rounds, "warmup": a.warmup, "cold": a.cold, "cpus": os.cpu_count(),
            "loadavg_before": U.loadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    results = []
    try:
        for world in (int(w) for w in a.worlds.split(",")):
            os.makedirs(os.path.join(a.dir, f"w{world}", "ckptd"), exist_ok=True)
            t0 = time.monotonic()
            r = run_job(world, a)
            r.update(seconds=round(time.monotonic() - t0, 1), loadavg_after=U.loadavg())
            results.append(r)
            print(f"[{time.strftime('%H:%M:%S')}] {world} ranks done in {r['seconds']} s, load {r['loadavg_after']}",
                  file=sys.stderr, flush=True)
    finally:
        if own:
            shutil.rmtree(a.dir, ignore_errors=True)
    info["loadavg_after"] = U.loadavg()
    print(f"state {a.size / (1 << 20):.0f} MiB, {a.rounds} rounds, {'cold' if a.cold else 'warm'} reads, "
          f"{os.cpu_count()} CPUs, load average {info['loadavg_before']} -> {info['loadavg_after']}")
    print(table(results))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        U.dump_json(a.json, {"info": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
