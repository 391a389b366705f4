"""A run folder that tells the truth: one run at a time, epochs committed whole, and a
record of every file the run wrote.

- ``.lock``: taken with ``O_EXCL`` by the run writing the folder (pid, host, start, command);
  a second run is refused with the holder's name, a dead holder's lock is taken over.
- ``commit.json``: the last committed epoch. An epoch's files (best and last checkpoint,
  resume state) are first written into ``.pending/``, then ``commit.json`` names them with
  their SHA-256 and the run's log history (one atomic rename: the commit point), then they
  are moved into place and ``log.txt`` is rewritten from that history. A run killed at any
  point leaves either the previous commit or the new one, never a mix: ``recover`` finishes
  or discards an interrupted commit and checks every committed file against its hash.
- ``run_files.json``: every file the run wrote (relative names); ``--overwrite`` removes
  exactly these and nothing else.

Only the main process touches these files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from util.io import TMP_SUFFIX, OutputError, describe_os_error, file_sha256, write_json, write_text
from util.cli import ToolError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
COMMIT_NAME = "commit.json"
PENDING_DIR = ".pending"
MANIFEST_NAME = "run_files.json"
COMMIT_FORMAT = "cxr-lora-commit/1"
# What runs written before run_files.json existed wrote: exact names only, never patterns
# that could match a user's own files.
LEGACY_RUN_FILES = (
    "log.txt", "train.log", "config.json",
    "checkpoint-best.safetensors", "checkpoint-best.json",
    "checkpoint-last.safetensors", "checkpoint-last.json", "checkpoint-last.state.pt",
    "results_test.json", "results_test_auroc.csv", "results_test_auroc.md",
    "predictions_test.csv", "roc_test.png",
)


# A run's arguments that say where and how it executed, and records that do not change what
# it computed: runs that differ only in these computed the same thing. (`cache` and
# `cache_used`: what a cache changes in the pixels, a lossy cache, is compared on its own;
# the DICOM rule used is kept as the dicom_scaling argument.)
EXECUTION_ARGS = frozenset({
    "output_dir", "run_name", "log_dir", "overwrite", "device", "resume", "start_epoch", "eval",
    "no_progress", "note", "script", "cache", "num_workers", "pin_mem", "no_pin_mem",
    "eval_batch_size", "log_freq", "compile", "compile_mode", "compile_backend", "dist_eval",
    "world_size", "local_rank", "dist_on_itp", "dist_url", "ci_resamples", "eval_name",
    "progress_freq", "check_args", "cache_used", "notes", "explicit", "demo_replace",
    "dicom_scaling_used", "resumed_from", "allow_overlap", "unsafe_load", "grad_checkpointing",
})


class RunFolderError(ToolError, ValueError):
    """A run folder that is in use, inconsistent, or cannot be written."""


def _fault_point(label: str) -> None:
    """Called between the file operations of a commit; tests replace it to simulate a kill."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An ``O_EXCL`` lock file: one run writes a folder at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def acquire(self, command: str = "") -> None:
        """Take the lock, or raise naming the run that holds it (a dead holder's lock is taken over)."""
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if self._stale(holder):
                    logger.warning("removing the stale lock of a run that is gone (pid %s on %s, "
                                   "started %s)", holder.get("pid"), holder.get("host"),
                                   holder.get("started"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunFolderError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}: "
                    f"{holder.get('command') or 'command unknown'}); wait for it to finish or "
                    f"choose another --output_dir / --run_name. If no such run exists any more, "
                    f"delete {self.path}") from None
            except OSError as err:
                raise RunFolderError(describe_os_error(err, self.path)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return
        raise RunFolderError(f"could not take the lock {self.path}")

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        # Only a holder on this host can be checked; a lock written half-way (no pid) by a
        # process killed in the act is stale too.
        if "pid" not in holder:
            return True
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))

    def release(self) -> None:
        """Give the lock back (only if this process holds it)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class RunFolder:
    """The files of one run: what it wrote, its commits, its lock."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.lock = RunLock(self.folder)

    # -- what the run wrote -------------------------------------------------------------
    def written(self) -> list[str]:
        """Relative names of the files this run recorded as its own."""
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text()).get("files", []))
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{path}: unreadable record of the run's files ({err})") from None

    def record(self, *paths: str | Path) -> None:
        """Add files (absolute or relative to the folder) to the run's own files."""
        names = self.written()
        for p in paths:
            p = Path(p)
            rel = os.path.relpath(p, self.folder) if p.is_absolute() else str(p)
            if rel.startswith(".."):
                continue  # outside the folder (e.g. a --log_dir elsewhere): not ours to remove
            if rel not in names:
                names.append(rel)
        write_json(self.folder / MANIFEST_NAME, {"files": names})

    def remove_own_files(self) -> list[str]:
        """Delete exactly the files the previous run wrote (for --overwrite); returns them."""
        names = self.written() if (self.folder / MANIFEST_NAME).is_file() else list(LEGACY_RUN_FILES)
        removed = []
        for name in [*names, COMMIT_NAME, MANIFEST_NAME]:
            path = self.folder / name
            if path.is_file():
                path.unlink()
                removed.append(name)
        if (self.folder / PENDING_DIR).is_dir():
            shutil.rmtree(self.folder / PENDING_DIR)
        return removed

    # -- commits ------------------------------------------------------------------------
    def read_commit(self) -> dict[str, Any] | None:
        """The last committed epoch's record, or None when nothing was committed."""
        path = self.folder / COMMIT_NAME
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{path}: unreadable commit record ({err}); the run folder is "
                                 "damaged") from None
        if record.get("format") != COMMIT_FORMAT:
            raise RunFolderError(f"{path}: not a commit record of this tool "
                                 f"(format {record.get('format')!r})")
        return record

    def commit(self, epoch: int, stage: Callable[[Path], Any], log: list[dict[str, Any]],
               last_complete: str = "") -> None:
        """Write one epoch's files as a single commit (see the module docstring).

        ``stage(folder)`` writes the epoch's files into the staging folder it is given, under
        their final names. ``log`` is the whole history of log lines up to this epoch.
        """
        pending = self.folder / PENDING_DIR
        try:
            if pending.exists():
                shutil.rmtree(pending)  # an uncommitted leftover: never named by commit.json
            pending.mkdir(parents=True)
            _fault_point("mkdir")
            stage(pending)
            _fault_point("staged")
            previous = self.read_commit()
            # Files not rewritten this epoch (e.g. checkpoint-best when validation did not
            # improve) stay part of the commit with their earlier hashes.
            hashes = dict(previous["files"]) if previous else {}
            for target in sorted(pending.iterdir()):
                if target.name.endswith(TMP_SUFFIX):
                    continue
                _fsync_file(target)
                hashes[target.name] = file_sha256(target)
            record = {"format": COMMIT_FORMAT, "epoch": int(epoch), "files": hashes, "log": log,
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            write_json(self.folder / COMMIT_NAME, record)  # the commit point
            _fault_point("committed")
            self.record(*hashes, COMMIT_NAME, "log.txt")
            _fault_point("recorded")
            self._roll_forward(record, check=False)  # the staged files were just hashed
        except OSError as err:
            kept = f"the last complete checkpoint is {last_complete}" if last_complete \
                else "no complete checkpoint was written yet"
            what = err.strerror if isinstance(err, OutputError) and err.strerror else \
                describe_os_error(err, getattr(err, "filename", None) or self.folder)
            raise RunFolderError(f"{what}; {kept}") from None

    def _roll_forward(self, record: dict[str, Any], check: bool = True) -> None:
        """Move a committed epoch's staged files into place and rewrite log.txt (idempotent).

        ``check``: move a staged file only if it has the committed hash. After a kill,
        ``.pending/`` may hold a newer, uncommitted epoch's files under the same names.
        """
        pending = self.folder / PENDING_DIR
        for name, digest in record["files"].items():
            staged = pending / name
            if staged.is_file() and (not check or file_sha256(staged) == digest):
                os.replace(staged, self.folder / name)
                _fault_point(f"moved {name}")
        write_text(self.folder / "log.txt", "".join(json.dumps(l) + "\n" for l in record["log"]))
        _fault_point("log")
        if pending.exists():
            shutil.rmtree(pending)

    def recover(self, verify: bool = True) -> dict[str, Any] | None:
        """Finish or discard an interrupted commit, clean temporary files, verify the last commit.

        Returns the commit record (None when nothing was committed). Raises when a committed
        file is missing or does not match its hash (unless ``verify`` is False: a run about
        to be replaced need not be intact).
        """
        for tmp in self.folder.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)  # atomic writes a killed run never finished
        record = self.read_commit()
        if record is None:
            if (self.folder / PENDING_DIR).exists():
                shutil.rmtree(self.folder / PENDING_DIR)
            return None
        self._roll_forward(record)
        if verify:
            self.verify(record)
        return record

    def verify(self, record: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Check every file of the last commit against its hash; raise naming a mismatch."""
        record = record if record is not None else self.read_commit()
        if record is None:
            return None
        for name, digest in record["files"].items():
            path = self.folder / name
            if not path.is_file():
                raise RunFolderError(f"{path} is missing: the run folder's last commit (epoch "
                                     f"{record['epoch']}) names it")
            if file_sha256(path) != digest:
                raise RunFolderError(f"{path} does not belong to the last committed epoch "
                                     f"{record['epoch']} of {self.folder} (sha256 differs from "
                                     f"{COMMIT_NAME}): it was changed after the run wrote it")
        return record


def run_owning(path: str | Path) -> Path | None:
    """The run folder that recorded ``path`` as one of its own files (its reports,
    predictions, checkpoints), or None: other tools must not write over a run's results."""
    path = Path(path).resolve()
    for folder in path.parents:
        names = RunFolder(folder).written() if (folder / MANIFEST_NAME).is_file() else []
        if os.path.relpath(path, folder) in names:
            return folder
    return None


def probe_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write a probe file into it; raise one line if impossible."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"output folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}{TMP_SUFFIX}"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"output folder {folder} is not writable: "
                             f"{describe_os_error(err, folder)}") from None
