"""Where one training step's time goes: self CPU (or CUDA) time per group of operators.

    python bench/profile_step.py                         # ours vs PEFT, ViT-B, batch 4, fp32
    python bench/profile_step.py --impls ours,paper,full --batch_size 8

Builds each implementation with ``bench_model.build`` (the same contenders, the same seeded
weights), runs one warm-up step, then one step under ``torch.profiler``, and prints the share
of matrix products, fused attention, GELU, the LoRA dropout mask and the rest; and the size
of the activations a forward pass keeps for backward (distinct tensors other than parameters,
counted with ``torch.autograd.graph.saved_tensors_hooks``), which is what the batch scales.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from functools import partial

import bench_model as bm  # imports PEFT first, then puts the repository on sys.path
import torch
from bench_lora_layer import saved_bytes
from torch.profiler import ProfilerActivity, profile
from util.misc import device_sync

# Group -> operator-name fragments, first match wins.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matrix products", ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")),
    ("fused attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("softmax (naive attention)", ("aten::_softmax",)),
    ("GELU", ("gelu",)),
    ("dropout mask", ("bernoulli",)),
    ("layer norm", ("layer_norm",)),
)


def group_of(name: str) -> str:
    """The group an operator's time is counted in."""
    return next((group for group, keys in GROUPS if any(k in name for k in keys)), "everything else")


def profile_step(trainer: bm.Trainer, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 dtype: torch.dtype | None) -> dict[str, float]:
    """Self time (s) per group of one training step, after one warm-up step."""
    amp = bm.amp_context(trainer.impl, device, dtype)
    trainer.step(x, y, amp)
    device_sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.step(x, y, amp)
        device_sync(device)
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels: their time is counted in the operator that launched them
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        times[group_of(event.key)] += self_us / 1e6
    return dict(times)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one column per implementation, percentages of its step."""
    impls = list(results)
    groups = sorted({g for r in results.values() for g in r},
                    key=lambda g: -max(r.get(g, 0.0) for r in results.values()))
    lines = ["| op group | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for g in groups:
        cells = [f"{100 * results[i].get(g, 0.0) / sum(results[i].values()):.1f}%" for i in impls]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("| step total (profiled) | " + " | ".join(f"{sum(results[i].values()):.2f} s" for i in impls) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", default="ours,peft", help=f"from {bm.TRAIN_IMPLS + bm.OPTIONAL_IMPLS}")
    p.add_argument("--model", default="vit_base_patch16", choices=sorted(bm.mv.ARCHS))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--amp", default="fp32", choices=sorted(bm.PRECISIONS))
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = bm.resolve_device(args.device)
    dtype = bm.PRECISIONS[args.amp]
    x, y = bm.make_batch(args.batch_size, args.img_size, device)
    model_defaults = bm.get_parser()  # LoRA alpha and dropout as bench_model.py times them
    alpha, dropout = model_defaults.get_default("alpha"), model_defaults.get_default("dropout")
    results, saved = {}, {}
    for impl in args.impls.split(","):
        model = bm.build(impl, args.model, args.img_size, args.rank, alpha, dropout, device)
        results[impl] = profile_step(bm.Trainer(impl, model), x, y, device, dtype)
        model.train()  # what one training forward keeps for backward
        with bm.amp_context(impl, device, dtype)():
            saved[impl] = saved_bytes(model, partial(model, x))
        del model
    print(f"{args.model} {args.img_size} px, batch {args.batch_size}, {args.amp}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(format_table(results))
    print("| kept for backward (MiB) | " + " | ".join(f"{saved[i] / 2**20:.1f}" for i in saved) + " |")
    return {"time_s": results, "saved_bytes": saved}


if __name__ == "__main__":
    main()
