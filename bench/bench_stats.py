"""Seconds for the test-report intervals on an NIH-sized test set, one core, vs a naive loop;
with --simulate, the intervals' coverage and the paired test's type-I error.

    python bench/bench_stats.py [--images 25596] [--classes 14] [--resamples 1000] [--naive 20]
    python bench/bench_stats.py --simulate [--repetitions 1000] [--workers 2] [--quick]

Random NIH-like data: 25,596 images x 14 classes with roughly NIH's prevalences (0.2% for
Hernia to 24% for Infiltration), scores rounded to 3 decimals (ties) and informative.
Measured in one process with one BLAS thread:

    ours       util.stats.auroc_intervals: bootstrap (all resamples) + DeLong
    bootstrap  util.stats.bootstrap_aurocs alone
    naive      the same draws, one sklearn roc_auc_score per resample and class, timed on
               --naive resamples and scaled to --resamples (it is linear in them)

It also checks that the naive loop's AUROCs equal ours on those resamples. Prints a
Markdown table row for docs/BENCHMARKS.md; --json also writes the numbers.

--simulate: the paper's CheXpert test labels (../shared/reference_splits/CheXpert/test_list.txt,
668 images x 5 classes; without it a random label matrix of the same shape and
prevalences), and the same labels on their first quarter (167 images: classes of 9 to 45
positives). Each repetition draws binormal scores (negatives N(0, 1), positives N(d, 1),
true AUROC 0.85 for every class, so the mean's is 0.85 too) for a model A and an equally
good model B (noise correlated 0.5 with A's), and scores, on --resamples resamples:

    plain      util.stats's bootstrap: unstratified, joint over classes (percentile)
    plain BCa  the same resamples, bias-corrected and accelerated (jackknife acceleration)
    patterns   strata of label patterns shared by 2+ images, the images with a unique
               pattern pooled in one stratum (percentile)
    label      each class stratified on its own label (positives and negatives resampled
               apart; per class only)
    DeLong     normal interval clipped to [0, 1]; DeLong logit: on the logit scale
               (util.stats.delong_interval, what the reports give)

Coverage: the share of repetitions whose 95% interval holds the true AUROC (A's
intervals). Type-I: the share whose paired test of A - B rejects at alpha 0.05 (bootstrap
p, or DeLong's z test). The Monte Carlo standard error is ~0.7 points at 1,000
repetitions. Resamples where a class is undefined are left out as util.stats does.
"""
from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")  # one core, before numpy loads a BLAS

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import NormalDist  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from util.io import write_json  # noqa: E402
from util.stats import (Strata, _bootstrap_p, auroc_intervals, bootstrap_aurocs,  # noqa: E402
                        delong_components, delong_covariance, delong_interval)

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
    rng = np.random.default_rng(seed)
    out = np.full((resamples, targets.shape[1]), np.nan)
    for b in range(resamples):
        u = rng.random(len(targets))
        picks = (u * len(targets)).astype(np.int64)
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


# ----------------------------------------------------------------------------------------
# Coverage / type-I simulation (--simulate)
# ----------------------------------------------------------------------------------------

CHEXPERT_TEST = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference_splits" / \
    "CheXpert" / "test_list.txt"
CHEXPERT_SHAPE, CHEXPERT_POSITIVES = (668, 5), (178, 175, 35, 85, 120)
TRUE_AUROC = 0.85
NOISE_CORRELATION = 0.5  # between model A's and model B's scores
LEVEL, ALPHA = 0.95, 0.05
PERCENTILE_METHODS = ("plain", "plain BCa", "patterns", "label")
DELONG_METHODS = ("DeLong", "DeLong logit")


def simulation_labels() -> tuple[np.ndarray, str]:
    """The paper's CheXpert test labels, or a random matrix of the same shape and prevalences."""
    if CHEXPERT_TEST.is_file():
        rows = [line.split()[1:] for line in CHEXPERT_TEST.read_text().splitlines() if line.strip()]
        return np.array(rows, dtype=np.int8), "the paper's CheXpert test_list.txt"
    rng = np.random.default_rng(0)
    n, k = CHEXPERT_SHAPE
    targets = np.zeros((n, k), dtype=np.int8)
    for j, r in enumerate(CHEXPERT_POSITIVES):
        targets[rng.choice(n, r, replace=False), j] = 1
    return targets, "random labels of CheXpert test's shape and positives (test_list.txt absent)"


def pattern_strata(targets: np.ndarray) -> Strata:
    """Label-pattern strata: one per pattern shared by 2+ images, one pool of the unique ones."""
    _, inverse, counts = np.unique(targets, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    return Strata.from_ids(np.where(counts[inverse] > 1, inverse, len(counts)))


def jackknife_aurocs(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROCs (K,), leave-one-image-out AUROCs (n, K)), exactly from DeLong's components."""
    n, k = targets.shape
    auc, jack = np.empty(k), np.empty((n, k))
    for j in range(k):
        y = targets[:, j].astype(bool)
        a, v10, v01 = delong_components(y, scores[:, j][None])
        m, q = y.sum(), (~y).sum()
        auc[j] = a[0]
        jack[y, j] = (m * a[0] - v10[0]) / (m - 1)
        jack[~y, j] = (q * a[0] - v01[0]) / (q - 1)
    return auc, jack


def bca_interval(boot: np.ndarray, point: float, jack: np.ndarray) -> tuple[float, float]:
    """Bias-corrected and accelerated percentile interval (Efron 1987) at LEVEL."""
    boot = boot[np.isfinite(boot)]
    nd = NormalDist()
    share = ((boot < point).sum() + 0.5 * (boot == point).sum()) / boot.size
    z0 = nd.inv_cdf(min(max(share, 1 / (2 * boot.size)), 1 - 1 / (2 * boot.size)))
    d = jack.mean() - jack
    denom = 6 * (d ** 2).sum() ** 1.5
    accel = (d ** 3).sum() / denom if denom > 0 else 0.0
    out = []
    for tail in ((1 - LEVEL) / 2, (1 + LEVEL) / 2):
        z = nd.inv_cdf(tail)
        out.append(100 * nd.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z))))
    low, high = np.percentile(boot, out)
    return float(low), float(high)


def _percentile(boot: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of the finite resamples."""
    low, high = np.percentile(boot[np.isfinite(boot)], [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(low), float(high)


def simulate_one(job: tuple[np.ndarray, int, int]) -> dict[str, np.ndarray]:
    """One repetition: (covered (K + 1,), rejected (K + 1,)) per method; column K is the mean.

    NaN where a method gives no figure (the label-stratified and DeLong ones for the mean).
    """
    targets, rep, resamples = job
    n, k = targets.shape
    rng = np.random.default_rng(1_000_003 + rep)
    shift = math.sqrt(2) * NormalDist().inv_cdf(TRUE_AUROC)
    noise_a = rng.normal(size=(n, k))
    noise_b = NOISE_CORRELATION * noise_a + math.sqrt(1 - NOISE_CORRELATION ** 2) * rng.normal(size=(n, k))
    a, b = shift * targets + noise_a, shift * targets + noise_b
    covered = {m: np.full(k + 1, np.nan) for m in PERCENTILE_METHODS + DELONG_METHODS}
    rejected = {m: np.full(k + 1, np.nan) for m in ("plain", "patterns", "label", "DeLong")}

    def cover(method: str, j: int, low: float, high: float) -> None:
        covered[method][j] = float(low <= TRUE_AUROC <= high)

    point, jack = jackknife_aurocs(targets, a)
    for method, strata in (("plain", None), ("patterns", pattern_strata(targets))):
        boot_a, boot_b = bootstrap_aurocs(targets, [a, b], resamples, seed=rep, strata=strata)
        defined = np.isfinite(boot_a).all(axis=1)
        mean_a, mean_b = boot_a[defined].mean(axis=1), boot_b[defined].mean(axis=1)
        for j in range(k + 1):
            ba, bb = (mean_a, mean_b) if j == k else (boot_a[:, j], boot_b[:, j])
            cover(method, j, *_percentile(ba))
            rejected[method][j] = float(_bootstrap_p(ba - bb) < ALPHA)
            if method == "plain":
                p, jk = (point.mean(), jack.mean(axis=1)) if j == k else (point[j], jack[:, j])
                cover("plain BCa", j, *bca_interval(ba, p, jk))
    z = NormalDist().inv_cdf((1 + LEVEL) / 2)
    for j in range(k):
        strata = Strata.from_ids(targets[:, j])
        boot_a, boot_b = bootstrap_aurocs(targets[:, [j]], [a[:, [j]], b[:, [j]]], resamples,
                                          seed=rep, strata=strata)
        cover("label", j, *_percentile(boot_a[:, 0]))
        rejected["label"][j] = float(_bootstrap_p(boot_a[:, 0] - boot_b[:, 0]) < ALPHA)
        auc, cov = delong_covariance(targets[:, j], np.stack([a[:, j], b[:, j]]))
        se = math.sqrt(cov[0, 0])
        cover("DeLong", j, max(0.0, auc[0] - z * se), min(1.0, auc[0] + z * se))
        cover("DeLong logit", j, *delong_interval(float(auc[0]), se, z))
        var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
        p = math.erfc(abs(auc[0] - auc[1]) / math.sqrt(2 * var)) if var > 0 else 1.0
        rejected["DeLong"][j] = float(p < ALPHA)
    return {"covered": covered, "rejected": rejected}


def simulate(repetitions: int, resamples: int, workers: int) -> dict[str, Any]:
    """Coverage and type-I error (%) per label set, class (and the mean) and method."""
    from concurrent.futures import ProcessPoolExecutor

    labels, source = simulation_labels()
    sets = {f"{len(labels)} images": labels, f"first {len(labels) // 4} images": labels[:len(labels) // 4]}
    out: dict[str, Any] = {"labels": source, "repetitions": repetitions, "resamples": resamples,
                           "true_auroc": TRUE_AUROC, "sets": {}}
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    with pool or contextlib.nullcontext():
        for name, targets in sets.items():
            jobs = [(targets, rep, resamples) for rep in range(repetitions)]
            runs = list(pool.map(simulate_one, jobs, chunksize=max(1, repetitions // (8 * workers)))
                        if pool else map(simulate_one, jobs))
            rows = [f"class {j} ({int(targets[:, j].sum())} pos)" for j in range(targets.shape[1])]
            rows.append("mean AUROC")
            table = {}
            for kind in ("covered", "rejected"):
                for method in runs[0][kind]:
                    hits = np.stack([r[kind][method] for r in runs])
                    scored = np.isfinite(hits).sum(axis=0)
                    share = 100 * np.nansum(hits, axis=0) / np.maximum(scored, 1)
                    table[f"{kind} {method}"] = [round(float(v), 1) if c else None
                                                 for v, c in zip(share, scored)]
            out["sets"][name] = {"rows": rows, "positives": targets.sum(axis=0).tolist(), **table}
    return out


def print_simulation(result: dict[str, Any]) -> None:
    """Markdown tables of coverage and type-I error."""
    print(f"labels: {result['labels']}; {result['repetitions']} repetitions, {result['resamples']} "
          f"resamples, true AUROC {result['true_auroc']}")
    for name, s in result["sets"].items():
        for kind, title, methods in (("covered", "coverage of the 95% interval (%)",
                                      PERCENTILE_METHODS + DELONG_METHODS),
                                     ("rejected", "type-I error at alpha 0.05 (%)",
                                      ("plain", "patterns", "label", "DeLong"))):
            print(f"\n{name}: {title}\n")
            print("| | " + " | ".join(methods) + " |")
            print("|---|" + "---:|" * len(methods))
            for i, row in enumerate(s["rows"]):
                cells = []
                for m in methods:
                    v = (s.get(f"{kind} {m}") or [None] * len(s["rows"]))[i]
                    cells.append("" if v is None else f"{v:.1f}")
                print(f"| {row} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the table row."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=25_596)
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--naive", type=int, default=20, help="resamples timed for the naive loop")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings of ours")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--simulate", action="store_true",
                   help="measure coverage and type-I error instead of speed")
    p.add_argument("--repetitions", type=int, default=1000, help="--simulate: repetitions")
    p.add_argument("--workers", type=int, default=2, help="--simulate: processes")
    p.add_argument("--quick", action="store_true",
                   help="--simulate: 200 repetitions of 500 resamples (under a minute)")
    args = p.parse_args(argv)
    if args.simulate:
        repetitions, resamples = (200, 500) if args.quick else (args.repetitions, args.resamples)
        t0 = time.perf_counter()
        result = simulate(repetitions, resamples, args.workers)
        result.update(cpu=cpu_model(), seconds=round(time.perf_counter() - t0, 1))
        print_simulation(result)
        print(f"\ncpu: {result['cpu']}; {result['seconds']} s with {args.workers} worker(s)")
        if args.json:
            write_json(args.json, result)
        return result

    targets, scores = nih_like(args.images, args.classes)
    names = [f"class{k}" for k in range(args.classes)]
    ours, boot = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        auroc_intervals(targets, scores, names, resamples=args.resamples, seed=0)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        (fast,) = bootstrap_aurocs(targets, [scores], args.resamples, seed=0)
        boot.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    slow = naive_bootstrap(targets, scores, args.naive, seed=0)
    naive_per = (time.perf_counter() - t0) / args.naive
    same = bool(np.allclose(slow, fast[:args.naive], rtol=0, atol=1e-12, equal_nan=True))
    naive_total = naive_per * args.resamples
    result = {
        "cpu": cpu_model(), "images": args.images, "classes": args.classes,
        "resamples": args.resamples,
        "undefined_resamples": int(np.isnan(fast).any(axis=1).sum()),
        "ours_s": min(ours), "bootstrap_s": min(boot), "naive_s_per_resample": naive_per,
        "naive_s_scaled": naive_total, "speedup": naive_total / min(ours),
        "naive_equals_ours": same, "numpy": np.__version__, "python": platform.python_version(),
    }
    print(f"| {args.images:,} x {args.classes}, {args.resamples} resamples | {min(ours):.2f} s | "
          f"{min(boot):.2f} s | {naive_total:.0f} s ({naive_per * 1000:.0f} ms x {args.resamples}) "
          f"| **{result['speedup']:.0f}x** | {'yes' if same else 'NO'} |")
    print(f"cpu: {result['cpu']}; {result['undefined_resamples']} resamples with a class left "
          "undefined")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
