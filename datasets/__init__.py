"""Chest X-ray data: split files, decoding, the paper's transforms, a cache and a demo set.

This package shadows Hugging Face's ``datasets`` inside this repository, on purpose.

    from datasets import build_dataset, build_transform
    ds = build_dataset("train", "data/NIH_ChestX-ray", data_size="1%",
                       transform=build_transform(is_train=True, recipe="sgd", norm="mrm"))
    image, target = ds[0]  # 3 x 224 x 224 float tensor, float tensor of 14 labels
"""
from .imagecache import CACHE_MODES, EvalCache, ImageCache, build_cache, check_cache_options
from .chestxray import ChestXrayDataset, build_dataset, read_split
from .constants import ALL_SPLIT_FILES, CLASS_NAMES, DATASET_KINDS, NORM_STATS, SPLIT_FILES, TRAIN_SPLIT_FILES
from .synthetic import make_demo_dataset
from .errors import BadEntry, CacheError, DataError, DataUsageError, ImageError, SplitFileError
from .loader import build_loader
from .imageio import DICOM_SCALINGS, ImageDecodeError, check_image_header, decode_dicom, load_image
from .splits import infer_dataset_kind, locate_split_file, parse_split_file, resolve_image_path
from .transforms import GreyToRGB, build_transform, to_rgb
from .device_aug import train_transforms
from .run_data import TrainingData, training_data, undefined_classes

__all__ = [
    "ALL_SPLIT_FILES", "BadEntry", "CACHE_MODES", "CLASS_NAMES", "CacheError", "ChestXrayDataset",
    "DATASET_KINDS", "DICOM_SCALINGS", "DataError", "DataUsageError", "EvalCache", "GreyToRGB", "ImageCache", "ImageDecodeError", "ImageError", "NORM_STATS",
    "SPLIT_FILES", "SplitFileError", "TRAIN_SPLIT_FILES", "build_cache", "build_dataset", "check_cache_options",
    "build_loader", "build_transform", "check_image_header", "decode_dicom", "infer_dataset_kind", "load_image", "locate_split_file",
    "make_demo_dataset", "parse_split_file", "read_split", "resolve_image_path", "to_rgb", "train_transforms",
    "TrainingData", "training_data", "undefined_classes",
]
