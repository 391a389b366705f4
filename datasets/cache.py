"""Command line: build the preprocessed image cache of a data set.

    python -m datasets.cache --data_path data/NIH_ChestX-ray [--workers 8]
    python -m datasets.cache --data_path data/NIH_ChestX-ray --eval_input_size 224   # + evaluation caches
    python -m datasets.cache --data_path data/NIH_ChestX-ray --size 256   # LOSSY: downsized copies

The default cache is exact: decoded pixels at their original size, so training and
evaluation get the same tensors as from the original files; ``build_dataset(cache='auto')``
(``--cache auto``) reads it whenever it is present and up to date. ``--size N`` makes a
lossy cache (shorter side N) in ``<data_path>/_cache_<N>px``: faster, but crops resample a
smaller image; a run reads it only when asked (``cache='lossy'``), with a warning.
See datasets/imagecache.py.
"""
from __future__ import annotations

import logging
import sys

from util import cli

from .constants import ALL_SPLIT_FILES, DATASET_KINDS
from .imagecache import build_cache
from .imageio import DICOM_SCALINGS

logger = logging.getLogger(__name__)


def build_eval_caches(data_path: str, dataset: str | None, split_dir: str | None, input_size: int,
                      recipes: list[str], cache_dir: str | None, cache_size: int | None,
                      dicom_scaling: str | None) -> None:
    """Store the evaluation transform's output of the val and test splits for each recipe, in the
    exact cache, or in the lossy cache of `cache_size`."""
    from .chestxray import build_dataset
    from .splits import find_split_dir
    from .transforms import build_transform

    folder = find_split_dir(data_path, split_dir)
    for recipe in recipes:
        transform = build_transform(is_train=False, recipe=recipe, input_size=input_size)
        for split, name in (("val", "val_list.txt"), ("test", "test_list.txt")):
            if folder is None or not (folder / name).is_file():
                continue
            ds = build_dataset(split, data_path, dataset=dataset, transform=transform, split_dir=split_dir,
                               cache="on" if cache_size is None else "lossy", cache_dir=cache_dir,
                               skip_bad=True, cache_size=cache_size, dicom_scaling=dicom_scaling)
            logger.info("%s %s (%s, %d px): %s", split, name, recipe, input_size,
                        ds.eval_cache.name if ds.eval_cache else "no evaluation cache")


PROG = "python -m datasets.cache"


def main(argv: list[str] | None = None) -> int:
    """Command line: build the cache of a data set (errors: see util.cli; run it through `cli.run`)."""
    parser = cli.Parser(
        prog=PROG,
        description="Decode every image of a data set's split files once into a memory-mapped cache.",
    )
    parser.add_argument("--data_path", required=True, help="data set folder")
    parser.add_argument("--dataset", choices=DATASET_KINDS, default=None,
                        help="data set kind (default: inferred from the folder name)")
    parser.add_argument("--split_dir", default=None, help="folder of the split files")
    parser.add_argument("--splits", nargs="+", default=None, metavar="FILE",
                        help=f"split files to cover (default: those of {', '.join(ALL_SPLIT_FILES)} present)")
    parser.add_argument("--size", type=int, default=None, metavar="N",
                        help="make a LOSSY cache: shorter side downsized to N pixels, in <data_path>/_cache_<N>px; "
                             "training crops and evaluation then differ from the originals' and a run reads it "
                             "only with --cache lossy (default: an exact cache at the original size)")
    parser.add_argument("--cache_dir", default=None,
                        help="output folder (default <data_path>/_cache, or _cache_<N>px with --size)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default: all cores)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="record unreadable images in the cache instead of stopping at the first")
    parser.add_argument("--dicom_scaling", choices=DICOM_SCALINGS, default=None,
                        help="DICOM intensity rule: 'paper' (x * 255 / max) or 'minmax' "
                             "(default: 'paper' for RSNA, 'minmax' otherwise)")
    parser.add_argument("--eval_input_size", type=int, default=None, metavar="N",
                        help="also store the evaluation transform's output (val and test) for input size N")
    parser.add_argument("--eval_recipes", nargs="+", choices=["sgd", "adamw"], default=["sgd", "adamw"],
                        help="recipes whose evaluation transform --eval_input_size stores (default: both)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: expected 0 (one per core) or more")
    if args.eval_input_size is not None and args.eval_input_size < 8:
        parser.error(f"--eval_input_size {args.eval_input_size}: expected at least 8 pixels")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = build_cache(args.data_path, args.dataset, args.split_dir, args.splits, args.size,
                      args.cache_dir, args.workers, args.skip_bad, args.dicom_scaling)
    if args.eval_input_size:
        build_eval_caches(args.data_path, args.dataset, args.split_dir, args.eval_input_size, args.eval_recipes,
                          args.cache_dir, args.size, args.dicom_scaling)
    kind = "exact" if args.size is None else f"LOSSY (shorter side {args.size}; read only with --cache lossy)"
    print(f"{kind} cache written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog=PROG))
