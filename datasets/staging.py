"""Writing a folder of files so that a failure leaves nothing partial behind.

    with staged_folder(root, last=("train_list.txt",)) as tmp:
        write_everything_into(tmp)
    # now in root; after an error (a full disk, a bad input) root is as it was
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from util.cli import ToolError
from util.io import (OutputError, current_umask, describe_os_error, left_by_ended_processes,
                     make_folders, remove_empty, work_folder, work_folder_owner, write_json)

logger = logging.getLogger(__name__)
MOVING = "moving.json"  # in a move's folder of replaced files: what it moves, until it is whole
KEPT = "files"  # in that folder: the replaced files, under their names in root


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
    is recognisably incomplete, and its old files are in that folder, with the list of the
    files that were moving (``moving.json``): the next staging into `root` puts the old set
    back (`_undo_killed_moves`). On an error the new files go back and the old ones are
    restored.
    """
    if not root.exists():
        os.rename(tmp, root)
        return
    rels = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
    rels.sort(key=lambda rel: rel in last)  # stable: the files of `last` at the end
    for rel in rels:
        _check_destination(root / rel, root)
    aside = work_folder(root.parent, root.name, ".old")
    write_json(aside / MOVING, rels)
    kept = aside / KEPT
    replaced: list[str] = []
    moved: list[str] = []
    made: list[list[Path]] = []
    dest = root

    def set_aside(rel: str) -> None:
        if (root / rel).exists():
            (kept / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(root / rel, kept / rel)
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
    except BaseException as err:  # Ctrl-C too: only a killed move is left half-way
        try:
            for rel in reversed(moved):
                os.replace(root / rel, tmp / rel)
            for rel in reversed(replaced):
                os.replace(kept / rel, root / rel)
            for folders in reversed(made):
                remove_empty(folders)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass  # the old files stay in `aside`, named below
        if not isinstance(err, OSError):
            raise
        where = f" (the replaced files are in {kept})" if aside.exists() else f"; {root} is as it was"
        raise OutputError(err.errno or 0, describe_os_error(err, dest) + where) from err
    (aside / MOVING).unlink()  # the move is whole: nothing to undo
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _undo_killed_moves(root: Path) -> None:
    """Put back the set of `root` whose replacement a killed process left half-way (its old
    files, set aside by `_move_into`), and remove what killed stagings left beside `root`."""
    staged = left_by_ended_processes(root.parent, root.name, ".tmp")
    for aside in left_by_ended_processes(root.parent, root.name, ".old"):
        try:
            rels = json.loads((aside / MOVING).read_text())
        except FileNotFoundError:  # killed before any file moved, or after all had
            rels = []
        tmp = next((f for f in staged if work_folder_owner(f) == work_folder_owner(aside)), None)
        for rel in rels:
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                continue  # not a name _move_into writes
            if (aside / KEPT / rel).exists():
                os.replace(aside / KEPT / rel, root / rel)
            elif tmp is not None and not (tmp / rel).exists():  # moved in, replacing nothing
                (root / rel).unlink(missing_ok=True)
        if rels:
            logger.warning("%s: put back the %d files of an earlier set whose replacement was "
                           "killed half-way", root, len(rels))
        shutil.rmtree(aside, ignore_errors=True)
    for tmp in staged:
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
    _undo_killed_moves(root)
    tmp = None
    try:
        tmp = work_folder(root.parent, root.name, ".tmp")
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
