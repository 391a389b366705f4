"""DoRA (Liu et al. 2024): LoRA's update as the direction of each adapted weight row, plus a
learned magnitude per row, on the targets of LoRA's own flags; mergeable."""
from __future__ import annotations

import torch.nn as nn

from lora import dora
from methods import Method, register
from methods.lora import LoRASpec, rank_flag, spec_from_flags, spec_tag


def _inject(model: nn.Module, spec: LoRASpec) -> None:
    with rank_flag():
        dora.inject_dora(model, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                         pos=spec.pos, scaling=spec.scaling)


DORA = register(Method(
    name="dora", summary="DoRA: LoRA's direction + a learned magnitude per adapted row, on "
                         "--lora_pos (LoRA's flags), trained with fc_norm + head",
    inject=_inject, mark_trainable=dora.mark_trainable, settings=LoRASpec,
    from_flags=spec_from_flags, size_flag="--lora_rank", tag=spec_tag))
