"""Mixed precision: which autocast dtype a device gets, and the one autocast context used
by training, evaluation, prediction and heatmaps (CPU and GPU alike)."""
from __future__ import annotations

import contextlib

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is
    emulated and several times slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for an ``--amp`` choice on ``device``; None means fp32.

    auto: bf16 on GPUs that support it and on CPUs with native bf16, fp16 on older GPUs,
    fp32 on other CPUs.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp {amp!r}: expected one of {AMP_CHOICES}")
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on any device type; a no-op when ``dtype`` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """bf16 / fp16 autocast or fp32, as recorded in config.json and the results."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
