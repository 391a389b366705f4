"""Process-level helpers: distributed set-up (torchrun), seeding, logging, run metadata."""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL on CUDA devices, gloo otherwise. Each process takes GPU ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(), torch.device(device)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def device_sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); for timing boundaries only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as plain data (for the resume file)."""
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
            "torch": torch.get_rng_state()}


# The one-line summaries a user greps for (epoch lines, the test AUROC) are printed; this
# logger also keeps them in the run's log file.
SUMMARY_LOGGER = "summary"
_HELD_MAX = 10_000


class _Held(logging.Handler):
    """Keeps the records logged before the run's log file exists (data, weights, notes)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < _HELD_MAX:
            self.records.append(record)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (not when the
    handler was made): a caller that swaps stderr never leaves it writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def close_log_file() -> None:
    """Stop writing the run's log file (at the end of a run: later records go to stderr only)."""
    for handler in [h for h in logging.root.handlers if isinstance(h, logging.FileHandler)]:
        logging.root.removeHandler(handler)
        handler.close()
    logging.getLogger(SUMMARY_LOGGER).handlers = []


def setup_logging(is_main: bool, log_file: Path | None = None) -> None:
    """Log INFO on the main process only (to stderr and optionally a file).

    Without ``log_file`` the records are also held, and written at the top of the file once
    a later call names it: the run's log then starts where its console output started.
    """
    held = next((h for h in logging.root.handlers if isinstance(h, _Held)), None)
    file_handler = logging.FileHandler(log_file) if is_main and log_file is not None else None
    handlers: list[logging.Handler] = [logging.NullHandler()]
    if is_main:
        handlers = [_Stderr(), _Held() if file_handler is None else file_handler]
    logging.basicConfig(level=logging.INFO if is_main else logging.ERROR, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    summary = logging.getLogger(SUMMARY_LOGGER)
    summary.propagate = False  # printed already; only the file gets it
    summary.handlers = [file_handler] if file_handler is not None else []
    if file_handler is not None and held is not None:
        for record in held.records:
            file_handler.handle(record)


def say(line: str, **print_kwargs: Any) -> None:
    """A one-line summary for the user: printed, and kept in the run's log file."""
    print(line, **print_kwargs)
    logging.getLogger(SUMMARY_LOGGER).info(line)


def git_commit() -> str | None:
    """The repository's current commit (with '-dirty' when modified), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty.strip() else "")) if sha else None


def code_versions() -> dict[str, str | None]:
    """The code a run ran: this repository's commit and the versions of Python, torch, timm."""
    import platform

    import timm
    return {"git_commit": git_commit(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def decided_by_main(dist_info: DistInfo, decide: Callable[[], Any]) -> Any:
    """``decide()`` run on the main process only, its result (or its error) shared with every
    process: one process reads and repairs the run folder, all act on the same answer."""
    outcome: list[Any] = [None]
    if dist_info.is_main:
        try:
            outcome[0] = ("ok", decide())
        except Exception as err:  # noqa: BLE001  (re-raised on every process below)
            outcome[0] = ("error", err)
    if dist_info.distributed:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value
