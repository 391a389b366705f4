"""Every weight file this tool writes: trained checkpoints, resume states, merged exports.

A checkpoint ``<dir>/checkpoint-best`` is two files:
- ``checkpoint-best.safetensors``: the trained tensors only (LoRA, fc_norm, head) for
  LoRA and linear probing; every tensor for full fine-tuning or when no pre-trained
  file was used (the random backbone cannot be rebuilt otherwise);
- ``checkpoint-best.json``: the model config (see ``model_config``), plain data.
``checkpoint-last`` additionally has ``checkpoint-last.state.pt``: optimizer, scheduler
position, scaler, epoch, RNG states, best metric and the run arguments, as plain data
that loads with ``torch.load(weights_only=True)``.

A merged export ``<out>`` (written by ``export.py``) is ``<out>.safetensors`` (every
tensor, LoRA folded in, timm state-dict names, fp32) and ``<out>.json`` (format
``cxr-lora-merged/1``: class names, input size, normalisation, eval recipe, the timm
model name and its keyword arguments). Anyone can load it without this repository:

    import json, timm
    from safetensors.torch import load_file
    cfg = json.load(open("nih_1_mrm_lora.json"))
    model = timm.create_model(cfg["timm_model"], pretrained=False, **cfg["timm_kwargs"])
    model.load_state_dict(load_file("nih_1_mrm_lora.safetensors"), strict=True)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

import lora
import models_vit_lora as mv
from util.io import atomic_write, file_sha256, write_json  # noqa: F401  (re-exported)
from util.cli import ToolError

logger = logging.getLogger(__name__)

FORMAT = mv.CONFIG_FORMAT
METHODS = mv.METHODS
ModelConfig = mv.ModelConfig


class CheckpointError(ToolError, ValueError):
    """A checkpoint that does not fit the model or pre-trained file it is loaded with."""



def model_config(
    *,
    model: str,
    method: str,
    class_names: list[str],
    img_size: int,
    global_pool: bool,
    norm: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pretrained: str | None,
    pretrained_sha256: str | None,
    lora_cfg: dict[str, Any] | None,
    drop_path_rate: float = 0.0,
    eval_recipe: str = "sgd",
    dataset: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ModelConfig:
    """The config stored beside every checkpoint: all that is needed to rebuild it."""
    return ModelConfig(
        model=model, method=method, class_names=list(class_names), img_size=int(img_size),
        global_pool=bool(global_pool), norm=norm, mean=mean, std=std, pretrained=pretrained,
        pretrained_sha256=pretrained_sha256,
        lora=mv.LoRASpec.from_json(lora_cfg) if lora_cfg else None,
        drop_path_rate=float(drop_path_rate), eval_recipe=eval_recipe, dataset=dataset,
        model_kwargs=dict(model_kwargs or {}))


def as_model_config(config: ModelConfig | dict[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from itself or from its JSON dict."""
    return config if isinstance(config, ModelConfig) else ModelConfig.from_json(config)


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, config) paths of a checkpoint or export given as its stem, .safetensors or .json."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


# A merged export is the same pair of files as a checkpoint.
export_paths = checkpoint_paths


def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig | dict[str, Any],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` (trained tensors, or all when needed) and ``<stem>.json``."""
    tensors_path, config_path = checkpoint_paths(path)
    model = getattr(model, "module", model)  # DDP
    config = as_model_config(config)
    # The random backbone of a run without pre-trained weights cannot be rebuilt: keep it.
    backbone_in_file = config.method == "full" or config.pretrained is None
    tensors = dict(model.state_dict()) if backbone_in_file else lora.trainable_state_dict(model)
    config = config.replace(backbone_in_file=backbone_in_file)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(tensors_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    write_json(config_path, {**config.to_json(), **(extra or {})})
    return tensors_path


# JSON types of config fields; bool never passes for int (json true is not a count).
FieldTypes = dict[str, tuple[type, ...]]
_NUMBER = (int, float)
# Fields every checkpoint config has (see ``model_config``), and fields it may have.
CONFIG_FIELDS: FieldTypes = {
    "model": (str,), "method": (str,), "num_classes": (int,), "class_names": (list,),
    "img_size": (int,), "global_pool": (bool,), "norm": (str,), "mean": (list,),
    "std": (list,), "lora": (dict, type(None)),
}
CONFIG_OPTIONAL: FieldTypes = {
    "model_kwargs": (dict,), "drop_path_rate": _NUMBER, "eval_recipe": (str,),
    "pretrained": (str, type(None)), "pretrained_sha256": (str, type(None)),
    "backbone_in_file": (bool,),
}
LORA_FIELDS: FieldTypes = {"rank": (int,), "alpha": _NUMBER, "pos": (str,)}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def field_problems(obj: dict[str, Any], required: FieldTypes,
                   optional: FieldTypes | None = None, prefix: str = "") -> list[str]:
    """What is wrong with the fields of a JSON object: missing keys and wrong types."""
    problems = [f"{prefix}{k!r} missing" for k in required if k not in obj]
    for key, types in {**(optional or {}), **required}.items():
        if key in obj and not _type_ok(obj[key], types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{prefix}{key!r} is {obj[key]!r:.40} (expected {names})")
    return problems


def read_json_object(path: Path, kind: str, error: type[Exception]) -> dict[str, Any]:
    """A JSON file holding an object; a damaged, empty or foreign file raises ``error`` naming it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        what = mv.sniff_weights_file(path).description
        raise error(f"{path}: {kind} config is not JSON text: it looks like {what}") from None
    if not text.strip():
        raise error(f"{path}: {kind} config is an empty file (an interrupted write or copy?)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: damaged {kind} config: invalid JSON ({err.msg}: line "
                    f"{err.lineno} column {err.colno}); write or copy it again") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: {kind} config must be a JSON object, found {type(obj).__name__}")
    return obj


def read_format_config(config_path: Path, expected: str, kind: str = "checkpoint",
                       error: type[Exception] | None = None, required: FieldTypes | None = None,
                       optional: FieldTypes | None = None) -> dict[str, Any]:
    """Read the JSON beside a tensors file, check its ``expected`` format and its fields."""
    error = error or CheckpointError
    if not config_path.is_file():
        raise FileNotFoundError(f"{kind} config not found: {config_path} (a {kind} is a "
                                ".safetensors file with a .json of the same name)")
    config = read_json_object(config_path, kind, error)
    if config.get("format") != expected:
        raise error(
            f"{config_path}: not a {kind} config of this tool (format "
            f"{config.get('format')!r:.60}, expected {expected!r})")
    problems = field_problems(config, required or {}, optional)
    if not problems and "class_names" in config and "num_classes" in config:
        if len(config["class_names"]) != config["num_classes"]:
            problems.append(f"{len(config['class_names'])} class_names for num_classes "
                            f"{config['num_classes']}")
    if problems:
        raise error(f"{config_path}: invalid {kind} config: {'; '.join(problems[:5])}")
    return config


def read_config(path: str | Path) -> ModelConfig:
    """The config of a checkpoint, its JSON checked for format and fields."""
    config_path = checkpoint_paths(path)[1]
    config = read_format_config(config_path, FORMAT, required=CONFIG_FIELDS,
                                optional=CONFIG_OPTIONAL)
    problems = []
    if config["model"] not in mv.ARCHS:
        problems.append(f"model {config['model']!r} is not one of {sorted(mv.ARCHS)}")
    if config["method"] not in METHODS:
        problems.append(f"method {config['method']!r} is not one of {list(METHODS)}")
    if config["num_classes"] < 1 or config["img_size"] < 1:
        problems.append(f"num_classes {config['num_classes']} and img_size "
                        f"{config['img_size']} must be positive")
    if config["lora"] is not None:
        problems += field_problems(config["lora"], LORA_FIELDS, prefix="lora ")
    if problems:
        raise CheckpointError(f"{config_path}: invalid checkpoint config: {'; '.join(problems)}")
    return ModelConfig.from_json(config)


def load_trained(
    checkpoint: str | Path,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    check_hash: bool = True,
    allow_unsafe_pickle: bool = False,
) -> tuple[nn.Module, ModelConfig]:
    """Rebuild a trained model from a checkpoint (and its pre-trained file), in eval mode.

    ``pretrained`` defaults to the path recorded in the config. The file's SHA-256 must
    equal the recorded one (``check_hash``): an adapter on other weights is meaningless.
    """
    tensors_path, _ = checkpoint_paths(checkpoint)
    config = read_config(checkpoint)
    if not tensors_path.is_file():
        raise FileNotFoundError(f"checkpoint tensors not found: {tensors_path}")
    if config.backbone_in_file:
        pretrained = None
    else:
        pretrained = pretrained or config.pretrained
        if not pretrained:
            raise CheckpointError(f"{tensors_path} holds only adapter tensors: give the "
                                  "pre-trained file it was trained on (--finetune)")
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pre-trained weights for {tensors_path} not found: "
                                    f"{pretrained} (pass the right path with --finetune)")
        if check_hash and not config.pretrained_sha256:
            logger.warning("%s records no SHA-256 of the pre-trained file it was trained on, so "
                           "%s cannot be checked to be that file: its outputs are right only if "
                           "it is", tensors_path, pretrained)
        elif check_hash:
            digest = file_sha256(pretrained)
            if digest != config.pretrained_sha256:
                raise CheckpointError(
                    f"{pretrained} is not the pre-trained file {tensors_path} was trained on "
                    f"(sha256 {digest[:12]}... != recorded {config.pretrained_sha256[:12]}...)")
    try:
        # The trained set is marked as during training: it is what the file must hold.
        model = mv.build_model(config, pretrained, allow_unsafe_pickle=allow_unsafe_pickle)
    except mv.ModelConfigError as err:
        raise CheckpointError(f"checkpoint config: {err}") from None
    load_trained_tensors(model, tensors_path, all_tensors=bool(config.backbone_in_file))
    return model.to(device).eval(), config


def load_trained_tensors(model: nn.Module, tensors_path: str | Path, all_tensors: bool = False) -> None:
    """Copy a checkpoint's tensors into ``model``, checking them against its trained set.

    Every tensor must belong to the model with the same shape and be finite; every
    trainable parameter must be in the file (with ``all_tensors``: every state-dict entry).
    """
    tensors = mv.read_safetensors(tensors_path, CheckpointError)
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"{tensors_path}: tensors the model does not have: "
                              f"{unknown[:5]} (config and tensors disagree)")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items()
           if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{tensors_path}: wrong shapes: {bad[:5]}")
    expected = set(own) if all_tensors else set(lora.trainable_state_dict(model))
    absent = sorted(expected - set(tensors))
    if absent:
        raise CheckpointError(f"{tensors_path}: missing trained tensors {absent[:5]}")
    mv.check_finite(tensors, tensors_path, CheckpointError)
    model.load_state_dict(tensors, strict=all_tensors)


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write the resume state (plain data and tensors only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """Read a resume state written by ``save_resume_state`` without executing code.

    A file that is not one (damaged, cut off, another kind) raises ``CheckpointError``.
    """
    state = mv.load_torch_file(path, CheckpointError, expected="resume state (a torch.save file)")
    if not isinstance(state, dict) or not {"optimizer", "epoch"} <= set(state):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a resume state of this tool (found {found})")
    return state


# ---------------------------------------------------------------------------------------
# Merged export: one plain timm model, LoRA folded into the backbone
# ---------------------------------------------------------------------------------------

MERGED_FORMAT = "cxr-lora-merged/1"
# Checkpoint config keys copied into the export for provenance.
_PROVENANCE = ("method", "lora", "pretrained", "pretrained_sha256", "dataset", "drop_path_rate",
               "dicom_scaling")
# Fields an export config must have for ``load_merged`` and ``predict.py`` (JSON types).
MERGED_FIELDS: FieldTypes = {
    "timm_model": (str,), "timm_kwargs": (dict,), "num_classes": (int,), "class_names": (list,),
    "img_size": (int,), "norm": (str,), "mean": (list,), "std": (list,),
}
MERGED_OPTIONAL: FieldTypes = {"eval_recipe": (str,), "model": (str,), "global_pool": (str,)}


class ExportError(ToolError, ValueError):
    """An export that cannot be written, read or does not reproduce its source model."""


def timm_model_name(model: str) -> str:
    """timm's registered name for one of our architectures ('vit_base_patch16' -> '..._224')."""
    return f"{model}_224"


def merged_config(config: ModelConfig | dict[str, Any],
                  source: str | Path | None = None) -> dict[str, Any]:
    """The export's JSON config, from a training checkpoint config."""
    config = as_model_config(config)
    global_pool = "avg" if config.global_pool else "token"
    timm_kwargs = {"num_classes": config.num_classes, "global_pool": global_pool,
                   "img_size": int(config.img_size), **config.model_kwargs}
    return {
        "format": MERGED_FORMAT,
        "model": config.model,
        "timm_model": timm_model_name(config.model),
        "timm_kwargs": timm_kwargs,
        "num_classes": config.num_classes,
        "class_names": list(config.class_names),
        "img_size": int(config.img_size),
        "global_pool": global_pool,
        "model_kwargs": dict(config.model_kwargs),
        "norm": config.norm,
        "mean": list(config.mean),
        "std": list(config.std),
        "eval_recipe": config.eval_recipe,
        "source_checkpoint": None if source is None else str(source),
        **{k: config.get(k) for k in _PROVENANCE},
    }


def export_merged(model: nn.Module, config: ModelConfig | dict[str, Any], out: str | Path,
                  source: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<out>.safetensors`` (LoRA folded in, timm names) and ``<out>.json``.

    ``model`` is left as it was (merged or not); ``config`` is its checkpoint config.
    """
    tensors_path, config_path = export_paths(out)
    model = getattr(model, "module", model)  # DDP
    state = lora.merged_state_dict(model)
    # Stored in fp32 whatever the training dtype: the file is the reference model.
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    # A model of NaNs must not leave as a file that looks like a usable model.
    mv.check_finite(tensors, f"merged model of {source or 'the checkpoint'}", ExportError)
    cfg = merged_config(config, source)
    atomic_write(tensors_path,
                 lambda tmp: save_file(tensors, tmp, metadata={"format": MERGED_FORMAT}))
    write_json(config_path, cfg)
    logger.info("exported %d tensors (%d LoRA layers merged) to %s", len(tensors),
                sum(1 for _ in lora.lora_layers(model)), tensors_path)
    return tensors_path, config_path


def read_merged_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of an export, checked for its format and fields."""
    config = read_format_config(export_paths(path)[1], MERGED_FORMAT, "merged export",
                                ExportError, required=MERGED_FIELDS, optional=MERGED_OPTIONAL)
    # Exports written before the recipe was recorded used the sgd recipe's evaluation.
    config.setdefault("eval_recipe", "sgd")
    return config


def is_merged_export(path: str | Path) -> bool:
    """True if ``path`` (stem, .safetensors or .json) has a JSON config of the export format."""
    _, config_path = export_paths(path)
    try:
        with open(config_path) as f:
            return json.load(f).get("format") == MERGED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_timm_model(config: dict[str, Any]) -> nn.Module:
    """The empty timm model an export's tensors load into with ``strict=True``."""
    import timm

    try:
        return timm.create_model(config["timm_model"], pretrained=False, **config["timm_kwargs"])
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        # timm says "Unknown model" (RuntimeError) or rejects a keyword (TypeError).
        raise ExportError(f"export config: timm cannot build {config['timm_model']!r} with "
                          f"{config['timm_kwargs']} ({err})") from None


def load_merged(path: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[nn.Module, dict[str, Any]]:
    """Load an export into a stock timm model (strict), in eval mode; returns (model, config).

    A damaged or foreign tensors file, tensors that do not fit, and NaN / inf weights
    raise ``ExportError`` naming the file.
    """
    tensors_path, _ = export_paths(path)
    config = read_merged_config(path)
    if not tensors_path.is_file():
        raise FileNotFoundError(f"export tensors not found: {tensors_path}")
    model = build_timm_model(config)
    tensors = mv.read_safetensors(tensors_path, ExportError)
    mv.check_finite(tensors, tensors_path, ExportError)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{tensors_path}: does not fit {config['timm_model']} "
                          f"{config['timm_kwargs']}: {err}") from err
    return model.to(device).eval(), config


@torch.no_grad()
def max_output_difference(reference: nn.Module, exported: nn.Module, img_size: int,
                          batch: int = 2, seed: int = 0) -> float:
    """Largest absolute logit difference of two models on the same random fp32 inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, img_size, img_size, generator=g)
    device = next(reference.parameters()).device
    a = reference.eval()(x.to(device)).float().cpu()
    b = exported.eval()(x.to(next(exported.parameters()).device)).float().cpu()
    return float((a - b).abs().max())
