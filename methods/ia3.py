"""(IA)^3 (Liu et al. 2022): learned vectors rescaling the keys, the values and the MLP's
inner activations of every block, trained with fc_norm + head; mergeable. One fixed size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn as nn

from lora import ia3
from methods import Method, ModelConfigError, flag, register

# Which thirds of the fused qkv output get a vector, by --ia3_attn: the paper's k and v, or
# q, k and v (what HF PEFT's IA3 does when it targets timm's whole qkv linear).
ATTN_PARTS = {"kv": ia3.KV, "qkv": (True, True, True)}


@dataclass(frozen=True)
class IA3Settings:
    """Which attention outputs IA3 rescales (the MLP's inner activations always)."""

    attn: str = "kv"

    def __post_init__(self) -> None:
        if self.attn not in ATTN_PARTS:
            raise ModelConfigError(f"IA3 attention targets must be one of {list(ATTN_PARTS)} "
                                   f"(--ia3_attn), got {self.attn!r}")


def _inject(model: nn.Module, settings: IA3Settings) -> None:
    ia3.inject_ia3(model, ATTN_PARTS[settings.attn])


def _from_flags(values: Mapping[str, Any]) -> IA3Settings:
    return IA3Settings(attn=values["ia3_attn"])


def _tag(settings: IA3Settings) -> str:
    return "" if settings.attn == "kv" else settings.attn


IA3 = register(Method(
    name="ia3", summary="(IA)^3: learned scales of k, v and the MLP's inner activations, "
                        "trained with fc_norm + head",
    inject=_inject, mark_trainable=ia3.mark_trainable, settings=IA3Settings,
    from_flags=_from_flags, tag=_tag,
    flags=(flag("--ia3_attn", type=str, default="kv", choices=list(ATTN_PARTS),
                help="IA3: the attention outputs rescaled: kv (the paper) or qkv (as HF PEFT "
                     "on timm's fused qkv)"),),
    preset_lr=(3e-3, "Liu et al. 2022 (T-Few): (IA)^3 trained with Adafactor, an adaptive "
                     "optimizer like AdamW, at lr 3e-3", "adamw")))
