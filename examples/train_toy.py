"""A small, deterministic training run that uses ckptd: the README's main example.

    python examples/train_toy.py --steps 300            # plain
    ckptd run examples/train_toy.py --steps 300         # supervised: restarts, emergency saves

A 3-layer MLP with dropout learns a fixed random "teacher" on synthetic data
(seeded), with AdamW, a cosine LR schedule and a shuffling sampler whose
position is checkpointed, so a run stopped after any step and resumed ends
bit-identical to an uninterrupted one. It prints its final step and a digest of
the model's parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any

import torch

import ckptd

N_SAMPLES, N_IN, N_OUT, BATCH = 2048, 32, 10, 32


class ShuffleSampler:
    """Yields index batches of a per-epoch permutation; resumable mid-epoch."""

    def __init__(self, n: int, batch: int, seed: int = 1) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.pos = 0, 0

    def next_batch(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        idx = torch.randperm(self.n, generator=g)[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.pos, self.seed = sd["epoch"], sd["pos"], sd["seed"]


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, N_IN, generator=g)
    teacher = torch.randn(N_IN, N_OUT, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def build(total_steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, ShuffleSampler]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_IN, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, N_OUT),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return model, opt, sched, ShuffleSampler(N_SAMPLES, BATCH)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train(steps: int, dir: str | None = None, every_steps: int | None = 50, every_seconds: float | None = None,
          stop_after: int | None = None, step_delay: float = 0.0, keep_last: int | None = 3,
          verbose: bool = False,
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer, ckptd.Checkpointer]:
    """Train to ``steps``; with ``stop_after`` stop (checkpointed) after that many steps."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x, y = make_data()
    model, opt, sched, sampler = build(steps)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, extra={"sampler": sampler},
                            dir=dir, every_steps=every_steps, every_seconds=every_seconds, keep_last=keep_last)
    start = ck.restore()
    if verbose:
        print(f"start_step={start}", flush=True)
    end = steps if stop_after is None else min(steps, stop_after)
    for step in range(start, end):
        model.train()
        idx = sampler.next_batch()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step_delay:
            time.sleep(step_delay)
        ck.step(step + 1, metrics={"loss": loss.item()}, epoch=sampler.epoch)
    ck.close()
    return model, opt, ck


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="total training steps (default 300)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: $CKPTD_DIR or ./checkpoints)")
    p.add_argument("--every-steps", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--keep-last", type=int, default=3, help="keep the newest N checkpoints (default 3)")
    p.add_argument("--step-delay", type=float, default=float(os.environ.get("TOY_STEP_DELAY", "0")),
                   help="sleep this long in every step (to watch or interrupt a run)")
    args = p.parse_args(argv)
    model, _, ck = train(args.steps, dir=args.dir, every_steps=args.every_steps, keep_last=args.keep_last,
                         step_delay=args.step_delay, verbose=True)
    print(f"final_step={ck.current_step} digest={digest(model)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
