"""open_clip CLIP checkpoints whose image tower is a timm ViT (``visual.trunk.*``):
BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224,
``open_clip_pytorch_model.bin``, a torch pickle read weights-only like every file).

The trunk already has timm's names; the image projection (``visual.head.*``, 768 -> 512 for
BiomedCLIP), the text tower (``text.*``: PubMedBERT) and ``logit_scale`` serve the contrastive
pre-training, not classification, and are dropped (listed in the load report). A CLIP file
always holds ``logit_scale``: recognising it by that and a ViT trunk keeps other wrappers of
timm models under ``visual.trunk.`` apart.

BiomedCLIP as published (open_clip_config.json): ``timm_model_name`` vit_base_patch16_224 (a
ViT-B/16, GELU, LayerNorm eps 1e-6), ``timm_pool`` '' (open_clip then keeps the trunk's own
pooling: the class token after the final LayerNorm), ``timm_proj`` linear, image_size 224;
``preprocess_cfg`` mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258,
0.27577711): OpenAI CLIP's statistics, which open_clip also uses when a config has none.
The statistics are read from open_clip_config.json beside the file when it is there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection

from weights import ConversionError, StateDict, WeightsFormat, read_json_beside, register, stats_from

TRUNK = "visual.trunk."


def _recognise(keys: Collection[str]) -> bool:
    return "logit_scale" in keys and f"{TRUNK}patch_embed.proj.weight" in keys


# What a CLIP file holds beside the image trunk, dropped on purpose: the image projection, the
# text tower and the contrastive temperature (and open_clip's optional logit bias).
NOT_THE_ENCODER = ("visual.head.", "text.", "logit_scale", "logit_bias")


def _to_timm(state: StateDict) -> tuple[StateDict, list[str]]:
    trunk = {k[len(TRUNK):]: v for k, v in state.items() if k.startswith(TRUNK)}
    unknown = sorted(k for k in state if not k.startswith((TRUNK, *NOT_THE_ENCODER)))
    if unknown:
        raise ConversionError(f"{len(unknown)} keys are neither the image trunk ({TRUNK}*) nor "
                              f"the parts of a CLIP file dropped on purpose: {', '.join(unknown[:3])}")
    return trunk, [k for k in state if not k.startswith(TRUNK)]


def _read_norm(weights_path: Path):
    """preprocess_cfg mean / std of open_clip_config.json beside the weights."""
    obj = read_json_beside(weights_path, "open_clip_config.json")
    if obj is None or not isinstance(obj.get("preprocess_cfg"), dict):
        return None
    return stats_from(obj["preprocess_cfg"], "mean", "std",
                      weights_path.parent / "open_clip_config.json")


OPEN_CLIP = register(WeightsFormat(
    name="open_clip", description="open_clip CLIP with a timm ViT image tower: BiomedCLIP",
    recognise=_recognise, to_timm=_to_timm, norm="clip", read_norm=_read_norm,
    global_pool="token", library="open_clip"))
