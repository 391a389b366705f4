"""External validation: the class map between data sets, and a checkpoint scored on another
data set's split (only the shared classes, the right output columns, what was left out)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints as ckpt
import datasets
import evaluation
import methods
from datasets.class_map import CLASS_MAP_FILE, ClassMapError, match_classes, read_class_map
from datasets.constants import CLASS_NAMES
from tests._fakes import trained_checkpoint
from util.metrics import binary_auroc
from util.runfolder import RunFolder

CHEXPERT = CLASS_NAMES["chexpert"]
NIH = CLASS_NAMES["nih"]


def test_the_shipped_map_pairs_the_shared_findings_by_their_exact_names():
    table = read_class_map()
    assert table.source == str(CLASS_MAP_FILE) and set(table.kinds) == {"nih", "chexpert", "rsna"}
    match = match_classes(NIH, "nih", CHEXPERT, "chexpert", table)
    assert match.rule == "class map"
    assert match.pairs == [("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"),
                           ("Consolidation", "Consolidation"), ("Edema", "Edema"),
                           ("Pleural Effusion", "Effusion")]
    assert match.left_out_dataset == []
    assert match.left_out_checkpoint == [c for c in NIH if c not in
                                         ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                          "Effusion")]
    # The other direction, and NIH <-> RSNA.
    back = match_classes(CHEXPERT, "chexpert", NIH, "nih", table)
    assert [d for d, _ in back.pairs] == ["Atelectasis", "Cardiomegaly", "Effusion",
                                          "Consolidation", "Edema"]  # NIH's column order
    assert match_classes(NIH, "nih", ["Pneumonia"], "rsna", table).pairs == [("Pneumonia", "Pneumonia")]
    assert match_classes(NIH, "nih", NIH, "nih", table).mapped is False


def test_no_shared_class_is_one_line_error():
    with pytest.raises(ClassMapError) as err:
        match_classes(CHEXPERT, "chexpert", ["Pneumonia"], "rsna", read_class_map())
    assert "share no class" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ClassMapError, match="no class has the same name"):
        match_classes(["Mass"], "custom", ["Nodule"], "custom", None)


def test_a_misspelt_or_repeated_name_in_a_map_names_its_line(tmp_path):
    bad = tmp_path / "map.csv"
    bad.write_text("# comment\nnih,chexpert\nEffusion,Pleural_Effusion\n")
    with pytest.raises(ClassMapError, match=r"map.csv:3: 'Pleural_Effusion' is not a chexpert class"):
        read_class_map(bad)
    bad.write_text("nih,chexpert\nEffusion,Pleural Effusion\nEdema,Pleural Effusion\n")
    with pytest.raises(ClassMapError, match=r"map.csv:3: chexpert class 'Pleural Effusion' is also on line 2"):
        read_class_map(bad)
    bad.write_text("nih,chexpert\nEdema\n")
    with pytest.raises(ClassMapError, match=r"map.csv:2: 1 cells"):
        read_class_map(bad)


def test_an_edited_map_decides_what_is_shared(tmp_path):
    own = tmp_path / "map.csv"
    own.write_text("nih,chexpert\nEdema,Edema\n")
    match = match_classes(NIH, "nih", CHEXPERT, "chexpert", read_class_map(own))
    assert match.pairs == [("Edema", "Edema")] and match.source == str(own)
    assert match.left_out_dataset == ["Atelectasis", "Cardiomegaly", "Consolidation",
                                      "Pleural Effusion"]


def chexpert_like(root, n=24, seed=0):
    """A CheXpert-layout test split of n small JPEGs with 5 labels, each class with both values."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(n, len(CHEXPERT)))
    labels[0], labels[1] = 0, 1
    lines = []
    for i in range(n):
        rel = f"CheXpert-v1.0-small/test/patient{64000 + i}/study1/view1_frontal.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(48, 48), dtype=np.uint8), mode="L").save(root / rel)
        lines.append(f"{rel} {' '.join(map(str, labels[i]))}\n")
    (root / "test_list.txt").write_text("".join(lines))
    return labels


def eval_set(data, kind, size=64):
    transform = datasets.build_transform(is_train=False, recipe="sgd", input_size=size, norm="mrm")
    return datasets.build_dataset("test", data, dataset=kind, transform=transform)


def test_an_nih_checkpoint_is_scored_on_a_chexpert_split_by_the_shared_columns(tmp_path):
    stem, _ = trained_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "CheXpert"
    labels = chexpert_like(data)
    dataset = eval_set(data, "chexpert")
    out = tmp_path / "eval"
    out.mkdir()
    results = evaluation.test_checkpoint(stem, dataset, RunFolder(out), device=torch.device("cpu"),
                                         ci_resamples=0, progress=False,
                                         eval_info={"name": "CheXpert-test_list"})
    assert results["class_names"] == CHEXPERT
    info = results["evaluation"]
    assert info["external"] is True and info["name"] == "CheXpert-test_list"
    assert info["class_map"]["pairs"]["Pleural Effusion"] == "Effusion"
    assert "Mass" in info["class_map"]["left_out_checkpoint"]
    assert info["class_map"]["left_out_dataset"] == []
    assert info["test_set"] == results["test_set"]
    assert results["test_set"]["sha256"] == ckpt.file_sha256(data / "test_list.txt")
    assert results["test_set"]["images"] == 24

    # The checkpoint's own outputs, by hand: each CheXpert column is its NIH class's output.
    model, config = ckpt.load_trained(stem)
    methods.get(config.method).merge(model)
    with torch.no_grad():
        logits = torch.cat([model(dataset[i][0][None]) for i in range(len(dataset))]).numpy()
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    to_nih = {"Pleural Effusion": "Effusion"}
    with open(out / "predictions_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", *CHEXPERT, *(f"label_{c}" for c in CHEXPERT)]
    for k, name in enumerate(CHEXPERT):
        column = NIH.index(to_nih.get(name, name))
        written = np.array([float(r[name]) for r in rows])
        np.testing.assert_allclose(written, probs[:, column], rtol=1e-5, atol=1e-6)
        assert [int(r[f"label_{name}"]) for r in rows] == labels[:, k].tolist()
        assert results["auroc"][name] == pytest.approx(binary_auroc(labels[:, k], probs[:, column]))
    saved = json.loads((out / "results_test.json").read_text())
    assert saved["evaluation"]["external"] is True


def test_a_data_set_sharing_no_class_is_refused_before_evaluating(tmp_path):
    stem, _ = trained_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "other"
    (data / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(data / f"imgs/{i}.png")
    (data / "test_list.txt").write_text("".join(f"imgs/{i}.png {i % 2} 1\n" for i in range(4)))
    (data / "classes.txt").write_text("Fracture\nDevice\n")
    dataset = eval_set(data, "custom")
    out = tmp_path / "eval"
    out.mkdir()
    with pytest.raises(ClassMapError) as err:
        evaluation.test_checkpoint(stem, dataset, RunFolder(out), device=torch.device("cpu"),
                                   ci_resamples=0, progress=False)
    assert "share no class" in str(err.value) and "Fracture" in str(err.value)
    assert not list(out.iterdir())  # nothing written


def test_the_runs_own_classes_are_internal_with_the_test_set_named(tmp_path):
    stem, _ = trained_checkpoint(tmp_path / "ckpt")
    data = datasets.make_demo_dataset(tmp_path / "NIH_demo", num_images=40, image_size=32, seed=2)
    dataset = eval_set(data, "nih")
    out = tmp_path / "final"
    out.mkdir()
    results = evaluation.test_checkpoint(stem, dataset, RunFolder(out), device=torch.device("cpu"),
                                         ci_resamples=0, progress=False, metadata="none")
    assert "evaluation" not in results and results["class_names"] == NIH
    assert results["test_set"]["sha256"] == ckpt.file_sha256(dataset.split_file)
    assert results["test_set"]["name"] == f"{dataset.split_file.parent.name}/test_list.txt"
    assert results["method_tag"] == "r4"
