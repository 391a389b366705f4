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
from safetensors.torch import load_file, save_file

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


def read_format_config(config_path: Path, expected: str, kind: str = "checkpoint",
                       error: type[Exception] = None) -> dict[str, Any]:
    """Read the JSON beside a tensors file and check that it is of the ``expected`` format."""
    if not config_path.is_file():
        raise FileNotFoundError(f"{kind} config not found: {config_path} (a {kind} is a "
                                ".safetensors file with a .json of the same name)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != expected:
        raise (error or CheckpointError)(
            f"{config_path}: not a {kind} config of this tool (format "
            f"{config.get('format')!r}, expected {expected!r})")
    return config


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a checkpoint, checked for its format."""
    return read_format_config(checkpoint_paths(path)[1], FORMAT)


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """The plain timm ViT described by a checkpoint config (no weights loaded, no LoRA)."""
    return mv.MODELS[config["model"]](
        num_classes=config["num_classes"], img_size=config["img_size"],
        global_pool=config["global_pool"], drop_path_rate=config.get("drop_path_rate", 0.0),
        **config.get("model_kwargs", {}))


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

    Every tensor must belong to the model with the same shape; every trainable
    parameter must be in the file (with ``all_tensors``: every state-dict entry).
    """
    tensors = load_file(str(tensors_path), device="cpu")
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
    model.load_state_dict(tensors, strict=all_tensors)


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write the resume state (plain data and tensors only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """Read a resume state written by ``save_resume_state`` without executing code."""
    return torch.load(path, map_location="cpu", weights_only=True)
