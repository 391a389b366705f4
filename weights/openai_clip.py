"""CLIP state dicts in OpenAI's module layout (``clip.model.CLIP``, as ``torch.save(
model.state_dict())`` writes it): CheXzero (rajpurkarlab/CheXzero, ViT-B/32 fine-tuned from
OpenAI's CLIP, ``best_64_5e-05_original_22000_0.864.pt`` and the other ensemble members).

Image tower -> timm's ViT: ``visual.conv1`` -> ``patch_embed.proj`` (no bias),
``visual.class_embedding`` -> ``cls_token``, ``visual.positional_embedding`` -> ``pos_embed``
(with a batch dimension), ``visual.ln_pre`` -> ``norm_pre``,
``visual.transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}`` -> ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` (the
in-projection is already fused q, k, v), ``visual.ln_post`` -> ``norm``. CLIP's image feature
is ``ln_post`` of the class token, so the authors' pooling is 'token'. ``visual.proj`` (the
projection into the joint space), the text tower (``transformer.*``, ``token_embedding``,
``positional_embedding``, ``ln_final``, ``text_projection``) and ``logit_scale`` are dropped.
Any other ``visual.*`` key is refused.

OpenAI's architecture: pre-norm, QuickGELU, LayerNorm eps 1e-5 (``nn.LayerNorm``'s
default), 224 px (a 7 x 7 grid at patch 32). CheXzero (train.py, zero_shot.py) resizes its
320 px images to 224 (bicubic) and normalises 0-255 pixels with mean 101.48761 and std
83.43944 on every channel ('chexzero'), not OpenAI's statistics ('clip'); its files carry no
config that tells, so this layout assumes CheXzero's (pass --norm clip for other weights).
"""
from __future__ import annotations

import re
from typing import Collection

from weights import ConversionError, StateDict, WeightsFormat, register

_VISUAL = {
    "visual.conv1.weight": "patch_embed.proj.weight",
    "visual.ln_pre.weight": "norm_pre.weight",
    "visual.ln_pre.bias": "norm_pre.bias",
    "visual.ln_post.weight": "norm.weight",
    "visual.ln_post.bias": "norm.bias",
}
_BLOCK = {
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_RESBLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)$")
# The projection into the joint image-text space: contrastive pre-training only.
PROJECTION = "visual.proj"


def _recognise(keys: Collection[str]) -> bool:
    return "visual.class_embedding" in keys and "visual.conv1.weight" in keys


def _to_timm(state: StateDict) -> tuple[StateDict, list[str]]:
    out: StateDict = {}
    dropped = []
    for key, value in state.items():
        if not key.startswith("visual.") or key == PROJECTION:
            dropped.append(key)
        elif key == "visual.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        elif key in _VISUAL:
            out[_VISUAL[key]] = value
        elif (match := _RESBLOCK.match(key)) and match[2] in _BLOCK:
            out[f"blocks.{match[1]}.{_BLOCK[match[2]]}"] = value
        else:
            raise ConversionError(f"{key} is no tensor of an OpenAI CLIP ViT image tower this "
                                  "tool knows (a ResNet tower or layer scale?)")
    return out, dropped


OPENAI_CLIP = register(WeightsFormat(
    name="openai_clip", description="CLIP in OpenAI's layout: CheXzero",
    recognise=_recognise, to_timm=_to_timm, norm="chexzero", global_pool="token",
    library="OpenAI CLIP", arch_settings={"act_layer": "quick_gelu", "norm_eps": 1e-5}))
