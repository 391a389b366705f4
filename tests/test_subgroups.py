"""Subgroups: the official metadata readers, the join by image path (missing records counted),
age band edges, per-subgroup AUROC against a direct computation, the gap tests, the report files."""
import json
import logging
import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
import torch

import datasets
import evaluation
from datasets.errors import DataUsageError
from datasets.metadata import (ImageMeta, Metadata, MetadataError, find_metadata_files,
                               read_dicom_metadata, read_metadata, read_metadata_files,
                               resolve_metadata)
from datasets.synthetic import write_dicom
from tests._fakes import trained_checkpoint
from util.metrics import binary_auroc
from util.runfolder import RunFolder
from util.stats import delong_covariance
from util.subgroups import age_band, subgroup_report

# NIH's header splits "OriginalImage[Width,Height]" into two columns, as the real file does.
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
CHEX_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Edema\n"


@pytest.mark.parametrize("age,band", [(0, "<40"), (39, "<40"), (40, "40-59"), (59, "40-59"),
                                      (60, "60-79"), (79, "60-79"), (80, "80+"), (120, "80+"),
                                      (None, None)])
def test_age_bands_hold_their_lower_edge(age, band):
    assert age_band(age) == band


def test_nih_data_entry_is_read_and_joined_to_split_paths(tmp_path):
    f = tmp_path / "Data_Entry_2017.csv"
    f.write_text(NIH_HEADER
                 + "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n"
                 + "00000002_000.png,No Finding,0,2,081Y,F,AP,2500,2048,0.168,0.168\n"
                 + "00000003_000.png,Hernia,0,3,414,F,PA,2500,2048,0.168,0.168\n")
    meta = read_metadata(f)
    assert meta.implausible_ages == 1 and "(e.g. line 4)" in meta.notes[0]
    found = meta.lookup(["00000001_000.png", "all_classes/00000002_000.png", "00000003_000.png",
                         "00000009_000.png"])
    assert (found[0].sex, found[0].age, found[0].view) == ("M", 58, "PA")
    assert (found[1].sex, found[1].age, found[1].view) == ("F", 81, "AP")
    assert found[2].age is None and found[2].sex == "F"   # 414 years: unknown, counted
    assert found[3] is None
    assert found[0].where == f"{f}:2"


def test_chexpert_csv_views_and_unknown_sex(tmp_path):
    f = tmp_path / "valid.csv"
    f.write_text(CHEX_HEADER
                 + "CheXpert-v1.0-small/valid/patient1/study1/view1_frontal.jpg,Male,73,Frontal,AP,,1\n"
                 + "CheXpert-v1.0-small/valid/patient1/study1/view2_lateral.jpg,Male,73,Lateral,,,1\n"
                 + "CheXpert-v1.0-small/valid/patient2/study1/view1_frontal.jpg,Unknown,0,Frontal,,1,\n")
    found = read_metadata(f).lookup([
        "CheXpert-v1.0-small/valid/patient1/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/valid/patient1/study1/view2_lateral.jpg",
        "valid/patient2/study1/view1_frontal.jpg"])   # shorter than the key: found by its end
    assert [(r.sex, r.age, r.view) for r in found] == [("M", 73, "AP"), ("M", 73, "LAT"),
                                                       (None, 0, "FRONTAL")]


def test_own_table_and_the_join_rules(tmp_path):
    f = tmp_path / "metadata.csv"
    f.write_text("path,sex,age\n"
                 "test/patient7/study1/view1_frontal.jpg,female,44\n"
                 "a/study1/view1_frontal.jpg,M,50\n"
                 "b/study1/view1_frontal.jpg,F,51\n")
    meta = read_metadata(f)
    found = meta.lookup(["CheXpert-v1.0-small/test/patient7/study1/view1_frontal.jpg",
                         "study1/view1_frontal.jpg"])     # the end of two keys: neither
    assert (found[0].sex, found[0].age, found[0].view) == ("F", 44, None)
    assert found[1] is None


@pytest.mark.parametrize("row,message", [
    ("00000001_000.png,x,0,1,58,X,PA,1,1,1,1", r"Data_Entry_2017.csv:2: sex 'X'"),
    ("00000001_000.png,x,0,1,abc,M,PA,1,1,1,1", r"Data_Entry_2017.csv:2: age 'abc'"),
    ("00000001_000.png,x,0,1,58", r"Data_Entry_2017.csv:2: 5 cells"),
])
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path, row, message):
    f = tmp_path / "Data_Entry_2017.csv"
    f.write_text(NIH_HEADER + row + "\n")
    with pytest.raises(MetadataError, match=message) as err:
        read_metadata(f)
    assert "\n" not in str(err.value)


def test_a_file_of_another_kind_or_a_repeated_image_is_refused(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("Image Index,Patient Age\n1.png,4\n")
    with pytest.raises(MetadataError, match=r"train.csv:1: .*lacks the column\(s\) \['Patient Gender'"):
        read_metadata(f)
    f.write_text("filename,label\n1.png,1\n")
    with pytest.raises(MetadataError, match="not a metadata table"):
        read_metadata(f)
    f.write_text("path,sex\n1.png,M\n1.png,F\n")
    with pytest.raises(MetadataError, match=r"train.csv:3: image '1.png' is also on .*train.csv:2"):
        read_metadata(f)
    g = tmp_path / "valid.csv"
    g.write_text("path,sex\n1.png,M\n")
    f.write_text("path,sex\n2.png,M\n")
    assert len(read_metadata_files([f, g]).records) == 2
    f.write_text("path,sex\n1.png,M\n")
    with pytest.raises(MetadataError, match="also on"):
        read_metadata_files([f, g])


def test_dicom_headers_give_sex_age_and_view(tmp_path):
    pixels = np.zeros((8, 8), dtype=np.uint8)
    warnings.simplefilter("ignore", UserWarning)  # pydicom on RSNA's '61' and the bad 'old'
    a = write_dicom(tmp_path / "a.dcm", pixels, PatientSex="F", PatientAge="058Y", ViewPosition="AP")
    b = write_dicom(tmp_path / "b.dcm", pixels, PatientSex="M", PatientAge="61", ViewPosition="PA")
    c = write_dicom(tmp_path / "c.dcm", pixels)                      # no such elements
    meta = read_dicom_metadata([str(a), str(b), str(c)], ["imgs/a.dcm", "imgs/b.dcm", "imgs/c.dcm"])
    found = meta.lookup(["imgs/a.dcm", "imgs/b.dcm", "imgs/c.dcm"])
    assert [(r.sex, r.age, r.view) for r in found] == [("F", 58, "AP"), ("M", 61, "PA"),
                                                       (None, None, None)]
    bad = write_dicom(tmp_path / "bad.dcm", pixels, PatientAge="old")
    with pytest.raises(MetadataError, match=r"bad.dcm \(DICOM header\) PatientAge: age 'old'"):
        read_dicom_metadata([str(bad)], ["bad.dcm"])
    png = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(pixels, mode="L").save(png)
    with pytest.raises(MetadataError, match=r"x.png: a PNG image has no DICOM header"):
        read_dicom_metadata([str(png)], ["x.png"])


def synthetic(n=600, seed=0):
    """Scores that separate the classes well for women and not at all for men; ages spread."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, size=(n, 2))
    sex = np.array(["F", "M"])[rng.integers(0, 2, n)]
    signal = np.where(sex[:, None] == "F", 2.0, 0.0)
    probs = 1 / (1 + np.exp(-(signal * (targets - 0.5) + rng.normal(size=(n, 2)))))
    ages = rng.integers(20, 95, n)
    paths = [f"img{i}.png" for i in range(n)]
    records = {}
    for i in range(n):
        if i % 30 == 0:
            continue                                # no record: 20 images
        records[paths[i]] = ImageMeta(None if i % 25 == 0 else str(sex[i]), int(ages[i]),
                                      "PA" if i % 3 else "AP", "test")
    return targets, probs, paths, Metadata(records, "synthetic"), sex, ages


def test_subgroup_aurocs_equal_a_direct_computation_and_every_image_is_counted():
    targets, probs, paths, meta, sex, ages = synthetic()
    report = subgroup_report(targets, probs, paths, ["A", "B"], meta, resamples=200, seed=0)
    assert report["n_without_metadata"] == 20 and "20 of 600 images" in report["notes"][0]
    has = np.array([p in meta.records for p in paths])
    unknown_sex = np.array([has[i] and meta.records[p].sex is None for i, p in enumerate(paths)])
    entry = report["attributes"]["sex"]
    assert entry["unknown"] == int(unknown_sex.sum()) > 0
    assert sum(g["n_images"] for g in entry["groups"].values()) + entry["unknown"] + 20 == 600
    for name, group in entry["groups"].items():
        rows = has & ~unknown_sex & (sex == name)
        assert group["n_images"] == rows.sum()
        for k, cls in enumerate(["A", "B"]):
            assert group["classes"][cls]["auroc"] == pytest.approx(binary_auroc(targets[rows, k], probs[rows, k]))
    bands = report["attributes"]["age"]["groups"]
    assert list(bands) == ["<40", "40-59", "60-79", "80+"]
    rows = has & (ages >= 60) & (ages < 80)
    assert bands["60-79"]["n_images"] == rows.sum()
    assert bands["60-79"]["classes"]["A"]["auroc"] == pytest.approx(binary_auroc(targets[rows, 0], probs[rows, 0]))
    assert set(report["attributes"]["view"]["groups"]) == {"AP", "PA"}


def test_the_gap_tests_are_those_of_two_independent_groups():
    targets, probs, paths, meta, sex, _ = synthetic()
    report = subgroup_report(targets, probs, paths, ["A", "B"], meta, resamples=300, seed=0)
    gap = report["attributes"]["sex"]["gap"]
    groups = report["attributes"]["sex"]["groups"]
    mean = gap["mean"]
    assert (mean["high"], mean["low"]) == ("F", "M")
    assert mean["diff"] == pytest.approx(groups["F"]["mean"]["auroc"] - groups["M"]["mean"]["auroc"])
    assert mean["ci_low"] < mean["diff"] < mean["ci_high"] and mean["ci_low"] > 0
    assert mean["p_bootstrap"] < 0.01 and mean["p_adjusted"] == mean["p_bootstrap"]  # one pair
    has = np.array([p in meta.records and meta.records[p].sex is not None for p in paths])
    for k, cls in enumerate(["A", "B"]):
        se = {}
        for name in ("F", "M"):
            rows = has & (sex == name)
            se[name] = math.sqrt(delong_covariance(targets[rows, k], probs[rows, k][None])[1][0, 0])
        c = gap["classes"][cls]
        z = c["diff"] / math.sqrt(se["F"] ** 2 + se["M"] ** 2)
        assert c["delong_z"] == pytest.approx(z)
        assert c["delong_p"] == pytest.approx(2 * (1 - NormalDist().cdf(abs(z))))
    age = report["attributes"]["age"]["gap"]["mean"]
    assert age["p_adjusted"] == pytest.approx(min(1.0, 6 * age["p_bootstrap"]))  # 4 bands: 6 pairs


def test_a_tied_gap_names_two_subgroups():
    """Two subgroups of equal AUROC: the gap is 0 between them, never a subgroup against itself."""
    targets = np.array([[1], [1], [0], [0]] * 4)
    probs = np.array([[0.9], [0.8], [0.2], [0.1]] * 4)
    paths = [f"img{i}.png" for i in range(16)]
    meta = Metadata({p: ImageMeta("M" if i < 8 else "F", 50, "PA", "test") for i, p in enumerate(paths)},
                    "tied")
    gap = subgroup_report(targets, probs, paths, ["A"], meta, resamples=50)["attributes"]["sex"]["gap"]
    for entry in (gap["classes"]["A"], gap["mean"]):
        assert {entry["high"], entry["low"]} == {"F", "M"} and entry["diff"] == 0


def test_metadata_is_found_beside_the_split_or_given(tmp_path, caplog):
    data = datasets.make_demo_dataset(tmp_path / "NIH_demo", num_images=40, image_size=32, seed=3)
    ds = datasets.build_dataset("test", data, dataset="nih")
    kw = dict(split_file=ds.split_file, paths=ds.paths, files=ds.files, kind="nih")
    assert resolve_metadata(None, **kw) is None                      # nothing there: off
    entry = data / "Data_Entry_2017.csv"
    entry.write_text(NIH_HEADER + "".join(f"{p},x,0,1,{30 + i},{'MF'[i % 2]},PA,1,1,1,1\n"
                                          for i, p in enumerate(ds.paths[:-1])))
    assert find_metadata_files(ds.split_file, ds.paths, ds.files, "nih") == [entry]
    meta = resolve_metadata(None, **kw)
    assert meta is not None and meta.lookup(ds.paths)[-1] is None
    assert resolve_metadata("none", **kw) is None
    entry.write_text(NIH_HEADER + "1.png,x,0,1,58,Q,PA,1,1,1,1\n")   # found, bad: warned, off
    with caplog.at_level(logging.WARNING):
        assert resolve_metadata(None, **kw) is None
    assert "no subgroups" in caplog.text and "sex 'Q'" in caplog.text
    with pytest.raises(MetadataError, match="sex 'Q'"):               # given, bad: an error
        resolve_metadata(str(entry), **kw)
    with pytest.raises(DataUsageError, match="--metadata .*nothere.csv: no such file"):
        resolve_metadata(str(tmp_path / "nothere.csv"), **kw)
    # A file of other images: an error when given, warned about and off when found.
    other, more = tmp_path / "other.csv", tmp_path / "more.csv"
    other.write_text("path,sex\nelsewhere.png,M\n")
    more.write_text(f"path,sex\n{ds.paths[0]},F\n")
    with pytest.raises(MetadataError, match=rf"names none of the {len(ds.paths)} images"):
        resolve_metadata(str(other), **kw)
    both = resolve_metadata(f"{other},{more}", **kw)            # a comma list: read together
    assert both.lookup(ds.paths[:1])[0].sex == "F"
    entry.write_text(NIH_HEADER + "elsewhere.png,x,0,1,58,M,PA,1,1,1,1\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_metadata(None, **kw) is None
    assert "names none of the" in caplog.text


def test_a_test_with_metadata_writes_the_subgroup_report(tmp_path):
    stem, _ = trained_checkpoint(tmp_path / "ckpt")
    data = datasets.make_demo_dataset(tmp_path / "NIH_demo", num_images=120, image_size=32, seed=4)
    transform = datasets.build_transform(is_train=False, recipe="sgd", input_size=64, norm="mrm")
    ds = datasets.build_dataset("test", data, dataset="nih", transform=transform)
    records = {p: {"sex": "MF"[i % 2], "age": 25 + 3 * i, "view": "PA"}
               for i, p in enumerate(ds.paths) if i != 0}
    out = tmp_path / "eval"
    out.mkdir()
    results = evaluation.test_checkpoint(stem, ds, RunFolder(out), device=torch.device("cpu"),
                                         ci_resamples=50, progress=False, metadata=records)
    report = results["subgroups"]
    assert report["n_without_metadata"] == 1 and report["without_metadata_examples"] == [ds.paths[0]]
    assert set(report["attributes"]["sex"]["groups"]) == {"F", "M"}
    md = (out / "subgroups_test.md").read_text()
    assert "1 of " in md and "have no metadata record" in md and "## sex" in md
    assert "| F |" in md and "Largest gap of the mean AUROC" in md
    # Each subgroup's mean says over how many classes it is (its own defined ones).
    f_row = next(line for line in md.splitlines() if line.startswith("| F |")).split(" | ")
    assert "classes in the mean" in md and f_row[4] == str(report["attributes"]["sex"]["groups"]["F"]["mean"]["n_classes"])
    own = json.loads((out / "run_files.json").read_text())["files"]
    for name in ("subgroups_test.md", "subgroups_test.csv", "subgroups_test.png", "subgroups_test.svg"):
        assert (out / name).is_file() and name in own
    assert json.loads((out / "results_test.json").read_text())["subgroups"]["n_without_metadata"] == 1
