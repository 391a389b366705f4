"""Data that must not change behind a run's back: the training process's RNGs are the model's
alone, a cache never serves pixels of an original that changed (a fixed bad image included),
empty or malformed DICOM header values, split files that disagree on their label columns."""
import json
import os
import random

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

import datasets
import main_finetune_lora as mfl
from _fakes import demo_data_and_weights, tiny_run_args
from datasets import CacheError, ImageDecodeError, ImageError, SplitFileError, build_cache, build_dataset
from datasets.loader import build_loader
from datasets.synthetic import write_dicom
from util.misc import DistInfo, seed_everything

SPLITS = ("train_list.txt", "val_list.txt", "test_list.txt")


# ---------------------------------------------------------------------------------------
# The number of workers changes nothing
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo data set (NIH layout) and a fake depth-2 MRM checkpoint."""
    return demo_data_and_weights(tmp_path_factory.mktemp("demo"))


def _rng_states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def _epochs_with_model_draws(data, workers, epochs=2):
    """Batches of the seeded training loader and, after each, what a model's dropout would draw
    from the global RNGs; each epoch starts from a seeded state, as the training loop does."""
    transform = datasets.build_transform(True, recipe="sgd", input_size=16, norm="mrm")
    ds = build_dataset("train", data, transform=transform, cache="off")
    loader = build_loader(ds, DistInfo(), train=True, batch_size=8, seed=5, num_workers=workers,
                          pin_memory=False)
    batches, draws = [], []
    for epoch in range(epochs):
        seed_everything(100 + epoch)
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            batches.append(x)
            draws.append((torch.rand(3), np.random.rand(), random.random()))
    return batches, draws


def test_loader_leaves_the_global_rngs_to_the_model(demo):
    data, _ = demo
    # Iterating the loader in the training process itself does not move the global RNGs.
    transform = datasets.build_transform(True, recipe="sgd", input_size=16, norm="mrm")
    loader = build_loader(build_dataset("train", data, transform=transform, cache="off"), DistInfo(),
                          train=True, batch_size=8, seed=5, num_workers=0, pin_memory=False)
    seed_everything(11)
    before = _rng_states()
    for _ in loader:
        pass
    after = _rng_states()
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])

    # So the model's draws, like the samples, are the same with and without worker processes.
    batches0, draws0 = _epochs_with_model_draws(data, workers=0)
    batches1, draws1 = _epochs_with_model_draws(data, workers=1)
    assert len(batches0) == len(batches1) > 2
    assert all(torch.equal(a, b) for a, b in zip(batches0, batches1))
    for (t0, n0, p0), (t1, n1, p1) in zip(draws0, draws1, strict=True):
        assert torch.equal(t0, t1) and n0 == n1 and p0 == p1


def test_run_with_dropout_is_the_same_with_and_without_workers(demo, tmp_path):
    data, weights = demo
    logs = {}
    for workers in ("0", "1"):
        out = tmp_path / f"w{workers}"
        args = tiny_run_args(data, weights, out, "--num_workers", workers, "--drop_path", "0.1",
                             "--lora_dropout", "0.1", "--cache", "off", "--ci_resamples", "0", seed=3)
        assert mfl.cli(args) == 0
        logs[workers] = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.strip()]
    assert len(logs["0"]) == 2
    for row0, row1 in zip(logs["0"], logs["1"], strict=True):
        for key in ("train_loss", "val_loss", "val_mean_auroc"):
            assert row0[key] == row1[key], (key, row0[key], row1[key])


# ---------------------------------------------------------------------------------------
# A cache never serves pixels of an original that changed
# ---------------------------------------------------------------------------------------

def _texture(seed, shape=(40, 36)):
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


def _dicom_folder(root, n=4):
    """A custom data set of n 12-bit DICOMs, every split listing all; its cache built."""
    (root / "img").mkdir(parents=True)
    for i in range(n):
        write_dicom(root / f"img/{i}.dcm", _texture(i))
    for name in SPLITS:
        (root / name).write_text("".join(f"img/{i}.dcm {i % 2}\n" for i in range(n)))
    build_cache(root, workers=1)
    return root


def _touch_later(path):
    """Give a file a modification time clearly after its old one (file systems differ in resolution)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _pixels(ds, i):
    return np.asarray(ds.load_image(i))


@pytest.mark.parametrize("change", ["photometric", "pixels"])
def test_original_replaced_at_the_same_size_is_not_served_from_the_cache(tmp_path, caplog, change):
    root = _dicom_folder(tmp_path / "mydata")
    file = root / "img/0.dcm"
    old = _pixels(build_dataset("val", root, cache="on"), 0)
    size = file.stat().st_size
    dcm = pydicom.dcmread(file)
    if change == "photometric":  # a corrected header: MONOCHROME2 -> MONOCHROME1, as many bytes
        dcm.PhotometricInterpretation = "MONOCHROME1"
    else:  # other pixel data of the same size
        dcm.PixelData = _texture(99).tobytes()
    dcm.save_as(file)
    _touch_later(file)
    assert file.stat().st_size == size

    with pytest.raises(CacheError, match=r"changed since the cache was built, e\.g\. .*0\.dcm changed "
                                         r"content \(same size, other SHA-256\)") as err:
        build_dataset("val", root, cache="on")
    assert "rebuild it" in str(err.value)
    ds = build_dataset("val", root)  # auto: the originals, with a warning naming the file
    assert ds.cache is None and "ignoring stale cache" in caplog.text and str(file) in caplog.text
    new = _pixels(build_dataset("val", root, cache="off"), 0)
    assert not np.array_equal(new, old) and np.array_equal(_pixels(ds, 0), new)
    # The other splits share the changed image: stale too. A rebuild serves the new pixels.
    assert build_dataset("train", root).cache is None
    build_cache(root, workers=1)
    ds = build_dataset("val", root, cache="on")
    assert np.array_equal(_pixels(ds, 0), new)


def test_folder_moved_through_an_archive_keeps_its_cache(tmp_path):
    """tar keeps whole seconds, zip two: the same files with coarser times are not stale."""
    root = _dicom_folder(tmp_path / "mydata")
    build_dataset("val", root, cache="on")
    for file in (root / "img").iterdir():
        st = file.stat()
        coarse = (st.st_mtime_ns // 2_000_000_000) * 2_000_000_000  # as zip stores it
        os.utime(file, ns=(st.st_atime_ns, coarse))
    assert build_dataset("val", root, cache="on").cache is not None


# ---------------------------------------------------------------------------------------
# An image recorded as bad is not bad forever
# ---------------------------------------------------------------------------------------

def _png_folder(root, n=5):
    """A custom data set of n PNGs, 0.png truncated and 1.png missing; cached with skip_bad."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2, n):
        Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(root / f"img/{i}.png")
    (root / "img/0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for name in SPLITS:
        (root / name).write_text("".join(f"img/{i}.png {i % 2}\n" for i in range(n)))
    build_cache(root, workers=1, skip_bad=True)
    return root


def _good_png(path, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 20), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("fixed", ["0.png", "1.png"])  # the truncated one, the missing one
def test_bad_image_fixed_after_the_cache_was_built_is_read(tmp_path, caplog, fixed):
    root = _png_folder(tmp_path / "mydata")
    ds = build_dataset("val", root, cache="on", skip_bad=True)
    assert sorted(b.path for b in ds.skipped) == ["img/0.png", "img/1.png"]

    _good_png(root / "img" / fixed, seed=7)
    _touch_later(root / "img" / fixed)
    with pytest.raises(CacheError, match=rf"e\.g\. .*{fixed} .*\(recorded as bad\)"):
        build_dataset("val", root, cache="on", skip_bad=True)
    # auto reads the originals, as cache='off' does: the fixed image is in, the other still skipped.
    off = build_dataset("val", root, cache="off", skip_bad=True)
    auto = build_dataset("val", root, skip_bad=True)
    assert auto.cache is None and auto.paths == off.paths and f"img/{fixed}" in auto.paths
    assert len(auto) == 4
    with pytest.raises(ImageError) as err:  # the one still bad, not the fixed one
        build_dataset("val", root, verify_images="full")
    assert f"image 'img/{fixed}'" not in str(err.value) and "1 of 5 images" in str(err.value)


# ---------------------------------------------------------------------------------------
# DICOM header values that are empty or malformed
# ---------------------------------------------------------------------------------------

def test_empty_dicom_window_is_no_window(tmp_path):
    pixels = _texture(3, (16, 12))
    plain = np.asarray(datasets.load_image(write_dicom(tmp_path / "plain.dcm", pixels)))
    for name, value in (("none.dcm", None), ("blank.dcm", ""), ("multi.dcm", "\\")):
        path = write_dicom(tmp_path / name, pixels, WindowCenter=value, WindowWidth=value)
        assert np.array_equal(np.asarray(datasets.load_image(path)), plain), name
    # In a data set: read, neither failing nor skipped.
    root = tmp_path / "mydata"
    (root / "img").mkdir(parents=True)
    write_dicom(root / "img/a.dcm", pixels, WindowCenter=None, WindowWidth=None)
    write_dicom(root / "img/b.dcm", pixels)
    (root / "val_list.txt").write_text("img/a.dcm 1\nimg/b.dcm 0\n")
    ds = build_dataset("val", root, verify_images="full", skip_bad=True)
    assert len(ds) == 2 and not ds.skipped


def test_malformed_dicom_header_value_is_a_decode_error_naming_the_file(tmp_path):
    root = tmp_path / "mydata"
    (root / "img").mkdir(parents=True)
    path = write_dicom(tmp_path / "mydata/img/bad.dcm", _texture(4, (16, 12)), WindowCenter="1000",
                       WindowWidth="400")
    raw = path.read_bytes()
    element = b"\x28\x00\x50\x10DS\x04\x00"  # (0028,1050) WindowCenter, explicit VR, 4 bytes
    assert raw.count(element + b"1000") == 1
    path.write_bytes(raw.replace(element + b"1000", element + b"abcd"))
    with pytest.raises(ImageDecodeError, match=r"malformed DICOM header in .*bad\.dcm: ValueError"):
        datasets.load_image(path)

    write_dicom(root / "img/good.dcm", _texture(5, (16, 12)))
    (root / "val_list.txt").write_text("img/bad.dcm 1\nimg/good.dcm 0\n")
    with pytest.raises(ImageError, match=r"val_list\.txt:1: image 'img/bad\.dcm'.*malformed DICOM header"):
        build_dataset("val", root, verify_images="full")
    ds = build_dataset("val", root, skip_bad=True)
    assert ds.paths == ["img/good.dcm"] and ds.skipped[0].path == "img/bad.dcm"


# ---------------------------------------------------------------------------------------
# Split files of one custom data set agree on their label columns
# ---------------------------------------------------------------------------------------

def test_custom_split_files_with_different_label_counts_are_refused(tmp_path):
    root = tmp_path / "mydata"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(root / f"img/{i}.png")
    (root / "train_list.txt").write_text("".join(f"img/{i}.png {i % 2} 1\n" for i in range(4)))
    (root / "val_list.txt").write_text("".join(f"img/{i}.png {i % 2}\n" for i in range(2)))
    (root / "test_list.txt").write_text("".join(f"img/{i}.png 0 {i % 2}\n" for i in range(2, 4)))
    for split, (name, k), (other, k_other) in (("train", ("train_list.txt", 2), ("val_list.txt", 1)),
                                               ("val", ("val_list.txt", 1), ("train_list.txt", 2))):
        with pytest.raises(SplitFileError) as err:
            build_dataset(split, root)
        assert f"{root / name} has {k} label columns but {root / other} has {k_other}" in str(err.value)
    # Files that agree are fine.
    (root / "val_list.txt").write_text("".join(f"img/{i}.png {i % 2} 0\n" for i in range(2)))
    assert build_dataset("val", root).num_classes == 2
