"""util.summarize: the setting x method table (methods, sizes and trainable counts from the
records) and results on different test sets kept apart, each labelled by its split file's SHA-256."""
import csv
import json
import statistics

import pytest

import main_finetune_lora as mfl
from util import cli
from util import summarize
from util.runfolder import RUN_FORMAT

CLASSES = ["Mass", "Nodule"]
PARSER = mfl.get_args_parser()
EXACT = {"kind": "exact", "size": None, "dir": "/cache/nih", "crop_resize": None}
PAPER, OFFICIAL = "c" * 64, "d" * 64
TOTAL = 85_956_878


def write_run(root, name, *, method, seed, value, tag=None, trainable=159_758, total=TOTAL,
              dataset="nih", size="1%", weights="MRM", test_sha=PAPER,
              test_name="NIH_ChestX-ray/test_list.txt", images=22433, **settings):
    """A finished run: config.json as the training script writes it, results_test.json as
    evaluation.test_checkpoint does (method, method_tag, trainable counts, test_set)."""
    folder = root / name
    folder.mkdir(parents=True)
    defaults = {k: PARSER.get_default(k) for k, role in cli.flag_roles(PARSER).items()
                if role == cli.RUN}
    hashes = {"train": "a" * 64, "val": "b" * 64, "test": test_sha}
    record = {"format": RUN_FORMAT,
              "settings": {**defaults, "dataset": dataset, "data_size": size, "lr": 0.05,
                           "global_batch": 64, "weights_sha256": "f" * 64, "split_sha256": hashes,
                           "pixels": "original pixels", "seed": seed, "method": method, **settings},
              "recipe": cli.recipe_flags(PARSER),
              "execution": {"output_dir": str(root), "run_name": name, "num_workers": 8},
              "data_cache": {s: EXACT for s in ("train", "val", "test")}, "resumed_from": None}
    results = {"split": "test", "dataset": dataset, "data_size": size, "weights": weights,
               "method": method, "method_tag": tag, "model": "vit_base_patch16", "seed": seed,
               "trainable_params": trainable, "total_params": total, "num_images": images,
               "mean_auroc": value, "auroc": {c: value for c in CLASSES}, "class_names": CLASSES,
               "checkpoint": str(folder / "checkpoint-best"),
               "test_set": {"name": test_name, "sha256": test_sha, "images": images}}
    (folder / "config.json").write_text(json.dumps(record))
    (folder / "results_test.json").write_text(json.dumps(results))
    return folder


LORA4 = [0.801, 0.812, 0.795]
FULL = [0.790, 0.784]
DORA = [0.806, 0.809]


def make_comparison(root):
    for seed, v in enumerate(LORA4):
        write_run(root, f"lora_r4_s{seed}", method="lora", tag="r4", seed=seed, value=v, lora_rank=4)
    write_run(root, "lora_r8_s0", method="lora", tag="r8", seed=0, value=0.790, lora_rank=8,
              trainable=307_214, total=TOTAL + 147_456)
    for seed, v in enumerate(FULL):
        write_run(root, f"full_s{seed}", method="full", seed=seed, value=v, trainable=85_806_350,
                  total=85_806_350)
    # A method this summary has never heard of: its name, size and counts come from its records.
    for seed, v in enumerate(DORA):
        write_run(root, f"dora_s{seed}", method="dora", tag="r8", seed=seed, value=v,
                  trainable=319_502, total=86_125_838, lora_rank=8)
    write_run(root, "chex_lora", method="lora", tag="r4", seed=0, value=0.870, dataset="chexpert",
              size="10%", weights="CXR_MAE", test_sha="e" * 64,
              test_name="CheXpert/test_list.txt", images=668, lora_rank=4)


def test_setting_by_method_table_from_the_records(tmp_path):
    make_comparison(tmp_path / "runs")
    summary = summarize.summarize([tmp_path / "runs"])
    columns, lines = summarize.setting_method_table(summary.rows)
    assert columns == ["lora r4", "lora r8", "full", "dora r8"]
    assert [(ln["dataset"], ln["data_size"], ln["weights"]) for ln in lines] == [
        ("nih", "1%", "MRM"), ("chexpert", "10%", "CXR_MAE")]
    nih = lines[0]["cells"]
    for column, values, share in (("lora r4", LORA4, 159_758 / TOTAL),
                                  ("full", FULL, 1.0), ("dora r8", DORA, 319_502 / 86_125_838)):
        (cell,) = nih[column]
        assert cell["n"] == len(values)
        assert cell["mean"] == pytest.approx(100 * statistics.mean(values))
        assert cell["sd"] == pytest.approx(100 * statistics.stdev(values))
        assert cell["trainable_pct"] == f"{100 * share:.2f}"
    assert nih["lora r8"][0]["n"] == 1 and nih["lora r8"][0]["sd"] is None
    assert set(lines[1]["cells"]) == {"lora r4"}
    md = summarize.to_markdown(summary.columns, summary.rows, summary.evaluations)
    section = md.split("## Setting x method")[1].split("\n## ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| data set"))
    assert header == "| data set | data size | weights | lora r4 | lora r8 | full | dora r8 | test set |"
    mean, sd = 100 * statistics.mean(DORA), 100 * statistics.stdev(DORA)
    assert f"{mean:.1f} +- {sd:.1f} (n=2, 0.37%)" in section
    assert "80.3 +- 0.9 (n=3, 0.19%)" in section
    # The data set's own table names each run's method with its size, as the columns do.
    nih_table = md.split("## NIH ChestX-ray14")[1].split("\n## ")[0]
    methods_shown = [line.split(" | ")[2] for line in nih_table.splitlines() if line.startswith("| 1%")]
    assert sorted(methods_shown) == sorted(["LoRA r4"] * 3 + ["LoRA r8", "full", "full", "dora r8", "dora r8"])


def test_two_groups_of_one_method_label_share_a_cell_and_say_how_they_differ(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", method="lora", tag="r4", seed=0, value=0.80, lora_rank=4)
    write_run(root, "b", method="lora", tag="r4", seed=0, value=0.78, lora_rank=4, lr=0.1)
    summary = summarize.summarize([root])
    columns, lines = summarize.setting_method_table(summary.rows)
    assert columns == ["lora r4"] and len(lines) == 1
    cell = lines[0]["cells"]["lora r4"]
    assert sorted(c["variant"] for c in cell) == ["lr=0.05", "lr=0.1"]


def read_csv(path):
    with open(path, newline="") as f:
        return {r["run"].split("/")[-1]: r for r in csv.DictReader(f)}


def evaluation(run_folder, name, value, *, external, sha, test_name, pairs=None):
    """An --eval result as evaluation.test_checkpoint writes it into <run>/eval/<name>."""
    trained = json.loads((run_folder / "results_test.json").read_text())
    folder = run_folder / "eval" / name
    folder.mkdir(parents=True)
    test_set = {"name": test_name, "sha256": sha, "images": 100}
    rule = "class map" if pairs else "same classes"
    res = {**trained, "mean_auroc": value, "auroc": {c: value for c in CLASSES}, "test_set": test_set,
           "evaluation": {"name": name, "data_path": f"/data/{name}", "external": external,
                          "test_set": test_set,
                          "class_map": {"rule": rule, "pairs": pairs or {c: c for c in CLASSES},
                                        "left_out_checkpoint": [], "left_out_dataset": []}}}
    (folder / "results_test.json").write_text(json.dumps(res))


def test_results_on_different_test_sets_never_share_a_column(tmp_path):
    root = tmp_path / "runs"
    paper = write_run(root, "paper_s0", method="lora", tag="r4", seed=0, value=0.806)
    write_run(root, "paper_s1", method="lora", tag="r4", seed=1, value=0.810)
    write_run(root, "official_s0", method="lora", tag="r4", seed=0, value=0.771, test_sha=OFFICIAL,
              test_name="NIH_official/test_list.txt", images=25596)
    evaluation(paper, "CheXpert-test_list", 0.612, external=True, sha="e" * 64,
               test_name="CheXpert/test_list.txt", pairs={"Mass": "Mass", "Pleural Effusion": "Effusion"})
    evaluation(paper, "again", 0.806, external=False, sha=PAPER, test_name="NIH_ChestX-ray/test_list.txt")
    out = tmp_path / "summary"
    assert summarize.main([str(root), "--output", str(out)]) == 0
    rows = read_csv(out.with_suffix(".csv"))
    assert sorted(rows) == ["official_s0", "paper_s0", "paper_s1"]
    assert rows["paper_s0"]["test_sha256"] == PAPER and rows["official_s0"]["test_sha256"] == OFFICIAL
    assert rows["official_s0"]["test_set"] == "NIH_official/test_list.txt"
    assert rows["paper_s0"]["seeds_n"] == "2" and rows["official_s0"]["seeds_n"] == "1"
    md = out.with_suffix(".md").read_text()
    sections = {s.splitlines()[0]: s for s in md.split("\n## ")[1:]}
    paper_head = "NIH ChestX-ray14, test set NIH_ChestX-ray/test_list.txt (sha256 cccccccc, 22,433 images)"
    official_head = "NIH ChestX-ray14, test set NIH_official/test_list.txt (sha256 dddddddd, 25,596 images)"
    assert "paper_s1" in sections[paper_head] and "official_s0" not in sections[paper_head]
    assert "official_s0" in sections[official_head] and "paper_s0" not in sections[official_head]
    _, lines = summarize.setting_method_table(summarize.summarize([root]).rows)
    assert len(lines) == 2 and {ln["test_set"].split(" ")[0] for ln in lines} == {
        "NIH_ChestX-ray/test_list.txt", "NIH_official/test_list.txt"}
    evals = md.split("## Evaluations")[1]
    external = evals.split("### Test set CheXpert/test_list.txt (sha256 eeeeeeee, 100 images)")[1].split("###")[0]
    internal = evals.split("### Test set NIH_ChestX-ray/test_list.txt (sha256 cccccccc, 100 images)")[1]
    assert "| external | Mass, Pleural Effusion = Effusion | 61.2 |" in external and "80.6" not in external
    assert "| internal | all | 80.6 |" in internal and "61.2" not in internal
