"""Hugging Face Trainer: ckptd's checkpoints, emergency stop and verified resume for a ``transformers.Trainer``.

    from ckptd.integrations.transformers import CkptdCallback, CkptdTrainer

    args = TrainingArguments("out", num_train_epochs=3, save_strategy="steps", save_steps=500, ...)
    trainer = CkptdTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                           callbacks=[CkptdCallback()])
    trainer.train()            # resumes by itself from the newest checkpoint that verifies

``CkptdTrainer`` is ``transformers.Trainer`` with ``CkptdTrainerMixin`` (put the mixin first to add it to a Trainer
subclass of your own: ``class MyTrainer(CkptdTrainerMixin, SFTTrainer)``). The callback holds the options; without
one, a ``CkptdCallback()`` is added. Run it plainly or under ``ckptd run``. What it does:

* When ``train()`` sets up the loop (its optimizer and LR scheduler are created there, before the loop's counters are
  computed) it creates a ``ckptd.Checkpointer`` over the model, the optimizer, the scheduler, the fp16 scaler and the
  Trainer's own state (``TrainerState``: global step, epoch, log history, best metric, the stateful callbacks'
  states; the loss accumulated since the last log), then ``restore()``: the newest checkpoint that verifies,
  corrupt ones quarantined on the way. The Trainer's own resume path then continues from it: the loop's epoch and
  the batches already trained in it come from the restored global step (``ignore_data_skip``), and the RNG states
  are put back where the Trainer puts back those of its own checkpoints.
* The safe point of an optimizer step is the end of the Trainer's work after it (logging, evaluation, saving):
  ``ck.step(global_step, metrics=...)`` there - heartbeat, the logged metrics for ``ckptd_train_metric``, periodic
  saves, ``ckptd save`` requests, and on a stop (SIGTERM, ``ckptd stop``, a preemption notice) the emergency
  checkpoint, then exit 85. At an epoch's last step it is the end of the epoch's work (``on_epoch_end``, an
  evaluation per epoch), so a resumed run never skips it. Evaluation batches and gradient-accumulation batches send
  heartbeats; a stop that comes during them is taken at the safe point after them.
* The Trainer's save schedule (``save_strategy``: steps, epoch, best) decides when ckptd saves, instead of writing
  ``checkpoint-N`` directories; ``save_total_limit`` is ckptd's ``keep_last`` unless the callback sets one.
* At the end of ``train()``: ``ck.close()`` - a ``final`` checkpoint of the finished state, marked as the end of
  the run.

``trainer.train(resume_from_checkpoint=...)``: ``True`` is what ckptd does anyway (the newest valid checkpoint of
its directory); a path (a Trainer ``checkpoint-N`` directory) is loaded by the Trainer itself while ckptd's
directory holds no checkpoint (a run branched from it); once it does, passing a path too is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerState

import ckptd
from ckptd import CkptdError, env

from ._common import keep_best_rules, scalar_metrics

__all__ = ["CkptdCallback", "CkptdTrainer", "CkptdTrainerMixin"]

log = logging.getLogger("ckptd")

# What the training loop is told to resume from when ckptd restores: the Trainer then takes its own resume path
# (data skip, RNG put back) and the methods below, not its loaders of checkpoint-N files, read the state.
_CKPTD = "<ckptd checkpoint>"


class _TrainerProgress:
    """The Trainer's state besides the model, optimizer, scheduler and scaler: one ``extra`` object of the checkpoint.

    Read at a safe point (every save is taken at one), applied by :meth:`CkptdCallback._apply` once ``restore()`` has
    verified and applied the whole checkpoint.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        t: Any = self.trainer
        state = dataclasses.asdict(t.state)
        state["stateful_callbacks"] = _callback_states(t)
        # the loss summed since the last log and where that log was: set by the training loop (restore() asks
        # for this state before the loop has set them, to know its tensors)
        tr_loss = getattr(t, "_tr_loss", None)
        return {"trainer_state": state, "tr_loss": torch.zeros(()) if tr_loss is None else tr_loss,
                "globalstep_last_logged": getattr(t, "_globalstep_last_logged", t.state.global_step),
                "current_flos": float(t.current_flos)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


class CkptdCallback(TrainerCallback):
    """Checkpoints a Hugging Face Trainer run through ckptd (see the module docstring); needs ``CkptdTrainer``.

    Args:
        dir: checkpoint root; None: ``$CKPTD_DIR`` (set by ``ckptd run``), else ``./checkpoints``.
        every_n_steps / every_seconds: periodic saves besides the Trainer's ``save_strategy``
            (``ckptd run --every-steps`` overrides).
        monitor, mode, save_top_k: keep the ``save_top_k`` best checkpoints by the logged metric ``monitor`` (e.g.
            ``"eval_loss"``, ``"min"``) - ckptd's ``keep_best=["monitor:k:mode"]``.
        keep_last, keep_best, keep_every: ckptd's retention rules (``Checkpointer``); ``keep_last`` defaults to
            ``TrainingArguments.save_total_limit``.
        async_save, pace, on_error: as ``ckptd.Checkpointer``.
        restore: resume from the newest valid checkpoint at the start of ``train()`` (default).
    """

    def __init__(self, dir: str | os.PathLike[str] | None = None, *, every_n_steps: int | None = None,
                 every_seconds: float | None = None, monitor: str | None = None, mode: str = "min",
                 save_top_k: int | None = None, keep_last: int | None = None, keep_best: Iterable[str] = (),
                 keep_every: int | None = None, async_save: bool = True, pace: float | None = None,
                 on_error: str = "log", restore: bool = True) -> None:
        self.dir = dir
        self.monitor = monitor
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self.keep_best = keep_best_rules(monitor, mode, save_top_k, keep_best)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save, self.pace, self.on_error = async_save, pace, on_error
        self.restore = restore
        self.ck: ckptd.Checkpointer | None = None
        self.restored_step = 0
        self._trainer: Any = None
        self._progress: _TrainerProgress | None = None
        self._rng: dict[str, Any] | None = None  # the restored RNG states, put back where the Trainer puts its own
        self._save_requested = False  # the Trainer's save_strategy asked for a save of this step
        self._epoch_ended = False  # on_epoch_end ran: the next _maybe_log_save_evaluate is the epoch's
        self._train_metrics: dict[str, Any] = {}
        self._eval_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ set up and restore (CkptdTrainerMixin)

    def _create(self, trainer: Any, max_steps: int, restore: bool) -> None:
        """The Checkpointer over the Trainer's objects; the optimizer and scheduler are created here, before the
        loop's counters, so that a restore can set them; then restore() when ``restore``."""
        args = trainer.args
        if trainer.optimizer is None:
            trainer.create_optimizer()
        if trainer.lr_scheduler is None:
            trainer.create_scheduler(num_training_steps=max_steps)
            # the Trainer re-creates a scheduler it created itself when it prepares the loop; this one is restored
            trainer._created_lr_scheduler = False
        self._progress = _TrainerProgress(trainer)
        options: dict[str, Any] = {} if self.pace is None else {"pace": self.pace}
        keep_last = self.keep_last if self.keep_last is not None else args.save_total_limit
        self.ck = ckptd.Checkpointer(
            model=trainer.model, optimizer=_unwrapped(trainer.optimizer), scheduler=trainer.lr_scheduler,
            scaler=getattr(trainer.accelerator, "scaler", None), extra={"transformers": self._progress},
            dir=self.dir, every_steps=self.every_n_steps, every_seconds=self.every_seconds, keep_last=keep_last,
            keep_best=self.keep_best, keep_every=self.keep_every, async_save=self.async_save,
            on_error=self.on_error, **options)
        self.restored_step, self._rng = 0, None
        if restore and self.restore:
            self.restored_step = self.ck.restore()
            if self.restored_step:
                self._rng = _capture_rng()

    def _apply(self, trainer: Any, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
               trial: Any) -> tuple[int, int]:
        """The restored TrainerState, as the Trainer's own resume applies one; returns the loop's (epochs trained,
        batches trained in the current epoch)."""
        progress = self._progress
        loaded = progress.loaded if progress is not None else None
        if loaded is None:
            raise CkptdError(f"checkpoint of step {self.restored_step} in {self.ck.dir if self.ck else self.dir} holds "
                             "no Hugging Face Trainer state (written by another script?); start a new run in "
                             "another dir (ckptd run --fresh)")
        trainer.state = TrainerState(**loaded["trainer_state"])
        trainer.state.init_training_references(trainer, max_steps, num_train_epochs, trial)
        trainer._load_callback_state()
        step = trainer.state.global_step
        epochs = int(step // num_update_steps_per_epoch)
        batches = 0
        if not trainer.args.ignore_data_skip:
            batches = (step % num_update_steps_per_epoch) * trainer.args.gradient_accumulation_steps
        return epochs, batches

    def _check_prepared(self, trainer: Any) -> None:
        ck = self.ck
        if ck is not None and trainer.lr_scheduler is not ck.scheduler:
            raise CkptdError("transformers replaced the LR scheduler ckptd restored while preparing the loop; this "
                             "version of transformers is not supported by ckptd.integrations.transformers "
                             "(tested with 5.25)")

    def _put_back_rng(self) -> None:
        if self._rng is not None:
            _restore_rng(self._rng)

    # ------------------------------------------------------------------ safe points

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        progress, trainer = self._progress, self._trainer
        if self._trainer is None:
            raise CkptdError("CkptdCallback needs the Trainer's class to be CkptdTrainer (or a Trainer subclass with "
                             "CkptdTrainerMixin first among its bases): a callback alone cannot resume the loop")
        if progress is None or progress.loaded is None or not self.restored_step:
            return
        loaded, progress.loaded = progress.loaded, None
        # the loss summed since the last log, as the uninterrupted run has it: the next logged loss is the same
        trainer._tr_loss.copy_(loaded["tr_loss"])
        trainer._globalstep_last_logged = int(loaded["globalstep_last_logged"])
        trainer.current_flos = float(loaded["current_flos"])

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        metrics = scalar_metrics(logs or {})
        metrics.pop("epoch", None)
        if any(k.startswith("eval_") for k in metrics):
            self._eval_metrics.update(metrics)  # belongs to this step's checkpoint only
        else:
            self._train_metrics = metrics

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ck is not None:
            self.ck.heartbeat()

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ck is not None:
            self.ck.heartbeat()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch_ended = True

    def _after_step_work(self, trainer: Any) -> None:
        """The end of ``_maybe_log_save_evaluate``: the safe point of the step, unless the epoch's end follows."""
        ck = self.ck
        if ck is None:
            return
        state, control = trainer.state, trainer.control
        if self._epoch_ended:
            self._epoch_ended = False
        elif state.epoch == math.floor(state.epoch) or control.should_training_stop or control.should_epoch_stop:
            ck.heartbeat()
            return  # the epoch's last step: its safe point is after the epoch's end work
        evaluated, self._eval_metrics = self._eval_metrics, {}
        result = ck.step(state.global_step, metrics={**self._train_metrics, **evaluated},
                         epoch=max(math.ceil(state.epoch) - 1, 0))
        requested, self._save_requested = self._save_requested, False
        monitored = self.monitor is not None and self.monitor in evaluated
        if (requested or monitored) and (result is None or result.skipped):
            if monitored:
                ck.wait()  # the monitored metric's checkpoint: not coalesced with a save in flight
            ck.save(kind="periodic")

    def _request_save(self) -> None:
        self._save_requested = True

    # ------------------------------------------------------------------ the end of train()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ck, self.ck = self.ck, None
        if ck is not None:
            if self._train_metrics or self._eval_metrics:
                ck.metrics = {**ck.metrics, **self._train_metrics, **self._eval_metrics}
            ck.close()

    def _abort(self, exc: BaseException) -> None:
        ck, self.ck = self.ck, None
        if ck is None or type(exc) is SystemExit:
            return  # ckptd's own exit (85/86): the Checkpointer has already shut down
        ck.__exit__(type(exc), exc, exc.__traceback__)  # no final checkpoint of a failed train()


class CkptdTrainerMixin:
    """What ``CkptdCallback`` needs from the Trainer: its resume path fed from ckptd's checkpoint, and the safe point
    after each step's work. Put it before the Trainer class among the bases."""

    def _ckptd_callback(self) -> CkptdCallback:
        handler: Any = self.callback_handler  # type: ignore[attr-defined]
        found = [cb for cb in handler.callbacks if isinstance(cb, CkptdCallback)]
        if len(found) > 1:
            raise CkptdError("more than one CkptdCallback in the Trainer's callbacks; pass one")
        if not found:
            found = [CkptdCallback()]
            handler.add_callback(found[0])
        callback = found[0]
        callback._trainer = self
        return callback

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        args: Any = self.args  # type: ignore[attr-defined]
        _check_args(self, args)
        callback = self._ckptd_callback()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = None  # the newest valid checkpoint: what ckptd does anyway
        if resume_from_checkpoint is not None and callback.restore:
            directory = os.fspath(callback.dir) if callback.dir is not None else (os.environ.get(env.DIR)
                                                                                  or "checkpoints")
            own = [i for i in ckptd.list_checkpoints(directory) if i.valid] if os.path.isdir(directory) else []
            if own:
                newest = own[-1]
                raise CkptdError(f"train(resume_from_checkpoint={resume_from_checkpoint!r}) and a ckptd checkpoint of "
                                 f"step {newest.step} in {directory}: the run resumes from its own checkpoints; leave "
                                 "resume_from_checkpoint out, or start a new run in another dir (ckptd run --fresh)")
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint,  # type: ignore[misc]
                                 trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        except BaseException as exc:
            callback._abort(exc)
            raise

    def _inner_training_loop(self, batch_size: Any = None, args: Any = None, resume_from_checkpoint: Any = None,
                             trial: Any = None, ignore_keys_for_eval: Any = None) -> Any:
        if resume_from_checkpoint is None:
            resume_from_checkpoint = _CKPTD
        return super()._inner_training_loop(  # type: ignore[misc]
            batch_size=batch_size, args=args, resume_from_checkpoint=resume_from_checkpoint, trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval)

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: Any, trial: Any) -> tuple[int, int]:
        callback = self._ckptd_callback()
        if resume_from_checkpoint != _CKPTD:  # a Trainer checkpoint-N directory: the Trainer loads it
            counters = super()._init_training_state(  # type: ignore[misc]
                max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
            callback._create(self, max_steps, restore=False)
            return counters
        super()._init_training_state(  # type: ignore[misc]
            max_steps, num_update_steps_per_epoch, num_train_epochs, None, trial)
        callback._create(self, max_steps, restore=True)
        if not callback.restored_step:
            return 0, 0
        return callback._apply(self, max_steps, num_update_steps_per_epoch, num_train_epochs, trial)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        own = resume_from_checkpoint if resume_from_checkpoint != _CKPTD else None
        out = super()._prepare_for_training(max_steps, train_dataloader, own)  # type: ignore[misc]
        self._ckptd_callback()._check_prepared(self)
        return out

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint == _CKPTD:
            self._ckptd_callback()._put_back_rng()
            return
        super()._load_rng_state(checkpoint)  # type: ignore[misc]

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        super()._maybe_log_save_evaluate(*args, **kwargs)  # type: ignore[misc]
        self._ckptd_callback()._after_step_work(self)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # save_strategy says a checkpoint is due: ckptd writes it at the safe point that follows
        self._ckptd_callback()._request_save()


class CkptdTrainer(CkptdTrainerMixin, Trainer):
    """``transformers.Trainer`` checkpointed through ckptd (``CkptdCallback``; see the module docstring)."""


def _check_args(trainer: Any, args: Any) -> None:
    """What this integration does not do, refused before training starts."""
    if getattr(args, "enable_jit_checkpoint", False):
        raise CkptdError("TrainingArguments(enable_jit_checkpoint=True) installs the Trainer's own SIGTERM handler; "
                         "ckptd writes the emergency checkpoint itself: leave enable_jit_checkpoint off")
    if args.load_best_model_at_end:
        raise CkptdError("TrainingArguments(load_best_model_at_end=True) loads a Trainer checkpoint-N directory, "
                         "which ckptd does not write; keep the best by a metric with CkptdCallback(monitor=..., "
                         "save_top_k=...) and take it with `ckptd export --best`")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise CkptdError("ckptd.integrations.transformers does not support DeepSpeed or FSDP through the Trainer yet; "
                         "use the Trainer's own checkpoints for those runs")


def _callback_states(trainer: Any) -> dict[str, Any]:
    """The ``stateful_callbacks`` entry of a TrainerState as the Trainer's own save writes it."""
    out: dict[str, Any] = {}
    for cb in [*trainer.callback_handler.callbacks, trainer.control]:
        if not isinstance(cb, ExportableState):
            continue
        name = type(cb).__name__
        if name in out:
            if not isinstance(out[name], list):
                out[name] = [out[name]]
            out[name].append(cb.state())
        else:
            out[name] = cb.state()
    return out


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's wrapper (a second train() finds the wrapper)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _capture_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
