"""Restore time against a raw read of the same file, warm and cold (root: drops the page cache).

Run against either tree: PYTHONPATH=TREE python benchmarks/restore_copy_cost.py SIZE_MIB RUNS CKPT_DIR
Used for docs/performance.md, "Restore: read, verify, then apply"; also times SHA-256 of the tensor file
(what a keyed digest over the content would add) and an HMAC of the manifest.
"""
import hashlib
import hmac
import json
import os
import statistics
import sys
import time

import torch

import ckptd

size_mib, runs, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n = size_mib // 4  # 4 MiB per tensor (plus optimizer state: see below)
torch.manual_seed(0)
model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1 << 20)) for _ in range(n)])
ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False, keep_last=2)
if not os.path.isdir(root) or len(os.listdir(root)) < 2:
    for s in (1, 2):
        ck.step(s)
        ck.save(block=True)
path = os.path.join(ckptd.latest_valid(root).path, "tensors.safetensors")


def drop():
    os.sync()
    open("/proc/sys/vm/drop_caches", "w").write("3\n")


bufs = [torch.zeros(1 << 20) for _ in range(n)]


def raw():
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        h = int.from_bytes(f.read(8), "little")
        f.read(h)
        for b in bufs:
            f.readinto(memoryview(b.numpy()).cast("B"))
    return time.perf_counter() - t0


def restore():
    t0 = time.perf_counter()
    ck.restore()
    return time.perf_counter() - t0


out = {}
for mode in ("warm", "cold"):
    for fn in (raw, restore):
        fn()  # warm-up
    r, w = [], []
    for i in range(runs):
        for fn, acc in (((raw, r), (restore, w)) if i % 2 else ((restore, w), (raw, r))):
            if mode == "cold":
                drop()
            acc.append(fn())
    out[mode] = {"raw_ms": statistics.median(r) * 1e3, "restore_ms": statistics.median(w) * 1e3,
                 "ratio": statistics.median(r) / statistics.median(w)}
# keyed digest cost: SHA-256 of the tensor file's bytes (what an HMAC over the content would add)
data = open(path, "rb").read()
t0 = time.perf_counter()
hashlib.sha256(data).digest()
out["sha256_ms"] = (time.perf_counter() - t0) * 1e3
t0 = time.perf_counter()
hmac.new(b"k" * 32, open(os.path.join(os.path.dirname(path), "manifest.json"), "rb").read(), "sha256").digest()
out["hmac_manifest_ms"] = (time.perf_counter() - t0) * 1e3
print(json.dumps({"size_mib": size_mib, "tree": ckptd.__file__, **out}))
