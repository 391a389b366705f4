"""Confidence intervals and paired tests for multi-label AUROC: the bootstrap (images drawn
with replacement, not stratified by class) and DeLong.

    from util.stats import auroc_intervals, paired_comparison
    intervals = auroc_intervals(targets, probs, class_names)            # one run
    comparison = paired_comparison(targets, probs_a, probs_b, class_names)  # two runs, same images

Both return plain JSON-ready data (floats, ints, strings, None); an undefined value is None
with a ``note`` that says why, never NaN.

The bootstrap
-------------
Classes share images, so one resample draws images (not labels) and every class, and the
mean AUROC over classes, is computed on the same draw: n images drawn with replacement from
the n images, with no strata. A paired comparison scores both runs on the same draws.

Why unstratified. A stratum keeps its own size in every resample, so the resampled
statistic varies only within strata; a stratum of s images keeps (s - 1) / s of its
variance. Strata defined by each image's whole label pattern (the vector of K labels) are
small on a multi-label set, and the positives of a rare class sit mostly in small patterns:
the intervals come out too narrow (a class with 40 positives in 20 patterns of 2 images: a
bootstrap SD of 0.73 DeLong standard errors) and the paired test rejected too often.
Stratifying each class on its own label alone would need a draw per class, and the mean
AUROC would then be resampled differently from its classes; the plain joint draw treats the
test images as what they are, a random sample of images (so the positives' count varies
too), keeps the mean and its classes on the same resamples, and costs one draw. Its
coverage and type-I error, measured by simulation on the paper's CheXpert test labels, are
in docs/BENCHMARKS.md (bench/bench_stats.py --simulate): close to nominal from ~100
positives on; below ~30 positives every interval here under-covers (the report says so,
``SMALL_CLASS``).

The price: a resample can lack every positive (or every negative) of a class with few of
them, and the class has no AUROC in it. Such a resample is left out, explicitly and
counted: a class's interval is over the resamples where that class is defined; the mean
AUROC's interval is over the resamples where every class defined in the full set is
defined, so the mean always averages the same classes. Each class and the mean report
``n_undefined_resamples``; when more than 5% are left out the note says the interval is
unreliable (it is conditional on a subset of the draws), and when fewer than half remain
there is no interval, with a note. The share left out is about (1 - r/n)^n, e^-r, for a
class with r positives: ~37% for one positive, ~13% for two, ~5% for three.

The draw is defined so that a plain loop can reproduce it. With
``rng = np.random.default_rng(seed)``, resample b takes ``u = rng.random(n)`` (resamples in
order) and slot p receives image ``floor(u[p] * n)``. `Strata` generalises this to any
partition of the images (slot p of stratum s, members m_0..m_{size-1} in image order,
strata in order of their ids laid end to end, receives ``m_floor(u[p] * size)``), which
``bootstrap_aurocs(strata=...)`` accepts to measure other designs (bench/bench_stats.py);
the reports always use the single stratum. The intervals are percentile intervals
(``np.percentile``, linear interpolation) of the resampled statistic.

The fast path never re-ranks a resample. A resample is a vector of image counts w; for a
class with the negatives sorted by score, a positive with score s beats the negatives below
it and ties with those equal to it, so twice the weighted Mann-Whitney count is
``sum_i w_i (C[lo_i] + C[hi_i])`` with C the running sum of the sorted negatives' counts and
lo_i / hi_i the (fixed) numbers of negatives below / not above s. C is only needed at the
cuts lo_i, hi_i, so the sorted negatives are summed per segment between cuts (one sparse
product for all classes) and accumulated over the few segments; all in exact integers, in
blocks of resamples.

DeLong
------
Variance of the AUROC from its structural components (DeLong et al., Biometrics 1988),
computed from midranks in O(n log n) (Sun & Xu, IEEE SPL 2014); the interval is the normal
one on the logit scale, logit(AUROC) +- z * SE / (AUROC (1 - AUROC)), mapped back
(`delong_interval`): in the simulation it covers better than AUROC +- z * SE clipped to
[0, 1] at 30 or fewer positives (89-95% against 83-93%) and as well above. The paired test of two score sets on the same images
uses the covariance of their components. Both need at least 2 positives and 2 negatives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Iterator, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
# Resamples per block of the fast bootstrap: bounds memory at ~block x n x 4 bytes per array.
BLOCK = 64
MIN_PER_SIDE = 2  # positives and negatives a class needs for an interval (DeLong's variance)
# Left-out resamples (a class without positives or negatives in them): above this share the
# note calls the interval unreliable; below MIN_VALID_SHARE valid ones there is no interval.
UNRELIABLE_SHARE = 0.05
MIN_VALID_SHARE = 0.5

BOOTSTRAP_METHOD = ("bootstrap over images, unstratified, resampled jointly across classes (each "
                    "resample draws n of the n images with replacement; every class and the "
                    "mean AUROC are computed on the same draws); percentile interval over the "
                    "resamples where the class (for the mean: every class) has positives and "
                    "negatives")
# At or below this many positives (or negatives) the intervals under-cover (docs/BENCHMARKS.md).
SMALL_CLASS = 30
# Simulated coverage of the nominal 95% at 6 to 30 positives (bench/bench_stats.py --simulate).
SMALL_CLASS_COVERAGE = "86-94% for the bootstrap, 89-95% for DeLong"
DELONG_METHOD = ("DeLong variance (midrank form); normal interval on the logit scale (delta "
                 "method), mapped back to (0, 1)")


def _check_inputs(targets: np.ndarray, score_sets: Sequence[np.ndarray],
                  class_names: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N, K) 0/1 targets and float64 scores of the same shape, or a ValueError naming the shapes."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        targets = targets[:, None]
    scores = []
    for s in score_sets:
        s = np.asarray(s, dtype=np.float64)
        scores.append(s[:, None] if s.ndim == 1 else s)
    k = len(class_names)
    for s in scores:
        if targets.ndim != 2 or s.shape != targets.shape or targets.shape[1] != k:
            raise ValueError(f"targets {targets.shape} and scores {s.shape} must both be (N, {k}) "
                             f"for the {k} class names")
    values = np.unique(targets)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"targets must be 0/1 labels, found values {values[:5].tolist()}")
    return targets.astype(np.int8), scores


# -- Resampling --------------------------------------------------------------------------

@dataclass
class Strata:
    """A partition of the images laid end to end as slots (module docstring); one stratum by default."""

    order: np.ndarray       # slot -> image index: strata in order of their ids, members in image order
    slot_start: np.ndarray  # slot -> first slot of its stratum
    slot_size: np.ndarray   # slot -> size of its stratum
    n_strata: int

    @classmethod
    def from_ids(cls, stratum_of: np.ndarray) -> "Strata":
        """Strata from each image's stratum id (any integers; the ids' order orders the strata)."""
        _, stratum = np.unique(np.asarray(stratum_of).ravel(), return_inverse=True)
        stratum = stratum.ravel()
        sizes = np.bincount(stratum)
        order = np.argsort(stratum, kind="stable")  # stable: members keep their order
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        slot_stratum = stratum[order]
        return cls(order=order, slot_start=starts[slot_stratum], slot_size=sizes[slot_stratum],
                   n_strata=len(sizes))

    @classmethod
    def whole(cls, n: int) -> "Strata":
        """All n images in one stratum: the plain bootstrap."""
        return cls.from_ids(np.zeros(n, dtype=np.int64))


def resample_counts(strata: Strata, resamples: int, seed: int,
                    block: int = BLOCK) -> Iterator[np.ndarray]:
    """Blocks of (n, b) int32 counts: how often each slot's image is drawn in each resample.

    Row j counts image ``strata.order[j]``; column c is one resample. The block size does
    not change the draws.
    """
    rng = np.random.default_rng(seed)
    n = len(strata.order)
    for first in range(0, resamples, block):
        b = min(block, resamples - first)
        u = rng.random((b, n))  # the same stream as b successive rng.random(n)
        picks = strata.slot_start + (u * strata.slot_size).astype(np.int64)
        # Slot-major layout: one resample's counts are a column, so the per-class sums
        # below run over contiguous rows.
        flat = picks * b + np.arange(b, dtype=np.int64)[:, None]
        yield np.bincount(flat.ravel(), minlength=n * b).reshape(n, b).astype(np.int32)


class _WeightedAUROC:
    """AUROC of every class under image counts, from one sort of the full set (the fast path
    of the module docstring: segments of the sorted negatives between the cuts lo_i / hi_i)."""

    def __init__(self, targets: np.ndarray, scores: np.ndarray) -> None:
        from scipy import sparse

        n, k = targets.shape
        rows, cols, self.classes = [], [], []
        offset = 0
        for j in range(k):
            pos, neg = np.flatnonzero(targets[:, j] == 1), np.flatnonzero(targets[:, j] == 0)
            if len(pos) == 0 or len(neg) == 0:
                self.classes.append(None)
                continue
            neg = neg[np.argsort(scores[neg, j], kind="stable")]
            neg_sorted = scores[neg, j]
            lo = np.searchsorted(neg_sorted, scores[pos, j], side="left")
            hi = np.searchsorted(neg_sorted, scores[pos, j], side="right")
            cuts = np.unique(np.concatenate([[0, len(neg)], lo, hi]))
            segment = np.searchsorted(cuts, np.arange(len(neg)), side="right") - 1
            rows.append(segment + offset)
            cols.append(neg)
            self.classes.append((offset, len(cuts) - 1, np.searchsorted(cuts, lo),
                                 np.searchsorted(cuts, hi), pos))
            offset += len(cuts) - 1
        rows_ = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        cols_ = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        self.segments = sparse.csr_matrix((np.ones(len(rows_), dtype=np.int32), (rows_, cols_)),
                                          shape=(offset, n))

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """(b, K) AUROCs for (n, b) counts; NaN where a class has a single label value."""
        sums = self.segments @ counts
        out = np.full((counts.shape[1], len(self.classes)), np.nan)
        for j, cls in enumerate(self.classes):
            if cls is None:
                continue
            offset, n_seg, i_lo, i_hi, pos = cls
            cum = np.zeros((n_seg + 1, counts.shape[1]), dtype=np.int64)
            np.cumsum(sums[offset:offset + n_seg], axis=0, out=cum[1:])
            w_pos = counts[pos]
            twice = (w_pos * (cum[i_lo] + cum[i_hi])).sum(axis=0)
            # A resample that drew no positive or no negative of the class has no AUROC:
            # left NaN, not divided (0 / 0).
            pairs = 2.0 * w_pos.sum(axis=0) * cum[-1]
            np.divide(twice, pairs, out=out[:, j], where=pairs > 0)
        return out


def bootstrap_aurocs(targets: np.ndarray, score_sets: Sequence[np.ndarray], resamples: int,
                     seed: int = 0, block: int = BLOCK,
                     strata: Strata | None = None) -> list[np.ndarray]:
    """Per-class AUROC of each score set in each resample: a (resamples, K) array per set.

    All score sets see the same resamples (a paired bootstrap), so a class is undefined (NaN)
    in the same resamples for every set: all of them for a class with a single label value in
    the full set, and those that drew none of its positives (or negatives). ``strata``
    (default: one stratum, the plain bootstrap) resamples within each stratum instead.
    """
    strata = Strata.whole(len(targets)) if strata is None else strata
    if len(strata.order) != len(targets):
        raise ValueError(f"strata cover {len(strata.order)} images, targets {len(targets)}")
    t = targets[strata.order]
    aucs = [_WeightedAUROC(t, s[strata.order]) for s in score_sets]
    out = [np.empty((resamples, t.shape[1])) for _ in score_sets]
    for i, counts in enumerate(resample_counts(strata, resamples, seed, block)):
        for auc, dest in zip(aucs, out):
            dest[i * block:i * block + counts.shape[1]] = auc(counts)
    return out


# -- DeLong ------------------------------------------------------------------------------

def delong_components(target: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs and structural components of one class for M score sets (scores: (M, N)).

    Returns (auc (M,), v10 (M, n_pos), v01 (M, n_neg)): v10[i] is the share of negatives a
    positive beats (ties count one half), v01[j] the share of positives that beat a negative.
    """
    from scipy.stats import rankdata  # here, not at the top: every command starts without scipy

    target = np.asarray(target).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, target], scores[:, ~target]
    m, n = pos.shape[1], neg.shape[1]
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    tx, ty = rankdata(pos, axis=1), rankdata(neg, axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return v10.mean(axis=1), v10, v01


def delong_covariance(target: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROCs (M,), their DeLong covariance (M, M)) for M score sets on the same images."""
    auc, v10, v01 = delong_components(target, scores)
    if min(v10.shape[1], v01.shape[1]) < MIN_PER_SIDE:
        raise ValueError(f"DeLong's variance needs at least {MIN_PER_SIDE} positives and negatives, "
                         f"got {v10.shape[1]} and {v01.shape[1]}")
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return auc, s10 / v10.shape[1] + s01 / v01.shape[1]


def delong_interval(auc: float, se: float, z: float) -> tuple[float, float]:
    """AUROC +- z SE on the logit scale, mapped back: always inside (0, 1), wider on the side
    away from 1 (the normal interval clipped to [0, 1] under-covers at few positives).

    The logit's standard error is SE / (AUROC (1 - AUROC)) (the delta method); an AUROC of 0
    or 1, or a zero SE, gives the point itself.
    """
    if not 0 < auc < 1 or se == 0:
        return auc, auc
    logit, se_logit = math.log(auc / (1 - auc)), se / (auc * (1 - auc))
    return (1 / (1 + math.exp(-(logit - z * se_logit))), 1 / (1 + math.exp(-(logit + z * se_logit))))


def _class_counts_note(n_pos: int, n_neg: int, n_images: int) -> str | None:
    """Why a class has no AUROC or no interval, or None when it has both."""
    if n_pos == 0 or n_neg == 0:
        which = "negatives" if n_pos == 0 else "positives"
        return f"undefined: only {which} among the {n_images} images"
    if n_pos < MIN_PER_SIDE or n_neg < MIN_PER_SIDE:
        return (f"no interval: {n_pos} positive(s) and {n_neg} negative(s); an interval needs "
                f"at least {MIN_PER_SIDE} of each")
    return None


def small_class_note(classes: dict[str, dict[str, Any]]) -> str | None:
    """A line naming the classes with an interval and at most SMALL_CLASS positives (or
    negatives), where both interval kinds under-cover; None when there are none."""
    small = [name for name, row in classes.items()
             if MIN_PER_SIDE <= min(row.get("n_pos") or 0, row.get("n_neg") or 0) <= SMALL_CLASS]
    if not small:
        return None
    return (f"{', '.join(small)}: {SMALL_CLASS} or fewer positives (or negatives); there both "
            f"intervals under-cover (simulated coverage of the nominal 95%: "
            f"{SMALL_CLASS_COVERAGE}, docs/BENCHMARKS.md)")


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """Percentile interval of the finite samples, or (None, None) when there are none."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None, None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class _Interval:
    """A bootstrap interval over the defined resamples, how many were left out, and why not."""

    low: float | None
    high: float | None
    n_undefined: int
    note: str | None


def _bootstrap_interval(samples: np.ndarray, level: float, whose: str) -> _Interval:
    """Percentile interval of the resampled statistic over the resamples where it is defined.

    ``samples`` is NaN in a resample that drew no positive or no negative of ``whose``
    ("the class", "some class"); those are left out, counted and noted (module docstring).
    """
    total = samples.size
    n_undefined = int((~np.isfinite(samples)).sum())
    valid = total - n_undefined
    lacking = f"drew no positive or no negative of {whose}"
    if valid == 0 or valid < MIN_VALID_SHARE * total:
        return _Interval(None, None, n_undefined,
                         f"no interval: {n_undefined} of {total} resamples {lacking}; fewer than "
                         f"{MIN_VALID_SHARE:.0%} of them remain")
    low, high = _percentile_interval(samples, level)
    note = None
    if n_undefined > UNRELIABLE_SHARE * total:
        note = (f"interval unreliable: {n_undefined} of {total} resamples "
                f"({n_undefined / total:.0%}) {lacking} and were left out")
    elif n_undefined:
        note = f"interval over {valid} of {total} resamples; {n_undefined} {lacking} and were left out"
    return _Interval(low, high, n_undefined, note)


def _z_test(diff: float, var: float) -> tuple[float | None, float | None]:
    """z = diff / sqrt(var) and its two-sided normal p; (None, None) for a zero variance."""
    if var <= 1e-15:
        return None, None
    z = diff / math.sqrt(var)
    return z, 2 * (1 - NormalDist().cdf(abs(z)))


# -- Public entries ----------------------------------------------------------------------

def _mean_note(defined: np.ndarray, with_interval: np.ndarray, bootstrapped: bool) -> str | None:
    """Why the mean AUROC is undefined or has no interval; None when it has a bootstrap one."""
    if not defined.any():
        return "undefined: no class has both positives and negatives"
    if not with_interval.any():
        return f"no interval: no class has at least {MIN_PER_SIDE} positives and negatives"
    if not bootstrapped:
        return "no interval: bootstrap turned off (0 resamples)"
    return None


def _checked_and_resampled(targets: np.ndarray, score_sets: Sequence[np.ndarray],
                           class_names: Sequence[str], resamples: int, level: float, seed: int
                           ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None, int]:
    """The checked inputs of `auroc_intervals` / `paired_comparison` without the rows of
    non-finite scores, the (resamples, K) bootstrap AUROCs of every score set on the same
    resamples (None without resamples), and how many rows were left out."""
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0 (0 turns the bootstrap off), got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    targets, score_sets = _check_inputs(targets, score_sets, class_names)
    keep = np.ones(len(targets), dtype=bool)
    for scores in score_sets:  # an image that failed to load has NaN scores
        keep &= np.isfinite(scores).all(axis=1)
    targets, score_sets = targets[keep], [scores[keep] for scores in score_sets]
    boots = (bootstrap_aurocs(targets, score_sets, resamples, seed)
             if resamples and len(targets) else None)
    return targets, score_sets, boots, int((~keep).sum())


def auroc_intervals(targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """95% intervals of each class's AUROC (bootstrap and DeLong) and of the mean AUROC.

    Returns JSON-ready data: ``classes[name]`` holds auroc, ci_low, ci_high, delong_se,
    delong_low, delong_high, n_pos, n_neg, n_undefined_resamples and note; ``mean`` holds
    auroc, ci_low, ci_high, n_classes, n_undefined_resamples and note; plus the settings and
    the method descriptions. Undefined values are None and ``note``
    says why (or that resamples were left out). ``resamples=0`` keeps DeLong and skips the
    bootstrap.
    """
    targets, (probs,), boots, n_dropped = _checked_and_resampled(
        targets, [probs], class_names, resamples, level, seed)
    n = len(targets)
    z = NormalDist().inv_cdf(0.5 + level / 2)  # two-sided: 1.96 for 0.95
    boot = boots[0] if boots is not None else None

    classes: dict[str, dict[str, Any]] = {}
    point = np.full(len(class_names), np.nan)
    with_interval = np.zeros(len(class_names), dtype=bool)
    for k, name in enumerate(class_names):
        n_pos = int(targets[:, k].sum())
        n_neg = n - n_pos
        note = _class_counts_note(n_pos, n_neg, n)
        row: dict[str, Any] = dict(auroc=None, ci_low=None, ci_high=None, delong_se=None,
                                   delong_low=None, delong_high=None, n_pos=n_pos, n_neg=n_neg,
                                   n_undefined_resamples=None)
        if n_pos and n_neg:
            auc = delong_components(targets[:, k], probs[:, k])[0]
            point[k] = auc[0]
            row["auroc"] = float(auc[0])
            if boot is not None:
                row["n_undefined_resamples"] = int((~np.isfinite(boot[:, k])).sum())
            if note is None:
                cov = delong_covariance(targets[:, k], probs[:, k][None])[1]
                se = math.sqrt(max(float(cov[0, 0]), 0.0))
                low, high = delong_interval(float(auc[0]), se, z)
                row.update(delong_se=se, delong_low=low, delong_high=high)
                with_interval[k] = True
                if boot is None:
                    note = "no bootstrap interval: bootstrap turned off (0 resamples)"
                else:
                    iv = _bootstrap_interval(boot[:, k], level, "the class")
                    row.update(ci_low=iv.low, ci_high=iv.high)
                    note = iv.note
        classes[name] = {**row, "note": note}

    defined = np.isfinite(point)
    mean: dict[str, Any] = dict(auroc=float(point[defined].mean()) if defined.any() else None,
                                ci_low=None, ci_high=None, n_classes=int(defined.sum()),
                                n_undefined_resamples=None,
                                note=_mean_note(defined, with_interval, boot is not None))
    if mean["note"] is None:
        # NaN in a resample where any class defined in the full set is undefined, so every
        # mean that is kept averages the same classes.
        iv = _bootstrap_interval(boot[:, defined].mean(axis=1), level, "some class")
        mean.update(ci_low=iv.low, ci_high=iv.high, n_undefined_resamples=iv.n_undefined,
                    note=iv.note)

    return {
        "level": level, "n_resamples": int(resamples), "seed": int(seed), "n_images": n,
        "n_dropped": n_dropped,
        "bootstrap": BOOTSTRAP_METHOD, "delong": DELONG_METHOD,
        "classes": classes, "mean": mean,
    }


def _bootstrap_p(diffs: np.ndarray) -> float | None:
    """Two-sided p-value from paired bootstrap differences (the percentile interval inverted).

    The smallest two-sided level at which the percentile interval of the difference leaves
    out 0, with the +1 correction so it is never 0: 2 min(#{d <= 0} + 1, #{d >= 0} + 1) / (B + 1),
    over the B resamples where the difference is defined.
    """
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return None
    b = diffs.size
    tail = min((diffs <= 0).sum() + 1, (diffs >= 0).sum() + 1) / (b + 1)
    return float(min(1.0, 2 * tail))


def paired_comparison(targets: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray,
                      class_names: Sequence[str], resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """A minus B on the same images: per class and mean AUROC difference, paired bootstrap CI and p.

    Per class also DeLong's paired z test. JSON-ready like ``auroc_intervals``: ``classes[name]``
    holds auroc_a, auroc_b, diff, ci_low, ci_high, p_bootstrap, delong_z, delong_p, n_pos,
    n_neg, n_undefined_resamples, note; ``mean`` holds auroc_a, auroc_b, diff, ci_low,
    ci_high, p_bootstrap, n_classes, n_undefined_resamples, note. Both runs see the same
    resamples and leave out the same ones.
    """
    targets, (probs_a, probs_b), boot, n_dropped = _checked_and_resampled(
        targets, [probs_a, probs_b], class_names, resamples, level, seed)
    n = len(targets)

    classes: dict[str, dict[str, Any]] = {}
    point = np.full((2, len(class_names)), np.nan)
    with_interval = np.zeros(len(class_names), dtype=bool)
    for k, name in enumerate(class_names):
        n_pos = int(targets[:, k].sum())
        n_neg = n - n_pos
        note = _class_counts_note(n_pos, n_neg, n)
        row: dict[str, Any] = dict(auroc_a=None, auroc_b=None, diff=None, ci_low=None,
                                   ci_high=None, p_bootstrap=None, delong_z=None, delong_p=None,
                                   n_pos=n_pos, n_neg=n_neg, n_undefined_resamples=None)
        if n_pos and n_neg:
            pair = np.stack([probs_a[:, k], probs_b[:, k]])
            auc = delong_components(targets[:, k], pair)[0]
            point[:, k] = auc
            row.update(auroc_a=float(auc[0]), auroc_b=float(auc[1]), diff=float(auc[0] - auc[1]))
            if boot is not None:
                row["n_undefined_resamples"] = int((~np.isfinite(boot[0][:, k])).sum())
            if note is None:
                cov = delong_covariance(targets[:, k], pair)[1]
                with_interval[k] = True
                row["delong_z"], row["delong_p"] = _z_test(
                    float(auc[0] - auc[1]), float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
                if row["delong_z"] is None:
                    note = "DeLong test undefined: the difference has zero variance"
                if boot is not None:
                    d = boot[0][:, k] - boot[1][:, k]
                    iv = _bootstrap_interval(d, level, "the class")
                    row.update(ci_low=iv.low, ci_high=iv.high)
                    if iv.low is not None:
                        row["p_bootstrap"] = _bootstrap_p(d)
                    note = "; ".join(n for n in (note, iv.note) if n) or None
        classes[name] = {**row, "note": note}

    defined = np.isfinite(point[0])
    mean: dict[str, Any] = dict(auroc_a=None, auroc_b=None, diff=None, ci_low=None, ci_high=None,
                                p_bootstrap=None, n_classes=int(defined.sum()),
                                n_undefined_resamples=None,
                                note=_mean_note(defined, with_interval, boot is not None))
    if defined.any():
        a, b = point[0, defined].mean(), point[1, defined].mean()
        mean.update(auroc_a=float(a), auroc_b=float(b), diff=float(a - b))
    if mean["note"] is None:
        d = boot[0][:, defined].mean(axis=1) - boot[1][:, defined].mean(axis=1)
        iv = _bootstrap_interval(d, level, "some class")
        mean.update(ci_low=iv.low, ci_high=iv.high, n_undefined_resamples=iv.n_undefined,
                    note=iv.note)
        if iv.low is not None:
            mean["p_bootstrap"] = _bootstrap_p(d)

    return {
        "level": level, "n_resamples": int(resamples), "seed": int(seed), "n_images": n,
        "n_dropped": n_dropped,
        "bootstrap": "paired " + BOOTSTRAP_METHOD + "; p-value: the interval inverted",
        "delong": "DeLong paired z test (per class)",
        "classes": classes, "mean": mean,
    }
