"""util.summarize with intervals, seed groups, the reference CSV and the forest plot."""
import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main_finetune_lora as mfl
from util import cli
from util import summarize
from util.runfolder import RUN_FORMAT

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Mass", "Nodule"]
PARSER = mfl.get_args_parser()
EXACT = {"kind": "exact", "size": None, "dir": "/cache", "crop_resize": None}


def run_record(settings, execution):
    """config.json as the training script writes it: every RUN flag (its default unless in
    ``settings``) and the derived settings, the recipe flags, and how the run executed."""
    defaults = {k: PARSER.get_default(k) for k, role in cli.flag_roles(PARSER).items()
                if role == cli.RUN}
    derived = {"global_batch": 64, "weights_sha256": "f" * 64, "pixels": "original pixels"}
    return {"format": RUN_FORMAT, "settings": {**defaults, **derived, **settings},
            "recipe": cli.recipe_flags(PARSER), "execution": execution,
            "data_cache": {split: EXACT for split in ("train", "val", "test")},
            "resumed_from": None, "git_commit": "abc"}


def run(root, name, method, seed, value, lr=0.05, dataset="nih", size="1%", weights="MRM",
        interval=True):
    folder = root / name
    folder.mkdir(parents=True)
    res = {"split": "test", "dataset": dataset, "data_size": size, "weights": weights,
           "method": method, "model": "vit_base_patch16", "lora_rank": 4 if method == "lora" else None,
           "trainable_params": 10, "total_params": 100, "num_images": 50, "mean_auroc": value,
           "auroc": {c: value for c in CLASSES}, "class_names": CLASSES}
    if interval:
        res["intervals"] = {"level": 0.95, "classes": {},
                            "mean": {"auroc": value, "ci_low": value - 0.02, "ci_high": value + 0.015}}
    (folder / "results_test.json").write_text(json.dumps(res))
    # Where the run wrote and how many workers it used do not split seeds; the data does.
    hashes = {split: f"{dataset}-{split}" for split in ("train", "val", "test")}
    settings = {"seed": seed, "lr": lr, "method": method, "dataset": dataset,
                "data_size": size, "split_sha256": hashes}
    execution = {"output_dir": str(root), "run_name": name, "data_path": f"/data/{dataset}",
                 "num_workers": seed}
    (folder / "config.json").write_text(json.dumps(run_record(settings, execution)))
    return res


def make(root):
    run(root, "lora_s0", "lora", 0, 0.801)
    run(root, "lora_s1", "lora", 1, 0.812)
    run(root, "lora_s2", "lora", 2, 0.795)
    run(root, "lora_lr", "lora", 0, 0.780, lr=0.1)        # another lr: not a seed of the above
    run(root, "full_s0", "full", 0, 0.790)
    run(root, "full_s1", "full", 1, 0.784, interval=False)
    run(root, "chex_lora", "lora", 0, 0.870, dataset="chexpert", weights="CXR_MAE")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_seed_groups_intervals_and_reference(tmp_path, capsys):
    make(tmp_path / "runs")
    ref = tmp_path / "ref.csv"
    ref.write_text("setting,method,mean_auroc,source\nnih-1-mrm,lora,80.6,paper\n"
                   "nih-1-mrm,full,,\nchexpert-1-cxr_mae,lora,88.0,table\n")
    out = tmp_path / "summary"
    assert summarize.main([str(tmp_path / "runs"), "--output", str(out), "--reference", str(ref),
                           "--plot"]) == 0
    rows = {r["run"].split("/")[-1]: r for r in read_csv(out.with_suffix(".csv"))}
    seeds = [80.1, 81.2, 79.5]
    for name in ("lora_s0", "lora_s1", "lora_s2"):
        assert rows[name]["seeds_n"] == "3"
        assert rows[name]["seeds_mean_auroc"] == f"{statistics.mean(seeds):.2f}"
        assert rows[name]["seeds_sd"] == f"{statistics.stdev(seeds):.2f}"
        assert rows[name]["reference_mean_auroc"] == "80.6"
        assert rows[name]["diff_vs_reference"] == f"{statistics.mean(seeds) - 80.6:+.1f}"
    assert rows["lora_s1"]["seed"] == "1"
    assert rows["lora_lr"]["seeds_n"] == "1" and rows["lora_lr"]["seeds_sd"] == ""
    assert rows["full_s0"]["seeds_n"] == "2"
    assert rows["full_s0"]["reference_mean_auroc"] == ""  # the blank reference row is skipped
    assert rows["lora_s0"]["mean_auroc_ci_low"] == "78.1"
    assert rows["lora_s0"]["mean_auroc_ci_high"] == "81.6"
    assert rows["full_s1"]["mean_auroc_ci_low"] == ""
    assert rows["chex_lora"]["diff_vs_reference"] == "-1.0"

    md = out.with_suffix(".md").read_text()
    assert "| data size | weights | method | seed | mean AUROC | 95% CI | Mass |" in md
    assert "| 1% | MRM | LoRA | 0 | **80.1** | [78.1, 81.6] |" in md
    assert "## Seeds (runs that differ only in seed)" in md
    spread = f"{statistics.mean(seeds):.2f} +- {statistics.stdev(seeds):.2f}"
    assert f"| NIH ChestX-ray14 | 1% | MRM | LoRA | 3 | {spread} | seed 0: 80.1 [78.1, 81.6]; " in md
    assert f"| nih-1-mrm | LoRA | 3 | {statistics.mean(seeds):.1f} | 80.6 | " in md
    assert "| chexpert-1-cxr_mae | LoRA | 1 | 87.0 | 88.0 | -1.0 | table |" in md

    for ext in ("png", "svg"):
        plot = tmp_path / f"summary_forest.{ext}"
        assert plot.is_file() and plot.stat().st_size > 10_000
    with Image.open(tmp_path / "summary_forest.png") as img:
        grey = np.asarray(img.convert("L"))
        assert grey.std() > 10 and img.size[0] >= 600
    assert "LoRA" in (tmp_path / "summary_forest.svg").read_text()


def test_without_configs_nothing_is_grouped(tmp_path):
    make(tmp_path / "runs")
    for cfg in (tmp_path / "runs").rglob("config.json"):
        cfg.unlink()
    columns, rows, errors, _ = summarize.summarize([tmp_path / "runs"])
    assert not errors and "seed" not in columns and "reference_mean_auroc" not in columns
    assert all(r["seeds_n"] == "1" for r in rows)
    assert "## Seeds" not in summarize.to_markdown(columns, rows)


def test_shipped_reference_and_bad_reference_files(tmp_path):
    shipped = summarize.read_reference(ROOT / "docs" / "reference_results.csv")
    assert shipped == {("nih-1-mrm", "lora"): (80.6, "arXiv 2401.12215 abstract")}
    bad = tmp_path / "bad.csv"
    bad.write_text("setting,auroc\nnih-1-mrm,80.6\n")
    with pytest.raises(summarize.ReferenceFileError, match="missing column"):
        summarize.read_reference(bad)
    bad.write_text("setting,method,mean_auroc\nnih-1-mrm,lora,0.806\n")
    with pytest.raises(summarize.ReferenceFileError, match="line 2: .*x100 scale"):
        summarize.read_reference(bad)
    bad.write_text("setting,method,mean_auroc\nnih-1-mrm,lora,80.6\nnih-1-mrm,LoRA,80.1\n")
    with pytest.raises(summarize.ReferenceFileError, match="lines 2 and 3"):
        summarize.read_reference(bad)
    make(tmp_path / "runs")
    assert summarize.main([str(tmp_path / "runs"), "--reference", str(bad)]) == 2
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path / "runs"), "--plot"])  # --plot needs --output
