"""What the torch benchmark scripts share: the repository on sys.path, the device, timing,
the machine the numbers belong to."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from util.misc import device_sync  # noqa: E402


def resolve_device(spec: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def timed(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``fn``, the device's queue drained before and after."""
    device_sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    device_sync(device)
    return time.perf_counter() - start


def machine_info(device: torch.device) -> dict[str, Any]:
    """The device, torch, its CPU threads, the CPU and the load when measured."""
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
