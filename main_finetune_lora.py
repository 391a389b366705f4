"""Fine-tune a pre-trained chest X-ray ViT with LoRA (or fully, or a linear probe).

The one entry script: it alone reads the command line, and turns flags into plain
keyword arguments for the model builder, the data sets and the engine.

    python main_finetune_lora.py                           # demo: synthetic data, tiny ViT, CPU
    python main_finetune_lora.py --preset nih-1-mrm \\
        --data_path data/NIH_ChestX-ray --finetune pretrained_weights/MRM.pth
    torchrun --nproc_per_node 4 main_finetune_lora.py ...  # several GPUs
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import checkpoints as ckpt
import datasets
import evaluation
import lora
import methods
import models_vit_lora as mv
import training
import weights
from datasets.transforms import AUG_FILLS, ERASE_MODES
from engine_finetune import COMPILE_CHOICES, COMPILE_MODES
from training import LoopConfig, Progress, Training
from util import cli as command
from util.io import json_safe, remove_empty
from util.misc import DistInfo, close_log_file, code_versions, decided_by_main, init_distributed, say, seed_everything, setup_logging
from util.optim import build_optimizer, per_process_batch
from util.precision import AMP_CHOICES, precision_name, resolve_amp
from util.presets import DEMO_DEFAULTS, PRESETS, preset_help, reference_script_flags, resolve_preset
from util.runfolder import Plan, RunFolder, probe_writable, run_path

logger = logging.getLogger("main")

PROG = "main_finetune_lora.py"
# Flags that name a real data set or weights: without --data_path they are an error, not the demo.
REAL_RUN_FLAGS = ("preset", "finetune", "dataset", "data_size", "split_dir", "nb_classes")


ArgumentError = command.UsageError  # a flag value or combination that cannot run


def get_args_parser() -> argparse.ArgumentParser:
    """All flags of the paper's scripts (same meaning) plus this tool's own, with their roles."""
    p = command.Parser(prog=PROG, description="LoRA (or full, or linear-probe) fine-tuning of chest "
                       "X-ray foundation models, with the paper's recipes (--preset).",
                       epilog="Exit codes: 0 done; 1 a failure (a damaged file, a full disk, a run "
                              "folder or checkpoint whose run the command contradicts); 2 usage "
                              "error, nothing written; 130 interrupted (the command that continues "
                              "the run is printed).")
    p.set_defaults(global_pool=True)
    f = command.FlagTable(p, "run", role=command.EXEC)
    f("--preset", recipe=True, choices=sorted(PRESETS), default=None, role=command.RUN,
      help=preset_help().replace("%", "%%"))
    f("--demo", action="store_true", role=command.RUN,
      help="synthetic demo data + tiny ViT (the default when --data_path is not given)")
    f("--demo_out", default=None, type=command.new_folder,
      help="write a new demo data set into this folder (it must not exist) and train on it")
    f("--output_dir", default="./output_dir", help="parent folder of the run folder")
    f("--run_name", default="auto",
      help="run folder inside --output_dir; 'auto' names it after the data set, label fraction, "
           "weights, method, recipe and seed; '' uses --output_dir itself")
    f("--log_dir", default=None, type=command.folder_path, help="TensorBoard folder (default: <run>/logs)")
    f("--overwrite", action="store_true",
      help="replace the run in the run folder (only the files that run wrote are removed)")
    f("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=command.device_name,
      help="training device (cuda, cuda:1, cpu)")
    f("--seed", default=0, type=command.SEED, role=command.RUN,
      help="seed of the run (data order, augmentation, init)")
    f("--resume", default="",
      help="checkpoint to continue from (<run>/checkpoint-last), or 'auto' for the run folder's "
           "own; with --eval: the checkpoint to evaluate")
    f("--start_epoch", default=0, type=command.NON_NEGATIVE_INT,
      help="first epoch of a fresh run (a resume takes it from the checkpoint)")
    f("--eval", action="store_true",
      help="only evaluate --resume on --eval_split of --data_path, into <checkpoint "
           "folder>/eval/<name> (or --output_dir)")
    f("--eval_split", default="test", choices=["val", "test"], help="the split --eval evaluates")
    f("--eval_name", default=None, type=command.folder_name,
      help="--eval's folder <checkpoint folder>/eval/<name> (default: data folder and split "
           "file); with --output_dir, a folder inside it")
    f("--dist_eval", action="store_true",
      help="kept for the paper's scripts (evaluation is always distributed, gathered exactly)")
    f("--ci_resamples", type=command.NON_NEGATIVE_INT, default=1000,
      help="bootstrap resamples of the test AUROC's 95%% intervals (0: none)")
    f("--metadata", default=None, metavar="FILE|dicom|none",
      help="patient metadata for the test AUROC per sex, age band and view: a CSV (NIH "
           "Data_Entry_2017, CheXpert train/valid.csv, or path,sex,age,view), 'dicom' or 'none'; "
           "default: found beside the split file or in the data folder (docs/USING_A_MODEL.md)")
    f("--class_map", default=None, metavar="FILE",
      help="--eval on a data set of other classes: the classes they share (default: "
           "datasets/class_map.csv)")
    f("--valid_freq", type=command.POSITIVE_INT, default=1, role=command.RUN, help="validate every N epochs")
    f("--log_freq", type=command.POSITIVE_INT, default=10, help="log the train loss every N steps")
    f("--progress_freq", type=command.POSITIVE_INT, default=100,
      help="without a terminal: a progress line every N steps (and every 30 s)")
    f("--no_progress", action="store_true", help="no progress bar or progress lines")
    f("--note", type=str, default="", help="appended to the automatic run folder name")
    f("--script", type=str, default="", help="launch script, copied into the run")
    f("--check_args", action="store_true",
      help="only check the flags and exit (the launch scripts do this before torchrun)")

    f = command.FlagTable(p, "model")
    f("--model", recipe=True, default="vit_base_patch16_lora", choices=sorted(mv.MODELS),
      help="architecture; *_lora variants inject LoRA adapters (default: the --finetune file's "
           "architecture, else %(default)s)")
    f("--method", recipe=True, default=None, choices=list(methods.REGISTRY),
      help="; ".join(f"{m.name}: {m.summary}" for m in methods.REGISTRY.values())
           + ". Default: lora for *_lora models, full otherwise")
    f("--finetune", default="", type=command.existing_file, role=command.DERIVED,
      help="pre-trained weights (MRM.pth, CXR_MAE.pth, ...)")
    f("--unsafe_load", action="store_true", role=command.EXEC,
      help="DANGEROUS: unpickle --finetune without the weights-only guard")
    f("--depth", default=None, type=command.POSITIVE_INT,
      help="number of transformer blocks, if not the architecture's (small tests)")
    f("--input_size", default=224, type=command.POSITIVE_INT,
      help="image side in pixels, a multiple of the patch size (default: the --finetune file's, "
           "e.g. 518 for RAD-DINO, else %(default)s)")
    f("--drop_path", recipe=True, type=command.FRACTION, default=0.1, help="stochastic depth rate")
    pool = f.one_of()
    pool("--cls_token", action="store_false", dest="global_pool",
         help="classify from the cls token (the default only for weights whose authors do: "
              "DINOv2 files such as RAD-DINO, BiomedCLIP, CheXzero; the paper pools the patch tokens)")
    pool("--mean_pool", action="store_true", dest="global_pool",
         help="classify from the mean of the patch tokens (the default but for those weights)")
    f("--nb_classes", default=None, type=command.POSITIVE_INT,
      help="number of classes (default: from the data set; checked against it)")

    f = command.FlagTable(p, "method settings (each method's own; see --method)")
    for method_flag in methods.all_flags():
        f(*method_flag.names, recipe=True, **method_flag.options)

    f = command.FlagTable(p, "optimisation")
    f("--batch_size", recipe=True, default=64, type=command.POSITIVE_INT,
      help="batch per process (with --global_batch: derived from it)")
    f("--global_batch", recipe=True, default=None, type=command.POSITIVE_INT, role=command.DERIVED,
      help="images per optimiser step over all processes (sets --batch_size, --accum_iter)")
    f("--eval_batch_size", default=None, type=command.POSITIVE_INT, role=command.EXEC,
      help="default: 4 x batch_size")
    f("--epochs", recipe=True, default=50, type=command.POSITIVE_INT, help="training epochs")
    f("--accum_iter", recipe=True, default=1, type=command.POSITIVE_INT, help="gradient accumulation steps")
    f("--optimizer", recipe=True, default="sgd", choices=["sgd", "adamw"], help="sgd (momentum 0.9) or adamw")
    f("--lr", recipe=True, type=command.POSITIVE, default=None, help="absolute lr (sgd recipe); default: from --blr")
    f("--blr", recipe=True, type=command.POSITIVE, default=1e-3, role=command.DERIVED, help="lr = blr * effective batch / 256")
    f("--layer_decay", recipe=True, type=command.number(float, "the per-layer lr factor must be in (0, 1] (1: no decay)",
                                   lambda v: 0 < v <= 1),
      default=0.75, help="layer-wise lr decay (adamw)")
    f("--min_lr", recipe=True, type=command.NON_NEGATIVE, default=1e-6, help="floor of the cosine schedule")
    f("--warmup_epochs", recipe=True, type=command.NON_NEGATIVE, default=5,
      help="linear warm-up epochs (capped at --epochs, with a note)")
    f("--weight_decay", recipe=True, type=command.NON_NEGATIVE, default=0.05, help="weight decay")
    f("--clip_grad", recipe=True, type=command.POSITIVE, default=None,
      help="clip the gradient norm to this positive value (default: no clipping)")
    f("--backbone_dtype", recipe=True, default="fp32", choices=lora.BACKBONE_DTYPES,
      help="dtype of the frozen backbone (bf16 / fp16 need that --amp; fp8: block linears in "
           "float8, GPUs of compute capability 8.9+ or the CPU; docs/BENCHMARKS.md)")
    f("--compile", default="auto", nargs="?", const="on", choices=COMPILE_CHOICES, role=command.EXEC,
      help="torch.compile the model: auto = on CUDA for runs long enough to earn it back")
    f("--compile_backend", default="inductor", role=command.EXEC,
      help="torch.compile backend (aot_eager: quick checks without a compiler)")
    f("--compile_mode", default="default", choices=COMPILE_MODES, role=command.EXEC,
      help="inductor mode: reduce-overhead (CUDA graphs, small GPU batches), max-autotune")
    f("--grad_checkpointing", action="store_true", role=command.EXEC,
      help="recompute block activations in backward (less memory, more compute)")
    f("--amp", default="auto", choices=AMP_CHOICES,
      help="auto: bf16 where native (recent GPUs, AMX CPUs), fp16 + loss scaling on older GPUs "
           "(the paper's mode), else fp32")

    f = command.FlagTable(p, "data")
    f("--data_path", default=None, role=command.DERIVED, help="data set folder (default: the demo set)")
    f("--dataset", default=None, choices=list(datasets.DATASET_KINDS),
      help="default: inferred from the --data_path folder name")
    f("--data_size", default="100%", choices=sorted(datasets.TRAIN_SPLIT_FILES),
      help="fraction of the training labels: the train_1 / train_10 / train_list file")
    f("--split_dir", default=None, role=command.DERIVED, help="folder of the split files")
    f("--allow_overlap", action="store_true", role=command.EXEC,
      help="allow images shared between the training and evaluation splits")
    f("--cache", default="auto", choices=["auto", "on", "lossy", "off"], role=command.DERIVED,
      help="auto: the exact image cache (python -m datasets.cache) when up to date; on: require "
           "it; lossy: a downsized one (other pixels, recorded); off: the files")
    f("--cache_size", type=int, default=None, role=command.DERIVED,
      help="with --cache lossy: which downsized cache (its shorter side)")
    f("--dicom_scaling", default=None, choices=list(datasets.DICOM_SCALINGS),
      help="DICOM intensity: paper = x * 255 / max (rsna's default), minmax = VOI window or "
           "min-max (the others'); --eval and predict default to the checkpoint's")
    f("--skip_bad", action="store_true", help="skip unreadable images, and report them")
    f("--norm", default=None, choices=sorted(datasets.NORM_STATS),
      help="input normalisation; default follows the pre-trained weights")
    f("--recipe", recipe=True, default=None, choices=["sgd", "adamw"],
      help="augmentation recipe; default follows --optimizer as in the paper")
    f("--device_aug", action="store_true",
      help="augment uint8 batches on the training device (the crop stays in the loaders)")
    f("--aug_fill", default="paper", choices=list(AUG_FILLS),
      help="fill of RandAugment's geometric ops: 'paper' (its pipeline's grey) or 'neutral'")
    f("--aa", recipe=True, type=str, default="rand-m9-mstd0.5-inc1",
      help="RandAugment policy of the adamw recipe (timm syntax)")
    f("--reprob", recipe=True, type=command.PROBABILITY, default=0.25, help="random erasing probability (adamw recipe)")
    f("--remode", recipe=True, type=str, default="pixel", help=f"random erasing mode: {', '.join(ERASE_MODES)}")
    f("--recount", recipe=True, type=command.POSITIVE_INT, default=1, help="random erasing count")
    f("--num_workers", default=min(8, os.cpu_count() or 1), type=command.NON_NEGATIVE_INT, role=command.EXEC,
      help="data loading processes")
    f("--pin_mem", action="store_true", default=torch.cuda.is_available(), role=command.EXEC,
      help="pinned host memory for faster copies to the GPU (on by default with CUDA)")
    f("--no_pin_mem", action="store_false", dest="pin_mem", role=command.EXEC, help="no pinned memory")

    # Flags of the reference code, accepted so that its scripts run unchanged.
    reference_script_flags(command.FlagTable(p, "accepted for compatibility", role=command.EXEC))
    return p


def resolve_args(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """Fill preset / demo defaults and values derived from several flags, then check the
    combinations (single values were checked by their flag's type or their own class)."""
    filled: set[str] = set()

    def fill(values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key not in explicit:
                setattr(args, key, value)
                filled.add(key)

    args.explicit, args.notes, args.preset_source, args.weights_info = explicit, [], None, None
    if args.preset:
        method = methods.get(args.method or default_method(args.model))
        values, args.preset_source = resolve_preset(args.preset, method.name, method.preset_lr,
                                                    lora_rank=method.size_flag == "--lora_rank")
        if given_lr := sorted(explicit & {"lr", "blr"}):  # the command's lr wins, as it names it
            args.preset_source += f"; the lr is the command's ({', '.join('--' + k for k in given_lr)})"
            values = {k: v for k, v in values.items() if k not in ("lr", "blr")}
        fill(values)
    choose_data(args, explicit)
    if args.demo:
        fill({k: v for k, v in DEMO_DEFAULTS.items() if k != "data_path"
              and not (k == "dataset" and "data_path" in explicit)})
        if args.finetune and "model" not in explicit:
            args.model = "vit_base_patch16_lora"
    if args.finetune and not args.eval:
        args.weights_info = weights_defaults(args, explicit | filled)
    args.demo_replace = bool(args.demo and not {"output_dir", "run_name"} & explicit)
    resolve_method(args, explicit)
    if args.warmup_epochs > args.epochs:
        args.notes.append(f"--warmup_epochs {args.warmup_epochs:g} is longer than the run: capped "
                          f"at --epochs {args.epochs}")
        args.warmup_epochs = float(args.epochs)
    world = int(os.environ.get("WORLD_SIZE", 1))
    resolve_batch(args, explicit, world)
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * world / 256
    args.recipe = args.recipe or args.optimizer
    args.norm = choose_norm(args, explicit)
    args.eval_batch_size = args.eval_batch_size or 4 * args.batch_size
    check_combinations(args)
    return args


def resolve_method(args: argparse.Namespace, explicit: set[str]) -> None:
    """The method (default: from --model) and its settings, with a note on each flag given
    that changes nothing: another method's, or with --eval the checkpoint's model and recipe."""
    args.method = args.method or default_method(args.model)
    args.arch = mv.LORA_MODELS.get(args.model, args.model)
    if "model" not in explicit and args.method != "lora":  # a default *_lora model follows --method
        args.model = args.arch  # (the flag's, the demo's, or the one the weights file gives)
    args.model_kwargs = {"depth": args.depth} if args.depth else {}
    if args.eval:  # the checkpoint's method and settings: the flags' are not read, only noted
        args.method_settings, args.unread_flags = None, set()
        roles = command.flag_roles(get_args_parser())
        args.notes += evaluation.unused_settings(sorted(k for k in explicit if roles[k] == command.RUN))
        return
    method = methods.get(args.method)
    args.method_settings, args.unread_flags, notes = method.read_flags(vars(args), explicit)
    vars(args).update(method.resolved_flags(args.method_settings))
    args.notes += notes


def resolve_batch(args: argparse.Namespace, explicit: set[str], world: int) -> None:
    """The per-process batch and accumulation that make --global_batch over ``world`` processes."""
    if "batch_size" in explicit and "global_batch" not in explicit:
        args.global_batch = None  # the user's per-process batch wins over a preset's global one
    elif args.global_batch is not None:
        try:
            args.batch_size, args.accum_iter = per_process_batch(
                args.global_batch, world, args.accum_iter, args.batch_size if "batch_size" in explicit else None)
        except ValueError as err:
            raise ArgumentError(f"--global_batch: {err}") from None


def default_method(model: str) -> str:
    """LoRA for the *_lora architectures, full fine-tuning otherwise."""
    return "lora" if model in mv.LORA_MODELS else "full"


def choose_data(args: argparse.Namespace, explicit: set[str]) -> None:
    """The data to train on (--data_path, or the demo's, written later where the user allows),
    and the weights (or with --eval the checkpoint) a run on it needs."""
    if args.eval and not args.resume:
        raise ArgumentError("--eval needs --resume <checkpoint> (the model to evaluate)")
    if args.demo_out:
        args.demo, args.data_path = True, args.demo_out
    if not args.demo and args.data_path is None and not args.eval:
        # The demo is the default only for a command that names no data or weights: a real
        # run's flags without --data_path are a mistake, not a request for synthetic data.
        real = [f for f in REAL_RUN_FLAGS if f in explicit]
        if real:
            raise ArgumentError(f"--{real[0]} needs --data_path (the data set to train on); "
                                "pass --demo to run the synthetic demo instead")
        args.demo = True
    if args.demo and args.data_path is None:
        args.data_path = DEMO_DEFAULTS["data_path"]  # written when missing
    elif args.data_path is None:
        raise ArgumentError("--data_path is required with --eval (the data to evaluate on)")
    elif not Path(args.data_path).is_dir() and not args.demo_out:
        raise ArgumentError(f"--data_path {args.data_path}: no such folder"
                            + (" (to write a new demo data set there, use --demo_out)"
                               if args.demo else ""))
    if not args.finetune and not args.demo and not args.eval:
        raise ArgumentError("--finetune is required (the pre-trained weights); without it the "
                            "backbone would be random. Use --demo for a run on synthetic data.")


def weights_defaults(args: argparse.Namespace, given: set[str]):
    """What the --finetune file holds (its format and shapes, logged): the defaults of
    --model, --input_size and the pooling where no flag or preset set them; a --model that
    does not fit the file is refused."""
    info = mv.describe_weights(args.finetune, allow_unsafe_pickle=args.unsafe_load)
    arch = info.arch or (info.arch_at_depth if args.depth == info.geometry.depth else None)
    if arch is None and "model" not in given:
        raise ArgumentError(f"--finetune {args.finetune}: {info.geometry.text()}: "
                            f"{info.builder_text()}")
    # The *_lora builder, as the default --model: resolve_method makes it plain for other methods.
    for key, value in {"model": f"{arch}_lora", "input_size": info.input_size,
                       "global_pool": info.global_pool == "avg"}.items():
        if key not in given:
            setattr(args, key, value)
    try:
        mv.check_model_fits(info, args.model, {"depth": args.depth} if args.depth else {})
    except mv.PretrainedWeightsError as err:
        raise ArgumentError(str(err)) from None
    return info


def choose_norm(args: argparse.Namespace, explicit: set[str]) -> str:
    """The input normalisation the weights need (known from the file, or named by it),
    refusing a preset of others."""
    info = args.weights_info
    named = (info.norm if info else None) or (weights.norm_named_by(args.finetune) if args.finetune else None)
    if args.preset and named and named != args.norm and "norm" not in explicit:
        # A preset is the recipe of one kind of weights; other weights are another setting.
        raise ArgumentError(f"--preset {args.preset} is the recipe for weights normalised as "
                            f"{args.norm!r}, but --finetune {args.finetune} is named as {named!r} "
                            "weights: choose the preset of those weights, or pass --norm to say "
                            "which normalisation they need")
    if args.norm:
        return args.norm
    if not args.finetune:
        return "mrm"
    if named is None:
        read = (f" (mean {info.mean}, std {info.std} {info.norm_from}: statistics no --norm "
                "name has; add them to NORM_STATS in datasets/constants.py)") if info and info.mean else ""
        raise ArgumentError(f"--norm: cannot tell the normalisation of {args.finetune}{read}; pass "
                            f"--norm {' | '.join(sorted(datasets.NORM_STATS))}")
    return named


def check_combinations(args: argparse.Namespace) -> None:
    """The checks that involve several flags: what the command needs is given, and what the
    flags name can run together (each message names its flags)."""
    if args.resume == "auto" and args.overwrite:
        raise ArgumentError("--resume auto continues the run in the folder, --overwrite replaces "
                            "it: give one of them")
    if args.method != "lora" and args.model in mv.LORA_MODELS and not args.eval:
        raise ArgumentError(f"--method {args.method} contradicts --model {args.model}: use "
                            f"--model {mv.LORA_MODELS[args.model]}")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min_lr {args.min_lr!r} is not valid: the floor of the cosine "
                            f"schedule is above the lr {args.lr:g} (the schedule would rise instead "
                            "of decay)")
    if args.compile_mode != "default" and args.compile_backend != "inductor":
        raise ArgumentError(f"--compile_mode {args.compile_mode} is a mode of the inductor backend, "
                            f"not of --compile_backend {args.compile_backend}")
    if args.start_epoch >= args.epochs and not args.resume:
        raise ArgumentError(f"--start_epoch {args.start_epoch} leaves no epoch of --epochs "
                            f"{args.epochs} to train")
    if not args.eval:  # (an evaluation's model is the checkpoint's)
        # The model built without memory: a size its layers cannot take (a rank or bottleneck
        # above their width) is refused before the data is read or torchrun starts.
        mv.check_buildable(model_config(args, ["class"]))
    try:
        datasets.check_cache_options(args.cache, args.cache_size)
        lora.check_backbone_dtype(args.backbone_dtype, args.amp, torch.device(args.device),
                                  args.method, methods.get(args.method).trains_backbone)
        # The training augmentation (built once here, which checks --aa, --remode, --device_aug).
        args.augmentation = datasets.train_transforms(
            args.recipe, args.input_size, args.norm, aa=args.aa, reprob=args.reprob,
            remode=args.remode, recount=args.recount, aug_fill=args.aug_fill, on_device=args.device_aug)
        if args.check_args and not args.eval and not args.demo:  # before torchrun starts
            kind = args.dataset or datasets.infer_dataset_kind(args.data_path)
            for split in ("train", "val", "test"):  # found, and read as the run reads them
                datasets.read_split(split, Path(args.data_path), args.data_size, args.split_dir, kind)
    except ValueError as err:
        raise ArgumentError(str(err)) from None


def with_data_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of the flags with the defaults that need the data folder filled: the data set
    kind and its DICOM rule. The caller's flags stay."""
    args = argparse.Namespace(**vars(args))
    args.dataset = args.dataset or datasets.infer_dataset_kind(args.data_path)
    args.dicom_scaling = datasets.imageio.dicom_scaling_for(args.dataset, args.dicom_scaling)
    return args


def run_settings(args: argparse.Namespace, roles: dict[str, str], world_size: int,
                 data: datasets.TrainingData) -> dict[str, Any]:
    """What makes this run this run: its RUN flags and the values derived from the DERIVED ones."""
    settings = {k: getattr(args, k) for k, role in roles.items()
                if role == command.RUN and k not in args.unread_flags}
    cache = data.train_set.cache_info
    settings.update(
        model=args.arch,  # vit_base_patch16_lora is vit_base_patch16 --method lora: one run
        lr=args.lr, global_batch=args.batch_size * args.accum_iter * world_size,
        weights_sha256=ckpt.file_sha256(args.finetune) if args.finetune else None,
        split_sha256={s: ckpt.file_sha256(d.split_file) for s, d in
                      (("train", data.train_set), ("val", data.val_set), ("test", data.test_set))},
        pixels=f"lossy {cache.get('size')}px cache" if cache.get("kind") == "lossy" else "original pixels")
    return json.loads(json.dumps(settings, default=str))  # as config.json holds them


def prepare_data(args: argparse.Namespace, dist_info: DistInfo,
                 device: torch.device) -> tuple[datasets.TrainingData, torch.nn.Module | None]:
    """The run's splits and loaders, and the augmentation to run on the device (--device_aug)."""
    seed_everything(args.seed)
    train_tf, batch_transform = args.augmentation
    eval_tf = datasets.build_transform(is_train=False, recipe=args.recipe,
                                       input_size=args.input_size, norm=args.norm)
    data = datasets.training_data(
        args.data_path, dataset=args.dataset, data_size=args.data_size, train_transform=train_tf,
        eval_transform=eval_tf, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        split_dir=args.split_dir, cache=args.cache, cache_size=args.cache_size,
        skip_bad=args.skip_bad, dicom_scaling=args.dicom_scaling,
        allow_overlap=args.allow_overlap, nb_classes=args.nb_classes, seed=args.seed,
        num_workers=args.num_workers, pin_memory=args.pin_mem, dist_info=dist_info)
    return data, batch_transform.to(device) if batch_transform is not None else None


def model_config(args: argparse.Namespace, class_names: list[str],
                 weights_sha256: str | None = None) -> mv.ModelConfig:
    """The model this run trains, from its flags (kept as JSON beside every checkpoint)."""
    mean, std = datasets.NORM_STATS[args.norm]
    return mv.ModelConfig(
        model=args.arch, method=args.method, class_names=class_names, img_size=args.input_size,
        global_pool=args.global_pool, norm=args.norm, mean=mean, std=std,
        pretrained=str(Path(args.finetune).resolve()) if args.finetune else None,
        pretrained_sha256=weights_sha256, method_settings=args.method_settings,
        drop_path_rate=args.drop_path, eval_recipe=args.recipe, dataset=args.dataset,
        model_kwargs=args.model_kwargs)


def build_model(args: argparse.Namespace, config: mv.ModelConfig, device: torch.device) -> torch.nn.Module:
    """Plain timm ViT -> pre-trained weights (checked) -> LoRA -> freeze, on the device."""
    if not args.finetune:
        logger.warning("no --finetune: the backbone is randomly initialised (demo only)")
    model = mv.build_model(config, args.finetune or None, allow_unsafe_pickle=args.unsafe_load)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if changed := lora.set_backbone_dtype_(model, args.backbone_dtype):
        logger.info("--backbone_dtype %s: %d frozen %s", args.backbone_dtype, changed,
                    "block linears compute in float8" if args.backbone_dtype == "fp8"
                    else f"tensors held in {args.backbone_dtype}")
    return model


def main(args: argparse.Namespace) -> dict:
    """Train (or only evaluate), then test the best checkpoint. Returns the test results."""
    dist_info, device = init_distributed(args.device)
    args.world_size, args.local_rank = dist_info.world_size, dist_info.local_rank  # as recorded
    setup_logging(dist_info.is_main)
    for note in args.notes:
        logger.warning(note)
    if args.weights_info:
        logger.info("%s; --norm %s", args.weights_info.summary(), args.norm)
    amp_dtype = resolve_amp(args.amp, device)
    own_demo_folder = args.demo_out or args.data_path == DEMO_DEFAULTS["data_path"]
    if own_demo_folder and dist_info.is_main and not Path(args.data_path, "train_list.txt").exists():
        datasets.make_demo_dataset(args.data_path)
        say(f"wrote the synthetic demo data set to {args.data_path}")
    if dist_info.distributed:
        dist.barrier()
    args = with_data_defaults(args)
    if args.eval:
        # --eval: test --resume on --eval_split of --data_path, in the evaluation's own folder.
        return evaluation.evaluate_checkpoint(
            args.resume, args.data_path, dataset=args.dataset, split_dir=args.split_dir,
            cache=args.cache, cache_size=args.cache_size, skip_bad=args.skip_bad,
            dicom_scaling=args.dicom_scaling if "dicom_scaling" in args.explicit else None,
            output_dir=args.output_dir if "output_dir" in args.explicit else None,
            name=args.eval_name, overwrite=args.overwrite, command=" ".join(sys.argv),
            **test_options(args, dist_info, device, amp_dtype))

    # Data first: a bad split file or image fails here, before anything is written.
    data, batch_transform = prepare_data(args, dist_info, device)
    parser = get_args_parser()
    settings = run_settings(args, command.flag_roles(parser), dist_info.world_size, data)
    # The model next: what only the weights tell (a width, a grid) fails before the run folder.
    config = model_config(args, list(data.train_set.class_names), settings["weights_sha256"])
    model = build_model(args, config, device)
    folder = RunFolder(run_path(
        args.output_dir, args.run_name, settings, weights=weights.weights_label(args.finetune) if args.finetune else "", note=args.note,
        method_tag=methods.get(args.method).tag(args.method_settings),
        demo_given=list(args.explicit) if args.demo and "run_name" not in args.explicit else None))
    made = []  # the folders this command makes: removed again if it is refused before writing
    if dist_info.is_main:
        made = probe_writable(folder.folder)
        folder.lock.acquire(" ".join(sys.argv))
    try:
        plan = decided_by_main(dist_info, lambda: folder.plan(
            settings, resume=args.resume, overwrite=args.overwrite, replace_demo=args.demo_replace))
        optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.layer_decay,
                                    lr_scale=getattr(args.method_settings, "lr_scale", None))
        # fp16 needs loss scaling on every device (small gradients underflow to zero in fp16).
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        progress = Progress(args.start_epoch)
        if plan.resume:
            progress = training.resume(folder, plan, model, optimizer, scaler, settings)
        writer = start_run(args, parser, settings, folder, plan, data, config, model,
                           progress.start_epoch, dist_info, precision_name(amp_dtype), device)
        # Every checkpoint JSON keeps the run's settings (an evaluation reports them) and its
        # DICOM rule (predict and exports decode by it).
        run = {**settings, "precision": precision_name(amp_dtype), "preset_source": args.preset_source}
        Training(LoopConfig.from_flags(vars(args)), folder, model, optimizer, train_loader=data.train_loader,
                 val_loader=data.val_loader, class_names=list(data.train_set.class_names),
                 model_config=config, device=device, dist_info=dist_info, amp_dtype=amp_dtype,
                 scaler=scaler, batch_transform=batch_transform, writer=writer,
                 settings=settings, checkpoint_extra={"run": run, "dicom_scaling": settings["dicom_scaling"]},
                 carry_from=plan.source, committed=plan.committed is not None).run(progress)
        return training.final_test(folder, plan, progress, args.epochs, data, writer, dist_info,
                                   test_options(args, dist_info, device, amp_dtype))
    finally:
        folder.lock.release()
        remove_empty(made)


def start_run(args: argparse.Namespace, parser: argparse.ArgumentParser, settings: dict, folder: RunFolder,
              plan: Plan, data: datasets.TrainingData, config: mv.ModelConfig, model: torch.nn.Module,
              start_epoch: int, dist_info: DistInfo, precision: str, device: torch.device):
    """On the main process: replace a previous run if planned, write config.json (the run's
    settings, how it executes, what it found), open train.log and TensorBoard (returned),
    and log what the run trains on."""
    if not dist_info.is_main:
        return None
    roles = command.flag_roles(parser)
    trainable = lora.trainable_report(model)
    record = {
        "settings": settings, "recipe": [k for k in command.recipe_flags(parser) if k in settings],
        "execution": json_safe({k: getattr(args, k) for k, r in roles.items() if r != command.RUN}),
        "preset_source": args.preset_source, "precision": precision, "world_size": dist_info.world_size,
        "trainable": trainable, "method_settings": json_safe(config.to_json()["method_settings"]),
        "val_undefined_classes": data.val_undefined, "notes": args.notes, "data_cache": data.cache_used,
        "resumed_from_epoch": start_epoch - 1 if plan.resume else None,
        "resumed_from": str(Path(plan.resume).resolve()) if plan.resume else None,
        **code_versions(), "command": " ".join(sys.argv)}
    folder.start(plan, record, script=args.script, overwrite=args.overwrite)
    setup_logging(True, folder.writable("train.log"))
    writer = training.open_writer(folder, args.log_dir)
    data.log_summary()
    scaling = getattr(config.method_settings, "scaling", None)
    say(trainable + (f", update scaling {scaling:g}" if scaling else ""))
    logger.info("run folder %s; %d train / %d val / %d test images; global batch %d; lr %.3g; "
                "precision %s; device %s", folder.folder, len(data.train_set), len(data.val_set),
                len(data.test_set), settings["global_batch"], args.lr, precision, device)
    return writer


def test_options(args: argparse.Namespace, dist_info: DistInfo, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """How this command tests a checkpoint (evaluation.test_checkpoint's options)."""
    return dict(device=device, dist_info=dist_info, amp_dtype=amp_dtype, split=args.eval_split,
                batch_size=args.eval_batch_size, num_workers=args.num_workers, pin_memory=args.pin_mem,
                seed=args.seed, ci_resamples=args.ci_resamples, pretrained=args.finetune or None,
                allow_unsafe_pickle=args.unsafe_load, progress=not args.no_progress,
                metadata=args.metadata, class_map=args.class_map)


def parse(argv: list[str]) -> argparse.Namespace:
    """The flags of ``argv``, resolved and checked (exit 2 with one line when they cannot run)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        return resolve_args(args, command.explicit_flags(parser, argv))
    except command.UsageError as err:
        parser.error(str(err))


def run_command(argv: list[str]) -> int:
    """Parse and check (all --check_args asks), then run."""
    args = parse(argv)
    if args.check_args:  # what the launch scripts ask before torchrun starts
        return 0
    try:
        main(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The command: one line and an exit code for every error a user can act on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return command.run(run_command, argv, prog=PROG,
                           interrupted=lambda: "continue the run with: " + command.resume_command(PROG, argv))
    finally:
        close_log_file()  # after the error line reached it


if __name__ == "__main__":
    sys.exit(cli())
