"""Crash-safe file writes (no torch import: report tools start fast)."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from util.cli import ToolError

TMP_SUFFIX = ".tmp"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes (read in chunks: weights files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class OutputError(ToolError, OSError):
    """A file could not be written (disk full, read-only folder, a folder in the way)."""


def current_umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(err: BaseException, path: str | Path) -> str:
    """One line for a failed write: what happened and to which file."""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(err) or "file write failed" in str(err):
        return f"no space left on device while writing {path}"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path}: {os.strerror(code)}"
    if code == errno.EISDIR:
        return f"cannot write {path}: it is a folder"
    return f"cannot write {path}: {getattr(err, 'strerror', None) or err}"


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
    """Remove folders `make_folders` created, deepest first, as long as they are empty: a
    command that fails after making them leaves none behind. A folder with anything in it stays."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def _machine() -> str:
    """This machine and process id space: the host name, and the pid namespace where there is
    one (containers sharing a host name each have their own process ids)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}-{namespace}"


def work_folder(parent: Path, stem: str, suffix: str) -> Path:
    """A new private folder ``.<stem>.<host>-<pid namespace>-<pid>.<8 random><suffix>`` in
    `parent`, for files made before they move into place. Its name says which process made
    it, so a later command can tell one left by a killed process (`left_by_ended_processes`)."""
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{stem}.{_machine()}-{os.getpid()}.",
                                 suffix=suffix))


def work_folder_owner(folder: Path) -> str:
    """The machine and process that made a `work_folder` (as its name says)."""
    return folder.name.rsplit(".", 3)[-3]


def left_by_ended_processes(parent: Path, stem: str, suffix: str) -> list[Path]:
    """The `work_folder`s of `stem` in `parent` made on this machine by a process that has
    ended without removing them (killed): no process is left to finish or remove them."""
    pattern = re.compile(rf"\.{re.escape(stem)}\.{re.escape(_machine())}-(\d+)"
                         rf"\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _running(int(match[1])):
            found.append(entry)
    return found


def _running(pid: int) -> bool:
    """Whether a process of this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file or folder, however spelt (a symbolic link on the way,
    ``//``, ``..``, a hard link): the same file on disk where both exist, else the same
    resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def atomic_target(name: str) -> str | None:
    """The name of the file an `atomic_write` temporary named ``name`` was for
    (``.<file name>.<8 random>.tmp``); None for any other name."""
    found = re.fullmatch(rf"\.(.+)\.[a-z0-9_]{{8}}{re.escape(TMP_SUFFIX)}", name)
    return found.group(1) if found else None


def _move_into_new(tmp: str, path: Path) -> None:
    """Rename ``tmp`` to ``path`` only if nothing is at ``path``: a hard link fails on an
    existing name (a file system without hard links is checked just before the rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError:  # no hard links here (EPERM, ENOSYS on FUSE, ...)
        if os.path.lexists(path):
            raise _appeared(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _appeared(path: Path) -> OutputError:
    return OutputError(errno.EEXIST, f"{path} appeared while this command ran (another command "
                                     "writing it?): it is kept and this one's output not written")


def _fsync(path: str) -> None:
    """Flush a written file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], Any], replace: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a partial file.
    The bytes reach the disk before the rename (fsync), so a power loss leaves the old file
    or the new one, never an empty one. With ``replace`` False the file must still be new
    when it moves into place: one made meanwhile (by another command) is kept, and the
    write refused (``OutputError``).

    A failed write (disk full, an error in ``write``) leaves ``path`` as it was and no
    temporary file behind; OS-level failures are raised as ``OutputError`` with one line
    naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(errno.EISDIR, f"cannot write {path}: it is a folder")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        write(tmp)
        # mkstemp creates 0600, and some writers (safetensors) replace the file with a 0600
        # one: results on a shared server must be readable as the umask allows.
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _move_into_new(tmp, path)
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(err.errno or 0, describe_os_error(err, path)) from err
    except RuntimeError as err:  # torch.save reports a full disk as a C++ writer failure
        if "write" in str(err).lower() and ("fail" in str(err).lower() or "space" in str(err).lower()):
            raise OutputError(errno.ENOSPC, describe_os_error(err, path)) from err
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Iterable[Any]],
              replace: bool = True) -> Path:
    """Atomically write a CSV: the header, then the rows (``replace``: as `atomic_write`);
    returns the path."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    path = Path(path)
    atomic_write(path, write, replace)
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / infinity replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (undefined numbers become null, never NaN)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(obj), f, indent=2, default=str, allow_nan=False)
            f.write("\n")

    atomic_write(path, write)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
