"""Operating points: per-class decision thresholds chosen on validation, scored on test.

    thresholds = choose_thresholds(val_logits, val_targets, class_names)   # VALIDATION only
    values = {kind: {c: t["threshold"] for c, t in per.items()} for kind, per in thresholds.items()}
    table = operating_point_metrics(test_logits, test_targets, values, class_names)

Scores are any per-class score that rises with the probability of the finding (the logits
here: a temperature, or any other increasing map, leaves every decision unchanged). An
image is called positive when its score >= the threshold.

A threshold is the score of a validation image (a point of the validation ROC curve):

- ``youden``: maximises sensitivity + specificity - 1 (Youden's J); on ties, the highest;
- ``sens90`` / ``sens95``: the highest threshold whose validation sensitivity is >= 0.90 /
  0.95 (the most specific point reaching the target);
- ``spec90`` / ``spec95``: the lowest threshold whose validation specificity is >= 0.90 /
  0.95 (the most sensitive point reaching it).

A class with a single label value in the validation set has no threshold (None, with a
note), nor has a specificity target that only calling every validation image negative
reaches (too few negatives below the top-scoring images).
Targets are compared in integers (TP x 100 >= 90 x P), so 9 of 10 positives is 0.90.

Intervals, 95% by default: Wilson score intervals for sensitivity, specificity, PPV and
NPV, each the proportion of its own denominator (positives, negatives, positive calls,
negative calls); F1 (2 TP / (2 TP + FP + FN)) by the bootstrap of ``util.stats``: images
resampled jointly and unstratified, seed 0, so the draws are those of the AUROC intervals,
and a percentile interval over the resamples where F1 is defined.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from util.calibration import checked_scores
from util.stats import Strata, _percentile_interval, resample_counts

THRESHOLD_KINDS = ("youden", "sens90", "sens95", "spec90", "spec95")
# kind -> (the rate it targets, the target in percent)
TARGETS = {"sens90": ("sensitivity", 90), "sens95": ("sensitivity", 95),
           "spec90": ("specificity", 90), "spec95": ("specificity", 95)}
KIND_RULES = {
    "youden": "maximal sensitivity + specificity - 1 on validation",
    **{k: (f"{'highest' if rate == 'sensitivity' else 'lowest'} threshold with validation "
           f"{rate} >= {pct / 100:.2f}") for k, (rate, pct) in TARGETS.items()},
}
PROPORTION_INTERVAL = "Wilson score interval"
F1_INTERVAL = ("bootstrap over images (unstratified, resampled jointly across classes, the "
               "draws of the AUROC intervals), percentile interval")
DEFAULT_SEED = 0


def roc_points(score: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct scores of one class in decreasing order, with the true and false
    positives of calling every score >= each of them positive."""
    order = np.argsort(-score, kind="stable")
    s, y = score[order], target[order].astype(np.int64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last image of each distinct score
    return s[last], np.cumsum(y)[last], np.cumsum(1 - y)[last]


def choose_threshold(score: np.ndarray, target: np.ndarray, kind: str) -> dict[str, Any]:
    """One class's threshold of ``kind`` (module docstring) with its validation sensitivity
    and specificity: ``{"threshold", "sensitivity", "specificity"}``, or ``{"threshold":
    None, "note"}`` when it has none."""
    if kind not in THRESHOLD_KINDS:
        raise ValueError(f"threshold kind {kind!r}: choose from {THRESHOLD_KINDS}")
    scores, targets = checked_scores(np.ravel(score), np.ravel(target))
    score, target = scores[:, 0], targets[:, 0]
    n_pos = int(target.sum())
    n_neg = len(target) - n_pos
    if n_pos == 0 or n_neg == 0:
        return {"threshold": None, "note": f"a single label value in the {len(target)} "
                                           "validation images"}
    thresholds, tp, fp = roc_points(score, target)
    if kind == "youden":
        j = int(np.argmax(tp * n_neg - fp * n_pos))  # exact J x P x N; the first is the highest
    elif TARGETS[kind][0] == "sensitivity":
        j = int(np.argmax(tp * 100 >= TARGETS[kind][1] * n_pos))  # tp=P at the last point
    else:
        reached = np.flatnonzero((n_neg - fp) * 100 >= TARGETS[kind][1] * n_neg)
        if reached.size == 0:
            return {"threshold": None, "note": f"only calling every validation image negative "
                                               f"reaches specificity {TARGETS[kind][1] / 100:.2f}"}
        j = int(reached[-1])
    return {"threshold": float(thresholds[j]), "sensitivity": float(tp[j] / n_pos),
            "specificity": float((n_neg - fp[j]) / n_neg)}


def choose_thresholds(scores: np.ndarray, targets: np.ndarray, class_names: Sequence[str]
                      ) -> dict[str, dict[str, dict[str, Any]]]:
    """Every threshold kind for every class, chosen on the given (validation) predictions:
    ``{kind: {class: choose_threshold(...)}}``."""
    scores, targets = checked_scores(scores, targets, class_names=class_names)
    return {kind: {n: choose_threshold(scores[:, k], targets[:, k], kind)
                   for k, n in enumerate(class_names)} for kind in THRESHOLD_KINDS}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion ``successes / n``; (None, None) for n = 0."""
    if n == 0:
        return None, None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def _point(score: np.ndarray, target: np.ndarray, threshold: float, level: float) -> dict[str, Any]:
    """Counts and the four proportions with their Wilson intervals at one threshold."""
    call = score >= threshold
    y = target.astype(bool)
    tp, fp = int((call & y).sum()), int((call & ~y).sum())
    fn, tn = int((~call & y).sum()), int((~call & ~y).sum())
    row: dict[str, Any] = {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                       ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        row[name] = _ratio(k, n)
        row[f"{name}_low"], row[f"{name}_high"] = wilson_interval(k, n, level)
    row["f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
    row["f1_low"] = row["f1_high"] = None
    return row


def _bootstrap_f1(calls: np.ndarray, y: np.ndarray, resamples: int, seed: int, level: float
                  ) -> list[tuple[float | None, float | None]]:
    """Percentile intervals of F1 for each column of the (N, C) boolean ``calls`` against
    the (N, C) labels ``y``, over ``resamples`` joint draws of the N images."""
    indicators = np.concatenate([calls & y, calls & ~y, ~calls & y], axis=1).astype(np.float64)
    samples = []
    for counts in resample_counts(Strata.whole(len(calls)), resamples, seed):
        # Image order: Strata.whole lays the images out in their own order.
        tp, fp, fn = np.split(indicators.T @ counts, 3)  # (C, b) each
        with np.errstate(invalid="ignore", divide="ignore"):
            samples.append(2 * tp / (2 * tp + fp + fn))
    return [_percentile_interval(row, level) for row in np.concatenate(samples, axis=1)]


def operating_point_metrics(scores: np.ndarray, targets: np.ndarray,
                            thresholds: dict[str, dict[str, float | None]],
                            class_names: Sequence[str], *, resamples: int = 1000,
                            seed: int = DEFAULT_SEED, level: float = 0.95
                            ) -> dict[str, dict[str, dict[str, Any]]]:
    """Sensitivity, specificity, PPV, NPV and F1 with intervals (module docstring) at each
    given threshold: ``{kind: {class: row}}``; a row holds the threshold, the counts
    (tp, fp, tn, fn) and ``<metric>``, ``<metric>_low``, ``<metric>_high`` (None where
    undefined). A class without a threshold gets ``{"threshold": None}``. ``resamples``
    0: no F1 interval."""
    scores, targets = checked_scores(scores, targets, class_names=class_names)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    columns: list[tuple[str, str, int, float]] = []
    for kind, per_class in thresholds.items():
        table[kind] = {}
        for k, name in enumerate(class_names):
            t = per_class.get(name)
            if t is None:
                table[kind][name] = {"threshold": None}
                continue
            table[kind][name] = _point(scores[:, k], targets[:, k], t, level)
            columns.append((kind, name, k, t))
    if resamples > 0 and columns and len(scores):
        calls = np.stack([scores[:, k] >= t for _, _, k, t in columns], axis=1)
        y = np.stack([targets[:, k].astype(bool) for _, _, k, _ in columns], axis=1)
        for (kind, name, _, _), (low, high) in zip(columns, _bootstrap_f1(calls, y, resamples,
                                                                          seed, level)):
            table[kind][name]["f1_low"], table[kind][name]["f1_high"] = low, high
    return table
