"""The device-side sgd augmentation against the per-image CPU path (stated tolerances)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from datasets import NORM_STATS
from datasets.device_aug import DeviceAugment


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
    batch = TF.pil_to_tensor(img).unsqueeze(0)
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
    batch = TF.pil_to_tensor(img).unsqueeze(0)
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
    # ImageNet statistics differ per channel, as in the CPU path's GreyToNormalizedTensor.
    mean, std = NORM_STATS["imagenet"]
    grey = a * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(grey[:, 0], grey[:, 2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8 B x 1 x H x W"):
        aug(batch.float())


def test_grey_statistics_give_identical_channels():
    batch = torch.randint(0, 256, (3, 1, 24, 24), dtype=torch.uint8)
    out = DeviceAugment(16, "mrm")(batch)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


# --------------------------------------------------------------------------------------
# The adamw recipe on the device: RandAugment ops against timm's PIL ops, distributions,
# fill, random erasing, and a training run.

import math  # noqa: E402
import random  # noqa: E402

from scipy import stats  # noqa: E402
from timm.data import auto_augment as timm_aa  # noqa: E402
from timm.data.random_erasing import RandomErasing  # noqa: E402

from datasets import build_transform  # noqa: E402
from datasets import device_aug as D  # noqa: E402

BICUBIC = Image.Resampling.BICUBIC
PAPER_FILL = (122,)  # cxr_mae's round(255 * 0.4785): Pillow pads it to (122, 0, 0)
POINT_OPS = ["AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
             "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing"]
GEOMETRIC_OPS = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


def timm_arg(name, magnitude, sign, translate_const=14):
    """timm's own level -> argument mapping with a chosen sign (None for ops without one)."""
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    if level_fn is None:
        return None
    saved = timm_aa._randomly_negate
    timm_aa._randomly_negate = lambda v: v * sign
    try:
        return level_fn(magnitude, {"translate_const": translate_const})[0]
    finally:
        timm_aa._randomly_negate = saved


def pil_op(name, img, arg, fill=PAPER_FILL):
    """timm's op on a PIL image, as RandAugment calls it in the adamw recipe."""
    args = () if arg is None else (arg,)
    return timm_aa.NAME_TO_OP[name](img, *args, fillcolor=fill, resample=BICUBIC)


def as_batch(pil_img, channels):
    """A PIL 'L' or 'RGB' image as a uint8 1 x C x H x W batch (C = 1, or 2 = R and G of RGB)."""
    arr = np.array(pil_img)
    if channels == 1:
        return torch.from_numpy(arr)[None, None].contiguous()
    assert np.array_equal(arr[..., 1], arr[..., 2])  # green and blue stay equal
    return torch.from_numpy(arr[..., :2].copy()).permute(2, 0, 1)[None].contiguous()


def device_op(name, batch, arg, fill):
    """One op with the given fill through the batch transform's own dispatch (rand_augment)."""
    aug = D.DeviceRandAugment(batch.shape[-1], "cxr_mae", aa=None, reprob=0.0)
    aug.ops, aug.fill = [D.OpSpec(name, 1.0, 0.0, 0.0, 10.0)], torch.tensor(fill, dtype=torch.uint8)
    value = torch.tensor([[0.0 if arg is None else float(arg)]], dtype=torch.float64)
    return aug.rand_augment(batch, torch.zeros(1, 1, dtype=torch.long), value)


def rgb_with_paper_fill(size=36, seed=0):
    """A grey image made RGB and rotated with the paper's fill: red fill in the corners."""
    return grey_image(size, seed).convert("RGB").rotate(17, resample=BICUBIC, fillcolor=PAPER_FILL)


@pytest.mark.parametrize("name", POINT_OPS)
@pytest.mark.parametrize("magnitude,sign", [(9.0, 1.0), (8.4, -1.0), (10.0, 1.0)])
def test_point_ops_equal_timm_exactly(name, magnitude, sign):
    arg = timm_arg(name, magnitude, sign)
    grey = grey_image(36)
    ours = device_op(name, as_batch(grey, 1), arg, [36])
    if name == "PosterizeIncreasing" and arg == 0:
        assert ours.max() == 0  # 0 bits: black (the CPU path's fix for Pillow >= 13)
        return
    ref = pil_op(name, grey, arg)
    assert np.array_equal(ours[0, 0].numpy(), np.array(ref)), name
    # The paper's red fill in the image: channels treated apart, still exact.
    rgb = rgb_with_paper_fill()
    ours = device_op(name, as_batch(rgb, 2), arg, [122, 0])
    assert torch.equal(ours, as_batch(pil_op(name, rgb, arg), 2)), name


@pytest.mark.parametrize("name", ["SharpnessIncreasing", *GEOMETRIC_OPS])
@pytest.mark.parametrize("magnitude,sign", [(9.0, 1.0), (9.6, -1.0)])
def test_resampling_ops_equal_timm_within_one_grey_level(name, magnitude, sign):
    # Pillow's bicubic affine resampling (a = -1, clamped edges, truncation) and its SMOOTH
    # kernel are reproduced in float64 / float32; a different summation order may move a
    # value across an integer, so one grey level is allowed, and rarely.
    arg = timm_arg(name, magnitude, sign, translate_const=int(36 * 0.45))
    for pil_img, channels, fill in [(grey_image(36, 1), 1, [36]), (rgb_with_paper_fill(), 2, [122, 0])]:
        ours = device_op(name, as_batch(pil_img, channels), arg, fill).int()
        ref = as_batch(pil_op(name, pil_img, arg, fill=tuple(fill) if channels == 1 else PAPER_FILL), channels).int()
        diff = (ours - ref).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, channels, diff.max())


def test_random_ops_on_random_images_equal_timm():
    # Odd sizes, few grey levels (Equalize's and AutoContrast's special cases), random
    # magnitudes and signs, the paper's red fill half of the time.
    rng = np.random.default_rng(0)
    names = list(D.SUPPORTED_OPS)
    for trial in range(150):
        h, w = (int(v) for v in rng.integers(3, 24, 2))
        levels = rng.integers(0, 256, int(rng.integers(1, 5))) if trial % 3 == 1 else np.arange(256)
        img = Image.fromarray(rng.choice(levels, (h, w)).astype(np.uint8), "L").convert("RGB")
        if trial % 2:
            img = img.rotate(float(rng.uniform(-30, 30)), resample=BICUBIC, fillcolor=PAPER_FILL)
        name = names[trial % len(names)]
        magnitude, sign = float(rng.uniform(0, 10)), float(rng.choice([-1.0, 1.0]))
        arg = timm_arg(name, magnitude, sign, translate_const=int(w * 0.45))
        ours_arg = D.level_to_arg(name, torch.tensor([magnitude], dtype=torch.float64),
                                  torch.tensor([sign], dtype=torch.float64), {"translate_const": int(w * 0.45)})
        assert arg is None or ours_arg.item() == arg, (name, arg, ours_arg)
        if name.startswith("Posterize") and arg <= 0:
            continue
        ours = device_op(name, as_batch(img, 2), arg, [122, 0])
        ref = as_batch(pil_op(name, img, arg), 2)
        tolerance = 0 if name in POINT_OPS or name in ("Posterize", "Solarize", "Color", "Contrast",
                                                       "Brightness", "PosterizeOriginal") else 1
        assert (ours.int() - ref.int()).abs().max() <= tolerance, (trial, name, arg)


def test_paper_fill_needs_two_channels():
    # Rotate, then Solarize at 100: Pillow inverts the red fill 122 but not green / blue 0,
    # so the grey result there is 40, not Solarize(36) = 36. Two channels replay it exactly.
    rgb = grey_image(36).convert("RGB")
    ref = pil_op("SolarizeIncreasing", pil_op("Rotate", rgb, 20.0), 100).convert("L")
    aug = D.DeviceRandAugment(36, "cxr_mae", reprob=0.0, aug_fill="paper")
    assert aug.channels == 2 and aug.fill.tolist() == [122, 0]
    names = [op.name for op in aug.ops]
    ops = torch.tensor([[names.index("Rotate"), names.index("SolarizeIncreasing")]])
    args = torch.tensor([[20.0, 100.0]], dtype=torch.float64)
    ours = D.luma(aug.rand_augment(as_batch(rgb.convert("L"), 1).expand(-1, 2, -1, -1), ops, args))
    assert np.array_equal(ours[0, 0].numpy(), np.array(ref))
    assert ours[0, 0, 0, 0] == 40
    one_channel = device_op("SolarizeIncreasing", device_op("Rotate", as_batch(rgb.convert("L"), 1), 20.0, [36]),
                            100, [36])
    assert one_channel[0, 0, 0, 0] == 36  # what a grey-only shortcut would give


def recorded_rand_augment(aa="rand-m9-mstd0.5-inc1", size=32, aug_fill="paper"):
    """The CPU path's own RandAugment (from build_transform), its ops recording (name, args)."""
    t = build_transform(True, "adamw", size, norm="cxr_mae", aa=aa, reprob=0.0, aug_fill=aug_fill)
    rand_augment = next(step for step in t.pipeline.transforms if hasattr(step, "ops"))
    calls = []
    for op in rand_augment.ops:
        def record(img, *args, _name=op.name, _fn=op.aug_fn, **kwargs):
            calls.append((_name, args[0] if args else None))
            return _fn(img, *args, **kwargs)
        op.aug_fn = record
    return rand_augment, calls


@pytest.mark.parametrize("aug_fill", ["paper", "neutral"])
def test_device_rand_augment_replays_timm_choices_bit_for_bit(aug_fill):
    # The whole op chain (dispatch, fill, channel bookkeeping, Grayscale) for timm's own draws.
    rand_augment, calls = recorded_rand_augment(size=32, aug_fill=aug_fill)
    aug = D.DeviceRandAugment(32, "cxr_mae", reprob=0.0, aug_fill=aug_fill)
    names = [op.name for op in aug.ops]
    images, refs, ops, args = [], [], [], []
    for seed in range(40):
        random.seed(seed)
        np.random.seed(seed)
        grey = grey_image(32, seed)
        calls.clear()
        refs.append(np.array(rand_augment(grey.convert("RGB")).convert("L")))
        images.append(as_batch(grey, 1))
        row_ops = [names.index(n) for n, _ in calls] + [-1] * (2 - len(calls))
        row_args = [0.0 if a is None else float(a) for _, a in calls] + [0.0] * (2 - len(calls))
        ops.append(row_ops)
        args.append(row_args)
    batch = torch.cat(images).expand(-1, aug.channels, -1, -1)
    ours = D.luma(aug.rand_augment(batch, torch.tensor(ops), torch.tensor(args, dtype=torch.float64)))
    diff = (ours[:, 0].int() - torch.from_numpy(np.stack(refs)).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001


def test_op_choice_and_magnitudes_follow_timm():
    # The same policy drawn by timm (recorded) and by the device path; loose statistical bounds.
    n = 6000
    rand_augment, calls = recorded_rand_augment(size=32)
    random.seed(0)
    np.random.seed(0)
    tiny = Image.new("RGB", (4, 4), 100)
    for _ in range(n):
        rand_augment(tiny)
    aug = D.DeviceRandAugment(32, "cxr_mae")
    torch.manual_seed(0)
    ops, args = aug.op_params(n)
    names = [op.name for op in aug.ops]
    ours = [(names[i], a) for i, a in zip(ops.flatten().tolist(), args.flatten().tolist()) if i >= 0]
    # How many ops run at all: Binomial(2 n, 0.5) on both sides.
    assert abs(len(ours) - len(calls)) < 6 * math.sqrt(2 * n * 0.25) * math.sqrt(2)
    table = np.array([[sum(1 for c, _ in calls if c == name) for name in names],
                      [sum(1 for c, _ in ours if c == name) for name in names]])
    assert stats.chi2_contingency(table).pvalue > 1e-4, table
    for name in names:
        theirs = np.array([a for c, a in calls if c == name and a is not None], dtype=float)
        mine = np.array([a for c, a in ours if c == name], dtype=float)
        if len(theirs) == 0:
            continue
        spread = math.sqrt(theirs.var() / len(theirs) + mine.var() / len(mine)) + 1e-9
        assert abs(theirs.mean() - mine.mean()) < 6 * spread + 1e-6, name
        assert abs(np.abs(theirs).mean() - np.abs(mine).mean()) < 6 * spread + 1e-6, name
        assert set(np.unique(mine)) <= set(np.unique(theirs)) or len(np.unique(theirs)) > 10, name


def test_magnitude_is_a_clipped_gaussian():
    aug = D.DeviceRandAugment(32, "cxr_mae")
    rotate = [op.name for op in aug.ops].index("Rotate")
    torch.manual_seed(1)
    ops, args = aug.op_params(40000)
    magnitude = args[ops == rotate].abs() / 3.0  # Rotate: sign * magnitude / 10 * 30
    assert magnitude.max() <= 10.0 and magnitude.min() >= 0.0
    assert 0.015 < (magnitude == 10.0).double().mean() < 0.035  # P(N(9, 0.5) > 10) = 2.3%
    inside = magnitude[magnitude < 10.0]
    assert abs(inside.mean().item() - 8.985) < 0.03 and abs(inside.std().item() - 0.48) < 0.03
    signs = args[ops == rotate].sign()
    assert abs((signs < 0).double().mean().item() - 0.5) < 0.03


def identity_params(aug, n, size, op_name=None, arg=0.0):
    """Parameters that keep the crop whole and run at most one chosen op."""
    names = [op.name for op in aug.ops]
    ops = torch.full((n, max(aug.layers, 1)), -1, dtype=torch.long)
    args = torch.zeros(n, max(aug.layers, 1), dtype=torch.float64)
    if op_name is not None:
        ops[:, 0], args[:, 0] = names.index(op_name), arg
    return D.RandAugmentParams([(0, 0, size, size, False)] * n, ops, args,
                               torch.zeros(n, aug.recount, 4, dtype=torch.long))


@pytest.mark.parametrize("aug_fill,grey", [("paper", 36), ("neutral", 122)])
@pytest.mark.parametrize("op_name,arg", [("Rotate", 30.0), ("ShearX", 0.3), ("TranslateYRel", -0.45)])
def test_geometric_fill_is_the_recipe_grey(aug_fill, grey, op_name, arg):
    aug = D.DeviceRandAugment(32, "cxr_mae", reprob=0.0, aug_fill=aug_fill)
    white = torch.full((1, 1, 32, 32), 255, dtype=torch.uint8)
    x = aug.apply(white, identity_params(aug, 1, 32, op_name, arg))
    mean, std = NORM_STATS["cxr_mae"]
    filled = torch.isclose(x[0], torch.tensor((grey / 255 - mean[0]) / std[0]), rtol=0, atol=1e-5)
    assert filled[0].float().mean() > 0.05 and torch.equal(filled[0], filled[2])
    assert x[0].max().item() == pytest.approx((1.0 - mean[0]) / std[0], abs=1e-5)


def test_no_op_and_no_erasing_is_the_cpu_normalisation():
    aug = D.DeviceRandAugment(32, "cxr_mae", reprob=0.0)
    img = grey_image(32)
    batch = TF.pil_to_tensor(img).unsqueeze(0)
    x = aug.apply(batch, identity_params(aug, 1, 32))
    ref = build_transform(False, "sgd", 32, norm="cxr_mae")(img)  # resize + crop of a 32-px image: itself
    torch.testing.assert_close(x[0], ref, atol=1e-6, rtol=0)


def test_random_erasing_follows_timm():
    # Box frequency, area and aspect against timm's RandomErasing on the same size.
    n, size = 3000, 32
    erase = RandomErasing(0.25, mode="const", max_count=1, device="cpu")
    random.seed(0)
    theirs = []
    for _ in range(n):
        x = torch.ones(3, size, size)
        erase(x)
        hit = (x[0] == 0).nonzero()
        if len(hit):
            h = int(hit[:, 0].max() - hit[:, 0].min() + 1)
            w = int(hit[:, 1].max() - hit[:, 1].min() + 1)
            theirs.append((h, w))
    aug = D.DeviceRandAugment(size, "cxr_mae", reprob=0.25)
    torch.manual_seed(0)
    boxes = aug.erase_params(n, size, size)[:, 0]
    ours = [(h, w) for _, _, h, w in boxes.tolist() if h > 0]
    assert abs(len(ours) - len(theirs)) < 6 * math.sqrt(n * 0.25 * 0.75) * math.sqrt(2)
    for k in range(2):
        a, b = np.array([t[k] for t in theirs], float), np.array([o[k] for o in ours], float)
        assert abs(a.mean() - b.mean()) < 6 * math.sqrt(a.var() / len(a) + b.var() / len(b))
    area_a = np.array([h * w for h, w in theirs], float)
    area_b = np.array([h * w for h, w in ours], float)
    assert abs(area_a.mean() - area_b.mean()) < 6 * math.sqrt(area_a.var() / len(area_a) + area_b.var() / len(area_b))
    top, left, h, w = boxes.unbind(1)
    assert bool(((top + h <= size) & (left + w <= size)).all())


@pytest.mark.parametrize("remode", ["pixel", "rand", "const"])
def test_erasing_fills_boxes_in_normalised_space(remode):
    aug = D.DeviceRandAugment(32, "cxr_mae", reprob=1.0, remode=remode)
    params = identity_params(aug, 2, 32)
    params.erase[:, 0] = torch.tensor([[2, 3, 10, 12], [0, 0, 0, 0]])
    batch = torch.full((2, 1, 32, 32), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    x = aug.apply(batch, params)
    mean, std = NORM_STATS["cxr_mae"]
    level = (200 / 255 - mean[0]) / std[0]
    box = x[0, :, 2:12, 3:15]
    outside = x[0].clone()
    outside[:, 2:12, 3:15] = level
    torch.testing.assert_close(outside, torch.full_like(outside, level))
    torch.testing.assert_close(x[1], torch.full_like(x[1], level))  # no box
    if remode == "pixel":  # per-pixel, per-channel standard normal noise
        assert box.std() > 0.5 and not torch.equal(box[0], box[1])
    elif remode == "rand":  # one colour per channel
        assert torch.equal(box[0], box[0, :1, :1].expand_as(box[0])) and box.std() > 0
    else:
        assert torch.equal(box, torch.zeros_like(box))


def test_seeded_batches_repeat_and_shapes():
    aug = D.build_device_augment("adamw", 32, "cxr_mae")
    batch = torch.randint(0, 256, (6, 1, 37, 37), dtype=torch.uint8)
    torch.manual_seed(5)
    a = aug(batch)
    torch.manual_seed(5)
    b = aug(batch)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert isinstance(D.build_device_augment("sgd", 32, "mrm"), DeviceAugment)
    with pytest.raises(ValueError, match="uint8 B x 1 x H x W"):
        aug(batch.float())


@pytest.mark.parametrize("kwargs,message", [
    ({"aa": "augmix-m5"}, "--aa 'augmix-m5'"),
    ({"aa": "rand-m9-q3"}, "--aa .rand-m9-q3.: not a RandAugment string"),
    ({"remode": "noise"}, "--remode 'noise'"),
    ({"aug_fill": "black"}, "aug_fill='black'"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D.build_device_augment("adamw", 32, "cxr_mae", **kwargs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from _fakes import demo_data_and_weights

    return demo_data_and_weights(tmp_path_factory.mktemp("demo"))


def test_adamw_device_aug_trains_and_tests(demo, tmp_path):
    import json

    import main_finetune_lora as mfl

    data, weights = demo
    out = tmp_path / "run"
    argv = ["--data_path", str(data), "--dataset", "nih", "--finetune", str(weights),
            "--model", "vit_tiny_patch16_lora", "--depth", "2", "--input_size", "32",
            "--batch_size", "16", "--num_workers", "0", "--amp", "none", "--epochs", "1",
            "--warmup_epochs", "0", "--blr", "1e-3", "--optimizer", "adamw", "--device_aug",
            "--output_dir", str(out), "--run_name", "", "--no_progress", "--seed", "3"]
    assert mfl.cli(argv) == 0
    results = json.loads((out / "results_test.json").read_text())
    assert math.isfinite(results["mean_auroc"])
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["device_aug"] is True and config["settings"]["recipe"] == "adamw"


def test_entry_script_refuses_what_the_device_cannot_run(demo, tmp_path, capsys):
    import main_finetune_lora as mfl

    data, weights = demo
    with pytest.raises(SystemExit) as exc:
        mfl.cli(["--data_path", str(data), "--finetune", str(weights), "--optimizer", "adamw",
                 "--model", "vit_tiny_patch16_lora", "--depth", "2", "--device_aug", "--aa",
                 "augmix-m5", "--output_dir", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "--device_aug: --aa 'augmix-m5'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["sgd", "adamw"])
def test_bench_row_for_device_aug(recipe):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_data

    rates = bench_data.device_aug_rates(recipe, 32, 4, "cpu", repeats=1)
    assert rates["source_size"] == 37 and rates["batch_size"] == 4
    assert rates["cpu_images_per_s_per_core"] > 0 and rates["device_images_per_s"] > 0


@pytest.mark.parametrize("recipe", ["sgd", "adamw"])
def test_training_crop_is_the_cpu_recipes_crop_from_the_full_image(recipe):
    """--device_aug training: the loader takes the recipe's own random resized crop step
    (torchvision's for sgd, timm's for adamw) from the full-resolution image: bit-identical to
    the CPU recipe's crop for the same seed; the device only flips and normalises here. The
    crop sees the whole image, edges included."""
    import random

    from datasets import build_transform
    from datasets.device_aug import build_device_augment, build_uint8_crop_transform

    img = grey_image(160).resize((120, 160))  # portrait: a centred square would cut top and bottom
    loader_tf = build_uint8_crop_transform(recipe, 32)
    cpu_crop = build_transform(True, recipe=recipe, input_size=32, norm="mrm").pipeline.transforms[0]
    assert type(cpu_crop).__name__ == ("RandomResizedCrop" if recipe == "sgd" else
                                       "RandomResizedCropAndInterpolation")
    aug = build_device_augment(recipe, 32, "mrm", aa="", reprob=0.0, crop=False)
    seen = []
    for seed in range(40):
        torch.manual_seed(seed), random.seed(seed)
        crop = loader_tf(img)
        torch.manual_seed(seed), random.seed(seed)
        expected = TF.pil_to_tensor(cpu_crop(img))
        assert crop.shape == (1, 32, 32) and torch.equal(crop, expected), seed
        seen.append(crop)
        out = aug.apply(crop.unsqueeze(0), aug.draw_params(32, 32, 1) if recipe == "adamw" else
                        [(0, 0, 32, 32, False)])[0]
        mean, std = NORM_STATS["mrm"]
        ref = ((crop.float() / 255 - mean[0]) / std[0]).expand(3, -1, -1)
        assert torch.allclose(out, ref, atol=1e-6) or torch.allclose(out, ref.flip(-1), atol=1e-6)
    assert len({c.sum().item() for c in seen}) > 30  # random crops, not one fixed square
    with pytest.raises(ValueError, match="expects 32 px square crops"):
        aug(torch.zeros(1, 1, 40, 40, dtype=torch.uint8))


def test_training_crop_reads_only_the_crop_from_the_exact_cache(tmp_path):
    """The loader crop is planned like the CPU recipe's: from the exact cache only the crop's
    rows are read and resized natively, with the same bytes as from the files."""
    from datasets import build_cache, build_dataset, make_demo_dataset
    from datasets.device_aug import build_uint8_crop_transform

    demo = make_demo_dataset(tmp_path / "demo", num_images=12, image_size=96)
    build_cache(demo, workers=1)
    tf = build_uint8_crop_transform("adamw", 32)
    cached = build_dataset("train", demo, transform=tf, cache="on")
    files = build_dataset("train", demo, transform=tf, cache="off")
    assert cached.cache_info.get("crop_resize")  # the planned crop path, not the whole image
    import random

    for i in range(len(cached)):
        torch.manual_seed(i), random.seed(i)  # timm's crop draws from Python's generator
        a, _ = cached[i]
        torch.manual_seed(i), random.seed(i)
        b, _ = files[i]
        assert a.dtype == torch.uint8 and a.shape == (1, 32, 32) and torch.equal(a, b)


def test_adamw_device_path_on_loader_crops_draws_flips_ops_and_erasing():
    """The adamw batch transform with crop=False: the same RandAugment and erasing on the
    loader's crops; flips about half of the images."""
    from datasets.device_aug import build_device_augment

    aug = build_device_augment("adamw", 32, "cxr_mae", crop=False)
    torch.manual_seed(0)
    params = aug.draw_params(32, 32, 400)
    assert all(p[:4] == (0, 0, 32, 32) for p in params.crops)
    assert 0.4 < np.mean([p[4] for p in params.crops]) < 0.6
    batch = torch.from_numpy(np.array(grey_image(32))).view(1, 1, 32, 32).expand(8, -1, -1, -1).contiguous()
    out = aug(batch)
    assert out.shape == (8, 3, 32, 32) and torch.isfinite(out).all()
