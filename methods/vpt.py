"""Visual Prompt Tuning (Jia et al., ECCV 2022): learned prompt tokens in the input of the frozen
ViT's blocks, trained with fc_norm + head; not mergeable (a plain ViT has no extra inputs).

The prompts sit after the prefix (cls) token and before the patch tokens:
``[cls, P, E]``. VPT-shallow (``--vpt_depth shallow``) inserts them once, at the first block's
input; VPT-deep (``deep``, the paper's main variant) gives every block its own prompts, which
replace the previous block's prompt outputs. Prompts get no position
embedding; they are initialised uniformly in +- sqrt(6 / (3 p^2 + d)) (Xavier for the patch
embedding's fan-in, as the official code), and a dropout (``--vpt_dropout``) is applied to them
in training: 0.1 for deep prompts and none for shallow ones by default, as the official final
runs do (demo.ipynb: "we don't use dropout for VPT-shallow").

Mean pooling excludes the prompts: the model's ``num_prefix_tokens`` counts them, so timm's
``pool`` (and Grad-CAM, util.heatmap) take the patch tokens after them. The official code pools
patch and prompt outputs together ("original" for MAE backbones); its ``img_pool`` is what is
done here. Trainable: tokens x width per prompted block (deep: x depth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

import lora
from methods import Method, ModelConfigError, flag, register

DEPTHS = ("shallow", "deep")


@dataclass(frozen=True)
class VPTSettings:
    """Prompt length, shallow or deep, and the prompts' dropout; each checked on creation."""

    tokens: int = 50
    depth: str = "deep"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0:
            raise ModelConfigError(f"VPT prompt length must be a positive integer (--vpt_tokens), "
                                   f"got {self.tokens!r}")
        if self.depth not in DEPTHS:
            raise ModelConfigError(f"VPT depth must be one of {DEPTHS} (--vpt_depth), got "
                                   f"{self.depth!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ModelConfigError(f"VPT prompt dropout must be in [0, 1) (--vpt_dropout), got "
                                   f"{self.dropout!r}")


class PromptedBlock(nn.Module):
    """A ViT block whose input gets its own learned prompt tokens after the ``prefix`` tokens.

    ``insert`` puts them in (the first prompted block); otherwise they replace the
    ``num_tokens`` tokens after the prefix, the previous block's prompt outputs (VPT-deep).

    Args:
        block: the timm block, kept as ``self.block`` (frozen).
        num_tokens: prompt length.
        prefix: tokens before the prompts (1: the cls token).
        insert: whether the prompts are added to the sequence or replace those already there.
        dropout: dropout on the prompts in training.
    """

    def __init__(self, block: nn.Module, num_tokens: int, prefix: int, insert: bool,
                 dropout: float = 0.0, init_bound: float = 0.0) -> None:
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        self.block = block
        self.block.requires_grad_(False)
        self.prompt = nn.Parameter(torch.empty(1, num_tokens, dim, device=block.norm1.weight.device))
        nn.init.uniform_(self.prompt, -init_bound, init_bound)
        self.prompt_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.prefix, self.insert = prefix, insert

    @property
    def num_tokens(self) -> int:
        """The prompt length."""
        return self.prompt.shape[1]

    def with_prompts(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B x N x D) with this block's prompts after its prefix tokens."""
        prompts = self.prompt_dropout(self.prompt.expand(x.shape[0], -1, -1)).to(x.dtype)
        rest = x[:, self.prefix + (0 if self.insert else self.num_tokens):]
        return torch.cat([x[:, :self.prefix], prompts, rest], dim=1)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.block(self.with_prompts(x), **kwargs)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, prefix={self.prefix}, insert={self.insert}"


def init_bound(model: nn.Module) -> float:
    """The official code's uniform bound: Xavier for fan-in 3 p^2 (a patch) and fan-out d."""
    patch = model.patch_embed.patch_size
    return math.sqrt(6.0 / (3 * patch[0] * patch[1] + model.embed_dim))


def inject(model: nn.Module, settings: VPTSettings) -> None:
    """Wrap the first block (shallow) or every block (deep) in a ``PromptedBlock`` and count
    the prompts among the model's prefix tokens (so pooling and Grad-CAM skip them)."""
    if any(isinstance(m, PromptedBlock) for m in model.modules()):
        raise ValueError("model already has VPT prompts")
    prefix = int(model.num_prefix_tokens)
    depth = len(model.blocks) if settings.depth == "deep" else 1
    bound = init_bound(model)
    for i in range(depth):
        model.blocks[i] = PromptedBlock(model.blocks[i], settings.tokens, prefix, insert=i == 0,
                                        dropout=settings.dropout, init_bound=bound)
    model.num_prefix_tokens = prefix + settings.tokens


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything but the prompts and the classifier (fc_norm + head)."""
    lora.mark_trainable(model, tensors=("prompt",))


def from_flags(values: Mapping[str, Any]) -> VPTSettings:
    """The prompt flags as the settings that check them; no --vpt_dropout: the official runs'
    (0.1 deep, 0 shallow)."""
    depth, dropout = values["vpt_depth"], values["vpt_dropout"]
    if dropout is None:
        dropout = 0.1 if depth == "deep" else 0.0
    return VPTSettings(tokens=values["vpt_tokens"], depth=depth, dropout=dropout)


def trainable_count(width: int, depth: int, tokens: int, vpt_depth: str = "deep") -> int:
    """Prompt parameters of a ViT of ``depth`` blocks of ``width``."""
    return tokens * width * (depth if vpt_depth == "deep" else 1)


# The deep prompt length whose trainable count is within 15% of LoRA's (q, v) at each rank on
# ViT-B/16 with 14 classes (checked in tests/test_peft_methods.py; docs/METHODS_MORE.md).
LORA_BUDGET_TOKENS = {4: 16, 8: 32, 32: 128}

FLAGS = (
    flag("--vpt_tokens", type=int, default=50,
         help="VPT prompt length (official commands: 50); deep prompts at LoRA r4 / r8 / r32's "
              "budget on ViT-B: " + " / ".join(map(str, LORA_BUDGET_TOKENS.values()))),
    flag("--vpt_depth", type=str, default="deep", choices=list(DEPTHS),
         help="VPT prompts at the first block only (shallow) or at every block (deep)"),
    flag("--vpt_dropout", type=float, default=None,
         help="dropout on the prompts (default: 0.1 deep, 0 shallow, as the official runs)"),
)

VPT = register(Method(
    name="vpt", summary="visual prompt tuning: learned prompt tokens, shallow or deep (+ fc_norm, "
                        "head); not mergeable",
    inject=inject, mark_trainable=mark_trainable, settings=VPTSettings, from_flags=from_flags,
    flags=FLAGS, size_flag="--vpt_tokens", tag=lambda s: f"{s.depth}-p{s.tokens}",
    resolved_flags=lambda s: {"vpt_dropout": s.dropout},
    preset_lr=(0.25, "VPT official demo.ipynb final runs (VPT-deep, VTAB dmlab / eurosat): SGD, "
                     "base lr 1.0, lr = 1.0 x 64 / 256 at 64 images a step", "sgd"),
    not_mergeable="its prompt tokens are extra inputs to the blocks, which a plain timm ViT does "
                  "not have; use the checkpoint itself (predict.py --checkpoint, --eval --resume)"))
