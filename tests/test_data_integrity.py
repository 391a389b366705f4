"""Data that must not change behind a run's back: the training process's RNGs are the model's
alone, a cache never serves pixels of an original that changed (a fixed bad image included),
empty or malformed DICOM header values, split files that disagree on their label columns."""
import json
import logging
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


def test_folder_moved_through_an_archive_keeps_its_cache(tmp_path, caplog):
    """tar keeps whole seconds, zip two, a copy gets new inodes: the same contents are not stale
    (their hashes decide), with a warning that a rebuild makes the check cheap again."""
    import shutil

    root = _dicom_folder(tmp_path / "mydata")
    build_dataset("val", root, cache="on")
    for file in (root / "img").iterdir():
        st = file.stat()
        coarse = (st.st_mtime_ns // 2_000_000_000) * 2_000_000_000  # as zip stores it
        os.utime(file, ns=(st.st_atime_ns, coarse))
    assert build_dataset("val", root, cache="on").cache is not None
    assert "4 original images have other file times or inodes" in caplog.text
    copy = shutil.copytree(root, tmp_path / "copy" / "mydata")  # new inodes, times kept
    caplog.clear()
    ds = build_dataset("val", copy, cache="on")
    assert ds.cache is not None and "contents are unchanged" in caplog.text
    build_cache(copy, workers=1)
    caplog.clear()
    assert build_dataset("val", copy, cache="on").cache is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _swap(a, b):
    """Swap two files by renaming (``mv a t; mv b a; mv t b``)."""
    tmp = a.with_name("swap.tmp")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


@pytest.mark.parametrize("how", ["mv", "cp -p"])
def test_same_size_originals_swapped_or_copied_over_within_seconds_are_stale(tmp_path, caplog, how):
    """Same-size images written within 2 s of each other: swapped with mv (each keeps its inode
    and times) or one copied over the other with cp -p (same inode, the other's times). The
    cache is refused ('on') or passed over for the files ('auto'); a rebuild serves the new pixels."""
    import shutil

    root = _dicom_folder(tmp_path / "mydata")
    first, second = root / "img/0.dcm", root / "img/1.dcm"
    # Same size by construction (DICOM UIDs vary in length): 1.dcm is 0.dcm with other pixels
    # at the end of its pixel data.
    data = bytearray(first.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    second.write_bytes(bytes(data))
    build_cache(root, workers=1)
    assert first.stat().st_size == second.stat().st_size
    assert abs(first.stat().st_mtime_ns - second.stat().st_mtime_ns) < 2_000_000_000
    cached = build_dataset("val", root, cache="on")
    before = [_pixels(cached, i) for i in range(2)]
    if how == "mv":
        _swap(first, second)
    else:
        shutil.copy2(second, first)  # cp -p 1.dcm 0.dcm
    with pytest.raises(CacheError) as err:
        build_dataset("val", root, cache="on")
    assert f"e.g. {first} changed content (same size, other SHA-256)" in str(err.value)
    assert "rebuild it with `python -m datasets.cache`" in str(err.value)
    auto = build_dataset("val", root)
    assert auto.cache is None and "ignoring stale cache" in caplog.text
    assert np.array_equal(_pixels(auto, 0), before[1])  # the new content of 0.dcm, from its file
    build_cache(root, workers=1)
    assert np.array_equal(_pixels(build_dataset("val", root, cache="on"), 0), before[1])


def _cache_meta(root):
    return json.loads((root / "_cache" / "meta.json").read_text())


def test_damaged_pixel_file_fails_naming_the_file_and_image(tmp_path):
    """A byte of the pixel file changed (same size): the block's CRC-32 no longer matches, and
    reading that image fails in one line naming the cache file and the image."""
    root = _dicom_folder(tmp_path / "mydata", n=50)  # 50 x 1440 bytes: two 64 KiB blocks
    data_file = root / "_cache" / _cache_meta(root)["data_file"]
    ds = build_dataset("val", root, cache="on")
    victim = ds.paths.index("img/47.dcm")  # at byte 47 x 1440, in the second block
    offset = int(ds.cache.offsets[ds.cache.row["img/47.dcm"]]) + 17
    raw = bytearray(data_file.read_bytes())
    raw[offset] ^= 0xFF
    data_file.write_bytes(raw)
    fresh = build_dataset("val", root, cache="on")  # same size: opening does not read the pixels
    assert np.asarray(fresh.load_image(ds.paths.index("img/0.dcm"))).shape == (40, 36)  # another block
    with pytest.raises(CacheError) as err:
        fresh.load_image(victim)
    assert str(err.value) == (f"{data_file}: pixels of image 'img/47.dcm' fail their checksum (block 1): the "
                              f"cache file is damaged; rebuild it with `python -m datasets.cache`")
    # Through DataLoader workers and a training crop: the same one line.
    train = build_dataset("val", root, cache="on", transform=datasets.build_transform(True, "sgd", input_size=16))
    loader = torch.utils.data.DataLoader(train, batch_size=50, num_workers=1)
    with pytest.raises(CacheError) as err:
        next(iter(loader))
    assert str(err.value).startswith(f"{data_file}: pixels of image 'img/") and "\n" not in str(err.value)


def test_damaged_evaluation_cache_fails_naming_its_file(tmp_path):
    root = _dicom_folder(tmp_path / "mydata")
    ds = build_dataset("val", root, cache="on", transform=datasets.build_transform(False, "sgd", input_size=16))
    stored = root / "_cache" / f"{ds.eval_cache.name}.u8"
    raw = bytearray(stored.read_bytes())
    raw[5] ^= 0x01
    stored.write_bytes(raw)
    with pytest.raises(CacheError, match=rf"^{stored}: row 0 fails its checksum"):
        ds[0]


def test_cache_of_another_format_is_refused_naming_both_formats(tmp_path, caplog):
    from datasets.imagecache import CACHE_FORMAT

    root = _dicom_folder(tmp_path / "mydata")
    meta_file = root / "_cache" / "meta.json"
    meta = _cache_meta(root)
    meta["format"] = CACHE_FORMAT - 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CacheError) as err:
        build_dataset("val", root, cache="on")
    assert str(err.value) == (f"{meta_file}: cache format {CACHE_FORMAT - 1}, this version reads format "
                              f"{CACHE_FORMAT}; rebuild it with `python -m datasets.cache`")
    auto = build_dataset("val", root)  # auto: the files, saying why
    assert auto.cache is None and f"cache format {CACHE_FORMAT - 1}, this version reads" in caplog.text
    del meta["format"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="cache format None, this version reads format"):
        build_dataset("val", root, cache="on")
    # The index carries the format too.
    build_cache(root, workers=1)
    index_file = root / "_cache" / _cache_meta(root)["index_file"]
    with np.load(index_file) as index:
        arrays = dict(index)
    arrays["format"] = np.int64(CACHE_FORMAT + 1)
    with open(index_file, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CacheError, match=rf"^{index_file}: cache index format {CACHE_FORMAT + 1}, this "
                                         rf"version reads format {CACHE_FORMAT}; rebuild it"):
        build_dataset("val", root, cache="on")


@pytest.mark.parametrize("garbage", [b"garbage, not a zip", b"PK\x03\x04 cut short", None])
def test_garbage_cache_index_is_one_line_naming_it(tmp_path, garbage):
    """Not numpy's advice to pass allow_pickle=True (which would run a pickle): the file and a rebuild."""
    root = _dicom_folder(tmp_path / "mydata")
    index_file = root / "_cache" / _cache_meta(root)["index_file"]
    if garbage is None:  # a real .npz that holds a pickled object array
        with open(index_file, "wb") as f:
            np.savez(f, paths=np.array([{"x": 1}], dtype=object))
    else:
        index_file.write_bytes(garbage)
    with pytest.raises(CacheError) as err:
        build_dataset("val", root, cache="on")
    assert str(err.value) == (f"{index_file}: not a readable cache index (damaged, or not written by "
                              f"`python -m datasets.cache`); rebuild it with `python -m datasets.cache`")
    (root / "_cache" / "meta.json").write_text("{not json")
    with pytest.raises(CacheError, match=rf"^{root / '_cache' / 'meta.json'}: not a readable cache record"):
        build_dataset("val", root, cache="on")


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
