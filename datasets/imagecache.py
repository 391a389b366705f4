"""Preprocessed image caches: every image of a data set's splits decoded once.

Two kinds, never confused with each other:

- **exact** (the default, ``<data_path>/_cache``): the decoded 8-bit grey pixels at their
  original size. A model sees exactly the tensors it would get from the original files
  (same seed, same transforms), without decoding PNG / JPEG / DICOM again. The train-time
  crop reads only the rows it needs from the memory-mapped file.
- **lossy** (only on request, ``--size N``, ``<data_path>/_cache_<N>px``): shorter side
  downsized to N. Faster still, but crops and evaluation resample the downsized image, so
  the tensors differ from the originals'. ``cache='auto'`` never reads one; ``cache='lossy'``
  does, with a warning.

Layout of a cache folder:

- ``images-<id>.u8``  all images, 8-bit grey, row-major, back to back (memory-mapped);
- ``index-<id>.npz``  per image: relative path (as in the split files), byte offset,
  height, width, and the byte size and modification time (ns) of the original file
  (also for a bad image; -1 for one that was missing);
- ``meta.json``  format version, exact or lossy (and the size), the data set kind, the
  DICOM intensity rule, the SHA-256 and line count of every split file it covers, the
  images found bad while building, and the names of the two files above. Replacing it is
  the one atomic step that commits a build: a failed or killed rebuild leaves the previous
  cache valid, and its partial files (``*.tmp``) are removed.
- ``eval-<key>.u8`` / ``eval-<key>.json``  the stored output of a deterministic evaluation
  transform prefix (resize + centre crop) for one split, made on first use (`EvalCache`).

A cache is *stale* for a split file whose content changed (hash), for another DICOM
intensity rule than asked for (if it holds DICOMs), for another size than asked for, for
an original whose byte size or modification time changed (a bad image too: one that was
missing and now exists counts as changed), or when its files disagree. Caches built before
modification times were recorded are checked by size only (`ImageCache.original_changed`).

Build one with ``python -m datasets.cache --data_path DIR`` (see ``--help``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
import PIL
from PIL import Image

from util.io import file_sha256

from .constants import ALL_SPLIT_FILES, CLASS_NAMES
from .errors import BadEntry, CacheError, ImageError
from .imageio import DICOM_SUFFIXES, _is_dicom_file, dicom_scaling_for, load_image
from .splits import (
    find_split_dir,
    parse_split_file,
    read_class_names,
    resolve_data_path,
    resolve_image_paths,
    split_dir_candidates,
)

logger = logging.getLogger(__name__)
# Archives keep modification times coarsely (tar: whole seconds, zip: 2 s): a data folder
# moved through one is the same data. A replaced file gets the time of its writing.
MTIME_SLACK_NS = 2_000_000_000

CACHE_VERSION = 2
DEFAULT_LOSSY_SIZE = 256
DEFAULT_CACHE_DIRNAME = "_cache"
# auto: the exact cache when present and up to date; on: require it; lossy: require a
# downsized one (explicit opt-in, warned about); off: the original files.
CACHE_MODES: tuple[str, ...] = ("auto", "on", "lossy", "off")
_META = "meta.json"


def default_cache_dir(data_path: str | Path, size: int | None = None) -> Path:
    """Where a data set's exact cache (size None) or lossy cache of `size` lives unless told otherwise."""
    name = DEFAULT_CACHE_DIRNAME if size is None else f"{DEFAULT_CACHE_DIRNAME}_{size}px"
    return Path(data_path) / name


def find_lossy_cache_dir(data_path: str | Path, size: int | None = None) -> Path:
    """The lossy cache folder of a data set: of `size` if given, else the only one present."""
    if size is not None:
        return default_cache_dir(data_path, size)
    found = sorted(p.parent for p in Path(data_path).glob(f"{DEFAULT_CACHE_DIRNAME}_*px/{_META}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CacheError(f"no lossy cache in {data_path} ({DEFAULT_CACHE_DIRNAME}_<N>px); build one with "
                         f"`python -m datasets.cache --data_path {data_path} --size N`")
    raise CacheError(f"several lossy caches in {data_path}: {', '.join(p.name for p in found)}; "
                     f"choose one with cache_size (--cache_size N) or cache_dir")



def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic, antialiased); never upscale."""
    w, h = img.size
    short = min(w, h)
    if short <= size:
        return img
    scale = size / short
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap first shrinks by an integer factor with a box filter: much faster on
    # 1024-px X-rays and indistinguishable after the bicubic step (a lossy cache anyway).
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
        except (OSError, ValueError) as err:
            raise CacheError(f"cache in {self.cache_dir} is unreadable: {err}") from err
        self.paths: list[str] = []
        self.row: dict[str, int] = {}
        self.bad: dict[str, str] = {}
        self._data: np.memmap | None = None
        # Absent from caches built before modification times were recorded.
        self.src_mtime_ns: np.ndarray | None = None
        if self.meta.get("version") != CACHE_VERSION:
            return  # check() reports it; the index may have another layout
        try:
            with np.load(self.cache_dir / self.meta["index_file"], allow_pickle=False) as index:
                self.paths = [str(p) for p in index["paths"]]
                self.offsets = index["offsets"].astype(np.int64)
                self.heights = index["heights"].astype(np.int64)
                self.widths = index["widths"].astype(np.int64)
                self.src_bytes = index["src_bytes"].astype(np.int64)
                if "src_mtime_ns" in index.files:
                    self.src_mtime_ns = index["src_mtime_ns"].astype(np.int64)
        except (OSError, ValueError, KeyError) as err:
            raise CacheError(f"cache in {self.cache_dir} is unreadable: {err}") from err
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.bad = dict(self.meta.get("bad", {}))

    @property
    def exact(self) -> bool:
        """True for original-size pixels, False for a downsized (lossy) cache."""
        return bool(self.meta.get("exact", False))

    @property
    def size(self) -> int | None:
        """Shorter-side size of a lossy cache; None for an exact one."""
        return None if self.exact else int(self.meta["size"])

    @property
    def build_id(self) -> str:
        """Identifies one build: derived data (evaluation caches) is tied to it."""
        return str(self.meta.get("build_id", ""))

    @property
    def info(self) -> dict:
        """What a run read: kind ('exact' | 'lossy'), size, folder, DICOM rule (for config.json / results)."""
        return {"kind": "exact" if self.exact else "lossy", "size": self.size, "dir": str(self.cache_dir),
                "dicom_scaling": self.meta.get("dicom_scaling"), "build_id": self.build_id}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None  # each worker process maps the file itself
        return state

    def _mapped(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.cache_dir / self.meta["data_file"], dtype=np.uint8, mode="r")
        return self._data

    def check(self, split_file: Path, dicom_scaling: str | None = None, size: int | None = None) -> CacheStatus:
        """Whether this cache serves `split_file` unchanged (with that DICOM rule and lossy `size`, if given)."""
        version = self.meta.get("version")
        if version != CACHE_VERSION:
            return CacheStatus(False, f"cache format version {version} != {CACHE_VERSION}")
        if size is not None and self.size != size:
            return CacheStatus(False, f"cache images have size {self.size}, asked for {size}")
        built_with = self.meta.get("dicom_scaling")
        if dicom_scaling is not None and self.meta.get("dicom_images", 0) and built_with != dicom_scaling:
            return CacheStatus(False, f"its DICOMs were scaled with dicom_scaling '{built_with}', "
                                      f"asked for '{dicom_scaling}'")
        data_file = self.cache_dir / self.meta["data_file"]
        expected_bytes = int((self.heights * self.widths).sum())
        actual = data_file.stat().st_size if data_file.is_file() else -1
        if actual != expected_bytes:
            return CacheStatus(False, f"{data_file.name} holds {actual} bytes, index expects {expected_bytes}")
        entry = self.meta.get("splits", {}).get(split_file.name)
        if entry is None:
            return CacheStatus(False, f"cache does not cover split file {split_file.name}")
        if entry["sha256"] != file_sha256(split_file):
            return CacheStatus(False, f"split file {split_file} changed since the cache was built")
        return CacheStatus(True, "up to date")

    @property
    def records_mtimes(self) -> bool:
        """Whether the originals' modification times were recorded (not by caches of earlier builds)."""
        return self.src_mtime_ns is not None

    def original_changed(self, path: str, file: str) -> str:
        """Why the original `file` of cached `path` differs from when it was cached; '' if it does not.

        A change of byte size or modification time counts (the pixels may differ at the same
        size: another PhotometricInterpretation, re-exported pixel data). An absent original
        does not: the cache may travel without them. For an image recorded as bad, one that
        was missing and now exists has changed; in a cache without modification times (which
        did not record bad images' sizes either) a bad image that now decodes has changed.
        """
        try:
            st = os.stat(file)
        except OSError:
            return ""
        i = self.row[path]
        size = int(self.src_bytes[i])
        if size < 0:  # a bad image that was missing, or any bad image of an earlier build
            if self.records_mtimes:
                return "was missing when the cache was built and now exists"
            try:
                load_image(file, dicom_scaling=self.meta.get("dicom_scaling") or "minmax")
            except (OSError, ValueError):  # still bad (ImageDecodeError is an OSError)
                return ""
            return "was bad when the cache was built and now decodes"
        if st.st_size != size:
            return f"changed size ({size} -> {st.st_size} bytes)"
        if self.src_mtime_ns is not None and abs(st.st_mtime_ns - int(self.src_mtime_ns[i])) >= MTIME_SLACK_NS:
            return "changed modification time (same size)"
        return ""

    def shape(self, path: str) -> tuple[int, int]:
        """(height, width) of a cached image."""
        i = self.row[path]
        return int(self.heights[i]), int(self.widths[i])

    def array(self, path: str) -> np.ndarray:
        """The cached image as a read-only H x W uint8 view of the mapped file (no copy)."""
        i = self.row[path]
        h, w, off = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        return self._mapped()[off: off + h * w].reshape(h, w)

    def region(self, path: str, top: int, left: int, height: int, width: int) -> np.ndarray:
        """A crop of a cached image as a contiguous array: only its rows are read from disk."""
        return np.ascontiguousarray(self.array(path)[top: top + height, left: left + width])

    def get(self, path: str) -> Image.Image:
        """The cached 8-bit grey image of a split-file path."""
        return Image.fromarray(np.array(self.array(path)), mode="L")


def _load_for_cache(job: tuple[int, str, int | None, str]) -> tuple[int, bytes | None, int, int, int, int, bool, str]:
    """Worker: decode (and for a lossy cache resize) one image; never raises (errors travel back as text).

    Returns the original's byte size and modification time (-1 if missing) also for a bad
    image, so that a later fix of the file is seen.
    """
    i, path, size, scaling = job
    try:
        st = os.stat(path)  # before decoding: a file replaced meanwhile is then seen as changed
        src_bytes, src_mtime_ns = st.st_size, st.st_mtime_ns
    except OSError:
        src_bytes = src_mtime_ns = -1
    try:
        img = load_image(path, dicom_scaling=scaling)
        if size is not None:
            img = resize_shorter_side(img, size)
        dicom = Path(path).suffix.lower() in DICOM_SUFFIXES or _is_dicom_file(Path(path))
        return i, img.tobytes(), img.height, img.width, src_bytes, src_mtime_ns, dicom, ""
    except Exception as err:  # reported per image by the parent with split file and line
        return i, None, 0, 0, src_bytes, src_mtime_ns, False, f"{type(err).__name__}: {err}"


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Delete cache files of earlier builds (and partial ones) that the committed meta.json does not name."""
    patterns = ("images-*.u8", "index-*.npz", "eval-*", "*.tmp", "images.u8", "index.npz")
    for pattern in patterns:
        for f in folder.glob(pattern):
            if f.name not in keep and f.is_file():
                f.unlink(missing_ok=True)


def build_cache(
    data_path: str | Path,
    dataset: str | None = None,
    split_dir: str | Path | None = None,
    split_files: list[str] | None = None,
    size: int | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    skip_bad: bool = False,
    dicom_scaling: str | None = None,
) -> Path:
    """Decode every image of the split files once and store it; returns the cache folder.

    Args:
        data_path: the data set folder.
        dataset: kind ('nih', 'chexpert', 'rsna', 'custom'); inferred from the folder if None.
        split_dir: folder of the split files (default: as for `build_dataset`).
        split_files: names of the split files to cover (default: all five that exist).
        size: None (default) for an exact cache at the original size; N for a *lossy* cache
            whose images are downsized to shorter side N (smaller ones kept as they are).
        cache_dir: output folder (default ``<data_path>/_cache``, or ``_cache_<N>px`` when lossy).
        workers: decoding processes (0: one per CPU core).
        skip_bad: record bad images in the cache instead of failing on the first.
        dicom_scaling: DICOM intensity rule ('paper' | 'minmax'); default the kind's (see imageio).

    A rebuild over an existing cache writes new files beside it and commits them by
    replacing ``meta.json`` in one step: if it fails, the previous cache stays valid.
    """
    data_path, kind = resolve_data_path(data_path, dataset)
    scaling = dicom_scaling_for(kind, dicom_scaling)
    if size is not None and size < 8:
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

    out = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_path, size)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob("*.tmp"):  # left by a build that was killed
        partial.unlink(missing_ok=True)
    build_id = uuid.uuid4().hex[:12]
    data_name, index_name = f"images-{build_id}.u8", f"index-{build_id}.npz"
    tmp_data, tmp_index = out / (data_name + ".tmp"), out / (index_name + ".tmp")
    n = len(paths)
    offsets = np.zeros(n, np.int64)
    heights = np.zeros(n, np.int32)
    widths = np.zeros(n, np.int32)
    src_bytes = np.full(n, -1, np.int64)
    src_mtime_ns = np.full(n, -1, np.int64)
    bad: dict[str, str] = {}
    dicom_images = 0
    jobs = [(i, f, size, scaling) for i, f in enumerate(resolve_image_paths(data_path, paths, kind))]
    workers = workers or os.cpu_count() or 1
    start, offset = time.perf_counter(), 0
    try:
        with open(tmp_data, "wb") as f:
            pool = get_context().Pool(workers) if workers > 1 else None
            try:
                results = pool.imap(_load_for_cache, jobs, chunksize=8) if pool else map(_load_for_cache, jobs)
                for done, (i, pixels, h, w, nbytes, mtime_ns, dicom, error) in enumerate(results, start=1):
                    src_bytes[i], src_mtime_ns[i] = nbytes, mtime_ns
                    if pixels is None:
                        split_file, line = where[paths[i]]
                        entry = BadEntry(split_file, line, paths[i], f"{error} (file {jobs[i][1]})")
                        if not skip_bad:
                            raise ImageError(f"{entry}; rerun with --skip_bad to record it and go on")
                        bad[paths[i]] = entry.reason
                        continue
                    f.write(pixels)
                    offsets[i], heights[i], widths[i] = offset, h, w
                    offset += h * w
                    dicom_images += dicom
                    if done % 5000 == 0:
                        logger.info("cached %d / %d images (%.0f/s)", done, n, done / (time.perf_counter() - start))
            finally:
                if pool is not None:
                    pool.terminate()
        with open(tmp_index, "wb") as f:  # np.savez appends '.npz' to a bare path name
            np.savez(f, paths=np.asarray(paths, dtype=str), offsets=offsets,
                     heights=heights, widths=widths, src_bytes=src_bytes, src_mtime_ns=src_mtime_ns)
        os.replace(tmp_data, out / data_name)
        os.replace(tmp_index, out / index_name)
        build_s = time.perf_counter() - start
        meta = {
            "version": CACHE_VERSION,
            "exact": size is None,
            "size": size,
            "kind": kind,
            "dicom_scaling": scaling,
            "dicom_images": dicom_images,
            "build_id": build_id,
            "data_file": data_name,
            "index_file": index_name,
            "pillow": PIL.__version__,
            "data_path": str(data_path.resolve()),
            "split_dir": str(folder.resolve()),
            "splits": splits_meta,
            "num_images": n,
            "bytes": offset,
            "build_s": round(build_s, 1),
            "bad": bad,
        }
        tmp_meta = out / (_META + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, out / _META)  # the commit: before it the old cache is intact
    except BaseException:
        for partial in (tmp_data, tmp_index, out / (_META + ".tmp")):
            partial.unlink(missing_ok=True)
        if not (out / _META).is_file() or json.loads((out / _META).read_text()).get("build_id") != build_id:
            for done_file in (out / data_name, out / index_name):  # renamed but never committed
                done_file.unlink(missing_ok=True)
        raise
    _remove_unreferenced(out, {_META, data_name, index_name})
    logger.info("cached %d images (%d bad) of %s in %s (%s): %.1f MB, %.0f s", n, len(bad), ", ".join(names),
                out, "exact" if size is None else f"LOSSY, shorter side {size}", offset / 1e6, build_s)
    if bad:
        logger.warning("%d bad images recorded in the cache, e.g. %s", len(bad), next(iter(bad.items())))
    return out


class EvalCache:
    """The stored uint8 output of a deterministic transform prefix (e.g. Resize + CenterCrop), one per row.

    Row i is entry i of the data set it was made for; the key ties it to the image cache's
    build, the prefix's steps, Pillow's version and the data set's paths, so it is used
    only where it gives exactly the bytes the prefix would.
    """

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.meta = json.loads((folder / f"{name}.json").read_text())
        self.offsets = np.asarray(self.meta["offsets"], np.int64)
        self.heights = np.asarray(self.meta["heights"], np.int64)
        self.widths = np.asarray(self.meta["widths"], np.int64)
        self.steps: str = self.meta["key"]["steps"]
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, index: int) -> Image.Image:
        """The stored prefix output of entry `index` as an 8-bit grey image."""
        if self._data is None:
            self._data = np.memmap(self.folder / self.meta["data_file"], dtype=np.uint8, mode="r")
        h, w, off = int(self.heights[index]), int(self.widths[index]), int(self.offsets[index])
        return Image.fromarray(np.array(self._data[off: off + h * w]).reshape(h, w), mode="L")


def eval_cache_key(cache: ImageCache, steps: str, paths: list[str]) -> tuple[str, dict]:
    """File stem and content of the key of an evaluation cache."""
    import torchvision

    key = {"build_id": cache.build_id, "steps": steps, "pillow": PIL.__version__,
           "torchvision": torchvision.__version__,
           "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"eval-{digest}", key


def open_eval_cache(cache: ImageCache, steps: str, paths: list[str], prefix: Callable[[Image.Image], Image.Image],
                    num_threads: int = 8) -> EvalCache | None:
    """The evaluation cache for these paths and prefix steps, made now if missing; None if it cannot be.

    Making it costs one pass of the prefix over the images (read from `cache`, threads in
    parallel: Pillow resizes without the GIL); later epochs and runs only read it.
    """
    name, key = eval_cache_key(cache, steps, paths)
    folder = cache.cache_dir
    if (folder / f"{name}.json").is_file():
        try:
            found = EvalCache(folder, name)
            if found.meta.get("key") == key and len(found) == len(paths):
                return found
        except (OSError, ValueError, KeyError) as err:
            logger.warning("rebuilding unreadable evaluation cache %s: %s", folder / name, err)
    # Unique temporary names: ranks of a distributed run may build the same one at once.
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    data_name = f"{name}.u8"
    tmp_data, tmp_json = folder / f"{data_name}.{tag}.tmp", folder / f"{name}.json.{tag}.tmp"

    def one(path: str) -> np.ndarray:
        img = prefix(cache.get(path))
        if not isinstance(img, Image.Image) or img.mode != "L":
            raise TypeError(f"the transform prefix gave {type(img).__name__}, not an 8-bit grey image")
        return np.asarray(img)

    start = time.perf_counter()
    offsets, heights, widths, offset = [], [], [], 0
    try:
        with open(tmp_data, "wb") as f, ThreadPoolExecutor(max(1, num_threads)) as pool:
            for arr in pool.map(one, paths):
                f.write(arr.tobytes())
                offsets.append(offset)
                heights.append(int(arr.shape[0]))
                widths.append(int(arr.shape[1]))
                offset += arr.size
        tmp_json.write_text(json.dumps({"key": key, "data_file": data_name, "offsets": offsets,
                                        "heights": heights, "widths": widths}))
        os.replace(tmp_data, folder / data_name)
        os.replace(tmp_json, folder / f"{name}.json")  # written last: the commit
    except (OSError, TypeError) as err:
        for partial in (tmp_data, tmp_json):
            partial.unlink(missing_ok=True)
        logger.warning("no evaluation cache in %s (%s): evaluation transforms each image", folder, err)
        return None
    logger.info("evaluation cache %s: %d images, %.1f MB, %.1f s", folder / name, len(paths), offset / 1e6,
                time.perf_counter() - start)
    return EvalCache(folder, name)


def check_cache_options(cache: str, cache_size: int | None) -> None:
    """Refuse a --cache_size that no --cache mode reads (the lossy cache's size, positive)."""
    from util.cli import UsageError

    if cache_size is None:
        return
    if cache != "lossy":
        raise UsageError(f"--cache_size {cache_size} selects a lossy cache: it needs --cache lossy "
                         f"(got --cache {cache})")
    if cache_size <= 0:
        raise UsageError(f"--cache_size {cache_size} is not valid: must be positive")
