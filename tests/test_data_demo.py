"""The synthetic demo set: NIH layout, five split files, sensible prevalence, learnable findings."""
import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from datasets import ALL_SPLIT_FILES, build_dataset, infer_dataset_kind, make_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    start = time.perf_counter()
    root = make_demo_dataset(tmp_path_factory.mktemp("d") / "demo_data", num_images=420, image_size=64, seed=0)
    assert time.perf_counter() - start < 10  # generation stays fast
    return root


def test_layout_and_splits(demo):
    assert infer_dataset_kind(demo) == "nih"
    assert all((demo / n).is_file() for n in ALL_SPLIT_FILES)
    sizes = {}
    for split, size in (("train", "1%"), ("train", "10%"), ("train", "100%"), ("val", "100%"), ("test", "100%")):
        ds = build_dataset(split, demo, data_size=size)  # checks that every image exists
        assert ds.kind == "nih" and ds.targets.shape[1] == 14
        sizes[(split, size)] = set(ds.paths)
    train = sizes[("train", "100%")]
    assert sizes[("train", "1%")] <= sizes[("train", "10%")] <= train
    assert len(sizes[("train", "1%")]) >= 20
    assert not train & sizes[("val", "100%")] and not train & sizes[("test", "100%")]
    prevalence = build_dataset("train", demo).targets.mean(0)
    assert (prevalence > 0.05).all() and (prevalence < 0.4).all()


def test_same_seed_same_data(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_images=24, image_size=32, seed=5)
    b = make_demo_dataset(tmp_path / "b", num_images=24, image_size=32, seed=5)
    assert (a / "train_list.txt").read_text() == (b / "train_list.txt").read_text()
    name = (a / "val_list.txt").read_text().split()[0]
    assert (a / "all_classes" / name).read_bytes() == (b / "all_classes" / name).read_bytes()


def spectral_features(ds) -> np.ndarray:
    """Translation-invariant features: log power in orientation x frequency bins, grey-level statistics."""
    feats = []
    for i in range(len(ds)):
        a = np.asarray(ds.load_image(i), dtype=np.float32) / 255
        s = a.shape[0]
        power = np.abs(np.fft.fftshift(np.fft.fft2(a - a.mean())))
        yy, xx = np.mgrid[0:s, 0:s] - s // 2
        radius = np.digitize(np.hypot(xx, yy), [2, 4, 7, 10, 14, 20, s])
        angle = np.digitize(np.mod(np.arctan2(yy, xx), np.pi), np.linspace(0, np.pi, 9)[1:-1])
        f = [np.log1p(power[(radius == r) & (angle == t)].mean()) for r in range(1, 7) for t in range(8)]
        feats.append(f + [a.mean(), a.std(), *np.percentile(a, [1, 5, 25, 50, 75, 95, 99])])
    return np.nan_to_num(np.asarray(feats))


def test_findings_are_learnable(demo):
    train, test = build_dataset("train", demo), build_dataset("test", demo)
    x_train, x_test = spectral_features(train), spectral_features(test)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    aucs = []
    for k in range(14):
        clf = LogisticRegression(max_iter=2000).fit(x_train, train.targets[:, k])
        aucs.append(roc_auc_score(test.targets[:, k], clf.predict_proba(x_test)[:, 1]))
    assert np.mean(aucs) > 0.85 and min(aucs) > 0.65, np.round(aucs, 2)
