"""A preprocessed image cache: every image of a data set's splits decoded and resized once.

Layout of a cache folder (default ``<data_path>/_cache``):

- ``images.u8``  all images, 8-bit grey, row-major, back to back (memory-mapped when read);
- ``index.npz``  per image: relative path (as in the split files), byte offset, height,
  width, and the byte size of the original file;
- ``meta.json``  format version, the resize size, the data set kind, the SHA-256 and line
  count of every split file it covers, and the images found bad while building. It is
  written last, so a cache without it is incomplete.

A cache is *stale* for a split file whose content changed (hash), for a different resize
size than asked for, for an original whose byte size changed, or when its files disagree.

Build one with ``python -m datasets.cache --data_path DIR`` (see ``--help``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .constants import ALL_SPLIT_FILES, CLASS_NAMES
from .errors import BadEntry, CacheError, ImageError
from .imageio import load_image
from .splits import (
    find_split_dir,
    parse_split_file,
    read_class_names,
    resolve_data_path,
    resolve_image_paths,
    split_dir_candidates,
)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_CACHE_SIZE = 256
DEFAULT_CACHE_DIRNAME = "_cache"
CACHE_MODES: tuple[str, ...] = ("auto", "on", "off")
_META, _INDEX, _DATA = "meta.json", "index.npz", "images.u8"


def default_cache_dir(data_path: str | Path) -> Path:
    """Where a data set's cache lives unless told otherwise."""
    return Path(data_path) / DEFAULT_CACHE_DIRNAME


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic, antialiased); never upscale."""
    w, h = img.size
    short = min(w, h)
    if short <= size:
        return img
    scale = size / short
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap first shrinks by an integer factor with a box filter: much faster on
    # 1024-px X-rays and indistinguishable after the bicubic step.
    return img.resize(new, Image.BICUBIC, reducing_gap=3.0)


@dataclass
class CacheStatus:
    """Whether a cache can serve a split file, and why not."""

    usable: bool
    reason: str


class ImageCache:
    """Read access to a built cache; picklable, so DataLoader workers map the file themselves."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / _META
        if not meta_path.is_file():
            raise CacheError(f"no complete cache in {self.cache_dir} ({_META} missing)")
        try:
            self.meta = json.loads(meta_path.read_text())
            with np.load(self.cache_dir / _INDEX, allow_pickle=False) as index:
                self.paths = [str(p) for p in index["paths"]]
                self.offsets = index["offsets"].astype(np.int64)
                self.heights = index["heights"].astype(np.int64)
                self.widths = index["widths"].astype(np.int64)
                self.src_bytes = index["src_bytes"].astype(np.int64)
        except (OSError, ValueError, KeyError) as err:
            raise CacheError(f"cache in {self.cache_dir} is unreadable: {err}") from err
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.bad: dict[str, str] = dict(self.meta.get("bad", {}))
        self._data: np.memmap | None = None

    @property
    def size(self) -> int:
        """Shorter-side size the images were resized to."""
        return int(self.meta["size"])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None  # each worker process maps the file itself
        return state

    def _mapped(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.cache_dir / _DATA, dtype=np.uint8, mode="r")
        return self._data

    def check(self, split_file: Path, size: int | None = None) -> CacheStatus:
        """Whether this cache serves `split_file` unchanged (and at `size`, when given)."""
        if self.meta.get("version") != CACHE_VERSION:
            return CacheStatus(False, f"cache format version {self.meta.get('version')} != {CACHE_VERSION}")
        if size is not None and self.size != size:
            return CacheStatus(False, f"cache images have size {self.size}, asked for {size}")
        expected_bytes = int((self.heights * self.widths).sum())
        actual = (self.cache_dir / _DATA).stat().st_size if (self.cache_dir / _DATA).is_file() else -1
        if actual != expected_bytes:
            return CacheStatus(False, f"{_DATA} holds {actual} bytes, index expects {expected_bytes}")
        entry = self.meta.get("splits", {}).get(split_file.name)
        if entry is None:
            return CacheStatus(False, f"cache does not cover split file {split_file.name}")
        if entry["sha256"] != file_sha256(split_file):
            return CacheStatus(False, f"split file {split_file} changed since the cache was built")
        return CacheStatus(True, "up to date")

    def get(self, path: str) -> Image.Image:
        """The cached 8-bit grey image of a split-file path."""
        i = self.row[path]
        h, w, off = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        pixels = np.array(self._mapped()[off: off + h * w]).reshape(h, w)
        return Image.fromarray(pixels, mode="L")


def _load_resized(job: tuple[int, str, int]) -> tuple[int, bytes | None, int, int, int, str]:
    """Worker: decode and resize one image; never raises (the error travels back as text)."""
    i, path, size = job
    try:
        src_bytes = os.stat(path).st_size
        img = resize_shorter_side(load_image(path), size)
        return i, img.tobytes(), img.height, img.width, src_bytes, ""
    except Exception as err:  # reported per image by the parent with split file and line
        return i, None, 0, 0, -1, f"{type(err).__name__}: {err}"


def build_cache(
    data_path: str | Path,
    dataset: str | None = None,
    split_dir: str | Path | None = None,
    split_files: list[str] | None = None,
    size: int = DEFAULT_CACHE_SIZE,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    skip_bad: bool = False,
) -> Path:
    """Decode, resize (shorter side `size`) and store every image of the split files; returns the cache folder.

    Args:
        data_path: the data set folder.
        dataset: kind ('nih', 'chexpert', 'rsna', 'custom'); inferred from the folder if None.
        split_dir: folder of the split files (default: as for `build_dataset`).
        split_files: names of the split files to cover (default: all five that exist).
        size: shorter side of the cached images; smaller images are kept as they are.
        cache_dir: output folder (default ``<data_path>/_cache``).
        workers: decoding processes (0: one per CPU core).
        skip_bad: record bad images in the cache instead of failing on the first.
    """
    data_path, kind = resolve_data_path(data_path, dataset)
    if size < 8:
        raise ValueError(f"size={size}: expected at least 8 pixels")
    folder = find_split_dir(data_path, split_dir)
    if folder is None:
        searched = ", ".join(str(f) for f in split_dir_candidates(data_path, split_dir))
        raise CacheError(f"no split files ({', '.join(ALL_SPLIT_FILES)}) found in: {searched}")
    names = split_files or [n for n in ALL_SPLIT_FILES if (folder / n).is_file()]
    num_classes = len(CLASS_NAMES[kind]) if kind in CLASS_NAMES else None
    if num_classes is None:
        classes = read_class_names([folder, data_path])
        num_classes = len(classes) if classes else None

    # Union of the images over all split files, first occurrence kept for error messages.
    where: dict[str, tuple[Path, int]] = {}
    splits_meta: dict[str, dict] = {}
    for name in names:
        split_file = folder / name
        if not split_file.is_file():
            raise CacheError(f"split file {split_file} not found (asked for by --splits)")
        table = parse_split_file(split_file, num_classes, kind)
        splits_meta[name] = {"sha256": file_sha256(split_file), "lines": len(table)}
        for path, line in zip(table.paths, table.lines):
            where.setdefault(path, (split_file, line))
    paths = list(where)

    out = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_path)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (_META, _INDEX, _DATA):  # meta.json goes first: a half-written cache is never "complete"
        (out / stale).unlink(missing_ok=True)
    n = len(paths)
    offsets = np.zeros(n, np.int64)
    heights = np.zeros(n, np.int32)
    widths = np.zeros(n, np.int32)
    src_bytes = np.full(n, -1, np.int64)
    bad: dict[str, str] = {}
    jobs = [(i, f, size) for i, f in enumerate(resolve_image_paths(data_path, paths, kind))]
    workers = workers or os.cpu_count() or 1
    start, offset = time.perf_counter(), 0
    tmp_data = out / (_DATA + ".tmp")
    with open(tmp_data, "wb") as f:
        pool = get_context().Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_load_resized, jobs, chunksize=8) if pool else map(_load_resized, jobs)
            for done, (i, pixels, h, w, nbytes, error) in enumerate(results, start=1):
                if pixels is None:
                    split_file, line = where[paths[i]]
                    entry = BadEntry(split_file, line, paths[i], f"{error} (file {jobs[i][1]})")
                    if not skip_bad:
                        raise ImageError(f"{entry}; rerun with --skip_bad to record it and go on")
                    bad[paths[i]] = entry.reason
                    continue
                f.write(pixels)
                offsets[i], heights[i], widths[i], src_bytes[i] = offset, h, w, nbytes
                offset += h * w
                if done % 5000 == 0:
                    logger.info("cached %d / %d images (%.0f/s)", done, n, done / (time.perf_counter() - start))
        finally:
            if pool is not None:
                pool.terminate()
    os.replace(tmp_data, out / _DATA)
    np.savez(out / _INDEX, paths=np.asarray(paths, dtype=str), offsets=offsets,
             heights=heights, widths=widths, src_bytes=src_bytes)
    meta = {
        "version": CACHE_VERSION,
        "size": size,
        "kind": kind,
        "data_path": str(data_path.resolve()),
        "split_dir": str(folder.resolve()),
        "splits": splits_meta,
        "num_images": n,
        "bad": bad,
    }
    (out / (_META + ".tmp")).write_text(json.dumps(meta, indent=1))
    os.replace(out / (_META + ".tmp"), out / _META)
    logger.info("cached %d images (%d bad) of %s in %s: %.1f MB, %.0f s", n, len(bad), ", ".join(names),
                out, offset / 1e6, time.perf_counter() - start)
    if bad:
        logger.warning("%d bad images recorded in the cache, e.g. %s", len(bad), next(iter(bad.items())))
    return out
