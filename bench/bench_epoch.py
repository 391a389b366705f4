"""One end-to-end training epoch on the demo data: is the step or the loader the bottleneck?

    python bench/bench_epoch.py                  # PNG and cache, demo model, 2 epochs each
    python bench/bench_epoch.py --quick          # 1 epoch each
    python bench/bench_epoch.py --device cuda --model vit_base_patch16 --img_size 224

The real pieces run: the demo data set (synthetic NIH layout), the paper's train transform,
``main_finetune_lora.build_loader`` with DataLoader workers, the demo model (ViT-Ti/16 LoRA,
112 px, rank 8, as DEMO_DEFAULTS) and ``engine_finetune.train_one_epoch``. The loader is
wrapped so that the time the step spends waiting for its next batch is measured; the rest
of the epoch is the step (forward, backward, optimizer). The first batch of the first
epoch also pays the workers' start-up and is reported apart. An epoch whose steady-state
wait exceeds 10% of its time is data-bound.

With ``--cache`` (the default: ``both``) the same epoch also runs on the preprocessed
cache (``datasets.build_cache``), epochs of the two interleaved.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import lora  # noqa: E402
import models_vit_lora as mv  # noqa: E402
from engine_finetune import resolve_amp, train_one_epoch  # noqa: E402
from main_finetune_lora import DEMO_DEFAULTS, build_loader  # noqa: E402
from util.misc import DistInfo  # noqa: E402
from util.io import write_json  # noqa: E402

DATA_BOUND_FRACTION = 0.10


class TimedLoader:
    """Wraps a DataLoader and adds up the time spent waiting in ``next()``."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        self.waits: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def demo_model(arch: str, num_classes: int, img_size: int, rank: int,
               device: torch.device) -> torch.nn.Module:
    """The demo LoRA model (random backbone, as the demo run without --finetune)."""
    torch.manual_seed(0)
    model = mv.MODELS[arch](num_classes=num_classes, img_size=img_size,
                            drop_path_rate=DEMO_DEFAULTS["drop_path"])
    lora.inject_lora(model, rank=rank, alpha=32.0, dropout=DEMO_DEFAULTS["lora_dropout"], pos="attn")
    lora.mark_only_lora_as_trainable(model)
    return model.to(device)


def run_epochs(variants: dict[str, torch.utils.data.Dataset], args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    """Train ``args.epochs`` epochs per variant (interleaved); per-epoch wait and step times."""
    amp_dtype = resolve_amp(args.amp, device)
    out: dict[str, Any] = {}
    runs = {}
    for name, dataset in variants.items():
        loader = build_loader(dataset, DistInfo(), train=True, batch_size=args.batch_size, seed=0,
                              num_workers=args.num_workers, pin_memory=device.type == "cuda")
        model = demo_model(args.model, len(dataset.class_names), args.img_size, args.rank, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=DEMO_DEFAULTS["lr"], momentum=0.9)
        runs[name] = (loader, model, optimizer, params)
        out[name] = {"images": len(dataset), "batches": len(loader), "epochs": []}
    for epoch in range(args.epochs):
        for name, (loader, model, optimizer, params) in runs.items():
            loader.sampler.set_epoch(epoch)
            timed = TimedLoader(loader)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train_one_epoch(model, timed, optimizer, device, epoch, set_lr=lambda e: DEMO_DEFAULTS["lr"],
                            amp_dtype=amp_dtype, log_freq=10**9, steps_per_epoch=len(loader),
                            progress=False, params=params)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - start
            first, rest = timed.waits[0], sum(timed.waits[1:])
            steady = total - first
            images = len(timed.waits) * args.batch_size
            out[name]["epochs"].append({
                "total_s": round(total, 3), "first_batch_s": round(first, 3),
                "wait_s": round(rest, 3), "step_s": round(steady - rest, 3),
                "wait_fraction": round(rest / steady, 4) if steady > 0 else 0.0,
                "img_s": round(images / total, 2),
                "steady_img_s": round((images - args.batch_size) / steady, 2) if steady > 0 else None,
            })
            print(f"{name} epoch {epoch}: {out[name]['epochs'][-1]}", file=sys.stderr)
    for name, res in out.items():
        # Epoch 0 includes worker start-up; the later ones are the steady state.
        later = res["epochs"][1:] or res["epochs"]
        res["median_wait_fraction"] = statistics.median(e["wait_fraction"] for e in later)
        res["median_steady_img_s"] = statistics.median(e["steady_img_s"] for e in later)
        res["data_bound"] = res["median_wait_fraction"] > DATA_BOUND_FRACTION
    return out


def loader_only_rate(dataset: torch.utils.data.Dataset, args: argparse.Namespace) -> float:
    """Images/s of the loader alone (no step), with the same workers, after start-up."""
    loader = build_loader(dataset, DistInfo(), train=True, batch_size=args.batch_size, seed=0,
                          num_workers=args.num_workers, pin_memory=False)
    it = iter(loader)
    next(it)  # start-up
    start, n = time.perf_counter(), 0
    for images, _ in it:
        n += len(images)
    return n / (time.perf_counter() - start)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Build the demo data (and cache), time the epochs; returns the numbers."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(args.data_path) if args.data_path else workdir / "demo_data"
    if not (root / "train_list.txt").exists():
        datasets.make_demo_dataset(root)
    transform = datasets.build_transform(is_train=True, recipe="sgd", input_size=args.img_size,
                                         norm=DEMO_DEFAULTS["norm"], reprob=DEMO_DEFAULTS["reprob"])
    variants: dict[str, torch.utils.data.Dataset] = {}
    if args.cache in ("off", "both"):
        variants["png"] = datasets.build_dataset("train", root, transform=transform, cache="off")
    cache_build_s = None
    if args.cache in ("on", "both"):
        start = time.perf_counter()
        datasets.build_cache(root, workers=1)
        cache_build_s = round(time.perf_counter() - start, 2)
        variants["cache"] = datasets.build_dataset("train", root, transform=transform, cache="on")
    result: dict[str, Any] = {
        "machine": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "config": {"model": args.model, "img_size": args.img_size, "rank": args.rank,
                   "batch_size": args.batch_size, "num_workers": args.num_workers,
                   "epochs": args.epochs, "amp": args.amp},
        "cache_build_s": cache_build_s,
        "epochs": run_epochs(variants, args, device),
        "loader_only_img_s": {name: round(loader_only_rate(ds, args), 1) for name, ds in variants.items()},
    }
    return result


def format_report(result: dict[str, Any]) -> str:
    """A Markdown table: per variant, epoch time, steady img/s, wait fraction, verdict."""
    cfg = result["config"]
    lines = [f"device {result['machine']['gpu'] or result['machine']['device']}, {cfg['model']} LoRA "
             f"r{cfg['rank']}, {cfg['img_size']} px, batch {cfg['batch_size']}, "
             f"{cfg['num_workers']} workers, amp {cfg['amp']}", "",
             "| data | images | epoch s (per epoch) | first batch s | steady img/s | loader alone img/s "
             "| waiting for data | data-bound |", "|---|---|---|---|---|---|---|---|"]
    for name, res in result["epochs"].items():
        totals = ", ".join(f"{e['total_s']:.1f}" for e in res["epochs"])
        lines.append(f"| {name} | {res['images']} | {totals} | {res['epochs'][0]['first_batch_s']:.2f} | "
                     f"{res['median_steady_img_s']:.1f} | {result['loader_only_img_s'][name]} | "
                     f"{100 * res['median_wait_fraction']:.1f}% | {'yes' if res['data_bound'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default=None, help="a demo-layout data set (default: a fresh one in a temp folder)")
    p.add_argument("--model", default=DEMO_DEFAULTS["model"].removesuffix("_lora"), choices=sorted(mv.ARCHS))
    p.add_argument("--img_size", type=int, default=DEMO_DEFAULTS["input_size"])
    p.add_argument("--rank", type=int, default=DEMO_DEFAULTS["lora_rank"])
    p.add_argument("--batch_size", type=int, default=DEMO_DEFAULTS["batch_size"])
    p.add_argument("--num_workers", type=int, default=DEMO_DEFAULTS["num_workers"])
    p.add_argument("--epochs", type=int, default=2, help="epochs per variant (the first includes start-up)")
    p.add_argument("--cache", choices=["off", "on", "both"], default="both",
                   help="original PNGs, the preprocessed cache, or both")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: default)")
    p.add_argument("--quick", action="store_true", help="one epoch per variant")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 1
    if args.epochs <= 0 or args.batch_size <= 0 or args.num_workers < 0:
        p.error("--epochs and --batch_size must be positive, --num_workers >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
