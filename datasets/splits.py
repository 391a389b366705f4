"""Split files in the paper's format: finding, parsing and resolving their image paths.

A split file holds one image per line, ``relative/path L1 ... LK``: K integer 0/1 labels
separated by single spaces (RSNA lines end with a trailing space). Paths hold no spaces.
"""
from __future__ import annotations

import itertools
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .constants import ALL_SPLIT_FILES, CLASS_NAMES, DATASET_KINDS, SPLIT_FILES, TRAIN_SPLIT_FILES
from .errors import DataUsageError, SplitFileError

logger = logging.getLogger(__name__)

# The repository's own split folder: <repo>/DatasetsSplits/<basename of data_path>/.
DEFAULT_SPLITS_ROOT = Path(__file__).resolve().parents[1] / "DatasetsSplits"
CLASSES_FILE = "classes.txt"

# Substrings of a data folder's name -> kind (case-insensitive); a name that matches two
# kinds is refused rather than guessed.
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("nih", "nih"), ("chestx-ray14", "nih"), ("chestxray", "nih"), ("chexpert", "chexpert"),
    ("rsna", "rsna"),
)


@dataclass
class SplitTable:
    """The parsed content of one split file."""

    split_file: Path
    paths: list[str]
    targets: np.ndarray  # N x K uint8
    lines: list[int]  # 1-based line number of each entry, for error messages
    # Images listed more than once: path -> every line it is on (all entries are kept).
    duplicates: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


class SplitLike(Protocol):
    """Anything with a split file and its image paths: a SplitTable or a ChestXrayDataset.

    Optional: ``lines`` (the 1-based split-file line of each entry, for messages) and
    ``files`` (where each image lives; a ChestXrayDataset has them).
    """

    split_file: Path
    paths: list[str]


class SplitOverlapError(SplitFileError):
    """The same image is in the training split and in an evaluation split."""


# How many examples a duplicate or overlap message lists.
_EXAMPLES = 3


def folder_name(path: str | Path) -> str:
    """Base name of a folder as the user wrote it ('.' resolved), keeping symlinked names."""
    path = Path(path)
    return path.name or path.resolve().name


def infer_dataset_kind(data_path: str | Path) -> str:
    """Guess the data set kind ('nih', 'chexpert', 'rsna' or 'custom') from a data folder."""
    path = Path(data_path)
    name = folder_name(path).lower()
    kinds = sorted({kind for pattern, kind in _KIND_PATTERNS if pattern in name})
    if len(kinds) > 1:  # e.g. 'RSNA_ChestXray': guessing would read the labels wrongly
        raise DataUsageError(f"{path}: the folder's name suggests more than one data set kind "
                             f"({', '.join(kinds)}); pass --dataset")
    if kinds:
        return kinds[0]
    # A folder with NIH's layout (images under all_classes/), e.g. the synthetic demo set.
    if (path / "all_classes").is_dir():
        return "nih"
    return "custom"


def resolve_data_path(data_path: str | Path, dataset: str | None = None) -> tuple[Path, str]:
    """The data folder (checked) and its data set kind (given, or inferred from the folder)."""
    data_path = Path(data_path).expanduser()
    if not data_path.is_dir():
        what = "is a file, not a folder" if data_path.exists() else "does not exist"
        raise DataUsageError(f"--data_path {data_path}: {what} (expected the data set's folder)")
    kind = dataset or infer_dataset_kind(data_path)
    if kind not in DATASET_KINDS:
        raise DataUsageError(f"--dataset {kind!r}: expected one of {', '.join(DATASET_KINDS)}")
    return data_path, kind


def split_dir_candidates(data_path: str | Path, split_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for split files, in order."""
    if split_dir is not None:
        return [Path(split_dir)]
    data_path = Path(data_path)
    return [data_path, DEFAULT_SPLITS_ROOT / folder_name(data_path)]


def find_split_dir(data_path: str | Path, split_dir: str | Path | None = None) -> Path | None:
    """The first candidate folder that holds any of the five split files, or None."""
    for folder in split_dir_candidates(data_path, split_dir):
        if any((folder / name).is_file() for name in ALL_SPLIT_FILES):
            return folder
    return None


def locate_split_file(
    split: str,
    data_path: str | Path,
    data_size: str = "100%",
    split_dir: str | Path | None = None,
) -> Path:
    """Path of the split file for `split` ('train' / 'val' / 'test') and `data_size`; raises listing
    what was searched."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_FILES)}")
    if split == "train" and data_size not in TRAIN_SPLIT_FILES:
        raise DataUsageError(f"--data_size {data_size}: expected one of {', '.join(TRAIN_SPLIT_FILES)}")
    name = TRAIN_SPLIT_FILES[data_size] if split == "train" else SPLIT_FILES[split]
    folder = find_split_dir(data_path, split_dir)
    if folder is not None and (folder / name).is_file():
        return folder / name
    searched = [str(f) for f in split_dir_candidates(data_path, split_dir)]
    where = (
        f"the split folder {folder} lacks it" if folder is not None
        else "none of the folders searched holds any split file"
    )
    size = f" (--data_size {data_size})" if split == "train" else ""
    raise SplitFileError(
        f"split file '{name}' of the {split} split{size} not found ({where}). "
        f"Expected the split files {', '.join(ALL_SPLIT_FILES)} in one of: {', '.join(searched)}. "
        f"Pass --split_dir to point at them, or write them with "
        f"`python -m datasets.make_splits` (see DatasetsSplits/README.md)."
    )


def split_class_names(kind: str, folders: list[Path]) -> tuple[list[str] | None, Path | None]:
    """(class names, the classes.txt they came from) of a split of ``kind``: a known kind's
    fixed names (no file), else those of the first `classes.txt` in ``folders`` (one name a
    line), else (None, None)."""
    if kind in CLASS_NAMES:
        return list(CLASS_NAMES[kind]), None
    path = next((f / CLASSES_FILE for f in folders if (f / CLASSES_FILE).is_file()), None)
    if path is None:
        return None, None
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not part of the first name
    except UnicodeDecodeError as err:
        raise SplitFileError(f"{path}: not a text file of class names ({err})") from err
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise SplitFileError(f"{path}: class file is empty (expected one class name a line)")
    return names, path


def label_columns(split_file: str | Path) -> int | None:
    """The number of labels on the first entry of a split file; None if it has no readable entry."""
    try:
        with open(split_file, encoding="utf-8-sig") as f:
            for raw in f:
                tokens = raw.split()
                if tokens:
                    return len(tokens) - 1
    except (OSError, UnicodeDecodeError):
        pass  # reported when that file itself is parsed
    return None


def check_label_columns(split_file: str | Path, num_labels: int) -> None:
    """Refuse a split file whose K (``num_labels``) differs from that of another split file beside it.

    Without a classes.txt each file of a custom data set gives its own K; a validation or test
    file with another K than the training file would only fail once the model meets it.
    """
    split_file = Path(split_file)
    for name in ALL_SPLIT_FILES:
        other = split_file.parent / name
        if name == split_file.name or not other.is_file():
            continue
        found = label_columns(other)
        if found is not None and found != num_labels:
            raise SplitFileError(
                f"{split_file} has {num_labels} label columns but {other} has {found}: every split "
                f"file of a data set needs the same columns, in the same order (name them in a "
                f"{CLASSES_FILE} beside the split files to have each file checked against it)"
            )


def _is_number(token: str) -> bool:
    """Whether a split-file token reads as a number (a label, even a wrong one like 2 or -1)."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def _spaced_path(split_file: Path, line_no: int, tokens: list[str]) -> SplitFileError:
    """The error for a line whose image path holds a space: the path is what precedes its numbers."""
    labels = sum(1 for _ in itertools.takewhile(_is_number, reversed(tokens[1:])))
    path = " ".join(tokens[: len(tokens) - labels])
    if line_no == 1 and not any(map(_is_number, tokens)):
        shown = " ".join(tokens)
        return SplitFileError(f"{split_file}:1: '{shown[:60]}{'...' if len(shown) > 60 else ''}' "
                              "looks like a header: split files have none (each line is "
                              "'relative/path L1 ... LK'); remove that line")
    return SplitFileError(f"{split_file}:{line_no}: image path '{path}' contains a space: image paths "
                          f"may not contain spaces (each line is 'relative/path L1 ... LK', separated "
                          f"by single spaces)")


def parse_split_file(split_file: str | Path, num_classes: int | None = None, kind: str = "custom",
                     classes_file: str | Path | None = None) -> SplitTable:
    """Parse one split file, checking the label count (K) and that labels are 0 or 1.

    With ``num_classes=None`` (custom data sets without classes.txt) K is taken from the
    first line and every other line must agree. `classes_file`: the classes.txt that gave
    `num_classes`, named when a line disagrees with it.
    """
    split_file = Path(split_file)
    try:
        # utf-8-sig drops a byte order mark (Windows editors write one), which would
        # otherwise become part of the first image's name.
        text = split_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SplitFileError(f"{split_file}: not a text split file ({err})") from err
    paths: list[str] = []
    flat: list[str] = []  # all label tokens; checked at once below (this runs over 78k lines)
    lines: list[int] = []
    expected = num_classes
    for line_no, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split()
        if not tokens:
            continue  # blank lines (e.g. a trailing newline) carry no entry
        if expected is None:
            if len(tokens) < 2:
                raise SplitFileError(
                    f"{split_file}:{line_no}: image '{tokens[0]}' has no labels "
                    f"(expected 'relative/path L1 ... LK')"
                )
            if not _is_number(tokens[1]):  # K would count the rest of the path as labels
                raise _spaced_path(split_file, line_no, tokens)
            expected = len(tokens) - 1
        if len(tokens) != expected + 1:
            raise _label_count_error(split_file, line_no, tokens, expected, kind, classes_file,
                                     lines[0] if lines else line_no)
        paths.append(tokens[0])
        flat.extend(tokens[1:])
        lines.append(line_no)
    if not paths:
        raise SplitFileError(f"{split_file}: split file is empty (no 'path labels' lines)")
    assert expected is not None
    values = np.asarray(flat)
    ones = values == "1"
    valid = ones | (values == "0")
    if not valid.all():
        first = int(np.argmin(valid))
        row, col = divmod(first, expected)
        if col == 0 and not _is_number(flat[first]):
            raise _spaced_path(split_file, lines[row], [paths[row], *flat[first: first + expected]])
        raise SplitFileError(
            f"{split_file}:{lines[row]}: image '{paths[row]}': label {col + 1} is {flat[first]!r}, "
            f"expected 0 or 1 (map uncertain / blank labels when making the split)"
        )
    targets = ones.astype(np.uint8).reshape(len(paths), expected)
    return SplitTable(split_file=split_file, paths=paths, targets=targets, lines=lines,
                      duplicates=_duplicates(split_file, paths, lines, targets))


def _label_count_error(split_file: Path, line_no: int, tokens: list[str], expected: int, kind: str,
                       classes_file: str | Path | None, first_line: int) -> SplitFileError:
    """The error for a line with another number of labels than `expected`, saying where K came from."""
    found = len(tokens) - 1
    if found > expected and not _is_number(tokens[1]):
        return _spaced_path(split_file, line_no, tokens)
    where = f"{split_file}:{line_no}: image '{tokens[0]}' has {found} labels"
    if kind in CLASS_NAMES:
        return SplitFileError(f"{where}, expected {expected} for data set kind '{kind}'")
    if classes_file is not None:
        return SplitFileError(f"{classes_file} names {expected} classes but {split_file} has {found} "
                              f"label columns (line {line_no}: image '{tokens[0]}'): give each line "
                              f"one 0/1 label per class name, in the order of {CLASSES_FILE}")
    return SplitFileError(f"{where} but line {first_line} has {expected}: every line of a split "
                          f"file needs the same label columns")


def _duplicates(split_file: Path, paths: list[str], lines: list[int],
                targets: np.ndarray) -> dict[str, list[int]]:
    """Paths listed more than once -> all their line numbers; one warning about them: how many
    repeats, how many with conflicting labels, a few examples."""
    if len(set(paths)) == len(paths):  # the usual case, and 10x faster than the loop below
        return {}
    rows_of: dict[str, list[int]] = {}
    for row, path in enumerate(paths):
        rows_of.setdefault(path, []).append(row)
    repeated = {path: rows for path, rows in rows_of.items() if len(rows) > 1}
    duplicates = {path: [lines[r] for r in rows] for path, rows in repeated.items()}
    conflicting = sum(len({targets[r].tobytes() for r in rows}) > 1 for rows in repeated.values())
    repeats = sum(len(at) - 1 for at in duplicates.values())
    examples = ", ".join(f"'{p}' (lines {', '.join(map(str, at))})"
                         for p, at in list(duplicates.items())[:_EXAMPLES])
    logger.warning(
        "%s: %d duplicate entries: %d images listed more than once (%d with different labels), "
        "e.g. %s; every entry is kept, so these images weigh more in training and evaluation",
        split_file, repeats, len(duplicates), conflicting, examples)
    return duplicates


def real_paths(files: Sequence[str]) -> list[str]:
    """The real path of each file (symlinks, '..' and '.' resolved; absent files too).

    Folders are resolved once each (a split's images share a few folders), and only a file that
    is itself a symlink is resolved again.
    """
    real_dirs: dict[str, str] = {}
    out = []
    for file in files:
        head, tail = os.path.split(file)
        if tail in ("", ".", ".."):
            out.append(os.path.realpath(file))
            continue
        real = real_dirs.get(head)
        if real is None:
            real = real_dirs[head] = os.path.realpath(head or ".")
        path = os.path.join(real, tail)
        out.append(os.path.realpath(path) if os.path.islink(path) else path)
    return out


def _image_keys(split: SplitLike, other: SplitLike) -> tuple[list[str], list[str]]:
    """Keys the two spellings of one image share, for each entry of `split` and of `other`.

    Where both know their image files (data sets), the files' real paths: an absolute path,
    ``../<folder>/images/x.png`` and a symlinked folder then all match. Otherwise (parsed split
    files alone) the normalised relative paths: './a.png' and 'a.png' match.
    """
    files_a, files_b = getattr(split, "files", None), getattr(other, "files", None)
    if files_a is not None and files_b is not None:
        return real_paths(files_a), real_paths(files_b)
    return [posixpath.normpath(p) for p in split.paths], [posixpath.normpath(p) for p in other.paths]


def _line(split: SplitLike, row: int) -> int:
    """The split-file line of entry `row` (entries of a bare path list count from 1)."""
    lines = getattr(split, "lines", None)
    return lines[row] if lines is not None else row + 1


def _shared(keys: Sequence[str | None], other_keys: Sequence[str | None]) -> list[tuple[int, int, str]]:
    """(row in other, first row in keys, key) of each key of `other_keys` also in `keys`, in the
    order of `other_keys`, each key once (None matches nothing)."""
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key is not None:
            first.setdefault(key, row)
    shared: dict[str, tuple[int, int, str]] = {}
    for row, key in enumerate(other_keys):
        if key in first and key not in shared:
            shared[key] = (row, first[key], key)  # type: ignore[index]
    return list(shared.values())


_NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.png$")
_CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")


def patient_id(kind: str, path: str) -> str | None:
    """The patient an image of a data set `kind` belongs to, where its path says so: NIH names
    are <patient>_<follow-up>.png, CheXpert paths hold a patientNNNNN folder. None for RSNA
    (one image per patient: the image check covers it) and custom data."""
    path = path.replace("\\", "/")  # split files written on Windows
    if kind == "nih":
        match = _NIH_NAME.match(posixpath.basename(path))
    elif kind == "chexpert":
        match = _CHEXPERT_PATIENT.search(posixpath.normpath(path))
    else:
        return None
    return match.group(1) if match else None


def check_split_overlap(train: SplitLike, others: Sequence[SplitLike | str | Path],
                        allow: bool = False, role: str = "training",
                        kind: str | None = None) -> dict[str, int]:
    """Refuse images shared between the training split and each of `others` (validation, test).

    An image in both is patient leakage in its simplest form: the score is measured on
    training data. With ``role="validation"`` the first split is the one checkpoints are
    selected on, and an image it shares with the test split makes the test score optimistic
    in the same way. Two entries are the same image when they are the same file: data sets
    (which know their files) compare real paths, so another spelling of a path (absolute,
    through ``..`` or a symlinked folder) is caught; bare split files compare normalised
    relative paths. With the data set `kind` (NIH, CheXpert) the patients are compared too:
    another image of the same patient leaks in the same way. `others` are parsed splits or
    datasets, or split files (read here). With ``allow=True`` (``--allow_overlap``) the
    overlap is logged as a warning instead. Returns {other split file: number of shared images}.
    """
    harm = {"training": "the evaluation would score images (or patients) the model was trained on",
            "validation": "the test would score images (or patients) the checkpoint was selected on"}
    if role not in harm:
        raise ValueError(f"role={role!r}: expected one of {list(harm)}")
    counts: dict[str, int] = {}
    for other in others:
        table = parse_split_file(other) if isinstance(other, (str, Path)) else other
        shared = _shared(*_image_keys(train, table))
        counts[str(table.split_file)] = len(shared)
        here, there = Path(table.split_file).name, Path(train.split_file).name
        if shared:
            examples = "; ".join(
                f"{here}:{_line(table, b)} '{table.paths[b]}' and {there}:{_line(train, a)} "
                f"'{train.paths[a]}' are the same file" + (f" {key}" if os.path.isabs(key) else "")
                for b, a, key in shared[:_EXAMPLES])
            message = (f"{len(shared)} images of {table.split_file} are also in the {role} split "
                       f"{train.split_file}, e.g. {examples}")
        else:
            patients = _shared([patient_id(kind, p) for p in train.paths],
                               [patient_id(kind, p) for p in table.paths]) if kind else []
            if not patients:
                continue
            examples = "; ".join(f"'{pid}' ({here}:{_line(table, b)}, {there}:{_line(train, a)})"
                                 for b, a, pid in patients[:_EXAMPLES])
            message = (f"{len(patients)} patients of {table.split_file} also have images in the "
                       f"{role} split {train.split_file}, e.g. {examples}")
        if not allow:
            raise SplitOverlapError(f"{message}: {harm[role]}. Fix the split files, or pass "
                                    "--allow_overlap to accept it.")
        logger.warning("%s (allowed)", message)
    return counts


def image_root(data_path: str | Path, kind: str) -> Path:
    """The folder that split-file paths of a data set `kind` are relative to."""
    if kind not in DATASET_KINDS:
        raise DataUsageError(f"--dataset {kind!r}: expected one of {', '.join(DATASET_KINDS)}")
    # NIH split files hold bare image names; the images sit in one folder.
    return Path(data_path) / "all_classes" if kind == "nih" else Path(data_path)


def resolve_image_path(data_path: str | Path, rel_path: str, kind: str) -> Path:
    """Where the image of a split-file entry lives for a data set `kind`."""
    return image_root(data_path, kind) / rel_path


def resolve_image_paths(data_path: str | Path, rel_paths: list[str], kind: str) -> list[str]:
    """`resolve_image_path` for many entries, as strings (pathlib is slow over 78k paths)."""
    root = str(image_root(data_path, kind))
    return [os.path.join(root, p) for p in rel_paths]


# ---------------------------------------------------------------------------------------
# Writing split files
# ---------------------------------------------------------------------------------------

# The label fractions make_splits writes: train_10 and train_1 are nested random subsets of
# train_list (the paper's own 1% and 10% files are subsets of its train_list drawn apart).
SUBSETS: dict[str, float] = {"train_10.txt": 0.10, "train_1.txt": 0.01}


def nested_subsets(n: int, rng: np.random.Generator, min_size: int = 1) -> dict[str, np.ndarray]:
    """Row indices of train_10 and train_1: nested random subsets of n training rows."""
    perm = rng.permutation(n)
    return {name: np.sort(perm[: min(n, max(min_size, round(frac * n)))]) for name, frac in SUBSETS.items()}


def write_split_file(path: Path, paths: list[str], labels: np.ndarray, trailing_space: bool = False) -> None:
    """Write `path labels...` lines, sorted by path (RSNA's files end each line with a space)."""
    end = " \n" if trailing_space else "\n"
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    text = "".join(f"{paths[i]} {' '.join(str(int(v)) for v in labels[i])}{end}" for i in order)
    path.write_text(text)
