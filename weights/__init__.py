"""Pre-trained weights formats: each is one converter module of this package that registers
itself, and ``detect`` tells which one a loaded state dict is.

A converter says how to recognise a state dict by its keys, how to map its keys to timm's
``VisionTransformer``, and what its pre-training assumed: normalisation, input size, patch
size and pooling. ``models_vit_lora.load_pretrained`` asks ``detect`` for the format, maps
the keys with it and then checks, as for every format, that each backbone tensor of the
model is in the file with its shape. Reading the file (never unpickling code) is done
before, whatever the format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import torch

from util.cli import ToolError

StateDict = dict[str, torch.Tensor]


class PretrainedWeightsError(ToolError, ValueError):
    """A pre-trained file that cannot be loaded safely and completely into the model."""


@dataclass(frozen=True)
class WeightsFormat:
    """One layout of pre-trained ViT weights.

    Args:
        name: short name, logged when a file is recognised ("mae", "timm").
        description: what files have this layout, for messages.
        recognise: ``recognise(keys)``: whether a state dict with these keys has this layout.
        to_timm: ``to_timm(state)`` -> (the tensors under timm's ViT names, the keys of
            ``state`` it drops on purpose: decoders, text branches, ...).
        mean, std: the normalisation of its pre-training, None where files of this layout
            differ in it (then the run's ``--norm`` decides).
        input_size, patch_size: of its pre-training (``pos_embed`` is resized for others).
        global_pool: the pooling its authors fine-tune with ('avg' or 'token').
    """

    name: str
    description: str
    recognise: Callable[[Collection[str]], bool]
    to_timm: Callable[[StateDict], tuple[StateDict, list[str]]]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int = 224
    patch_size: int = 16
    global_pool: str = "avg"


# name -> WeightsFormat, in registration order (built-ins: see the end of this module).
FORMATS: dict[str, WeightsFormat] = {}


def register(fmt: WeightsFormat) -> WeightsFormat:
    """Add a weights format; a second format of the same name is refused."""
    if fmt.name in FORMATS:
        raise ValueError(f"a weights format named {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def detect(state: StateDict, source: object) -> WeightsFormat:
    """The one registered format whose ``recognise`` accepts the keys of ``state``.

    None or several raise ``PretrainedWeightsError`` naming ``source`` and the candidates.
    """
    keys = list(state)
    found = [fmt for fmt in FORMATS.values() if fmt.recognise(keys)]
    if len(found) == 1:
        return found[0]
    if not found:
        shown = ", ".join(sorted(keys)[:5]) + (", ..." if len(keys) > 5 else "")
        raise PretrainedWeightsError(
            f"{source}: its tensors ({shown}) match no known weights format "
            f"({', '.join(FORMATS)}): is it a ViT checkpoint?")
    raise PretrainedWeightsError(f"{source}: ambiguous weights format, its keys fit "
                                 f"{' and '.join(f.name for f in found)}")


def has_vit_encoder(keys: Collection[str]) -> bool:
    """Whether the keys name a timm ViT's patch embedding and blocks (the layout of MAE and timm)."""
    return "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys)


from weights import mae, timm_vit  # noqa: E402,F401  (each registers itself)
