"""util.summarize: --eval results apart from runs, LoRA vs full per setting, incomplete runs
named, and runs on other data or a lossy cache not taken for seeds of one setting."""
import csv
import json
import logging
import statistics
from pathlib import Path

import pytest

import main_finetune_lora as mfl
from util import cli
from util import summarize
from util.runfolder import RUN_FORMAT

CLASSES = ["Mass", "Nodule"]
EXACT = {"kind": "exact", "size": None, "dir": "/cache/nih", "crop_resize": None}
SPLITS = ("train", "val", "test")
HASHES = {"train": "a" * 64, "val": "b" * 64, "test": "c" * 64}
PARSER = mfl.get_args_parser()


def lossy(size):
    return {"kind": "lossy", "size": size, "dir": f"/cache/nih-{size}", "crop_resize": None}


def run_record(caches=None, execution=None, **settings):
    """config.json as the training script writes it: every RUN flag of its flag table (the
    default unless given) with the derived settings, the recipe flags, how the run executed
    and the cache each split read (``caches``: {split: info}, exact by default)."""
    caches = caches or {split: EXACT for split in SPLITS}
    train = caches["train"]
    defaults = {k: PARSER.get_default(k) for k, role in cli.flag_roles(PARSER).items()
                if role == cli.RUN}
    derived = {"lr": 0.05, "global_batch": 64, "weights_sha256": "f" * 64, "split_sha256": HASHES,
               "pixels": f"lossy {train['size']}px cache" if train.get("kind") == "lossy"
               else "original pixels"}
    return {"format": RUN_FORMAT,
            "settings": {**defaults, "dataset": "nih", "data_size": "1%", **derived, **settings},
            "recipe": cli.recipe_flags(PARSER),
            "execution": {"output_dir": "runs", "num_workers": 8, "data_path": "/data/nih",
                          "cache": "auto", **(execution or {})},
            "data_cache": caches, "resumed_from": None}


def run(root, name, method, seed, value, used=None, data_path="/data/nih", cache="auto",
        arch="vit_base_patch16", **settings):
    """A finished run folder: results_test.json and config.json as the training script writes
    (``used``: the cache every split read; ``settings``: what else this run was run with)."""
    folder = root / name
    folder.mkdir(parents=True)
    record = run_record({split: used or EXACT for split in SPLITS},
                        {"output_dir": str(root), "run_name": name, "data_path": data_path,
                         "cache": cache},
                        **{"seed": seed, "method": method, "model": arch, "epochs": 100,
                           **settings})
    res = {"split": "test", "dataset": "nih", "data_size": "1%", "weights": "MRM",
           "method": method, "model": arch,
           "method_tag": f"r{record['settings']['lora_rank']}" if method == "lora" else None,
           "lora_rank": record["settings"]["lora_rank"] if method == "lora" else None,
           "seed": seed, "trainable_params": 10, "total_params": 100, "num_images": 50,
           "mean_auroc": value, "auroc": {c: value for c in CLASSES}, "class_names": CLASSES,
           "checkpoint": str(folder / "checkpoint-best"),
           "training": {**record["settings"], "precision": "fp32"}}  # the checkpoint's run
    (folder / "results_test.json").write_text(json.dumps(res))
    (folder / "config.json").write_text(json.dumps(record))
    return folder


def evaluation(run_folder, name, value):
    """What ``main_finetune_lora.py --eval`` writes into <run>/eval/<name>: the training run's
    dataset / fraction / weights / method / seed, the evaluated data under 'evaluation'."""
    trained = json.loads((run_folder / "results_test.json").read_text())
    folder = run_folder / "eval" / name
    folder.mkdir(parents=True)
    res = {**trained, "mean_auroc": value, "auroc": {c: value for c in CLASSES},
           "evaluation": {"data_path": f"/data/{name}", "split_file": f"/data/{name}/test_list.txt",
                          "name": name, "command": "main_finetune_lora.py --eval"}}
    (folder / "results_test.json").write_text(json.dumps(res))
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_run(rows):
    return {r["run"].split("/")[-1]: r for r in rows}


def test_evaluations_are_not_seeds_of_the_trained_run(tmp_path, caplog):
    root = tmp_path / "runs"
    s0 = run(root, "lora_s0", "lora", 0, 0.80)
    run(root, "lora_s1", "lora", 1, 0.82)
    run(root, "full_s0", "full", 0, 0.78)
    evaluation(s0, "CheXpert-valid", 0.61)
    evaluation(s0, "NIH_other-test_list", 0.70)
    out = tmp_path / "summary"
    assert summarize.main([str(root), "--output", str(out)]) == 0
    assert sorted(by_run(read_csv(out.with_suffix(".csv")))) == ["full_s0", "lora_s0", "lora_s1"]
    assert "CheXpert-valid" in out.with_suffix(".md").read_text()
    with caplog.at_level(logging.INFO, logger="util.summarize"):
        summary = summarize.summarize([root])
    rows = by_run(summary.rows)
    assert sorted(rows) == ["full_s0", "lora_s0", "lora_s1"]  # no evaluation among the runs
    assert rows["lora_s0"]["seeds_n"] == "2" and rows["lora_s0"]["seeds_mean_auroc"] == "81.00"
    assert "2 evaluations" in caplog.text
    comparison = summarize.lora_vs_full(summary.rows)
    assert len(comparison) == 1 and comparison[0]["lora_auroc"] == pytest.approx(81.0)
    md = summarize.to_markdown(summary.columns, summary.rows, summary.evaluations)
    assert "## Evaluations of trained runs (--eval" in md
    section = md.split("## Evaluations")[1]
    # "trained as" names the method with its size, as the run tables do.
    assert "| nih 1% MRM LoRA r4, seed 0 |" in section
    assert f"| {s0 / 'checkpoint-best'} | CheXpert-valid (/data/CheXpert-valid) | test |" in section
    assert "| 61.0 |" in section and "| 70.0 |" in section and "lora_s1" not in section
    assert "61.0" not in md.split("## Evaluations")[0]


def test_lora_vs_full_pairs_settings_on_unrounded_values(tmp_path):
    root = tmp_path / "runs"
    # rank 4: 80.04 on average, full 79.96: rounded both read 80.0, yet LoRA is ahead.
    run(root, "r4_s0", "lora", 0, 0.8003)
    run(root, "r4_s1", "lora", 1, 0.8005)
    run(root, "full_s0", "full", 0, 0.7996, lr=0.01, epochs=200)
    run(root, "r8_s0", "lora", 0, 0.70, lora_rank=8)            # another rank: its own line
    run(root, "tiny_lora", "lora", 0, 0.60, arch="vit_tiny_patch16")  # another model: no full
    run(root, "r4_112", "lora", 0, 0.75, input_size=112)        # other inputs: its own setting
    run(root, "full_112", "full", 0, 0.74, input_size=112)
    out = tmp_path / "summary"
    assert summarize.main([str(root), "--output", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert ("| nih | 1% | MRM | vit_base_patch16 | r4, sgd, lr 0.05, 100 ep (n=2) | "
            "sgd, lr 0.01, 200 ep (n=1) | 80.0 | 80.0 | +0.1 | input_size=224 |") in md
    assert "| 70.0 | 80.0 | -10.0 | input_size=224 |" in md
    assert "| 75.0 | 74.0 | +1.0 | input_size=112 |" in md
    assert "LoRA is better in 2 of 3 comparisons" in md
    summary = summarize.summarize([root])
    comparison = summarize.lora_vs_full(summary.rows)
    assert len(comparison) == 3
    r4, r8 = sorted((c for c in comparison if c["note"] == "input_size=224"), key=lambda c: c["lora"])
    assert r4["lora"] == "r4, sgd, lr 0.05, 100 ep (n=2)"
    assert r8["lora"] == "r8, sgd, lr 0.05, 100 ep (n=1)"
    assert r4["full"] == "sgd, lr 0.01, 200 ep (n=1)" and r4["model"] == "vit_base_patch16"
    assert r4["lora_auroc"] == pytest.approx(80.04) and r4["full_auroc"] == pytest.approx(79.96)
    assert r4["diff"] == pytest.approx(0.08)


def test_a_started_run_without_results_is_named_and_fails(tmp_path, caplog):
    root = tmp_path / "runs"
    run(root, "done", "lora", 0, 0.80)
    for name in ("stopped", "deep/still_training"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(run_record(seed=0)))
    (root / "weights").mkdir()
    (root / "weights" / "config.json").write_text('{"model_type": "vit"}')  # not a run of ours
    with caplog.at_level(logging.ERROR):
        assert summarize.main([str(root)]) == 1
    for name in ("stopped", "deep/still_training"):
        assert f"{root / name}: a started run" in caplog.text
    assert "weights" not in caplog.text
    summary = summarize.summarize([root])
    assert len(summary.rows) == 1 and len(summary.errors) == 2


def test_other_data_or_lossy_cache_is_another_setting(tmp_path):
    """Seeds share their data (the split files' SHA-256, wherever the folder is) and their
    pixels: where the images were read from (files or an exact cache) does not split them."""
    relabelled = {**HASHES, "train": "d" * 64, "test": "e" * 64}
    root = tmp_path / "runs"
    run(root, "s0", "lora", 0, 0.80)
    run(root, "s1", "lora", 1, 0.82, data_path="/data/nih/")  # the same folder
    run(root, "s2", "lora", 2, 0.81, cache="on")
    run(root, "off_s3", "lora", 3, 0.79, cache="off", used={"kind": "none", "size": None})
    run(root, "lossy_s0", "lora", 0, 0.70, cache="lossy", used=lossy(256))
    run(root, "lossy_s1", "lora", 1, 0.72, cache="lossy", used=lossy(256))
    run(root, "other_s0", "lora", 0, 0.60, data_path="/data/nih_relabelled", split_sha256=relabelled)
    run(root, "other_s1", "lora", 1, 0.62, data_path="/data/nih_relabelled", split_sha256=relabelled)
    out = tmp_path / "summary"
    assert summarize.main([str(root), "--output", str(out)]) == 0
    rows = by_run(read_csv(out.with_suffix(".csv")))
    assert rows["s0"]["seeds_n"] == "4"
    assert rows["s0"]["seeds_mean_auroc"] == f"{statistics.mean([80, 82, 81, 79]):.2f}"
    assert rows["lossy_s0"]["seeds_n"] == "2" and rows["lossy_s0"]["seeds_mean_auroc"] == "71.00"
    assert rows["other_s0"]["seeds_n"] == "2" and rows["other_s0"]["seeds_mean_auroc"] == "61.00"
    assert rows["lossy_s0"]["image_cache"] == "lossy 256 px" and rows["s0"]["image_cache"] == ""
    md = out.with_suffix(".md").read_text()
    assert "| images | run |" in md and "| lossy 256 px |" in md and "| original |" in md
    seeds = md.split("## Seeds")[1]
    assert "| 2 | 71.00 +- 1.41 | seed 0: 70.0; seed 1: 72.0 | lossy 256 px cache |" in seeds
    assert "| 2 | 61.00 +- 1.41 | seed 0: 60.0; seed 1: 62.0 | split_sha256=" in seeds
    # The split files' hashes say which data it was, not the folder it was read from.
    moved = tmp_path / "moved"
    for name, seed, path, hashes in (("a", 0, "/data/nih", HASHES), ("b", 1, "/mnt/nih", HASHES),
                                     ("c", 2, "/data/nih", {**HASHES, "test": "c" * 63 + "0"})):
        run(moved, name, "lora", seed, 0.8, data_path=path, split_sha256=hashes)
    rows = by_run(summarize.summarize([moved]).rows)
    assert rows["a"]["seeds_n"] == rows["b"]["seeds_n"] == "2" and rows["c"]["seeds_n"] == "1"
    # A lossy cache of the test images only still changes what was measured.
    caches = {"train": EXACT, "val": EXACT, "test": lossy(384)}
    only_test = summarize.Run(root / "x" / "results_test.json", {}, run_record(caches))
    assert only_test.image_cache() == "lossy 384 px (test)"


def test_a_run_scored_on_part_of_its_split_says_so(tmp_path, caplog):
    """A run whose test skipped unreadable images (--skip_bad) shows 'n of N' images and is
    named in a warning: its AUROC is not one on the whole split."""
    run(tmp_path, "whole", "lora", 0, 0.8)
    part = run(tmp_path, "part", "lora", 1, 0.7)
    res = json.loads((part / "results_test.json").read_text())
    res.update(num_images=49, split_images=50,
               skipped=[{"line": 7, "path": "x.png", "reason": "cannot decode"}])
    (part / "results_test.json").write_text(json.dumps(res))
    with caplog.at_level(logging.WARNING):
        summarize.main([str(tmp_path), "--output", str(tmp_path / "summary")])
    rows = by_run(read_csv(tmp_path / "summary.csv"))
    assert rows["part"]["num_images"] == "49 of 50" and rows["whole"]["num_images"] == "50"
    assert "49 of the 50 images" in caplog.text and str(part) in caplog.text


def test_a_seed_twice_in_one_setting_is_named(tmp_path, caplog):
    """Two folders of one setting with the same seed (a copied run) would be averaged as two
    seeds: the summary names them."""
    run(tmp_path, "a", "lora", 0, 0.8)
    run(tmp_path, "a_copy", "lora", 0, 0.8)
    run(tmp_path, "b", "lora", 1, 0.7)
    with caplog.at_level(logging.WARNING):
        summarize.main([str(tmp_path), "--output", str(tmp_path / "summary")])
    assert "seed 0 appears 2 times" in caplog.text and "a_copy" in caplog.text
    assert "seed 1 appears" not in caplog.text


def test_a_stopped_run_continued_elsewhere_is_not_incomplete(tmp_path, caplog):
    """A run stopped in A and continued into B (--resume A/checkpoint-last): A has no results
    of its own, B has them; the summary is complete (exit 0) and says where A went."""
    stopped = tmp_path / "A"
    stopped.mkdir()
    (stopped / "config.json").write_text(json.dumps(run_record(seed=0, method="lora")))
    b = run(tmp_path, "B", "lora", 0, 0.8)
    config = json.loads((b / "config.json").read_text())
    config["resumed_from"] = str(stopped / "checkpoint-last")
    (b / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO):
        assert summarize.main([str(tmp_path), "--output", str(tmp_path / "summary")]) == 0
    assert "continued in" in caplog.text and "without results_test.json" not in caplog.text
    (b / "config.json").write_text(json.dumps({**config, "resumed_from": None}))
    assert summarize.main([str(tmp_path), "--output", str(tmp_path / "summary"),
                           "--overwrite"]) == 1


def test_a_results_file_copied_from_another_run_is_left_out(tmp_path):
    """A results_test.json copied into another run's folder would count that run twice, as its
    own method and seed: its checkpoint's settings contradict the folder's config.json."""
    full, lora_run = run(tmp_path, "full_s0", "full", 0, 0.60), run(tmp_path, "lora_s1", "lora", 1, 0.70)
    run(tmp_path, "lora_s0", "lora", 0, 0.72)
    (lora_run / "results_test.json").write_bytes((full / "results_test.json").read_bytes())
    summary = summarize.summarize([tmp_path])
    assert sorted(Path(r["run"]).name for r in summary.rows) == ["full_s0", "lora_s0"]
    (error,) = summary.errors
    assert error.startswith(f"{lora_run / 'results_test.json'}: not the results of the run in {lora_run}")
    assert ": the method, seed its checkpoint was trained with differ from that folder's config.json" in error
    # A run continued to more epochs keeps its results: epochs is no part of a run's identity.
    longer = json.loads((full / "config.json").read_text())
    longer["settings"]["epochs"] = 200
    (full / "config.json").write_text(json.dumps(longer))
    assert not summarize.summarize([full]).errors


@pytest.mark.parametrize("key, value", [("intervals", "oops"), ("seed", "abc"), ("seed", True),
                                        ("trainable_params", "many"), ("total_params", 1.5)])
def test_a_malformed_field_of_a_results_file_is_one_line(tmp_path, key, value):
    folder = run(tmp_path, "a", "lora", 0, 0.8)
    results = json.loads((folder / "results_test.json").read_text())
    (folder / "results_test.json").write_text(json.dumps({**results, key: value}))
    summary = summarize.summarize([tmp_path])
    assert summary.rows == [] and summary.errors == [
        f"{folder / 'results_test.json'}: {key!r} is {json.dumps(value)}, not "
        f"{'an object' if key == 'intervals' else 'a whole number'}"]
