"""The split maker: patient-disjoint, seeded, the paper's CheXpert label policy, parseable output."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasets import ALL_SPLIT_FILES, CLASS_NAMES, parse_split_file
from datasets.make_splits import MetadataError, main, make_splits

NIH = CLASS_NAMES["nih"]


def read_all(out: Path, k: int, kind: str) -> dict:
    return {name: parse_split_file(out / name, k, kind) for name in ALL_SPLIT_FILES}


def patients_of(paths, key) -> set:
    return {key(p) for p in paths}


def nih_metadata(folder: Path, official: bool) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for patient in range(1, 61):
        for follow_up in range(rng.integers(1, 5)):
            findings = [c for c in NIH if rng.random() < 0.1] or ["No Finding"]
            rows.append({"Image Index": f"{patient:08d}_{follow_up:03d}.png",
                         "Finding Labels": "|".join(findings), "Patient ID": patient})
    df = pd.DataFrame(rows)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / "Data_Entry_2017_v2020.csv", index=False)
    if official:
        test = df["Patient ID"] > 45
        (folder / "test_list.txt").write_text("\n".join(df.loc[test, "Image Index"]) + "\n")
        (folder / "train_val_list.txt").write_text("\n".join(df.loc[~test, "Image Index"]) + "\n")
    return folder


@pytest.mark.parametrize("official", [True, False])
def test_nih_splits(tmp_path, official):
    meta = nih_metadata(tmp_path / "meta", official)
    counts = make_splits("nih", meta, tmp_path / "out", seed=0)
    splits = read_all(tmp_path / "out", 14, "nih")
    assert {n: len(t) for n, t in splits.items()} == counts
    by_patient = lambda p: p.split("_")[0]  # noqa: E731
    train, val, test = (patients_of(splits[n].paths, by_patient) for n in ("train_list.txt", "val_list.txt", "test_list.txt"))
    assert not (train & val) and not (train & test) and not (val & test)
    if official:
        assert test == {f"{p:08d}" for p in range(46, 61)}
    df = pd.read_csv(meta / "Data_Entry_2017_v2020.csv").set_index("Image Index")
    table = splits["train_list.txt"]
    for path, row in zip(table.paths, table.targets):
        findings = set(df.loc[path, "Finding Labels"].split("|")) - {"No Finding"}
        assert {NIH[k] for k in np.flatnonzero(row)} == findings
    # train_1 within train_10 within train_list.
    assert set(splits["train_1.txt"].paths) <= set(splits["train_10.txt"].paths) <= set(table.paths)
    assert counts["train_list.txt"] + counts["val_list.txt"] + counts["test_list.txt"] == len(df)


def test_same_seed_same_files(tmp_path):
    meta = nih_metadata(tmp_path / "meta", official=False)
    make_splits("nih", meta, tmp_path / "a", seed=7)
    make_splits("nih", meta, tmp_path / "b", seed=7)
    make_splits("nih", meta, tmp_path / "c", seed=8)
    same = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in ALL_SPLIT_FILES]
    other = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "c" / n).read_bytes() for n in ALL_SPLIT_FILES]
    assert all(same) and not all(other)


def test_chexpert_uncertainty_policy(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    cols = CLASS_NAMES["chexpert"]
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(1, 41):
        for view in ("view1_frontal", "view2_lateral"):
            values = rng.choice([1.0, 0.0, -1.0, np.nan], size=len(cols))
            rows.append({"Path": f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/{view}.jpg",
                         "Frontal/Lateral": view.split("_")[1].title(), **dict(zip(cols, values))})
    train = pd.DataFrame(rows)
    train.to_csv(meta / "train.csv", index=False)
    valid = train.head(6).copy()
    valid["Path"] = valid["Path"].str.replace("/train/patient000", "/valid/patient640")
    valid[cols] = valid[cols].fillna(0).abs()  # the official valid.csv holds only 0 / 1
    valid.to_csv(meta / "valid.csv", index=False)

    make_splits("chexpert", meta, tmp_path / "out", seed=0)
    splits = read_all(tmp_path / "out", 5, "chexpert")
    assert len(splits["val_list.txt"]) == 6
    raw = train.set_index("Path")
    # U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros for Cardiomegaly, Consolidation; blank 0.
    policy = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}
    checked = 0
    for name in ("train_list.txt", "test_list.txt"):
        for path, row in zip(splits[name].paths, splits[name].targets):
            for k, c in enumerate(cols):
                v = raw.loc[path, c]
                want = 0 if np.isnan(v) else policy[c] if v == -1 else int(v)
                assert row[k] == want, (path, c, v)
                checked += 1
    assert checked == 5 * len(train)
    # Both views kept; patient-disjoint train / test.
    assert any("lateral" in p for p in splits["train_list.txt"].paths)
    key = lambda p: p.split("/")[2]  # noqa: E731
    assert not patients_of(splits["train_list.txt"].paths, key) & patients_of(splits["test_list.txt"].paths, key)


@pytest.mark.parametrize("prefix", ["", "CheXpert-v1.0-small/"])
def test_chexpert_test_labels_join_train_csvs_folder(tmp_path, prefix):
    """The test labels' CSV names its images test/patient...; train.csv CheXpert-v1.0-small/...:
    the test list is written as the paper's, under the same top folder."""
    meta = tmp_path / "meta"
    meta.mkdir()
    cols = CLASS_NAMES["chexpert"]
    rows = [{"Path": f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_frontal.jpg", **{c: 1.0 for c in cols}}
            for p in range(1, 41)]
    pd.DataFrame(rows).to_csv(meta / "train.csv", index=False)
    test = [{"Path": f"{prefix}test/patient{p:05d}/study1/view1_frontal.jpg", **{c: 0 for c in cols}}
            for p in (64741, 64742)]
    pd.DataFrame(test).to_csv(meta / "test_labels.csv", index=False)
    make_splits("chexpert", meta, tmp_path / "out", seed=0)
    assert parse_split_file(tmp_path / "out" / "test_list.txt", 5, "chexpert").paths == [
        f"CheXpert-v1.0-small/test/patient{p}/study1/view1_frontal.jpg" for p in (64741, 64742)]


def test_rsna_one_line_per_image_with_trailing_space(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    rows = [{"patientId": f"id{i:03d}", "x": None, "y": None, "width": None, "height": None, "Target": 0}
            for i in range(100)]
    rows += [{"patientId": "id007", "x": 1, "y": 2, "width": 3, "height": 4, "Target": 1}] * 2  # two boxes
    pd.DataFrame(rows).iloc[::-1].to_csv(meta / "stage_2_train_labels.csv", index=False)
    counts = make_splits("rsna", meta, tmp_path / "out", seed=0)
    assert counts["train_list.txt"] + counts["val_list.txt"] + counts["test_list.txt"] == 100
    text = "".join((tmp_path / "out" / n).read_text() for n in ("train_list.txt", "val_list.txt", "test_list.txt"))
    assert "stage_2_train_images/id007.dcm 1 \n" in text
    assert all(line.endswith(" ") for line in text.splitlines())
    assert text.count("id007") == 1


def test_bad_metadata(tmp_path, capsys):
    with pytest.raises(MetadataError, match="no Data_Entry_2017"):
        make_splits("nih", tmp_path, tmp_path / "out")
    pd.DataFrame([{"Image Index": "a.png", "Finding Labels": "Flu", "Patient ID": 1}]).to_csv(
        tmp_path / "Data_Entry_2017.csv", index=False)
    with pytest.raises(MetadataError, match=r"Data_Entry_2017.csv:2: unknown finding 'Flu'"):
        make_splits("nih", tmp_path, tmp_path / "out")
    with pytest.raises(SystemExit):
        main(["nih", "--metadata", str(tmp_path), "--out", str(tmp_path / "o"), "--val_fraction", "2"])
    assert "--val_fraction 2.0" in capsys.readouterr().err



def test_command_line_bad_metadata_is_one_line(tmp_path, capsys):
    pd.DataFrame([{"Image": "a.png", "Finding Labels": "Mass", "Patient": 1}]).to_csv(
        tmp_path / "Data_Entry_2017.csv", index=False)
    # The message, no traceback: the command's error boundary turns it into one line and exit 1.
    from util import cli

    assert cli.run(main, ["nih", "--metadata", str(tmp_path), "--out", str(tmp_path / "out")],
                   prog="python -m datasets.make_splits") == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m datasets.make_splits: error: ")
    assert "Data_Entry_2017.csv: missing column(s) ['Image Index', 'Patient ID']" in line
    assert not (tmp_path / "out").exists()
