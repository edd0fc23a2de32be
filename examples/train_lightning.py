"""A PyTorch Lightning run with ckptd: the README's Lightning example (needs ``pip install 'ckptd[lightning]'``).

    python examples/train_lightning.py --epochs 5                  # plain: resumes by itself when run again
    ckptd run --dir checkpoints examples/train_lightning.py --epochs 5 --step-delay 0.05   # supervised

A small MLP classifier with dropout on seeded synthetic data, AdamW and a StepLR, a validation each epoch that
logs ``val_loss``; the two best checkpoints by ``val_loss`` and the newest are kept. What ckptd adds to the
Lightning script is marked ``# ckptd``. It prints its start step and, at the end, its final step and a digest
of the parameters: a run stopped (``ckptd stop``, SIGTERM, Ctrl-C of ``ckptd run``) and resumed prints the same
digest as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

import ckptd  # ckptd
from ckptd.integrations.lightning import CkptdCallback  # ckptd


class Classifier(pl.LightningModule):
    def __init__(self, step_delay: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
        self.step_delay = step_delay

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        if self.step_delay:
            time.sleep(self.step_delay)  # to watch `ckptd status`, `ckptd save`, `ckptd stop` at work
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--dir", default=None, help="checkpoint directory (default: $CKPTD_DIR, else ./checkpoints)")
    p.add_argument("--step-delay", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(1)  # the same thread count in every run: bit-identical results
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1200, 16, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 4] > 1).long()) % 4
    train = torch.utils.data.TensorDataset(x[:1000], y[:1000])
    val = torch.utils.data.TensorDataset(x[1000:], y[1000:])
    train_loader = ckptd.DataLoader(train, batch_size=32, shuffle=True)  # ckptd: its position is checkpointed
    model = Classifier(args.step_delay)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,  # ckptd: its checkpoints replace ModelCheckpoint's
        callbacks=[CkptdCallback(args.dir, every_n_train_steps=50, monitor="val_loss", save_top_k=2)],  # ckptd
    )
    start = {}

    class PrintStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            start["step"] = trainer.global_step
            print(f"start_step={trainer.global_step}", flush=True)

    trainer.callbacks.append(PrintStart())
    trainer.fit(model, train_loader, torch.utils.data.DataLoader(val, batch_size=100))
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    print(f"final_step={trainer.global_step} digest={h.hexdigest()[:16]}", flush=True)


if __name__ == "__main__":
    main()
