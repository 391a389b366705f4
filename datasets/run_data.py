"""The data of one training run: its three splits, checked against each other, and the loaders.

    data = training_data("data/NIH", dataset="nih", data_size="1%", train_transform=...,
                         eval_transform=..., batch_size=64, eval_batch_size=256)

Every split file is read and every evaluation image's header opened here, before a run
writes anything: a bad validation or test image must not surface after hours of training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from util.misc import DistInfo

from .chestxray import ChestXrayDataset, build_dataset
from .errors import DataError, DataUsageError
from .loader import build_loader
from .splits import check_split_overlap

logger = logging.getLogger(__name__)


def undefined_classes(targets: np.ndarray, class_names: list[str]) -> list[str]:
    """Classes with a single label value in ``targets``: they have no AUROC."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return list(class_names)
    return [n for k, n in enumerate(class_names) if targets[:, k].min() == targets[:, k].max()]


@dataclass
class TrainingData:
    """The splits and loaders of a training run."""

    train_set: ChestXrayDataset
    val_set: ChestXrayDataset
    test_set: ChestXrayDataset
    train_loader: Any
    val_loader: Any
    # Validation classes without an AUROC: model selection averages over the others.
    val_undefined: list[str]

    @property
    def class_names(self) -> list[str]:
        return list(self.train_set.class_names)

    @property
    def cache_used(self) -> dict[str, dict]:
        """Which image cache each split read (recorded once, in config.json)."""
        return {"train": self.train_set.cache_info, "val": self.val_set.cache_info,
                "test": self.test_set.cache_info}

    def log_summary(self) -> None:
        """The warnings a run's log opens with: classes without a validation AUROC, lossy pixels."""
        if self.val_undefined:  # said once here; validation itself stays quiet
            logger.warning("%s: no AUROC for %s (a single label value); model selection uses "
                           "the mean over the other %d classes", self.val_set.split_file.name,
                           ", ".join(self.val_undefined),
                           len(self.class_names) - len(self.val_undefined))
        used = self.cache_used
        lossy = [split for split, info in used.items() if info.get("kind") == "lossy"]
        if lossy:
            logger.warning("the %s images come from a downsized (lossy) cache of shorter side %s: "
                           "crops and resizes differ from the paper's pipeline on the original "
                           "files (recorded in config.json as data_cache)", "/".join(lossy),
                           used[lossy[0]].get("size"))
        if used["train"].get("crop_resize"):
            logger.info("training crops are resized by %s", used["train"]["crop_resize"])


def training_data(data_path: str | Path, *, dataset: str, data_size: str,
                  train_transform: Callable, eval_transform: Callable, batch_size: int,
                  eval_batch_size: int, split_dir: str | None = None, cache: str = "auto",
                  cache_size: int | None = None, skip_bad: bool = False,
                  dicom_scaling: str | None = None, allow_overlap: bool = False,
                  nb_classes: int | None = None, seed: int = 0, num_workers: int = 0,
                  pin_memory: bool = False, dist_info: DistInfo = DistInfo()) -> TrainingData:
    """The train / val / test sets of ``data_path`` and the train and val loaders.

    Refuses (``DataError``) images shared between splits unless ``allow_overlap``, a class
    count other than ``nb_classes`` (``--nb_classes``), and a validation split on which no
    class has an AUROC (no checkpoint could be selected).
    """
    common = dict(dataset=dataset, split_dir=split_dir, cache=cache, skip_bad=skip_bad,
                  cache_size=cache_size, dicom_scaling=dicom_scaling)
    train_set = build_dataset("train", data_path, data_size=data_size, transform=train_transform,
                              **common)
    val_set, test_set = (build_dataset(split, data_path, transform=eval_transform,
                                       verify_images="header", **common) for split in ("val", "test"))
    check_split_overlap(train_set, [val_set, test_set], allow=allow_overlap, kind=train_set.kind)
    check_split_overlap(val_set, [test_set], allow=allow_overlap, role="validation",
                        kind=train_set.kind)
    class_names = list(train_set.class_names)
    if nb_classes is not None and nb_classes != len(class_names):
        raise DataUsageError(f"--nb_classes {nb_classes} but {train_set.split_file} has "
                             f"{len(class_names)} label columns ({dataset})")
    val_undefined = undefined_classes(val_set.targets, class_names)
    if len(val_undefined) == len(class_names):
        raise DataError(f"{val_set.split_file}: no class has both positive and negative images, "
                        "so no validation AUROC exists to select a checkpoint by")
    loader = dict(seed=seed, num_workers=num_workers, pin_memory=pin_memory)
    return TrainingData(
        train_set, val_set, test_set,
        train_loader=build_loader(train_set, dist_info, train=True, batch_size=batch_size, **loader),
        val_loader=build_loader(val_set, dist_info, train=False, batch_size=eval_batch_size,
                                **loader),
        val_undefined=val_undefined)
