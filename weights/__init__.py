"""Pre-trained weights formats: each is one converter module of this package that registers
itself; ``detect`` tells which one a loaded state dict is, ``describe`` what it holds.

A converter says how to recognise a state dict by its keys, how to map its keys to timm's
``VisionTransformer``, and what its pre-training assumed: normalisation and pooling, and the
architecture settings its shapes cannot show (an activation, a LayerNorm epsilon). Width,
depth, patch size, position grid, registers, layer scale and pre-norm are read from the
tensors themselves (``vit_geometry``), so the input size and the architecture of a file
follow from the file (``describe``; ``models_vit_lora.describe_weights`` names its
architecture among ``models_vit_lora.ARCHS``). ``models_vit_lora.load_pretrained``
asks ``detect`` for the format, maps the keys with it and then checks, as for every format,
that each backbone tensor of the model is in the file with its shape. Reading the file
(never unpickling code) is done before, whatever the format.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch

from util.cli import ToolError

StateDict = dict[str, torch.Tensor]


class PretrainedWeightsError(ToolError, ValueError):
    """A pre-trained file that cannot be loaded safely and completely into the model."""


class ConversionError(ValueError):
    """A converter met a key it cannot map (the loader adds the file's name to the message)."""


@dataclass(frozen=True)
class WeightsFormat:
    """One layout of pre-trained ViT weights.

    Args:
        name: short name, logged when a file is recognised ("mae", "dinov2_hf").
        description: what files have this layout, for messages.
        recognise: ``recognise(keys)``: whether a state dict with these keys has this layout.
        to_timm: ``to_timm(state)`` -> (the tensors under timm's ViT names, the keys of
            ``state`` it drops on purpose: decoders, text towers, projections, ...). A key
            of the image encoder it cannot map raises ``ConversionError``.
        norm: the ``datasets.NORM_STATS`` name of its pre-training statistics, None where
            files of this layout differ in it (then the run's ``--norm`` decides).
        mean, std: the statistics themselves, for a layout whose values have no such name yet
            (a run needs a ``--norm`` name: its refusal shows them, to add to NORM_STATS).
        read_norm: ``read_norm(weights_path)`` -> (mean, std, file) from the publisher's
            config beside the weights (e.g. transformers' preprocessor_config.json), or
            None where there is none; it overrides ``norm``.
        global_pool: the pooling its authors classify with ('avg' or 'token').
        library: whose module names its keys are ('timm' for timm's own names).
        arch_settings: ``models_vit_lora.ARCHS`` settings every file of this layout has but
            its shapes cannot show (e.g. ``act_layer='quick_gelu'``); others are not checked.
        check_config: ``check_config(weights_path)`` raises ``PretrainedWeightsError`` naming
            the publisher's config beside the weights where it asks for what the converted
            ViT is not (another activation or LayerNorm epsilon); None where there is none.
        antialias: ``antialias(keys)``: whether its publisher's code resizes the position
            table of a file with these keys to another grid with antialiasing, as the loader
            then does (None: plain bicubic, as MAE's and the paper's code).
    """

    name: str
    description: str
    recognise: Callable[[Collection[str]], bool]
    to_timm: Callable[[StateDict], tuple[StateDict, list[str]]]
    norm: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    read_norm: Callable[[Path], tuple[tuple[float, ...], tuple[float, ...], Path] | None] | None = None
    global_pool: str = "avg"
    library: str = "timm"
    arch_settings: Mapping[str, Any] = field(default_factory=dict, compare=False)
    check_config: Callable[[Path], None] | None = None
    antialias: Callable[[Collection[str]], bool] | None = None


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
        timm_named = [f.name for f in FORMATS.values() if f.library == "timm"]
        others = [f"{f.library} ({f.name})" for f in FORMATS.values() if f.library != "timm"]
        also = f" nor the layouts of {', '.join(others)}" if others else ""
        raise PretrainedWeightsError(
            f"{source}: its tensors ({shown}) match no known weights format "
            f"({', '.join(timm_named)}){also}: is it a ViT checkpoint?")
    raise PretrainedWeightsError(f"{source}: ambiguous weights format, its keys fit "
                                 f"{' and '.join(f.name for f in found)}")


def convert(fmt: WeightsFormat, state: StateDict, source: object) -> tuple[StateDict, list[str]]:
    """``fmt.to_timm(state)``; a key it cannot map raises ``PretrainedWeightsError`` naming ``source``."""
    try:
        return fmt.to_timm(state)
    except ConversionError as err:
        raise PretrainedWeightsError(f"{source}: {err}") from None


def has_vit_encoder(keys: Collection[str]) -> bool:
    """Whether the keys name a timm ViT's patch embedding and blocks (the layout of MAE and timm)."""
    return "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys)


# ---------------------------------------------------------------------------------------
# What a file holds: its ViT's shapes, the architecture they are, its input and statistics
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VitGeometry:
    """The settings of a ViT that its tensors (under timm's names) show."""

    embed_dim: int
    depth: int
    patch_size: int
    grid: tuple[int, int]
    mlp_ratio: float
    qkv_bias: bool
    class_token: bool
    reg_tokens: int
    no_embed_class: bool
    layer_scale: bool
    pre_norm: bool

    @property
    def input_size(self) -> int:
        """The image side its position grid was trained at."""
        return self.grid[0] * self.patch_size

    def text(self) -> str:
        """E.g. 'ViT 768 wide, 12 blocks, patch 14, 37x37 grid (518 px), layer scale'."""
        extras = [f"{self.reg_tokens} registers" if self.reg_tokens else "",
                  "layer scale" if self.layer_scale else "", "pre-norm" if self.pre_norm else ""]
        return ", ".join([f"ViT {self.embed_dim} wide, {self.depth} blocks, patch "
                          f"{self.patch_size}, {self.grid[0]}x{self.grid[1]} grid "
                          f"({self.input_size} px)", *filter(None, extras)])

    def misfits(self, settings: Mapping[str, Any], fixed: Mapping[str, Any] = {}) -> list[str]:
        """How an architecture's ``settings`` differ from these shapes and from the settings
        ``fixed`` by the file's format: one 'what: file X, model Y' per difference."""
        wanted = {
            "width": (self.embed_dim, settings["embed_dim"]),
            "blocks": (self.depth, settings["depth"]),
            "patch": (self.patch_size, settings["patch_size"]),
            "MLP ratio": (self.mlp_ratio, float(settings["mlp_ratio"])),
            "qkv bias": (self.qkv_bias, settings["qkv_bias"]),
            "class token": (self.class_token, settings["class_token"]),
            "registers": (self.reg_tokens, settings["reg_tokens"]),
            "class position folded into cls_token": (self.no_embed_class, settings["no_embed_class"]),
            "layer scale": (self.layer_scale, settings["init_values"] is not None),
            "pre-norm": (self.pre_norm, settings["pre_norm"]),
            **{key: (value, settings[key]) for key, value in fixed.items()},
        }
        return [f"{what}: file {have}, model {want}" for what, (have, want) in wanted.items()
                if have != want]


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def vit_geometry(state: StateDict, source: object) -> VitGeometry:
    """The ViT settings that tensors under timm's names show; a missing or odd patch
    embedding or position table raises ``PretrainedWeightsError``."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2] or pos is None:
        raise PretrainedWeightsError(f"{source}: no square patch embedding and position table "
                                     "(patch_embed.proj.weight, pos_embed) among its ViT tensors")
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    class_token = "cls_token" in state
    reg = state.get("reg_token")
    reg_tokens = int(reg.shape[1]) if reg is not None else 0
    positions = int(pos.shape[1])
    side = _square_side(positions - class_token - reg_tokens)
    no_embed_class = side is None
    side = side or _square_side(positions)
    if side is None:
        raise PretrainedWeightsError(
            f"{source}: pos_embed has {positions} positions: no square grid of patches, with "
            f"or without {int(class_token) + reg_tokens} class / register positions")
    return VitGeometry(
        embed_dim=dim, depth=max(blocks) + 1 if blocks else 0, patch_size=patch, grid=(side, side),
        mlp_ratio=fc1.shape[0] / dim if fc1 is not None else 0.0,
        qkv_bias="blocks.0.attn.qkv.bias" in state, class_token=class_token,
        reg_tokens=reg_tokens, no_embed_class=no_embed_class and class_token,
        layer_scale="blocks.0.ls1.gamma" in state, pre_norm="norm_pre.weight" in state)


@dataclass(frozen=True)
class WeightsInfo:
    """What a pre-trained file holds, for the defaults of a run: ``describe``'s answer.

    ``arch`` is the ``models_vit_lora.ARCHS`` name of its shapes (None if no architecture
    builds them); ``arch_at_depth`` the one that does with ``--depth`` its number of blocks
    (a file of fewer blocks than any architecture, e.g. for tests); ``norm`` the
    ``datasets.NORM_STATS`` name of its statistics (None where the file does not tell, or
    where its publisher's values have no name: then ``mean`` / ``std`` may still hold them);
    ``norm_from`` says where they come from.
    """

    source: str
    format: WeightsFormat
    geometry: VitGeometry
    arch: str | None
    norm: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    norm_from: str | None
    dropped: tuple[str, ...] = ()
    arch_at_depth: str | None = None

    def builder_text(self) -> str:
        """Which --model builds it, in words."""
        if self.arch:
            return f"--model {self.arch}"
        if self.arch_at_depth:
            return f"--model {self.arch_at_depth} --depth {self.geometry.depth}"
        return "no --model of this tool builds it"

    @property
    def input_size(self) -> int:
        """The image side of its pre-training (its position grid times its patch size)."""
        return self.geometry.input_size

    @property
    def patch_size(self) -> int:
        """Its patch side in pixels."""
        return self.geometry.patch_size

    @property
    def global_pool(self) -> str:
        """The pooling its authors classify with: 'avg' or 'token'."""
        return self.format.global_pool

    def summary(self) -> str:
        """One line for the log: format, shapes, and the defaults they give."""
        arch = self.builder_text()
        norm = (f"--norm {self.norm} ({self.norm_from})" if self.norm
                else "no normalisation in the file (--norm decides, else the file's name)")
        return (f"{self.source}: weights format {self.format.name} ({self.format.description}); "
                f"{self.geometry.text()}: {arch}, --input_size {self.input_size}, {norm}, "
                f"{self.global_pool} pooling")


def _norm_name(mean: tuple[float, ...], std: tuple[float, ...]) -> str | None:
    """The ``datasets.NORM_STATS`` name of these statistics (to 1e-4), if any."""
    from datasets.constants import NORM_STATS  # the table of every --norm choice

    for name, (m, s) in NORM_STATS.items():
        if len(m) == len(mean) and all(abs(a - b) < 1e-4 for a, b in zip((*m, *s), (*mean, *std))):
            return name
    return None


def _statistics(fmt: WeightsFormat, source: object) -> tuple[str | None, Any, Any, str | None]:
    """(name, mean, std, where from): the publisher's config beside the file over the format's."""
    path = Path(str(source))
    published = fmt.read_norm(path) if fmt.read_norm is not None and path.is_file() else None
    if published is not None:
        mean, std, config = published
        return _norm_name(mean, std), mean, std, f"from {config.name} beside it"
    if fmt.norm is not None:
        from datasets.constants import NORM_STATS

        mean, std = NORM_STATS[fmt.norm]
        return fmt.norm, mean, std, f"the {fmt.name} format's default"
    if fmt.mean is not None and fmt.std is not None:
        return _norm_name(fmt.mean, fmt.std), fmt.mean, fmt.std, f"the {fmt.name} format's default"
    return None, None, None, None


def read_json_beside(weights_path: Path, name: str) -> dict[str, Any] | None:
    """The JSON object ``name`` in the folder of ``weights_path``, None if there is none; a
    file that is no JSON object raises ``PretrainedWeightsError`` naming it."""
    config = weights_path.parent / name
    if not config.is_file():
        return None
    try:
        obj = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PretrainedWeightsError(f"{config}: unreadable JSON beside {weights_path.name} "
                                     f"({err})") from None
    if not isinstance(obj, dict):
        raise PretrainedWeightsError(f"{config}: expected a JSON object, found {type(obj).__name__}")
    return obj


def stats_from(obj: Mapping[str, Any], mean_key: str, std_key: str, config: Path
               ) -> tuple[tuple[float, ...], tuple[float, ...], Path] | None:
    """(mean, std, config) from two keys of a publisher's config, None if it lacks them."""
    mean, std = obj.get(mean_key), obj.get(std_key)
    if mean is None and std is None:
        return None
    ok = all(isinstance(v, list) and len(v) == 3 and
             all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
             for v in (mean, std))
    if not ok:
        raise PretrainedWeightsError(f"{config}: {mean_key} {mean!r:.40} and {std_key} "
                                     f"{std!r:.40} must be lists of 3 numbers")
    return tuple(map(float, mean)), tuple(map(float, std)), config


# File names a library gives every model's weights: the folder says which model they are.
GENERIC_STEMS = ("model", "pytorch_model", "open_clip_pytorch_model", "weights", "checkpoint")


def weights_label(path: str | Path) -> str:
    """The short name of a weights file in run names and tables: its stem (MRM, CXR_MAE), or
    for a library's generic file name (transformers' model.safetensors) its folder's name,
    however the path is spelt; in the Hugging Face cache
    (``models--<org>--<name>/snapshots/<revision>/``) the model's name."""
    path = Path(os.path.abspath(path))  # (not resolved: the cache's files link to blobs/)
    if path.stem.lower() not in GENERIC_STEMS:
        return path.stem
    folder = path.parent
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name


def norm_named_by(path: str | Path) -> str | None:
    """The reference code's rule for a file whose tensors tell no normalisation: the one its
    name says (MRM, CXR_MAE, ImageNet MAE, Medical MAE's release names), else None."""
    name = Path(path).name.lower()
    if "mrm" in name:
        return "mrm"
    if "cxr_mae" in name or "cxrmae" in name:
        return "cxr_mae"
    if "imagenet" in name or "mae_pretrain" in name:
        return "imagenet"
    if re.search(r"_cxr_0\.\dm_mae", name):  # Medical MAE's release names
        return "medical_mae"
    return None


def describe(state_dict: StateDict, source: object,
             archs: Mapping[str, Mapping[str, Any]] | None = None) -> WeightsInfo:
    """What the file ``source`` holds: its format, its ViT's shapes and the architecture they
    are, its input size, normalisation and pooling.

    ``archs`` maps architecture names to all their settings (``models_vit_lora`` passes its
    ``ARCHS``: ``models_vit_lora.describe_weights``); the first that fits is ``arch``, None
    without ``archs`` or when none fits. Raises ``PretrainedWeightsError`` (one line naming
    ``source``) when the format is unknown or ambiguous or the tensors are no ViT.
    """
    fmt = detect(state_dict, source)
    state, dropped = convert(fmt, state_dict, source)
    geometry = vit_geometry(state, source)
    arch = next((name for name, settings in (archs or {}).items()
                 if not geometry.misfits(settings, fmt.arch_settings)), None)
    at_depth = None if arch else next(
        (name for name, settings in (archs or {}).items()
         if not geometry.misfits({**settings, "depth": geometry.depth}, fmt.arch_settings)), None)
    norm, mean, std, norm_from = _statistics(fmt, source)
    if fmt.check_config is not None and Path(str(source)).is_file():
        fmt.check_config(Path(str(source)))
    return WeightsInfo(source=str(source), format=fmt, geometry=geometry, arch=arch, norm=norm,
                       mean=mean, std=std, norm_from=norm_from, dropped=tuple(dropped),
                       arch_at_depth=at_depth)


def check_model(info: WeightsInfo, model: str, settings: Mapping[str, Any]) -> None:
    """Refuse, with one line naming both, a ``--model`` whose ``settings`` (all of them, with
    any overrides: ``models_vit_lora.check_model_fits``) do not fit the file."""
    misfits = info.geometry.misfits(settings, info.format.arch_settings)
    if misfits:
        holds = f"{info.builder_text()} builds it" if info.arch or info.arch_at_depth \
            else "no --model of this tool builds it"
        raise PretrainedWeightsError(
            f"--model {model} does not fit --finetune {info.source} ({info.geometry.text()}; "
            f"{holds}): {'; '.join(misfits)}")


# Each registers itself, in this order (the order of messages).
from weights import mae, timm_vit, dinov2_hf, open_clip, openai_clip  # noqa: E402,F401,I001
