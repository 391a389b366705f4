"""Each test image's patient sex, age and view, from the data sets' official metadata.

    meta = read_metadata("data/NIH_ChestX-ray/Data_Entry_2017_v2020.csv")
    records = meta.lookup(dataset.paths)   # an ImageMeta or None per image, in order

Sources, each told apart by its header row (never by the file's name):

- NIH ChestX-ray14 ``Data_Entry_2017.csv`` (or ``_v2020``): ``Image Index``, ``Patient Age``,
  ``Patient Gender`` (M / F), ``View Position`` (PA / AP);
- CheXpert ``train.csv`` / ``valid.csv``: ``Path``, ``Sex`` (Male / Female / Unknown),
  ``Age``, ``Frontal/Lateral``, ``AP/PA``;
- this tool's own table ``path,sex,age,view`` (any of the last three may be absent or
  empty), for data whose metadata comes otherwise (CheXpert's test demographics, a hospital's
  own export);
- DICOM headers (``read_dicom_metadata``): ``PatientSex``, ``PatientAge`` (``058Y``,
  RSNA writes ``58``), ``ViewPosition``, read from the data set's own image files.

The common record: sex ``M`` / ``F`` (``O`` for other), age in whole years, view ``PA`` /
``AP`` / ``LAT`` (lateral: CheXpert's "Lateral", DICOM ``LL`` / ``RL`` / ``LATERAL``),
``FRONTAL`` for a frontal image whose projection is not given; None where unknown. An age
outside 0-120 years (NIH's 2017 file holds a few, e.g. 414) is recorded as unknown and
counted (``Metadata.implausible_ages``); a value that is no age, sex or view at all is an
error naming the file and line.

Joining (``Metadata.lookup``): an image's split-file path finds its record under the path
itself, else under the longest trailing part of the path that is a key (so the metadata's
``test/patient1/study1/view1_frontal.jpg`` serves a split's
``CheXpert-v1.0-small/test/patient1/study1/view1_frontal.jpg``, and NIH's bare image names
serve ``all_classes/<name>``), else under the one key that ends with ``/<path>``. An image
found by none of these has no metadata: callers count it and say so.

Found automatically (``find_metadata_files``), in this order, the first that exists: beside
the split file, in the data folder, or in the top folder of the images' paths
(``CheXpert-v1.0-small/``): ``metadata.csv`` (the table above), ``Data_Entry_2017_v2020.csv``,
``Data_Entry_2017.csv``, ``train.csv`` + ``valid.csv`` (CheXpert's, read together).
"""
from __future__ import annotations

import csv
import logging
import os
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import DataError, DataUsageError
from .imageio import sniff_image_format
from .splits import image_root

logger = logging.getLogger(__name__)

MAX_AGE = 120  # years; older is a data-entry error, recorded as unknown
# The documented names searched beside the split file and in the data folder, in order;
# the files of one entry are read together.
METADATA_FILES: tuple[tuple[str, ...], ...] = (
    ("metadata.csv",), ("Data_Entry_2017_v2020.csv",), ("Data_Entry_2017.csv",),
    ("train.csv", "valid.csv"),
)
DICOM_SOURCE = "dicom"  # the `metadata` value that reads each image's own DICOM header
OFF = "none"            # the `metadata` value that turns subgroups off

# Columns of each CSV format: (required, optional), by the header's exact names.
_FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "NIH Data_Entry_2017": (("Image Index", "Patient Age", "Patient Gender", "View Position"), ()),
    "CheXpert train/valid csv": (("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"), ()),
    "path,sex,age,view table": (("path",), ("sex", "age", "view")),
}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}
_UNKNOWN = {"", "u", "unknown", "nan", "none", "n/a"}
_LATERAL = {"LAT", "LATERAL", "LL", "RL"}
_AGE = re.compile(r"^(\d{1,3})(?:\.0+)?\s*([YMWD]?)$", re.IGNORECASE)


class MetadataError(DataError):
    """A metadata file, row or DICOM header that cannot be read as sex, age and view."""


@dataclass(frozen=True)
class ImageMeta:
    """One image's patient sex ('M' / 'F' / 'O'), age (years) and view; None where unknown."""

    sex: str | None
    age: int | None
    view: str | None
    where: str  # the file and line (or DICOM file) it came from


@dataclass
class Metadata:
    """Records by image path, where they were read from, and how many ages were implausible."""

    records: dict[str, ImageMeta]
    source: str
    implausible_ages: int = 0
    notes: list[str] = field(default_factory=list)
    _by_suffix: dict[str, str | None] | None = field(default=None, repr=False)

    def lookup(self, paths: Sequence[str]) -> list[ImageMeta | None]:
        """The record of each split-file path (module docstring: joining); None where none."""
        return [self._find(_key(p)) for p in paths]

    def _find(self, path: str) -> ImageMeta | None:
        parts = path.split("/")
        for i in range(len(parts)):  # the path itself, then ever shorter trailing parts
            tail = "/".join(parts[i:])
            if tail in self.records:
                return self.records[tail]
        if self._by_suffix is None:
            self._by_suffix = {}
            for key in self.records:
                pieces = key.split("/")
                for i in range(1, len(pieces)):
                    tail = "/".join(pieces[i:])
                    # Two keys sharing this ending: it names neither (None).
                    self._by_suffix[tail] = None if tail in self._by_suffix else key
        key = self._by_suffix.get(path)
        return self.records[key] if key is not None else None


def _key(path: str) -> str:
    """A path as the join compares it: '/' separators, no leading './'."""
    path = posixpath.normpath(str(path).replace("\\", "/"))
    return path.removeprefix("./")


def parse_sex(value: Any, where: str) -> str | None:
    """'M', 'F' or 'O' from M / Male / F / Female / O / Other (any case); None when unknown."""
    text = str(value or "").strip().lower()
    if text in _UNKNOWN:
        return None
    if text not in _SEX:
        raise MetadataError(f"{where}: sex {value!r} is not M, F, Male, Female, O or Unknown")
    return _SEX[text]


def parse_age(value: Any, where: str) -> tuple[int | None, bool]:
    """(age in whole years or None, whether it was an implausible number) from '58', '058Y',
    '006M', '3W' (DICOM's nnnY / nnnM / nnnW / nnnD) or an integer."""
    text = str(value if value is not None else "").strip()
    if text.lower() in _UNKNOWN:
        return None, False
    match = _AGE.match(text)
    if not match:
        raise MetadataError(f"{where}: age {value!r} is not a number of years (e.g. 58 or 058Y)")
    number, unit = int(match.group(1)), match.group(2).upper() or "Y"
    years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
    if years > MAX_AGE:
        return None, True
    return years, False


def parse_view(value: Any, where: str) -> str | None:
    """PA, AP, LAT (any lateral) or another projection name in upper case; None when unknown."""
    text = " ".join(str(value or "").split()).upper()
    if text.lower() in _UNKNOWN:
        return None
    if not re.fullmatch(r"[A-Z][A-Z0-9 _-]{0,15}", text):
        raise MetadataError(f"{where}: view {value!r} is not a projection name (PA, AP, LL, ...)")
    return "LAT" if text in _LATERAL else text


def _chexpert_view(frontal: Any, ap_pa: Any, where: str) -> str | None:
    """CheXpert's view: LAT for a lateral image, else its AP / PA (FRONTAL when not given)."""
    kind = str(frontal or "").strip().lower()
    if kind == "lateral":
        return "LAT"
    if kind != "frontal":
        raise MetadataError(f"{where}: Frontal/Lateral {frontal!r} is neither Frontal nor Lateral")
    projection = str(ap_pa or "").strip().upper()
    return projection if projection in ("AP", "PA") else "FRONTAL"


def _csv_format(path: Path, header: Sequence[str]) -> str:
    """Which of the CSV formats a header is; an error naming what is missing otherwise."""
    names = set(header)
    for name, (required, optional) in _FORMATS.items():
        if names.issuperset(required) and (not optional or names & set(optional)):
            return name
    for name, (required, optional) in _FORMATS.items():
        found = names & set(required)
        if found and len(required) > 1:
            missing = [c for c in required if c not in names]
            raise MetadataError(f"{path}:1: looks like a {name} but lacks the column(s) {missing}")
    raise MetadataError(
        f"{path}:1: not a metadata table; expected the columns of NIH's Data_Entry_2017 "
        f"({', '.join(_FORMATS['NIH Data_Entry_2017'][0])}), of CheXpert's train.csv "
        f"({', '.join(_FORMATS['CheXpert train/valid csv'][0])}) or path,sex,age,view")


def _record(fmt: str, row: Mapping[str, Any], where: str) -> tuple[str, str | None, Any, str | None]:
    """(image path, sex, raw age, view) of one row of a CSV format."""
    if fmt == "NIH Data_Entry_2017":
        return (row["Image Index"], parse_sex(row["Patient Gender"], where), row["Patient Age"],
                parse_view(row["View Position"], where))
    if fmt == "CheXpert train/valid csv":
        return (row["Path"], parse_sex(row["Sex"], where), row["Age"],
                _chexpert_view(row["Frontal/Lateral"], row["AP/PA"], where))
    return (row["path"], parse_sex(row.get("sex"), where), row.get("age"),
            parse_view(row.get("view"), where))


def read_metadata(path: str | Path) -> Metadata:
    """The records of one metadata CSV (any of the formats above, told by its header)."""
    path = Path(path)
    records: dict[str, ImageMeta] = {}
    implausible: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            fmt = _csv_format(path, header)
            # The cells a row must reach: NIH's header splits "OriginalImage[Width,Height]"
            # into two columns and some rows end early, so only the columns read count.
            required, optional = _FORMATS[fmt]
            needed = 1 + max(header.index(c) for c in header if c in required + optional)
            for line, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue  # a blank line
                where = f"{path}:{line}"
                if len(cells) < needed:
                    raise MetadataError(f"{where}: {len(cells)} cells, but the columns read "
                                        f"reach column {needed} of the header")
                row = dict(zip(header, (c.strip() for c in cells)))
                image, sex, raw_age, view = _record(fmt, row, where)
                if not image:
                    raise MetadataError(f"{where}: no image path")
                age, odd = parse_age(raw_age, where)
                if odd:
                    implausible.append(line)
                key = _key(image)
                if key in records:
                    raise MetadataError(f"{where}: image '{image}' is also on {records[key].where}")
                records[key] = ImageMeta(sex, age, view, where)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MetadataError(f"{path}: not a readable CSV ({err})") from err
    meta = Metadata(records, f"{path} ({fmt})", implausible_ages=len(implausible))
    if implausible:
        meta.notes.append(f"{len(implausible)} ages above {MAX_AGE} years in {path} (e.g. line "
                          f"{implausible[0]}) are taken as unknown")
    return meta


def read_metadata_files(paths: Sequence[str | Path]) -> Metadata:
    """The records of several metadata CSVs together (CheXpert's train.csv and valid.csv)."""
    parts = [read_metadata(p) for p in paths]
    records: dict[str, ImageMeta] = {}
    for part in parts:
        for key, rec in part.records.items():
            if key in records:
                raise MetadataError(f"{rec.where}: image '{key}' is also on {records[key].where}")
            records[key] = rec
    return Metadata(records, " + ".join(p.source for p in parts),
                    implausible_ages=sum(p.implausible_ages for p in parts),
                    notes=[n for p in parts for n in p.notes])


def _dicom_record(file: str) -> tuple[ImageMeta, bool]:
    """One DICOM file's header as a record, and whether its age was implausible."""
    import pydicom

    fmt = sniff_image_format(file)
    if fmt not in ("DICOM", None):
        raise MetadataError(f"{file}: a {fmt} image has no DICOM header to read sex, age and view from")
    try:
        with warnings.catch_warnings():
            # RSNA writes ages as '58', not DICOM's '058Y': pydicom warns per value; parse_age
            # reads both and refuses what is neither.
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(file, stop_before_pixels=True, force=True,
                                 specific_tags=["PatientSex", "PatientAge", "ViewPosition"])
            sex, age, view = (ds.get(k) for k in ("PatientSex", "PatientAge", "ViewPosition"))
    except Exception as err:  # pydicom raises many types for a damaged header
        raise MetadataError(f"{file}: cannot read its DICOM header ({type(err).__name__}: {err})") from err
    where = f"{file} (DICOM header)"
    years, odd = parse_age(None if age is None else str(age), f"{where} PatientAge")
    return ImageMeta(parse_sex(None if sex is None else str(sex), f"{where} PatientSex"), years,
                     parse_view(None if view is None else str(view), f"{where} ViewPosition"),
                     where), odd


def read_dicom_metadata(files: Sequence[str], paths: Sequence[str]) -> Metadata:
    """Records from the DICOM headers of ``files``, keyed by the split-file ``paths``."""
    records, odd = {}, 0
    for file, path in zip(files, paths):
        record, implausible = _dicom_record(file)
        records[_key(path)] = record
        odd += implausible
    meta = Metadata(records, f"DICOM headers of {len(records)} images", implausible_ages=odd)
    if odd:
        meta.notes.append(f"{odd} DICOM ages above {MAX_AGE} years are taken as unknown")
    return meta


def data_folder(paths: Sequence[str], files: Sequence[str], kind: str) -> Path | None:
    """The data folder a data set's split paths resolve from (its files minus their paths)."""
    if not paths:
        return None
    file, rel = files[0].replace("\\", "/"), _key(paths[0])
    if not file.endswith(rel):
        return None
    root = Path(file[: len(file) - len(rel)] or ".")
    for folder in (root, root.parent):
        if os.path.normpath(image_root(folder, kind)) == os.path.normpath(root):
            return folder
    return None


def find_metadata_files(split_file: str | Path, paths: Sequence[str], files: Sequence[str],
                        kind: str) -> list[Path]:
    """The metadata files of the documented names (module docstring), or [] when none is there."""
    folders = [Path(split_file).parent]
    data = data_folder(paths, files, kind)
    if data is not None:
        folders.append(data)
        top = _key(paths[0]).split("/")
        if len(top) > 1:
            folders.append(image_root(data, kind) / top[0])
    seen: list[Path] = []
    for folder in folders:
        if folder.resolve() in seen:
            continue
        seen.append(folder.resolve())
        for names in METADATA_FILES:
            found = [folder / n for n in names if (folder / n).is_file()]
            if found:
                return found
    return []


def resolve_metadata(given: Any, *, split_file: str | Path, paths: Sequence[str],
                     files: Sequence[str], kind: str) -> Metadata | None:
    """The metadata a test uses: ``given`` as a file (or several), 'dicom' (the images' own
    headers), a Metadata, a {path: {sex, age, view}} mapping, 'none' / False (off), or None:
    the documented files when found (a file there that cannot be read is warned about and
    skipped), else no metadata."""
    if given is False or (isinstance(given, str) and given.lower() == OFF):
        return None
    if isinstance(given, Metadata):
        return given
    if isinstance(given, Mapping):
        return records_from_mapping(given)
    if isinstance(given, str) and given.lower() == DICOM_SOURCE:
        return read_dicom_metadata(files, paths)
    if given is None:
        found = find_metadata_files(split_file, paths, files, kind)
        if not found:
            return None
        try:
            meta = _naming_some(read_metadata_files(found), paths, split_file)
        except MetadataError as err:
            logger.warning("no subgroups: %s (found beside the data; pass --metadata FILE or "
                           "--metadata none)", err)
            return None
        logger.info("subgroup metadata found: %s", meta.source)
        return meta
    if isinstance(given, str) and not Path(given).is_file() and "," in given:
        given = given.split(",")  # a comma list of files (--metadata train.csv,valid.csv)
    given_files = [Path(p) for p in ([given] if isinstance(given, (str, Path)) else given)]
    for p in given_files:
        if not p.is_file():
            raise DataUsageError(f"--metadata {p}: no such file (expected a metadata CSV, "
                                 f"'{DICOM_SOURCE}' or '{OFF}')")
    return _naming_some(read_metadata_files(given_files), paths, split_file)


def _naming_some(meta: Metadata, paths: Sequence[str], split_file: str | Path) -> Metadata:
    """``meta``, or an error when it names none of the images: the metadata of other images."""
    if paths and not any(r is not None for r in meta.lookup(paths)):
        raise MetadataError(f"{meta.source} names none of the {len(paths)} images of {split_file} "
                            f"(e.g. '{paths[0]}'): the metadata of other images?")
    return meta


def records_from_mapping(records: Mapping[str, Mapping[str, Any]]) -> Metadata:
    """A Metadata from {image path: {"sex", "age", "view"}} (values parsed as in the files)."""
    out, odd = {}, 0
    for path, rec in records.items():
        where = f"metadata of '{path}'"
        age, implausible = parse_age(rec.get("age"), where)
        odd += implausible
        out[_key(path)] = ImageMeta(parse_sex(rec.get("sex"), where), age,
                                    parse_view(rec.get("view"), where), where)
    return Metadata(out, f"{len(out)} records given", implausible_ages=odd)
