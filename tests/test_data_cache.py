"""The image caches: the exact one gives the originals' tensors, a lossy one is never read unasked,
a stale one is detected, a failed rebuild keeps the previous cache."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.chestxray as chestxray
import datasets.imagecache as imagecache
from datasets import CacheError, ImageError, build_cache, build_dataset, build_transform, make_demo_dataset
from datasets.imagecache import resize_shorter_side
from datasets.synthetic import write_dicom
from datasets.loader import build_loader
from util.cli import UsageError
from util.misc import DistInfo

SIZE = 32  # model input: small, so the tests stay fast


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("d") / "demo", num_images=60, image_size=48)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A custom data set with one image of each kind: 8-bit PNG, 16-bit PNG, JPEG, JPEG DICOM and
    12-bit DICOMs (MONOCHROME2 and MONOCHROME1), of different sizes; every split lists all six."""
    root = tmp_path_factory.mktemp("m") / "mixed"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def texture(h, w, hi):
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.sin(x / 5.0) + np.cos(y / 7.0)
        return (hi * (0.05 + 0.9 * (smooth - smooth.min()) / np.ptp(smooth))
                + rng.normal(0, hi / 40, (h, w))).clip(0, hi)

    Image.fromarray(texture(60, 52, 255).astype(np.uint8)).save(root / "img/a8.png")
    Image.fromarray(texture(50, 64, 4000).astype(np.uint16)).save(root / "img/b16.png")
    Image.fromarray(texture(56, 56, 255).astype(np.uint8)).save(root / "img/c.jpg", quality=90)
    write_dicom(root / "img/d_jpeg.dcm", texture(64, 48, 255).astype(np.uint8), jpeg=True)
    write_dicom(root / "img/e_m2.dcm", (texture(48, 60, 3000) + 200).astype(np.uint16), "MONOCHROME2")
    write_dicom(root / "img/f_m1.dcm", (texture(52, 52, 3000) + 200).astype(np.uint16), "MONOCHROME1")
    lines = "".join(f"img/{n} {i % 2} {(i // 2) % 2}\n" for i, n in
                    enumerate(["a8.png", "b16.png", "c.jpg", "d_jpeg.dcm", "e_m2.dcm", "f_m1.dcm"]))
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        (root / name).write_text(lines)
    build_cache(root, workers=1)
    return root


def _batches(dataset, epoch, workers, batch_size=3):
    """All batches of one epoch of the seeded training loader (a fresh loader, as after a resume)."""
    loader = build_loader(dataset, DistInfo(), train=True, batch_size=batch_size, seed=7,
                          num_workers=workers, pin_memory=False)
    loader.sampler.set_epoch(epoch)
    return [x for x, _ in loader]


def _no_decoding(monkeypatch):
    """Make decoding an original image fail: the cached path must not need it."""
    def refuse(*args, **kwargs):
        raise AssertionError("an original image was decoded")
    monkeypatch.setattr(chestxray, "load_image", refuse)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("recipe", ["sgd", "adamw"])
def test_exact_cache_gives_the_originals_tensors(mixed, recipe, workers, monkeypatch):
    """Same seed and epoch: bit-identical training and evaluation tensors from the cache and from
    the files, for every image kind, both recipes, 0 and 2 workers, and after a 'resume' (a new
    loader set to epoch 1)."""
    train_tf = build_transform(True, recipe, input_size=SIZE, reprob=1.0)
    eval_tf = build_transform(False, recipe, input_size=SIZE)
    original = {s: build_dataset("val", mixed, transform=t, cache="off") for s, t in (("t", train_tf), ("e", eval_tf))}
    expected = {s: _batches(ds, epoch, workers) for s, ds in original.items() for epoch in (1,)}
    first_epoch = _batches(original["t"], 0, 0)
    cached = {s: build_dataset("val", mixed, transform=t) for s, t in (("t", train_tf), ("e", eval_tf))}
    assert cached["t"].cache_info["kind"] == "exact" and cached["t"].eval_cache is None
    assert cached["e"].eval_cache is not None  # the evaluation prefix is stored
    _no_decoding(monkeypatch)
    for s in ("t", "e"):
        got = _batches(cached[s], 1, workers)
        assert len(got) == len(expected[s]) == 2
        for a, b in zip(expected[s], got):
            assert a.shape == (3, 3, SIZE, SIZE) and torch.equal(a, b)
    # Another epoch draws other crops, and the cache follows it too.
    assert not torch.equal(first_epoch[0], expected["t"][0])
    assert all(torch.equal(a, b) for a, b in zip(first_epoch, _batches(cached["t"], 0, 0)))
    # The evaluation loader (ordered, no reseeding) gives the same batches too.
    ordered = build_loader(cached["e"], DistInfo(), train=False, batch_size=6, seed=0, num_workers=workers,
                           pin_memory=False)
    monkeypatch.undo()
    plain = build_loader(original["e"], DistInfo(), train=False, batch_size=6, seed=0, num_workers=0,
                         pin_memory=False)
    assert torch.equal(next(iter(ordered))[0], next(iter(plain))[0])


def test_exact_cache_holds_the_decoded_pixels(mixed):
    plain = build_dataset("test", mixed, cache="off")
    cached = build_dataset("test", mixed)
    assert cached.cache is not None and cached.cache.exact and cached.cache.size is None
    for i in range(len(plain)):
        assert np.array_equal(np.asarray(cached.load_image(i)), np.asarray(plain.load_image(i)))
    x, _ = cached[0]
    assert x.shape == (3, 60, 52) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    meta = json.loads((mixed / "_cache" / "meta.json").read_text())
    assert meta["exact"] and meta["dicom_images"] == 3 and meta["dicom_scaling"] == "minmax"


def test_evaluation_cache_is_made_once_and_tied_to_its_transform(mixed, monkeypatch):
    eval_tf = build_transform(False, "sgd", input_size=24)
    first = build_dataset("test", mixed, transform=eval_tf)
    name = first.eval_cache.name
    assert (mixed / "_cache" / f"{name}.json").is_file()
    monkeypatch.setattr(imagecache.ImageCache, "get", lambda *a: pytest.fail("evaluation cache made again"))
    again = build_dataset("test", mixed, transform=eval_tf)
    assert again.eval_cache.name == name and again.cache_info["eval_cache"] == name
    # Another input size is another key; a transform changed afterwards is not served from it.
    monkeypatch.undo()
    other = build_dataset("test", mixed, transform=build_transform(False, "sgd", input_size=20))
    assert other.eval_cache.name != name
    other.transform = eval_tf
    assert torch.equal(other[2][0], first[2][0])
    assert build_dataset("test", mixed, transform=eval_tf, eval_cache=False).eval_cache is None


def test_lossy_cache_only_on_request(demo, tmp_path, caplog):
    out = build_cache(demo, size=32, workers=1)
    assert out == demo / "_cache_32px" and not json.loads((out / "meta.json").read_text())["exact"]
    # 'auto' does not look for it; even in the exact cache's place it is not read unasked.
    assert build_dataset("val", demo).cache is None
    in_place = build_cache(demo, size=32, workers=1, cache_dir=tmp_path / "c")
    caplog.clear()
    assert build_dataset("val", demo, cache_dir=in_place).cache is None
    assert "LOSSY" in caplog.text and "--cache lossy" in caplog.text
    with pytest.raises(CacheError, match="LOSSY"):
        build_dataset("val", demo, cache="on", cache_dir=in_place)
    with pytest.raises(UsageError, match="--cache_size 32 chooses a downsized cache: pass it with --cache lossy"):
        build_dataset("val", demo, cache_size=32)
    # Asked for: read, with a warning, and recorded in cache_info.
    caplog.clear()
    ds = build_dataset("val", demo, cache="lossy", transform=build_transform(True, "sgd", input_size=SIZE))
    assert "reading the LOSSY cache" in caplog.text
    assert ds.cache_info["kind"] == "lossy" and ds.cache_info["size"] == 32
    plain = build_dataset("val", demo, cache="off")
    expected = np.asarray(resize_shorter_side(plain.load_image(0), 32))
    assert np.array_equal(np.asarray(ds.load_image(0)), expected)
    assert build_dataset("val", demo, cache="lossy", cache_size=32).cache is not None
    with pytest.raises(CacheError, match="size 32, asked for 40|_cache_40px"):
        build_dataset("val", demo, cache="lossy", cache_size=40)
    assert build_dataset("val", demo, cache="off").cache_info["kind"] == "none"


def test_cache_in_default_place_with_workers_and_dataloader(demo):
    out = build_cache(demo, workers=2)
    assert out == demo / "_cache"
    ds = build_dataset("train", demo, data_size="1%", cache="on",
                       transform=build_transform(True, "sgd", input_size=SIZE))
    assert ds.cache is not None
    ds = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive a pickled copy
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, SIZE, SIZE) and y.shape == (8, 14)


def _copy(demo, dest):
    (dest / "all_classes").mkdir(parents=True)
    for f in (demo / "all_classes").iterdir():
        (dest / "all_classes" / f.name).write_bytes(f.read_bytes())
    for name in ("train_1.txt", "train_10.txt", "train_list.txt", "val_list.txt", "test_list.txt"):
        (dest / name).write_text((demo / name).read_text())
    return dest


def test_stale_cache_is_detected(demo, tmp_path, caplog):
    data = _copy(demo, tmp_path / "NIH_copy")
    build_cache(data, workers=1)
    assert build_dataset("test", data, cache="on").cache is not None

    # A changed split file: 'auto' warns and reads the originals, 'on' refuses.
    lines = (data / "test_list.txt").read_text().splitlines()
    (data / "test_list.txt").write_text("\n".join(lines[:-1]) + "\n")
    ds = build_dataset("test", data)
    assert ds.cache is None and len(ds) == len(lines) - 1
    assert "stale cache" in caplog.text and "test_list.txt changed" in caplog.text
    with pytest.raises(CacheError, match="test_list.txt changed"):
        build_dataset("test", data, cache=True)
    # The other splits are unaffected; 'off' ignores the cache.
    assert build_dataset("val", data).cache is not None
    assert build_dataset("val", data, cache="off").cache is None

    # An original image rewritten with other content.
    name = build_dataset("val", data, cache="on").paths[0]
    Image.new("L", (48, 48), 7).save(data / "all_classes" / name)
    with pytest.raises(CacheError, match=r"changed since the cache was built, e\.g\. .*changed size"):
        build_dataset("val", data, cache="on")
    assert build_dataset("val", data, cache="on", check_files=False).cache is not None

    # A truncated data file.
    meta = json.loads((data / "_cache" / "meta.json").read_text())
    with open(data / "_cache" / meta["data_file"], "r+b") as f:
        f.truncate(100)
    with pytest.raises(CacheError, match=r"images-\w+\.u8 holds 100 bytes"):
        build_dataset("val", data, cache="on")



def test_dicom_scaling_is_part_of_the_cache(tmp_path):
    root = tmp_path / "RSNA_Pneumonia"
    (root / "stage_2_train_images").mkdir(parents=True)
    pixels = np.tile(np.array([20, 60, 120, 230], np.uint16), (8, 2))
    write_dicom(root / "stage_2_train_images/a.dcm", pixels, bits_stored=8)
    (root / "val_list.txt").write_text("stage_2_train_images/a.dcm 1 \n")
    meta = json.loads((build_cache(root, workers=1) / "meta.json").read_text())
    assert meta["dicom_scaling"] == "paper" and meta["dicom_images"] == 1  # RSNA's default
    ds = build_dataset("val", root, cache="on")
    assert np.array_equal(np.asarray(ds.load_image(0))[0, :4], [22, 67, 133, 255])
    with pytest.raises(CacheError, match="--dicom_scaling paper, asked for minmax"):
        build_dataset("val", root, cache="on", dicom_scaling="minmax")
    assert build_dataset("val", root, dicom_scaling="minmax").cache is None  # auto: originals


def _cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_failed_rebuild_keeps_the_previous_cache(demo, tmp_path, monkeypatch):
    data = _copy(demo, tmp_path / "NIH_copy")
    out = build_cache(data, workers=1, split_files=["val_list.txt"])
    before = _cache_files(out)
    reference = build_dataset("val", data, cache="on").load_image(3)

    # A decoding failure half-way (as a bad image without --skip_bad).
    real = imagecache._load_for_cache
    calls = []

    def fail_fifth(job):
        calls.append(job)
        if len(calls) == 5:
            return job[0], None, 0, 0, (-1, -1, -1, -1), bytes(32), False, "OSError: injected failure"
        return real(job)
    monkeypatch.setattr(imagecache, "_load_for_cache", fail_fifth)
    with pytest.raises(ImageError, match="injected failure"):
        build_cache(data, workers=1, split_files=["val_list.txt"])
    assert _cache_files(out) == before
    monkeypatch.undo()

    # A failure after the data file was written (disk full while writing the index).
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(imagecache.np, "savez", disk_full)
    with pytest.raises(OSError, match=r"no space left on device while writing .*index-\w+\.npz\.tmp"):
        build_cache(data, workers=1, split_files=["val_list.txt"])
    monkeypatch.undo()
    assert _cache_files(out) == before  # no partial file, the old cache untouched
    ds = build_dataset("val", data, cache="on")
    assert np.array_equal(np.asarray(ds.load_image(3)), np.asarray(reference))

    # A killed build leaves *.tmp files: the next build removes them; a good rebuild replaces all.
    (out / "images-0123456789ab.u8.tmp").write_bytes(b"partial")
    build_cache(data, workers=1, split_files=["val_list.txt"])
    after = _cache_files(out)
    assert len(after) == 3 and "images-0123456789ab.u8.tmp" not in after and after != before


def test_no_cache(demo, tmp_path):
    with pytest.raises(CacheError, match="no complete cache"):
        build_dataset("val", demo, cache="on", cache_dir=tmp_path / "none")
    with pytest.raises(UsageError, match="--cache sometimes: expected one of auto, on, lossy, off"):
        build_dataset("val", demo, cache="sometimes")


def test_resize_shorter_side_never_upscales():
    img = Image.new("L", (300, 200))
    assert resize_shorter_side(img, 100).size == (150, 100)
    assert resize_shorter_side(img, 256).size == (300, 200)


def test_cache_options_are_checked_once_naming_the_flags():
    """`check_cache_options` is the one check of --cache / --cache_size (the entry script and
    build_dataset both use it): a usage error (exit 2) that names the flags."""
    from datasets import check_cache_options

    for cache, size in (("auto", None), ("on", None), ("off", None), ("lossy", None), ("lossy", 256)):
        check_cache_options(cache, size)
    cases = [("auto", 256, "--cache_size 256 chooses a downsized cache: pass it with --cache lossy "
                           "(--cache auto reads no lossy cache)"),
             ("on", 128, "--cache_size 128 chooses a downsized cache: pass it with --cache lossy"),
             ("lossy", 0, "--cache_size 0: expected a positive number of pixels"),
             ("lossy", -5, "--cache_size -5: expected a positive number of pixels"),
             ("sometimes", None, "--cache sometimes: expected one of auto, on, lossy, off")]
    for cache, size, message in cases:
        with pytest.raises(UsageError) as err:
            check_cache_options(cache, size)
        assert str(err.value).startswith(message) and err.value.exit_code == 2
        assert "=" not in str(err.value)  # flags, not Python keywords
