"""The fine-tuning method registry: a method is one registration, and the model assembly,
the checkpoints and the export follow it without another file knowing the list."""
import pytest
import torch
import torch.nn as nn

import checkpoints as ckpt
import methods
import models_vit_lora as mv
from _fakes import mrm_checkpoint
from datasets import NORM_STATS


class _ScaledOutput(nn.Module):
    """A toy method's module: the wrapped linear's output times (1 + s), s per channel."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.zeros(base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * (1 + self.scale)


def _inject_scales(model: nn.Module, settings: None) -> None:
    for block in model.blocks:
        block.mlp.fc2 = _ScaledOutput(block.mlp.fc2)


def _train_scales_and_head(model: nn.Module) -> None:
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if name.endswith(".scale") or name.startswith(("head.", "fc_norm.")):
            param.requires_grad_(True)


@pytest.fixture
def toy():
    method = methods.register(methods.Method(
        name="toyscale", summary="per-channel output scales of each block's fc2",
        inject=_inject_scales, mark_trainable=_train_scales_and_head,
        not_mergeable="its scales are kept as modules in this test"))
    yield method
    del methods.REGISTRY["toyscale"]


def toy_config(method="toyscale", pretrained=None, settings=None):
    mean, std = NORM_STATS["mrm"]
    return mv.ModelConfig(model="vit_tiny_patch16", method=method, class_names=["a", "b"],
                          img_size=32, global_pool=True, norm="mrm", mean=mean, std=std,
                          pretrained=pretrained, model_kwargs={"depth": 2},
                          method_settings=settings)


def test_the_built_in_methods_are_the_registry(toy):
    assert list(methods.REGISTRY)[:3] == ["lora", "full", "linear"] and "toyscale" in methods.REGISTRY
    assert methods.get("lora").settings is mv.LoRASpec and methods.get("full").settings is None
    with pytest.raises(ValueError, match="already registered"):
        methods.register(toy)


def test_a_registered_method_is_built_saved_loaded_and_refused_by_the_export(toy, tmp_path):
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    config = toy_config(pretrained=str(weights)).replace(pretrained_sha256=ckpt.file_sha256(weights))
    model = mv.build_model(config, weights)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks.0.mlp.fc2.scale", "blocks.1.mlp.fc2.scale", "fc_norm.weight",
                       "fc_norm.bias", "head.weight", "head.bias"}
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc2.scale.uniform_(-0.5, 0.5)
        model.head.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    expected = model.eval()(x)

    stem = tmp_path / "run" / "checkpoint-best"
    tensors_path = ckpt.save_checkpoint(stem, model, config)
    from safetensors.torch import load_file
    assert set(load_file(str(tensors_path))) == trained  # only what the method trains
    loaded, again = ckpt.load_trained(stem)
    assert again.method == "toyscale" and not again.backbone_in_file
    torch.testing.assert_close(loaded(x), expected)

    with pytest.raises(ckpt.ExportError, match="method 'toyscale' cannot be merged into a plain "
                                               "timm ViT: its scales are kept as modules"):
        ckpt.export_merged(loaded, again, tmp_path / "export" / "m", source=stem)
    assert not (tmp_path / "export").exists()


def test_a_checkpoint_of_an_unregistered_method_is_one_line(toy, tmp_path):
    model = mv.build_model(toy_config())
    stem = tmp_path / "checkpoint-best"
    ckpt.save_checkpoint(stem, model, toy_config())
    del methods.REGISTRY["toyscale"]
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-best\.json: invalid checkpoint "
                                                       r"config: unknown method 'toyscale'"):
            ckpt.load_trained(stem)
    finally:
        methods.REGISTRY["toyscale"] = toy


def test_a_method_brings_its_own_flags_settings_and_run_name(tmp_path):
    """A method's flags reach the entry script, its settings the checkpoint JSON, its tag the
    run folder's name, without another file knowing the method."""
    from dataclasses import dataclass

    import main_finetune_lora as mfl
    from util import cli

    @dataclass(frozen=True)
    class ToySettings:
        size: int

        def __post_init__(self):
            if self.size <= 0:
                raise methods.ModelConfigError(f"toy size must be positive (--toy_size), got {self.size}")

    methods.register(methods.Method(
        name="toysized", summary="toy", inject=lambda model, settings: None,
        mark_trainable=_train_scales_and_head, settings=ToySettings,
        from_flags=lambda values: ToySettings(values["toy_size"]),
        flags=(methods.flag("--toy_size", type=int, default=3, help="toy size"),),
        size_flag="--toy_size", tag=lambda s: f"n{s.size}"))
    try:
        with pytest.raises(ValueError, match=r"flags \['toy_size'\] are already declared"):
            methods.register(methods.Method(name="toyclash", summary="", inject=_inject_scales,
                                            mark_trainable=_train_scales_and_head,
                                            flags=(methods.flag("--toy_size"),)))
        args = mfl.parse(["--demo", "--method", "toysized", "--model", "vit_tiny_patch16",
                          "--toy_size", "5", "--run_name", "auto", "--output_dir", str(tmp_path)])
        assert args.method_settings == ToySettings(5)
        assert "toy_size" in cli.recipe_flags(mfl.get_args_parser())
        with pytest.raises(SystemExit):  # the settings' own check, as a usage error
            mfl.parse(["--demo", "--method", "toysized", "--model", "vit_tiny_patch16",
                       "--toy_size", "0"])
        config = toy_config(method="toysized", settings=ToySettings(5))
        again = mv.ModelConfig.from_json(config.to_json())
        assert again.method_settings == ToySettings(5)
        bad = config.to_json()
        bad["method_settings"] = {"size": 0}
        with pytest.raises(mv.ModelConfigError, match=r"method_settings: toy size must be positive"):
            mv.ModelConfig.from_json(bad)
    finally:
        del methods.REGISTRY["toysized"]
