"""SSF (Lian, Zhou, Feng and Wang, NeurIPS 2022, "Scaling & Shifting Your Features"): a learned
per-channel scale and shift after each operation of the frozen ViT, ``y = x * scale + shift``
(the paper's formula), trained with fc_norm + head and folded into the preceding layer's weight
and bias for inference (mergeable, as the paper re-parameterises it).

Where, as the paper's code puts them: after the patch embedding, and in every block after
``norm1``, the fused ``qkv``, the attention's ``proj``, ``norm2``, ``fc1`` and ``fc2``; after the
final ``norm`` when the model has one (cls-token pooling). With average pooling that norm is
timm's Identity and the trained ``fc_norm`` follows the pooling, so there is nothing there to
scale (a scale before a LayerNorm could not be folded either). Initialisation as the paper's
code: scale ~ N(1, 0.02), shift ~ N(0, 0.02), so the model starts close to (not exactly at)
the pre-trained one. A ViT-B/16 trains 204,288 SSF parameters (16,896 per block, 1,536 at the
patch embedding) + 12,302 in fc_norm + head with 14 classes: a fixed size.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora.folding import Mergeable, Target
from methods import Method, register

# The operations of a timm ViT block that SSF follows, by module path inside the block.
BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
# The paper's initialisation: scale ~ N(1, INIT_STD), shift ~ N(0, INIT_STD).
INIT_STD = 0.02


class ScaleShift(Mergeable):
    """Wraps a frozen ``nn.Linear``, ``nn.Conv2d`` or ``nn.LayerNorm`` and scales and shifts its
    output per channel: ``base(x) * scale + shift`` (channels: the last dimension, or dim 1 of
    a convolution's output).

    ``merge()`` folds the two vectors into the base layer's weight and bias (``W' = diag(s) W``,
    ``b' = s * b + t``; for a LayerNorm ``gamma' = s * gamma``, ``beta' = s * beta + t``) and
    ``unmerge()`` restores the saved originals bit-exactly. A LayerNorm is computed with the
    folded affine in one ``layer_norm`` call (the same function, no extra pass over the tokens).

    Args:
        base_layer: the layer whose output is scaled; it keeps its parameters, frozen.
        init_std: standard deviation of the initial scale (mean 1) and shift (mean 0).
    """

    def __init__(self, base_layer: nn.Module, init_std: float = INIT_STD) -> None:
        super().__init__()
        if type(base_layer) not in (nn.Linear, nn.Conv2d, nn.LayerNorm):
            raise TypeError(f"ScaleShift wraps an nn.Linear, nn.Conv2d or nn.LayerNorm, got "
                            f"{type(base_layer).__name__}")
        if getattr(base_layer, "bias", None) is None or getattr(base_layer, "weight", None) is None:
            raise ValueError(f"ScaleShift folds into a weight and a bias: {base_layer} lacks one")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        channels = base_layer.weight.shape[0]
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.ssf_scale = nn.Parameter(torch.empty(channels, **factory))
        self.ssf_shift = nn.Parameter(torch.empty(channels, **factory))
        nn.init.normal_(self.ssf_scale, mean=1.0, std=init_std)
        nn.init.normal_(self.ssf_shift, mean=0.0, std=init_std)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base layer's (weight, bias) with the scale and shift folded in, in fp32
        (differentiable in the scale and shift)."""
        weight, bias = self.base_layer.weight, self.base_layer.bias
        per_row = self.ssf_scale.view(-1, *([1] * (weight.ndim - 1)))
        return weight.float() * per_row, bias.float() * self.ssf_scale + self.ssf_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if isinstance(base, nn.LayerNorm):
            weight, bias = self.folded()
            return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
        out = base(x)
        scale, shift = self.ssf_scale.to(out.dtype), self.ssf_shift.to(out.dtype)
        if isinstance(base, nn.Conv2d):
            scale, shift = scale.view(-1, 1, 1), shift.view(-1, 1, 1)
        return torch.addcmul(shift, out, scale)

    def fold_targets(self, parent: nn.Module | None = None) -> list[Target]:
        base = self.base_layer
        weight, bias = self.folded()
        return [(base, "weight", weight), (base, "bias", bias)]

    def extra_repr(self) -> str:
        return f"channels={self.ssf_scale.numel()}, merged={self.merged}"


def _targets(model: nn.Module) -> list[str]:
    """Qualified names of the modules SSF follows in a timm ViT."""
    # The patch embedding, or where it has no bias to fold a shift into (CLIP), the LayerNorm
    # that follows it.
    has_bias = model.patch_embed.proj.bias is not None
    names = ["patch_embed.proj"] if has_bias else ["norm_pre"]
    names += [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in BLOCK_TARGETS]
    if isinstance(getattr(model, "norm", None), nn.LayerNorm):
        names.append("norm")  # cls-token pooling: the final norm feeds the head
    return names


def inject(model: nn.Module, settings: None) -> None:
    """Wrap every operation SSF follows (``_targets``) in a ``ScaleShift``."""
    if any(isinstance(m, ScaleShift) for m in model.modules()):
        raise ValueError("model already has SSF layers")
    for name in _targets(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ScaleShift(getattr(parent, child)))


def ssf_layers(model: nn.Module) -> Iterable[tuple[str, ScaleShift]]:
    """All (name, ScaleShift) pairs of the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ScaleShift))


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything but the scales, the shifts and the classifier (fc_norm + head)."""
    lora.mark_trainable(model, tensors=("ssf_scale", "ssf_shift"))


SSF = register(Method(
    name="ssf", summary="SSF: per-channel scale and shift after each operation (+ fc_norm, "
                        "head); folded into the weights for inference",
    inject=inject, mark_trainable=mark_trainable,
    preset_lr=(5e-3, "SSF official VTAB-1k scripts (train_scripts/vit/vtab/*/train_ssf.sh): "
                     "AdamW at 2 GPUs x 32 = 64 images a step, lr 5e-3 in 10 of its 19 tasks "
                     "(1e-3 to 5e-2 in the others)", "adamw")))
