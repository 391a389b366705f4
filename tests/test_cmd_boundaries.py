"""predict.py, export.py, util.summarize and util.compare: one error boundary each (one line on
stderr, a documented exit code) and nothing the user has is lost (outputs that exist, are
inputs, a run's own files or symbolic links are refused; read-only folders, a full disk).

Each case runs the command, checks its exit code and its one error line, and that the files
the user had are byte for byte as they were.
"""
from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import export
import predict
from _fakes import trained_checkpoint
from checkpoints import export_paths
from util import cli, compare, summarize
from util.metrics import multilabel_metrics
from util.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion"]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def fail_writes(monkeypatch, hit: Callable[[str], bool], code: int) -> None:
    """Every file or folder creation whose real path ``hit`` selects fails with OS error
    ``code``: a read-only mount (EROFS) or a full disk (ENOSPC), without either."""
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def selected(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and hit(os.path.realpath(path))

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and selected(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and selected(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if selected(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def read_only(monkeypatch, folder: Path) -> None:
    """``folder`` behaves as on a read-only mount: nothing can be created in it."""
    root = os.path.realpath(folder)
    fail_writes(monkeypatch, lambda p: p == root or p.startswith(root + os.sep), errno.EROFS)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, or where a symbolic link points."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def one_error_line(err: str, prog: str, *words: str) -> str:
    """The command's single error line (asserted to be the whole of stderr's errors)."""
    lines = [l for l in err.splitlines() if l.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def save_png(path: Path, value: int = 100, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    stem, mrm = trained_checkpoint(root, class_names=CLASSES, img_size=32)
    return stem, mrm


def predict_args(stem: Path, *inputs: Path | str, output: Path) -> list[str]:
    return ["--checkpoint", str(stem), "--inputs", *map(str, inputs), "--output", str(output),
            "--num_workers", "0", "--amp", "none", "--device", "cpu", "--no_progress"]


def a_run_folder(tmp_path: Path, stem: Path) -> Path:
    """A training run's folder: its checkpoint and reports recorded in run_files.json."""
    run = tmp_path / "R"
    run.mkdir()
    for suffix in (".safetensors", ".json"):
        for name in ("checkpoint-best", "checkpoint-last"):
            shutil.copy(str(stem) + suffix, run / f"{name}{suffix}")
    for name in ("results_test_auroc.csv", "results_test_auroc.md", "predictions_test.csv"):
        (run / name).write_text(f"the run's own {name}\n")
    RunFolder(run).record(*(p for p in run.iterdir() if p.name != "run_files.json"))
    return run


# ---------------------------------------------------------------------------------------
# predict.py
# ---------------------------------------------------------------------------------------

def test_predict_usage_error_class_is_the_shared_one():
    assert predict.UsageError is cli.UsageError
    assert predict.EXIT_SOME_FAILED not in (0, cli.EXIT_FAILURE, cli.EXIT_USAGE)
    assert predict.EXIT_NON_FINITE not in (0, 1, 2, predict.EXIT_SOME_FAILED)


def test_predict_abbreviated_flag_is_refused_and_nothing_written(trained, tmp_path, monkeypatch,
                                                                capsys):
    """`--input` is not `--inputs`: refused (exit 2) instead of running with the default
    output predictions.csv in the current folder."""
    stem, _ = trained
    image = save_png(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(stem), "--input", str(image), "--device", "cpu"])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err, "predict.py", "--inputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_predict_missing_input_exits_2_and_writes_nothing(trained, tmp_path, capsys):
    stem, _ = trained
    out = tmp_path / "preds.csv"
    rc = predict.main(predict_args(stem, tmp_path / "nowhere.png", output=out))
    assert rc == 2
    one_error_line(capsys.readouterr().err, "predict.py", "nowhere.png", "file not found")
    assert list(tmp_path.iterdir()) == []  # no header-only CSV, no _failed.csv


def test_predict_nothing_readable_is_a_failure_without_a_csv(trained, tmp_path, capsys):
    """A split file whose images are all missing (e.g. the wrong --data_path): a CSV of the
    header alone would pass for a result, so none is written; the failures are listed."""
    stem, _ = trained
    split = tmp_path / "list.txt"
    split.write_text("a.png\nb.png\n")
    out = tmp_path / "preds.csv"
    assert predict.main([*predict_args(stem, split, output=out), "--dataset", "custom"]) == 1
    one_error_line(capsys.readouterr().err, "predict.py", "none of the 2 images",
                   "preds_failed.csv")
    assert not out.exists()
    with open(predict.failures_path(out), newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["a.png", "b.png"]
    # An earlier CSV that --overwrite replaces does not stay beside this failure list.
    out.write_text("path,Atelectasis\na.png,0.5\n")
    assert predict.main([*predict_args(stem, split, output=out), "--dataset", "custom",
                         "--overwrite"]) == 1
    assert not out.exists() and predict.failures_path(out).is_file()


def test_predict_existing_heatmap_needs_overwrite(trained, tmp_path, capsys):
    from util.heatmap import heatmap_filename

    stem, _ = trained
    image = save_png(tmp_path / "in" / "a.png")
    maps = tmp_path / "maps"
    mine = maps / heatmap_filename(str(image), "Effusion")
    mine.parent.mkdir()
    mine.write_bytes(b"my own picture")
    argv = [*predict_args(stem, image, output=tmp_path / "p.csv"), "--heatmap_class", "Effusion",
            "--heatmap_dir", str(maps)]
    assert predict.main(argv) == 2
    one_error_line(capsys.readouterr().err, "predict.py", "--heatmap_dir", str(mine), "exists")
    assert snapshot(tmp_path / "maps") == {mine.name: b"my own picture"}
    assert not (tmp_path / "p.csv").exists()
    assert predict.main([*argv, "--overwrite"]) == 0
    with Image.open(mine) as img:
        assert img.format == "PNG"


def test_predict_fifo_in_a_folder_or_split_file_is_skipped_not_read(trained, tmp_path):
    """A FIFO named like an image would block the read forever: only regular files are read,
    the FIFO is counted, named and listed as failed; the exit code says some inputs failed."""
    stem, _ = trained
    scans = tmp_path / "scans"
    save_png(scans / "good.png")
    os.mkfifo(scans / "scan.png")
    (scans / "list.txt").write_text("good.png\nscan.png\n")
    out = tmp_path / "out" / "preds.csv"
    argv = [sys.executable, str(ROOT / "predict.py"),
            *predict_args(stem, scans, scans / "list.txt", output=out), "--dataset", "custom",
            "--num_workers", "2"]  # decoding workers too: a worker blocked on a FIFO never returns
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == predict.EXIT_SOME_FAILED, proc.stderr
    assert "predicted 2 images, 2 failed" in proc.stdout
    assert proc.stderr.count("not a regular file (a FIFO)") == 2
    with open(out, newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(scans / "good.png"), "good.png"]
    with open(predict.failures_path(out), newline="") as f:
        failed = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert set(failed) == {str(scans / "scan.png"), "scan.png"}
    assert all("FIFO" in reason for reason in failed.values())


def test_predict_split_file_with_a_byte_order_mark(trained, tmp_path, capsys):
    """An editor's UTF-8 BOM is not part of the first path: its image is predicted."""
    stem, _ = trained
    folder = tmp_path / "images"
    save_png(folder / "a.png", 1)
    save_png(folder / "b.png", 2)
    split = folder / "list.txt"
    split.write_bytes("\ufeffa.png 0 1 0\nb.png 1 0 0\n".encode("utf-8"))
    out = tmp_path / "preds.csv"
    assert predict.main([*predict_args(stem, split, output=out), "--dataset", "custom"]) == 0
    with open(out, newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["a.png", "b.png"]
    assert "predicted 2 images, 0 failed" in capsys.readouterr().out


def test_predict_refuses_an_output_that_is_an_input(trained, tmp_path, capsys):
    """--output in.png would replace the image being predicted; the split file or the
    checkpoint's JSON likewise: refused (exit 2) even with --overwrite."""
    stem, _ = trained
    image = save_png(tmp_path / "in.png")
    split = tmp_path / "list.txt"
    split.write_text("in.png\n")
    copied = tmp_path / "ckpt"
    copied.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(str(stem) + suffix, copied / f"model{suffix}")
    before = snapshot(tmp_path)
    for inputs, output in (([image], image), ([split], split), ([image], copied / "model.json")):
        argv = predict_args(copied / "model", *inputs, output=output)
        assert predict.main([*argv, "--dataset", "custom", "--overwrite"]) == 2
        one_error_line(capsys.readouterr().err, "predict.py", str(output),
                       "is one of this command's inputs")
    assert snapshot(tmp_path) == before


def test_predict_refuses_to_write_over_the_pretrained_file_its_checkpoint_reads(tmp_path, capsys):
    """Without --finetune the checkpoint's config names the backbone predict loads: an
    input like the others, refused as --output even with --overwrite."""
    stem, mrm = trained_checkpoint(tmp_path / "own", class_names=CLASSES, img_size=32)
    image = save_png(tmp_path / "in.png")
    before = mrm.read_bytes()
    assert predict.main([*predict_args(stem, image, output=mrm), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, "predict.py", str(mrm), "is one of this command's inputs")
    assert mrm.read_bytes() == before


def test_predict_existing_output_needs_overwrite(trained, tmp_path, capsys):
    stem, _ = trained
    image = save_png(tmp_path / "in" / "a.png")
    out = tmp_path / "preds.csv"
    out.write_text("my own notes\n")
    assert predict.main(predict_args(stem, image, output=out)) == 2
    one_error_line(capsys.readouterr().err, "predict.py", str(out), "exists", "--overwrite")
    assert out.read_text() == "my own notes\n"
    # The list of failed inputs is an output too: a user's file of that name is kept.
    other = tmp_path / "other.csv"
    predict.failures_path(other).write_text("mine\n")
    assert predict.main(predict_args(stem, image, output=other)) == 2
    assert "other_failed.csv exists" in capsys.readouterr().err
    assert not other.exists() and predict.failures_path(other).read_text() == "mine\n"
    assert predict.main([*predict_args(stem, image, output=out), "--overwrite"]) == 0
    assert out.read_text().startswith("path,Atelectasis")


def test_predict_refuses_a_symlinked_output(trained, tmp_path, capsys):
    """Writing through a link would change a file elsewhere, replacing it would lose the link."""
    stem, _ = trained
    image = save_png(tmp_path / "in" / "a.png")
    target = tmp_path / "elsewhere.csv"
    target.write_text("someone's file\n")
    link = tmp_path / "preds.csv"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "absent.csv")
    before = snapshot(tmp_path)
    for out in (link, dangling):
        assert predict.main([*predict_args(stem, image, output=out), "--overwrite"]) == 2
        one_error_line(capsys.readouterr().err, "predict.py", str(out), "symbolic link")
    assert snapshot(tmp_path) == before


def test_predict_read_only_or_blocked_output_folder_is_one_line(trained, tmp_path, monkeypatch,
                                                               capsys):
    stem, _ = trained
    image = save_png(tmp_path / "in" / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("kept\n")
    read_only(monkeypatch, locked)
    assert predict.main(predict_args(stem, image, output=locked / "preds.csv")) == 1
    one_error_line(capsys.readouterr().err, "predict.py", str(locked), "Read-only file system")
    monkeypatch.undo()
    assert snapshot(locked) == {"keep.txt": b"kept\n"}
    # A "folder" that is a file: the output folder cannot be made.
    (tmp_path / "afile").write_text("x")
    assert predict.main(predict_args(stem, image, output=tmp_path / "afile" / "p.csv")) == 1
    one_error_line(capsys.readouterr().err, "predict.py", str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("appears", ["preds.csv", "preds_failed.csv"])
def test_predict_keeps_an_output_made_while_it_ran(trained, tmp_path, monkeypatch, capsys, appears):
    """--output was checked new at the start; a file another command makes there meanwhile
    is kept (without --overwrite), and the command says so."""
    stem, _ = trained
    image = save_png(tmp_path / "in" / "a.png")
    out = tmp_path / "out" / "preds.csv"
    real = predict.predict_images

    def meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        (out.parent / appears).write_text("another command's\n")
        return result
    monkeypatch.setattr(predict, "predict_images", meanwhile)
    code = predict.main(predict_args(stem, image, tmp_path / "missing.png", output=out))
    assert code == 1
    one_error_line(capsys.readouterr().err, "predict.py", f"{out.parent / appears} appeared while "
                   "this command ran")
    assert (out.parent / appears).read_text() == "another command's\n"
    assert [p.name for p in out.parent.iterdir()] == [appears]  # nothing of this command's left


def test_predict_full_disk_is_exit_1_not_the_some_failed_code(trained, tmp_path, monkeypatch,
                                                              capsys):
    """"Could not write" (1) is told apart from "some inputs could not be read" (3)."""
    stem, _ = trained
    image = save_png(tmp_path / "in" / "a.png")
    out = tmp_path / "out" / "preds.csv"
    fail_writes(monkeypatch, lambda p: os.path.basename(p).startswith(".preds.csv."),
                errno.ENOSPC)
    assert predict.main(predict_args(stem, image, tmp_path / "missing.png", output=out)) == 1
    one_error_line(capsys.readouterr().err, "predict.py", "no space left on device", str(out))
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# export.py
# ---------------------------------------------------------------------------------------

def test_export_refuses_to_replace_the_checkpoint_or_a_runs_files(trained, tmp_path, capsys):
    """`--output R/checkpoint-best` would replace the run's checkpoint with an export: refused
    (as the checkpoint given and as a run's own file), even with --overwrite."""
    stem, _ = trained
    run = a_run_folder(tmp_path, stem)
    before = snapshot(run)
    for output, words in ((run / "checkpoint-best", "is one of this command's inputs"),
                          (run / "checkpoint-last", "is a file of the training run in")):
        rc = export.main(["--checkpoint", str(run / "checkpoint-best"), "--output", str(output),
                          "--overwrite"])
        assert rc == 2
        one_error_line(capsys.readouterr().err, "export.py", str(output), words)
    # The same checkpoint outside any run folder is still the input.
    rc = export.main(["--checkpoint", str(stem) + ".json", "--output", str(stem), "--overwrite"])
    assert rc == 2 and "is one of this command's inputs" in capsys.readouterr().err
    assert snapshot(run) == before


def test_export_refuses_a_symlinked_output(trained, tmp_path, capsys):
    stem, _ = trained
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    (tmp_path / "model.json").symlink_to(target)
    before = snapshot(tmp_path)
    rc = export.main(["--checkpoint", str(stem), "--output", str(tmp_path / "model"),
                      "--overwrite"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, "export.py", "model.json", "symbolic link")
    assert snapshot(tmp_path) == before


def test_export_full_disk_is_one_line_and_keeps_the_earlier_export(trained, tmp_path,
                                                                  monkeypatch, capsys):
    """safetensors reports a full disk as its own error ("os error 28"): one line, exit 1, no
    temporary left, the earlier export as it was."""
    import checkpoints
    from safetensors import SafetensorError

    stem, _ = trained
    out = tmp_path / "export" / "model"
    out.parent.mkdir()
    for path in export_paths(out):
        path.write_bytes(b"earlier " + path.suffix.encode())
    before = snapshot(out.parent)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(checkpoints, "save_file", full)
    rc = export.main(["--checkpoint", str(stem), "--output", str(out), "--overwrite"])
    assert rc == 1
    one_error_line(capsys.readouterr().err, "export.py", "no space left on device",
                   str(out) + ".safetensors")
    assert snapshot(out.parent) == before
    # The JSON written by util.io's atomic write: an OSError, the same one line.
    monkeypatch.undo()
    fail_writes(monkeypatch, lambda p: os.path.basename(p).startswith(".model.json."),
                errno.ENOSPC)
    rc = export.main(["--checkpoint", str(stem), "--output", str(out), "--overwrite"])
    assert rc == 1
    one_error_line(capsys.readouterr().err, "export.py", "no space left on device")
    assert snapshot(out.parent) == before


def test_export_full_disk_on_a_real_tiny_file_system(trained, tmp_path, capsys):
    """The same on a 64 kB tmpfs where this machine may mount one (skipped where not)."""
    stem, _ = trained
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rc = export.main(["--checkpoint", str(stem), "--output", str(mount / "model")])
        assert rc == 1
        one_error_line(capsys.readouterr().err, "export.py", "no space left on device")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_export_read_only_folder_is_one_line(trained, tmp_path, monkeypatch, capsys):
    stem, _ = trained
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    rc = export.main(["--checkpoint", str(stem), "--output", str(locked / "model")])
    assert rc == 1
    one_error_line(capsys.readouterr().err, "export.py", "Read-only file system", str(locked))
    monkeypatch.undo()
    assert list(locked.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    rc = export.main(["--checkpoint", str(stem), "--output", str(tmp_path / "afile" / "model")])
    assert rc == 1
    one_error_line(capsys.readouterr().err, "export.py", str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"


def test_export_unloadable_checkpoint_is_usage_exit_2(tmp_path, capsys):
    rc = export.main(["--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m")])
    assert rc == 2
    one_error_line(capsys.readouterr().err, "export.py", "--checkpoint", "nowhere")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# util.summarize
# ---------------------------------------------------------------------------------------

SUMMARIZE = "python -m util.summarize"


def results(method: str, seed: int, mean: float, **extra) -> dict:
    return {"split": "test", "dataset": "nih", "data_size": "1%", "weights": "MRM",
            "method": method, "model": "vit_base_patch16", "lora_rank": 4 if method == "lora" else None,
            "seed": seed, "num_images": 50, "mean_auroc": mean,
            "auroc": {"Mass": mean, "Nodule": mean}, "class_names": ["Mass", "Nodule"], **extra}


def a_run(root: Path, name: str, res: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results_test.json").write_text(json.dumps(res))
    args = {"seed": res["seed"], "method": res["method"], "lr": 0.05, "data_path": "/data/nih",
            "output_dir": str(root), "run_name": name}
    (folder / "config.json").write_text(json.dumps({"args": args}))
    return folder


def test_summarize_refuses_a_runs_own_report_and_existing_outputs(tmp_path, capsys):
    runs = tmp_path / "runs"
    run = a_run(runs, "lora", results("lora", 0, 0.8))
    (run / "results_test_auroc.md").write_text("the run's table\n")
    (run / "results_test_auroc.csv").write_text("class,auroc\n")
    RunFolder(run).record(run / "results_test_auroc.md", run / "results_test_auroc.csv",
                          run / "results_test.json")
    before = snapshot(tmp_path)
    assert summarize.main([str(runs), "--output", str(run / "results_test_auroc"),
                           "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, SUMMARIZE, "results_test_auroc",
                   "is a file of the training run in")
    # One of the files read (a results file, given with --output's suffix rule) likewise.
    ref = tmp_path / "ref.csv"
    ref.write_text("setting,method,mean_auroc\nnih-1-mrm,lora,80.6\n")
    before = snapshot(tmp_path)
    assert summarize.main([str(runs), "--reference", str(ref), "--output", str(tmp_path / "ref"),
                           "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, SUMMARIZE, str(ref), "is one of this command's inputs")
    # An earlier summary is replaced only with --overwrite; a symbolic link never.
    out = tmp_path / "summary"
    out.with_suffix(".md").write_text("my notes\n")
    assert summarize.main([str(runs), "--output", str(out)]) == 2
    one_error_line(capsys.readouterr().err, SUMMARIZE, "summary.md exists", "--overwrite")
    (tmp_path / "linked.csv").symlink_to(ref)
    assert summarize.main([str(runs), "--output", str(tmp_path / "linked"), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, SUMMARIZE, "linked.csv", "symbolic link")
    assert snapshot(tmp_path) == {**before, "summary.md": b"my notes\n",
                                  "linked.csv": f"-> {ref}"}
    assert summarize.main([str(runs), "--output", str(out), "--overwrite"]) == 0
    assert out.with_suffix(".md").read_text().startswith("# Test AUROC")


@pytest.mark.parametrize("value,shown", [(1.7, "1.7"), ("0.8", "'0.8'"), (True, "True")])
def test_summarize_refuses_an_auroc_that_is_not_a_fraction(tmp_path, capsys, caplog, value, shown):
    """A hand-edited mean_auroc of 1.7 would show as 170.0, a string as a number: the file and
    the key are named and the run is left out (exit 1)."""
    runs = tmp_path / "runs"
    a_run(runs, "good", results("lora", 0, 0.8))
    bad = a_run(runs, "edited", results("lora", 1, value)) / "results_test.json"
    out = tmp_path / "summary"
    with caplog.at_level(logging.ERROR, logger="util.summarize"):
        assert summarize.main([str(runs), "--output", str(out)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(bad) in errors[0] and "'mean_auroc'" in errors[0]
    assert f"is {shown}" in errors[0]
    table = out.with_suffix(".md").read_text()
    assert "170.0" not in table and "edited" not in table and "good" in table
    # A per-class AUROC likewise.
    res = results("lora", 1, 0.8)
    res["auroc"]["Nodule"] = 80.2
    bad.write_text(json.dumps(res))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="util.summarize"):
        assert summarize.main([str(runs), "--output", str(out), "--overwrite"]) == 1
    assert "'auroc' of 'Nodule' is 80.2, outside [0, 1]" in caplog.text


def test_summarize_reference_table_rounds_once(tmp_path):
    """A seed group of mean 80.649 reads 80.6 in the reference table as in LoRA vs full
    (rounding the 2-decimal 80.65 again gave 80.7)."""
    from util.runfolder import RUN_FORMAT

    runs = tmp_path / "runs"
    for name, method, seed, mean in (("lora_s0", "lora", 0, 0.80600),
                                     ("lora_s1", "lora", 1, 0.80698), ("full_s0", "full", 0, 0.79)):
        folder = a_run(runs, name, results(method, seed, mean))
        # The seeds share their settings; LoRA and full differ only in the recipe flags.
        settings = {"seed": seed, "method": method, "lr": 0.05, "dataset": "nih",
                    "data_size": "1%", "split_sha256": {"train": "a", "val": "b", "test": "c"}}
        (folder / "config.json").write_text(json.dumps(
            {"format": RUN_FORMAT, "settings": settings, "recipe": ["lr", "method"],
             "execution": {"output_dir": str(runs), "run_name": name, "data_path": "/data/nih"}}))
    ref = tmp_path / "ref.csv"
    ref.write_text("setting,method,mean_auroc\nnih-1-mrm,lora,80.6\n")
    out = tmp_path / "summary"
    assert summarize.main([str(runs), "--output", str(out), "--reference", str(ref)]) == 0
    md = out.with_suffix(".md").read_text()
    reference = md.split("## Against the reference")[1].splitlines()
    (line,) = [l for l in reference if l.startswith("| nih-1-mrm | LoRA |")]
    assert line.split(" | ")[3] == "80.6"
    lora_vs_full = md.split("## LoRA vs full")[1].splitlines()
    (line,) = [l for l in lora_vs_full if l.startswith("| nih | 1% |")]
    assert line.split(" | ")[6] == "80.6"


def test_summarize_read_only_or_blocked_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    a_run(runs, "lora", results("lora", 0, 0.8))
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    assert summarize.main([str(runs), "--output", str(locked / "summary")]) == 1
    one_error_line(capsys.readouterr().err, SUMMARIZE, "Read-only file system", str(locked))
    monkeypatch.undo()
    assert list(locked.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    assert summarize.main([str(runs), "--output", str(tmp_path / "afile" / "summary")]) == 1
    one_error_line(capsys.readouterr().err, SUMMARIZE, str(tmp_path / "afile"))


def test_summarize_abbreviations_refused_and_debug_gives_the_traceback(tmp_path):
    a_run(tmp_path / "runs", "lora", results("lora", 0, 0.8))
    proc = subprocess.run([sys.executable, "-m", "util.summarize", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "summary")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    one_error_line(proc.stderr, SUMMARIZE, "--out")
    assert not list(tmp_path.glob("summary*"))
    proc = subprocess.run([sys.executable, "-m", "util.summarize", str(tmp_path / "nowhere"),
                           "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and f"{SUMMARIZE}: error: run not found" in proc.stderr


# ---------------------------------------------------------------------------------------
# util.compare
# ---------------------------------------------------------------------------------------

COMPARE = "python -m util.compare"


def write_predictions(path: Path, probs, targets, classes=("Mass", "Nodule"), bom=False) -> None:
    """A predictions CSV as the project writes it: NaN as an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", *classes, *(f"label_{c}" for c in classes)])
    for i, (p, t) in enumerate(zip(probs, targets)):
        writer.writerow([f"img{i:03d}.png", *("" if np.isnan(v) else f"{v:.8f}" for v in p),
                         *(int(v) for v in t)])
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8")


def two_runs(root: Path, n: int = 40, bom: bool = False, nan_rows: int = 0):
    rng = np.random.default_rng(0)
    targets = (rng.random((n, 2)) < 0.4).astype(int)
    a = np.clip(rng.random((n, 2)) * 0.6 + 0.4 * targets, 0, 1)
    b = np.clip(rng.random((n, 2)) * 0.8 + 0.2 * targets, 0, 1)
    a[:nan_rows, 0] = np.nan
    write_predictions(root / "A" / "predictions_test.csv", a, targets, bom=bom)
    write_predictions(root / "B" / "predictions_test.csv", b, targets)
    return targets, a, b


def test_compare_reads_a_byte_order_mark_and_leaves_out_empty_cells(tmp_path, capsys):
    plain = tmp_path / "plain"
    two_runs(plain, nan_rows=3)
    marked = tmp_path / "marked"
    two_runs(marked, bom=True, nan_rows=3)
    assert (marked / "A" / "predictions_test.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    outputs = {}
    for root in (plain, marked):
        rc = compare.main([str(root / "A"), str(root / "B"), "--resamples", "20",
                           "--out", str(root / "cmp")])
        assert rc == 0, capsys.readouterr().err
        outputs[root] = json.loads((root / "cmp" / "comparison.json").read_text())
    assert outputs[plain]["n_dropped"] == 3 and outputs[plain]["n_images"] == 37
    for key in ("n_images", "n_dropped", "mean", "classes"):
        assert outputs[marked][key] == outputs[plain][key]
    assert "3 images without a finite prediction" in capsys.readouterr().out


def test_compare_refuses_existing_linked_or_input_outputs(tmp_path, capsys):
    two_runs(tmp_path)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "comparison.md").write_text("my notes\n")
    args = [str(tmp_path / "A"), str(tmp_path / "B"), "--resamples", "0"]
    assert compare.main([*args, "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, COMPARE, "comparison.md exists", "--overwrite")
    (out / "comparison.csv").symlink_to(tmp_path / "A" / "predictions_test.csv")
    before = snapshot(tmp_path)
    assert compare.main([*args, "--out", str(out), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, COMPARE, "comparison.csv", "symbolic link")
    # An input named like an output: read, never replaced.
    shutil.copy(tmp_path / "B" / "predictions_test.csv", tmp_path / "comparison.csv")
    before = snapshot(tmp_path)
    assert compare.main([str(tmp_path / "A"), str(tmp_path / "comparison.csv"), "--resamples",
                         "0", "--out", str(tmp_path), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, COMPARE, "is one of this command's inputs")
    assert snapshot(tmp_path) == before


def test_compare_read_only_folder_and_abbreviated_flags(tmp_path, monkeypatch, capsys):
    two_runs(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    assert compare.main([str(tmp_path / "A"), str(tmp_path / "B"), "--resamples", "0",
                         "--out", str(locked)]) == 1
    one_error_line(capsys.readouterr().err, COMPARE, "Read-only file system", str(locked))
    monkeypatch.undo()
    assert list(locked.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    assert compare.main([str(tmp_path / "A"), str(tmp_path / "B"), "--resamples", "0",
                         "--out", str(tmp_path / "afile" / "cmp")]) == 1
    one_error_line(capsys.readouterr().err, COMPARE, str(tmp_path / "afile"))
    with pytest.raises(SystemExit) as exc:
        compare.main([str(tmp_path / "A"), str(tmp_path / "B"), "--res", "0"])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err, COMPARE, "--res")
    assert compare.main([str(tmp_path / "A"), str(tmp_path / "nowhere")]) == 2
    one_error_line(capsys.readouterr().err, COMPARE, "run not found", "nowhere")


# ---------------------------------------------------------------------------------------
# util.metrics
# ---------------------------------------------------------------------------------------

def test_a_class_with_nan_scores_is_not_called_single_valued(caplog):
    targets = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    probs = np.array([[0.1, 0.2], [0.9, np.nan], [0.8, 0.4], [0.2, 0.1]])
    with caplog.at_level(logging.WARNING, logger="util.metrics"):
        metrics = multilabel_metrics(targets, probs, ["a", "b"])
    assert np.isnan(metrics["auroc"]["b"]) and metrics["mean_auroc"] == 1.0
    assert "'b' has NaN scores for 1 of the 4 evaluated images" in caplog.text
    assert "single label value" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="util.metrics"):
        multilabel_metrics(np.array([[0, 1], [1, 1]]), np.array([[0.1, 0.2], [0.9, 0.3]]), ["a", "b"])
    assert "'b' has a single label value in the 2 evaluated images" in caplog.text


@pytest.mark.parametrize("argv", [["--lr", "-1"], ["--method", "lora", "--lora_rank", "0"]])
def test_under_torchrun_a_flag_error_is_said_once_per_machine(argv, monkeypatch, capsys):
    """Every process of a torchrun reads the same flags: only each machine's first says why."""
    import main_finetune_lora as mfl

    said = {}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun sets
    for local_rank in ("0", "1", "3"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as stop:
            mfl.parse(argv)
        said[local_rank] = (stop.value.code, capsys.readouterr().err)
    assert said["0"][0] == said["1"][0] == said["3"][0] == 2
    assert said["0"][1].startswith(f"{mfl.PROG}: error: ") and "--l" in said["0"][1].splitlines()[0]
    assert said["1"][1] == said["3"][1] == ""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # a LOCAL_RANK left in the shell: the error is said
    with pytest.raises(SystemExit):
        mfl.parse(argv)
    assert capsys.readouterr().err.startswith(f"{mfl.PROG}: error: ")
