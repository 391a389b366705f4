"""LoRA (Hu et al. 2022) as the paper applies it: low-rank updates on chosen linears of each
block (by default q and v of the fused qkv), trained with fc_norm + head; mergeable.

Two options from later papers, both off by default (the paper's recipe):
- rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA"): the update is scaled by alpha / sqrt(r) instead of alpha / r (``--lora_scaling``).
- LoRA+ (Hayou, Ghosh, Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"):
  B learns with ``--lora_plus_ratio`` times A's learning rate. The paper recommends 2^4 = 16
  as a default for its language-model tasks (it has no vision experiments); 1 is plain LoRA.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch.nn as nn

import lora
from lora.layers import RankError, check_dropout, check_rank
from methods import Method, ModelConfigError, flag, register

# How the update's scaling divides alpha, by --lora_scaling.
SCALING_RULES = {"standard": lambda r: r, "rslora": math.sqrt}


@dataclass(frozen=True)
class LoRASpec:
    """Where and how large the LoRA adapters are (``lora.inject_lora``'s arguments), how
    their update is scaled, and how fast B learns (``lr_scale``, read by the optimizer).

    Checked on creation: a bad value raises ``ModelConfigError`` naming its flag.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    pos: str = "attn"
    # "standard": alpha / r (the paper's); "rslora": alpha / sqrt(r).
    scaling_rule: str = "standard"
    # LoRA+: lr of every lora_B over the lr of the rest (1: plain LoRA).
    plus_ratio: float = 1.0

    def __post_init__(self) -> None:
        for check, value, name in ((check_rank, self.rank, "--lora_rank"),
                                   (check_dropout, self.dropout, "--lora_dropout")):
            try:
                check(value)
            except ValueError as err:
                raise ModelConfigError(f"{err} ({name})") from None
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0 < self.alpha < math.inf:
            raise ModelConfigError(f"LoRA alpha must be positive and finite (--lora_alpha), got "
                                   f"{self.alpha!r}")
        try:
            lora.parse_lora_pos(self.pos)
        except ValueError as err:
            raise ModelConfigError(f"{err} (--lora_pos)") from None
        if self.scaling_rule not in SCALING_RULES:
            raise ModelConfigError(f"LoRA scaling must be one of {list(SCALING_RULES)} "
                                   f"(--lora_scaling), got {self.scaling_rule!r}")
        if isinstance(self.plus_ratio, bool) or not isinstance(self.plus_ratio, (int, float)) \
                or not 0 < self.plus_ratio < math.inf:
            raise ModelConfigError(f"LoRA+ ratio must be a positive number (--lora_plus_ratio), "
                                   f"got {self.plus_ratio!r}")

    @property
    def scaling(self) -> float:
        """The factor of the low-rank update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / SCALING_RULES[self.scaling_rule](self.rank)

    def lr_scale(self, name: str) -> float:
        """The learning-rate factor of the trainable parameter ``name`` (LoRA+: B's ratio)."""
        return float(self.plus_ratio) if name.rsplit(".", 1)[-1] == "lora_B" else 1.0



def _inject(model: nn.Module, spec: LoRASpec) -> None:
    with rank_flag():
        names = lora.inject_lora(model, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                                 pos=spec.pos)
    for name in names:
        model.get_submodule(name).scaling = spec.scaling


@contextlib.contextmanager
def rank_flag() -> Iterator[None]:
    """A rank the model's layers cannot take (above a layer's width) as the flag's error."""
    try:
        yield
    except RankError as err:
        raise ModelConfigError(f"{err} (--lora_rank)") from None


def spec_from_flags(values: Mapping[str, Any]) -> LoRASpec:
    """The LoRA flags as the spec that checks them (DoRA reads the same flags)."""
    return LoRASpec(rank=values["lora_rank"], alpha=values["lora_alpha"],
                    dropout=values["lora_dropout"], pos=values["lora_pos"],
                    scaling_rule=values["lora_scaling"], plus_ratio=values["lora_plus_ratio"])


def spec_tag(spec: LoRASpec) -> str:
    """r<rank>, then what differs from the paper's recipe: positions other than q and v,
    rsLoRA scaling, a LoRA+ ratio."""
    tag = f"r{spec.rank}" + ("" if spec.pos == "attn" else "-" + spec.pos.replace(",", "+"))
    if spec.scaling_rule != "standard":
        tag += f"-{spec.scaling_rule}"
    if spec.plus_ratio != 1:
        tag += f"-plus{spec.plus_ratio:g}"
    return tag


FLAGS = (
    flag("--lora_rank", type=int, default=4, help="LoRA rank r"),
    flag("--lora_alpha", type=float, default=32.0,
         help="LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)"),
    flag("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input"),
    flag("--lora_pos", type=str, default="attn",
         help=f"where to put adapters: {sorted(lora.POSITIONS)} or a comma list"),
    flag("--lora_scaling", type=str, default="standard", choices=list(SCALING_RULES),
         help="update scaling: standard alpha / r (the paper), or rslora alpha / sqrt(r) "
              "(Kalajdzievski 2023)"),
    flag("--lora_plus_ratio", type=float, default=1.0,
         help="LoRA+ (Hayou et al. 2024): lora_B learns at this times the lr of the rest; 1 is "
              "plain LoRA, the LoRA+ paper suggests 16"),
)

LORA = register(Method(
    name="lora", summary="LoRA adapters on --lora_pos, trained with fc_norm + head",
    inject=_inject, mark_trainable=lora.mark_trainable, settings=LoRASpec,
    from_flags=spec_from_flags, flags=FLAGS, size_flag="--lora_rank", tag=spec_tag))
