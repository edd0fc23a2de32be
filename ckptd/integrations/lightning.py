"""PyTorch Lightning: ckptd's checkpoints, emergency stop and verified resume for a ``lightning.Trainer``.

    from ckptd.integrations.lightning import CkptdCallback

    trainer = lightning.Trainer(max_epochs=10, enable_checkpointing=False,
                                callbacks=[CkptdCallback(every_n_train_steps=500)])
    trainer.fit(model, train_loader)        # resumes by itself from the newest checkpoint that verifies

Run it plainly or under ``ckptd run`` (restarts, ``ckptd save``/``stop``, preemption notices, hang detection,
metrics). What the callback does:

* At fit start (after ``configure_optimizers``) it creates a ``ckptd.Checkpointer`` over the LightningModule,
  its optimizers and LR schedulers, and Lightning's own state (the fit loop's progress, and with it the
  position of every train loader that has ``state_dict()``, such as ``ckptd.DataLoader``; the callbacks',
  datamodule's and module's ``state_dict``/``on_save_checkpoint`` state), then ``restore()``: the newest
  checkpoint that verifies, corrupt ones quarantined on the way. The fit loop then continues exactly where
  that checkpoint was taken.
* After every training batch that stepped the optimizers: ``ck.step(trainer.global_step, metrics=...)`` -
  heartbeat, logged metrics for ``ckptd_train_metric``, periodic saves, ``ckptd save`` requests, and on a
  stop (SIGTERM, ``ckptd stop``, a preemption notice) the emergency checkpoint, then exit 85. Batches that only
  accumulate gradients, validation batches and Lightning's own SIGTERM exit are safe points too (``ck.poll()``:
  the checkpoint of the last optimizer step).
* ``monitor``/``mode``/``save_top_k`` are ``ModelCheckpoint``'s top-k, as ckptd's ``keep_best`` rule: after each
  validation the monitored value is attached to the checkpoint of that step (or one is written). The newest
  valid checkpoint is always kept, which is ``save_last``.
* At fit end: ``ck.close()`` - a ``final`` checkpoint of the finished state, marked as the end of the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl

import ckptd
from ckptd import CkptdError

from ._common import keep_best_rules, scalar_metrics

__all__ = ["CkptdCallback"]

_NONE = object()

log = logging.getLogger("ckptd")


class _TrainerState:
    """Lightning's state besides the module, optimizers and schedulers, as one ``extra`` object of the checkpoint.

    The fit loop's state is the one recorded at the last safe point (``loops``), so a checkpoint written later by
    ``poll()`` (during validation, in Lightning's SIGTERM exit) resumes from that point, as its RNG streams do.
    """

    def __init__(self, callback: CkptdCallback, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.callback, self.trainer, self.module = callback, trainer, module
        self.loops: dict[str, Any] = {}
        self.loaded: dict[str, Any] | None = None

    def record(self, batch_end: bool = False) -> None:
        """The fit loop's state now: at a safe point, before a save. ``batch_end``: in ``on_train_batch_end``."""
        loops = self.trainer.fit_loop.state_dict()
        if batch_end and _validation_follows(self.trainer):
            _as_validation_start(loops)
        saved = (loops.get("state_dict") or {}).get("combined_loader")
        stateful = [dl for dl in _flat(self.trainer.train_dataloader) if hasattr(dl, "state_dict")
                    and hasattr(dl, "load_state_dict")]
        if saved and len(saved) == len(stateful):
            # A resumed fit loop iterates the loader it restored for the rest of this epoch and, when the
            # checkpoint is of the epoch's last batch, for the next epoch too (it does not call iter() again
            # while restarting): a ckptd.DataLoader at the end of its epoch is saved as the next epoch's start.
            loops["state_dict"]["combined_loader"] = [
                {**st, "epoch": dl.epoch + 1, "position": 0} if isinstance(dl, ckptd.DataLoader) and dl.at_end else st
                for dl, st in zip(stateful, saved, strict=True)]
        self.loops = loops

    def state_dict(self) -> dict[str, Any]:
        trainer: Any = self.trainer  # callbacks, datamodule: properties Lightning's typing does not show
        callbacks = {}
        for cb in trainer.callbacks:
            if cb is self.callback:
                continue
            cb_state = cb.state_dict()
            if cb_state:
                callbacks[cb.state_key] = cb_state
        hooks: dict[str, Any] = {}
        self.module.on_save_checkpoint(hooks)
        state: dict[str, Any] = {"fit_loop": self.loops, "callbacks": callbacks, "module": hooks}
        datamodule = trainer.datamodule
        if datamodule is not None:
            state["datamodule"] = datamodule.state_dict()
            dm_hooks: dict[str, Any] = {}
            datamodule.on_save_checkpoint(dm_hooks)
            state["datamodule_hooks"] = dm_hooks
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state  # applied by apply(), once restore() has verified and applied the whole checkpoint

    def apply(self) -> None:
        """What Lightning's own resume does with these parts (``_CheckpointConnector``), in its order."""
        state, self.loaded = self.loaded, None
        if state is None:
            return
        trainer: Any = self.trainer
        datamodule = trainer.datamodule
        if datamodule is not None:
            if state.get("datamodule"):
                datamodule.load_state_dict(state["datamodule"])
            datamodule.on_load_checkpoint(dict(state.get("datamodule_hooks") or {}))
        self.module.on_load_checkpoint(dict(state.get("module") or {}))
        saved = state.get("callbacks") or {}
        for cb in trainer.callbacks:
            if cb is not self.callback and cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs != -1 and trainer.current_epoch > max_epochs:
            raise CkptdError(f"the checkpoint is of epoch {trainer.current_epoch}, but "
                             f"Trainer(max_epochs={max_epochs}); raise max_epochs to train further")


class CkptdCallback(pl.Callback):
    """Checkpoints a Lightning run through ckptd; resumes it at fit start (see the module docstring).

    Args:
        dir: checkpoint root; None: ``$CKPTD_DIR`` (set by ``ckptd run``), else ``./checkpoints``.
        every_n_train_steps / every_seconds: periodic saves (``ckptd run --every-steps`` overrides).
        monitor, mode, save_top_k: ``ModelCheckpoint``'s top-k: keep the ``save_top_k`` best checkpoints by the
            logged metric ``monitor`` (``"min"`` or ``"max"``) - ckptd's ``keep_best=["monitor:k:mode"]``.
        keep_last, keep_best, keep_every: ckptd's retention rules (``Checkpointer``), with the above.
        async_save, pace, on_error: as ``ckptd.Checkpointer``.
        restore: resume from the newest valid checkpoint at fit start (default). With ``trainer.fit(ckpt_path=...)``
            and no ckptd checkpoint yet, Lightning loads that file (a run branched from it); once ckptd has
            checkpoints of its own, passing ``ckpt_path`` too is refused.
    """

    def __init__(self, dir: str | os.PathLike[str] | None = None, *, every_n_train_steps: int | None = None,
                 every_seconds: float | None = None, monitor: str | None = None, mode: str = "min",
                 save_top_k: int | None = None, keep_last: int | None = None, keep_best: Iterable[str] = (),
                 keep_every: int | None = None, async_save: bool = True, pace: float | None = None,
                 on_error: str = "log", restore: bool = True) -> None:
        super().__init__()
        self.dir = dir
        self.every_n_train_steps, self.every_seconds = every_n_train_steps, every_seconds
        self.monitor = monitor
        self.keep_best = keep_best_rules(monitor, mode, save_top_k, keep_best)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save, self.pace, self.on_error = async_save, pace, on_error
        self.restore = restore
        self.ck: ckptd.Checkpointer | None = None
        self.restored_step = 0
        self._state: _TrainerState | None = None
        self._last_step: int | None = None
        self._validated: dict[str, Any] = {}  # the metrics the last validation logged

    # ------------------------------------------------------------------ fit start: create, restore

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        extra: dict[str, Any] = {}
        # one optimizer and one scheduler go where ckptd reads them in place; more are restored by load_state_dict
        for i, opt in enumerate(optimizers[1:], 1):
            extra[f"optimizer_{i}"] = opt
        for i, sched in enumerate(schedulers[1:], 1):
            extra[f"lr_scheduler_{i}"] = sched
        self._state = _TrainerState(self, trainer, pl_module)
        extra["lightning"] = self._state
        options: dict[str, Any] = {} if self.pace is None else {"pace": self.pace}
        self.ck = ckptd.Checkpointer(
            model=pl_module, optimizer=optimizers[0] if optimizers else None,
            scheduler=schedulers[0] if schedulers else None,
            scaler=getattr(trainer.precision_plugin, "scaler", None), extra=extra, dir=self.dir,
            every_steps=self.every_n_train_steps, every_seconds=self.every_seconds, keep_last=self.keep_last,
            keep_best=self.keep_best, keep_every=self.keep_every, async_save=self.async_save,
            on_error=self.on_error, **options)
        self._last_step = None
        if not self.restore:
            return
        self.restored_step = self.ck.restore()
        if self.restored_step and trainer.ckpt_path:
            raise CkptdError(f"trainer.fit(ckpt_path={trainer.ckpt_path!r}) and a ckptd checkpoint of step "
                             f"{self.restored_step} in {self.ck.dir}: the run resumes from its own checkpoints; "
                             "leave ckpt_path out, or start a new run in another dir (ckptd run --fresh)")
        if self.restored_step:
            self._state.apply()
            self._last_step = trainer.global_step

    # ------------------------------------------------------------------ safe points

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A ckptd.DataLoader starts an epoch's order when told which epoch it is (Lightning calls set_epoch on
        # samplers only); a loader resumed mid-epoch is not at an epoch's start, and Lightning skips this hook then.
        for loader in _flat(trainer.train_dataloader):
            if isinstance(loader, ckptd.DataLoader):
                loader.set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ck, state = self.ck, self._state
        if ck is None or state is None:
            return
        step = trainer.global_step
        if step == self._last_step:
            ck.poll()  # accumulating gradients: no new state to save; a stop writes the last optimizer step's
            return
        self._last_step = step
        state.record(batch_end=True)
        metrics = scalar_metrics(trainer.callback_metrics)
        # what the last validation logged stays in callback_metrics: it belongs to that validation's step
        # (keep_best would rank every later checkpoint by it), not to this one
        metrics = {k: v for k, v in metrics.items() if self._validated.get(k, _NONE) != v}
        ck.step(step, metrics=metrics, epoch=trainer.current_epoch)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.ck is not None:
            self.ck.poll()  # heartbeat; a stop writes the last step's checkpoint and resumes before this validation

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ck, state = self.ck, self._state
        if ck is None or state is None or trainer.sanity_checking or self._last_step is None:
            return
        metrics = scalar_metrics(trainer.callback_metrics)
        self._validated = {k: v for k, v in metrics.items() if ck.metrics.get(k, _NONE) != v}
        if not self.monitor or self.monitor not in metrics:
            return
        step = self._last_step
        ck.metrics = {**ck.metrics, **metrics}
        state.record()  # after validation: a checkpoint written now resumes after it, like ModelCheckpoint's
        ck.wait()  # the save of this step may be in flight: a periodic save behind it would be skipped (coalesced)
        result = ck.save(step, kind="periodic")
        if result.skipped and result.path:  # this step is saved (before the validation): its metrics are known now
            ck.report(step, **metrics)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        ck = self.ck
        if ck is None:
            return
        if isinstance(exception, SystemExit) and type(exception) is SystemExit:
            self.ck = None  # ckptd's own exit (85/86): the Checkpointer has already shut down
            return
        if isinstance(exception, SystemExit):
            # Lightning's SIGTERM exit (SIGTERMException, exit status 0): the emergency checkpoint of the last
            # optimizer step instead, and exit 85, when ckptd saw the stop too (its handler runs beside Lightning's)
            ck.poll()
        self.ck = None
        ck.__exit__(type(exception), exception, exception.__traceback__)  # no final checkpoint of a failed fit

    # ------------------------------------------------------------------ fit end

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ck, self.ck = self.ck, None
        if ck is None or self._state is None:
            return
        if self._last_step is not None:
            self._state.record()  # the finished loop: a rerun of the same fit has nothing left to do
            # A safe point of the last step: the fit's end is training work (a resumed run may only have
            # validated and ended the epoch since), so close() saves it when it changed the state, and marks the run
            # finished.
            ck.step(self._last_step, metrics={**ck.metrics, **scalar_metrics(trainer.callback_metrics)},
                    epoch=trainer.current_epoch)
        ck.close()


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether the fit loop validates right after this training batch (Lightning's own test, a pure function of the
    loop's counters; False where this Lightning lacks it)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    check = getattr(epoch_loop, "_should_check_val_fx", None)
    if check is None:
        return False
    return bool(check(getattr(trainer.fit_loop, "_data_fetcher", None)))


def _as_validation_start(loops: dict[str, Any]) -> None:
    """The fit loop's state at the end of a training batch, as it is once the validation after it has begun.

    Lightning resumes a checkpoint taken at the end of a training batch after the validation that follows that
    batch (at the epoch's last batch: in the next epoch), so that validation - its metrics, the global RNG it
    draws from - would be skipped. Saved as "the batch completed, validation started, none of its batches
    done", the resumed loop runs that whole validation first, as the uninterrupted run does.
    """
    batches = loops["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        batches[part]["completed"] = batches[part]["processed"]
    val = loops["epoch_loop.val_loop.batch_progress"]
    total = val["total"]
    total["ready"] = total["started"] = total["completed"] + 1
    total["processed"] = total["completed"]
    val["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    val["is_last_batch"] = False


def _flat(loaders: Any) -> list[Any]:
    """Every loader of ``trainer.train_dataloader`` (one loader, or a list / dict of them)."""
    if isinstance(loaders, Mapping):
        return [x for v in loaders.values() for x in _flat(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _flat(v)]
    return [] if loaders is None else [loaders]

