"""Export a trained checkpoint as one plain timm model: LoRA merged into the backbone.

    python -m lora.export --checkpoint output/nih_1/checkpoint-best --output export/nih_1_mrm_lora

writes ``export/nih_1_mrm_lora.safetensors`` (every tensor, timm state-dict names, fp32)
and ``export/nih_1_mrm_lora.json`` (format ``cxr-lora-merged/1``: class names, input size,
normalisation, eval recipe, the timm model name and its keyword arguments). Anyone can
load it without this repository:

    import json, timm
    from safetensors.torch import load_file
    cfg = json.load(open("nih_1_mrm_lora.json"))
    model = timm.create_model(cfg["timm_model"], pretrained=False, **cfg["timm_kwargs"])
    model.load_state_dict(load_file("nih_1_mrm_lora.safetensors"), strict=True)

and ``predict.py --checkpoint export/nih_1_mrm_lora`` uses it without the pre-trained file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .model import lora_layers, merged_state_dict

logger = logging.getLogger(__name__)

MERGED_FORMAT = "cxr-lora-merged/1"
# Checkpoint config keys copied into the export for provenance.
_PROVENANCE = ("method", "lora", "pretrained", "pretrained_sha256", "dataset", "drop_path_rate",
               "dicom_scaling")
# Fields an export config must have for ``load_merged`` and ``predict.py`` (JSON types).
MERGED_FIELDS: dict[str, tuple[type, ...]] = {
    "timm_model": (str,), "timm_kwargs": (dict,), "num_classes": (int,), "class_names": (list,),
    "img_size": (int,), "norm": (str,), "mean": (list,), "std": (list,),
}
MERGED_OPTIONAL: dict[str, tuple[type, ...]] = {"eval_recipe": (str,), "model": (str,),
                                                "global_pool": (str,)}


class ExportError(ValueError):
    """An export that cannot be written, read or does not reproduce its source model."""


def export_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, config) paths of an export given as its stem, .safetensors or .json."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def timm_model_name(model: str) -> str:
    """timm's registered name for one of our architectures ('vit_base_patch16' -> '..._224')."""
    return f"{model}_224"


def merged_config(config: dict[str, Any], source: str | Path | None = None) -> dict[str, Any]:
    """The export's JSON config, from a training checkpoint config."""
    global_pool = "avg" if config["global_pool"] else "token"
    timm_kwargs = {"num_classes": int(config["num_classes"]), "global_pool": global_pool,
                   "img_size": int(config["img_size"]), **config.get("model_kwargs", {})}
    return {
        "format": MERGED_FORMAT,
        "model": config["model"],
        "timm_model": timm_model_name(config["model"]),
        "timm_kwargs": timm_kwargs,
        "num_classes": int(config["num_classes"]),
        "class_names": list(config["class_names"]),
        "img_size": int(config["img_size"]),
        "global_pool": global_pool,
        "model_kwargs": dict(config.get("model_kwargs", {})),
        "norm": config["norm"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "eval_recipe": config.get("eval_recipe", "sgd"),
        "source_checkpoint": None if source is None else str(source),
        **{k: config.get(k) for k in _PROVENANCE},
    }


def export_merged(model: nn.Module, config: dict[str, Any], out: str | Path,
                  source: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<out>.safetensors`` (LoRA folded in, timm names) and ``<out>.json``.

    ``model`` is left as it was (merged or not); ``config`` is its checkpoint config.
    """
    from safetensors.torch import save_file

    from models_vit_lora import check_finite
    from util.io import atomic_write, write_json

    tensors_path, config_path = export_paths(out)
    model = getattr(model, "module", model)  # DDP
    state = merged_state_dict(model)
    # Stored in fp32 whatever the training dtype: the file is the reference model.
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    # A model of NaNs must not leave as a file that looks like a usable model.
    check_finite(tensors, f"merged model of {source or 'the checkpoint'}", ExportError)
    cfg = merged_config(config, source)
    atomic_write(tensors_path,
                 lambda tmp: save_file(tensors, tmp, metadata={"format": MERGED_FORMAT}))
    write_json(config_path, cfg)
    logger.info("exported %d tensors (%d LoRA layers merged) to %s", len(tensors),
                sum(1 for _ in lora_layers(model)), tensors_path)
    return tensors_path, config_path


def read_merged_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of an export, checked for its format and fields."""
    from util.checkpoint import read_format_config  # util.checkpoint imports this package

    return read_format_config(export_paths(path)[1], MERGED_FORMAT, "merged export", ExportError,
                              required=MERGED_FIELDS, optional=MERGED_OPTIONAL)


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
    from models_vit_lora import check_finite, read_safetensors

    tensors_path, _ = export_paths(path)
    config = read_merged_config(path)
    if not tensors_path.is_file():
        raise FileNotFoundError(f"export tensors not found: {tensors_path}")
    model = build_timm_model(config)
    tensors = read_safetensors(tensors_path, ExportError)
    check_finite(tensors, tensors_path, ExportError)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: merge a checkpoint's LoRA into its backbone and write the export."""
    parser = argparse.ArgumentParser(
        prog="python -m lora.export",
        description="Merge a trained checkpoint (adapter + pre-trained file, or full) into one "
                    "timm-loadable .safetensors with a JSON of class names and normalisation.")
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (stem, .safetensors or .json), e.g. "
                             "output/run/checkpoint-best")
    parser.add_argument("--finetune", default=None,
                        help="pre-trained file the adapter was trained on (default: the path "
                             "recorded in the checkpoint config)")
    parser.add_argument("--output", required=True,
                        help="export stem: writes <output>.safetensors and <output>.json")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest logit difference allowed between the adapter model and "
                             "the export (checked on random inputs)")
    parser.add_argument("--no_verify", action="store_true",
                        help="skip reloading the export into timm and comparing outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from util.checkpoint import CheckpointError, load_trained

    try:
        model, config = load_trained(args.checkpoint, args.finetune, device="cpu")
    except (OSError, CheckpointError, ValueError) as err:  # damaged files, NaN weights too
        logger.error("--checkpoint %s: %s", args.checkpoint, err)
        return 2
    try:
        tensors_path, config_path = export_merged(model, config, args.output,
                                                  source=args.checkpoint)
        exported = None if args.no_verify else load_merged(tensors_path)[0]
    except ExportError as err:
        logger.error("%s", err)
        return 1
    if exported is not None:
        diff = max_output_difference(model, exported, int(config["img_size"]))
        if not diff <= args.atol:
            logger.error("%s: outputs differ from the adapter model by %.3g > --atol %.3g",
                         tensors_path, diff, args.atol)
            return 1
        logger.info("export reloaded into timm %s (strict): max logit difference %.2e",
                    config_path.name, diff)
    print(f"exported {args.checkpoint} -> {tensors_path} + {config_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
