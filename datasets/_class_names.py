"""The class names of a split: the kind's own, or those of a `classes.txt` beside the split files."""
from __future__ import annotations

from pathlib import Path

from .constants import CLASS_NAMES
from .splits import find_class_file, read_class_names


def split_class_names(kind: str, folders: list[Path]) -> tuple[list[str] | None, Path | None]:
    """(class names, the classes.txt they came from) for `kind`; (None, None) for a custom set without one.

    The known kinds have fixed names and no file; a custom set reads the first `classes.txt`
    in `folders`.
    """
    if kind in CLASS_NAMES:
        return list(CLASS_NAMES[kind]), None
    names = read_class_names(folders)
    return names, find_class_file(folders) if names else None
