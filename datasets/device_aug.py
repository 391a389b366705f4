"""The train augmentations of both recipes on the training device, from uint8 batches.

The loader then only decodes (or reads the cache), takes the recipe's random resized crop
from the full-resolution image, as the CPU recipe does, and ships it as uint8 (4x fewer
bytes than float); the rest runs batched on the GPU, so a fast GPU does not wait for CPU
workers (RandAugment is the costly part of the adamw recipe).

    loader transform: build_uint8_crop_transform("sgd" | "adamw", 224)  # per image, on the CPU
    model input:      build_device_augment("sgd" | "adamw", 224, norm, ..., crop=False)(batch.to(device))

With ``crop=True`` the batch transforms also crop, from a uint8 image the loader gives
(e.g. a downsized centred square): cheaper for the loader, but the crops then see a smaller
copy of the image and never its edges outside the square, so training does not use it.

sgd recipe (`DeviceAugment`): RandomResizedCrop + horizontal flip + normalise.
adamw recipe (`DeviceRandAugment`): the same crop + flip (timm's RandomResizedCrop draws
its box by the same rule as torchvision's), timm RandAugment (e.g. 'rand-m9-mstd0.5-inc1'),
Grayscale, normalise, timm RandomErasing, as ``build_transform(is_train=True,
recipe='adamw')`` does per image.

Where the device path differs from the per-image CPU path:
- with ``crop=True`` only: crops are taken from the centred square of the image at
  the loader's size rather than from the full original, and resampled with torch's
  antialiased bicubic instead of PIL's (sub-grey-level differences; the adamw path then
  rounds to uint8 as PIL does);
- random numbers come from torch's generators, not Python's `random` / NumPy: the same
  distributions, other draws. Crop boxes, op choices, magnitudes, signs and erasing boxes
  use the global CPU generator (so a seed gives the same parameters on any device and
  no host sync is needed); erasing noise uses the training device's generator;
- not in the RandAugment ops themselves: each reproduces Pillow's arithmetic (integer
  tables, float32 blends, the float32 SMOOTH kernel of Sharpness, the float64 bicubic
  affine resampling with a = -1, clamped edges and truncation) and its fill rule, and
  equals timm's op on the same image bit for bit on the CPU. The tests allow one grey
  level for Sharpness and the geometric ops, where another summation order (another
  Pillow build, a GPU) could move a value across an integer;
- the CPU path's Pillow >= 13 fix is kept: a 0-bit Posterize gives black.

Why fewer channels than RGB are enough: the images are grey, so every colour op acts on
identical channels, and with a grey fill ('neutral': (f, f, f)) one channel carries the
whole RGB image exactly. The paper's fill (f, 0, 0) is not grey: after a rotate, shear or
translate, a second op (Solarize, Posterize, Color, AutoContrast, Equalize...) treats the
red fill differently from green and blue (e.g. Solarize at 100 turns (122, 0, 0) into grey
40, not 36). Green and blue stay equal throughout, so two channels (R, G = B) carry that
image exactly; Grayscale then weighs them by Pillow's (19595, 38470 + 7471) / 65536.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from .transforms import (AUG_FILLS, ERASE_MODES, RECIPES, XrayTransform, norm_stats,
                         rand_augment_fill_mean)

CropParams = tuple[int, int, int, int, bool]  # top, left, height, width, flip


def build_uint8_crop_transform(recipe: str = "sgd", input_size: int = 224) -> XrayTransform:
    """The loader-side transform of ``--device_aug`` training, paired with
    ``build_device_augment(recipe, ..., crop=False)``: the recipe's own random resized crop
    step (torchvision's for sgd, timm's for adamw: the same random draws as the CPU recipe),
    from the full-resolution grey image, then a 1 x S x S uint8 tensor.

    Its steps are [crop, PILToTensor], so the data set reads only the crop's rows from the
    exact image cache and resizes them natively, as for the CPU recipe.
    """
    # The steps and crop types the data set plans the cache's crop path by: one rule for both.
    from .chestxray import _flatten, _random_resized_crops
    from .transforms import build_transform

    cpu = build_transform(True, recipe=recipe, input_size=input_size, norm="mrm")
    crop = next((s for s in _flatten(cpu) if isinstance(s, _random_resized_crops())), None)
    if crop is None:
        raise ValueError(f"recipe={recipe!r}: its train transform has no random resized crop")
    return XrayTransform([crop, T.PILToTensor()])


class DeviceAugment(nn.Module):
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip + normalise, on a batch.

    Args:
        input_size: side of the output crops.
        norm: normalisation statistics name ('mrm', 'cxr_mae', 'imagenet').
        scale: crop area range (torchvision's default, as the paper's recipe).
        ratio: crop aspect-ratio range.
        crop: False when the loader already cropped (``build_uint8_crop_transform``): the batch
            must be input_size square, and only the flip and normalisation run here.
    """

    def __init__(self, input_size: int = 224, norm: str = "mrm",
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), crop: bool = True) -> None:
        super().__init__()
        mean, std = norm_stats(norm)
        self.input_size, self.scale, self.ratio, self.crop = input_size, scale, ratio, crop
        # Per output channel, as GreyToNormalizedTensor: ImageNet statistics differ per channel.
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)

    def crop_params(self, height: int, width: int, n: int) -> list[CropParams]:
        """(top, left, h, w, flip) per image, drawn from the global torch generator."""
        if not self.crop and (height, width) != (self.input_size, self.input_size):
            raise ValueError(f"{type(self).__name__}(crop=False) expects {self.input_size} px "
                             f"square crops from the loader, got {height} x {width}")
        probe = torch.empty(1, height, width)  # get_params only reads the size
        params = []
        for _ in range(n):
            box = (RandomResizedCrop.get_params(probe, list(self.scale), list(self.ratio))
                   if self.crop else (0, 0, height, width))
            params.append((*box, bool(torch.rand(()) < 0.5)))
        return params

    def resized_crops(self, batch: torch.Tensor, params: list[CropParams]) -> torch.Tensor:
        """Crop, resize and flip a uint8 B x 1 x H x W batch: float B x 1 x S x S, 0-255 scale."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"{type(self).__name__} expects a uint8 B x 1 x H x W batch, got "
                             f"{tuple(batch.shape)} {batch.dtype}")
        if not self.crop:  # cropped by the loader: only the flips
            flips = torch.tensor([p[4] for p in params], device=batch.device).view(-1, 1, 1, 1)
            x = batch.float()
            return torch.where(flips, x.flip(-1), x)
        size = [self.input_size, self.input_size]
        out = []
        for img, (top, left, h, w, flip) in zip(batch.float(), params):
            crop = TF.resized_crop(img, top, left, h, w, size,
                                   interpolation=InterpolationMode.BICUBIC, antialias=True)
            out.append(crop.flip(-1) if flip else crop)
        return torch.stack(out)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Float B x 1 x S x S on the 0-255 scale -> normalised B x 3 x S x S."""
        return (x.div_(255) - self.mean) / self.std  # broadcasting makes the 3 channels

    def apply(self, batch: torch.Tensor, params: list[CropParams]) -> torch.Tensor:
        """Crop, resize, flip and normalise a uint8 B x 1 x H x W batch with given parameters."""
        return self.normalise(self.resized_crops(batch, params).clamp_(0, 255))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.apply(batch, self.crop_params(batch.shape[-2], batch.shape[-1], len(batch)))


# ---------------------------------------------------------------------------------------
# RandAugment ops on uint8 N x C x H x W batches, one parameter per image.
# C is 1 (grey) or 2 (R, G = B) or 3; see the module docstring.

# Pillow's RGB -> L weights (Convert.c), per channel of each representation.
_LUMA_WEIGHTS: dict[int, tuple[int, ...]] = {2: (19595, 38470 + 7471), 3: (19595, 38470, 7471)}


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    # Small parameter tensors go to the GPU without waiting for the queued work (pageable
    # memory is staged at once), so the host can keep running ahead of the device.
    return t.to(device=device, dtype=dtype, non_blocking=True)


def luma(img: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert('L')`` of the represented RGB image: N x 1 x H x W uint8."""
    if img.shape[1] == 1:
        return img
    total = sum(img[:, i:i + 1].int() * w for i, w in enumerate(_LUMA_WEIGHTS[img.shape[1]]))
    return ((total + 32768) >> 16).to(torch.uint8)


def _levels(img: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=img.device).view(1, 1, 256)


def _per_image(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _to(values, like.device, dtype).view(-1, *([1] * (like.ndim - 1)))


def _histograms(img: torch.Tensor) -> torch.Tensor:
    """Pixel counts per image and channel: N x C x 256 int64."""
    n, c = img.shape[:2]
    offsets = torch.arange(n * c, device=img.device).unsqueeze(1) * 256
    flat = (img.reshape(n * c, -1).long() + offsets).flatten()
    # scatter_add, not bincount: CUDA's bincount reads the maximum back to the host.
    hist = torch.zeros(n * c * 256, dtype=torch.long, device=img.device)
    return hist.scatter_add_(0, flat, torch.ones_like(flat)).view(n, c, 256)


def apply_lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map each pixel through its image's and channel's table (N x C x 256, or N x 1 x 256)."""
    n, c, h, w = img.shape
    lut = lut.clamp(0, 255).to(torch.uint8).expand(n, c, 256)
    return torch.gather(lut, 2, img.reshape(n, c, h * w).long()).view(n, c, h, w)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend``: float32 in1 + alpha * (in2 - in1), clipped, truncated."""
    alpha = _per_image(factor, img, torch.float32)
    base = degenerate.float()
    temp = base + alpha * (img.float() - base)
    return temp.trunc_().clamp_(0, 255).to(torch.uint8)


# Point ops as tables: (images N x C x H x W, one argument per image) -> N x (1 | C) x 256.
def auto_contrast_lut(img: torch.Tensor, _arg: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast`` (no cutoff): stretch each channel's [lo, hi] to [0, 255]."""
    present = _histograms(img) > 0
    lo = present.int().argmax(-1, keepdim=True)
    hi = 255 - present.flip(-1).int().argmax(-1, keepdim=True)
    span = (hi - lo).clamp(min=1).double()
    # A tensor numerator: torch turns `255.0 / t` into 255 * (1 / t), one rounding more than Pillow.
    scale = torch.full_like(span, 255.0) / span
    levels = _levels(img).double()
    lut = (levels * scale + (-lo * scale)).trunc().clamp(0, 255)
    return torch.where(hi > lo, lut, levels).long()  # a flat channel is left as it is


def equalize_lut(img: torch.Tensor, _arg: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``: Pillow's cumulative-histogram table per channel."""
    hist = _histograms(img)
    present = hist > 0
    hi = 255 - present.flip(-1).int().argmax(-1, keepdim=True)
    last = hist.gather(-1, hi)  # count of the brightest level present
    step = (hist.sum(-1, keepdim=True) - last) // 255
    before = hist.cumsum(-1) - hist  # pixels strictly below each level
    lut = (step // 2 + before) // step.clamp(min=1)
    keep = (present.sum(-1, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, _levels(img), lut)


def invert_lut(img: torch.Tensor, _arg: torch.Tensor) -> torch.Tensor:
    """``ImageOps.invert``."""
    return (255 - _levels(img)).expand(len(img), 1, 256)


def posterize_lut(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits (8 or more: unchanged; 0: black, as the CPU path's fix)."""
    shift = (8 - bits.long()).clamp(0, 8)
    mask = torch.bitwise_left_shift(torch.full_like(shift, 255), shift).bitwise_and(255)
    return _levels(img) & _per_image(mask, _levels(img), torch.long)


def solarize_lut(img: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize``: invert levels at or above the threshold (256: none)."""
    levels = _levels(img)
    return torch.where(levels >= _per_image(threshold, levels, torch.long), 255 - levels, levels)


def solarize_add_lut(img: torch.Tensor, add: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """timm's ``solarize_add``: add (capped at 255) to levels below the threshold."""
    levels = _levels(img)
    raised = (levels + _per_image(add, levels, torch.long)).clamp(max=255)
    return torch.where(levels < threshold, raised, levels)


def contrast_lut(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with the image's mean grey level, rounded."""
    grey = luma(img)
    # int(mean + 0.5) in integers: the same value, and no float division (CUDA divides a
    # tensor by a Python number as a product with its reciprocal).
    count = grey[0].numel()
    mean = ((2 * grey.flatten(1).sum(1) + count) // (2 * count)).view(-1, 1, 1)
    return _blend(mean, _levels(img).expand(len(img), 1, 256), factor).long()


def brightness_lut(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    zero = torch.zeros((), device=img.device)
    return _blend(zero, _levels(img).expand(len(img), 1, 256), factor).long()


def color(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the image's grey version (the identity on grey)."""
    if img.shape[1] == 1:
        return img
    return _blend(luma(img), img, factor)


def sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with Pillow's SMOOTH filter (border pixels kept)."""
    x = img.float()
    side, centre = torch.tensor(1 / 13, dtype=torch.float32), torch.tensor(5 / 13, dtype=torch.float32)

    def row(r: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        return r[..., :-2] * side + r[..., 1:-1] * mid + r[..., 2:] * side

    # Pillow's order: 0.5 (rounding) + row below + this row + row above, in float32.
    smooth = 0.5 + row(x[:, :, 2:], side)
    smooth = smooth + row(x[:, :, 1:-1], centre)
    smooth = smooth + row(x[:, :, :-2], side)
    degenerate = img.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.trunc_().clamp_(0, 255).to(torch.uint8)
    return _blend(degenerate, img, factor)


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor,
           d: torch.Tensor) -> torch.Tensor:
    # Pillow's Geometry.c BICUBIC (cubic convolution with a = -1), same operation order.
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def affine(img: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.transform(AFFINE, BICUBIC, fillcolor)`` per image.

    ``matrix`` (N x 6) maps an output pixel centre (x + 0.5, y + 0.5) to the input point
    (a x + b y + c, d x + e y + f). Points outside the image take ``fill`` (C values);
    inside, 4 x 4 neighbours with clamped edges, truncated to uint8, as Pillow does.
    """
    n, c, h, w = img.shape
    dtype = torch.float64 if img.device.type != "mps" else torch.float32
    a = _to(matrix, img.device, dtype).view(n, 6, 1, 1)
    ys = torch.arange(h, device=img.device, dtype=dtype).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=img.device, dtype=dtype).view(1, 1, w) + 0.5
    xin = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]
    yin = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)
    cols = [(x0 + k - 1).clamp(0, w - 1).long() for k in range(4)]
    rows = [(y0 + k - 1).clamp(0, h - 1).long() * w for k in range(4)]
    flat = img.reshape(n, c, h * w)

    def tap(r: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        index = (r + col).view(n, 1, h * w).expand(n, c, h * w)
        return torch.gather(flat, 2, index).view(n, c, h, w).to(dtype)  # gather bytes, not doubles

    row_values = [_cubic(*(tap(r, col) for col in cols), dx) for r in rows]
    value = _cubic(*row_values, dy).trunc_().clamp_(0, 255).to(torch.uint8)
    return torch.where(inside.unsqueeze(1), value, _to(fill, img.device).view(1, c, 1, 1))


def rotate_matrix(degrees: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``Image.rotate``'s affine matrix (about the image centre), N x 6 float64."""
    angle = -torch.deg2rad(degrees.double() % 360.0)
    cos, sin = torch.cos(angle).round(decimals=15), torch.sin(angle).round(decimals=15)
    cx, cy = width / 2.0, height / 2.0
    zero = torch.zeros_like(cos)
    return torch.stack([cos, sin, cos * -cx + sin * -cy + zero + cx,
                        -sin, cos, -sin * -cx + cos * -cy + zero + cy], dim=1)


def _matrix(a: float | torch.Tensor, b: float | torch.Tensor, c: float | torch.Tensor,
            d: float | torch.Tensor, e: float | torch.Tensor, f: float | torch.Tensor,
            like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v, dtype=torch.float64).expand_as(like)
                        for v in (a, b, c, d, e, f)], dim=1)


# name -> N x 6 matrix from the op's argument (float64, CPU) and the image width, height,
# as timm's shear_x, shear_y, translate_*_abs, translate_*_rel and rotate build them.
_GEOMETRIC: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "Rotate": rotate_matrix,
    "ShearX": lambda f, w, h: _matrix(1, f, 0, 0, 1, 0, f),
    "ShearY": lambda f, w, h: _matrix(1, 0, 0, f, 1, 0, f),
    "TranslateX": lambda p, w, h: _matrix(1, 0, p, 0, 1, 0, p),
    "TranslateY": lambda p, w, h: _matrix(1, 0, 0, 0, 1, p, p),
    "TranslateXRel": lambda p, w, h: _matrix(1, 0, p * w, 0, 1, 0, p),
    "TranslateYRel": lambda p, w, h: _matrix(1, 0, 0, 0, 1, p * h, p),
}

_LUTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "AutoContrast": auto_contrast_lut, "Equalize": equalize_lut, "Invert": invert_lut,
    "Posterize": posterize_lut, "PosterizeIncreasing": posterize_lut,
    "PosterizeOriginal": posterize_lut, "Solarize": solarize_lut,
    "SolarizeIncreasing": solarize_lut, "SolarizeAdd": solarize_add_lut,
    "Contrast": contrast_lut, "ContrastIncreasing": contrast_lut,
    "Brightness": brightness_lut, "BrightnessIncreasing": brightness_lut,
}

_IMAGE_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Color": color, "ColorIncreasing": color,
    "Sharpness": sharpness, "SharpnessIncreasing": sharpness,
}
SUPPORTED_OPS: tuple[str, ...] = (*_LUTS, *_IMAGE_OPS, *_GEOMETRIC)


def level_to_arg(name: str, magnitude: torch.Tensor, sign: torch.Tensor,
                 hparams: dict) -> torch.Tensor:
    """timm's LEVEL_TO_ARG for op ``name``, vectorised in float64 (``sign``: +-1 per draw)."""
    level = magnitude.double() / 10.0  # timm's _LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return torch.zeros_like(level)
    if name == "Rotate":
        return level * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return level * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return level * hparams.get("translate_pct", 0.45) * sign
    if name in ("TranslateX", "TranslateY"):
        return level * float(hparams["translate_const"]) * sign
    if name == "Posterize":
        return (level * 4).trunc()
    if name == "PosterizeIncreasing":
        return 4 - (level * 4).trunc()
    if name == "PosterizeOriginal":
        return (level * 4).trunc() + 4
    if name == "Solarize":
        return (level * 256).trunc().clamp(max=256)
    if name == "SolarizeIncreasing":
        return 256 - (level * 256).trunc().clamp(max=256)
    if name == "SolarizeAdd":
        return (level * 110).trunc().clamp(max=128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (1.0 + level * 0.9 * sign).clamp(min=0.1)
    raise ValueError(f"RandAugment op {name!r}: the device path implements {list(SUPPORTED_OPS)}")


@dataclass
class OpSpec:
    """One RandAugment op as timm configured it."""

    name: str
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float


def parse_rand_augment(aa: str | None, input_size: int, fill: tuple[int, ...]
                       ) -> tuple[list[OpSpec], int, torch.Tensor | None, dict]:
    """timm's own reading of a RandAugment string: (ops, ops per image, choice weights, hparams);
    no ops for None or ''.

    The hparams are those ``create_transform`` passes (translate_const, the fill, bicubic).
    """
    if not aa:
        return [], 0, None, {}
    from timm.data.auto_augment import rand_augment_transform

    if not aa.startswith("rand"):
        raise ValueError(f"--aa {aa!r}: the device path implements RandAugment ('rand-...') only")
    hparams = dict(translate_const=int(input_size * 0.45), img_mean=fill,
                   interpolation=Image.Resampling.BICUBIC)
    try:
        ra = rand_augment_transform(aa, hparams)
    except (AssertionError, ValueError, KeyError) as exc:
        raise ValueError(f"--aa {aa!r}: not a RandAugment string timm reads ({exc})") from None
    ops = []
    for op in ra.ops:
        if op.name not in SUPPORTED_OPS:
            raise ValueError(f"--aa {aa!r}: op {op.name} is not implemented on the device "
                             f"(supported: {', '.join(SUPPORTED_OPS)})")
        ops.append(OpSpec(op.name, float(op.prob), float(op.magnitude),
                          float(op.magnitude_std), float(op.magnitude_max or 10.0)))
    weights = None if ra.choice_weights is None else torch.as_tensor(ra.choice_weights, dtype=torch.float64)
    return ops, int(ra.num_layers), weights, hparams


@dataclass
class RandAugmentParams:
    """Every random choice of one batch of the adamw recipe (CPU tensors)."""

    crops: list[CropParams]
    ops: torch.Tensor  # B x layers: op index, -1 where the layer's op is skipped
    args: torch.Tensor  # B x layers float64: the op's timm argument
    erase: torch.Tensor  # B x boxes x 4 (top, left, height, width); height 0: no box


class DeviceRandAugment(nn.Module):
    """The adamw recipe on a uint8 batch: crop + flip, RandAugment, Grayscale, normalise, erasing.

    Args:
        input_size: side of the output crops.
        norm: normalisation statistics name ('mrm', 'cxr_mae', 'imagenet').
        aa: timm RandAugment string ('rand-m9-mstd0.5-inc1'); None or '' for none.
        reprob: random erasing probability.
        remode: random erasing fill: 'pixel' (per-pixel normal noise), 'rand' (one normal
            colour per box), 'const' (zeros), in normalised space.
        recount: maximum number of erased boxes per image.
        aug_fill: fill of the geometric ops, 'paper' or 'neutral' (`rand_augment_fill_mean`).
        crop_scale: crop area range of the RandomResizedCrop.
        crop: False when the loader already cropped (see ``DeviceAugment``).
    """

    def __init__(self, input_size: int = 224, norm: str = "cxr_mae",
                 aa: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                 remode: str = "pixel", recount: int = 1, aug_fill: str = "paper",
                 crop_scale: tuple[float, float] = (0.08, 1.0), crop: bool = True) -> None:
        super().__init__()
        if remode not in ERASE_MODES:
            raise ValueError(f"--remode {remode!r}: expected pixel, rand or const")
        if recount < 1:
            raise ValueError(f"--recount {recount}: expected at least 1")
        mean = norm_stats(norm)[0]
        self.crop = DeviceAugment(input_size, norm, scale=crop_scale, crop=crop)
        self.input_size, self.reprob, self.remode, self.recount = input_size, reprob, remode, recount
        # timm's fill: round(255 * mean) per given channel; Pillow pads a short colour with 0.
        given = tuple(min(255, round(255 * m)) for m in rand_augment_fill_mean(mean, aug_fill))
        r, g, b = (given + (0, 0, 0))[:3]
        self.channels = 1 if r == g == b else 2 if g == b else 3
        fill = (r, g, b)[:self.channels]
        self.register_buffer("fill", torch.tensor(fill, dtype=torch.uint8), persistent=False)
        self.ops, self.layers, self.choice_weights, self.hparams = parse_rand_augment(
            aa, input_size, given)

    # -- random parameters (global CPU generator) ---------------------------------------
    def op_params(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Op index (-1: skipped) and timm argument per image and layer, as timm draws them."""
        if not self.ops or self.layers == 0:
            return torch.full((n, 0), -1, dtype=torch.long), torch.zeros(n, 0, dtype=torch.float64)
        k = len(self.ops)
        if self.choice_weights is None:  # uniform, with replacement (numpy.random.choice)
            choice = torch.randint(0, k, (n, self.layers))
        else:  # weighted without replacement
            choice = torch.multinomial(self.choice_weights.expand(n, k), self.layers, replacement=False)
        prob = torch.tensor([op.prob for op in self.ops], dtype=torch.float64)[choice]
        applied = torch.rand(n, self.layers, dtype=torch.float64) <= prob
        mag = torch.tensor([op.magnitude for op in self.ops], dtype=torch.float64)[choice]
        std = torch.tensor([op.magnitude_std for op in self.ops], dtype=torch.float64)[choice]
        top = torch.tensor([op.magnitude_max for op in self.ops], dtype=torch.float64)[choice]
        gauss = mag + std * torch.randn(n, self.layers, dtype=torch.float64)
        uniform = torch.rand(n, self.layers, dtype=torch.float64) * mag
        magnitude = torch.where(std == math.inf, uniform, torch.where(std > 0, gauss, mag))
        magnitude = torch.minimum(magnitude, top).clamp(min=0.0)
        # timm's _randomly_negate: -v if random() > 0.5
        sign = torch.where(torch.rand(n, self.layers, dtype=torch.float64) > 0.5, -1.0, 1.0)
        args = torch.zeros(n, self.layers, dtype=torch.float64)
        for i, op in enumerate(self.ops):
            hit = choice == i
            if hit.any():
                args[hit] = level_to_arg(op.name, magnitude[hit], sign[hit], self.hparams)
        return torch.where(applied, choice, -1), args

    def erase_params(self, n: int, height: int, width: int) -> torch.Tensor:
        """timm RandomErasing's boxes: B x recount x (top, left, h, w); h = 0 where none."""
        boxes = torch.zeros(n, self.recount, 4, dtype=torch.long)
        if self.reprob <= 0:
            return boxes
        erase = torch.rand(n, dtype=torch.float64) <= self.reprob
        count = (torch.ones(n, dtype=torch.long) if self.recount == 1
                 else torch.randint(1, self.recount + 1, (n,)))
        attempts, area = 10, height * width
        lo, hi = math.log(0.3), math.log(1 / 0.3)  # timm's min_aspect and its inverse
        for box in range(self.recount):
            target = (torch.rand(n, attempts, dtype=torch.float64) * (1 / 3 - 0.02) + 0.02) \
                * area / count.unsqueeze(1)
            aspect = torch.exp(torch.rand(n, attempts, dtype=torch.float64) * (hi - lo) + lo)
            h = torch.sqrt(target * aspect).round().long()
            w = torch.sqrt(target / aspect).round().long()
            fits = (w < width) & (h < height)
            first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits
            h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
            ok = fits.any(1) & erase & (box < count)
            top = (torch.rand(n, dtype=torch.float64) * (height - h + 1)).floor().long()
            left = (torch.rand(n, dtype=torch.float64) * (width - w + 1)).floor().long()
            boxes[:, box] = torch.stack([top, left, h, w], 1) * ok.unsqueeze(1)
        return boxes

    def draw_params(self, height: int, width: int, n: int) -> RandAugmentParams:
        """All random choices for a batch of ``n`` uint8 images of ``height`` x ``width``."""
        crops = self.crop.crop_params(height, width, n)
        ops, args = self.op_params(n)
        erase = self.erase_params(n, self.input_size, self.input_size)
        return RandAugmentParams(crops, ops, args, erase)

    # -- the batch ------------------------------------------------------------------------
    def rand_augment(self, img: torch.Tensor, ops: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        """Apply the drawn ops layer by layer (uint8 N x C x H x W).

        Each image runs one op per layer, so a layer's groups are disjoint: all its
        geometric ops run as one batched affine resampling, all its point ops as one
        table lookup, Color and Sharpness as one call each. Which image runs what is
        known on the CPU, so no step waits for the device.
        """
        img = img.clone()
        height, width = img.shape[-2:]
        for layer in range(ops.shape[1]):
            geometric: list[tuple[torch.Tensor, torch.Tensor]] = []
            tables: list[tuple[torch.Tensor, torch.Tensor]] = []
            for i, op in enumerate(self.ops):
                chosen = (ops[:, layer] == i).nonzero().flatten()
                if len(chosen) == 0:
                    continue
                arg = args[chosen, layer]
                if op.name in _GEOMETRIC:
                    geometric.append((chosen, _GEOMETRIC[op.name](arg, width, height)))
                    continue
                index = _to(chosen, img.device)
                if op.name in _LUTS:
                    lut = _LUTS[op.name](img.index_select(0, index), arg)
                    tables.append((chosen, lut.expand(len(chosen), img.shape[1], 256)))
                else:
                    img.index_copy_(0, index, _IMAGE_OPS[op.name](img.index_select(0, index), arg))
            for group, run in ((geometric, lambda x, m: affine(x, m, self.fill)), (tables, apply_lut)):
                if group:
                    index = _to(torch.cat([chosen for chosen, _ in group]), img.device)
                    values = torch.cat([_to(value, img.device) for _, value in group])
                    img.index_copy_(0, index, run(img.index_select(0, index), values))
        return img

    def random_erasing(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Replace each box of the normalised batch by noise, a random colour or zeros."""
        n, c, h, w = x.shape
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        for box in range(boxes.shape[1]):
            top, left, bh, bw = _to(boxes[:, box], x.device).unbind(1)
            if not bool(boxes[:, box, 2].any()):
                continue
            inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + bh).view(-1, 1, 1))
                      & (xs >= left.view(-1, 1, 1)) & (xs < (left + bw).view(-1, 1, 1)))
            if self.remode == "pixel":
                value = torch.randn(n, c, h, w, device=x.device, dtype=x.dtype)
            elif self.remode == "rand":
                value = torch.randn(n, c, 1, 1, device=x.device, dtype=x.dtype)
            else:
                value = torch.zeros((), device=x.device, dtype=x.dtype)
            x = torch.where(inside.unsqueeze(1), value, x)
        return x

    def apply(self, batch: torch.Tensor, params: RandAugmentParams) -> torch.Tensor:
        """The whole recipe on a uint8 B x 1 x H x W batch with given parameters: B x 3 x S x S."""
        crops = self.crop.resized_crops(batch, params.crops)
        # PIL's crop output is uint8: round as Pillow's resampler does.
        img = crops.round_().clamp_(0, 255).to(torch.uint8)
        if self.ops:
            img = self.rand_augment(img.expand(-1, self.channels, -1, -1), params.ops, params.args)
            img = luma(img)  # torchvision Grayscale: Pillow's convert('L')
        return self.random_erasing(self.crop.normalise(img.float()), params.erase)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.apply(batch, self.draw_params(batch.shape[-2], batch.shape[-1], len(batch)))


def build_device_augment(recipe: str, input_size: int = 224, norm: str = "mrm",
                         aa: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                         remode: str = "pixel", recount: int = 1, aug_fill: str = "paper",
                         crop_scale: tuple[float, float] = (0.08, 1.0), crop: bool = True) -> nn.Module:
    """The batch transform of a recipe ('sgd' or 'adamw'); arguments as ``build_transform``.
    ``crop=False``: the loader cropped already (``build_uint8_crop_transform``), as training does."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {list(RECIPES)}")
    if aug_fill not in AUG_FILLS:
        raise ValueError(f"aug_fill={aug_fill!r}: expected one of {list(AUG_FILLS)}")
    if recipe == "sgd":
        return DeviceAugment(input_size, norm, scale=crop_scale, crop=crop)
    return DeviceRandAugment(input_size, norm, aa=aa, reprob=reprob, remode=remode,
                             recount=recount, aug_fill=aug_fill, crop_scale=crop_scale, crop=crop)


def train_transforms(recipe: str, input_size: int, norm: str, *, aa: str | None, reprob: float,
                     remode: str, recount: int, aug_fill: str, on_device: bool
                     ) -> tuple[Callable, nn.Module | None]:
    """A run's training augmentation: (the loaders' transform, the batch transform to run on
    the training device, or None). ``on_device`` (``--device_aug``): the loader crops from
    the full-resolution image, as the CPU recipe does, and flip, RandAugment, erasing and
    normalisation run on uint8 batches on the device. A setting either path cannot run
    raises ``ValueError`` naming its flag."""
    from .transforms import build_transform

    options = dict(aa=aa, reprob=reprob, remode=remode, recount=recount, aug_fill=aug_fill)
    cpu = build_transform(True, recipe=recipe, input_size=input_size, norm=norm, **options)
    if recipe != "adamw":  # a mistyped --aa / --remode is an error even where it is unused
        build_transform(True, recipe="adamw", input_size=input_size, norm=norm, **options)
    if not on_device:
        return cpu, None
    try:
        return (build_uint8_crop_transform(recipe, input_size),
                build_device_augment(recipe, input_size, norm, crop=False, **options))
    except ValueError as err:
        raise ValueError(f"--device_aug: {err}") from None
