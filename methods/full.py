"""Full fine-tuning: every parameter of the ViT is trained (the paper's FFT baseline)."""
from __future__ import annotations

import torch.nn as nn

from methods import Method, register


def _nothing_to_inject(model: nn.Module, settings: None) -> None:
    """Full fine-tuning trains the ViT itself."""


def _train_everything(model: nn.Module) -> None:
    model.requires_grad_(True)


FULL = register(Method(name="full", summary="full fine-tuning: every parameter trained",
                       inject=_nothing_to_inject, mark_trainable=_train_everything,
                       trains_backbone=True))
