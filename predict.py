"""Predict class probabilities for new chest X-rays with a trained checkpoint or a merged export.

    python predict.py --checkpoint output/nih_1/checkpoint-best --inputs scans/ --output preds.csv
    python predict.py --checkpoint export/nih_1_mrm_lora --inputs a.png b.dcm --threshold 0.5
    python predict.py --checkpoint output/nih_1/checkpoint-best \\
        --inputs DatasetsSplits/NIH_ChestX-ray/test_list.txt --data_path data/NIH_ChestX-ray
    python predict.py ... --heatmap_class Effusion --heatmap_dir heatmaps/

Inputs are image files (PNG 8/16-bit, JPEG, DICOM, ...), folders (searched recursively)
and split files (``*.txt``, one ``relative/path [labels...]`` a line). The CSV has one row
per readable image: ``path`` (as given; for split files the relative path as written
there, so it joins with ``predictions_test.csv`` of ``--eval``), one sigmoid probability
per class (calibrated, sigmoid(logit / T), when the checkpoint carries the temperature its
run's final test fitted on validation, unless ``--no_calibrated``; the log and the last
line say which), and with ``--threshold`` (a number, a JSON table, or an operating point
stored in the checkpoint: youden, sens90, ...) the 0/1 ``pred_<class>`` columns. Unreadable inputs
are logged, listed in ``<output stem>_failed.csv`` and skipped; only regular files are
read (a FIFO, socket or device is listed there, never opened). Images whose model output
is NaN or infinite are never written as probabilities: they are listed there too.

No output replaces a file the user has: an existing ``--output`` (or its ``_failed.csv``,
or a heatmap) needs ``--overwrite``; an output that is a symbolic link, one of the inputs
(an image, a split file, the checkpoint) or a file of a training run is refused.

Exit codes: 0 every input predicted; 1 failure (an output could not be written, or no
image could be predicted); 2 usage (a bad flag, an input or output refused, a checkpoint
that is missing, damaged, not a checkpoint or holds NaN weights; nothing written); 3 some
inputs could not be read (the rest were predicted and written); 4 the model gave
non-finite outputs for some images (the others were written).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import methods
from util import cli
from util.cli import ToolError, UsageError
from util.io import OutputError, write_csv
from util.precision import AMP_CHOICES, autocast
from util.precision import resolve_amp as precision_resolve_amp
from util.reports import check_outputs, write_predictions_csv
from util.runfolder import probe_writable

if TYPE_CHECKING:
    from checkpoints import StoredCalibration
    from models_vit_lora import ModelConfig

logger = logging.getLogger("predict")

# Files a folder search picks up; files named explicitly are tried whatever their suffix.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".bmp",
                            ".tif", ".tiff", ".webp"})
SPLIT_SUFFIXES = frozenset({".txt"})
DATASET_CHOICES = ("nih", "chexpert", "rsna", "custom")
PROG = "predict.py"
# Exit codes beyond util.cli's 0 / 1 (failure) / 2 (usage): the CSV was written, but not
# for every input.
EXIT_SOME_FAILED = 3  # some inputs could not be read; the rest were predicted and written
EXIT_NON_FINITE = 4   # the model, not an input, failed: non-finite outputs for some images
# Failure reason of an image whose logits are NaN or infinite (matched by ``run``).
NON_FINITE_REASON = "non-finite model output"
SHOWN = 5  # inputs named in a one-line message


@dataclass(frozen=True)
class InputImage:
    """One image to predict: its name in the CSV and the file to read."""

    name: str
    file: Path


@dataclass(frozen=True)
class Failure:
    """An input that could not be predicted, and why."""

    name: str
    file: str
    reason: str


# -- Inputs -------------------------------------------------------------------------------

def not_regular_reason(path: str | Path) -> str | None:
    """Why ``path`` is not opened as an image, or None for a regular (or missing) file.

    Only regular files are read: a FIFO blocks the read forever and a device never ends.
    A missing file is left to the image reader, which names it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not a regular file (a broken symbolic link); not read" if os.path.islink(path) else None
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a folder" if stat.S_ISDIR(mode) else "a special file")
    return f"not a regular file ({kind}); not read"


def _walk_images(folder: Path) -> tuple[list[Path], list[Failure]]:
    """Image files under ``folder``, recursively, sorted, and the entries with an image
    suffix that are not regular files (failures, never opened); hidden entries skipped."""
    found: list[Path] = []
    special: list[Failure] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(root) / name
            reason = not_regular_reason(path)
            if reason is None:
                found.append(path)
            else:
                special.append(Failure(str(path), str(path), reason))
    return found, special


def read_split_paths(split_file: Path) -> list[str]:
    """Relative image paths of a split file: the first field of every non-blank line
    (a UTF-8 byte-order mark, as some editors write, is not part of the first path)."""
    try:
        text = split_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{split_file}: not a text split file ({err})") from err
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def collect_inputs(inputs: Sequence[str | Path], data_path: str | Path | None = None,
                   dataset: str | None = None) -> tuple[list[InputImage], list[Failure]]:
    """Expand files, folders and split files into images; missing inputs become failures.

    Split-file paths are resolved with the data set's rule (``nih``:
    ``<data_path>/all_classes/<name>``, else ``<data_path>/<path>``); ``data_path``
    defaults to the split file's folder and ``dataset`` to one inferred from it. Inputs
    that are not regular files (a FIFO, a socket, a device) are failures, never opened.
    """
    from datasets import infer_dataset_kind, resolve_image_path

    images: list[InputImage] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found, unread = _walk_images(path)
            if not found and not unread:
                logger.warning("%s: no image files (%s) in this folder", path,
                               " ".join(sorted(IMAGE_SUFFIXES)))
            images.extend(InputImage(str(f), f) for f in found)
            failures.extend(unread)
        elif (special := not_regular_reason(path)) is not None:
            failures.append(Failure(str(item), str(path), special))
        elif path.is_file() and path.suffix.lower() in SPLIT_SUFFIXES:
            root = Path(data_path) if data_path is not None else path.parent
            if not root.is_dir():
                raise UsageError(f"--data_path {root} is not a folder (needed for split file {path})")
            try:
                kind = dataset or infer_dataset_kind(root)
            except ValueError as err:  # a folder name that suggests two data set kinds
                raise UsageError(f"--inputs {path}: {err}") from None
            names = read_split_paths(path)
            if not names:
                logger.warning("%s: split file has no entries", path)
            images.extend(InputImage(n, resolve_image_path(root, n, kind)) for n in names)
        elif path.is_file():
            images.append(InputImage(str(item), path))
        else:
            failures.append(Failure(str(item), str(path), "file not found"))
    return images, failures


# -- Model, transform, precision ----------------------------------------------------------

def load_model(checkpoint: str | Path, finetune: str | Path | None = None,
               device: str | torch.device = "cpu",
               allow_unsafe_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model in eval mode and its config, from an adapter checkpoint or a merged export.

    A run folder stands for its ``checkpoint-best``; ``allow_unsafe_pickle`` unpickles its
    pre-trained file without the guard (for one trained with --unsafe_load).
    """
    from checkpoints import is_merged_export, load_merged, load_trained, resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    if is_merged_export(checkpoint):
        if finetune:
            logger.info("--finetune ignored: %s is a merged export holding every tensor", checkpoint)
        return load_merged(checkpoint, device)
    model, config = load_trained(checkpoint, finetune, device, allow_unsafe_pickle=allow_unsafe_pickle)
    methods.get(config.method).merge(model)  # inference at the cost of a plain ViT
    return model, config


def eval_transform(config: "ModelConfig") -> Callable[[Any], torch.Tensor]:
    """The evaluation transform a checkpoint was trained for (recipe, input size, normalisation)."""
    from datasets import NORM_STATS, build_transform

    norm = config.norm
    if norm not in NORM_STATS:
        raise UsageError(f"checkpoint normalisation {norm!r} is not one of {list(NORM_STATS)}")
    mean = config.mean
    if mean is not None and not np.allclose(mean, NORM_STATS[norm][0], atol=1e-6):
        logger.warning("checkpoint mean %s differs from the statistics of norm %r %s; using the "
                       "latter", mean, norm, NORM_STATS[norm][0])
    try:
        return build_transform(is_train=False, recipe=config.eval_recipe,
                               input_size=config.img_size, norm=norm)
    except ValueError as err:
        raise UsageError(f"checkpoint config: {err}") from None


def dicom_scaling(config: "ModelConfig") -> str:
    """The DICOM intensity rule a model was trained with (a merged export: its data set's default)."""
    from datasets.imageio import dicom_scaling_for

    return dicom_scaling_for(config.dataset or "custom", config.dicom_scaling)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp`` on ``device`` (the trainer's rule); None means fp32."""
    try:
        return precision_resolve_amp(amp, device)
    except ValueError as err:
        raise UsageError(str(err)) from None


# -- Prediction ---------------------------------------------------------------------------

class ImageFiles(Dataset):
    """Decodes and transforms image files; an unreadable file yields its error, not an exception."""

    def __init__(self, files: Sequence[str | Path], transform: Callable[[Any], torch.Tensor],
                 dicom_scaling: str = "minmax") -> None:
        self.files = [Path(f) for f in files]
        self.transform = transform
        self.dicom_scaling = dicom_scaling

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        from datasets import load_image
        from datasets.transforms import apply_transform

        reason = not_regular_reason(self.files[index])
        if reason is not None:  # e.g. a FIFO listed in a split file: opening it would block
            return index, None, reason
        try:
            img = load_image(self.files[index], dicom_scaling=self.dicom_scaling)
            return index, apply_transform(self.transform, img), ""
        except Exception as err:  # one bad file must not stop the batch: report it instead
            return index, None, f"{type(err).__name__}: {err}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]
             ) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    ok = [(i, t) for i, t, _ in batch if t is not None]
    failed = {i: reason for i, t, reason in batch if t is None}
    images = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], images, failed


def predict_images(model: nn.Module, config: "ModelConfig", paths: Sequence[str | Path],
                   batch_size: int = 32, device: str | torch.device = "cpu",
                   amp: str | torch.dtype | None = "none", num_workers: int = 0,
                   transform: Callable[[Any], torch.Tensor] | None = None, progress: bool = False,
                   temperatures: Sequence[float] | np.ndarray | None = None
                   ) -> tuple[np.ndarray, dict[int, str]]:
    """Sigmoid probabilities (N x K, NaN rows for failed images) and {index: reason} of failures.

    ``amp`` is an ``--amp`` choice or a dtype (None: fp32). The model should already be on
    ``device`` and in eval mode. An image whose logits are NaN or infinite is a failure
    (reason starting with ``NON_FINITE_REASON``), never a row of probabilities.
    ``temperatures`` (one per class, e.g. the checkpoint's calibration): probabilities
    sigmoid(logit / T) instead of sigmoid(logit).
    """
    from tqdm import tqdm

    device = torch.device(device)
    dtype = resolve_amp(amp, device) if isinstance(amp, str) else amp
    transform = transform if transform is not None else eval_transform(config)
    num_classes = config.num_classes
    scale = None if temperatures is None else torch.as_tensor(np.asarray(temperatures),
                                                             dtype=torch.float32)
    probs = np.full((len(paths), num_classes), np.nan, dtype=np.float32)
    failures: dict[int, str] = {}
    loader = DataLoader(ImageFiles(paths, transform, dicom_scaling(config)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    model.eval()
    with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar, \
            torch.inference_mode():
        for indices, images, failed in loader:
            failures.update(failed)
            if images is not None:
                images = images.to(device, non_blocking=True)
                with autocast(device, dtype):
                    logits = model(images)
                logits = logits.float().cpu()
                finite = torch.isfinite(logits).all(dim=1)
                # sigmoid(inf) = 1 would pass for a confident positive: refuse it like NaN.
                for row in (~finite).nonzero().flatten().tolist():
                    bad = torch.isfinite(logits[row]).logical_not().nonzero().flatten().tolist()
                    failures[indices[row]] = (f"{NON_FINITE_REASON} (NaN or inf logits for "
                                              f"{len(bad)} of {num_classes} classes)")
                keep = [i for i, ok in zip(indices, finite.tolist()) if ok]
                kept = logits[finite] if scale is None else logits[finite] / scale
                probs[keep] = torch.sigmoid(kept).numpy()
            bar.update(len(indices) + len(failed))
    return probs, failures


# -- Output -------------------------------------------------------------------------------

def parse_threshold(value: str | None, class_names: Sequence[str],
                    calibration: "StoredCalibration | None" = None, *, calibrated: bool = False,
                    checkpoint: str | Path = "the checkpoint") -> np.ndarray | None:
    """Per-class thresholds from ``--threshold``: one number for all classes, a JSON file
    mapping every class name to its threshold, or a kind of operating point
    (``THRESHOLD_KINDS``) read from the checkpoint's ``calibration`` on the probability
    scale written (``calibrated`` or the model's own; NaN for a class without one, logged)."""
    from util.operating_points import THRESHOLD_KINDS

    if value is None:
        return None
    if value in THRESHOLD_KINDS:
        if calibration is None:
            raise UsageError(f"--threshold {value}: {checkpoint} carries no validation "
                             "thresholds (the final test of a training run stores them); give a "
                             "number or a JSON file")
        values = calibration.threshold_probabilities(value, class_names, calibrated=calibrated)
        if np.isnan(values).any():
            logger.warning("--threshold %s: no threshold for %s (a single label value in the "
                           "validation split): their pred_ cells are empty", value,
                           ", ".join(c for c, t in zip(class_names, values) if np.isnan(t)))
        return values
    try:
        t = float(value)
    except ValueError:
        path = Path(value)
        if not path.is_file():
            raise UsageError(f"--threshold {value!r}: neither a number, a JSON file nor one of "
                             f"{'|'.join(THRESHOLD_KINDS)}") from None
        try:
            table = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"--threshold {path}: not a readable JSON file ({err})") from None
        if not isinstance(table, dict):
            raise UsageError(f"--threshold {path}: expected an object {{class name: threshold}}")
        missing = [c for c in class_names if c not in table]
        if missing:
            raise UsageError(f"--threshold {path}: no threshold for classes {missing}")
        values = np.array([float(table[c]) for c in class_names])
    else:
        values = np.full(len(class_names), t)
    if not np.all((values > 0) & (values < 1)):
        raise UsageError(f"--threshold {value}: thresholds must lie strictly between 0 and 1")
    return values


def failures_path(output: str | Path) -> Path:
    """Where the list of failed inputs goes: ``<output stem>_failed.csv``."""
    output = Path(output)
    return output.with_name(f"{output.stem}_failed.csv")


# -- Command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (whole names only: ``--input`` is no ``--inputs``)."""
    p = cli.Parser(
        prog=PROG,
        description="Predict chest X-ray findings with a trained checkpoint or a merged export.",
        epilog="Exit codes: 0 every input predicted; 1 failure (an output could not be written, "
               "or no image could be predicted); 2 usage error, nothing written; 3 some inputs "
               "could not be read (the rest were predicted and written); 4 non-finite model "
               "outputs for some images (the others were written).",
        formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="adapter checkpoint (stem, .safetensors or .json, e.g. "
                        "output/run/checkpoint-best; a run folder means its checkpoint-best) "
                        "or a merged export of export.py")
    p.add_argument("--finetune", default=None,
                   help="pre-trained file the adapter was trained on (default: the path "
                        "recorded in the checkpoint; not needed for a merged export)")
    p.add_argument("--unsafe_load", action="store_true",
                   help="DANGEROUS: unpickle --finetune without the weights-only guard (for a "
                        "checkpoint trained with --unsafe_load)")
    p.add_argument("--inputs", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (recursive) and split files (*.txt)")
    p.add_argument("--data_path", default=None,
                   help="data folder resolving split-file paths (default: the split file's folder)")
    p.add_argument("--dataset", default=None, choices=DATASET_CHOICES,
                   help="path rule for split files: nih -> <data_path>/all_classes/<name>, "
                        "else <data_path>/<path> (default: inferred from --data_path)")
    p.add_argument("--output", default="predictions.csv",
                   help="CSV to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output, its _failed.csv and heatmaps")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=2, help="decoding processes (0: in-process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on GPUs and CPUs that compute it natively, "
                        "fp16 on older GPUs, fp32 on other CPUs; none = fp32")
    p.add_argument("--threshold", default=None,
                   help="add 0/1 pred_<class> columns: one threshold for all classes, a JSON "
                        "file {class name: threshold}, or youden|sens90|sens95|spec90|spec95: "
                        "the operating points chosen on validation and stored in the checkpoint")
    calibrated = p.add_mutually_exclusive_group()
    calibrated.add_argument("--calibrated", dest="calibrated", action="store_true", default=None,
                            help="write probabilities calibrated by the temperature stored in "
                                 "the checkpoint (default when it carries one)")
    calibrated.add_argument("--no_calibrated", dest="calibrated", action="store_false",
                            help="write the model's own probabilities sigmoid(logit)")
    p.add_argument("--heatmap_class", nargs="+", default=None, metavar="NAME",
                   help="write a Grad-CAM overlay PNG per image for these classes ('all': every class)")
    p.add_argument("--heatmap_dir", default=None,
                   help="folder of the heatmaps (default: <output stem>_heatmaps next to --output)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _heatmap_classes(requested: Sequence[str] | None, class_names: Sequence[str]) -> list[int]:
    """Class indices for ``--heatmap_class`` (names or 'all')."""
    if not requested:
        return []
    if "all" in requested:
        return list(range(len(class_names)))
    unknown = [c for c in requested if c not in class_names]
    if unknown:
        raise UsageError(f"--heatmap_class {unknown}: not classes of this checkpoint; choose "
                         f"from {list(class_names)} or 'all'")
    return [list(class_names).index(c) for c in requested]


def _named_inputs(args: argparse.Namespace, images: Sequence[InputImage]) -> list[Path]:
    """Every file the command reads: images, split files, the checkpoint, the pre-trained
    file and a threshold table (no output may be one of them)."""
    from checkpoints import checkpoint_paths, is_merged_export, read_config, resolve_checkpoint

    pretrained = args.finetune
    if pretrained is None:  # the file the checkpoint's config names, read by default
        try:
            checkpoint = resolve_checkpoint(args.checkpoint)
            pretrained = None if is_merged_export(checkpoint) else read_config(checkpoint).pretrained
        except (OSError, ValueError):
            pass  # loading the checkpoint names what is wrong with it
    named = [Path(p) for p in args.inputs if Path(p).is_file()]
    named += [*checkpoint_paths(args.checkpoint), *(Path(p) for p in (pretrained, args.threshold)
                                              if p is not None and Path(p).is_file())]
    return [*named, *(im.file for im in images)]


def _more(count: int) -> str:
    """' (+N more)' for the items of a one-line message beyond the first SHOWN."""
    return f" (+{count - SHOWN} more)" if count > SHOWN else ""


def _precision(dtype: torch.dtype | None) -> str:
    """The autocast dtype's name in messages (e.g. 'bfloat16'; 'fp32' without autocast)."""
    return "fp32" if dtype is None else str(dtype).replace("torch.", "")


def run(args: argparse.Namespace) -> int:
    """Predict, write the CSV (and heatmaps); return the exit code (0 every input predicted,
    EXIT_SOME_FAILED, EXIT_NON_FINITE). Usage errors and failures are raised (``cli.run``
    turns them into one line): every check that can refuse the command comes before the
    first file is written."""
    images, failures = _images_to_predict(args)
    output = Path(args.output)
    failed_csv = failures_path(output)
    inputs = _named_inputs(args, images)
    check_outputs("--output", [output, failed_csv], overwrite=args.overwrite, inputs=inputs)

    device = torch.device(args.device)
    dtype = resolve_amp(args.amp, device)
    try:
        model, config = load_model(args.checkpoint, args.finetune, device, args.unsafe_load)
    except (OSError, ValueError) as err:  # CheckpointError, ExportError, PretrainedWeightsError
        raise UsageError(f"--checkpoint {args.checkpoint}: {err}") from None
    class_names = list(config.class_names)
    calibration, calibrated = _calibration(args, config)
    thresholds = parse_threshold(args.threshold, class_names, calibration, calibrated=calibrated,
                                 checkpoint=args.checkpoint)
    heatmap_classes = _heatmap_classes(args.heatmap_class, class_names)
    transform = eval_transform(config)
    heatmap_dir = Path(args.heatmap_dir or output.with_name(f"{output.stem}_heatmaps"))
    if heatmap_classes:
        _check_heatmap_outputs(images, [class_names[k] for k in heatmap_classes], heatmap_dir,
                               overwrite=args.overwrite, inputs=inputs)
    # A read-only or unusable output folder is found before the images are predicted.
    probe_writable(output.parent)
    if heatmap_classes:
        probe_writable(heatmap_dir)

    temperatures = calibration.temperatures(class_names) if calibrated else None
    start = time.perf_counter()
    probs, failed = predict_images(
        model, config, [im.file for im in images], batch_size=args.batch_size, device=device,
        amp=dtype, num_workers=args.num_workers, transform=transform,
        progress=not args.no_progress and sys.stderr.isatty(), temperatures=temperatures)
    seconds = time.perf_counter() - start
    rate = len(images) / seconds if seconds > 0 else float("inf")
    good = [i for i in range(len(images)) if i not in failed]
    failures += [Failure(images[i].name, str(images[i].file), failed[i]) for i in sorted(failed)]
    non_finite = [f.name for f in failures if f.reason.startswith(NON_FINITE_REASON)]
    _log_failures(failures, non_finite, len(good) + len(non_finite), args.output, dtype)

    _write_results(output, failed_csv, [images[i].name for i in good], probs[good], failures,
                   class_names, thresholds, args.overwrite, images=len(images))
    if heatmap_classes:
        _write_heatmaps(model, config, [images[i] for i in good], heatmap_classes, heatmap_dir,
                        transform, batch_size=args.batch_size, dtype=dtype, temperatures=temperatures)
    print(_summary_line(len(good), failures, non_finite, failed_csv, output, device, dtype, rate,
                        _calibration_text(calibration, calibrated, class_names)))
    if non_finite:
        return EXIT_NON_FINITE
    return EXIT_SOME_FAILED if failures else 0


def _write_results(output: Path, failed_csv: Path, names: list[str], probs: np.ndarray,
                   failures: list[Failure], class_names: list[str], thresholds, overwrite: bool,
                   images: int) -> None:
    """The failure list, then the CSV of the images predicted (``names``); without
    ``overwrite``, neither replaces a file another command made meanwhile, and a refused CSV
    takes this command's new failure list with it."""
    _write_failure_list(failed_csv, failures, overwrite)
    if not names:  # a CSV of the header alone would pass for a result
        if overwrite:  # (one there was allowed by --overwrite: it is replaced)
            output.unlink(missing_ok=True)
        raise ToolError(f"none of the {images} images could be predicted (listed in "
                        f"{failed_csv}); {output} not written")
    try:
        write_predictions_csv(output, names, probs, class_names, thresholds=thresholds,
                              replace=overwrite)
    except OutputError:
        if failures and not overwrite:
            failed_csv.unlink(missing_ok=True)
        raise


def _images_to_predict(args: argparse.Namespace) -> tuple[list[InputImage], list[Failure]]:
    """The images named by ``--inputs`` and the inputs that failed already; refused when
    there is no image at all."""
    images, failures = collect_inputs(args.inputs, args.data_path, args.dataset)
    if images:
        return images, failures
    if failures:  # none of the inputs is an image that can be read
        shown = "; ".join(f"{f.name} ({f.reason})" for f in failures[:SHOWN])
        raise UsageError(f"--inputs: nothing to predict: {shown}{_more(len(failures))}")
    raise UsageError(f"--inputs {' '.join(args.inputs)}: no images found")


def _calibration(args: argparse.Namespace, config: "ModelConfig"
                 ) -> tuple["StoredCalibration | None", bool]:
    """The checkpoint's stored calibration (or None) and whether the probabilities written
    are calibrated (``--calibrated``, on by default when there is one; ``--no_calibrated``)."""
    from checkpoints import read_calibration

    try:
        calibration = read_calibration(config, args.checkpoint)
    except ValueError as err:
        raise UsageError(f"--checkpoint {args.checkpoint}: {err}") from None
    if args.calibrated and calibration is None:
        raise UsageError(f"--calibrated: {args.checkpoint} carries no calibration (the final "
                         "test of a training run stores one); leave the flag out")
    calibrated = calibration is not None and args.calibrated is not False
    logger.info("probabilities: %s", _calibration_text(calibration, calibrated, config.class_names))
    return calibration, calibrated


def _calibration_text(calibration: "StoredCalibration | None", calibrated: bool,
                      class_names: Sequence[str]) -> str:
    """Which probabilities the CSV holds, in words."""
    if calibration is None:
        return "uncalibrated (the checkpoint carries no calibration)"
    if not calibrated:
        return "uncalibrated (--no_calibrated)"
    from util.calibration import temperature_text

    return f"calibrated, {temperature_text(calibration.temperatures(class_names))}"


def _check_heatmap_outputs(images: Sequence[InputImage], classes: Sequence[str], heatmap_dir: Path,
                           *, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse, before predicting, heatmap files that ``check_outputs`` refuses, and two images
    with one name (they would write one heatmap file)."""
    from util.heatmap import heatmap_targets

    files, names = [im.file for im in images], [im.name for im in images]
    for name in classes:
        try:
            targets = heatmap_targets(files, names, name)
        except ValueError as err:
            raise UsageError(f"--heatmap_class: {err}") from None
        check_outputs("--heatmap_dir", [heatmap_dir / t for t in targets.values()],
                      overwrite=overwrite, inputs=inputs)


def _log_failures(failures: Sequence[Failure], non_finite: Sequence[str], predicted: int,
                  output: str, dtype: torch.dtype | None) -> None:
    """Log each input skipped, and in one line the images the model gave non-finite outputs
    for (of the ``predicted`` ones whose model outputs were computed)."""
    for f in failures:
        if not f.reason.startswith(NON_FINITE_REASON):
            logger.warning("skipped %s: %s", f.name, f.reason)
    if non_finite:
        cause = (f"an overflow in {_precision(dtype)}? try --amp none" if dtype is not None
                 else "is the model damaged?")
        logger.error("the model gave NaN or infinite outputs for %d of %d images, left out of "
                     "%s: %s%s (%s)", len(non_finite), predicted, output,
                     ", ".join(non_finite[:SHOWN]), _more(len(non_finite)), cause)


def _write_failure_list(path: Path, failures: Sequence[Failure], overwrite: bool) -> None:
    """Write the failed inputs as CSV (path, file, reason), or remove a list that would
    describe other inputs (one left by an earlier command, replaced with --overwrite; without
    it, a file there now was made by another command meanwhile: kept)."""
    if failures:
        write_csv(path, ["path", "file", "reason"], ([x.name, x.file, x.reason] for x in failures),
                  replace=overwrite)
    elif overwrite and path.is_file():
        path.unlink()


def _write_heatmaps(model: nn.Module, config: "ModelConfig", images: Sequence[InputImage],
                    classes: Sequence[int], heatmap_dir: Path,
                    transform: Callable[[Any], torch.Tensor], *, batch_size: int,
                    dtype: torch.dtype | None, temperatures: Sequence[float] | None) -> None:
    """A Grad-CAM overlay per image for each class index in ``classes``, read and resized
    as the images were for the prediction, labelled with the probability the CSV has
    (calibrated by ``temperatures`` when the predictions are)."""
    from functools import partial

    from datasets import load_image
    from datasets.transforms import eval_resize
    from util.heatmap import save_heatmaps

    load = partial(load_image, dicom_scaling=dicom_scaling(config))
    resize = eval_resize(config.img_size, config.eval_recipe)
    heatmaps = 0
    for k in classes:
        written, _ = save_heatmaps(
            model, [im.file for im in images], [im.name for im in images], k,
            config.class_names[k], heatmap_dir, transform, load, config.img_size, resize,
            batch_size=batch_size, amp_dtype=dtype,
            temperature=1.0 if temperatures is None else float(temperatures[k]))
        heatmaps += len(written)
    logger.info("wrote %d heatmaps to %s", heatmaps, heatmap_dir)


def _summary_line(predicted: int, failures: Sequence[Failure], non_finite: Sequence[str],
                  failed_csv: Path, output: Path, device: torch.device, dtype: torch.dtype | None,
                  rate: float, probabilities: str) -> str:
    """The one line a user greps for: what was predicted, what failed, where it went, how
    fast, and which probabilities (calibrated or not)."""
    return (f"predicted {predicted} images, {len(failures)} failed"
            f"{f' ({len(non_finite)} with non-finite model outputs)' if non_finite else ''}"
            f"{f' (listed in {failed_csv})' if failures else ''} -> {output} "
            f"[{device.type}, {_precision(dtype)}, {rate:.1f} img/s] probabilities {probabilities}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags, checked (a bad one exits 2 with one line); --checkpoint resolved."""
    from checkpoints import resolve_checkpoint

    args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size}: must be at least 1")
    if args.num_workers < 0:
        parser.error(f"--num_workers {args.num_workers}: must be at least 0")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible (use --device cpu)")


def main(argv: Sequence[str] | None = None) -> int:
    """The command inside its error boundary (``util.cli.main``): returns the exit code."""
    return cli.main(build_parser, run, argv, prog=PROG, check=check_args)


if __name__ == "__main__":
    sys.exit(main())
