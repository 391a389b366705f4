"""Calibration: ECE, Brier and reliability bins against hand counts, temperature scaling on a
case with a known answer, the checkpoint's stored section, and the test report's section."""
import json
import logging

import numpy as np
import pytest
import torch
from _fakes import trained_checkpoint
from PIL import Image
from scipy.special import expit

import checkpoints as ckpt
import evaluation
from datasets import build_dataset, build_transform, make_demo_dataset
from util import calibration as cal
from util.metrics import binary_auroc
from util.runfolder import RunFolder

# One class, five images: bins (width 1/15) 0, 2, 14, 14, 7.
P1 = np.array([0.05, 0.15, 0.95, 0.96, 0.5])
Y1 = np.array([0, 1, 1, 0, 1])
# ECE = (0.05 + 0.85 + 2 x |0.5 - 0.955| + 0.5) / 5
ECE1 = (0.05 + 0.85 + 2 * 0.455 + 0.5) / 5
BRIER1 = (0.05 ** 2 + 0.85 ** 2 + 0.05 ** 2 + 0.96 ** 2 + 0.5 ** 2) / 5
# A second class: bins 1, 1, 13, 13, 14; it shares bin 14 with the first, where the two
# classes miss in opposite directions, so the pooled ECE is not the mean of the two.
P2 = np.array([0.1, 0.1, 0.9, 0.9, 0.97])
Y2 = np.array([0, 0, 1, 1, 1])
ECE2 = (2 * 0.1 + 2 * 0.1 + 0.03) / 5
BRIER2 = (4 * 0.01 + 0.03 ** 2) / 5
# Pooled over the 10 pairs: bins 0, 1, 2, 7, 13 as per class; bin 14 holds 0.95 (1),
# 0.96 (0), 0.97 (1): |2 - 2.88|.
ECE_POOLED = (0.05 + 0.2 + 0.85 + 0.5 + 0.2 + 0.88) / 10


def test_ece_and_brier_equal_hand_computed_values():
    assert cal.expected_calibration_error(P1, Y1) == pytest.approx(ECE1, abs=1e-12)
    errors = cal.calibration_errors(np.stack([P1, P2], 1), np.stack([Y1, Y2], 1), ["a", "b"])
    assert errors["ece"] == pytest.approx({"a": ECE1, "b": ECE2}, abs=1e-12)
    assert errors["brier"] == pytest.approx({"a": BRIER1, "b": BRIER2}, abs=1e-12)
    assert errors["mean_ece"] == pytest.approx((ECE1 + ECE2) / 2, abs=1e-12)
    assert errors["pooled_ece"] == pytest.approx(ECE_POOLED, abs=1e-12)
    assert errors["pooled_ece"] != pytest.approx(errors["mean_ece"], abs=1e-3)
    assert errors["mean_brier"] == pytest.approx((BRIER1 + BRIER2) / 2, abs=1e-12)
    # Perfectly calibrated in every used bin: zero.
    assert cal.expected_calibration_error([0.0, 0.0, 1.0], [0, 0, 1]) == 0.0


def test_reliability_bins_edges_and_counts():
    table = cal.reliability_bins(np.r_[P1, 0.0, 1.0, 1 / 15], np.r_[Y1, 0, 1, 1])
    assert table["count"].sum() == 8 and len(table["count"]) == cal.ECE_BINS
    assert table["count"][[0, 1, 2, 7, 14]].tolist() == [2, 1, 1, 1, 3]  # 0 first, 1 last bin
    assert table["mean_prob"][14] == pytest.approx((0.95 + 0.96 + 1.0) / 3)
    assert table["frequency"][14] == pytest.approx(2 / 3)
    assert np.isnan(table["frequency"][3])  # an empty bin
    np.testing.assert_allclose(table["edges"], np.arange(16) / 15)


@pytest.mark.parametrize("bad,message", [
    ((np.array([0.5, np.nan]), np.array([0, 1])), "NaN or infinite"),
    ((np.array([0.5, 0.2]), np.array([0, 2])), "0/1"),
    ((np.array([0.5, 1.2]), np.array([0, 1])), r"\[0, 1\]"),
    ((np.zeros((3, 2)), np.zeros((3, 1))), "must both be"),
])
def test_inputs_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        cal.calibration_errors(*bad, ["a", "b"][:bad[0].shape[1] if bad[0].ndim == 2 else 1])
    if message != r"\[0, 1\]":  # logits may be any finite number
        with pytest.raises(ValueError, match=message):
            cal.fit_temperatures(*bad)


def sharpened(k, n=20000, classes=1, seed=0):
    """Labels drawn from sigmoid(true logit), and the logits a model scaled by k would give."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 2.0, (n, classes))
    labels = (rng.random((n, classes)) < expit(true)).astype(np.int8)
    return true * np.asarray(k), labels


@pytest.mark.parametrize("k", [0.4, 2.5])
def test_temperature_recovers_a_known_scale(k):
    logits, labels = sharpened(k, classes=2)
    (t, t2) = cal.fit_temperatures(logits, labels)
    assert t == t2 and t == pytest.approx(k, rel=0.05)
    # The fit minimises the BCE: a little off either way is worse.
    best = cal.binary_cross_entropy(logits, labels, t)
    assert best < cal.binary_cross_entropy(logits, labels, t * 1.05)
    assert best < cal.binary_cross_entropy(logits, labels, t / 1.05)
    assert cal.fit_temperatures(logits, labels)[0] == t  # deterministic
    # Calibrated probabilities: ranking (AUROC) unchanged, calibration better.
    probs, calibrated = expit(logits), cal.apply_temperatures(logits, t)
    assert binary_auroc(labels[:, 0], calibrated[:, 0]) == binary_auroc(labels[:, 0], probs[:, 0])
    assert cal.expected_calibration_error(calibrated, labels) < \
        cal.expected_calibration_error(probs, labels) / 3


def test_class_temperatures_each_find_their_own_scale():
    scales = [0.5, 1.0, 3.0]
    logits, labels = sharpened(scales, classes=3, seed=1)
    per_class = cal.fit_temperatures(logits, labels, "class_temperature")
    np.testing.assert_allclose(per_class, scales, rtol=0.06)
    shared = cal.fit_temperatures(logits, labels)
    assert len(set(shared.tolist())) == 1 and 0.5 < shared[0] < 3.0
    # A class with a single label value keeps the shared temperature.
    labels[:, 1] = 0
    fitted = cal.fit_temperatures(logits, labels, "class_temperature")
    assert fitted[1] == cal.fit_temperatures(logits, labels)[0]
    with pytest.raises(ValueError, match="calibration method"):
        cal.fit_temperatures(logits, labels, "platt")


def test_logits_from_probs_inverts_the_sigmoid():
    logits = np.array([-60.0, -8.0, 0.0, 3.0, 15.0, 45.0])
    back = cal.logits_from_probs(expit(logits))
    np.testing.assert_allclose(back[:5], logits[:5], rtol=1e-6, atol=1e-9)
    assert back[5] == cal.MAX_LOGIT and np.isfinite(back).all()  # a probability of exactly 1


def test_a_probability_of_exactly_0_has_a_finite_logit_for_the_operating_points():
    """float64's sigmoid of a logit below ~-745 is 0: its logit is the lowest finite one, so
    the thresholds chosen on it (the final test's) do not fail on an infinite score."""
    from util.operating_points import choose_thresholds

    logits = np.array([-800.0, -40.0, -3.0, 2.0, 5.0, -1.0])
    probs = expit(logits)
    assert probs[0] == 0.0
    back = cal.logits_from_probs(probs)
    assert back[0] == cal.MIN_LOGIT and np.isfinite(back).all() and np.all(np.diff(back[:3]) > 0)
    chosen = choose_thresholds(back.reshape(-1, 1), np.array([[0], [0], [0], [1], [1], [0]]), ["a"])
    assert chosen["youden"]["a"]["threshold"] is not None


# ---------------------------------------------------------------------------------------
# Stored with the checkpoint
# ---------------------------------------------------------------------------------------

def a_calibration(names, temperature=1.5):
    kinds = ("youden", "sens90", "sens95", "spec90", "spec95")
    return ckpt.StoredCalibration(
        method="temperature", temperature={n: temperature for n in names},
        thresholds={k: {n: {"logit": 0.25 * i, "sensitivity": 0.9, "specificity": 0.5}
                        for i, n in enumerate(names)} for k in kinds},
        fitted_on={"split_file": "val_list.txt", "num_images": 10})


def test_section_round_trip_and_damaged_sections(tmp_path):
    names = ["A", "B"]
    stored = a_calibration(names)
    again = ckpt.StoredCalibration.from_json(json.loads(json.dumps(stored.to_json())), names)
    assert again == stored
    np.testing.assert_allclose(again.threshold_probabilities("youden", names, calibrated=True),
                               expit(np.array([0.0, 0.25]) / 1.5))
    np.testing.assert_allclose(again.threshold_probabilities("youden", names, calibrated=False),
                               expit(np.array([0.0, 0.25])))
    bad = [({**stored.to_json(), "format": "cxr-lora-calibration/0"}, "format"),
           ({**stored.to_json(), "temperature": {"A": 1.0}}, "temperature"),
           ({**stored.to_json(), "temperature": {"A": 1.0, "B": -2.0}}, "temperature"),
           ({**stored.to_json(), "thresholds": {"youden": {}}}, "thresholds"),
           ({**stored.to_json(), "method": "isotonic"}, "method")]
    config = ckpt.model_config(model="vit_tiny_patch16", method="full", class_names=names,
                               img_size=32, global_pool=True, norm="mrm", mean=(0.5,), std=(0.2,),
                               method_settings=None)
    for section, word in bad:
        damaged = config.replace(extras={"calibration": section})
        with pytest.raises(ckpt.CheckpointError, match=f"checkpoint-best.json: .*{word}"):
            ckpt.read_calibration(damaged, tmp_path / "checkpoint-best")
    assert ckpt.read_calibration(config, tmp_path / "checkpoint-best") is None


@pytest.fixture
def committed_run(tmp_path):
    """A run folder whose epoch 3 commit holds a tiny checkpoint-best, locked by this process."""
    stem, _ = trained_checkpoint(tmp_path / "src", class_names=["A", "B"])
    model, config = ckpt.load_trained(stem)
    folder = RunFolder(tmp_path / "run")
    folder.folder.mkdir()
    folder.lock.acquire("test")
    log = [{"epoch": e, "val_mean_auroc": 0.5} for e in range(4)]
    folder.commit(3, lambda pending: ckpt.save_checkpoint(pending / "checkpoint-best", model,
                                                          config, extra={"epoch": 2}), log)
    yield folder
    folder.lock.release()


def test_store_calibration_commits_a_consistent_record(committed_run, tmp_path):
    folder = committed_run
    before = folder.read_commit()
    stored = a_calibration(["A", "B"])
    path = ckpt.store_calibration(folder.best_checkpoint(), stored, folder)
    after = folder.read_commit()
    assert after["epoch"] == before["epoch"] == 3 and after["log"] == before["log"]
    assert after["files"]["checkpoint-best.json"] != before["files"]["checkpoint-best.json"]
    assert after["files"]["checkpoint-best.safetensors"] == before["files"]["checkpoint-best.safetensors"]
    folder.verify()  # every committed file matches its hash
    _, config = ckpt.load_trained(folder.best_checkpoint())  # checked against commit.json
    assert ckpt.read_calibration(config, path) == stored
    assert config.extras["epoch"] == 2  # the rest of the JSON as it was
    assert not (folder.folder / ".pending").exists()

    # Only the run holding its folder's lock writes a committed checkpoint.
    other = RunFolder(tmp_path / "elsewhere")
    text = path.read_text()
    with pytest.raises(ckpt.CheckpointError, match="committed file"):
        ckpt.store_calibration(folder.best_checkpoint(), a_calibration(["A", "B"], 2.0), other)
    folder.lock.release()
    with pytest.raises(ckpt.CheckpointError, match="lock"):
        ckpt.store_calibration(folder.best_checkpoint(), a_calibration(["A", "B"], 2.0),
                               RunFolder(folder.folder))
    assert path.read_text() == text


# ---------------------------------------------------------------------------------------
# The test report
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny checkpoint tested with the validation split as its calibration set."""
    root = tmp_path_factory.mktemp("calibrated")
    stem, mrm = trained_checkpoint(root)
    data = make_demo_dataset(root / "demo", num_images=96, image_size=64, seed=3)
    transform = build_transform(is_train=False, recipe="sgd", input_size=64, norm="mrm")
    splits = {s: build_dataset(s, data, dataset="nih", cache="off", transform=transform)
              for s in ("val", "test")}
    out = RunFolder(root / "report")
    results = evaluation.test_checkpoint(stem, splits["test"], out, device=torch.device("cpu"),
                                         calibration_set=splits["val"], ci_resamples=100,
                                         progress=False)
    return {"root": root, "stem": stem, "mrm": mrm, "data": data, "splits": splits,
            "folder": out.folder, "results": results}


def direct_logits(stem, dataset):
    """The checkpoint's logits on ``dataset``, computed here (float64) and its labels."""
    model, _ = ckpt.load_trained(stem)
    with torch.no_grad():
        pairs = [(model(x[None]).double()[0].numpy(), y.numpy()) for x, y in dataset]
    return np.stack([p for p, _ in pairs]), np.stack([y for _, y in pairs]).astype(int)


def test_report_has_calibration_before_and_after(evaluated):
    results, folder = evaluated["results"], evaluated["folder"]
    section = results["calibration"]
    test = evaluated["splits"]["test"]
    stored = json.loads(evaluated["stem"].with_suffix(".json").read_text())["calibration"]
    t = stored["temperature"]["Atelectasis"]
    logits, targets = direct_logits(evaluated["stem"], test)
    # Before: the model's own probabilities; after: sigmoid(logit / T) with the stored T.
    expected_before = cal.calibration_errors(expit(logits), targets, test.class_names)
    assert section["before"]["pooled_ece"] == pytest.approx(expected_before["pooled_ece"], abs=1e-6)
    expected_after = cal.calibration_errors(expit(logits / t), targets, test.class_names)
    assert section["after"]["mean_brier"] == pytest.approx(expected_after["mean_brier"], abs=1e-6)
    assert section["binning"] == cal.BINNING and "fitted by this test" in section["source"]
    md = (folder / "results_test_calibration.md").read_text()
    assert "15 equal-width bins" in md and "| **pooled** |" in md and "ECE x100, calibrated" in md
    with Image.open(folder / "reliability_test.png") as img:
        assert img.format == "PNG" and img.size[0] >= 4 * 200
    recorded = json.loads((folder / "run_files.json").read_text())["files"]
    for name in ("reliability_test.png", "results_test_calibration.md",
                 "results_test_operating_points.csv"):
        assert name in recorded
    written = json.loads((folder / "results_test.json").read_text())
    assert written["calibration"]["after"]["pooled_ece"] == pytest.approx(section["after"]["pooled_ece"])


def test_eval_applies_the_calibration_stored_with_the_checkpoint(evaluated, tmp_path):
    """--eval (no calibration set) reports the stored calibration on its split; a
    checkpoint without one reports the model's own calibration and says why no more."""
    trainer = pytest.importorskip("main_finetune_lora")
    handlers, level = logging.root.handlers[:], logging.root.level
    argv = ["--eval", "--finetune", str(evaluated["mrm"]), "--data_path", str(evaluated["data"]),
            "--dataset", "nih", "--cache", "off", "--device", "cpu", "--amp", "none",
            "--num_workers", "0", "--no_progress", "--ci_resamples", "50"]
    plain = tmp_path / "plain"
    stem, _ = trained_checkpoint(plain)
    try:
        assert trainer.cli([*argv, "--resume", str(evaluated["stem"]),
                            "--output_dir", str(tmp_path / "eval")]) == 0
        assert trainer.cli([*argv, "--resume", str(stem), "--output_dir", str(tmp_path / "e2")]) == 0
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level
    (found,) = (tmp_path / "eval").rglob("results_test.json")
    results = json.loads(found.read_text())
    first = evaluated["results"]["calibration"]
    assert results["calibration"]["source"].startswith("stored in")
    assert results["calibration"]["temperature"] == first["temperature"]
    assert results["calibration"]["after"]["pooled_ece"] == pytest.approx(first["after"]["pooled_ece"],
                                                                          abs=1e-6)
    assert found.with_name("results_test_operating_points.md").is_file()
    (bare,) = (tmp_path / "e2").rglob("results_test.json")
    results = json.loads(bare.read_text())
    assert "after" not in results["calibration"] and "no calibration" in results["calibration"]["note"]
    assert "no thresholds" in results["operating_points"]["note"]
    assert not bare.with_name("results_test_operating_points.md").exists()
    assert "Not calibrated" in bare.with_name("results_test_calibration.md").read_text()
