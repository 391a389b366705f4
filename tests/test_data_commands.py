"""The data commands (datasets.cache, .demo, .make_splits, .resample) end every error in one
line on stderr and the exit code of util.cli (2 usage, 1 failure), and leave nothing partial."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import datasets.imagecache as imagecache
from datasets import build_cache, build_dataset, cache, demo, make_splits, resample
from util import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(module, argv, capsys):
    """Run a command's main inside its error boundary: (exit code, stderr lines)."""
    code = cli.run(module.main, [str(a) for a in argv], prog=module.PROG)
    return code, capsys.readouterr().err.strip().splitlines()


def _tree(folder):
    """Every path under `folder` with its bytes (None for folders)."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}


def _custom_set(root, bad=False):
    """A custom data set of three PNGs (plus a junk 'PNG' when `bad`) listed in val_list.txt."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["a.png", "b.png", "c.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 16), dtype=np.uint8)).save(root / "img" / name)
    if bad:
        (root / "img/junk.png").write_bytes(b"not an image")
        names.insert(1, "junk.png")
    (root / "val_list.txt").write_text("".join(f"img/{n} {i % 2}\n" for i, n in enumerate(names)))
    return root


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _full_disk_for(suffix):
    """An `open` that gives full-disk files for names ending in `suffix` (written in binary)."""
    real = open

    def fake(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and str(file).endswith(suffix) else f
    return fake


# ---------------------------------------------------------------------------------------
# python -m datasets.cache
# ---------------------------------------------------------------------------------------

def test_cache_command_bad_image_is_one_line_and_leaves_no_cache(tmp_path, capsys):
    root = _custom_set(tmp_path / "mydata", bad=True)
    code, err = _run(cache, ["--data_path", root, "--workers", "1"], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"{cache.PROG}: error: {root / 'val_list.txt'}:2: image 'img/junk.png': ")
    assert "--skip_bad" in err[0]
    assert not (root / "_cache").exists()
    assert _run(cache, ["--data_path", root, "--workers", "1", "--skip_bad"], capsys)[0] == 0
    assert (root / "_cache" / "meta.json").is_file()


def test_cache_command_usage_errors(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, err = _run(cache, ["--data_path", missing], capsys)
    assert (code, err) == (2, [f"{cache.PROG}: error: --data_path {missing}: does not exist (expected the "
                                f"data set's folder)"])
    root = _custom_set(tmp_path / "mydata")
    (root / "taken").write_text("mine")
    before = _tree(root)
    code, err = _run(cache, ["--data_path", root, "--cache_dir", root / "taken"], capsys)
    assert (code, err) == (2, [f"{cache.PROG}: error: --cache_dir {root / 'taken'}: is a file, not a folder"])
    assert _tree(root) == before
    code, err = _run(cache, ["--data_path", root, "--size", "4"], capsys)
    assert (code, err) == (2, [f"{cache.PROG}: error: --size 4: expected at least 8 pixels"])
    assert _tree(root) == before
    with pytest.raises(SystemExit) as stop:  # argparse's own usage errors: exit 2
        _run(cache, [], capsys)
    assert stop.value.code == 2
    assert "the following arguments are required: --data_path" in capsys.readouterr().err


def test_cache_command_disk_full_keeps_the_committed_cache(tmp_path, capsys, monkeypatch):
    root = _custom_set(tmp_path / "mydata")
    monkeypatch.setattr(imagecache, "open", _full_disk_for(".u8.tmp"), raising=False)
    code, err = _run(cache, ["--data_path", root, "--workers", "1"], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"{cache.PROG}: error: no space left on device while writing "
                             f"{root / '_cache' / 'images-'}")
    assert not (root / "_cache").exists()  # the folder this build made is gone too
    monkeypatch.undo()
    build_cache(root, workers=1)
    before = _tree(root / "_cache")
    monkeypatch.setattr(imagecache, "open", _full_disk_for(".u8.tmp"), raising=False)
    assert _run(cache, ["--data_path", root, "--workers", "1"], capsys)[0] == 1
    monkeypatch.undo()
    assert _tree(root / "_cache") == before
    assert build_dataset("val", root, cache="on").cache is not None


# ---------------------------------------------------------------------------------------
# python -m datasets.demo
# ---------------------------------------------------------------------------------------

def test_demo_command_writes_a_whole_set_or_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sets" / "demo_data"
    code, err = _run(demo, ["--out", out, "--num_images", "5"], capsys)
    assert (code, err) == (2, [f"{demo.PROG}: error: --num_images 5: expected at least 12"])
    assert not (tmp_path / "sets").exists()

    saved = []
    real_save = Image.Image.save

    def save_until_full(self, fp, *args, **kwargs):
        if len(saved) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save_until_full)
    code, err = _run(demo, ["--out", out, "--num_images", "24", "--image_size", "32"], capsys)
    assert (code, err) == (1, [f"{demo.PROG}: error: no space left on device while writing {out}"])
    assert not (tmp_path / "sets").exists()  # no partial set, no staging folder, no parent made
    monkeypatch.undo()

    assert _run(demo, ["--out", out, "--num_images", "24", "--image_size", "32"], capsys)[0] == 0
    assert len(build_dataset("val", out)) > 0 and os.listdir(out.parent) == ["demo_data"]
    before = _tree(out)
    with pytest.raises(SystemExit) as stop:  # an existing folder is refused, the earlier set kept whole
        _run(demo, ["--out", out, "--num_images", "30", "--image_size", "32", "--seed", "3"], capsys)
    assert stop.value.code == 2 and "already exists" in capsys.readouterr().err
    assert _tree(out) == before and os.listdir(out.parent) == ["demo_data"]

    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        _run(demo, ["--out", tmp_path / "file"], capsys)
    assert stop.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"{demo.PROG}: error: --out {tmp_path / 'file'}: is a file, not a folder"
    assert (tmp_path / "file").read_text() == "mine"


# ---------------------------------------------------------------------------------------
# python -m datasets.make_splits, python -m datasets.resample
# ---------------------------------------------------------------------------------------

def _rsna_metadata(folder, n=60):
    folder.mkdir()
    pd.DataFrame([{"patientId": f"id{i:03d}", "Target": i % 3 == 0} for i in range(n)]).astype(
        {"Target": int}).to_csv(folder / "stage_2_train_labels.csv", index=False)
    return folder


def test_make_splits_command_writes_all_files_or_none(tmp_path, capsys, monkeypatch):
    meta = _rsna_metadata(tmp_path / "meta")
    out = tmp_path / "splits"
    real_write = make_splits.write_split_file
    calls = []

    def full_after_two(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, *args, **kwargs)
    monkeypatch.setattr(make_splits, "write_split_file", full_after_two)
    code, err = _run(make_splits, ["rsna", "--metadata", meta, "--out", out], capsys)
    assert (code, err) == (1, [f"{make_splits.PROG}: error: no space left on device while writing {out}"])
    assert sorted(os.listdir(tmp_path)) == ["meta"]
    monkeypatch.undo()
    assert _run(make_splits, ["rsna", "--metadata", meta, "--out", out], capsys)[0] == 0
    assert sorted(os.listdir(out)) == ["splits_info.json", "test_list.txt", "train_1.txt", "train_10.txt",
                                       "train_list.txt", "val_list.txt"]
    with pytest.raises(SystemExit) as stop:
        _run(make_splits, ["rsna", "--metadata", tmp_path / "none", "--out", out], capsys)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == (f"{make_splits.PROG}: error: --metadata "
                                                       f"{tmp_path / 'none'}: not a folder")


def test_make_splits_reads_official_lists_with_a_byte_order_mark(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    rows = [{"Image Index": f"{p:08d}_000.png", "Finding Labels": "Mass" if p % 2 else "No Finding",
             "Patient ID": p} for p in range(40)]
    pd.DataFrame(rows).to_csv(meta / "Data_Entry_2017.csv", index=False)
    names = [r["Image Index"] for r in rows]
    (meta / "test_list.txt").write_bytes(("\ufeff" + "\n".join(names[:10]) + "\n").encode("utf-8"))
    (meta / "train_val_list.txt").write_bytes(("\ufeff" + "\n".join(names[10:]) + "\n").encode("utf-8"))
    counts = make_splits.make_splits("nih", meta, tmp_path / "out", min_subset=2)
    assert counts["test_list.txt"] == 10  # the first name of each list is found


def test_resample_command(capsys):
    code, err = _run(resample, [], capsys)
    assert code == 0
    with pytest.raises(SystemExit) as stop:
        _run(resample, ["--bogus"], capsys)
    assert stop.value.code == 2


def test_commands_as_run_by_a_user():
    """The real `python -m` entry points: exit codes and one error line, no traceback."""
    cases = [
        (["datasets.cache", "--data_path", "/nonexistent/data"], 2,
         "python -m datasets.cache: error: --data_path /nonexistent/data: does not exist"),
        (["datasets.demo", "--out", str(ROOT / "README.md")], 2,
         f"python -m datasets.demo: error: --out {ROOT / 'README.md'}: is a file, not a folder"),
        (["datasets.make_splits", "nih", "--metadata", str(ROOT / "datasets"), "--out", "/nonexistent/x"], 1,
         f"python -m datasets.make_splits: error: no Data_Entry_2017*.csv in {ROOT / 'datasets'}"),
        (["datasets.resample", "--bogus"], 2, "python -m datasets.resample: error: unrecognized arguments"),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    running = [(subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True), code, line) for argv, code, line in cases]
    for proc, code, line in running:
        _, stderr = proc.communicate(timeout=120)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert proc.returncode == code, stderr
        assert lines[0].startswith(line) and "Traceback" not in stderr, stderr
        assert len(lines) == 1 or lines[1].startswith("(see ")
