"""MAE-style pre-training checkpoints: MRM, CXR_MAE, MAE's own and Medical MAE (with the decoder).

The encoder already has timm's ViT names; the decoder (``decoder_*``, ``mask_token``) and
MRM's text branch (``bert_encoder.*``, ``bert_mlp.*``) are dropped. MRM, CXR_MAE, ImageNet
MAE and Medical MAE (lambert-x/medical_mae: ``vit-s_CXR_0.3M_mae.pth`` a ViT-S/16,
``vit-b_CXR_0.5M_mae.pth`` a ViT-B/16, statistics 'medical_mae') share the layout but not
the normalisation, so ``--norm`` decides it. All are fine-tuned with mean pooling + fc_norm.
"""
from __future__ import annotations

from typing import Collection

from weights import StateDict, WeightsFormat, has_vit_encoder, register

# Keys of MAE / MRM pre-training files that are not part of the ViT encoder.
PRETRAINING_ONLY = ("mask_token", "decoder_", "bert_encoder.", "bert_mlp.")


def _recognise(keys: Collection[str]) -> bool:
    return has_vit_encoder(keys) and any(k.startswith(PRETRAINING_ONLY) for k in keys)


def _to_timm(state: StateDict) -> tuple[StateDict, list[str]]:
    dropped = [k for k in state if k.startswith(PRETRAINING_ONLY)]
    return {k: v for k, v in state.items() if not k.startswith(PRETRAINING_ONLY)}, dropped


MAE = register(WeightsFormat(
    name="mae",
    description="MAE / MRM / CXR_MAE / Medical MAE pre-training checkpoint (encoder + decoder)",
    recognise=_recognise, to_timm=_to_timm,
    # MAE's models_vit: timm's ViT with GELU and LayerNorm eps 1e-6.
    arch_settings={"act_layer": None, "norm_eps": 1e-6}))
