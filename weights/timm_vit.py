"""timm's own ViT state dicts (and encoder-only MAE releases, which use the same names).

A classifier (``head.*``) from another task is left to the loader, which always starts a
new one; ``norm.*`` is unused by a model that pools with ``fc_norm``. The names do not tell
the activation or the LayerNorm epsilon (timm's CLIP and DINOv2 models share them with
MAE's), so the architecture is matched by shapes alone.
"""
from __future__ import annotations

from typing import Collection

from weights import StateDict, WeightsFormat, has_vit_encoder, register
from weights.mae import PRETRAINING_ONLY


def _recognise(keys: Collection[str]) -> bool:
    return has_vit_encoder(keys) and not any(k.startswith(PRETRAINING_ONLY) for k in keys)


def _as_is(state: StateDict) -> tuple[StateDict, list[str]]:
    return dict(state), []


TIMM = register(WeightsFormat(
    name="timm", description="timm VisionTransformer state dict", recognise=_recognise,
    to_timm=_as_is))
