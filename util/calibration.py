"""Calibration of multi-label sigmoid outputs: expected calibration error, Brier score,
reliability-diagram data, and temperature scaling.

    errors = calibration_errors(probs, targets, class_names)        # ECE and Brier, per class
    temperatures = fit_temperatures(val_logits, val_targets)        # on the VALIDATION split
    calibrated = apply_temperatures(test_logits, temperatures)      # sigmoid(logit / T)

Every function takes numpy arrays: N x K logits or probabilities and N x K 0/1 targets (a
1-D array is one class); NaN or infinite scores, labels other than 0/1 and shapes that do
not agree raise ``ValueError``.

Binning (``BINNING``): 15 equal-width bins of the predicted probability on [0, 1], bin i
holding the probabilities in [i/15, (i+1)/15) and the last one [14/15, 1]. A class's ECE is
sum over its bins of (images in the bin / images) x |fraction positive - mean probability|;
the pooled ECE bins every image x class pair together; the mean ECE averages the classes'.
Brier score: the mean of (probability - label)^2, per class; its mean over classes equals
the pooled one (every class has the same images).

Temperature scaling divides the logits by a temperature T > 0 before the sigmoid: the
ranking of images within a class (its AUROC) is unchanged, T > 1 softens over-confident
outputs. ``fit_temperatures`` minimises the binary cross-entropy over every image x class
pair of the calibration set with one shared T (the default, ``"temperature"``: one
parameter, hard to over-fit on a few hundred validation images), or one T per class
(``"class_temperature"``; a class with a single label value in the calibration set keeps
the shared T). The search is over log T in [log 0.05, log 20] by bounded Brent
(scipy's ``minimize_scalar(method="bounded")``): deterministic, and exact up to its
tolerance since the loss is unimodal in log T (it is convex in 1 / T).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

ECE_BINS = 15
BINNING = ("15 equal-width bins of the predicted probability on [0, 1] (bin i: [i/15, "
           "(i+1)/15), the last one closed); ECE = sum over bins of (share of the predictions "
           "in the bin) x |fraction positive - mean probability|")
METHODS = ("temperature", "class_temperature")
DEFAULT_METHOD = "temperature"
TEMPERATURE_BOUNDS = (0.05, 20.0)
# Bounded Brent's tolerance on log T: T to ~1e-6 relative.
LOG_T_TOLERANCE = 1e-6
# The largest logit whose float64 sigmoid is below 1: probabilities of exactly 1 map to it.
_BELOW_ONE = np.nextafter(1.0, 0.0)
MAX_LOGIT = float(np.log(_BELOW_ONE) - np.log1p(-_BELOW_ONE))
# The logit of the smallest float64 above 0: probabilities of exactly 0 (logits below ~-745) map to it.
MIN_LOGIT = float(np.log(np.nextafter(0.0, 1.0)))


def checked_scores(scores: np.ndarray, targets: np.ndarray, *, probabilities: bool = False,
                   class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 scores and int8 0/1 targets of the same shape (1-D: one class), finite
    (and within [0, 1] with ``probabilities``; a column per name of ``class_names``);
    otherwise a ValueError saying what is wrong."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    scores = scores[:, None] if scores.ndim == 1 else scores
    targets = targets[:, None] if targets.ndim == 1 else targets
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, K)")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{bad} scores are NaN or infinite (of {scores.size})")
    if probabilities and scores.size and (scores.min() < 0 or scores.max() > 1):
        raise ValueError(f"probabilities must lie in [0, 1], found {scores.min():g} .. {scores.max():g}")
    values = np.unique(targets)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"targets must be 0/1 labels, found values {values[:5].tolist()}")
    if class_names is not None and scores.shape[1] != len(class_names):
        raise ValueError(f"{scores.shape[1]} score columns for {len(class_names)} class names")
    return scores, targets.astype(np.int8)


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per bin of all the given probabilities (any shape): ``count``, ``mean_prob`` and
    ``frequency`` (fraction positive; NaN for an empty bin), and the bin ``edges``."""
    probs, targets = checked_scores(np.ravel(probs), np.ravel(targets), probabilities=True)
    index = np.minimum((probs[:, 0] * bins).astype(np.int64), bins - 1)  # 1 in the last bin
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(index, weights=probs[:, 0], minlength=bins) / count
        frequency = np.bincount(index, weights=targets[:, 0], minlength=bins) / count
    return {"count": count, "mean_prob": mean_prob, "frequency": frequency,
            "edges": np.linspace(0.0, 1.0, bins + 1)}


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of all the given probabilities pooled (``BINNING``); NaN for no predictions."""
    table = reliability_bins(probs, targets, bins)
    total = table["count"].sum()
    if total == 0:
        return math.nan
    used = table["count"] > 0
    gaps = np.abs(table["frequency"][used] - table["mean_prob"][used])
    return float((table["count"][used] * gaps).sum() / total)


def calibration_errors(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str],
                       bins: int = ECE_BINS) -> dict:
    """ECE and Brier score per class, their means over classes and the pooled ECE (every
    image x class pair binned together), as JSON-ready floats."""
    probs, targets = checked_scores(probs, targets, probabilities=True, class_names=class_names)
    ece = {n: expected_calibration_error(probs[:, k], targets[:, k], bins)
           for k, n in enumerate(class_names)}
    squared = (probs - targets) ** 2  # Brier: its mean per class; NaN without predictions
    per_class = squared.mean(axis=0) if len(probs) else np.full(len(class_names), np.nan)
    brier = dict(zip(class_names, map(float, per_class)))
    return {"ece": ece, "mean_ece": float(np.mean(list(ece.values()))),
            "pooled_ece": expected_calibration_error(probs, targets, bins),
            "brier": brier, "mean_brier": float(np.mean(list(brier.values())))}


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """The logits of float64 sigmoid probabilities (the inverse of ``expit``).

    Exact to float64 rounding where the sigmoid is: relative error ~1e-8 at logit 20,
    ~1e-3 at 30; a probability of exactly 1 (logits above ~36.7) maps to ``MAX_LOGIT``, one
    of exactly 0 (logits below ~-745) to ``MIN_LOGIT``: both finite.
    """
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(probs) - np.log1p(-probs)
    return np.clip(logits, MIN_LOGIT, MAX_LOGIT)


def binary_cross_entropy(logits: np.ndarray, targets: np.ndarray, temperature: float | np.ndarray = 1.0
                         ) -> float:
    """Mean BCE of sigmoid(logits / temperature) over every entry (stable for any logit)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - targets * z)) if z.size else math.nan


def _fit_one(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the BCE of ``logits`` (any shape) against ``targets``."""
    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    found = minimize_scalar(lambda u: binary_cross_entropy(logits, targets, math.exp(u)),
                            bounds=(low, high), method="bounded",
                            options={"xatol": LOG_T_TOLERANCE})
    return float(math.exp(found.x))


def fit_temperatures(logits: np.ndarray, targets: np.ndarray, method: str = DEFAULT_METHOD
                     ) -> np.ndarray:
    """One temperature per class (a K-vector) fitted on a calibration set by minimising the
    BCE: all equal for ``"temperature"``, each class its own for ``"class_temperature"``
    (module docstring). Fit on validation predictions, never on the test split."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose from {METHODS}")
    logits, targets = checked_scores(logits, targets)
    if len(logits) == 0:
        raise ValueError("no predictions to fit a temperature on")
    shared = _fit_one(logits, targets)
    temperatures = np.full(logits.shape[1], shared)
    if method == "class_temperature":
        for k in range(logits.shape[1]):
            if targets[:, k].min() != targets[:, k].max():
                temperatures[k] = _fit_one(logits[:, k], targets[:, k])
    return temperatures


def at_bound(temperature: float) -> bool:
    """Whether a fitted temperature sits at the edge of the search (the optimum may lie beyond)."""
    low, high = TEMPERATURE_BOUNDS
    return bool(temperature < low * (1 + 1e-3) or temperature > high * (1 - 1e-3))


def apply_temperatures(logits: np.ndarray, temperatures: np.ndarray | float) -> np.ndarray:
    """Calibrated probabilities sigmoid(logit / T), T per class (broadcast over the columns)."""
    return expit(np.asarray(logits, dtype=np.float64) / np.asarray(temperatures, dtype=np.float64))


def temperature_text(temperatures: Sequence[float]) -> str:
    """'temperature 1.370' for one shared value, else 'per-class temperatures 0.900..1.600'."""
    values = sorted({float(t) for t in temperatures})
    if len(values) == 1:
        return f"temperature {values[0]:.3f}"
    return f"per-class temperatures {values[0]:.3f}..{values[-1]:.3f}"
