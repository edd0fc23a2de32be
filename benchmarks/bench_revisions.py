"""Two source trees of ckptd side by side: save stall, durable save, restore and the supervisor's memory.

    python benchmarks/bench_revisions.py --a 9787485 --b . --size 512M --rounds 7

Each of --a / --b is a directory holding a ckptd checkout or a git revision of this repository (extracted
with `git archive` into a scratch directory). Every measurement runs in a fresh Python process whose
`ckptd` is imported from that tree (PYTHONPATH first; the process prints which file it imported and the
benchmark checks it), and the two trees are interleaved round by round, the order alternating, so that the
drift of a shared machine hits both alike. The state is `_bench_util.build_state` (a transformer-like model
and Adam) from this checkout's benchmarks/, the same for both trees.

Per round and tree:
1. save: one save to warm up (the first save allocates its snapshot buffer), then 3 saves, each timed to the
   return of `save()` (the training stall) and to the end of `wait()` (durable: written, fsynced, committed);
2. restore: a fresh process restores the newest checkpoint of (1), cold (the checkpoint's pages dropped
   with POSIX_FADV_DONTNEED first, so no root is needed);
3. supervisor: `python -m ckptd run` of examples/train_toy.py from that tree; the supervisor's own RSS
   (not its child's) once the run has committed 3 checkpoints, then SIGTERM.

Ratios are B/A of the medians (below 1: B is faster or smaller). The load is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

WORKER = r"""
import json, os, sys, time
sys.path.insert(1, BENCH)
import ckptd
import ckptd.store
from ckptd.checkpointer import Checkpointer
# _bench_util names the store's durable-write helpers (used by other benchmarks' baselines, not here),
# which an older tree may not have
vars(ckptd.store).setdefault("fsync_path", None)
from _bench_util import build_state

def drop(root):
    os.sync()
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

model, opt = build_state(SIZE)
ck = Checkpointer(model=model, optimizer=opt, dir=DIR, every_steps=None, every_seconds=None,
                  async_save=True, keep_last=2)
out = {"module": ckptd.__file__}
if MODE == "save":
    stall, durable = [], []
    for i in range(4):
        os.sync()
        t0 = time.perf_counter()
        ck.save(i + 1, kind="manual")
        t1 = time.perf_counter()
        ck.wait()
        t2 = time.perf_counter()
        if i:
            stall.append(t1 - t0)
            durable.append(t2 - t0)
    out.update(stall=stall, durable=durable)
else:
    drop(DIR)
    t0 = time.perf_counter()
    ck.restore()
    out["restore"] = time.perf_counter() - t0
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)
"""


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def tree_of(spec: str, scratch: str) -> str:
    if os.path.isdir(os.path.join(spec, "ckptd")):
        return os.path.abspath(spec)
    dest = os.path.join(scratch, "tree-" + spec.replace("/", "_"))
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", REPO, "archive", spec], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


SHIM = """
import sys
# an editable install of another checkout hooks the import system ahead of sys.path: unhook it
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
sys.path.insert(0, {tree!r})
"""


def env_for(tree: str) -> dict[str, str]:
    """The environment of a process (and its children) that imports ckptd from ``tree``: a sitecustomize
    on PYTHONPATH, run by site after the .pth files, takes this tree ahead of any installed ckptd."""
    shim = os.path.join(os.path.dirname(tree), "shim-" + os.path.basename(tree))
    if not os.path.isdir(shim):
        os.makedirs(shim)
        with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
            f.write(SHIM.format(tree=tree))
    return dict(os.environ, PYTHONPATH=shim)  # run it with cwd=tree: python -c puts the cwd first


def run_worker(tree: str, mode: str, size: int, directory: str) -> dict:
    code = f"BENCH={HERE!r}\nSIZE={size}\nDIR={directory!r}\nMODE={mode!r}\n" + WORKER
    env = env_for(tree)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                          timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            if not res["module"].startswith(tree):
                raise SystemExit(f"the worker imported {res['module']}, not the tree {tree}")
            return res
    raise SystemExit(f"worker {mode} in {tree} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                     f"{proc.stderr[-4000:]}")


def supervisor_rss(tree: str, directory: str) -> float:
    import psutil

    env = env_for(tree)
    argv = [sys.executable, "-m", "ckptd", "run", "--dir", directory,
            os.path.join(tree, "examples", "train_toy.py"), "--steps", "100000",
            "--every-steps", "20", "--step-delay", "0.01"]
    proc = subprocess.Popen(argv, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    seen: set[str] = set()  # retention removes old ones: count every name ever listed
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if os.path.isdir(directory):
                seen.update(n for n in os.listdir(directory) if n.startswith("step-"))
            if len(seen) >= 3:
                return psutil.Process(proc.pid).memory_info().rss
            if proc.poll() is not None:
                raise SystemExit(f"ckptd run of {tree} ended with {proc.returncode} before 3 checkpoints")
            time.sleep(0.2)
        raise SystemExit(f"ckptd run of {tree}: no 3 checkpoints in 300 s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def parse_size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(t[:-1]) * mult[t[-1]]) if t[-1] in mult else int(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="baseline: a checkout directory or a git revision")
    ap.add_argument("--b", default=REPO, help="candidate: a checkout directory or a git revision (default: this)")
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write every sample as JSON here")
    args = ap.parse_args()
    size = parse_size(args.size)
    scratch = tempfile.mkdtemp(prefix="ckptd-revs-", dir=os.path.dirname(REPO))
    try:
        trees = {"A": tree_of(args.a, scratch), "B": tree_of(args.b, scratch)}
        samples: dict[str, dict[str, list[float]]] = {k: {"stall": [], "durable": [], "restore": [], "rss": []}
                                                       for k in trees}
        print(f"A = {args.a} ({trees['A']})\nB = {args.b} ({trees['B']})\nstate {args.size}, "
              f"{args.rounds} rounds, load before: {loadavg()}", flush=True)
        for r in range(args.rounds):
            order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
            for k in order:
                d = os.path.join(scratch, f"ck-{k}-{r}")
                res = run_worker(trees[k], "save", size, d)
                samples[k]["stall"] += res["stall"]
                samples[k]["durable"] += res["durable"]
                samples[k]["restore"].append(run_worker(trees[k], "restore", size, d)["restore"])
                shutil.rmtree(d)
                sd = os.path.join(scratch, f"sup-{k}-{r}")
                samples[k]["rss"].append(supervisor_rss(trees[k], sd) / (1 << 20))
                shutil.rmtree(sd, ignore_errors=True)
            print(f"round {r + 1}/{args.rounds} done, load {loadavg()}", flush=True)
        print(f"\nload after: {loadavg()}")
        print(f"{'measure':<34} {'A median':>10} {'B median':>10} {'B/A':>6}   (min-max A | B)")
        names = {"stall": "save stall (s)", "durable": "durable save (s)",
                 "restore": "restore, fresh process, cold (s)", "rss": "supervisor RSS (MiB)"}
        for m, label in names.items():
            a, b = samples["A"][m], samples["B"][m]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{label:<34} {ma:>10.4f} {mb:>10.4f} {mb / ma:>6.3f}   "
                  f"({min(a):.4f}-{max(a):.4f} | {min(b):.4f}-{max(b):.4f})")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"a": args.a, "b": args.b, "size": size, "samples": samples}, f, indent=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
