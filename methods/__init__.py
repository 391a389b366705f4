"""Fine-tuning methods (``--method``): each is one module of this package that registers itself.

A method says what it adds to a plain timm ViT (``inject``), what it trains
(``mark_trainable``), the settings it is built from and the flag of its size, and how its
trained model becomes plain timm weights (``merge`` / ``unmerge`` for evaluation,
``merged_state_dict`` for export) or why it cannot (``not_mergeable``). The model
assembly, the checkpoints and the export ask this registry; nothing else knows the list.

    register(Method(name="bitfit", inject=..., mark_trainable=..., ...))

The package sits above ``lora/`` (torch only) and below ``models_vit_lora``: a method may
use any layer library, and the model code finds it by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from util.cli import UsageError


class ModelConfigError(UsageError, ValueError):
    """Model settings that describe no buildable model (exit 2 when they come from flags)."""


def no_merge(model: nn.Module) -> int:
    """Nothing to fold: the method adds no modules. Returns the number of layers merged (0)."""
    return 0


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own state dict: a method that adds no modules is already plain timm."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class Method:
    """One fine-tuning method, as the model assembly, the checkpoints and the export see it.

    Args:
        name: the ``--method`` value and the checkpoint JSON's ``method``.
        summary: one line for ``--help`` and the docs.
        inject: ``inject(model, settings)`` adds the method's modules to a ViT whose
            pre-trained weights are loaded (``settings`` is None for a method without any).
        mark_trainable: sets ``requires_grad``: exactly what the method trains.
        settings: the dataclass of its settings (``ModelConfig.lora``), None if it has none.
        size_flag: the flag of its size knob (``--lora_rank``), None without one.
        merge, unmerge: fold the trained modules into the base weights and back, for
            evaluation at the cost of a plain ViT; each returns the number of layers changed.
        merged_state_dict: the plain timm state dict with the method folded in (export),
            leaving the model as it is.
        not_mergeable: for a method that cannot become a plain timm ViT, the one-line reason
            the export gives; empty when it can.
    """

    name: str
    summary: str
    inject: Callable[[nn.Module, Any], None]
    mark_trainable: Callable[[nn.Module], None]
    settings: type | None = None
    size_flag: str | None = None
    merge: Callable[[nn.Module], int] = no_merge
    unmerge: Callable[[nn.Module], int] = no_merge
    merged_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]] = plain_state_dict
    not_mergeable: str = ""


# name -> Method, in registration order (built-ins first: see the end of this module).
REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry; a second method of the same name is refused."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``; an unknown name raises ``ModelConfigError``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelConfigError(f"unknown method {name!r} (--method); choose from "
                               f"{list(REGISTRY)}") from None


# Each registers itself, in the order --help lists them (lora, the default, first).
from methods import lora, full, linear  # noqa: E402,F401,I001
