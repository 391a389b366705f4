"""The weights-format registry: a converter registered on its own is recognised by the keys
of a file, maps them to timm's ViT, and is loaded with the loader's usual strictness."""
import pytest
import torch

import models_vit_lora as mv
import weights
from _fakes import encoder_state

PREFIX = "visual.trunk."  # open_clip's place for a timm trunk


def _recognise(keys):
    return all(k.startswith(("visual.trunk.", "visual.head.")) for k in keys)


def _to_timm(state):
    dropped = [k for k in state if not k.startswith(PREFIX)]
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}, dropped


@pytest.fixture
def toy():
    fmt = weights.register(weights.WeightsFormat(
        name="toyclip", description="a timm trunk inside a CLIP-style visual tower",
        recognise=_recognise, to_timm=_to_timm, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    yield fmt
    del weights.FORMATS["toyclip"]


def test_a_registered_converter_is_recognised_and_loaded(toy, tmp_path):
    enc = encoder_state()
    state = {PREFIX + k: v for k, v in enc.items()}
    state["visual.head.proj.weight"] = torch.randn(16, 192)  # a projection the loader drops
    torch.save({"state_dict": state}, tmp_path / "clip.pth")
    model = mv.vit_tiny_patch16(depth=2, num_classes=3).eval()
    report = mv.load_pretrained(model, tmp_path / "clip.pth")
    assert report.format == "toyclip" and "visual.head.proj.weight" in report.ignored
    assert set(report.matched) == {k for k in enc if not k.startswith("norm.")}

    plain = mv.vit_tiny_patch16(depth=2, num_classes=3).eval()
    mv.load_pretrained(plain, tmp_path / "plain.pth", state_dict=enc)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model.forward_features(x), plain.forward_features(x))


def test_a_converter_keeps_the_loaders_strictness(toy, tmp_path):
    state = {PREFIX + k: v for k, v in encoder_state().items() if k != "blocks.1.attn.proj.bias"}
    with pytest.raises(mv.PretrainedWeightsError, match=r"1 backbone tensors are missing.*"
                                                        r"blocks\.1\.attn\.proj\.bias"):
        mv.load_pretrained(mv.vit_tiny_patch16(depth=2), "clip.pth", state_dict=state)


def test_keys_two_formats_claim_are_refused_as_ambiguous(tmp_path):
    greedy = weights.register(weights.WeightsFormat(
        name="greedy", description="claims everything", recognise=lambda keys: True,
        to_timm=lambda state: (dict(state), [])))
    try:
        with pytest.raises(mv.PretrainedWeightsError,
                           match=r"x\.pth: ambiguous weights format, its keys fit timm and greedy"):
            mv.load_pretrained(mv.vit_tiny_patch16(depth=2), "x.pth", state_dict=encoder_state())
    finally:
        del weights.FORMATS[greedy.name]
