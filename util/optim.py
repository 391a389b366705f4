"""Optimizers as the paper uses them: SGD (momentum 0.9) and AdamW with layer-wise lr decay."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

# A learning-rate factor per trainable parameter name (LoRA+: the ratio for every lora_B).
LrScale = Callable[[str], float]

# Parameters never decayed, whatever their shape (MAE / timm convention).
NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "dist_token")


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise decay: embeddings 0, block i -> i + 1, rest top."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "dist_token", "reg_token",
                        "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05,
                     layer_decay: float = 0.75, lr_scale: LrScale | None = None) -> list[dict]:
    """Trainable parameters grouped by (layer, decay) with ``lr_scale = decay ** (top - layer)``,
    times ``lr_scale(name)`` when given (parameters of another factor get groups of their own).

    1-D tensors (biases, norms) and the embeddings in ``NO_WEIGHT_DECAY`` get no weight decay.
    """
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in NO_WEIGHT_DECAY
        lid = layer_id(name, num_layers)
        factor = _factor(lr_scale, name)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if factor != 1:
            key += f"_x{factor:g}"
        group = groups.setdefault(key, {"params": [], "lr_scale": scales[lid] * factor,
                                        "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(param)
    return list(groups.values())


def _factor(lr_scale: LrScale | None, name: str) -> float:
    factor = 1.0 if lr_scale is None else float(lr_scale(name))
    if not factor > 0:
        raise ValueError(f"learning-rate factor of {name} must be positive, got {factor!r}")
    return factor


def sgd_param_groups(model: nn.Module, lr_scale: LrScale | None = None) -> list[dict]:
    """The trainable tensors in one group per ``lr_scale(name)`` factor (first seen first),
    each with its ``lr_scale`` (what the schedule multiplies)."""
    groups: dict[float, dict] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            factor = _factor(lr_scale, name)
            groups.setdefault(factor, {"params": [], "lr_scale": factor})["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    layer_decay: float, lr_scale: LrScale | None = None) -> torch.optim.Optimizer:
    """SGD over the trainable tensors (absolute lr), or AdamW over layer-decayed groups.

    ``lr_scale(name)`` multiplies a parameter's learning rate (a method's settings may give
    one: ``LoRASpec.lr_scale``, LoRA+); with every factor 1 the optimizer is the plain one.
    The schedule (``util.lr_sched``) sets each group's lr to its value times ``lr_scale``.
    """
    if name == "sgd":
        groups = sgd_param_groups(model, lr_scale)
        if len(groups) == 1 and groups[0]["lr_scale"] == 1:
            return torch.optim.SGD(groups[0]["params"], lr=lr, momentum=0.9,
                                   weight_decay=weight_decay)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups_lrd(model, weight_decay, layer_decay, lr_scale),
                                 lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: choose 'sgd' or 'adamw'")


def per_process_batch(global_batch: int, world_size: int, accum_iter: int = 1,
                      batch_size: int | None = None) -> tuple[int, int]:
    """(per-process batch, accum_iter) that make ``global_batch`` images per optimizer step
    (a per-process ``batch_size`` given beside it must be that batch).

    The paper trains on one GPU x 64; splitting those 64 over processes (and accumulation
    steps) keeps its lr, steps per epoch and gradient: a ViT has no batch norm, and DDP
    averages the per-process mean losses. A global batch that does not divide is refused
    rather than silently rounded, since that would change the recipe.
    """
    for name, value in (("global batch", global_batch), ("world size", world_size),
                        ("accum_iter", accum_iter)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    parts = world_size * accum_iter
    if global_batch % parts:
        fits = [n for n in range(1, global_batch + 1) if global_batch % (n * accum_iter) == 0]
        raise ValueError(
            f"global batch {global_batch} does not divide over {world_size} processes x "
            f"accum_iter {accum_iter} ({parts} parts): use {', '.join(map(str, fits[:8]))} "
            f"processes, or a global batch that is a multiple of {parts} (e.g. "
            f"{(global_batch // parts) * parts or parts} or {(global_batch // parts + 1) * parts}; "
            f"this changes the recipe)")
    if batch_size is not None and batch_size != global_batch // parts:
        raise ValueError(f"--batch_size {batch_size} contradicts global batch {global_batch} over "
                         f"{world_size} processes x accum_iter {accum_iter} (gives {global_batch // parts})")
    return global_batch // parts, accum_iter
