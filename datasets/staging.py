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
from util.io import OutputError, current_umask, describe_os_error, make_folders, remove_empty


def _check_destination(dest: Path, root: Path) -> None:
    """Refuse, before anything moves, a destination in `root` that a rename would not replace as a
    plain file: a folder, a symbolic link, a read-only file, or a path through a file, a link or an
    unwritable folder (OutputError naming the destination)."""
    for parent in reversed(dest.relative_to(root).parents[:-1]):  # folders between root and dest
        folder = root / parent
        if folder.is_symlink():
            raise OutputError(errno.ELOOP, f"cannot write {dest}: {folder} is a symbolic link")
        if not folder.exists():
            break  # made by the move
        if not folder.is_dir():
            raise OutputError(errno.ENOTDIR, f"cannot write {dest}: {folder} is a file, not a folder")
    if dest.is_symlink():
        raise OutputError(errno.ELOOP, f"cannot write {dest}: it is a symbolic link (nothing is "
                                       "written through a link)")
    if dest.is_dir():
        raise OutputError(errno.EISDIR, f"cannot write {dest}: it is a folder")
    if dest.exists() and not os.access(dest, os.W_OK):
        raise OutputError(errno.EACCES, f"cannot write {dest}: it is read-only")
    folder = next(p for p in (dest.parent, *dest.parents) if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"cannot write {dest}: {folder} is not writable")


def _move_into(tmp: Path, root: Path, last: Sequence[str]) -> None:
    """Move everything in `tmp` into `root`, replacing files of the same names: all or none.

    Every destination is checked before anything moves (`_check_destination`). Each file of
    `root` that is replaced is first moved aside into a hidden folder beside `root`
    (``.<root>.*.old``), and those named in `last` go aside before any new file moves in and
    come in at the end: while the move runs `root` lacks them, so a set whose move was killed
    is recognisably incomplete, and its old files are in that folder. On an error the new
    files go back and the old ones are restored.
    """
    if not root.exists():
        os.rename(tmp, root)
        return
    rels = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
    rels.sort(key=lambda rel: rel in last)  # stable: the files of `last` at the end
    for rel in rels:
        _check_destination(root / rel, root)
    aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
    replaced: list[str] = []
    moved: list[str] = []
    made: list[list[Path]] = []
    dest = root

    def set_aside(rel: str) -> None:
        if (root / rel).exists():
            (aside / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(root / rel, aside / rel)
            replaced.append(rel)

    try:
        for rel in rels:
            if rel in last:
                dest = root / rel
                set_aside(rel)
        for rel in rels:
            dest = root / rel
            made.append(make_folders(dest.parent))
            if rel not in last:
                set_aside(rel)
            os.replace(tmp / rel, dest)
            moved.append(rel)
    except OSError as err:
        try:
            for rel in reversed(moved):
                os.replace(root / rel, tmp / rel)
            for rel in reversed(replaced):
                os.replace(aside / rel, root / rel)
            for folders in reversed(made):
                remove_empty(folders)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass  # the old files stay in `aside`, named below
        kept = f" (the replaced files are in {aside})" if aside.exists() else f"; {root} is as it was"
        raise OutputError(err.errno or 0, describe_os_error(err, dest) + kept) from err
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_folder(root: str | Path, last: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh folder beside `root` to write into; on success its files move into `root`.

    `root` is created if absent (one rename), else the files are moved in one by one after
    every destination was checked, those named in `last` (relative paths) at the end and
    absent from `root` while the others move: a reader that waits for them sees a whole set
    (`_move_into`). On any error `root` is left as it was, the staged files and the folders
    made for them are removed, and an OS error (a full disk, a read-only folder, a folder in
    the way) becomes one line naming the file of `root` it concerns.
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
        where = _in_root(err, tmp, root) if isinstance(err, OSError) and not isinstance(err, ToolError) else None
        if where is not None:
            raise OutputError(err.errno or 0, describe_os_error(err, where)) from err
        raise


def _in_root(err: OSError, tmp: Path | None, root: Path) -> Path | None:
    """The file of `root` a failed write is about (a staged file is named by its place in `root`);
    None for an error about another file (an input)."""
    if err.filename is None:
        return root
    if tmp is None:
        return None
    try:
        return root / Path(err.filename).relative_to(tmp)
    except ValueError:
        return None
