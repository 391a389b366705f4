"""Bad input fails when the data set is built, with a message naming split file, line and path."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import ImageError, SplitFileError, build_dataset
from datasets.imagecache import build_cache


def nih_folder(tmp_path: Path, n: int = 4) -> Path:
    """A tiny NIH-layout folder whose val_list.txt lists n good images."""
    root = tmp_path / "NIH_ChestX-ray"
    (root / "all_classes").mkdir(parents=True)
    lines = []
    for i in range(n):
        name = f"{i:08d}_000.png"
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(root / "all_classes" / name)
        lines.append(name + " " + " ".join("1" if k == i else "0" for k in range(14)))
    (root / "val_list.txt").write_text("\n".join(lines) + "\n")
    return root


def add_line(root: Path, line: str) -> int:
    """Append a line to val_list.txt; returns its line number."""
    f = root / "val_list.txt"
    text = f.read_text() + line + "\n"
    f.write_text(text)
    return len(text.splitlines())


def names(message: str, split_file: Path, line: int, path: str) -> bool:
    return f"{split_file}:{line}" in message and path in message


def test_missing_image(tmp_path):
    root = nih_folder(tmp_path)
    line = add_line(root, "00000099_000.png " + " ".join(["0"] * 14))
    with pytest.raises(ImageError) as err:
        build_dataset("val", root)
    assert names(str(err.value), root / "val_list.txt", line, "00000099_000.png")
    assert "not found" in str(err.value) and "skip_bad" in str(err.value)


def test_missing_image_skipped_and_reported(tmp_path, caplog):
    root = nih_folder(tmp_path)
    line = add_line(root, "00000099_000.png " + " ".join(["0"] * 14))
    ds = build_dataset("val", root, skip_bad=True)
    assert len(ds) == 4 and "00000099_000.png" not in ds.paths
    assert [(b.line, b.path) for b in ds.skipped] == [(line, "00000099_000.png")]
    assert "skipping 1 of 5 images" in caplog.text and "00000099_000.png" in caplog.text


def test_unreadable_and_truncated_images(tmp_path):
    root = nih_folder(tmp_path)
    (root / "all_classes" / "junk.png").write_bytes(b"not a png at all")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(
        root / "all_classes" / "full.png")
    data = (root / "all_classes" / "full.png").read_bytes()
    (root / "all_classes" / "cut.png").write_bytes(data[: len(data) // 2])
    junk_line = add_line(root, "junk.png " + " ".join(["0"] * 14))
    cut_line = add_line(root, "cut.png " + " ".join(["0"] * 14))
    split_file = root / "val_list.txt"

    # Opt-in verification decodes every image at build time and lists all bad ones.
    with pytest.raises(ImageError) as err:
        build_dataset("val", root, verify_images=True)
    assert names(str(err.value), split_file, junk_line, "junk.png")
    assert names(str(err.value), split_file, cut_line, "cut.png")

    # Without it, the existence check passes and the first load fails, naming the line.
    ds = build_dataset("val", root)
    with pytest.raises(ImageError) as err:
        ds[ds.paths.index("cut.png")]
    assert names(str(err.value), split_file, cut_line, "cut.png")

    ds = build_dataset("val", root, skip_bad=True)
    assert len(ds) == 4 and sorted(b.path for b in ds.skipped) == ["cut.png", "junk.png"]
    for i in range(len(ds)):
        ds[i]


def test_bad_images_found_by_the_cache(tmp_path):
    root = nih_folder(tmp_path)
    (root / "all_classes" / "junk.png").write_bytes(b"junk")
    line = add_line(root, "junk.png " + " ".join(["0"] * 14))
    with pytest.raises(ImageError) as err:
        build_cache(root, workers=1)
    assert names(str(err.value), root / "val_list.txt", line, "junk.png")
    build_cache(root, workers=1, skip_bad=True)
    with pytest.raises(ImageError, match=re.escape(f"val_list.txt:{line}: image 'junk.png'")):
        build_dataset("val", root, cache="on")
    ds = build_dataset("val", root, cache="on", skip_bad=True)
    assert len(ds) == 4 and ds.skipped[0].path == "junk.png"


@pytest.mark.parametrize("labels,pattern", [
    (" ".join(["0"] * 13), r"has 13 labels, expected 14 for data set kind 'nih'"),
    (" ".join(["0"] * 15), r"has 15 labels, expected 14 for data set kind 'nih'"),
    (" ".join(["0"] * 13 + ["2"]), r"label 14 is '2', expected 0 or 1"),
    (" ".join(["-1"] + ["0"] * 13), r"label 1 is '-1', expected 0 or 1"),
    (" ".join(["0.5"] + ["0"] * 13), r"label 1 is '0.5', expected 0 or 1"),
])
def test_bad_labels(tmp_path, labels, pattern):
    root = nih_folder(tmp_path)
    line = add_line(root, "00000000_000.png " + labels)
    with pytest.raises(SplitFileError, match=pattern) as err:
        build_dataset("val", root)
    assert names(str(err.value), root / "val_list.txt", line, "00000000_000.png")


def test_wrong_label_count_for_rsna_and_chexpert(tmp_path):
    for folder, kind, k in (("RSNA_Pneumonia", "rsna", 1), ("CheXpert", "chexpert", 5)):
        root = tmp_path / folder
        root.mkdir()
        (root / "test_list.txt").write_text("x/a.png " + " ".join(["0"] * (k + 1)) + "\n")
        with pytest.raises(SplitFileError, match=rf"test_list.txt:1: image 'x/a.png' has {k + 1} labels, "
                                                 rf"expected {k} for data set kind '{kind}'"):
            build_dataset("test", root)


def test_empty_split_file(tmp_path):
    root = nih_folder(tmp_path)
    (root / "val_list.txt").write_text("\n\n")
    with pytest.raises(SplitFileError, match=re.escape(f"{root / 'val_list.txt'}: split file is empty")):
        build_dataset("val", root)


def test_missing_split_file_lists_expected_names(tmp_path):
    root = nih_folder(tmp_path)
    with pytest.raises(SplitFileError) as err:
        build_dataset("train", root, data_size="1%")
    message = str(err.value)
    assert "'train_1.txt'" in message and str(root) in message
    for name in ("train_1.txt", "train_10.txt", "train_list.txt", "val_list.txt", "test_list.txt"):
        assert name in message
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    with pytest.raises(SplitFileError) as err:
        build_dataset("test", empty)
    assert "none of the folders searched" in str(err.value) and str(empty) in str(err.value)
    assert "DatasetsSplits" in str(err.value)


def _bomb_folder(tmp_path: Path, monkeypatch) -> tuple[Path, int]:
    """val_list.txt with one image over a lowered decompression-bomb limit; returns root and its line."""
    root = nih_folder(tmp_path)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "all_classes" / "huge.png")
    line = add_line(root, "huge.png " + " ".join(["0"] * 14))
    # Pillow refuses images over twice MAX_IMAGE_PIXELS: 64 x 64 is over 2 x 1000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    return root, line


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    root, line = _bomb_folder(tmp_path, monkeypatch)
    split_file = root / "val_list.txt"
    ds = build_dataset("val", root)
    with pytest.raises(ImageError) as err:
        ds[ds.paths.index("huge.png")]
    assert names(str(err.value), split_file, line, "huge.png") and "decompression-bomb limit" in str(err.value)
    ds = build_dataset("val", root, skip_bad=True)
    assert len(ds) == 4 and [b.path for b in ds.skipped] == ["huge.png"]
    assert "decompression-bomb" in ds.skipped[0].reason
    with pytest.raises(ImageError, match="decompression-bomb"):
        build_dataset("val", root, verify_images="header")
    with pytest.raises(ImageError) as err:
        build_cache(root, workers=1)
    assert names(str(err.value), split_file, line, "huge.png") and "decompression-bomb" in str(err.value)
    build_cache(root, workers=1, skip_bad=True)
    assert build_dataset("val", root, cache="on", skip_bad=True).skipped[0].path == "huge.png"


def test_worker_error_reaches_the_user_as_its_message(tmp_path):
    """An image error in a DataLoader worker: str() is the one message, not the worker's traceback."""
    import torch

    root = nih_folder(tmp_path)
    (root / "all_classes" / "junk.png").write_bytes(b"junk")
    line = add_line(root, "junk.png " + " ".join(["0"] * 14))
    ds = build_dataset("val", root)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    with pytest.raises(ImageError) as err:
        list(loader)
    message = str(err.value)
    assert "DataLoader worker" in err.value.args[0] and "Traceback" in err.value.args[0]
    assert "Traceback (most recent" not in message and "DataLoader worker" not in message
    assert "\n" not in message
    assert message.startswith(f"{root / 'val_list.txt'}:{line}: image 'junk.png'")
    assert str(ImageError("plain message")) == "plain message"


def test_header_check_of_evaluation_splits(tmp_path):
    """verify_images='header': missing, unrecognised and header-less files are found at build
    time without decoding; a file whose pixel data is cut is not (it needs 'full')."""
    from datasets.synthetic import write_dicom

    root = nih_folder(tmp_path)
    assert len(build_dataset("val", root, verify_images="header")) == 4
    (root / "all_classes" / "junk.png").write_bytes(b"not a png at all")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(
        root / "all_classes" / "full.png")
    data = (root / "all_classes" / "full.png").read_bytes()
    (root / "all_classes" / "cut.png").write_bytes(data[: len(data) // 2])
    dcm = write_dicom(root / "all_classes" / "ok.dcm", np.zeros((8, 8), np.uint8)).read_bytes()
    (root / "all_classes" / "nopix.dcm").write_bytes(dcm[:200])
    junk = add_line(root, "junk.png " + " ".join(["0"] * 14))
    add_line(root, "cut.png " + " ".join(["0"] * 14))
    add_line(root, "ok.dcm " + " ".join(["0"] * 14))
    nopix = add_line(root, "nopix.dcm " + " ".join(["0"] * 14))
    with pytest.raises(ImageError) as err:
        build_dataset("val", root, verify_images="header")
    message = str(err.value)
    assert names(message, root / "val_list.txt", junk, "junk.png")
    assert names(message, root / "val_list.txt", nopix, "nopix.dcm")
    assert "2 of 8 images" in message and "cut.png" not in message and "ok.dcm" not in message
    with pytest.raises(ImageError, match="3 of 8 images"):
        build_dataset("val", root, verify_images="full")
    with pytest.raises(ValueError, match="verify_images='some'"):
        build_dataset("val", root, verify_images="some")
