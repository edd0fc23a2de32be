#!/usr/bin/env python3
"""Bit rot: random single-bit flips, truncations and extensions of every file of a
checkpoint; each must be detected before any value reaches the model, and the previous one used.

    python scripts/bitrot.py --count 10000 --json bitrot.json

Two checkpoints (steps 1 and 2: model, AdamW state, scheduler, RNG, user state). Each trial damages one
file of step 2 (file chosen uniformly; 60% a single-bit flip at a uniform offset, 20% a truncation to a
uniform length, 20% an extension by 1-64 random bytes), then restores into a fresh model and optimizer:
  * even trials, step 1 present: restore() must return 1 with exactly step 1's values (the previous
    valid checkpoint), and step 2 must be quarantined;
  * odd trials, step 2 alone: restore() must return 0 and leave the model and optimizer exactly as they
    were (nothing of the damaged checkpoint reached them); load_state() and verify() must refuse it.
A damage that leaves the manifest meaning the same (it is JSON: e.g. a trailing newline, or ``1e-05``
flipped to ``1E-05``) is counted apart as "harmless" and must restore step 2 exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

from _report import emit  # scripts/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))


def _objects(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, n: int) -> None:
    import torch

    for _ in range(n):
        loss = model(torch.randn(4, 32)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _state(model, opt) -> list:
    import torch

    out = [t.detach().clone() for t in model.state_dict().values()]
    for s in opt.state_dict()["state"].values():
        out += [v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v) for v in s.values()]
    return out


def _same(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def setup(root: str) -> tuple[list, list]:
    import ckptd

    model, opt = _objects()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
    states = []
    for step in (1, 2):
        _train(model, opt, 3)
        ck.user["note"] = f"step {step}"
        ck.step(step, metrics={"loss": 1e-05 * step})
        ck.save(block=True)
        states.append(_state(model, opt))
    ck.close()
    return states[0], states[1]


def damage(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    r = rng.random()
    if r < 0.6:
        pos = rng.randrange(len(data))
        return "flip", data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:]
    if r < 0.8:
        return "truncate", data[: rng.randrange(len(data))]
    return "extend", data + rng.randbytes(rng.randint(1, 64))


def run(count: int, seed: int = 15, work: str | None = None) -> dict:
    import torch

    import ckptd
    from ckptd import store

    torch.set_num_threads(1)
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ckptd-bitrot-")
    t0 = time.monotonic()
    rng = random.Random(seed)
    root = os.path.join(work, "ck")
    try:
        s1, s2 = setup(root)
        name1, name2 = store.checkpoint_name(1), store.checkpoint_name(2)
        keep1 = os.path.join(work, "keep1")
        shutil.copytree(os.path.join(root, name1), keep1)
        p2 = os.path.join(root, name2)
        pristine = {f: open(os.path.join(p2, f), "rb").read() for f in sorted(os.listdir(p2))}
        manifest = json.loads(pristine[store.MANIFEST])
        failures: list[str] = []
        counts = {"detected": 0, "harmless": 0}
        by: dict[str, int] = {}
        for i in range(count):
            shutil.rmtree(root)
            os.mkdir(root)
            with_prev = i % 2 == 0
            if with_prev:
                shutil.copytree(keep1, os.path.join(root, name1))
            os.mkdir(p2)
            fname = rng.choice(sorted(pristine))
            how, bad = damage(pristine[fname], rng)
            for f, data in pristine.items():
                with open(os.path.join(p2, f), "wb") as out:
                    out.write(bad if f == fname else data)
            key = f"{fname}:{how}"
            by[key] = by.get(key, 0) + 1
            harmless = False
            if fname == store.MANIFEST:
                try:
                    harmless = json.loads(bad) == manifest
                except ValueError:
                    pass
            model, opt = _objects(seed=1000 + i)
            before = _state(model, opt)
            ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False, save_on_close=False)
            step = ck.restore()
            ck.close()
            after = _state(model, opt)
            tag = f"trial {i} ({key})"
            if harmless:
                counts["harmless"] += 1
                if step != 2 or not _same(after, s2):
                    failures.append(f"{tag}: a harmless change did not restore step 2 exactly")
                continue
            counts["detected"] += step != 2
            if with_prev and (step != 1 or not _same(after, s1)):
                failures.append(f"{tag}: restored step {step}, not the previous valid checkpoint exactly")
            if not with_prev:
                if step != 0 or not _same(after, before):
                    failures.append(f"{tag}: restored step {step}; the model was touched: {not _same(after, before)}")
            if os.path.exists(p2):
                failures.append(f"{tag}: the damaged checkpoint was not quarantined")
            if i % 10 == 1:  # load_state and verify on the damaged copy too (in quarantine now)
                qdir = os.path.join(root, store.QUARANTINE_DIR)
                moved = os.path.join(qdir, os.listdir(qdir)[0])
                if store.verify(moved).valid:
                    failures.append(f"{tag}: verify() accepted it")
                try:
                    ckptd.load_state(moved)
                    failures.append(f"{tag}: load_state() accepted it")
                except ckptd.CorruptCheckpointError:
                    pass
        return {"trials": count, "by_file_and_damage": by, **counts, "failed": len(failures),
                "failures": failures[:40], "seconds": round(time.monotonic() - t0, 1)}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args()
    import logging

    logging.getLogger("ckptd").addHandler(logging.NullHandler())  # quiet: one line per restore otherwise
    logging.getLogger("ckptd").propagate = False
    report = run(a.count, a.seed)
    return emit(report, a.json)


if __name__ == "__main__":
    sys.exit(main())
