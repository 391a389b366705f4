"""One definition of what makes a run this run: each flag declares its role once, and
config.json, the run-folder check and resume all read that one table."""
import json

import pytest

import main_finetune_lora as mfl
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
    assert set(config["settings"]) == run_flags | DERIVED_SETTINGS
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
