"""Seconds for the test-report intervals on an NIH-sized test set, one core, vs a naive loop.

    python bench/bench_stats.py [--images 25596] [--classes 14] [--resamples 1000] [--naive 20]

Random NIH-like data: 25,596 images x 14 classes with roughly NIH's prevalences (0.2% for
Hernia to 24% for Infiltration), scores rounded to 3 decimals (ties) and informative.
Measured in one process with one BLAS thread:

    ours       util.stats.auroc_intervals: stratified bootstrap (all resamples) + DeLong
    bootstrap  util.stats.bootstrap_aurocs alone
    naive      the same draws, one sklearn roc_auc_score per resample and class, timed on
               --naive resamples and scaled to --resamples (it is linear in them)

It also checks that the naive loop's AUROCs equal ours on those resamples. Prints a
Markdown table row for docs/BENCHMARKS.md; --json also writes the numbers.
"""
from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")  # one core, before numpy loads a BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from util.stats import Strata, auroc_intervals, bootstrap_aurocs  # noqa: E402

# Roughly NIH ChestX-ray14's positive rates per class (column order of FACTS.md).
NIH_PREVALENCE = (0.12, 0.04, 0.18, 0.24, 0.07, 0.05, 0.02, 0.10, 0.07, 0.04, 0.04, 0.02,
                  0.04, 0.002)


def nih_like(images: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random targets with NIH-like prevalences and scores that carry some signal."""
    rng = np.random.default_rng(seed)
    prevalence = np.resize(np.array(NIH_PREVALENCE), classes)
    targets = (rng.random((images, classes)) < prevalence).astype(np.int8)
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=(images, classes)) + 1.2 * targets - 2))), 3)
    return targets, scores


def naive_bootstrap(targets: np.ndarray, scores: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The documented draws, one resample at a time, one sklearn call per class (NaN: undefined)."""
    strata = Strata.from_targets(targets)
    rng = np.random.default_rng(seed)
    out = np.full((resamples, targets.shape[1]), np.nan)
    for b in range(resamples):
        u = rng.random(len(targets))
        picks = strata.order[strata.slot_start + (u * strata.slot_size).astype(np.int64)]
        for k in range(targets.shape[1]):
            y = targets[picks, k]
            if 0 < y.sum() < len(y):  # a resample without positives or negatives has no AUROC
                out[b, k] = roc_auc_score(y, scores[picks, k])
    return out


def cpu_model() -> str:
    """lscpu's model name (the machine the numbers belong to)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the table row."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=25_596)
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--naive", type=int, default=20, help="resamples timed for the naive loop")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings of ours")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    targets, scores = nih_like(args.images, args.classes)
    names = [f"class{k}" for k in range(args.classes)]
    ours, boot = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        auroc_intervals(targets, scores, names, resamples=args.resamples, seed=0)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        (fast,), strata = bootstrap_aurocs(targets, [scores], args.resamples, seed=0)
        boot.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    slow = naive_bootstrap(targets, scores, args.naive, seed=0)
    naive_per = (time.perf_counter() - t0) / args.naive
    same = bool(np.allclose(slow, fast[:args.naive], rtol=0, atol=1e-12, equal_nan=True))
    naive_total = naive_per * args.resamples
    result = {
        "cpu": cpu_model(), "images": args.images, "classes": args.classes,
        "resamples": args.resamples, "strata": strata.n_strata, "fixed_images": strata.n_fixed,
        "rare_images": strata.n_rare,
        "undefined_resamples": int(np.isnan(fast).any(axis=1).sum()),
        "ours_s": min(ours), "bootstrap_s": min(boot), "naive_s_per_resample": naive_per,
        "naive_s_scaled": naive_total, "speedup": naive_total / min(ours),
        "naive_equals_ours": same, "numpy": np.__version__, "python": platform.python_version(),
    }
    print(f"| {args.images:,} x {args.classes}, {args.resamples} resamples | {min(ours):.2f} s | "
          f"{min(boot):.2f} s | {naive_total:.0f} s ({naive_per * 1000:.0f} ms x {args.resamples}) "
          f"| **{result['speedup']:.0f}x** | {'yes' if same else 'NO'} |")
    print(f"cpu: {result['cpu']}; {strata.n_strata} strata ({strata.n_rare} images with a unique "
          f"pattern pooled in one), {strata.n_fixed} images alone in theirs, "
          f"{result['undefined_resamples']} resamples with a class left undefined")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
