"""The data commands (datasets.demo, .make_splits, .cache) never replace or delete a user's files:
an existing folder, an input, another data set's cache and files of other names are refused or
left alone, and a set moved into place is all new or all old."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import datasets.staging as staging
from datasets import cache, demo, make_splits
from datasets.errors import DataUsageError
from datasets.imagecache import ImageCache, build_cache
from datasets.synthetic import demo_as_rsna_dicoms, make_demo_dataset
from util import cli

SPLITS = ["test_list.txt", "train_1.txt", "train_10.txt", "train_list.txt", "val_list.txt"]


def _run(module, argv, capsys):
    """(exit code, stderr lines) of a command's main inside its error boundary; a flag error's
    SystemExit counts as its code."""
    try:
        code = cli.run(module.main, [str(a) for a in argv], prog=module.PROG)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def _tree(folder: Path) -> dict:
    """Every path under `folder` with its bytes (None for a folder, the target for a link)."""
    return {p.relative_to(folder).as_posix(): (os.readlink(p) if p.is_symlink() else None if p.is_dir()
                                               else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny NIH-layout data set (its images named as NIH's)."""
    return make_demo_dataset(tmp_path_factory.mktemp("nl") / "NIH_demo", num_images=12, image_size=32)


# -- python -m datasets.demo ---------------------------------------------------------------

def test_the_demo_refuses_an_existing_folder(data, tmp_path, capsys):
    before = _tree(data)
    for extra in ([], ["--rsna"]):
        code, err = _run(demo, ["--out", data, "--num_images", "12", "--image_size", "32", *extra], capsys)
        assert code == 2 and err[0] == (f"{demo.PROG}: error: --out {data}: already exists (name a new "
                                        "folder: nothing is written into an existing one)")
    assert _tree(data) == before
    with pytest.raises(DataUsageError, match="already exists and is not empty"):
        make_demo_dataset(data, num_images=12, image_size=32)
    with pytest.raises(DataUsageError, match="already exists and is not empty"):
        demo_as_rsna_dicoms(data, data)
    assert _tree(data) == before
    (tmp_path / "empty").mkdir()  # an empty folder has nothing to lose
    assert (make_demo_dataset(tmp_path / "empty", num_images=12, image_size=32) / "train_list.txt").is_file()


# -- python -m datasets.make_splits --------------------------------------------------------

def _nih_metadata(folder: Path) -> Path:
    folder.mkdir()
    rows = [{"Image Index": f"{p:08d}_000.png", "Finding Labels": "Mass" if p % 2 else "No Finding",
             "Patient ID": p} for p in range(40)]
    pd.DataFrame(rows).to_csv(folder / "Data_Entry_2017.csv", index=False)
    names = [r["Image Index"] for r in rows]
    (folder / "test_list.txt").write_text("\n".join(names[:10]) + "\n")
    (folder / "train_val_list.txt").write_text("\n".join(names[10:]) + "\n")
    return folder


def test_make_splits_never_replaces_an_input(tmp_path, capsys):
    meta = _nih_metadata(tmp_path / "meta")
    before = _tree(meta)
    for extra in ([], ["--overwrite"]):
        code, err = _run(make_splits, ["nih", "--metadata", meta, "--out", meta, "--min_subset", "2", *extra],
                         capsys)
        assert (code, err) == (2, [f"{make_splits.PROG}: error: --out {meta}: writing {meta / 'test_list.txt'} "
                                   f"would replace {meta / 'test_list.txt'}, an input read from --metadata; "
                                   f"choose another --out"])
    out = tmp_path / "out"  # the same file under another name: a link to the input
    out.mkdir()
    (out / "test_list.txt").symlink_to(meta / "test_list.txt")
    code, err = _run(make_splits, ["nih", "--metadata", meta, "--out", out, "--min_subset", "2", "--overwrite"],
                     capsys)
    assert code == 2 and "would replace" in err[0] and "--out" in err[0]
    os.link(meta / "train_val_list.txt", tmp_path / "hard_link")
    code, _ = _run(make_splits, ["nih", "--metadata", meta, "--out", tmp_path, "--min_subset", "2",
                                 "--overwrite"], capsys)
    assert code == 0  # another name, another file: no input replaced
    assert _tree(meta) == before


def test_make_splits_refuses_existing_split_files_without_overwrite(tmp_path, capsys):
    meta = _nih_metadata(tmp_path / "meta")
    out = tmp_path / "out"
    out.mkdir()
    (out / "val_list.txt").write_text("mine\n")
    code, err = _run(make_splits, ["nih", "--metadata", meta, "--out", out, "--min_subset", "2"], capsys)
    assert (code, err) == (2, [f"{make_splits.PROG}: error: --out {out}: {out / 'val_list.txt'} already "
                               "exists (pass --overwrite to replace the split files there)"])
    assert sorted(os.listdir(out)) == ["val_list.txt"] and (out / "val_list.txt").read_text() == "mine\n"
    argv = ["nih", "--metadata", meta, "--out", out, "--min_subset", "2", "--overwrite"]
    assert _run(make_splits, argv, capsys)[0] == 0
    assert (out / "val_list.txt").read_text() != "mine\n"


# -- datasets/staging.py: every destination checked first, all new or all old --------------

def _written(tmp_path, capsys):
    """Metadata and a whole set of split files written from it."""
    meta = _nih_metadata(tmp_path / "meta")
    out = tmp_path / "out"
    assert _run(make_splits, ["nih", "--metadata", meta, "--out", out, "--min_subset", "2"], capsys)[0] == 0
    return meta, out


@pytest.mark.parametrize("obstacle", ["folder", "symlink"])
def test_a_destination_in_the_way_is_refused_before_anything_moves(tmp_path, capsys, obstacle):
    meta, out = _written(tmp_path, capsys)
    (out / "val_list.txt").unlink()
    mine = tmp_path / "mine.txt"
    mine.write_text("mine\n")
    if obstacle == "folder":
        (out / "val_list.txt").mkdir()
        (out / "val_list.txt" / "keep.txt").write_text("mine\n")
    else:
        (out / "val_list.txt").symlink_to(mine)
    before = _tree(out)
    code, err = _run(make_splits, ["nih", "--metadata", meta, "--out", out, "--seed", "3", "--min_subset", "2",
                                   "--overwrite"], capsys)
    what = "it is a folder" if obstacle == "folder" else "it is a symbolic link"
    assert code == 1 and err[0].startswith(f"{make_splits.PROG}: error: cannot write {out / 'val_list.txt'}: "
                                           f"{what}")
    assert _tree(out) == before and mine.read_text() == "mine\n"
    assert sorted(os.listdir(tmp_path)) == ["meta", "mine.txt", "out"]  # no staging folder left


def _old_set(root: Path) -> dict:
    """Stage a set of split files ("old <name>") into the new folder `root`; returns its tree."""
    with staging.staged_folder(root) as staged:
        for name in SPLITS:
            (staged / name).write_text(f"old {name}\n")
    return _tree(root)


def test_a_failed_move_restores_the_old_set_and_names_the_destination(tmp_path, monkeypatch):
    root = tmp_path / "set"
    before = _old_set(root)
    real_replace, calls, failed_at = os.replace, [], []

    def fail_third_move_in(src, dest):
        if Path(dest).parent == root and Path(src).parent.name.endswith(".tmp"):  # a new file moving in
            calls.append(dest)
            if len(calls) == 3:
                failed_at.append(dest)
                raise OSError(5, "Input/output error")
        return real_replace(src, dest)
    monkeypatch.setattr(os, "replace", fail_third_move_in)
    with pytest.raises(OSError) as failed:
        with staging.staged_folder(root, last=("train_list.txt",)) as staged:
            for name in SPLITS:
                (staged / name).write_text(f"new {name}\n")
    monkeypatch.undo()
    message = cli.describe(failed.value)
    assert message.startswith(f"cannot write {failed_at[0]}: ") and message.endswith(f"{root} is as it was")
    assert ".tmp" not in message and _tree(root) == before and os.listdir(tmp_path) == ["set"]


def test_the_file_a_reader_checks_is_absent_while_a_set_moves_in(tmp_path, monkeypatch):
    root = tmp_path / "set"
    _old_set(root)
    real_replace, seen = os.replace, []

    def watch(src, dest):
        if Path(dest).parent == root and Path(src).parent != root:  # a new file moving in
            seen.append((Path(dest).name, (root / "train_list.txt").exists()))
        return real_replace(src, dest)
    monkeypatch.setattr(os, "replace", watch)
    with staging.staged_folder(root, last=("train_list.txt",)) as staged:
        for name in SPLITS:
            (staged / name).write_text(f"new {name}\n")
    monkeypatch.undo()
    assert [name for name, _ in seen][-1] == "train_list.txt" and len(seen) == len(SPLITS)
    assert not any(present for _, present in seen)  # a killed move leaves a set without train_list.txt
    assert all((root / n).read_text() == f"new {n}\n" for n in SPLITS) and os.listdir(tmp_path) == ["set"]


KILLED_MOVE = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import datasets.staging as staging
root, kill_after, names = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
real_replace, moved = os.replace, []
def replace(src, dest):
    real_replace(src, dest)
    if Path(dest).parent == root and Path(src).parent.name.endswith(".tmp"):
        moved.append(dest)
        if len(moved) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
with staging.staged_folder(root, last=("train_list.txt",)) as staged:
    for name in names:
        (staged / name).write_text("new " + name)
    if kill_after == 0:
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kill_after", [0, 1, 4, 6])  # writing; one moved in; a new name; all moved
def test_a_move_killed_half_way_is_undone_by_the_next_staging(tmp_path, kill_after):
    root = tmp_path / "set"
    before = _old_set(root)
    new = sorted(SPLITS + ["train_100.txt"])  # a name the old set lacks: it moves in 4th
    killed = subprocess.run([sys.executable, "-c", KILLED_MOVE, str(Path(__file__).parents[1]),
                             str(root), str(kill_after), *new])
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name.rsplit(".", 1)[1] for p in tmp_path.iterdir() if p.name != "set")
    assert left == (["tmp"] if kill_after == 0 else ["old", "tmp"])
    if kill_after:
        assert _tree(root) != before  # the kill left a mixed set
    with pytest.raises(ValueError):  # the next command fails on its input: root is the old set
        with staging.staged_folder(root, last=("train_list.txt",)):
            raise ValueError("a bad input")
    assert _tree(root) == before and os.listdir(tmp_path) == ["set"]


# -- python -m datasets.cache --------------------------------------------------------------

USERS = {"notes.tmp": b"n", "eval-plan.txt": b"e", "index-2023.npz": b"i", "images-old.u8": b"u",
         "keep.txt": b"k"}


def _users_files(folder: Path, meta: bytes | None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in USERS.items():
        (folder / name).write_bytes(content)
    if meta is not None:
        (folder / "meta.json").write_bytes(meta)
    return _tree(folder)


@pytest.mark.parametrize("meta", [None, b'{"format": 3, "note": "my own meta"}', b"not json"])
def test_the_cache_refuses_a_folder_that_is_not_its_cache(data, tmp_path, capsys, meta):
    folder = tmp_path / "mine"
    before = _users_files(folder, meta)
    code, err = _run(cache, ["--data_path", data, "--dataset", "nih", "--splits", "val_list.txt",
                             "--workers", "1", "--cache_dir", folder], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{cache.PROG}: error: --cache_dir {folder}: holds ")
    assert _tree(folder) == before


def test_a_rebuild_removes_only_its_own_files(data, tmp_path):
    folder = tmp_path / "cache"
    build_cache(data, "nih", split_files=["val_list.txt"], cache_dir=folder, workers=1)
    first = ImageCache(folder)
    (folder / f"{first.data_file.stem}.u8.tmp").write_bytes(b"partial")  # of a killed build
    stale_eval = folder / "eval-0123456789abcdef.json"
    stale_eval.write_text("{}")
    users = {k: v for k, v in _users_files(folder, None).items() if k in USERS}
    build_cache(data, "nih", split_files=["val_list.txt"], cache_dir=folder, workers=1)
    second = ImageCache(folder)
    assert second.build_id != first.build_id
    assert {k: v for k, v in _tree(folder).items() if k in USERS} == users  # every file of the user's
    assert sorted(os.listdir(folder)) == sorted([*USERS, "meta.json", second.data_file.name,
                                                 f"index-{second.build_id}.npz"])


def test_the_cache_of_another_data_set_in_the_folder_is_kept(data, tmp_path, capsys):
    folder = tmp_path / "shared"
    build_cache(data, "nih", split_files=["val_list.txt"], cache_dir=folder, workers=1)
    before = _tree(folder)
    other = make_demo_dataset(tmp_path / "NIH_other", num_images=12, image_size=32, seed=1)
    code, err = _run(cache, ["--data_path", other, "--dataset", "nih", "--splits", "val_list.txt",
                             "--workers", "1", "--cache_dir", folder], capsys)
    assert (code, err) == (2, [f"{cache.PROG}: error: --cache_dir {folder}: holds the cache of another data "
                               f"set ({data.resolve()}); name another folder for the cache of {other}"])
    assert _tree(folder) == before
    assert json.loads((folder / "meta.json").read_text())["data_path"] == str(data.resolve())
