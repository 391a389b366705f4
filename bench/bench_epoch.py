"""End-to-end training epochs on NIH-like data: ours from the exact cache, ours from PNGs, the paper's pipeline.

    python bench/bench_epoch.py --quick                       # CPU: demo data, demo model, 1 epoch each
    python bench/bench_epoch.py --device cuda --model vit_base_patch16 --img_size 224 --rank 4 \\
        --batch_size 64 --num_images 2000 --image_size 1024 --num_workers 12   # issue's GPU run

Variants (``--variants``), epochs interleaved so that a busy machine slows all alike:
``exact`` (ours from the exact cache, compiled on CUDA), ``png`` (ours from the PNG or DICOM
files) and ``paper`` (the paper's PIL + torchvision loader and its model under fp16 autocast
+ GradScaler). The real loader and ``engine_finetune.train_one_epoch`` run for ours; the
loader is wrapped to measure the time the step waits for its next batch. What is measured
and reported: bench/README.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torchvision import transforms as T

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (puts the repository on sys.path)
import datasets  # noqa: E402
import models_vit_lora as mv  # noqa: E402
from datasets.imageio import decode_dicom  # noqa: E402
from datasets.loader import build_loader  # noqa: E402
from datasets.synthetic import demo_as_rsna_dicoms  # noqa: E402
from engine_finetune import train_one_epoch  # noqa: E402
from paper_style import paper_autocast, to_paper_style  # noqa: E402
from util.misc import DistInfo, device_sync  # noqa: E402
from util.io import write_json  # noqa: E402
from util.precision import resolve_amp  # noqa: E402
from util.presets import DEMO_DEFAULTS  # noqa: E402

DATA_BOUND_FRACTION = 0.10
VARIANTS: tuple[str, ...] = ("exact", "png", "paper")
SOURCES: tuple[str, ...] = ("png", "dicom-jpeg")


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


class PaperStyleDataset(torch.utils.data.Dataset):
    """The paper's data path: PIL opens the file, converts it to RGB, torchvision transforms it."""

    def __init__(self, files: list[str], targets: torch.Tensor, img_size: int, norm: str) -> None:
        mean, std = datasets.NORM_STATS[norm]
        self.files, self.targets = files, targets
        self.transform = T.Compose([
            T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        file = self.files[index]
        if file.endswith(".dcm"):  # its DICOM reader: x * 255 / max, then RGB
            img = Image.fromarray(decode_dicom(file, "paper")).convert("RGB")
        else:
            img = Image.open(file).convert("RGB")
        return self.transform(img), self.targets[index]


def demo_model(arch: str, num_classes: int, img_size: int, rank: int,
               device: torch.device, paper: bool = False, depth: int | None = None) -> torch.nn.Module:
    """The LoRA model (random backbone, as the demo run without --finetune); ``paper``: the paper-style one."""
    torch.manual_seed(0)
    spec = mv.LoRASpec(rank=rank, alpha=32.0, dropout=DEMO_DEFAULTS["lora_dropout"], pos="attn")
    mean, std = datasets.NORM_STATS[DEMO_DEFAULTS["norm"]]
    config = mv.ModelConfig(
        model=arch, method="full" if paper else "lora",
        class_names=[f"class{k}" for k in range(num_classes)], img_size=img_size, global_pool=True,
        norm=DEMO_DEFAULTS["norm"], mean=mean, std=std, method_settings=None if paper else spec,
        drop_path_rate=DEMO_DEFAULTS["drop_path"], model_kwargs={"depth": depth} if depth else {})
    model = mv.build_model(config)
    if paper:
        to_paper_style(model, rank=rank, alpha=spec.alpha, dropout=spec.dropout)
    return model.to(device)


def paper_epoch(model: torch.nn.Module, loader: TimedLoader, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, device: torch.device) -> None:
    """One epoch as the paper's engine runs it: fp16 autocast on CUDA, GradScaler, a loss read per step."""
    model.train()
    criterion = torch.nn.BCEWithLogitsLoss()
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with paper_autocast(device, torch.float16):
            loss = criterion(model(images), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # its loop logs every step's loss: a host sync per step


def make_loader(dataset: torch.utils.data.Dataset, args: argparse.Namespace, paper: bool,
                pin_memory: bool, **paper_kwargs: Any) -> torch.utils.data.DataLoader:
    """The paper's plain shuffled DataLoader (``paper_kwargs``: more of its arguments), or ours."""
    if paper:
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                           num_workers=args.paper_workers, pin_memory=pin_memory,
                                           **paper_kwargs)
    return build_loader(dataset, DistInfo(), train=True, batch_size=args.batch_size, seed=0,
                        num_workers=args.num_workers, pin_memory=pin_memory)


def epoch_times(waits: list[float], total: float, batch_size: int) -> dict[str, Any]:
    """One epoch's numbers: the first batch's wait apart, the steady state's wait and step."""
    first, rest = waits[0], sum(waits[1:])
    steady = total - first
    images = len(waits) * batch_size
    return {"total_s": round(total, 3), "first_batch_s": round(first, 3),
            "wait_s": round(rest, 3), "step_s": round(steady - rest, 3),
            "wait_fraction": round(rest / steady, 4) if steady > 0 else 0.0,
            "img_s": round(images / total, 2),
            "steady_img_s": round((images - batch_size) / steady, 2) if steady > 0 else None}


def run_epochs(variants: dict[str, torch.utils.data.Dataset], args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    """Train ``args.epochs`` epochs per variant (interleaved); per-epoch wait and step times."""
    amp_dtype = resolve_amp(args.amp, device)
    out: dict[str, Any] = {}
    runs = {}
    for name, dataset in variants.items():
        paper = name == "paper"
        loader = make_loader(dataset, args, paper, device.type == "cuda",
                             drop_last=len(dataset) > args.batch_size,
                             persistent_workers=args.paper_workers > 0)
        model = demo_model(args.model, args.num_classes, args.img_size, args.rank, device, paper=paper,
                           depth=args.depth)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=DEMO_DEFAULTS["lr"], momentum=0.9)
        compiled = name == "exact" and (args.compile == "on" or  # auto: on CUDA only
                                        (args.compile == "auto" and device.type == "cuda"))
        step_model = torch.compile(model) if compiled else model
        scaler = torch.amp.GradScaler("cuda") if paper and device.type == "cuda" else None
        runs[name] = (loader, step_model, optimizer, params, scaler)
        out[name] = {"images": len(dataset), "batches": len(loader), "compiled": compiled,
                     "precision": ("fp16+scaler" if scaler else "fp32") if paper else str(amp_dtype or "fp32"),
                     "epochs": []}
    for epoch in range(args.epochs):
        for name, (loader, model, optimizer, params, scaler) in runs.items():
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            timed = TimedLoader(loader)
            device_sync(device)
            start = time.perf_counter()
            if name == "paper":
                paper_epoch(model, timed, optimizer, scaler, device)
            else:
                train_one_epoch(model, timed, optimizer, device, epoch, set_lr=lambda e: DEMO_DEFAULTS["lr"],
                                amp_dtype=amp_dtype, log_freq=10**9, steps_per_epoch=len(loader),
                                progress=False, params=params)
            device_sync(device)
            out[name]["epochs"].append(epoch_times(timed.waits, time.perf_counter() - start, args.batch_size))
            print(f"{name} epoch {epoch}: {out[name]['epochs'][-1]}", file=sys.stderr)
    for name, res in out.items():
        # Epoch 0 includes worker start-up (and compilation); the later ones are the steady state.
        later = res["epochs"][1:] or res["epochs"]
        res["median_wait_fraction"] = statistics.median(e["wait_fraction"] for e in later)
        res["median_steady_img_s"] = statistics.median(e["steady_img_s"] or 0.0 for e in later)
        res["epochs_per_s"] = round(1.0 / statistics.median(e["total_s"] for e in later), 4)
        res["data_bound"] = res["median_wait_fraction"] > DATA_BOUND_FRACTION
    return out


def loader_only_rate(dataset: torch.utils.data.Dataset, args: argparse.Namespace, paper: bool = False) -> float:
    """Images/s of the loader alone (no step), with the variant's workers, after start-up."""
    it = iter(make_loader(dataset, args, paper, pin_memory=False))
    next(it)  # start-up
    start, n = time.perf_counter(), 0
    for images, _ in it:
        n += len(images)
    return n / max(time.perf_counter() - start, 1e-9)


def make_data(args: argparse.Namespace, workdir: Path) -> Path:
    """The NIH-like data set (and its DICOM copy for --source dicom-jpeg); reused when present."""
    root = Path(args.data_path) if args.data_path else workdir / "NIH_bench"
    if not (root / "train_list.txt").exists():
        datasets.make_demo_dataset(root, num_images=args.num_images, image_size=args.image_size,
                                   compress_level=6 if args.image_size >= 512 else 1,
                                   workers=args.num_workers or 1)
    if args.source == "dicom-jpeg":
        rsna = root.parent / "RSNA_bench"  # the folder name makes it the rsna kind
        if not (rsna / "train_list.txt").exists():
            demo_as_rsna_dicoms(root, rsna, jpeg=True)
        return rsna
    return root


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Build the data (and the cache), time the epochs; returns the numbers."""
    device = _common.resolve_device(args.device)
    root = make_data(args, workdir)
    transform = datasets.build_transform(is_train=True, recipe="sgd", input_size=args.img_size,
                                         norm=DEMO_DEFAULTS["norm"], reprob=DEMO_DEFAULTS["reprob"])
    variants: dict[str, torch.utils.data.Dataset] = {}
    cache_build_s = None
    for name in args.variants:
        if name == "exact":
            start = time.perf_counter()
            datasets.build_cache(root, workers=max(1, args.num_workers), split_files=["train_list.txt"])
            cache_build_s = round(time.perf_counter() - start, 2)
            variants[name] = datasets.build_dataset("train", root, transform=transform, cache="on")
        elif name == "png":
            variants[name] = datasets.build_dataset("train", root, transform=transform, cache="off")
        else:
            ours = datasets.build_dataset("train", root, cache="off")
            variants[name] = PaperStyleDataset(ours.files, torch.from_numpy(ours.targets).float(),
                                               args.img_size, DEMO_DEFAULTS["norm"])
    args.num_classes = len(datasets.build_dataset("train", root, cache="off").class_names)
    epochs = run_epochs(variants, args, device)
    paper = epochs.get("paper")
    ratios = {f"{name}/paper epochs/s": round(epochs[name]["epochs_per_s"] / paper["epochs_per_s"], 2)
              for name in ("exact", "png") if name in epochs and paper}
    return {
        "machine": {**_common.machine_info(device), "cores": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "config": {"model": args.model, "depth": args.depth, "img_size": args.img_size, "rank": args.rank,
                   "batch_size": args.batch_size, "num_workers": args.num_workers,
                   "paper_workers": args.paper_workers, "epochs": args.epochs, "amp": args.amp,
                   "compile": args.compile, "source": args.source, "num_images": args.num_images,
                   "image_size": args.image_size},
        "cache_build_s": cache_build_s,
        "epochs": epochs,
        "ratios": ratios,
        "loader_only_img_s": {name: round(loader_only_rate(ds, args, paper=name == "paper"), 1)
                              for name, ds in variants.items()},
    }


def format_report(result: dict[str, Any]) -> str:
    """A Markdown table: per variant, epoch time, epochs/s, steady img/s, wait fraction, verdict."""
    cfg = result["config"]
    lines = [f"device {result['machine']['gpu'] or result['machine']['device']}, {cfg['model']} LoRA "
             f"r{cfg['rank']}, {cfg['img_size']} px, batch {cfg['batch_size']}, {cfg['num_workers']} workers "
             f"(paper {cfg['paper_workers']}), {cfg['source']} {cfg['image_size']} px, amp {cfg['amp']}", "",
             "| data | images | epoch s (per epoch) | epochs/s | first batch s | steady img/s | loader alone img/s "
             "| waiting for data | data-bound |", "|---|---|---|---|---|---|---|---|---|"]
    for name, res in result["epochs"].items():
        totals = ", ".join(f"{e['total_s']:.1f}" for e in res["epochs"])
        label = f"{name} ({res['precision']}{', compiled' if res['compiled'] else ''})"
        lines.append(f"| {label} | {res['images']} | {totals} | {res['epochs_per_s']:.3f} | "
                     f"{res['epochs'][0]['first_batch_s']:.2f} | {res['median_steady_img_s']:.1f} | "
                     f"{result['loader_only_img_s'][name]} | {100 * res['median_wait_fraction']:.1f}% | "
                     f"{'yes' if res['data_bound'] else 'no'} |")
    lines += [f"\n{key}: {value}x" for key, value in result["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default=None, help="an NIH-layout data set (default: a fresh one in a temp folder)")
    p.add_argument("--num_images", type=int, default=1200, help="images of the generated data set")
    p.add_argument("--image_size", type=int, default=128, help="side of the generated images (NIH: 1024)")
    p.add_argument("--source", choices=SOURCES, default="png", help="PNG files, or RSNA-like JPEG DICOMs")
    p.add_argument("--model", default=DEMO_DEFAULTS["model"].removesuffix("_lora"), choices=sorted(mv.ARCHS))
    p.add_argument("--depth", type=int, default=None, help="blocks of the model (default: the architecture's)")
    p.add_argument("--img_size", type=int, default=DEMO_DEFAULTS["input_size"])
    p.add_argument("--rank", type=int, default=DEMO_DEFAULTS["lora_rank"])
    p.add_argument("--batch_size", type=int, default=DEMO_DEFAULTS["batch_size"])
    p.add_argument("--num_workers", type=int, default=DEMO_DEFAULTS["num_workers"], help="workers of our loader")
    p.add_argument("--paper_workers", type=int, default=None,
                   help="workers of the paper's loader (default: --num_workers; the paper's scripts use 10)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per variant (the first includes start-up)")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {', '.join(VARIANTS)} (default: all; --cache picks among ours)")
    p.add_argument("--cache", choices=["off", "on", "both"], default=None,
                   help="ours only: from the files (off), the exact cache (on) or both")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile ours from the exact cache (auto: on CUDA)")
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
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(args.variants) - set(VARIANTS))
        if unknown or not args.variants:
            p.error(f"--variants {','.join(args.variants)}: expected names among {', '.join(VARIANTS)}")
    else:
        by_cache = {None: list(VARIANTS), "off": ["png"], "on": ["exact"], "both": ["exact", "png"]}
        args.variants = by_cache[args.cache]
    if args.paper_workers is None:
        args.paper_workers = args.num_workers
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
