"""The paper's recommended hyper-parameters for its 18 settings (3 data sets x 3 sizes x 2 weights).

A preset is named ``<dataset>-<percent>-<weights>``, e.g. ``nih-1-mrm`` or
``chexpert-10-cxr_mae``. Flags given explicitly on the command line override it.
"""
from __future__ import annotations

from typing import Any

# MRM weights: SGD, 100 epochs, absolute lr, no weight decay, no random erasing.
_MRM_COMMON = dict(optimizer="sgd", epochs=100, weight_decay=0.0, warmup_epochs=5,
                   drop_path=0.1, batch_size=64, reprob=0.0, norm="mrm")
_MRM = {  # (dataset, percent): (lr, rank)
    ("nih", 1): (0.05, 4), ("nih", 10): (0.05, 8), ("nih", 100): (0.2, 32),
    ("chexpert", 1): (0.02, 4), ("chexpert", 10): (0.05, 16), ("chexpert", 100): (0.01, 32),
    ("rsna", 1): (0.01, 4), ("rsna", 10): (0.01, 32), ("rsna", 100): (0.01, 32),
}

# CXR_MAE weights: AdamW, base lr (lr = blr * batch / 256), layer decay 0.65, RandAugment.
_MAE_COMMON = dict(optimizer="adamw", layer_decay=0.65, weight_decay=0.05, reprob=0.25,
                   aa="rand-m9-mstd0.5-inc1", batch_size=64, warmup_epochs=5, drop_path=0.1,
                   norm="cxr_mae")
_MAE = {  # (dataset, percent): (epochs, blr, rank)
    ("nih", 1): (400, 3e-3, 4), ("nih", 10): (200, 1e-3, 8), ("nih", 100): (100, 3e-3, 32),
    ("chexpert", 1): (400, 3e-3, 4), ("chexpert", 10): (100, 5e-3, 8),
    ("chexpert", 100): (100, 3e-3, 32),
    ("rsna", 1): (100, 3e-3, 4), ("rsna", 10): (100, 5e-3, 8), ("rsna", 100): (100, 5e-3, 32),
}


def _build() -> dict[str, dict[str, Any]]:
    presets = {}
    for (dataset, pct), (lr, rank) in _MRM.items():
        presets[f"{dataset}-{pct}-mrm"] = dict(_MRM_COMMON, lr=lr, lora_rank=rank,
                                               dataset=dataset, data_size=f"{pct}%")
    for (dataset, pct), (epochs, blr, rank) in _MAE.items():
        presets[f"{dataset}-{pct}-cxr_mae"] = dict(_MAE_COMMON, epochs=epochs, blr=blr, lr=None,
                                                   lora_rank=rank, dataset=dataset,
                                                   data_size=f"{pct}%")
    return presets


PRESETS: dict[str, dict[str, Any]] = _build()
