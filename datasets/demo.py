"""Command line: write the synthetic demo data set (NIH layout, no download needed).

    python -m datasets.demo --out demo_data [--num_images 1200] [--image_size 128] [--seed 0]
    python -m datasets.demo --out RSNA_demo --rsna     # the same images as RSNA-layout DICOMs

--out must be a new folder: nothing is written into an existing one. Errors are one line on
stderr (exit 2: a flag; 1: the set could not be written, e.g. a full disk); nothing partial
is left behind.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from util import cli

from .synthetic import demo_as_rsna_dicoms, make_demo_dataset

PROG = "python -m datasets.demo"


def main(argv: list[str] | None = None) -> int:
    """Command line: write the demo data set (run it through `cli.run`)."""
    parser = cli.Parser(prog=PROG, description="Write the synthetic NIH-layout demo data set.")
    parser.add_argument("--out", default="demo_data", help="output folder, a new one (default %(default)s)")
    parser.add_argument("--num_images", type=cli.POSITIVE_INT, default=1200, help="images in all")
    parser.add_argument("--image_size", type=cli.POSITIVE_INT, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=cli.SEED, default=0, help="seed of the images and labels")
    parser.add_argument("--rsna", action="store_true",
                        help="write RSNA Pneumonia's layout instead: JPEG DICOMs, one label")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a file, not a folder")
    if os.path.lexists(args.out):
        parser.error(f"--out {args.out}: already exists (name a new folder: nothing is written into an "
                     "existing one)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.rsna:
        with tempfile.TemporaryDirectory() as tmp:
            nih = make_demo_dataset(Path(tmp) / "nih", args.num_images, args.image_size, args.seed)
            root = demo_as_rsna_dicoms(nih, args.out)
    else:
        root = make_demo_dataset(args.out, args.num_images, args.image_size, args.seed)
    print(f"demo data set written to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog=PROG))
