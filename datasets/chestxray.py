"""The chest X-ray Dataset and `build_dataset`, which validates a split before training starts."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .imagecache import CACHE_MODES, ImageCache, default_cache_dir
from .constants import CLASS_NAMES
from .errors import BadEntry, CacheError, ImageError, SplitFileError
from .imageio import load_image
from .splits import (
    locate_split_file,
    parse_split_file,
    read_class_names,
    resolve_data_path,
    resolve_image_paths,
)
from .transforms import to_float_tensor, to_rgb

logger = logging.getLogger(__name__)

# How many bad entries an error message or warning lists before "and N more".
_LIST_AT_MOST = 5


class ChestXrayDataset(Dataset):
    """Images and K-label targets of one split file; items are ``(image, float target of K)``.

    The image is ``transform(img)``. Transforms made by `build_transform` (flag
    ``grey_input``) receive the 8-bit grey PIL image; any other transform receives it as a
    3-channel 'RGB' PIL image with identical channels. With ``transform=None`` the image is
    an un-normalised float tensor 3 x H x W in [0, 1] at the decoded (or cached) size.

    Attributes:
        paths: relative image paths exactly as written in the split file.
        targets: N x K uint8 labels.
        class_names: the K class names, in column order.
        kind: 'nih', 'chexpert', 'rsna' or 'custom'.
        split_file: the split file read.
        files: absolute path of each image.
        lines: 1-based split-file line of each entry.
        skipped: bad entries dropped when built with ``skip_bad=True``.
        cache: the ImageCache images are read from, or None for the original files.
    """

    def __init__(
        self,
        paths: list[str],
        targets: np.ndarray,
        class_names: list[str],
        kind: str,
        split_file: Path,
        files: list[str],
        lines: list[int],
        transform: Callable | None = None,
        cache: ImageCache | None = None,
        skipped: list[BadEntry] | None = None,
    ) -> None:
        assert len(paths) == len(targets) == len(files) == len(lines), "paths, targets, files, lines differ in length"
        assert targets.ndim == 2 and targets.shape[1] == len(class_names), (
            f"targets of shape {targets.shape} do not match {len(class_names)} class names"
        )
        self.paths = paths
        self.targets = targets
        self.class_names = class_names
        self.kind = kind
        self.split_file = split_file
        self.files = files
        self.lines = lines
        self.transform = transform
        self.cache = cache
        self.skipped: list[BadEntry] = skipped or []

    @property
    def num_classes(self) -> int:
        """K, the number of labels per image."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        source = f"cache {self.cache.cache_dir}" if self.cache is not None else "original files"
        return (f"{type(self).__name__}(kind={self.kind!r}, split_file='{self.split_file}', "
                f"images={len(self)}, classes={self.num_classes}, skipped={len(self.skipped)}, from {source})")

    def load_image(self, index: int) -> Image.Image:
        """The decoded 8-bit grey image of entry `index` (from the cache when there is one)."""
        if self.cache is not None:
            return self.cache.get(self.paths[index])
        try:
            return load_image(self.files[index])
        except (OSError, ValueError) as err:
            # Lazy check: decoding errors surface here, naming the split-file line at fault.
            raise ImageError(
                f"{self.split_file}:{self.lines[index]}: image '{self.paths[index]}' "
                f"({self.files[index]}) cannot be read: {err}. Build the data set with "
                f"verify_images=True (or build the cache) to find every bad image before training, "
                f"or skip_bad=True to drop them."
            ) from err

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.load_image(index)
        if self.transform is None:
            image = to_float_tensor(img)
        elif getattr(self.transform, "grey_input", False):
            image = self.transform(img)
        else:
            image = self.transform(to_rgb(img))
        target = torch.from_numpy(self.targets[index].astype(np.float32))
        return image, target


def _check_decodable(file: str) -> str:
    """'' if the image decodes, else the reason."""
    try:
        load_image(file)
        return ""
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def _changed_originals(cache: ImageCache, paths: list[str], files: list[str]) -> list[str]:
    """Originals whose byte size differs from when they were cached (absent originals are fine:
    the cache may travel without them)."""
    changed = []
    for path, file in zip(paths, files):
        try:
            size = os.stat(file).st_size
        except OSError:
            continue
        row = cache.row.get(path)
        if row is not None and size != cache.src_bytes[row] and path not in cache.bad:
            changed.append(file)
    return changed


def _report(bad: list[BadEntry]) -> str:
    """A few bad entries, one a line, and how many more there are."""
    shown = "\n  ".join(str(b) for b in bad[:_LIST_AT_MOST])
    more = f"\n  ... and {len(bad) - _LIST_AT_MOST} more" if len(bad) > _LIST_AT_MOST else ""
    return f"\n  {shown}{more}"


def _open_cache(
    mode: str,
    cache_dir: Path,
    split_file: Path,
    cache_size: int | None,
) -> ImageCache | None:
    """The cache to read `split_file` from, None to read originals; raises if mode 'on' cannot be met."""
    if mode == "off":
        return None
    try:
        cache = ImageCache(cache_dir)
        status = cache.check(split_file, cache_size)
    except CacheError as err:
        if mode == "on":
            raise CacheError(f"{err}; build it with `python -m datasets.cache --data_path ...`") from err
        logger.debug("no cache used: %s", err)
        return None
    if status.usable:
        return cache
    if mode == "on":
        raise CacheError(f"cache {cache_dir} is stale for {split_file}: {status.reason}; "
                         f"rebuild it with `python -m datasets.cache`")
    logger.warning("ignoring stale cache %s for %s: %s (reading the original images; "
                   "rebuild it with `python -m datasets.cache`)", cache_dir, split_file.name, status.reason)
    return None


def build_dataset(
    split: str,
    data_path: str | Path,
    dataset: str | None = None,
    data_size: str = "100%",
    transform: Callable | None = None,
    split_dir: str | Path | None = None,
    cache: str | bool = "auto",
    skip_bad: bool = False,
    check_files: bool = True,
    verify_images: bool = False,
    cache_dir: str | Path | None = None,
    cache_size: int | None = None,
    num_threads: int = 8,
) -> ChestXrayDataset:
    """Build the Dataset of one split, checking split file, labels and images before training.

    Args:
        split: 'train', 'val' or 'test'.
        data_path: the data set folder.
        dataset: 'nih', 'chexpert', 'rsna' or 'custom'; inferred from `data_path` if None.
        data_size: '1%', '10%' or '100%' (train only): train_1 / train_10 / train_list.
        transform: applied to each image (see ChestXrayDataset); None gives a [0, 1] tensor.
        split_dir: folder of the split files; default `data_path` when it holds them, else
            ``<repo>/DatasetsSplits/<basename of data_path>``.
        cache: 'auto' reads the preprocessed cache when present and up to date, 'on' requires
            it, 'off' ignores it (True / False mean 'on' / 'off').
        skip_bad: drop missing or undecodable images (all are decoded once to find them)
            instead of raising; they are listed in ``.skipped`` and logged.
        check_files: check that every image exists (cheap; the cache makes it unnecessary).
        verify_images: also decode every image now, so that no bad file can stop training
            later (slow on a full data set; otherwise a bad image fails when first loaded).
        cache_dir: cache folder (default ``<data_path>/_cache``).
        cache_size: require the cache's resize size to be this (None: accept any).
        num_threads: threads used to decode images when verifying.
    """
    mode = {True: "on", False: "off"}.get(cache, cache) if isinstance(cache, bool) else cache
    if mode not in CACHE_MODES:
        raise ValueError(f"cache={cache!r}: expected one of {list(CACHE_MODES)}")
    data_path, kind = resolve_data_path(data_path, dataset)

    split_file = locate_split_file(split, data_path, data_size, split_dir)
    if kind in CLASS_NAMES:
        class_names: list[str] | None = list(CLASS_NAMES[kind])
    else:
        class_names = read_class_names([split_file.parent, data_path])
    table = parse_split_file(split_file, len(class_names) if class_names else None, kind)
    if class_names is None:
        class_names = [f"class_{k}" for k in range(table.targets.shape[1])]
    files = resolve_image_paths(data_path, table.paths, kind)

    image_cache = _open_cache(mode, Path(cache_dir) if cache_dir else default_cache_dir(data_path),
                              split_file, cache_size)
    if image_cache is not None and check_files:
        changed = _changed_originals(image_cache, table.paths, files)
        if changed:
            reason = (f"{len(changed)} original images changed size since the cache was built, "
                      f"e.g. {changed[0]}")
            if mode == "on":
                raise CacheError(f"cache {image_cache.cache_dir} is stale for {split_file}: {reason}; "
                                 f"rebuild it with `python -m datasets.cache`")
            logger.warning("ignoring stale cache %s: %s (reading the original images)", image_cache.cache_dir, reason)
            image_cache = None
    bad: list[BadEntry] = []
    if image_cache is not None:
        missing = [p for p in table.paths if p not in image_cache.row]
        if missing:  # cannot happen for an unchanged split file unless the cache was edited
            raise CacheError(f"cache {image_cache.cache_dir} lacks {len(missing)} images of {split_file}, "
                             f"e.g. '{missing[0]}'; rebuild it")
        for path, line in zip(table.paths, table.lines):
            if path in image_cache.bad:
                bad.append(BadEntry(split_file, line, path, image_cache.bad[path]))
    elif check_files:
        for path, line, file in zip(table.paths, table.lines, files):
            if not os.path.isfile(file):
                bad.append(BadEntry(split_file, line, path, f"file not found: {file}"))
        if bad and not skip_bad:
            raise ImageError(f"{len(bad)} of {len(table)} images of {split_file} are missing "
                             f"(kind '{kind}' resolves paths as e.g. {files[0]}):{_report(bad)}\n"
                             f"Check --data_path / --dataset, or pass skip_bad=True (--skip_bad) to skip them.")
    if image_cache is None and (verify_images or skip_bad):
        known = {b.path for b in bad}
        todo = [i for i, p in enumerate(table.paths) if p not in known]
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            reasons = list(pool.map(_check_decodable, [files[i] for i in todo]))
        bad += [BadEntry(split_file, table.lines[i], table.paths[i], r) for i, r in zip(todo, reasons) if r]
        bad.sort(key=lambda b: b.line)
    if bad and not skip_bad:
        raise ImageError(f"{len(bad)} of {len(table)} images of {split_file} cannot be read:{_report(bad)}\n"
                         f"Pass skip_bad=True (--skip_bad) to skip them.")
    if bad:
        logger.warning("skipping %d of %d images of %s:%s", len(bad), len(table), split_file, _report(bad))
        drop = {b.path for b in bad}
        keep = [i for i, p in enumerate(table.paths) if p not in drop]
        if not keep:
            raise SplitFileError(f"{split_file}: every one of its {len(table)} images is bad:{_report(bad)}")
        table.paths = [table.paths[i] for i in keep]
        table.lines = [table.lines[i] for i in keep]
        table.targets = table.targets[keep]
        files = [files[i] for i in keep]

    ds = ChestXrayDataset(table.paths, table.targets, class_names, kind, split_file, files,
                          table.lines, transform, image_cache, bad)
    logger.info("%s", ds)
    return ds
