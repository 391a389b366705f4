"""FP8 matrix products for the frozen linears of a LoRA backbone.

In LoRA training the backbone is frozen: its linears need the forward product and, in
backward, only the input gradient ``dX = dY @ W`` (no weight gradient). Both products run
here through ``torch._scaled_mm`` in float8 (about twice bf16 on Hopper tensor cores):

    forward   Y  = X_e4m3  @ W_e4m3^T   (activations quantised per call, amax scaling)
    backward  dX = dY_e5m2 @ W_e4m3     (gradient in e5m2: wider range, fewer mantissa bits)

Scales are per tensor (one fp32 scale per operand). Per-row ("rowwise") scaling would be
finer, but on Hopper ``_scaled_mm`` accepts it only for e4m3 x e4m3 with a bf16 result,
which excludes the e5m2 gradient product and fp32 outputs; per-tensor scales run on the
CPU and on every FP8 GPU for all the products above.

The fp8 weight (and its transpose, for the gradient product) is a cache beside the master
weight, not a parameter or buffer: the state dict (keys and values) is the module's as
before and DDP does not broadcast it. It is made when the layer is converted and remade in
place (the same tensors, so a compiled graph reads the new values without recompiling):
by ``LoRALinear.merge()`` / ``unmerge()``, and, in eager calls, whenever the master weight
changed (in-place writes bump the tensor's version counter; ``.to()`` and
``param.data = ...`` give a new storage). Writes through ``weight.data`` bypass the version
counter, and a compiled model does not check it: call ``refresh()`` after such changes.

    converted = to_float8_(model)     # after inject_lora + mark_trainable
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
MIN_CUDA_CAPABILITY = (8, 9)
# cuBLASLt's FP8 rule (also enforced on the CPU so that both take the same path): both
# dimensions of the weight, in and out features, are multiples of 16.
ALIGNMENT = 16
# Result dtypes ``_scaled_mm`` writes for per-tensor scales.
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLAG = "--backbone_dtype fp8"


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` scaled so that its largest magnitude maps to the largest finite value of the
    float8 ``dtype``, cast; returns (fp8 tensor, fp32 scalar that undoes the scaling)."""
    fmax = torch.finfo(dtype).max
    lo, hi = torch.aminmax(t.detach())  # one pass, no |t| temporary
    amax = torch.maximum(-lo, hi).float().clamp(min=1e-12)
    scale = fmax / amax
    # The float8 cast does not saturate (e4m3fn overflows to NaN): clamp the rounding slack.
    q = (t.float() * scale).clamp_(-fmax, fmax).to(dtype)
    return q, scale.reciprocal()


@dataclass
class Float8Weight:
    """A frozen weight (out x in) in e4m3 with its per-tensor scale, for both products."""

    q: torch.Tensor  # (out, in), row-major: ``q.t()`` is the column-major mat2 of the forward
    q_t: torch.Tensor  # (in, out), row-major: ``q_t.t()`` is the column-major mat2 of dY @ W
    inv_scale: torch.Tensor


class _Float8Product(torch.autograd.Function):
    """``x @ W^T`` in FP8, input gradient ``dY @ W`` in FP8, no gradient for W.

    The fp8 weight travels as tensors (not as the Float8Weight holding them), so that
    torch.compile traces the function like any other.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_q: torch.Tensor, w_q_t: torch.Tensor,  # type: ignore[override]
                w_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x_q, x_inv = quantize(x, E4M3)
        ctx.save_for_backward(w_q_t, w_inv)
        ctx.in_dtype = x.dtype
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w_q_t, w_inv = ctx.saved_tensors
        g_q, g_inv = quantize(grad_out.contiguous(), E5M2)
        grad_in = torch._scaled_mm(g_q, w_q_t.t(), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.in_dtype)
        return grad_in, None, None, None, None


class Float8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose products run in FP8 (``torch._scaled_mm``).

    The master ``weight`` and ``bias`` stay the parameters they were (same names, dtype,
    values); an e4m3 copy of the weight with a per-tensor scale is cached and rebuilt when
    the weight changes. Activations are quantised to e4m3 on every call (amax scaling),
    the output gradient to e5m2; the bias is added in the output dtype.

    Output dtype: the autocast dtype when autocast is on for the input's device, else the
    input's dtype. Falls back to the ordinary ``F.linear`` (in that same dtype) when the
    product does not qualify for ``_scaled_mm``: in or out features not multiples of 16,
    an empty input, or an output dtype other than fp32 / bf16 / fp16.

    There is no weight gradient: a forward with ``weight.requires_grad`` raises.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        """A Float8Linear holding ``linear``'s own weight and bias parameters (not copies)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._fp8: Float8Weight | None = None
        self._fp8_key: tuple | None = None

    @property
    def fp8_eligible(self) -> bool:
        """Whether the weight's shape meets ``_scaled_mm``'s multiple-of-16 rule."""
        return self.in_features % ALIGNMENT == 0 and self.out_features % ALIGNMENT == 0

    def _key(self) -> tuple:
        w = self.weight
        return (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))

    @torch.compiler.disable
    def refresh(self) -> None:
        """Quantise the master weight again, into the cached tensors when their shape and
        device still fit (a compiled graph keeps reading the same tensors), else anew."""
        w = self.weight
        # Under inference_mode the copy would be an inference tensor, unusable by a later
        # training step: build it as an ordinary tensor.
        leave = torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()
        with leave, torch.no_grad():
            q, inv = quantize(w, E4M3)
            old = self._fp8
            if old is not None and old.q.shape == q.shape and old.q.device == q.device:
                old.q.copy_(q)
                old.q_t.copy_(q.t())
                old.inv_scale.copy_(inv)
            else:
                self._fp8 = Float8Weight(q, q.t().contiguous(), inv)
        self._fp8_key = self._key()

    def float8_weight(self) -> Float8Weight:
        """The e4m3 weight and its scale, quantised again if the master weight changed.

        Eager calls check the weight's version (in-place writes such as
        ``LoRALinear.merge()`` bump it) and storage. Inside a torch.compile graph the cache
        is read as it is, without a graph break: it is made when the layer is converted and
        refreshed in place by ``LoRALinear.merge()`` / ``unmerge()``; call ``refresh()``
        after changing the weight of a compiled model any other way.
        """
        if torch.compiler.is_compiling():
            if self._fp8 is None:
                raise RuntimeError("Float8Linear: no fp8 weight yet; call refresh() before compiling")
            return self._fp8
        if self._fp8 is None or self._fp8_key != self._key():
            self.refresh()
        assert self._fp8 is not None
        return self._fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("Float8Linear computes no weight gradient, but its weight requires "
                               "grad: freeze it before converting (FP8 is for a frozen backbone)")
        device_type = x.device.type
        out_dtype = (torch.get_autocast_dtype(device_type)
                     if torch.is_autocast_enabled(device_type) else x.dtype)
        if not self.fp8_eligible or out_dtype not in OUT_DTYPES or x.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).contiguous()  # row-major mat1
        weight = self.float8_weight()
        with torch.autocast(device_type, enabled=False):  # the dtypes are set explicitly here
            out = _Float8Product.apply(x2d, weight.q, weight.q_t, weight.inv_scale, out_dtype)
            out = out.reshape(*lead, self.out_features)
            # A fresh tensor, not a view: callers (LoRALinear) add their update in place.
            return out + self.bias.to(out_dtype) if self.bias is not None else out.clone()

    def extra_repr(self) -> str:
        path = "fp8 e4m3 x e4m3, dgrad e5m2 x e4m3" if self.fp8_eligible else "fallback: not 16-aligned"
        return f"{super().extra_repr()}, {path}"


def to_float8_(model: nn.Module, within: str = "blocks") -> int:
    """Turn every frozen ``nn.Linear`` inside ``model.<within>`` (the transformer blocks,
    including ``LoRALinear.base_layer``) into a ``Float8Linear`` sharing its parameters.

    Trainable linears (LoRA A/B are parameters, not linears; a head or a fully trained
    block), the patch embedding and everything outside the blocks are left alone. Call it
    after LoRA is injected and the model frozen. Returns how many linears were converted.
    """
    blocks = getattr(model, within, None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"to_float8_: {type(model).__name__} has no {within!r} module of "
                         "transformer blocks")
    count = 0
    for name, module in list(blocks.named_modules()):
        if type(module) is not nn.Linear or module.weight.requires_grad:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        converted = Float8Linear.from_linear(module)
        converted.refresh()  # the fp8 weight exists before any (compiled) forward
        setattr(parent, child, converted)
        count += 1
    return count


def check_fp8_support(device: torch.device) -> None:
    """Raise ValueError (one line naming --backbone_dtype fp8) where FP8 products cannot run
    on ``device``: a CUDA GPU below compute capability 8.9, or a CPU build without them."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < MIN_CUDA_CAPABILITY:
            raise ValueError(f"{FLAG} needs a GPU with FP8 tensor cores (compute capability "
                             f"{MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}+, Ada or Hopper); "
                             f"{device} has {major}.{minor}")
    elif device.type != "cpu":
        raise ValueError(f"{FLAG} runs on CUDA GPUs (compute capability 8.9+) and the CPU, "
                         f"not on {device.type}")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 5):
        # Earlier torch returned (result, amax) from _scaled_mm, with other argument rules.
        raise ValueError(f"{FLAG} needs torch 2.5 or later (this is {torch.__version__})")
    if device.type == "cpu":  # not every CPU build has the products: try one
        a = torch.zeros(ALIGNMENT, ALIGNMENT).to(E4M3)
        one = torch.ones(())
        try:
            torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(f"{FLAG}: this torch build has no FP8 product on the CPU "
                             f"({str(err).splitlines()[0]})") from None
