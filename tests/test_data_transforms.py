"""The paper's transforms: shapes, normalisation, 3 identical channels, global-RNG reproducibility."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from datasets import NORM_STATS, build_dataset, build_transform, make_demo_dataset
from datasets.transforms import _fix_rand_augment

GREY = Image.fromarray((np.random.default_rng(0).random((80, 100)) * 255).astype(np.uint8), "L")


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize("recipe", ["sgd", "adamw"])
@pytest.mark.parametrize("is_train", [True, False])
def test_shapes_channels_and_seeding(recipe, is_train):
    t = build_transform(is_train, recipe=recipe, input_size=64, norm="cxr_mae", reprob=0.0)
    seed_all(3)
    x = t(GREY)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    seed_all(3)
    assert torch.equal(t(GREY), x)  # only the global RNGs drive the augmentation


def test_eval_resizes_as_the_paper():
    def resize_of(t):
        return next(s for s in t.pipeline.transforms if isinstance(s, T.Resize))

    sgd, adamw = build_transform(False, "sgd", 224), build_transform(False, "adamw", 224)
    assert resize_of(sgd).size == 224 and resize_of(adamw).size == 256
    assert resize_of(sgd).interpolation == T.InterpolationMode.BICUBIC
    rrc = build_transform(True, "sgd", 224).pipeline.transforms[0]
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.interpolation == T.InterpolationMode.BICUBIC


def test_adamw_train_uses_randaugment_and_erasing():
    text = repr(build_transform(True, "adamw", 224, aa="rand-m9-mstd0.5-inc1", reprob=0.25))
    assert "RandAugment" in text and "RandomErasing" in text
    assert "RandAugment" not in repr(build_transform(True, "sgd", 224))


@pytest.mark.parametrize("norm", sorted(NORM_STATS))
def test_normalisation(norm):
    flat = Image.new("L", (32, 32), 128)
    x = build_transform(False, "sgd", 32, norm=norm)(flat)
    mean, std = NORM_STATS[norm]
    for c in range(3):
        assert x[c].mean().item() == pytest.approx((128 / 255 - mean[c]) / std[c], abs=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="recipe='lamb'"):
        build_transform(True, recipe="lamb")
    with pytest.raises(ValueError, match="norm='mae'"):
        build_transform(True, norm="mae")


def test_dataset_with_and_without_transforms(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", num_images=24, image_size=40)
    raw = build_dataset("val", root)
    x, y = raw[0]
    assert x.shape == (3, 40, 40) and 0.0 <= x.min() and x.max() <= 1.0 and y.shape == (14,)
    # A plain torchvision transform receives a 3-channel RGB PIL image.
    seen = []
    ds = build_dataset("val", root, transform=lambda img: seen.append(img.mode) or T.functional.to_tensor(img))
    assert ds[0][0].shape == (3, 40, 40) and seen == ["RGB"]


def test_rand_augment_posterize_at_full_magnitude():
    # Magnitude 10 maps PosterizeIncreasing to 0 bits, which Pillow >= 13 refuses.
    t = build_transform(True, "adamw", 32, aa="rand-m9-mstd0.5-inc1")
    rand_augment = _rand_augment(t)
    op = next(o for o in rand_augment.ops if o.name == "PosterizeIncreasing")
    op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0
    out = op(GREY.convert("RGB"))
    assert out.size == GREY.size and np.asarray(out).max() == 0


def _rand_augment(transform):
    return next(s for s in transform.pipeline.transforms if hasattr(s, "ops"))


def paper_adamw_reference(input_size: int, norm: str, one_value_mean: bool):
    """The documented rule, built independently: timm create_transform on the RGB image; the
    paper passes its one-value mean and inserts Grayscale(3) right after RandAugment."""
    from timm.data import create_transform

    mean, std = NORM_STATS[norm]
    mean, std = (mean[:1], std[:1]) if one_value_mean else (mean, std)
    t = create_transform(input_size=input_size, is_training=True, color_jitter=None,
                         auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                         re_prob=0.25, re_mode="pixel", re_count=1, mean=mean, std=std)
    _fix_rand_augment(t)  # Pillow >= 13 refuses 0-bit posterize; older Pillow gave black, as the fix
    if one_value_mean:
        at = next(i for i, s in enumerate(t.transforms) if hasattr(s, "ops")) + 1
        t.transforms.insert(at, T.Grayscale(num_output_channels=3))
    return t


@pytest.mark.parametrize("aug_fill,norm", [("paper", "cxr_mae"), ("paper", "mrm"), ("neutral", "cxr_mae")])
def test_adamw_train_equals_the_documented_pipeline(aug_fill, norm):
    # 'paper': the paper's pipeline; 'neutral': the earlier mid-grey pipeline (3-value mean, no
    # Grayscale). Both bit for bit, for seeds that draw every RandAugment op and random erasing.
    ours = build_transform(True, "adamw", 32, norm=norm, reprob=0.25, aug_fill=aug_fill)
    reference = paper_adamw_reference(32, norm, one_value_mean=aug_fill == "paper")
    rgb = GREY.convert("RGB")  # the paper's loader: PIL convert('RGB') of the grey PNG
    for seed in range(60):
        seed_all(seed)
        x = ours(GREY)
        seed_all(seed)
        assert torch.equal(x, reference(rgb)), seed


@pytest.mark.parametrize("aug_fill,grey", [("paper", 36), ("neutral", 122)])
@pytest.mark.parametrize("op_name", ["Rotate", "ShearX", "TranslateYRel"])
def test_geometric_ops_fill(aug_fill, grey, op_name):
    t = build_transform(True, "adamw", 32, norm="cxr_mae", reprob=0.0, aug_fill=aug_fill)
    rand_augment = _rand_augment(t)
    op = next(o for o in rand_augment.ops if o.name == op_name)
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    rand_augment.ops, rand_augment.num_layers = [op], 1
    white = Image.new("L", (40, 40), 255)
    mean, std = NORM_STATS["cxr_mae"]
    seed_all(0)
    x = t(white)
    filled = torch.isclose(x[0], torch.tensor((grey / 255 - mean[0]) / std[0]), rtol=0, atol=1e-5)
    assert filled.any() and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # Everything not filled is the white image (or its interpolated edge with the fill).
    white_level = (1.0 - mean[0]) / std[0]
    assert x[0].max().item() == pytest.approx(white_level, abs=1e-5)


def test_aug_fill_is_checked():
    with pytest.raises(ValueError, match="aug_fill='black'"):
        build_transform(True, "adamw", 32, aug_fill="black")


def test_one_eval_resize_rule_and_grey_dispatch():
    from datasets.transforms import apply_transform, eval_resize

    assert [eval_resize(224, r) for r in ("sgd", "adamw")] == [224, 256]
    # MAE's build_transform: crop_pct 224/256 up to 224 px, 1 above (no resize margin).
    assert [eval_resize(n, "adamw") for n in (112, 224, 256, 384)] == [128, 256, 256, 384]
    grey = Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L")
    assert apply_transform(lambda im: im.mode, grey) == "RGB"  # a foreign transform: 3 channels
    ours = build_transform(is_train=False, recipe="sgd", input_size=8, norm="mrm")
    assert torch.equal(apply_transform(ours, grey), ours(grey))


def test_paper_fill_of_per_channel_statistics_is_timms_default():
    """The paper hands its one-value X-ray statistics to timm (fill (122,) -> grey 36); with
    ImageNet weights it hands ImageNet's per-channel mean, which timm fills with as is."""
    from datasets.constants import NORM_STATS
    from datasets.transforms import rand_augment_fill_mean

    assert rand_augment_fill_mean(NORM_STATS["cxr_mae"][0], "paper") == (0.4785,)
    imagenet = NORM_STATS["imagenet"][0]
    assert rand_augment_fill_mean(imagenet, "paper") == tuple(imagenet)
    assert tuple(round(255 * m) for m in rand_augment_fill_mean(imagenet, "paper")) == (124, 116, 104)
    assert rand_augment_fill_mean(imagenet, "neutral") == (imagenet[0],) * 3
