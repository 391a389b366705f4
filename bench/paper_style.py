"""A benchmark peer that computes the way the paper's model code does.

The paper (arXiv 2401.12215) fine-tunes an MAE-style ViT whose attention is written out
(softmax(Q K^T) V, no fused kernel) and whose fused qkv linear carries a loralib-style
``MergedLinear`` adapter: A as a linear layer, B as a grouped 1-D convolution over the
(batch, 2r, tokens) tensor, then a scatter into the full 3 * dim output with zeros for k.
Its training loop autocasts on CUDA only, so on a CPU it runs in fp32.

This file re-implements that computation (it is not the paper's code) over a plain timm
ViT so that ``bench_model.py`` can time it next to ours with the same weights, rank and
tensor layout: ``lora_A`` is (r * n_adapted) x in and ``lora_B`` is (d * n_adapted) x r,
exactly as ``lora.LoRALinear`` stores them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, VisionTransformer

HEAD_MODULES = ("fc_norm", "head")


class ConvMergedLoRA(nn.Module):
    """A frozen linear plus a loralib-``MergedLinear``-style update on some output slices.

    Args:
        base_layer: the frozen linear (the fused qkv of a timm Attention).
        rank: rank r of each adapted slice.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the LoRA input.
        parts: which equal output slices are adapted; ``(True, False, True)`` = q and v.
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 4, alpha: float = 32.0,
                 dropout: float = 0.0, parts: Sequence[bool] = (True, False, True)) -> None:
        super().__init__()
        parts = tuple(bool(p) for p in parts)
        if rank <= 0 or not any(parts):
            raise ValueError(f"need rank > 0 and an adapted slice, got rank={rank}, parts={parts}")
        if base_layer.out_features % len(parts):
            raise ValueError(f"out_features={base_layer.out_features} does not split into "
                             f"{len(parts)} slices")
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.scaling, self.parts = rank, alpha / rank, parts
        self.n_adapted = sum(parts)
        d = base_layer.out_features // len(parts)
        self.lora_A = nn.Parameter(torch.empty(rank * self.n_adapted, base_layer.in_features))
        self.lora_B = nn.Parameter(torch.zeros(d * self.n_adapted, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The output rows the update lands on (q and v rows, not k): loralib's `lora_ind`.
        mask = torch.zeros(len(parts), d, dtype=torch.bool)
        mask[torch.tensor(parts)] = True
        self.register_buffer("out_index", mask.flatten().nonzero().squeeze(1), persistent=False)

    def _scatter(self, update: torch.Tensor) -> torch.Tensor:
        """Place the (..., d * n_adapted) update into a zero (..., out_features) tensor."""
        full = update.new_zeros(*update.shape[:-1], self.base_layer.out_features)
        full[..., self.out_index] = update
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (B, N, r * n_adapted)
        # B as a grouped 1x1 convolution over channels: each group maps its r channels of
        # h to the d output channels of one adapted slice.
        update = F.conv1d(h.transpose(-2, -1), self.lora_B.unsqueeze(-1),
                          groups=self.n_adapted).transpose(-2, -1)
        return out + self._scatter(update) * self.scaling


def to_paper_style(model: VisionTransformer, rank: int = 4, alpha: float = 32.0,
                   dropout: float = 0.1, parts: Sequence[bool] = (True, False, True),
                   extra_trainable: Sequence[str] = HEAD_MODULES) -> VisionTransformer:
    """Turn a plain timm ViT (in place) into the paper-style LoRA model and freeze it.

    Every Attention gets the explicit softmax path and a ``ConvMergedLoRA`` on its qkv;
    only the adapters and ``extra_trainable`` modules (fc_norm, head) stay trainable.
    """
    model.requires_grad_(False)
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False  # softmax(q k^T) v written out, as the paper's code
            module.qkv = ConvMergedLoRA(module.qkv, rank, alpha, dropout, parts)
            count += 1
    assert count, f"no timm Attention found in {type(model).__name__}"
    for name in extra_trainable:
        getattr(model, name).requires_grad_(True)
    return model


def paper_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision as the paper's loop applies it: on CUDA only, fp32 anywhere else."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)
