"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck adapter beside the MLP of every block,
trained with fc_norm + head; not mergeable (its ReLU has no place in a plain ViT's weights).

The paper's AdaptMLP: with ``h = LN(x')`` the input of the block's MLP,

    x_out = x' + MLP(h) + s * (ReLU(h W_down + b_down) W_up + b_up)

down d -> r, ReLU, dropout, up r -> d, scale s = 0.1. Initialised as the official code's
"lora" option: ``W_down`` as nn.Linear (kaiming-uniform, a = sqrt 5), ``W_up`` and both biases
zero, so the adapted model starts as the pre-trained one. The adapter runs inside the block's
MLP branch, so drop path (the recipe's 0.1) drops it with the MLP, and a LayerScale (DINOv2)
scales it with the MLP; the official code adds it
outside drop path and feeds it the un-normalised ``x'``, where the paper's equation (followed
here) feeds it the MLP's input. Trainable per block: 2 d r + r + d.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

import lora
from methods import Method, ModelConfigError, flag, register


@dataclass(frozen=True)
class AdaptFormerSettings:
    """Bottleneck width, scale and dropout of the adapters; each checked on creation."""

    dim: int = 64
    scale: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise ModelConfigError(f"AdaptFormer bottleneck width must be a positive integer "
                                   f"(--adapter_dim), got {self.dim!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not 0 < self.scale < math.inf:
            raise ModelConfigError(f"AdaptFormer scale must be positive and finite (--adapter_scale), got "
                                   f"{self.scale!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ModelConfigError(f"AdaptFormer dropout must be in [0, 1) (--adapter_dropout), "
                                   f"got {self.dropout!r}")


class Bottleneck(nn.Module):
    """``up(dropout(relu(down(x))))``: d -> r -> d, ``up`` zero so the output starts at zero."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class ParallelAdapter(nn.Module):
    """A block's MLP with a ``Bottleneck`` beside it: ``mlp(h) + scale * adapter(h)``.

    Args:
        base_layer: the block's (frozen) MLP, kept as ``self.base_layer``.
        bottleneck: the adapter's width r.
        scale: the factor s of the adapter's output.
        dropout: dropout after the adapter's ReLU.
    """

    def __init__(self, base_layer: nn.Module, bottleneck: int, scale: float = 0.1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        dim = base_layer.fc1.in_features
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.adapter = Bottleneck(dim, bottleneck, dropout).to(base_layer.fc1.weight.device)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.adapter(x) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def inject(model: nn.Module, settings: AdaptFormerSettings) -> None:
    """Put a ``ParallelAdapter`` around the MLP of every block; a bottleneck wider than the
    model raises ``ModelConfigError`` naming --adapter_dim."""
    width = model.blocks[0].mlp.fc1.in_features
    if settings.dim > width:
        raise ModelConfigError(f"AdaptFormer bottleneck --adapter_dim {settings.dim} is wider "
                               f"than the model's width {width}: a bottleneck is at most the width")
    for block in model.blocks:
        if isinstance(block.mlp, ParallelAdapter):
            raise ValueError("model already has AdaptFormer adapters")
        block.mlp = ParallelAdapter(block.mlp, settings.dim, settings.scale, settings.dropout)


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapters and the classifier (fc_norm + head)."""
    lora.mark_trainable(model)
    for module in model.modules():
        if isinstance(module, ParallelAdapter):
            module.adapter.requires_grad_(True)


def from_flags(values: Mapping[str, Any]) -> AdaptFormerSettings:
    """The adapter flags as the settings that check them."""
    return AdaptFormerSettings(dim=values["adapter_dim"], scale=values["adapter_scale"],
                               dropout=values["adapter_dropout"])


def trainable_count(width: int, depth: int, dim: int) -> int:
    """Adapter parameters of a ViT of ``depth`` blocks of ``width`` at bottleneck ``dim``."""
    return depth * (2 * width * dim + dim + width)


# The bottleneck whose trainable count is within 15% of LoRA's (q, v) at each rank on ViT-B/16
# with 14 classes (checked in tests/test_peft_methods.py; docs/METHODS_MORE.md).
LORA_BUDGET_DIMS = {4: 8, 8: 16, 32: 64}

FLAGS = (
    flag("--adapter_dim", type=int, default=64,
         help="AdaptFormer bottleneck width r (paper: 64); at LoRA r4 / r8 / r32's budget on "
              "ViT-B: " + " / ".join(map(str, LORA_BUDGET_DIMS.values()))),
    flag("--adapter_scale", type=float, default=0.1, help="AdaptFormer scale s of the adapter output"),
    flag("--adapter_dropout", type=float, default=0.1, help="dropout after the adapter's ReLU"),
)

ADAPTFORMER = register(Method(
    name="adaptformer", summary="AdaptFormer: a bottleneck adapter beside every MLP (+ fc_norm, "
                                "head); not mergeable",
    inject=inject, mark_trainable=mark_trainable, settings=AdaptFormerSettings,
    from_flags=from_flags, flags=FLAGS, size_flag="--adapter_dim", tag=lambda s: f"d{s.dim}",
    preset_lr=(0.025, "AdaptFormer official main_image.py: SGD (momentum 0.9), base lr 0.1 "
                      "(its command: 1,024 images a step), scaled as it scales it: "
                      "lr = 0.1 x 64 / 256 at 64 images a step", "sgd"),
    not_mergeable="its adapters add a ReLU bottleneck beside each MLP, which no weight of a "
                  "plain ViT can hold; use the checkpoint itself (predict.py --checkpoint, "
                  "--eval --resume)"))
