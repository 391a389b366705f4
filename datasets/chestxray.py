"""The chest X-ray Dataset and `build_dataset`, which validates a split before training starts."""
from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .imagecache import (
    REBUILD_HINT,
    EvalCache,
    ImageCache,
    check_cache_options,
    default_cache_dir,
    find_lossy_cache_dir,
    open_eval_cache,
)
from .errors import BadEntry, CacheError, ImageError, SplitFileError
from .imageio import check_image_header, dicom_scaling_for, load_image
from .splits import (
    SplitTable,
    check_label_columns,
    locate_split_file,
    parse_split_file,
    resolve_data_path,
    resolve_image_paths,
    split_class_names,
)
from .resample import kernel_name, resize_grey
from .transforms import GreyToRGB, apply_transform, to_float_tensor

logger = logging.getLogger(__name__)

# How many bad entries an error message or warning lists before "and N more".
_LIST_AT_MOST = 5

VERIFY_MODES: tuple[str, ...] = ("none", "header", "full")
# Interpolations of a random resized crop that `resize_grey` does as Pillow would.
_PIL_FILTERS = {T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
                T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR}


def _random_resized_crops() -> tuple[type, ...]:
    """The random-resized-crop transforms whose crop a cache can read alone (torchvision's, timm's)."""
    try:
        from timm.data.transforms import RandomResizedCropAndInterpolation
    except ImportError:  # timm is only needed for the adamw recipe
        return (T.RandomResizedCrop,)
    return (T.RandomResizedCrop, RandomResizedCropAndInterpolation)


def _flatten(transform: Callable) -> list[Callable]:
    """The steps a transform applies in order (nested Compose / XrayTransform pipelines unrolled)."""
    inner = getattr(transform, "pipeline", None)
    if isinstance(inner, T.Compose):
        return _flatten(inner)
    if isinstance(transform, T.Compose):
        return [step for t in transform.transforms for step in _flatten(t)]
    return [transform]


@dataclass
class _Plan:
    """How a transform can read a cached image: the whole image, its crop only, or a stored prefix.

    steps: the transform's steps, applied to the grey image in order;
    crop_at: index of a random resized crop preceded only by channel steps (GreyToRGB),
        whose crop can be read alone: the same pixels, the same random draws;
    prefix: number of leading deterministic steps (Resize / CenterCrop) whose output an
        evaluation cache can store once.
    """

    steps: list[Callable]
    crop_at: int | None
    prefix: int

    @property
    def prefix_steps(self) -> str:
        """The deterministic prefix as text: part of an evaluation cache's key."""
        return " | ".join(repr(s) for s in self.steps[: self.prefix])


def _plan(transform: Callable | None) -> _Plan | None:
    """The plan for a transform, None for transform=None (a [0, 1] tensor of the image)."""
    if transform is None:
        return None
    steps = _flatten(transform)
    if not getattr(transform, "grey_input", False):
        steps = [GreyToRGB(), *steps]  # such transforms get the 3-channel image
    crop_at = None
    for i, step in enumerate(steps):
        if isinstance(step, _random_resized_crops()):
            crop_at = i
        if not isinstance(step, GreyToRGB):
            break
    prefix = 0
    while prefix < len(steps) and type(steps[prefix]) in (T.Resize, T.CenterCrop):
        prefix += 1
    return _Plan(steps, crop_at, prefix)


def _apply(steps: list[Callable], img: Image.Image | torch.Tensor) -> torch.Tensor:
    """Apply steps in order, as Compose does (without building one per image)."""
    for step in steps:
        img = step(img)
    return img  # type: ignore[return-value]


@dataclass(eq=False, repr=False)
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
        dicom_scaling: the DICOM intensity rule ('paper' or 'minmax', see datasets.imageio).
        eval_cache: stored output of the transform's deterministic prefix, or None.

    An exact cache gives the same tensors as the original files for the same random state:
    the pixels are the decoded originals, a random resized crop draws its parameters as it
    would from the full image and reads only the crop's rows, and an evaluation cache holds
    the very bytes Resize + CenterCrop give.
    """

    paths: list[str]
    targets: np.ndarray
    class_names: list[str]
    kind: str
    split_file: Path
    files: list[str]
    lines: list[int]
    transform: Callable | None = None
    cache: ImageCache | None = None
    skipped: list[BadEntry] | None = None
    dicom_scaling: str = "minmax"
    eval_cache: EvalCache | None = None

    def __post_init__(self) -> None:
        assert len(self.paths) == len(self.targets) == len(self.files) == len(self.lines), (
            "paths, targets, files, lines differ in length")
        assert self.targets.ndim == 2 and self.targets.shape[1] == len(self.class_names), (
            f"targets of shape {self.targets.shape} do not match {len(self.class_names)} class names"
        )
        self.skipped = self.skipped or []

    @property
    def num_classes(self) -> int:
        """K, the number of labels per image."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def cache_info(self) -> dict:
        """What the images are read from, for config.json and results: kind 'exact' | 'lossy' | 'none'."""
        info = self.cache.info if self.cache is not None else {"kind": "none", "size": None, "dir": None}
        plan = _plan(self.transform)
        crop_resize = kernel_name() if plan is not None and plan.crop_at is not None else None
        return {**info, "dicom_scaling": self.dicom_scaling,
                "eval_cache": self.eval_cache.name if self.eval_cache is not None else None,
                "crop_resize": crop_resize}

    def __repr__(self) -> str:
        source = "original files"
        if self.cache is not None:
            kind = "exact" if self.cache.exact else f"LOSSY {self.cache.size}px"
            source = f"{kind} cache {self.cache.cache_dir}" + (" + evaluation cache" if self.eval_cache else "")
        return (f"{type(self).__name__}(kind={self.kind!r}, split_file='{self.split_file}', "
                f"images={len(self)}, classes={self.num_classes}, skipped={len(self.skipped)}, from {source})")

    def load_image(self, index: int) -> Image.Image:
        """The decoded 8-bit grey image of entry `index` (from the cache when there is one)."""
        if self.cache is not None:
            return self.cache.get(self.paths[index])
        try:
            return load_image(self.files[index], dicom_scaling=self.dicom_scaling)
        except (OSError, ValueError) as err:
            # Lazy check: decoding errors surface here, naming the split-file line at fault.
            raise ImageError(
                f"{self.split_file}:{self.lines[index]}: image '{self.paths[index]}' "
                f"({self.files[index]}) cannot be read: {err}. Build the image cache "
                f"(python -m datasets.cache) to find every bad image before training; --skip_bad "
                f"drops them."
            ) from err

    def _resized_crop(self, index: int, plan: _Plan, image: Image.Image | None = None) -> torch.Tensor:
        """The transform with its random resized crop done here: from the cache only the crop's
        rows are read, and a grey crop is resized by `resize_grey` (Pillow's bytes, faster).

        `image` is the decoded original (8-bit grey, as `load_image` gives); None reads the
        cache. The random draws are those the crop step makes on the full image: its box, then
        (timm) its interpolation.
        """
        assert plan.crop_at is not None
        crop = plan.steps[plan.crop_at]
        path = self.paths[index]
        height, width = self.cache.shape(path) if image is None else (image.height, image.width)
        # get_params only reads the size: the same random draws as on the full image.
        probe = torch.empty(1, 1, 1).expand(1, height, width)
        top, left, h, w = crop.get_params(probe, crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, (tuple, list)):  # timm's random interpolation, drawn after the box
            interpolation = random.choice(interpolation)
        size = tuple(crop.size) if isinstance(crop.size, (tuple, list)) else (crop.size, crop.size)
        region = (self.cache.region(path, top, left, h, w) if image is None
                  else np.asarray(image)[top: top + h, left: left + w])
        filter_ = _PIL_FILTERS.get(interpolation)
        if plan.crop_at == 0 and filter_ is not None:
            img = Image.fromarray(resize_grey(region, size, filter_), mode="L")
        else:
            img = _apply(plan.steps[: plan.crop_at], Image.fromarray(np.ascontiguousarray(region), mode="L"))
            # resized_crop = crop + resize; the region already is the crop, so only the resize is left.
            img = TF.resize(img, list(size), interpolation, antialias=getattr(crop, "antialias", True))
        return _apply(plan.steps[plan.crop_at + 1:], img)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = _plan(self.transform)
        if plan is None:
            image = to_float_tensor(self.load_image(index))
        elif (self.eval_cache is not None and plan.prefix
              and self.eval_cache.steps == plan.prefix_steps):
            image = _apply(plan.steps[plan.prefix:], self.eval_cache.get(index))
        elif plan.crop_at is not None:  # from the cache, only the crop's rows are read
            image = self._resized_crop(index, plan,
                                       None if self.cache is not None else self.load_image(index))
        else:
            image = apply_transform(self.transform, self.load_image(index))
        target = torch.from_numpy(self.targets[index].astype(np.float32))
        return image, target


def _open_fails(check: Callable[[str], object], file: str) -> str:
    """'' if ``check(file)`` (decoding the image, or opening its header) succeeds, else the reason."""
    try:
        check(file)
        return ""
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def _report(bad: list[BadEntry]) -> str:
    """A few bad entries, one a line, and how many more there are."""
    shown = "\n  ".join(str(b) for b in bad[:_LIST_AT_MOST])
    more = f"\n  ... and {len(bad) - _LIST_AT_MOST} more" if len(bad) > _LIST_AT_MOST else ""
    return f"\n  {shown}{more}"


# The cache modes that insist on their cache: a cache they cannot read is an error.
_REQUIRED = ("on", "lossy")


def _stale_error(cache_dir: Path, split_file: Path, reason: str, rebuild: str) -> CacheError:
    """The error of a required cache that cannot serve `split_file`."""
    return CacheError(f"cache {cache_dir} is stale for {split_file}: {reason}; {rebuild}")


def _open_cache(mode: str, cache_dir: Path | None, data_path: Path, split_file: Path,
                cache_size: int | None, dicom_scaling: str) -> ImageCache | None:
    """The cache to read `split_file` from (default folder unless `cache_dir`), None to read
    originals; raises if mode 'on' / 'lossy' cannot be met.

    Mode 'auto' reads no cache where there is none (silently) or where it cannot serve this
    split (with a warning saying why: another format, damaged, stale, lossy).
    """
    if mode == "off":
        return None
    try:
        if cache_dir is None:
            cache_dir = find_lossy_cache_dir(data_path, cache_size) if mode == "lossy" else default_cache_dir(data_path)
        if mode == "auto" and not (cache_dir / "meta.json").is_file():
            return None  # no cache: the files, as asked
        cache = ImageCache(cache_dir)
    except CacheError as err:
        if mode in _REQUIRED:
            if cache_dir is not None and (cache_dir / "meta.json").is_file():
                raise  # the message says what is wrong with the cache and how to rebuild it
            raise CacheError(f"{err}; build it with `python -m datasets.cache --data_path {data_path}`"
                             + (" --size N" if mode == "lossy" else "")) from err
        logger.warning("not using the cache: %s (reading the original images)", err)
        return None
    if mode == "lossy" and cache.exact:
        raise CacheError(f"cache {cache.cache_dir} is exact, not lossy: read it with --cache on")
    if mode != "lossy" and not cache.exact:
        reason = (f"cache {cache.cache_dir} is LOSSY (images downsized to shorter side {cache.size}), so its "
                  f"tensors differ from the originals'; only --cache lossy reads it")
        if mode == "on":
            raise CacheError(reason)
        logger.warning("not using %s; reading the original images", reason)
        return None
    rebuild = REBUILD_HINT + (f" --size {cache_size}" if mode == "lossy" else "")
    stale = cache.check(split_file, dicom_scaling, cache_size if mode == "lossy" else None)
    if stale:
        if mode in _REQUIRED:
            raise _stale_error(cache.cache_dir, split_file, stale, rebuild)
        logger.warning("ignoring stale cache %s for %s: %s (reading the original images; %s)",
                       cache.cache_dir, split_file.name, stale, rebuild)
        return None
    if not cache.exact:
        logger.warning("reading the LOSSY cache %s: images downsized to shorter side %d, so training crops and "
                       "evaluation resample a smaller image than the originals' (not the paper's pipeline)",
                       cache.cache_dir, cache.size)
    return cache


def _unless_originals_changed(cache: ImageCache, mode: str, table: SplitTable, files: list[str],
                              split_file: Path, num_threads: int) -> ImageCache | None:
    """The cache, or None ('auto', warned) when an original image changed since it was built."""
    changed = cache.changed_originals(table.paths, files, num_threads)
    if not changed:
        return cache
    file, why = changed[0]
    reason = f"{len(changed)} original images changed since the cache was built, e.g. {file} {why}"
    if mode in _REQUIRED:
        raise _stale_error(cache.cache_dir, split_file, reason, REBUILD_HINT)
    logger.warning("ignoring stale cache %s: %s (reading the original images)", cache.cache_dir, reason)
    return None


def read_split(split: str, data_path: Path, data_size: str, split_dir: str | Path | None,
                kind: str) -> tuple[Path, SplitTable, list[str]]:
    """The split file, its parsed entries and the K class names (``class_<k>`` where no file names them)."""
    split_file = locate_split_file(split, data_path, data_size, split_dir)
    class_names, classes_file = split_class_names(kind, [split_file.parent, data_path])
    table = parse_split_file(split_file, len(class_names) if class_names else None, kind, classes_file)
    if class_names is None:
        check_label_columns(split_file, table.targets.shape[1])
        class_names = [f"class_{k}" for k in range(table.targets.shape[1])]
    return split_file, table, class_names


def _bad_in_cache(cache: ImageCache, table: SplitTable, split_file: Path) -> list[BadEntry]:
    """The entries the cache's build found bad; raises if the cache lacks an image of the split."""
    missing = [p for p in table.paths if p not in cache.row]
    if missing:  # cannot happen for an unchanged split file unless the cache was edited
        raise CacheError(f"cache {cache.cache_dir} lacks {len(missing)} images of {split_file}, "
                         f"e.g. '{missing[0]}'; rebuild it")
    return [BadEntry(split_file, line, path, cache.bad[path])
            for path, line in zip(table.paths, table.lines) if path in cache.bad]


def _bad_originals(table: SplitTable, files: list[str], split_file: Path, kind: str, check_files: bool,
                   skip_bad: bool, verify: str, dicom_scaling: str, num_threads: int) -> list[BadEntry]:
    """The entries whose original image is missing (`check_files`; raises unless `skip_bad`), or, with
    `verify` or `skip_bad`, fails to decode ('full' or `skip_bad`) or its header to open: in line order."""
    bad = [BadEntry(split_file, line, path, f"file not found: {file}")
           for path, line, file in zip(table.paths, table.lines, files)
           if check_files and not os.path.isfile(file)]
    if bad and not skip_bad:
        raise ImageError(f"{len(bad)} of {len(table)} images of {split_file} are missing "
                         f"(kind '{kind}' resolves paths as e.g. {files[0]}):{_report(bad)}\n"
                         f"Check --data_path / --dataset, or pass --skip_bad to skip them.")
    if verify == "none" and not skip_bad:
        return bad
    seen = {b.path for b in bad}
    todo = [i for i, p in enumerate(table.paths) if p not in seen]
    full = verify == "full" or skip_bad
    check = (lambda f: load_image(f, dicom_scaling=dicom_scaling)) if full else check_image_header
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        reasons = list(pool.map(lambda f: _open_fails(check, f), [files[i] for i in todo]))
    bad += [BadEntry(split_file, table.lines[i], table.paths[i], r) for i, r in zip(todo, reasons) if r]
    return sorted(bad, key=lambda b: b.line)


def _drop_bad(table: SplitTable, files: list[str], bad: list[BadEntry], split_file: Path,
              skip_bad: bool) -> list[str]:
    """Remove the bad entries from `table` (logged) and return the files kept; raises unless `skip_bad`."""
    if bad and not skip_bad:
        raise ImageError(f"{len(bad)} of {len(table)} images of {split_file} cannot be read:{_report(bad)}\n"
                         f"Pass --skip_bad to skip them.")
    if not bad:
        return files
    logger.warning("skipping %d of %d images of %s:%s", len(bad), len(table), split_file, _report(bad))
    drop = {b.path for b in bad}
    keep = [i for i, p in enumerate(table.paths) if p not in drop]
    if not keep:
        raise SplitFileError(f"{split_file}: every one of its {len(table)} images is bad:{_report(bad)}")
    table.paths = [table.paths[i] for i in keep]
    table.lines = [table.lines[i] for i in keep]
    table.targets = table.targets[keep]
    return [files[i] for i in keep]


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
    verify_images: bool | str = False,
    cache_dir: str | Path | None = None,
    cache_size: int | None = None,
    num_threads: int = 8,
    dicom_scaling: str | None = None,
    eval_cache: bool = True,
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
        cache: one of `CACHE_MODES` (see datasets.imagecache; the lossy kind is warned about and
            shown in ``cache_info``); True / False mean 'on' / 'off'. A cache that cannot serve
            the split (stale, of another format, damaged) makes 'on' / 'lossy' raise CacheError
            naming the cause (the first changed image) and how to rebuild; 'auto' logs that
            warning and reads the split's original files.
        skip_bad: drop missing or undecodable images (all are decoded once to find them)
            instead of raising; they are listed in ``.skipped`` and logged.
        check_files: check that every image exists (cheap; the cache makes it unnecessary).
            With a cache, check instead that no original changed since the cache was built
            (one stat per image; see `ImageCache.changed_originals`).
        verify_images: 'header' (cheap: every file's header opens; use it for val / test so a
            run cannot fail at its first validation), 'full' or True (decode every image now;
            slow on a full data set), 'none' or False (a bad image fails when first loaded).
            Not needed when reading a cache, whose build decoded every image.
        cache_dir: cache folder (default ``<data_path>/_cache``, lossy: ``_cache_<N>px``).
        cache_size: with cache='lossy': the size of the lossy cache to read (None: the only one).
        num_threads: threads used to check or decode images, and to make an evaluation cache.
        dicom_scaling: DICOM intensity rule, 'paper' (x * 255 / max) or 'minmax'; default
            'paper' for RSNA, 'minmax' for the other kinds (see datasets.imageio).
        eval_cache: when reading a cache and the transform begins with deterministic steps
            (the evaluation transform's Resize + CenterCrop), store their output once in the
            cache folder and read it from then on: no resampling per epoch, same tensors.
    """
    mode = {True: "on", False: "off"}.get(cache, cache) if isinstance(cache, bool) else cache
    check_cache_options(mode, cache_size)
    verify_modes = {True: "full", False: "none", None: "none"}
    verify = verify_modes.get(verify_images, verify_images)  # type: ignore[arg-type]
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify_images={verify_images!r}: expected one of {list(VERIFY_MODES)} "
                         f"(or True / False)")
    data_path, kind = resolve_data_path(data_path, dataset)
    scaling = dicom_scaling_for(kind, dicom_scaling)
    split_file, table, class_names = read_split(split, data_path, data_size, split_dir, kind)
    files = resolve_image_paths(data_path, table.paths, kind)

    image_cache = _open_cache(mode, Path(cache_dir) if cache_dir else None, data_path, split_file,
                              cache_size, scaling)
    if image_cache is not None and check_files:
        image_cache = _unless_originals_changed(image_cache, mode, table, files, split_file, num_threads)
    if image_cache is not None:
        bad = _bad_in_cache(image_cache, table, split_file)
    else:
        bad = _bad_originals(table, files, split_file, kind, check_files, skip_bad, verify, scaling, num_threads)
    files = _drop_bad(table, files, bad, split_file, skip_bad)

    stored, plan = None, _plan(transform)
    if image_cache is not None and eval_cache and plan is not None and plan.prefix:
        stored = open_eval_cache(image_cache, plan.prefix_steps, table.paths,
                                 T.Compose(plan.steps[: plan.prefix]), num_threads)
    ds = ChestXrayDataset(table.paths, table.targets, class_names, kind, split_file, files,
                          table.lines, transform, image_cache, bad, scaling, stored)
    logger.info("%s", ds)
    return ds
