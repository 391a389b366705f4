"""Images/s of the data pipeline per core: the original files vs the exact and the lossy cache.

    python bench/bench_data.py [--num_images 64] [--image_size 1024] [--cache_size 256]
    python bench/bench_data.py --source dicom-jpeg      # RSNA-style DICOMs
    python bench/bench_data.py --source dicom --image_size 2048
    python bench/bench_data.py --device_aug cuda --recipe adamw   # --device_aug's batch transform

One process, one torch thread ("per core"): the loop is what a single DataLoader worker
does per sample (decode or cache read, RandomResizedCrop + flip to 224, ToTensor,
normalise), read from

    original  the files, decoded every time;
    exact     the exact cache (original-size pixels; the crop's rows only): the same tensors;
    lossy     a cache downsized to shorter side --cache_size: other tensors, for comparison.

The training crops are resized by `datasets.resample` (Pillow's bytes, native code when it
builds and passes its check); the original and exact paths are also timed with Pillow
resizing (`*_pillow`: the pipeline as the paper's code runs it).

The evaluation transform (resize + centre crop) is timed from the files and from the exact
cache with its evaluation cache. It also reports the exact cache's build rate (one process)
and bytes per image. The originals are synthetic chest-like images:

    png         8-bit PNG, zlib level 6, NIH layout (like NIH ChestX-ray14's files)
    dicom-jpeg  8-bit MONOCHROME2 DICOM, JPEG baseline (like RSNA Pneumonia's files)
    dicom       uncompressed DICOM, 12 bits stored in 16 (like a hospital DX export)

Prints a Markdown table row for docs/BENCHMARKS.md; --out also writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import timed  # noqa: E402  (puts the repository on sys.path)
from datasets import build_cache, build_dataset, build_transform, make_demo_dataset  # noqa: E402
from datasets.resample import kernel_name, pillow_only  # noqa: E402
from datasets.synthetic import demo_as_rsna_dicoms  # noqa: E402
from util.io import write_json  # noqa: E402

SOURCES = ("png", "dicom-jpeg", "dicom")


class PillowResized(torch.utils.data.Dataset):
    """A data set read with Pillow resizing its crops (the pipeline without the native resize)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with pillow_only():
            return self.dataset[index]


def best_rates(datasets: dict[str, torch.utils.data.Dataset], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` images/s of reading every item once, per data set.

    The passes alternate between the data sets, so that a busy machine slows both alike.
    """
    best = {name: float("inf") for name in datasets}
    for _ in range(repeats):
        for name, dataset in datasets.items():
            start = time.perf_counter()
            for i in range(len(dataset)):
                dataset[i]
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(datasets[name]) / t for name, t in best.items()}


def run(num_images: int, image_size: int, cache_size: int, input_size: int, recipe: str,
        repeats: int, workdir: Path, source: str = "png") -> dict:
    """Build the data and the caches, time every path; returns the numbers."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {SOURCES}")
    torch.set_num_threads(1)
    root = make_demo_dataset(workdir / "NIH_bench", num_images=num_images, image_size=image_size,
                             compress_level=6)
    image_dir = root / "all_classes"
    if source != "png":
        root = demo_as_rsna_dicoms(root, workdir / "RSNA_bench", jpeg=source == "dicom-jpeg")
        image_dir = root / "stage_2_train_images"
    file_bytes = sum(f.stat().st_size for f in image_dir.iterdir()) / num_images
    start = time.perf_counter()
    exact_dir = build_cache(root, workers=1, split_files=["train_list.txt"])
    cache_build_s = time.perf_counter() - start
    cache_bytes = sum(f.stat().st_size for f in exact_dir.glob("images-*.u8"))
    build_cache(root, size=cache_size, workers=1, split_files=["train_list.txt"])
    transform = build_transform(True, recipe=recipe, input_size=input_size, norm="mrm")
    eval_tf = build_transform(False, recipe=recipe, input_size=input_size, norm="mrm")
    torch.manual_seed(0)
    original = build_dataset("train", root, transform=transform, cache="off")
    exact = build_dataset("train", root, transform=transform, cache="on")
    lossy = build_dataset("train", root, transform=transform, cache="lossy", cache_size=cache_size)
    rates = best_rates({"original": original, "cache": exact, "lossy": lossy,
                        "original_pillow": PillowResized(original), "cache_pillow": PillowResized(exact)},
                       repeats)
    eval_original = build_dataset("train", root, transform=eval_tf, cache="off")
    start = time.perf_counter()
    eval_cached = build_dataset("train", root, transform=eval_tf, cache="on", num_threads=1)
    eval_cache_build_s = time.perf_counter() - start
    eval_rates = best_rates({"original": eval_original, "cache": eval_cached}, repeats)
    original_rate, cache_rate = rates["original"], rates["cache"]
    return {
        "source": source, "images": len(original), "image_size": image_size,
        "file_kb": round(file_bytes / 1024),
        "cache_size": cache_size, "input_size": input_size, "recipe": recipe,
        "original_images_per_s": round(original_rate, 1), "cache_images_per_s": round(cache_rate, 1),
        "ratio": round(cache_rate / original_rate, 1),
        "crop_resize": kernel_name(),
        "original_pillow_images_per_s": round(rates["original_pillow"], 1),
        "cache_pillow_images_per_s": round(rates["cache_pillow"], 1),
        "ratio_vs_original_pillow": round(cache_rate / rates["original_pillow"], 1),
        "lossy_cache_images_per_s": round(rates["lossy"], 1),
        "lossy_ratio": round(rates["lossy"] / original_rate, 1),
        "eval_original_images_per_s": round(eval_rates["original"], 1),
        "eval_cache_images_per_s": round(eval_rates["cache"], 1),
        "eval_ratio": round(eval_rates["cache"] / eval_rates["original"], 1),
        "cache_build_images_per_s": round(len(original) / cache_build_s, 1),
        "eval_cache_build_images_per_s": round(len(original) / eval_cache_build_s, 1),
        "cache_bytes_per_image": round(cache_bytes / len(original)),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
    }


def device_aug_rates(recipe: str, input_size: int, batch_size: int, device: str,
                     repeats: int, source_size: int | None = None) -> dict:
    """Train augmentation: the per-image CPU recipe (one core) from a source square vs
    ``--device_aug``'s batch transform on ``device`` from the loader's crops (input_size
    square, as training ships them; the crop itself stays in the loader); images/s of each
    (best of `repeats`)."""
    from PIL import Image

    from datasets.device_aug import build_device_augment

    torch.set_num_threads(1)
    source_size = source_size or round(input_size * 8 / 7)
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, 1, source_size, source_size), dtype=torch.uint8)
    images = [Image.fromarray(img[0].numpy(), "L") for img in batch]
    cpu_tf = build_transform(True, recipe=recipe, input_size=input_size, norm="cxr_mae")
    aug = build_device_augment(recipe, input_size, "cxr_mae", crop=False).to(device)
    on_device = batch[..., :input_size, :input_size].contiguous().to(device)
    aug(on_device)  # warm-up (kernels, allocator)

    cpu_s = device_s = float("inf")
    for _ in range(repeats):
        cpu_s = min(cpu_s, timed(lambda: [cpu_tf(img) for img in images], 1, torch.device("cpu")))
        device_s = min(device_s, timed(lambda: aug(on_device), 1, on_device.device))
    return {"recipe": recipe, "input_size": input_size, "source_size": source_size,
            "batch_size": batch_size, "device": device,
            "cpu_images_per_s_per_core": round(batch_size / cpu_s, 1),
            "device_images_per_s": round(batch_size / device_s, 1)}


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=96)
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--cache_size", type=int, default=256)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--recipe", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--source", choices=SOURCES, default="png",
                        help="format of the original images (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where to write the images (default: a temp folder)")
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    parser.add_argument("--device_aug", default=None, metavar="DEVICE",
                        help="instead: time --device_aug's batch transform on DEVICE (cpu, cuda) "
                             "against the per-image CPU transform, for --recipe")
    parser.add_argument("--batch_size", type=int, default=64, help="batch of --device_aug")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device_aug:
        rates = device_aug_rates(args.recipe, args.input_size, args.batch_size, args.device_aug,
                                 args.repeats)
        if args.out:
            write_json(args.out, rates)
        print(json.dumps(rates))
        print(f"| --device_aug {rates['recipe']}, batch {rates['batch_size']}, {rates['input_size']} px "
              f"| CPU recipe from {rates['source_size']} px {rates['cpu_images_per_s_per_core']} images/s "
              f"per core | {rates['device']} after the loader's crop {rates['device_images_per_s']} "
              "images/s |")
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.num_images, args.image_size, args.cache_size, args.input_size, args.recipe,
                     args.repeats, Path(args.workdir or tmp), source=args.source)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result))
    print(f"| {result['recipe']} train, {result['images']} x {result['image_size']}px {result['source']} "
          f"(~{result['file_kb']} KB) -> {result['input_size']} | {result['original_images_per_s']} "
          f"| {result['cache_images_per_s']} | **{result['ratio']}x** "
          f"| {result['lossy_cache_images_per_s']} ({result['lossy_ratio']}x) "
          f"| {result['eval_original_images_per_s']} -> {result['eval_cache_images_per_s']} "
          f"({result['eval_ratio']}x) | {result['cache_build_images_per_s']} |")


if __name__ == "__main__":
    main()
