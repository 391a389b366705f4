"""Loading MRM / CXR_MAE / MAE / timm / safetensors weights into the (LoRA) ViT."""
import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

import lora
import models_vit_lora as mv
from _fakes import encoder_state, mrm_checkpoint


def plain_timm_features(enc, x, img_size=224):
    """Pooled features (mean of patch tokens + fc_norm) of a stock timm ViT."""
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=0,
                            global_pool="avg", img_size=img_size).eval()
    missing, unexpected = ref.load_state_dict(enc, strict=False)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias"}
    assert set(unexpected) == {"norm.weight", "norm.bias"}
    return ref(x)


@pytest.mark.parametrize("with_lora", [False, True])
def test_mrm_checkpoint_loads_every_encoder_key(tmp_path, with_lora):
    path = tmp_path / "MRM.pth"
    enc = mrm_checkpoint(path)
    model = mv.vit_tiny_patch16(depth=2, num_classes=14)
    if with_lora:
        lora.inject_lora(model, rank=4)
    report = mv.load_pretrained(model, path)
    assert report.format == "mae"
    encoder_keys = {k for k in enc if not k.startswith("norm.")}
    assert set(report.matched) == encoder_keys
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(report.unexpected) == {"norm.weight", "norm.bias"}
    assert any(k.startswith("bert_encoder.") for k in report.ignored)
    assert any(k.startswith("decoder_") for k in report.ignored)
    assert "mask_token" in report.ignored
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    ours = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, plain_timm_features(enc, x), atol=1e-5, rtol=1e-5)
    # The head is the fresh MAE-style one, not something from the file.
    assert model.head.weight.std() < 1e-4 and torch.count_nonzero(model.head.bias) == 0


def test_bare_timm_and_safetensors_files(tmp_path):
    enc = encoder_state()
    enc["head.weight"] = torch.randn(1000, 192)  # timm ImageNet head: other shape
    enc["head.bias"] = torch.randn(1000)
    torch.save(enc, tmp_path / "bare.pth")
    save_file(enc, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in enc.items()}}, tmp_path / "ddp.pth")
    outs = []
    for name in ("bare.pth", "w.safetensors", "ddp.pth"):
        torch.manual_seed(1)
        model = mv.vit_tiny_patch16(depth=2, num_classes=3).eval()
        report = mv.load_pretrained(model, tmp_path / name)
        assert report.head_reinitialised and report.format == "timm"
        assert len(report.matched) == len(enc) - 4  # all but head.* and norm.*
        outs.append(model.forward_features(torch.ones(1, 3, 224, 224)))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_vit_large_into_vit_base_fails_clearly():
    with torch.device("meta"):  # its shapes only
        large = mv.vit_large_patch16(num_classes=0, global_pool=False)
    state = {k: torch.empty(v.shape) for k, v in large.state_dict().items()}
    model = mv.vit_base_patch16(num_classes=14)
    before = model.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(mv.PretrainedWeightsError, match=r"wrong shape.*cls_token.*1024.*768"):
        mv.load_pretrained(model, "ViT-L.pth", state_dict=state)
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)  # nothing copied


def test_missing_backbone_keys_fail(tmp_path):
    enc = encoder_state()
    del enc["blocks.1.mlp.fc2.weight"]
    torch.save({"model": enc}, tmp_path / "partial.pth")
    with pytest.raises(mv.PretrainedWeightsError, match=r"missing.*blocks\.1\.mlp\.fc2\.weight"):
        mv.load_pretrained(mv.vit_tiny_patch16(depth=2, num_classes=2), tmp_path / "partial.pth")
    # A checkpoint of something else entirely: no weights format recognises it.
    torch.save({"model": {"conv1.weight": torch.zeros(3)}}, tmp_path / "resnet.pth")
    with pytest.raises(mv.PretrainedWeightsError,
                       match=r"resnet\.pth: its tensors \(conv1\.weight\) match no known weights "
                             r"format \(mae, timm\)"):
        mv.load_pretrained(mv.vit_tiny_patch16(depth=2, num_classes=2), tmp_path / "resnet.pth")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": encoder_state(), "payload": _Evil(marker)}, path)
    with pytest.raises(mv.PretrainedWeightsError, match=r"evil\.pth: refused to unpickle.*system"):
        mv.load_pretrained(mv.vit_tiny_patch16(depth=2, num_classes=2), path)
    assert not marker.exists()


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        mv.load_pretrained(mv.vit_tiny_patch16(depth=2), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(mv.PretrainedWeightsError, match="junk.pth"):
        mv.load_pretrained(mv.vit_tiny_patch16(depth=2), tmp_path / "junk.pth")


def test_384_input_interpolates_pos_embed(tmp_path):
    path = tmp_path / "CXR_MAE.pth"
    enc = mrm_checkpoint(path, text_branch=False)
    model = mv.vit_tiny_patch16(depth=2, num_classes=5, img_size=384).eval()
    report = mv.load_pretrained(model, path)
    assert report.pos_embed_resized == (197, 577)
    pe = model.pos_embed.detach()
    assert pe.shape == (1, 577, 192)
    torch.testing.assert_close(pe[:, 0], enc["pos_embed"][:, 0])  # cls position kept
    # Resizing back to the original grid gives (nearly) the original positions.
    back = mv.resize_pos_embed(pe, (14, 14))
    assert torch.nn.functional.cosine_similarity(
        back[0, 1:], enc["pos_embed"][0, 1:], dim=-1).mean() > 0.9
    out = model(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_numpy_scalars_in_args_are_allowed(tmp_path):
    """Training scripts often store numpy numbers in 'args' / 'epoch': plain data, allowed."""
    import argparse

    import numpy as np

    path = tmp_path / "np.pth"
    torch.save({"model": encoder_state(), "epoch": np.int64(3),
                "args": argparse.Namespace(lr=np.float64(1e-3), accum=np.float32(2.0))}, path)
    report = mv.load_pretrained(mv.vit_tiny_patch16(depth=2, num_classes=2), path)
    assert len(report.matched) == len(encoder_state()) - 2  # all but norm.* (fc_norm model)


def test_a_file_with_trained_lora_tensors_is_refused(tmp_path):
    """A fine-tuned LoRA model given as --finetune: its adapters must not vanish silently."""
    trained = mv.vit_tiny_patch16(depth=2, num_classes=14)
    lora.inject_lora(trained, rank=4)
    for _, layer in lora.lora_layers(trained):
        layer.lora_B.data.normal_()
    # Plain timm names for the backbone (as a merged or peft-style export has them) plus the factors.
    save_file({lora.canonical_name(k): v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "tuned.safetensors"))
    peft_style = {**encoder_state(), "blocks.0.attn.qkv.lora_A.default.weight": torch.zeros(4, 192)}
    torch.save(peft_style, tmp_path / "peft.pth")
    for name in ("tuned.safetensors", "peft.pth"):
        model = mv.vit_tiny_patch16(depth=2, num_classes=14)
        before = model.blocks[0].attn.qkv.weight.clone()
        with pytest.raises(mv.PretrainedWeightsError, match=r"holds trained adapter tensors.*--resume"):
            mv.load_pretrained(model, tmp_path / name)
        assert torch.equal(model.blocks[0].attn.qkv.weight, before)  # nothing copied


def test_a_checkpoint_this_tool_trained_is_refused_as_pretrained_weights(tmp_path, capsys):
    """Given as --finetune, this tool's own checkpoint (adapter-only, with .base_layer names, or
    a full fine-tune in timm's names) is named for what it is, before its shapes are read."""
    import main_finetune_lora as mfl
    from _fakes import trained_checkpoint

    stem, _ = trained_checkpoint(tmp_path / "lora", class_names=["Mass", "Nodule"], img_size=32)
    full = tmp_path / "full" / "checkpoint-best.safetensors"
    full.parent.mkdir()
    save_file(encoder_state(), str(full))
    full.with_suffix(".json").write_text(json.dumps({"format": mv.CONFIG_FORMAT, "model": "vit_tiny_patch16"}))
    for path in (stem.with_suffix(".safetensors"), full):
        assert mfl.cli(["--finetune", str(path), "--data_path", str(tmp_path), "--dataset", "nih"]) == 1
        err = capsys.readouterr().err.splitlines()[-1]  # (the file's fault, as a damaged one's)
        assert err.startswith(f"main_finetune_lora.py: error: {path} is a checkpoint this tool "
                              f"trained (checkpoint-best.json: {mv.CONFIG_FORMAT})") and "--resume" in err, err


def test_head_of_matching_shape_in_the_file_is_reinitialised(tmp_path):
    """MAE / the paper re-initialise the classifier after loading, whatever the file holds."""
    enc = encoder_state()
    enc["head.weight"] = torch.randn(14, 192)
    enc["head.bias"] = torch.randn(14)
    enc["fc_norm.weight"] = 1 + torch.rand(192)
    enc["fc_norm.bias"] = torch.rand(192)
    torch.save({"model": enc}, tmp_path / "classifier.pth")
    model = mv.vit_tiny_patch16(depth=2, num_classes=14)
    report = mv.load_pretrained(model, tmp_path / "classifier.pth")
    assert report.head_reinitialised and "head.weight" not in report.matched
    assert model.head.weight.std() < 1e-4 and torch.count_nonzero(model.head.bias) == 0
    assert torch.equal(model.fc_norm.weight, enc["fc_norm.weight"])  # the pooling norm is kept


def test_a_file_of_fewer_blocks_says_which_model_and_depth_build_it(tmp_path, capsys):
    """A 2-block ViT-S file fits no architecture as it is, but --model vit_small_patch16
    --depth 2 builds it: the refusal says so, and --depth 2 alone takes that model."""
    import main_finetune_lora as mfl

    path = tmp_path / "small_MRM.pth"
    mrm_checkpoint(path, arch="vit_small_patch16", depth=2)
    info = mv.describe_weights(path)
    assert (info.arch, info.arch_at_depth) == (None, "vit_small_patch16")
    assert "--model vit_small_patch16 --depth 2" in info.summary()
    with pytest.raises(SystemExit):
        mfl.parse(["--finetune", str(path), "--data_path", str(tmp_path), "--dataset", "nih"])
    err = capsys.readouterr().err.splitlines()[0]
    assert err.startswith("main_finetune_lora.py: error: --finetune ") and \
        err.endswith(": --model vit_small_patch16 --depth 2"), err
    args = mfl.parse(["--finetune", str(path), "--data_path", str(tmp_path), "--dataset", "nih", "--depth", "2"])
    assert (args.model, args.method, args.norm) == ("vit_small_patch16_lora", "lora", "mrm")


def test_a_librarys_generic_weights_file_is_named_by_its_folder(tmp_path, capsys):
    """Runs on rad-dino/model.safetensors and dinov2-reg/model.safetensors are told apart
    (run names, tables); a folder given as --finetune is named as a folder."""
    import main_finetune_lora as mfl
    import weights
    from util.runfolder import auto_run_name

    assert weights.weights_label("pretrained_weights/MRM.pth") == "MRM"
    assert weights.weights_label("hub/rad-dino/model.safetensors") == "rad-dino"
    assert weights.weights_label("BiomedCLIP/open_clip_pytorch_model.bin") == "BiomedCLIP"
    assert weights.weights_label("hub/models--microsoft--rad-dino/snapshots/b6af8b3f/model.safetensors") == "rad-dino"
    (tmp_path / "rad-dino").mkdir()
    inside = tmp_path / "rad-dino" / "model.safetensors"
    cwd = os.getcwd()
    try:  # the same file, however its path is spelt
        os.chdir(inside.parent)
        assert weights.weights_label("model.safetensors") == weights.weights_label(inside) == "rad-dino"
    finally:
        os.chdir(cwd)
    settings = {"dataset": "nih", "data_size": "1%", "seed": 0, "method": "lora", "optimizer": "sgd",
                "lr": 0.01, "epochs": 10, "global_batch": 64, "input_size": 224}
    names = {auto_run_name(settings, weights.weights_label(f"{m}/model.safetensors"), "r4", "")
             for m in ("rad-dino", "dinov2-reg")}
    assert len(names) == 2 and all("model" not in n for n in names)
    with pytest.raises(SystemExit):
        mfl.parse(["--finetune", str(tmp_path / "rad-dino"), "--data_path", str(tmp_path)])
    assert f"{tmp_path / 'rad-dino'} is a folder: give the file in it" in capsys.readouterr().err
