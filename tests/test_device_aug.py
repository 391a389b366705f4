"""The device-side sgd augmentation against the per-image CPU path (stated tolerances)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from datasets import NORM_STATS
from datasets.device_aug import DeviceAugment, build_uint8_transform


def grey_image(size=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    smooth = 120 + 80 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + rng.normal(0, 5, (size, size))
    return Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8), mode="L")


def cpu_path(img, top, left, h, w, flip, size, norm="mrm"):
    """What the loader's sgd recipe computes for the same crop (PIL bicubic)."""
    crop = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC)
    if flip:
        crop = TF.hflip(crop)
    mean, std = NORM_STATS[norm]
    return ((TF.to_tensor(crop) - mean[0]) / std[0]).expand(3, -1, -1)


def test_identity_crop_is_exact_normalisation():
    img = grey_image(32)
    batch = build_uint8_transform(32)(img).unsqueeze(0)
    assert batch.dtype == torch.uint8 and batch.shape == (1, 1, 32, 32)
    out = DeviceAugment(32, "cxr_mae").apply(batch, [(0, 0, 32, 32, False)])
    mean, std = NORM_STATS["cxr_mae"]
    expected = ((batch.float() / 255 - mean[0]) / std[0]).expand(1, 3, -1, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    flipped = DeviceAugment(32, "cxr_mae").apply(batch, [(0, 0, 32, 32, True)])
    torch.testing.assert_close(flipped, expected.flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("crop", [(4, 6, 40, 50, False), (0, 10, 64, 30, True), (20, 20, 16, 16, False)])
def test_crop_matches_cpu_recipe(crop):
    img = grey_image(64)
    batch = build_uint8_transform(64)(img).unsqueeze(0)
    out = DeviceAugment(24, "mrm").apply(batch, [crop])[0]
    ref = cpu_path(img, *crop, size=24)
    # torch's antialiased bicubic vs PIL's: same geometry, sub-grey-level differences.
    diff = (out - ref).abs() * NORM_STATS["mrm"][1][0]  # back to [0, 1] pixel units
    assert diff.mean() < 0.004 and diff.max() < 0.03, (diff.mean(), diff.max())


def test_random_params_follow_seed_and_shapes():
    batch = torch.randint(0, 256, (5, 1, 40, 40), dtype=torch.uint8)
    aug = DeviceAugment(16, "imagenet")
    torch.manual_seed(0)
    a = aug(batch)
    torch.manual_seed(0)
    b = aug(batch)
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b)
    assert torch.equal(a[:, 0], a[:, 2])  # 3 identical channels
    with pytest.raises(ValueError, match="uint8 B x 1 x H x W"):
        aug(batch.float())
