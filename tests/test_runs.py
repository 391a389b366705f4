"""Run folders tell the truth: crash-consistent epochs, one run at a time, results never
overwritten, resumes that check what they resume, errors a user can act on."""
import errno
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import datasets
import main_finetune_lora as mfl
from util import cli
import training
import util.runfolder as runfolder
from _fakes import demo_data_and_weights, mrm_checkpoint, tiny_run_args
from util.io import atomic_write, write_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small NIH-layout demo set and a fake depth-2 MRM checkpoint."""
    return demo_data_and_weights(tmp_path_factory.mktemp("runs"), seed=2)


def args_for(data, weights, out, *extra):
    return tiny_run_args(data, weights, out, *extra, seed=5)


def tensors(folder, stem):
    return load_file(str(folder / f"{stem}.safetensors"))


def assert_same_run(a: Path, b: Path):
    """Bit-identical trained tensors, optimizer state, log and test results."""
    for stem in ("checkpoint-best", "checkpoint-last"):
        ta, tb = tensors(a, stem), tensors(b, stem)
        assert set(ta) == set(tb)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (stem, k)
    sa = torch.load(a / "checkpoint-last.state.pt", weights_only=True)
    sb = torch.load(b / "checkpoint-last.state.pt", weights_only=True)
    for (ka, va), (kb, vb) in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(va[n], vb[n]) for n in va)
    assert (a / "log.txt").read_text() == (b / "log.txt").read_text()
    ra = json.loads((a / "results_test.json").read_text())
    rb = json.loads((b / "results_test.json").read_text())
    assert ra["auroc"] == rb["auroc"] and ra["mean_auroc"] == rb["mean_auroc"]


@pytest.fixture(scope="module")
def whole(demo, tmp_path_factory):
    """An uninterrupted 2-epoch run to compare others with."""
    data, weights = demo
    out = tmp_path_factory.mktemp("whole") / "run"
    assert mfl.cli(args_for(data, weights, out)) == 0
    return out


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (not even except-Exception handlers)."""


# Every file operation of an epoch's commit, in order.
FAULT_POINTS = ["mkdir", "staged", "committed", "recorded", "moved checkpoint-best.json",
                "moved checkpoint-last.safetensors", "moved checkpoint-last.state.pt", "log"]


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_killed_between_any_two_file_operations_resumes_bit_identical(demo, whole, tmp_path,
                                                                     monkeypatch, point):
    data, weights = demo
    out = tmp_path / "cut"
    seen = []

    def fault(label):
        seen.append(label)
        # Epoch 1's commit is the second: kill there, with epoch 0 committed before it.
        if label == point and seen.count("mkdir") == 2:
            raise Killed(label)

    monkeypatch.setattr(runfolder, "_fault_point", fault)
    with pytest.raises(Killed):
        mfl.cli(args_for(data, weights, out))
    monkeypatch.setattr(runfolder, "_fault_point", lambda label: None)
    (out / runfolder.LOCK_NAME).unlink(missing_ok=True)  # a killed process leaves no live holder
    assert not (out / "results_test.json").exists()

    # Without --resume the folder is refused; with it the run continues to the same end.
    assert mfl.cli(args_for(data, weights, out)) == 1
    assert mfl.cli(args_for(data, weights, out, "--resume", "auto")) == 0
    assert_same_run(whole, out)
    assert not (out / runfolder.PENDING_DIR).exists()
    assert not list(out.glob(".*.tmp"))


def test_resume_refuses_a_checkpoint_whose_files_disagree(demo, whole, tmp_path, capsys):
    data, weights = demo
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(whole, out)
    # A file changed after its commit: named, and resume refused.
    t = tensors(out, "checkpoint-last")
    key = next(iter(t))
    t[key] = t[key] + 1
    from safetensors.torch import save_file

    save_file(t, str(out / "checkpoint-last.safetensors"))
    assert mfl.cli(args_for(data, weights, out, "--resume", "auto", "--epochs", "3")) == 1
    err = capsys.readouterr().err
    assert "checkpoint-last.safetensors does not belong to the last committed epoch" in err
    # ... but a damaged run does not block replacing it.
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    assert mfl.cli(args_for(data, weights, damaged, "--overwrite", "--epochs", "1")) == 0
    assert runfolder.RunFolder(damaged).verify()["epoch"] == 0

    # A checkpoint without its commit record is no committed epoch: refused.
    shutil.rmtree(out)
    shutil.copytree(whole, out)
    (out / "commit.json").unlink()
    assert mfl.cli(args_for(data, weights, out, "--resume", "auto", "--epochs", "3")) == 1
    assert "has no commit record (commit.json)" in capsys.readouterr().err


def test_resume_checks_weights_normalisation_and_recipe(demo, whole, tmp_path, capsys):
    data, weights = demo
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(whole, out)
    other = tmp_path / "MRM_other.pth"
    mrm_checkpoint(other, seed=9)
    cases = [(["--finetune", str(other)], "other pre-trained weights"),
             (["--norm", "cxr_mae"], "trained with --norm 'mrm', this command gives 'cxr_mae'"),
             (["--lr", "0.1"], "trained with --lr 0.05")]
    for flags, message in cases:
        assert mfl.cli(args_for(data, weights, out, "--resume", "auto", "--epochs", "3", *flags)) == 1
        assert message in capsys.readouterr().err
    # Longer schedules are allowed: the run continues from its committed epoch.
    assert mfl.cli(args_for(data, weights, out, "--resume", "auto", "--epochs", "3")) == 0
    epochs = [json.loads(l)["epoch"] for l in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_second_run_into_a_busy_folder_is_refused_and_stale_locks_are_taken_over(demo, tmp_path, capsys):
    data, weights = demo
    out = tmp_path / "busy"
    out.mkdir()
    lock = out / runfolder.LOCK_NAME
    held = runfolder.RunLock(out)
    held.acquire("the first run")  # a run in progress holds the lock
    assert mfl.cli(args_for(data, weights, out)) == 1
    err = capsys.readouterr().err
    assert f"in use by another run (pid {os.getpid()}" in err and "the first run" in err
    assert sorted(p.name for p in out.iterdir()) == [runfolder.LOCK_NAME]  # nothing written
    held.release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    assert mfl.cli(args_for(data, weights, out, "--epochs", "1")) == 0
    assert not lock.exists() and (out / "results_test.json").is_file()


def test_eval_writes_its_own_folder_with_the_training_settings(demo, tmp_path):
    data, weights = demo
    out = tmp_path / "run"
    assert mfl.cli(args_for(data, weights, out, "--data_size", "10%", "--epochs", "1")) == 0
    own = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # A second test set (another hospital): its own split folder.
    other = tmp_path / "hospitalB"
    other.mkdir()
    lines = (data / "test_list.txt").read_text().splitlines()[:9]
    (other / "test_list.txt").write_text("\n".join(lines) + "\n")
    argv = ["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
            "--split_dir", str(other), "--amp", "none", "--num_workers", "0", "--no_progress"]
    assert mfl.cli(argv) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == own  # untouched
    evaluated = out / "eval" / "NIH_demo-hospitalB-test_list"
    res = json.loads((evaluated / "results_test.json").read_text())
    assert res["num_images"] == 9 and res["data_size"] == "10%" and res["seed"] == 5
    assert res["evaluation"]["split_file"].endswith("hospitalB/test_list.txt")
    # Evaluating again into the same place is refused, not silently replaced.
    assert mfl.cli(argv) == 2
    assert mfl.cli([*argv, "--eval_name", "again"]) == 0
    assert (out / "eval" / "again" / "predictions_test.csv").is_file()
    # --output_dir pointing at a training run's folder is refused.
    assert mfl.cli([*argv, "--output_dir", str(out)]) == 2


def test_overwrite_removes_only_what_the_run_wrote(demo, tmp_path):
    data, weights = demo
    out = tmp_path / "run"
    assert mfl.cli(args_for(data, weights, out, "--epochs", "1")) == 0
    recorded = json.loads((out / runfolder.MANIFEST_NAME).read_text())["files"]
    assert {"config.json", "log.txt", "checkpoint-best.safetensors", "checkpoint-last.state.pt",
            "results_test.json", "predictions_test.csv", "roc_test.png"} <= set(recorded)
    assert any(f.startswith("logs/events.out.tfevents") for f in recorded)
    mine = {"predictions_hospitalB.csv": "a,b\n", "results_external.json": "{}",
            "notes.txt": "my notes"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert mfl.cli(args_for(data, weights, out, "--epochs", "1", "--overwrite", "--seed", "6")) == 0
    for name, text in mine.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text())["settings"]["seed"] == 6
    assert len([l for l in (out / "log.txt").read_text().splitlines()]) == 1


def _split_with_constant_column(data: Path, dest: Path, column: int):
    dest.mkdir()
    for name in ("train_list.txt", "test_list.txt"):
        (dest / name).write_text((data / name).read_text())
    rows = []
    for line in (data / "val_list.txt").read_text().splitlines():
        parts = line.split(" ")
        parts[1 + column] = "0"
        rows.append(" ".join(parts))
    (dest / "val_list.txt").write_text("\n".join(rows) + "\n")


def test_model_selection_skips_undefined_classes_and_json_has_no_nan(demo, tmp_path):
    data, weights = demo
    splits = tmp_path / "splits"
    _split_with_constant_column(data, splits, column=0)
    out = tmp_path / "run"
    assert mfl.cli(args_for(data, weights, out, "--split_dir", str(splits), "--epochs", "2")) == 0
    log = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert all(l["val_auroc"]["Atelectasis"] is None for l in log)
    # The best epoch follows the defined mean (not frozen at the first epoch by a NaN).
    best = json.loads((out / "checkpoint-best.json").read_text())
    means = [l["val_mean_auroc"] for l in log]
    assert best["epoch"] == means.index(max(means)) and best["val_mean_auroc"] == max(means)
    config = json.loads((out / "config.json").read_text())
    assert "Atelectasis" in config["val_undefined_classes"]
    lines = (out / "train.log").read_text().splitlines()
    said = [l for l in lines if "val_list.txt: no AUROC for" in l and "Atelectasis" in l]
    assert len(said) == 1  # said once, not every epoch
    # Validation repeats nothing; only the test set's own evaluation may name the class, once.
    test_column = [line.split(" ")[1] for line in (data / "test_list.txt").read_text().splitlines()]
    per_image = [l for l in lines if "util.metrics" in l and "'Atelectasis'" in l]
    assert len(per_image) == int(len(set(test_column)) == 1)
    for path in out.rglob("*.json"):
        assert "NaN" not in path.read_text(), path


def test_no_defined_validation_class_stops_before_training(tmp_path, capsys):
    data = datasets.make_demo_dataset(tmp_path / "NIH_demo", num_images=40, image_size=32, seed=4)
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    rows = [line.split(" ")[0] + " " + " ".join(["0"] * 14)
            for line in (data / "val_list.txt").read_text().splitlines()]
    (data / "val_list.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert mfl.cli(args_for(data, weights, out)) == 1
    assert "no class has both positive and negative images" in capsys.readouterr().err
    assert not (out / "checkpoint-last.safetensors").exists()


def test_run_names_keep_settings_apart():
    settings = dict(dataset="nih", data_size="1%", method="lora", optimizer="sgd", lr=0.05,
                    epochs=50, global_batch=64, seed=0, input_size=224)

    def name(weights="MRM", tag="r4", note="", **changes):
        return runfolder.auto_run_name({**settings, **changes}, weights, tag, note)

    names = {name(), name(dataset="chexpert"), name(weights="CXR_MAE"), name(seed=1),
             name(data_size="10%"), name(tag="r8"), name(input_size=448), name(note="x")}
    assert len(names) == 8
    assert name() == "nih_1pct_mrm_lora-r4_sgd-lr0.05-e50-b64_s0"
    assert name(weights="", method="full", tag="") == "nih_1pct_random_full_sgd-lr0.05-e50-b64_s0"


def test_refusal_suggests_what_is_right(demo, whole, tmp_path, capsys):
    data, weights = demo
    assert mfl.cli(args_for(data, weights, whole)) == 1
    assert "complete: --overwrite to run it again" in capsys.readouterr().err
    assert mfl.cli(args_for(data, weights, whole, "--seed", "1")) == 1
    assert "different run (--seed 5 -> 1)" in capsys.readouterr().err
    # A setting the folder name leaves out still makes another run: named, not "complete".
    assert mfl.cli(args_for(data, weights, whole, "--lora_alpha", "16", "--num_workers", "1")) == 1
    err = capsys.readouterr().err
    assert "different run (--lora_alpha 32.0 -> 16.0)" in err and "complete" not in err
    # Only a longer --epochs: continuing the run is one of the right answers.
    whole_epochs = json.loads((whole / "config.json").read_text())["settings"]["epochs"]
    assert mfl.cli(args_for(data, weights, whole, "--epochs", str(whole_epochs + 1))) == 1
    assert f"--resume auto to continue it to {whole_epochs + 1} epochs" in capsys.readouterr().err


def test_demo_runs_have_their_own_folders_and_resume(tmp_path):
    data = datasets.make_demo_dataset(tmp_path / "RSNA_demo_nih", num_images=40, image_size=32)
    small = ["--depth", "2", "--input_size", "32", "--batch_size", "16", "--num_workers", "0",
             "--amp", "none", "--no_progress", "--output_dir", str(tmp_path / "out")]
    assert mfl.cli(["--demo", "--data_path", str(data), "--dataset", "nih", "--epochs", "1", *small]) == 0
    (run,) = (tmp_path / "out").glob("demo-nih*")  # the demo's kind, and a digest of the flags given
    first = tensors(run, "checkpoint-last")
    # --resume auto continues the demo run (the demo's --overwrite default does not restart it).
    assert mfl.cli(["--demo", "--data_path", str(data), "--dataset", "nih", "--epochs", "2",
                    "--resume", "auto", *small]) == 0
    epochs = [json.loads(l)["epoch"] for l in (run / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]
    assert not all(torch.equal(first[k], v) for k, v in tensors(run, "checkpoint-last").items())
    assert not (tmp_path / "out" / "demo-rsna").exists()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": float("nan")})
        atomic_write(tmp_path / "b.bin", lambda p: Path(p).write_bytes(b"1"))
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None}


def test_output_problems_are_one_line(demo, tmp_path, monkeypatch, capsys):
    data, weights = demo
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert mfl.cli(args_for(data, weights, a_file)) == 1
    assert "is a file, not a folder" in capsys.readouterr().err

    # Disk full while committing epoch 1: one line, and epoch 0's checkpoint stays usable.
    import checkpoints as ckpt

    real = ckpt.save_resume_state
    calls = []

    def full(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, state)

    monkeypatch.setattr(ckpt, "save_resume_state", full)
    out = tmp_path / "full"
    assert mfl.cli(args_for(data, weights, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("main_finetune_lora.py: error: no space left on device while writing")
    assert f"the last complete checkpoint is {out / 'checkpoint-last'}" in err
    assert runfolder.RunFolder(out).verify()["epoch"] == 0


def test_parse_errors_are_short_and_every_flag_is_documented(capsys):
    with pytest.raises(SystemExit) as exc:
        mfl.cli(["--epochs", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--epochs" in err[0] and "--help" in err[1]
    parser = mfl.get_args_parser()
    undocumented = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and a.dest != "help" and not a.help]
    assert undocumented == []
    text = parser.format_help()
    assert text.count("(default: 4)") >= 1 and "--cls_token" in text
    cls_help = " ".join(text.split("\n  --cls_token")[1].split("--nb_classes")[0].split())
    assert "default: True" not in cls_help and "the default only for weights whose authors do" in cls_help


def test_warmup_longer_than_the_run_is_capped_with_a_note():
    parser = mfl.get_args_parser()
    argv = ["--demo", "--epochs", "2"]
    args = parser.parse_args(argv)
    mfl.resolve_args(args, cli.explicit_flags(parser, argv))
    assert args.warmup_epochs == 1  # the demo's own warm-up fits
    argv = ["--demo", "--epochs", "2", "--warmup_epochs", "5"]
    args = parser.parse_args(argv)
    mfl.resolve_args(args, cli.explicit_flags(parser, argv))
    assert args.warmup_epochs == 2 and "capped" in args.notes[0]


def test_progress_lines_reach_the_log_without_a_terminal(demo, tmp_path):
    data, weights = demo
    out = tmp_path / "run"
    argv = [a for a in args_for(data, weights, out, "--epochs", "1", "--progress_freq", "1")
            if a != "--no_progress"]
    proc = subprocess.run([sys.executable, str(ROOT / "main_finetune_lora.py"), *argv],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "images/s, epoch ETA" in log


def test_compile_auto_is_off_without_cuda_and_forced_compile_matches_eager(demo, whole, tmp_path):
    parser = mfl.get_args_parser()
    args = parser.parse_args([])
    assert args.compile == "auto"
    assert not training.decide_compile(args.compile, torch.device("cpu"), 10**6)
    assert training.decide_compile(args.compile, torch.device("cuda"), training.COMPILE_AUTO_MIN_STEPS)
    assert not training.decide_compile(args.compile, torch.device("cuda"), 13)
    assert parser.parse_args(["--compile"]).compile == "on"

    data, weights = demo
    out = tmp_path / "compiled"
    assert mfl.cli(args_for(data, weights, out, "--compile", "on",
                            "--compile_backend", "aot_eager")) == 0
    a, b = tensors(whole, "checkpoint-last"), tensors(out, "checkpoint-last")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_failed_compile_falls_back_to_eager_once(caplog):
    from engine_finetune import CompiledModule

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    model = torch.nn.Linear(4, 2)
    wrapped = CompiledModule(model, backend=broken, name="training")
    x = torch.randn(3, 4)
    assert torch.equal(wrapped(x), model(x)) and wrapped.failed
    wrapped(x)
    warnings = [r for r in caplog.records if "torch.compile of the training model failed" in r.getMessage()]
    assert len(warnings) == 1
    assert list(wrapped.parameters()) == list(model.parameters())


def test_compile_mode_reaches_torch_compile_and_needs_inductor(monkeypatch, capsys):
    import engine_finetune
    from engine_finetune import CompiledModule

    seen = []

    def fake_compile(module, **kwargs):
        seen.append(kwargs)
        return module

    monkeypatch.setattr(engine_finetune.torch, "compile", fake_compile)
    model = torch.nn.Linear(4, 2)
    CompiledModule(model, backend="inductor", mode="reduce-overhead")
    CompiledModule(model, backend="aot_eager")
    assert seen == [{"backend": "inductor", "mode": "reduce-overhead"}, {"backend": "aot_eager"}]
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        CompiledModule(model, mode="fast")

    # CUDA graphs: every call starts a step, and the output is the caller's own tensor.
    steps = []
    monkeypatch.setattr(engine_finetune.torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    inner_out = []
    graphed = CompiledModule(model, backend="inductor", mode="reduce-overhead")
    model.register_forward_hook(lambda m, i, o: inner_out.append(o))
    x = torch.randn(3, 4)
    y = graphed(x)
    assert steps == [1] and torch.equal(y, inner_out[0]) and y.data_ptr() != inner_out[0].data_ptr()
    plain = CompiledModule(model, backend="inductor")
    assert plain(x).data_ptr() == inner_out[-1].data_ptr() and steps == [1]

    with pytest.raises(SystemExit):
        mfl.cli(["--demo", "--compile_mode", "reduce-overhead", "--compile_backend", "aot_eager",
                 "--check_args"])
    assert "--compile_mode reduce-overhead is a mode of the inductor backend" in capsys.readouterr().err


def test_test_results_carry_intervals_in_json_and_tensorboard(whole):
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from util.stats import auroc_intervals

    res = json.loads((whole / "results_test.json").read_text())
    preds = pd.read_csv(whole / "predictions_test.csv")
    names = res["class_names"]
    expected = auroc_intervals(preds[[f"label_{n}" for n in names]].to_numpy(),
                               preds[names].to_numpy(), names, resamples=1000, seed=0)
    assert json.loads(json.dumps(expected)) == res["intervals"]
    acc = EventAccumulator(str(whole / "logs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert acc.Scalars("test/mean_auroc")[0].value == pytest.approx(res["mean_auroc"])
    mean = res["intervals"]["mean"]
    for bound in ("ci_low", "ci_high"):
        assert (f"test/mean_auroc_{bound}" in tags) == (mean[bound] is not None)


def test_cache_choice_is_recorded_and_a_lossy_cache_is_used_only_when_asked(tmp_path):
    data = datasets.make_demo_dataset(tmp_path / "NIH_demo", num_images=40, image_size=48, seed=3)
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    datasets.build_cache(data, "nih", size=24)  # a downsized (lossy) cache only
    auto = tmp_path / "auto"
    assert mfl.cli(args_for(data, weights, auto, "--epochs", "1")) == 0
    cache = json.loads((auto / "config.json").read_text())["data_cache"]
    assert {cache[s]["kind"] for s in ("train", "val", "test")} == {"none"}
    lossy = tmp_path / "lossy"
    assert mfl.cli(args_for(data, weights, lossy, "--epochs", "1", "--cache", "lossy")) == 0
    cache = json.loads((lossy / "config.json").read_text())["data_cache"]
    assert cache["train"]["kind"] == "lossy" and cache["train"]["size"] == 24
    assert json.loads((lossy / "results_test.json").read_text())["training"]["pixels"] == "lossy 24px cache"
    assert "downsized (lossy) cache of shorter side 24" in (lossy / "train.log").read_text()
    assert "downsized" not in (auto / "train.log").read_text()


def test_config_records_preset_source_precision_and_global_batch(demo, tmp_path):
    data, weights = demo
    out = tmp_path / "preset"
    argv = args_for(data, weights, out, "--preset", "nih-1-mrm", "--epochs", "1")
    argv = [a for a in argv if a not in ("--batch_size", "16")] + ["--global_batch", "16"]
    assert mfl.cli(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert "paper README" in config["preset_source"]
    assert (config["precision"], config["settings"]["global_batch"], config["settings"]["batch_size"]) == ("fp32", 16, 16)
    assert config["settings"]["lr"] == 0.05
    results = json.loads((out / "results_test.json").read_text())
    assert results["precision"] == "fp32" and results["training"]["global_batch"] == 16
    assert results["training"]["preset_source"] == config["preset_source"]


@pytest.mark.parametrize("world,batch", [(1, 64), (2, 32), (4, 16)])
def test_global_batch_is_kept_over_processes(monkeypatch, tmp_path, world, batch, vit_base_file):
    weights = vit_base_file(tmp_path, "CXR_MAE.pth")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    parser = mfl.get_args_parser()
    argv = ["--preset", "nih-1-cxr_mae", "--finetune", str(weights), "--data_path", str(tmp_path)]
    args = parser.parse_args(argv)
    mfl.resolve_args(args, cli.explicit_flags(parser, argv))
    assert (args.batch_size, args.accum_iter, args.global_batch) == (batch, 1, 64)


def test_global_batch_that_does_not_divide_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        mfl.cli(["--demo", "--global_batch", "64", "--check_args"])
    assert "does not divide over 3 processes" in capsys.readouterr().err


def test_a_batch_size_that_contradicts_the_global_batch_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        mfl.cli(["--demo", "--global_batch", "64", "--batch_size", "16", "--check_args"])
    assert exc.value.code == 2
    assert ("--global_batch: --batch_size 16 contradicts global batch 64 over 2 processes x "
            "accum_iter 1 (gives 32)") in capsys.readouterr().err
    assert mfl.cli(["--demo", "--global_batch", "64", "--batch_size", "32", "--check_args"]) == 0


def test_compiled_run_with_checkpointing_resumes_like_eager(demo, tmp_path, monkeypatch):
    """--compile on with --grad_checkpointing and merged evaluation, interrupted and resumed,
    ends where the same eager run ends."""
    data, weights = demo
    flags = ("--grad_checkpointing", "--epochs", "2")
    eager = tmp_path / "eager"
    assert mfl.cli(args_for(data, weights, eager, *flags)) == 0

    compiled = tmp_path / "compiled"
    compile_flags = (*flags, "--compile", "on", "--compile_backend", "aot_eager")
    commits = []

    def fault(label):
        if label == "mkdir":
            commits.append(label)
            if len(commits) == 2:
                raise Killed(label)

    monkeypatch.setattr(runfolder, "_fault_point", fault)
    with pytest.raises(Killed):
        mfl.cli(args_for(data, weights, compiled, *compile_flags))
    monkeypatch.setattr(runfolder, "_fault_point", lambda label: None)
    (compiled / runfolder.LOCK_NAME).unlink(missing_ok=True)
    assert mfl.cli(args_for(data, weights, compiled, *compile_flags, "--resume", "auto")) == 0
    a, b = tensors(eager, "checkpoint-last"), tensors(compiled, "checkpoint-last")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ra = json.loads((eager / "results_test.json").read_text())
    rb = json.loads((compiled / "results_test.json").read_text())
    assert rb["mean_auroc"] == pytest.approx(ra["mean_auroc"], abs=1e-4)
