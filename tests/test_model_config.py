"""ModelConfig (typed, versioned checkpoint JSON) and the one model assembly, build_model."""
import json

import pytest
import torch

import checkpoints as ckpt
import lora
import models_vit_lora as mv
from _fakes import mrm_checkpoint, trained_checkpoint
from datasets import NORM_STATS


def tiny_config(**changes):
    mean, std = NORM_STATS["mrm"]
    values = dict(model="vit_tiny_patch16", method="lora", class_names=["a", "b", "c"],
                  img_size=32, global_pool=True, norm="mrm", mean=mean, std=std,
                  method_settings=mv.LoRASpec(rank=4, alpha=32.0, dropout=0.1, pos="attn"),
                  model_kwargs={"depth": 2})
    values.update(changes)
    return mv.ModelConfig(**values)


def test_json_round_trip_keeps_unknown_keys():
    config = tiny_config(dicom_scaling="paper", backbone_in_file=False)
    obj = {**config.to_json(), "epoch": 7, "val_mean_auroc": 0.81, "run": {"seed": 3}}
    again = mv.ModelConfig.from_json(json.loads(json.dumps(obj)))
    assert again.to_json() == obj and again == config.replace(extras=again.extras)
    assert again.extras == {"epoch": 7, "val_mean_auroc": 0.81, "run": {"seed": 3}}
    assert (again.dicom_scaling, again.backbone_in_file, again.num_classes) == ("paper", False, 3)
    assert again.method_settings == config.method_settings and again.method_settings.rank == 4
    assert obj["format"] == mv.CONFIG_FORMAT == ckpt.FORMAT and obj["num_classes"] == 3


def test_config_is_a_plain_dataclass():
    config = tiny_config()
    for access in (lambda: config["img_size"], lambda: config.get("img_size"), lambda: {**config}):
        with pytest.raises((TypeError, AttributeError)):
            access()


def test_lora_scaling_and_bad_fields():
    assert tiny_config().method_settings.scaling == 8.0
    assert tiny_config(method_settings=mv.LoRASpec(rank=32, alpha=32.0, pos="attn")).method_settings.scaling == 1.0
    with pytest.raises(mv.ModelConfigError, match="unknown method 'prefix' \\(--method\\)"):
        tiny_config(method="prefix")
    with pytest.raises(mv.ModelConfigError, match="unknown model 'resnet50' \\(--model\\)"):
        tiny_config(model="resnet50")
    with pytest.raises(mv.ModelConfigError, match="'full' takes no settings"):
        tiny_config(method="full")
    with pytest.raises(mv.ModelConfigError, match="'lora' needs its LoRASpec .*--lora_rank"):
        tiny_config(method_settings=None)


@pytest.mark.parametrize("changes, message", [
    (dict(rank=0), "LoRA rank must be a positive integer, got 0 (--lora_rank)"),
    (dict(rank=2.5), "LoRA rank must be a positive integer, got 2.5 (--lora_rank)"),
    (dict(alpha=0.0), "LoRA alpha must be positive and finite (--lora_alpha), got 0.0"),
    (dict(alpha=float("nan")), "LoRA alpha must be positive and finite (--lora_alpha), got nan"),
    (dict(alpha=float("inf")), "LoRA alpha must be positive and finite (--lora_alpha), got inf"),
    (dict(dropout=1.0), "LoRA dropout must be in [0, 1), got 1.0 (--lora_dropout)"),
    (dict(dropout=-0.1), "LoRA dropout must be in [0, 1), got -0.1 (--lora_dropout)"),
    (dict(pos="attn,foo"), "unknown lora_pos 'foo' in 'attn,foo'"),
])
def test_lora_spec_checks_its_values_naming_the_flag(changes, message):
    values = dict(rank=4, alpha=32.0, dropout=0.1, pos="attn") | changes
    with pytest.raises(mv.ModelConfigError) as info:
        mv.LoRASpec(**values)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2  # from flags: a usage error
    if "pos" in changes:
        assert str(info.value).endswith("(--lora_pos)")


def test_build_model_is_build_load_inject_freeze(tmp_path):
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    config = tiny_config()
    torch.manual_seed(0)
    built = mv.build_model(config, weights)
    torch.manual_seed(0)
    by_hand = mv.vit_tiny_patch16(num_classes=3, img_size=32, depth=2)
    mv.load_pretrained(by_hand, weights)
    lora.inject_lora(by_hand, rank=4, alpha=32.0, dropout=0.1, pos="attn")
    lora.mark_trainable(by_hand)
    trained = {n for n, p in built.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in by_hand.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and "head.weight" in trained
    assert "blocks.0.attn.qkv.base_layer.weight" not in trained
    for (name, a), b in zip(built.state_dict().items(), by_hand.state_dict().values()):
        assert torch.equal(a, b), name
    full = mv.build_model(tiny_config(method="full", method_settings=None))
    assert all(p.requires_grad for p in full.parameters())
    probe = mv.build_model(tiny_config(method="linear", method_settings=None))
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {
        "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def test_unbuildable_config_is_one_error():
    with pytest.raises(mv.ModelConfigError, match="model_kwargs .*'bogus'"):
        mv.build_model(tiny_config(model_kwargs={"depth": 2, "bogus": 1}))


def _edit_json(stem, change):
    _, config_path = ckpt.checkpoint_paths(stem)
    obj = json.loads(config_path.read_text())
    change(obj)
    config_path.write_text(json.dumps(obj))
    return config_path


@pytest.mark.parametrize("change, words", [
    (lambda o: o["model_kwargs"].update(act_layer="bogus"),
     "model_kwargs key 'act_layer' is not an architecture setting this tool knows (depth)"),
    (lambda o: o["model_kwargs"].update(depth=0),
     "model_kwargs depth 0 is not a positive integer (--depth)"),
    (lambda o: o["method_settings"].update(rank=0), "method_settings: LoRA rank must be a positive integer"),
    (lambda o: o["method_settings"].update(rnk=4), "'method_settings.rnk' is not a setting of lora"),
    (lambda o: o["method_settings"].pop("dropout"), "'method_settings.dropout' missing"),
    (lambda o: o.pop("eval_recipe"), "'eval_recipe' missing"),
    (lambda o: o.update(global_pool="avg"), "'global_pool' is 'avg' (expected bool)"),
    (lambda o: o.update(mean=[0.5, "x", 0.5]), "'mean' is [0.5, 'x', 0.5] (expected list of number)"),
    (lambda o: o.update(method="prefix_tuning"), "unknown method 'prefix_tuning'"),
    (lambda o: o.update(num_classes=3), "14 class_names for num_classes 3"),
    (lambda o: o.update(format="cxr-lora-checkpoint/3"),
     "format 'cxr-lora-checkpoint/3', expected 'cxr-lora-checkpoint/4'"),
])
def test_bad_checkpoint_json_is_one_line_naming_file_and_key(tmp_path, change, words):
    stem, _ = trained_checkpoint(tmp_path, img_size=32)
    config_path = _edit_json(stem, change)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_trained(stem)
    message = str(info.value)
    assert message.startswith(f"{config_path}: ") and words in message and "\n" not in message
    assert info.value.exit_code == 1  # a damaged file, not a usage error


def test_lora_helper_names_and_aliases():
    assert lora.mark_only_lora_as_trainable is lora.mark_trainable
    assert lora.lora_state_dict is lora.trainable_state_dict
    model = mv.build_model(tiny_config())
    assert set(lora.trainable_state_dict(model)) == {
        n for n, p in model.named_parameters() if p.requires_grad}
