"""Writing a folder of files so that a failure leaves nothing partial behind.

    with staged_folder(root, last=("train_list.txt",)) as tmp:
        write_everything_into(tmp)
    # now in root; after an error (a full disk, a bad input) root is as it was
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from util.cli import ToolError
from util.io import OutputError, current_umask, describe_os_error


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns the folders created, deepest first."""
    created = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(created: Sequence[Path]) -> None:
    """Remove folders `make_folders` created, deepest first, as long as they are empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def _move_into(tmp: Path, root: Path, last: Sequence[str]) -> None:
    """Move everything in `tmp` into `root` (same names replaced; names in `last` moved last)."""
    if not root.exists():
        os.rename(tmp, root)
        return
    files = sorted((p for p in tmp.rglob("*") if not p.is_dir()),
                   key=lambda p: (p.relative_to(tmp).as_posix() in last, str(p)))
    for src in files:
        dest = root / src.relative_to(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_folder(root: str | Path, last: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh folder beside `root` to write into; on success its files move into `root`.

    `root` is created if absent (one rename), else the files are moved in one by one, those
    named in `last` (relative paths) at the end: a reader that waits for them sees a whole
    set. On any error the staged files and the folders made for them are removed, and an
    OS error (a full disk, a read-only folder) becomes one line naming `root`.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(root))
    created = make_folders(root.parent)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; root need not be
        yield tmp
        _move_into(tmp, root, last)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        if isinstance(err, OSError) and not isinstance(err, ToolError) and err.filename is None:
            raise OutputError(describe_os_error(err, root)) from err
        raise
