"""A synthetic chest-X-ray-like demo data set in NIH's layout, learnable without any download.

Each image is a grey chest-like background (body, two darker lungs, spine, noise). Each of
the 14 NIH findings present adds its own visual signature inside a soft disk at a random
place: stripes of a class-specific orientation and period, a checkerboard, dots, rings,
a grid, a bright or dark blob, or noise. The signatures are translation-invariant
textures, so a ViT that mean-pools its patch tokens can learn them, even from random
initial weights with only LoRA and the head trained. Labels are independent with a
prevalence of 10-30% per class.

    python -m datasets.demo --out demo_data          # 1,200 images of 128 px, a few seconds

`write_dicom` writes a grey array as a DICOM file and `demo_as_rsna_dicoms` rewrites the demo
set as RSNA-layout DICOMs, for trying, testing and benchmarking the DICOM path:

    python -m datasets.demo --out RSNA_demo --rsna   # one label (Pneumonia), JPEG DICOMs
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .constants import CLASS_NAMES
from .errors import DataUsageError
from .splits import nested_subsets, write_split_file
from .staging import staged_folder

logger = logging.getLogger(__name__)

# Per-class prevalence, fixed so every seed has the same label balance.
DEMO_PREVALENCE: tuple[float, ...] = (
    0.25, 0.15, 0.30, 0.20, 0.12, 0.18, 0.22, 0.10, 0.28, 0.14, 0.16, 0.26, 0.12, 0.20,
)
_AMPLITUDE = 0.22
MIN_SUBSET = 20  # smallest train_1 / train_10 list, so a 1% run still sees every class
# The classes drawn as stripes: class -> (angle, period as image size / this).
_STRIPE_CLASSES: dict[int, tuple[float, int]] = {
    0: (0.0, 16), 2: (np.pi / 2, 16), 3: (np.pi / 4, 16), 6: (3 * np.pi / 4, 16),
    8: (0.0, 6), 9: (np.pi / 2, 6), 12: (np.pi / 4, 6),
}


def _signature(c: int, x: np.ndarray, y: np.ndarray, cx: float, cy: float, s: int,
               rng: np.random.Generator) -> np.ndarray:
    """Class `c`'s texture over the whole image, roughly in [-1, 1]."""
    phase = rng.uniform(0, 2 * np.pi)
    if c in _STRIPE_CLASSES:  # sinusoidal stripes
        angle, per_image = _STRIPE_CLASSES[c]
        t = x * np.cos(angle) + y * np.sin(angle)
        return np.sin(2 * np.pi * t / (s / per_image) + phase)
    if c == 1:
        return np.ones_like(x)  # bright blob
    if c == 4:
        return -np.ones_like(x)  # dark blob
    if c == 5:  # bright dots on a lattice
        p = s / 10
        return 2 * (np.cos(2 * np.pi * x / p + phase) * np.cos(2 * np.pi * y / p + phase) > 0.6) - 0.3
    if c == 7:  # checkerboard
        p = s / 12
        return np.sign(np.sin(np.pi * x / p + phase) * np.sin(np.pi * y / p + phase))
    if c == 10:
        return rng.uniform(-1.5, 1.5, size=x.shape)  # mottled noise
    if c == 11:  # concentric rings around the blob centre
        return np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / (s / 12) + phase)
    # c == 13: a grid of thin lines
    p = s / 8
    return 2.0 * ((np.abs(np.sin(np.pi * x / p + phase)) < 0.25) | (np.abs(np.sin(np.pi * y / p + phase)) < 0.25)) - 0.5


def chest_template(image_size: int) -> np.ndarray:
    """The fixed chest-like grey image in [0, 1]: body, two darker lungs and a spine."""
    s = image_size
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    u, v = (x / s) * 2 - 1, (y / s) * 2 - 1
    img = 0.62 - 0.18 * u**2
    for side in (-1, 1):
        r = ((u - side * 0.42) / 0.3) ** 2 + ((v + 0.05) / 0.58) ** 2
        img -= 0.25 / (1 + np.exp(np.minimum((r - 1) * 8, 50)))  # soft-edged lung field
    img += 0.12 * np.exp(-(u / 0.07) ** 2)  # spine
    return img.astype(np.float32)


def _background(template: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The template shifted a little, with a brightness offset, smooth and pixel noise."""
    s = template.shape[0]
    dy, dx = rng.integers(-s // 32, s // 32 + 1, size=2)
    img = np.roll(template, (int(dy), int(dx)), axis=(0, 1)) + np.float32(rng.normal(0, 0.02))
    coarse = rng.normal(0, 0.04, size=(5, 5)).astype(np.float32)
    img += np.asarray(Image.fromarray(coarse, mode="F").resize((s, s), Image.BICUBIC))
    img += rng.normal(0, 0.02, size=img.shape).astype(np.float32)
    return img


def make_demo_image(labels: np.ndarray, image_size: int, rng: np.random.Generator,
                    template: np.ndarray | None = None) -> np.ndarray:
    """One uint8 image showing the findings whose label is 1."""
    s = image_size
    if template is None:
        template = chest_template(s)
    img = _background(template, rng)
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    for c in np.flatnonzero(labels):
        r = rng.uniform(0.2, 0.3) * s
        cx, cy = rng.uniform(r * 0.8, s - r * 0.8, size=2)
        # Work on the disk's bounding box only: most of the image is untouched.
        pad = r + s / 16
        y0, y1 = max(0, int(cy - pad)), min(s, int(cy + pad) + 1)
        x0, x1 = max(0, int(cx - pad)), min(s, int(cx + pad) + 1)
        bx, by = x[y0:y1, x0:x1], y[y0:y1, x0:x1]
        mask = 1 / (1 + np.exp((np.hypot(bx - cx, by - cy) - r) / (s / 64)))
        img[y0:y1, x0:x1] += _AMPLITUDE * mask * _signature(int(c), bx, by, cx, cy, s, rng)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _write_demo_image(job: tuple[Path, np.ndarray, int, int, int, int]) -> None:
    """Worker: draw and save one demo image from its own generator (seed, index)."""
    path, row, image_size, seed, index, compress_level = job
    rng = np.random.default_rng([seed, index])
    Image.fromarray(make_demo_image(row, image_size, rng), mode="L").save(path, compress_level=compress_level)


def check_new_folder(root: str | Path) -> Path:
    """`root` as a Path if nothing is there or it is an empty folder; else DataUsageError naming it.

    Synthetic data is written only where it can replace nothing: its file names are those of
    a real data set (NIH's ``all_classes/00000001_000.png``, the five split files).
    """
    root = Path(root)
    if os.path.islink(root) or (root.exists() and not root.is_dir()):
        raise DataUsageError(f"{root}: already exists and is not a folder (synthetic data is written "
                             "only into a new or empty folder)")
    if root.is_dir() and any(root.iterdir()):
        raise DataUsageError(f"{root}: already exists and is not empty (synthetic data is written only "
                             "into a new or empty folder)")
    return root


def make_demo_dataset(
    root: str | Path,
    num_images: int = 1200,
    image_size: int = 128,
    seed: int = 0,
    images_per_patient: int = 2,
    compress_level: int = 1,
    workers: int = 1,
) -> Path:
    """Write a synthetic data set in NIH layout (root/all_classes/*.png + the five split files); returns root.

    `root` must be new or an empty folder (`check_new_folder`). Written beside `root` first,
    then renamed into place: a failure (a full disk) leaves nothing behind.

    About 2/3 of the patients go to train_list, 1/6 each to val_list and test_list
    (patient-disjoint); train_10 and train_1 are nested random subsets of train_list with at
    least MIN_SUBSET images. `compress_level` is the PNG zlib level (NIH's files use 6).
    `workers` > 1 draws the images in that many processes, each image from its own
    generator: the same labels as with one worker, other pixels and other split draws.
    """
    if num_images < 12:
        raise DataUsageError(f"--num_images {num_images}: expected at least 12")
    if image_size < 32:
        raise DataUsageError(f"--image_size {image_size}: expected at least 32 pixels")
    root = check_new_folder(root)
    with staged_folder(root, last=("train_list.txt",)) as staged:
        counts = _write_demo(staged, num_images, image_size, seed, images_per_patient, compress_level, workers)
    logger.info("demo data set: %d images of %d px in %s (%s)", num_images, image_size, root,
                ", ".join(f"{name} {n}" for name, n in counts.items()))
    return root


def _write_demo(root: Path, num_images: int, image_size: int, seed: int, images_per_patient: int,
                compress_level: int, workers: int) -> dict[str, int]:
    """Write the demo data set's images and split files into `root` (see `make_demo_dataset`);
    returns the line count of each split file."""
    image_dir = root / "all_classes"
    image_dir.mkdir()
    rng = np.random.default_rng(seed)
    k = len(CLASS_NAMES["nih"])
    labels = (rng.random((num_images, k)) < np.asarray(DEMO_PREVALENCE)).astype(np.uint8)
    patients = np.arange(num_images) // max(1, images_per_patient)
    names = [f"{p + 1:08d}_{i % max(1, images_per_patient):03d}.png" for i, p in enumerate(patients)]
    if workers > 1:
        from multiprocessing import get_context

        jobs = [(image_dir / n, row, image_size, seed, i, compress_level) for i, (n, row) in enumerate(zip(names, labels))]
        with get_context().Pool(workers) as pool:
            pool.map(_write_demo_image, jobs, chunksize=4)
    else:
        template = chest_template(image_size)
        for name, row in zip(names, labels):
            image = Image.fromarray(make_demo_image(row, image_size, rng, template), mode="L")
            image.save(image_dir / name, compress_level=compress_level)

    unique = np.unique(patients)
    order = rng.permutation(unique)
    n_eval = max(1, round(len(unique) / 6))
    test_p, val_p = set(order[:n_eval]), set(order[n_eval:2 * n_eval])
    split_of = np.array(["test" if p in test_p else "val" if p in val_p else "train" for p in patients])
    idx = {s: np.flatnonzero(split_of == s) for s in ("train", "val", "test")}
    subsets = nested_subsets(len(idx["train"]), rng, MIN_SUBSET)
    files = {"train_list.txt": idx["train"],
             **{name: idx["train"][rows] for name, rows in subsets.items()},
             "val_list.txt": idx["val"], "test_list.txt": idx["test"]}
    for fname, rows in files.items():
        write_split_file(root / fname, [names[i] for i in rows], labels[rows])
    return {fname: len(rows) for fname, rows in files.items()}


def write_dicom(path: str | Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, jpeg: bool = False, quality: int = 95,
                **attrs: Any) -> Path:
    """Write a single-frame grey DX image as a DICOM file; returns its path.

    Args:
        pixels: 2-D uint8 or uint16 stored values (uint8 for ``jpeg``).
        photometric: 'MONOCHROME2' (0 is black) or 'MONOCHROME1' (0 is white).
        bits_stored: BitsStored; default 8 for uint8 and 12 for uint16 pixels.
        jpeg: JPEG baseline compressed (as RSNA Pneumonia's files) instead of uncompressed
            explicit VR little endian.
        quality: JPEG quality.
        attrs: further data elements by keyword, e.g. ``WindowCenter=1000``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage,
                             generate_uid)

    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixels: expected a 2-D uint8 or uint16 array, got {pixels.dtype} {pixels.shape}")
    if jpeg and pixels.dtype != np.uint8:
        raise ValueError("jpeg=True stores 8-bit pixels: pass a uint8 array")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or (8 if pixels.dtype == np.uint8 else 12)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=quality)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.tobytes()
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def demo_as_rsna_dicoms(nih_root: str | Path, dest: str | Path, jpeg: bool = True,
                        label_class: str = "Cardiomegaly") -> Path:
    """Rewrite a demo data set (NIH layout) in RSNA Pneumonia's layout; returns ``dest``.

    Each PNG becomes ``stage_2_train_images/<stem>.dcm`` with the same pixels (8-bit JPEG
    baseline like RSNA's files, or uncompressed with 12 of 16 bits stored), and each split
    file keeps one label per image, the demo's ``label_class`` column. Its default, the bright
    blob (an opacity), stands in for Pneumonia and is learnable alone. ``dest`` must be new or
    an empty folder (`check_new_folder`).
    """
    names = list(CLASS_NAMES["nih"])
    if label_class not in names:
        raise ValueError(f"label_class={label_class!r}: expected one of {names}")
    column = names.index(label_class)
    nih_root, dest = Path(nih_root), check_new_folder(dest)
    split_files = sorted(nih_root.glob("*.txt"))
    if not split_files:
        raise DataUsageError(f"no split files (*.txt) in {nih_root}: expected a demo data set")
    with staged_folder(dest, last=("train_list.txt",)) as staged:
        _write_rsna(nih_root, staged, split_files, column, jpeg)
    return dest


def _write_rsna(nih_root: Path, dest: Path, split_files: list[Path], column: int, jpeg: bool) -> None:
    """Write the RSNA-layout DICOMs and split files into `dest` (see `demo_as_rsna_dicoms`)."""
    (dest / "stage_2_train_images").mkdir()
    for split_file in split_files:
        lines = []
        for line in split_file.read_text(encoding="utf-8-sig").splitlines():
            name, *labels = line.split()
            rel = f"stage_2_train_images/{Path(name).stem}.dcm"
            if not (dest / rel).exists():
                pixels = np.asarray(Image.open(nih_root / "all_classes" / name).convert("L"))
                if jpeg:
                    write_dicom(dest / rel, pixels, jpeg=True)
                else:  # 8 -> 12 bits in 16-bit words
                    write_dicom(dest / rel, pixels.astype(np.uint16) * 16 + 8, bits_stored=12)
            lines.append(f"{rel} {labels[column]}\n")
        (dest / split_file.name).write_text("".join(lines))
