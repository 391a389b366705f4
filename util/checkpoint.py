"""Checkpoints: small adapter files (safetensors + JSON config), resume state, reloading.

A checkpoint ``<dir>/checkpoint-best`` is two files:
- ``checkpoint-best.safetensors``: the trained tensors only (LoRA, fc_norm, head) for
  LoRA and linear probing; every tensor for full fine-tuning or when no pre-trained
  file was used (the random backbone cannot be rebuilt otherwise);
- ``checkpoint-best.json``: the model config (see ``model_config``), plain data.
``checkpoint-last`` additionally has ``checkpoint-last.state.pt``: optimizer, scheduler
position, scaler, epoch, RNG states, best metric and the run arguments, as plain data
that loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

import lora
import models_vit_lora as mv
from util.io import atomic_write, write_json  # noqa: F401  (re-exported)

FORMAT = "cxr-lora-checkpoint/1"
METHODS = ("lora", "full", "linear")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or pre-trained file it is loaded with."""


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file: ties an adapter to the exact pre-trained weights it was trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
) -> dict[str, Any]:
    """The JSON config stored beside every checkpoint: all that is needed to rebuild it."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if model not in mv.ARCHS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(mv.ARCHS)}")
    return {
        "format": FORMAT,
        "model": model,
        "method": method,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "img_size": int(img_size),
        "global_pool": bool(global_pool),
        "drop_path_rate": float(drop_path_rate),
        # Architecture overrides for the builder (e.g. {"depth": 2} in tests).
        "model_kwargs": dict(model_kwargs or {}),
        "lora": dict(lora_cfg) if lora_cfg else None,
        "norm": norm,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "eval_recipe": eval_recipe,
        "pretrained": pretrained,
        "pretrained_sha256": pretrained_sha256,
        "dataset": dataset,
    }


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, config) paths of a checkpoint given as its stem, .safetensors or .json."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_checkpoint(path: str | Path, model: nn.Module, config: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` (trained tensors, or all when needed) and ``<stem>.json``."""
    tensors_path, config_path = checkpoint_paths(path)
    model = getattr(model, "module", model)  # DDP
    if config["method"] == "full" or config["pretrained"] is None:
        tensors = {k: v for k, v in model.state_dict().items()}
        config = {**config, "backbone_in_file": True}
    else:
        tensors = lora.lora_state_dict(model)
        config = {**config, "backbone_in_file": False}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(tensors_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    write_json(config_path, {**config, **(extra or {})})
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


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a checkpoint, checked for its format and fields."""
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
    return config


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """The plain timm ViT described by a checkpoint config (no weights loaded, no LoRA)."""
    kwargs = config.get("model_kwargs", {})
    try:
        return mv.MODELS[config["model"]](
            num_classes=config["num_classes"], img_size=config["img_size"],
            global_pool=config["global_pool"], drop_path_rate=config.get("drop_path_rate", 0.0),
            **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise CheckpointError(f"checkpoint config: {config['model']} cannot be built with "
                              f"img_size {config['img_size']} and model_kwargs {kwargs} "
                              f"({err})") from None


def load_trained(
    checkpoint: str | Path,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    check_hash: bool = True,
    allow_unsafe_pickle: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint (and its pre-trained file), in eval mode.

    ``pretrained`` defaults to the path recorded in the config. The file's SHA-256 must
    equal the recorded one (``check_hash``): an adapter on other weights is meaningless.
    """
    tensors_path, _ = checkpoint_paths(checkpoint)
    config = read_config(checkpoint)
    if not tensors_path.is_file():
        raise FileNotFoundError(f"checkpoint tensors not found: {tensors_path}")
    model = build_from_config(config)
    if not config.get("backbone_in_file"):
        pretrained = pretrained or config.get("pretrained")
        if not pretrained:
            raise CheckpointError(f"{tensors_path} holds only adapter tensors: give the "
                                  "pre-trained file it was trained on (--finetune)")
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pre-trained weights for {tensors_path} not found: "
                                    f"{pretrained} (pass the right path with --finetune)")
        if check_hash and config.get("pretrained_sha256"):
            digest = file_sha256(pretrained)
            if digest != config["pretrained_sha256"]:
                raise CheckpointError(
                    f"{pretrained} is not the pre-trained file {tensors_path} was trained on "
                    f"(sha256 {digest[:12]}... != recorded {config['pretrained_sha256'][:12]}...)")
        mv.load_pretrained(model, pretrained, allow_unsafe_pickle=allow_unsafe_pickle)
    if config.get("lora"):
        cfg = config["lora"]
        lora.inject_lora(model, rank=cfg["rank"], alpha=cfg["alpha"],
                         dropout=cfg.get("dropout", 0.0), pos=cfg["pos"])
    if config["method"] == "full":
        model.requires_grad_(True)
    else:
        lora.mark_only_lora_as_trainable(model)  # the trained set, as during training
    load_trained_tensors(model, tensors_path, all_tensors=bool(config.get("backbone_in_file")))
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
    expected = set(own) if all_tensors else set(lora.lora_state_dict(model))
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
