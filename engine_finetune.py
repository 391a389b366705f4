"""One training epoch and one evaluation pass: the loop, nothing about flags or files."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from util.metrics import multilabel_metrics
from util.precision import autocast
from util.cli import ToolError

logger = logging.getLogger(__name__)


class NonFiniteLossError(ToolError, RuntimeError):
    """The training loss became NaN or infinite."""


COMPILE_CHOICES = ("auto", "on", "off")
# torch.compile modes (inductor): reduce-overhead replays CUDA graphs, which removes the
# per-kernel launch cost that dominates small batches on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledModule(nn.Module):
    """``torch.compile`` of a module that falls back to the eager module, with one warning,
    when compiling fails; logs how long the first (compiling) call took.

    The compiled and eager paths share the wrapped module's parameters, so merging LoRA,
    loading weights or DDP see one model.
    """

    def __init__(self, module: nn.Module, backend: str = "inductor", name: str = "model",
                 mode: str = "default") -> None:
        super().__init__()
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r}: expected one of {list(COMPILE_MODES)}")
        self.module = module
        self.name = name
        self.failed = False
        self.compile_seconds: float | None = None
        # Modes are inductor's: another backend gets none (torch.compile would hand it on).
        options = {"mode": mode} if mode != "default" else {}
        # These modes replay CUDA graphs, whose outputs the next replay overwrites.
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune")
        try:
            self._compiled = torch.compile(module, backend=backend, **options)
        except Exception as err:  # noqa: BLE001 -- e.g. an unknown backend: eager, said once
            self._fall_back(err)

    def forward(self, *args, **kwargs):
        if self.failed:
            return self.module(*args, **kwargs)
        first = self.compile_seconds is None
        start = time.perf_counter()
        try:
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # each call is a new step
            out = self._compiled(*args, **kwargs)
            if self.cudagraphs and isinstance(out, torch.Tensor):
                out = out.clone()  # the logits outlive the next replay (evaluation keeps them)
        except Exception as err:  # noqa: BLE001 -- any backend failure: fall back, say it once
            if not (first or _is_compile_error(err)):
                raise
            self._fall_back(err)
            return self.module(*args, **kwargs)
        if first:
            self.compile_seconds = time.perf_counter() - start
            logger.info("torch.compile: first %s call (compiling) took %.1f s", self.name,
                        self.compile_seconds)
        return out

    def _fall_back(self, err: BaseException) -> None:
        self.failed = True
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        logger.warning("torch.compile of the %s model failed (%s: %s); continuing eager",
                       self.name, type(err).__name__, first_line)

    def __getattr__(self, name: str):
        # Attributes of the wrapped module show through (e.g. DDP's no_sync).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _is_compile_error(err: BaseException) -> bool:
    """Whether an exception comes from dynamo / inductor rather than from the model itself."""
    module = type(err).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(err).__name__


def _clock(seconds: float) -> str:
    """h:mm:ss for progress lines."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    # A bar only on an interactive terminal: logs stay free of carriage-return noise.
    if not enabled or not sys.stderr.isatty():
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


class _ProgressLines:
    """Progress log lines for runs without a terminal: the image rate and the epoch's ETA."""

    def __init__(self, epoch: int, n_steps: int, enabled: bool, every_steps: int,
                 every_seconds: float) -> None:
        self.epoch, self.n_steps, self.enabled = epoch, n_steps, enabled
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.start = self.last = time.perf_counter()
        self.seen = 0

    def step(self, step: int, batch_size: int) -> None:
        """Count a batch; log a line when one is due (never after the last step)."""
        self.seen += batch_size
        now = time.perf_counter()
        # Every every_steps steps, and at least every every_seconds: a short epoch of a
        # slow model still reports before it ends.
        due = (step + 1) % self.every_steps == 0 or now - self.last >= self.every_seconds
        if self.enabled and due and step + 1 < self.n_steps:
            elapsed, self.last = now - self.start, now
            eta = elapsed / (step + 1) * (self.n_steps - step - 1)
            logger.info("epoch %d: step %d/%d, %.1f images/s, epoch ETA %s", self.epoch, step + 1,
                        self.n_steps, self.seen / max(elapsed, 1e-9), _clock(eta))


class _LossSums:
    """The training loss summed on the device, over the epoch and over the current log window."""

    def __init__(self, device: torch.device) -> None:
        self.epoch = torch.zeros((), device=device)
        self.window = torch.zeros((), device=device)
        self.window_n = 0

    def add(self, loss: torch.Tensor) -> None:
        detached = loss.detach()
        self.epoch += detached
        self.window += detached
        self.window_n += 1

    def read_window(self, epoch: int, step: int, n_steps: int) -> float:
        """The window's mean loss (the one host sync per log window); starts the next window."""
        window = self.window.item() / self.window_n
        if not math.isfinite(window):
            raise NonFiniteLossError(
                f"loss is {window} at epoch {epoch}, step {step + 1}/{n_steps} (between "
                f"steps {step + 2 - self.window_n} and {step + 1}); stopping")
        self.window.zero_()
        self.window_n = 0
        return window


def _batch_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                device: torch.device, amp_dtype: torch.dtype | None,
                batch_transform: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """BCE-with-logits of one batch, moved to the device (and transformed there)."""
    images = images.to(device, non_blocking=True)
    if batch_transform is not None:
        images = batch_transform(images)
    targets = targets.to(device, non_blocking=True).float()
    with autocast(device, amp_dtype):
        logits = model(images)
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def _accumulation(step: int, n_steps: int, accum_iter: int) -> tuple[bool, int]:
    """Whether micro-batch ``step`` ends an optimisation step, and how many micro-batches
    that step averages: the epoch's last group may hold fewer than ``accum_iter`` (MAE's
    engine never applies that group's gradient)."""
    update = (step + 1) % accum_iter == 0 or step + 1 == n_steps
    return update, min(accum_iter, n_steps - (step - step % accum_iter))


def _backward(model: nn.Module, loss: torch.Tensor, scaler: torch.amp.GradScaler | None,
              sync: bool) -> None:
    """Accumulate ``loss``'s gradient; DDP all-reduces only when ``sync`` (a step follows)."""
    no_sync = model.no_sync() if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext()
    with no_sync:
        (scaler.scale(loss) if scaler is not None else loss).backward()


def _optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    scaler: torch.amp.GradScaler | None, clip_grad: float | None) -> None:
    """Apply the accumulated gradient (clipped after unscaling), then clear it."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _publish(loss: float, lr: float, global_step: int, log_writer, bar: Iterable) -> None:
    """A log window's loss and lr to the TensorBoard writer and the progress bar."""
    if log_writer is not None:
        log_writer.add_scalar("train/loss", loss, global_step)
        log_writer.add_scalar("train/lr", lr, global_step)
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    *,
    set_lr: Callable[[float], float],
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    accum_iter: int = 1,
    clip_grad: float | None = None,
    log_writer=None,
    log_freq: int = 10,
    steps_per_epoch: int | None = None,
    progress: bool = True,
    params: Sequence[torch.Tensor] | None = None,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress_freq: int = 100,
    progress_seconds: float = 30.0,
) -> dict[str, float]:
    """Train for one epoch with BCE-with-logits; returns mean loss and the last lr.

    ``set_lr(fractional_epoch)`` is called at the start of each optimisation step
    (per-iteration warmup + cosine). The loss is read back to the host only every
    ``log_freq`` steps, so the device is not synchronised on every step.
    ``batch_transform`` runs on the device after the copy (e.g. ``DeviceAugment``).
    Without a terminal (a log file, a batch job), ``progress`` logs a line every
    ``progress_freq`` steps with the image rate and the epoch's ETA instead of a bar.
    """
    if clip_grad is not None and not clip_grad > 0:
        # clip_grad_norm_ with a negative max_norm would reverse the gradient.
        raise ValueError(f"clip_grad={clip_grad}: the largest gradient norm must be positive "
                         "(None: no clipping)")
    model.train()
    n_steps = steps_per_epoch or len(loader)  # type: ignore[arg-type]
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    losses = _LossSums(device)
    lr = float("nan")
    optimizer.zero_grad(set_to_none=True)
    bar = _progress(loader, n_steps, f"epoch {epoch}", progress)
    lines = _ProgressLines(epoch, n_steps, progress and not hasattr(bar, "set_postfix"),
                           progress_freq, progress_seconds)
    for step, (images, targets) in enumerate(bar):
        lines.step(step, len(images))
        if step % accum_iter == 0:
            lr = set_lr(epoch + step / n_steps)
        loss = _batch_loss(model, images, targets, device, amp_dtype, batch_transform)
        losses.add(loss)
        update, group = _accumulation(step, n_steps, accum_iter)
        _backward(model, loss / group, scaler, sync=update)
        if update:
            _optimizer_step(optimizer, params, scaler, clip_grad)
        if (step + 1) % log_freq == 0 or step + 1 == n_steps:
            window = losses.read_window(epoch, step, n_steps)
            _publish(window, lr, epoch * n_steps + step, log_writer, bar)
    return {"loss": losses.epoch.item() / max(n_steps, 1), "lr": lr}


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-length tensors from all ranks (rank order)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits and targets for the whole data set, gathered over ranks, in data set order.

    The indices each rank sees come from its sampler; a DistributedSampler pads the
    data set with duplicates to split it evenly: those are dropped here, so every image
    counts exactly once. Returns (indices, logits, targets).
    """
    model.eval()
    indices = torch.tensor(list(iter(loader.sampler)), dtype=torch.long)
    logits_list, target_list = [], []
    for images, targets in _progress(loader, len(loader), "eval", progress):
        images = images.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(images)
        logits_list.append(out.float())
        target_list.append(targets.to(device).float())
    logits = torch.cat(logits_list)
    targets = torch.cat(target_list)
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise NonFiniteLossError(f"evaluation: the model gave NaN or infinite outputs for {bad} "
                                 "images (try --amp none; otherwise the weights are damaged)")
    assert len(logits) == len(indices), "sampler and loader disagree on the evaluated images"
    indices = _gather(indices.to(device)).cpu()
    logits = _gather(logits).cpu()
    targets = _gather(targets).cpu()
    order = torch.argsort(indices, stable=True)
    indices, logits, targets = indices[order], logits[order], targets[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return indices[keep].numpy(), logits[keep].numpy(), targets[keep].numpy()


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    class_names: Sequence[str],
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    warn_undefined: bool = True,
) -> dict:
    """Loss, per-class and mean AUROC / AUPRC over the whole evaluated set, plus predictions.

    ``warn_undefined=False`` keeps quiet about classes with a single label value (a caller
    that evaluates the same set every epoch says it once).
    """
    indices, logits, targets = predict(model, loader, device, amp_dtype, progress)
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits),
                                              torch.from_numpy(targets)).item()
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    stats = multilabel_metrics(targets, probs, class_names, warn_undefined=warn_undefined)
    stats.update(loss=loss, num_images=int(len(indices)), indices=indices, probs=probs,
                 targets=targets)
    return stats
