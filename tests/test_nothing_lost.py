"""Nothing a user has is lost or overwritten by a training or --eval command, and each of its
errors is one line with its exit code (2: usage, nothing written; 1: failure; 130: Ctrl-C)."""
import json
import math
import multiprocessing
import os
import threading
from pathlib import Path

import pytest
import torch

import main_finetune_lora as mfl
import training
import util.runfolder as runfolder
from _fakes import demo_data_and_weights, tiny_run_args
from engine_finetune import train_one_epoch


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data_and_weights(tmp_path_factory.mktemp("lost"), seed=4)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """A finished one-epoch run R."""
    data, weights = demo
    run = tmp_path_factory.mktemp("trained") / "R"
    assert mfl.cli(args_for(data, weights, run)) == 0
    return run


def args_for(data, weights, out, *extra):
    return tiny_run_args(data, weights, out, "--epochs", "1", "--ci_resamples", "0", *extra, seed=2)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def eval_argv(data, run, *extra):
    return ["--eval", "--resume", str(run / "checkpoint-best"), "--data_path", str(data),
            "--amp", "none", "--num_workers", "0", "--no_progress", "--ci_resamples", "0", *extra]


@pytest.mark.parametrize("where", [["--eval_name", "..", "--overwrite"],
                                   ["--eval_name", "../..", "--overwrite"],
                                   ["--output_dir", "{run}/eval/..", "--overwrite"],
                                   ["--output_dir", "{run}/logs", "--overwrite"]])
def test_eval_never_writes_into_or_removes_the_training_run(demo, trained, capsys, where):
    data, _ = demo
    before = snapshot(trained)
    argv = eval_argv(data, trained, *(w.format(run=trained) for w in where))
    try:
        code = mfl.cli(argv)
    except SystemExit as exc:  # refused while parsing the flags
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert ("training run's folder" in err or "--eval_name '" in err) and err.count("error:") == 1
    assert snapshot(trained) == before


def test_eval_into_its_own_folder_inside_the_run_still_works(demo, trained):
    data, _ = demo
    before = snapshot(trained)
    assert mfl.cli(eval_argv(data, trained, "--eval_name", "again")) == 0
    assert (trained / "eval" / "again" / "results_test.json").is_file()
    assert {k: v for k, v in snapshot(trained).items() if not k.startswith("eval/")} == before


def test_a_relative_output_dir_records_every_file_under_its_own_name(demo, tmp_path, monkeypatch):
    data, weights = demo
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = [a for a in args_for(data, weights, "x") if a != "x"]
    i = argv.index("--output_dir")
    argv[i + 1:i + 1] = ["../runs"]
    argv[argv.index("--run_name") + 1] = "R"
    assert mfl.cli(argv) == 0
    run = tmp_path / "runs" / "R"
    names = set(json.loads((run / runfolder.MANIFEST_NAME).read_text())["files"])
    on_disk = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert on_disk - names == {runfolder.MANIFEST_NAME}  # every file the run wrote is its own
    assert {"config.json", "train.log", "results_test.json", "predictions_test.csv",
            "roc_test.png"} <= names
    assert any(n.startswith("logs/events.out.tfevents") for n in names)
    # predict.py therefore refuses to write over them (it asks util.runfolder.run_owning).
    assert runfolder.run_owning("../runs/R/predictions_test.csv") == run


def test_overwrite_removes_only_names_inside_the_folder(demo, tmp_path):
    data, weights = demo
    run = tmp_path / "runs" / "R"
    assert mfl.cli(args_for(data, weights, run)) == 0
    outside, absolute = tmp_path / "runs" / "keep.txt", tmp_path / "abs.txt"
    outside.write_text("mine")
    absolute.write_text("mine too")
    manifest = json.loads((run / runfolder.MANIFEST_NAME).read_text())
    manifest["files"] += ["../keep.txt", str(absolute), "logs/../../keep.txt"]
    (run / runfolder.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert mfl.cli(args_for(data, weights, run, "--overwrite")) == 0
    assert outside.read_text() == "mine" and absolute.read_text() == "mine too"


def test_a_run_never_writes_through_a_symlink_nor_over_a_users_files(demo, tmp_path, capsys):
    data, weights = demo
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.log").symlink_to(target)
    assert mfl.cli(args_for(data, weights, mine)) == 1
    assert "is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "keep"

    script = tmp_path / "launch.sh"
    script.write_text("echo hi\n")
    (mine / "train.log").unlink()
    (mine / "launch.sh").symlink_to(target)
    assert mfl.cli(args_for(data, weights, mine, "--script", str(script))) == 1
    assert "launch.sh is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "keep"

    (mine / "launch.sh").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (mine / "logs").symlink_to(elsewhere)  # TensorBoard's folder
    assert mfl.cli(args_for(data, weights, mine)) == 1
    assert "logs is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []

    (mine / "logs").unlink()
    (mine / "predictions_test.csv").write_text("my own table\n")
    assert mfl.cli(args_for(data, weights, mine)) == 1
    assert "holds files no run of this tool wrote (predictions_test.csv)" in capsys.readouterr().err
    assert (mine / "predictions_test.csv").read_text() == "my own table\n"
    assert sorted(p.name for p in mine.iterdir()) == ["predictions_test.csv"]


def _hold(folder: str, barrier, results, index: int) -> None:
    lock = runfolder.RunLock(folder)
    barrier.wait()
    try:
        lock.acquire(f"contender {index}")
        results[index] = 1
    except runfolder.RunFolderError:
        results[index] = 0
    barrier.wait()  # every contender has tried while the winner still holds the lock
    lock.release()


def _contend(folders: list[str], barrier, results, index: int, contenders: int) -> None:
    """One contending process: a round per folder, all contenders starting each round at once."""
    for r, folder in enumerate(folders):
        won = [-1] * contenders
        _hold(folder, barrier, won, index)
        results[r * contenders + index] = won[index]


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-file"])
def test_the_lock_is_held_by_one_process_at_a_time(tmp_path, stale):
    ctx = multiprocessing.get_context("fork")
    rounds, contenders = 40, 5
    folders = [tmp_path / f"r{r}" for r in range(rounds)]
    for folder in folders:
        folder.mkdir()
        if stale:  # a lock file left by a killed run (no process holds it)
            (folder / runfolder.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "gone"}))
    barrier, results = ctx.Barrier(contenders), ctx.Array("i", [-1] * (rounds * contenders))
    procs = [ctx.Process(target=_contend, args=([str(f) for f in folders], barrier, results, i, contenders))
             for i in range(contenders)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * contenders
    for r, folder in enumerate(folders):
        assert list(results[r * contenders:(r + 1) * contenders]).count(1) == 1, (r, list(results))
        assert not (folder / runfolder.LOCK_NAME).exists()


def test_the_lock_is_held_by_one_thread_at_a_time(tmp_path):
    for r in range(200):
        folder = tmp_path / f"t{r}"
        folder.mkdir()
        if r % 2:
            (folder / runfolder.LOCK_NAME).write_text("")  # empty: killed while writing it
        barrier, results = threading.Barrier(8), [-1] * 8
        threads = [threading.Thread(target=_hold, args=(str(folder), barrier, results, i))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results.count(1) == 1, (r, results)


def test_a_resume_cut_shorter_than_its_first_validation_says_so(demo, tmp_path, monkeypatch, capsys):
    """Killed after an epoch that was not validated, then resumed with fewer epochs: nothing
    is left to train or test, and the command says so in one line."""
    data, weights = demo
    calls = []

    def second_epoch_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_one_epoch(*a, **k)

    monkeypatch.setattr(training, "train_one_epoch", second_epoch_interrupted)
    out = tmp_path / "run"
    assert mfl.cli(args_for(data, weights, out, "--epochs", "4", "--valid_freq", "5")) == 130
    assert json.loads((out / "checkpoint-last.json").read_text())["epoch"] == 0
    assert not (out / "checkpoint-best.json").exists()  # epoch 0 was not validated
    capsys.readouterr()
    assert mfl.cli(args_for(data, weights, out, "--epochs", "1", "--valid_freq", "5", "--resume", "auto")) == 2
    assert "no epoch was validated (nothing to test)" in capsys.readouterr().err
    assert not (out / "results_test.json").exists()


def test_ctrl_c_says_how_to_continue_in_one_line(demo, tmp_path, monkeypatch, capsys):
    data, weights = demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_one_epoch", interrupted)
    argv = args_for(data, weights, tmp_path / "run")
    assert mfl.cli(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [l for l in err.splitlines() if "interrupted" in l]
    assert len(line) == 1 and line[0].endswith("--resume auto")
    assert "continue the run with: python3 main_finetune_lora.py --data_path" in line[0]
    assert not (tmp_path / "run" / runfolder.LOCK_NAME).exists()


def test_a_mistyped_data_path_is_named_first_and_nothing_is_created(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        mfl.cli(["--data_path", str(tmp_path / "NIH_typo"), "--output_dir", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--data_path {tmp_path / 'NIH_typo'}: no such folder" in err and "--finetune" not in err
    assert not out.exists()


def test_the_demo_writes_data_only_where_it_is_told(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        mfl.cli(["--demo", "--data_path", "demo_dta", "--check_args"])
    assert exc.value.code == 2
    assert "--demo_out" in capsys.readouterr().err and not (tmp_path / "demo_dta").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        mfl.cli(["--demo_out", "taken", "--check_args"])
    assert "already exists" in capsys.readouterr().err
    small = ["--depth", "2", "--input_size", "32", "--batch_size", "16", "--num_workers", "0",
             "--amp", "none", "--no_progress", "--epochs", "1", "--ci_resamples", "0",
             "--output_dir", "out"]
    assert mfl.cli(["--demo_out", "new_demo", *small]) == 0
    assert (tmp_path / "new_demo" / "train_list.txt").is_file()
    assert "wrote the synthetic demo data set to new_demo" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--cache_size", "256"], "--cache_size 256 chooses a downsized cache: pass it with --cache lossy"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64} is not valid"),
    (["--seed", "-1"], "--seed -1 is not valid"),
    (["--device", "meta"], "--device 'meta' is not valid: expected cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device 'mps' is not valid"),
    (["--warmup_epochs", "nan"], "--warmup_epochs nan is not valid"),
    (["--lr", "inf"], "--lr inf is not valid"),
])
def test_flag_values_no_run_can_use_are_one_line(demo, tmp_path, capsys, flags, message):
    data, weights = demo
    with pytest.raises(SystemExit) as exc:
        mfl.cli(args_for(data, weights, tmp_path / "x", *flags))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "loss is nan" not in err and len(err.strip().splitlines()) == 2
    assert not (tmp_path / "x").exists()


def test_progress_lines_come_every_30_seconds_in_short_epochs(monkeypatch, caplog):
    """A demo epoch has fewer steps than --progress_freq: progress still reaches the log."""
    import engine_finetune

    clock = iter(range(0, 10_000, 31))  # 31 s pass between steps
    monkeypatch.setattr(engine_finetune.time, "perf_counter", lambda: float(next(clock)))
    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(3, 4), torch.zeros(3, 2)) for _ in range(5)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level("INFO", logger="engine_finetune")
    monkeypatch.setattr(engine_finetune, "_progress", lambda loader, n, desc, progress: loader)
    train_one_epoch(model, batches, opt, torch.device("cpu"), 0, set_lr=lambda e: 0.1,
                    progress=True, progress_freq=100)
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert len(lines) == 4 and lines[0].startswith("epoch 0: step 1/5")
    assert not math.isnan(float(lines[0].split(", ")[1].split()[0]))


def test_a_log_dir_that_is_a_file_is_one_line_before_anything_is_written(demo, tmp_path, capsys):
    data, weights = demo
    a_file = tmp_path / "logs"
    a_file.write_text("mine")
    with pytest.raises(SystemExit) as exc:
        mfl.cli(args_for(data, weights, tmp_path / "run", "--log_dir", str(a_file)))
    assert exc.value.code == 2
    assert f"--log_dir: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "mine" and not (tmp_path / "run").exists()


REPORTS = ("reliability_test.png", "results_test_calibration.csv",
           "results_test_operating_points.md", "subgroups_test.md")


@pytest.mark.parametrize("command", ["train", "eval"])
def test_report_files_of_a_users_folder_are_refused_not_replaced(demo, trained, tmp_path, capsys,
                                                                 command):
    """Every report name a test writes counts: training into a folder of the user's and --eval
    into an --output_dir refuse a user's file of such a name, before anything is written."""
    data, weights = demo
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in REPORTS:
        (folder / name).write_text("precious")
    (folder / "results_test_mynotes.txt").write_text("precious too")
    argv = (args_for(data, weights, folder) if command == "train"
            else eval_argv(data, trained, "--output_dir", str(folder)))
    assert mfl.cli(argv) == (1 if command == "train" else 2)  # a run folder's conflict; usage
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and all(n in err for n in REPORTS)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*REPORTS, "results_test_mynotes.txt"])
    assert all((folder / n).read_text() == "precious" for n in REPORTS)


def test_an_evaluation_records_only_its_own_files_so_overwrite_keeps_the_users(demo, trained, tmp_path):
    data, _ = demo
    folder = tmp_path / "ev"
    folder.mkdir()
    note = folder / "results_test_mynotes.txt"  # a name like a report's, not one of them
    note.write_text("mine")
    assert mfl.cli(eval_argv(data, trained, "--output_dir", str(folder))) == 0
    written = runfolder.RunFolder(folder).written()
    assert "results_test_mynotes.txt" not in written
    # report_names lists every file the test wrote, so each is recorded as the evaluation's.
    made = {p.name for p in folder.iterdir() if p.is_file()} - {note.name, runfolder.MANIFEST_NAME}
    assert made <= set(runfolder.report_names("test")) and made <= set(written)
    assert mfl.cli(eval_argv(data, trained, "--output_dir", str(folder), "--overwrite")) == 0
    assert note.read_text() == "mine"
    assert (folder / "results_test.json").is_file()


def test_a_folder_no_run_wrote_keeps_its_hidden_files(demo, tmp_path, capsys):
    """Recovering an interrupted commit cleans only a run's own folder: a user's .*.tmp files
    stay, and a user's .pending/ (the run's staging name) is refused, not emptied."""
    data, weights = demo
    folder = tmp_path / "users"
    (folder / ".pending" / "sub").mkdir(parents=True)
    (folder / ".pending" / "sub" / "thesis.tex").write_text("chapter 1")
    (folder / ".notes.tmp").write_text("notes")
    (folder / ".cache.tmp").mkdir()
    assert mfl.cli(args_for(data, weights, folder)) == 1
    assert ".pending" in capsys.readouterr().err
    assert (folder / ".pending" / "sub" / "thesis.tex").read_text() == "chapter 1"
    (folder / ".pending" / "sub" / "thesis.tex").rename(tmp_path / "thesis.tex")
    (folder / ".pending" / "sub").rmdir()
    (folder / ".pending").rmdir()
    assert mfl.cli(args_for(data, weights, folder)) == 0
    assert (folder / ".notes.tmp").read_text() == "notes" and (folder / ".cache.tmp").is_dir()
    assert (folder / "results_test.json").is_file() and not (folder / ".pending").exists()


def test_a_launch_script_named_like_a_run_file_is_refused(demo, tmp_path, capsys):
    data, weights = demo
    script = tmp_path / "scripts" / "config.json"
    script.parent.mkdir()
    script.write_text("echo hi\n")
    out = tmp_path / "run"
    assert mfl.cli(args_for(data, weights, out, "--script", str(script))) == 1
    err = capsys.readouterr().err
    assert "--script" in err and "config.json" in err and err.count("error:") == 1
    assert not (out / "config.json").exists()


def test_the_command_that_continues_a_run_is_quoted_for_the_shell():
    import shlex

    from util.cli import resume_command

    argv = ["--run_name", "", "--output_dir", "my runs/x", "--resume", "old", "--overwrite"]
    line = resume_command("main_finetune_lora.py", argv)
    assert shlex.split(line) == ["python3", "main_finetune_lora.py", "--run_name", "",
                                 "--output_dir", "my runs/x", "--resume", "auto"]


def test_resuming_with_another_method_names_the_method(tmp_path):
    folder = runfolder.RunFolder(tmp_path)
    saved = {"method": "vpt", "vpt_tokens": 50, "epochs": 1}
    given = {"method": "adaptformer", "adapter_dim": 64, "epochs": 2}
    with pytest.raises(runfolder.RunConflict, match="method") as err:
        folder.check_resume("ckpt", saved, given)
    assert "vpt" in str(err.value) and "adaptformer" in str(err.value)
    assert "adapter_dim" not in str(err.value)


def test_a_run_named_another_way_is_the_same_run_never_replaced(demo, trained, tmp_path, capsys):
    # Through a symbolic link, or with a leading //, the checkpoint is still this folder's:
    # --overwrite is refused (it would replace the run being continued), --resume continues it.
    import shutil

    data, weights = demo
    run = tmp_path / "F" / "R"
    shutil.copytree(trained, run, symlinks=True)
    (tmp_path / "Flink").symlink_to(tmp_path / "F")
    before = snapshot(run)
    for spelling in (tmp_path / "Flink" / "R" / "checkpoint-last", "/" + str(run / "checkpoint-last")):
        argv = args_for(data, weights, run, "--epochs", "2", "--resume", str(spelling))
        assert mfl.cli([*argv, "--overwrite"]) == 1
        assert "--overwrite replaces it: give one of them" in capsys.readouterr().err
        assert snapshot(run) == before
    assert mfl.cli(args_for(data, weights, run, "--epochs", "2", "--resume",
                            str(tmp_path / "Flink" / "R" / "checkpoint-last"))) == 0
    assert json.loads((run / "log.txt").read_text().splitlines()[-1])["epoch"] == 1


def test_a_test_cut_short_leaves_no_results_json_to_pass_for_a_finished_one(demo, tmp_path, monkeypatch, capsys):
    import errno

    import util.reports

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    data, weights = demo
    out = tmp_path / "T"
    monkeypatch.setattr(util.reports, "save_reliability_diagram", full_disk)
    assert mfl.cli(args_for(data, weights, out)) == 1
    assert "reliability_test.png: no space left on device" in capsys.readouterr().err
    assert (out / "predictions_test.csv").is_file()  # the test had begun writing
    assert not (out / "results_test.json").exists()
    monkeypatch.undo()
    # Run again, the test completes and its JSON comes last.
    assert mfl.cli(args_for(data, weights, out, "--resume", "auto")) == 0
    assert json.loads((out / "results_test.json").read_text())["num_images"] > 0


def test_an_evaluation_never_replaces_a_run_stopped_before_its_first_epoch(demo, trained, tmp_path, monkeypatch, capsys):
    data, weights = demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_one_epoch", interrupted)
    stopped = tmp_path / "stopped"
    assert mfl.cli(args_for(data, weights, stopped)) == 130
    monkeypatch.undo()
    assert (stopped / "config.json").is_file() and not (stopped / "commit.json").exists()
    before = snapshot(stopped)
    assert mfl.cli(["--eval", "--resume", str(trained / "checkpoint-best"), "--data_path", str(data),
                    "--num_workers", "0", "--output_dir", str(stopped), "--overwrite", "--no_progress"]) == 2
    assert "is a training run's folder" in capsys.readouterr().err
    assert snapshot(stopped) == before
    # A user's own config.json (not a run's record) is no training run: the foreign-file rule applies.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"lr": 1}')
    assert not runfolder._holds_training_run(mine)


def test_a_users_lock_file_is_kept_and_named(demo, tmp_path, capsys):
    data, weights = demo
    out = tmp_path / "u"
    out.mkdir()
    (out / runfolder.LOCK_NAME).write_text("my lock")
    assert mfl.cli(args_for(data, weights, out)) == 1
    assert "is not a lock file of this tool" in capsys.readouterr().err
    assert (out / runfolder.LOCK_NAME).read_text() == "my lock"


def test_a_refused_evaluation_leaves_no_folder_it_made(demo, trained, tmp_path, capsys):
    from _fakes import mrm_checkpoint

    data, _ = demo
    other = tmp_path / "other_MRM.pth"
    mrm_checkpoint(other, seed=9)
    code = mfl.cli(["--eval", "--resume", str(trained / "checkpoint-best"), "--data_path", str(data),
                    "--num_workers", "0", "--output_dir", str(tmp_path / "E" / "deep"),
                    "--finetune", str(other), "--no_progress"])
    assert code in (1, 2) and "error:" in capsys.readouterr().err
    assert not (tmp_path / "E").exists()


def test_overwrite_refuses_to_orphan_the_runs_evaluations(demo, tmp_path, capsys):
    import shutil

    data, weights = demo
    run = tmp_path / "R"
    assert mfl.cli(args_for(data, weights, run)) == 0
    assert mfl.cli(["--eval", "--resume", str(run / "checkpoint-best"), "--data_path", str(data),
                    "--num_workers", "0", "--eval_name", "x", "--no_progress"]) == 0
    before = snapshot(run)
    assert mfl.cli(args_for(data, weights, run, "--seed", "7", "--overwrite")) == 1
    assert "evaluations (eval/x) test its checkpoint" in capsys.readouterr().err
    assert snapshot(run) == before
    shutil.rmtree(run / "eval")  # moved away by the user: the run may be replaced
    assert mfl.cli(args_for(data, weights, run, "--seed", "7", "--overwrite")) == 0


@pytest.mark.parametrize("name", ["config.json", "log.txt"])
def test_a_users_file_of_a_run_name_is_foreign_not_a_run_to_overwrite(demo, tmp_path, capsys, name):
    data, weights = demo
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text('{"my": "settings"}')
    assert mfl.cli(args_for(data, weights, out)) == 1
    err = capsys.readouterr().err
    assert f"holds files no run of this tool wrote ({name})" in err and "already holds a run" not in err
    assert sorted(os.listdir(out)) == [name] and (out / name).read_text() == '{"my": "settings"}'


def test_recovery_in_a_runs_folder_removes_only_the_runs_own_temporaries(demo, trained, tmp_path):
    import shutil

    data, weights = demo
    run = tmp_path / "R"
    shutil.copytree(trained, run, symlinks=True)
    (run / ".draft.tmp").write_text("mine")                       # a user's hidden file
    (run / ".notes.txt.abcd1234.tmp").write_text("mine too")      # named like one, not of a run file
    (run / ".log.txt.x1y2z3w4.tmp").write_text("partial")          # a killed atomic write of the run's
    assert mfl.cli(args_for(data, weights, run, "--epochs", "2", "--resume", "auto")) == 0
    assert (run / ".draft.tmp").read_text() == "mine"
    assert (run / ".notes.txt.abcd1234.tmp").read_text() == "mine too"
    assert not (run / ".log.txt.x1y2z3w4.tmp").exists()
