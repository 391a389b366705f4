"""The LoRA layer: a low-rank update added to a frozen ``nn.Linear`` it wraps."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .folding import Mergeable, Target


class RankError(ValueError):
    """A LoRA rank that is not a positive integer or is above the adapted layer's width."""


def check_rank(rank: object) -> None:
    """A LoRA rank is a positive integer (``RankError`` naming the value otherwise)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise RankError(f"LoRA rank must be a positive integer, got {rank!r}")


def check_dropout(dropout: object) -> None:
    """A LoRA dropout probability is in [0, 1) (``ValueError`` naming the value otherwise)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(Mergeable):
    """Wraps a frozen ``nn.Linear`` and adds ``scaling * B @ A`` to (parts of) its output.

    The output of the base layer is seen as ``len(parts)`` equal slices (3 for a fused
    qkv linear: q, k, v). Each slice marked True in ``parts`` gets its own rank-``r``
    pair (A_i: r x in, B_i: d x r); unmarked slices (k in the paper) are untouched.
    The pairs are stored stacked, as in loralib's ``MergedLinear``: ``lora_A`` is
    (r * n_adapted) x in and ``lora_B`` is (d * n_adapted) x r.

    The forward adds each adapted slice's ``scaling * B_i @ A_i x`` into the base output
    in place, from B_i alone: no zero-padded B and no full-width update are built, and the
    unadapted slices are the base output as it is. ``base_layer`` may be any module that
    returns a fresh output tensor it does not keep for backward (``nn.Linear`` does).

    Args:
        base_layer: the linear layer to adapt; it is kept as ``self.base_layer``, frozen.
        rank: rank r of each adapted slice.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout probability on the LoRA input only.
        parts: which output slices are adapted; ``(True,)`` adapts the whole layer.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int = 4,
        alpha: float = 32.0,
        dropout: float = 0.0,
        parts: Sequence[bool] = (True,),
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        check_rank(rank)
        check_dropout(dropout)
        parts = tuple(bool(p) for p in parts)
        if not any(parts):
            raise ValueError(f"at least one output slice must be adapted, got parts={parts}")
        if base_layer.out_features % len(parts):
            raise ValueError(
                f"out_features={base_layer.out_features} is not divisible into {len(parts)} slices"
            )
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.parts = parts
        self.slice_size = base_layer.out_features // len(parts)
        width = min(base_layer.in_features, self.slice_size)
        if rank > width:  # above it the pair is no longer low-rank: more weights than the slice
            raise RankError(f"LoRA rank {rank} is above the width of the layer it adapts: "
                            f"{base_layer.in_features} in, {self.slice_size} out per slice")
        n = sum(parts)
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank * n, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.slice_size * n, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # timm's fused attention reads only the module call, but some code inspects
        # `.weight` (e.g. dtype checks); expose the base weight.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (a=sqrt 5) as nn.Linear, B zeros: the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _expanded_B(self) -> torch.Tensor:
        """B placed into the full output space: (out_features, r * n_adapted), zero rows
        for slices that are not adapted, block-diagonal over the adapted slices."""
        n = sum(self.parts)
        if n == len(self.parts) == 1:
            return self.lora_B
        d, r = self.slice_size, self.rank
        full = self.lora_B.new_zeros(self.out_features, r * n)
        for j, i in enumerate(i for i, p in enumerate(self.parts) if p):
            full[i * d:(i + 1) * d, j * r:(j + 1) * r] = self.lora_B[j * d:(j + 1) * d]
        return full

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` (out_features x in_features), in fp32."""
        return (self._expanded_B() @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        # The base runs on the 2-D view of the tokens, so that its output is a fresh
        # tensor and not a view: the update is added into it in place (see
        # `_AddSliceUpdates`), which on a view would make autograd copy the whole output
        # gradient in backward.
        x2d = x.reshape(-1, x.shape[-1])
        out = self.base_layer(x2d)
        x_lora = self.lora_dropout(x2d)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            # Outside autocast the frozen base may be held in bf16 while LoRA stays fp32.
            x_lora = x_lora.to(self.lora_A.dtype)
        h = F.linear(x_lora, self.lora_A)
        lora_B, columns = self.lora_B, self._adapted_columns()
        if autocast:
            # In-place ops are not autocast: under autocast the small factors follow the
            # base output's dtype, as autocast would have cast them. Outside it they stay
            # in LoRA's dtype (fp32 beside a bf16-held base) and only the update is cast.
            h, lora_B = h.to(out.dtype), lora_B.to(out.dtype)
        if torch.compiler.is_compiling():
            # Traced, the compiler fuses the adds itself; and an in-place custom function on
            # a graph input (a base output made before a graph break) loses its gradients
            # under AOT autograd.
            out = _with_slice_updates(out, h, lora_B, self.scaling, columns)
        else:
            out = _AddSliceUpdates.apply(out, h, lora_B, self.scaling, columns)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _adapted_columns(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) output columns of each adapted slice, in the order of ``lora_B``."""
        d = self.slice_size
        return tuple((i * d, (i + 1) * d) for i, p in enumerate(self.parts) if p)

    def fold_targets(self, parent: nn.Module | None = None) -> list[Target]:
        """The base weight plus the dense update (``merge()`` folds it in)."""
        return [(self.base_layer, "weight", self.base_layer.weight.float() + self.delta_weight())]

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, parts={self.parts}, "
                f"merged={self.merged}")


def _slices(h: torch.Tensor, lora_B: torch.Tensor, columns: tuple[tuple[int, int], ...],
            ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(start, stop, h_j, B_j) of each adapted slice j: its output columns and its factors."""
    r = h.shape[1] // len(columns)
    d = lora_B.shape[0] // len(columns)
    for j, (start, stop) in enumerate(columns):
        yield start, stop, h[:, j * r:(j + 1) * r], lora_B[j * d:(j + 1) * d]


def _plus_update(base: torch.Tensor, h_j: torch.Tensor, b_j: torch.Tensor, scaling: float,
                 in_place: bool) -> torch.Tensor:
    """``base + scaling * h_j @ b_j^T`` in ``base``'s dtype (into ``base`` if ``in_place``):
    one fused product when the factors share that dtype, else made in theirs and cast."""
    if h_j.dtype == base.dtype:
        if in_place:
            return base.addmm_(h_j, b_j.t(), alpha=scaling)
        return torch.addmm(base, h_j, b_j.t(), alpha=scaling)
    update = (torch.mm(h_j, b_j.t()) * scaling).to(base.dtype)
    return base.add_(update) if in_place else base + update


def _with_slice_updates(out: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        columns: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """What `_AddSliceUpdates` computes, out of place (for traced graphs)."""
    pieces, at = [], 0
    for start, stop, h_j, b_j in _slices(h, lora_B, columns):
        if start > at:
            pieces.append(out[:, at:start])
        pieces.append(_plus_update(out[:, start:stop], h_j, b_j, scaling, in_place=False))
        at = stop
    if at < out.shape[1]:
        pieces.append(out[:, at:])
    return torch.cat(pieces, dim=1)


class _AddSliceUpdates(torch.autograd.Function):
    """``out[:, a:b] += scaling * h_j @ B_j^T`` in place, for each adapted slice ``j``.

    ``out`` (tokens x out_features) is the base output, ``h`` (tokens x r*n) the LoRA
    down-projection, ``lora_B`` (d*n x r) the stacked B blocks. ``h`` and ``lora_B`` have
    ``out``'s dtype (autocast), or their own (fp32 beside a bf16 base: the update is made in
    fp32 and cast, and their gradients are fp32 products). Only the
    adapted columns are read and written, in forward and in backward; the base output's
    gradient is passed on as it is, without a copy. Nothing saves the base output for
    backward (a frozen or trainable linear keeps its input and weight); if a base did,
    autograd's version check would refuse the backward rather than use a changed tensor.
    A base output that is a view of a tensor in the graph stays correct, but autograd then
    copies the full output gradient in backward (``CopySlices``).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, columns: tuple[tuple[int, int], ...]) -> torch.Tensor:
        for start, stop, h_j, b_j in _slices(h, lora_B, columns):
            _plus_update(out[:, start:stop], h_j, b_j, scaling, in_place=True)
        ctx.mark_dirty(out)
        ctx.save_for_backward(h, lora_B)
        ctx.scaling, ctx.columns = scaling, columns
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, lora_B = ctx.saved_tensors
        n = len(ctx.columns)
        r, d = h.shape[1] // n, lora_B.shape[0] // n
        grads = [grad[:, start:stop].to(h.dtype) for start, stop in ctx.columns]
        grad_h = grad_B = None
        if ctx.needs_input_grad[1]:
            # The scaling is folded into the small factor, not the tokens-wide product.
            scaled_B = lora_B * ctx.scaling
            grad_h = torch.cat([g.mm(scaled_B[j * d:(j + 1) * d]) for j, g in enumerate(grads)],
                               dim=1)
        if ctx.needs_input_grad[2]:
            scaled_h = h * ctx.scaling
            grad_B = torch.cat([g.t().mm(scaled_h[:, j * r:(j + 1) * r])
                                for j, g in enumerate(grads)], dim=0)
        return grad, grad_h, grad_B, None, None
