"""Every weight file this tool writes: trained checkpoints, resume states, merged exports.

A checkpoint ``<dir>/checkpoint-best`` is two files:
- ``checkpoint-best.safetensors``: the trained tensors only (LoRA, fc_norm, head) for
  LoRA and linear probing; every tensor for full fine-tuning or when no pre-trained
  file was used (the random backbone cannot be rebuilt otherwise);
- ``checkpoint-best.json``: the model config (``models_vit_lora.ModelConfig``), plain data;
  after the final test of its run also a ``calibration`` section (``StoredCalibration``):
  the temperature and the operating-point thresholds fitted on the validation split, which
  ``--eval`` reports and ``predict.py`` applies (a merged export carries it over).
``checkpoint-last`` additionally has ``checkpoint-last.state.pt``: optimizer, scheduler
position, scaler, epoch, RNG states, best metric and the run arguments, as plain data
that loads with ``torch.load(weights_only=True)``.

A merged export ``<out>`` (written by ``export.py``) is ``<out>.safetensors`` (every
tensor, LoRA folded in, timm state-dict names, fp32) and ``<out>.json`` (format
``MERGED_FORMAT``: the checkpoint's model config with the timm model name and its keyword
arguments beside it). Anyone can load it without this repository:

    import json, timm
    from safetensors.torch import load_file
    cfg = json.load(open("nih_1_mrm_lora.json"))
    model = timm.create_model(cfg["timm_model"], pretrained=False, **cfg["timm_kwargs"])
    model.load_state_dict(load_file("nih_1_mrm_lora.safetensors"), strict=True)
"""
from __future__ import annotations

import errno
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import save_file

import lora
import methods
import models_vit_lora as mv
from util.cli import EXIT_USAGE, ToolError
from util.io import OutputError, atomic_write, file_sha256, write_json  # noqa: F401  (re-exported)
from util.runfolder import RunFolder

logger = logging.getLogger(__name__)

FORMAT = mv.CONFIG_FORMAT
ModelConfig = mv.ModelConfig


class CheckpointError(ToolError, ValueError):
    """A checkpoint that does not fit the model or pre-trained file it is loaded with."""


def model_config(*, method_settings: dict[str, Any] | None = None, **fields: Any) -> ModelConfig:
    """A ``ModelConfig`` whose method settings are given as their JSON object."""
    settings = methods.get(fields["method"]).settings
    return ModelConfig(method_settings=settings(**method_settings) if method_settings else None,
                       **fields)


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, config) paths of a checkpoint or export given as its stem, .safetensors or .json."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a command that uses a trained model (predict, export) reads: a run
    folder stands for its ``checkpoint-best``; any other path is the checkpoint itself."""
    path = Path(path)
    return path / "checkpoint-best" if path.is_dir() else path


# A merged export is the same pair of files as a checkpoint.
export_paths = checkpoint_paths


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], file_format: str) -> None:
    """Atomically write a safetensors file; a failed write (a full disk) raises ``OutputError``
    naming ``path`` and leaves an earlier file there as it was."""
    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata={"format": file_format})
        except SafetensorError as err:  # the Rust writer reports I/O errors as its own
            code = errno.ENOSPC if "os error 28" in str(err) else errno.EIO
            raise OSError(code, str(err)) from err

    atomic_write(path, write)


def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` (trained tensors, or all when needed) and ``<stem>.json``."""
    tensors_path, config_path = checkpoint_paths(path)
    model = getattr(model, "module", model)  # DDP
    # A method that trains every parameter, and a random backbone (no pre-trained file),
    # cannot be rebuilt from the pre-trained file: the file holds every tensor then.
    backbone_in_file = config.pretrained is None or all(p.requires_grad for p in model.parameters())
    tensors = dict(model.state_dict()) if backbone_in_file else lora.trainable_state_dict(model)
    config = config.replace(backbone_in_file=backbone_in_file)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _write_safetensors(tensors_path, tensors, FORMAT)
    write_json(config_path, {**config.to_json(), **(extra or {})})
    return tensors_path


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


def read_model_config(config_path: Path, expected: str, kind: str,
                      error: type[Exception]) -> ModelConfig:
    """The ``ModelConfig`` of the JSON beside a tensors file, of format ``expected``; every
    problem raises ``error`` in one line naming the file (and the keys at fault)."""
    if not config_path.is_file():
        raise FileNotFoundError(f"{kind} config not found: {config_path} (a {kind} is a "
                                ".safetensors file with a .json of the same name)")
    obj = read_json_object(config_path, kind, error)
    if obj.get("format") != expected:
        raise error(f"{config_path}: not a {kind} config of this version of the tool (format "
                    f"{obj.get('format')!r:.60}, expected {expected!r})")
    try:
        return ModelConfig.from_json(obj)
    except mv.ModelConfigError as err:
        raise error(f"{config_path}: invalid {kind} config: {err}") from None


def check_committed(*paths: Path) -> None:
    """Raise ``CheckpointError`` for a file of a run folder that differs from what the
    folder's commit record says the run wrote (edited or replaced after the commit)."""
    for path in paths:
        record = RunFolder(path.parent).read_commit()
        digest = (record or {}).get("files", {}).get(path.name)
        if digest is not None and file_sha256(path) != digest:
            raise CheckpointError(
                f"{path} changed after its run committed it (sha256 differs from "
                f"{path.parent / 'commit.json'}): its outputs would not be the run's; restore "
                "the file or train again")


def read_config(path: str | Path) -> ModelConfig:
    """The config of a checkpoint: format, fields and values checked, and, in a run folder,
    the file checked to be the one the run committed."""
    config_path = checkpoint_paths(path)[1]
    config = read_model_config(config_path, FORMAT, "checkpoint", CheckpointError)
    check_committed(config_path)
    return config


# ---------------------------------------------------------------------------------------
# Calibration: the temperature and operating-point thresholds stored in a checkpoint JSON
# ---------------------------------------------------------------------------------------

CALIBRATION_KEY = "calibration"
CALIBRATION_FORMAT = "cxr-lora-calibration/1"


@dataclass(frozen=True)
class StoredCalibration:
    """The ``calibration`` section of a checkpoint (or export) JSON, fitted on a validation
    split by the final test of the checkpoint's run (``evaluation.test_checkpoint``).

    ``temperature``: {class: T}, probabilities sigmoid(logit / T) (``util.calibration``;
    ``method`` "temperature": one T shared by every class, "class_temperature": one per
    class). ``thresholds``: {kind: {class: {"logit", "sensitivity", "specificity"}}} for
    each kind of ``util.operating_points.THRESHOLD_KINDS``, on the model's logits (a class
    without one: ``logit`` null and a ``note``), with the sensitivity and specificity they
    reached on validation. ``fitted_on``: the calibration split (file, SHA-256, images) and
    its BCE before and after.
    """

    method: str
    temperature: dict[str, float]
    thresholds: dict[str, dict[str, dict[str, Any]]]
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def temperatures(self, class_names: Sequence[str]) -> np.ndarray:
        """The temperatures in ``class_names``' order."""
        return np.array([self.temperature[n] for n in class_names], dtype=np.float64)

    def threshold_logits(self, kind: str, class_names: Sequence[str]) -> np.ndarray:
        """One kind's thresholds on the logit scale, NaN for a class without one."""
        per_class = self.thresholds[kind]
        return np.array([np.nan if per_class[n].get("logit") is None else per_class[n]["logit"]
                         for n in class_names], dtype=np.float64)

    def threshold_probabilities(self, kind: str, class_names: Sequence[str], *,
                                calibrated: bool) -> np.ndarray:
        """One kind's thresholds on the probability scale the caller writes (calibrated or
        the model's own), NaN for a class without one."""
        from scipy.special import expit

        logits = self.threshold_logits(kind, class_names)
        return expit(logits / self.temperatures(class_names) if calibrated else logits)

    def to_json(self) -> dict[str, Any]:
        """The section as written into the checkpoint JSON."""
        return {"format": CALIBRATION_FORMAT, "method": self.method,
                "temperature": dict(self.temperature), "thresholds": self.thresholds,
                "fitted_on": self.fitted_on}

    @classmethod
    def from_json(cls, obj: Any, class_names: Sequence[str]) -> "StoredCalibration":
        """Read a section, checked against the model's classes; a ValueError says what is wrong."""
        from util.calibration import METHODS
        from util.operating_points import THRESHOLD_KINDS

        if not isinstance(obj, dict) or obj.get("format") != CALIBRATION_FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"'{CALIBRATION_KEY}' is of format {found!r:.60}, this tool reads "
                             f"{CALIBRATION_FORMAT!r}")
        method, temperature, thresholds = obj.get("method"), obj.get("temperature"), obj.get("thresholds")
        if method not in METHODS:
            raise ValueError(f"'{CALIBRATION_KEY}.method' {method!r:.40} is not one of {METHODS}")
        names = list(class_names)
        if not isinstance(temperature, dict) or sorted(temperature) != sorted(names) or not all(
                _number(t) and t > 0 for t in temperature.values()):
            raise ValueError(f"'{CALIBRATION_KEY}.temperature' must give a positive number for "
                             f"each of the classes {names}")
        if not isinstance(thresholds, dict) or sorted(thresholds) != sorted(THRESHOLD_KINDS):
            raise ValueError(f"'{CALIBRATION_KEY}.thresholds' must hold the kinds {THRESHOLD_KINDS}")
        for kind, per_class in thresholds.items():
            if not isinstance(per_class, dict) or sorted(per_class) != sorted(names) or not all(
                    isinstance(t, dict) and (t.get("logit") is None or _number(t["logit"]))
                    for t in per_class.values()):
                raise ValueError(f"'{CALIBRATION_KEY}.thresholds.{kind}' must give a 'logit' "
                                 f"(a number or null) for each of the classes {names}")
        fitted_on = obj.get("fitted_on") or {}
        return cls(method=method, temperature={n: float(temperature[n]) for n in names},
                   thresholds=thresholds, fitted_on=fitted_on if isinstance(fitted_on, dict) else {})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_calibration(config: ModelConfig, path: str | Path) -> StoredCalibration | None:
    """The calibration stored in the JSON of checkpoint or export ``path`` (its ``config``),
    or None; a damaged section raises ``CheckpointError`` naming the file."""
    section = config.extras.get(CALIBRATION_KEY)
    if section is None:
        return None
    try:
        return StoredCalibration.from_json(section, config.class_names)
    except ValueError as err:
        raise CheckpointError(f"{checkpoint_paths(path)[1]}: {err}") from None


def store_calibration(checkpoint: str | Path, calibration: StoredCalibration,
                      folder: RunFolder) -> Path:
    """Write ``calibration`` as the ``calibration`` section of the checkpoint's JSON (an
    earlier one is replaced); returns the JSON's path.

    The JSON is one of the files a run's ``commit.json`` names with its SHA-256: there the
    new JSON becomes a new commit of the same epoch and log through ``folder``, which must
    be the checkpoint's own run folder, locked by this process (the final test of its run),
    so that every committed file still matches its record and a kill leaves the old or the
    new JSON, never a mix. A checkpoint no commit names (one copied out of its run) is
    rewritten in place, atomically.
    """
    _, config_path = checkpoint_paths(checkpoint)
    obj = read_json_object(config_path, "checkpoint", CheckpointError)
    obj[CALIBRATION_KEY] = calibration.to_json()
    owner = RunFolder(config_path.parent)
    record = owner.read_commit()
    if record is None or config_path.name not in record.get("files", {}):
        write_json(config_path, obj)
        return config_path
    if folder.folder != owner.folder or not folder.lock.held:
        raise CheckpointError(f"{config_path} is a committed file of the run in {owner.folder}: "
                              "only that run, holding its folder's lock, stores a calibration "
                              "in it (its final test)")
    folder.commit(record["epoch"], lambda pending: write_json(pending / config_path.name, obj),
                  record["log"])
    return config_path


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
    In a run folder, both checkpoint files must be the ones its ``commit.json`` names.
    """
    tensors_path, _ = checkpoint_paths(checkpoint)
    config = read_config(checkpoint)
    if not tensors_path.is_file():
        raise FileNotFoundError(f"checkpoint tensors not found: {tensors_path}")
    check_committed(tensors_path)
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
    """Atomically write the resume state (plain data and tensors only); a failed write (a
    full disk) raises ``OutputError`` naming ``path`` and leaves an earlier state as it was."""
    def write(tmp: str) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a short write as "[enforce fail at
            # inline_container.cc:...] . unexpected pos ...": the disk filled up.
            if "inline_container" not in str(err):
                raise
            raise OSError(errno.ENOSPC, str(err)) from err

    atomic_write(path, write)


# What a resume state that is not plain data is told (--unsafe_load reads pre-trained files
# only: this tool never writes such a state, so there is nothing to unlock).
_FOREIGN_STATE = ("The resume states this tool writes hold only tensors and plain data, so this "
                  "one was not written by it: resume from a run you trust, or start the run again.")


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """Read a resume state written by ``save_resume_state`` without executing code.

    A file that is not one (damaged, cut off, another kind, objects beyond plain data)
    raises ``CheckpointError``.
    """
    state = mv.load_torch_file(path, CheckpointError, expected="resume state (a torch.save file)",
                               refused_advice=_FOREIGN_STATE)
    if not isinstance(state, dict) or not {"optimizer", "epoch"} <= set(state):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a resume state of this tool (found {found})")
    return state


# ---------------------------------------------------------------------------------------
# Merged export: one plain timm model, the method folded into the backbone
# ---------------------------------------------------------------------------------------

MERGED_FORMAT = "cxr-lora-merged/4"


class ExportError(ToolError, ValueError):
    """An export that cannot be written, read or does not reproduce its source model."""


class NotMergeableError(ExportError):
    """A checkpoint of a method that has no plain timm form: a usage error (exit 2)."""

    exit_code = EXIT_USAGE


def merged_config(config: ModelConfig, source: str | Path | None = None) -> dict[str, Any]:
    """The export's JSON: the checkpoint's config (with every tensor in the file) and what
    timm needs to build the model (``timm_model``, ``timm_kwargs``)."""
    timm_kwargs = {"num_classes": config.num_classes,
                   "global_pool": "avg" if config.global_pool else "token",
                   "img_size": config.img_size, **config.model_kwargs}
    return {**config.replace(backbone_in_file=True).to_json(), "format": MERGED_FORMAT,
            "timm_model": mv.TIMM_NAMES[config.model], "timm_kwargs": timm_kwargs,
            "source_checkpoint": None if source is None else str(source)}


def check_mergeable(config: ModelConfig, source: str | Path | None = None) -> methods.Method:
    """The method of ``config``; ``NotMergeableError`` with its reason when it cannot become a
    plain timm ViT."""
    method = methods.get(config.method)
    if method.not_mergeable:
        raise NotMergeableError(f"{source or 'the checkpoint'}: method {method.name!r} cannot be "
                                f"merged into a plain timm ViT: {method.not_mergeable}")
    return method


def export_merged(model: nn.Module, config: ModelConfig, out: str | Path,
                  source: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<out>.safetensors`` (the method folded in, timm names) and ``<out>.json``.

    ``model`` is left as it was (merged or not); ``config`` is its checkpoint config. A
    method that cannot be merged raises ``NotMergeableError`` with its reason.
    """
    method = check_mergeable(config, source)
    tensors_path, config_path = export_paths(out)
    model = getattr(model, "module", model)  # DDP
    state = method.merged_state_dict(model)
    # Stored in fp32 whatever the training dtype: the file is the reference model.
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    # A model of NaNs must not leave as a file that looks like a usable model.
    mv.check_finite(tensors, f"merged model of {source or 'the checkpoint'}", ExportError)
    _write_safetensors(tensors_path, tensors, MERGED_FORMAT)
    write_json(config_path, merged_config(config, source))
    logger.info("exported %d tensors (method %s merged) to %s", len(tensors), method.name,
                tensors_path)
    return tensors_path, config_path


def read_merged_config(path: str | Path) -> ModelConfig:
    """The config of an export, checked for its format, fields and timm model."""
    config_path = export_paths(path)[1]
    config = read_model_config(config_path, MERGED_FORMAT, "merged export", ExportError)
    timm_model, timm_kwargs = config.extras.get("timm_model"), config.extras.get("timm_kwargs")
    if not isinstance(timm_model, str) or not isinstance(timm_kwargs, dict):
        raise ExportError(f"{config_path}: invalid merged export config: 'timm_model' "
                          f"{timm_model!r:.40} and 'timm_kwargs' {timm_kwargs!r:.40} must be a "
                          "string and an object")
    return config


def is_merged_export(path: str | Path) -> bool:
    """True if ``path`` (stem, .safetensors or .json) has a JSON config of an export format
    (of any version: ``read_merged_config`` refuses another one, naming both)."""
    _, config_path = export_paths(path)
    try:
        with open(config_path) as f:
            return str(json.load(f).get("format")).startswith(MERGED_FORMAT.split("/")[0] + "/")
    except (OSError, ValueError, AttributeError):
        return False


def load_merged(path: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[nn.Module, ModelConfig]:
    """Load an export into a stock timm model (strict), in eval mode; returns (model, config).

    A damaged or foreign tensors file, tensors that do not fit, and NaN / inf weights
    raise ``ExportError`` naming the file.
    """
    tensors_path, _ = export_paths(path)
    config = read_merged_config(path)
    if not tensors_path.is_file():
        raise FileNotFoundError(f"export tensors not found: {tensors_path}")
    timm_model, timm_kwargs = config.extras["timm_model"], config.extras["timm_kwargs"]
    try:
        model = timm.create_model(timm_model, pretrained=False, **timm_kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError) as err:
        # timm says "Unknown model" (RuntimeError) or rejects a keyword (TypeError).
        raise ExportError(f"export config: timm cannot build {timm_model!r} with "
                          f"{timm_kwargs} ({err})") from None
    tensors = mv.read_safetensors(tensors_path, ExportError)
    mv.check_finite(tensors, tensors_path, ExportError)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{tensors_path}: does not fit {timm_model} {timm_kwargs}: "
                          f"{err}") from err
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
