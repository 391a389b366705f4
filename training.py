"""The epochs of one training run: train, validate the merged model, commit each epoch.

    loop = Training(LoopConfig(epochs=100, seed=0, lr=0.05, ...), folder, model, optimizer,
                    train_loader=..., val_loader=..., class_names=..., device=device)
    progress = loop.run(Progress(start_epoch=0, history=[]))

Every epoch's checkpoints and resume state are committed together by the run folder
(util.runfolder), so a run killed at any moment resumes exactly.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

import checkpoints as ckpt
import evaluation
import methods
from engine_finetune import CompiledModule, NonFiniteLossError, evaluate, train_one_epoch
from util.cli import UsageError
from util.io import json_safe
from util.lr_sched import adjust_learning_rate
from util.misc import DistInfo, rng_state, say, seed_everything
from util.runfolder import LOGS_DIR, Plan, RunConflict, RunFolder

logger = logging.getLogger("main")

# Compiling pays off (CUDA, --compile auto) from about this many optimiser steps in a run.
COMPILE_AUTO_MIN_STEPS = 5000


@dataclass
class LoopConfig:
    """The knobs of the training loop (the entry script fills them from its flags)."""

    epochs: int
    seed: int
    lr: float
    min_lr: float
    warmup_epochs: float
    accum_iter: int = 1
    clip_grad: float | None = None
    valid_freq: int = 1
    log_freq: int = 10
    progress_freq: int = 100
    progress: bool = True
    compile: str = "auto"  # on | off | auto (on CUDA for long runs)
    compile_backend: str = "inductor"
    compile_mode: str = "default"

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> LoopConfig:
        """The knobs from the flags of the same names (``progress``: not --no_progress)."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name != "progress"},
                   progress=not flags["no_progress"])


@dataclass
class Progress:
    """Where training stands: the next epoch, the best validation score and its epoch, the log."""

    start_epoch: int
    best: float = -math.inf
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)


def open_writer(folder: RunFolder, log_dir: str | None = None):
    """The run's TensorBoard writer (in ``log_dir``, by default ``<run>/logs``); its event file
    is recorded as the run's own."""
    import os

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(Path(log_dir) if log_dir else folder.writable(LOGS_DIR)))
    event_file = getattr(getattr(writer.file_writer, "event_writer", None), "_file_name", None)
    if event_file:
        folder.record(Path(os.path.abspath(event_file)))
    return writer


def final_test(folder: RunFolder, plan: Plan, progress: Progress, epochs: int, data, writer,
               dist_info: DistInfo, options: dict[str, Any]) -> dict:
    """Test the run's best checkpoint on ``data``'s test split (``options``:
    ``evaluation.test_checkpoint``'s), temperature and thresholds fitted on its validation
    split; the score joins the TensorBoard curves (``writer`` closed)."""
    if dist_info.distributed:
        torch.distributed.barrier()
    if progress.best_epoch is None:  # a resumed run cut shorter than its first validation
        raise UsageError("no epoch was validated (nothing to test): check --epochs / --valid_freq")
    if plan.resume and progress.start_epoch >= epochs:
        logger.info("the run in %s was already complete (%d epochs); testing its best checkpoint "
                    "again", folder.folder, epochs)
    results = evaluation.test_checkpoint(folder.best_checkpoint(), data.test_set, folder,
                                         calibration_set=data.val_set, **options)
    log_test(writer, results, progress.best_epoch)
    return results


def log_test(writer, results: dict, best_epoch: int) -> None:
    """The final test's mean AUROC (and its interval) beside the validation curves; closes
    ``writer`` (None on processes that write no curves)."""
    if writer is None:
        return
    writer.add_scalar("test/mean_auroc", results["mean_auroc"], best_epoch)
    interval = (results.get("intervals") or {}).get("mean") or {}
    for bound in ("ci_low", "ci_high"):
        if interval.get(bound) is not None:
            writer.add_scalar(f"test/mean_auroc_{bound}", interval[bound], best_epoch)
    writer.close()


def decide_compile(choice: str, device: torch.device, total_steps: int) -> bool:
    """--compile on/off, or auto: on CUDA once the run is long enough to earn back the compile."""
    if choice in ("on", "off"):
        return choice == "on"
    return device.type == "cuda" and total_steps >= COMPILE_AUTO_MIN_STEPS


class Training:
    """One run's epochs in its locked folder; only the main process writes."""

    def __init__(self, config: LoopConfig, folder: RunFolder, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, *, train_loader, val_loader,
                 class_names: list[str], model_config, device: torch.device,
                 dist_info: DistInfo = DistInfo(), amp_dtype: torch.dtype | None = None,
                 scaler=None, batch_transform=None, writer=None, settings: dict | None = None,
                 checkpoint_extra: dict | None = None, carry_from: Path | None = None,
                 committed: bool = False) -> None:
        self.config, self.folder, self.model, self.optimizer = config, folder, model, optimizer
        self.train_loader, self.val_loader, self.class_names = train_loader, val_loader, class_names
        self.model_config, self.device, self.dist_info = model_config, device, dist_info
        self.amp_dtype, self.scaler, self.batch_transform = amp_dtype, scaler, batch_transform
        self.writer, self.settings = writer, settings or {}
        self.checkpoint_extra = checkpoint_extra or {}
        self.carry_from = carry_from  # until this folder's first commit holds a checkpoint-best
        self.committed = committed

    def run(self, progress: Progress) -> Progress:
        """Train from ``progress.start_epoch`` to the last epoch, committing each one."""
        c = self.config
        total_steps = max(0, c.epochs - progress.start_epoch) * len(self.train_loader) // c.accum_iter
        train_model, eval_model = self._wrap(total_steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        set_lr: Callable[[float], float] = lambda e: adjust_learning_rate(  # noqa: E731
            self.optimizer, e, c.lr, c.min_lr, c.warmup_epochs, c.epochs)
        for epoch in range(progress.start_epoch, c.epochs):
            t0 = time.time()
            seed_everything(c.seed * 1_000_003 + epoch * 7_919 + self.dist_info.rank)
            self.train_loader.sampler.set_epoch(epoch)
            try:
                stats = train_one_epoch(
                    train_model, self.train_loader, self.optimizer, self.device, epoch,
                    set_lr=set_lr, scaler=self.scaler, amp_dtype=self.amp_dtype,
                    accum_iter=c.accum_iter, clip_grad=c.clip_grad, log_writer=self.writer,
                    log_freq=c.log_freq, params=params, batch_transform=self.batch_transform,
                    progress_freq=c.progress_freq, progress=c.progress and self.dist_info.is_main)
            except NonFiniteLossError as err:
                kept = (f"the last good checkpoint is {self.folder.folder / 'checkpoint-last'}"
                        if self.committed else "no checkpoint was written yet")
                raise NonFiniteLossError(f"{err}; {kept} (lower --lr or try --amp none)") from None
            log = {"epoch": epoch, "train_loss": stats["loss"], "lr": stats["lr"]}
            line = f"epoch {epoch}: train loss {stats['loss']:.4f}, lr {stats['lr']:.3g}"
            improved = False
            if (epoch + 1) % c.valid_freq == 0 or epoch + 1 == c.epochs:
                val = self.validate(eval_model, epoch)
                log.update(val_loss=val["loss"], val_mean_auroc=val["mean_auroc"],
                           val_mean_auprc=val["mean_auprc"], val_auroc=val["auroc"])
                line += f", val loss {val['loss']:.4f}, val mean AUROC {100 * val['mean_auroc']:.2f}"
                if val["mean_auroc"] > progress.best or progress.best_epoch is None:
                    progress.best, progress.best_epoch, improved = val["mean_auroc"], epoch, True
            progress.history.append(json_safe(log))
            if self.dist_info.is_main:
                self.commit(epoch, log, progress, improved)
                say(f"{line}, best {100 * progress.best:.2f} (epoch {progress.best_epoch}), "
                    f"{time.time() - t0:.1f}s", flush=True)
        return progress

    def _wrap(self, total_steps: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The training model (DDP, compiled) and the evaluation model (compiled), sharing weights."""
        c, model, device = self.config, self.model, self.device
        ddp_model = model
        if self.dist_info.distributed:
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if not decide_compile(c.compile, device, total_steps):
            return ddp_model, model
        logger.info("torch.compile (%s backend, mode %s) for training and evaluation (--compile "
                    "%s, %d steps)", c.compile_backend, c.compile_mode, c.compile, total_steps)
        return (CompiledModule(ddp_model, backend=c.compile_backend, name="training", mode=c.compile_mode),
                CompiledModule(model, backend=c.compile_backend, name="evaluation", mode=c.compile_mode))

    def validate(self, eval_model: torch.nn.Module, epoch: int) -> dict:
        """The validation scores of the merged model (merging costs exactly a plain ViT; unmerge
        restores the base weights bit-exactly), logged to TensorBoard."""
        method = methods.get(self.model_config.method)
        method.merge(self.model)
        try:  # classes without a validation AUROC were named once when the run started
            val = evaluate(eval_model, self.val_loader, self.device, self.class_names, self.amp_dtype,
                           progress=self.config.progress and self.dist_info.is_main,
                           warn_undefined=False)
        finally:
            method.unmerge(self.model)
        if not math.isfinite(val["mean_auroc"]):
            raise NonFiniteLossError(f"validation mean AUROC is {val['mean_auroc']} at epoch "
                                     f"{epoch}: the model's outputs are not finite")
        if self.writer is not None:
            self.writer.add_scalar("val/loss", val["loss"], epoch)
            self.writer.add_scalar("val/mean_auroc", val["mean_auroc"], epoch)
            for name, value in val["auroc"].items():
                if not math.isnan(value):
                    self.writer.add_scalar(f"val/auroc/{name}", value, epoch)
        return val

    def commit(self, epoch: int, log: dict, progress: Progress, improved: bool) -> None:
        """One epoch's checkpoints and resume state, committed together."""
        state = {"optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "epoch": epoch,
                 "best_metric": progress.best, "best_epoch": progress.best_epoch,
                 "rng": rng_state(), "settings": self.settings}
        # Each checkpoint records its own epoch's validation score (None when this epoch was
        # not validated); checkpoint-last also the best so far.
        extra: dict[str, Any] = {**self.checkpoint_extra, "epoch": epoch,
                                 "val_mean_auroc": log.get("val_mean_auroc")}

        def stage(pending: Path) -> None:
            if improved:
                ckpt.save_checkpoint(pending / "checkpoint-best", self.model, self.model_config,
                                     extra=extra)
            elif self.carry_from is not None:
                self.folder.carry_best(self.carry_from, pending, progress.best_epoch,
                                       lambda stem: ckpt.read_config(stem).extras.get("epoch"))
            ckpt.save_resume_state(pending / "checkpoint-last.state.pt", state)
            ckpt.save_checkpoint(pending / "checkpoint-last", self.model, self.model_config,
                                 extra={**extra, "best_val_mean_auroc": progress.best,
                                        "best_epoch": progress.best_epoch})

        last = str(self.folder.folder / "checkpoint-last") if self.committed else ""
        self.folder.commit(epoch, stage, progress.history, last_complete=last)
        self.committed, self.carry_from = True, None
        if self.writer is not None:
            self.writer.flush()


def resume(folder: RunFolder, plan: Plan, model: torch.nn.Module, optimizer, scaler,
           settings: dict[str, Any]) -> Progress:
    """Restore trained tensors, optimizer, scaler and counters from ``plan.resume`` after
    checking that the checkpoint is one committed epoch of this same run."""
    path = plan.resume
    tensors_path, config_path = ckpt.checkpoint_paths(path)
    # This folder's own commit was verified when the plan recovered it.
    record = plan.committed if plan.source is None else RunFolder(tensors_path.parent).verify()
    if record is None:
        raise ckpt.CheckpointError(f"--resume {path}: {tensors_path.parent} has no commit record "
                                   "(commit.json), so the checkpoint is not a committed epoch")
    saved = ckpt.read_config(path)
    state_path = tensors_path.with_suffix(".state.pt")
    if not state_path.is_file():
        raise RunConflict(f"--resume {path}: no resume state ({state_path.name}); only "
                          "checkpoint-last can be resumed")
    state = ckpt.load_resume_state(state_path)
    epochs = {state_path.name: state.get("epoch"), config_path.name: saved.extras.get("epoch"),
              "commit.json": record["epoch"] if record else None}
    if len(set(epochs.values())) != 1:
        raise ckpt.CheckpointError(f"--resume {path}: its files are from different epochs ("
                                   + ", ".join(f"{k}: {v}" for k, v in epochs.items()) +
                                   "); the checkpoint is not one consistent epoch, refusing to "
                                   "resume it")
    folder.check_resume(path, state.get("settings") or {}, settings)
    ckpt.load_trained_tensors(model, tensors_path, all_tensors=bool(saved.backbone_in_file))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if plan.source is not None and state["epoch"] + 1 >= settings["epochs"]:
        raise RunConflict(f"--resume {path}: that run already trained {state['epoch'] + 1} epochs, "
                          f"so --epochs {settings['epochs']} leaves nothing to train in "
                          f"{folder.folder}; to test its best checkpoint use --eval --resume "
                          f"{plan.source / 'checkpoint-best'}")
    logger.info("resumed from %s (epoch %d done, best %.4f)", path, state["epoch"], state["best_metric"])
    return Progress(state["epoch"] + 1, state["best_metric"], state["best_epoch"], list(record["log"]))
