"""The paper's image transforms, from an 8-bit grey PIL image to a normalised 3 x H x W tensor.

Transforms made here take the grey image directly (``grey_input = True``) and repeat the
channel only once the image is a small tensor, which is cheaper than cropping 3 channels.
Every random choice uses the global torch / python `random` / numpy generators, which the
trainer reseeds per epoch so that a resumed run replays the same augmentations.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .constants import NORM_STATS

RECIPES: tuple[str, ...] = ("sgd", "adamw")
# RandAugment fill colours of the adamw recipe (see `rand_augment_fill_mean`).
AUG_FILLS: tuple[str, ...] = ("paper", "neutral")
# Random erasing fills (timm RandomErasing modes) the adamw recipe accepts.
ERASE_MODES: tuple[str, ...] = ("pixel", "rand", "const")
# MAE's evaluation resizes to input_size / crop_pct, then centre-crops (224 -> 256 -> 224);
# above 224 px its crop_pct is 1.
ADAMW_EVAL_CROP_PCT = 0.875


def to_rgb(img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """Repeat one grey channel into 3 identical channels (PIL 'L' -> 'RGB', 1xHxW -> 3xHxW)."""
    if isinstance(img, torch.Tensor):
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.shape[0] == 3:
            return img
        if img.shape[0] != 1:
            raise ValueError(f"to_rgb: expected a 1- or 3-channel tensor, got shape {tuple(img.shape)}")
        return img.repeat(3, 1, 1)
    if img.mode == "RGB":
        return img
    if img.mode != "L":
        raise ValueError(f"to_rgb: expected a grey ('L') image, got mode {img.mode!r}")
    return Image.merge("RGB", (img, img, img))


def to_float_tensor(img: Image.Image) -> torch.Tensor:
    """An 8-bit grey image as an un-normalised float 3 x H x W tensor in [0, 1]."""
    return to_rgb(TF.to_tensor(img))  # type: ignore[return-value]


class GreyToRGB:
    """Transform step: repeat a 1-channel tensor (or PIL 'L' image) into 3 identical channels."""

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GreyToNormalizedTensor:
    """Transform step: 8-bit grey PIL image -> normalised float 3 x H x W tensor with identical channels.

    One fused step instead of ToTensor + repeat + Normalize: on a 256-px cached image the
    separate torchvision steps cost as much as the crop itself.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, Image.Image):
            if img.mode != "L":
                raise ValueError(f"GreyToNormalizedTensor: expected a grey ('L') image, got mode {img.mode!r}")
            x = torch.from_numpy(np.array(img, dtype=np.uint8)).float().div_(255.0).unsqueeze(0)
        else:
            x = img if img.ndim == 3 else img.unsqueeze(0)
        # Broadcasting the single channel against 3 channel stats makes the 3 copies.
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class XrayTransform:
    """A transform pipeline that accepts an 8-bit grey PIL image and returns a tensor (3 channels,
    except the uint8 crop of `build_uint8_crop_transform`)."""

    grey_input = True  # ChestXrayDataset passes 'L' images to transforms carrying this flag

    def __init__(self, steps: list[Callable]) -> None:
        self.pipeline = T.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.pipeline(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"


def norm_stats(norm: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std for a normalisation name ('mrm', 'cxr_mae' or 'imagenet')."""
    if norm not in NORM_STATS:
        raise ValueError(f"norm={norm!r}: expected one of {list(NORM_STATS)}")
    return NORM_STATS[norm]


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, also for 0 bits: Pillow >= 13 refuses 0, older Pillow gave black."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return posterize(img, bits_to_keep, **kwargs)


def _fix_rand_augment(transform: Callable) -> None:
    """Make the RandAugment ops of a timm transform safe on current Pillow (this instance only).

    'rand-m9-mstd0.5-inc1' draws magnitude 10 now and then, which PosterizeIncreasing maps to
    0 bits; Pillow 13 raises on that, so about one image in 300 would stop training.
    """
    from timm.data.auto_augment import posterize

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is posterize:
                op.aug_fn = _posterize_any_bits


def rand_augment_fill_mean(mean: tuple[float, ...], aug_fill: str) -> tuple[float, ...]:
    """The mean handed to timm's ``create_transform``, which fills RandAugment's geometric ops
    (rotate, shear, translate) with ``round(255 * mean)`` per channel.

    'paper': what the paper's code hands over. For the chest X-ray weights it passes
    one-value statistics (e.g. [0.4785]), so the fill is the 1-tuple (122,), which Pillow
    pads to (122, 0, 0) on the RGB image; the Grayscale step after RandAugment turns that
    into grey 36. Per-channel statistics (ImageNet's) are passed whole, as timm's own
    default: (124, 116, 104). 'neutral': the grey round(255 * mean[0]) in all three channels
    (122 for cxr_mae), which maps to about 0 after normalisation.
    """
    if aug_fill not in AUG_FILLS:
        raise ValueError(f"aug_fill={aug_fill!r}: expected one of {list(AUG_FILLS)}")
    if aug_fill == "neutral":
        return (mean[0],) * 3
    return (mean[0],) if len(set(mean)) == 1 else tuple(mean)


def eval_resize(input_size: int, recipe: str) -> int:
    """Shorter side after the evaluation resize (then a centre crop of ``input_size``): the
    sgd recipe resizes to the crop; the adamw recipe, as MAE's build_transform, to
    crop / 0.875 up to 224 px and to the crop itself above (MAE's crop_pct is 1 there)."""
    if recipe == "sgd" or input_size > 224:
        return input_size
    return int(input_size / ADAMW_EVAL_CROP_PCT)


def apply_transform(transform: Callable, img: Image.Image) -> torch.Tensor:
    """Run ``transform`` on a decoded grey image: transforms made here take it as it is
    (``grey_input``), any other transform receives the 3-channel image it expects."""
    return transform(img if getattr(transform, "grey_input", False) else to_rgb(img))


def build_transform(
    is_train: bool,
    recipe: str = "sgd",
    input_size: int = 224,
    norm: str = "mrm",
    aa: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    aug_fill: str = "paper",
) -> XrayTransform:
    """The paper's train or eval transform for a recipe ('sgd' for MRM, 'adamw' for CXR_MAE).

    Args:
        is_train: training augmentation, else the deterministic evaluation transform.
        recipe: 'sgd': RandomResizedCrop (bicubic) + horizontal flip, eval Resize(input_size)
            + CenterCrop; 'adamw': timm ``create_transform`` (RandAugment `aa`, random
            erasing `reprob` / `remode` / `recount`), eval Resize(input_size / 0.875, or
            input_size above 224 px) + CenterCrop, as in MAE. `aa` and the random-erasing flags apply to 'adamw' only,
            since the paper's sgd recipe uses neither.
        input_size: side of the square output.
        norm: normalisation statistics, a key of NORM_STATS.
        crop_scale: area range of the sgd RandomResizedCrop (torchvision's default).
        aug_fill: colour of the area RandAugment's rotate / shear / translate uncover
            ('adamw' recipe): 'paper' (grey 36, the paper's pipeline bit for bit) or
            'neutral' (the normalisation's mid grey); see `rand_augment_fill_mean`.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {list(RECIPES)}")
    if input_size < 8:
        raise ValueError(f"input_size={input_size}: expected at least 8 pixels")
    mean, std = norm_stats(norm)
    fill_mean = rand_augment_fill_mean(mean, aug_fill)
    tail: list[Callable] = [GreyToNormalizedTensor(mean, std)]
    bicubic = InterpolationMode.BICUBIC

    if not is_train:
        resize = eval_resize(input_size, recipe)
        return XrayTransform([T.Resize(resize, interpolation=bicubic), T.CenterCrop(input_size), *tail])

    if recipe == "sgd":
        return XrayTransform([
            T.RandomResizedCrop(input_size, scale=crop_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(),
            *tail,
        ])

    from timm.data import create_transform  # timm only for the adamw recipe
    from timm.data.random_erasing import RandomErasing

    if remode not in ERASE_MODES:
        raise ValueError(f"--remode {remode!r} is not valid: expected {', '.join(ERASE_MODES)}")

    # The paper's pipeline: RGB image -> crop, flip -> RandAugment -> Grayscale(3) ->
    # ToTensor, Normalize -> RandomErasing. Here crop and flip run on the grey image
    # (identical per channel, a third of the work), RandAugment on RGB (its fill and
    # colour ops are RGB), and the Grayscale result becomes the 3 identical channels.
    # Only timm's crop, flip, RandAugment and erasing are used; its Normalize is not, so
    # `fill_mean` decides the fill colour alone.
    try:
        crop_flip, rand_augment, final = create_transform(
            input_size=input_size,
            is_training=True,
            color_jitter=None,
            auto_augment=aa if aa else None,
            interpolation="bicubic",
            re_prob=reprob,
            re_mode=remode,
            re_count=recount,
            mean=fill_mean,
            std=(std[0],) * len(fill_mean),
            separate=True,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ValueError(f"--aa {aa!r} is not valid: not a RandAugment policy timm can read "
                         f"({err}); e.g. rand-m9-mstd0.5-inc1") from None
    _fix_rand_augment(rand_augment)
    erasing = [t for t in final.transforms if isinstance(t, RandomErasing)]
    augment: list[Callable] = []
    if rand_augment.transforms:
        augment = [GreyToRGB(), *rand_augment.transforms, T.Grayscale(num_output_channels=1)]
    return XrayTransform([*crop_flip.transforms, *augment, *tail, *erasing])
