"""The foundation models of weights/ against their own implementations: each original model
is built by its library with random weights in its published configuration, saved in its
published file layout, loaded here, and its features compared (fp32, to 1e-4).

transformers and open_clip look for HF's `datasets`, which our `datasets/` package shadows,
so the originals are built in one subprocess that imports them with another cwd and without
the repository on its path; it writes the files and the reference features, which this
process reads. Where a library is absent its tests skip.

Sizes: the compared models have their published layout, width and patch size with 2 of
their 12 blocks (RAD-DINO: 768 wide, patch 14, 518 px, a 37 x 37 grid; BiomedCLIP's ViT-B/16;
CheXzero's ViT-B/32) and tiny text towers (they are dropped); DINOv2 with registers is 192
wide at 224 px. The architecture a file names is checked on the full-size models as the
libraries build them (names and shapes only, on the meta device). BiomedCLIP is open_clip's
CustomTextCLIP with the timm trunk of its open_clip_config.json and an open_clip text tower
instead of PubMedBERT (which would need a download): the same `visual.*` keys and the same
`text.` / `logit_scale` prefixes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import lora
import methods
import models_vit_lora as mv
import weights
from datasets import NORM_STATS

HAVE = {lib: importlib.util.find_spec(lib) is not None for lib in ("transformers", "open_clip")}
# The original models are built once (the `originals` fixture), by one test process.
pytestmark = pytest.mark.xdist_group("foundation_models")
needs_transformers = pytest.mark.skipif(not HAVE["transformers"], reason="transformers not installed")
needs_open_clip = pytest.mark.skipif(not HAVE["open_clip"], reason="open_clip_torch not installed")
TOL = dict(atol=1e-4, rtol=1e-4)

ORIGINALS = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file

    out, libs = Path(sys.argv[1]), sys.argv[2:]
    torch.manual_seed(0)

    def perturbed(model, seed):
        """Every tensor distinct (no LayerNorm of ones), so a wrong mapping changes the output."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        return model.eval()

    def reference(folder, **tensors):
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()},
                  str(folder / "reference.safetensors"))

    shapes = {}  # full-size models as their libraries build them: names and shapes only

    def full_size(name, build):
        with torch.device("meta"):
            shapes[name] = {k: list(v.shape) for k, v in build().state_dict().items()}

    if "transformers" in libs:
        from transformers import (BitImageProcessor, Dinov2Config, Dinov2Model,
                                  Dinov2WithRegistersConfig, Dinov2WithRegistersModel)
        # microsoft/rad-dino config.json, with 2 of its 12 layers.
        rad = dict(hidden_size=768, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                   image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True,
                   hidden_act="gelu", use_swiglu_ffn=False)
        model = perturbed(Dinov2Model(Dinov2Config(num_hidden_layers=2, **rad)), 1)
        folder = out / "rad-dino"
        model.save_pretrained(folder)
        # preprocessor_config.json as published: shorter side 518 bicubic, crop 518.
        BitImageProcessor(size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518},
                          resample=3, image_mean=[0.5307] * 3,
                          image_std=[0.2583] * 3).save_pretrained(folder)
        x, small = torch.randn(1, 3, 518, 518), torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            o, o_small = model(pixel_values=x), model(pixel_values=small)
        reference(folder, x=x, tokens=o.last_hidden_state, pooled=o.pooler_output,
                  x_small=small, tokens_small=o_small.last_hidden_state)

        reg = Dinov2WithRegistersConfig(hidden_size=192, num_attention_heads=3, num_hidden_layers=2,
                                        patch_size=14, image_size=224, num_register_tokens=4)
        model = perturbed(Dinov2WithRegistersModel(reg), 2)
        folder = out / "dinov2-reg"
        model.save_pretrained(folder)
        x, small = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 112, 112)
        with torch.no_grad():
            o, o_small = model(pixel_values=x), model(pixel_values=small)
        reference(folder, x=x, tokens=o.last_hidden_state, pooled=o.pooler_output,
                  x_small=small, tokens_small=o_small.last_hidden_state)

        full_size("rad-dino", lambda: Dinov2Model(Dinov2Config(num_hidden_layers=12, **rad)))
        # A ViT-L/14 (facebook/dinov2-large's config).
        full_size("dinov2-large", lambda: Dinov2Model(Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
            image_size=518)))

    if "open_clip" in libs:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
        tiny_text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=1, layers=1)

        # BiomedCLIP's open_clip_config.json vision_cfg.
        vision = dict(timm_model_name="vit_base_patch16_224", timm_model_pretrained=False,
                      timm_pool="", timm_proj="linear", image_size=224)
        biomedclip = lambda: CustomTextCLIP(embed_dim=512, vision_cfg=CLIPVisionCfg(**vision),
                                            text_cfg=tiny_text)
        full_size("biomedclip", biomedclip)
        model = biomedclip()
        model.visual.trunk.blocks = model.visual.trunk.blocks[:2]  # 2 of its 12 blocks
        model = perturbed(model, 3)
        folder = out / "biomedclip"
        folder.mkdir()
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
        (folder / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": {"embed_dim": 512, "vision_cfg": vision},
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                               "std": [0.26862954, 0.26130258, 0.27577711]}}))
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            reference(folder, x=x, pooled=model.visual.trunk(x), projected=model.encode_image(x))

        # OpenAI's ViT-B/32 (CheXzero's clip.load("ViT-B/32")): pre-norm, QuickGELU.
        chexzero = lambda layers: CLIP(embed_dim=512, quick_gelu=True, text_cfg=tiny_text,
                                       vision_cfg=CLIPVisionCfg(layers=layers, width=768,
                                                                head_width=64, patch_size=32,
                                                                image_size=224))
        full_size("chexzero", lambda: chexzero(12))
        model = perturbed(chexzero(2), 4)
        folder = out / "chexzero"
        folder.mkdir()
        torch.save(model.state_dict(), folder / "best_64_5e-05_original_22000_0.864.pt")
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            projected = model.encode_image(x)
            model.visual.proj = None
            pooled = model.encode_image(x)
        reference(folder, x=x, pooled=pooled, projected=projected)

    (out / "full-size-shapes.json").write_text(json.dumps(shapes))
''')


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """The folder of the original models' files, one subfolder per model."""
    libs = [lib for lib, present in HAVE.items() if present]
    out = tmp_path_factory.mktemp("originals")
    if libs:
        script = out / "originals.py"
        script.write_text(ORIGINALS)
        proc = subprocess.run([sys.executable, str(script), str(out / "files"), *libs], cwd=out,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "files"


def _reference(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "reference.safetensors"))


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _loaded(info: weights.WeightsInfo, state: dict[str, torch.Tensor], arch: str | None = None,
            **overrides) -> tuple[torch.nn.Module, mv.LoadReport]:
    """The model the file's description names (or ``arch``), built and loaded as a run
    would, from the file's ``state`` (read once)."""
    options = {"img_size": info.input_size, "global_pool": info.global_pool == "avg", **overrides}
    model = mv.MODELS[arch or info.arch](num_classes=3, **options)
    return model.eval(), mv.load_pretrained(model, info.source, state_dict=state)


# ---------------------------------------------------------------------------------------
# Equality with the original implementations
# ---------------------------------------------------------------------------------------

@needs_transformers
def test_rad_dino_equals_transformers_dinov2(originals, tmp_path):
    path = originals / "rad-dino" / "model.safetensors"
    ref = _reference(path.parent)
    state = mv.extract_state_dict(mv.read_checkpoint(path), path)
    info = mv.describe_weights(path, state_dict=state)
    assert (info.format.name, info.global_pool, info.input_size, info.patch_size) == \
        ("dinov2_hf", "token", 518, 14)
    assert info.geometry.grid == (37, 37) and info.geometry.layer_scale and not info.geometry.reg_tokens
    assert info.norm == "rad_dino" and "preprocessor_config.json" in info.norm_from
    assert info.arch is None  # 2 blocks fit no architecture; its published 12 are vit_base_patch14_dinov2
    mv.check_model_fits(info, "vit_base_patch14_dinov2_lora", {"depth": 2})

    model, report = _loaded(info, state, arch="vit_base_patch14_dinov2", depth=2)
    assert report.format == "dinov2_hf" and report.ignored == ["embeddings.mask_token"]
    assert not report.unexpected and report.pos_embed_resized is None
    with torch.no_grad():
        tokens = model.forward_features(ref["x"])
    torch.testing.assert_close(tokens, ref["tokens"], **TOL)
    torch.testing.assert_close(_pooled(model, ref["x"]), ref["pooled"], **TOL)
    _equal_at_another_size(info, state, ref, "vit_base_patch14_dinov2")
    # transformers' config.json beside the file asking for another ViT: refused, naming it.
    for key, value in (("hidden_act", "quick_gelu"), ("layer_norm_eps", 1e-5)):
        other = tmp_path / key
        shutil.copytree(path.parent, other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(mv.PretrainedWeightsError) as err:
            mv.describe_weights(other / path.name)
        assert _one_line(err).startswith(f"{other / 'config.json'}: {key} {value!r} (this tool builds")
    # One tensor under both of transformers' naming schemes: which is meant is unknown.
    for old, new in (("attention.attention.query.weight", "attention.q_proj.weight"),
                     ("attention.output.dense.bias", "attention.o_proj.bias")):
        twice = {**state, f"encoder.layer.0.{new}": state[f"encoder.layer.0.{old}"]}
        with pytest.raises(mv.PretrainedWeightsError) as err:
            mv.describe_weights(path, state_dict=twice)
        assert f"encoder.layer.0.{old} and encoder.layer.0.{new} are the same tensor" in _one_line(err)

    # LoRA on the fused q/k/v: `attn` is q and v; at step 0 the features are unchanged.
    lora.inject_lora(model, rank=4, pos="attn")
    layers = dict(lora.lora_layers(model))
    assert sorted(layers) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert all(layer.parts == (True, False, True) for layer in layers.values())
    torch.testing.assert_close(_pooled(model.eval(), ref["x"]), ref["pooled"], **TOL)
    qkv = layers["blocks.0.attn.qkv"]
    with torch.no_grad():
        qkv.lora_B.normal_()
    delta = qkv.delta_weight().detach()
    q, k, v = delta.split(768)
    assert k.abs().max() == 0 and q.abs().max() > 0 and v.abs().max() > 0


@needs_transformers
def test_dinov2_with_registers_equals_transformers(originals):
    path = originals / "dinov2-reg" / "model.safetensors"
    ref = _reference(path.parent)
    state = mv.extract_state_dict(mv.read_checkpoint(path), path)
    info = mv.describe_weights(path, state_dict=state)
    g = info.geometry
    assert (g.reg_tokens, g.no_embed_class, g.grid, g.embed_dim) == (4, True, (16, 16), 192)
    # No preprocessor_config.json beside it: the format's default (RAD-DINO's) is said so.
    assert info.norm == "rad_dino" and "format" in info.norm_from
    model, report = _loaded(info, state, arch="vit_base_patch14_reg4_dinov2", depth=2,
                            embed_dim=192, num_heads=3)
    assert not report.unexpected
    with torch.no_grad():
        tokens = model.forward_features(ref["x"])
    torch.testing.assert_close(tokens, ref["tokens"], **TOL)  # cls, 4 registers, patches
    torch.testing.assert_close(_pooled(model, ref["x"]), ref["pooled"], **TOL)
    _equal_at_another_size(info, state, ref, "vit_base_patch14_reg4_dinov2", embed_dim=192, num_heads=3)


def _equal_at_another_size(info, state, ref, arch, **overrides):
    """At another input size the position table is resized as the publisher's code resizes it
    (transformers: antialiased with registers, plain bicubic without)."""
    size = ref["x_small"].shape[-1]
    model, report = _loaded(info, state, arch=arch, depth=2, img_size=size, **overrides)
    assert report.pos_embed_resized is not None
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(ref["x_small"]), ref["tokens_small"], **TOL)


@needs_open_clip
def test_biomedclip_equals_open_clip(originals):
    path = originals / "biomedclip" / "open_clip_pytorch_model.bin"
    ref = _reference(path.parent)
    state = mv.extract_state_dict(mv.read_checkpoint(path), path)
    info = mv.describe_weights(path, state_dict=state)
    assert (info.format.name, info.global_pool, info.input_size, info.geometry.depth) == \
        ("open_clip", "token", 224, 2)
    assert info.norm == "clip" and "open_clip_config.json" in info.norm_from
    model, report = _loaded(info, state, arch="vit_base_patch16", depth=2)
    assert "visual.head.proj.weight" in report.ignored and "logit_scale" in report.ignored
    assert any(k.startswith("text.") for k in report.ignored) and not report.unexpected
    pooled = _pooled(model, ref["x"])
    torch.testing.assert_close(pooled, ref["pooled"], **TOL)
    torch.testing.assert_close(pooled @ state["visual.head.proj.weight"].T, ref["projected"], **TOL)
    # A key of the image tower outside the trunk would be lost: refused, not dropped.
    with pytest.raises(mv.PretrainedWeightsError) as err:
        mv.describe_weights(path, state_dict={**state, "visual.extra_thing.weight": torch.zeros(2)})
    assert "visual.extra_thing.weight" in _one_line(err)


@needs_open_clip
def test_chexzero_equals_openai_clip(originals):
    path = originals / "chexzero" / "best_64_5e-05_original_22000_0.864.pt"
    ref = _reference(path.parent)
    state = mv.extract_state_dict(mv.read_checkpoint(path), path)
    info = mv.describe_weights(path, state_dict=state)
    assert (info.format.name, info.global_pool, info.input_size, info.patch_size) == \
        ("openai_clip", "token", 224, 32)
    assert info.norm == "chexzero" and info.geometry.pre_norm
    model, report = _loaded(info, state, arch="vit_base_patch32_clip_quickgelu", depth=2)
    assert {"visual.proj", "logit_scale", "token_embedding.weight",
            "positional_embedding"} <= set(report.ignored)
    assert not report.unexpected
    pooled = _pooled(model, ref["x"])
    torch.testing.assert_close(pooled, ref["pooled"], **TOL)
    torch.testing.assert_close(pooled @ state["visual.proj"], ref["projected"], **TOL)


def test_medical_mae_equals_timm_mae(tmp_path):
    """Medical MAE's ViT-S/16 (MAE's models_vit: timm's ViT, mean pooling + a new fc_norm),
    2 of its 12 blocks."""
    torch.manual_seed(0)
    encoder = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                global_pool="token", depth=2)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    enc = encoder.state_dict()
    pretraining = {**enc, "mask_token": torch.zeros(1, 1, 512),
                   "decoder_embed.weight": torch.randn(512, 384),
                   "decoder_pred.bias": torch.zeros(768)}
    path = tmp_path / "vit-s_CXR_0.3M_mae.pth"
    torch.save({"model": pretraining, "epoch": 799, "args": argparse.Namespace(model="mae")}, path)

    state = mv.extract_state_dict(mv.read_checkpoint(path), path)
    info = mv.describe_weights(path, state_dict=state)
    assert (info.format.name, info.global_pool, info.norm) == ("mae", "avg", None)
    model, report = _loaded(info, state, arch="vit_small_patch16", depth=2)
    assert set(report.unexpected) == {"norm.weight", "norm.bias"}  # replaced by fc_norm

    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                  global_pool="avg", depth=2).eval()
    missing, unexpected = reference.load_state_dict(enc, strict=False)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias"}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(_pooled(model, x), reference(x), **TOL)


# ---------------------------------------------------------------------------------------
# Architectures from shapes, and the files that are refused
# ---------------------------------------------------------------------------------------

def _meta_state(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """The tensors of an architecture, full size, without their memory (shapes are enough)."""
    with torch.device("meta"):
        model = mv.MODELS[arch](num_classes=0, global_pool=False, **kwargs)
    return {k: torch.empty(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(mv.ARCHS))
def test_describe_names_the_architecture_of_the_shapes(arch):
    info = mv.describe_weights(f"{arch}.pth", state_dict=_meta_state(arch))
    assert info.format.name == "timm" and info.arch == arch
    assert info.input_size == 224  # the builders' default grid
    mv.check_model_fits(info, f"{arch}_lora")
    assert weights.describe(_meta_state(arch), "x.pth").arch is None  # no architectures given


@pytest.mark.parametrize("arch,name", [("vit_small_patch16", "vit-s_CXR_0.3M_mae.pth"),
                                       ("vit_base_patch16", "vit-b_CXR_0.5M_mae.pth")])
def test_medical_mae_files_name_their_architecture(arch, name):
    state = {**_meta_state(arch), "mask_token": torch.empty(1, 1, 512),
             "decoder_embed.weight": torch.empty(512, 768)}
    info = mv.describe_weights(name, state_dict=state)
    assert (info.format.name, info.arch, info.global_pool) == ("mae", arch, "avg")
    # MRM, CXR_MAE and Medical MAE share the layout, not the statistics: --norm decides.
    assert info.norm is None and info.norm_from is None


def test_a_model_that_does_not_fit_the_file_is_refused_naming_both():
    info = mv.describe_weights("RAD.pth", state_dict=_meta_state("vit_base_patch14_dinov2"))
    with pytest.raises(weights.PretrainedWeightsError) as err:
        mv.check_model_fits(info, "vit_base_patch16_lora")
    text = _one_line(err)
    assert text.startswith("--model vit_base_patch16_lora does not fit --finetune RAD.pth")
    assert "--model vit_base_patch14_dinov2 builds it" in text and "patch: file 14, model 16" in text
    assert "layer scale: file True, model False" in text


def _full_size(originals: Path, name: str) -> dict[str, torch.Tensor]:
    """A full-size model's tensors as its library names them (their values are never read)."""
    shapes = json.loads((originals / "full-size-shapes.json").read_text())[name]
    return {k: torch.empty(v) for k, v in shapes.items()}


@pytest.mark.parametrize("name,lib,fmt,arch", [
    ("rad-dino", "transformers", "dinov2_hf", "vit_base_patch14_dinov2"),
    ("biomedclip", "open_clip", "open_clip", "vit_base_patch16"),
    ("chexzero", "open_clip", "openai_clip", "vit_base_patch32_clip_quickgelu")])
def test_the_full_size_models_name_their_architecture(originals, name, lib, fmt, arch):
    if not HAVE[lib]:
        pytest.skip(f"{lib} not installed")
    info = mv.describe_weights(f"{name}.pth", state_dict=_full_size(originals, name))
    assert (info.format.name, info.arch, info.geometry.depth) == (fmt, arch, 12)
    mv.check_model_fits(info, f"{arch}_lora")


@needs_transformers
def test_a_vit_large_file_is_refused(originals):
    state = _full_size(originals, "dinov2-large")
    info = mv.describe_weights("dinov2-large.safetensors", state_dict=state)
    assert info.arch is None and info.geometry.embed_dim == 1024 and info.geometry.depth == 24
    with pytest.raises(weights.PretrainedWeightsError) as err:
        mv.check_model_fits(info, "vit_base_patch14_dinov2")
    assert "no --model of this tool builds it" in _one_line(err)
    assert "width: file 1024, model 768; blocks: file 24, model 12" in str(err.value)
    model = mv.vit_base_patch14_dinov2(num_classes=2, depth=2)
    with pytest.raises(mv.PretrainedWeightsError, match=r"dinov2-large\.safetensors: \d+ tensors "
                                                        r"have the wrong shape") as err:
        mv.load_pretrained(model, "dinov2-large.safetensors", state_dict=state)
    _one_line(err)


@needs_transformers
@needs_open_clip
def test_truncated_files_are_refused(originals, tmp_path):
    for source in (originals / "rad-dino" / "model.safetensors",
                   originals / "biomedclip" / "open_clip_pytorch_model.bin",
                   originals / "chexzero" / "best_64_5e-05_original_22000_0.864.pt"):
        with open(source, "rb") as f:  # its first MiB: an interrupted download
            head = f.read(1 << 20)
        cut = tmp_path / source.name
        cut.write_bytes(head)
        with pytest.raises(mv.PretrainedWeightsError) as err:
            mv.load_pretrained(mv.vit_tiny_patch16(depth=1, num_classes=2), cut)
        text = _one_line(err)
        assert text.startswith(str(cut)) and ("truncated" in text or "damaged" in text), text


@needs_transformers
def test_an_ambiguous_file_is_refused(originals, tmp_path):
    """One file with two encoders (a DINOv2 in transformers' names and a timm ViT)."""
    state = {**load_file(str(originals / "rad-dino" / "model.safetensors")),
             **_meta_state("vit_tiny_patch16", depth=1)}
    with pytest.raises(mv.PretrainedWeightsError) as err:
        weights.describe(state, "two.safetensors")
    assert _one_line(err) == "two.safetensors: ambiguous weights format, its keys fit timm and dinov2_hf"


@needs_transformers
def test_an_unknown_key_of_a_converted_layout_is_refused(originals, tmp_path):
    state = load_file(str(originals / "rad-dino" / "model.safetensors"))
    state["encoder.layer.0.mlp.weights_in.weight"] = torch.zeros(8, 768)  # a SwiGLU MLP
    with pytest.raises(mv.PretrainedWeightsError) as err:
        mv.load_pretrained(mv.vit_base_patch14_dinov2(depth=2, img_size=518), "swiglu.safetensors",
                           state_dict=state)
    assert _one_line(err).startswith("swiglu.safetensors: encoder.layer.0.mlp.weights_in.weight is no")


def test_tensors_the_model_has_no_place_for_are_refused():
    state = _meta_state("vit_base_patch14_reg4_dinov2", depth=1, embed_dim=64, num_heads=1)
    model = mv.vit_base_patch14_dinov2(depth=1, embed_dim=64, num_heads=1, num_classes=2,
                                       global_pool=False)
    state = {k: torch.zeros(v.shape) for k, v in state.items()}
    state["pos_embed"] = torch.zeros(1, 257, 64)  # the table of the model: only reg_token is stray
    with pytest.raises(mv.PretrainedWeightsError) as err:
        mv.load_pretrained(model, "reg.pth", state_dict=state)
    assert "1 backbone tensors of the file have no place in the model" in _one_line(err)
    assert "reg_token" in str(err.value)


def test_pos_embed_is_interpolated_for_patch_14_registers_and_no_prefix(caplog):
    torch.manual_seed(0)
    source = mv.vit_base_patch14_reg4_dinov2(depth=1, embed_dim=64, num_heads=1, img_size=224)
    state = {k: v + 0.1 for k, v in source.state_dict().items() if not k.startswith("head.")}
    model = mv.vit_base_patch14_reg4_dinov2(depth=1, embed_dim=64, num_heads=1, img_size=112,
                                            num_classes=2)
    with caplog.at_level(logging.INFO, logger="models_vit_lora"):
        report = mv.load_pretrained(model, "reg.pth", state_dict=state)
    assert report.pos_embed_resized == (256, 64)  # patch positions only: 16x16 -> 8x8
    assert "from a 16x16 to a 8x8 patch grid" in caplog.text
    torch.testing.assert_close(model.reg_token.detach(), state["reg_token"])
    back = mv.resize_pos_embed(model.pos_embed.detach(), (16, 16), num_prefix_tokens=0)
    assert torch.nn.functional.cosine_similarity(back[0], state["pos_embed"][0], dim=-1).mean() > 0.9

    plain = mv.vit_base_patch14_dinov2(depth=1, embed_dim=64, num_heads=1, img_size=518)
    state = {k: v + 0.1 for k, v in plain.state_dict().items() if not k.startswith("head.")}
    model = mv.vit_base_patch14_dinov2(depth=1, embed_dim=64, num_heads=1, img_size=224, num_classes=2)
    report = mv.load_pretrained(model, "rad.pth", state_dict=state)
    assert report.pos_embed_resized == (1370, 257)  # 37x37 -> 16x16, the class position kept
    torch.testing.assert_close(model.pos_embed.detach()[:, 0], state["pos_embed"][:, 0])


# ---------------------------------------------------------------------------------------
# The new architectures with every method, in timm, and their statistics
# ---------------------------------------------------------------------------------------

NEW_ARCHS = ("vit_base_patch14_dinov2", "vit_base_patch14_reg4_dinov2",
             "vit_base_patch32_clip_quickgelu")


# Every method's flags at their defaults (the sizes are set small where they are used).
FLAG_DEFAULTS = {f.dest: f.options.get("default") for f in methods.all_flags()}


def _side(arch: str) -> int:
    """A small input of whole patches: a 4 x 4 grid."""
    return 4 * mv.arch_settings(arch)["patch_size"]


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_every_method_builds_trains_and_merges_on_the_new_architectures(arch, tmp_path):
    side = _side(arch)
    source = mv.MODELS[arch](depth=2, img_size=side, global_pool=False, num_classes=0)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    mean, std = NORM_STATS["clip"]
    x = torch.randn(1, 3, side, side)
    plain = mv.MODELS[arch](depth=2, img_size=side, global_pool=False, num_classes=2).eval()
    for name in methods.REGISTRY:
        method = methods.get(name)
        settings = method.from_flags({**FLAG_DEFAULTS, "lora_rank": 2, "lora_alpha": 4.0,
                                      "adapter_dim": 8, "vpt_tokens": 2})
        config = mv.ModelConfig(model=arch, method=name, class_names=["a", "b"], img_size=side,
                                global_pool=False, norm="clip", mean=mean, std=std,
                                method_settings=settings, model_kwargs={"depth": 2})
        model = mv.build_model(config, path).eval()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {"head.weight", "head.bias"} <= trainable, name
        if name == "lora":  # q and v of both blocks' fused qkv
            assert trainable - {"head.weight", "head.bias"} == {
                f"blocks.{i}.attn.qkv.lora_{m}" for i in range(2) for m in "AB"}
        model(x).sum().backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable), name
        if method.not_mergeable:
            continue
        plain.load_state_dict(method.merged_state_dict(model), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), **TOL)


@pytest.mark.parametrize("arch", sorted(mv.ARCHS))
def test_timm_builds_each_architecture_under_its_registered_name(arch):
    torch.manual_seed(0)
    side = _side(arch)
    ours = mv.MODELS[arch](depth=1, num_classes=3, img_size=side, global_pool=False).eval()
    theirs = timm.create_model(mv.TIMM_NAMES[arch], pretrained=False, depth=1, num_classes=3,
                               img_size=side, global_pool="token").eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=1e-6)


def test_each_format_names_statistics_of_the_norm_table():
    for fmt in weights.FORMATS.values():
        assert fmt.norm is None or fmt.norm in NORM_STATS, fmt.name
    assert NORM_STATS["chexzero"][0][0] * 255 == pytest.approx(101.48761)
    assert weights.FORMATS["openai_clip"].arch_settings["act_layer"] == "quick_gelu"


def test_a_file_of_no_format_is_told_every_layout():
    with pytest.raises(mv.PretrainedWeightsError) as err:
        weights.detect({"conv1.weight": torch.zeros(3)}, "resnet.pth")
    assert _one_line(err).endswith(
        "match no known weights format (mae, timm) nor the layouts of transformers (dinov2_hf), "
        "open_clip (open_clip), OpenAI CLIP (openai_clip): is it a ViT checkpoint?")


@needs_transformers
def test_the_entry_script_takes_model_size_norm_and_pooling_from_the_file(originals, tmp_path, capsys):
    """A RAD-DINO file and nothing else set: the file's architecture, 518 px, its statistics
    and cls-token pooling; a --model of another architecture is refused naming both."""
    import main_finetune_lora as mfl

    path = tmp_path / "rad-dino.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in _full_size(originals, "rad-dino").items()},
              str(path))
    args = mfl.parse(["--finetune", str(path), "--data_path", str(tmp_path), "--dataset", "nih"])
    assert (args.model, args.method, args.input_size) == ("vit_base_patch14_dinov2_lora", "lora", 518)
    assert args.norm == "rad_dino" and args.global_pool is False
    assert args.method_settings.pos == "attn"  # q and v of the fused qkv
    given = mfl.parse(["--finetune", str(path), "--data_path", str(tmp_path), "--dataset", "nih",
                       "--input_size", "224", "--method", "full"])
    assert (given.model, given.input_size) == ("vit_base_patch14_dinov2", 224)
    assert given.global_pool is False and mfl.parse(  # the weights' pooling, or the mean if asked
        ["--finetune", str(path), "--data_path", str(tmp_path), "--dataset", "nih", "--mean_pool"]).global_pool is True
    with pytest.raises(SystemExit) as exc:
        mfl.parse(["--finetune", str(path), "--data_path", str(tmp_path), "--model",
                   "vit_base_patch16_lora"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert "vit_base_patch16" in err and "14" in err
    # Statistics from the publisher's config that no --norm name has: shown, with what to do.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                   "image_std": [0.25] * 3}))
    with pytest.raises(SystemExit):
        mfl.parse(["--finetune", str(path), "--data_path", str(tmp_path), "--dataset", "nih"])
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert err.startswith(f"main_finetune_lora.py: error: --norm: cannot tell the normalisation of {path} "
                          "(mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25) from preprocessor_config.json")
    assert "add them to NORM_STATS" in err
