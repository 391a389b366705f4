"""The preprocessed cache: read transparently, same pixels as the originals, stale caches detected."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import CacheError, build_cache, build_dataset, build_transform, make_demo_dataset
from datasets.imagecache import resize_shorter_side


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("d") / "demo", num_images=60, image_size=48)


def test_cache_is_read_transparently(demo, tmp_path):
    cache_dir = tmp_path / "cache"
    build_cache(demo, size=32, cache_dir=cache_dir, workers=1)
    plain = build_dataset("val", demo, cache="off")
    cached = build_dataset("val", demo, cache_dir=cache_dir)
    assert plain.cache is None and cached.cache is not None
    assert cached.paths == plain.paths and np.array_equal(cached.targets, plain.targets)
    for i in range(len(plain)):
        original = plain.load_image(i)
        expected = np.asarray(resize_shorter_side(original, 32))
        assert np.array_equal(np.asarray(cached.load_image(i)), expected)
    x, y = cached[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, plain[0][1])


def test_cache_in_default_place_with_workers_and_dataloader(demo):
    out = build_cache(demo, size=40, workers=2)
    assert out == demo / "_cache"
    ds = build_dataset("train", demo, data_size="1%", cache="on",
                       transform=build_transform(True, "sgd", input_size=32))
    assert ds.cache is not None
    ds = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive a pickled copy
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 14)


def test_stale_cache_is_detected(demo, tmp_path, caplog):
    data = tmp_path / "NIH_copy"
    (data / "all_classes").mkdir(parents=True)
    for f in (demo / "all_classes").iterdir():
        (data / "all_classes" / f.name).write_bytes(f.read_bytes())
    for name in ("train_1.txt", "train_10.txt", "train_list.txt", "val_list.txt", "test_list.txt"):
        (data / name).write_text((demo / name).read_text())
    build_cache(data, size=32, workers=1)
    assert build_dataset("test", data, cache="on").cache is not None

    # A different resize size than asked for.
    with pytest.raises(CacheError, match="size 32, asked for 64"):
        build_dataset("test", data, cache="on", cache_size=64)

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
    with pytest.raises(CacheError, match="changed size since the cache was built"):
        build_dataset("val", data, cache="on")
    assert build_dataset("val", data, cache="on", check_files=False).cache is not None

    # A truncated data file.
    with open(data / "_cache" / "images.u8", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CacheError, match="images.u8 holds 100 bytes"):
        build_dataset("val", data, cache="on")


def test_no_cache(demo, tmp_path):
    with pytest.raises(CacheError, match="no complete cache"):
        build_dataset("val", demo, cache="on", cache_dir=tmp_path / "none")
    with pytest.raises(ValueError, match="cache='sometimes'"):
        build_dataset("val", demo, cache="sometimes")


def test_resize_shorter_side_never_upscales():
    img = Image.new("L", (300, 200))
    assert resize_shorter_side(img, 100).size == (150, 100)
    assert resize_shorter_side(img, 256).size == (300, 200)
