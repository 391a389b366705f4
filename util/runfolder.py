"""The run folder: one owner for everything a training run keeps on disk.

The entry script asks it one question per step:

    folder = RunFolder(path)                   # absolute; nothing touched yet
    folder.lock.acquire(command)               # one run at a time (flock)
    plan = folder.plan(settings, resume=..., overwrite=..., replace_demo=...)
    folder.start(plan, run_record)             # removes a replaced run's files, writes config.json
    folder.commit(epoch, stage, history)       # one epoch, all or nothing
    folder.best_checkpoint()                   # what the final test loads

Files:
- ``.lock``: held with ``flock`` by the run writing the folder (the file names the holder:
  pid, host, start, command). A lock dies with its process, so a killed run never blocks
  the next one; only the holder removes the file, while still holding it.
- ``config.json`` (format ``RUN_FORMAT``): the run's ``settings`` (what makes the run this
  run: see ``differing``), how it executed, and what it found (data cache, precision, ...).
- ``commit.json``: the last committed epoch. An epoch's files (best and last checkpoint,
  resume state) are first written into ``.pending/``, then ``commit.json`` names them with
  their SHA-256 and the run's log history (one atomic rename: the commit point), then they
  are moved into place and ``log.txt`` is rewritten from that history. A run killed at any
  point leaves either the previous commit or the new one, never a mix: ``recover`` finishes
  or discards an interrupted commit and checks every committed file against its hash.
- ``run_files.json``: every file the run wrote (names inside the folder); ``--overwrite``
  removes exactly these and nothing else.

Only the main process touches these files.
"""
from __future__ import annotations

import errno
import hashlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from util.cli import ToolError, UsageError
from util.io import (TMP_SUFFIX, OutputError, atomic_target, describe_os_error, file_sha256,
                     make_folders, same_file, write_json, write_text)

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
COMMIT_NAME = "commit.json"
PENDING_DIR = ".pending"
MANIFEST_NAME = "run_files.json"
PROBE_PREFIX = ".write-probe-"  # probe_writable's file, <pid>.tmp
LOGS_DIR = "logs"  # TensorBoard's folder in the run unless --log_dir says another
RUN_FORMAT = "cxr-lora-run/3"
COMMIT_FORMAT = "cxr-lora-commit/1"
MANIFEST_FORMAT = "cxr-lora-files/1"
# Files whose presence says a folder holds a training run.
RUN_MARKERS = (CONFIG_NAME, "log.txt", "checkpoint-last.json", COMMIT_NAME)


def report_names(split: str) -> tuple[str, ...]:
    """Every file a test of ``split`` writes into its folder (results, tables, predictions,
    plots, subgroups): the names ``--eval`` and a run's final test check and record."""
    stem = f"results_{split}"
    return (f"{stem}.json", *(f"{stem}_{table}.{ext}" for table in ("auroc", "calibration",
                                                                     "operating_points")
                              for ext in ("csv", "md")),
            f"predictions_{split}.csv", f"roc_{split}.png", f"reliability_{split}.png",
            *(f"subgroups_{split}.{ext}" for ext in ("md", "csv", "png", "svg")))


# Every file a training run writes into its folder (with the launch script's copy and the
# TensorBoard folder): a folder holding a file of these names that no run recorded is
# somebody else's, and is not written over unless --overwrite says so.
RUN_OUTPUTS = (CONFIG_NAME, "train.log", "log.txt", COMMIT_NAME, MANIFEST_NAME,
               "checkpoint-best.safetensors", "checkpoint-best.json", "checkpoint-last.safetensors",
               "checkpoint-last.json", "checkpoint-last.state.pt", *report_names("test"))
# Settings a continued run may change: a longer (or shorter) schedule.
RESUME_MAY_CHANGE = ("epochs",)


class RunFolderError(ToolError, ValueError):
    """A run folder that is in use, inconsistent, or cannot be written."""


class RunConflict(RunFolderError):
    """The command asks for something the folder's existing run contradicts."""


def _fault_point(label: str) -> None:
    """Called between the file operations of a commit; tests replace it to simulate a kill."""


def differing(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings (``--flag old -> new``) in which two runs differ: the one definition of
    "another run", used by the folder check, resume and util.summarize."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"--{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _read_record(path: Path, fmt: str, what: str) -> dict[str, Any] | None:
    """One of the folder's JSON records (None when absent); one line when it is damaged or of
    another format than ``fmt``."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: unreadable {what} ({err}); the run folder is damaged") from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        found = record.get("format") if isinstance(record, dict) else None
        raise RunFolderError(f"{path}: a {what} of format {found!r}, this tool reads {fmt!r}")
    return record


def read_run_record(folder: str | Path) -> dict[str, Any] | None:
    """A folder's config.json (None when absent); one line when it is damaged or of another format."""
    return _read_record(Path(folder) / CONFIG_NAME, RUN_FORMAT, "run record")


def _is_lock_record(content: bytes) -> bool:
    """Whether a lock file's bytes are this tool's: empty (just created) or the holder's JSON."""
    if not content.strip():
        return True
    try:
        record = json.loads(content)
    except ValueError:
        return False
    return isinstance(record, dict) and {"pid", "host"} <= set(record)


class RunLock:
    """An ``flock`` on ``<folder>/.lock``: one run writes a folder at a time.

    The lock is the kernel's, so two processes can never both hold it, and a dead holder's
    lock is free. The file's content only names the holder for the refusal message.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str = "") -> None:
        """Take the lock, or raise naming the run that holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise RunFolderError(describe_os_error(err, self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RunFolderError(describe_os_error(err, self.path)) from None
                holder = self._read()
                raise RunFolderError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}: "
                    f"{holder.get('command') or 'command unknown'}); wait for it to finish or "
                    "choose another --output_dir / --run_name") from None
            try:  # the holder before us may have removed the file after we opened it
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if not _is_lock_record(os.pread(fd, 65536, 0)):
            os.close(fd)
            raise RunFolderError(f"{self.path} is not a lock file of this tool (a file of yours?): "
                                 "rename or move it, or choose another --output_dir / --run_name")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def _read(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        """Give the lock back (only if this process holds it); the file goes while still held."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


@dataclass
class Plan:
    """What the folder's state makes of --resume / --overwrite for this run."""

    resume: str          # the checkpoint this run continues; '' for a fresh start
    replace: bool        # remove the folder's previous run (its own files) at the start
    committed: dict[str, Any] | None  # this folder's last commit, when this run continues it
    source: Path | None  # the folder of a run continued into this other folder


class RunFolder:
    """The files of one run: what it wrote, its commits, its lock, its record."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.lock = RunLock(self.folder)

    @classmethod
    def for_evaluation(cls, folder: str | Path, checkpoint: str | Path) -> "RunFolder":
        """The folder an evaluation of ``checkpoint`` writes (resolved first): never a training
        run's folder, nor a folder inside one but the checkpoint's own ``eval/<name>``."""
        out, run = Path(os.path.realpath(folder)), Path(os.path.realpath(checkpoint_folder(checkpoint)))
        for parent in (out, *out.parents):
            if _holds_training_run(parent):
                if not (parent == run and out.parent != run and out.is_relative_to(run / "eval")):
                    raise UsageError(
                        f"{out} is {'' if parent == out else 'inside '}a training run's folder "
                        f"({parent}): --eval writes its own folder (leave out --output_dir and "
                        "give a plain --eval_name for <run>/eval/<name>)")
        return cls(out)

    # -- what the run wrote -------------------------------------------------------------
    def written(self) -> list[str]:
        """Names (inside the folder) of the files this run recorded as its own."""
        record = _read_record(self.folder / MANIFEST_NAME, MANIFEST_FORMAT, "record of the run's files")
        files = (record or {}).get("files", [])
        return [n for n in files if isinstance(n, str) and self._inside(n)]

    def _inside(self, name: str) -> bool:
        """Whether a recorded name is a file of this folder (never ``..``, never absolute)."""
        norm = os.path.normpath(name)
        return not (os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep)
                    or norm == ".")

    def record(self, *paths: str | Path) -> None:
        """Add files (absolute, or relative to the folder) to the run's own files."""
        names = self.written()
        for path in map(Path, paths):
            full = path if path.is_absolute() else self.folder / path
            rel = os.path.relpath(os.path.abspath(full), self.folder)
            if self._inside(rel) and rel not in names:  # outside (a --log_dir elsewhere): not ours
                names.append(rel)
        write_json(self.folder / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "files": names})

    def foreign(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` that exist in the folder but no run recorded as its own."""
        own = set(self.written())
        return [n for n in names if (self.folder / n).exists() and n not in own]

    def writable(self, name: str) -> Path:
        """The path of a file the run is about to write: never through a symlink."""
        path = self.folder / name
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link: a run does not write through it "
                                 "(remove it, or choose another --output_dir / --run_name)")
        return path

    def remove_own_files(self) -> list[str]:
        """Delete exactly the files the previous run wrote (for --overwrite); returns them."""
        removed = []
        for name in [*self.written(), COMMIT_NAME, MANIFEST_NAME]:
            path = self.folder / name
            if path.is_symlink() or path.is_file():  # a link itself goes, never its target
                path.unlink()
                removed.append(name)
        if (self.folder / PENDING_DIR).is_dir():
            shutil.rmtree(self.folder / PENDING_DIR)
        return removed

    # -- which run ----------------------------------------------------------------------
    def run_record(self) -> dict[str, Any] | None:
        """This folder's run record (config.json), or None; {} for a run whose record is lost."""
        if not any((self.folder / m).exists() for m in RUN_MARKERS):
            return None
        if not _holds_training_run(self.folder) and not (self.folder / MANIFEST_NAME).exists():
            return None  # a user's own config.json / log.txt: foreign files, not a run
        try:
            return read_run_record(self.folder) or {}
        except RunFolderError:
            return {}

    def plan(self, settings: dict[str, Any], *, resume: str, overwrite: bool,
             replace_demo: bool = False) -> Plan:
        """Recover the (locked) folder, resolve --resume auto against it, refuse another run.

        ``resume``: '', 'auto' or a checkpoint path; ``replace_demo``: this is the demo in
        its own folder, which replaces an earlier demo run there.
        """
        old = self.run_record()
        old_settings = (old or {}).get("settings") or {}
        own = resume == "auto" or (bool(resume) and same_file(checkpoint_folder(resume), self.folder))
        if overwrite and own:
            raise RunConflict(f"--resume {resume} continues the run in {self.folder}, "
                              "--overwrite replaces it: give one of them")
        if replace_demo and not resume and old_settings.get("demo") is True:
            overwrite = True
        committed = self.recover(verify=not (overwrite and not own))
        if resume == "auto":
            resume, own, overwrite = self._resolve_auto(old, committed, settings, overwrite)
        self._refuse_another_run(old, settings, committed, resume, overwrite)
        source = checkpoint_folder(resume) if resume and not own else None
        keep = bool(resume) and own
        if overwrite and not keep:
            self._refuse_orphaned_evaluations()
        return Plan(resume=resume, replace=overwrite and not keep,
                    committed=committed if keep else None, source=source)

    def _refuse_orphaned_evaluations(self) -> None:
        """Replacing a run would leave its evaluations (``eval/<name>``) describing a checkpoint
        that no longer exists, under the new checkpoint's name: they are the user's to move."""
        evals = sorted(p.parent.name for p in (self.folder / "eval").glob("*/results_*.json"))
        if evals:
            raise RunConflict(f"--overwrite would replace the run in {self.folder}, whose "
                              f"evaluations ({', '.join(f'eval/{e}' for e in evals[:3])}"
                              f"{'...' if len(evals) > 3 else ''}) test its checkpoint: move or "
                              "remove them first, or choose another --output_dir / --run_name")

    def _resolve_auto(self, old: dict | None, committed: dict | None, settings: dict,
                      overwrite: bool) -> tuple[str, bool, bool]:
        """What --resume auto means here: (checkpoint, continues this folder, replace)."""
        if committed is not None or (self.folder / "checkpoint-last.json").exists():
            return str(self.folder / "checkpoint-last"), True, overwrite
        differ = differing((old or {}).get("settings") or {}, settings)
        if old is not None and (not old.get("settings") or differ):
            raise RunConflict(f"--resume auto: {self.folder} holds another run with no "
                              f"completed epoch ({', '.join(differ[:4]) or 'other settings'}): "
                              "give this one another --run_name or --note")
        earlier = continued_from(old, self.folder)
        if earlier is not None:
            # A continuation of another run, stopped before its first commit here: continue
            # that run again (its files here are replaced), not start from the weights.
            logger.warning("--resume auto: %s has no completed epoch; it continued %s, which "
                           "this run continues again", self.folder, earlier)
            return earlier, False, True
        logger.warning("--resume auto: %s has no completed epoch to continue; starting %s%s",
                       self.folder, "the run afresh there" if old is not None else "a new run",
                       other_length_hint(self.folder))
        return "", False, overwrite or old is not None

    def _refuse_another_run(self, old: dict | None, settings: dict, committed: dict | None,
                            resume: str, overwrite: bool) -> None:
        """Refuse to write into a folder that holds another run, saying what would be right."""
        if old is None or overwrite:
            return
        markers = ", ".join(m for m in RUN_MARKERS if (self.folder / m).exists())
        if resume:
            source = checkpoint_folder(resume)
            if same_file(source, self.folder):
                return
            raise RunConflict(
                f"--resume {resume} continues the run of {source} in {self.folder}, but "
                f"{self.folder} already holds a run ({markers}): its results would be mixed with "
                "this one's. Choose an empty --output_dir / --run_name, or --overwrite to replace "
                "that run" + (" (if it is this run's own earlier continuation, --resume auto "
                              "continues it)" if committed is not None else ""))
        old_settings = old.get("settings") or {}
        differ = differing(old_settings, settings)
        old_epochs = old_settings.get("epochs")
        if not old_settings:
            hint = "choose another --output_dir / --run_name, or --overwrite to replace it"
        elif differ:
            shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
            hint = (f"it is a different run ({shown}): give this one another --run_name or "
                    "--note to keep both, or --overwrite to replace that run")
            if (len(differ) == 1 and differ[0].startswith("--epochs ") and committed is not None
                    and isinstance(old_epochs, int) and settings.get("epochs", 0) > old_epochs):
                hint += f"; or --resume auto to continue it to {settings['epochs']} epochs"
        elif committed is not None and committed["epoch"] + 1 >= int(old_epochs or -1):
            hint = ("that run with these settings is complete: --overwrite to run it again, or "
                    "another --note / --seed for a new run beside it")
        else:
            hint = "that run with these settings did not finish: --resume auto continues it"
        raise RunConflict(f"output folder {self.folder} already holds a run ({markers}): {hint}")

    def check_resume(self, checkpoint: str, saved: dict[str, Any], settings: dict[str, Any]) -> None:
        """Refuse to continue a run (its recorded ``saved`` settings) with other settings."""
        may_change = set(RESUME_MAY_CHANGE)
        if saved.get("global_batch") == settings.get("global_batch"):
            # The same global batch on another number of processes: the same gradient per step.
            may_change |= {"batch_size", "accum_iter"}
        # The method first: the flags of another method differ because the method does.
        changed = [k for k in sorted(set(saved) | set(settings), key=lambda k: (k != "method", k))
                   if k not in may_change and saved.get(k) != settings.get(k)]
        if changed:
            key = changed[0]
            raise RunConflict(f"--resume {checkpoint}: {_resume_difference(key, saved.get(key), settings)}")
        split = [(saved.get(k), settings.get(k)) for k in ("batch_size", "accum_iter")]
        if any(a != b for a, b in split):
            logger.warning("--resume: global batch %s as before, split as --batch_size %s x "
                           "--accum_iter %s per process (was %s x %s): the images of a step are "
                           "drawn in another order than an uninterrupted run's",
                           settings.get("global_batch"), split[0][1], split[1][1], split[0][0], split[1][0])
        if saved.get("epochs") != settings.get("epochs"):
            logger.warning("--resume: --epochs changed from %s to %s: the lr schedule follows "
                           "the new length from here on", saved.get("epochs"), settings.get("epochs"))

    # -- the run's start and its files ----------------------------------------------------
    def start(self, plan: Plan, record: dict[str, Any], script: str = "",
              overwrite: bool = False) -> None:
        """Replace a previous run if the plan says so, then write config.json (and the launch
        script's copy) and record them, with the log file, as this run's.

        Files of the run's names that no run recorded (a user's own, in a folder given with
        ``--run_name ''``) are refused unless ``overwrite``; symbolic links always."""
        if script and Path(script).name in RUN_OUTPUTS:
            raise RunConflict(f"--script {script}: its copy in the run folder would replace the "
                              f"run's own {Path(script).name}; rename the script")
        names = [*RUN_OUTPUTS, PENDING_DIR, *([Path(script).name] if script else [])]
        for name in [*names, LOGS_DIR]:  # (TensorBoard's folder: new event files, never a link)
            self.writable(name)
        # (A run's own .pending/ is gone once recover() ran.)
        foreign = [n for n in self.foreign(names) if n not in (COMMIT_NAME, MANIFEST_NAME)]
        if foreign and not overwrite and not plan.resume:
            raise RunConflict(f"{self.folder} holds files no run of this tool wrote "
                              f"({', '.join(foreign[:4])}): a run would write over them; choose "
                              "another --output_dir / --run_name, or --overwrite to replace them")
        if plan.replace:
            removed = self.remove_own_files()
            if removed:
                logger.info("--overwrite: removed the previous run's %d files from %s",
                            len(removed), self.folder)
        self.writable("train.log")
        write_json(self.writable(CONFIG_NAME), {"format": RUN_FORMAT, **record})
        written = [CONFIG_NAME, "train.log"]
        if script and Path(script).is_file():
            name = Path(script).name
            write_text(self.writable(name), Path(script).read_text())
            written.append(name)
        self.record(*written)

    def best_checkpoint(self) -> Path:
        """The checkpoint the final test loads: this folder's best validated epoch."""
        return self.folder / "checkpoint-best"

    # -- commits ------------------------------------------------------------------------
    def read_commit(self) -> dict[str, Any] | None:
        """The last committed epoch's record, or None when nothing was committed."""
        return _read_record(self.folder / COMMIT_NAME, COMMIT_FORMAT, "commit record")

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
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
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
        if not (self.folder / MANIFEST_NAME).is_file():
            return None  # no run wrote here: whatever the folder holds is not ours to clean
        own = {*RUN_OUTPUTS, *self.written()}
        for tmp in self.folder.glob(f".*{TMP_SUFFIX}"):
            if tmp.is_file() and not tmp.is_symlink() and _temporary_of(tmp.name, own):
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

    def carry_best(self, source: Path, pending: Path, best_epoch: int | None,
                   saved_epoch: Callable[[Path], Any]) -> None:
        """Copy a continued run's checkpoint-best into this folder's staged commit, checked
        against the source's commit record and its best epoch (``saved_epoch(stem)`` reads
        the epoch a checkpoint's JSON records)."""
        tensors, config = source / "checkpoint-best.safetensors", source / "checkpoint-best.json"
        if best_epoch is None and not config.exists():
            return  # no epoch of that run was validated yet: nothing to carry
        if not (tensors.is_file() and config.is_file()):
            raise RunFolderError(f"{source / 'checkpoint-best'} is missing: the resumed run's best "
                                 f"checkpoint (epoch {best_epoch}) is needed in this run's folder")
        saved = saved_epoch(source / "checkpoint-best")
        if saved != best_epoch:
            raise RunFolderError(f"{config} is of epoch {saved}, but the resume state's best "
                                 f"epoch is {best_epoch}: the resumed run's files disagree")
        record = RunFolder(source).read_commit()
        for path in (tensors, config):
            copy = pending / path.name
            shutil.copyfile(path, copy)
            if record is not None and record["files"].get(path.name) not in (None, file_sha256(copy)):
                raise RunFolderError(f"{path} changed after its run committed it (sha256 differs "
                                     f"from {source / COMMIT_NAME}): not carried into this run")


def _resume_difference(key: str, old: Any, settings: dict[str, Any]) -> str:
    """How a run's recorded setting ``key`` (``old``) differs from this command's, in words."""
    new = settings.get(key)
    if key == "weights_sha256":
        return (f"the run was trained on other pre-trained weights (sha256 {str(old)[:12]}...) "
                f"than --finetune gives (sha256 {str(new)[:12]}...)")
    if key == "split_sha256":
        split = next(s for s in sorted(set(old or {}) | set(new or {}))
                     if (old or {}).get(s) != (new or {}).get(s))
        return (f"the run was trained on other data: its {split} split file had sha256 "
                f"{str((old or {}).get(split))[:12]}..., --data_path / --split_dir give "
                f"{str((new or {}).get(split))[:12]}...; resume on the run's own data, or start "
                "a new run")
    if key == "pixels":
        return (f"the run read its images from {old}, this command from {new}; resume with the "
                "run's own --cache")
    return (f"the run was trained with --{key} {old!r}, this command gives {new!r}; resume with "
            "the run's own settings, or start a new run")


DEMO_RUN_PREFIX = "demo-"


def auto_run_name(settings: dict[str, Any], weights: str, method_tag: str, note: str = "") -> str:
    """<dataset>_<fraction>_<weights>_<method>[-<tag>]_[<size>px_]<optimizer>-lr<lr>-e<epochs>
    -b<global batch>_s<seed>[_<note>]: runs that differ in data set, label fraction, weights,
    method or its size, recipe or seed never share a folder (``settings`` as config.json holds
    them; ``weights``: `weights.weights_label` of the pre-trained file, '' for none)."""
    method = settings["method"] + (f"-{method_tag}" if method_tag else "")
    parts = [settings["dataset"], settings["data_size"].replace("%", "pct"),
             weights.lower() or "random", method,
             f"{settings['optimizer']}-lr{settings['lr']:g}-e{settings['epochs']}"
             f"-b{settings['global_batch']}", f"s{settings['seed']}"]
    if settings["input_size"] != 224:  # the paper's size goes without saying
        parts.insert(4, f"{settings['input_size']}px")
    return "_".join(parts + ([note] if note else []))


def run_path(output_dir: str | Path, run_name: str, settings: dict[str, Any], *, weights: str = "",
             method_tag: str = "", note: str = "", demo_given: list[str] | None = None) -> Path:
    """The run folder: ``output_dir/run_name`` ('' for ``output_dir`` itself); for 'auto',
    named after what makes the run distinct (``auto_run_name``), or for a demo after its kind
    and the settings ``demo_given`` on the command line (``demo_run_name``)."""
    if demo_given is not None:
        return Path(output_dir) / demo_run_name(settings, demo_given)
    if run_name != "auto":
        return Path(output_dir) / run_name
    return Path(output_dir) / auto_run_name(settings, weights, method_tag, note)


def demo_run_name(settings: dict[str, Any], given: list[str]) -> str:
    """demo-<kind>[_s<seed>][_<digest>]: demo runs that differ in a setting ``given`` on the
    command line keep apart; a demo run of another length stays in its folder (``--resume
    auto`` continues it)."""
    name = DEMO_RUN_PREFIX + settings["dataset"] + (f"_s{settings['seed']}" if settings["seed"] else "")
    # Named already (demo, data set kind, seed), or continued in the folder (epochs).
    shown = sorted(k for k in given if k in settings and k not in ("demo", "dataset", "seed", "epochs"))
    if shown:
        text = json.dumps({k: settings[k] for k in shown}, sort_keys=True)
        name += "_" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return name


def checkpoint_folder(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoint-last``, with or without suffix)."""
    return Path(os.path.abspath(checkpoint)).parent


def _temporary_of(name: str, own: set[str]) -> bool:
    """Whether ``name`` is a temporary file this tool makes for one of the files ``own``
    (``util.io.atomic_target``) or a write probe (``probe_writable``); a user's own hidden
    ``.tmp`` file is neither."""
    return bool(re.fullmatch(rf"{re.escape(PROBE_PREFIX)}\d+{re.escape(TMP_SUFFIX)}", name)) \
        or atomic_target(name) in own


def _holds_training_run(folder: Path) -> bool:
    """Whether ``folder`` holds a training run, finished or not: a commit, a checkpoint, or
    the config.json a run writes at its start (one of the run format, not a user's own)."""
    if any((folder / m).exists() for m in (COMMIT_NAME, "checkpoint-last.json")):
        return True
    try:
        record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == RUN_FORMAT


def continued_from(old: dict | None, folder: Path) -> str | None:
    """The checkpoint in another folder that the run in ``folder`` (its record: ``old``) was
    continuing, if that checkpoint is still there; else None."""
    earlier = (old or {}).get("resumed_from")
    if not isinstance(earlier, str) or not earlier or same_file(checkpoint_folder(earlier), folder):
        return None
    stem = re.sub(r"\.(json|safetensors)$", "", earlier)
    return earlier if Path(stem + ".json").is_file() else None


def other_length_hint(folder: Path) -> str:
    """For an automatic run name: the same run with another --epochs beside it, if any (a
    longer run continues it with --resume <that>/checkpoint-last, not --resume auto)."""
    match = re.search(r"-e(\d+)-", folder.name)
    if match is None or not folder.parent.is_dir():
        return ""
    pattern = re.compile(re.escape(folder.name[:match.start()]) + r"-e\d+-"
                         + re.escape(folder.name[match.end():]) + "$")
    others = sorted(p for p in folder.parent.iterdir()
                    if p != folder and pattern.match(p.name) and (p / "checkpoint-last.json").is_file())
    if not others:
        return ""
    return (f" (the same run with other --epochs is in {others[-1]}: --resume "
            f"{others[-1] / 'checkpoint-last'} continues it)")


def run_owning(path: str | Path) -> Path | None:
    """The run folder that recorded ``path`` as one of its own files (its reports,
    predictions, checkpoints), or None: other tools must not write over a run's results."""
    path = Path(os.path.abspath(path))
    for candidate in (path, Path(os.path.realpath(path))):
        for folder in candidate.parents:
            if not (folder / MANIFEST_NAME).is_file():
                continue
            try:
                names = RunFolder(folder).written()
            except RunFolderError:
                return folder  # a damaged record still marks a run's folder
            rel = os.path.relpath(candidate, folder)
            if rel in names or rel in (MANIFEST_NAME, COMMIT_NAME, LOCK_NAME, PENDING_DIR):
                return folder
    return None


def probe_writable(folder: str | Path) -> list[Path]:
    """Create ``folder`` if needed and write a probe file into it; raise one line if impossible.
    Returns the folders it made, deepest first (for ``util.io.remove_empty``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"output folder {folder} is a file, not a folder")
    try:
        made = make_folders(folder)
        probe = folder / f"{PROBE_PREFIX}{os.getpid()}{TMP_SUFFIX}"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"output folder {folder} is not writable: "
                             f"{describe_os_error(err, folder)}") from None
    return made

