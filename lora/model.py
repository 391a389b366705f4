"""Putting LoRA layers into a timm ViT and the model-level helpers around them."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .fp8 import check_fp8_support, to_float8_
from .layers import LoRALinear

# Where each `lora_pos` keyword puts adapters: module path suffix inside a ViT block ->
# which output slices of that linear are adapted. The fused qkv linear of timm's
# Attention has output rows [q; k; v].
POSITIONS: dict[str, dict[str, tuple[bool, ...]]] = {
    "attn": {"attn.qkv": (True, False, True)},  # the paper: q and v, k untouched
    "qkv": {"attn.qkv": (True, True, True)},
    # Single thirds of the fused qkv, combinable: 'q,k' adapts q and k.
    "q": {"attn.qkv": (True, False, False)},
    "k": {"attn.qkv": (False, True, False)},
    "v": {"attn.qkv": (False, False, True)},
    # One adapter over the whole fused qkv output, as HF PEFT adapts timm's qkv linear.
    "qkv_fused": {"attn.qkv": (True,)},
    "proj": {"attn.proj": (True,)},
    "mlp": {"mlp.fc1": (True,), "mlp.fc2": (True,)},
}
POSITIONS["all"] = {**POSITIONS["qkv"], **POSITIONS["proj"], **POSITIONS["mlp"]}

# Modules trained alongside the adapters (the classifier on top of the pooled features).
HEAD_MODULES = ("fc_norm", "head")


def parse_lora_pos(spec: str) -> dict[str, tuple[bool, ...]]:
    """Turn a `lora_pos` string like 'attn' or 'attn,proj' into {module suffix: slices}."""
    targets: dict[str, tuple[bool, ...]] = {}
    words = [w.strip() for w in str(spec).split(",")]
    if not spec or any(not w for w in words):
        raise ValueError(f"invalid lora_pos {spec!r}: expected a comma-separated subset of "
                         f"{sorted(POSITIONS)}")
    for word in words:
        if word not in POSITIONS:
            raise ValueError(f"unknown lora_pos {word!r} in {spec!r}; choose from "
                             f"{sorted(POSITIONS)} or a comma-separated combination")
        for suffix, parts in POSITIONS[word].items():
            old = targets.get(suffix, (False,) * len(parts))
            if len(old) != len(parts):
                raise ValueError(f"lora_pos {spec!r} adapts {suffix} whole (qkv_fused) and in "
                                 "slices (q, k, v, attn, qkv, all): give one of them")
            targets[suffix] = tuple(a or b for a, b in zip(old, parts))
    return targets


def inject_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float = 32.0,
    dropout: float = 0.1,
    pos: str = "attn",
) -> list[str]:
    """Replace the targeted linears of every ViT block by ``LoRALinear`` wrappers.

    Pre-trained weights should already be loaded: the wrappers keep the same base
    tensors. Returns the qualified names of the wrapped modules.
    """
    targets = parse_lora_pos(pos)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            raise ValueError(f"model already has LoRA layers (found at {name!r})")
        for suffix, parts in targets.items():
            if (name == suffix or name.endswith("." + suffix)) and isinstance(module, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, LoRALinear(module, rank, alpha, dropout, parts))
                replaced.append(name)
    if not replaced:
        raise ValueError(f"lora_pos {pos!r} matched no nn.Linear in {type(model).__name__}")
    return replaced


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    """All (name, LoRALinear) pairs of the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


# The tensors LoRA trains, by the last part of their names.
LORA_TENSORS = ("lora_A", "lora_B")


def mark_trainable(model: nn.Module, extra_modules: Iterable[str] = HEAD_MODULES,
                   tensors: Iterable[str] = LORA_TENSORS) -> None:
    """Freeze everything except the parameters named ``tensors`` (by the last part of their
    names: LoRA's A and B by default) and the named top-level modules (by default the
    classifier, fc_norm + head; with no such tensors this is the linear probe)."""
    model.requires_grad_(False)
    tensors = set(tensors)
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in tensors:
            param.requires_grad_(True)
    for name in extra_modules:
        module = getattr(model, name, None)
        if module is not None:
            module.requires_grad_(True)


# The loralib name; it freezes to LoRA *and* the classifier, as ``mark_trainable`` says.
mark_only_lora_as_trainable = mark_trainable


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (LoRA, fc_norm, head after ``mark_trainable``): what an adapter
    file holds."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# The loralib name; it returns every trainable tensor, not only LoRA's.
lora_state_dict = trainable_state_dict


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold the frozen parameters in ``dtype`` (e.g. bf16); trainable ones stay as they are.

    Under autocast of the same dtype the frozen weights are then used without a cast on
    every step, and take half the memory. A module with a trainable parameter of its own
    keeps all of them (BitFit's biases beside their weights): a CPU LayerNorm refuses a weight
    and a bias of two dtypes. Returns the number of tensors cast.
    """
    count = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in params):
            continue
        for param in params:
            if param.dtype != dtype and param.is_floating_point():
                param.data = param.data.to(dtype)
                count += 1
    return count


BACKBONE_DTYPES = ("fp32", "bf16", "fp16", "fp8")


def check_backbone_dtype(dtype: str, amp: str, device: torch.device, method: str,
                         trains_backbone: bool) -> None:
    """Raise ValueError (one line naming the flags) where the frozen backbone cannot be held
    in ``dtype`` (a ``BACKBONE_DTYPES`` name): a ``method`` that trains it, bf16 / fp16 without
    that --amp, FP8 where ``device`` has no FP8 products."""
    if dtype == "fp32":
        return
    if trains_backbone:
        raise ValueError(f"--backbone_dtype {dtype} needs a frozen backbone, not --method "
                         f"{method}, which trains it")
    if dtype == "fp8":  # products in float8 whatever the autocast dtype
        check_fp8_support(device)
    elif amp != dtype:
        raise ValueError(f"--backbone_dtype {dtype} needs --amp {dtype} (got --amp {amp})")


def set_backbone_dtype_(model: nn.Module, dtype: str) -> int:
    """Hold the frozen backbone in ``dtype`` (checked by ``check_backbone_dtype``): bf16 /
    fp16 frozen parameters, or FP8 products for the frozen block linears. Returns how many
    tensors (or, for fp8, linears) changed."""
    if dtype == "fp8":
        return to_float8_(model)
    if dtype == "fp32":
        return 0
    return cast_frozen_(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """The one-line parameter summary: `trainable params: N || all params: M || trainable%: P`."""
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}")


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable_report(model)``."""
    line = trainable_report(model)
    print(line)
    return line
