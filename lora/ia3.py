"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"): learned vectors that rescale the keys, the values and the MLP's
inner activations of every block, initialised to 1 (the model starts as the base).

In a timm ViT the keys and values are the k and v thirds of the fused ``attn.qkv`` output
(bias included: the vector multiplies the linear's output, as PEFT's IA3 does), and the
MLP's inner activation is the output of ``mlp.act``, which is ``mlp.fc2``'s input (timm's
``mlp.drop1`` is elementwise and ``mlp.norm`` must be the identity). Both fold into the
weights: the qkv rows (and their bias) and the fc2 columns.

    inject_ia3(model)                 # k, v + MLP; parts=(True, True, True) scales q too
    mark_trainable(model)             # the vectors + fc_norm + head
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .folding import Mergeable, Target
from .model import HEAD_MODULES
from .model import mark_trainable as mark_lora

# The k and v thirds of timm's fused qkv linear (rows [q; k; v]), as the paper scales them.
KV = (False, True, True)


class IA3Linear(Mergeable):
    """Wraps a frozen ``nn.Linear`` and multiplies the marked slices of its output by a
    learned vector ``ia3_scale`` (one value per output feature of those slices).

    Args:
        base_layer: the linear to rescale; kept as ``self.base_layer``, frozen.
        parts: which of its equal output slices are rescaled (``KV`` for a fused qkv).
    """

    def __init__(self, base_layer: nn.Linear, parts: Sequence[bool] = (True,)) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"IA3Linear wraps an nn.Linear, got {type(base_layer).__name__}")
        parts = tuple(bool(p) for p in parts)
        if not any(parts):
            raise ValueError(f"at least one output slice must be rescaled, got parts={parts}")
        if base_layer.out_features % len(parts):
            raise ValueError(f"out_features={base_layer.out_features} is not divisible into "
                             f"{len(parts)} slices")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.parts = parts
        self.slice_size = base_layer.out_features // len(parts)
        self.ia3_scale = nn.Parameter(torch.ones(self.slice_size * sum(parts), dtype=torch.float32,
                                                 device=base_layer.weight.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def columns(self) -> list[tuple[int, int]]:
        """(start, stop) output columns of each rescaled slice, in the order of ``ia3_scale``."""
        d = self.slice_size
        return [(i * d, (i + 1) * d) for i, p in enumerate(self.parts) if p]

    def output_scale(self) -> torch.Tensor:
        """The vector multiplying the whole output: ``ia3_scale`` on the marked slices, 1 elsewhere."""
        if all(self.parts):
            return self.ia3_scale
        ones = self.ia3_scale.new_ones(self.slice_size).detach()
        pieces, j = [], 0
        for p in self.parts:
            if p:
                pieces.append(self.ia3_scale[j * self.slice_size:(j + 1) * self.slice_size])
                j += 1
            else:
                pieces.append(ones)
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out * self.output_scale().to(out.dtype)

    def fold_targets(self, parent: nn.Module | None = None) -> list[Target]:
        """The base weight's rows and the bias multiplied by the vector."""
        scale, base = self.output_scale().detach().float(), self.base_layer
        targets = [(base, "weight", base.weight.float() * scale.unsqueeze(1))]
        if base.bias is not None:
            targets.append((base, "bias", base.bias.float() * scale))
        return targets

    def extra_repr(self) -> str:
        return f"parts={self.parts}, merged={self.merged}"


class IA3Activation(Mergeable):
    """An MLP activation followed by a learned per-channel vector ``ia3_scale`` (the input of
    the block's ``fc2``). Merged, the vector lives in fc2's columns and this is ``act`` alone.

    For ``nn.GELU`` the two are one autograd step that keeps only the activation's input for
    backward (as GELU alone does) and recomputes its output there for the vector's gradient.

    Args:
        act: the activation module (timm's ``mlp.act``).
        features: the number of channels (fc1's ``out_features``).
    """

    def __init__(self, act: nn.Module, features: int) -> None:
        super().__init__()
        self.act = act
        self.ia3_scale = nn.Parameter(torch.ones(features, dtype=torch.float32))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.act(u)
        if isinstance(self.act, nn.GELU) and not torch.compiler.is_compiling():
            return _ScaledGELU.apply(u, self.ia3_scale, self.act.approximate)
        h = self.act(u)
        return h * self.ia3_scale.to(h.dtype)

    def fold_targets(self, parent: nn.Module | None = None) -> list[Target]:
        """The columns of ``fc2``, the linear this activation feeds in ``parent`` (the MLP),
        multiplied by the vector."""
        fc2 = getattr(parent, "fc2", None)
        if not isinstance(fc2, nn.Module):
            raise ValueError("an IA3 activation folds into the fc2 of its MLP: merge the model "
                             "(lora.merge), not the activation alone")
        return [(fc2, "weight", fc2.weight.float() * self.ia3_scale.detach().float())]

    def extra_repr(self) -> str:
        return f"features={self.ia3_scale.numel()}, merged={self.merged}"


class _ScaledGELU(torch.autograd.Function):
    """``gelu(u) * l`` keeping only ``u`` for backward (GELU's own input)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, scale: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.save_for_backward(u, scale)
        ctx.approximate = approximate
        return F.gelu(u, approximate=approximate) * scale.to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, scale = ctx.saved_tensors
        grad_u = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.ops.aten.gelu_backward(grad * scale.to(grad.dtype), u,
                                                  approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            h = F.gelu(u, approximate=ctx.approximate)
            grad_scale = (grad * h).reshape(-1, h.shape[-1]).sum(0, dtype=torch.float32)
        return grad_u, grad_scale, None


def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"IA3: {type(model).__name__} has no 'blocks' of a timm ViT")
    return blocks


def inject_ia3(model: nn.Module, parts: Sequence[bool] = KV) -> int:
    """Rescale ``parts`` of every block's fused qkv output and its MLP's inner activation.

    Pre-trained weights should already be loaded. Returns the number of blocks adapted.
    """
    count = 0
    for i, block in enumerate(_blocks(model)):
        qkv, mlp = block.attn.qkv, block.mlp
        if isinstance(qkv, IA3Linear) or isinstance(mlp.act, IA3Activation):
            raise ValueError(f"model already has IA3 vectors (block {i})")
        if not isinstance(qkv, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            raise ValueError(f"IA3: block {i} has no nn.Linear attn.qkv and mlp.fc2")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"IA3: block {i}'s mlp.norm is {type(mlp.norm).__name__}: the MLP "
                             "activation's vector would not be fc2's input scaling")
        block.attn.qkv = IA3Linear(qkv, parts)
        mlp.act = IA3Activation(mlp.act, mlp.fc2.in_features).to(mlp.fc2.weight.device)
        count += 1
    return count


def mark_trainable(model: nn.Module, extra_modules: Sequence[str] = HEAD_MODULES) -> None:
    """Freeze everything except the IA3 vectors and the classifier (fc_norm + head)."""
    mark_lora(model, extra_modules, tensors=("ia3_scale",))
