"""LoRA (Hu et al. 2022) as the paper applies it: low-rank updates on chosen linears of each
block (by default q and v of the fused qkv), trained with fc_norm + head; mergeable."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn as nn

import lora
from methods import Method, ModelConfigError, flag, register


@dataclass(frozen=True)
class LoRASpec:
    """Where and how large the LoRA adapters are (``lora.inject_lora``'s arguments).

    Checked on creation: a bad value raises ``ModelConfigError`` naming its flag.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    pos: str = "attn"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ModelConfigError(f"LoRA rank must be a positive integer (--lora_rank), "
                                   f"got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not self.alpha > 0:
            raise ModelConfigError(f"LoRA alpha must be positive (--lora_alpha), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ModelConfigError(f"LoRA dropout must be in [0, 1) (--lora_dropout), "
                                   f"got {self.dropout!r}")
        try:
            lora.parse_lora_pos(self.pos)
        except ValueError as err:
            raise ModelConfigError(f"{err} (--lora_pos)") from None

    @property
    def scaling(self) -> float:
        """alpha / r: the factor of the low-rank update (changes with r at fixed alpha)."""
        return self.alpha / self.rank


def _inject(model: nn.Module, spec: LoRASpec) -> None:
    lora.inject_lora(model, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, pos=spec.pos)


def spec_from_flags(values: Mapping[str, Any]) -> LoRASpec:
    """The LoRA flags as the spec that checks them."""
    return LoRASpec(rank=values["lora_rank"], alpha=values["lora_alpha"],
                    dropout=values["lora_dropout"], pos=values["lora_pos"])


def _tag(spec: LoRASpec) -> str:
    """r<rank>, and the positions when they are not the paper's q and v."""
    return f"r{spec.rank}" + ("" if spec.pos == "attn" else "-" + spec.pos.replace(",", "+"))


FLAGS = (
    flag("--lora_rank", type=int, default=4, help="LoRA rank r"),
    flag("--lora_alpha", type=float, default=32.0, help="LoRA alpha (scaling alpha / r)"),
    flag("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input"),
    flag("--lora_pos", type=str, default="attn",
         help=f"where to put adapters: {sorted(lora.POSITIONS)} or a comma list"),
)

LORA = register(Method(
    name="lora", summary="LoRA adapters on --lora_pos, trained with fc_norm + head",
    inject=_inject, mark_trainable=lora.mark_trainable, settings=LoRASpec,
    from_flags=spec_from_flags, flags=FLAGS, size_flag="--lora_rank", tag=_tag,
    merge=lora.merge, unmerge=lora.unmerge, merged_state_dict=lora.merged_state_dict))
