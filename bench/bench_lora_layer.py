"""One LoRA layer at ViT-B's fused-qkv shape, forward + backward: the previous formulation
(a zero-padded expanded B, a full-width update, a separate scaling and add) against the
current ``LoRALinear`` (each adapted slice's update added in place from its own B block).

Both layers share the same base and LoRA tensors; rounds are interleaved in one process
and the median round is reported, with the ratio new/old. Also reported: the bytes the
forward saves for backward (activations only, parameters excluded) and, on CUDA, the peak
memory of one call. ``--dropout_study`` adds a third contender at dropout > 0: the new
layer with a dropout that keeps its random seed instead of its mask and regenerates the
mask in backward.

    python bench/bench_lora_layer.py                      # batch 8, fp32 on a CPU
    python bench/bench_lora_layer.py --dropout_study --json bench/results/lora_layer.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import resolve_device, timed  # noqa: E402  (puts the repository on sys.path)
from lora import LoRALinear  # noqa: E402
from util.io import write_json  # noqa: E402
from util.misc import device_sync  # noqa: E402
from util.precision import autocast  # noqa: E402

TOKENS_PER_IMAGE = 197  # ViT-B/16 at 224 px: 196 patches + the class token
WIDTH, RANK, ALPHA = 768, 4, 32.0
PARTS = (True, False, True)  # the paper's q and v of the fused qkv


class ReferenceLoRALinear(LoRALinear):
    """The previous forward: expanded B, full-width update, then scale, then add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        x_lora = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x_lora = x_lora.to(self.lora_A.dtype)
        h = F.linear(x_lora, self.lora_A)
        update = F.linear(h, self._expanded_B()) * self.scaling
        return out + update.to(out.dtype)


class _SeededDropoutFn(torch.autograd.Function):
    """Inverted dropout that saves a seed, not the mask, and redraws the mask in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        ctx.seed, ctx.p = seed, p
        return x * _mask(x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * _mask(grad, ctx.p, ctx.seed), None


def _mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The scaled keep-mask (0 or 1/(1-p)) drawn from ``seed``, shaped and typed as ``like``."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


class SeededDropout(nn.Dropout):
    """``nn.Dropout`` semantics (E = x, Var = x^2 p/(1-p), off in eval) without a stored mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _SeededDropoutFn.apply(x, self.p)


def build(cls: type[LoRALinear], base: nn.Linear, dropout: float, state: dict) -> LoRALinear:
    """A LoRA layer of class ``cls`` around ``base`` holding the LoRA tensors of ``state``."""
    layer = cls(base, rank=RANK, alpha=ALPHA, dropout=dropout, parts=PARTS)
    layer.load_state_dict(state)
    return layer.train()


def contenders(dropout: float, device: torch.device, study: bool) -> dict[str, LoRALinear]:
    """base alone, old, new (and new with seeded dropout): one base, one set of A and B."""
    torch.manual_seed(0)
    base = nn.Linear(WIDTH, 3 * WIDTH).to(device)
    new = LoRALinear(base, rank=RANK, alpha=ALPHA, dropout=dropout, parts=PARTS).to(device)
    nn.init.normal_(new.lora_B, std=0.02)
    state = new.state_dict()
    # The frozen linear alone: what both pay anyway; the rest is the LoRA overhead.
    layers = {"base": base.requires_grad_(False),
              "old": build(ReferenceLoRALinear, base, dropout, state), "new": new.train()}
    if study and dropout > 0:
        seeded = build(LoRALinear, base, dropout, state)
        seeded.lora_dropout = SeededDropout(dropout)
        layers["new_seeded_dropout"] = seeded
    return layers


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype | None) -> None:
    """One forward + backward; gradients are dropped so that nothing accumulates."""
    with autocast(x.device, dtype):
        y = layer(x)
    y.backward(grad)
    for p in layer.parameters():
        p.grad = None
    x.grad = None


def saved_bytes(model: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of the distinct non-parameter storages that ``forward()`` (a forward pass of
    ``model``) keeps for backward, counted with ``saved_tensors_hooks``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def saved_mib(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """MiB of distinct non-parameter storages the forward keeps for backward."""
    with autocast(x.device, dtype):
        return saved_bytes(layer, partial(layer, x)) / 2**20


def peak_mib(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype | None) -> float:
    """CUDA peak memory of one forward + backward above what was allocated before it."""
    device = x.device
    device_sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(layer, x, grad, dtype)
    device_sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(dropout: float, batch: int, device: torch.device, dtype: torch.dtype | None,
            rounds: int, calls: int, study: bool) -> dict[str, dict[str, float]]:
    """Median ms per call of each contender over interleaved rounds, saved MiB, CUDA peak."""
    layers = contenders(dropout, device, study)
    act_dtype = dtype or torch.float32
    tokens = batch * TOKENS_PER_IMAGE
    x = torch.randn(batch, TOKENS_PER_IMAGE, WIDTH, device=device, dtype=act_dtype,
                    requires_grad=True)
    grad = torch.randn(batch, TOKENS_PER_IMAGE, 3 * WIDTH, device=device, dtype=act_dtype)
    for layer in layers.values():  # warm-up: allocator, kernels, thread pools
        step(layer, x, grad, dtype)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            seconds = timed(lambda: step(layer, x, grad, dtype), calls, device)
            times[name].append(seconds * 1e3 / calls)
    rows = {}
    for name, layer in layers.items():
        rows[name] = {"ms": statistics.median(times[name]),
                      "ms_min": min(times[name]), "ms_max": max(times[name]),
                      "saved_mib": saved_mib(layer, x, dtype), "tokens": tokens}
        if device.type == "cuda":
            rows[name]["peak_mib"] = peak_mib(layer, x, grad, dtype)
    return rows


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table, one row per precision x dropout x contender."""
    lines = ["| precision | dropout | layer | ms / call (median) | min-max | x / old | "
             "LoRA overhead ms (- base) | overhead x / old | saved for backward MiB | "
             "CUDA peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        rows = res["rows"]
        old, base = rows["old"]["ms"], rows["base"]["ms"]
        for name, row in rows.items():
            peak = f"{row['peak_mib']:.1f}" if "peak_mib" in row else "n/a"
            ratio = "" if name in ("old", "base") else f"{row['ms'] / old:.2f}"
            over = "" if name == "base" else f"{row['ms'] - base:.2f}"
            # Within the noise the old overhead can come out <= 0: no ratio then.
            over_ratio = ("" if name in ("old", "base") else "n/a" if old <= base
                          else f"{(row['ms'] - base) / (old - base):.2f}")
            lines.append(f"| {res['precision']} | {res['dropout']} | {name} | {row['ms']:.2f} | "
                         f"{row['ms_min']:.2f}-{row['ms_max']:.2f} | {ratio} | {over} | "
                         f"{over_ratio} | {row['saved_mib']:.1f} | {peak} |")
    return "\n".join(lines)


def model_dropout_study(batch: int, device: torch.device,
                        dtype: torch.dtype | None) -> dict[str, float]:
    """MiB a whole ViT-B LoRA training forward keeps for backward: LoRA dropout 0.1 as
    ``nn.Dropout``, as the seeded dropout, and no dropout."""
    import models_vit_lora as mv  # the model code is only needed here

    torch.manual_seed(0)
    model = mv.vit_base_patch16_lora(num_classes=14, lora_dropout=0.1).to(device).train()
    x = torch.randn(batch, 3, 224, 224, device=device)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    found = {"nn.Dropout(0.1)": saved_mib(model, x, dtype)}
    for layer in layers:
        layer.lora_dropout = SeededDropout(0.1)
    found["seeded dropout(0.1)"] = saved_mib(model, x, dtype)
    for layer in layers:
        layer.lora_dropout = nn.Identity()
    found["no dropout"] = saved_mib(model, x, dtype)
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images; tokens = batch x 197")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; median reported")
    p.add_argument("--calls", type=int, default=5, help="forward+backward calls per round")
    p.add_argument("--dropouts", default="0.1,0.0", help="comma list of LoRA dropouts")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", default="auto",
                   help="comma list of fp32,bf16,fp16; auto: fp32 (+ bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--dropout_study", action="store_true",
                   help="also time a dropout that redraws its mask from a seed in backward, "
                        "and count what a whole ViT-B forward keeps for backward with it")
    p.add_argument("--model_batch", type=int, default=2, help="batch of the ViT-B count")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.batch <= 0 or args.rounds <= 0 or args.calls <= 0:
        p.error("--batch, --rounds and --calls must be positive")
    return args


AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every precision x dropout case and print the table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amps = (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]) if args.amp == "auto" \
        else args.amp.split(",")
    for amp in amps:
        if amp not in AMP:
            raise SystemExit(f"--amp: unknown precision {amp!r}; choose from {sorted(AMP)}")
    results = []
    for amp in amps:
        for dropout in (float(d) for d in args.dropouts.split(",")):
            rows = measure(dropout, args.batch, device, AMP[amp], args.rounds, args.calls,
                           args.dropout_study)
            results.append({"precision": amp, "dropout": dropout, "rows": rows})
    studies = ({amp: model_dropout_study(args.model_batch, device, AMP[amp]) for amp in amps}
               if args.dropout_study else {})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"LoRA layer {WIDTH}->{3 * WIDTH}, rank {RANK}, parts q,v, tokens "
          f"{args.batch} x {TOKENS_PER_IMAGE}, {name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.calls} calls")
    print(markdown(results))
    for amp, found in studies.items():
        print(f"\nViT-B/16 LoRA (q,v, rank 4) training forward, batch {args.model_batch}, {amp}: "
              "MiB kept for backward (parameters excluded)")
        print("| LoRA dropout | MiB |\n|---|---|")
        print("\n".join(f"| {k} | {v:.1f} |" for k, v in found.items()))
    if args.json:
        write_json(args.json, {"device": name, "args": vars(args), "results": results,
                               "model_saved_mib": studies})
    return results


if __name__ == "__main__":
    main()
