"""BitFit (Ben Zaken, Ravfogel and Goldberg, ACL 2022): only the bias terms of the backbone are
trained, with the classifier (fc_norm + head); nothing is added, so the trained model is a
plain timm ViT already (mergeable: nothing to merge).

"Bias terms" are every ``bias`` of the backbone as the paper counts them for BERT: the linears'
(qkv, proj, fc1, fc2), the layer norms' and the patch embedding's. A ViT-B/16 with 14 classes
trains 114,446 parameters this way (101,376 in the blocks, 768 in the patch embedding,
12,302 in fc_norm + head): a fixed size, between LoRA r4 (159,758) and a linear probe.
"""
from __future__ import annotations

import torch.nn as nn

import lora
from methods import Method, register
from methods.full import _nothing_to_inject


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything but the biases of every module and the classifier (fc_norm + head)."""
    lora.mark_trainable(model, tensors=("bias",))


BITFIT = register(Method(
    name="bitfit", summary="BitFit: only the biases (+ fc_norm, head) trained; mergeable",
    inject=_nothing_to_inject, mark_trainable=mark_trainable,
    # The BitFit paper tunes BERT (AdamW, lr searched per task) and names no lr for a ViT, so a
    # preset keeps the paper's LoRA lr of the setting, which trains the same classifier with
    # either recipe (docs/METHODS_MORE.md).
    preset_lr=None))
