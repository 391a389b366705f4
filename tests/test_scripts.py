"""The ft_*.sh launch scripts: the paper's global batch, seeds, and stopping before torchrun.

A fake `torchrun` first on PATH and a fake python (PYTHON) record each call instead of
training, so these tests check exactly what the scripts would launch.
"""
import os
import subprocess
from pathlib import Path

import pytest

from util.presets import resolve_preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"ft_lora_mrm.sh": ("mrm", "lora"), "ft_lora_mae.sh": ("cxr_mae", "lora"),
           "ft_mrm.sh": ("mrm", "full"), "ft_mae.sh": ("cxr_mae", "full")}

# Each call is recorded as "<program> <arguments>", and its working folder in <calls>.cwd.
FAKE_RUNNER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$TORCHRUN_CALLS"
echo "$PWD" >> "$TORCHRUN_CALLS.cwd"
case " $* " in *" --seed $FAIL_SEED "*) echo "main_finetune_lora.py: error: seed $FAIL_SEED" >&2; exit 3;; esac
"""
# The flag check before the run imports torch: the stand-in passes it at once, to keep these
# tests fast (one test below runs the real one).
FAKE_PYTHON = """#!/usr/bin/env bash
case " $* " in *" --check_args "*) exit 0;; esac
""" + FAKE_RUNNER.split("\n", 1)[1]


@pytest.fixture
def fake_env(tmp_path, vit_base_file):
    """Environment with a recording torchrun, a weights file (ViT-B/16 in MRM's layout) and a
    data folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", FAKE_RUNNER), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    weights, data = vit_base_file(tmp_path, "MRM.pth"), tmp_path / "NIH_ChestX-ray"
    data.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DRY_RUN", "SEEDS", "NGPUS", "NNODES", "NODE_RANK", "GLOBAL_BATCH",
                        "MASTER_ADDR", "MASTER_PORT", "DATASET", "DATA_SIZE", "OUTPUT_DIR")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", WEIGHTS=str(weights),
               DATA_PATH=str(data), TORCHRUN_CALLS=str(tmp_path / "calls.txt"), FAIL_SEED="none",
               PYTHON=str(bin_dir / "python"))
    return env


def run(script: str, env: dict, *extra: str, cwd: Path | None = None,
        **more: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *extra], capture_output=True, text=True,
                          env={**env, **more}, timeout=30, cwd=cwd)


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
    assert "use 1 2 4 8 16 32 64 processes" in proc.stderr


def test_bigger_global_batch_is_explicit(fake_env):
    assert run("ft_lora_mae.sh", fake_env, NGPUS="3", GLOBAL_BATCH="66").returncode == 0
    assert run("ft_lora_mae.sh", fake_env, NGPUS="2", NNODES="2", GLOBAL_BATCH="256").returncode == 0
    first, second = calls(fake_env)
    assert flag(first, "--global_batch") == "66" and flag(second, "--global_batch") == "256"
    assert flag(second, "--nnodes") == "2"


@pytest.mark.parametrize("name,value,allowed", [
    ("SEEDS", "0,1", "whole numbers separated by spaces"), ("SEEDS", "0 0", "seed 0 is listed twice"),
    ("NGPUS", "two", "positive whole number"), ("GLOBAL_BATCH", "0", "positive whole number"),
    ("DATASET", "nih14", "one of nih, chexpert, rsna"), ("DATA_SIZE", "5", "1, 10 or 100"),
    ("DATA_SIZE", "1 %", "1, 10 or 100"), ("NODE_RANK", "1", "0 to NNODES-1")])
def test_bad_settings_are_named(fake_env, name, value, allowed):
    proc = run("ft_lora_mrm.sh", fake_env, **{name: value})
    assert proc.returncode == 2 and calls(fake_env) == []
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {name}='{value}': expected") and allowed in line


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


def test_dry_run_0_runs_and_another_value_is_refused(fake_env):
    proc = run("ft_lora_mrm.sh", fake_env, DRY_RUN="0")
    assert proc.returncode == 0 and len(calls(fake_env)) == 1  # 0: off, the run happens
    proc = run("ft_lora_mrm.sh", fake_env, DRY_RUN="yes")
    assert proc.returncode == 2 and len(calls(fake_env)) == 1
    assert proc.stderr.strip() == "error: DRY_RUN='yes': expected 1 (print the commands) or 0 (run them)"


def test_dry_run_command_parses(fake_env):
    import main_finetune_lora as mfl

    proc = run("ft_mae.sh", fake_env, DRY_RUN="1")
    words = proc.stdout.split()
    [entry] = [i for i, w in enumerate(words) if w.endswith("/main_finetune_lora.py")]
    argv = words[entry + 1:]
    args, unknown = mfl.get_args_parser().parse_known_args(argv)
    # --global_batch is the one flag the entry script may not know yet.
    assert unknown in ([], ["--global_batch", "64"])
    assert (args.preset, args.method, args.model) == ("nih-1-cxr_mae", "full", "vit_base_patch16")


def test_bad_flags_stop_before_torchrun_with_one_line(fake_env):
    import sys

    # Two processes: the run itself goes to the fake torchrun, only the check is real.
    env = {**fake_env, "PYTHON": sys.executable, "NGPUS": "2"}
    proc = run("ft_lora_mrm.sh", env, "--epochs", "zero")
    assert proc.returncode == 2 and calls(fake_env) == []
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2 and "--epochs" in err[0] and "--help" in err[1]
    # A missing split file is found by the check too, before torchrun.
    proc = run("ft_lora_mrm.sh", env, "--epochs", "2")
    assert proc.returncode == 2 and calls(fake_env) == []
    assert "split file 'train_1.txt'" in proc.stderr
    # Good flags and data pass the check and reach torchrun.
    data = Path(fake_env["DATA_PATH"])
    for name in ("train_1.txt", "val_list.txt", "test_list.txt"):
        (data / name).write_text("00000001_000.png" + " 0" * 14 + "\n")
    proc = run("ft_lora_mrm.sh", env, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(calls(fake_env)) == 1


def test_one_process_runs_python_and_several_run_torchrun_standalone(fake_env):
    assert run("ft_lora_mrm.sh", fake_env).returncode == 0
    assert run("ft_lora_mrm.sh", fake_env, NGPUS="2").returncode == 0
    single, several = calls(fake_env)
    # One process needs no torchrun, so no port; several on one node: torchrun picks a free port.
    assert single[0] == "python" and single[1].endswith("/main_finetune_lora.py")
    assert several[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
    assert "--master_port" not in several and "--nnodes" not in several


@pytest.mark.parametrize("more,addr,port", [
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, "10.0.0.1", "29500"),
    ({"MASTER_PORT": "29611"}, "127.0.0.1", "29611"),
])
def test_multi_node_or_a_given_port_keeps_the_rendezvous(fake_env, more, addr, port):
    proc = run("ft_lora_mae.sh", fake_env, NGPUS="2", **more)
    assert proc.returncode == 0, proc.stderr
    [argv] = calls(fake_env)
    assert argv[0] == "torchrun" and "--standalone" not in argv
    assert flag(argv, "--master_addr") == addr and flag(argv, "--master_port") == port
    assert flag(argv, "--nnodes") == more.get("NNODES", "1")
    assert flag(argv, "--node_rank") == more.get("NODE_RANK", "0")


def test_several_seeds_never_share_a_given_run_name(fake_env):
    proc = run("ft_lora_mrm.sh", fake_env, "--run_name", "myexp", "--overwrite", SEEDS="0 1")
    assert proc.returncode == 0, proc.stderr
    assert [flag(a, "--run_name") for a in calls(fake_env)] == ["myexp_s0", "myexp_s1"]
    assert run("ft_lora_mrm.sh", fake_env, "--run_name=x", SEEDS="3 4").returncode == 0
    assert [a[-1] for a in calls(fake_env)[2:]] == ["--run_name=x_s3", "--run_name=x_s4"]
    # One seed keeps the name as given; 'auto' names each seed's folder by itself.
    assert run("ft_lora_mrm.sh", fake_env, "--run_name", "myexp").returncode == 0
    assert run("ft_lora_mrm.sh", fake_env, "--run_name", "auto", SEEDS="0 1").returncode == 0
    assert [flag(a, "--run_name") for a in calls(fake_env)[4:]] == ["myexp", "auto", "auto"]


@pytest.mark.parametrize("extra,message", [
    (("--run_name", ""), "--run_name '' (the --output_dir itself) with SEEDS='0 1' would put every seed in one folder"),
    (("--seed", "5"), "--seed 5 with SEEDS='0 1' would give every run that seed"),
])
def test_several_seeds_refuse_one_folder_or_one_seed(fake_env, extra, message):
    proc = run("ft_lora_mrm.sh", fake_env, *extra, SEEDS="0 1")
    assert proc.returncode == 2 and calls(fake_env) == []
    assert proc.stderr.startswith(f"error: {message}")


@pytest.mark.parametrize("script", ["ft_lora_mrm.sh", "ft_mrm.sh"])
def test_user_paths_are_relative_to_where_the_script_runs(fake_env, tmp_path, script):
    here = tmp_path / "work"
    (here / "data" / "NIH_ChestX-ray").mkdir(parents=True)
    (here / "w").mkdir()
    (here / "w" / "MRM.pth").write_bytes(b"x")
    proc = run(script, fake_env, "--epochs", "1", cwd=here, SEEDS="0 1",
               DATA_PATH="data/NIH_ChestX-ray", WEIGHTS="w/MRM.pth", OUTPUT_DIR="runs")
    assert proc.returncode == 0, proc.stderr
    cwds = Path(fake_env["TORCHRUN_CALLS"] + ".cwd").read_text().split()
    assert cwds == [str(here)] * 2  # the run sees the paths from the same folder
    for argv in calls(fake_env):
        assert (here / flag(argv, "--finetune")).is_file() and (here / flag(argv, "--data_path")).is_dir()
        assert flag(argv, "--output_dir") == "runs"
        assert flag(argv, "--script") == str(ROOT / script)
    # Not found: the message gives the absolute path tried.
    proc = run(script.replace("mrm", "mae"), fake_env, cwd=here, DATA_PATH="data/NIH_ChestX-ray", WEIGHTS="w/CXR_MAE.pth")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: weights file '{here / 'w' / 'CXR_MAE.pth'}' not found (WEIGHTS=w/CXR_MAE.pth)")


@pytest.mark.parametrize("script", ["ft_lora_mae.sh", "ft_mae.sh"])
def test_data_size_with_a_percent_sign_picks_the_same_preset(fake_env, script):
    for size in ("10%", "10"):
        assert run(script, fake_env, DATASET="chexpert", DATA_SIZE=size).returncode == 0
    assert [flag(a, "--preset") for a in calls(fake_env)] == ["chexpert-10-cxr_mae"] * 2


def test_dataset_that_does_not_fit_the_split_files_is_named(fake_env, tmp_path):
    data = Path(fake_env["DATA_PATH"])
    (data / "train_1.txt").write_text("a.png" + " 0" * 13 + " 1\n")
    proc = run("ft_lora_mrm.sh", fake_env, DATASET="chexpert", DATA_SIZE="1")
    assert proc.returncode == 2 and calls(fake_env) == []
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: DATASET=chexpert does not fit DATA_PATH='{data}': its split file "
                           f"{data / 'train_1.txt'} has 14 labels a line, as nih has (chexpert has 5)")
    assert "set DATASET=nih" in line
    assert run("ft_lora_mrm.sh", fake_env, DATASET="nih", DATA_SIZE="1").returncode == 0
    # --split_dir is where the split files are read from, when given.
    splits = tmp_path / "rsna_splits"
    splits.mkdir()
    (splits / "train_10.txt").write_text("x.dcm 1 \n")
    proc = run("ft_lora_mrm.sh", fake_env, "--split_dir", str(splits), DATASET="nih", DATA_SIZE="10")
    assert proc.returncode == 2 and "as rsna has (nih has 14)" in proc.stderr


def test_a_failed_run_ends_with_its_own_error(fake_env):
    # One process: the entry script's own error is the last line.
    proc = run("ft_lora_mrm.sh", fake_env, FAIL_SEED="0")
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == "main_finetune_lora.py: error: seed 0"
    # Under torchrun, a last line says where the cause is (above torchrun's report).
    proc = run("ft_lora_mrm.sh", fake_env, NGPUS="2", SEEDS="0 1", FAIL_SEED="0")
    assert proc.returncode == 3 and len(calls(fake_env)) == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: seed 0 stopped (exit 3)")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_several_methods_run_one_after_another_named_by_method(fake_env, script):
    proc = run(script, fake_env, "--run_name", "cmp", METHOD="lora vpt ssf", SEEDS="0 1")
    assert proc.returncode == 0, proc.stderr
    runs = calls(fake_env)
    assert [(flag(a, "--method"), flag(a, "--seed")) for a in runs] == [
        ("lora", "0"), ("lora", "1"), ("vpt", "0"), ("vpt", "1"), ("ssf", "0"), ("ssf", "1")]
    assert [flag(a, "--run_name") for a in runs] == [
        "cmp_lora_s0", "cmp_lora_s1", "cmp_vpt_s0", "cmp_vpt_s1", "cmp_ssf_s0", "cmp_ssf_s1"]
    weights = SCRIPTS[script][0]
    for argv in runs:
        method = flag(argv, "--method")
        assert flag(argv, "--preset") == f"nih-1-{weights}" and argv.count("--method") == 1
        # LoRA on the paper's q, v of its *_lora model; the others on the plain ViT-B.
        assert flag(argv, "--model") == ("vit_base_patch16_lora" if method == "lora" else "vit_base_patch16")
        assert ("--lora_pos" in argv) == (method == "lora")
        assert "--note" not in argv  # the automatic run name already holds the method
    # One method keeps a given name as it is; the default method is the script's own.
    assert run(script, fake_env, "--run_name", "one", METHOD="adaptformer").returncode == 0
    assert run(script, fake_env).returncode == 0
    one, default = calls(fake_env)[-2:]
    assert flag(one, "--run_name") == "one" and flag(one, "--method") == "adaptformer"
    assert flag(default, "--method") == SCRIPTS[script][1]


@pytest.mark.parametrize("more,extra,message", [
    ({"METHOD": "lora lora"}, (), "METHOD='lora lora': expected different methods; lora is listed twice"),
    ({"METHOD": "lora,vpt"}, (), "METHOD='lora,vpt': expected method names separated by spaces"),
    ({"METHOD": " "}, (), "METHOD=' ': expected one or more methods"),
    ({"METHOD": "lora vpt"}, ("--method", "ssf"), "--method ssf with METHOD='lora vpt' would give every run that method"),
    ({"METHOD": "lora vpt"}, ("--run_name", ""), "--run_name '' (the --output_dir itself) with METHOD='lora vpt' would put every method in one folder"),
])
def test_bad_methods_are_named_before_anything_runs(fake_env, more, extra, message):
    proc = run("ft_lora_mrm.sh", fake_env, *extra, **more)
    assert proc.returncode == 2 and calls(fake_env) == []
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_a_misspelt_method_stops_before_the_first_method_trains(fake_env, tmp_path):
    # A stand-in for the entry script's flag check that knows every method but 'vtp'.
    checker = tmp_path / "bin" / "python"
    checker.write_text("""#!/usr/bin/env bash
case " $* " in *" --check_args "*" --method vtp "*)
  echo "main_finetune_lora.py: error: argument --method: invalid choice: 'vtp'" >&2; exit 2;; esac
""" + FAKE_PYTHON.split("\n", 1)[1])
    proc = run("ft_lora_mrm.sh", fake_env, METHOD="lora vtp")
    assert proc.returncode == 2 and calls(fake_env) == []  # lora did not start either
    assert proc.stderr.strip().splitlines()[-1].endswith("invalid choice: 'vtp'")
    assert run("ft_lora_mrm.sh", fake_env, METHOD="lora vpt").returncode == 0
    assert [flag(a, "--method") for a in calls(fake_env)] == ["lora", "vpt"]
