"""Export a trained checkpoint as one plain timm model: LoRA merged into the backbone.

    python export.py --checkpoint output/nih_1/checkpoint-best --output export/nih_1_mrm_lora

writes ``export/nih_1_mrm_lora.safetensors`` (every tensor, timm state-dict names, fp32)
and ``export/nih_1_mrm_lora.json`` (format ``cxr-lora-merged/1``; see ``checkpoints``
for the format and how to load it with timm alone). ``predict.py --checkpoint
export/nih_1_mrm_lora`` uses it without the pre-trained file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from checkpoints import (  # noqa: F401  (the export API, importable from here too)
    MERGED_FORMAT,
    CheckpointError,
    ExportError,
    export_merged,
    export_paths,
    is_merged_export,
    load_merged,
    load_trained,
    max_output_difference,
    merged_config,
    read_merged_config,
    timm_model_name,
)

logger = logging.getLogger("export")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: merge a checkpoint's LoRA into its backbone and write the export."""
    parser = argparse.ArgumentParser(
        prog="export.py",
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
