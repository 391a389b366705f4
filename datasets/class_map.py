"""Which classes two data sets share: testing a checkpoint on another data set's split.

    table = read_class_map()                      # the shipped datasets/class_map.csv
    match = match_classes(config.class_names, "nih", dataset.class_names, "chexpert", table)
    match.pairs        # [("Atelectasis", "Atelectasis"), ..., ("Pleural Effusion", "Effusion")]

The table (``datasets/class_map.csv``, shipped, documented inside, editable) has one column
per data set kind and one finding a row, each cell the kind's class name as
``datasets/constants.py`` spells it (empty where the kind lacks the finding); lines starting
with '#' are comments. The shipped rows: Atelectasis, Cardiomegaly, Consolidation and Edema
(NIH and CheXpert), NIH Effusion = CheXpert Pleural Effusion, NIH Pneumonia = RSNA
Pneumonia. Names in the column of a known kind (nih, chexpert, rsna) are checked against
that kind's classes, so a misspelt name is an error naming its line, never a class silently
left out.

The rule (``match_classes``): the same class list on both sides is shared as it is; two
different kinds that both have a column are paired by the table's rows; otherwise (the same
kind, an unknown kind, a kind without a column) classes of identical names are shared. A
dataset with no class in common with the checkpoint is an error.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from util.cli import UsageError

from .constants import CLASS_NAMES

CLASS_MAP_FILE = Path(__file__).with_name("class_map.csv")


class ClassMapError(UsageError, ValueError):
    """A class map file that cannot be read, or two class lists with nothing in common (exit 2)."""


@dataclass(frozen=True)
class ClassMap:
    """The table: its column names (data set kinds) and rows of class names ('' where none)."""

    kinds: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    source: str

    def column(self, kind: str) -> list[str]:
        """The class names of a kind's column, '' where a row lacks it."""
        k = self.kinds.index(kind)
        return [row[k] for row in self.rows]


@dataclass
class ClassMatch:
    """How a checkpoint's outputs are scored on a data set's labels.

    pairs: (data set class, checkpoint class) for every shared class, in the data set's
    column order; left_out_checkpoint / left_out_dataset: the classes of each side not
    scored; rule: 'same classes', 'class map' or 'identical names'; source: the table used.
    """

    pairs: list[tuple[str, str]]
    left_out_checkpoint: list[str] = field(default_factory=list)
    left_out_dataset: list[str] = field(default_factory=list)
    rule: str = "same classes"
    source: str | None = None

    @property
    def mapped(self) -> bool:
        """Whether the scored classes are not exactly the checkpoint's (columns chosen or renamed)."""
        return self.rule != "same classes"

    def record(self) -> dict:
        """The JSON the results keep under evaluation.class_map."""
        return {"rule": self.rule, "file": self.source,
                "pairs": {data: ckpt for data, ckpt in self.pairs},
                "left_out_checkpoint": list(self.left_out_checkpoint),
                "left_out_dataset": list(self.left_out_dataset)}


def read_class_map(path: str | Path | None = None) -> ClassMap:
    """The class map table (default: the shipped one), checked (module docstring)."""
    path = Path(path) if path is not None else CLASS_MAP_FILE
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ClassMapError(f"--class_map {path}: cannot be read ({err})") from err
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise ClassMapError(f"{path}: no header line (expected data set kinds, e.g. nih,chexpert,rsna)")
    try:
        cells = list(csv.reader(io.StringIO("\n".join(line for _, line in numbered))))
    except csv.Error as err:
        raise ClassMapError(f"{path}: not a readable CSV ({err})") from err
    (head_line, _), header = numbered[0], [c.strip() for c in cells[0]]
    if len(header) < 2 or not all(header) or len(set(header)) != len(header):
        raise ClassMapError(f"{path}:{head_line}: the header must name two or more different data "
                            f"set kinds, got {header}")
    rows: list[tuple[str, ...]] = []
    seen: dict[tuple[str, str], int] = {}
    for (line, _), row in zip(numbered[1:], cells[1:]):
        row = [c.strip() for c in row]
        if len(row) != len(header):
            raise ClassMapError(f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
        for kind, name in zip(header, row):
            if not name:
                continue
            if kind in CLASS_NAMES and name not in CLASS_NAMES[kind]:
                raise ClassMapError(f"{path}:{line}: {name!r} is not a {kind} class "
                                    f"(its classes: {', '.join(CLASS_NAMES[kind])})")
            if (kind, name) in seen:
                raise ClassMapError(f"{path}:{line}: {kind} class {name!r} is also on line "
                                    f"{seen[kind, name]}")
            seen[kind, name] = line
        rows.append(tuple(row))
    return ClassMap(tuple(header), tuple(rows), str(path))


def match_classes(checkpoint_classes: Sequence[str], checkpoint_kind: str | None,
                  dataset_classes: Sequence[str], dataset_kind: str | None,
                  table: ClassMap | None = None) -> ClassMatch:
    """The classes a checkpoint and a data set share (module docstring: the rule); raises
    ClassMapError naming both class lists when they share none."""
    ckpt, data = list(checkpoint_classes), list(dataset_classes)
    if ckpt == data:
        return ClassMatch([(c, c) for c in data])
    by_table = (table is not None and checkpoint_kind != dataset_kind
                and {checkpoint_kind, dataset_kind} <= set(table.kinds))
    if by_table:
        # The table's rows as (data set class, checkpoint class), in the data set's order.
        to_ckpt = {d: c for c, d in zip(table.column(checkpoint_kind), table.column(dataset_kind))
                   if c and d}
        pairs = [(d, to_ckpt[d]) for d in data if to_ckpt.get(d) in ckpt]
        rule, source = "class map", table.source
        how = f"the class map {table.source} pairs none of them"
    else:
        pairs = [(d, d) for d in data if d in ckpt]
        rule, source, how = "identical names", None, "no class has the same name on both sides"
    if not pairs:
        raise ClassMapError(f"the checkpoint's classes ({checkpoint_kind or 'unknown kind'}: "
                            f"{', '.join(ckpt)}) and the data set's ({dataset_kind or 'unknown kind'}: "
                            f"{', '.join(data)}) share no class: {how}; edit or pass --class_map FILE")
    used_ckpt, used_data = {c for _, c in pairs}, {d for d, _ in pairs}
    return ClassMatch(pairs, [c for c in ckpt if c not in used_ckpt],
                      [d for d in data if d not in used_data], rule, source)
