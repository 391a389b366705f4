"""The LoRA family beside LoRA: DoRA, IA3, rsLoRA scaling and LoRA+ learning rates, each
through the method registry, the checkpoints, the export and the entry script (tiny ViTs)."""
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import checkpoints as ckpt
import lora
import main_finetune_lora as mfl
import methods
import models_vit_lora as mv
import util.runfolder as runfolder
from _fakes import demo_data_and_weights, mrm_checkpoint, tiny_run_args
from datasets import NORM_STATS
from lora.dora import DoRALinear, _DoRAUpdate, dora_update_reference
from lora.ia3 import IA3Activation, IA3Linear
from methods.ia3 import IA3Settings
from methods.lora import LoRASpec
from util.lr_sched import adjust_learning_rate
from util.optim import build_optimizer

SETTINGS = {"dora": LoRASpec(rank=4, alpha=32.0, dropout=0.1), "ia3": IA3Settings()}
DIM, DEPTH, CLASSES = 192, 2, 3  # ViT-Ti/16, two blocks


def config(method, settings=None, pretrained=None):
    mean, std = NORM_STATS["mrm"]
    return mv.ModelConfig(model="vit_tiny_patch16", method=method, class_names=["a", "b", "c"],
                          img_size=32, global_pool=True, norm="mrm", mean=mean, std=std,
                          pretrained=pretrained, model_kwargs={"depth": DEPTH},
                          method_settings=settings if settings is not None else SETTINGS[method])


def perturbed(model, seed=0):
    """Trained-looking tensors: every trainable one moved off its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


HEAD = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
EXPECTED = {
    "dora": {f"blocks.{i}.attn.qkv.{t}" for i in range(DEPTH)
             for t in ("lora_A", "lora_B", "lora_magnitude")} | HEAD,
    "ia3": {f"blocks.{i}.{m}.ia3_scale" for i in range(DEPTH) for m in ("attn.qkv", "mlp.act")} | HEAD,
}


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_shapes_and_exactly_the_trained_set(method):
    torch.manual_seed(0)
    model = mv.build_model(config(method))
    assert trainable(model) == EXPECTED[method]
    if method == "dora":  # q and v rows of each qkv get a magnitude, k none
        qkv = model.blocks[0].attn.qkv
        assert isinstance(qkv, DoRALinear) and qkv.lora_magnitude.shape == (2 * DIM,)
        # at the start the magnitude is the row norm: the model is the base model
        torch.testing.assert_close(qkv.magnitude_scale(), torch.ones(2 * DIM))
    else:  # k and v thirds (the paper), the MLP's 4x wide inner activation
        assert isinstance(model.blocks[0].attn.qkv, IA3Linear)
        assert model.blocks[0].attn.qkv.ia3_scale.shape == (2 * DIM,)
        assert isinstance(model.blocks[0].mlp.act, IA3Activation)
        assert model.blocks[0].mlp.act.ia3_scale.shape == (4 * DIM,)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    logits = model(x)
    assert logits.shape == (2, CLASSES)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in EXPECTED[method]), name
        if p.grad is not None:
            assert p.grad.shape == p.shape
    adapted = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("blocks.")]
    assert any(p.grad.abs().sum() > 0 for p in adapted)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_bf16_autocast_with_a_bf16_backbone_follows_fp32(method):
    """Under bf16 autocast, with the frozen backbone held in bf16 (--backbone_dtype bf16), the
    logits follow the fp32 model's and the trained tensors get fp32 gradients."""
    torch.manual_seed(0)
    model = perturbed(mv.build_model(config(method, SETTINGS[method] if method == "ia3" else
                                            LoRASpec(rank=4, alpha=32.0, dropout=0.0))))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    expected = model(x).detach()
    lora.cast_frozen_(model, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.05)
    logits.float().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == EXPECTED[method]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


def test_dora_update_equals_its_formula_with_and_without_dropout():
    """The in-place step equals ``out - base + g (base + s h B^T)`` out of place, gradients too."""
    torch.manual_seed(0)
    tokens, cols = 7, ((0, 4), (8, 12))  # q and v of a 12-wide qkv
    out = torch.randn(tokens, 12, requires_grad=True)
    h, lora_b = torch.randn(tokens, 6, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    g, wx_d = (torch.rand(8) + 0.5).requires_grad_(), torch.randn(tokens, 8, requires_grad=True)
    bias = torch.randn(8)
    for base in (None, wx_d):
        ins = [out, h, lora_b, g] + ([wx_d] if base is not None else [])
        a = _DoRAUpdate.apply(out.clone(), h, lora_b, g, base, bias, 0.7, cols)
        b = dora_update_reference(out.clone(), h, lora_b, g, base, bias, 0.7, cols)
        torch.testing.assert_close(a, b)
        assert torch.equal(a[:, 4:8], out[:, 4:8])  # k untouched
        grad = torch.randn_like(a)
        for ga, gb in zip(torch.autograd.grad(a, ins, grad), torch.autograd.grad(b, ins, grad)):
            torch.testing.assert_close(ga, gb)


def test_dora_row_norm_needs_no_full_weight_and_follows_the_base():
    """||W + s B A|| from the cached ||W||^2 equals the direct norm; a new base weight
    (loaded after injection) is picked up, not the cached one."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 24), rank=2, alpha=4.0, parts=(True, False, True))
    layer.lora_B.data.normal_()
    direct = lambda: torch.cat([torch.linalg.norm(  # noqa: E731
        (layer.base_layer.weight + layer.delta_weight())[a:b], dim=1) for a, b in layer._adapted_columns()])
    torch.testing.assert_close(layer.weight_norm(), direct())
    with torch.no_grad():
        layer.base_layer.weight.mul_(3.0)
    torch.testing.assert_close(layer.weight_norm(), direct())


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_merge_equals_unmerged_and_export_loads_into_plain_timm(method, tmp_path):
    torch.manual_seed(0)
    cfg = config(method)
    model = perturbed(mv.build_model(cfg)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert methods.get(method).merge(model) > 0
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        methods.get(method).unmerge(model)
        assert torch.equal(model(x), expected)  # unmerge restores the weights bit for bit

    tensors, _ = ckpt.export_merged(model, cfg, tmp_path / "export" / "m")
    plain = mv.vit_tiny_patch16(depth=DEPTH, num_classes=CLASSES, img_size=32).eval()
    plain.load_state_dict(load_file(str(tensors)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)
    loaded, _ = ckpt.load_merged(tmp_path / "export" / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)


def test_an_ia3_activation_merges_only_through_its_mlp():
    """The activation's vector folds into its MLP's fc2, which the model-level merge finds;
    the activation alone has no fc2 to fold into and says so, leaving itself unmerged."""
    act = IA3Activation(nn.GELU(), 4)
    with pytest.raises(ValueError, match=r"fc2 of its MLP.*lora\.merge"):
        act.merge()
    assert not act.merged
    model = perturbed(mv.build_model(config("ia3")))
    fc2 = model.blocks[0].mlp.fc2.weight.detach().clone()
    scale = model.blocks[0].mlp.act.ia3_scale.detach().clone()
    assert lora.merge(model) == 2 * DEPTH  # qkv and the activation of every block
    torch.testing.assert_close(model.blocks[0].mlp.fc2.weight, fc2 * scale)
    assert lora.unmerge(model) == 2 * DEPTH
    assert torch.equal(model.blocks[0].mlp.fc2.weight, fc2)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_checkpoint_round_trip_holds_only_the_trained_tensors(method, tmp_path):
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    cfg = config(method, pretrained=str(weights)).replace(pretrained_sha256=ckpt.file_sha256(weights))
    model = perturbed(mv.build_model(cfg, weights)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    stem = tmp_path / "run" / "checkpoint-best"
    assert set(load_file(str(ckpt.save_checkpoint(stem, model, cfg)))) == EXPECTED[method]
    loaded, again = ckpt.load_trained(stem)
    assert again.method == method and again.method_settings == cfg.method_settings
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_rslora_scales_by_the_square_root_of_the_rank():
    spec = LoRASpec(rank=16, alpha=32.0, scaling_rule="rslora")
    assert spec.scaling == 32.0 / math.sqrt(16) == 8.0
    assert LoRASpec(rank=16, alpha=32.0).scaling == 2.0  # the paper's alpha / r
    for method in ("lora", "dora"):
        model = mv.build_model(config(method, spec))
        layers = [layer for _, layer in lora.lora_layers(model)]
        assert layers and all(layer.scaling == 8.0 for layer in layers)
        layer = layers[0]
        layer.lora_B.data.normal_()
        torch.testing.assert_close(layer.delta_weight(), 8.0 * (layer._expanded_B() @ layer.lora_A))
    assert methods.get("lora").tag(spec) == "r16-rslora"
    assert methods.get("dora").tag(LoRASpec(4, 32.0, plus_ratio=16.0)) == "r4-plus16"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lora_plus_gives_b_ratio_times_the_lr_of_a(optimizer):
    spec = LoRASpec(rank=4, alpha=32.0, plus_ratio=16.0)
    model = mv.build_model(config("lora", spec))
    opt = build_optimizer(model, optimizer, lr=0.01, weight_decay=0.05, layer_decay=0.65,
                          lr_scale=spec.lr_scale)
    adjust_learning_rate(opt, epoch=3.0, lr=0.01, min_lr=0.0, warmup_epochs=1, epochs=10)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(lr_of) == len(trainable(model))
    for i in range(DEPTH):
        a, b = (lr_of[id(params[f"blocks.{i}.attn.qkv.lora_{t}"])] for t in "AB")
        assert a > 0 and b == pytest.approx(16.0 * a)
    assert lr_of[id(params["head.weight"])] == pytest.approx(
        lr_of[id(params["blocks.1.attn.qkv.lora_A"])] / (0.65 if optimizer == "adamw" else 1.0))
    # ratio 1 is the plain optimizer: the groups of a run without LoRA+
    plain = build_optimizer(model, optimizer, 0.01, 0.05, 0.65, lr_scale=LoRASpec(4, 32.0).lr_scale)
    without = build_optimizer(model, optimizer, 0.01, 0.05, 0.65)
    assert len(plain.param_groups) == len(without.param_groups) < len(opt.param_groups)


@pytest.mark.parametrize("argv, flag", [
    (["--method", "dora", "--lora_rank", "0"], "--lora_rank"),
    (["--method", "lora", "--lora_plus_ratio", "0"], "--lora_plus_ratio"),
    (["--method", "dora", "--lora_scaling", "sqrt"], "--lora_scaling"),
    (["--method", "ia3", "--ia3_attn", "q"], "--ia3_attn"),
])
def test_bad_settings_are_refused_in_one_line_naming_the_flag(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        mfl.cli(["--demo", "--model", "vit_tiny_patch16", "--output_dir", str(tmp_path), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("main_finetune_lora.py: error: ")]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data_and_weights(tmp_path_factory.mktemp("family"), num_images=40, seed=4)


class Killed(BaseException):
    """Stands for a kill -9 between two file operations of an epoch's commit."""


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_demo_run_tests_resumes_bit_equal_and_evaluates(method, demo, tmp_path, monkeypatch):
    """A two-epoch run ends in a test table; one killed during its second epoch's commit
    and resumed ends bit-equal; --eval of its best checkpoint gives the same test AUROC."""
    data, weights = demo
    argv = lambda out, *extra: tiny_run_args(  # noqa: E731
        data, weights, out, "--model", "vit_tiny_patch16", "--method", method,
        "--ci_resamples", "0", *extra, seed=7)
    whole = tmp_path / "whole"
    assert mfl.cli(argv(whole)) == 0
    assert "| **mean** |" in (whole / "results_test_auroc.md").read_text()
    record = json.loads((whole / "config.json").read_text())
    saved = load_file(str(whole / "checkpoint-best.safetensors"))
    assert record["settings"]["method"] == method
    count = sum(t.numel() for t in saved.values())
    assert record["trainable"].startswith(f"trainable params: {count:,} ")

    cut, seen = tmp_path / "cut", []

    def fault(label):
        seen.append(label)
        if label == "mkdir" and seen.count("mkdir") == 2:
            raise Killed(label)

    monkeypatch.setattr(runfolder, "_fault_point", fault)
    with pytest.raises(Killed):
        mfl.cli(argv(cut))
    monkeypatch.setattr(runfolder, "_fault_point", lambda label: None)
    (cut / runfolder.LOCK_NAME).unlink(missing_ok=True)
    assert mfl.cli(argv(cut, "--resume", "auto")) == 0
    for stem in ("checkpoint-best", "checkpoint-last"):
        a, b = (load_file(str(run / f"{stem}.safetensors")) for run in (whole, cut))
        assert set(a) == set(b) == EXPECTED[method]
        assert all(torch.equal(a[k], b[k]) for k in a), stem
    results = json.loads((whole / "results_test.json").read_text())
    assert json.loads((cut / "results_test.json").read_text())["auroc"] == results["auroc"]

    again = tmp_path / "eval"
    assert mfl.cli(["--eval", "--resume", str(whole / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "none", "--num_workers", "0", "--output_dir", str(again),
                    "--no_progress", "--ci_resamples", "0"]) == 0
    assert json.loads((again / "results_test.json").read_text())["auroc"] == results["auroc"]


def test_lora_plus_reaches_the_optimizer_of_a_run(demo, tmp_path):
    data, weights = demo
    out = tmp_path / "plus"
    assert mfl.cli(tiny_run_args(data, weights, out, "--lora_plus_ratio", "16", "--epochs", "1",
                                 "--warmup_epochs", "0", "--ci_resamples", "0", seed=7)) == 0
    state = torch.load(out / "checkpoint-last.state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 16.0]
    assert all(g["lr"] == pytest.approx(g["lr_scale"] * groups[0]["lr"] / groups[0]["lr_scale"])
               for g in groups)
    assert json.loads((out / "config.json").read_text())["settings"]["lora_plus_ratio"] == 16.0


def test_every_registered_method_is_a_bench_contender(tmp_path, capsys):
    """bench_model.py --methods all times every method of the registry (built as training
    builds it, evaluated merged where it merges) and the PEFT peers of the same targets."""
    import sys

    sys.path.insert(0, str(mv.Path(__file__).resolve().parents[1] / "bench"))
    import bench_model as bm

    result = bm.main(["--model", "vit_tiny_patch16", "--img_size", "32", "--batch_size", "2",
                      "--steps", "1", "--rounds", "1", "--warmup", "0", "--no_memory",
                      "--amp", "fp32", "--impls", "ours,full", "--methods", "all"])
    capsys.readouterr()
    train, evaluated = result["train"], result["eval"]
    for name, method in methods.REGISTRY.items():
        impl = bm.BUILT_IN.get(name, name)
        assert f"{impl}:fp32" in train, name
        if name not in bm.BUILT_IN:
            cfg = config("lora", LoRASpec(4, 32.0)).replace(  # the bench's: 12 blocks, 14 classes
                method=name, method_settings=bm.method_settings(name, 4, 32.0, 0.1),
                class_names=[f"c{k}" for k in range(bm.NUM_CLASSES)], model_kwargs={})
            expected = lora.count_parameters(mv.build_model(cfg))[0]
            assert train[f"{impl}:fp32"]["trainable"] == expected, name
            assert f"{impl}{'' if method.not_mergeable else '_merged'}:fp32" in evaluated, name
    # The same-target variants: DoRA on all of qkv, IA3 on q too.
    assert train["dora_qkv:fp32"]["trainable"] > train["dora:fp32"]["trainable"]
    assert train["ia3_qkv:fp32"]["trainable"] - train["ia3:fp32"]["trainable"] == 12 * DIM
    if bm.peft is not None:
        assert train["ia3_qkv:fp32"]["trainable"] == train["peft_ia3:fp32"]["trainable"]
        assert {"train dora_qkv/peft_dora fp32", "train ia3_qkv/peft_ia3 fp32"} <= set(result["ratios"])
        assert "train dora_qkv/peft_dora fp32" in {g["ratio"] for g in result["goals"]}
    assert "train dora/ours fp32" in result["ratios"] and "eval ia3_merged/plain fp32" in result["ratios"]


def test_dora_trains_under_two_process_ddp(demo, tmp_path):
    """Two CPU processes (gloo): every DoRA tensor gets its gradient reduced (DDP refuses a
    trainable tensor without one), and the single-process --eval of the result agrees."""
    import os
    import subprocess
    import sys

    data, weights = demo
    root = mv.Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "main_finetune_lora.py"),
           *tiny_run_args(data, weights, out, "--model", "vit_tiny_patch16", "--method", "dora",
                          "--epochs", "1", "--warmup_epochs", "0", "--ci_resamples", "0", seed=7)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = json.loads((out / "results_test.json").read_text())
    assert set(load_file(str(out / "checkpoint-best.safetensors"))) == EXPECTED["dora"]
    again = tmp_path / "eval"
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "none", "--num_workers", "0", "--output_dir", str(again),
                    "--no_progress", "--ci_resamples", "0"]) == 0
    single = json.loads((again / "results_test.json").read_text())
    assert single["num_images"] == distributed["num_images"]
    assert single["mean_auroc"] == pytest.approx(distributed["mean_auroc"], abs=1e-6)
