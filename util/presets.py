"""The paper's hyper-parameters for its 18 settings (3 data sets x 3 sizes x 2 weights), per method.

A preset is named ``<dataset>-<percent>-<weights>``, e.g. ``nih-1-mrm`` or
``chexpert-10-cxr_mae``. Flags given explicitly on the command line override it.

What the paper publishes, and what is chosen here where it publishes nothing:

- LoRA (``PRESETS``): the paper's README table, all 18 settings.
- Full fine-tuning (``FULL_PRESETS``): the paper's ``ft_mrm.sh`` / ``ft_cxrmae.sh``, written
  for NIH 1% only. For the other 16 settings the paper publishes no recipe; the rule used
  here is that script's settings with the epochs of the paper's LoRA preset for the same
  setting (the paper ties epochs to data set and size only in its LoRA table, and this gives
  both methods the same number of steps).
- Every other method (``LINEAR_PRESETS`` for the linear probe, and any method of
  ``methods``): no published recipe; the rule is the paper's LoRA preset for the same setting
  without the LoRA rank (data, schedule and augmentation are the paper's), with the
  learning rate the method's own paper recommends where the method names one
  (``Method.preset_lr``, passed in as ``method_lr``).

`resolve_preset(name, method, method_lr)` returns a preset's values and a one-line
``preset_source`` saying which of these applies, for the run's config.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from util.cli import number

_ROOT = Path(__file__).resolve().parents[1]
# The built-in demo (no --data_path): a tiny ViT with a random backbone on synthetic data,
# a few CPU minutes. The benchmarks time the same setting.
DEMO_DEFAULTS: dict[str, Any] = dict(
    data_path=str(_ROOT / "demo_data"), dataset="nih", model="vit_tiny_patch16_lora",
    input_size=112, epochs=8, batch_size=32, optimizer="sgd", lr=0.3, warmup_epochs=1,
    weight_decay=0.0, reprob=0.0, norm="mrm", data_size="100%", num_workers=2,
    output_dir=str(_ROOT / "output_dir"), lora_rank=8, lora_dropout=0.0, drop_path=0.0,
)
# A demo run replaces an earlier demo run in its own default folder (output_dir/demo-<kind>)
# only; never a folder the user named, never a run that was not a demo (main_finetune_lora).
# The paper trains every setting on one GPU x 64 images; presets keep that global batch.
PAPER_GLOBAL_BATCH = 64

# MRM weights: SGD, 100 epochs, absolute lr, no weight decay, no random erasing.
_MRM_COMMON = dict(optimizer="sgd", epochs=100, weight_decay=0.0, warmup_epochs=5,
                   drop_path=0.1, batch_size=64, global_batch=PAPER_GLOBAL_BATCH, reprob=0.0,
                   norm="mrm")
_MRM = {  # (dataset, percent): (lr, rank)
    ("nih", 1): (0.05, 4), ("nih", 10): (0.05, 8), ("nih", 100): (0.2, 32),
    ("chexpert", 1): (0.02, 4), ("chexpert", 10): (0.05, 16), ("chexpert", 100): (0.01, 32),
    ("rsna", 1): (0.01, 4), ("rsna", 10): (0.01, 32), ("rsna", 100): (0.01, 32),
}

# CXR_MAE weights: AdamW, base lr (lr = blr * batch / 256), layer decay 0.65, RandAugment.
_MAE_COMMON = dict(optimizer="adamw", layer_decay=0.65, weight_decay=0.05, reprob=0.25,
                   aa="rand-m9-mstd0.5-inc1", batch_size=64, global_batch=PAPER_GLOBAL_BATCH,
                   warmup_epochs=5, drop_path=0.1, norm="cxr_mae")
_MAE = {  # (dataset, percent): (epochs, blr, rank)
    ("nih", 1): (400, 3e-3, 4), ("nih", 10): (200, 1e-3, 8), ("nih", 100): (100, 3e-3, 32),
    ("chexpert", 1): (400, 3e-3, 4), ("chexpert", 10): (100, 5e-3, 8),
    ("chexpert", 100): (100, 3e-3, 32),
    ("rsna", 1): (100, 3e-3, 4), ("rsna", 10): (100, 5e-3, 8), ("rsna", 100): (100, 5e-3, 32),
}

# Full fine-tuning as the paper's own scripts run it (both written for NIH 1%).
# ft_mrm.sh also passes --layer_decay 0.65, which SGD ignores; kept to mirror the script.
_FULL = {
    "mrm": ("ft_mrm.sh", dict(optimizer="sgd", lr=1e-2, epochs=200, warmup_epochs=5,
                              layer_decay=0.65, weight_decay=0.0, drop_path=0.1, reprob=0.0,
                              batch_size=64, global_batch=PAPER_GLOBAL_BATCH, norm="mrm")),
    "cxr_mae": ("ft_cxrmae.sh", dict(optimizer="adamw", blr=5e-4, lr=None, epochs=400,
                                     warmup_epochs=5, layer_decay=0.65, weight_decay=0.05,
                                     drop_path=0.1, reprob=0.25, aa="rand-m9-mstd0.5-inc1",
                                     batch_size=64, global_batch=PAPER_GLOBAL_BATCH,
                                     norm="cxr_mae")),
}
_FULL_PUBLISHED = ("nih", 1)  # the one setting the scripts above were written for
_WEIGHT_NAMES = {"mrm": "MRM", "cxr_mae": "CXR_MAE"}


PRESETS: dict[str, dict[str, Any]] = {
    **{f"{dataset}-{pct}-mrm": dict(_MRM_COMMON, lr=lr, lora_rank=rank, dataset=dataset,
                                    data_size=f"{pct}%")
       for (dataset, pct), (lr, rank) in _MRM.items()},
    **{f"{dataset}-{pct}-cxr_mae": dict(_MAE_COMMON, epochs=epochs, blr=blr, lr=None,
                                        lora_rank=rank, dataset=dataset, data_size=f"{pct}%")
       for (dataset, pct), (epochs, blr, rank) in _MAE.items()},
}


def _split_name(name: str) -> tuple[str, int, str]:
    dataset, pct, weights = name.split("-")
    return dataset, int(pct), weights


def _full_presets() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    presets, sources = {}, {}
    for name, lora_values in PRESETS.items():
        dataset, pct, weights = _split_name(name)
        script, recipe = _FULL[weights]
        values = dict(recipe, dataset=dataset, data_size=f"{pct}%")
        if (dataset, pct) == _FULL_PUBLISHED:
            sources[name] = f"paper {script} (NIH 1%)"
        else:
            values["epochs"] = lora_values["epochs"]
            sources[name] = (f"no published recipe: paper {script} (written for NIH 1%) with the "
                             f"epochs of the paper's LoRA preset {name} ({values['epochs']})")
        presets[name] = values
    return presets, sources


FULL_PRESETS, _FULL_SOURCES = _full_presets()

# A linear probe trains fc_norm + head only: the LoRA recipe without adapters.
LINEAR_PRESETS: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in values.items() if k != "lora_rank"} for name, values in PRESETS.items()
}


def preset_source(name: str, method: str = "lora",
                  method_lr: tuple[float, str, str] | None = None) -> str:
    """Where the preset `name` for `method` comes from, in one line (for config.json and --help)."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {sorted(PRESETS)}")
    weights = _WEIGHT_NAMES[_split_name(name)[2]]
    if method == "lora":
        return f"paper README table (LoRA, {weights} weights)"
    if method == "full":
        return _FULL_SOURCES[name]
    source = (f"no published recipe: the paper's LoRA preset {name} (README table, {weights} "
              "weights) for the data, schedule and augmentation")
    if method_lr is None:
        source += " and its lr"
    else:
        lr, origin, optimizer = method_lr
        if optimizer == PRESETS[name]["optimizer"]:
            source += f", lr {lr:g} ({origin})"
        else:
            source += (f"; its own lr {lr:g} is for {optimizer} ({origin}), this preset trains "
                       f"with {PRESETS[name]['optimizer']}: the preset's lr is kept")
    return source


def resolve_preset(name: str, method: str = "lora",
                   method_lr: tuple[float, str, str] | None = None,
                   lora_rank: bool = False) -> tuple[dict[str, Any], str]:
    """The values of preset `name` for `method` and their source.

    ``method_lr`` is (lr, its source, its optimizer) for a method whose own paper recommends
    one, applied to presets of that optimizer; LoRA and full fine-tuning take the paper's values.
    ``lora_rank``: the method is sized by LoRA's rank (DoRA), which keeps the preset's.
    """
    source = preset_source(name, method, method_lr)  # validates the name
    if method in ("lora", "full"):
        return dict({"lora": PRESETS, "full": FULL_PRESETS}[method][name]), source
    values = dict(LINEAR_PRESETS[name])
    if lora_rank:
        values["lora_rank"] = PRESETS[name]["lora_rank"]
    if method_lr is not None and method_lr[2] == values["optimizer"]:
        values["lr"] = method_lr[0]
    return values, source


def preset_help() -> str:
    """The --preset help text: what a preset fills and where each method's values come from."""
    return ("the paper's hyper-parameters for one of its 18 settings, for --method lora (paper "
            "README table), full (paper ft_mrm.sh / ft_cxrmae.sh, published for NIH 1% only; "
            "other settings use that script with the epochs of the LoRA preset) or linear (no "
            "published recipe: the LoRA preset without adapters; as for every other method, "
            "with the lr of the method's own paper where it names one); the run's config.json records "
            "the source as preset_source; explicit flags win")


def reference_script_flags(f: Callable[..., None]) -> None:
    """Add, with ``f`` (a ``util.cli.FlagTable``), the flags of the paper's scripts this tool
    does not use, so that those scripts run unchanged: the multi-label BCE recipe has no label
    smoothing, mixup or cutmix (0 is the only value), the rest are accepted and ignored."""
    zero = number(float, "the paper trains multi-label BCE without it (pass 0)", lambda v: v == 0)
    for flag in ("--smoothing", "--mixup", "--cutmix"):
        f(flag, type=zero, default=0.0, help="must be 0 (multi-label BCE)")
    for flag, kind, default in (("--color_jitter", float, None), ("--cutmix_minmax", float, None),
                                ("--mixup_prob", float, 1.0), ("--mixup_switch_prob", float, 0.5),
                                ("--mixup_mode", str, "batch")):
        f(flag, type=kind, default=default, nargs="+" if flag == "--cutmix_minmax" else None,
          help="unused")
    for flag in ("--resplit", "--from_begin", "--dist_on_itp"):
        f(flag, action="store_true", help="unused")
    f("--world_size", default=1, type=int, help="set by torchrun")
    f("--local_rank", "--local-rank", default=-1, type=int, help="set by torchrun")
    f("--dist_url", default="env://", help="unused (torchrun sets the rendezvous)")
