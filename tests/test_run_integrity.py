"""What a run reports is what it did: a resume into another folder tests its own best model
and never another run's, the demo replaces only its own folder, resumes refuse other data
or pixels, flags are never taken by abbreviation, and each checkpoint keeps its own score."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import datasets
import main_finetune_lora as mfl
from util import cli
import training
import util.runfolder as runfolder
from _fakes import demo_data_and_weights, tiny_run_args
from engine_finetune import train_one_epoch


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small NIH-layout demo set and a fake depth-2 MRM checkpoint."""
    return demo_data_and_weights(tmp_path_factory.mktemp("integrity"), seed=2)


def args_for(data, weights, out, *extra):
    return tiny_run_args(data, weights, out, "--ci_resamples", "0", *extra, seed=5)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first(demo, tmp_path_factory):
    """A finished 2-epoch run in an automatically named folder (its name has -e2)."""
    data, weights = demo
    parent = tmp_path_factory.mktemp("first")
    assert mfl.cli(args_for(data, weights, parent, "--run_name", "auto")) == 0
    (run,) = [p for p in parent.iterdir() if p.is_dir()]
    assert "-e2-" in run.name
    return run


def no_improvement(monkeypatch):
    """Validation during training never beats the resumed run's best (test unaffected)."""
    real = training.evaluate

    def fake(model, loader, *a, **k):
        stats = real(model, loader, *a, **k)
        if k.get("warn_undefined") is False:
            stats["mean_auroc"] = 0.1
        return stats

    monkeypatch.setattr(training, "evaluate", fake)


def test_resume_with_more_epochs_continues_in_a_new_folder_and_tests_the_best(
        demo, first, monkeypatch):
    data, weights = demo
    before = snapshot(first)
    old_best = json.loads((first / "checkpoint-best.json").read_text())
    no_improvement(monkeypatch)
    argv = args_for(data, weights, first.parent, "--run_name", "auto", "--epochs", "3",
                    "--resume", str(first / "checkpoint-last"))
    assert mfl.cli(argv) == 0
    new = first.parent / first.name.replace("-e2-", "-e3-")
    assert snapshot(first) == before  # the source run is untouched
    # The final test is of the best model so far: the resumed run's, carried over.
    a, b = load_file(str(first / "checkpoint-best.safetensors")), load_file(
        str(new / "checkpoint-best.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((new / "results_test.json").read_text())
    assert results["checkpoint"] == str(new / "checkpoint-best")
    assert results["epoch"] == old_best["epoch"]
    epochs = [json.loads(l)["epoch"] for l in (new / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]
    assert runfolder.RunFolder(new).verify()["epoch"] == 2  # the carried files are committed
    assert "checkpoint-best.safetensors" in runfolder.RunFolder(new).written()
    config = json.loads((new / "config.json").read_text())
    assert config["resumed_from"] == str((first / "checkpoint-last").resolve())
    # checkpoint-last keeps its own epoch's score; the best so far under its own key.
    last = json.loads((new / "checkpoint-last.json").read_text())
    assert last["val_mean_auroc"] == 0.1
    assert last["best_val_mean_auroc"] == old_best["val_mean_auroc"]
    assert last["best_epoch"] == old_best["epoch"]


def test_resume_into_a_folder_holding_another_run_is_refused_unless_overwrite(
        demo, first, tmp_path, capsys):
    data, weights = demo
    other = tmp_path / "other"
    assert mfl.cli(args_for(data, weights, other, "--epochs", "1", "--seed", "9")) == 0
    before = snapshot(other)
    argv = args_for(data, weights, other, "--epochs", "3", "--resume", str(first / "checkpoint-last"))
    assert mfl.cli(argv) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert snapshot(other) == before
    assert mfl.cli([*argv, "--overwrite"]) == 0
    results = json.loads((other / "results_test.json").read_text())
    assert results["seed"] == 5 and results["checkpoint"] == str(other / "checkpoint-best")
    epochs = [json.loads(l)["epoch"] for l in (other / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]
    assert runfolder.RunFolder(other).verify()["epoch"] == 2


def test_resume_into_another_folder_with_nothing_left_to_train_is_refused(demo, first, tmp_path, capsys):
    data, weights = demo
    out = tmp_path / "empty"
    assert mfl.cli(args_for(data, weights, out, "--resume", str(first / "checkpoint-last"))) == 1
    err = capsys.readouterr().err
    assert "leaves nothing to train" in err and "--eval --resume" in err
    assert not out.exists() or list(out.iterdir()) == []  # nothing written


def test_resume_auto_with_overwrite_is_a_contradiction(demo, first, capsys):
    data, weights = demo
    with pytest.raises(SystemExit) as exc:
        mfl.cli(args_for(data, weights, first, "--resume", "auto", "--overwrite", "--check_args"))
    assert exc.value.code == 2
    assert "--resume auto continues the run in the folder, --overwrite replaces it" in \
        capsys.readouterr().err
    before = snapshot(first)
    assert mfl.cli(args_for(data, weights, first, "--resume", str(first / "checkpoint-last"),
                            "--overwrite", "--epochs", "3")) == 1
    assert "give one of them" in capsys.readouterr().err
    assert snapshot(first) == before


def _resumable(data, weights, root: Path) -> Path:
    out = root / "run"
    assert mfl.cli(args_for(data, weights, out, "--epochs", "1")) == 0
    return out


@pytest.mark.parametrize("flags,message", [
    (["--aug_fill", "neutral"], "--aug_fill 'paper', this command gives 'neutral'"),
    (["--remode", "rand"], "--remode 'pixel', this command gives 'rand'"),
    (["--recount", "2"], "--recount 1, this command gives 2"),
    (["--device_aug"], "--device_aug False, this command gives True"),
])
def test_resume_refuses_other_preprocessing(demo, tmp_path, capsys, flags, message):
    data, weights = demo
    out = _resumable(data, weights, tmp_path)
    assert mfl.cli(args_for(data, weights, out, "--resume", "auto", "--epochs", "2", *flags)) == 1
    assert message in capsys.readouterr().err


def test_a_run_resumes_at_the_same_global_batch_split_another_way(demo, tmp_path, capsys):
    # As on another number of processes: 16 = 16 x 1 before, 8 x 2 now.
    data, weights = demo
    out = _resumable(data, weights, tmp_path)
    resume = ("--resume", "auto", "--epochs", "2")
    assert mfl.cli(args_for(data, weights, out, *resume, "--batch_size", "8")) == 1  # global 8
    assert "--batch_size 16, this command gives 8" in capsys.readouterr().err
    assert mfl.cli(args_for(data, weights, out, *resume, "--batch_size", "8", "--accum_iter", "2")) == 0
    assert "global batch 16 as before, split as --batch_size 8 x --accum_iter 2" in capsys.readouterr().err
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["epoch"] == 1


def test_a_resume_refused_into_a_new_folder_leaves_no_folder_behind(demo, tmp_path, capsys):
    data, weights = demo
    out = _resumable(data, weights, tmp_path)
    new = tmp_path / "new" / "runs"
    assert mfl.cli(args_for(data, weights, new, "--resume", str(out / "checkpoint-last"), "--epochs", "2",
                            "--recount", "2")) == 1
    assert "--recount 1, this command gives 2" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_resume_refuses_other_data_and_cache_but_follows_a_moved_folder(demo, tmp_path, capsys):
    data, weights = demo
    out = _resumable(data, weights, tmp_path)
    # Other split files (one validation label changed): other data.
    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        shutil.copy(data / name, splits / name)
    lines = (splits / "val_list.txt").read_text().splitlines()
    parts = lines[0].split(" ")
    parts[1] = "1" if parts[1] == "0" else "0"
    (splits / "val_list.txt").write_text("\n".join([" ".join(parts), *lines[1:]]) + "\n")
    resume = ("--resume", "auto", "--epochs", "2")
    assert mfl.cli(args_for(data, weights, out, *resume, "--split_dir", str(splits))) == 1
    err = capsys.readouterr().err
    assert "trained on other data: its val split file" in err and "--split_dir" in err
    # A lossy cache changes the pixels.
    moved = tmp_path / "moved" / "NIH_demo"
    shutil.copytree(data, moved)
    datasets.build_cache(moved, "nih", size=24)
    assert mfl.cli(args_for(moved, weights, out, *resume, "--cache", "lossy")) == 1
    err = capsys.readouterr().err
    assert "from original pixels, this command from lossy 24px cache" in err
    # The same split files in a moved data folder: the same data, the run continues.
    assert mfl.cli(args_for(moved, weights, out, *resume, "--cache", "off")) == 0
    epochs = [json.loads(l)["epoch"] for l in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]


@pytest.mark.parametrize("flags,dest,value", [
    (["--epoch", "10"], "epochs", 100),
    (["--lora_r", "16"], "lora_rank", 4),
    (["--warmup", "1"], "warmup_epochs", 5),
])
def test_abbreviated_flags_are_refused_not_overridden_by_a_preset(tmp_path, capsys, flags, dest, value):
    """Before: argparse took '--epoch 10' as --epochs, and the preset's value won over it."""
    weights = tmp_path / "MRM.pth"
    weights.write_bytes(b"x")
    argv = ["--preset", "nih-1-mrm", "--finetune", str(weights), "--data_path", str(tmp_path),
            "--check_args", *flags]
    with pytest.raises(SystemExit) as exc:
        mfl.cli(argv)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {flags[0]}" in capsys.readouterr().err


@pytest.fixture
def demo_home(tmp_path, monkeypatch):
    """The demo's default output folder, moved into tmp_path."""
    home = tmp_path / "output_dir"
    monkeypatch.setitem(mfl.DEMO_DEFAULTS, "output_dir", str(home))
    return home


def demo_argv(data, *extra):
    return ["--demo", "--data_path", str(data), "--dataset", "nih", "--epochs", "1", "--depth",
            "2", "--input_size", "32", "--batch_size", "16", "--num_workers", "0", "--amp", "none",
            "--no_progress", "--ci_resamples", "0", *extra]


def test_demo_replaces_only_its_own_demo_run(demo, demo_home, tmp_path, capsys):
    data, weights = demo
    run = demo_home / "demo-nih"
    assert mfl.cli(demo_argv(data)) == 0
    (run,) = demo_home.glob("demo-nih*")  # the demo's kind and a digest of the flags given
    assert mfl.cli(demo_argv(data)) == 0  # the same demo again replaces its own run
    assert json.loads((run / "config.json").read_text())["settings"]["seed"] == 0
    assert len((run / "log.txt").read_text().splitlines()) == 1
    kept = snapshot(run)
    assert mfl.cli(demo_argv(data, "--seed", "4")) == 0  # another seed: a folder of its own
    (seeded,) = demo_home.glob("demo-nih_s4*")
    assert json.loads((seeded / "config.json").read_text())["settings"]["seed"] == 4
    assert snapshot(run) == kept  # the seed-0 demo run is kept
    shutil.rmtree(seeded)

    # A real run the user put in a folder named like the demo's: never replaced by the demo.
    shutil.rmtree(run)
    assert mfl.cli(args_for(data, weights, run, "--epochs", "1")) == 0
    before = snapshot(run)
    assert mfl.cli(demo_argv(data)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(run) == before

    # A folder the user names: never overwritten by the demo's default.
    mine = tmp_path / "mine"
    assert mfl.cli(args_for(data, weights, mine / "E", "--epochs", "1")) == 0
    before = snapshot(mine / "E")
    assert mfl.cli(demo_argv(data, "--output_dir", str(mine), "--run_name", "E")) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(mine / "E") == before


@pytest.mark.parametrize("flags", [["--preset", "nih-1-mrm"], ["--finetune", "MRM.pth"],
                                   ["--data_size", "1%"]])
def test_real_run_flags_without_data_path_are_refused_not_a_demo(capsys, flags, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("MRM.pth").touch()  # a weights file that exists: only --data_path is missing
    with pytest.raises(SystemExit) as exc:
        mfl.cli([*flags, "--check_args"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flags[0]} needs --data_path" in err and "--demo" in err


def test_no_arguments_still_runs_the_demo():
    parser = mfl.get_args_parser()
    args = parser.parse_args([])
    mfl.resolve_args(args, cli.explicit_flags(parser, []))
    assert args.demo and args.demo_replace and not args.overwrite
    assert args.data_path == mfl.DEMO_DEFAULTS["data_path"]
    assert mfl.cli(["--check_args"]) == 0


def test_fp16_on_the_cpu_trains_with_a_grad_scaler(demo, tmp_path):
    data, weights = demo
    out = tmp_path / "fp16"
    argv = [a if a != "none" else "fp16" for a in args_for(data, weights, out, "--epochs", "1")]
    assert mfl.cli(argv) == 0
    state = torch.load(out / "checkpoint-last.state.pt", weights_only=True)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    assert json.loads((out / "config.json").read_text())["precision"] == "fp16"


def test_last_short_accumulation_group_steps_its_mean_gradient():
    """3 batches, --accum_iter 2: the second step is batch 3's own gradient, not half of it."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4, 2)).float()) for _ in range(3)]
    model = torch.nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_one_epoch(model, batches, opt, torch.device("cpu"), 0, set_lr=lambda e: 0.5,
                    accum_iter=2, log_freq=1, progress=False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for group in ([0, 1], [2]):
        ref.zero_grad()
        sum(bce(ref(batches[i][0]), batches[i][1]) for i in group).div(len(group)).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_a_continuation_stopped_before_its_first_epoch_continues_the_source_again(demo, tmp_path):
    """A run resumed from A into B and stopped before B's first commit: `--resume auto` in B
    continues A again (A's epochs, A's best), not a fresh run from the weights."""
    data, weights = demo
    source = _resumable(data, weights, tmp_path)  # one epoch done
    b = tmp_path / "b"
    # Given with a suffix, as users may: the record still leads back to the checkpoint.
    argv = args_for(data, weights, b, "--epochs", "2", "--resume",
                    str(source / "checkpoint-last.safetensors"))
    assert mfl.cli(argv) == 0
    # Make B look stopped before its first commit: only its start-up files are left.
    config = json.loads((b / "config.json").read_text())
    for f in list(b.iterdir()):
        if f.is_file():
            f.unlink()
        else:
            shutil.rmtree(f)
    (b / "config.json").write_text(json.dumps(config))
    assert mfl.cli(args_for(data, weights, b, "--epochs", "2", "--resume", "auto")) == 0
    epochs = [json.loads(l)["epoch"] for l in (b / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]  # A's epoch 0 carried, epoch 1 trained here
    assert json.loads((b / "config.json").read_text())["resumed_from"] == str(
        (source / "checkpoint-last.safetensors").resolve())


def test_resume_auto_in_a_new_length_folder_points_to_the_run_beside_it(tmp_path, caplog):
    """With the automatic name, --resume auto --epochs 3 finds its new -e3 folder empty and
    starts a new run; the warning names the -e2 run beside it and how to continue that."""
    done = tmp_path / "nih_1pct_mrm_lora-r4_sgd-lr0.05-e2-b64_s0"
    done.mkdir()
    (done / "checkpoint-last.json").write_text("{}")
    new = tmp_path / "nih_1pct_mrm_lora-r4_sgd-lr0.05-e3-b64_s0"
    assert runfolder.other_length_hint(new) == (f" (the same run with other --epochs is in {done}: "
                                          f"--resume {done / 'checkpoint-last'} continues it)")
    assert runfolder.other_length_hint(tmp_path / "nih_1pct_mrm_lora-r4_sgd-lr0.05-e3-b64_s1") == ""
    assert runfolder.other_length_hint(tmp_path / "my_run") == ""


def test_check_args_reads_the_split_files_as_the_run_would(tmp_path, capsys):
    """The launch scripts' flag check refuses what the run would refuse at its start: a folder
    name of two data set kinds, split files of another kind's labels."""
    data, weights = demo_data_and_weights(tmp_path / "d")
    argv = tiny_run_args(data, weights, tmp_path / "out", seed=0)
    at = argv.index("--dataset")
    argv = argv[:at] + argv[at + 2:]  # the kind from the folder's name
    assert mfl.cli([*argv, "--check_args"]) == 0
    two_kinds = tmp_path / "RSNA_ChestXray"
    shutil.copytree(data, two_kinds)
    said = {}
    for name, extra in (("two kinds", ["--data_path", str(two_kinds)]), ("rsna", ["--dataset", "rsna"])):
        with pytest.raises(SystemExit) as exc:
            mfl.cli([*argv, *extra, "--check_args"])
        assert exc.value.code == 2
        said[name] = capsys.readouterr().err.splitlines()[0]
    assert "suggests more than one data set kind (nih, rsna); pass --dataset" in said["two kinds"]
    assert said["rsna"].startswith(f"main_finetune_lora.py: error: {data / 'train_list.txt'}:1: ")
    # A custom data set: its classes.txt names the label columns, as in the run.
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "classes.txt").write_text("a\nb\nc\n")
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        (mine / name).write_text("x.png 0 1\n")
    with pytest.raises(SystemExit):
        mfl.cli([*argv, "--data_path", str(mine), "--check_args"])
    assert "classes.txt" in capsys.readouterr().err.splitlines()[0]
