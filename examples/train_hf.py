"""A Hugging Face Trainer run with ckptd: the README's Trainer example (needs ``pip install 'ckptd[transformers]'``).

    python examples/train_hf.py --epochs 3                   # plain: resumes by itself when run again
    ckptd run --dir checkpoints examples/train_hf.py --epochs 3 --step-delay 0.05   # supervised

A small BERT sequence classifier built from a config (random weights; nothing is downloaded) on seeded synthetic
token sequences, the Trainer's AdamW and linear schedule, an evaluation each epoch; a checkpoint every 50 steps
(the Trainer's ``save_steps``), the newest 3 kept (``save_total_limit``) and the best by ``eval_loss``. What ckptd
adds to the Trainer script is marked ``# ckptd``. It prints its start step and, at the end, its final step and a
digest of the parameters: a run stopped (``ckptd stop``, SIGTERM, Ctrl-C of ``ckptd run``) and resumed prints the
same digest as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config: nothing to fetch

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

from ckptd.integrations.transformers import CkptdCallback, CkptdTrainer  # ckptd

VOCAB, SEQ = 100, 24


class Sequences(torch.utils.data.Dataset):
    """Token sequences labelled by which of 4 token ranges is most frequent in them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.stack([torch.bincount(row * 4 // VOCAB, minlength=4).argmax() for row in self.ids])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Pace(TrainerCallback):
    """Slows the steps down (``--step-delay``), to watch ``ckptd status``, ``ckptd save``, ``ckptd stop`` at work."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_train_begin(self, args, state, control, **kwargs):
        print(f"start_step={state.global_step}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.delay:
            time.sleep(self.delay)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dir", default=None, help="checkpoint directory (default: $CKPTD_DIR, else ./checkpoints)")
    p.add_argument("--out", default="hf-out", help="the Trainer's output_dir (logs)")
    p.add_argument("--step-delay", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(1)  # the same thread count in every run: bit-identical results
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=SEQ, num_labels=4))
    targs = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, learning_rate=1e-3, warmup_steps=20, logging_steps=10, eval_strategy="epoch",
        save_strategy="steps", save_steps=50, save_total_limit=3,  # ckptd: when ckptd saves, and how many it keeps
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = CkptdTrainer(  # ckptd: the Trainer, with its resume fed from ckptd's checkpoints
        model=model, args=targs, train_dataset=Sequences(800, 1), eval_dataset=Sequences(200, 2),
        callbacks=[Pace(args.step_delay),
                   CkptdCallback(args.dir, monitor="eval_loss", save_top_k=1)])  # ckptd: also keep the best
    trainer.train()  # ckptd: no resume_from_checkpoint: it resumes from the newest checkpoint that verifies
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    print(f"final_step={trainer.state.global_step} digest={h.hexdigest()[:16]}", flush=True)


if __name__ == "__main__":
    main()
