"""ROC curve PNG, per-class AUROC tables and the multi-run summary (util.summarize)."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from util import reports, summarize
from util.reports import ROC_DPI, ROC_FIGSIZE, save_roc_curves, write_auroc_tables

NIH = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
       "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
       "Hernia"]
CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_roc_png_size_and_single_value_class(tmp_path):
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 4)) < 0.3).astype(int)
    targets[:, 3] = 0  # Hernia-like: no positive in the evaluated set
    probs = np.clip(rng.random((60, 4)) * 0.7 + 0.3 * targets, 0, 1)
    probs[5, 0] = np.nan  # a row without prediction is left out, not a crash
    path = save_roc_curves(targets, probs, ["A", "B", "C", "D"], tmp_path / "roc" / "roc_test.png")
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (int(ROC_FIGSIZE[0] * ROC_DPI), int(ROC_FIGSIZE[1] * ROC_DPI))
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind
    with pytest.raises(ValueError, match="class names"):
        save_roc_curves(targets, probs, ["A", "B"], tmp_path / "x.png")


def test_roc_legend_holds_auroc_and_note(tmp_path, monkeypatch):
    """The legend labels: the AUROC x100 per class, a note for undefined ones."""
    from matplotlib.axes import Axes

    seen = {}
    original = Axes.legend

    def spy(self, *args, **kwargs):
        seen["labels"] = list(args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "legend", spy)
    targets = np.array([[0, 1], [0, 1], [1, 1], [1, 1]])
    probs = np.array([[0.1, 0.5], [0.2, 0.5], [0.8, 0.5], [0.9, 0.5]])
    save_roc_curves(targets, probs, ["Mass", "Hernia"], tmp_path / "roc.png")
    assert seen["labels"] == ["Mass: 100.0", "Hernia: n/a (only positives)"]


def results(dataset, size, weights, method, classes, seed, trainable=159_758, total=85_956_878):
    rng = np.random.default_rng(seed)
    auroc = {c: float(rng.uniform(0.6, 0.9)) for c in classes}
    if dataset == "nih":
        auroc["Hernia"] = None  # undefined in a tiny evaluation set
    defined = [v for v in auroc.values() if v is not None]
    return {
        "split": "test", "dataset": dataset, "data_size": size, "weights": weights,
        "method": method, "model": "vit_base_patch16", "lora_rank": 4 if method == "lora" else None,
        "trainable_params": trainable if method == "lora" else total, "total_params": total,
        "num_images": 100, "loss": 0.2, "mean_auroc": float(np.mean(defined)),
        "mean_auprc": 0.3, "auroc": auroc, "auprc": {c: 0.3 for c in classes},
        "class_names": classes, "checkpoint": "checkpoint-best", "epoch": 3,
    }


def test_write_auroc_tables(tmp_path):
    res = results("nih", "1%", "MRM", "lora", NIH, seed=0)
    csv_path, md_path = write_auroc_tables(res, tmp_path)
    assert csv_path.name == "results_test_auroc.csv" and md_path.name == "results_test_auroc.md"
    rows = read_csv(csv_path)
    assert [r["class"] for r in rows] == [*NIH, "mean"]
    assert rows[0]["auroc"] == f"{100 * res['auroc']['Atelectasis']:.1f}"
    assert rows[NIH.index("Hernia")]["auroc"] == ""
    assert rows[-1]["auroc"] == f"{100 * res['mean_auroc']:.1f}"
    md = md_path.read_text()
    assert "| Hernia | n/a |" in md
    assert f"| **mean** | **{100 * res['mean_auroc']:.1f}** |" in md
    assert "nih / 1% / MRM / lora" in md
    csv2, _ = write_auroc_tables(res, tmp_path, stem="results_val")
    assert csv2.name == "results_val_auroc.csv"


def make_runs(root):
    specs = [
        ("nih_1_mrm_full", results("nih", "1%", "MRM", "full", NIH, 1)),
        ("nih_1_mrm_lora", results("nih", "1%", "MRM", "lora", NIH, 2)),
        ("nih_10_mrm_lora", results("nih", "10%", "MRM", "lora", NIH, 3)),
        ("chexpert_1_cxrmae_lora", results("chexpert", "1%", "CXR_MAE", "lora", CHEXPERT, 4)),
        ("rsna_100_mrm_full", results("rsna", "100%", "MRM", "full", ["Pneumonia"], 5)),
    ]
    for name, res in specs:
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "results_test.json").write_text(json.dumps(res))
    return dict(specs)


def test_summary_table_from_results_files(tmp_path, capsys):
    runs = make_runs(tmp_path)
    out = tmp_path / "summary"
    assert summarize.main([str(tmp_path / "runs"), "--output", str(out)]) == 0
    assert "summarized 5 runs" in capsys.readouterr().out
    rows = read_csv(out.with_suffix(".csv"))
    order = [(r["dataset"], r["data_size"], r["weights"], r["method"]) for r in rows]
    assert order == [("nih", "1%", "MRM", "LoRA"), ("nih", "1%", "MRM", "full"),
                     ("nih", "10%", "MRM", "LoRA"), ("chexpert", "1%", "CXR_MAE", "LoRA"),
                     ("rsna", "100%", "MRM", "full")]
    lora_row = rows[0]
    assert lora_row["mean_auroc"] == f"{100 * runs['nih_1_mrm_lora']['mean_auroc']:.1f}"
    assert lora_row["Effusion"] == f"{100 * runs['nih_1_mrm_lora']['auroc']['Effusion']:.1f}"
    assert lora_row["Hernia"] == ""
    assert lora_row["trainable_params"] == "159758" and lora_row["trainable_pct"] == "0.19"
    assert rows[3]["Pleural Effusion"] != "" and rows[3]["Mass"] == ""
    md = out.with_suffix(".md").read_text()
    assert "## NIH ChestX-ray14" in md and "## CheXpert" in md and "## RSNA Pneumonia" in md
    assert "159,758 (0.19%)" in md
    nih_header = next(line for line in md.splitlines() if line.startswith("| data size") and "Hernia" in line)
    assert nih_header.split(" | ")[4:18] == NIH  # each data set's own class order
    lo = 100 * runs["nih_1_mrm_lora"]["mean_auroc"]
    fu = 100 * runs["nih_1_mrm_full"]["mean_auroc"]
    assert (f"| nih | 1% | MRM | vit_base_patch16 | r4, no config.json (n=1) | no config.json (n=1) "
            f"| {lo:.1f} | {fu:.1f} | {lo - fu:+.1f} |") in md  # the difference before rounding
    assert f"LoRA is better in {int(lo > fu)} of 1 comparisons" in md


def test_summary_files_and_bad_results(tmp_path, capsys, caplog):
    runs = make_runs(tmp_path)
    bad = tmp_path / "runs" / "broken" / "results_test.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    partial = tmp_path / "runs" / "partial" / "results_test.json"
    partial.parent.mkdir()
    partial.write_text(json.dumps({"dataset": "nih"}))
    rc = summarize.main([str(tmp_path / "runs" / "nih_1_mrm_lora" / "results_test.json"),
                         str(tmp_path / "runs")])
    assert rc == 1  # table printed from the good files, the bad ones named
    text = capsys.readouterr().out
    assert text.count("| 1% | MRM | LoRA |") == 1  # the same file named twice counts once
    assert str(bad) in caplog.text and "missing" in caplog.text
    _, rows, errors, _ = summarize.summarize([tmp_path / "runs"])
    assert len(rows) == len(runs) and len(errors) == 2
    assert summarize.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == (f"python -m util.summarize: error: run not found: {tmp_path / 'nowhere'} "
                   "(RUNS are run folders or results_test.json files)\n")


def test_nan_mean_is_blank(tmp_path):
    res = results("rsna", "1%", "MRM", "lora", ["Pneumonia"], 0)
    res["auroc"]["Pneumonia"] = None
    res["mean_auroc"] = math.nan
    rows = write_auroc_tables(res, tmp_path)
    assert read_csv(rows[0])[-1]["auroc"] == ""


def test_auroc_tables_with_intervals(tmp_path):
    from util.stats import auroc_intervals

    rng = np.random.default_rng(1)
    classes = ["Mass", "Nodule", "Hernia"]
    targets = (rng.random((80, 3)) < 0.3).astype(int)
    targets[:, 2] = 0
    probs = np.clip(rng.random((80, 3)) * 0.7 + 0.3 * targets, 0, 1)
    res = results("nih", "1%", "MRM", "lora", classes, seed=0)
    res["intervals"] = auroc_intervals(targets, probs, classes, resamples=50, seed=0)
    csv_path, md_path = write_auroc_tables(res, tmp_path)
    rows = read_csv(csv_path)
    assert list(rows[0]) == ["class", "auroc", "auroc_ci_low", "auroc_ci_high", "delong_se",
                             "delong_low", "delong_high", "auprc"]
    mass = res["intervals"]["classes"]["Mass"]
    assert rows[0]["auroc_ci_low"] == f"{100 * mass['ci_low']:.1f}"
    assert rows[0]["delong_se"] == f"{100 * mass['delong_se']:.2f}"
    assert rows[2]["auroc_ci_low"] == "" and rows[2]["delong_se"] == ""  # Hernia: undefined
    mean = res["intervals"]["mean"]
    assert rows[-1]["auroc_ci_high"] == f"{100 * mean['ci_high']:.1f}"
    md = md_path.read_text()
    assert "| class | AUROC | 95% CI (bootstrap) | 95% CI (DeLong) | AUPRC |" in md
    assert (f"| Mass | {rows[0]['auroc']} | [{rows[0]['auroc_ci_low']}, {rows[0]['auroc_ci_high']}] "
            f"| [{rows[0]['delong_low']}, {rows[0]['delong_high']}] |") in md
    assert f"**[{rows[-1]['auroc_ci_low']}, {rows[-1]['auroc_ci_high']}]**" in md
    assert "| Hernia | n/a | n/a | n/a |" in md
    assert "- Hernia: undefined: only negatives among the 80 images." in md
    assert "50 resamples, seed 0" in md
    # The note says how the intervals were made, and names the classes where they under-cover.
    assert "95% CI: bootstrap over images, unstratified, resampled jointly across classes" in md
    assert "pattern" not in md
    assert max(mass["n_pos"], res["intervals"]["classes"]["Nodule"]["n_pos"]) <= 30
    assert "- Mass, Nodule: 30 or fewer positives (or negatives); there both intervals under-cover" in md


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_predictions_csv_reads_back_the_scores_exactly(tmp_path, dtype):
    """Confident scores (below 1e-8, above 1 - 1e-8) keep their order: fixed decimals would
    write them as ties, and util.compare would score other AUROCs than the run."""
    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.normal(-25, 3, 50), rng.normal(0, 2, 50), rng.normal(20, 2, 50)])
    probs = (1 / (1 + np.exp(-logits))).astype(dtype).reshape(-1, 1)
    path = reports.write_predictions_csv(tmp_path / "p.csv", [f"{i}.png" for i in range(len(probs))],
                                         probs, ["Mass"], labels=(logits > 0).reshape(-1, 1))
    with open(path, newline="") as f:
        back = np.array([[float(row["Mass"])] for row in csv.DictReader(f)], dtype=dtype)
    assert np.array_equal(back, probs)
    if dtype == np.float64:  # (float32 itself rounds the most confident ones to 1)
        assert len(np.unique(back)) == len(probs)
