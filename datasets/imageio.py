"""Decode chest X-rays of any common format to one 8-bit grey channel.

PNG (8/16-bit; grey, RGB, RGBA, palette), JPEG and DICOM all come out as a PIL image of
mode 'L'. Images with more than 8 bits (16-bit PNG, most DICOM) are scaled to 0-255 by
their own minimum and maximum, as the reference code does for DICOM, unless a DICOM VOI
window says which range to show. Pillow's ``convert('L')`` is not used on 16-bit data: it
clamps at 255 and turns a 16-bit X-ray white without an error.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})

# Integer images whose value range is below this are scaled through a lookup table.
_LUT_MAX_RANGE = 1 << 20

# Pillow modes holding more than 8 bits per pixel in one channel.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32S"})


class ImageDecodeError(OSError):
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
    if img.mode in ("RGBA", "RGBa", "La"):
        img = img.convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV ...
    return img.convert("L")


def _is_dicom_file(path: Path) -> bool:
    """True if the file carries the DICOM 'DICM' magic at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _first_value(value: object) -> float:
    """First element of a possibly multi-valued DICOM attribute, as a float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


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


def decode_dicom(path: str | Path) -> np.ndarray:
    """Decode a DICOM file to a 2-D uint8 array: rescale, VOI LUT / window, MONOCHROME1 inverted."""
    import pydicom  # imported lazily: PNG/JPEG-only users never pay for it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

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

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:
        # Colour DICOM (pydicom converts YBR to RGB): take the luma, as for colour PNGs.
        frame = pixels[0] if pixels.ndim == 4 else pixels
        grey = frame[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return scale_to_uint8(grey)
    if pixels.ndim == 3:
        logger.warning("%s: multi-frame DICOM (%d frames); using the first", path, pixels.shape[0])
        pixels = pixels[0]

    modality = np.asarray(apply_modality_lut(pixels, ds))  # rescale slope / intercept
    array = modality  # integer unless rescaled: scale_to_uint8 then needs no float copy
    windowed = False
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        # A VOI LUT is indexed by stored values: give it integers, as the standard does.
        lut_input = modality if modality.dtype.kind in "iu" else np.rint(modality).astype(np.int64)
        array = np.asarray(apply_voi_lut(lut_input, ds, index=0, prefer_lut=True), dtype=np.float64)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
        if width > 0:
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
            array = _window(modality.astype(np.float64), center, width, function)
            windowed = True
        else:
            logger.warning("%s: ignoring VOI window of width %s", path, width)

    # MONOCHROME1 shows low values white: invert so every image has bright bones.
    invert = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"
    if windowed:
        # The window already fixes which values are black and white: no min-max stretch.
        return np.rint((1.0 - array if invert else array) * 255.0).astype(np.uint8)
    return scale_to_uint8(array, invert=invert)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file (PNG, JPEG, DICOM, ...) to a PIL image of mode 'L' (8-bit grey)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return Image.fromarray(decode_dicom(path), mode="L")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not in a later transform
            if img.format == "JPEG" or img.format == "MPO":
                img = ImageOps.exif_transpose(img)
            return to_grey(img)  # pixels are in memory after load(): closing the file is safe
    except UnidentifiedImageError as err:
        if _is_dicom_file(path):
            return Image.fromarray(decode_dicom(path), mode="L")
        raise ImageDecodeError(f"not a recognised image file: {path}") from err
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(f"cannot decode {path}: {err}") from err
