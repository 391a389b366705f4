"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): LoRA's low-rank
update gives the direction of each adapted weight row, a learned magnitude its length.

For an adapted output row i of a frozen linear W (bias b), with the LoRA pair (A, B), the
scaling s and the magnitude m_i (initialised to ||W_i||, so the model starts as the base):

    W'_i = m_i (W_i + s (B A)_i) / ||W_i + s (B A)_i||

The row norm is treated as a constant in backward (the paper's section 4.3; HF PEFT 0.21
detaches it too), so with g = m / ||W + s B A|| and the LoRA-dropped input x_d:

    y = W x + b + (g - 1) * (W x_d) + g * s * B A x_d

which is ``W' x + b`` without dropout (x_d = x). Dropout applies to the whole change
W' - W, as the paper's code and PEFT apply it; without dropout (or in eval mode) W x is the
base output less its bias, and no second product is made.

The row norms are not taken from a materialised W + s B A: with the frozen rows' squared
norms cached (remade when the base weight changes),

    ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s B_i . (W_i A^T) + s^2 B_i (A A^T) B_i^T

costs two products of the size of A per step instead of a pass over the full weight.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .folding import Target
from .layers import LoRALinear
from .model import LORA_TENSORS, inject_lora, lora_layers
from .model import mark_trainable as mark_lora


class DoRALinear(LoRALinear):
    """A ``LoRALinear`` whose adapted rows are decomposed into magnitude and direction.

    ``lora_magnitude`` holds one value per adapted output row (the rows of the adapted
    slices, in the order of ``lora_B``), fp32 like the LoRA factors. Merging folds
    ``g * (W + dW)`` into the base weight rows.

    Args: those of ``LoRALinear``.
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 4, alpha: float = 32.0,
                 dropout: float = 0.0, parts: Sequence[bool] = (True,)) -> None:
        super().__init__(base_layer, rank, alpha, dropout, parts)
        self._wsq: torch.Tensor | None = None
        self._wsq_key: tuple | None = None
        with torch.no_grad():
            norms = self._frozen_row_sq_norms().sqrt()
        self.lora_magnitude = nn.Parameter(norms.clone())

    @classmethod
    def from_lora(cls, layer: LoRALinear) -> "DoRALinear":
        """A DoRA layer on ``layer``'s base with its A, B, scaling and dropout (same start)."""
        p = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
        new = cls(layer.base_layer, layer.rank, layer.alpha, p, layer.parts)
        new.scaling = layer.scaling
        with torch.no_grad():
            new.lora_A.copy_(layer.lora_A)
            new.lora_B.copy_(layer.lora_B)
        new.train(layer.training)
        return new

    # -- the row norms --------------------------------------------------------------------

    def _adapted_rows(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The base weight's rows of each adapted slice (views)."""
        return [weight[start:stop] for start, stop in self._adapted_columns()]

    def _frozen_row_sq_norms(self) -> torch.Tensor:
        """||W_i||^2 of the adapted rows, fp32; cached while the base weight is unchanged
        (in-place writes bump its version, ``.to()`` and ``param.data = ...`` its storage)."""
        w = self.base_layer.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if torch.compiler.is_compiling() or self._wsq is None or self._wsq_key != key:
            # Under inference_mode the cache would be an inference tensor, unusable by a later
            # training step: it is made as an ordinary tensor.
            leave = torch.inference_mode(False) if torch.is_inference_mode_enabled() \
                else contextlib.nullcontext()
            with leave, torch.no_grad():
                rows = torch.cat([r.float().pow(2).sum(1) for r in self._adapted_rows(w.detach())])
            if torch.compiler.is_compiling():
                return rows
            self._wsq, self._wsq_key = rows, key
        return self._wsq

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W_i + s (B A)_i|| of every adapted row (fp32, no gradient), from the cached
        ||W_i||^2 and products of the size of A."""
        w, s = self.base_layer.weight.detach(), self.scaling
        a, b = self.lora_A.detach().float(), self.lora_B.detach().float()
        r, d = self.rank, self.slice_size
        cross, square = [], []
        with torch.autocast(w.device.type, enabled=False):  # fp32 products, whatever the step's
            for j, rows in enumerate(self._adapted_rows(w)):
                a_j, b_j = a[j * r:(j + 1) * r], b[j * d:(j + 1) * d]
                cross.append((b_j * (rows.float() @ a_j.t())).sum(1))
                square.append(((b_j @ (a_j @ a_j.t())) * b_j).sum(1))
        sq = self._frozen_row_sq_norms() + 2 * s * torch.cat(cross) + s * s * torch.cat(square)
        return sq.clamp_min(0).sqrt()

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ||W + s B A|| per adapted row (the norm detached): what multiplies the rows."""
        return self.lora_magnitude / self.weight_norm()

    # -- forward --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        x2d = x.reshape(-1, x.shape[-1])
        out = self.base_layer(x2d)  # a fresh tensor: updated in place below
        dropped = self.training and isinstance(self.lora_dropout, nn.Dropout)
        x_lora = self.lora_dropout(x2d)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            x_lora = x_lora.to(self.lora_A.dtype)
        h = F.linear(x_lora, self.lora_A)
        wx_d = None
        if dropped:  # W x_d of the adapted rows: only when the dropped input differs from x
            w_adapted = self._adapted_weight()
            wx_d = F.linear(x_lora, w_adapted if autocast else w_adapted.to(x_lora.dtype))
        dtype = out.dtype
        g = self.magnitude_scale()
        bias = self._adapted_bias()
        args = (h.to(dtype), self.lora_B.to(dtype), g,
                None if wx_d is None else wx_d.to(dtype),
                None if bias is None else bias.to(dtype), self.scaling, self._adapted_columns())
        if torch.compiler.is_compiling():
            out = dora_update_reference(out, *args)
        else:
            out = _DoRAUpdate.apply(out, *args)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _adapted_weight(self) -> torch.Tensor:
        """The base weight's adapted rows as one (rows x in) tensor: a view when they are one
        block of rows, else a copy (q and v of a fused qkv)."""
        weight = self.base_layer.weight.detach()
        columns = self._adapted_columns()
        if all(a[1] == b[0] for a, b in zip(columns, columns[1:])):
            return weight[columns[0][0]:columns[-1][1]]
        return torch.cat(self._adapted_rows(weight))

    def _adapted_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        if bias is None:
            return None
        return torch.cat([bias[start:stop] for start, stop in self._adapted_columns()])

    # -- merge ----------------------------------------------------------------------------

    def fold_targets(self, parent: nn.Module | None = None) -> list[Target]:
        """The base weight with the adapted rows replaced by ``g * (W + s B A)`` (fp32); the
        norm of each row is taken from the sum itself, as PEFT's merge takes it."""
        with torch.autocast(self.base_layer.weight.device.type, enabled=False):
            weight = self.base_layer.weight.float() + self.delta_weight()
        m = self.lora_magnitude.detach().float()
        d = self.slice_size
        for j, (start, stop) in enumerate(self._adapted_columns()):
            rows = weight[start:stop]
            rows.mul_((m[j * d:(j + 1) * d] / torch.linalg.norm(rows, dim=1)).unsqueeze(1))
        return [(self.base_layer, "weight", weight)]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", magnitudes={self.lora_magnitude.numel()}"


def dora_update_reference(out: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor,
                          g: torch.Tensor, wx_d: torch.Tensor | None, bias: torch.Tensor | None,
                          scaling: float, columns: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """What ``_DoRAUpdate`` computes, out of place with autograd's own ops (traced graphs)."""
    r, d = h.shape[1] // len(columns), lora_B.shape[0] // len(columns)
    g = g.to(out.dtype)
    pieces, at = [], 0
    for j, (start, stop) in enumerate(columns):
        if start > at:
            pieces.append(out[:, at:start])
        o, g_j = out[:, start:stop], g[j * d:(j + 1) * d]
        if wx_d is None:
            base = o - bias[j * d:(j + 1) * d] if bias is not None else o
        else:
            base = wx_d[:, j * d:(j + 1) * d]
        z = base + scaling * (h[:, j * r:(j + 1) * r] @ lora_B[j * d:(j + 1) * d].t())
        pieces.append(o - base + g_j * z)
        at = stop
    if at < out.shape[1]:
        pieces.append(out[:, at:])
    return torch.cat(pieces, dim=1)


class _DoRAUpdate(torch.autograd.Function):
    """``out[:, a:b] = out - base + g * (base + s h_j B_j^T)`` in place for each adapted slice.

    ``base`` is ``W x_d`` (``wx_d``, given when dropout is active) or the base output less
    its bias. ``g`` is fp32 (its gradient is summed in fp32); the products and ``z`` are in
    the output's dtype. Saved for backward: ``z = base + s h B^T`` of the adapted columns (the
    magnitude's gradient is ``sum_tokens(grad * z)``), ``h``, ``B`` and ``g``; the base
    output itself is not kept.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, g: torch.Tensor,
                wx_d: torch.Tensor | None, bias: torch.Tensor | None, scaling: float,
                columns: tuple[tuple[int, int], ...]) -> torch.Tensor:
        r, d = h.shape[1] // len(columns), lora_B.shape[0] // len(columns)
        g_out = g.to(out.dtype)
        zs = []
        for j, (start, stop) in enumerate(columns):
            o, g_j = out[:, start:stop], g_out[j * d:(j + 1) * d]
            h_j, b_j = h[:, j * r:(j + 1) * r], lora_B[j * d:(j + 1) * d]
            if wx_d is None:
                z = o - bias[j * d:(j + 1) * d] if bias is not None else o.clone()
                z.addmm_(h_j, b_j.t(), alpha=scaling)
                o.copy_(z).mul_(g_j)
                if bias is not None:
                    o.add_(bias[j * d:(j + 1) * d])
            else:
                base = wx_d[:, j * d:(j + 1) * d]
                z = torch.addmm(base, h_j, b_j.t(), alpha=scaling)
                o.sub_(base).addcmul_(z, g_j)
            zs.append(z)
        ctx.mark_dirty(out)
        ctx.save_for_backward(h, lora_B, g_out, *zs)
        ctx.scaling, ctx.columns, ctx.dropped = scaling, columns, wx_d is not None
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, lora_B, g, *zs = ctx.saved_tensors  # g in the output's dtype
        columns, s = ctx.columns, ctx.scaling
        r, d = h.shape[1] // len(columns), lora_B.shape[0] // len(columns)
        grads = [grad[:, start:stop] for start, stop in columns]
        if ctx.dropped:  # y = out - W x_d + g z: out passes through, W x_d gets (g - 1)
            grad_out = grad
            grad_wx = torch.cat([gr * (g[j * d:(j + 1) * d] - 1) for j, gr in enumerate(grads)],
                                dim=1) if ctx.needs_input_grad[4] else None
            scaled = [gr * g[j * d:(j + 1) * d] for j, gr in enumerate(grads)]
        else:  # y = g (out - b + s h B^T) + b: the adapted columns of out get g
            grad_out, grad_wx = grad.clone(), None
            scaled = []
            for j, (start, stop) in enumerate(columns):
                scaled.append(grad_out[:, start:stop].mul_(g[j * d:(j + 1) * d]))
        grad_h = grad_B = grad_g = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_h = torch.cat([gs.mm(lora_B[j * d:(j + 1) * d] * s) for j, gs in enumerate(scaled)],
                               dim=1)
        if ctx.needs_input_grad[2]:
            grad_B = torch.cat([gs.t().mm(h[:, j * r:(j + 1) * r] * s) for j, gs in enumerate(scaled)],
                               dim=0)
        if ctx.needs_input_grad[3]:
            grad_g = torch.cat([(gr * z).sum(0, dtype=torch.float32) for gr, z in zip(grads, zs)])
        if ctx.has_bias and ctx.needs_input_grad[5] and not ctx.dropped:
            grad_bias = torch.cat([(gr * (1 - g[j * d:(j + 1) * d])).sum(0)
                                   for j, gr in enumerate(grads)])
        return grad_out, grad_h, grad_B, grad_g, grad_wx, grad_bias, None, None


def inject_dora(model: nn.Module, rank: int = 4, alpha: float = 32.0, dropout: float = 0.1,
                pos: str = "attn", scaling: float | None = None) -> list[str]:
    """DoRA layers on the linears ``lora.inject_lora`` adapts for ``pos`` (the same slices),
    with the update scaled by ``scaling`` (default alpha / rank). Returns their names."""
    names = inject_lora(model, rank=rank, alpha=alpha, dropout=dropout, pos=pos)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if scaling is not None:
            layer.scaling = scaling
        setattr(parent, child, DoRALinear.from_lora(layer))
    return names


def dora_layers(model: nn.Module) -> list[tuple[str, DoRALinear]]:
    """All (name, DoRALinear) pairs of the model."""
    return [(n, m) for n, m in lora_layers(model) if isinstance(m, DoRALinear)]


def mark_trainable(model: nn.Module) -> None:
    """LoRA's trained set (A, B, fc_norm, head) plus every magnitude vector."""
    mark_lora(model, tensors=(*LORA_TENSORS, "lora_magnitude"))
