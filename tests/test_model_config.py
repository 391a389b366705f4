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
                  lora=mv.LoRASpec(rank=4, alpha=32.0, dropout=0.1, pos="attn"),
                  model_kwargs={"depth": 2})
    values.update(changes)
    return mv.ModelConfig(**values)


def test_json_round_trip_keeps_unknown_keys():
    config = tiny_config(dicom_scaling="paper", backbone_in_file=False)
    obj = {**config.to_json(), "epoch": 7, "val_mean_auroc": 0.81, "run": {"seed": 3}}
    again = mv.ModelConfig.from_json(json.loads(json.dumps(obj)))
    assert again.to_json() == obj
    assert again.extras == {"epoch": 7, "val_mean_auroc": 0.81, "run": {"seed": 3}}
    assert (again.dicom_scaling, again.backbone_in_file, again.num_classes) == ("paper", False, 3)
    assert again.lora == config.lora and again["lora"]["rank"] == 4 and again.get("epoch") == 7
    assert {**again, "epoch": 8} == {**obj, "epoch": 8}
    assert obj["format"] == mv.CONFIG_FORMAT == ckpt.FORMAT


def test_lora_scaling_and_bad_fields():
    assert tiny_config().lora.scaling == 8.0
    assert tiny_config(lora={"rank": 32, "alpha": 32.0, "pos": "attn"}).lora.scaling == 1.0
    with pytest.raises(ValueError, match="method"):
        tiny_config(method="prefix")
    with pytest.raises(ValueError, match="unknown model"):
        tiny_config(model="resnet50")


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
    full = mv.build_model(tiny_config(method="full", lora=None))
    assert all(p.requires_grad for p in full.parameters())
    probe = mv.build_model(tiny_config(method="linear", lora=None))
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {
        "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def test_unbuildable_config_is_one_error():
    with pytest.raises(mv.ModelConfigError, match="model_kwargs .*'bogus'"):
        mv.build_model(tiny_config(model_kwargs={"depth": 2, "bogus": 1}))


def test_old_checkpoint_json_still_loads(tmp_path):
    """A config without the fields added later (model_kwargs aside) reads with their defaults."""
    stem, _ = trained_checkpoint(tmp_path, img_size=32)
    _, config_path = ckpt.checkpoint_paths(stem)
    obj = json.loads(config_path.read_text())
    for key in ("drop_path_rate", "eval_recipe", "dataset", "backbone_in_file"):
        obj.pop(key, None)
    obj["lora"].pop("dropout")
    config_path.write_text(json.dumps(obj))
    model, config = ckpt.load_trained(stem)
    assert isinstance(config, mv.ModelConfig)
    assert (config.eval_recipe, config.drop_path_rate, config.lora.dropout) == ("sgd", 0.0, 0.0)
    assert config["class_names"] == obj["class_names"] and not model.training


def test_lora_helper_names_and_aliases():
    assert lora.mark_only_lora_as_trainable is lora.mark_trainable
    assert lora.lora_state_dict is lora.trainable_state_dict
    model = mv.build_model(tiny_config())
    assert set(lora.trainable_state_dict(model)) == {
        n for n, p in model.named_parameters() if p.requires_grad}
