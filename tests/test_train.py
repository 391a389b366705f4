"""The training entry point end to end on demo data, with a depth-2 tiny ViT at 32 px."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

import datasets
import main_finetune_lora as mfl
from util import cli
from _fakes import demo_data_and_weights, tiny_run_args
from util.metrics import binary_auroc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo data set (NIH layout) and a fake depth-2 MRM checkpoint."""
    return demo_data_and_weights(tmp_path_factory.mktemp("demo"), num_images=100)


def base_args(data, weights, out, *extra):
    return tiny_run_args(data, weights, out, *extra, seed=3)


def tb_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc


def test_two_epoch_run_outputs_and_exact_reload(demo, tmp_path, capsys):
    data, weights = demo
    out = tmp_path / "run"
    assert mfl.cli(base_args(data, weights, out)) == 0
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "test mean AUROC" in printed
    # train.log holds the console's story: what was logged before the run folder existed
    # (the data sets), the printed epoch lines and the test result.
    log = (out / "train.log").read_text()
    assert "ChestXrayDataset(kind='nih'" in log and "trainable params:" in log
    assert "epoch 0: train loss" in log and "epoch 1: train loss" in log
    assert "test mean AUROC" in log and "| **mean** |" in log

    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1]
    for l in lines:
        assert {"train_loss", "lr", "val_loss", "val_mean_auroc", "val_auroc"} <= set(l)
        assert list(l["val_auroc"]) == datasets.CLASS_NAMES["nih"]

    tags, acc = tb_tags(out / "logs")
    assert {"train/loss", "train/lr", "val/loss", "val/mean_auroc"} <= tags
    assert any(t.startswith("val/auroc/") for t in tags)
    steps_per_epoch = len([e for e in acc.Scalars("train/loss")]) // 2
    assert steps_per_epoch >= 2  # logged per step (log_freq 1)

    for stem in ("checkpoint-best", "checkpoint-last"):
        assert (out / f"{stem}.safetensors").is_file() and (out / f"{stem}.json").is_file()
    assert (out / "checkpoint-last.state.pt").is_file()
    tensors = load_file(str(out / "checkpoint-best.safetensors"))
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith(("fc_norm.", "head."))
               for k in tensors)
    run_config = json.loads((out / "config.json").read_text())
    assert run_config["torch"] == torch.__version__ and "git_commit" in run_config
    assert run_config["settings"]["lora_rank"] == 4

    results = json.loads((out / "results_test.json").read_text())
    test_set = datasets.build_dataset("test", data, "nih")
    assert results["num_images"] == len(test_set)
    for name in ("results_test_auroc.csv", "results_test_auroc.md", "roc_test.png",
                 "predictions_test.csv"):
        assert (out / name).is_file(), name

    # Our AUROC equals sklearn's on the saved predictions.
    preds = pd.read_csv(out / "predictions_test.csv")
    assert list(preds["path"]) == test_set.paths
    for name in datasets.CLASS_NAMES["nih"]:
        y, p = preds[f"label_{name}"].to_numpy(), preds[name].to_numpy()
        if y.min() == y.max():
            assert results["auroc"][name] is None
            continue
        assert binary_auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert results["auroc"][name] == pytest.approx(roc_auc_score(y, p), abs=1e-6)

    # Reloading the best adapter (on top of the same pre-trained file) reproduces the test AUROC.
    again = tmp_path / "again"
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "none", "--num_workers", "0", "--output_dir", str(again),
                    "--no_progress"]) == 0
    reloaded = json.loads((again / "results_test.json").read_text())
    assert reloaded["mean_auroc"] == results["mean_auroc"]
    assert reloaded["auroc"] == results["auroc"]
    # The validation AUROC measured during training (merged adapters) is the saved model's.
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "none", "--num_workers", "0", "--output_dir", str(again),
                    "--no_progress", "--eval_split", "val"]) == 0
    val = json.loads((again / "results_val.json").read_text())
    best = json.loads((out / "checkpoint-best.json").read_text())
    assert val["mean_auroc"] == pytest.approx(best["val_mean_auroc"], abs=1e-6)


def test_vit_base_r4_adapter_file_is_small(tmp_path):
    import lora
    import models_vit_lora as mv
    import checkpoints as ckpt

    model = mv.vit_base_patch16_lora(num_classes=14, lora_rank=4)
    weights = tmp_path / "MRM.pth"
    weights.write_bytes(b"stand-in")  # only its hash is recorded
    config = ckpt.model_config(model="vit_base_patch16", method="lora",
                               class_names=datasets.CLASS_NAMES["nih"], img_size=224,
                               global_pool=True, norm="mrm", mean=(0.5,) * 3, std=(0.2,) * 3,
                               pretrained=str(weights),
                               pretrained_sha256=ckpt.file_sha256(weights),
                               method_settings=dict(rank=4, alpha=32, dropout=0.1, pos="attn"))
    path = ckpt.save_checkpoint(tmp_path / "checkpoint-best", model, config)
    assert path.stat().st_size < 2 * 1024 * 1024
    assert sum(t.numel() for t in load_file(str(path)).values()) == 159_758
    assert lora.count_parameters(model)[0] == 159_758


def _final_tensors(run):
    return load_file(str(run / "checkpoint-last.safetensors"))


def test_killed_and_resumed_run_equals_uninterrupted(demo, tmp_path):
    data, weights = demo
    epochs = ["--epochs", "3"]
    whole = tmp_path / "whole"
    assert mfl.cli(base_args(data, weights, whole, *epochs)) == 0

    cut = tmp_path / "cut"
    cmd = [sys.executable, str(ROOT / "main_finetune_lora.py"), *base_args(data, weights, cut, *epochs)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    marker = cut / "checkpoint-last.json"
    while time.time() < deadline and proc.poll() is None:
        if marker.exists() and json.loads(marker.read_text()).get("epoch") == 0:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    killed_at = json.loads(marker.read_text())["epoch"]
    assert killed_at < 2  # interrupted before the end
    assert not (cut / "results_test.json").exists()

    # The folder holds a run: refused without --resume ...
    assert mfl.cli(base_args(data, weights, cut, *epochs)) == 1
    # ... and continued with it.
    assert mfl.cli(base_args(data, weights, cut, *epochs, "--resume", "auto")) == 0
    a, b = _final_tensors(whole), _final_tensors(cut)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    log = [json.loads(l)["epoch"] for l in (cut / "log.txt").read_text().splitlines()]
    assert log[-1] == 2 and sorted(set(log)) == [0, 1, 2]
    whole_res = json.loads((whole / "results_test.json").read_text())
    cut_res = json.loads((cut / "results_test.json").read_text())
    assert cut_res["mean_auroc"] == pytest.approx(whole_res["mean_auroc"], abs=1e-6)


@pytest.fixture(scope="module")
def eager_ddp_run(demo, tmp_path_factory):
    """A two-process (gloo) run on an odd-sized test list, the distributed sampler must pad
    it with a duplicate: (run folder, split folder)."""
    data, weights = demo
    root = tmp_path_factory.mktemp("ddp")
    splits = root / "splits"
    splits.mkdir()
    for name in datasets.ALL_SPLIT_FILES:
        lines = (Path(data) / name).read_text().splitlines(keepends=True)
        if name == "test_list.txt" and len(lines) % 2 == 0:
            lines = lines[:-1]
        (splits / name).write_text("".join(lines))
    out = root / "eager"
    proc = _torchrun(base_args(data, weights, out, "--compile", "off", "--split_dir", str(splits)), root)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    return out, splits


@pytest.mark.xdist_group("eager_ddp_run")
def test_torchrun_two_processes_gathers_exactly(demo, eager_ddp_run, tmp_path):
    data, weights = demo
    out, splits = eager_ddp_run
    split_flags = ["--split_dir", str(splits)]
    distributed = json.loads((out / "results_test.json").read_text())
    n_test = len(datasets.build_dataset("test", data, "nih", split_dir=splits))
    assert n_test % 2 == 1  # the sampler pads one duplicate, which must not be counted
    assert distributed["num_images"] == n_test
    single_dir = tmp_path / "single"
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "none", "--num_workers", "0", "--output_dir", str(single_dir),
                    "--no_progress", *split_flags]) == 0
    single = json.loads((single_dir / "results_test.json").read_text())
    assert single["num_images"] == n_test
    assert single["mean_auroc"] == pytest.approx(distributed["mean_auroc"], abs=1e-6)
    p1 = pd.read_csv(out / "predictions_test.csv")
    p2 = pd.read_csv(single_dir / "predictions_test.csv")
    assert list(p1["path"]) == list(p2["path"])
    np.testing.assert_allclose(p1.iloc[:, 1:].to_numpy(), p2.iloc[:, 1:].to_numpy(), atol=1e-5)


def _torchrun(args, cwd, **popen):
    """A two-process CPU (gloo) torchrun of the entry script."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "main_finetune_lora.py"), *args]  # --standalone: a free port
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **popen)


def _descendants(pid):
    """Process ids below `pid` (from /proc): torchrun's workers run in sessions of their own."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's workers in /proc")
@pytest.mark.xdist_group("eager_ddp_run")
def test_compiled_distributed_run_killed_and_resumed_equals_eager(demo, eager_ddp_run, tmp_path):
    """--compile on under DDP (two processes): killed after its first epoch and resumed with
    --resume auto, it ends where the same eager distributed run ends."""
    data, weights = demo
    (eager, splits), compiled = eager_ddp_run, tmp_path / "compiled"
    compile_flags = ("--compile", "on", "--compile_backend", "aot_eager", "--split_dir", str(splits))
    proc = _torchrun(base_args(data, weights, compiled, *compile_flags), tmp_path)
    marker, deadline = compiled / "checkpoint-last.json", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if marker.exists() and json.loads(marker.read_text()).get("epoch") == 0:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-3000:]}"
    for pid in [*_descendants(proc.pid), proc.pid]:  # both workers, then torchrun
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(marker.read_text())["epoch"] == 0, "the run ended before it could be interrupted"
    assert not (compiled / "results_test.json").exists()
    log = (compiled / "train.log").read_text()
    assert "first training call (compiling)" in log and "continuing eager" not in log

    proc = _torchrun(base_args(data, weights, compiled, *compile_flags, "--resume", "auto"), tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    log = (compiled / "train.log").read_text()
    assert "continuing eager" not in log and log.count("first training call (compiling)") == 2
    a, b = _final_tensors(eager), _final_tensors(compiled)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    ra = json.loads((eager / "results_test.json").read_text())
    rb = json.loads((compiled / "results_test.json").read_text())
    assert rb["mean_auroc"] == pytest.approx(ra["mean_auroc"], abs=1e-4)


def test_all_negative_class_gives_nan_not_crash(caplog):
    from util.metrics import multilabel_metrics

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(40, 3))
    targets[:, 1] = 0
    probs = rng.random((40, 3))
    with caplog.at_level("WARNING"):
        m = multilabel_metrics(targets, probs, ["a", "b", "c"])
    assert math.isnan(m["auroc"]["b"]) and "'b'" in caplog.text
    expected = np.mean([roc_auc_score(targets[:, k], probs[:, k]) for k in (0, 2)])
    assert m["mean_auroc"] == pytest.approx(expected)


def test_nonfinite_loss_stops_with_step(demo, tmp_path, capsys):
    data, weights = demo
    code = mfl.cli(base_args(data, weights, tmp_path / "nan", "--lr", "1e30", "--warmup_epochs", "0",
                             "--epochs", "1"))
    assert code == 1
    err = capsys.readouterr().err
    assert "loss is nan" in err.lower() and "epoch 0, step" in err
    assert err.count("error:") == 1  # printed once, not echoed by the log
    last = (tmp_path / "nan" / "train.log").read_text().strip().splitlines()[-1]
    assert "error:" in last and "loss is nan" in last.lower()  # the run's log ends with why


# Flags no run can use: a bad choice or combination, and numbers out of range.
BAD_FLAGS = [
    (["--finetune", "/nonexistent/MRM.pth"], "--finetune: file not found: /nonexistent/MRM.pth"),
    (["--lora_pos", "attention"], "--lora_pos"),
    (["--mixup", "0.8"], "--mixup"),
    (["--input_size", "30"], "--input_size 30"),
    (["--method", "full"], "contradicts --model vit_tiny_patch16_lora"),
    (["--eval"], "--eval needs --resume"),
    (["--backbone_dtype", "bf16"], "--backbone_dtype bf16 needs --amp bf16"),
    (["--device_aug", "--optimizer", "adamw", "--aa", "augmix-m5"], "--device_aug: --aa 'augmix-m5'"),
    (["--start_epoch", "3", "--epochs", "3"], "--start_epoch 3 leaves no epoch of --epochs 3 to train"),
    (["--demo_out", "."], "--demo_out: . already exists"),
    *([(["--device", "cuda:0"], "--device: cuda:0: CUDA is not available here")]
      if not torch.cuda.is_available() else []),
]
BAD_NUMBERS = [
    (["--lr", "-0.05"], "--lr -0.05 is not valid"),
    (["--lr", "0"], "--lr 0.0 is not valid"),
    (["--blr", "-1"], "--blr -1.0 is not valid"),
    (["--weight_decay", "-1"], "--weight_decay -1.0 is not valid"),
    (["--layer_decay", "0"], "--layer_decay 0.0 is not valid"),
    (["--layer_decay", "2"], "--layer_decay 2.0 is not valid"),
    (["--min_lr", "5"], "--min_lr 5.0 is not valid: the floor of the cosine schedule is above the lr 0.05"),
    (["--min_lr", "-1"], "--min_lr -1.0 is not valid"),
    (["--drop_path", "1.0"], "--drop_path 1.0 is not valid"),
    (["--drop_path", "-0.1"], "--drop_path -0.1 is not valid"),
    (["--reprob", "1.5"], "--reprob 1.5 is not valid"),
    (["--lora_alpha", "0"], "LoRA alpha must be positive and finite (--lora_alpha), got 0.0"),
    (["--lora_alpha", "-8"], "LoRA alpha must be positive and finite (--lora_alpha), got -8.0"),
    (["--eval_batch_size", "-3"], "--eval_batch_size -3 is not valid"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0 is not valid"),
    (["--num_workers", "-1"], "--num_workers -1 is not valid"),
    (["--device", "cpux"], "--device 'cpux' is not valid"),
    (["--aa", "garbage"], "--aa 'garbage' is not valid"),
    (["--clip_grad", "-1"], "--clip_grad -1.0 is not valid"),
    (["--clip_grad", "0"], "--clip_grad 0.0 is not valid"),
    (["--remode", "noise"], "--remode 'noise' is not valid"),
    (["--recount", "0"], "--recount 0 is not valid"),
]


@pytest.mark.parametrize("check", [False, True], ids=["run", "check_args"])
@pytest.mark.parametrize("flags,message", BAD_FLAGS + BAD_NUMBERS)
def test_bad_flags_stop_with_message(demo, tmp_path, capsys, flags, message, check):
    """Each stops at flag validation (exit 2) naming flag and value, in a run and under
    --check_args (what the launch scripts run before torchrun), and writes nothing."""
    data, weights = demo
    with pytest.raises(SystemExit) as exc:
        mfl.cli(base_args(data, weights, tmp_path / "x", *(["--check_args"] if check else []), *flags))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written


def test_preset_of_other_weights_is_refused(demo, tmp_path, capsys):
    """--preset nih-1-mrm with weights named CXR_MAE would train CXR_MAE weights with MRM's
    normalisation and recipe: refused, unless --norm says what the weights need."""
    import shutil

    data, weights = demo
    mae = tmp_path / "CXR_MAE.pth"
    shutil.copy(weights, mae)
    with pytest.raises(SystemExit) as exc:
        mfl.cli(base_args(data, mae, tmp_path / "x", "--check_args", "--preset", "nih-1-mrm"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--preset nih-1-mrm is the recipe for weights normalised as 'mrm'" in err
    assert f"--finetune {mae} is named as 'cxr_mae' weights" in err
    assert mfl.cli(base_args(data, mae, tmp_path / "x", "--check_args", "--preset", "nih-1-cxr_mae")) == 0
    assert mfl.cli(base_args(data, mae, tmp_path / "x", "--check_args", "--preset", "nih-1-mrm",
                             "--norm", "mrm")) == 0


def test_check_args_finds_a_missing_split_file(demo, tmp_path, capsys):
    """--check_args (what the launch scripts run before torchrun) locates the split files."""
    import shutil

    data, weights = demo
    assert mfl.cli(base_args(data, weights, tmp_path / "x", "--check_args")) == 0
    copy = tmp_path / "NIH_copy"
    shutil.copytree(data, copy)
    (copy / "val_list.txt").unlink()
    with pytest.raises(SystemExit) as exc:
        mfl.cli(base_args(copy, weights, tmp_path / "x", "--check_args"))
    assert exc.value.code == 2 and "split file 'val_list.txt'" in capsys.readouterr().err


def test_negative_clip_grad_is_refused_by_the_engine():
    from engine_finetune import train_one_epoch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clip_grad=-1"):
        train_one_epoch(model, [(torch.ones(1, 2), torch.ones(1, 1))], opt, torch.device("cpu"), 0,
                        set_lr=lambda e: 0.1, clip_grad=-1.0, progress=False)


def test_output_folder_with_another_run_refused(demo, tmp_path, capsys):
    data, weights = demo
    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.json").write_text("{}")  # not a run's record: a file of the user's
    assert mfl.cli(base_args(data, weights, out)) == 1
    assert "holds files no run of this tool wrote (config.json)" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"  # untouched


def test_nb_classes_checked_against_data(demo, tmp_path, capsys):
    data, weights = demo
    assert mfl.cli(base_args(data, weights, tmp_path / "k", "--nb_classes", "5")) == 2
    assert "--nb_classes 5" in capsys.readouterr().err


PAPER_MRM = ("--num_workers 10 --batch_size 64 --model vit_base_patch16_lora --finetune {w} "
             "--epochs 100 --lr 0.05 --warmup_epochs 5 --layer_decay 0.65 --weight_decay 0 "
             "--drop_path 0.1 --reprob 0 --nb_classes 14 --dist_eval --data_size 1% "
             "--data_path {d} --script ft_lora_mrm.sh --optimizer sgd --lora_rank 4 "
             "--lora_pos attn --note lora --local-rank=0")
PAPER_MAE = ("--num_workers 10 --batch_size 64 --model vit_base_patch16_lora --finetune {w} "
             "--epochs 400 --blr 3e-3 --warmup_epochs 5 --layer_decay 0.65 --weight_decay 0.05 "
             "--drop_path 0.1 --reprob 0.25 --nb_classes 14 --dist_eval --data_size 1% "
             "--data_path {d} --script ft_lora_cxrmae.sh --optimizer adamw --lora_rank 4 "
             "--lora_pos attn --note lora")


@pytest.mark.parametrize("line,norm_file", [(PAPER_MRM, "MRM.pth"), (PAPER_MAE, "CXR_MAE.pth")])
def test_paper_script_flags_parse_unchanged(tmp_path, line, norm_file, vit_base_file):
    weights = vit_base_file(tmp_path, norm_file)
    argv = line.format(w=weights, d=tmp_path).split()
    parser = mfl.get_args_parser()
    args = parser.parse_args(argv)
    mfl.resolve_args(args, cli.explicit_flags(parser, argv))
    assert args.method == "lora" and args.arch == "vit_base_patch16"
    assert args.norm == ("mrm" if norm_file == "MRM.pth" else "cxr_mae")
    assert args.recipe == args.optimizer and args.data_size == "1%" and args.lora_rank == 4


def test_preset_fills_and_explicit_flags_win(tmp_path, vit_base_file):
    weights = vit_base_file(tmp_path, "w.pth")
    parser = mfl.get_args_parser()
    argv = ["--preset", "chexpert-10-mrm", "--finetune", str(weights), "--data_path", str(tmp_path),
            "--epochs", "7"]
    args = parser.parse_args(argv)
    mfl.resolve_args(args, cli.explicit_flags(parser, argv))
    assert (args.lr, args.lora_rank, args.optimizer, args.epochs) == (0.05, 16, "sgd", 7)
    assert (args.dataset, args.data_size, args.norm, args.weight_decay) == ("chexpert", "10%", "mrm", 0.0)


@pytest.mark.parametrize("extra,dataset,data_path", [
    ([], "nih", mfl.DEMO_DEFAULTS["data_path"]),  # the built-in demo set
    (["--data_path", "RSNA_demo"], None, "RSNA_demo"),  # the user's: kind from its folder
    (["--data_path", "RSNA_demo", "--dataset", "rsna"], "rsna", "RSNA_demo"),
])
def test_demo_takes_the_kind_of_a_given_data_path(extra, dataset, data_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RSNA_demo").mkdir()  # a demo set the user wrote (python -m datasets.demo --rsna)
    parser = mfl.get_args_parser()
    argv = ["--demo", *extra]
    args = parser.parse_args(argv)
    mfl.resolve_args(args, cli.explicit_flags(parser, argv))
    assert (args.dataset, args.data_path) == (dataset, data_path)
    assert args.model == "vit_tiny_patch16_lora" and args.epochs == 8


@pytest.mark.parametrize("script", ["ft_lora_mrm.sh", "ft_lora_mae.sh", "ft_mrm.sh", "ft_mae.sh"])
def test_shell_scripts_build_a_valid_command(script, tmp_path):
    weights = tmp_path / "weights.pth"
    weights.touch()  # the flags name files that exist
    env = {**os.environ, "DRY_RUN": "1", "NGPUS": "3", "DATA_SIZE": "10", "DATASET": "rsna",
           "WEIGHTS": str(weights)}
    proc = subprocess.run(["bash", str(ROOT / script), "--epochs", "2"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "torchrun" and words[words.index("--nproc_per_node") + 1] == "3"
    entry = next(i for i, w in enumerate(words) if Path(w).name == "main_finetune_lora.py")
    argv = words[entry + 1:]
    assert argv[-2:] == ["--epochs", "2"]  # extra arguments pass through
    args = mfl.get_args_parser().parse_args(argv)
    assert args.preset.startswith("rsna-10-")
    assert (args.model == "vit_base_patch16_lora") == ("lora" in script)


@pytest.mark.parametrize("extra,method", [
    (["--model", "vit_tiny_patch16"], "full"),
    (["--model", "vit_tiny_patch16", "--method", "linear"], "linear"),
    (["--backbone_dtype", "bf16", "--amp", "bf16", "--grad_checkpointing"], "lora"),
    (["--device_aug"], "lora"),
])
def test_baselines_and_speed_flags_run_with_same_outputs(demo, tmp_path, extra, method):
    data, weights = demo
    out = tmp_path / method
    assert mfl.cli(base_args(data, weights, out, "--epochs", "1", "--warmup_epochs", "0",
                             *extra)) == 0
    results = json.loads((out / "results_test.json").read_text())
    assert results["method"] == method
    tensors = load_file(str(out / "checkpoint-best.safetensors"))
    if method == "full":
        assert "blocks.0.attn.qkv.weight" in tensors
        assert results["trainable_params"] == results["total_params"]
    elif method == "linear":
        assert set(tensors) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
        assert results["trainable_params"] == 2 * 192 + 192 * 14 + 14
    else:
        assert all(t.dtype == torch.float32 for t in tensors.values())
    for name in ("log.txt", "predictions_test.csv", "roc_test.png", "results_test_auroc.md"):
        assert (out / name).is_file()
    again = tmp_path / f"{method}-again"
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "bf16" if "--backbone_dtype" in extra else "none", "--num_workers", "0",
                    "--output_dir", str(again), "--no_progress"]) == 0
    reloaded = json.loads((again / "results_test.json").read_text())
    assert reloaded["mean_auroc"] == pytest.approx(results["mean_auroc"], abs=1e-6)


def test_overwrite_replaces_old_run_but_bad_input_keeps_it(demo, tmp_path, capsys):
    data, weights = demo
    out = tmp_path / "run"
    assert mfl.cli(base_args(data, weights, out, "--epochs", "1", "--warmup_epochs", "0")) == 0
    old_log = (out / "log.txt").read_text()
    # A failing new run (bad split folder) leaves the old run as it was.
    assert mfl.cli(base_args(data, weights, out, "--overwrite", "--split_dir",
                             str(tmp_path / "nowhere"))) == 1
    assert "train_list.txt" in capsys.readouterr().err  # names the missing split file
    assert (out / "log.txt").read_text() == old_log and (out / "checkpoint-best.json").exists()
    assert mfl.cli(base_args(data, weights, out, "--overwrite", "--epochs", "1",
                             "--warmup_epochs", "0")) == 0
    assert len((out / "log.txt").read_text().splitlines()) == 1  # replaced, not appended
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1


def test_rsna_dicom_run_end_to_end(demo, tmp_path):
    """An RSNA-layout data set of JPEG DICOMs trains and tests with its one class, found from
    the folder name; the reported AUROC is sklearn's on the saved predictions."""
    from datasets.synthetic import demo_as_rsna_dicoms

    _, weights = demo
    nih = datasets.make_demo_dataset(tmp_path / "NIH", num_images=60, image_size=32, seed=7)
    rsna = demo_as_rsna_dicoms(nih, tmp_path / "RSNA_Pneumonia")
    test_labels = datasets.build_dataset("test", rsna, cache="off").targets[:, 0]
    assert 0 < test_labels.sum() < len(test_labels)  # both values: the AUROC is defined
    out = tmp_path / "out"
    rc = mfl.cli(["--data_path", str(rsna), "--finetune", str(weights), "--model", "vit_tiny_patch16_lora",
                  "--depth", "2", "--input_size", "32", "--batch_size", "8", "--num_workers", "0",
                  "--amp", "none", "--epochs", "1", "--warmup_epochs", "0", "--lr", "0.05",
                  "--output_dir", str(out), "--run_name", "", "--no_progress"])
    assert rc == 0
    result = json.loads((out / "results_test.json").read_text())
    assert result["dataset"] == "rsna" and result["class_names"] == ["Pneumonia"]
    preds = pd.read_csv(out / "predictions_test.csv")
    assert preds["path"].str.endswith(".dcm").all() and len(preds) == result["num_images"]
    expected = roc_auc_score(preds["label_Pneumonia"], preds["Pneumonia"])
    assert result["mean_auroc"] == pytest.approx(expected, abs=1e-6)
    assert result["auroc"]["Pneumonia"] == pytest.approx(expected, abs=1e-6)
    # The paper's DICOM rule is the rsna default, kept with the checkpoint, and predict.py
    # decodes new DICOMs by the same rule: its probabilities equal the test predictions.
    assert result["dicom_scaling"] == "paper"
    assert json.loads((out / "checkpoint-best.json").read_text())["dicom_scaling"] == "paper"
    import predict

    model, config = predict.load_model(out / "checkpoint-best")
    files = [str(rsna / p) for p in preds["path"]]
    probs, failures = predict.predict_images(model, config, files, batch_size=4)
    assert not failures
    np.testing.assert_allclose(probs[:, 0], preds["Pneumonia"].to_numpy(), atol=1e-6)
    minmax = predict.predict_images(model, dataclasses.replace(config, dicom_scaling="minmax"), files)[0]
    assert not np.allclose(minmax[:, 0], probs[:, 0], atol=1e-6)  # the rule matters
