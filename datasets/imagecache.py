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
- ``index-<id>.npz``  its ``format`` and, per image: relative path (as in the split files),
  byte offset, height, width, and the original file's byte size, modification and change
  times (ns), inode and SHA-256 (also for a bad image; size -1 for one that was missing);
  and the CRC-32 of each ``block_bytes`` block of the pixel file;
- ``meta.json``  ``format`` (`CACHE_FORMAT`), exact or lossy (and the size), the data set
  kind, the DICOM intensity rule, the SHA-256 and line count of every split file it covers,
  the images found bad while building, and the names of the two files above. Replacing it
  is the one atomic step that commits a build: a failed or killed rebuild leaves the
  committed cache valid, and its partial files (the names here + ``.tmp``) are removed.
- ``eval-<key>.u8`` / ``eval-<key>.json``  the stored output of a deterministic evaluation
  transform prefix (resize + centre crop) for one split, made on first use (`EvalCache`),
  with a CRC-32 per row.

A build writes only into a new or empty folder, one holding only files of the names above, or
the cache of the same data set (`check_cache_folder`); it removes only files of those names
that its meta.json does not name, never other files in the folder. A cache of another
``format`` is refused when read (rebuild it). A cache is *stale* for a split file
whose content changed (hash), for another DICOM intensity rule than asked for (if it holds
DICOMs), for another size than asked for, for an original image that changed, or when its
files disagree. An original counts as unchanged when its size, modification and change
times and inode are those recorded (one ``stat``); when only the times or inode differ
(a copied, restored or touched folder, or a file replaced by ``mv`` or ``cp -p``), its
SHA-256 decides (`ImageCache.changed_originals`). A stale cache is never read (see
`datasets.build_dataset`). Each block of the pixel file is checked against its CRC-32 the
first time a process reads it: a damaged cache file fails with one line naming the file
and the image.

Build one with ``python -m datasets.cache --data_path DIR`` (see ``--help``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import PIL
from PIL import Image

from util.cli import ToolError
from util.io import OutputError, describe_os_error, file_sha256, make_folders, remove_empty

from .constants import ALL_SPLIT_FILES
from .errors import BadEntry, CacheError, DataUsageError, ImageError
from .imageio import DICOM_SUFFIXES, dicom_scaling_for, load_image, sniff_image_format
from .splits import (
    find_split_dir,
    parse_split_file,
    resolve_data_path,
    resolve_image_paths,
    split_dir_candidates,
    split_class_names,
)

logger = logging.getLogger(__name__)

# The layout of a cache (meta.json + index + pixel file); a cache of another format is refused.
CACHE_FORMAT = 3
# The layout of an evaluation cache (part of its key: one of another format is made again).
EVAL_CACHE_FORMAT = 2
# Bytes of the pixel file per CRC-32: a crop reads at most two blocks more than its rows.
BLOCK_BYTES = 1 << 16
DEFAULT_CACHE_DIRNAME = "_cache"
# auto: the exact cache when present and up to date; on: require it; lossy: require a
# downsized one (explicit opt-in, warned about); off: the original files.
CACHE_MODES: tuple[str, ...] = ("auto", "on", "lossy", "off")
_META = "meta.json"
# The names of this tool's files in a cache folder (module docstring): a build's id is 12 hex
# digits, an evaluation cache's key 16; a partial file ends in ".tmp" (an evaluation cache's
# partial files also carry the writer's process id and a random tag).
_OWN_NAME = re.compile(r"images-[0-9a-f]{12}\.u8|index-[0-9a-f]{12}\.npz|eval-[0-9a-f]{16}\.(?:u8|json)")
_OWN_PARTIAL = re.compile(r"(?:images-[0-9a-f]{12}\.u8|index-[0-9a-f]{12}\.npz|meta\.json)\.tmp"
                          r"|eval-[0-9a-f]{16}\.(?:u8|json)\.\d+-[0-9a-f]{6}\.tmp")
# How a message about an unusable cache ends.
REBUILD_HINT = "rebuild it with `python -m datasets.cache`"
# Arrays of the index, one row per image.
_INDEX_ROWS = ("paths", "offsets", "heights", "widths", "src_bytes", "src_mtime_ns", "src_ctime_ns",
               "src_inode", "src_sha256")


def check_cache_options(cache: str, cache_size: int | None) -> None:
    """Refuse a --cache mode / --cache_size pair that cannot work, naming the flags (cli.UsageError)."""
    if cache not in CACHE_MODES:
        raise DataUsageError(f"--cache {cache}: expected one of {', '.join(CACHE_MODES)}")
    if cache_size is None:
        return
    if cache != "lossy":
        raise DataUsageError(f"--cache_size {cache_size} chooses a downsized cache: pass it with "
                             f"--cache lossy (--cache {cache} reads no lossy cache)")
    if cache_size <= 0:
        raise DataUsageError(f"--cache_size {cache_size}: expected a positive number of pixels "
                             f"(the shorter side of the lossy cache to read)")


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
                     f"choose one with --cache_size N")


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


class ImageCache:
    """Read access to a built cache; picklable, so DataLoader workers map the file themselves.

    Opening checks the format and that the index is whole; it raises CacheError (one line
    naming the file) for a cache that is missing, of another format or damaged.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / _META
        if not meta_path.is_file():
            raise CacheError(f"no complete cache in {self.cache_dir} ({_META} missing)")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(self.meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise CacheError(f"{meta_path}: not a readable cache record ({err}); {REBUILD_HINT}") from err
        found = self.meta.get("format")
        if found != CACHE_FORMAT:
            raise CacheError(f"{meta_path}: cache format {found}, this version reads format "
                             f"{CACHE_FORMAT}; {REBUILD_HINT}")
        try:
            self.data_file = self.cache_dir / str(self.meta["data_file"])
            index_file = self.cache_dir / str(self.meta["index_file"])
            self.block_bytes = int(self.meta["block_bytes"])
            if self.block_bytes <= 0:
                raise ValueError("block_bytes")
        except (KeyError, TypeError, ValueError) as err:
            raise CacheError(f"{meta_path}: not a readable cache record (no {err}); {REBUILD_HINT}") from err
        index = _read_index(index_file)
        self.paths: list[str] = [str(p) for p in index["paths"]]
        self.offsets = index["offsets"].astype(np.int64)
        self.heights = index["heights"].astype(np.int64)
        self.widths = index["widths"].astype(np.int64)
        self.src_bytes = index["src_bytes"].astype(np.int64)
        self.src_stat = np.stack([index["src_mtime_ns"], index["src_ctime_ns"],
                                  index["src_inode"]], axis=1).astype(np.int64)
        self.src_sha256 = index["src_sha256"]
        self.block_crc32 = index["block_crc32"].astype(np.uint32)
        self.num_bytes = int((self.heights * self.widths).sum())
        if len(self.block_crc32) != -(-self.num_bytes // self.block_bytes):
            raise CacheError(f"{index_file}: {len(self.block_crc32)} block checksums for "
                             f"{self.num_bytes} bytes of pixels; {REBUILD_HINT}")
        self.row: dict[str, int] = {p: i for i, p in enumerate(self.paths)}
        self.bad: dict[str, str] = dict(self.meta.get("bad", {}))
        self._data: np.memmap | None = None
        self._verified: np.ndarray | None = None  # blocks this process checked

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
        state["_data"] = None  # each worker process maps the file itself ...
        state["_verified"] = None  # ... and checks the blocks it reads
        return state

    def _mapped(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.data_file, dtype=np.uint8, mode="r")
        return self._data

    def check(self, split_file: Path, dicom_scaling: str | None = None, size: int | None = None) -> str:
        """Why this cache cannot serve `split_file` unchanged (with that DICOM rule and lossy `size`, if
        given); '' when it can."""
        if size is not None and self.size != size:
            return f"cache images have size {self.size}, asked for {size}"
        built_with = self.meta.get("dicom_scaling")
        if dicom_scaling is not None and self.meta.get("dicom_images", 0) and built_with != dicom_scaling:
            return f"its DICOMs were scaled with --dicom_scaling {built_with}, asked for {dicom_scaling}"
        actual = self.data_file.stat().st_size if self.data_file.is_file() else -1
        if actual != self.num_bytes:
            return f"{self.data_file.name} holds {actual} bytes, index expects {self.num_bytes}"
        entry = self.meta.get("splits", {}).get(split_file.name)
        if entry is None:
            return f"cache does not cover split file {split_file.name}"
        if entry["sha256"] != file_sha256(split_file):
            return f"split file {split_file} changed since the cache was built"
        return ""

    def changed_originals(self, paths: list[str], files: list[str],
                          num_threads: int = 8) -> list[tuple[str, str]]:
        """(file, why) of each original that differs from when it was cached, in the order of `paths`.

        The rule is the module docstring's; a size change, or a bad image that was missing and
        now exists, is a change; SHA-256s are taken in `num_threads` threads. An absent original
        is fine: the cache may travel without them.
        """
        changed: dict[int, tuple[str, str]] = {}
        suspects: dict[int, str] = {}
        for path, file in zip(paths, files):
            i = self.row[path]
            size, *stat = _fingerprint(file)
            if size < 0:
                continue
            recorded = int(self.src_bytes[i])
            if recorded < 0:
                changed[i] = (file, "was missing when the cache was built and now exists" + self._bad_note(path))
            elif size != recorded:
                changed[i] = (file, f"changed size ({recorded} -> {size} bytes){self._bad_note(path)}")
            elif tuple(stat) != tuple(self.src_stat[i]):
                suspects[i] = file
        if suspects:
            start = time.perf_counter()
            rows = list(suspects)
            with ThreadPoolExecutor(max(1, num_threads)) as pool:  # hashlib releases the GIL
                digests = list(pool.map(_sha256_or_none, [suspects[i] for i in rows]))
            for i, digest in zip(rows, digests):
                if digest is not None and digest != self.src_sha256[i].tobytes():
                    changed[i] = (suspects[i], f"changed content (same size, other SHA-256)"
                                               f"{self._bad_note(self.paths[i])}")
            same = len(rows) - sum(i in changed for i in rows)
            if same:
                logger.warning("%d original images have other file times or inodes than when the cache "
                               "%s was built (a copied or restored folder?); their contents are unchanged "
                               "(SHA-256, checked in %.1f s); rebuild the cache with `python -m "
                               "datasets.cache` to record them and skip this check", same, self.cache_dir,
                               time.perf_counter() - start)
        order = {self.row[p]: n for n, p in reversed(list(enumerate(paths)))}
        return [changed[i] for i in sorted(changed, key=order.__getitem__)]

    def _bad_note(self, path: str) -> str:
        """Said of a changed original that the build recorded as bad."""
        return " (recorded as bad)" if path in self.bad else ""

    def _verify(self, path: str, start: int, stop: int) -> None:
        """Check the pixel-file blocks that bytes [start, stop) lie in against their CRC-32s,
        once per block and process; raises CacheError naming the file and image."""
        if stop <= start:
            return
        if self._verified is None:
            self._verified = np.zeros(len(self.block_crc32), dtype=bool)
        first, last = start // self.block_bytes, (stop - 1) // self.block_bytes
        todo = np.flatnonzero(~self._verified[first: last + 1]) + first
        data = self._mapped()
        for block in todo:
            lo = int(block) * self.block_bytes
            if zlib.crc32(data[lo: lo + self.block_bytes]) != int(self.block_crc32[block]):
                raise CacheError(f"{self.data_file}: pixels of image '{path}' fail their checksum "
                                 f"(block {int(block)}): the cache file is damaged; {REBUILD_HINT}")
            self._verified[block] = True

    def shape(self, path: str) -> tuple[int, int]:
        """(height, width) of a cached image."""
        return self._where(path)[:2]

    def _where(self, path: str) -> tuple[int, int, int]:
        """(height, width, byte offset) of a cached image."""
        i = self.row[path]
        return int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])

    def array(self, path: str) -> np.ndarray:
        """The cached image as a read-only H x W uint8 view of the mapped file (checked, no copy)."""
        h, w, off = self._where(path)
        self._verify(path, off, off + h * w)
        return self._mapped()[off: off + h * w].reshape(h, w)

    def region(self, path: str, top: int, left: int, height: int, width: int) -> np.ndarray:
        """A crop of a cached image as a contiguous array: only its rows are read (and checked)."""
        h, w, off = self._where(path)
        rows = slice(max(0, top), min(h, top + height))
        self._verify(path, off + rows.start * w, off + rows.stop * w)
        image = self._mapped()[off: off + h * w].reshape(h, w)
        return np.ascontiguousarray(image[top: top + height, left: left + width])

    def get(self, path: str) -> Image.Image:
        """The cached 8-bit grey image of a split-file path."""
        return Image.fromarray(np.array(self.array(path)), mode="L")


def _read_index(index_file: Path) -> dict[str, np.ndarray]:
    """The arrays of a cache index, checked to be whole; CacheError naming the file if not."""
    unreadable = (f"{index_file}: not a readable cache index (damaged, or not written by "
                  f"`python -m datasets.cache`); {REBUILD_HINT}")
    try:
        with np.load(index_file, allow_pickle=False) as index:
            arrays = {name: index[name] for name in (*_INDEX_ROWS, "block_crc32", "format")}
    except FileNotFoundError as err:
        raise CacheError(f"{index_file}: cache index missing; {REBUILD_HINT}") from err
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as err:
        # numpy's own message for a file that is no .npz advises allow_pickle: never here.
        raise CacheError(unreadable) from err
    found = arrays["format"]
    if found.shape != () or found.dtype.kind not in "iu":
        raise CacheError(unreadable)
    if int(found) != CACHE_FORMAT:
        raise CacheError(f"{index_file}: cache index format {int(found)}, this version reads "
                         f"format {CACHE_FORMAT}; {REBUILD_HINT}")
    rows = {len(arrays[name]) for name in _INDEX_ROWS}
    sha = arrays["src_sha256"]
    if len(rows) != 1 or sha.dtype != np.uint8 or sha.shape[1:] != (32,) or arrays["paths"].dtype.kind != "U":
        raise CacheError(unreadable)
    return arrays


def _sha256_or_none(file: str) -> bytes | None:
    """The SHA-256 of a file's bytes; None if it cannot be read (then it is absent, as far as the cache goes)."""
    try:
        return bytes.fromhex(file_sha256(file))
    except OSError:
        return None


class _BlockChecksums:
    """CRC-32 of each `block` bytes of a stream written piece by piece."""

    def __init__(self, block: int) -> None:
        self.block, self.crcs, self.crc, self.fill = block, [], 0, 0

    def update(self, data: bytes) -> None:
        view, pos = memoryview(data), 0
        while pos < len(view):
            take = min(self.block - self.fill, len(view) - pos)
            self.crc = zlib.crc32(view[pos: pos + take], self.crc)
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.block:
                self.crcs.append(self.crc)
                self.crc, self.fill = 0, 0

    def finish(self) -> np.ndarray:
        if self.fill:
            self.crcs.append(self.crc)
        return np.asarray(self.crcs, dtype=np.uint32)


def _fingerprint(path: str) -> tuple[int, int, int, int]:
    """(byte size, modification time ns, change time ns, inode) of a file; -1s if it is absent."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1, -1, -1
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _load_for_cache(job: tuple[int, str, int | None, str]) -> tuple:
    """Worker: decode (and for a lossy cache resize) one image; never raises (errors travel back as text).

    Returns (row, pixels or None, height, width, fingerprint, SHA-256, is DICOM, error). The
    original's fingerprint and SHA-256 are returned for a bad image too, so that a later fix
    of the file is seen. A file that changes while it is read is an error.
    """
    i, path, size, scaling = job
    before = _fingerprint(path)
    digest = _sha256_or_none(path) or bytes(32)
    try:
        img = load_image(path, dicom_scaling=scaling)
        if size is not None:
            img = resize_shorter_side(img, size)
        if _fingerprint(path) != before:
            raise ImageError(f"{path} changed while it was read: build the cache again once it is written")
        dicom = Path(path).suffix.lower() in DICOM_SUFFIXES or sniff_image_format(path) == "DICOM"
        return i, img.tobytes(), img.height, img.width, before, digest, dicom, ""
    except Exception as err:  # reported per image by the parent with split file and line
        return i, None, 0, 0, before, digest, False, f"{type(err).__name__}: {err}"


def _own_file(name: str) -> bool:
    """True for a name this tool gives a file in a cache folder (module docstring), whole or partial."""
    return bool(_OWN_NAME.fullmatch(name) or _OWN_PARTIAL.fullmatch(name))


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Delete the cache files of other builds (and partial ones) that the committed meta.json does not
    name: only files of this tool's names (`_own_file`), never anything else in the folder."""
    for f in folder.iterdir():
        if f.name not in keep and f.name != _META and _own_file(f.name) and f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)


def _is_cache_record(record: object) -> bool:
    """True for the content of a meta.json this tool wrote (any format: every one names the data set
    folder, its kind and the split files it covers)."""
    return (isinstance(record, dict) and isinstance(record.get("data_path"), str)
            and isinstance(record.get("splits"), dict) and "kind" in record)


def check_cache_folder(out: Path, data_path: Path, where: str) -> None:
    """Refuse (DataUsageError starting with `where`) a folder to build a cache in that holds files but
    is not a cache of this tool, or is the cache of another data set.

    A folder holding only files of this tool's names (a killed first build) is this tool's; one
    inside `data_path` belongs to that data set whatever folder its record names (a moved data set).
    """
    if not out.is_dir():
        return
    meta = out / _META
    if os.path.lexists(meta):
        record = None
        if meta.is_file() and not meta.is_symlink():
            try:
                record = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass  # unreadable: not known to be this tool's
        if not _is_cache_record(record):
            raise DataUsageError(f"{where}: holds a {_META} that is not a record of this tool's cache; "
                                 "name a new or empty folder, or another one")
        recorded, here = Path(record["data_path"]), data_path.resolve()
        if recorded != here and here not in out.resolve().parents:
            raise DataUsageError(f"{where}: holds the cache of another data set ({recorded}); name another "
                                 f"folder for the cache of {data_path}")
        return
    foreign = next((f for f in sorted(out.iterdir())
                    if not (_own_file(f.name) and f.is_file() and not f.is_symlink())), None)
    if foreign is not None:
        raise DataUsageError(f"{where}: holds {foreign.name} but no cache ({_META}); name a new or empty "
                             "folder for the cache")


def _splits_to_cache(data_path: Path, kind: str, split_dir: str | Path | None,
                     split_files: list[str] | None) -> tuple[Path, list[str], dict[str, tuple[Path, int]], dict]:
    """The split folder, the names of the split files to cover, where each of their images is first
    listed (split file, line: for error messages) and each file's record for meta.json."""
    folder = find_split_dir(data_path, split_dir)
    if folder is None:
        searched = ", ".join(str(f) for f in split_dir_candidates(data_path, split_dir))
        raise CacheError(f"no split files ({', '.join(ALL_SPLIT_FILES)}) found in: {searched}")
    names = split_files or [n for n in ALL_SPLIT_FILES if (folder / n).is_file()]
    classes, classes_file = split_class_names(kind, [folder, data_path])
    num_classes = len(classes) if classes else None
    where: dict[str, tuple[Path, int]] = {}
    splits_meta: dict[str, dict] = {}
    for name in names:
        split_file = folder / name
        if not split_file.is_file():
            raise DataUsageError(f"--splits: split file {split_file} not found")
        table = parse_split_file(split_file, num_classes, kind, classes_file)
        splits_meta[name] = {"sha256": file_sha256(split_file), "lines": len(table)}
        for path, line in zip(table.paths, table.lines):
            where.setdefault(path, (split_file, line))
    return folder, names, where, splits_meta


class _IndexRows:
    """The index of a cache being built, one row per image, and what the build found."""

    def __init__(self, paths: list[str]) -> None:
        n = len(paths)
        self.paths = paths
        self.offsets = np.zeros(n, np.int64)
        self.heights = np.zeros(n, np.int32)
        self.widths = np.zeros(n, np.int32)
        self.stats = np.full((n, 4), -1, np.int64)  # size, mtime_ns, ctime_ns, inode
        self.sha256 = np.zeros((n, 32), np.uint8)
        self.checksums = _BlockChecksums(BLOCK_BYTES)
        self.bad: dict[str, str] = {}
        self.dicom_images = 0
        self.bytes = 0

    def save(self, f: BinaryIO) -> None:
        """Write the index (.npz) to the open file `f`."""
        np.savez(f, format=np.int64(CACHE_FORMAT), paths=np.asarray(self.paths, dtype=str), offsets=self.offsets,
                 heights=self.heights, widths=self.widths, src_bytes=self.stats[:, 0],
                 src_mtime_ns=self.stats[:, 1], src_ctime_ns=self.stats[:, 2], src_inode=self.stats[:, 3],
                 src_sha256=self.sha256, block_crc32=self.checksums.finish())


def _write_pixels(data_file: Path, jobs: list[tuple[int, str, int | None, str]], where: dict[str, tuple[Path, int]],
                  workers: int, skip_bad: bool, start: float) -> _IndexRows:
    """Decode every image into `data_file`, back to back, and return the index rows. A bad image
    raises ImageError naming its split-file line, or with `skip_bad` is recorded in ``.bad``."""
    rows = _IndexRows(list(where))
    paths, n = rows.paths, len(rows.paths)
    pool = get_context().Pool(workers) if workers > 1 else None
    results = pool.imap(_load_for_cache, jobs, chunksize=8) if pool else map(_load_for_cache, jobs)
    try:
        with open(data_file, "wb") as f:
            for done, (i, pixels, h, w, stat, digest, dicom, error) in enumerate(results, start=1):
                rows.stats[i], rows.sha256[i] = stat, np.frombuffer(digest, np.uint8)
                if pixels is None:
                    split_file, line = where[paths[i]]
                    entry = BadEntry(split_file, line, paths[i], f"{error} (file {jobs[i][1]})")
                    if not skip_bad:
                        raise ImageError(f"{entry}; rerun with --skip_bad to record it and go on")
                    rows.bad[paths[i]] = entry.reason
                    continue
                f.write(pixels)
                rows.checksums.update(pixels)
                rows.offsets[i], rows.heights[i], rows.widths[i] = rows.bytes, h, w
                rows.bytes += h * w
                rows.dicom_images += dicom
                if done % 5000 == 0:
                    logger.info("cached %d / %d images (%.0f/s)", done, n,
                                done / (time.perf_counter() - start))
    finally:
        if pool is not None:
            pool.terminate()
    return rows


class _BuildFiles:
    """The files one build writes in `out`, each first under its name + '.tmp' and renamed when whole."""

    def __init__(self, out: Path, build_id: str) -> None:
        self.build_id = build_id
        self.data = out / f"images-{build_id}.u8"
        self.index = out / f"index-{build_id}.npz"
        self.meta = out / _META

    @staticmethod
    def partial(file: Path) -> Path:
        """Where `file` is written until it is whole."""
        return file.with_name(file.name + ".tmp")

    def discard(self, created: list[Path]) -> None:
        """Remove what a failed build left: partial files, renamed files meta.json does not commit, and
        the folders it created (`created`) if nothing else is in them."""
        for file in (self.data, self.index, self.meta):
            self.partial(file).unlink(missing_ok=True)
        try:
            committed = json.loads(self.meta.read_text(encoding="utf-8")).get("build_id")
        except (OSError, ValueError, AttributeError):  # none, or unreadable: nothing committed
            committed = None
        if committed != self.build_id:
            for done_file in (self.data, self.index):  # renamed but never committed
                done_file.unlink(missing_ok=True)
        remove_empty(created)


def _cache_record(build: _BuildFiles, rows: _IndexRows, *, size: int | None, kind: str, dicom_scaling: str,
                  data_path: Path, split_dir: Path, splits_meta: dict, build_s: float) -> dict:
    """The content of meta.json for a build."""
    return {
        "format": CACHE_FORMAT,
        "exact": size is None,
        "size": size,
        "kind": kind,
        "dicom_scaling": dicom_scaling,
        "dicom_images": rows.dicom_images,
        "build_id": build.build_id,
        "data_file": build.data.name,
        "index_file": build.index.name,
        "block_bytes": BLOCK_BYTES,
        "pillow": PIL.__version__,
        "data_path": str(data_path.resolve()),
        "split_dir": str(split_dir.resolve()),
        "splits": splits_meta,
        "num_images": len(rows.paths),
        "bytes": rows.bytes,
        "build_s": round(build_s, 1),
        "bad": rows.bad,
    }


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

    A failed build leaves neither partial files nor folders it created behind (module docstring).
    """
    data_path, kind = resolve_data_path(data_path, dataset)
    scaling = dicom_scaling_for(kind, dicom_scaling)
    if size is not None and size < 8:
        raise DataUsageError(f"--size {size}: expected at least 8 pixels")
    folder, names, where, splits_meta = _splits_to_cache(data_path, kind, split_dir, split_files)

    out = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_path, size)
    named = (f"--cache_dir {out}" if cache_dir is not None
             else f"{out} (choose another cache folder with --cache_dir)")
    if out.exists() and not out.is_dir():
        raise DataUsageError(f"{named}: is a file, not a folder")
    check_cache_folder(out, data_path, named)
    created = make_folders(out)
    for partial in out.iterdir():  # left by a build that was killed
        if _OWN_PARTIAL.fullmatch(partial.name) and partial.is_file() and not partial.is_symlink():
            partial.unlink(missing_ok=True)
    build = _BuildFiles(out, uuid.uuid4().hex[:12])
    jobs = [(i, f, size, scaling) for i, f in enumerate(resolve_image_paths(data_path, list(where), kind))]
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    writing = build.partial(build.data)  # the file being written, for the message of a failed write
    try:
        rows = _write_pixels(writing, jobs, where, workers, skip_bad, start)
        writing = build.partial(build.index)
        with open(writing, "wb") as f:  # np.savez appends '.npz' to a bare path name
            rows.save(f)
        os.replace(build.partial(build.data), build.data)
        os.replace(build.partial(build.index), build.index)
        build_s = time.perf_counter() - start
        meta = _cache_record(build, rows, size=size, kind=kind, dicom_scaling=scaling, data_path=data_path,
                             split_dir=folder, splits_meta=splits_meta, build_s=build_s)
        writing = build.partial(build.meta)
        writing.write_text(json.dumps(meta, indent=1))
        os.replace(writing, build.meta)  # the commit: before it the committed cache is intact
    except BaseException as err:
        build.discard(created)
        if isinstance(err, OSError) and not isinstance(err, ToolError):  # disk full, read-only, ...
            raise OutputError(f"{describe_os_error(err, writing)}; the committed cache (if any) is "
                              f"unchanged") from err
        raise
    _remove_unreferenced(out, {_META, build.data.name, build.index.name})
    logger.info("cached %d images (%d bad) of %s in %s (%s): %.1f MB, %.0f s", len(rows.paths), len(rows.bad),
                ", ".join(names), out, "exact" if size is None else f"LOSSY, shorter side {size}",
                rows.bytes / 1e6, build_s)
    if rows.bad:
        logger.warning("%d bad images recorded in the cache, e.g. %s", len(rows.bad), next(iter(rows.bad.items())))
    return out


class EvalCache:
    """The stored uint8 output of a deterministic transform prefix (e.g. Resize + CenterCrop), one per row.

    Row i is entry i of the data set it was made for; the key ties it to the image cache's
    build, the prefix's steps, Pillow's version, the data set's paths and its own format, so
    it is used only where it gives exactly the bytes the prefix would. Each row is checked
    against its CRC-32 when read.
    """

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.meta = json.loads((folder / f"{name}.json").read_text())
        self.offsets = np.asarray(self.meta["offsets"], np.int64)
        self.heights = np.asarray(self.meta["heights"], np.int64)
        self.widths = np.asarray(self.meta["widths"], np.int64)
        self.crc32 = np.asarray(self.meta["crc32"], np.int64)
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
        pixels = np.array(self._data[off: off + h * w])
        if zlib.crc32(pixels) != int(self.crc32[index]):
            raise CacheError(f"{self.folder / self.meta['data_file']}: row {index} fails its checksum: the "
                             f"evaluation cache is damaged; delete it (it is made again on first use)")
        return Image.fromarray(pixels.reshape(h, w), mode="L")


def open_eval_cache(cache: ImageCache, steps: str, paths: list[str], prefix: Callable[[Image.Image], Image.Image],
                    num_threads: int = 8) -> EvalCache | None:
    """The evaluation cache for these paths and prefix steps, made now if missing; None if it cannot be.

    Making it costs one pass of the prefix over the images (read from `cache`, threads in
    parallel: Pillow resizes without the GIL); later epochs and runs only read it.
    """
    import torchvision

    # The key ties the stored bytes to everything they depend on.
    key = {"format": EVAL_CACHE_FORMAT, "build_id": cache.build_id, "steps": steps, "pillow": PIL.__version__,
           "torchvision": torchvision.__version__,
           "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    name = f"eval-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
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
    offsets, heights, widths, crcs, offset = [], [], [], [], 0
    try:
        with open(tmp_data, "wb") as f, ThreadPoolExecutor(max(1, num_threads)) as pool:
            for arr in pool.map(one, paths):
                pixels = arr.tobytes()
                f.write(pixels)
                crcs.append(zlib.crc32(pixels))
                offsets.append(offset)
                heights.append(int(arr.shape[0]))
                widths.append(int(arr.shape[1]))
                offset += arr.size
        tmp_json.write_text(json.dumps({"key": key, "data_file": data_name, "offsets": offsets,
                                        "heights": heights, "widths": widths, "crc32": crcs}))
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

