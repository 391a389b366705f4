"""DINOv2 as Hugging Face transformers saves it (``Dinov2Model`` /
``Dinov2WithRegistersModel``, ``model.safetensors``): RAD-DINO (microsoft/rad-dino), and
facebook/dinov2-* in the same layout.

The separate query / key / value linears (``attention.attention.{query,key,value}`` as
saved, ``attention.{q,k,v}_proj`` in transformers 5's own state dict) are fused into timm's
``attn.qkv`` (rows q, k, v), so ``--lora_pos attn`` adapts q and v exactly as on MAE
weights. ``layer_scale{1,2}.lambda1`` become ``ls{1,2}.gamma``, ``layernorm`` the final
``norm``. With registers, transformers adds
``position_embeddings`` to the class token and the patches and nothing to the registers; timm
(``no_embed_class``) adds positions to the patches only, so the class position is added to
``cls_token`` here and the table keeps the patch positions: the same sums. ``mask_token``
(masked-image pre-training only) is dropped; any other key is refused.

RAD-DINO as published: config.json ``Dinov2Model``, hidden 768, 12 layers, 12 heads, patch 14,
image_size 518 (a 37 x 37 grid), layer scale, GELU MLP, LayerNorm eps 1e-6, no registers;
preprocessor_config.json: resize the shorter side to 518 (bicubic), centre crop 518, mean
0.5307 and std 0.2583 on every channel. Its model card classifies on the CLS token (the class
token after the final LayerNorm): token pooling. facebook/dinov2-* share the layout but use
ImageNet statistics, so the statistics are read from preprocessor_config.json beside the file
when it is there, RAD-DINO's otherwise.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Collection

import torch

from weights import (ConversionError, PretrainedWeightsError, StateDict, WeightsFormat,
                     read_json_beside, register, stats_from)

_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_QKV = ("query", "key", "value")
# The same linears as transformers >= 5 names its modules (``model.state_dict()``); its
# save_pretrained writes the names above.
_QKV_MODULES = {"attention.attention.query": "query", "attention.attention.key": "key",
                "attention.attention.value": "value", "attention.q_proj": "query",
                "attention.k_proj": "key", "attention.v_proj": "value"}
# Pre-training only: the embedding of masked patches.
DROPPED = ("embeddings.mask_token",)


def _recognise(keys: Collection[str]) -> bool:
    return ("embeddings.patch_embeddings.projection.weight" in keys
            and any(k.endswith(".layer_scale1.lambda1") for k in keys))


def _to_timm(state: StateDict) -> tuple[StateDict, list[str]]:
    out: StateDict = {}
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    source: dict[tuple, str] = {}  # where each tensor comes from: two keys for one is ambiguous

    def once(place: tuple, key: str) -> None:
        if place in source:
            raise ConversionError(f"{source[place]} and {key} are the same tensor of the encoder "
                                  "(two naming schemes in one file?): which one is meant is unknown")
        source[place] = key

    for key, value in state.items():
        if key in DROPPED:
            continue
        if key in _EMBEDDINGS:
            once((_EMBEDDINGS[key],), key)
            out[_EMBEDDINGS[key]] = value
            continue
        match = _LAYER.match(key)
        if match is None:
            raise ConversionError(f"{key} is no tensor of a transformers DINOv2 encoder this "
                                  "tool knows (a SwiGLU MLP or a task head?)")
        index, module, kind = int(match[1]), match[2], match[3]
        once((index, _QKV_MODULES.get(module) or _BLOCK.get(module, module), kind), key)
        if module in _QKV_MODULES and kind != "lambda1":
            parts.setdefault((index, kind), {})[_QKV_MODULES[module]] = value
        elif module in ("layer_scale1", "layer_scale2") and kind == "lambda1":
            out[f"blocks.{index}.ls{module[-1]}.gamma"] = value
        elif module in _BLOCK and kind != "lambda1":
            out[f"blocks.{index}.{_BLOCK[module]}.{kind}"] = value
        else:
            raise ConversionError(f"{key} is no tensor of a transformers DINOv2 encoder this "
                                  "tool knows")
    for (index, kind), qkv in sorted(parts.items()):
        missing = [name for name in _QKV if name not in qkv]
        if missing:
            raise ConversionError(f"encoder.layer.{index}.attention lacks its "
                                  f"{' and '.join(missing)} {kind}")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([qkv[name] for name in _QKV])
    if "reg_token" in out and "cls_token" in out and "pos_embed" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out, [k for k in state if k in DROPPED]


def _read_norm(weights_path: Path):
    """image_mean / image_std of transformers' preprocessor_config.json beside the weights."""
    obj = read_json_beside(weights_path, "preprocessor_config.json")
    if obj is None:
        return None
    return stats_from(obj, "image_mean", "image_std",
                      weights_path.parent / "preprocessor_config.json")


# What the converted ViT is, as transformers' config.json names it (RAD-DINO's and
# facebook/dinov2's values; a SwiGLU MLP's tensors are refused by the converter already).
BUILT = {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "use_swiglu_ffn": False, "qkv_bias": True}


def _check_config(weights_path: Path) -> None:
    """Refuse a transformers config.json beside the weights that asks for another ViT."""
    obj = read_json_beside(weights_path, "config.json")
    differ = [f"{key} {obj[key]!r} (this tool builds {value!r})" for key, value in BUILT.items()
              if obj is not None and key in obj and obj[key] != value]
    if differ:
        raise PretrainedWeightsError(f"{weights_path.parent / 'config.json'}: {'; '.join(differ)}: "
                                     "the converted ViT would compute another model")


DINOV2_HF = register(WeightsFormat(
    name="dinov2_hf", description="DINOv2 saved by transformers: RAD-DINO, facebook/dinov2",
    recognise=_recognise, to_timm=_to_timm, norm="rad_dino", read_norm=_read_norm,
    check_config=_check_config,
    global_pool="token", library="transformers",
    arch_settings={"act_layer": None, "norm_eps": 1e-6},
    # transformers' Dinov2WithRegisters resizes with antialiasing, its plain Dinov2 without.
    antialias=lambda keys: "embeddings.register_tokens" in keys))
