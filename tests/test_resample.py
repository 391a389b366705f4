"""The native crop resize: Pillow's bytes, a fallback to Pillow whenever it cannot be trusted,
and data set tensors equal to the paper's torchvision pipeline on PIL images."""
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import datasets.chestxray as chestxray
import datasets.resample as resample
from datasets import build_dataset, build_transform, make_demo_dataset
from datasets.constants import NORM_STATS

BICUBIC, BILINEAR = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR


@pytest.fixture
def fresh(monkeypatch):
    """A process state in which the native resize is decided again."""
    monkeypatch.setattr(resample, "_state", {})
    monkeypatch.delenv(resample.ENV_SWITCH, raising=False)
    return monkeypatch


@pytest.fixture
def native(fresh):
    fn = resample.native()
    if fn is None:
        pytest.skip(f"no native resize here: {resample._state['why']}")
    return fn


def pillow(array, size, filter_):
    return np.asarray(Image.fromarray(np.ascontiguousarray(array), mode="L").resize(size[::-1], filter_))


def test_same_bytes_as_pillow_on_many_shapes(native):
    rng = np.random.default_rng(1)
    shapes = [((1, 1), (1, 1)), ((1, 9), (4, 3)), ((9, 1), (2, 5)), ((5, 5), (224, 224)),
              ((300, 2), (100, 20)), ((900, 3), (40, 7)), ((250, 2), (251, 5)),  # Pillow's tall-image order
              ((200, 40), (3, 70)), ((40, 200), (70, 3)),  # very uneven scales
              ((700, 690), (224, 224)), ((1024, 300), (224, 224)), ((224, 500), (224, 224)),
              ((500, 224), (224, 224)), ((17, 400), (3, 97)), ((300, 300), (299, 301))]
    shapes += [(tuple(int(v) for v in rng.integers(1, 300, 2)), tuple(int(v) for v in rng.integers(1, 120, 2)))
               for _ in range(60)]
    for i, (shape, size) in enumerate(shapes):
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        if i % 2:  # hard edges: the bicubic overshoot reaches the clipping at 0 and 255
            array = np.where(array > 127, 255, 0).astype(np.uint8)
        for filter_ in (BICUBIC, BILINEAR):
            got = resample.resize_grey(array, size, filter_)
            assert got.shape == size and got.dtype == np.uint8
            assert np.array_equal(got, pillow(array, size, filter_)), (shape, size, filter_)


def test_views_of_a_larger_image_and_other_filters(native):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (400, 380), dtype=np.uint8)
    crop = image[37:337, 21:290]  # a view with the full image's row stride, as the cache gives
    assert np.array_equal(resample.resize_grey(crop, (64, 64), BICUBIC), pillow(crop, (64, 64), BICUBIC))
    column_view = image[:, ::2]  # not unit-stride columns: Pillow does it
    assert np.array_equal(resample.resize_grey(column_view, (50, 40), BICUBIC),
                          pillow(column_view, (50, 40), BICUBIC))
    lanczos = Image.Resampling.LANCZOS  # not done natively: Pillow
    assert np.array_equal(resample.resize_grey(crop, (64, 64), lanczos), pillow(crop, (64, 64), lanczos))
    same = resample.resize_grey(crop, crop.shape, BICUBIC)
    assert np.array_equal(same, crop) and not np.shares_memory(same, crop)
    with pytest.raises(ValueError, match="2-D uint8"):
        resample.resize_grey(crop.astype(np.int16), (8, 8), BICUBIC)
    with pytest.raises(ValueError, match="must be > 0"):
        resample.resize_grey(crop, (0, 8), BICUBIC)


def test_check_covers_pillows_order_of_passes(native, fresh):
    """Resized in one order where Pillow uses the other (images over 100x taller than wide),
    the result differs: the self-check must see it."""
    fresh.setattr(resample, "_resize_native", lambda fn, a, size, f: resample._call(fn, a, size, f))
    assert "pixels differ" in resample.self_check(native)


def test_switched_off_or_failing_its_check_it_is_pillow(fresh, caplog):
    fresh.setenv(resample.ENV_SWITCH, "0")
    assert resample.native() is None and resample.kernel_name().startswith("Pillow")

    fresh.setattr(resample, "_state", {})
    fresh.delenv(resample.ENV_SWITCH)
    fresh.setattr(resample, "self_check", lambda fn: "bicubic 9x9 -> 3x3: 1 of 9 pixels differ")
    with caplog.at_level(logging.WARNING, logger="datasets.resample"):
        fn = resample.native()
    if resample._state["why"].startswith("no C compiler"):
        pytest.skip("no C compiler here")
    assert fn is None and "differs from Pillow" in caplog.text and "1 of 9 pixels" in caplog.text
    array = np.random.default_rng(3).integers(0, 256, (90, 70), dtype=np.uint8)
    assert np.array_equal(resample.resize_grey(array, (20, 20), BICUBIC), pillow(array, (20, 20), BICUBIC))


def test_check_catches_a_wrong_kernel(native):
    def off_by_one(array_ptr, h, w, stride, out_ptr, oh, ow, filter_):
        status = native(array_ptr, h, w, stride, out_ptr, oh, ow, filter_)
        out = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (oh * ow)).from_address(out_ptr))
        out[0] ^= 1
        return status

    assert "pixels differ" in resample.self_check(off_by_one, cases=2)


def test_without_a_home_or_writable_folder_it_is_pillow(fresh, tmp_path):
    """Nowhere to build (no writable source folder, no home): Pillow, not an exception."""
    fresh.setattr(resample, "_library_path", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert resample.native() is None and "no home" in resample._state["why"]


def test_a_prebuilt_library_in_a_read_only_checkout_is_used(fresh, tmp_path):
    """setup.sh built it beside the source; the folder is not writable any more: it is found."""
    fresh.setattr(resample.os, "access", lambda path, mode: False)
    fresh.setattr(resample, "_user_cache", lambda: tmp_path / "cache")
    built = resample.SOURCE.parent / "_build" / resample._library_name()
    if not built.is_file():
        pytest.skip("no library built beside the source here")
    assert resample._library_path() == built


def test_without_a_compiler_it_is_pillow(fresh, tmp_path):
    fresh.setattr(resample, "_library_path", lambda: tmp_path / resample._library_name())  # not built
    fresh.setenv("CC", str(tmp_path / "no-such-cc"))
    assert resample.native() is None
    assert "no-such-cc" in resample._state["why"] or "No such file" in resample._state["why"]
    fresh.delenv("CC")
    fresh.setattr(shutil, "which", lambda name: None)
    fresh.setattr(resample, "_state", {})
    assert resample.native() is None and "no C compiler" in resample._state["why"]


def test_library_is_built_once_into_its_folder(fresh, tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    first = resample.compile_library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert resample.compile_library(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left


def test_a_killed_builds_temporary_file_is_cleared(fresh, tmp_path):
    """A build killed mid-way leaves `<name>.<id>.tmp.so`; the next build clears such files
    once they are old, and leaves a recent one (another process may be building it)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    stem = Path(resample._library_name()).stem
    stale, recent = tmp_path / f"{stem}.dead0001.tmp.so", tmp_path / f"{stem}.live0002.tmp.so"
    stale.write_bytes(b"half a library")
    recent.write_bytes(b"being written")
    old = time.time() - resample.STALE_BUILD_S - 60
    os.utime(stale, (old, old))
    built = resample.compile_library(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.name, recent.name])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("rs") / "demo", num_images=24, image_size=160)


def paper_sgd(input_size, norm):
    """The paper's sgd train transform as torchvision runs it on the RGB PIL image."""
    mean, std = NORM_STATS[norm]
    return T.Compose([T.RandomResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("cache", ["off", "on"])
def test_dataset_tensors_equal_the_papers_pipeline(fresh, demo, cache):
    """From the files and from the exact cache, with the native resize when there is one: the
    same training tensors as the paper's torchvision pipeline on PIL images (160 px -> 40 px,
    crops of up to 4x downsizing)."""
    if cache == "on":
        from datasets import build_cache

        build_cache(demo, workers=1)
    ours = build_dataset("train", demo, transform=build_transform(True, "sgd", input_size=40), cache=cache)
    reference = paper_sgd(40, "mrm")
    calls = []
    fresh.setattr(chestxray, "resize_grey", lambda *a: calls.append(a) or resample.resize_grey(*a))
    for index in range(len(ours)):
        for seed in (index, 100 + index):
            torch.manual_seed(seed), random.seed(seed)
            x, _ = ours[index]
            torch.manual_seed(seed), random.seed(seed)
            rgb = Image.open(ours.files[index]).convert("RGB")  # the paper's loader
            assert torch.equal(x, reference(rgb)), (index, seed)
    assert len(calls) == 2 * len(ours)  # every crop went through resize_grey
    assert ours.cache_info["crop_resize"].startswith(("native (same bytes as Pillow", "Pillow"))


def test_dataset_tensors_equal_the_papers_adamw_pipeline(fresh, demo):
    """The adamw recipe (timm's crop, RandAugment, erasing) read through the data set, with the
    native resize: the paper's timm pipeline on the RGB PIL image, bit for bit."""
    from test_data_transforms import paper_adamw_reference, seed_all

    ours = build_dataset("train", demo, transform=build_transform(True, "adamw", input_size=40,
                                                                  norm="cxr_mae", reprob=0.25),
                         cache="off")
    reference = paper_adamw_reference(40, "cxr_mae", one_value_mean=True)
    calls = []
    fresh.setattr(chestxray, "resize_grey", lambda *a: calls.append(a) or resample.resize_grey(*a))
    for index in range(len(ours)):
        seed_all(index)
        x, _ = ours[index]
        seed_all(index)
        assert torch.equal(x, reference(Image.open(ours.files[index]).convert("RGB"))), index
    assert len(calls) == len(ours)  # timm's crop went through resize_grey


def test_processes_building_at_once_leave_one_good_library(tmp_path):
    """DataLoader workers may build at the same moment: each renames a finished file into place."""
    import subprocess
    import sys

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import datasets.resample as r; "
            "fn = r._load(r.compile_library(pathlib.Path(sys.argv[2]))); "
            "print(repr(r.self_check(fn, cases=4)))")
    root = str(resample.SOURCE.parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", code, root, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == "''"  # the library each loaded agrees with Pillow
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


@pytest.mark.parametrize("cache", ["off", "on"])
def test_other_crops_take_the_pillow_path_with_the_same_tensors(demo, cache):
    """A user's RGB transform whose crop resizes with another filter (nearest): the data set
    crops as before and Pillow resizes, from the files and from the exact cache alike."""
    from datasets import build_cache

    if cache == "on":
        build_cache(demo, workers=1)
    transform = T.Compose([T.RandomResizedCrop(40, interpolation=InterpolationMode.NEAREST), T.ToTensor()])
    ours = build_dataset("train", demo, transform=transform, cache=cache)
    for index in range(len(ours)):
        torch.manual_seed(index)
        x, _ = ours[index]
        torch.manual_seed(index)
        assert x.shape == (3, 40, 40)
        assert torch.equal(x, transform(Image.open(ours.files[index]).convert("RGB"))), index
