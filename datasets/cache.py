"""Command line: build the preprocessed image cache of a data set.

    python -m datasets.cache --data_path data/NIH_ChestX-ray [--size 256] [--workers 8]

Training and evaluation then read the cache instead of the original images whenever it is
present and up to date (``build_dataset(cache='auto')``); see datasets/imagecache.py.
"""
from __future__ import annotations

import argparse
import logging

from .constants import ALL_SPLIT_FILES, DATASET_KINDS
from .imagecache import DEFAULT_CACHE_SIZE, build_cache


def main(argv: list[str] | None = None) -> None:
    """Command line: build the cache of a data set."""
    parser = argparse.ArgumentParser(
        prog="python -m datasets.cache",
        description="Resize every image of a data set's split files once into a memory-mapped cache.",
    )
    parser.add_argument("--data_path", required=True, help="data set folder")
    parser.add_argument("--dataset", choices=DATASET_KINDS, default=None,
                        help="data set kind (default: inferred from the folder name)")
    parser.add_argument("--split_dir", default=None, help="folder of the split files")
    parser.add_argument("--splits", nargs="+", default=None, metavar="FILE",
                        help=f"split files to cover (default: those of {', '.join(ALL_SPLIT_FILES)} present)")
    parser.add_argument("--size", type=int, default=DEFAULT_CACHE_SIZE,
                        help="shorter side of the cached images (default %(default)s)")
    parser.add_argument("--cache_dir", default=None, help="output folder (default <data_path>/_cache)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default: all cores)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="record unreadable images in the cache instead of stopping at the first")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size {args.size}: expected at least 8 pixels")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = build_cache(args.data_path, args.dataset, args.split_dir, args.splits, args.size,
                      args.cache_dir, args.workers, args.skip_bad)
    print(f"cache written to {out}")


if __name__ == "__main__":
    main()
