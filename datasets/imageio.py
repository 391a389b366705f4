"""Decode chest X-rays of any common format to one 8-bit grey channel.

PNG (8/16-bit; grey, RGB, RGBA, palette), JPEG and DICOM all come out as a PIL image of
mode 'L'. Images with more than 8 bits (16-bit PNG) are scaled to 0-255 by their own
minimum and maximum. Pillow's ``convert('L')`` is not used on 16-bit data: it clamps at
255 and turns a 16-bit X-ray white without an error.

DICOM intensity has two rules (``dicom_scaling``):

- ``"paper"``: the paper's code (its RSNA loader): the stored values ``x`` become
  ``x * 255 / max(x)``, with no minimum subtracted, no rescale slope / intercept and no
  VOI window, then MONOCHROME1 is inverted (``255 - value``). The default for RSNA.
- ``"minmax"``: rescale slope / intercept, then the VOI LUT or first VOI window if the
  file has one, else min-max to 0-255; MONOCHROME1 inverted. The default for other kinds.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .constants import DEFAULT_DICOM_SCALING, DICOM_SCALING_BY_KIND
from util.cli import ToolError

if TYPE_CHECKING:
    from pydicom import Dataset as DicomDataset

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})

DICOM_SCALINGS: tuple[str, ...] = ("paper", "minmax")  # see the module docstring

# Integer images whose value range is below this are scaled through a lookup table.
_LUT_MAX_RANGE = 1 << 20

# Leading bytes of the image formats a file named like a DICOM may really be.
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  \r\n", "JPEG 2000"),
    (b"RIFF", "WebP"), (b"BM", "BMP"),
)

# Pillow modes holding more than 8 bits per pixel in one channel.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32S"})


class ImageDecodeError(ToolError, OSError):
    """An image file could not be decoded (unreadable, truncated or unsupported)."""


def scale_to_uint8(array: np.ndarray, invert: bool = False) -> np.ndarray:
    """Min-max scale an array to uint8 0-255 (a constant image becomes all zeros).

    ``invert`` maps the maximum to 0 and the minimum to 255 (DICOM MONOCHROME1). Integer
    images (8- to 16-bit DICOM, 16-bit PNG) go through a lookup table of their value range:
    the same bytes as the float64 formula, without a float copy of the image.
    """
    array = np.asarray(array)
    if array.dtype.kind in "biu" and array.size:
        lo, hi = int(array.min()), int(array.max())
        if hi <= lo:
            return np.zeros(array.shape, dtype=np.uint8)
        if array.dtype == np.uint8 and (lo, hi) == (0, 255) and not invert:
            return array.copy()  # already full range: the formula is the identity
        if hi - lo < _LUT_MAX_RANGE:
            steps = np.arange(hi - lo + 1, dtype=np.float64)
            lut = np.rint((steps[::-1] if invert else steps) * (255.0 / (hi - lo))).astype(np.uint8)
            offset = array - array.dtype.type(lo) if array.dtype.kind == "u" else array.astype(np.int64) - lo
            return np.take(lut, offset)
    array = np.asarray(array, dtype=np.float64)
    lo, hi = float(np.min(array)), float(np.max(array))
    if not np.isfinite(lo) or not np.isfinite(hi):
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    if invert:
        array = hi + lo - array
    return np.rint((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def dicom_scaling_for(kind: str, scaling: str | None = None) -> str:
    """The DICOM intensity rule to use: `scaling` if given, else the data set kind's default."""
    if scaling is None:
        return DICOM_SCALING_BY_KIND.get(kind, DEFAULT_DICOM_SCALING)
    if scaling not in DICOM_SCALINGS:
        raise ValueError(f"--dicom_scaling {scaling}: expected one of {', '.join(DICOM_SCALINGS)}")
    return scaling


def scale_paper(array: np.ndarray, invert: bool = False) -> np.ndarray:
    """The paper's DICOM intensity rule: ``x * 255 / max`` to uint8, then MONOCHROME1 inverted.

    Our reading of the reference (``cv2.convertScaleAbs(x, alpha=255.0 / x.max())``, then
    ``cv2.bitwise_not`` for MONOCHROME1): OpenCV multiplies in float32 by ``float32(alpha)``,
    takes the absolute value and rounds half to even, saturating at 0 and 255; the inversion
    comes after the scaling, on the uint8 result. So 20 / 60 / 120 / 230 give 22 / 67 / 133 /
    255 (and 233 / 188 / 122 / 0 for MONOCHROME1). An image whose maximum is 0 or below
    becomes all zeros (all 255 inverted) instead of dividing by zero.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    hi = float(array.max()) if array.size else 0.0
    if not np.isfinite(hi) or hi <= 0:
        out = np.zeros(array.shape, dtype=np.uint8)
    else:
        alpha = np.float32(255.0 / hi)
        if array.dtype.kind in "biu" and array.min() >= 0 and hi < _LUT_MAX_RANGE:
            # The same per-value formula through a table: no float copy of a large image.
            lut = np.clip(np.rint(np.arange(int(hi) + 1, dtype=np.float32) * alpha), 0, 255).astype(np.uint8)
            out = np.take(lut, array)
        else:
            values = np.abs(np.nan_to_num(array.astype(np.float32) * alpha, nan=0.0, posinf=255.0, neginf=255.0))
            out = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return 255 - out if invert else out


def to_grey(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to one 8-bit grey channel (mode 'L')."""
    mode = img.mode
    if mode == "L":
        return img
    if mode in _WIDE_MODES:
        return Image.fromarray(scale_to_uint8(np.asarray(img)), mode="L")
    if mode == "LA":
        return img.getchannel("L")  # alpha carries no X-ray signal
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    if img.mode != "RGB":
        img = img.convert("RGB")  # RGBA, CMYK, YCbCr, LAB, HSV ...
    return img.convert("L")


def sniff_image_format(path: str | Path) -> str | None:
    """The format a file's leading bytes say it is ('PNG', 'JPEG', ...); None if not one of those.

    A DICOM file (the 'DICM' magic at byte 128) is 'DICOM', whatever its preamble holds.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return "DICOM"
    return next((name for magic, name in _IMAGE_MAGIC if head.startswith(magic)), None)


def _refuse_other_format(path: Path) -> None:
    """Raise if a file named as a DICOM is really a PNG, JPEG, ... (its bytes say so)."""
    found = sniff_image_format(path)
    if found is not None and found != "DICOM":
        raise ImageDecodeError(f"{path} is a {found} image, not a DICOM file (its name ends in "
                               f"{path.suffix}): rename it to its format's extension, or convert it")


def _check_rescale(ds: DicomDataset, path: str | Path) -> None:
    """Refuse a RescaleSlope / RescaleIntercept that is not a finite number (it would blank the image)."""
    for name in ("RescaleSlope", "RescaleIntercept"):
        if name not in ds:
            continue
        raw = ds[name].value
        value = _first_value(raw)
        if value is not None and not math.isfinite(value):
            raise ImageDecodeError(f"{path}: DICOM {name} is {str(raw)!r}, not a finite number "
                                   f"(the image would decode blank); fix the file's header or leave it out")


def _first_value(value: object) -> float | None:
    """First element of a possibly multi-valued DICOM attribute, as a float; None when empty."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None  # type: ignore[arg-type, index]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # a zero-length element: pydicom gives None (or '' inside a multi-value)
    return float(value)  # type: ignore[arg-type]


@contextmanager
def _header_errors(path: str | Path) -> Iterator[None]:
    """Re-raise an error of reading a malformed header element as ImageDecodeError naming the file."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Exception as err:  # pydicom raises many types for a value it cannot convert
        raise ImageDecodeError(f"malformed DICOM header in {path}: {type(err).__name__}: {err}") from err


def _voi_window(ds: DicomDataset) -> tuple[float, float, str] | None:
    """The first VOI window (center, width, function) of a DICOM header; None if absent or empty."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    if center is None or width is None:
        return None  # present but empty (zero-length): as if absent
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
    return center, width, function


def _window(array: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Apply a DICOM VOI window (PS3.3 C.11.2.1.2), returning values in [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (array - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((array - center) / width + 0.5, 0.0, 1.0)
    # LINEAR (the default): the standard's half-pixel offsets.
    width = max(width - 1.0, 1e-6)
    return np.clip((array - (center - 0.5)) / width + 0.5, 0.0, 1.0)


def decode_dicom(path: str | Path, scaling: str = "minmax") -> np.ndarray:
    """Decode a DICOM file to a 2-D uint8 array by the ``scaling`` rule ('paper' or 'minmax', see above)."""
    if scaling not in DICOM_SCALINGS:
        raise ValueError(f"--dicom_scaling {scaling}: expected one of {', '.join(DICOM_SCALINGS)}")
    import pydicom  # imported lazily: PNG/JPEG-only users never pay for it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    _refuse_other_format(path)
    ds = None
    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise ImageDecodeError(f"DICOM file has no pixel data: {path}")
        pixels = ds.pixel_array
    except ImageDecodeError:
        raise
    except Exception as err:  # pydicom raises many types for corrupt / unsupported data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if syntax is not None and syntax.is_compressed:
            hint = (f" [transfer syntax: {syntax.name}; compressed pixel data is decoded by "
                    f"python-gdcm, pylibjpeg-openjpeg or pyjpegls, from requirements.txt]")
        raise ImageDecodeError(f"cannot decode DICOM pixel data of {path}: {err}{hint}") from err

    with _header_errors(path):
        _check_rescale(ds, path)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        # MONOCHROME1 shows low values white: invert so every image has bright bones.
        invert = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"
    if samples > 1:
        # Colour DICOM (pydicom converts YBR to RGB): take the luma, as for colour PNGs.
        frame = pixels[0] if pixels.ndim == 4 else pixels
        grey = frame[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return scale_to_uint8(grey)
    if pixels.ndim == 3:
        logger.warning("%s: multi-frame DICOM (%d frames); using the first", path, pixels.shape[0])
        pixels = pixels[0]

    if scaling == "paper":
        return scale_paper(pixels, invert=invert)  # stored values, as the paper's loader reads them

    with _header_errors(path):
        modality = np.asarray(apply_modality_lut(pixels, ds))  # rescale slope / intercept
        voi_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
        window = None if voi_lut else _voi_window(ds)
    array = modality  # integer unless rescaled: scale_to_uint8 then needs no float copy
    if voi_lut:
        # A VOI LUT is indexed by stored values: give it integers, as the standard does.
        lut_input = modality if modality.dtype.kind in "iu" else np.rint(modality).astype(np.int64)
        with _header_errors(path):
            array = np.asarray(apply_voi_lut(lut_input, ds, index=0, prefer_lut=True), dtype=np.float64)
    elif window is not None and window[1] > 0:
        # The window already fixes which values are black and white: no min-max stretch.
        array = _window(modality.astype(np.float64), *window)
        return np.rint((1.0 - array if invert else array) * 255.0).astype(np.uint8)
    elif window is not None:
        logger.warning("%s: ignoring VOI window of width %s", path, window[1])
    return scale_to_uint8(array, invert=invert)


def _bomb_message(path: Path, err: Exception) -> str:
    """Why Pillow refused a very large image, and what to do if the file is trusted."""
    return (f"image {path} is larger than Pillow's decompression-bomb limit "
            f"({2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels): {err}; if the file is trusted, raise "
            f"PIL.Image.MAX_IMAGE_PIXELS, else remove it from the split file")


def load_image(path: str | Path, dicom_scaling: str = "minmax") -> Image.Image:
    """Decode an image file (PNG, JPEG, DICOM, ...) to a PIL image of mode 'L' (8-bit grey).

    ``dicom_scaling`` chooses the DICOM intensity rule ('paper' or 'minmax', see above).
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return Image.fromarray(decode_dicom(path, dicom_scaling), mode="L")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not in a later transform
            if img.format == "JPEG" or img.format == "MPO":
                img = ImageOps.exif_transpose(img)
            return to_grey(img)  # pixels are in memory after load(): closing the file is safe
    except UnidentifiedImageError as err:
        if sniff_image_format(path) == "DICOM":
            return Image.fromarray(decode_dicom(path, dicom_scaling), mode="L")
        raise ImageDecodeError(f"not a recognised image file: {path}") from err
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as err:  # not an OSError: it would escape every handler
        raise ImageDecodeError(_bomb_message(path, err)) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(f"cannot decode {path}: {err}") from err


def check_image_header(path: str | Path) -> None:
    """Cheap start-up check: the file exists and its header opens (no pixel decoding).

    Raises FileNotFoundError or ImageDecodeError naming the file. A PNG / JPEG header gives
    the format and size (and Pillow's decompression-bomb check); a DICOM file is parsed with
    its large values deferred and must hold pixel data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    if path.suffix.lower() not in DICOM_SUFFIXES:
        try:
            with Image.open(path) as img:
                if img.width <= 0 or img.height <= 0:
                    raise ImageDecodeError(f"image {path} has size {img.size}")
                return
        except UnidentifiedImageError as err:
            if sniff_image_format(path) != "DICOM":
                raise ImageDecodeError(f"not a recognised image file: {path}") from err
        except Image.DecompressionBombError as err:
            raise ImageDecodeError(_bomb_message(path, err)) from err
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageDecodeError(f"cannot read the header of {path}: {err}") from err
    import pydicom

    _refuse_other_format(path)
    try:
        ds = pydicom.dcmread(path, force=True, defer_size="64 KB")
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except Exception as err:  # pydicom raises many types for a damaged header
        raise ImageDecodeError(f"cannot read the DICOM header of {path}: {err}") from err
    if not has_pixels or rows <= 0 or cols <= 0:
        raise ImageDecodeError(f"DICOM file has no pixel data ({rows} x {cols}): {path}")
    with _header_errors(path):
        _check_rescale(ds, path)
