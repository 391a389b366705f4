"""Pillow's bicubic / bilinear resize of 8-bit grey images, the same bytes, several times faster.

The training crop's resize (RandomResizedCrop: a ~700-px crop of a 1024-px X-ray down to
224) is most of what a training sample costs once decoding is gone (the exact cache), and
Pillow runs it one pixel at a time. ``_resample.c`` computes exactly Pillow's arithmetic
(its weights, its 22-bit fixed point, its two passes and rounding) in an order the
compiler vectorises. It is compiled on first use with the system C compiler and then
checked against Pillow itself on random images and sizes; it is used only if every byte
agrees, otherwise (or without a compiler) Pillow resizes. Either way the tensors
are the same, which the tests check.

    resize_grey(array, (224, 224), Image.BICUBIC)  # -> 224 x 224 uint8, as Image.resize gives
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL
from PIL import Image

from util import cli

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_resample.c")
# Pillow's filter numbers the C code accepts.
FILTERS = {int(Image.Resampling.BILINEAR): "bilinear", int(Image.Resampling.BICUBIC): "bicubic"}
CFLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")
# A temporary build file older than this was left by a killed build (a build takes seconds).
STALE_BUILD_S = 600
# Set to 0 to resize with Pillow only.
ENV_SWITCH = "CXR_NATIVE_RESIZE"
_SELF_CHECK_CASES = 40
PROG = "python -m datasets.resample"

_state: dict[str, object] = {}  # per process: "lib" (ctypes function or None), "why"


def _library_name() -> str:
    """File name of the compiled library: the hash of source, flags and platform."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() +
                         f"{sys.platform}-{os.uname().machine}".encode()).hexdigest()[:16]
    return f"resample-{key}.so"


def _user_cache() -> Path:
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")  # Path.home may raise
    return Path(home) / "cxr-lora"


def _library_path() -> Path:
    """The library's path: an existing build beside the source (e.g. made by setup.sh in a
    checkout that is read-only now) first, else a new one there if writable, else in the user's cache."""
    here, name = SOURCE.parent / "_build", _library_name()
    if (here / name).is_file():
        return here / name
    with contextlib.suppress(OSError):
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here / name
    cache = _user_cache()
    cache.mkdir(parents=True, exist_ok=True)
    return cache / name


def compile_library(folder: Path | None = None) -> Path:
    """Compile _resample.c if its library is not built yet (in `folder`, default: see
    `_library_path`); returns the library's path.

    Raises OSError (no compiler, compile error): callers fall back to Pillow.
    """
    target = _library_path() if folder is None else Path(folder) / _library_name()
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc / gcc) on PATH")
    # Build beside the target and rename: processes that build at once never see half a file.
    # A build killed before its clean-up leaves its temporary file: remove the stale ones.
    for stale in target.parent.glob(f"{target.stem}.*.tmp.so"):
        with contextlib.suppress(OSError):  # another process removed it first
            if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                stale.unlink()
    tmp = target.with_name(f"{target.stem}.{uuid.uuid4().hex[:8]}.tmp.so")
    cmd = [compiler, *CFLAGS, str(SOURCE), "-o", str(tmp), "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    fn = lib.resample_u8
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def _call(fn, array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """One C resize of a 2-D uint8 array with unit column stride; size = (height, width)."""
    out = np.empty(size, np.uint8)
    status = fn(array.ctypes.data, array.shape[0], array.shape[1], array.strides[0], out.ctypes.data,
                size[0], size[1], resample)
    if status != 0:
        raise MemoryError(f"native resize of a {array.shape} image to {size} failed")
    return out


def _resize_native(fn, array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """The C resize in the order ``Image.resize`` calls Pillow's C code: an image more than
    100 times taller than wide that shrinks in height is resized vertically first."""
    (h, w), (oh, ow) = array.shape, size
    if h > w * 100 and oh < h:
        return _call(fn, _call(fn, array, (oh, w), resample), (oh, ow), resample)
    return _call(fn, array, size, resample)


def _check_cases(rng: np.random.Generator, cases: int) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """(input shape, output size) pairs of the self-check: random, training-like, and the
    shapes where Pillow's order of passes matters (very tall, very uneven scales)."""
    for i in range(cases):
        kind = i % 5
        if kind == 0:  # the training case: a large crop down to a small square
            yield (int(rng.integers(200, 400)), int(rng.integers(200, 400))), (56, 56)
        elif kind == 1:  # more than 100 times taller than wide, shrinking in height
            w = int(rng.integers(2, 4))
            yield (int(rng.integers(101 * w, 160 * w)), w), (int(rng.integers(1, 90)), int(rng.integers(1, 40)))
        elif kind == 2:  # one side scaled down much more than the other
            a, b = int(rng.integers(150, 300)), int(rng.integers(20, 60))
            if i % 2:  # the height shrinks a lot, the width grows
                yield (a, b), (int(rng.integers(2, 12)), int(rng.integers(b, 2 * b)))
            else:
                yield (b, a), (int(rng.integers(b, 2 * b)), int(rng.integers(2, 12)))
        else:
            yield (tuple(int(v) for v in rng.integers(1, 160, size=2)),  # type: ignore[misc]
                   tuple(int(v) for v in rng.integers(1, 96, size=2)))


def self_check(fn, cases: int = _SELF_CHECK_CASES, seed: int = 0) -> str:
    """'' if the C resize equals Pillow's on random images and sizes, else the first difference."""
    rng = np.random.default_rng(seed)
    for i, ((h, w), (oh, ow)) in enumerate(_check_cases(rng, cases)):
        array = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        if i % 3 == 0:  # hard edges drive the bicubic overshoot into the clipping
            array = np.where(array > 127, 255, 0).astype(np.uint8)
        for resample in FILTERS:
            expected = np.asarray(Image.fromarray(array, mode="L").resize((ow, oh), resample))
            got = _resize_native(fn, array, (oh, ow), resample)
            if not np.array_equal(got, expected):
                return (f"{FILTERS[resample]} {w}x{h} -> {ow}x{oh}: "
                        f"{int((got != expected).sum())} of {got.size} pixels differ")
    return ""


def native() -> object | None:
    """The checked C resize of this process, or None (then Pillow resizes); decided once."""
    if "lib" in _state:
        return _state["lib"]
    fn, why = None, ""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        why = f"{ENV_SWITCH}=0"
    else:
        try:
            fn = _load(compile_library())
            why = self_check(fn)
            if why:
                logger.warning("native resize differs from Pillow %s (%s); resizing with Pillow",
                               PIL.__version__, why)
                fn = None
        except Exception as err:  # noqa: BLE001 -- any failure to build or load: Pillow resizes
            why = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            logger.info("native resize unavailable (%s); resizing with Pillow", why)
    _state["lib"], _state["why"] = fn, why
    return fn


@contextlib.contextmanager
def pillow_only() -> Iterator[None]:
    """Within the block this process resizes with Pillow (benchmarks: Pillow's resize for comparison)."""
    saved = dict(_state)
    _state.update(lib=None, why="pillow_only()")
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def kernel_name() -> str:
    """What resizes training crops in this process: for logs and config.json."""
    if native() is not None:
        return f"native (same bytes as Pillow {PIL.__version__}, checked)"
    return f"Pillow {PIL.__version__}"


def resize_grey(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """``Image.fromarray(array).resize((w, h), resample)`` as an array; size = (h, w).

    Uses the checked C code for bicubic and bilinear when available, Pillow otherwise.
    """
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(f"resize_grey: expected a 2-D uint8 array, got {array.dtype} {array.shape}")
    h, w = size
    if h <= 0 or w <= 0:
        raise ValueError(f"resize_grey: height and width must be > 0, got {size}")
    fn = native() if int(resample) in FILTERS else None
    if (h, w) == array.shape:
        return np.array(array)  # Pillow returns a copy for the same size
    if fn is None or array.strides[1] != 1:
        return np.asarray(Image.fromarray(np.ascontiguousarray(array), mode="L").resize((w, h), resample))
    return _resize_native(fn, array, (h, w), int(resample))


def main(argv: list[str] | None = None) -> int:
    """`python -m datasets.resample`: build and check the native resize, say which is used."""
    cli.Parser(prog=PROG, description=main.__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fn = native()
    print(f"training crops are resized by: {kernel_name()}"
          + ("" if fn is not None else f" ({_state.get('why')})"))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog=PROG))
