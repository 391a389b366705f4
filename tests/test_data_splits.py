"""Split files: the paper's published lists parse, kinds are inferred, split folders are found."""
from pathlib import Path

import numpy as np
import pytest

from datasets import (
    CLASS_NAMES,
    NORM_STATS,
    SPLIT_FILES,
    SplitFileError,
    build_dataset,
    infer_dataset_kind,
    locate_split_file,
    parse_split_file,
    resolve_image_path,
)
from datasets.splits import DEFAULT_SPLITS_ROOT

# Line counts per data set of the paper's published files; None: not in ../shared (CheXpert's train_list is > 4 MB).
EXPECTED_LINES = {
    "NIH_ChestX-ray": ("nih", {"1%": 785, "10%": 7847, "100%": 78468, "val": 11219, "test": 22433}),
    "CheXpert": ("chexpert", {"1%": 2234, "10%": 22341, "100%": None, "val": 234, "test": 668}),
    "RSNA_Pneumonia": ("rsna", {"1%": 251, "10%": 2518, "100%": 25184, "val": 1500, "test": 3000}),
}


def test_class_names_and_norm_stats():
    assert len(CLASS_NAMES["nih"]) == 14 and CLASS_NAMES["nih"][0] == "Atelectasis"
    assert CLASS_NAMES["nih"][12:] == ["Pleural_Thickening", "Hernia"]
    assert CLASS_NAMES["chexpert"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert CLASS_NAMES["rsna"] == ["Pneumonia"]
    assert NORM_STATS["mrm"] == ((0.4978,) * 3, (0.2449,) * 3)
    assert NORM_STATS["cxr_mae"] == ((0.4785,) * 3, (0.2834,) * 3)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    assert NORM_STATS["imagenet"] == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert SPLIT_FILES["train"] == {"1%": "train_1.txt", "10%": "train_10.txt", "100%": "train_list.txt"}
    assert (SPLIT_FILES["val"], SPLIT_FILES["test"]) == ("val_list.txt", "test_list.txt")


@pytest.mark.parametrize("folder", sorted(EXPECTED_LINES))
def test_reference_splits_parse(reference_splits, tmp_path, folder):
    kind, expected = EXPECTED_LINES[folder]
    data_path = tmp_path / folder  # the folder name alone must select the kind
    data_path.mkdir()
    assert infer_dataset_kind(data_path) == kind
    k = len(CLASS_NAMES[kind])
    for key, lines in expected.items():
        split, size = ("train", key) if key.endswith("%") else (key, "100%")
        if lines is None:
            with pytest.raises(SplitFileError, match="train_list.txt"):
                build_dataset(split, data_path, data_size=size, split_dir=reference_splits / folder, check_files=False)
            continue
        ds = build_dataset(split, data_path, data_size=size, split_dir=reference_splits / folder, check_files=False)
        assert ds.kind == kind and ds.class_names == CLASS_NAMES[kind]
        assert len(ds) == lines, (folder, key)
        assert ds.targets.shape == (lines, k)
        assert set(np.unique(ds.targets)) <= {0, 1}
        assert ds.targets.sum() > 0 and ds.targets.min() == 0
        assert len(set(ds.paths)) == len(ds.paths)
    if kind == "nih":
        name = ds.paths[0]
        assert name.endswith(".png") and "/" not in name
        assert Path(ds.files[0]) == data_path / "all_classes" / name
    else:
        assert Path(ds.files[0]) == data_path / ds.paths[0]


def test_reference_prevalence_is_plausible(reference_splits):
    table = parse_split_file(reference_splits / "NIH_ChestX-ray" / "train_10.txt", 14, "nih")
    prevalence = dict(zip(CLASS_NAMES["nih"], table.targets.mean(0)))
    # Infiltration is NIH's most common finding, Hernia its rarest.
    assert max(prevalence, key=prevalence.get) == "Infiltration"
    assert min(prevalence, key=prevalence.get) == "Hernia"


def test_rsna_trailing_space_and_no_final_newline(tmp_path):
    f = tmp_path / "val_list.txt"
    f.write_text("stage_2_train_images/a.dcm 0 \r\nstage_2_train_images/b.dcm 1 ")
    table = parse_split_file(f, 1, "rsna")
    assert table.paths == ["stage_2_train_images/a.dcm", "stage_2_train_images/b.dcm"]
    assert table.targets[:, 0].tolist() == [0, 1] and table.lines == [1, 2]


@pytest.mark.parametrize("name,kind", [
    ("NIH_ChestX-ray", "nih"), ("ChestX-ray14", "nih"), ("nih", "nih"), ("chestxray", "nih"),
    ("CheXpert", "chexpert"), ("CheXpert-v1.0-small", "chexpert"), ("RSNA_Pneumonia", "rsna"),
    ("my_hospital", "custom"),
])
def test_infer_dataset_kind(tmp_path, name, kind):
    assert infer_dataset_kind(tmp_path / name) == kind
    assert infer_dataset_kind(str(tmp_path / name) + "/") == kind


@pytest.mark.parametrize("name", ["RSNA_ChestXray", "CheXpert_chestxray", "nih_rsna"])
def test_folder_name_suggesting_two_kinds_is_refused(tmp_path, name):
    """A name matching two kinds would be read with one kind's labels: ask for --dataset."""
    from datasets.errors import DataError

    with pytest.raises(DataError, match="more than one data set kind.*pass --dataset"):
        infer_dataset_kind(tmp_path / name)


def test_infer_kind_from_nih_layout(tmp_path):
    (tmp_path / "demo" / "all_classes").mkdir(parents=True)
    assert infer_dataset_kind(tmp_path / "demo") == "nih"


def test_split_folder_search_order(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "val_list.txt").write_text("a.png 0\n")
    assert locate_split_file("val", data) == data / "val_list.txt"
    other = tmp_path / "splits"
    other.mkdir()
    (other / "val_list.txt").write_text("a.png 1\n")
    assert locate_split_file("val", data, split_dir=other) == other / "val_list.txt"
    # Without split files in data_path, the repository's DatasetsSplits/<basename> is used.
    bare = tmp_path / "NIH_ChestX-ray"
    bare.mkdir()
    with pytest.raises(SplitFileError) as err:
        locate_split_file("test", bare)
    assert str(DEFAULT_SPLITS_ROOT / "NIH_ChestX-ray") in str(err.value)


def test_nih_path_rule():
    assert resolve_image_path("/d/NIH", "00000001_000.png", "nih") == Path("/d/NIH/all_classes/00000001_000.png")
    assert resolve_image_path("/d/c", "CheXpert-v1.0-small/x.jpg", "chexpert") == Path("/d/c/CheXpert-v1.0-small/x.jpg")
    assert resolve_image_path("/d/r", "stage_2_train_images/x.dcm", "rsna") == Path("/d/r/stage_2_train_images/x.dcm")


def test_custom_kind_classes(tmp_path):
    from PIL import Image
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.new("L", (8, 8), 100).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "train_list.txt").write_text("img/a.png 0 1 1\nimg/b.png 1 0 0\n")
    ds = build_dataset("train", tmp_path)
    assert ds.kind == "custom" and ds.class_names == ["class_0", "class_1", "class_2"]
    image, target = ds[1]
    assert target.dtype.is_floating_point and target.tolist() == [1.0, 0.0, 0.0]
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    assert build_dataset("train", tmp_path).class_names == ["cat", "dog", "bird"]
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(SplitFileError) as err:
        build_dataset("train", tmp_path)
    # How many names classes.txt has and how many label columns the split file has.
    assert str(err.value).startswith(f"{tmp_path / 'classes.txt'} names 2 classes but "
                                     f"{tmp_path / 'train_list.txt'} has 3 label columns (line 1: image 'img/a.png')")
    assert "expected" not in str(err.value)


def test_bad_arguments(tmp_path):
    """A programming error names the Python argument; what a user chose names the flag (exit 2)."""
    from util.cli import UsageError

    with pytest.raises(ValueError, match="split='training'"):
        build_dataset("training", tmp_path)
    with pytest.raises(UsageError, match="^--data_size 5%: expected one of 1%, 10%, 100%$"):
        build_dataset("train", tmp_path, data_size="5%")
    with pytest.raises(UsageError, match="^--dataset 'mimic': expected one of"):
        build_dataset("train", tmp_path, dataset="mimic")
    with pytest.raises(UsageError, match=f"^--data_path {tmp_path / 'nope'}: does not exist"):
        build_dataset("train", tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="--data_path .*file: is a file, not a folder"):
        build_dataset("train", tmp_path / "file")


def test_byte_order_mark_is_accepted(tmp_path):
    f = tmp_path / "train_list.txt"
    f.write_bytes("\ufeffimg/a.png 0 1\nimg/b.png 1 0\n".encode("utf-8"))
    table = parse_split_file(f, 2)
    assert table.paths == ["img/a.png", "img/b.png"]  # no invisible character in the first name
    (tmp_path / "classes.txt").write_bytes("\ufeffcat\ndog\n".encode("utf-8"))
    from datasets.splits import split_class_names
    assert split_class_names("custom", [tmp_path])[0] == ["cat", "dog"]


def test_duplicate_lines_are_warned_with_counts_and_examples(tmp_path, caplog):
    f = tmp_path / "train_list.txt"
    f.write_text("a.png 0\nb.png 1\na.png 0\nc.png 0\nb.png 0\na.png 0\n")
    with caplog.at_level("WARNING", logger="datasets.splits"):
        table = parse_split_file(f, 1)
    assert len(table) == 6 and table.duplicates == {"a.png": [1, 3, 6], "b.png": [2, 5]}
    text = caplog.text
    assert str(f) in text and "3 duplicate entries" in text and "2 images listed more than once" in text
    assert "1 with different labels" in text and "'a.png' (lines 1, 3, 6)" in text
    caplog.clear()
    clean = tmp_path / "val_list.txt"
    clean.write_text("a.png 0\nb.png 1\n")
    with caplog.at_level("WARNING", logger="datasets.splits"):
        assert parse_split_file(clean, 1).duplicates == {}
    assert caplog.text == ""


def test_train_test_overlap_refused_naming_both_files(tmp_path, caplog):
    from datasets.splits import SplitOverlapError, check_split_overlap

    train = tmp_path / "train_list.txt"
    train.write_text("p1/a.png 0\np1/b.png 1\np2/c.png 0\np3/d.png 1\n")
    val, test = tmp_path / "val_list.txt", tmp_path / "test_list.txt"
    val.write_text("p9/x.png 0\n")
    test.write_text("p2/c.png 1\n./p1/a.png 0\np8/y.png 0\n")
    table = parse_split_file(train, 1)
    with pytest.raises(SplitOverlapError) as err:
        check_split_overlap(table, [val, test])
    message = str(err.value)
    assert str(train) in message and str(test) in message and "2 images" in message
    # Both lines of each pair, by file and line number.
    assert "test_list.txt:1 'p2/c.png' and train_list.txt:3 'p2/c.png' are the same file" in message
    assert "test_list.txt:2 './p1/a.png' and train_list.txt:1 'p1/a.png' are the same file" in message
    assert "--allow_overlap" in message and "allow=" not in message
    assert isinstance(err.value, SplitFileError)  # the entry script reports data errors in one line
    with caplog.at_level("WARNING", logger="datasets.splits"):
        counts = check_split_overlap(table, [parse_split_file(val, 1), test], allow=True)
    assert counts == {str(val): 0, str(test): 2}
    assert "2 images of" in caplog.text and "(allowed)" in caplog.text


def test_validation_test_overlap_refused(tmp_path, caplog):
    """A checkpoint selected on validation images that are also test images gets an
    optimistic test score: the same refusal, naming both files and the harm."""
    from datasets.splits import SplitOverlapError, check_split_overlap

    val, test = tmp_path / "val_list.txt", tmp_path / "test_list.txt"
    val.write_text("p1/a.png 1\np2/b.png 0\n")
    test.write_text("p3/c.png 0\np2/b.png 0\n")
    table = parse_split_file(val, 1)
    with pytest.raises(SplitOverlapError) as err:
        check_split_overlap(table, [test], role="validation")
    message = str(err.value)
    assert f"also in the validation split {val}" in message and str(test) in message
    assert "'p2/b.png'" in message and "selected on" in message
    with caplog.at_level("WARNING"):
        assert check_split_overlap(table, [test], allow=True, role="validation") == {str(test): 1}
    assert "(allowed)" in caplog.text


def test_patients_shared_between_splits_are_refused(tmp_path, caplog):
    """Another image of a training patient in val / test leaks like the same image: NIH names
    carry the patient, CheXpert paths a patient folder. Without the kind only images count."""
    from datasets.splits import SplitOverlapError, check_split_overlap, patient_id

    assert patient_id("nih", "00000001_002.png") == "00000001"
    assert patient_id("chexpert", "CheXpert-v1.0-small/train/patient00042/study1/view1_frontal.jpg") == "patient00042"
    assert patient_id("rsna", "stage_2_train_images/abc.dcm") is None
    assert patient_id("nih", "my_scan.png") is None
    assert patient_id("nih", "all_classes\\00000001_002.png") == "00000001"
    train, test = tmp_path / "train_list.txt", tmp_path / "test_list.txt"
    train.write_text("00000001_000.png 1\n00000002_000.png 0\n")
    test.write_text("00000003_000.png 0\n00000001_001.png 1\n")
    table = parse_split_file(train, 1)
    assert check_split_overlap(table, [test]) == {str(test): 0}  # no image in both
    with pytest.raises(SplitOverlapError, match="1 patients of .* also have images in the training split") as err:
        check_split_overlap(table, [test], kind="nih")
    assert "'00000001'" in str(err.value) and "--allow_overlap" in str(err.value)
    with caplog.at_level("WARNING"):
        check_split_overlap(table, [test], kind="nih", allow=True)
    assert "(allowed)" in caplog.text
    val, test = tmp_path / "val_list.txt", tmp_path / "test2_list.txt"
    val.write_text("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg 1\n")
    test.write_text("CheXpert-v1.0-small/test/patient64541/study2/view1_frontal.jpg 0\n")
    with pytest.raises(SplitOverlapError, match="validation split"):
        check_split_overlap(parse_split_file(val, 1), [test], role="validation", kind="chexpert")


@pytest.mark.parametrize("folder,kind,classes,train_file", [
    ("RSNA_Pneumonia", "rsna", 1, "train_list.txt"),
    ("NIH_ChestX-ray", "nih", 14, "train_list.txt"),
    ("CheXpert", "chexpert", 5, "train_10.txt"),
])
def test_reference_splits_do_not_overlap(reference_splits, folder, kind, classes, train_file):
    """The paper's splits share no image and (where paths name them) no patient."""
    from datasets.splits import check_split_overlap

    folder = reference_splits / folder
    train = parse_split_file(folder / train_file, classes, kind)
    counts = check_split_overlap(train, [folder / "val_list.txt", folder / "test_list.txt"], kind=kind)
    assert list(counts.values()) == [0, 0]
    val = parse_split_file(folder / "val_list.txt", classes, kind)
    assert check_split_overlap(val, [folder / "test_list.txt"], role="validation", kind=kind) == {
        str(folder / "test_list.txt"): 0}


def _image_folder(root, names):
    """A custom data set folder with a small PNG for each relative path in `names`."""
    from PIL import Image

    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 10 * i).save(root / name)
    return root


def test_training_image_under_another_spelling_is_refused(tmp_path, caplog):
    """An absolute path, '../<folder>/img/x.png' and a symlinked folder all name the training
    image's file: refused like the same relative path, naming both files and both lines."""
    from datasets.splits import SplitOverlapError, check_split_overlap

    root = _image_folder(tmp_path / "mydata", ["img/a.png", "img/b.png", "img/c.png", "img/d.png",
                                               "img/e.png"])
    (root / "linked").symlink_to(root / "img", target_is_directory=True)
    (root / "train_list.txt").write_text("img/a.png 1\nimg/b.png 0\nimg/c.png 1\n")
    (root / "val_list.txt").write_text("img/e.png 0\n")
    (root / "test_list.txt").write_text(f"img/d.png 0\n{root / 'img/a.png'} 1\n../mydata/img/b.png 0\n"
                                        f"linked/c.png 1\n")
    train, val, test = (build_dataset(s, root) for s in ("train", "val", "test"))
    with pytest.raises(SplitOverlapError) as err:
        check_split_overlap(train, [val, test])
    message = str(err.value)
    assert message.startswith(f"3 images of {root / 'test_list.txt'} are also in the training split "
                              f"{root / 'train_list.txt'}, e.g. ")
    real = (root / "img").resolve()
    for test_line, spelling, train_line, name in ((2, str(root / "img/a.png"), 1, "a.png"),
                                                  (3, "../mydata/img/b.png", 2, "b.png"),
                                                  (4, "linked/c.png", 3, "c.png")):
        assert (f"test_list.txt:{test_line} '{spelling}' and train_list.txt:{train_line} 'img/{name}' "
                f"are the same file {real / name}") in message
    assert "--allow_overlap" in message and "allow=" not in message
    with caplog.at_level("WARNING", logger="datasets.splits"):
        counts = check_split_overlap(train, [val, test], allow=True)
    assert counts == {str(root / "val_list.txt"): 0, str(root / "test_list.txt"): 3}
    assert "(allowed)" in caplog.text
    # Without the other spellings nothing is refused.
    (root / "test_list.txt").write_text("img/d.png 0\n")
    assert check_split_overlap(train, [val, build_dataset("test", root)]) == {
        str(root / "val_list.txt"): 0, str(root / "test_list.txt"): 0}


def test_shared_patient_names_both_lines(tmp_path):
    from datasets.splits import SplitOverlapError, check_split_overlap

    root = _image_folder(tmp_path / "NIH_x" / "all_classes", ["00000001_000.png", "00000001_001.png",
                                                             "00000002_000.png"]).parent
    labels = " ".join(["0"] * 14)
    (root / "train_list.txt").write_text(f"00000002_000.png {labels}\n00000001_000.png {labels}\n")
    (root / "test_list.txt").write_text(f"00000001_001.png {labels}\n")
    train, test = build_dataset("train", root), build_dataset("test", root)
    with pytest.raises(SplitOverlapError, match=r"1 patients of .*test_list\.txt also have images in the "
                                                r"training split .*, e\.g\. '00000001' \(test_list\.txt:1, "
                                                r"train_list\.txt:2\)"):
        check_split_overlap(train, [test], kind="nih")


def test_space_in_an_image_path_blames_its_line(tmp_path):
    """A space inside a path would shift the labels: the message names the line with the space
    (also the first line of a file whose K is taken from it) and says paths may not hold spaces."""
    f = tmp_path / "train_list.txt"
    f.write_text("img/my scan.png 1 0\nimg/b.png 0 1\n")
    with pytest.raises(SplitFileError) as err:
        parse_split_file(f)
    assert str(err.value).startswith(f"{f}:1: image path 'img/my scan.png' contains a space: image paths "
                                     f"may not contain spaces")
    f.write_text("img/a.png 1 0\nimg/b.png 0 1\nimg/my  old scan.png 0 1\n")
    with pytest.raises(SplitFileError, match=rf"^{f}:3: image path 'img/my old scan.png' contains a space"):
        parse_split_file(f)
    # Known K (a data set kind): more fields than labels, or as many with a word among them.
    zeros = " ".join(["0"] * 14)
    f.write_text(f"00000001_000.png {zeros}\nmy scan.png {zeros}\n")
    with pytest.raises(SplitFileError, match=rf"^{f}:2: image path 'my scan.png' contains a space"):
        parse_split_file(f, 14, "nih")
    f.write_text(f"my scan.png {' '.join(['0'] * 13)}\n")
    with pytest.raises(SplitFileError, match=rf"^{f}:1: image path 'my scan.png' contains a space"):
        parse_split_file(f, 14, "nih")
    # A header line (the class names, no labels) is named as one.
    f.write_text("path " + " ".join(f"Class{k}" for k in range(14)) + f"\n00000001_000.png {zeros}\n")
    with pytest.raises(SplitFileError, match=rf"^{f}:1: 'path Class0 Class1 .*' looks like a header: "
                                             r"split files have none"):
        parse_split_file(f, 14, "nih")
    # A line that only has another number of labels says which line set K.
    f.write_text("img/a.png 1 0\nimg/b.png 1\n")
    with pytest.raises(SplitFileError, match=rf"^{f}:2: image 'img/b.png' has 1 labels but line 1 has 2"):
        parse_split_file(f)


def test_byte_order_marks_in_a_custom_data_set(tmp_path):
    """Split files and classes.txt saved with a BOM (Windows editors) build as without one:
    the first image is found, the class names are clean, the files' label columns agree."""
    root = _image_folder(tmp_path / "mydata", ["img/a.png", "img/b.png", "img/c.png"])
    bom = "\ufeff"
    (root / "classes.txt").write_bytes(f"{bom}cat\ndog\n".encode("utf-8"))
    (root / "train_list.txt").write_bytes(f"{bom}img/a.png 0 1\nimg/b.png 1 0\n".encode("utf-8"))
    (root / "val_list.txt").write_bytes(f"{bom}img/c.png 1 1\n".encode("utf-8"))
    train = build_dataset("train", root)
    assert train.paths == ["img/a.png", "img/b.png"] and train.class_names == ["cat", "dog"]
    assert build_dataset("val", root).paths == ["img/c.png"]
    (root / "classes.txt").unlink()  # each file's K is then compared with the other files'
    assert build_dataset("val", root).num_classes == 2
