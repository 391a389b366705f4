"""Fine-tuning methods (``--method``): each is one module of this package that registers itself.

A method says what it adds to a plain timm ViT (``inject``), what it trains
(``mark_trainable``), its own flags and the settings they build (``flags``, ``settings``,
``from_flags``), how its runs are named (``tag``), where its learning rate comes from when
a preset gives LoRA's (``preset_lr``), and, where its trained model cannot become plain timm
weights, why (``not_mergeable``); a mergeable method's layers are ``lora.folding.Mergeable``.
The entry script, the model assembly, the checkpoints, the presets and the export ask this
registry; nothing else knows the list.

    register(Method(name="bitfit", inject=..., mark_trainable=..., ...))

Adding a method is one module here that calls ``register`` and one import line at the end of
this file (docs/ADDING_A_METHOD.md).

The package sits above ``lora/`` (torch only) and below ``models_vit_lora``: a method may
use any layer library, and the model code finds it by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Mapping

import torch
import torch.nn as nn

from lora import folding
from util.cli import UsageError


class ModelConfigError(UsageError, ValueError):
    """Model settings that describe no buildable model (exit 2 when they come from flags)."""


@dataclass(frozen=True)
class Flag:
    """One command-line flag a method owns: ``parser.add_argument(*names, **options)``.

    The entry script adds every registered method's flags to its "method" group, each as a
    setting of the run and part of the method's recipe.
    """

    names: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        """The attribute the parsed value lands in (``--lora_rank`` -> ``lora_rank``)."""
        return self.options.get("dest") or self.names[0].lstrip("-").replace("-", "_")


def flag(*names: str, **options: Any) -> Flag:
    """``Flag(names, options)``, written like ``add_argument``."""
    return Flag(names, options)


def _no_settings(values: Mapping[str, Any]) -> None:
    return None


def _plain_tag(settings: Any) -> str:
    return ""


def _nothing_resolved(settings: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """One fine-tuning method, as the model assembly, the checkpoints and the export see it.

    Args:
        name: the ``--method`` value and the checkpoint JSON's ``method``.
        summary: one line for ``--help`` and the docs.
        inject: ``inject(model, settings)`` adds the method's modules to a ViT whose
            pre-trained weights are loaded (``settings`` is None for a method without any).
        mark_trainable: sets ``requires_grad``: exactly what the method trains.
        settings: the dataclass of its settings (``ModelConfig.method_settings``), None if it
            has none; it checks its own values on creation (``ModelConfigError`` naming the flag).
        from_flags: ``from_flags(values)`` -> its settings, from the parsed flag values by
            destination (its own flags and any other method's it shares, e.g. DoRA LoRA's);
            the method flags it reads are its run's settings, the others are left out.
        flags: the flags it owns (``Flag``); shared flags are declared once, by one method.
        size_flag: the flag of its size knob (``--lora_rank``), None without one.
        tag: ``tag(settings)`` -> what follows the method's name in an automatic run name
            ("r4" for LoRA rank 4), "" for nothing.
        trains_backbone: whether every backbone weight is trained (then the backbone cannot be
            held in a lower precision, and checkpoints hold every tensor).
        preset_lr: for a method without a published recipe of its own, (the learning rate its
            paper recommends, where it comes from, the optimizer it is for): used with a
            ``--preset`` of that optimizer unless ``--lr`` is given; None, or a preset of the
            other optimizer, keeps the preset's (the paper's LoRA) value.
        not_mergeable: for a method that cannot become a plain timm ViT, the one-line reason
            the export gives; empty when it can.
        resolved_flags: ``resolved_flags(settings)`` -> {destination: value} for its flags
            whose default (None) the settings resolve: the run records the value that ran, so
            the same value given explicitly is the same run.
    """

    name: str
    summary: str
    inject: Callable[[nn.Module, Any], None]
    mark_trainable: Callable[[nn.Module], None]
    settings: type | None = None
    from_flags: Callable[[Mapping[str, Any]], Any] = _no_settings
    flags: tuple[Flag, ...] = ()
    size_flag: str | None = None
    tag: Callable[[Any], str] = _plain_tag
    trains_backbone: bool = False
    preset_lr: tuple[float, str, str] | None = None
    not_mergeable: str = ""
    resolved_flags: Callable[[Any], dict[str, Any]] = _nothing_resolved

    def read_flags(self, values: Mapping[str, Any],
                   given: Collection[str] = ()) -> tuple[Any, set[str], list[str]]:
        """(the settings ``from_flags`` makes of the parsed flag ``values``; the registered
        methods' flags it did not read, which change nothing in this method's runs; a note for
        each of those among the flags ``given``)."""
        seen = _Reads(values)
        settings = self.from_flags(seen)
        unread = [f for f in all_flags() if f.dest not in seen.read]
        notes = [f"{f.names[0]} is a flag of --method {_owner(f)}: it has no effect with --method "
                 f"{self.name}" for f in unread if f.dest in given]
        return settings, {f.dest for f in unread}, notes

    # A mergeable method's layers are ``lora.folding.Mergeable``: one merge for all of them.
    def merge(self, model: nn.Module) -> int:
        """Fold the trained layers into the base weights, for evaluation at the cost of a plain
        ViT. Returns the number of layers merged."""
        return folding.merge(model)

    def unmerge(self, model: nn.Module) -> int:
        """Undo ``merge``. Returns the number of layers unmerged."""
        return folding.unmerge(model)

    def merged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The plain timm state dict with the method folded in (export); the model is left as it is."""
        return folding.merged_state_dict(model)


class _Reads(Mapping):
    """``values``, noting which keys are read."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values, self.read = values, set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


# name -> Method, in registration order (built-ins first: see the end of this module).
REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry; a second method of the same name is refused."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    taken = {f.dest for m in REGISTRY.values() for f in m.flags}
    clash = sorted(taken & {f.dest for f in method.flags})
    if clash:
        raise ValueError(f"method {method.name!r}: flags {clash} are already declared")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``; an unknown name raises ``ModelConfigError``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelConfigError(f"unknown method {name!r} (--method); choose from "
                               f"{list(REGISTRY)}") from None


def all_flags() -> list[Flag]:
    """Every registered method's own flags, in registration order (the entry script adds them)."""
    return [f for m in REGISTRY.values() for f in m.flags]


def _owner(flag: Flag) -> str:
    """The name of the method that declares ``flag``."""
    return next(m.name for m in REGISTRY.values() if flag in m.flags)


# Each registers itself, in the order --help lists them (lora, the default, first).
from methods import lora, full, linear, dora, ia3, bitfit, ssf, adaptformer, vpt  # noqa: E402,F401,I001
