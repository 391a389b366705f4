"""The sgd recipe's train augmentation on the training device, from uint8 batches.

The loader then only decodes (or reads the cache), resizes to a fixed square and ships
uint8 (4x fewer bytes than float); RandomResizedCrop, the flip and the normalisation run
batched on the GPU, so a fast GPU does not wait for CPU workers.

    loader transform: build_uint8_transform(256)      # per image, on the CPU
    model input:      DeviceAugment(224, "mrm")(batch.to(device))

Differences from the per-image CPU path (``build_transform(is_train=True, recipe='sgd')``):
crops are taken from the centred square of the image at ``source_size`` rather than from
the full original, and the resampling is torch's antialiased bicubic instead of PIL's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from .transforms import norm_stats

DEFAULT_SOURCE_SIZE = 256


class Uint8Square:
    """Per-image loader step: grey PIL image -> 1 x S x S uint8 tensor (shorter side S, centre)."""

    grey_input = True  # ChestXrayDataset passes 'L' images to transforms carrying this flag

    def __init__(self, size: int = DEFAULT_SOURCE_SIZE) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = TF.resize(img, self.size, interpolation=InterpolationMode.BICUBIC)
        img = TF.center_crop(img, self.size)
        return TF.pil_to_tensor(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def build_uint8_transform(source_size: int = DEFAULT_SOURCE_SIZE) -> Uint8Square:
    """The loader-side transform that pairs with ``DeviceAugment``."""
    return Uint8Square(source_size)


class DeviceAugment(nn.Module):
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip + normalise, on a batch.

    Args:
        input_size: side of the output crops.
        norm: normalisation statistics name ('mrm', 'cxr_mae', 'imagenet').
        scale: crop area range (torchvision's default, as the paper's recipe).
        ratio: crop aspect-ratio range.
    """

    def __init__(self, input_size: int = 224, norm: str = "mrm",
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        mean, std = norm_stats(norm)
        self.input_size, self.scale, self.ratio = input_size, scale, ratio
        self.register_buffer("mean", torch.tensor(mean[0]), persistent=False)
        self.register_buffer("std", torch.tensor(std[0]), persistent=False)

    def crop_params(self, height: int, width: int, n: int) -> list[tuple[int, int, int, int, bool]]:
        """(top, left, h, w, flip) per image, drawn from the global torch generator."""
        probe = torch.empty(1, height, width)  # get_params only reads the size
        params = []
        for _ in range(n):
            top, left, h, w = RandomResizedCrop.get_params(probe, list(self.scale), list(self.ratio))
            params.append((top, left, h, w, bool(torch.rand(()) < 0.5)))
        return params

    def apply(self, batch: torch.Tensor, params: list[tuple[int, int, int, int, bool]]) -> torch.Tensor:
        """Crop, resize, flip and normalise a uint8 B x 1 x H x W batch with given parameters."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"DeviceAugment expects a uint8 B x 1 x H x W batch, got "
                             f"{tuple(batch.shape)} {batch.dtype}")
        size = [self.input_size, self.input_size]
        images = batch.float()
        out = []
        for img, (top, left, h, w, flip) in zip(images, params):
            crop = TF.resized_crop(img, top, left, h, w, size,
                                   interpolation=InterpolationMode.BICUBIC, antialias=True)
            out.append(crop.flip(-1) if flip else crop)
        x = torch.stack(out).clamp_(0, 255).div_(255)
        x = (x - self.mean) / self.std
        return x.expand(-1, 3, -1, -1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.apply(batch, self.crop_params(batch.shape[-2], batch.shape[-1], len(batch)))
