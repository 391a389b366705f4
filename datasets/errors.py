"""Errors raised on bad data input, each naming the file, line and image at fault."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from util.cli import ToolError, UsageError


class DataError(ToolError, ValueError):
    """Bad data input: a split file, a label, an image or a cache.

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's
    whole traceback as its message ("Caught ImageError in DataLoader worker process 0 ...");
    ``str()`` then gives back the original one-line message (the traceback stays in ``args``).
    """

    def __str__(self) -> str:
        text = super().__str__()
        if text.startswith("Caught ") and "Traceback (most recent call last)" in text:
            # The message of the last exception of this type in the traceback.
            name = re.escape(type(self).__name__)
            found = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE))
            return text[found[-1].end():].strip() if found else text
        return text


class DataUsageError(DataError, UsageError):
    """A data option the user gave cannot work: a data folder that is not one, an unknown data
    set kind, a --cache / --cache_size pair that does not go together (a usage error: exit 2)."""


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
