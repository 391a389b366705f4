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
import functools
import json
import logging
import re
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist

import datasets
import lora
from datasets.loader import SeededDataset, SeededSampler, build_loader  # noqa: F401  (re-exported)
from datasets.splits import check_split_overlap
from datasets.transforms import AUG_FILLS, ERASE_MODES
import models_vit_lora as mv
from engine_finetune import COMPILE_CHOICES, COMPILE_MODES, CompiledModule, NonFiniteLossError, evaluate, train_one_epoch
import checkpoints as ckpt
from util.lr_sched import adjust_learning_rate
from util.io import OutputError, json_safe
from util.runfolder import EXECUTION_ARGS, RunFolder, RunFolderError, probe_writable
from util.misc import (SUMMARY_LOGGER, DistInfo, git_commit, init_distributed, rng_state, say,
                        seed_everything, setup_logging)
from util.optim import build_optimizer, per_process_batch
from util.precision import AMP_CHOICES, precision_name, resolve_amp
from util.presets import DEMO_DEFAULTS, PRESETS, preset_help, resolve_preset

logger = logging.getLogger("main")

# The demo's run folder is output_dir/demo-<data set kind>: the NIH and RSNA demos keep apart.
REPO_ROOT = Path(__file__).resolve().parent
DEMO_RUN_PREFIX = "demo-"
# The automatic run name includes these when they differ from the paper's defaults.
AUTO_NAME_DEFAULTS = {"lora_pos": "attn", "input_size": 224}
# Flags that name a real data set or weights: without --data_path they are an error, not the demo.
REAL_RUN_FLAGS = ("preset", "finetune", "dataset", "data_size", "split_dir", "nb_classes")
# Compiling pays off (CUDA, --compile auto) from about this many optimiser steps in a run.
COMPILE_AUTO_MIN_STEPS = 5000


class ArgumentError(ValueError):
    """A flag value or combination that cannot run."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once, and none for on/off switches (their help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Errors are one line and a pointer to --help, not an 80-line usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    """All flags of the paper's scripts (same meaning) plus this tool's own."""
    # allow_abbrev=False: '--epoch 10' must not pass as --epochs while a preset's value wins
    # over it (explicit_flags matches whole option strings only).
    p = Parser(prog="main_finetune_lora.py", allow_abbrev=False,
               description="LoRA (or full, or linear-probe) fine-tuning of chest X-ray foundation "
                           "models, with the paper's recipes (--preset).",
               formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=preset_help().replace("%", "%%"))
    g.add_argument("--demo", action="store_true",
                   help="synthetic demo data + tiny ViT (the default when --data_path is not given)")
    g.add_argument("--output_dir", default="./output_dir", help="parent folder of the run folder")
    g.add_argument("--run_name", default="auto",
                   help="run folder inside --output_dir; 'auto' names it after the data set, "
                        "label fraction, weights, method, recipe and seed; '' uses --output_dir itself")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <run>/logs)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in the run folder (only the files that run wrote are removed)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="training device (cuda, cuda:1, cpu, ...)")
    g.add_argument("--seed", default=0, type=int, help="seed of the run (data order, augmentation, init)")
    g.add_argument("--resume", default="",
                   help="checkpoint to continue from (<run>/checkpoint-last), or 'auto' for the run "
                        "folder's own; with --eval: the checkpoint to evaluate")
    g.add_argument("--start_epoch", default=0, type=int,
                   help="first epoch of a fresh run (a resume takes it from the checkpoint)")
    g.add_argument("--eval", action="store_true",
                   help="only evaluate --resume on --eval_split of --data_path; results go to "
                        "<checkpoint folder>/eval/<name> (or --output_dir), never over the "
                        "training run's own files")
    g.add_argument("--eval_split", default="test", choices=["val", "test"],
                   help="the split --eval evaluates")
    g.add_argument("--eval_name", default=None,
                   help="name of the --eval output folder <checkpoint folder>/eval/<name> (default: "
                        "data folder and split file); with --output_dir, a folder inside it")
    g.add_argument("--dist_eval", action="store_true",
                   help="kept for the paper's scripts: multi-process evaluation is always "
                        "distributed and gathered exactly")
    g.add_argument("--ci_resamples", type=int, default=1000,
                   help="bootstrap resamples of the test AUROC's 95%% intervals (0: none)")
    g.add_argument("--valid_freq", type=int, default=1, help="validate every N epochs")
    g.add_argument("--log_freq", type=int, default=10, help="log the train loss every N steps")
    g.add_argument("--progress_freq", type=int, default=100,
                   help="without a terminal: a progress line (images/s, ETA) every N steps")
    g.add_argument("--no_progress", action="store_true", help="no progress bar or progress lines")
    g.add_argument("--note", type=str, default="", help="appended to the automatic run folder name")
    g.add_argument("--script", type=str, default="", help="launch script, copied into the run")
    g.add_argument("--check_args", action="store_true",
                   help="only check the flags and exit (the launch scripts do this before torchrun)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_lora", choices=sorted(mv.MODELS),
                   help="architecture; *_lora variants inject LoRA adapters")
    g.add_argument("--method", default=None, choices=list(ckpt.METHODS),
                   help="lora | full (fine-tuning) | linear (probe); default: lora for *_lora "
                        "models, full otherwise")
    g.add_argument("--finetune", default="", help="pre-trained weights (MRM.pth, CXR_MAE.pth, ...)")
    g.add_argument("--unsafe_load", action="store_true",
                   help="DANGEROUS: unpickle --finetune without the weights-only guard")
    g.add_argument("--depth", default=None, type=int,
                   help="number of transformer blocks, if not the architecture's (small tests)")
    g.add_argument("--input_size", default=224, type=int, help="image side in pixels (multiple of 16)")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    g.set_defaults(global_pool=True)
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="classify from the cls token (off by default: the paper classifies from "
                        "the mean of the patch tokens)")
    g.add_argument("--nb_classes", default=None, type=int,
                   help="number of classes (default: from the data set; checked against it)")
    g.add_argument("--lora_rank", type=int, default=4, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=float, default=32.0, help="LoRA alpha (scaling alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")
    g.add_argument("--lora_pos", type=str, default="attn",
                   help=f"where to put adapters: {sorted(lora.POSITIONS)} or a comma list")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", default=64, type=int,
                   help="batch per process (with --global_batch: derived from it)")
    g.add_argument("--global_batch", default=None, type=int,
                   help="images per optimiser step over all processes; sets the per-process "
                        "batch (and accumulation) so that any number of GPUs keeps the recipe")
    g.add_argument("--eval_batch_size", default=None, type=int, help="default: 4 x batch_size")
    g.add_argument("--epochs", default=50, type=int, help="training epochs")
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="sgd (momentum 0.9) or adamw")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute lr (sgd recipe); default: from --blr")
    g.add_argument("--blr", type=float, default=1e-3, help="lr = blr * effective batch / 256")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay (adamw)")
    g.add_argument("--min_lr", type=float, default=1e-6, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=5,
                   help="linear warm-up epochs (capped at --epochs, with a note)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--clip_grad", type=float, default=None,
                   help="clip the gradient norm to this positive value (default: no clipping)")
    g.add_argument("--backbone_dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp8"],
                   help="hold the frozen backbone in this dtype (half the memory, no per-step "
                        "cast); bf16 / fp16 need --amp of the same precision; fp8: the frozen "
                        "block linears compute in float8 (lora/fp8.py; GPUs of compute "
                        "capability 8.9+, or the CPU), any --amp; validation runs in fp8, "
                        "the saved adapter is tested and used in ordinary precision; LoRA and "
                        "head stay fp32")
    g.add_argument("--compile", default="auto", nargs="?", const="on", choices=COMPILE_CHOICES,
                   help="torch.compile the training and evaluation model: auto = on CUDA when "
                        "the run has enough steps to earn back the compile time; a bare "
                        "--compile means on")
    g.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend (aot_eager: quick checks without a compiler)")
    g.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the inductor backend: reduce-overhead replays "
                        "CUDA graphs (small batches on a GPU, where kernel launches dominate; "
                        "more GPU memory); max-autotune searches kernel configurations "
                        "(minutes more compiling)")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, more compute)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="auto: bf16 where the device computes it natively (recent GPUs, CPUs with "
                        "AMX / AVX512-BF16), fp16 with loss scaling on older GPUs, else fp32; "
                        "fp16 + GradScaler is the paper's exact mode")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="data set folder (default: the demo set)")
    g.add_argument("--dataset", default=None, choices=list(datasets.DATASET_KINDS),
                   help="default: inferred from the --data_path folder name")
    g.add_argument("--data_size", default="100%", choices=sorted(datasets.TRAIN_SPLIT_FILES),
                   help="fraction of the training labels: the train_1 / train_10 / train_list file")
    g.add_argument("--split_dir", default=None, help="folder of the split files")
    g.add_argument("--allow_overlap", action="store_true",
                   help="allow images that are both in the training split and in val / test, "
                        "or both in val and test")
    g.add_argument("--cache", default="auto", choices=["auto", "on", "lossy", "off"],
                   help="auto: the exact image cache (python -m datasets.cache) when up to date, "
                        "same tensors as the files; on: require it; lossy: a downsized cache "
                        "(--size N; other pixels, warned and recorded); off: the files")
    g.add_argument("--cache_size", type=int, default=None,
                   help="with --cache lossy: which downsized cache (its shorter side)")
    g.add_argument("--dicom_scaling", default=None, choices=list(datasets.DICOM_SCALINGS),
                   help="DICOM intensity: paper = x * 255 / max (the default for rsna), minmax = "
                        "VOI window or min-max stretch (the default otherwise); --eval and "
                        "predict default to the checkpoint's")
    g.add_argument("--skip_bad", action="store_true", help="skip unreadable images, and report them")
    g.add_argument("--norm", default=None, choices=sorted(datasets.NORM_STATS),
                   help="input normalisation; default follows the pre-trained weights")
    g.add_argument("--recipe", default=None, choices=["sgd", "adamw"],
                   help="augmentation recipe; default follows --optimizer as in the paper")
    g.add_argument("--device_aug", action="store_true",
                   help="run the train augmentation on uint8 batches on the training device instead "
                        "of in the loader workers: flip / normalise (sgd recipe), plus RandAugment "
                        "--aa and random erasing (adamw recipe); the random resized crop stays in "
                        "the loader, from the full-resolution image")
    g.add_argument("--aug_fill", default="paper", choices=list(AUG_FILLS),
                   help="adamw recipe: fill of RandAugment's rotate / shear / translate: 'paper' "
                        "(as the paper's pipeline: grey 36 for the mrm / cxr_mae statistics, timm's "
                        "ImageNet mean with --norm imagenet) or 'neutral' (the normalisation's mid grey)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1",
                   help="RandAugment policy of the adamw recipe (timm syntax)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (adamw recipe)")
    g.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--num_workers", default=min(8, os.cpu_count() or 1), type=int,
                   help="data loading processes")
    g.add_argument("--pin_mem", action="store_true", default=torch.cuda.is_available(),
                   help="pinned host memory for faster copies to the GPU (on by default with CUDA)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="no pinned memory")

    # Flags of the reference code kept so that its scripts run unchanged.
    g = p.add_argument_group("accepted for compatibility")
    for flag in ("--smoothing", "--mixup", "--cutmix"):
        g.add_argument(flag, type=float, default=0.0, help="must be 0 (multi-label BCE)")
    g.add_argument("--color_jitter", type=float, default=None, help="unused (RandAugment)")
    g.add_argument("--resplit", action="store_true", help="unused")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None, help="unused")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="unused")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="unused")
    g.add_argument("--mixup_mode", type=str, default="batch", help="unused")
    g.add_argument("--from_begin", action="store_true", help="unused")
    g.add_argument("--world_size", default=1, type=int, help="set by torchrun")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by torchrun")
    g.add_argument("--dist_on_itp", action="store_true", help="unused")
    g.add_argument("--dist_url", default="env://", help="unused (torchrun sets the rendezvous)")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the flags written on the command line (so presets do not override them)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return {a.dest for a in parser._actions if given & set(a.option_strings)}


def infer_norm(finetune: str) -> str | None:
    """The reference code's rule, made explicit: the normalisation named by the weights file."""
    name = Path(finetune).name.lower()
    if "mrm" in name:
        return "mrm"
    if "cxr_mae" in name or "cxrmae" in name:
        return "cxr_mae"
    if "imagenet" in name or "mae_pretrain" in name:
        return "imagenet"
    return None


def resolve_args(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """Apply preset / demo defaults and derived values; raise ArgumentError on bad combinations."""
    def fill(values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key not in explicit:
                setattr(args, key, value)

    args.notes = []  # said once in the log when the run starts
    args.preset_source = None
    if args.preset:
        method = args.method or ("lora" if args.model in mv.LORA_MODELS else "full")
        values, args.preset_source = resolve_preset(args.preset, method)
        fill(values)
    if not args.demo and args.data_path is None and not args.eval:
        # The demo is the default only for a command that names no data or weights: a real
        # run's flags without --data_path are a mistake, not a request for synthetic data.
        real = [f for f in REAL_RUN_FLAGS if f in explicit]
        if real:
            raise ArgumentError(f"--{real[0]} needs --data_path (the data set to train on); "
                                "pass --demo to run the synthetic demo instead")
        args.demo = True
    # A demo run replaces the previous demo run, but only in its own default folder.
    args.demo_replace = bool(args.demo and not {"output_dir", "run_name"} & explicit)
    if args.demo:
        demo = dict(DEMO_DEFAULTS)
        if "data_path" in explicit:  # a data set of the user's (e.g. datasets.demo --rsna): its own kind
            demo.pop("dataset")
        fill(demo)
        if args.finetune and "model" not in explicit:
            args.model = "vit_base_patch16_lora"
    if args.data_path is None:
        raise ArgumentError("--data_path is required with --eval (the data to evaluate on)")
    if args.resume == "auto" and args.overwrite:
        raise ArgumentError("--resume auto continues the run in the folder, --overwrite replaces "
                            "it: give one of them")

    if args.method is None:
        args.method = "lora" if args.model in mv.LORA_MODELS else "full"
    elif args.method != "lora" and args.model in mv.LORA_MODELS:
        raise ArgumentError(f"--method {args.method} contradicts --model {args.model}: use "
                            f"--model {mv.LORA_MODELS[args.model]}")
    args.arch = mv.LORA_MODELS.get(args.model, args.model)
    args.model_kwargs = {"depth": args.depth} if args.depth else {}
    if args.method == "lora":
        try:
            lora.parse_lora_pos(args.lora_pos)
        except ValueError as err:
            raise ArgumentError(f"--lora_pos: {err}") from None
        if args.lora_rank <= 0:
            raise ArgumentError(f"--lora_rank must be positive, got {args.lora_rank}")
        if not 0 <= args.lora_dropout < 1:
            raise ArgumentError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    for flag in ("smoothing", "mixup", "cutmix"):
        if getattr(args, flag):
            raise ArgumentError(f"--{flag} {getattr(args, flag)} is not supported: the paper "
                                "trains multi-label BCE without it (pass 0)")
    if args.ci_resamples < 0:
        raise ArgumentError(f"--ci_resamples must be 0 (off) or positive, got {args.ci_resamples}")
    for flag in ("batch_size", "epochs", "accum_iter", "valid_freq", "input_size", "log_freq"):
        if getattr(args, flag) <= 0:
            raise ArgumentError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.input_size % 16:
        raise ArgumentError(f"--input_size {args.input_size} is not a multiple of the patch size 16")
    if args.warmup_epochs < 0:
        raise ArgumentError(f"--warmup_epochs must not be negative, got {args.warmup_epochs}")
    if args.warmup_epochs > args.epochs:
        args.notes.append(f"--warmup_epochs {args.warmup_epochs:g} is longer than the run: capped "
                          f"at --epochs {args.epochs}")
        args.warmup_epochs = float(args.epochs)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if "batch_size" in explicit and "global_batch" not in explicit:
        args.global_batch = None  # the user's per-process batch wins over a preset's global one
    if args.global_batch is not None:
        try:
            batch, args.accum_iter = per_process_batch(args.global_batch, world, args.accum_iter)
        except ValueError as err:
            raise ArgumentError(f"--global_batch: {err}") from None
        if "batch_size" in explicit and args.batch_size != batch:
            raise ArgumentError(f"--batch_size {args.batch_size} contradicts --global_batch "
                                f"{args.global_batch} over {world} processes (gives {batch})")
        args.batch_size = batch
    if args.progress_freq <= 0:
        raise ArgumentError(f"--progress_freq must be positive, got {args.progress_freq}")
    check_values(args, world)
    if args.compile_mode != "default" and args.compile_backend != "inductor":
        raise ArgumentError(f"--compile_mode {args.compile_mode} is a mode of the inductor backend, "
                            f"not of --compile_backend {args.compile_backend}")
    if args.eval and not args.resume:
        raise ArgumentError("--eval needs --resume <checkpoint> (the model to evaluate)")
    if args.finetune and not Path(args.finetune).is_file():
        raise ArgumentError(f"--finetune: file not found: {args.finetune}")
    if not args.finetune and not args.demo and not args.eval:
        raise ArgumentError("--finetune is required (the pre-trained weights); without it the "
                            "backbone would be random. Use --demo for a run on synthetic data.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    named = infer_norm(args.finetune) if args.finetune else None
    if args.preset and named and named != args.norm and "norm" not in explicit:
        # A preset is the recipe of one kind of weights; other weights are another setting.
        raise ArgumentError(f"--preset {args.preset} is the recipe for weights normalised as "
                            f"{args.norm!r}, but --finetune {args.finetune} is named as {named!r} "
                            "weights: choose the preset of those weights, or pass --norm to say "
                            "which normalisation they need")
    if args.norm is None:
        args.norm = infer_norm(args.finetune) if args.finetune else "mrm"
        if args.norm is None:
            raise ArgumentError(f"--norm: cannot tell the normalisation of {args.finetune}; pass "
                                "--norm mrm, cxr_mae or imagenet")
    if args.backbone_dtype != "fp32":
        if args.method == "full":
            raise ArgumentError(f"--backbone_dtype {args.backbone_dtype} needs a frozen backbone "
                                "(--method lora or linear), not full fine-tuning")
        if args.backbone_dtype == "fp8":  # products in float8 whatever the autocast dtype
            try:
                lora.check_fp8_support(torch.device(args.device))
            except ValueError as err:
                raise ArgumentError(str(err)) from None
        elif args.amp != args.backbone_dtype:
            raise ArgumentError(f"--backbone_dtype {args.backbone_dtype} needs --amp "
                                f"{args.backbone_dtype} (got --amp {args.amp})")
    args.recipe = args.recipe or args.optimizer
    if args.device_aug and args.recipe == "adamw":
        from datasets.device_aug import build_device_augment

        try:  # the device path reads --aa, --remode, --recount itself: refuse what it cannot run
            build_device_augment(args.recipe, args.input_size, args.norm, aa=args.aa,
                                 reprob=args.reprob, remode=args.remode, recount=args.recount,
                                 aug_fill=args.aug_fill)
        except ValueError as err:
            raise ArgumentError(f"--device_aug: {err}") from None
    args.eval_batch_size = args.eval_batch_size or 4 * args.batch_size
    return args


def check_values(args: argparse.Namespace, world: int) -> None:
    """Refuse numbers no run can use (each message names the flag and its value)."""
    def refuse(flag: str, rule: str) -> None:
        raise ArgumentError(f"--{flag} {getattr(args, flag)!r} is not valid: {rule}")

    if args.lr is not None and not args.lr > 0:
        refuse("lr", "the learning rate must be positive")
    if not args.blr > 0:
        refuse("blr", "the base learning rate must be positive")
    if not args.weight_decay >= 0:
        refuse("weight_decay", "must be 0 or positive")
    if not 0 < args.layer_decay <= 1:
        refuse("layer_decay", "the per-layer lr factor must be in (0, 1] (1: no decay)")
    lr = args.lr if args.lr is not None else args.blr * args.batch_size * args.accum_iter * world / 256
    if not args.min_lr >= 0:
        refuse("min_lr", "must be 0 or positive")
    if args.min_lr > lr:
        refuse("min_lr", f"the floor of the cosine schedule is above the lr {lr:g} (the "
                         "schedule would rise instead of decay)")
    if not 0 <= args.drop_path < 1:
        refuse("drop_path", "the stochastic depth rate must be in [0, 1)")
    if not 0 <= args.reprob <= 1:
        refuse("reprob", "a probability must be in [0, 1]")
    if args.remode not in ERASE_MODES:
        refuse("remode", "expected pixel, rand or const")
    if args.recount < 1:
        refuse("recount", "at least 1 erased box")
    if args.method == "lora" and not args.lora_alpha > 0:
        refuse("lora_alpha", "the LoRA scale alpha / r must be positive")
    if args.clip_grad is not None and not args.clip_grad > 0:
        refuse("clip_grad", "the largest gradient norm must be positive (leave the flag out for "
                            "no clipping)")
    if args.eval_batch_size is not None and args.eval_batch_size <= 0:
        refuse("eval_batch_size", "must be positive (leave it out for 4 x --batch_size)")
    if args.num_workers < 0:
        refuse("num_workers", "must be 0 (load in the main process) or positive")
    if args.cache_size is not None and args.cache_size <= 0:
        refuse("cache_size", "must be positive")
    try:
        torch.device(args.device)
    except RuntimeError:
        refuse("device", "expected a torch device such as cpu, cuda or cuda:1")
    if args.aa:
        try:  # the adamw recipe's RandAugment: a policy timm cannot parse fails here, not later
            datasets.build_transform(is_train=True, recipe="adamw", input_size=args.input_size,
                                     norm="mrm", aa=args.aa, reprob=0.0)
        except (AssertionError, ValueError, KeyError, IndexError) as err:
            refuse("aa", f"not a RandAugment policy timm can read ({err}); e.g. "
                         "rand-m9-mstd0.5-inc1")


def weights_name(finetune: str) -> str:
    """A short name of the pre-trained weights for run names and tables ('random' without)."""
    return Path(finetune).stem.lower() if finetune else "random"


def run_folder(args: argparse.Namespace, eff_batch: int) -> Path:
    """The run folder: named after what makes a run distinct, or as given.

    The automatic name is <dataset>-<fraction>-<weights>-<method>[-r<rank>]-<optimizer>
    -lr<lr>-e<epochs>-b<global batch>-s<seed>[-<note>]: runs that differ in data set, label
    fraction, weights, method, recipe or seed never share a folder.
    """
    if args.run_name != "auto":
        return Path(args.output_dir) / args.run_name if args.run_name else Path(args.output_dir)
    method = args.method + (f"-r{args.lora_rank}" if args.method == "lora" else "")
    if args.method == "lora" and args.lora_pos != AUTO_NAME_DEFAULTS["lora_pos"]:
        method += f"-{args.lora_pos.replace(',', '+')}"
    parts = [args.dataset or datasets.infer_dataset_kind(args.data_path),
             args.data_size.replace("%", "pct"), weights_name(args.finetune), method,
             f"{args.optimizer}-lr{args.lr:g}-e{args.epochs}-b{eff_batch}", f"s{args.seed}"]
    if args.input_size != AUTO_NAME_DEFAULTS["input_size"]:
        parts.insert(4, f"{args.input_size}px")
    if args.note:
        parts.append(args.note)
    return Path(args.output_dir) / "_".join(parts)


RUN_MARKERS = ("config.json", "log.txt", "checkpoint-last.json", "commit.json")


def run_in_folder(out: Path) -> dict | None:
    """What the folder's existing run says about itself (its config.json), or None if no run."""
    if not any((out / m).exists() for m in RUN_MARKERS):
        return None
    try:
        return json.loads((out / "config.json").read_text()) or {}
    except (OSError, ValueError):
        return {}


def check_run_folder(out: Path, args: argparse.Namespace, committed: dict | None, *,
                     resume: str | None = None, overwrite: bool | None = None) -> None:
    """Refuse to write into a folder that holds another run, and say what would be right.

    ``resume`` / ``overwrite``: what --resume / --overwrite came to (default: the flags)."""
    resume = args.resume if resume is None else resume
    overwrite = args.overwrite if overwrite is None else overwrite
    old = run_in_folder(out)
    if old is None or overwrite:
        return
    if resume:
        source = resumed_folder(resume)
        if source == out.resolve():
            return
        markers = [m for m in RUN_MARKERS if (out / m).exists()]
        raise ArgumentError(
            f"--resume {resume} continues the run of {source} in {out}, but {out} already holds "
            f"a run ({', '.join(markers)}): its results would be mixed with this one's. Choose "
            "an empty --output_dir / --run_name, or --overwrite to replace that run"
            + (" (if it is this run's own earlier continuation, --resume auto continues it)"
               if committed is not None else ""))
    old_args = old.get("args", {})
    differ = differing_settings(old_args, args)
    done = committed is not None and committed["epoch"] + 1 >= int(old_args.get("epochs", -1))
    if not old_args:
        hint = "choose another --output_dir / --run_name, or --overwrite to replace it"
    elif differ:
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        hint = (f"it is a different run ({shown}): give this one another --run_name or --note "
                "to keep both, or --overwrite to replace that run")
        if (len(differ) == 1 and differ[0].startswith("--epochs ") and committed is not None
                and args.epochs > int(old_args.get("epochs", args.epochs))):
            hint += f"; or --resume auto to continue it to {args.epochs} epochs"
    elif done:
        hint = ("that run with these settings is complete: --overwrite to run it again, or "
                "another --note / --seed for a new run beside it")
    else:
        hint = "that run with these settings did not finish: --resume auto continues it"
    markers = [m for m in RUN_MARKERS if (out / m).exists()]
    raise ArgumentError(f"output folder {out} already holds a run ({', '.join(markers)}): {hint}")


def resumed_folder(resume: str) -> Path:
    """The run folder of a --resume checkpoint (resolved)."""
    return ckpt.checkpoint_paths(resume)[1].parent.resolve()


def model_config_from_args(args: argparse.Namespace, class_names: list[str]) -> mv.ModelConfig:
    """The model this run trains, from its flags (kept as JSON beside every checkpoint)."""
    lora_spec = None
    if args.method == "lora":
        lora_spec = mv.LoRASpec(rank=args.lora_rank, alpha=args.lora_alpha,
                                dropout=args.lora_dropout, pos=args.lora_pos)
    pretrained = str(Path(args.finetune).resolve()) if args.finetune else None
    mean, std = datasets.NORM_STATS[args.norm]
    return mv.ModelConfig(
        model=args.arch, method=args.method, class_names=class_names, img_size=args.input_size,
        global_pool=args.global_pool, norm=args.norm, mean=mean, std=std, pretrained=pretrained,
        pretrained_sha256=ckpt.file_sha256(pretrained) if pretrained else None, lora=lora_spec,
        drop_path_rate=args.drop_path, eval_recipe=args.recipe, dataset=args.dataset,
        model_kwargs=args.model_kwargs)


def build_model(args: argparse.Namespace, config: mv.ModelConfig) -> torch.nn.Module:
    """Plain timm ViT -> pre-trained weights (checked) -> LoRA -> freeze, in that order."""
    if not args.finetune:
        logger.warning("no --finetune: the backbone is randomly initialised (demo only)")
    model = mv.build_model(config, args.finetune or None, allow_unsafe_pickle=args.unsafe_load)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def write_predictions(path: Path, dataset, indices: np.ndarray, probs: np.ndarray,
                      targets: np.ndarray) -> None:
    """Per-image predictions: path, one probability per class, then the labels."""
    from util.reports import write_predictions_csv

    write_predictions_csv(path, [dataset.paths[i] for i in indices], probs,
                          list(dataset.class_names), labels=targets)


def default_eval_name(data_path: str | Path, split_file: str | Path) -> str:
    """The --eval output folder's name: the data folder, the split folder if elsewhere, the split file."""
    data, split = Path(data_path).resolve(), Path(split_file).resolve()
    parts = [data.name]
    if split.parent != data:
        parts.append(split.parent.name)
    parts.append(split.stem)
    return "-".join(parts)


def run_settings(args: argparse.Namespace, eff_batch: int, amp_dtype: torch.dtype | None,
                 cache_used: dict | None = None, dicom_scaling_used: str | None = None) -> dict:
    """What a trained checkpoint was trained with, beyond the model: kept in its JSON, so an
    evaluation of it reports the training run's settings, not the evaluating command's."""
    return {"dataset": args.dataset, "data_size": args.data_size, "seed": args.seed,
            "preset": args.preset, "preset_source": getattr(args, "preset_source", None),
            "optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs,
            "global_batch": eff_batch, "precision": precision_name(amp_dtype),
            "weights": weights_name(args.finetune), "cache": cache_used,
            "dicom_scaling": dicom_scaling_used}


def undefined_classes(targets: np.ndarray, class_names: list[str]) -> list[str]:
    """Classes with a single label value in ``targets``: they have no AUROC."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return list(class_names)
    return [n for k, n in enumerate(class_names) if targets[:, k].min() == targets[:, k].max()]


def test_and_report(args: argparse.Namespace, checkpoint: Path, out: Path, dist_info: DistInfo,
                    device: torch.device, amp_dtype: torch.dtype | None,
                    dataset: datasets.ChestXrayDataset | None = None,
                    folder: RunFolder | None = None, eval_info: dict | None = None) -> dict:
    """Evaluate a saved checkpoint on the test (or val) split and write every report into ``out``.

    The results carry the training run's settings from the checkpoint's JSON; every file
    written is recorded in ``folder``'s list of the run's own files.
    """
    model, config = ckpt.load_trained(checkpoint, pretrained=args.finetune or None, device=device,
                                      allow_unsafe_pickle=args.unsafe_load)
    lora.merge(model)  # inference at the cost of a plain ViT
    if dataset is None:
        dataset = build_eval_dataset(args, args.eval_split, config)
    if list(dataset.class_names) != config.class_names:
        raise ArgumentError(f"{checkpoint} was trained on classes {config.class_names}, "
                            f"but {dataset.split_file} has {dataset.class_names}")
    loader = build_loader(dataset, dist_info, train=False, batch_size=args.eval_batch_size,
                          seed=args.seed, num_workers=args.num_workers, pin_memory=args.pin_mem)
    stats = evaluate(model, loader, device, dataset.class_names, amp_dtype,
                     progress=not args.no_progress and dist_info.is_main)
    trainable, total = lora.count_parameters(model)  # load_trained restores the trained set
    split = args.eval_split
    trained = config.extras.get("run") or legacy_run_settings(checkpoint)
    results = {
        "split": split, "dataset": trained.get("dataset") or config.dataset or dataset.kind,
        "data_size": trained.get("data_size"), "seed": trained.get("seed"),
        "weights": Path(config.pretrained).stem if config.pretrained else "none",
        "method": config.method, "model": config.model,
        "lora_rank": config.lora.rank if config.lora else None,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "num_images": stats["num_images"], "loss": stats["loss"],
        "mean_auroc": stats["mean_auroc"], "mean_auprc": stats["mean_auprc"],
        "auroc": json_safe(stats["auroc"]), "auprc": json_safe(stats["auprc"]),
        "undefined_classes": undefined_classes(stats["targets"], list(dataset.class_names)),
        "class_names": list(dataset.class_names), "checkpoint": str(checkpoint),
        "epoch": config.extras.get("epoch"), "training": trained,
        "precision": precision_name(amp_dtype), "split_file": str(dataset.split_file),
        "data_cache": dataset.cache_info, "dicom_scaling": dataset.dicom_scaling,
        # The split's own size: with --skip_bad the score covers fewer images than it lists.
        "split_images": len(dataset) + len(dataset.skipped),
    }
    if dataset.skipped:
        results["skipped"] = [{"line": b.line, "path": b.path, "reason": b.reason}
                              for b in dataset.skipped]
    if eval_info:
        results["evaluation"] = eval_info
    if args.ci_resamples > 0 and dist_info.is_main:
        from util.stats import auroc_intervals

        # A fixed seed, not the run's: runs of different training seeds share the resamples.
        results["intervals"] = auroc_intervals(stats["targets"], stats["probs"],
                                               list(dataset.class_names),
                                               resamples=args.ci_resamples, seed=0)
    if dist_info.is_main:
        stem = f"results_{split}"
        ckpt.write_json(out / f"{stem}.json", results)
        write_predictions(out / f"predictions_{split}.csv", dataset, stats["indices"],
                          stats["probs"], stats["targets"])
        from util import reports  # matplotlib is imported only when reports are written

        reports.write_auroc_tables(results, out, stem=stem)
        reports.save_roc_curves(stats["targets"], stats["probs"], dataset.class_names,
                                out / f"roc_{split}.png")
        if folder is not None:
            folder.record(*(p for p in out.iterdir() if p.is_file() and (
                p.name.startswith((stem, f"predictions_{split}", f"roc_{split}")))))
        if results["undefined_classes"]:
            say(f"{split}: no AUROC for {', '.join(results['undefined_classes'])} (a single "
                "label value in the evaluated images); the mean is over the other classes")
        say(f"{split} mean AUROC {100 * results['mean_auroc']:.2f} over {results['num_images']} "
            f"images ({checkpoint})")
        table = out / f"{stem}_auroc.md"
        if table.exists():
            say(table.read_text())
    return results


def legacy_run_settings(checkpoint: Path) -> dict:
    """Training settings of a checkpoint written before they were kept in its JSON: from the
    run's config.json beside it, when there is one."""
    config_json = ckpt.checkpoint_paths(checkpoint)[1].parent / "config.json"
    try:
        old = json.loads(config_json.read_text()).get("args", {})
    except (OSError, ValueError):
        return {}
    return {k: old.get(k) for k in ("dataset", "data_size", "seed", "preset", "optimizer", "lr",
                                    "epochs")}


def build_eval_dataset(args: argparse.Namespace, split: str,
                       config: mv.ModelConfig) -> datasets.ChestXrayDataset:
    """The val or test set of --data_path with a checkpoint's evaluation transform and DICOM rule."""
    transform = datasets.build_transform(is_train=False, recipe=config.eval_recipe,
                                         input_size=config.img_size, norm=config.norm)
    scaling = args.dicom_scaling or config.dicom_scaling
    if args.dicom_scaling and config.dicom_scaling not in (None, args.dicom_scaling):
        logger.warning("--dicom_scaling %s differs from the rule the checkpoint was trained with "
                       "(%s): its DICOM inputs look different now", args.dicom_scaling,
                       config.dicom_scaling)
    return datasets.build_dataset(split, args.data_path, dataset=args.dataset, transform=transform,
                                  split_dir=args.split_dir, cache=args.cache, skip_bad=args.skip_bad,
                                  cache_size=args.cache_size, dicom_scaling=scaling,
                                  verify_images="header")


def evaluate_checkpoint(args: argparse.Namespace, dist_info: DistInfo, device: torch.device,
                        amp_dtype: torch.dtype | None) -> dict:
    """--eval: test a checkpoint on --data_path into its own folder, never over the run's files."""
    checkpoint = Path(args.resume)
    config = ckpt.read_config(checkpoint)
    dataset = build_eval_dataset(args, args.eval_split, config)
    name = args.eval_name or default_eval_name(args.data_path, dataset.split_file)
    if "output_dir" in args.explicit:  # the user's folder (with --eval_name: a folder inside it)
        out = Path(args.output_dir) / args.eval_name if args.eval_name else Path(args.output_dir)
    else:
        out = ckpt.checkpoint_paths(checkpoint)[1].parent / "eval" / name
    if any((out / m).exists() for m in ("commit.json", "checkpoint-last.json", "log.txt")):
        raise ArgumentError(f"--output_dir {out} is a training run's folder: --eval writes its own "
                            "folder (leave out --output_dir for <run>/eval/<name>)")
    folder = RunFolder(out)
    if dist_info.is_main:
        probe_writable(out)
        folder.lock.acquire(" ".join(sys.argv))
    try:
        stem = f"results_{args.eval_split}.json"
        if (out / stem).exists():
            if not args.overwrite:
                raise ArgumentError(f"{out} already holds an evaluation ({stem}): pass --eval_name "
                                    "<name> to keep both, or --overwrite to replace it")
            if dist_info.is_main:
                folder.remove_own_files()
        info = {"data_path": str(Path(args.data_path).resolve()),
                "split_file": str(dataset.split_file), "name": name, "command": " ".join(sys.argv)}
        return test_and_report(args, checkpoint, out, dist_info, device, amp_dtype,
                               dataset=dataset, folder=folder, eval_info=info)
    finally:
        folder.lock.release()


# What does not make a folder's run another run: where and how it executed, and what is
# compared on its own (the split files' hashes on resume; the values a preset filled in).
# The seed is not among them: it is part of a run.
NOT_A_SETTING = EXECUTION_ARGS | {"split_sha256", "preset_source", "eval_split"}


def differing_settings(old_args: dict, args: argparse.Namespace) -> list[str]:
    """The settings (``--flag old -> new``) in which a folder's existing run differs from this
    command, among the arguments both record; where and how a run executes is left out."""
    new = json.loads(json.dumps(vars(args), default=str))  # as config.json holds them
    return [f"--{k} {old_args[k]!r} -> {new[k]!r}" for k in sorted(old_args)
            if k in new and k not in NOT_A_SETTING and old_args[k] != new[k]]


def decide_compile(args: argparse.Namespace, device: torch.device, total_steps: int) -> bool:
    """--compile on/off, or auto: on CUDA once the run is long enough to earn back the compile."""
    if args.compile == "on":
        return True
    if args.compile == "off":
        return False
    return device.type == "cuda" and total_steps >= COMPILE_AUTO_MIN_STEPS


def main(args: argparse.Namespace) -> dict:
    """Train (or only evaluate), then test the best checkpoint. Returns the test results."""
    dist_info, device = init_distributed(args.device)
    setup_logging(dist_info.is_main)
    for note in args.notes:
        logger.warning(note)
    amp_dtype = resolve_amp(args.amp, device)
    if args.demo and dist_info.is_main and not Path(args.data_path, "train_list.txt").exists():
        logger.info("writing the synthetic demo data set to %s", args.data_path)
        datasets.make_demo_dataset(args.data_path)
    if dist_info.distributed:
        dist.barrier()
    eff_batch = args.batch_size * args.accum_iter * dist_info.world_size
    args = with_data_defaults(args, eff_batch)

    if args.eval:
        return evaluate_checkpoint(args, dist_info, device, amp_dtype)

    out = run_folder(args, eff_batch)
    folder = RunFolder(out)
    if dist_info.is_main:
        probe_writable(out)
        folder.lock.acquire(" ".join(sys.argv))
    try:
        plan = plan_run(args, out, folder, dist_info, eff_batch)
        # Data first: a bad split file or image fails here, before anything is written.
        data = prepare_data(args, dist_info, device)
        setup = setup_training(args, plan, data, dist_info, device, amp_dtype)
        return fit(args, plan, data, setup, folder, dist_info, device, amp_dtype)
    finally:
        folder.lock.release()


def with_data_defaults(args: argparse.Namespace, eff_batch: int) -> argparse.Namespace:
    """A copy of the flags with the defaults that need the data folder or the process count
    filled: the data set kind, the demo's run name, lr from --blr. The caller's flags stay."""
    args = argparse.Namespace(**vars(args))
    args.dataset = args.dataset or datasets.infer_dataset_kind(args.data_path)
    if args.demo and "run_name" not in args.explicit:
        args.run_name = DEMO_RUN_PREFIX + args.dataset
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    return args


@dataclass
class RunPlan:
    """Where and how this training run goes, beyond its flags: the run folder, its committed
    epoch, and what --resume auto / --overwrite came to for that folder."""

    out: Path
    eff_batch: int
    committed: dict | None
    resume: str  # the checkpoint continued from; '' for a fresh start
    overwrite: bool
    log_dir: Path  # TensorBoard's folder
    # The folder of a run continued into this other folder: its best checkpoint is carried
    # over with the first commit, so the final test is of this run's best model.
    source: Path | None = None


@dataclass
class RunData:
    """The data sets and loaders of a training run, and what the data step found."""

    train_set: datasets.ChestXrayDataset
    val_set: datasets.ChestXrayDataset
    test_set: datasets.ChestXrayDataset
    train_loader: Any
    val_loader: Any
    batch_transform: Any
    class_names: list[str]
    val_undefined: list[str]

    @property
    def cache_used(self) -> dict:
        """Which image cache each split read (recorded in config.json and the results)."""
        return {"train": self.train_set.cache_info, "val": self.val_set.cache_info,
                "test": self.test_set.cache_info}

    @functools.cached_property
    def split_sha256(self) -> dict:
        """SHA-256 of each split file: what identifies the data a run trains and selects on
        (read once: the config and the resume check both use it)."""
        return {"train": ckpt.file_sha256(self.train_set.split_file),
                "val": ckpt.file_sha256(self.val_set.split_file),
                "test": ckpt.file_sha256(self.test_set.split_file)}

    @property
    def dicom_scaling_used(self) -> str | None:
        """The DICOM intensity rule of the training images."""
        return self.train_set.dicom_scaling


@dataclass
class TrainSetup:
    """The model, its config and optimiser state at the first epoch to run."""

    config: mv.ModelConfig
    model: torch.nn.Module
    train_model: torch.nn.Module
    eval_model: torch.nn.Module
    params: list
    param_line: str
    optimizer: torch.optim.Optimizer
    scaler: Any
    start_epoch: int
    best: float
    best_epoch: int | None
    history: list[dict]


def run_args(args: argparse.Namespace, plan: RunPlan, data: RunData) -> dict:
    """The run's arguments as recorded in config.json and the resume state (same keys as
    ever: the resolved --resume / --overwrite and the data cache and DICOM rule used)."""
    recorded = {k: v for k, v in vars(args).items() if k not in ("explicit", "notes")}
    recorded.update(resume=plan.resume, overwrite=plan.overwrite, cache_used=data.cache_used,
                    dicom_scaling_used=data.dicom_scaling_used, split_sha256=data.split_sha256)
    return recorded


def other_length_hint(out: Path) -> str:
    """For an automatic run name: the same run with another --epochs beside it, if any (a
    longer run continues it with --resume <that>/checkpoint-last, not --resume auto)."""
    match = re.search(r"-e(\d+)-", out.name)
    if match is None or not out.parent.is_dir():
        return ""
    pattern = re.compile(re.escape(out.name[:match.start()]) + r"-e\d+-" + re.escape(out.name[match.end():]) + "$")
    others = sorted(p for p in out.parent.iterdir()
                    if p != out and pattern.match(p.name) and (p / "checkpoint-last.json").is_file())
    if not others:
        return ""
    return (f" (the same run with other --epochs is in {others[-1]}: --resume "
            f"{others[-1] / 'checkpoint-last'} continues it)")


def continued_from(old: dict | None, out: Path) -> str | None:
    """The checkpoint in another folder that the run in ``out`` (its config.json: ``old``)
    was resuming from, if that checkpoint is still there; else None."""
    earlier = (old or {}).get("resumed_from")
    if not isinstance(earlier, str) or not earlier:
        return None
    if Path(earlier).parent.resolve() == out.resolve():
        return None
    return earlier if ckpt.checkpoint_paths(earlier)[1].is_file() else None  # stem or suffixed


def plan_run(args: argparse.Namespace, out: Path, folder: RunFolder, dist_info: DistInfo,
             eff_batch: int) -> RunPlan:
    """Recover the locked run folder, resolve --resume auto against it, refuse a foreign run."""
    old = run_in_folder(out)
    resume, overwrite = args.resume, args.overwrite
    own_resume = resume == "auto" or (bool(resume) and resumed_folder(resume) == out.resolve())
    if overwrite and own_resume:
        raise ArgumentError(f"--resume {resume} continues the run in {out}, --overwrite replaces "
                            "it: give one of them")
    old_demo = old is not None and (old.get("args") or {}).get("demo") is True
    if args.demo_replace and not resume and old_demo:
        overwrite = True  # the previous demo run in the demo's own folder
    # A run that --overwrite replaces need not be intact (a damaged one must not block it).
    replacing = overwrite and not own_resume
    committed = folder.recover(verify=not replacing) if dist_info.is_main else folder.read_commit()
    if resume == "auto":
        if committed is not None or (out / "checkpoint-last.json").exists():
            resume = str(out / "checkpoint-last")
        elif old is not None and (not old.get("args") or differing_settings(old["args"], args)):
            differ = differing_settings(old.get("args") or {}, args)
            raise ArgumentError(f"--resume auto: {out} holds another run with no completed epoch "
                                f"({', '.join(differ[:4]) or 'other settings'}): give this one "
                                "another --run_name or --note")
        elif continued_from(old, out) is not None:
            # A continuation of another run, stopped before its first commit here: continue
            # that run again (its files here are replaced), not start from the weights.
            resume, own_resume, overwrite = continued_from(old, out), False, True
            logger.warning("--resume auto: %s has no completed epoch; it continued %s, which "
                           "this run continues again", out, resume)
        else:
            resume = ""
            overwrite = overwrite or old is not None
            logger.warning("--resume auto: %s has no completed epoch to continue; starting %s%s",
                           out, "the run afresh there" if old is not None else "a new run",
                           other_length_hint(out))
    check_run_folder(out, args, committed, resume=resume, overwrite=overwrite)
    source = resumed_folder(resume) if resume and not own_resume else None
    if overwrite and not (resume and own_resume):
        committed = None  # the replaced run's commit is not this run's
    return RunPlan(out=out, eff_batch=eff_batch, committed=committed, resume=resume,
                   overwrite=overwrite, log_dir=Path(args.log_dir) if args.log_dir else out / "logs",
                   source=source)


def prepare_data(args: argparse.Namespace, dist_info: DistInfo, device: torch.device) -> RunData:
    """Training, validation and test sets (evaluation images' headers checked) and loaders."""
    seed_everything(args.seed)
    batch_transform = None
    if args.device_aug:
        from datasets.device_aug import build_device_augment, build_uint8_crop_transform

        # The crop is taken from the full-resolution image in the loader, as the CPU recipe
        # takes it; flip, RandAugment, erasing and normalisation run on the device.
        train_tf = build_uint8_crop_transform(args.recipe, args.input_size)
        batch_transform = build_device_augment(
            args.recipe, args.input_size, args.norm, aa=args.aa, reprob=args.reprob,
            remode=args.remode, recount=args.recount, aug_fill=args.aug_fill,
            crop=False).to(device)
    else:
        train_tf = datasets.build_transform(is_train=True, recipe=args.recipe,
                                           input_size=args.input_size, norm=args.norm, aa=args.aa,
                                           reprob=args.reprob, remode=args.remode,
                                           recount=args.recount, aug_fill=args.aug_fill)
    eval_tf = datasets.build_transform(is_train=False, recipe=args.recipe,
                                      input_size=args.input_size, norm=args.norm)
    data_kw = dict(dataset=args.dataset, split_dir=args.split_dir, cache=args.cache,
                   skip_bad=args.skip_bad, cache_size=args.cache_size,
                   dicom_scaling=args.dicom_scaling)
    train_set = datasets.build_dataset("train", args.data_path, data_size=args.data_size,
                                       transform=train_tf, **data_kw)
    # Evaluation splits are checked now (files exist, headers open): a bad validation or
    # test image must not surface after hours of training.
    val_set = datasets.build_dataset("val", args.data_path, transform=eval_tf,
                                     verify_images="header", **data_kw)
    test_set = datasets.build_dataset("test", args.data_path, transform=eval_tf,
                                      verify_images="header", **data_kw)
    check_split_overlap(train_set, [val_set, test_set], allow=args.allow_overlap,
                        kind=train_set.kind)
    check_split_overlap(val_set, [test_set], allow=args.allow_overlap, role="validation",
                        kind=train_set.kind)
    class_names = list(train_set.class_names)
    if args.nb_classes is not None and args.nb_classes != len(class_names):
        raise ArgumentError(f"--nb_classes {args.nb_classes} but {train_set.split_file} has "
                            f"{len(class_names)} label columns ({args.dataset})")
    val_undefined = undefined_classes(val_set.targets, class_names)
    if len(val_undefined) == len(class_names):
        raise ArgumentError(f"{val_set.split_file}: no class has both positive and negative "
                            "images, so no validation AUROC exists to select a checkpoint by")
    loader_kw = dict(seed=args.seed, num_workers=args.num_workers, pin_memory=args.pin_mem)
    train_loader = build_loader(train_set, dist_info, train=True, batch_size=args.batch_size,
                                **loader_kw)
    val_loader = build_loader(val_set, dist_info, train=False, batch_size=args.eval_batch_size,
                              **loader_kw)
    return RunData(train_set=train_set, val_set=val_set, test_set=test_set,
                   train_loader=train_loader, val_loader=val_loader,
                   batch_transform=batch_transform, class_names=class_names,
                   val_undefined=val_undefined)


def setup_training(args: argparse.Namespace, plan: RunPlan, data: RunData, dist_info: DistInfo,
                   device: torch.device, amp_dtype: torch.dtype | None) -> TrainSetup:
    """Model (built, on the device), optimizer, scaler, resumed state, DDP and compiled wrappers."""
    config = model_config_from_args(args, data.class_names)
    model = build_model(args, config)
    model.to(device)
    if args.backbone_dtype == "fp8":
        converted = lora.to_float8_(model)
        logger.info("--backbone_dtype fp8: %d frozen block linears compute in float8", converted)
    elif args.backbone_dtype != "fp32":
        lora.cast_frozen_(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.backbone_dtype])
    params = [p for p in model.parameters() if p.requires_grad]
    param_line = lora.trainable_report(model)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.layer_decay)
    # fp16 needs loss scaling on every device (small gradients underflow to zero in fp16);
    # torch.amp.GradScaler runs on the CPU too.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    start_epoch, best, best_epoch, history = args.start_epoch, -math.inf, None, []
    if plan.resume:
        # The run folder's own commit was verified by plan_run: not hashed a second time.
        start_epoch, best, best_epoch, history = resume_training(
            plan.resume, model, optimizer, scaler, config, args,
            record=plan.committed if plan.source is None else None, data=data_identity(data))
        if plan.source is not None and start_epoch >= args.epochs:
            raise ArgumentError(
                f"--resume {plan.resume}: that run already trained {start_epoch} epochs, so "
                f"--epochs {args.epochs} leaves nothing to train in {plan.out}; to test its best "
                f"checkpoint use --eval --resume {plan.source / 'checkpoint-best'}")

    ddp_model = model
    if dist_info.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    total_steps = max(0, args.epochs - start_epoch) * len(data.train_loader) // args.accum_iter
    train_model, eval_model = ddp_model, model
    if decide_compile(args, device, total_steps):
        logger.info("torch.compile (%s backend, mode %s) for training and evaluation (--compile %s, "
                    "%d steps)", args.compile_backend, args.compile_mode, args.compile, total_steps)
        train_model = CompiledModule(ddp_model, backend=args.compile_backend, name="training",
                                     mode=args.compile_mode)
        eval_model = CompiledModule(model, backend=args.compile_backend, name="evaluation",
                                    mode=args.compile_mode)

    return TrainSetup(config=config, model=model, train_model=train_model, eval_model=eval_model,
                      params=params, param_line=param_line, optimizer=optimizer, scaler=scaler,
                      start_epoch=start_epoch, best=best, best_epoch=best_epoch, history=history)


def fit(args: argparse.Namespace, plan: RunPlan, data: RunData, setup: TrainSetup,
        folder: RunFolder, dist_info: DistInfo, device: torch.device,
        amp_dtype: torch.dtype | None) -> dict:
    """The training run in ``plan.out`` (locked): epochs, commits, final test."""
    out, eff_batch, committed = plan.out, plan.eff_batch, plan.committed
    config, model, optimizer, scaler = setup.config, setup.model, setup.optimizer, setup.scaler
    train_model, eval_model, params, param_line = (setup.train_model, setup.eval_model,
                                                   setup.params, setup.param_line)
    start_epoch, best, best_epoch, history = (setup.start_epoch, setup.best, setup.best_epoch,
                                              list(setup.history))
    train_loader, val_loader, class_names = data.train_loader, data.val_loader, data.class_names
    train_set, val_set, test_set = data.train_set, data.val_set, data.test_set
    batch_transform, val_undefined = data.batch_transform, data.val_undefined
    settings = run_settings(args, eff_batch, amp_dtype, data.cache_used, data.dicom_scaling_used)
    recorded_args = run_args(args, plan, data)

    writer = None
    if dist_info.is_main:
        if plan.overwrite and (not plan.resume or plan.source is not None):
            removed = folder.remove_own_files()
            if removed:
                logger.info("--overwrite: removed the previous run's %d files from %s", len(removed), out)
        setup_logging(True, out / "train.log")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(plan.log_dir))
        run_info = {"args": recorded_args,
                    "git_commit": git_commit(), "torch": torch.__version__,
                    "timm": timm.__version__, "python": platform.python_version(),
                    "world_size": dist_info.world_size, "trainable": param_line,
                    "lora_scaling": config.lora.scaling if config.lora else None,
                    "precision": settings["precision"], "global_batch": eff_batch, "lr": args.lr,
                    "preset_source": settings["preset_source"],
                    "val_undefined_classes": val_undefined, "notes": args.notes,
                    "data_cache": data.cache_used, "dicom_scaling": data.dicom_scaling_used,
                    "resumed_from_epoch": start_epoch - 1 if plan.resume else None,
                    "resumed_from": str(Path(plan.resume).resolve()) if plan.resume else None,
                    "command": " ".join(sys.argv)}
        ckpt.write_json(out / "config.json", run_info)
        written = [out / "config.json", out / "train.log"]
        if args.script and Path(args.script).is_file():
            (out / Path(args.script).name).write_text(Path(args.script).read_text())
            written.append(out / Path(args.script).name)
        event_file = getattr(getattr(writer.file_writer, "event_writer", None), "_file_name", None)
        if event_file:
            written.append(Path(event_file))
        folder.record(*written)
        if val_undefined:  # said once here, in train.log too; validation itself stays quiet
            logger.warning("%s: no AUROC for %s (a single label value); model selection uses the "
                           "mean over the other %d classes", data.val_set.split_file.name,
                           ", ".join(val_undefined), len(class_names) - len(val_undefined))
        lossy = [split for split, info in data.cache_used.items() if info.get("kind") == "lossy"]
        if lossy:
            logger.warning("the %s images come from a downsized (lossy) cache of shorter side %s: "
                           "crops and resizes differ from the paper's pipeline on the original "
                           "files (recorded in config.json as data_cache)", "/".join(lossy),
                           data.cache_used[lossy[0]].get("size"))
        crop_resize = data.cache_used["train"].get("crop_resize")
        if crop_resize:
            logger.info("training crops are resized by %s", crop_resize)
        scaling = f", LoRA scaling alpha/r = {config.lora.scaling:g}" if config.lora else ""
        say(param_line + scaling)
        logger.info("run folder %s; %d train / %d val / %d test images; global batch %d; lr %.3g; "
                    "precision %s; device %s", out, len(train_set), len(val_set), len(test_set),
                    eff_batch, args.lr, settings["precision"], device)

    carry_from = plan.source  # until this folder's first commit holds a checkpoint-best
    set_lr = lambda e: adjust_learning_rate(optimizer, e, args.lr, args.min_lr,  # noqa: E731
                                            args.warmup_epochs, args.epochs)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        seed_everything(args.seed * 1_000_003 + epoch * 7_919 + dist_info.rank)
        train_loader.sampler.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(
                train_model, train_loader, optimizer, device, epoch, set_lr=set_lr, scaler=scaler,
                amp_dtype=amp_dtype, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                log_writer=writer, log_freq=args.log_freq, params=params,
                batch_transform=batch_transform, progress_freq=args.progress_freq,
                progress=not args.no_progress and dist_info.is_main)
        except NonFiniteLossError as err:
            kept = f"the last good checkpoint is {out / 'checkpoint-last'}" if committed or \
                (out / "checkpoint-last.json").exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(f"{err}; {kept} (lower --lr or try --amp none)") from None
        line = f"epoch {epoch}: train loss {train_stats['loss']:.4f}, lr {train_stats['lr']:.3g}"
        log = {"epoch": epoch, "train_loss": train_stats["loss"], "lr": train_stats["lr"]}
        improved = False
        if (epoch + 1) % args.valid_freq == 0 or epoch + 1 == args.epochs:
            # Merged adapters: validation costs exactly a plain ViT; unmerge restores the
            # base weights bit-exactly.
            lora.merge(model)
            try:
                # Classes without a validation AUROC were named once when the run started.
                stats = evaluate(eval_model, val_loader, device, class_names, amp_dtype,
                                 progress=not args.no_progress and dist_info.is_main,
                                 warn_undefined=False)
            finally:
                lora.unmerge(model)
            if not math.isfinite(stats["mean_auroc"]):
                raise NonFiniteLossError(f"validation mean AUROC is {stats['mean_auroc']} at epoch "
                                         f"{epoch}: the model's outputs are not finite")
            log.update(val_loss=stats["loss"], val_mean_auroc=stats["mean_auroc"],
                       val_mean_auprc=stats["mean_auprc"], val_auroc=stats["auroc"])
            line += f", val loss {stats['loss']:.4f}, val mean AUROC {100 * stats['mean_auroc']:.2f}"
            if dist_info.is_main:
                writer.add_scalar("val/loss", stats["loss"], epoch)
                writer.add_scalar("val/mean_auroc", stats["mean_auroc"], epoch)
                for name, value in stats["auroc"].items():
                    if not math.isnan(value):
                        writer.add_scalar(f"val/auroc/{name}", value, epoch)
            if stats["mean_auroc"] > best or best_epoch is None:
                best, best_epoch, improved = stats["mean_auroc"], epoch, True
        history.append(json_safe(log))
        if dist_info.is_main:
            state = {"optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "epoch": epoch,
                     "best_metric": best, "best_epoch": best_epoch, "rng": rng_state(),
                     "args": recorded_args}
            # dicom_scaling at the top level: predict and exports decode DICOMs by the same rule.
            # Each checkpoint records its own epoch's validation score (None when this epoch
            # was not validated); checkpoint-last also the best so far.
            extra = {"epoch": epoch, "val_mean_auroc": log.get("val_mean_auroc"), "run": settings,
                     "dicom_scaling": settings["dicom_scaling"]}

            def stage(pending: Path) -> None:
                if improved:
                    ckpt.save_checkpoint(pending / "checkpoint-best", model, config, extra=extra)
                elif carry_from is not None:
                    carry_best(carry_from, pending, best_epoch)
                ckpt.save_resume_state(pending / "checkpoint-last.state.pt", state)
                ckpt.save_checkpoint(pending / "checkpoint-last", model, config,
                                     extra={**extra, "best_val_mean_auroc": best,
                                            "best_epoch": best_epoch})

            folder.commit(epoch, stage, history,
                          last_complete=str(out / "checkpoint-last") if committed else "")
            committed, carry_from = True, None
            writer.flush()
            say(f"{line}, best {100 * best:.2f} (epoch {best_epoch}), {time.time() - t0:.1f}s",
                flush=True)

    if dist_info.distributed:
        dist.barrier()
    if best_epoch is None:
        raise ArgumentError("no epoch was validated (nothing to test): check --epochs / --start_epoch")
    if plan.resume and start_epoch >= args.epochs:
        logger.info("the run in %s was already complete (%d epochs); testing its best checkpoint "
                    "again", out, args.epochs)
    results = test_and_report(args, out / "checkpoint-best", out, dist_info, device, amp_dtype,
                              dataset=test_set, folder=folder)
    if writer is not None:
        # The test score with its interval, at the tested epoch, beside the validation curves.
        writer.add_scalar("test/mean_auroc", results["mean_auroc"], best_epoch)
        mean_interval = (results.get("intervals") or {}).get("mean") or {}
        for bound in ("ci_low", "ci_high"):
            if mean_interval.get(bound) is not None:
                writer.add_scalar(f"test/mean_auroc_{bound}", mean_interval[bound], best_epoch)
        writer.close()
    return results


def carry_best(source: Path, pending: Path, best_epoch: int | None) -> None:
    """Copy the resumed run's checkpoint-best (the best epoch so far) into this folder's
    staged commit, checked against the source's commit record and its best epoch."""
    tensors_path, config_path = ckpt.checkpoint_paths(source / "checkpoint-best")
    if best_epoch is None and not config_path.exists():
        return  # no epoch of that run was validated yet: nothing to carry
    if not (tensors_path.is_file() and config_path.is_file()):
        raise RunFolderError(f"{tensors_path.with_suffix('')} is missing: the resumed run's best "
                             f"checkpoint (epoch {best_epoch}) is needed in this run's folder")
    saved = ckpt.read_config(source / "checkpoint-best").extras.get("epoch")
    if saved != best_epoch:
        raise RunFolderError(f"{config_path} is of epoch {saved}, but the resume state's best "
                             f"epoch is {best_epoch}: the resumed run's files disagree")
    record = RunFolder(source).read_commit()
    for path in (tensors_path, config_path):
        copy = pending / path.name
        shutil.copyfile(path, copy)
        if record is not None and record["files"].get(path.name) not in (None, ckpt.file_sha256(copy)):
            raise RunFolderError(f"{path} changed after its run committed it (sha256 differs from "
                                 f"{source / 'commit.json'}): not carried into this run")


def data_identity(data: "RunData") -> dict:
    """What identifies a run's data and its pixels, recorded in the resume state and compared
    on --resume: the split files' contents (not their paths), the cache and the DICOM rule."""
    return {"split_sha256": data.split_sha256, "cache_used": data.cache_used,
            "dicom_scaling_used": data.dicom_scaling_used}


RESUME_MUST_MATCH = ("model", "method", "class_names", "lora", "global_pool", "img_size",
                     "model_kwargs", "norm", "mean", "std", "pretrained_sha256")
# Settings of the recipe a resumed run must keep (--epochs may grow: a longer schedule).
RESUME_ARGS_MUST_MATCH = ("dataset", "data_size", "optimizer", "recipe", "lr", "weight_decay",
                          "layer_decay", "batch_size", "accum_iter", "seed", "aa", "reprob",
                          "warmup_epochs", "min_lr", "drop_path", "lora_dropout", "clip_grad",
                          "aug_fill", "remode", "recount", "device_aug")
SPLITS = ("train", "val", "test")


def cache_pixels(cache_used: dict | None) -> dict:
    """Per split, whether its pixels come from a lossy cache (and which): an exact cache and
    the original files give the same tensors, a lossy cache other ones."""
    cache_used = cache_used or {}
    return {split: (f"lossy {info.get('size')}px cache" if info.get("kind") == "lossy"
                    else "original pixels") for split, info in cache_used.items() if info}


def same_folder(old: str | None, new: str | None) -> bool:
    """Whether a recorded folder is the given one. A relative recorded path may have been
    given from the working directory or, by the launch scripts of the time, from the
    repository: either counts."""
    if old is None or new is None:
        return old == new
    here = Path(new).resolve()
    tried = [Path(old)] if Path(old).is_absolute() else [Path.cwd() / old, REPO_ROOT / old]
    return any(p.resolve() == here for p in tried)


def check_same_data(path: str, old_args: dict, args: argparse.Namespace, data: dict) -> None:
    """Refuse to resume on other data or other pixels than the run was trained on.

    The split files are compared by content (SHA-256), so a data folder that moved still
    resumes; runs recorded before the hashes were kept compare --data_path / --split_dir."""
    old_hashes = old_args.get("split_sha256")
    if old_hashes:
        for split in SPLITS:
            old, new = old_hashes.get(split), data["split_sha256"].get(split)
            if old is not None and old != new:
                raise ArgumentError(
                    f"--resume {path}: the run was trained on other data: its {split} split file "
                    f"had sha256 {old[:12]}..., --data_path {args.data_path} / --split_dir "
                    f"{args.split_dir} give {str(new)[:12]}...; resume on the run's own data, "
                    "or start a new run")
    else:
        for key in ("data_path", "split_dir"):
            if key in old_args and not same_folder(old_args[key], getattr(args, key)):
                raise ArgumentError(f"--resume {path}: the run was trained with --{key} "
                                    f"{old_args[key]!r}, this command gives {getattr(args, key)!r} "
                                    "(the run was recorded before split-file hashes were kept, "
                                    "so its data is known by its folder)")
    if "cache_used" in old_args:
        old, new = cache_pixels(old_args["cache_used"]), cache_pixels(data["cache_used"])
        changed = [s for s in old if s in new and old[s] != new[s]]
        if changed:
            raise ArgumentError(f"--resume {path}: the run read {changed[0]} images from "
                                f"{old[changed[0]]}, this command (--cache {args.cache}) from "
                                f"{new[changed[0]]}; resume with the run's own --cache")
    old_scaling = old_args.get("dicom_scaling_used")
    if old_scaling is not None and old_scaling != data["dicom_scaling_used"]:
        raise ArgumentError(f"--resume {path}: the run was trained with --dicom_scaling "
                            f"{old_scaling!r}, this command gives {data['dicom_scaling_used']!r}")


def resume_training(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler, config: mv.ModelConfig, args: argparse.Namespace | None = None,
                    record: dict | None = None, data: dict | None = None
                    ) -> tuple[int, float, int | None, list[dict]]:
    """Restore trained tensors, optimizer, scaler and counters after checking that the
    checkpoint is one committed epoch of this same run.

    ``record``: the checkpoint folder's commit record when it was already verified against
    its files; otherwise it is read and verified here. Returns (next epoch, best metric,
    its epoch, log history). ``data``: this run's ``data_identity``, compared with the run's.
    """
    tensors_path, config_path = ckpt.checkpoint_paths(path)
    if record is None:
        record = RunFolder(tensors_path.parent).verify()  # every committed file matches its hash
    saved = ckpt.read_config(path)
    for key in RESUME_MUST_MATCH:
        if key in saved and saved.get(key) != config.get(key):
            if key == "pretrained_sha256":
                raise ArgumentError(
                    f"--resume {path} was trained on other pre-trained weights ({saved.get('pretrained')}, "
                    f"sha256 {str(saved.get(key))[:12]}...) than --finetune {config.get('pretrained')} "
                    f"(sha256 {str(config.get(key))[:12]}...)")
            raise ArgumentError(f"--resume {path}: {key} is {saved.get(key)!r} there but "
                                f"{config.get(key)!r} in this run")
    state_path = tensors_path.with_suffix(".state.pt")
    if not state_path.is_file():
        raise ArgumentError(f"--resume {path}: no resume state ({state_path.name}); only "
                            "checkpoint-last can be resumed")
    state = ckpt.load_resume_state(state_path)
    epochs = {state_path.name: state.get("epoch"), config_path.name: saved.extras.get("epoch")}
    if record is not None:
        epochs["commit.json"] = record["epoch"]
    if len(set(epochs.values())) != 1:
        raise RunFolderError(f"--resume {path}: its files are from different epochs ("
                             + ", ".join(f"{k}: {v}" for k, v in epochs.items()) +
                             "); the checkpoint is not one consistent epoch, refusing to resume it")
    if args is not None:
        old_args = state.get("args") or {}
        for key in RESUME_ARGS_MUST_MATCH:
            if key in old_args and old_args[key] != getattr(args, key, None):
                raise ArgumentError(f"--resume {path}: the run was trained with --{key} "
                                    f"{old_args[key]!r}, this command gives {getattr(args, key, None)!r}; "
                                    "resume with the run's own settings, or start a new run")
        if data is not None:
            check_same_data(path, old_args, args, data)
        if "epochs" in old_args and old_args["epochs"] != args.epochs:
            logger.warning("--resume: --epochs changed from %s to %s: the lr schedule follows the "
                           "new length from here on", old_args["epochs"], args.epochs)
    ckpt.load_trained_tensors(model, tensors_path, all_tensors=bool(saved.backbone_in_file))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if record is not None:
        history = list(record["log"])
    else:  # a run written before commit records: its log.txt up to the checkpoint's epoch
        log_path = tensors_path.parent / "log.txt"
        lines = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()] \
            if log_path.is_file() else []
        history = [l for l in lines if l.get("epoch", -1) <= state["epoch"]]
    logger.info("resumed from %s (epoch %d done, best %.4f)", path, state["epoch"], state["best_metric"])
    return state["epoch"] + 1, state["best_metric"], state["best_epoch"], history


def cli(argv: list[str] | None = None) -> int:
    """Parse, validate and run; a clear one-line error and a non-zero exit on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser, argv)
    try:
        resolve_args(args, args.explicit)
    except ArgumentError as err:
        parser.error(str(err))
    if args.check_args:
        if args.data_path is not None and not args.eval and not args.demo:  # a demo makes its data
            # A launch script checks before torchrun starts: a missing split file is found
            # here, in one line, not after the launcher's processes have started.
            try:
                for split in ("train", "val", "test"):
                    datasets.locate_split_file(split, args.data_path, args.data_size, args.split_dir)
            except ValueError as err:
                parser.error(str(err))
        return 0
    try:
        main(args)
    except (ArgumentError, NonFiniteLossError, datasets.DataError, mv.PretrainedWeightsError,
            ckpt.CheckpointError, RunFolderError, OutputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        summary = logging.getLogger(SUMMARY_LOGGER)
        if summary.handlers:  # the run's log file is open: it ends with why
            summary.error("error: %s", err)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
