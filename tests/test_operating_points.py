"""Operating points: thresholds chosen on validation (hand-checked, never from test labels),
test metrics against hand counts, Wilson and bootstrap intervals, predict.py --threshold."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from _fakes import trained_checkpoint
from scipy.special import expit

import checkpoints as ckpt
import evaluation
import predict
from datasets import build_dataset, build_transform, make_demo_dataset
from util import operating_points as op
from util.runfolder import RunFolder

# Twenty validation images, scores 20 (highest) .. 1, P = N = 10. Read down the list:
# true positives / false positives when calling every score >= s positive.
SCORES = np.arange(20, 0, -1).astype(float)
LABELS = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0])
# By hand:  score 12: tp 7 fp 2, J = 0.5 (as at 10: tp 8 fp 3; the higher wins);
# sens >= .90 first at score 7 (tp 9); >= .95 at 4 (tp 10);
# spec >= .90 (fp <= 1) last at 15; >= .95 (fp = 0) last at 18.
HAND = {"youden": (12.0, 0.7, 0.8), "sens90": (7.0, 0.9, 0.5), "sens95": (4.0, 1.0, 0.3),
        "spec90": (15.0, 0.5, 0.9), "spec95": (18.0, 0.3, 1.0)}


@pytest.mark.parametrize("kind", op.THRESHOLD_KINDS)
def test_thresholds_equal_hand_chosen_ones(kind):
    chosen = op.choose_threshold(SCORES, LABELS, kind)
    threshold, sens, spec = HAND[kind]
    assert chosen == {"threshold": threshold, "sensitivity": pytest.approx(sens),
                      "specificity": pytest.approx(spec)}
    # Any increasing map of the scores (a sigmoid, a temperature) picks the same images.
    mapped = op.choose_threshold(expit((SCORES - 10) / 3), LABELS, kind)
    assert mapped["threshold"] == pytest.approx(expit((threshold - 10) / 3))


def test_thresholds_keep_ties_together_and_say_when_there_is_none():
    # A tie of a positive and a negative at the top: calling only the top positive is impossible.
    scores, labels = np.array([5.0, 5.0, 4.0, 3.0]), np.array([1, 0, 1, 0])
    assert op.choose_threshold(scores, labels, "youden")["threshold"] == 4.0
    none = op.choose_threshold(np.array([9.0, 5.0, 4.0, 3.0]), np.array([0, 1, 0, 0]), "spec95")
    assert none["threshold"] is None and "every validation image negative" in none["note"]
    single = op.choose_threshold(np.array([1.0, 2.0]), np.array([0, 0]), "youden")
    assert single["threshold"] is None and "single label value" in single["note"]
    with pytest.raises(ValueError, match="NaN"):
        op.choose_threshold(np.array([1.0, np.nan]), np.array([0, 1]), "youden")


def test_metrics_equal_hand_counts_and_wilson_intervals():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])[:, None]
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0])[:, None]
    table = op.operating_point_metrics(scores, labels, {"youden": {"a": 0.6}, "spec90": {"a": None}},
                                       ["a"], resamples=0)
    row = table["youden"]["a"]
    # >= 0.6 called positive: tp 3 (0.9 0.8 0.6), fp 1 (0.7), fn 1 (0.4), tn 3.
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (3, 1, 1, 3)
    assert row["sensitivity"] == 0.75 and row["specificity"] == 0.75
    assert row["ppv"] == 0.75 and row["npv"] == 0.75 and row["f1"] == pytest.approx(0.75)
    assert (row["sensitivity_low"], row["sensitivity_high"]) == op.wilson_interval(3, 4)
    assert row["f1_low"] is None  # no resamples, no F1 interval
    assert table["spec90"]["a"] == {"threshold": None}
    # Published Wilson 95% intervals: 8 of 10 -> [0.4902, 0.9433]; 0 of 10 -> [0, 0.2775].
    assert op.wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert op.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert op.wilson_interval(0, 0) == (None, None)


def test_f1_interval_equals_a_plain_bootstrap_loop():
    rng = np.random.default_rng(4)
    labels = (rng.random((40, 2)) < 0.4).astype(int)
    scores = labels + rng.normal(0, 0.8, (40, 2))
    thresholds = {"youden": {"a": 0.5, "b": 0.2}}
    table = op.operating_point_metrics(scores, labels, thresholds, ["a", "b"], resamples=200, seed=0)
    draws = np.random.default_rng(0)  # the draw util.stats documents: image floor(u * n)
    f1 = {"a": [], "b": []}
    for _ in range(200):
        pick = (draws.random(40) * 40).astype(int)
        for k, (name, t) in enumerate(thresholds["youden"].items()):
            call, y = scores[pick, k] >= t, labels[pick, k] == 1
            tp, fp, fn = (call & y).sum(), (call & ~y).sum(), (~call & y).sum()
            f1[name].append(2 * tp / (2 * tp + fp + fn))
    for name in ("a", "b"):
        low, high = np.percentile(f1[name], [2.5, 97.5])
        assert table["youden"][name]["f1_low"] == pytest.approx(low)
        assert table["youden"][name]["f1_high"] == pytest.approx(high)


# ---------------------------------------------------------------------------------------
# Through the test report and predict.py
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny checkpoint whose test stored a calibration fitted on the validation split."""
    root = tmp_path_factory.mktemp("thresholds")
    stem, mrm = trained_checkpoint(root)
    data = make_demo_dataset(root / "demo", num_images=96, image_size=64, seed=3)
    results = run_test(stem, data, root / "report")
    return {"root": root, "stem": stem, "mrm": mrm, "data": data, "results": results}


def run_test(stem, data, out):
    transform = build_transform(is_train=False, recipe="sgd", input_size=64, norm="mrm")
    val, test = (build_dataset(s, data, dataset="nih", cache="off", transform=transform)
                 for s in ("val", "test"))
    return evaluation.test_checkpoint(stem, test, RunFolder(out), device=torch.device("cpu"),
                                      calibration_set=val, ci_resamples=50, progress=False)


def stored_section(stem):
    return json.loads(stem.with_suffix(".json").read_text())["calibration"]


def test_thresholds_come_from_validation_never_from_test(calibrated, tmp_path):
    """Flipping every TEST label changes the test scores at each threshold, not the
    thresholds stored in the checkpoint (chosen on validation)."""
    data = tmp_path / "flipped"
    shutil.copytree(calibrated["data"], data)
    lines = []
    for line in (data / "test_list.txt").read_text().splitlines():
        path, *labels = line.split()
        lines.append(" ".join([path, *(str(1 - int(v)) for v in labels)]))
    (data / "test_list.txt").write_text("\n".join(lines) + "\n")
    first = stored_section(calibrated["stem"])
    stem = tmp_path / "copy" / "checkpoint-best"
    stem.parent.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copyfile(calibrated["stem"].with_suffix(suffix), stem.with_suffix(suffix))
    results = run_test(stem, data, tmp_path / "report")
    again = stored_section(stem)
    assert again["thresholds"] == first["thresholds"]
    assert again["temperature"] == first["temperature"]
    before = calibrated["results"]["operating_points"]["points"]["youden"]
    after = results["operating_points"]["points"]["youden"]
    assert any(before[c].get("tp") != after[c].get("tp") for c in before)
    for name, row in after.items():
        if row.get("tp") is not None:  # the flipped labels swap the counts
            assert (row["tp"], row["fp"]) == (before[name]["fp"], before[name]["tp"])


def test_report_table_holds_every_class_and_kind(calibrated):
    folder = calibrated["root"] / "report"
    with open(folder / "results_test_operating_points.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = calibrated["results"]["class_names"]
    assert [(r["class"], r["kind"]) for r in rows] == [(n, k) for n in names for k in op.THRESHOLD_KINDS]
    stored = stored_section(calibrated["stem"])
    temperature = stored["temperature"][names[0]]
    for row in rows:
        logit = stored["thresholds"][row["kind"]][row["class"]]["logit"]
        if logit is None:
            assert row["threshold"] == "" and row["note"]
            continue
        assert float(row["threshold"]) == pytest.approx(expit(logit / temperature), rel=1e-5)
        counts = [int(row[k]) for k in ("tp", "fp", "tn", "fn")]
        assert sum(counts) == calibrated["results"]["num_images"]
    md = (folder / "results_test_operating_points.md").read_text()
    assert "Wilson score interval" in md and "| youden |" in md


def direct_logits(calibrated):
    """The checkpoint's logits on the test split, computed here."""
    model, config = ckpt.load_trained(calibrated["stem"])
    test = build_dataset("test", calibrated["data"], dataset="nih", cache="off",
                         transform=build_transform(is_train=False, recipe=config.eval_recipe,
                                                   input_size=config.img_size, norm=config.norm))
    with torch.no_grad():
        return np.stack([model(x[None]).double()[0].numpy() for x, _ in test])


def predict_csv(calibrated, out, *extra):
    rc = predict.main(["--checkpoint", str(calibrated["stem"]), "--inputs",
                       str(calibrated["data"] / "test_list.txt"), "--output", str(out),
                       "--amp", "none", "--device", "cpu", "--num_workers", "0", *extra])
    with open(out, newline="") as f:
        return rc, list(csv.DictReader(f))


def test_predict_threshold_youden_writes_the_stored_calls(calibrated, tmp_path, capsys):
    names = calibrated["results"]["class_names"]
    stored = stored_section(calibrated["stem"])
    rc, rows = predict_csv(calibrated, tmp_path / "cal.csv", "--threshold", "youden")
    assert rc == 0
    assert "probabilities calibrated, temperature" in capsys.readouterr().out
    rc, raw = predict_csv(calibrated, tmp_path / "raw.csv", "--threshold", "youden", "--no_calibrated")
    assert rc == 0
    assert "uncalibrated (--no_calibrated)" in capsys.readouterr().out
    logits = direct_logits(calibrated)
    assert [r["path"] for r in rows] == [r["path"] for r in raw]
    for k, name in enumerate(names):
        t = stored["temperature"][name]
        logit = stored["thresholds"]["youden"][name]["logit"]
        for i, (cal_row, raw_row) in enumerate(zip(rows, raw)):
            p_raw, p_cal = float(raw_row[name]), float(cal_row[name])
            # The model's own sigmoid(logit), and calibrated sigmoid(logit / T).
            assert p_raw == pytest.approx(expit(logits[i, k]), abs=2e-6)
            assert p_cal == pytest.approx(expit(logits[i, k] / t), abs=2e-6)
            if logit is None:
                assert cal_row[f"pred_{name}"] == raw_row[f"pred_{name}"] == ""
            else:
                assert cal_row[f"pred_{name}"] == str(int(p_cal >= expit(logit / t)))
                # A temperature keeps the order: the same calls either way.
                assert raw_row[f"pred_{name}"] == cal_row[f"pred_{name}"]


@pytest.mark.parametrize("extra", [(), ("--no_calibrated",)])
def test_a_heatmap_is_labelled_with_the_probability_the_csv_has(calibrated, tmp_path, monkeypatch, extra):
    import util.heatmap

    labels = []
    drawn = util.heatmap.overlay
    monkeypatch.setattr(util.heatmap, "overlay", lambda *a, label, **k: labels.append(label) or drawn(*a, label=label, **k))
    name = calibrated["results"]["class_names"][1]
    rc, rows = predict_csv(calibrated, tmp_path / "p.csv", "--heatmap_class", name, *extra)
    assert rc == 0 and len(labels) == len(rows) > 1
    shown = sorted(float(label.rsplit("p=", 1)[1]) for label in labels)
    assert shown == pytest.approx(sorted(float(r[name]) for r in rows), abs=6e-4)  # printed to 3 places


def test_threshold_kind_without_stored_calibration_is_one_line(tmp_path, capsys, calibrated):
    stem, _ = trained_checkpoint(tmp_path / "bare")
    base = ["--checkpoint", str(stem), "--inputs", str(calibrated["data"] / "test_list.txt"),
            "--output", str(tmp_path / "p.csv"), "--num_workers", "0"]
    assert predict.main([*base, "--threshold", "youden"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("predict.py: error: --threshold youden: ") and "no validation thresholds" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert predict.main([*base, "--calibrated"]) == 2
    assert "--calibrated: " in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
