"""Class orders, split file names and normalisation statistics of the paper's data sets."""
from __future__ import annotations

# Column order of the labels in the paper's split files (checked against the official
# metadata: NIH Data_Entry_2017, CheXpert train.csv). Changing an order silently mislabels every image.
CLASS_NAMES: dict[str, list[str]] = {
    "nih": [
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
        "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
        "Pleural_Thickening", "Hernia",
    ],
    "chexpert": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"],
    "rsna": ["Pneumonia"],
}

# Every kind `build_dataset` accepts; 'custom' takes its classes from the data folder.
DATASET_KINDS: tuple[str, ...] = ("nih", "chexpert", "rsna", "custom")

# DICOM intensity rule per kind (datasets.imageio): the paper's `x * 255 / max` for RSNA,
# whose DICOMs the paper reads that way; min-max (with the file's VOI window) elsewhere.
DICOM_SCALING_BY_KIND: dict[str, str] = {"rsna": "paper"}
DEFAULT_DICOM_SCALING = "minmax"

# `--data_size` value -> training split file.
TRAIN_SPLIT_FILES: dict[str, str] = {"1%": "train_1.txt", "10%": "train_10.txt",
                                     "100%": "train_list.txt"}

# (split, data_size) -> file name; evaluation splits ignore the data size.
SPLIT_FILES: dict[str, dict[str, str] | str] = {"train": TRAIN_SPLIT_FILES, "val": "val_list.txt",
                                                 "test": "test_list.txt"}

# All five file names, in the order a complete split folder holds them.
ALL_SPLIT_FILES: tuple[str, ...] = (
    "train_1.txt", "train_10.txt", "train_list.txt", "val_list.txt", "test_list.txt",
)

# Single-channel statistics applied to the 3 identical channels. The reference code picks
# MRM vs CXR_MAE from the checkpoint file name; here the caller chooses explicitly.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # == timm.data.IMAGENET_DEFAULT_MEAN
_IMAGENET_STD = (0.229, 0.224, 0.225)  # == timm.data.IMAGENET_DEFAULT_STD
NORM_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "mrm": ((0.4978,) * 3, (0.2449,) * 3),
    "cxr_mae": ((0.4785,) * 3, (0.2834,) * 3),
    "imagenet": (_IMAGENET_MEAN, _IMAGENET_STD),
    # The foundation models of weights/ (README "Supported foundation models"), as published:
    # RAD-DINO: microsoft/rad-dino preprocessor_config.json.
    "rad_dino": ((0.5307,) * 3, (0.2583,) * 3),
    # OpenAI CLIP (and BiomedCLIP's open_clip_config.json preprocess_cfg).
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    # CheXzero train.py / zero_shot.py: Normalize(101.48761, 83.43944) on 0-255 pixels.
    "chexzero": ((101.48761 / 255,) * 3, (83.43944 / 255,) * 3),
    # Medical MAE (lambert-x/medical_mae util/datasets.py, chest X-ray data sets).
    "medical_mae": ((0.5056,) * 3, (0.252,) * 3),
}
