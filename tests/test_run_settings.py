"""One definition of what makes a run this run: each flag declares its role once, and
config.json, the run-folder check and resume all read that one table."""
import json

import pytest

import main_finetune_lora as mfl
import methods
from util import cli
from _fakes import demo_data_and_weights, tiny_run_args
from util.runfolder import RUN_FORMAT, differing

DERIVED_SETTINGS = {"lr", "global_batch", "weights_sha256", "split_sha256", "pixels"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    data, weights = demo_data_and_weights(root, seed=3)
    out = root / "run"
    argv = tiny_run_args(data, weights, out, "--epochs", "1", "--ci_resamples", "0", seed=1)
    assert mfl.cli(argv) == 0
    return argv, out


def test_every_flag_declares_one_role():
    roles = cli.flag_roles(mfl.get_args_parser())
    dests = {a.dest for a in mfl.get_args_parser()._actions if a.dest != "help"}
    assert set(roles) == dests
    assert set(roles.values()) == {cli.RUN, cli.EXEC, cli.DERIVED}
    # Where and how a run executes never makes it another run; what it computes does.
    assert {roles[k] for k in ("output_dir", "num_workers", "device", "compile", "resume")} == {cli.EXEC}
    assert {roles[k] for k in ("seed", "lora_rank", "epochs", "optimizer", "norm")} == {cli.RUN}
    assert {roles[k] for k in ("finetune", "data_path", "cache", "blr")} == {cli.DERIVED}


def test_config_records_settings_and_execution_from_the_table(run):
    _, out = run
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == RUN_FORMAT
    roles = cli.flag_roles(mfl.get_args_parser())
    run_flags = {k for k, r in roles.items() if r == cli.RUN}
    others = {f.dest for f in methods.all_flags()} - {f.dest for f in methods.get("lora").flags}
    assert others and set(config["settings"]) == (run_flags - others) | DERIVED_SETTINGS
    assert set(config["execution"]) == set(roles) - run_flags
    assert config["settings"]["seed"] == 1 and config["execution"]["num_workers"] == 0
    assert set(config["settings"]["split_sha256"]) == {"train", "val", "test"}
    # The data cache is recorded once, beside the settings, not among them.
    assert "data_cache" in config and "cache_used" not in config["settings"]


def test_a_run_differing_only_in_how_it_executes_is_the_same_run(run, capsys):
    argv, out = run
    # Another log frequency and worker count: the folder's run with these settings is complete.
    again = [*argv, "--log_freq", "3", "--no_pin_mem"]
    assert mfl.cli(again) == 1
    assert "that run with these settings is complete" in capsys.readouterr().err
    # Another seed: another run, and the refusal names the setting.
    assert mfl.cli([*argv, "--seed", "2"]) == 1
    assert "--seed 1 -> 2" in capsys.readouterr().err


def test_differing_names_each_setting_once():
    assert differing({"lr": 0.1, "seed": 0}, {"lr": 0.2, "seed": 0}) == ["--lr 0.1 -> 0.2"]
    assert differing({"epochs": 2}, {"epochs": 3}, ignore=("epochs",)) == []
    assert differing({}, {"note": "x"}) == ["--note None -> 'x'"]


def test_a_method_reads_its_own_flags_and_those_it_shares():
    def unread(method, *flags):
        args = mfl.parse(["--demo", "--model", "vit_tiny_patch16", "--method", method, *flags])
        return args.unread_flags, args.notes
    lora_flags = {f.dest for f in methods.get("lora").flags}
    every = {f.dest for f in methods.all_flags()}
    # DoRA reads LoRA's flags; the baselines read none; a flag of another method is said.
    flags, notes = unread("dora", "--lora_rank", "8", "--vpt_tokens", "3")
    assert flags == every - lora_flags
    assert notes == ["--vpt_tokens is a flag of --method vpt: it has no effect with --method dora"]
    assert unread("full")[0] == every and unread("full")[1] == []
    assert unread("ia3", "--ia3_attn", "qkv")[0] == every - {"ia3_attn"}


def test_a_flag_of_another_method_is_not_a_setting_of_the_run(tmp_path, capsys):
    data, weights = demo_data_and_weights(tmp_path, seed=3)
    argv = tiny_run_args(data, weights, tmp_path / "ia3", "--model", "vit_tiny_patch16",
                         "--method", "ia3", "--epochs", "1", "--ci_resamples", "0", seed=1)
    assert mfl.cli([*argv, "--lora_rank", "8"]) == 0
    config = json.loads((tmp_path / "ia3" / "config.json").read_text())
    others = {f.dest for f in methods.all_flags()} - {"ia3_attn"}
    assert config["settings"]["ia3_attn"] == "kv" and "ia3_attn" in config["recipe"]
    assert not others & (set(config["settings"]) | set(config["recipe"]))
    assert config["notes"][-1] == ("--lora_rank is a flag of --method lora: it has no effect "
                                   "with --method ia3")
    # Without the flag, or with another value of it, it is the same run: complete.
    capsys.readouterr()
    for extra in ([], ["--lora_rank", "16"]):
        assert mfl.cli([*argv, *extra]) == 1
        assert "that run with these settings is complete" in capsys.readouterr().err


def test_eval_names_the_settings_its_checkpoint_decides(tmp_path):
    # --eval reads the data, precision and batch flags; model and recipe are the checkpoint's
    # and the bootstrap's seed is fixed, so giving them changes nothing (and says so).
    data, _ = demo_data_and_weights(tmp_path, seed=3)
    argv = ["--eval", "--resume", str(tmp_path / "run" / "checkpoint-best"), "--data_path", str(data),
            "--amp", "none", "--skip_bad", "--batch_size", "4"]
    assert mfl.parse(argv).notes == []
    assert mfl.parse([*argv, "--seed", "2"]).notes == [
        "--eval tests the checkpoint as it was trained: --seed has no effect"]
    args = mfl.parse([*argv, "--method", "vpt", "--vpt_tokens", "5", "--input_size", "64"])
    assert args.notes == ["--eval tests the checkpoint as it was trained: --input_size, --method, "
                          "--vpt_tokens have no effect"]
    assert mfl.parse([*argv, "--lr", "0.1"]).notes == [
        "--eval tests the checkpoint as it was trained: --lr has no effect"]
