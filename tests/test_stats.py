"""util.stats: the fast bootstrap against a slow loop, DeLong against O(n^2) sums."""
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


def stratum_members(targets, stratum_of=None):
    """Images of each stratum in draw order (strata by id, members in image order); one by default."""
    if stratum_of is None:
        return [np.arange(len(targets))]
    return [np.flatnonzero(stratum_of == s) for s in np.unique(stratum_of)]


def slow_bootstrap(targets, scores, resamples, seed, stratum_of=None, auroc=sklearn_auroc):
    """The documented draw, written as a plain loop, one AUROC call per class: (B, K), NaN where undefined."""
    members = stratum_members(targets, stratum_of)
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


def pattern_ids(targets):
    """Each image's label-pattern number (np.unique order): strata that keep too little variance."""
    return np.unique(targets, axis=0, return_inverse=True)[1].ravel()


@pytest.mark.parametrize("k", [3, 6])
def test_bootstrap_matches_slow_loop(k):
    names = list("abcdef")[:k]
    targets, scores = data(k=k)
    (fast,) = stats.bootstrap_aurocs(targets, [scores], resamples=40, seed=7)
    slow = slow_bootstrap(targets, scores, 40, seed=7)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))  # the same left-out resamples
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    # The block size only groups the work: the same draws.
    (small_blocks,) = stats.bootstrap_aurocs(targets, [scores], resamples=40, seed=7, block=3)
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
    assert "unstratified" in res["bootstrap"]
    other = stats.auroc_intervals(targets, scores, names, resamples=40, seed=8)
    assert other["mean"]["ci_low"] != res["mean"]["ci_low"]  # the seed matters


def test_given_strata_are_resampled_within():
    targets, scores = data(n=80, k=5, seed=1)
    ids = pattern_ids(targets)
    strata = stats.Strata.from_ids(ids)
    assert strata.n_strata == len(np.unique(ids)) > 5
    (fast,) = stats.bootstrap_aurocs(targets, [scores], 30, seed=2, strata=strata)
    slow = slow_bootstrap(targets, scores, 30, seed=2, stratum_of=ids)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12, equal_nan=True)
    for counts in stats.resample_counts(strata, resamples=20, seed=0, block=8):
        assert counts.sum(axis=0).tolist() == [len(targets)] * counts.shape[1]
        # Images never leave their stratum: each stratum's total stays its size.
        for start in np.unique(strata.slot_start):
            rows = strata.slot_start == start
            assert (counts[rows].sum(axis=0) == rows.sum()).all()
    whole = stats.Strata.whole(len(targets))
    assert whole.n_strata == 1 and whole.order.tolist() == list(range(len(targets)))
    with pytest.raises(ValueError, match="strata cover 79 images, targets 80"):
        stats.bootstrap_aurocs(targets, [scores], 5, strata=stats.Strata.whole(79))


def small_pattern_case(seed=0):
    """40 positives of class 0 in 20 label patterns of 2 images (the other 5 classes spell the
    pattern), 200 negatives; two correlated, equally good binormal score sets."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((240, 6), dtype=int)
    targets[:40, 0] = 1
    targets[:40, 1:] = (np.repeat(np.arange(1, 21), 2)[:, None] >> np.arange(5)) & 1
    noise = rng.normal(size=240)
    a = 1.2 * targets[:, 0] + noise
    b = 1.2 * targets[:, 0] + 0.5 * noise + math.sqrt(0.75) * rng.normal(size=240)
    return targets, np.repeat(a[:, None], 6, 1), np.repeat(b[:, None], 6, 1)


def test_class_in_small_label_patterns_keeps_its_variance():
    """Strata of whole label patterns kept ~half the positives' variance (SD / SE ~0.7);
    the unstratified draw keeps all of it (~1), for the interval and for the paired test."""
    targets, a, b = small_pattern_case()
    assert len(np.unique(targets[:40], axis=0)) == 20
    auc, cov = stats.delong_covariance(targets[:, 0], np.stack([a[:, 0], b[:, 0]]))
    se, se_diff = math.sqrt(cov[0, 0]), math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    boot_a, boot_b = stats.bootstrap_aurocs(targets, [a, b], 2000, seed=0)
    assert boot_a[:, 0].std() / se > 0.9
    assert (boot_a - boot_b)[:, 0].std() / se_diff > 0.9
    old_a, old_b = stats.bootstrap_aurocs(targets, [a, b], 2000, seed=0,
                                          strata=stats.Strata.from_ids(pattern_ids(targets)))
    assert old_a[:, 0].std() / se < 0.8 and (old_a - old_b)[:, 0].std() / se_diff < 0.85
    # The reports' interval is as wide as DeLong's.
    names = [f"c{k}" for k in range(6)]
    row = stats.auroc_intervals(targets, a, names, resamples=2000)["classes"]["c0"]
    assert 0.9 < (row["ci_high"] - row["ci_low"]) / (row["delong_high"] - row["delong_low"]) < 1.15
    cmp = stats.paired_comparison(targets, a, b, names, resamples=2000)["classes"]["c0"]
    assert 0.9 < (cmp["ci_high"] - cmp["ci_low"]) / (2 * 1.96 * se_diff) < 1.15


def test_small_classes_are_named_in_a_note():
    targets, scores = data(n=200, k=3, seed=9)
    targets[:, 2] = 0
    targets[:25, 2] = 1
    res = stats.auroc_intervals(targets, scores, ["big", "mid", "small"], resamples=0)
    assert [r["n_pos"] for r in res["classes"].values()][2] == 25
    assert min(res["classes"]["big"]["n_pos"], res["classes"]["mid"]["n_pos"]) > 30
    note = stats.small_class_note(res["classes"])
    assert note.startswith("small: 30 or fewer positives") and "under-cover" in note
    targets[:, 2] = 0
    targets[:31, 2] = 1
    assert stats.small_class_note(stats.auroc_intervals(
        targets, scores, ["big", "mid", "small"], resamples=0)["classes"]) is None


def rare_positive_targets():
    """Class c has 2 positives among 60 images: a resample lacks both with probability
    (58/60)^60, ~13%; a and b have 28 and 30."""
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
    # On the logit scale: ln 5 +- 1.959964 * sqrt(1/18) / (5/36), mapped back.
    se_logit = math.sqrt(1 / 18) / (5 / 36)
    assert row["delong_low"] == pytest.approx(1 / (1 + math.exp(-(math.log(5) - 1.959964 * se_logit))),
                                              abs=1e-6)
    assert row["delong_high"] == pytest.approx(1 / (1 + math.exp(-(math.log(5) + 1.959964 * se_logit))),
                                               abs=1e-6)
    assert 0.15 < row["delong_low"] < 0.16 and 0.99 < row["delong_high"] < 1  # inside (0, 1)
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

    # 4 images: resamples without a positive or a negative of a class are counted, never NaN.
    uniq_t = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    uniq = stats.auroc_intervals(uniq_t, np.eye(4)[:, :2], ["a", "b"], resamples=40, seed=1)
    json.dumps(uniq, allow_nan=False)
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
    bench = load_bench()
    result = bench.main(["--images", "400", "--classes", "5", "--resamples", "30", "--naive", "4",
                         "--repeats", "1"])
    assert result["naive_equals_ours"] is True
    assert result["ours_s"] > 0


def load_bench():
    """bench/bench_stats.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_stats.py"
    spec = importlib.util.spec_from_file_location("bench_stats", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_simulation_jackknife_and_tables():
    """The simulation's leave-one-out AUROCs equal recomputed ones; its tables are shares."""
    bench = load_bench()
    targets, scores = data(n=50, k=2, seed=11, decimals=2)
    auc, jack = bench.jackknife_aurocs(targets, scores)
    for i in (0, 7, 31):
        keep = np.arange(50) != i
        for k in range(2):
            assert jack[i, k] == pytest.approx(pairs_auroc(targets[keep, k], scores[keep, k]), abs=1e-12)
    assert auc == pytest.approx([pairs_auroc(targets[:, k], scores[:, k]) for k in range(2)])
    result = bench.main(["--simulate", "--repetitions", "3", "--resamples", "40", "--workers", "1"])
    assert len(result["sets"]) == 2
    for s in result["sets"].values():
        assert s["rows"][-1] == "mean AUROC" and len(s["rows"]) == len(s["positives"]) + 1
        assert s["covered label"][-1] is None and s["covered plain"][-1] is not None
        for key, values in s.items():
            if key.startswith(("covered", "rejected")):
                assert all(v is None or v in (0.0, 33.3, 66.7, 100.0) for v in values), key
