"""ViT builders over timm's VisionTransformer, LoRA variants, pre-trained weight loading, and
the one model assembly (``ModelConfig`` -> ``build_model``).

The model is timm's own ``VisionTransformer``: ``global_pool='avg'`` already gives the
MAE fine-tuning head (mean of the patch tokens, then ``fc_norm``, then ``head``), and
timm's Attention uses the fused scaled-dot-product kernel.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pickle
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

import lora
import methods
import weights
from methods import ModelConfigError
from methods.lora import LoRASpec  # noqa: F401  (the settings of the *_lora builders)
from weights import PretrainedWeightsError

logger = logging.getLogger(__name__)

# Each architecture: the VisionTransformer settings that differ from ``ARCH_DEFAULTS``.
# ``norm_eps`` is the LayerNorm epsilon; ``act_layer`` a timm activation name (None: GELU).
ARCHS: dict[str, dict[str, Any]] = {
    # ViT-Ti/S/B/L at patch 16: ViT-B/16 is the architecture of MRM and CXR_MAE, ViT-Ti/16
    # serves fast CPU tests and demos.
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
    # DINOv2 ViT-B/14 (RAD-DINO): layer scale; 518 px = a 37 x 37 grid in pre-training.
    "vit_base_patch14_dinov2": dict(embed_dim=768, depth=12, num_heads=12, patch_size=14,
                                    init_values=1e-5),
    # DINOv2 with 4 registers: the patch positions only, the class position folded into
    # cls_token (the registers have none).
    "vit_base_patch14_reg4_dinov2": dict(embed_dim=768, depth=12, num_heads=12, patch_size=14,
                                         init_values=1e-5, reg_tokens=4, no_embed_class=True),
    # OpenAI CLIP ViT-B/32 (CheXzero): LayerNorm before the blocks (ln_pre), QuickGELU, eps 1e-5.
    "vit_base_patch32_clip_quickgelu": dict(embed_dim=768, depth=12, num_heads=12, patch_size=32,
                                            pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5),
}
# What an ARCHS entry leaves out (timm's own defaults, and MAE's LayerNorm epsilon).
ARCH_DEFAULTS: dict[str, Any] = dict(
    patch_size=16, mlp_ratio=4.0, qkv_bias=True, init_values=None, class_token=True,
    reg_tokens=0, no_embed_class=False, pre_norm=False, act_layer=None, norm_eps=1e-6)
# timm's registered name of each architecture (``timm.create_model`` builds the same model).
TIMM_NAMES: dict[str, str] = {
    **{arch: f"{arch}_224" for arch in ("vit_tiny_patch16", "vit_small_patch16",
                                         "vit_base_patch16", "vit_large_patch16")},
    "vit_base_patch14_dinov2": "vit_base_patch14_dinov2",
    "vit_base_patch14_reg4_dinov2": "vit_base_patch14_reg4_dinov2",
    "vit_base_patch32_clip_quickgelu": "vit_base_patch32_clip_quickgelu_224",
}


def arch_settings(arch: str) -> dict[str, Any]:
    """Every setting of an architecture (an ``ARCHS`` or ``MODELS`` name): its entry over
    ``ARCH_DEFAULTS``."""
    return {**ARCH_DEFAULTS, **ARCHS[LORA_MODELS.get(arch, arch)]}


def reset_head(model: VisionTransformer) -> None:
    """Re-initialise the classifier as MAE fine-tuning does: trunc_normal(std=2e-5), zero bias."""
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)


def _builder(arch: str) -> Callable[..., VisionTransformer]:
    """The builder of architecture ``arch`` (an ``ARCHS`` name)."""
    def build(*, num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0,
              global_pool: bool = True, **kwargs: Any) -> VisionTransformer:
        cfg = {**arch_settings(arch), **kwargs}
        norm_layer = partial(nn.LayerNorm, eps=cfg.pop("norm_eps"))
        model = VisionTransformer(
            img_size=img_size,
            norm_layer=norm_layer,
            num_classes=num_classes,
            # 'avg' = mean over patch tokens (cls excluded) followed by fc_norm, as MAE/MRM.
            global_pool="avg" if global_pool else "token",
            drop_path_rate=drop_path_rate,
            **cfg,
        )
        reset_head(model)
        return model

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (f"timm's ViT of ARCHS[{arch!r}] with the MAE fine-tuning layout; keyword "
                     "arguments beyond the builder's own override the architecture's settings.")
    return build


def _with_lora(builder: Callable[..., VisionTransformer]) -> Callable[..., VisionTransformer]:
    def build(*, lora_rank: int = 4, lora_alpha: float = 32.0, lora_dropout: float = 0.1,
              lora_pos: str = "attn", **kwargs: Any) -> VisionTransformer:
        model = builder(**kwargs)
        method = methods.get("lora")
        method.inject(model, LoRASpec(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                      pos=lora_pos))
        method.mark_trainable(model)
        return model

    build.__name__ = builder.__name__ + "_lora"
    build.__doc__ = (f"{builder.__name__} with LoRA adapters (lora_rank, lora_alpha, "
                     "lora_dropout, lora_pos) and only LoRA + fc_norm + head trainable.")
    return build


vit_tiny_patch16 = _builder("vit_tiny_patch16")
vit_small_patch16 = _builder("vit_small_patch16")
vit_base_patch16 = _builder("vit_base_patch16")
vit_large_patch16 = _builder("vit_large_patch16")
vit_base_patch14_dinov2 = _builder("vit_base_patch14_dinov2")
vit_base_patch14_reg4_dinov2 = _builder("vit_base_patch14_reg4_dinov2")
vit_base_patch32_clip_quickgelu = _builder("vit_base_patch32_clip_quickgelu")

vit_tiny_patch16_lora = _with_lora(vit_tiny_patch16)
vit_small_patch16_lora = _with_lora(vit_small_patch16)
vit_base_patch16_lora = _with_lora(vit_base_patch16)
vit_large_patch16_lora = _with_lora(vit_large_patch16)
vit_base_patch14_dinov2_lora = _with_lora(vit_base_patch14_dinov2)
vit_base_patch14_reg4_dinov2_lora = _with_lora(vit_base_patch14_reg4_dinov2)
vit_base_patch32_clip_quickgelu_lora = _with_lora(vit_base_patch32_clip_quickgelu)

# Builder names, as the paper's scripts pass them to --model. A `_lora` builder is the
# plain architecture with adapters injected (LORA_MODELS maps it to that architecture).
LORA_MODELS: dict[str, str] = {f"{arch}_lora": arch for arch in ARCHS}
MODELS: dict[str, Callable[..., VisionTransformer]] = {
    **{arch: globals()[arch] for arch in ARCHS},
    **{name: globals()[name] for name in LORA_MODELS},
}


# ---------------------------------------------------------------------------------------
# Pre-trained weights
# ---------------------------------------------------------------------------------------

# Keys the fine-tuning model may lack in a pre-training file: the new classifier.
HEAD_PREFIXES = ("head.", "fc_norm.")
# Never taken from the file: the classifier is always new (MAE main_finetune.py
# re-initialises head.weight after loading; a file's head belongs to another task).
NEW_HEAD_PREFIXES = ("head.",)


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key names a LoRA factor (ours: '.lora_A'; peft: '.lora_A.default...')."""
    return any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                        "lora_magnitude", "ia3_scale")
               for part in key.split("."))


def _safe_globals() -> list[Any]:
    """Non-tensor objects that MAE-style checkpoints legitimately hold."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed core -> _core
    return [argparse.Namespace, np.dtype, core.multiarray.scalar,
            *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))]


# ---------------------------------------------------------------------------------------
# What a weights file is, before anything parses it
# ---------------------------------------------------------------------------------------

# torch.save's legacy (pre-1.6) format begins with this number, pickled as a LONG1.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# (offset, bytes there, what it is) of files that end up under a weights file's name by mistake.
_OTHER_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"\x1f\x8b", "a gzip archive (decompress it first)"),
    (0, b"BZh", "a bzip2 archive (decompress it first)"),
    (0, b"\xfd7zXZ\x00", "an xz archive (decompress it first)"),
    (0, b"\x28\xb5\x2f\xfd", "a zstd archive (decompress it first)"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (extract it first)"),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras / TensorFlow weights?)"),
    (0, b"\x93NUMPY", "a NumPy array file"),
    (128, b"DICM", "a DICOM image"),
    (257, b"ustar", "a tar archive (extract it first)"),
)
_DOWNLOAD_HINT = "(a failed download? fetch the file again)"


@dataclass(frozen=True)
class FileKind:
    """What a file's leading bytes say it is."""

    # 'torch-zip', 'torch-legacy' or 'safetensors'; None for anything that holds no weights.
    format: str | None
    # What it looks like, for messages (weights formats: a noun without article): "an HTML page (a failed download? ...)".
    description: str
    # A weights file cut short or damaged: the description says so on its own.
    damaged: bool = False


def _sniff_zip(path: Path, head: bytes) -> FileKind:
    """A zip file: torch.save's format, TorchScript, another archive, or a cut-off file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        # torch.save writes <name>/data.pkl first: the local header of the first entry
        # survives a truncation that loses the zip's central directory at the end.
        name_len = int.from_bytes(head[26:28], "little")
        first = head[30:30 + name_len]
        what = "PyTorch checkpoint" if first.endswith(b"data.pkl") else "zip file"
        return FileKind(None, f"truncated or damaged {what} (no zip directory at its end; an "
                              "interrupted download or copy?)", damaged=True)
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return FileKind(None, "a TorchScript model (torch.jit.save), not a state dict")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return FileKind("torch-zip", "PyTorch checkpoint")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return FileKind(None, f"a zip archive of {len(names)} files ({shown}) not written by "
                          "torch.save (extract it first?)")


def _sniff_text(head: bytes) -> FileKind | None:
    """A text file (HTML, XML, JSON, a Git LFS pointer, ...) or None if ``head`` is binary."""
    import codecs

    if b"\x00" in head:
        return None
    try:  # final=False: a multi-byte character cut at the end of ``head`` is fine
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith(("<!doctype html", "<html")) or "<html" in start[:1024]:
        return FileKind(None, f"an HTML page {_DOWNLOAD_HINT}")
    if start.startswith("<"):
        return FileKind(None, "an XML document (a server's error page? fetch the file again)")
    if start.startswith("version https://git-lfs"):
        return FileKind(None, "a Git LFS pointer, not the file it stands for (run `git lfs pull`)")
    if start.startswith(("{", "[")):
        return FileKind(None, "a JSON document")
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return FileKind(None, f"a text file (it begins {first_line[:60]!r})")


def sniff_weights_file(path: str | Path) -> FileKind:
    """What ``path`` is, from its first bytes: a weights format, or what else it looks like.

    Cheap (reads 4 kB, and a zip's directory): run before a parser whose errors on
    foreign input are cryptic or, for pickles, alarming.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return FileKind(None, "an empty file (an interrupted download or copy?)")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path, head)
    pickle_start = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if pickle_start and _TORCH_LEGACY_MAGIC in head[:32]:
        return FileKind("torch-legacy", "PyTorch checkpoint (legacy format)")
    # Before the pickle test: a safetensors header length can begin with the byte 0x80.
    if size >= 10 and head[8:9] == b"{":
        header = int.from_bytes(head[:8], "little")
        if 8 + header <= size:
            return FileKind("safetensors", "safetensors file")
        return FileKind(None, f"truncated safetensors file (its header needs {8 + header} "
                              f"bytes, the file has {size}; an interrupted download or copy?)",
                        damaged=True)
    if pickle_start:
        return FileKind(None, "a Python pickle not written by torch.save")
    for offset, magic, what in _OTHER_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return FileKind(None, what)
    text = _sniff_text(head)
    if text is not None:
        return text
    return FileKind(None, f"unrecognised binary data, {size} bytes (neither a PyTorch zip or "
                          f"legacy checkpoint nor safetensors; a damaged file?)")


def not_a_checkpoint(path: str | Path, kind: FileKind, expected: str = "PyTorch checkpoint") -> str:
    """The one-line message for a file that is not the ``expected`` kind of weights file."""
    if kind.damaged:
        return f"{path}: {kind.description}"
    return f"{path}: not a {expected}: it looks like {kind.description}"


def read_safetensors(path: str | Path, error: type[Exception] = PretrainedWeightsError,
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU; on ``device`` "meta" only their shapes
    and dtypes, from the header); a foreign or damaged file raises ``error``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tensors file not found: {path}")
    kind = sniff_weights_file(path)
    if kind.format != "safetensors":
        raise error(not_a_checkpoint(path, kind, "safetensors file"))
    try:
        if device != "meta":
            return load_file(str(path), device=device)
        with safe_open(str(path), "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: torch.empty(t.get_shape(), device="meta",
                                   dtype=_SAFETENSORS_DTYPES.get(t.get_dtype(), torch.uint8))
                    for k, t in slices.items()}
    except SafetensorError as err:
        raise error(f"{path}: damaged safetensors file ({err}); write or copy it again") from None


# safetensors' dtype names (its header) -> torch dtypes, for shapes read without the data.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path,
                 error: type[Exception] = PretrainedWeightsError) -> None:
    """Raise ``error`` naming the tensors of ``source`` that hold NaN or infinity.

    A model with one such weight predicts NaN for every image, which downstream reads
    as blank or negative: it must never load silently.
    """
    bad = []
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(f"{name} ({nan} NaN, {inf} inf of {t.numel()})")
    if bad:
        raise error(f"{source}: {len(bad)} tensor{'s hold' if len(bad) > 1 else ' holds'} NaN "
                    f"or infinite values, so the model cannot predict: {_first(bad, 3)} (a "
                    "diverged training run or a damaged file)")


def _pickle_reason(err: Exception) -> tuple[str, bool]:
    """The line of a weights-only unpickling error that explains it; True if a global was refused."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # torch names a refused global ("Unsupported global: GLOBAL posix.system ..."); damage
    # reads differently ("Unsupported operand 207").
    refused = next((ln for ln in lines if "GLOBAL" in ln), None)
    if refused is not None:
        return refused, True
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file",
                                                       "Check the documentation"))]
    return (useful[-1] if useful else (lines[0] if lines else repr(err))), False


# What a pre-trained file holding objects beyond tensors and plain data is told.
_UNSAFE_ADVICE = ("If you trust its origin, re-save it as a state dict, or pass --unsafe_load "
                  "(allow_unsafe_pickle=True).")


def load_torch_file(path: str | Path, error: type[Exception] = PretrainedWeightsError,
                    allow_unsafe_pickle: bool = False, expected: str = "PyTorch checkpoint",
                    refused_advice: str = _UNSAFE_ADVICE, map_location: str = "cpu") -> Any:
    """``torch.load`` of a file checked first to be a ``torch.save`` file; nothing runs code.

    Reads with ``weights_only=True`` and the allow-list of ``_safe_globals`` unless
    ``allow_unsafe_pickle``. Every failure raises ``error`` with one line naming the file:
    what it looks like when it is no torch file, "damaged" or "truncated" when it is one
    that cannot be read, and ``refused_advice`` (by default the --unsafe_load advice) only
    for a real pickle whose objects go beyond tensors and plain data. ``map_location``
    "meta" reads the tensors' shapes and dtypes without their data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{expected} not found: {path}")
    kind = sniff_weights_file(path)
    if kind.format not in ("torch-zip", "torch-legacy"):
        raise error(not_a_checkpoint(path, kind, expected))
    try:
        # An open file, not the path: torch.load picks its parser from a path's suffix
        # (.safetensors), and the content has already told which format this is.
        with open(path, "rb") as f:
            if allow_unsafe_pickle:
                warnings.warn(f"UNSAFE: unpickling {path} with weights_only=False; a malicious "
                              "file can run arbitrary code", stacklevel=2)
                return torch.load(f, map_location=map_location, weights_only=False)
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason, refused_global = _pickle_reason(err)
        if refused_global:
            raise error(
                f"{path}: refused to unpickle: the file holds objects beyond tensors and plain "
                f"data ({reason}). Loading it could run code. {refused_advice}") from None
    except EOFError:
        raise error(f"{path}: truncated {kind.description} (it ends early; an interrupted "
                    "download or copy?)") from None
    except (RuntimeError, ValueError, KeyError, IndexError, OSError) as err:
        text = str(err).strip()
        reason = text.splitlines()[0][:200] if text else type(err).__name__
    # Reached from the two handlers above that set ``reason``: a damaged torch file.
    raise error(f"{path}: damaged {kind.description} ({reason}); download or copy it again")


def read_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False,
                    device: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint file without executing code: safetensors or a restricted unpickle.

    Returns the top-level object (a dict). The format is taken from the file's first
    bytes, not its name: anything else (an HTML page, an image, an empty or cut-off
    file) is refused with what it looks like. Pickled files are read as ``load_torch_file``
    reads them (``allow_unsafe_pickle`` runs arbitrary code). With ``device`` "meta" the
    tensors carry their shapes and dtypes only (nothing else read).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pre-trained weights not found: {path}")
    if sniff_weights_file(path).format == "safetensors":
        return read_safetensors(path, device=device)
    obj = load_torch_file(path, allow_unsafe_pickle=allow_unsafe_pickle, map_location=device)
    if not isinstance(obj, dict):
        raise PretrainedWeightsError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def extract_state_dict(obj: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint: under 'model' / 'state_dict', or bare."""
    for key in ("model", "state_dict", "model_state"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise PretrainedWeightsError(f"{path}: no tensors found (top-level keys: "
                                     f"{sorted(obj)[:10]})")
    # Checkpoints saved from a DistributedDataParallel wrapper.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                     num_prefix_tokens: int = 1, antialias: bool = False) -> torch.Tensor:
    """Bicubic interpolation of the patch positions to a new grid (``antialias`` where the
    weights' publisher resizes so); the first ``num_prefix_tokens`` positions (class token,
    registers; 0 for a table of patch positions only) are kept as they are."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise PretrainedWeightsError(f"pos_embed with {patches.shape[1]} patch positions is "
                                     "not a square grid")
    dim = patches.shape[-1]
    patches = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([prefix, patches.to(pos_embed.dtype)], dim=1)


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: its format, which keys matched, were missing, unused or ignored."""

    path: str
    format: str = ""
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    head_reinitialised: bool = False
    pos_embed_resized: tuple[int, int] | None = None

    def summary(self) -> str:
        """One line for the log."""
        text = (f"loaded {self.path} (weights format {self.format}): {len(self.matched)} tensors matched, "
                f"{len(self.ignored)} pre-training keys ignored, missing (expected) "
                f"{self.missing}")
        if self.unexpected:
            text += f", unused {self.unexpected[:8]}{'...' if len(self.unexpected) > 8 else ''}"
        if self.pos_embed_resized:
            text += f", pos_embed {self.pos_embed_resized[0]} -> {self.pos_embed_resized[1]} positions"
        return text


def _first(items: list[Any], n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _is_lora_factor(model_key: str) -> bool:
    """Whether a key of the model's own state dict is an injected LoRA factor (never pre-trained)."""
    return model_key.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def _fit_pos_embed(model: nn.Module, value: torch.Tensor, want: torch.Size, report: LoadReport,
                   path: str | Path, antialias: bool) -> torch.Tensor:
    """``pos_embed`` interpolated to the model's patch grid when only its number of positions
    differs (another input size or patch grid); logged."""
    if value.shape == want or value.ndim != 3 or value.shape[-1] != want[-1]:
        return value
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None:
        raise PretrainedWeightsError(f"{path}: cannot resize pos_embed for this model")
    # Positions before the patches: class token and registers, none with no_embed_class.
    prefix = want[1] - grid[0] * grid[1]
    old = math.isqrt(max(value.shape[1] - prefix, 0))
    if prefix < 0 or old * old != value.shape[1] - prefix:
        raise PretrainedWeightsError(
            f"{path}: pos_embed has {value.shape[1]} positions, the model {want[1]} ({prefix} "
            f"before a {grid[0]}x{grid[1]} grid): no square grid after {prefix} class / register "
            "positions (a model with registers or a class position the file lacks?)")
    report.pos_embed_resized = (value.shape[1], want[1])
    logger.info("%s: pos_embed interpolated (bicubic%s) from a %dx%d to a %dx%d patch grid for "
                "input size %s", path, ", antialiased" if antialias else "", old, old, grid[0],
                grid[1], getattr(model.patch_embed, "img_size", "?"))
    return resize_pos_embed(value, tuple(grid), num_prefix_tokens=prefix, antialias=antialias)


def _match_tensors(model: nn.Module, state: dict[str, torch.Tensor], target: dict[str, str],
                   report: LoadReport, path: str | Path, antialias: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's own names; the classifier and keys the model
    lacks go to ``report``. Any backbone tensor of the wrong shape is refused."""
    own = model.state_dict()
    shapes = {k: v.shape for k, v in own.items()}
    to_load: dict[str, torch.Tensor] = {}
    mismatched, not_float = [], []
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        if own[target[key]].is_floating_point() and not value.is_floating_point():
            not_float.append(f"{key} ({str(value.dtype).removeprefix('torch.')})")
            continue  # copying would cast integers (a quantised file) or drop an imaginary part
        want = shapes[target[key]]
        if key == "pos_embed":
            value = _fit_pos_embed(model, value, want, report, path, antialias)
        if key.startswith(NEW_HEAD_PREFIXES) or (key.startswith(HEAD_PREFIXES) and value.shape != want):
            report.head_reinitialised = True
            report.ignored.append(key)
        elif value.shape != want:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")
        else:
            to_load[target[key]] = value
    if not_float:
        raise PretrainedWeightsError(
            f"{path}: {len(not_float)} weight tensor{'s are' if len(not_float) > 1 else ' is'} not "
            f"floating point, so it cannot be loaded as it is: {_first(not_float)} (a quantised "
            "or damaged file? pre-trained weights are float32, float16 or bfloat16)")
    if mismatched:
        raise PretrainedWeightsError(
            f"{path}: {len(mismatched)} tensors have the wrong shape for "
            f"{type(model).__name__} (wrong architecture? e.g. ViT-L weights into ViT-B): "
            f"{_first(mismatched)}")
    return to_load


# Encoder tensors a model may leave unused: the final norm, replaced by fc_norm when the
# model pools the patch tokens (MAE's fine-tuning).
UNUSED_OK_PREFIXES = ("norm.",)


def load_pretrained(model: nn.Module, path: str | Path, allow_unsafe_pickle: bool = False,
                    state_dict: dict[str, torch.Tensor] | None = None) -> LoadReport:
    """Load pre-trained ViT weights of any registered format (``weights``) into ``model``,
    checking coverage.

    The format is recognised from the keys and logged; its converter maps them to timm's
    names and drops what is not the encoder (decoders, text branches). Works on the plain
    model and on one with LoRA already injected (``.base_layer`` names are mapped exactly).
    The classifier ``head`` is always re-initialised (trunc_normal std 2e-5, zero bias) as
    the MAE / paper fine-tuning recipe does, even when the file holds one of the same
    shape; ``pos_embed`` is interpolated to the model's grid. Raises
    ``PretrainedWeightsError`` before anything is copied when the format is unknown or
    ambiguous, when its converter meets a key it cannot map, when a backbone tensor is
    missing from the file, has the wrong shape or holds NaN / inf, when a file tensor has no
    place in the model (only the final ``norm`` may go unused, replaced by ``fc_norm``), and
    when the file holds trained LoRA tensors (a fine-tuned checkpoint is not pre-trained
    weights).
    """
    if state_dict is None:
        state_dict = extract_state_dict(read_checkpoint(path, allow_unsafe_pickle), path)
    refuse_trained_checkpoint(state_dict, path)
    fmt = weights.detect(state_dict, path)
    state, dropped = weights.convert(fmt, state_dict, path)
    report = LoadReport(path=str(path), format=fmt.name, ignored=list(dropped))
    # The model's tensors by their plain-model name, mapped to the name they carry here.
    target = {lora.canonical_name(k): k for k in model.state_dict() if not _is_lora_factor(k)}
    antialias = fmt.antialias is not None and fmt.antialias(state_dict.keys())
    to_load = _match_tensors(model, state, target, report, path, antialias)
    # Every model tensor but the classifier comes from the file: none stays random.
    backbone_missing = sorted(k for k in target
                              if k not in state and not k.startswith(HEAD_PREFIXES))
    if backbone_missing:
        raise PretrainedWeightsError(
            f"{path}: {len(backbone_missing)} backbone tensors are missing from the file, so "
            f"part of the ViT would stay random: {_first(backbone_missing)}. Is this a "
            "ViT encoder checkpoint of the same architecture?")
    # A file tensor the model has no place for (a register, layer scale, pre-norm of another
    # architecture) would be silently lost.
    stray = [k for k in report.unexpected if not k.startswith(HEAD_PREFIXES + UNUSED_OK_PREFIXES)]
    if stray:
        raise PretrainedWeightsError(
            f"{path}: {len(stray)} backbone tensors of the file have no place in the model, so "
            f"they would be lost: {_first(stray)}. Is the --model the file's architecture?")
    # Checked once here, before anything is copied: every later use trusts these weights.
    check_finite(to_load, path)
    result = model.load_state_dict(to_load, strict=False)
    # What the model still lacks must be its classifier alone.
    report.missing = sorted(lora.canonical_name(k) for k in result.missing_keys
                            if not _is_lora_factor(k))
    assert not result.unexpected_keys, f"unexpected keys after mapping: {result.unexpected_keys}"
    assert all(k.startswith(HEAD_PREFIXES) for k in report.missing), report.missing
    report.matched = sorted(lora.canonical_name(k) for k in to_load)
    if "head.weight" in report.missing or report.head_reinitialised:
        reset_head(model)
    if report.unexpected:
        # e.g. `norm.*` of a pre-training file when the model pools with fc_norm instead.
        logger.info("%s: %d keys not used by the model: %s", path, len(report.unexpected),
                    _first(report.unexpected))
    logger.info(report.summary())
    return report


def refuse_trained_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse, as pre-trained weights, a checkpoint this tool trained (its JSON beside it says
    so) or any file of trained adapter tensors, saying what to use it with."""
    what = None
    adapters = sorted(k for k in state_dict if is_lora_key(k) or ".base_layer." in k)
    if adapters:
        what = f"holds trained adapter tensors ({_first(adapters, 3)})"
    try:
        sidecar = json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        sidecar = None
    if isinstance(sidecar, dict) and str(sidecar.get("format", "")).startswith(CONFIG_FORMAT.split("/")[0] + "/"):
        what = f"is a checkpoint this tool trained ({Path(path).with_suffix('.json').name}: {sidecar['format']})"
    if what:
        raise PretrainedWeightsError(
            f"{path} {what}: a fine-tuned checkpoint, not pre-trained weights. To continue its "
            "run use --resume <run>/checkpoint-last; to use it, predict.py --checkpoint (or "
            "--eval --resume) or export.py; --finetune takes the pre-trained file (MRM.pth, "
            "CXR_MAE.pth, ...)")


def describe_weights(path: str | Path, allow_unsafe_pickle: bool = False,
                     state_dict: dict[str, torch.Tensor] | None = None) -> weights.WeightsInfo:
    """What a pre-trained file holds (``weights.describe``, from the tensors' shapes: their
    data is not read), its architecture named among ``ARCHS``: the defaults of ``--model``,
    ``--input_size``, ``--norm`` and the pooling."""
    if state_dict is None:
        state_dict = extract_state_dict(read_checkpoint(path, allow_unsafe_pickle, device="meta"), path)
    refuse_trained_checkpoint(state_dict, path)
    return weights.describe(state_dict, path, {name: arch_settings(name) for name in ARCHS})


def check_model_fits(info: weights.WeightsInfo, model: str,
                     model_kwargs: dict[str, Any] | None = None) -> None:
    """Refuse (one line naming both) a ``--model`` (a ``MODELS`` name, with its
    ``model_kwargs`` overrides) that does not fit the file ``info`` describes."""
    weights.check_model(info, model, {**arch_settings(model), **(model_kwargs or {})})


# ---------------------------------------------------------------------------------------
# The model's config (the schema of the checkpoint JSON) and its one assembly
# ---------------------------------------------------------------------------------------

# Version of the config JSON kept beside every trained checkpoint (``checkpoints.py``).
CONFIG_FORMAT = "cxr-lora-checkpoint/4"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# The architecture settings a config may override (``model_kwargs``), each with its check.
MODEL_KWARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "depth": (_positive_int, "a positive integer (--depth)"),
}


def _json_type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value has a field's type (bool never passes for a number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_json_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, int if hint is int else (int, float))
    if origin in (list, tuple):
        return isinstance(value, list) and all(_json_type_ok(v, args[0]) for v in value)
    if origin is dict or dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(value, hint)


def _json_type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_json_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_json_type_name(args[0])}"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "object"
    return {type(None): "null", float: "number"}.get(hint, getattr(hint, "__name__", str(hint)))


def _read_fields(cls: type, obj: dict[str, Any], where: str = ""
                 ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The fields of dataclass ``cls`` from a JSON object, each checked against its type hint:
    (values, the object's other keys, problems). Every field must be present."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name != "extras"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name in names:
        key = where + name
        if name not in obj:
            problems.append(f"{key!r} missing")
            continue
        value, hint = obj[name], hints[name]
        if not _json_type_ok(value, hint):
            problems.append(f"{key!r} is {value!r:.40} (expected {_json_type_name(hint)})")
            continue
        values[name] = value
    return values, {k: v for k, v in obj.items() if k not in names}, problems


def _read_method_settings(values: dict[str, Any]) -> tuple[Any, list[str]]:
    """The JSON object of ``method_settings`` as its method's settings dataclass."""
    obj, key = values["method_settings"], "method_settings"
    settings = methods.REGISTRY[values["method"]].settings if values["method"] in methods.REGISTRY \
        else None  # an unknown method is ModelConfig's to refuse
    if settings is None or obj is None:
        return obj, []  # ModelConfig itself says when one is missing or not wanted
    if not isinstance(obj, dict):
        return None, [f"{key!r} is {obj!r:.40} (expected object)"]
    inner, other, wrong = _read_fields(settings, obj, key + ".")
    wrong += [f"{key + '.' + k!r} is not a setting of {values['method']}" for k in other]
    if wrong:
        return None, wrong
    try:
        return settings(**inner), []
    except ModelConfigError as err:
        return None, [f"{key}: {err}"]


def check_input_size(model: str, img_size: int) -> None:
    """An input side the architecture's patches tile (``ModelConfigError`` naming --input_size)."""
    patch = arch_settings(model)["patch_size"]
    if img_size % patch:
        raise ModelConfigError(f"--input_size {img_size} is not a multiple of the patch size "
                               f"{patch} of {model}")


@dataclass
class ModelConfig:
    """All that rebuilds a trained model and feeds it: architecture, method and its settings,
    classes, input size and normalisation, the pre-trained file. The one schema of the JSON
    kept beside every checkpoint and export (``to_json`` / ``from_json``); keys that are no
    field (``epoch``, ``run``, ...) are kept in ``extras`` and written back unchanged.

    Values are checked on creation (``ModelConfigError`` naming the flag); JSON types when
    a JSON is read.
    """

    model: str
    method: str
    class_names: list[str]
    img_size: int
    global_pool: bool
    norm: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    # The method's own settings (its ``Method.settings`` dataclass, e.g. ``LoRASpec``), None
    # for a method without any (full, linear).
    method_settings: Any = None
    drop_path_rate: float = 0.0
    eval_recipe: str = "sgd"
    dataset: str | None = None
    # Architecture overrides for the builder (e.g. {"depth": 2} in tests): MODEL_KWARGS.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Whether the tensors file holds the backbone too (set when a checkpoint is saved).
    backbone_in_file: bool | None = None
    # The DICOM intensity rule of the training data: predictions decode DICOMs the same way.
    dicom_scaling: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = methods.get(self.method)
        if self.model not in ARCHS:
            raise ModelConfigError(f"unknown model {self.model!r} (--model); choose from "
                                   f"{sorted(ARCHS)}")
        if method.settings is None and self.method_settings is not None:
            raise ModelConfigError(f"method {method.name!r} takes no settings, got "
                                   f"{self.method_settings}")
        if method.settings is not None and not isinstance(self.method_settings, method.settings):
            raise ModelConfigError(f"method {method.name!r} needs its {method.settings.__name__} "
                                   f"(--method {method.name} {method.size_flag or ''} ...), got "
                                   f"{self.method_settings!r}")
        if not self.class_names:
            raise ModelConfigError("a model needs at least one class")
        if not _positive_int(self.img_size):
            raise ModelConfigError(f"input size must be a positive integer (--input_size), got "
                                   f"{self.img_size!r}")
        check_input_size(self.model, self.img_size)
        for key, value in self.model_kwargs.items():
            check, expected = MODEL_KWARGS.get(key, (None, ""))
            if check is None:
                raise ModelConfigError(f"model_kwargs key {key!r} is not an architecture setting "
                                       f"this tool knows ({', '.join(MODEL_KWARGS)})")
            if not check(value):
                raise ModelConfigError(f"model_kwargs {key} {value!r} is not {expected}")
        self.class_names = list(self.class_names)
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))

    @property
    def num_classes(self) -> int:
        """One output per class name."""
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        """The checkpoint JSON: ``format``, every field, ``num_classes`` (for readers without
        this tool) and the extras."""
        obj: dict[str, Any] = {"format": CONFIG_FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extras":
                continue
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            obj[f.name] = list(value) if isinstance(value, tuple) else value
            if f.name == "method":
                obj["num_classes"] = self.num_classes
        return {**obj, **self.extras}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModelConfig":
        """From a checkpoint or export JSON whose ``format`` the reader has checked.

        Every field must be there with its JSON type; a problem raises ``ModelConfigError``
        naming the keys at fault.
        """
        values, extras, problems = _read_fields(cls, obj)
        if not problems:
            values["method_settings"], wrong = _read_method_settings(values)
            problems += wrong
        extras.pop("format", None)
        num_classes = extras.pop("num_classes", None)
        if num_classes is None:
            problems.append("'num_classes' missing")
        elif not problems and num_classes != len(values["class_names"]):
            problems.append(f"{len(values['class_names'])} class_names for num_classes "
                            f"{num_classes!r}")
        if problems:
            raise ModelConfigError("; ".join(problems[:5]))
        return cls(**values, extras=extras)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def check_buildable(config: ModelConfig) -> None:
    """Build ``config``'s model on the meta device (no memory, no weights, a fraction of a
    second): the ``ModelConfigError`` of a method size its architecture cannot take."""
    with torch.device("meta"):
        build_model(config)


def build_model(config: ModelConfig, pretrained: str | Path | None = None, *,
                allow_unsafe_pickle: bool = False) -> VisionTransformer:
    """The one model assembly: plain timm ViT -> pre-trained weights (checked) -> the method's
    modules -> freeze to what the method trains.

    Used by training, reloading a checkpoint, prediction, export and the benchmarks.
    Without ``pretrained`` the backbone stays random (demo, or tensors loaded afterwards).
    """
    method = methods.get(config.method)
    try:
        model = MODELS[config.model](num_classes=config.num_classes, img_size=config.img_size,
                                     global_pool=config.global_pool,
                                     drop_path_rate=config.drop_path_rate, **config.model_kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise ModelConfigError(f"{config.model} cannot be built with img_size {config.img_size} "
                               f"and model_kwargs {config.model_kwargs} ({err})") from None
    if pretrained is not None:
        load_pretrained(model, pretrained, allow_unsafe_pickle=allow_unsafe_pickle)
    method.inject(model, config.method_settings)
    method.mark_trainable(model)
    return model
