"""The ft_*.sh launch scripts: the paper's global batch, seeds, and stopping before torchrun.

A fake `torchrun` first on PATH records each call instead of training, so these tests
check exactly what the scripts would launch.
"""
import os
import subprocess
from pathlib import Path

import pytest

from util.presets import resolve_preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"ft_lora_mrm.sh": ("mrm", "lora"), "ft_lora_mae.sh": ("cxr_mae", "lora"),
           "ft_mrm.sh": ("mrm", "full"), "ft_mae.sh": ("cxr_mae", "full")}

FAKE_TORCHRUN = """#!/usr/bin/env bash
echo "$*" >> "$TORCHRUN_CALLS"
case " $* " in *" --seed $FAIL_SEED "*) exit 3;; esac
"""


@pytest.fixture
def fake_env(tmp_path):
    """Environment with a recording torchrun, a weights file and a data folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(FAKE_TORCHRUN)
    torchrun.chmod(0o755)
    # The flag check before torchrun imports torch: a stand-in keeps these tests fast (one
    # test below runs the real one).
    checker = bin_dir / "check-python"
    checker.write_text("#!/usr/bin/env bash\nexit 0\n")
    checker.chmod(0o755)
    weights, data = tmp_path / "MRM.pth", tmp_path / "NIH_ChestX-ray"
    weights.write_bytes(b"x")
    data.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DRY_RUN", "SEEDS", "NGPUS", "NNODES", "GLOBAL_BATCH")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", WEIGHTS=str(weights),
               DATA_PATH=str(data), TORCHRUN_CALLS=str(tmp_path / "calls.txt"), FAIL_SEED="none",
               PYTHON=str(checker))
    return env


def run(script: str, env: dict, *extra: str, **more: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *extra], capture_output=True, text=True,
                          env={**env, **more}, timeout=30)


def calls(env: dict) -> list[list[str]]:
    path = Path(env["TORCHRUN_CALLS"])
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_one_run_keeps_the_papers_batch_and_preset(fake_env, script):
    proc = run(script, fake_env, "--epochs", "2", NGPUS="4", DATASET="rsna", DATA_SIZE="10")
    assert proc.returncode == 0, proc.stderr
    [argv] = calls(fake_env)
    assert flag(argv, "--nproc_per_node") == "4"
    assert flag(argv, "--global_batch") == "64" and flag(argv, "--seed") == "0"
    weights, method = SCRIPTS[script]
    assert flag(argv, "--preset") == f"rsna-10-{weights}" and flag(argv, "--method") == method
    assert argv[-2:] == ["--epochs", "2"]  # extra arguments come last, so they win
    _, source = resolve_preset(flag(argv, "--preset"), flag(argv, "--method"))
    assert source.startswith("no published recipe:" if method == "full" else "paper README")


def test_full_fine_tuning_scripts_pick_the_published_recipe(fake_env):
    for script in ("ft_mrm.sh", "ft_mae.sh"):
        assert run(script, fake_env).returncode == 0
    sources = [resolve_preset(flag(a, "--preset"), flag(a, "--method"))[1] for a in calls(fake_env)]
    assert sources == ["paper ft_mrm.sh (NIH 1%)", "paper ft_cxrmae.sh (NIH 1%)"]


def test_seeds_run_one_after_another(fake_env):
    proc = run("ft_lora_mrm.sh", fake_env, SEEDS="0 1 2")
    assert proc.returncode == 0, proc.stderr
    assert [flag(a, "--seed") for a in calls(fake_env)] == ["0", "1", "2"]


def test_a_failed_seed_stops_the_rest(fake_env):
    proc = run("ft_lora_mae.sh", fake_env, SEEDS="0 1 2", FAIL_SEED="1")
    assert proc.returncode == 3
    assert [flag(a, "--seed") for a in calls(fake_env)] == ["0", "1"]


@pytest.mark.parametrize("missing,what", [("WEIGHTS", "weights file"), ("DATA_PATH", "data folder")])
def test_missing_input_stops_before_torchrun(fake_env, tmp_path, missing, what):
    proc = run("ft_mrm.sh", fake_env, **{missing: str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and calls(fake_env) == []
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {what} '{tmp_path / 'nowhere'}' not found")
    if missing == "WEIGHTS":
        assert "pretrained_weights/README.md" in lines[0]


def test_global_batch_that_does_not_divide_stops_before_torchrun(fake_env):
    proc = run("ft_lora_mae.sh", fake_env, NGPUS="3")
    assert proc.returncode == 2 and calls(fake_env) == []
    assert "GLOBAL_BATCH=64 does not divide over 3 processes" in proc.stderr
    assert "use 1 2 4 8 16 32 processes" in proc.stderr


def test_bigger_global_batch_is_explicit(fake_env):
    assert run("ft_lora_mae.sh", fake_env, NGPUS="3", GLOBAL_BATCH="66").returncode == 0
    assert run("ft_lora_mae.sh", fake_env, NGPUS="2", NNODES="2", GLOBAL_BATCH="256").returncode == 0
    first, second = calls(fake_env)
    assert flag(first, "--global_batch") == "66" and flag(second, "--global_batch") == "256"
    assert flag(second, "--nnodes") == "2"


@pytest.mark.parametrize("name,value", [("SEEDS", "0,1"), ("NGPUS", "two"), ("GLOBAL_BATCH", "0")])
def test_bad_settings_are_named(fake_env, name, value):
    proc = run("ft_lora_mrm.sh", fake_env, **{name: value})
    assert proc.returncode == 2 and calls(fake_env) == []
    assert proc.stderr.startswith(f"error: {name}='{value}'")


def test_dry_run_prints_every_command_and_what_would_stop(fake_env, tmp_path):
    proc = run("ft_lora_mrm.sh", fake_env, "--note", "x", DRY_RUN="1", SEEDS="3 4", NGPUS="3",
               WEIGHTS=str(tmp_path / "none.pth"))
    assert proc.returncode == 0 and calls(fake_env) == []
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["torchrun", "torchrun"]
    assert [flag(line.split(), "--seed") for line in lines] == ["3", "4"]
    notes = proc.stderr.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("note: a real run would stop here: ") for n in notes)
    assert "weights file" in notes[0] and "does not divide over 3 processes" in notes[1]


def test_dry_run_command_parses(fake_env):
    import main_finetune_lora as mfl

    proc = run("ft_mae.sh", fake_env, DRY_RUN="1")
    words = proc.stdout.split()
    argv = words[words.index("main_finetune_lora.py") + 1:]
    args, unknown = mfl.get_args_parser().parse_known_args(argv)
    # --global_batch is the one flag the entry script may not know yet.
    assert unknown in ([], ["--global_batch", "64"])
    assert (args.preset, args.method, args.model) == ("nih-1-cxr_mae", "full", "vit_base_patch16")


def test_bad_flags_stop_before_torchrun_with_one_line(fake_env):
    import sys

    env = {**fake_env, "PYTHON": sys.executable}
    proc = run("ft_lora_mrm.sh", env, "--epochs", "zero")
    assert proc.returncode == 2 and calls(fake_env) == []
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2 and "--epochs" in err[0] and "--help" in err[1]
    # Good flags pass the check and reach torchrun.
    proc = run("ft_lora_mrm.sh", env, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(calls(fake_env)) == 1
