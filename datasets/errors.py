"""Errors raised on bad data input, each naming the file, line and image at fault."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad data input: a split file, a label, an image or a cache."""


class SplitFileError(DataError):
    """A split file is missing, empty or has a malformed line."""


class ImageError(DataError):
    """An image is missing, unreadable or truncated."""


class CacheError(DataError):
    """A preprocessed cache is missing, incomplete or out of date."""


@dataclass(frozen=True)
class BadEntry:
    """One split-file line whose image could not be used."""

    split_file: Path
    line: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.split_file}:{self.line}: image '{self.path}': {self.reason}"
