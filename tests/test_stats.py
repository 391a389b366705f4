"""util.stats: the fast stratified bootstrap against a slow loop, DeLong against O(n^2) sums."""
import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from util import stats


def data(n=60, k=3, seed=0, decimals=1):
    """Multi-label targets and scores with many ties (scores rounded)."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < [0.3, 0.5, 0.15][:k]).astype(int)
    scores = np.round(rng.random((n, k)) * 0.7 + 0.3 * targets, decimals)
    return targets, scores


def slow_bootstrap(targets, scores, resamples, seed):
    """The documented draw, written as a plain loop, scored with sklearn: (B, K) AUROCs."""
    patterns, inverse = np.unique(targets, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    members = [np.flatnonzero(inverse == s) for s in range(len(patterns))]
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, targets.shape[1]))
    for b in range(resamples):
        u = rng.random(len(targets))
        picks, slot = [], 0
        for m in members:
            for _ in m:
                picks.append(m[int(u[slot] * len(m))])
                slot += 1
        picks = np.array(picks)
        for k in range(targets.shape[1]):
            out[b, k] = roc_auc_score(targets[picks, k], scores[picks, k])
    return out


def test_bootstrap_matches_slow_loop():
    targets, scores = data()
    (fast,), strata = stats.bootstrap_aurocs(targets, [scores], resamples=40, seed=7)
    slow = slow_bootstrap(targets, scores, 40, seed=7)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert strata.n_strata == len(np.unique(targets, axis=0))
    # The block size only groups the work: the same draws.
    (small_blocks,), _ = stats.bootstrap_aurocs(targets, [scores], resamples=40, seed=7, block=3)
    np.testing.assert_array_equal(small_blocks, fast)
    # The interval is the percentile interval of those resamples; the mean is joint.
    res = stats.auroc_intervals(targets, scores, ["a", "b", "c"], resamples=40, seed=7)
    low, high = np.percentile(slow[:, 1], [2.5, 97.5])
    assert res["classes"]["b"]["ci_low"] == pytest.approx(low, abs=1e-12)
    assert res["classes"]["b"]["ci_high"] == pytest.approx(high, abs=1e-12)
    mlow, mhigh = np.percentile(slow.mean(axis=1), [2.5, 97.5])
    assert (res["mean"]["ci_low"], res["mean"]["ci_high"]) == pytest.approx((mlow, mhigh), abs=1e-12)
    assert res["n_resamples"] == 40 and res["seed"] == 7
    other = stats.auroc_intervals(targets, scores, ["a", "b", "c"], resamples=40, seed=8)
    assert other["mean"]["ci_low"] != res["mean"]["ci_low"]  # the seed matters


def test_resamples_keep_every_class_positives():
    targets, _ = data(n=80, k=3, seed=1)
    strata = stats.Strata.from_targets(targets)
    t = targets[strata.order]
    for counts in stats.resample_counts(strata, resamples=20, seed=0, block=8):
        assert counts.sum(axis=0).tolist() == [len(targets)] * counts.shape[1]
        np.testing.assert_array_equal(t.T @ counts, np.repeat(t.sum(0)[:, None], counts.shape[1], 1))
        # Images never leave their stratum: each stratum's total stays its size.
        for start in np.unique(strata.slot_start):
            rows = strata.slot_start == start
            assert (counts[rows].sum(axis=0) == rows.sum()).all()


def delong_reference(target, scores):
    """DeLong's covariance by the O(n^2) definition (psi = 1, 1/2, 0)."""
    target = np.asarray(target).astype(bool)
    v10, v01, aucs = [], [], []
    for s in scores:
        x, y = s[target], s[~target]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    m, n = v10.shape[1], v01.shape[1]
    s10 = (v10 - v10.mean(1, keepdims=True)) @ (v10 - v10.mean(1, keepdims=True)).T / (m - 1)
    s01 = (v01 - v01.mean(1, keepdims=True)) @ (v01 - v01.mean(1, keepdims=True)).T / (n - 1)
    return np.array(aucs), s10 / m + s01 / n


def test_delong_matches_quadratic_reference():
    rng = np.random.default_rng(3)
    for trial in range(5):
        n = int(rng.integers(10, 120))
        target = rng.random(n) < 0.3
        target[:2], target[2:4] = True, False
        a = np.round(rng.random(n) + target, 1)  # ties within and across classes
        b = np.round(0.5 * a + rng.random(n), 2)
        auc, cov = stats.delong_covariance(target, np.stack([a, b]))
        ref_auc, ref_cov = delong_reference(target, [a, b])
        np.testing.assert_allclose(auc, ref_auc, atol=1e-12)
        np.testing.assert_allclose(cov, ref_cov, atol=1e-12)


def test_delong_hand_computed():
    # Positives 0.8, 0.6, 0.4; negatives 0.5, 0.3. psi rows: [1, 1], [1, 1], [0, 1].
    # AUROC 5/6; V10 = [1, 1, 1/2] (var 1/12); V01 = [2/3, 1] (var 1/18);
    # Var = (1/12)/3 + (1/18)/2 = 1/18.
    target = np.array([1, 1, 1, 0, 0])
    score = np.array([0.8, 0.6, 0.4, 0.5, 0.3])
    auc, cov = stats.delong_covariance(target, score[None])
    assert auc[0] == pytest.approx(5 / 6)
    assert cov[0, 0] == pytest.approx(1 / 18)
    res = stats.auroc_intervals(target, score, ["x"], resamples=0)
    row = res["classes"]["x"]
    assert row["delong_se"] == pytest.approx(math.sqrt(1 / 18))
    assert row["delong_low"] == pytest.approx(5 / 6 - 1.959964 * math.sqrt(1 / 18), abs=1e-6)
    assert row["delong_high"] == 1.0  # clipped
    assert row["ci_low"] is None and "bootstrap turned off" in row["note"]
    # Paired, by hand: B ranks the 0.4 positive above both negatives -> AUROC 1.
    # V10_B = [1, 1, 1], V01_B = [1, 1]: zero variance, so Var(A - B) = Var(A) = 1/18.
    other = np.array([0.8, 0.6, 0.55, 0.5, 0.3])
    cmp = stats.paired_comparison(target, score, other, ["x"], resamples=0)["classes"]["x"]
    assert cmp["diff"] == pytest.approx(-1 / 6)
    assert cmp["delong_z"] == pytest.approx((-1 / 6) / math.sqrt(1 / 18))


def test_paired_comparison_against_references():
    targets, a = data(n=90, k=2, seed=4, decimals=2)
    b = np.clip(a + np.random.default_rng(5).normal(0, 0.2, a.shape), 0, 1)
    res = stats.paired_comparison(targets, a, b, ["p", "q"], resamples=60, seed=2)
    slow_a = slow_bootstrap(targets, a, 60, seed=2)
    slow_b = slow_bootstrap(targets, b, 60, seed=2)
    d = slow_a[:, 0] - slow_b[:, 0]
    row = res["classes"]["p"]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.percentile(d, [2.5, 97.5])))
    expected_p = min(1.0, 2 * min((d <= 0).sum() + 1, (d >= 0).sum() + 1) / 61)
    assert row["p_bootstrap"] == pytest.approx(expected_p)
    auc, cov = delong_reference(targets[:, 0], [a[:, 0], b[:, 0]])
    z = (auc[0] - auc[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert row["delong_z"] == pytest.approx(z)
    assert row["delong_p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    dm = slow_a.mean(1) - slow_b.mean(1)
    assert res["mean"]["ci_low"] == pytest.approx(np.percentile(dm, 2.5))
    diffs = [res["classes"][c]["diff"] for c in ("p", "q")]
    assert res["mean"]["diff"] == pytest.approx(np.mean(diffs))
    # A run against itself: difference 0, interval [0, 0], DeLong undefined and said so.
    same = stats.paired_comparison(targets, a, a, ["p", "q"], resamples=20)
    assert same["classes"]["p"]["diff"] == 0 and same["classes"]["p"]["ci_high"] == 0
    assert same["classes"]["p"]["delong_p"] is None and "zero variance" in same["classes"]["p"]["note"]
    assert same["mean"]["p_bootstrap"] == 1.0


def test_degenerate_cases_are_explicit_not_nan():
    names = ["Mass", "Hernia", "Flat"]
    targets, scores = data(n=40, k=3, seed=6)
    targets[:, 1] = 0          # Hernia: no positive in the set
    scores[:, 2] = 0.5         # Flat: every score tied
    scores[3, 0] = np.nan      # an image without a prediction is left out
    res = stats.auroc_intervals(targets, scores, names, resamples=30)
    json.dumps(res, allow_nan=False)  # no NaN anywhere
    hernia = res["classes"]["Hernia"]
    assert hernia["auroc"] is None and hernia["ci_low"] is None and hernia["delong_se"] is None
    assert "only negatives" in hernia["note"]
    flat = res["classes"]["Flat"]
    assert flat["auroc"] == 0.5 and flat["delong_se"] == 0.0
    assert flat["ci_low"] == flat["ci_high"] == 0.5
    assert res["n_images"] == 39 and res["n_dropped"] == 1
    assert res["mean"]["n_classes"] == 2 and res["mean"]["ci_low"] is not None
    assert res["mean"]["auroc"] == pytest.approx((res["classes"]["Mass"]["auroc"] + 0.5) / 2)

    two = stats.auroc_intervals([[1], [0]], [0.9, 0.2], ["x"], resamples=10)
    json.dumps(two, allow_nan=False)
    assert two["classes"]["x"]["auroc"] == 1.0
    assert two["classes"]["x"]["ci_low"] is None and two["classes"]["x"]["delong_se"] is None
    assert "1 positive(s) and 1 negative(s)" in two["classes"]["x"]["note"]
    assert two["mean"]["auroc"] == 1.0 and two["mean"]["ci_low"] is None and two["mean"]["note"]

    # Every label pattern unique: the stratified bootstrap cannot vary, and says so.
    uniq = stats.auroc_intervals([[0, 0], [0, 1], [1, 0], [1, 1]], np.eye(4)[:, :2], ["a", "b"],
                                 resamples=10)
    assert uniq["mean"]["ci_low"] is None and "unique" in uniq["mean"]["note"]
    assert uniq["classes"]["a"]["delong_se"] is not None and "unique" in uniq["classes"]["a"]["note"]

    empty = stats.auroc_intervals(np.zeros((0, 1)), np.zeros((0, 1)), ["x"])
    assert empty["classes"]["x"]["auroc"] is None and empty["mean"]["auroc"] is None


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="must both be"):
        stats.auroc_intervals(np.zeros((4, 2)), np.zeros((4, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="0/1 labels"):
        stats.auroc_intervals(np.full((4, 1), 2), np.zeros((4, 1)), ["a"])
    with pytest.raises(ValueError, match="resamples"):
        stats.auroc_intervals(np.zeros((4, 1)), np.zeros((4, 1)), ["a"], resamples=-1)


def test_speed_benchmark_agrees_with_naive_loop():
    """bench/bench_stats.py's NIH-like data: the fast path equals the sklearn loop."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_stats.py"
    spec = importlib.util.spec_from_file_location("bench_stats", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--images", "400", "--classes", "5", "--resamples", "30", "--naive", "4",
                         "--repeats", "1"])
    assert result["naive_equals_ours"] is True
    assert result["ours_s"] > 0 and result["strata"] > 1
