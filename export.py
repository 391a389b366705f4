"""Export a trained checkpoint as one plain timm model: LoRA merged into the backbone.

    python export.py --checkpoint output/nih_1/checkpoint-best --output export/nih_1_mrm_lora

writes ``export/nih_1_mrm_lora.safetensors`` (every tensor, timm state-dict names, fp32)
and ``export/nih_1_mrm_lora.json`` (format ``cxr-lora-merged/4``; see ``checkpoints``
for the format and how to load it with timm alone). ``predict.py --checkpoint
export/nih_1_mrm_lora`` uses it without the pre-trained file.

The pair is written under temporary names, reloaded into timm and compared with the
adapter model, and only then renamed into place: an export that fails the check leaves
nothing behind, and an earlier export at ``--output`` as it was.

``--output`` never replaces a file the user has: an existing ``<output>.safetensors`` or
``.json`` needs ``--overwrite``; the checkpoint being exported, the pre-trained file, a
training run's own files and symbolic links are refused even then.

Exit codes: 0 exported; 1 failure (the export does not reproduce the model, or could not be
written: a full disk, a read-only folder); 2 usage (a bad flag, a checkpoint that cannot be
loaded or whose method cannot be merged, a refused ``--output``; nothing written).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn
from safetensors import SafetensorError

from checkpoints import (
    ExportError,
    ModelConfig,
    check_mergeable,
    checkpoint_paths,
    export_merged,
    export_paths,
    load_merged,
    load_trained,
    max_output_difference,
    resolve_checkpoint,
)
from util import cli
from util.cli import UsageError
from util.io import (OutputError, describe_os_error, left_by_ended_processes, remove_empty,
                     work_folder)
from util.reports import check_outputs
from util.runfolder import probe_writable

logger = logging.getLogger("export")
PROG = "export.py"


def export_checked(model: nn.Module, config: ModelConfig | dict[str, Any], output: str | Path,
                   source: str | Path, atol: float | None) -> tuple[Path, Path]:
    """Export ``model`` to ``<output>.safetensors`` / ``.json`` once the export is shown to
    reproduce it (max logit difference <= ``atol``; None skips the check).

    Both files are written into a temporary folder beside ``output`` and renamed into place
    only after the check: a failed check raises ``ExportError`` with no file written and an
    earlier export at ``output`` untouched.
    """
    tensors_path, config_path = export_paths(output)
    try:
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        for left in left_by_ended_processes(tensors_path.parent, tensors_path.stem, ".tmp"):
            shutil.rmtree(left, ignore_errors=True)  # an export killed half-way
        # Same folder, so the renames stay on one file system (atomic).
        tmp_dir = work_folder(tensors_path.parent, tensors_path.stem, ".tmp")
    except OSError as err:
        raise OutputError(err.errno or 0, describe_os_error(err, tensors_path)) from None
    try:
        try:
            tmp_tensors, tmp_config = export_merged(model, config, tmp_dir / tensors_path.stem,
                                                    source=source)
        except SafetensorError as err:  # safetensors reports a full disk as its own error
            raise _write_error(err, tensors_path) from None
        except OutputError as err:  # named by the temporary file: say the output's name
            raise OutputError(err.errno or 0, describe_os_error(err, tensors_path)) from None
        if atol is not None:
            exported = load_merged(tmp_tensors)[0]
            diff = max_output_difference(model, exported, config.img_size)
            if not diff <= atol:
                raise ExportError(f"{tensors_path}: the export's outputs differ from the adapter "
                                  f"model by {diff:.3g} > --atol {atol:.3g}; nothing written")
            logger.info("export reloaded into timm %s (strict): max logit difference %.2e",
                        config_path.name, diff)
        # An export is recognised by its JSON: drop the old one first and put the new one
        # last, so an interruption between the renames never pairs old and new files.
        try:
            config_path.unlink(missing_ok=True)
            os.replace(tmp_tensors, tensors_path)
            os.replace(tmp_config, config_path)
        except OSError as err:
            raise OutputError(err.errno or 0, describe_os_error(err, tensors_path)) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return tensors_path, config_path


def _write_error(err: SafetensorError, path: Path) -> Exception:
    """A safetensors write failure as the one-line OutputError of an OS error ("os error 28":
    no space left), or the error itself when it is not one."""
    found = re.search(r"os error (\d+)", str(err))
    if found is None:
        return err
    code = int(found.group(1))
    return OutputError(code, describe_os_error(OSError(code, os.strerror(code)), path))


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (whole names only)."""
    parser = cli.Parser(
        prog=PROG,
        description="Merge a trained checkpoint (adapter + pre-trained file, or full) into one "
                    "timm-loadable .safetensors with a JSON of class names and normalisation.",
        epilog="Exit codes: 0 exported; 1 the export failed its check or could not be written; "
               "2 usage error, nothing written.")
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (stem, .safetensors or .json), e.g. "
                             "output/run/checkpoint-best; a run folder means its checkpoint-best")
    parser.add_argument("--finetune", default=None,
                        help="pre-trained file the adapter was trained on (default: the path "
                             "recorded in the checkpoint config)")
    parser.add_argument("--unsafe_load", action="store_true",
                        help="DANGEROUS: unpickle --finetune without the weights-only guard (for "
                             "a checkpoint trained with --unsafe_load)")
    parser.add_argument("--output", required=True,
                        help="export stem: writes <output>.safetensors and <output>.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export at --output")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest logit difference allowed between the adapter model and "
                             "the export (checked on random inputs)")
    parser.add_argument("--no_verify", action="store_true",
                        help="skip reloading the export into timm and comparing outputs")
    return parser


def run(args: argparse.Namespace) -> int:
    """Check ``--output``, load the checkpoint, write the checked export; errors are raised."""
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    sources = [*checkpoint_paths(args.checkpoint),
               *([Path(args.finetune)] if args.finetune is not None else [])]
    check_outputs("--output", export_paths(args.output), overwrite=args.overwrite, inputs=sources)
    try:
        model, config = load_trained(args.checkpoint, args.finetune, device="cpu",
                                     allow_unsafe_pickle=args.unsafe_load)
    except (OSError, ValueError) as err:  # damaged files, NaN weights too
        raise UsageError(f"--checkpoint {args.checkpoint}: {err}") from None
    pretrained = config.pretrained  # the backbone read by default
    if args.finetune is None and pretrained:
        check_outputs("--output", export_paths(args.output), overwrite=args.overwrite,
                      inputs=[Path(pretrained)])
    check_mergeable(config, args.checkpoint)  # before any folder is made for the export
    # A read-only folder, or a file where the folder should be, is found before the work.
    made = probe_writable(export_paths(args.output)[0].parent)
    try:
        tensors_path, config_path = export_checked(model, config, args.output, args.checkpoint,
                                                   atol=None if args.no_verify else args.atol)
    except BaseException:
        remove_empty(made)  # a failed check leaves no folder of its own behind
        raise
    print(f"exported {args.checkpoint} -> {tensors_path} + {config_path.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command inside its error boundary (``util.cli.main``): returns the exit code."""
    return cli.main(build_parser, run, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
