"""util.compare: two runs' predictions joined on the image path, paired differences, refusals."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from util import compare
from util.stats import paired_comparison

CLASSES = ["Mass", "Nodule", "Hernia"]


def write_predictions(path, paths, probs, targets, classes=CLASSES):
    """The layout main_finetune_lora.write_predictions uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *classes, *(f"label_{c}" for c in classes)])
        for p, pr, t in zip(paths, probs, targets):
            w.writerow([p, *(f"{v:.8f}" for v in pr), *(int(v) for v in t)])


def two_runs(root, n=70, seed=0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < 0.3).astype(int)
    targets[:, 2] = 0
    targets[0, 2] = 1  # Hernia: one positive, no interval
    a = np.clip(rng.random((n, 3)) * 0.6 + 0.4 * targets, 0, 1)
    b = np.clip(rng.random((n, 3)) * 0.8 + 0.2 * targets, 0, 1)
    paths = [f"images/{i:05d}.png" for i in range(n)]
    write_predictions(root / "lora" / "predictions_test.csv", paths, a, targets)
    perm = rng.permutation(n)  # B lists the images in another order
    write_predictions(root / "full" / "predictions_test.csv", [paths[i] for i in perm], b[perm],
                      targets[perm])
    return paths, targets, a, b


def test_compare_joins_on_path_and_writes_outputs(tmp_path, capsys):
    paths, targets, a, b = two_runs(tmp_path)
    out = tmp_path / "cmp"
    rc = compare.main([str(tmp_path / "lora"), str(tmp_path / "full"), "--out", str(out),
                       "--resamples", "50", "--plot"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "# lora vs full" in printed
    expected = paired_comparison(targets, a, b, CLASSES, resamples=50, seed=0)
    result = json.loads((out / "comparison.json").read_text())
    assert result["run_a"] == "lora" and result["run_b"] == "full"
    for name in ("Mass", "Nodule"):
        for key in ("auroc_a", "auroc_b", "diff", "ci_low", "ci_high", "p_bootstrap", "delong_p"):
            assert result["classes"][name][key] == pytest.approx(expected["classes"][name][key])
    assert result["mean"]["ci_low"] == pytest.approx(expected["mean"]["ci_low"])
    assert result["classes"]["Hernia"]["ci_low"] is None
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == [*CLASSES, "mean"]
    assert rows[0]["diff"] == f"{100 * expected['classes']['Mass']['diff']:.2f}"
    md = (out / "comparison.md").read_text()
    assert "unstratified" in md
    assert "- Mass, Nodule: 30 or fewer positives (or negatives); there both intervals" in md
    assert "| **mean** |" in md and "- Hernia: no interval" in md
    for ext in ("png", "svg"):
        plot = out / f"comparison_forest.{ext}"
        assert plot.is_file() and plot.stat().st_size > 5_000
    with Image.open(out / "comparison_forest.png") as img:
        pixels = np.asarray(img.convert("L"))
        assert pixels.std() > 10  # not a blank canvas


def test_bootstrap_floor_counts_the_defined_resamples():
    """Of 1000 resamples, 500 drew no positive: the p-value's floor is 2 / (500 + 1), as
    util.stats computes it over the defined resamples, not 2 / (1000 + 1)."""
    def entry(p, undefined):
        return {"auroc_a": 0.9, "auroc_b": 0.6, "diff": 0.3, "ci_low": 0.1, "ci_high": 0.5,
                "p_bootstrap": p, "delong_p": 0.01, "n_pos": 3, "n_undefined_resamples": undefined,
                "note": None}

    result = {"n_resamples": 1000, "classes": {"Mass": entry(2 / 501, 500),
                                               "Nodule": entry(2 / 1001, 0)},
              "mean": entry(2 / 801, 200)}
    cells = {r["class"]: r["p_bootstrap"] for r in compare.table_rows(result)}
    assert cells == {"Mass": "<=0.0040", "Nodule": "<=0.0020", "mean": "<=0.0025"}
    result["classes"]["Mass"]["p_bootstrap"] = 0.01  # above the floor: the value itself
    assert compare.table_rows(result)[0]["p_bootstrap"] == "0.0100"


def test_compare_refuses_mismatched_test_sets(tmp_path, capsys):
    paths, targets, a, b = two_runs(tmp_path)
    other = tmp_path / "other" / "predictions_test.csv"
    write_predictions(other, [*paths[:-1], "images/extra.png"], b, targets)
    with pytest.raises(compare.ComparisonError, match=r"1 only in .*lora.*images/00069.png.*"
                                                       r"1 only in .*other.*images/extra.png"):
        compare.compare(compare.read_predictions(tmp_path / "lora" / "predictions_test.csv"),
                        compare.read_predictions(other))
    flipped = targets.copy()
    flipped[5, 1] = 1 - flipped[5, 1]
    write_predictions(other, paths, b, flipped)
    with pytest.raises(compare.ComparisonError, match="labels differ on 1 images, e.g. "
                                                       "images/00005.png Nodule"):
        compare.compare(compare.read_predictions(tmp_path / "lora" / "predictions_test.csv"),
                        compare.read_predictions(other))
    write_predictions(other, paths, b, targets, classes=["Mass", "Nodule", "Edema"])
    assert compare.main([str(tmp_path / "lora"), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m util.compare: error: the runs have different classes")
    assert err.count("\n") == 1
    broken = tmp_path / "broken.csv"
    broken.write_text("path,Mass,label_Mass\na.png,0.5,1\na.png,0.4,0\n")
    with pytest.raises(compare.ComparisonError, match="appears twice"):
        compare.read_predictions(broken)
    broken.write_text("path,Mass,label_Mass\na.png,0.5\n")
    with pytest.raises(compare.ComparisonError, match="line 2: 2 cells"):
        compare.read_predictions(broken)
    with pytest.raises(FileNotFoundError, match="no predictions_test.csv"):
        compare.predictions_file(tmp_path)


def test_an_uncertain_label_or_a_binary_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "uncertain.csv"
    bad.write_text("path,Mass,Nodule,label_Mass,label_Nodule\na.png,0.5,0.2,1,0\nb.png,0.4,0.3,0,-1\n")
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(b"path,Mass,label_Mass\n\xe9x.png,0.5,1\n")
    for path, said in ((bad, f"{bad}, line 3: label_Nodule is -1, expected a 0/1 label"),
                       (latin, f"{latin}: not a UTF-8 text file (byte 21)")):
        assert compare.main([str(path), str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m util.compare: error: {said}") and err.count("\n") == 1


def test_out_that_is_a_file_is_named_as_one(tmp_path, capsys):
    two_runs(tmp_path)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(SystemExit) as stop:
        compare.main([str(tmp_path / "lora"), str(tmp_path / "full"), "--out", str(mine)])
    assert stop.value.code == 2 and f"--out: {mine} is a file, not a folder" in capsys.readouterr().err
    assert mine.read_text() == "mine"
