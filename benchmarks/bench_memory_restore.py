"""Restore from the memory tier against restore from disk and against a plain memcpy of the same bytes.

    python benchmarks/bench_memory_restore.py --size 64MiB --runs 3 [--dir DIR]

A model of SIZE (4 MiB tensors) is saved once into a memory region (memtier.create, as `ckptd run --memory`
gives it) and to DIR. Then, each run: restore() of a fresh Checkpointer over the same region (reads the slot:
"memory"), restore() with no region ("disk", the page cache warm; "disk cold" too when this process may drop
the caches, i.e. root), and a threaded memcpy of the same bytes into the same tensors ("memcpy", the floor).
Prints one JSON object: medians and the memory/memcpy ratio. docs/memory-tier.md holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ckptd
from _bench_util import drop_caches, loadavg, parse_size
from ckptd import env, memtier
from ckptd.snapshot import Snapshot, copy_pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="64MiB")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    size = parse_size(args.size)
    n = max(1, size // (4 << 20))
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1 << 20)) for _ in range(n)])
    work = args.dir or tempfile.mkdtemp(prefix="bench-mem-")
    root = os.path.join(work, "ck")
    fd = memtier.create()
    os.environ[env.MEMORY_FD] = str(fd)
    ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
    ck.step(1)
    ck.save(block=True)
    ck.close()
    src = [p.detach().clone() for p in model]

    def restore(memory: bool) -> float:
        if memory:
            os.environ[env.MEMORY_FD] = str(fd)
        else:
            os.environ.pop(env.MEMORY_FD, None)
        c = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
        t0 = time.perf_counter()
        c.restore()
        took = time.perf_counter() - t0
        c.close()
        return took

    def memcpy() -> float:
        pool = Snapshot().helper()
        t0 = time.perf_counter()
        copy_pairs([(d.data, s) for d, s in zip(model, src, strict=True)], pool)
        took = time.perf_counter() - t0
        pool.shutdown()
        return took

    results: dict[str, list[float]] = {"memory": [], "disk": [], "memcpy": []}
    cold = drop_caches()
    if cold:
        results["disk cold"] = []
    for _ in range(args.runs):
        results["memory"].append(restore(True))
        results["disk"].append(restore(False))
        results["memcpy"].append(memcpy())
        if cold and drop_caches():
            results["disk cold"].append(restore(False))
    med = {k: statistics.median(v) for k, v in results.items() if v}
    out = {"bytes": n << 22, "runs": args.runs, "loadavg": loadavg(),
           "median_seconds": {k: round(v, 4) for k, v in med.items()},
           "gib_per_s": {k: round((n << 22) / v / 2**30, 2) for k, v in med.items()},
           "memory_vs_memcpy": round(med["memcpy"] / med["memory"], 3),
           "memory_vs_disk": round(med["disk"] / med["memory"], 3)}
    print(json.dumps(out, indent=1))
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
