"""A two-stage pipeline with branches: train stage A, branch two B runs from A's best checkpoint with different
learning rates, evaluate everything, export the best B.

    python examples/pipeline.py runs          # under a minute on a CPU; again: every run resumes (nothing to redo)
    ckptd ls --tree runs                      # a <- b-lr0.003, b-lr0.0003
    ckptd lineage runs/b-lr0.0003/latest      # back to stage A: step, stage, what changed

Stage A (``runs/a``, stage ``a``) trains the toy model of ``train_toy.py``; every checkpoint is evaluated on
held-out data (``evaluate_toy.py``) and the results are recorded in its manifest (``ckptd.add_metrics``). Each B
run (``runs/b-lrLR``, stage ``b``) starts with ``ck.restore(stage="a", metric="val_loss", parts=("model",
"optimizer"))``: A's best checkpoint by validation loss, its weights and optimizer moments, with a fresh cosine
schedule at its own learning rate. The B checkpoints are evaluated the same way, and the best of both runs is
exported with ``ckptd export`` to ``runs/best-b.safetensors``. The last lines name the choices.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

import ckptd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate_toy import evaluate, held_out

from train_toy import BATCH, N_SAMPLES, ShuffleSampler, build, make_data

A_STEPS, B_STEPS, EVERY = 200, 150, 50
B_LRS = (3e-3, 3e-4)


def train(dir: str, stage: str, steps: int, lr: float, branch_from: str | None = None) -> None:
    """One run of ``stage`` in ``dir`` at learning rate ``lr``; a B run branches from the best of ``branch_from``."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x, y = make_data()
    model = build(steps)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    sampler = ShuffleSampler(N_SAMPLES, BATCH)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, extra={"sampler": sampler}, dir=dir,
                            stage=stage, every_steps=EVERY)
    if branch_from is None:
        start = ck.restore()
    else:
        start = ck.restore(stage=branch_from, metric="val_loss", parts=("model", "optimizer"))
        if ck.branched:  # the checkpoint's optimizer came with its learning rate: this run's own instead
            for group in opt.param_groups:
                group["lr"] = lr
    for step in range(start, steps):
        model.train()
        idx = sampler.next_batch()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ck.step(step + 1, metrics={"loss": loss.item()})
    ck.close()


def evaluate_run(dir: str) -> list[ckptd.CheckpointInfo]:
    """Record val_loss and val_acc in every checkpoint of ``dir`` that has none yet; the checkpoints, evaluated."""
    x, y = held_out()
    model = build(1)[0]
    for info in ckptd.list_checkpoints(dir):
        if info.valid and "val_loss" not in info.metrics:
            model.load_state_dict(ckptd.load_state(info.path)["model"])
            ckptd.add_metrics(info.path, **evaluate(model, x, y))
    return [i for i in ckptd.list_checkpoints(dir) if i.valid and "val_loss" in i.metrics]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="runs", help="directory of the runs (default ./runs)")
    args = p.parse_args(argv)
    a = os.path.join(args.root, "a")
    train(a, "a", A_STEPS, 3e-3)
    a_best = min(evaluate_run(a), key=lambda i: (i.metrics["val_loss"], -i.step))
    print(f"a_best={a_best.path} step={a_best.step} val_loss={a_best.metrics['val_loss']:.4f}", flush=True)
    candidates = []
    for lr in B_LRS:
        b = os.path.join(args.root, f"b-lr{lr:g}")
        train(b, "b", B_STEPS, lr, branch_from="a")
        best = min(evaluate_run(b), key=lambda i: (i.metrics["val_loss"], -i.step))
        print(f"b lr={lr:g}: best {best.path} step={best.step} val_loss={best.metrics['val_loss']:.4f}", flush=True)
        candidates.append(best)
    chosen = min(candidates, key=lambda i: i.metrics["val_loss"])
    out = os.path.join(args.root, "best-b.safetensors")
    subprocess.run([sys.executable, "-m", "ckptd", "export", chosen.path, "-o", out, "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"chosen={chosen.path} val_loss={chosen.metrics['val_loss']:.4f} exported={out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
