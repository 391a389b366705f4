"""Grad-CAM heatmaps: maps on the patch grid, overlays of the original size, predict.py flag."""
import numpy as np
import pytest
import torch
from PIL import Image

import models_vit_lora as mv
import predict
from _fakes import trained_checkpoint
from checkpoints import load_trained
from datasets.transforms import eval_resize
from util.heatmap import (
    eval_crop_box,
    grad_cam,
    heatmap_filename,
    overlay,
    save_heatmaps,
)

CLASSES = ["Atelectasis", "Effusion", "Pleural Effusion"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    stem, _ = trained_checkpoint(tmp_path_factory.mktemp("heatmap"), class_names=CLASSES,
                                 img_size=64)
    return stem


@pytest.mark.parametrize("global_pool", [True, False])
def test_grad_cam_on_patch_grid_and_batch_independent(global_pool):
    torch.manual_seed(0)
    model = mv.vit_tiny_patch16(depth=2, num_classes=3, img_size=64, global_pool=global_pool).eval()
    model.head.weight.data.normal_(0, 0.5)
    x = torch.randn(3, 3, 64, 64)
    cams, probs = grad_cam(model, x, class_index=1)
    assert cams.shape == (3, 4, 4)  # 64 px / 16 = 4 x 4 patches, cls token dropped
    assert np.all((cams >= 0) & (cams <= 1 + 1e-6))
    assert np.allclose(cams.reshape(3, -1).max(axis=1), 1.0)
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.sigmoid(model(x)[:, 1]).numpy(), atol=1e-6)
    # One backward for the batch gives each image its own map.
    single, _ = grad_cam(model, x[1], class_index=1)
    np.testing.assert_allclose(single[0], cams[1], atol=1e-5)
    # Works inside inference_mode, as predict.py runs.
    with torch.inference_mode():
        again, _ = grad_cam(model, x[:1], class_index=1)
    np.testing.assert_allclose(again[0], cams[0], atol=1e-5)
    with pytest.raises(ValueError, match="class_index"):
        grad_cam(model, x, class_index=3)


def test_grad_cam_finds_the_patch_that_drives_the_class():
    """A head that reads one feature; only one patch carries it: the map peaks there."""
    torch.manual_seed(0)
    model = mv.vit_tiny_patch16(depth=1, num_classes=1, img_size=64).eval()
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, 16:32, 32:48] = 3.0  # patch (row 1, col 2)
    with torch.no_grad():
        feats = model.forward_features(x)[:, 1:]  # patch tokens
        diff = feats[0, 1 * 4 + 2] - feats[0].mean(0)
        model.fc_norm.weight.fill_(1.0)
        model.head.weight.copy_(diff.sign().unsqueeze(0))
    cams, _ = grad_cam(model, x, class_index=0)
    assert np.unravel_index(cams[0].argmax(), cams[0].shape) == (1, 2)


def test_crop_box_and_overlay_size():
    assert eval_crop_box(100, 100, 64, 64) == (0.0, 0.0, 100.0, 100.0)
    left, top, right, bottom = eval_crop_box(200, 100, 224, eval_resize(224, "sgd"))
    assert (left, top, right, bottom) == (50.0, 0.0, 150.0, 100.0)
    side = 224 * 100 / eval_resize(224, "adamw")  # 224 -> 256 -> crop 224
    assert eval_crop_box(100, 100, 224, 256)[2] - eval_crop_box(100, 100, 224, 256)[0] == side
    img = Image.fromarray(np.full((90, 120), 128, dtype=np.uint8), "L")
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 0] = 1.0
    out = overlay(img, cam, eval_crop_box(120, 90, 64, 64), label="Mass p=0.9")
    assert out.size == (120, 90) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert np.all(arr[40:, :15] == 128)  # left of the centre crop (below the label): untouched
    assert np.all(arr[-5:, 100:] == 128)  # no evidence there: the X-ray shows through


def test_heatmap_filename():
    assert heatmap_filename("00000001_000.png", "Effusion") == "00000001_000.png__Effusion.png"
    name = heatmap_filename("CheXpert-v1.0-small/valid/p1/s1/view1_frontal.jpg", "Pleural Effusion")
    assert name == "CheXpert-v1.0-small__valid__p1__s1__view1_frontal.jpg__Pleural%20Effusion.png"
    assert heatmap_filename("sub__a.png", "A") == "sub%5F%5Fa.png__A.png"
    for odd in ("/abs/../x.dcm", ".hidden.png", "a\\b.png", "ünïcode.png"):
        out = heatmap_filename(odd, "A")
        assert "/" not in out and "\\" not in out and not out.startswith(".") and out.isascii()


def test_heatmap_filenames_never_collide():
    """Inputs that used to share a file: extensions, '/' against '__', '_' at a part's end."""
    names = ["img.png", "img.jpg", "img", "sub/a.png", "sub__a.png", "sub_/a.png", "sub/_a.png",
             "sub___a.png", "/sub/a.png", "sub//a.png", "./sub/a.png", "sub/./a.png",
             "sub%2Fa.png", "sub a.png", "sub_a.png", "a__b", "a", ".a", "%2Ea", "_a", "a_"]
    classes = ["Effusion", "Pleural Effusion", "Pleural_Effusion", "b__Effusion", "_x", "x_"]
    files = [heatmap_filename(n, c) for n in names for c in classes]
    assert len(set(files)) == len(files)


def test_save_heatmaps_writes_one_file_per_input_or_refuses(tmp_path):
    torch.manual_seed(0)
    model = mv.vit_tiny_patch16(depth=1, num_classes=2, img_size=32).eval()
    rng = np.random.default_rng(0)
    names = ["img.png", "img.jpg", "sub/a.png", "sub__a.png"]
    files = []
    for name in names:
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(
            path, format="PNG")
        files.append(path)

    def transform(img):
        x = torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32) / 255)
        return x.expand(3, 32, 32)

    def run(files, names, out):
        return save_heatmaps(model, files, names, 1, "Effusion", out, transform,
                             lambda f: Image.open(f).convert("L"), 32, 32, batch_size=3)

    written, failures = run(files, names, tmp_path / "maps")
    assert not failures and len(written) == 4 and len(set(written)) == 4
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(p.name for p in written)
    # The same image named twice is drawn once.
    written, _ = run([files[0], files[0]], ["img.png", "img.png"], tmp_path / "twice")
    assert len(written) == 1
    # Two different images with one name (split files of two folders) would share a file.
    with pytest.raises(ValueError, match=r"two images with one name.*img\.png__Effusion\.png"):
        run([files[0], files[1]], ["img.png", "img.png"], tmp_path / "clash")
    assert not (tmp_path / "clash").exists()  # refused before anything was written


def test_predict_heatmap_flag(trained, tmp_path):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a.png", tmp_path / "deep" / "b.png"
    b.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 96), dtype=np.uint8), "L").save(a)
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), "L").save(b)
    out_dir = tmp_path / "maps"
    rc = predict.main(["--checkpoint", str(trained), "--inputs", str(tmp_path),
                       "--output", str(tmp_path / "p.csv"), "--num_workers", "0",
                       "--heatmap_class", "Effusion", "Pleural Effusion", "--heatmap_dir", str(out_dir)])
    assert rc == 0
    pngs = sorted(p.name for p in out_dir.iterdir())
    assert len(pngs) == 4
    for image, size in ((a, (96, 64)), (b, (50, 50))):
        for cls in ("Effusion", "Pleural Effusion"):
            with Image.open(out_dir / heatmap_filename(str(image), cls)) as img:
                assert img.format == "PNG" and img.size == size


def test_heatmap_matches_loaded_model_probability(trained, tmp_path):
    model, config = load_trained(trained)
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    probs, _ = predict.predict_images(model, config, [path], amp="none")
    x = predict.eval_transform(config)(Image.open(path).convert("L"))
    _, p = grad_cam(model, x, class_index=2)
    np.testing.assert_allclose(p, probs[:, 2], atol=1e-5)


def test_heatmap_filename_of_a_long_path_fits_and_stays_distinct():
    """Absolute or non-ASCII paths escape to long names: kept under 255 bytes, ending with the
    image and class, and two long names differing early still give two files."""
    from util.heatmap import heatmap_filename

    deep = "/".join(["séries_%d" % i for i in range(30)])
    a = heatmap_filename(f"/data/a/{deep}/img.png", "Effusion")
    b = heatmap_filename(f"/data/b/{deep}/img.png", "Effusion")
    assert len(a.encode()) <= 255 and len(b.encode()) <= 255 and a != b
    assert a.endswith("img.png__Effusion.png")
    assert heatmap_filename("img.png", "Effusion") == "img.png__Effusion.png"  # short: as before
