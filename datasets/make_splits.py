"""Write split files (train_1 / train_10 / train_list / val_list / test_list) from official metadata.

    python -m datasets.make_splits nih      --metadata DIR --out DatasetsSplits/NIH_ChestX-ray
    python -m datasets.make_splits chexpert --metadata DIR --out DatasetsSplits/CheXpert
    python -m datasets.make_splits rsna     --metadata DIR --out DatasetsSplits/RSNA_Pneumonia

Inputs, as downloaded with the images:
- nih: ``Data_Entry_2017*.csv`` and, when present, the official ``train_val_list.txt`` /
  ``test_list.txt`` (test = the official test list; val = a patient-disjoint part of
  train_val). Without them every split is drawn patient-disjoint.
- chexpert: ``train.csv`` and ``valid.csv`` (val = valid.csv; an optional ``test.csv`` or
  ``test_labels.csv`` is the test set, else a patient-disjoint part of train.csv).
  Uncertain labels (-1) become 1 for Atelectasis, Edema, Pleural Effusion (U-Ones) and 0
  for Cardiomegaly, Consolidation (U-Zeros); blanks become 0; frontal and lateral views kept.
- rsna: ``stage_2_train_labels.csv`` (label = Target, 1 if the image has any box).

Splits are patient-disjoint and depend only on the metadata and ``--seed``; train_1 and
train_10 are nested random subsets of train_list. Lines are sorted by path.

Split files already in --out are refused unless ``--overwrite``; an output that is one of
the metadata files (``--out`` = ``--metadata`` for NIH's ``test_list.txt``) is always refused.
The files are written beside --out and moved in all together (datasets/staging.py).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .constants import ALL_SPLIT_FILES, CLASS_NAMES
from .splits import nested_subsets, write_split_file
from util import cli
from util.cli import ToolError, UsageError
from util.io import same_file

from .staging import staged_folder

logger = logging.getLogger(__name__)

# The paper's per-class uncertainty policy for CheXpert, checked against its train_10.txt.
CHEXPERT_UNCERTAIN_TO: dict[str, int] = {
    "Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1,
}
NIH_NO_FINDING = "No Finding"


class MetadataError(ToolError, ValueError):
    """The official metadata is missing or malformed."""


def split_by_patient(
    patients: np.ndarray, fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Assign images to groups by patient so that each group gets about `fractions` of the images.

    Patients are shuffled (sorted first, so input order does not matter) and handed out in
    turn to the groups of `fractions`; everything left goes to 'train'.
    """
    patients = np.asarray(patients)
    unique, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    order = rng.permutation(len(unique))
    group_of_patient = np.full(len(unique), "train", dtype=object)
    pos, total = 0, len(patients)
    for name, frac in fractions.items():
        want, got = round(frac * total), 0
        while got < want and pos < len(order):
            group_of_patient[order[pos]] = name
            got += counts[order[pos]]
            pos += 1
    groups = group_of_patient[inverse]
    return {g: np.flatnonzero(groups == g) for g in ("train", *fractions)}


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a metadata CSV, naming the file when it cannot be read."""
    if not path.is_file():
        raise MetadataError(f"metadata file not found: {path}")
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise MetadataError(f"{path}: cannot read as CSV ({err})") from err


def _require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def _read_list(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]


def nih_table(metadata: Path) -> pd.DataFrame:
    """NIH rows (path, patient, 14 labels) from Data_Entry_2017*.csv."""
    found = sorted(metadata.glob("Data_Entry_2017*.csv"))
    if not found:
        raise MetadataError(f"no Data_Entry_2017*.csv in {metadata}")
    path = found[-1]
    if len(found) > 1:
        logger.info("using %s (also found %s)", path.name, [p.name for p in found[:-1]])
    df = _read_csv(path)
    _require_columns(df, ["Image Index", "Finding Labels", "Patient ID"], path)
    classes = CLASS_NAMES["nih"]
    col = {c: i for i, c in enumerate(classes)}
    labels = np.zeros((len(df), len(classes)), np.uint8)
    for row, findings in enumerate(df["Finding Labels"].astype(str)):
        for name in findings.split("|"):
            name = name.strip()
            if name == NIH_NO_FINDING:
                continue
            if name not in col:
                raise MetadataError(f"{path}:{row + 2}: unknown finding {name!r}; expected {classes} or {NIH_NO_FINDING!r}")
            labels[row, col[name]] = 1
    out = pd.DataFrame({"path": df["Image Index"].astype(str), "patient": df["Patient ID"].astype(str)})
    return pd.concat([out, pd.DataFrame(labels, columns=classes)], axis=1)


def chexpert_table(csv: Path) -> pd.DataFrame:
    """CheXpert rows (path, patient, 5 labels) with the paper's uncertainty policy."""
    df = _read_csv(csv)
    classes = CLASS_NAMES["chexpert"]
    _require_columns(df, ["Path", *classes], csv)
    labels = np.zeros((len(df), len(classes)), np.uint8)
    for k, name in enumerate(classes):
        values = pd.to_numeric(df[name], errors="coerce")
        bad = ~(values.isna() | values.isin([-1, 0, 1]))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise MetadataError(f"{csv}:{row + 2}: column {name!r} is {df[name].iloc[row]!r}; expected 1, 0, -1 or blank")
        values = values.fillna(0).replace(-1, CHEXPERT_UNCERTAIN_TO[name])
        labels[:, k] = values.to_numpy().astype(np.uint8)
    paths = df["Path"].astype(str)
    patients = paths.str.extract(r"(patient\d+)", expand=False)
    if patients.isna().any():
        row = int(np.flatnonzero(patients.isna().to_numpy())[0])
        raise MetadataError(f"{csv}:{row + 2}: no 'patientNNNNN' in path {paths.iloc[row]!r}")
    out = pd.DataFrame({"path": paths, "patient": patients})
    return pd.concat([out, pd.DataFrame(labels, columns=classes)], axis=1)


def rsna_table(metadata: Path) -> pd.DataFrame:
    """RSNA rows (path, patient, Pneumonia) from stage_2_train_labels.csv, one per image."""
    csv = metadata / "stage_2_train_labels.csv"
    df = _read_csv(csv)
    _require_columns(df, ["patientId", "Target"], csv)
    target = pd.to_numeric(df["Target"], errors="coerce")
    if not target.isin([0, 1]).all():
        row = int(np.flatnonzero(~target.isin([0, 1]).to_numpy())[0])
        raise MetadataError(f"{csv}:{row + 2}: Target is {df['Target'].iloc[row]!r}; expected 0 or 1")
    per_image = target.groupby(df["patientId"].astype(str)).max()  # several box rows per image
    return pd.DataFrame({
        "path": [f"stage_2_train_images/{pid}.dcm" for pid in per_image.index],
        "patient": per_image.index.to_numpy(),
        "Pneumonia": per_image.to_numpy().astype(np.uint8),
    })


def _drawn(table: pd.DataFrame, test: float, val: float, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Every split drawn from `table` by patient, `test` and `val` its shares of the images."""
    groups = split_by_patient(table["patient"].to_numpy(), {"test": test, "val": val}, rng)
    return {g: table.iloc[groups[g]] for g in ("train", "val", "test")}


def _nih_frames(metadata: Path, rng: np.random.Generator, val_fraction: float | None,
                test_fraction: float | None) -> dict[str, pd.DataFrame]:
    """NIH: the official test list when present (val drawn from train_val), else every split drawn."""
    table = nih_table(metadata)
    official_tv, official_test = metadata / "train_val_list.txt", metadata / "test_list.txt"
    if not (official_tv.is_file() and official_test.is_file()):
        logger.info("no official train_val_list.txt / test_list.txt in %s: drawing every split", metadata)
        return _drawn(table, test_fraction or 0.2, val_fraction or 0.1, rng)
    test_names, tv_names = set(_read_list(official_test)), set(_read_list(official_tv))
    unknown = (test_names | tv_names) - set(table["path"])
    if unknown:
        raise MetadataError(f"{len(unknown)} images of the official lists are not in the CSV, "
                            f"e.g. {sorted(unknown)[0]!r}")
    train_val = table[table["path"].isin(tv_names)].reset_index(drop=True)
    groups = split_by_patient(train_val["patient"].to_numpy(), {"val": val_fraction or 0.125}, rng)
    return {"train": train_val.iloc[groups["train"]], "val": train_val.iloc[groups["val"]],
            "test": table[table["path"].isin(test_names)]}


def _chexpert_frames(metadata: Path, rng: np.random.Generator, val_fraction: float | None,
                     test_fraction: float | None) -> dict[str, pd.DataFrame]:
    """CheXpert: valid.csv and a test CSV where present, the missing ones drawn from train.csv."""
    train = chexpert_table(metadata / "train.csv")
    test_csv = next((metadata / n for n in ("test.csv", "test_labels.csv") if (metadata / n).is_file()), None)
    valid_csv = metadata / "valid.csv"
    fractions = {}
    if test_csv is None:
        fractions["test"] = test_fraction or 0.05
    if not valid_csv.is_file():
        fractions["val"] = val_fraction or 0.05
    groups = split_by_patient(train["patient"].to_numpy(), fractions, rng)
    return {"train": train.iloc[groups["train"]],
            "val": train.iloc[groups["val"]] if "val" in fractions else chexpert_table(valid_csv),
            "test": train.iloc[groups["test"]] if test_csv is None else
            _under_root_of(chexpert_table(test_csv), train)}


def _under_root_of(test: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """The test CSV's paths under train.csv's top folder: the test labels' CSV names its
    images ``test/patient.../...``, train.csv ``CheXpert-v1.0-small/train/...`` (the paper's
    test list: ``CheXpert-v1.0-small/test/...``)."""
    roots = train["path"].str.split("/", n=1).str[0].unique()
    if len(roots) != 1 or not str(roots[0]).lower().startswith("chexpert"):
        return test
    bare = ~test["path"].str.lower().str.startswith("chexpert")
    return test.assign(path=test["path"].where(~bare, roots[0] + "/" + test["path"]))


def _rsna_frames(metadata: Path, rng: np.random.Generator, val_fraction: float | None,
                 test_fraction: float | None) -> dict[str, pd.DataFrame]:
    """RSNA: every split drawn by patient."""
    return _drawn(rsna_table(metadata), test_fraction or 0.1, val_fraction or 0.05, rng)


FRAMES = {"nih": _nih_frames, "chexpert": _chexpert_frames, "rsna": _rsna_frames}
# The files of --metadata each kind may read (globs).
METADATA_FILES: dict[str, tuple[str, ...]] = {
    "nih": ("Data_Entry_2017*.csv", "train_val_list.txt", "test_list.txt"),
    "chexpert": ("train.csv", "valid.csv", "test.csv", "test_labels.csv"),
    "rsna": ("stage_2_train_labels.csv",),
}
OUTPUT_FILES: tuple[str, ...] = (*ALL_SPLIT_FILES, "splits_info.json")


def check_outputs(kind: str, metadata: Path, out: Path, overwrite: bool = False) -> None:
    """Refuse, before anything is read, outputs that would replace an input of `kind` (always) or
    split files already in `out` (unless `overwrite`); cli.UsageError naming the flag and file."""
    inputs = [f for pattern in METADATA_FILES[kind] for f in sorted(metadata.glob(pattern)) if f.is_file()]
    for name in OUTPUT_FILES:
        target = out / name
        source = next((f for f in inputs if same_file(target, f)), None)
        if source is not None:
            raise UsageError(f"--out {out}: writing {target} would replace {source}, an input read from "
                             f"--metadata; choose another --out")
    existing = [name for name in OUTPUT_FILES if os.path.lexists(out / name)]
    if existing and not overwrite:
        raise UsageError(f"--out {out}: {out / existing[0]} already exists (pass --overwrite to replace "
                         f"the split files there)")


def _check_patient_disjoint(frames: dict[str, pd.DataFrame]) -> None:
    """Patient-disjointness is the point of the exercise: checked rather than trusted."""
    seen: dict[str, str] = {}
    for name, frame in frames.items():
        for patient in set(frame["patient"]):
            if seen.setdefault(patient, name) != name:
                raise MetadataError(f"patient {patient} is in both {seen[patient]} and {name}: "
                                    f"the official lists are not patient-disjoint")


def make_splits(
    kind: str,
    metadata: str | Path,
    out: str | Path,
    seed: int = 0,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    min_subset: int = 1,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the five split files of `kind` into `out` from the metadata in `metadata`; returns line counts.

    Split files already in `out` are refused unless `overwrite`; an output that is one of the
    metadata files is always refused (`check_outputs`).
    """
    if kind not in CLASS_NAMES:
        raise ValueError(f"kind={kind!r}: expected one of {list(CLASS_NAMES)}")
    metadata, out = Path(metadata), Path(out)
    check_outputs(kind, metadata, out, overwrite)
    rng = np.random.default_rng(seed)
    frames = FRAMES[kind](metadata, rng, val_fraction, test_fraction)
    _check_patient_disjoint(frames)
    train = frames["train"].reset_index(drop=True)
    files = {"train_list.txt": train, "val_list.txt": frames["val"], "test_list.txt": frames["test"]}
    for name, rows in nested_subsets(len(train), rng, min_subset).items():
        files[name] = train.iloc[rows]
    empty = next((name for name, frame in files.items() if len(frame) == 0), None)
    if empty:
        raise MetadataError(f"{empty} would be empty ({len(train)} training images); use more "
                            "data or other fractions")
    counts = {name: len(frame) for name, frame in files.items()}
    info = {"kind": kind, "seed": seed, "metadata": str(metadata.resolve()), "lines": counts,
            "patients": {g: int(f["patient"].nunique()) for g, f in frames.items()}}
    trailing = kind == "rsna"  # the paper's RSNA files end each line with a space
    # All files or none: a failed write (a full disk) leaves `out` as it was.
    with staged_folder(out, last=("train_list.txt",)) as staged:
        for name, frame in files.items():
            write_split_file(staged / name, frame["path"].tolist(), frame[CLASS_NAMES[kind]].to_numpy(),
                             trailing)
        (staged / "splits_info.json").write_text(json.dumps(info, indent=1))
    logger.info("wrote %s to %s", counts, out)
    return counts


PROG = "python -m datasets.make_splits"


def main(argv: list[str] | None = None) -> int:
    """Command line: write the split files of one data set (run it through `cli.run`)."""
    parser = cli.Parser(
        prog=PROG,
        description="Write patient-disjoint split files in the paper's format from official metadata.",
    )
    parser.add_argument("dataset", choices=list(CLASS_NAMES), help="data set kind")
    parser.add_argument("--metadata", required=True, help="folder holding the official metadata files")
    parser.add_argument("--out", required=True, help="output folder for the five split files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_fraction", type=float, default=None,
                        help="share of images for val (default: nih 0.125 of train_val, rsna 0.05)")
    parser.add_argument("--test_fraction", type=float, default=None,
                        help="share for test when no official test list (default: nih 0.2, chexpert 0.05, rsna 0.1)")
    parser.add_argument("--min_subset", type=int, default=1, help="fewest images in train_1 / train_10")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace split files already in --out (never the --metadata files)")
    args = parser.parse_args(argv)
    for flag in ("val_fraction", "test_fraction"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 1:
            parser.error(f"--{flag} {value}: expected a fraction between 0 and 1")
    if args.min_subset < 1:
        parser.error(f"--min_subset {args.min_subset}: expected at least 1 image")
    if not Path(args.metadata).is_dir():
        parser.error(f"--metadata {args.metadata}: not a folder")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a file, not a folder")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    counts = make_splits(args.dataset, args.metadata, args.out, args.seed,
                         args.val_fraction, args.test_fraction, args.min_subset, args.overwrite)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog=PROG))
