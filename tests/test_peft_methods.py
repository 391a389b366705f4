"""BitFit, SSF, AdaptFormer and VPT: each one's formula on small tensors (no library has them),
its trainable set, its merge (or the export's refusal), a save / load round trip, a demo run to
a test table that resumes bit-exactly and whose checkpoint --eval and predict.py reload,
Grad-CAM through VPT's prompts, two CPU processes, bad sizes, and the sizes that match LoRA's
trainable budget on ViT-B/16."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoints as ckpt
import export
import lora
import main_finetune_lora as mfl
import methods
import models_vit_lora as mv
import predict
from _fakes import demo_data_and_weights, mrm_checkpoint, tiny_run_args
from datasets import NORM_STATS
from methods import adaptformer, ssf, vpt
from methods.adaptformer import AdaptFormerSettings
from methods.vpt import VPTSettings
from util import runfolder
from util.heatmap import grad_cam
from util.presets import PRESETS, resolve_preset

ROOT = Path(__file__).resolve().parents[1]
NEW = ("bitfit", "ssf", "adaptformer", "vpt")
# Small settings for the tiny ViT (width 192, depth 2); prompt dropout off where outputs are compared.
SETTINGS = {"bitfit": None, "ssf": None, "adaptformer": AdaptFormerSettings(dim=8),
            "vpt": VPTSettings(tokens=3, depth="deep", dropout=0.0)}
FLAGS = {"bitfit": [], "ssf": [], "adaptformer": ["--adapter_dim", "8"],
         "vpt": ["--vpt_tokens", "3"]}
HEAD = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def config(method, settings="default", *, global_pool=True, img_size=32, depth=2, classes=3,
           pretrained=None):
    mean, std = NORM_STATS["mrm"]
    settings = SETTINGS[method] if settings == "default" else settings
    return mv.ModelConfig(
        model="vit_tiny_patch16", method=method, class_names=[f"c{i}" for i in range(classes)],
        img_size=img_size, global_pool=global_pool, norm="mrm", mean=mean, std=std,
        pretrained=None if pretrained is None else str(pretrained),
        pretrained_sha256=None if pretrained is None else ckpt.file_sha256(pretrained),
        model_kwargs={"depth": depth}, method_settings=settings)


def build(method, settings="default", seed=0, **kw):
    torch.manual_seed(seed)
    return mv.build_model(config(method, settings, **kw)).eval()


@torch.no_grad()
def perturb(model, seed=1, std=0.2):
    """Move every trained tensor away from its initial value (zero ups, unit scales, ...)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=g))


def trained_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------
# What each method trains, and its shapes
# ---------------------------------------------------------------------------------------

def expected_trainable(method, model):
    names = {n for n, _ in model.named_parameters()}
    if method == "bitfit":
        return {n for n in names if n.endswith(".bias")} | HEAD
    if method == "ssf":
        return {n for n in names if n.endswith((".ssf_scale", ".ssf_shift"))} | HEAD
    if method == "adaptformer":
        return {f"blocks.{i}.mlp.adapter.{l}.{t}" for i in range(2) for l in ("down", "up")
                for t in ("weight", "bias")} | HEAD
    return {f"blocks.{i}.prompt" for i in range(2)} | HEAD


def expected_count(method):
    width, depth, classes = 192, 2, 3
    head = 2 * width + width * classes + classes
    if method == "bitfit":  # qkv 3w, proj w, fc1 4w, fc2 w, two norms 2w per block; patch embed w
        return depth * 11 * width + width + head
    if method == "ssf":  # two vectors after norm1, qkv, proj, norm2, fc1, fc2; and the patch embed
        return 2 * (depth * 11 * width + width) + head
    if method == "adaptformer":
        return adaptformer.trainable_count(width, depth, 8) + head
    return vpt.trainable_count(width, depth, 3, "deep") + head


@pytest.mark.parametrize("method", NEW)
def test_trainable_set_shapes_and_gradients(method):
    model = build(method).train()
    assert trained_names(model) == expected_trainable(method, model)
    assert lora.count_parameters(model)[0] == expected_count(method)
    if method == "ssf":
        wrapped = {n for n, _ in ssf.ssf_layers(model)}
        assert wrapped == {"patch_embed.proj"} | {f"blocks.{i}.{t}" for i in range(2)
                                                   for t in ssf.BLOCK_TARGETS}
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 3)
    perturb(model)  # zero-initialised parts (AdaptFormer's up) pass no gradient on otherwise
    F.binary_cross_entropy_with_logits(model(x), torch.rand(2, 3)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("method", NEW)
def test_a_bf16_backbone_trains_under_bf16_autocast(method):
    """--backbone_dtype bf16: the frozen tensors are held in bf16, except those of a module with
    a trained tensor of its own (BitFit's biases: a CPU LayerNorm refuses two dtypes)."""
    model = build(method).train()
    perturb(model)
    assert lora.cast_frozen_(model, torch.bfloat16) > 0
    assert model.pos_embed.dtype == torch.bfloat16
    norm = model.get_submodule("blocks.0." + ("block." if method == "vpt" else "") + "norm1")
    expected = torch.float32 if method == "bitfit" else torch.bfloat16
    assert getattr(norm, "base_layer", norm).weight.dtype == expected
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    F.binary_cross_entropy_with_logits(logits.float(), torch.rand(2, 3)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------
# The papers' formulas on small tensors
# ---------------------------------------------------------------------------------------

def test_ssf_scales_and_shifts_a_linear_a_norm_and_a_convolution():
    torch.manual_seed(0)
    for base, x, view in ((nn.Linear(5, 7), torch.randn(2, 4, 5), (7,)),
                          (nn.LayerNorm(5, eps=1e-6), torch.randn(2, 4, 5), (5,)),
                          (nn.Conv2d(3, 4, 2, 2), torch.randn(2, 3, 6, 6), (4, 1, 1))):
        with torch.no_grad():
            base.weight.normal_()
            base.bias.normal_()
        layer = ssf.ScaleShift(copy.deepcopy(base))
        assert layer.ssf_scale.std() > 0 and layer.ssf_shift.abs().sum() > 0  # N(1, .02), N(0, .02)
        perturb(layer)
        scale, shift = layer.ssf_scale.view(view), layer.ssf_shift.view(view)
        torch.testing.assert_close(layer(x), base(x) * scale + shift)
        before = [t.clone() for t in (base.weight, base.bias)]
        layer.merge()
        torch.testing.assert_close(layer(x), base(x) * scale + shift, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, before[0])
        assert torch.equal(layer.base_layer.bias, before[1])


def test_ssf_vit_is_the_papers_block_written_out():
    """Patch embedding, then per block: LN -> SSF -> qkv -> SSF -> attention -> proj -> SSF,
    residual, LN -> SSF -> fc1 -> SSF -> GELU -> fc2 -> SSF, residual; mean of patch tokens."""
    model = build("ssf", depth=1)
    perturb(model, std=0.1)
    plain = model  # its base layers hold the pre-trained tensors

    def s(name, y):
        layer = plain.get_submodule(name)
        return y * layer.ssf_scale + layer.ssf_shift

    def base(name):
        return plain.get_submodule(name).base_layer

    img = torch.randn(2, 3, 32, 32)
    conv = base("patch_embed.proj")
    y = F.conv2d(img, conv.weight, conv.bias, stride=16).flatten(2).transpose(1, 2)
    y = s("patch_embed.proj", y)
    x = torch.cat([plain.cls_token.expand(2, -1, -1), y], dim=1) + plain.pos_embed
    b = "blocks.0."
    heads = plain.blocks[0].attn.num_heads
    h = s(b + "norm1", F.layer_norm(x, (192,), base(b + "norm1").weight, base(b + "norm1").bias, 1e-6))
    qkv = s(b + "attn.qkv", F.linear(h, base(b + "attn.qkv").weight, base(b + "attn.qkv").bias))
    q, k, v = qkv.reshape(2, -1, 3, heads, 64).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) / math.sqrt(64)).softmax(-1) @ v
    o = attn.transpose(1, 2).reshape(2, -1, 192)
    x = x + s(b + "attn.proj", F.linear(o, base(b + "attn.proj").weight, base(b + "attn.proj").bias))
    h = s(b + "norm2", F.layer_norm(x, (192,), base(b + "norm2").weight, base(b + "norm2").bias, 1e-6))
    f = F.gelu(s(b + "mlp.fc1", F.linear(h, base(b + "mlp.fc1").weight, base(b + "mlp.fc1").bias)))
    x = x + s(b + "mlp.fc2", F.linear(f, base(b + "mlp.fc2").weight, base(b + "mlp.fc2").bias))
    logits = plain.head(plain.fc_norm(x[:, 1:].mean(1)))
    torch.testing.assert_close(model(img), logits, atol=1e-5, rtol=1e-4)


def test_adaptformer_is_a_scaled_bottleneck_beside_the_mlp():
    plain = build("linear", None, depth=1)
    adapted = copy.deepcopy(plain)
    adaptformer.inject(adapted, AdaptFormerSettings(dim=4, scale=0.1, dropout=0.0))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(adapted(x), plain(x))  # up = 0: the pre-trained model at the start
    perturb(adapted.blocks[0].mlp.adapter.requires_grad_(True))
    block, mlp = adapted.blocks[0], adapted.blocks[0].mlp
    down, up = mlp.adapter.down, mlp.adapter.up
    tokens = torch.randn(2, 5, 192)
    h = block.norm2(tokens + block.attn(block.norm1(tokens)))
    bottleneck = torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(mlp(h), mlp.base_layer(h) + 0.1 * bottleneck)
    # In the block: x' + MLP(LN(x')) + s * adapter(LN(x')), x' = x + attention(LN(x)).
    x1 = tokens + block.attn(block.norm1(tokens))
    h = block.norm2(x1)
    torch.testing.assert_close(block(tokens), x1 + mlp.base_layer(h) + 0.1 * mlp.adapter(h))
    assert mlp.adapter.down.weight.abs().sum() > 0 and mlp.adapter.up.weight.abs().sum() > 0


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_vpt_prompts_follow_the_cls_token_and_pooling_skips_them(depth):
    model = build("vpt", VPTSettings(tokens=3, depth=depth, dropout=0.0))
    n = 3
    assert model.num_prefix_tokens == 1 + n
    prompted = [i for i, b in enumerate(model.blocks) if isinstance(b, vpt.PromptedBlock)]
    assert prompted == ([0, 1] if depth == "deep" else [0])
    bound = vpt.init_bound(model)
    assert all(b.prompt.abs().max() <= bound for b in model.blocks[:len(prompted)])
    # The paper's forward written out: [cls, P_0, E] into block 0; deep: block i's prompts
    # replace the previous block's prompt outputs.
    img = torch.randn(2, 3, 32, 32)
    x = model._pos_embed(model.patch_embed(img))
    x = torch.cat([x[:, :1], model.blocks[0].prompt.expand(2, -1, -1), x[:, 1:]], dim=1)
    x = model.blocks[0].block(x)
    second = model.blocks[1]
    if depth == "deep":
        x = torch.cat([x[:, :1], second.prompt.expand(2, -1, -1), x[:, 1 + n:]], dim=1)
        second = second.block
    x = second(x)
    assert x.shape == (2, 1 + n + 4, 192)
    pooled = model.fc_norm(x[:, 1 + n:].mean(1))  # patch tokens only
    torch.testing.assert_close(model(img), model.head(pooled), atol=1e-5, rtol=1e-4)
    features = model.forward_features(img)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), pooled,
                               atol=1e-5, rtol=1e-4)
    with_prompts = model.fc_norm(features[:, 1:].mean(1))
    assert not torch.allclose(with_prompts, pooled, atol=1e-3)


def test_vpt_prompt_dropout_acts_in_training_only():
    model = build("vpt", VPTSettings(tokens=50, depth="deep", dropout=0.5))
    block = model.blocks[0].train()
    x = torch.zeros(1, 5, 192)
    prompts = block.with_prompts(x)[:, 1:51]
    assert (prompts == 0).float().mean() > 0.3  # dropped entries, the others scaled by 2
    torch.testing.assert_close(prompts[prompts != 0], 2 * block.prompt[0][prompts[0] != 0])
    assert torch.equal(block.eval().with_prompts(x)[:, 1:51], block.prompt)


@pytest.mark.parametrize("global_pool", [True, False])
def test_grad_cam_with_vpt_finds_the_patch_behind_the_prompts(global_pool):
    """A head that reads one feature that only one patch carries: the map peaks at that patch,
    so the grid is read after the cls token and the prompts."""
    model = build("vpt", VPTSettings(tokens=4, depth="deep", dropout=0.0), depth=1, img_size=64,
                  classes=1, global_pool=global_pool)
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, 16:32, 32:48] = 3.0  # patch (row 1, col 2)
    if global_pool:
        with torch.no_grad():
            feats = model.forward_features(x)[:, model.num_prefix_tokens:]
            diff = feats[0, 1 * 4 + 2] - feats[0].mean(0)
            model.fc_norm.weight.fill_(1.0)
            model.head.weight.copy_(diff.sign().unsqueeze(0))
    cams, probs = grad_cam(model, x, class_index=0)
    assert cams.shape == (1, 4, 4)
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.sigmoid(model(x)[:, 0]).numpy(), atol=1e-6)
    if global_pool:
        assert np.unravel_index(cams[0].argmax(), cams[0].shape) == (1, 2)


# ---------------------------------------------------------------------------------------
# Merge (BitFit, SSF) and the export's refusal (AdaptFormer, VPT)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,global_pool", [("bitfit", True), ("ssf", True), ("ssf", False)])
def test_mergeable_methods_merge_exactly_and_export_to_plain_timm(method, global_pool, tmp_path):
    model = build(method, global_pool=global_pool)
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = methods.get(method)
    merged = m.merge(model)
    assert merged == (0 if method == "bitfit" else 13 + (0 if global_pool else 1))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
    if method == "ssf":
        with pytest.warns(UserWarning, match="already merged"):
            assert m.merge(model) == 0
        assert torch.equal(model.head.weight, before["head.weight"])
    # The plain timm state dict, from the merged model and from the unmerged one alike.
    merged_state = m.merged_state_dict(model)
    assert m.unmerge(model) == merged
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # unmerge restores every tensor bit-exactly
    unmerged_state = m.merged_state_dict(model)
    assert set(merged_state) == set(unmerged_state)
    for k in merged_state:
        torch.testing.assert_close(merged_state[k], unmerged_state[k], atol=1e-6, rtol=1e-6)
    cfg = config(method, global_pool=global_pool)
    tensors, _ = ckpt.export_merged(model, cfg, tmp_path / "export" / "m")
    exported, _ = ckpt.load_merged(tensors)  # stock timm, strict
    assert type(exported).__module__.startswith("timm.")
    assert ckpt.max_output_difference(model, exported, 32) < 1e-5


@pytest.mark.parametrize("method", ["adaptformer", "vpt"])
def test_export_refuses_a_non_mergeable_method_in_one_line(method, tmp_path, capsys):
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    cfg = config(method, pretrained=weights)
    torch.manual_seed(0)
    model = mv.build_model(cfg, weights)
    stem = tmp_path / "run" / "checkpoint-best"
    ckpt.save_checkpoint(stem, model, cfg)
    out = tmp_path / "export" / "m"
    assert export.main(["--checkpoint", str(stem), "--output", str(out)]) == 2  # usage
    err = capsys.readouterr().err.strip().splitlines()
    reason = methods.get(method).not_mergeable
    assert len(err) == 1 and err[0].endswith(
        f"method '{method}' cannot be merged into a plain timm ViT: {reason}")
    assert "\n" not in reason and not (tmp_path / "export").exists()  # no folder made either


@pytest.mark.parametrize("method", NEW)
def test_adapter_checkpoint_round_trip(method, tmp_path):
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    cfg = config(method, pretrained=weights, depth=2)
    torch.manual_seed(0)
    model = mv.build_model(cfg, weights).eval()
    perturb(model)
    stem = tmp_path / "run" / "checkpoint-best"
    path = ckpt.save_checkpoint(stem, model, cfg)
    assert set(load_file(str(path))) == trained_names(model)  # the trained tensors only
    loaded, again = ckpt.load_trained(stem)
    assert again.method_settings == cfg.method_settings and not again.backbone_in_file
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_a_safetensors_header_whose_length_starts_like_a_pickle_is_read_as_safetensors(tmp_path):
    """A header of 0x580 bytes begins b'\\x80\\x05', a pickle's first two bytes."""
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    for pad in range(2000):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert mv.sniff_weights_file(path).format == "safetensors"
    assert set(mv.read_safetensors(path)) == {"w"}


# ---------------------------------------------------------------------------------------
# A run end to end: train, resume bit-exactly, test, --eval, predict
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data_and_weights(tmp_path_factory.mktemp("peft"), num_images=48)


def run_args(demo, out, method, *extra):
    data, weights = demo
    return tiny_run_args(data, weights, out, "--model", "vit_tiny_patch16", "--method", method,
                         *FLAGS[method], *extra, seed=4)


class Killed(BaseException):
    """Stands for a kill -9 between two file operations of an epoch's commit."""


@pytest.mark.parametrize("method", NEW)
def test_demo_run_resumes_exactly_and_its_checkpoint_evaluates_and_predicts(
        method, demo, tmp_path, monkeypatch):
    data, _ = demo
    whole = tmp_path / "whole"
    assert mfl.cli(run_args(demo, whole, method)) == 0
    results = json.loads((whole / "results_test.json").read_text())
    assert results["method"] == method and (whole / "results_test_auroc.md").is_file()
    assert results["trainable_params"] == lora.count_parameters(
        mv.build_model(ckpt.read_config(whole / "checkpoint-best")))[0]

    # Killed while committing epoch 1, then resumed: the same run, bit for bit.
    cut, seen = tmp_path / "cut", []

    def fault(label):
        seen.append(label)
        if label == "staged" and seen.count("mkdir") == 2:
            raise Killed(label)

    monkeypatch.setattr(runfolder, "_fault_point", fault)
    with pytest.raises(Killed):
        mfl.cli(run_args(demo, cut, method))
    monkeypatch.setattr(runfolder, "_fault_point", lambda label: None)
    (cut / runfolder.LOCK_NAME).unlink(missing_ok=True)
    assert mfl.cli(run_args(demo, cut, method, "--resume", "auto")) == 0
    for stem in ("checkpoint-best", "checkpoint-last"):
        a, b = load_file(str(whole / f"{stem}.safetensors")), load_file(str(cut / f"{stem}.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), stem
    assert json.loads((cut / "results_test.json").read_text())["auroc"] == results["auroc"]

    # --eval of the checkpoint gives the run's test table.
    again = tmp_path / "eval"
    assert mfl.cli(["--eval", "--resume", str(whole / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "none", "--num_workers", "0", "--output_dir", str(again),
                    "--no_progress"]) == 0
    reloaded = json.loads((again / "results_test.json").read_text())
    assert reloaded["mean_auroc"] == pytest.approx(results["mean_auroc"], abs=1e-6)

    # predict.py on the adapter checkpoint: the run's test probabilities (Grad-CAM for VPT).
    test_lines = (data / "test_list.txt").read_text().splitlines()[:3]
    (tmp_path / "few.txt").write_text("\n".join(test_lines) + "\n")
    images = [data / "all_classes" / line.split()[0] for line in test_lines]
    out = tmp_path / "preds.csv"
    extra = ["--heatmap_class", "Effusion", "--heatmap_dir", str(tmp_path / "maps")] \
        if method == "vpt" else []
    assert predict.main(["--checkpoint", str(whole / "checkpoint-best"), "--inputs", *map(str, images),
                         "--output", str(out), "--amp", "none", "--num_workers", "0",
                         "--no_calibrated", *extra]) == 0  # the test table's own probabilities
    import pandas as pd

    mine, theirs = pd.read_csv(out), pd.read_csv(whole / "predictions_test.csv")
    theirs = theirs.set_index(theirs["path"].map(lambda p: Path(p).name))
    for _, row in mine.iterrows():
        name = Path(row["path"]).name
        assert row["Effusion"] == pytest.approx(theirs.loc[name, "Effusion"], abs=1e-5)
    if method == "vpt":
        assert len(list((tmp_path / "maps").glob("*.png"))) == 3


def test_vpt_trains_in_two_processes_and_tests_as_one(demo, tmp_path):
    data, _ = demo
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "main_finetune_lora.py"),
           *run_args(demo, out, "vpt", "--epochs", "1", "--warmup_epochs", "0")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "config.json").read_text())
    assert record["world_size"] == record["execution"]["world_size"] == 2  # one account of it
    distributed = json.loads((out / "results_test.json").read_text())
    single = tmp_path / "single"
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "none", "--num_workers", "0", "--output_dir", str(single),
                    "--no_progress"]) == 0
    again = json.loads((single / "results_test.json").read_text())
    assert again["num_images"] == distributed["num_images"]
    assert again["mean_auroc"] == pytest.approx(distributed["mean_auroc"], abs=1e-6)


# ---------------------------------------------------------------------------------------
# Bad sizes, presets and run names
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,named", [
    (["--method", "adaptformer", "--adapter_dim", "0"], "--adapter_dim"),
    (["--method", "adaptformer", "--adapter_scale", "0"], "--adapter_scale"),
    (["--method", "adaptformer", "--adapter_scale", "inf"], "--adapter_scale"),
    (["--method", "adaptformer", "--adapter_dropout", "1"], "--adapter_dropout"),
    (["--method", "vpt", "--vpt_tokens", "0"], "--vpt_tokens"),
    (["--method", "vpt", "--vpt_dropout", "-0.1"], "--vpt_dropout"),
    (["--method", "vpt", "--vpt_depth", "middle"], "--vpt_depth"),
])
def test_bad_sizes_are_refused_in_one_line_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as exc:
        mfl.parse(["--demo", "--model", "vit_tiny_patch16", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert named in err[0] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("method", [*NEW, "dora", "ia3", "full", "linear"])
def test_the_demo_takes_any_method_and_the_default_model_follows_it(method, capsys):
    # --method alone: the demo's tiny ViT without LoRA's builder; LoRA keeps its builder.
    assert mfl.parse(["--method", method]).model == "vit_tiny_patch16"
    assert mfl.parse(["--method", "lora"]).model == "vit_tiny_patch16_lora"
    # A *_lora --model given with another method contradicts it.
    with pytest.raises(SystemExit):
        mfl.parse(["--method", method, "--model", "vit_tiny_patch16_lora"])
    assert "use --model vit_tiny_patch16" in capsys.readouterr().err


def test_a_bottleneck_wider_than_the_model_is_refused_naming_the_flag(demo, tmp_path, capsys):
    with pytest.raises(mv.ModelConfigError, match=r"--adapter_dim 193 is wider than the model's width 192"):
        build("adaptformer", AdaptFormerSettings(dim=193))
    build("adaptformer", AdaptFormerSettings(dim=192))  # as wide as the model: allowed
    with pytest.raises(SystemExit) as exc:  # with the flags, before the data is read
        mfl.cli(run_args(demo, tmp_path / "wide", "adaptformer", "--adapter_dim", "500"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("main_finetune_lora.py: error: ") and "--adapter_dim 500" in err[0]
    assert not (tmp_path / "wide").exists()  # refused before the run folder is made
    # A checkpoint JSON with a bad size names the key.
    bad = config("vpt").to_json()
    bad["method_settings"]["tokens"] = 0
    with pytest.raises(mv.ModelConfigError, match=r"method_settings: VPT prompt length .*--vpt_tokens"):
        mv.ModelConfig.from_json(bad)


@pytest.mark.parametrize("flags,message", [
    (["--method", "adaptformer", "--adapter_dim", "193"], "--adapter_dim 193 is wider than the model's width 192"),
    (["--method", "lora", "--lora_rank", "193"], "LoRA rank 193 is above the width of the layer it adapts: "
                                                 "192 in, 192 out per slice (--lora_rank)"),
    (["--method", "dora", "--lora_rank", "193", "--lora_pos", "mlp"], "LoRA rank 193 is above the width "
                                                                      "of the layer it adapts"),
])
def test_a_size_the_models_layers_cannot_take_is_refused_by_the_flag_check(demo, tmp_path, flags, message, capsys):
    # The launch scripts' --check_args (before torchrun starts, before any METHOD trains)
    # builds the model without memory: the width is the weights' (a tiny ViT, 192).
    data, weights = demo
    argv = tiny_run_args(data, weights, tmp_path / "out", "--model", "vit_tiny_patch16", *flags, seed=0)
    with pytest.raises(SystemExit) as exc:
        mfl.cli([*argv, "--check_args"])
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[0]
    assert line.startswith("main_finetune_lora.py: error: ") and message in line
    assert not (tmp_path / "out").exists()
    # At the width itself, the flags are fine.
    fine = [f.replace("193", "192") for f in flags]
    assert mfl.cli([*tiny_run_args(data, weights, tmp_path / "out", "--model", "vit_tiny_patch16", *fine,
                                   seed=0), "--check_args"]) == 0


def test_a_lora_rank_above_a_slice_width_is_refused_by_the_layer():
    base = nn.Linear(16, 3 * 8)  # a fused qkv of width 8 per slice
    lora.LoRALinear(base, rank=8, parts=(True, False, True))
    with pytest.raises(ValueError, match="LoRA rank 9 is above the width of the layer it adapts: 16 in, 8 out"):
        lora.LoRALinear(base, rank=9, parts=(True, False, True))
    with pytest.raises(ValueError, match="LoRA rank 5 is above the width of the layer it adapts: 4 in"):
        lora.LoRALinear(nn.Linear(4, 32), rank=5)


def test_the_prompt_dropout_that_ran_is_recorded_so_giving_it_is_the_same_run(demo, tmp_path):
    # No --vpt_dropout: deep prompts run with 0.1, shallow ones with 0 (the official runs).
    assert mfl.parse(["--method", "vpt"]).vpt_dropout == 0.1
    assert mfl.parse(["--method", "vpt", "--vpt_depth", "shallow"]).vpt_dropout == 0.0
    out = tmp_path / "run"
    assert mfl.cli(run_args(demo, out, "vpt", "--epochs", "1")) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["vpt_dropout"] == 0.1
    # The default given by name continues the run rather than counting as another one.
    assert mfl.cli(run_args(demo, out, "vpt", "--epochs", "2", "--resume", "auto", "--vpt_dropout", "0.1")) == 0
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["epoch"] == 1
    # An evaluation reads the checkpoint's method: another method's flags, even bad ones, are
    # only noted.
    data, _ = demo
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--num_workers", "0", "--amp", "none", "--output_dir", str(tmp_path / "eval"),
                    "--no_progress", "--lora_rank", "0"]) == 0
    assert (tmp_path / "eval" / "results_test.json").is_file()


def test_a_lora_model_and_the_plain_model_with_method_lora_are_one_run(demo, tmp_path):
    data, weights = demo
    out = tmp_path / "run"
    assert mfl.cli(tiny_run_args(data, weights, out, "--epochs", "1", seed=0)) == 0  # vit_tiny_patch16_lora
    assert json.loads((out / "config.json").read_text())["settings"]["model"] == "vit_tiny_patch16"
    again = tiny_run_args(data, weights, out, "--model", "vit_tiny_patch16", "--method", "lora",
                          "--epochs", "2", "--resume", "auto", seed=0)
    assert mfl.cli(again) == 0  # continued, not refused as another run
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["epoch"] == 1


@pytest.mark.parametrize("method", NEW)
def test_presets_keep_the_papers_schedule_with_the_methods_own_lr(method):
    m = methods.get(method)
    for name in ("nih-1-mrm", "rsna-10-cxr_mae"):
        values, source = resolve_preset(name, method, m.preset_lr)
        lora_values = PRESETS[name]
        assert "lora_rank" not in values
        for key in ("epochs", "optimizer", "warmup_epochs", "drop_path", "reprob", "data_size"):
            assert values[key] == lora_values[key], key
        if m.preset_lr is None or m.preset_lr[2] != lora_values["optimizer"]:
            assert values["lr"] == lora_values["lr"]  # its own lr is for the other optimizer
        else:
            assert values["lr"] == m.preset_lr[0] and m.preset_lr[1] in source


def test_run_names_carry_the_method_and_its_size(demo, tmp_path, vit_base_file):
    data, _ = demo
    weights = vit_base_file(tmp_path, "MRM.pth")
    names = {}
    for method, extra in (("adaptformer", ["--adapter_dim", "16"]),
                          ("vpt", ["--vpt_tokens", "32", "--vpt_depth", "shallow"]),
                          ("ssf", []), ("bitfit", [])):
        args = mfl.parse(["--data_path", str(data), "--finetune", str(weights), "--method", method,
                          "--model", "vit_base_patch16", "--preset", "nih-1-mrm", *extra])
        settings = {**{k: getattr(args, k) for k in ("dataset", "data_size", "method", "optimizer",
                                                    "lr", "epochs", "seed", "input_size")},
                    "global_batch": 64}
        names[method] = runfolder.auto_run_name(settings, weights.stem, methods.get(method).tag(
            args.method_settings))
        own = methods.get(method).preset_lr
        assert args.lr == (own[0] if own and own[2] == "sgd" else PRESETS["nih-1-mrm"]["lr"])
    assert names["adaptformer"].startswith("nih_1pct_mrm_adaptformer-d16_sgd-lr0.025-")
    assert names["vpt"].startswith("nih_1pct_mrm_vpt-shallow-p32_sgd-lr0.25-")
    assert "_ssf_sgd-lr0.05-" in names["ssf"] and "_bitfit_sgd-lr0.05-" in names["bitfit"]
    args = mfl.parse(["--data_path", str(data), "--finetune", str(weights), "--method", "vpt",
                      "--model", "vit_base_patch16", "--vpt_depth", "shallow"])
    assert args.method_settings.dropout == 0.0  # the official runs: no dropout for shallow prompts
    # Without --model the weights file gives the architecture, as the builder its method needs.
    for method, model in (("vpt", "vit_base_patch16"), ("full", "vit_base_patch16"),
                          ("lora", "vit_base_patch16_lora"), (None, "vit_base_patch16_lora")):
        flags = [] if method is None else ["--method", method]
        args = mfl.parse(["--data_path", str(data), "--finetune", str(weights), *flags])
        assert (args.model, args.method) == (model, method or "lora")


# ---------------------------------------------------------------------------------------
# Sizes at LoRA's budget on ViT-B/16 with 14 classes (the documented table)
# ---------------------------------------------------------------------------------------

LORA_TRAINABLE = {4: 159_758, 8: 307_214, 32: 1_191_950}  # FACTS.md: LoRA q, v + fc_norm + head
VIT_B_HEAD = 2 * 768 + 768 * 14 + 14


def test_documented_sizes_match_loras_budget_on_vit_b():
    doc = (ROOT / "docs" / "METHODS_MORE.md").read_text()
    sizes = {"adaptformer": (adaptformer.LORA_BUDGET_DIMS,
                             lambda d: adaptformer.trainable_count(768, 12, d)),
             "vpt": (vpt.LORA_BUDGET_TOKENS, lambda n: vpt.trainable_count(768, 12, n, "deep"))}
    for method, (table, count) in sizes.items():
        assert sorted(table) == sorted(LORA_TRAINABLE)
        for rank, size in table.items():
            ratio = (count(size) + VIT_B_HEAD) / LORA_TRAINABLE[rank]
            assert 0.85 <= ratio <= 1.15, (method, rank, size, ratio)
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{method}`"))
        assert " / ".join(f"{s:,}" for s in table.values()) in row, row
    # The fixed sizes of BitFit and SSF, by the per-block counts test_trainable_set_shapes_and_
    # gradients checks on the tiny ViT; one ViT-B/16 is built to check a count at full size.
    fixed = {"bitfit": 12 * 11 * 768 + 768 + VIT_B_HEAD, "ssf": 2 * (12 * 11 * 768 + 768) + VIT_B_HEAD}
    assert fixed == {"bitfit": 114_446, "ssf": 216_590}
    for method, count in fixed.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{method}`"))
        assert f"fixed at {count:,}" in row, row
    for method in sizes:
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{method}`"))
        table, count = sizes[method]
        assert " / ".join(f"{count(s) + VIT_B_HEAD:,}" for s in table.values()) in row, row
    mean, std = NORM_STATS["mrm"]
    cfg = mv.ModelConfig(model="vit_base_patch16", method="adaptformer",
                         class_names=[f"c{i}" for i in range(14)], img_size=224, global_pool=True,
                         norm="mrm", mean=mean, std=std, method_settings=AdaptFormerSettings(dim=8))
    assert lora.count_parameters(mv.build_model(cfg))[0] == 169_070


def test_preset_source_says_when_the_command_gives_the_lr(demo, tmp_path, vit_base_file):
    data, _ = demo
    weights = vit_base_file(tmp_path, "MRM.pth")
    base = ["--data_path", str(data), "--finetune", str(weights), "--method", "vpt",
            "--model", "vit_base_patch16", "--preset", "nih-1-mrm"]
    own = mfl.parse(base)
    given = mfl.parse([*base, "--lr", "0.01"])
    assert own.lr == 0.25 and "the command's" not in own.preset_source
    assert given.lr == 0.01 and given.preset_source.endswith("the lr is the command's (--lr)")
    # --blr alone: the lr is blr x global batch / 256, for a preset with an absolute lr too.
    mae = vit_base_file(tmp_path, "CXR_MAE.pth")
    for method, preset, file in (("vpt", "nih-1-mrm", weights), ("ia3", "nih-1-cxr_mae", mae),
                                 ("lora", "nih-1-mrm", weights)):
        flags = [*base[:2], "--finetune", str(file), "--method", method, "--model",
                 "vit_base_patch16_lora" if method == "lora" else "vit_base_patch16", "--preset", preset]
        blr = mfl.parse([*flags, "--blr", "0.01"])
        assert blr.lr == pytest.approx(0.01 * 64 / 256), method
        assert blr.preset_source.endswith("the lr is the command's (--blr)")
