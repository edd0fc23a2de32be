"""Shared helpers for the ckptd benchmarks (state builder, timing, I/O, memory).

Nothing here is part of the ckptd library; the benchmarks import it from the
benchmarks/ directory (``python benchmarks/bench_checkpoint.py`` puts that
directory first on sys.path).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

MiB = 1 << 20
GiB = 1 << 30

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from ckptd import store  # noqa: E402  (after the path above: the benchmarks run from a checkout)

# --------------------------------------------------------------------------- sizes / stats


def parse_size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def fmt_size(n: float) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB}G"
    if n >= GiB:
        return f"{n / GiB:.2f}G"
    return f"{n / MiB:.0f}M"


def summarize(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": list(samples),
    }


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.dt = time.perf_counter() - self.t0


# --------------------------------------------------------------------------- model-like state


class Block(nn.Module):
    """A transformer-like block: 2 big matrices, 2 medium, many small vectors."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)


def block_numel(d: int) -> int:
    return 12 * d * d + 13 * d + 4 * d  # weights + biases + 2 layernorms (w, b)


class ModelLike(nn.Module):
    """Parameters of mixed sizes summing to ``param_bytes`` (fp32).

    ~20% in one embedding matrix, the rest in transformer-like blocks (a few
    large matrices and many small vectors per block), plus a 1-D filler to hit
    the target size exactly.
    """

    def __init__(self, param_bytes: int, d: int = 512) -> None:
        super().__init__()
        n = max(param_bytes // 4, 64 * d)
        vocab = max(1, int(n * 0.2) // d)
        self.embed = nn.Embedding(vocab, d)
        remaining = n - vocab * d - 2 * d
        nblocks = max(1, remaining // block_numel(d))
        if remaining < nblocks * block_numel(d):
            nblocks = max(0, remaining // block_numel(d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(nblocks))
        self.ln_f = nn.LayerNorm(d)
        rest = remaining - nblocks * block_numel(d)
        if rest > 0:
            self.filler = nn.Parameter(torch.zeros(rest))


def build_state(total_bytes: int, lr: float = 1e-3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Model + Adam whose state (params + exp_avg + exp_avg_sq) is ~total_bytes."""
    torch.manual_seed(0)
    with torch.no_grad():
        model = ModelLike(total_bytes // 3)
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
    for p in model.parameters():
        p.grad = p.detach() * 1e-3
    opt.step()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    return model, opt


def fresh_state(total_bytes: int, lr: float = 1e-3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model of :func:`build_state` as a script that starts builds it: default initialisation, an Adam
    without state yet (the optimizer's moments appear at its first step, or from a checkpoint)."""
    model = ModelLike(total_bytes // 3)
    return model, torch.optim.Adam(model.parameters(), lr=lr, foreach=False)


def live_state_dict(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """State dict whose tensors alias the live parameters / optimizer state."""
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_tensors(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_tensors(v, f"{prefix}{i}."))
    return out


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in flatten_tensors(live_state_dict(model, opt)).values())


def tensor_count(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    return len(flatten_tensors(live_state_dict(model, opt)))


@torch.no_grad()
def copy_into_live(loaded: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Copy a loaded state dict into the live model/optimizer tensors (touches every byte)."""
    src = flatten_tensors(loaded)
    dst = flatten_tensors(live_state_dict(model, opt))
    for k, t in dst.items():
        t.copy_(src[k])


def buffer_of(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview over a contiguous CPU tensor (no copy)."""
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().data


# --------------------------------------------------------------------------- I/O helpers


fsync_path = store.fsync_path  # a file or a directory, as the baselines' durable writes need


def fsync_tree(root: str) -> None:
    """fsync every file and directory under root, then root's parent."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)
    fsync_path(os.path.dirname(os.path.abspath(root)))


def write_all(fd: int, mv: memoryview, chunk: int = 64 * MiB) -> None:
    n = len(mv)
    off = 0
    while off < n:
        off += os.write(fd, mv[off : min(n, off + chunk)])


def readinto_all(f: Any, mv: memoryview, chunk: int = 64 * MiB) -> None:
    n = len(mv)
    off = 0
    while off < n:
        got = f.readinto(mv[off : min(n, off + chunk)])
        if not got:
            raise EOFError("short read")
        off += got


def remove(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


_DROP_STATUS: dict[str, Any] = {}


def drop_caches() -> bool:
    """sync + drop the page cache; returns False (once reported) if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        _DROP_STATUS["error"] = repr(e)
        return False


def drop_file_cache(paths: Iterable[str]) -> None:
    """The page cache of these files dropped, without root: os.sync(), then posix_fadvise(DONTNEED) on each
    (a page still dirty would stay; the sync cleaned them). :func:`resident_bytes` says what is left."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths: Iterable[str]) -> int | None:
    """Bytes of these files in the page cache (util-linux ``fincore``); None when fincore is missing."""
    import subprocess

    paths = list(paths)
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *paths],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(x) for x in out.split())


# --------------------------------------------------------------------------- memory


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def proc_status(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            v = v.strip()
            if v.endswith(" kB"):
                out[k] = int(v[:-3]) * 1024
    return out


def rss() -> int:
    return proc_status()["VmRSS"]


def hwm() -> int:
    return proc_status()["VmHWM"]


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``echo 5 > clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children_hwm() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


# --------------------------------------------------------------------------- small training loop (P4)


def make_trainer(hidden: int = 384, batch: int = 64, layers: int = 3) -> Callable[[], None]:
    """A small MLP training step (1 intra-op thread); returns a step() closure."""
    torch.manual_seed(1)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(hidden, hidden), nn.GELU()]
    net = nn.Sequential(*mods, nn.Linear(hidden, 10))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(batch, hidden)
    y = torch.randint(0, 10, (batch,))
    lossf = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = lossf(net(x), y)
        loss.backward()
        opt.step()

    return step


def time_steps(step: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def time_steps_while(step: Callable[[], None], in_flight: Callable[[], bool],
                     max_steps: int = 100000) -> tuple[list[float], float]:
    """Run steps while in_flight(); keep only steps that *started* while in flight.

    Returns (step times, wall time of the loop).
    """
    out: list[float] = []
    t_start = time.perf_counter()
    while in_flight() and len(out) < max_steps:
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out, time.perf_counter() - t_start


def dump_json(path: str, obj: Any) -> None:
    """Results, replaced atomically and durably (the store's writer; the directory named may be a link)."""
    store.replace_file(path, json.dumps(obj, indent=1, default=str).encode(), follow_dir=True)


def report(out: str, results: dict[str, Any], table: str) -> int:
    """The end of a benchmark: the table and the total wall time printed, the results (with the table) in ``out``."""
    print(table)
    print(f"\ntotal wall time {results['wall_s']:.0f} s")
    results["table"] = table
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    dump_json(out, results)
    print(f"wrote {out}")
    return 0


def iter_chunks(n: int, chunk: int) -> Iterable[tuple[int, int]]:
    off = 0
    while off < n:
        yield off, min(n, off + chunk)
        off += chunk
