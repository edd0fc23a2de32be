"""Evaluate every checkpoint of a train_toy.py run on held-out data and record the results in them.

    python examples/evaluate_toy.py checkpoints          # val_loss and val_acc of each checkpoint not yet evaluated
    ckptd best checkpoints --metric val_loss            # then: the best one, verified
    ckptd export checkpoints --best val_acc:max -o best.safetensors

Each checkpoint's weights are loaded with ``ckptd.load_state`` (checksums verified; nothing in a checkpoint can
run code) and the results are written back with ``ckptd.add_metrics``, into the checkpoint's manifest, where
``ckptd best``, ``ckptd ls``, ``keep_best`` and ``export --best`` read them. It can run beside the training:
a checkpoint removed by retention meanwhile is skipped.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import ckptd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_toy import N_IN, build  # the same model as the training script


def held_out(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh inputs labelled by the training data's teacher (make_data's generator, same draws)."""
    g = torch.Generator().manual_seed(1234)
    torch.randn(2048, N_IN, generator=g)  # the training inputs: skipped, to reach the same teacher
    teacher = torch.randn(N_IN, 10, generator=g)
    x = torch.randn(n, N_IN, generator=torch.Generator().manual_seed(99))
    return x, (x @ teacher).argmax(dim=1)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return {"val_loss": torch.nn.functional.cross_entropy(out, y).item(),
            "val_acc": (out.argmax(dim=1) == y).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=os.environ.get("CKPTD_DIR", "checkpoints"), help="checkpoint directory")
    p.add_argument("--again", action="store_true", help="evaluate checkpoints that already have val_loss too")
    args = p.parse_args(argv)
    x, y = held_out()
    model = build(1)[0]
    for info in ckptd.list_checkpoints(args.dir):  # what `ckptd ls DIR --json` lists
        if not info.valid or ("val_loss" in info.metrics and not args.again):
            continue
        try:
            model.load_state_dict(ckptd.load_state(info.path)["model"])
            ckptd.add_metrics(info.path, **evaluate(model, x, y))
        except ckptd.NotFoundError:
            print(f"{info.name}: removed meanwhile (retention); skipped", flush=True)
            continue
        except ckptd.CorruptCheckpointError as exc:
            print(f"{info.name}: not evaluated: {exc}", flush=True)
            continue
        done = ckptd.list_checkpoints(args.dir)
        m = next(i.metrics for i in done if i.name == info.name)
        print(f"{info.name}: step {info.step} val_loss={m['val_loss']:.4f} val_acc={m['val_acc']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
