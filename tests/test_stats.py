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
    targets = (rng.random((n, k)) < [0.3, 0.5, 0.15, 0.4, 0.2, 0.35][:k]).astype(int)
    scores = np.round(rng.random((n, k)) * 0.7 + 0.3 * targets, decimals)
    return targets, scores


def sklearn_auroc(target, score):
    """sklearn's AUROC, NaN when the labels hold a single value."""
    return roc_auc_score(target, score) if 0 < target.sum() < len(target) else np.nan


def pairs_auroc(target, score):
    """The AUROC by its O(n^2) definition, NaN when the labels hold a single value."""
    pos, neg = score[target == 1], score[target == 0]
    if not len(pos) or not len(neg):
        return np.nan
    return ((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)).mean()


def stratum_members(targets, pool_rare=True):
    """Images of each stratum in draw order: patterns in np.unique order, rare patterns pooled last.

    ``pool_rare=False`` gives the former draw, where an image with a unique pattern is a
    stratum of its own.
    """
    patterns, inverse = np.unique(targets, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    members = [np.flatnonzero(inverse == s) for s in range(len(patterns))]
    if not pool_rare:
        return members
    pool = [i for m in members if len(m) == 1 for i in m]
    return [m for m in members if len(m) > 1] + ([np.array(sorted(pool))] if pool else [])


def slow_bootstrap(targets, scores, resamples, seed, pool_rare=True, auroc=sklearn_auroc):
    """The documented draw, written as a plain loop, one AUROC call per class: (B, K), NaN where undefined."""
    members = stratum_members(targets, pool_rare)
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
            out[b, k] = auroc(targets[picks, k], scores[picks, k])
    return out


def plain_bootstrap(targets, scores, resamples, seed):
    """An unstratified bootstrap (n images drawn with replacement): (B, K), NaN where undefined."""
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, targets.shape[1]))
    for b in range(resamples):
        picks = rng.integers(0, len(targets), len(targets))
        for k in range(targets.shape[1]):
            out[b, k] = pairs_auroc(targets[picks, k], scores[picks, k])
    return out


def percentile_width(samples):
    """Width of the 95% percentile interval of the finite samples."""
    low, high = np.percentile(samples[np.isfinite(samples)], [2.5, 97.5])
    return high - low


@pytest.mark.parametrize("k", [3, 6])
def test_bootstrap_matches_slow_loop(k):
    # k=3: one rare image (a pool of one, fixed); k=6: a pool of 9 rare images.
    names = list("abcdef")[:k]
    targets, scores = data(k=k)
    (fast,), strata = stats.bootstrap_aurocs(targets, [scores], resamples=40, seed=7)
    slow = slow_bootstrap(targets, scores, 40, seed=7)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))  # the same left-out resamples
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    members = stratum_members(targets)
    assert strata.n_strata == len(members)
    counts = np.unique(targets, axis=0, return_counts=True)[1]
    assert strata.n_rare == (counts == 1).sum() and strata.n_fixed == int(strata.n_rare == 1)
    assert (strata.n_rare, strata.n_fixed) == ((1, 1) if k == 3 else (strata.n_rare, 0))
    assert k == 3 or strata.n_rare > 5
    # The block size only groups the work: the same draws.
    (small_blocks,), _ = stats.bootstrap_aurocs(targets, [scores], resamples=40, seed=7, block=3)
    np.testing.assert_array_equal(small_blocks, fast)
    # The interval is the percentile interval of those resamples; the mean is joint.
    res = stats.auroc_intervals(targets, scores, names, resamples=40, seed=7)
    low, high = np.percentile(slow[np.isfinite(slow[:, 1]), 1], [2.5, 97.5])
    assert res["classes"]["b"]["ci_low"] == pytest.approx(low, abs=1e-12)
    assert res["classes"]["b"]["ci_high"] == pytest.approx(high, abs=1e-12)
    means = slow.mean(axis=1)
    mlow, mhigh = np.percentile(means[np.isfinite(means)], [2.5, 97.5])
    assert (res["mean"]["ci_low"], res["mean"]["ci_high"]) == pytest.approx((mlow, mhigh), abs=1e-12)
    assert res["mean"]["n_undefined_resamples"] == int(np.isnan(means).sum())
    assert res["n_resamples"] == 40 and res["seed"] == 7
    assert res["n_strata"] == strata.n_strata and res["n_rare_images"] == strata.n_rare
    other = stats.auroc_intervals(targets, scores, names, resamples=40, seed=8)
    assert other["mean"]["ci_low"] != res["mean"]["ci_low"]  # the seed matters


def test_strata_pool_rare_patterns_last():
    targets, _ = data(n=80, k=5, seed=1)
    _, inverse, counts = np.unique(targets, axis=0, return_inverse=True, return_counts=True)
    rare = counts[inverse.ravel()] == 1
    strata = stats.Strata.from_targets(targets)
    assert 1 < strata.n_rare == rare.sum() and strata.n_fixed == 0
    assert strata.n_strata == (counts > 1).sum() + 1
    # The pool is the last stratum and holds exactly the rare images, in image order.
    pool = strata.slot_start == strata.slot_start[-1]
    assert strata.order[pool].tolist() == np.flatnonzero(rare).tolist()
    t = targets[strata.order]
    for counts_ in stats.resample_counts(strata, resamples=20, seed=0, block=8):
        assert counts_.sum(axis=0).tolist() == [len(targets)] * counts_.shape[1]
        # Images never leave their stratum: each stratum's total stays its size, so the
        # pattern strata give every resample the same positives; only the pool's vary.
        for start in np.unique(strata.slot_start):
            rows = strata.slot_start == start
            assert (counts_[rows].sum(axis=0) == rows.sum()).all()
        shared = t[~pool].T @ counts_[~pool]
        np.testing.assert_array_equal(shared, np.repeat(t[~pool].sum(0)[:, None], counts_.shape[1], 1))
    assert (counts_[pool] != 1).any()  # the pool is really resampled
    # A single rare image is a pool of one: the only image that stays in every resample.
    one = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [1, 0]])
    single = stats.Strata.from_targets(one)
    assert (single.n_strata, single.n_rare, single.n_fixed) == (3, 1, 1)
    assert single.order.tolist() == [0, 1, 2, 3, 4]


def test_small_many_class_set_gets_a_real_interval():
    """34 images x 14 classes, 29 with a unique pattern: the pool makes them vary again."""
    rng = np.random.default_rng(1)
    targets = (rng.random((34, 14)) < 0.35).astype(int)
    targets[29:31], targets[31:34] = 0, 1  # the only shared patterns
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=targets.shape) + 1.2 * targets))), 2)
    names = [f"c{k}" for k in range(14)]
    res = stats.auroc_intervals(targets, scores, names, resamples=300, seed=0)
    assert (res["n_rare_images"], res["n_fixed_images"], res["n_strata"]) == (29, 0, 3)
    mean = res["mean"]
    assert mean["ci_low"] < mean["auroc"] < mean["ci_high"]
    assert mean["n_undefined_resamples"] == 0 and mean["note"] is None
    width = mean["ci_high"] - mean["ci_low"]
    # The former draw (each rare image a stratum of its own, always drawn) on the same seed.
    old = slow_bootstrap(targets, scores, 300, seed=0, pool_rare=False, auroc=pairs_auroc)
    assert width > 3 * percentile_width(old.mean(axis=1))  # 0.076 against 0.021
    # Close to a plain unstratified bootstrap, which fixes no image.
    plain = plain_bootstrap(targets, scores, 300, seed=0)
    assert 0.6 < width / percentile_width(plain.mean(axis=1)) < 1.5
    for row in res["classes"].values():
        assert row["ci_low"] <= row["auroc"] <= row["ci_high"] and row["ci_high"] > row["ci_low"]


def rare_positive_targets():
    """Class c's only 2 positives have unique patterns; a and b live in shared strata.

    The pool is images 0-3 (2 positives of c among 4), so a resample lacks every c-positive
    with probability (1/2)^4.
    """
    targets = np.zeros((60, 3), dtype=int)
    targets[4::2, :2] = 1                   # (1, 1, 0) and (0, 0, 0), 28 images each
    targets[:4] = [[0, 0, 1], [1, 1, 1], [0, 1, 0], [1, 0, 0]]
    return targets


def test_class_with_only_rare_positives_counts_left_out_resamples():
    targets = rare_positive_targets()
    rng = np.random.default_rng(2)
    a = np.round(rng.random(targets.shape) * 0.7 + 0.3 * targets, 2)
    b = np.round(rng.random(targets.shape) * 0.7 + 0.3 * targets, 2)
    res = stats.auroc_intervals(targets, a, ["a", "b", "c"], resamples=400, seed=3)
    json.dumps(res, allow_nan=False)
    assert res["n_rare_images"] == 4
    slow = slow_bootstrap(targets, a, 400, seed=3, auroc=pairs_auroc)
    missing = int(np.isnan(slow[:, 2]).sum())
    assert missing > 0 and np.isfinite(slow[:, :2]).all()
    c = res["classes"]["c"]
    assert c["n_undefined_resamples"] == missing
    assert res["classes"]["a"]["n_undefined_resamples"] == 0 and res["classes"]["a"]["note"] is None
    assert (c["ci_low"], c["ci_high"]) == pytest.approx(
        tuple(np.percentile(slow[np.isfinite(slow[:, 2]), 2], [2.5, 97.5])), abs=1e-12)
    assert f"{missing} of 400 resamples" in c["note"]
    assert ("unreliable" in c["note"]) == (missing > 0.05 * 400)
    # The mean averages the same 3 classes in every kept resample: the same ones are left out.
    mean = res["mean"]
    assert mean["n_undefined_resamples"] == missing and f"{missing} of 400" in mean["note"]
    assert mean["ci_low"] == pytest.approx(np.percentile(np.nanmean(slow[np.isfinite(slow[:, 2])],
                                                                    axis=1), 2.5), abs=1e-12)
    # Paired: both runs see the same resamples and leave out the same ones.
    cmp = stats.paired_comparison(targets, a, b, ["a", "b", "c"], resamples=400, seed=3)
    json.dumps(cmp, allow_nan=False)
    slow_b = slow_bootstrap(targets, b, 400, seed=3, auroc=pairs_auroc)
    np.testing.assert_array_equal(np.isnan(slow_b[:, 2]), np.isnan(slow[:, 2]))
    d = (slow - slow_b)[:, 2]
    row = cmp["classes"]["c"]
    assert row["n_undefined_resamples"] == missing == cmp["mean"]["n_undefined_resamples"]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        tuple(np.percentile(d[np.isfinite(d)], [2.5, 97.5])), abs=1e-12)
    kept = d[np.isfinite(d)]
    expected_p = min(1.0, 2 * min((kept <= 0).sum() + 1, (kept >= 0).sum() + 1) / (kept.size + 1))
    assert row["p_bootstrap"] == pytest.approx(expected_p)


def test_mean_without_enough_defined_resamples_has_no_interval():
    # Classes b, c, d each have one positive, on its own rare image: each is missing from
    # about 30% of the resamples, all three present in about 22%, so the mean (which must
    # average the same 4 classes) has fewer than half of its resamples left: no interval.
    targets = np.zeros((40, 4), dtype=int)
    targets[::2, 0] = 1
    targets[[1, 3, 5], [1, 2, 3]] = 1
    scores = np.round(np.random.default_rng(4).random(targets.shape) * 0.7 + 0.3 * targets, 2)
    res = stats.auroc_intervals(targets, scores, list("abcd"), resamples=200, seed=0)
    json.dumps(res, allow_nan=False)
    slow = slow_bootstrap(targets, scores, 200, seed=0, auroc=pairs_auroc)
    left_out = int(np.isnan(slow).any(axis=1).sum())
    assert left_out > 100
    mean = res["mean"]
    assert mean["auroc"] is not None and mean["n_classes"] == 4
    assert mean["ci_low"] is None and mean["ci_high"] is None
    assert mean["n_undefined_resamples"] == left_out
    assert mean["note"].startswith("no interval") and f"{left_out} of 200" in mean["note"]
    assert res["classes"]["a"]["ci_low"] is not None and res["classes"]["b"]["ci_low"] is None
    assert res["classes"]["b"]["n_undefined_resamples"] == int(np.isnan(slow[:, 1]).sum())
    cmp = stats.paired_comparison(targets, scores, scores[::-1], list("abcd"), resamples=200)
    assert cmp["mean"]["ci_low"] is None and cmp["mean"]["p_bootstrap"] is None
    assert cmp["mean"]["note"].startswith("no interval")


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

    # Every label pattern unique: one pooled stratum, a plain bootstrap of the 4 images;
    # resamples without a positive or a negative of a class are counted, never NaN.
    uniq_t = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    uniq = stats.auroc_intervals(uniq_t, np.eye(4)[:, :2], ["a", "b"], resamples=40, seed=1)
    json.dumps(uniq, allow_nan=False)
    assert (uniq["n_strata"], uniq["n_rare_images"], uniq["n_fixed_images"]) == (1, 4, 0)
    slow = slow_bootstrap(uniq_t, np.eye(4)[:, :2], 40, seed=1)
    assert uniq["classes"]["a"]["n_undefined_resamples"] == int(np.isnan(slow[:, 0]).sum()) > 0
    assert uniq["mean"]["n_undefined_resamples"] == int(np.isnan(slow).any(axis=1).sum())
    assert "left out" in uniq["classes"]["a"]["note"] and uniq["classes"]["a"]["ci_low"] is not None

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
