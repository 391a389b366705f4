"""Multi-label metrics: per-class AUROC / AUPRC and their means, robust to one-valued classes."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def binary_auroc(target: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN if one class only."""
    target = np.asarray(target).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(target.sum())
    n_neg = target.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    from scipy.stats import rankdata  # here, not at the top: every command starts without scipy

    ranks = rankdata(score)  # average ranks: ties count one half
    return float((ranks[target].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray,
                       class_names: Sequence[str], warn_undefined: bool = True) -> dict:
    """Per-class AUROC and AUPRC by class name, and their means over the defined classes.

    A class whose targets are all 0 (or all 1), or whose scores hold NaN, has no AUROC: it
    gets NaN, a warning saying which of the two (unless ``warn_undefined`` is False, e.g.
    when the caller said so once already), and is left out of the mean.
    """
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if targets.shape != probs.shape or targets.ndim != 2 or targets.shape[1] != len(class_names):
        raise ValueError(f"targets {targets.shape} and probs {probs.shape} must both be "
                         f"(N, {len(class_names)})")
    from sklearn.metrics import average_precision_score  # here: commands start without sklearn

    auroc, auprc = {}, {}
    for k, name in enumerate(class_names):
        auroc[name] = binary_auroc(targets[:, k], probs[:, k])
        if math.isnan(auroc[name]):
            if warn_undefined:
                n_nan = int(np.isnan(probs[:, k]).sum())
                why = (f"NaN scores for {n_nan} of the {len(targets)} evaluated images" if n_nan
                       else f"a single label value in the {len(targets)} evaluated images")
                logger.warning("class %r has %s: AUROC undefined (NaN), left out of the mean",
                               name, why)
            auprc[name] = math.nan
        else:
            auprc[name] = float(average_precision_score(targets[:, k], probs[:, k]))
    defined = [v for v in auroc.values() if not math.isnan(v)]
    defined_pr = [v for v in auprc.values() if not math.isnan(v)]
    return {
        "auroc": auroc,
        "auprc": auprc,
        "mean_auroc": float(np.mean(defined)) if defined else math.nan,
        "mean_auprc": float(np.mean(defined_pr)) if defined_pr else math.nan,
    }
