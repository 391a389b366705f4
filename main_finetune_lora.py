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
import csv
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

import datasets
import lora
import models_vit_lora as mv
from engine_finetune import AMP_CHOICES, NonFiniteLossError, evaluate, resolve_amp, train_one_epoch
from util import checkpoint as ckpt
from util.lr_sched import adjust_learning_rate
from util.misc import DistInfo, git_commit, init_distributed, rng_state, seed_everything, setup_logging
from util.optim import build_optimizer
from util.presets import PRESETS

logger = logging.getLogger("main")

ROOT = Path(__file__).resolve().parent
DEMO_DEFAULTS: dict[str, Any] = dict(
    data_path=str(ROOT / "demo_data"), dataset="nih", model="vit_tiny_patch16_lora",
    input_size=112, epochs=8, batch_size=32, optimizer="sgd", lr=0.3, warmup_epochs=1,
    weight_decay=0.0, reprob=0.0, norm="mrm", data_size="100%", num_workers=2,
    output_dir=str(ROOT / "output_dir"), run_name="demo", lora_rank=8, lora_dropout=0.0,
    drop_path=0.0, overwrite=True,
)
# What a run writes into its folder: removed first when --overwrite replaces an old run.
RUN_FILES = ("log.txt", "train.log", "config.json", "checkpoint-best.*", "checkpoint-last.*",
             "results_*.json", "results_*_auroc.*", "predictions_*.csv", "roc_*.png",
             "logs/events.out.tfevents.*")


class ArgumentError(ValueError):
    """A flag value or combination that cannot run."""


def get_args_parser() -> argparse.ArgumentParser:
    """All flags of the paper's scripts (same meaning) plus this tool's own."""
    p = argparse.ArgumentParser("LoRA fine-tuning of chest X-ray foundation models",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the paper's hyper-parameters for one of its 18 settings; explicit flags win")
    g.add_argument("--demo", action="store_true",
                   help="synthetic demo data + tiny ViT (the default when --data_path is not given)")
    g.add_argument("--output_dir", default="./output_dir", help="parent folder of the run folder")
    g.add_argument("--run_name", default="auto",
                   help="run folder inside --output_dir; 'auto' names it after the settings as the "
                        "paper's code does; '' uses --output_dir itself")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <run>/logs)")
    g.add_argument("--overwrite", action="store_true",
                   help="allow a run folder that already holds another run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="",
                   help="checkpoint to continue from (checkpoint-last), or 'auto' for the run "
                        "folder's own; with --eval: the checkpoint to evaluate")
    g.add_argument("--start_epoch", default=0, type=int)
    g.add_argument("--eval", action="store_true", help="evaluate --resume on the test split only")
    g.add_argument("--eval_split", default="test", choices=["val", "test"])
    g.add_argument("--dist_eval", action="store_true",
                   help="kept for the paper's scripts: multi-process evaluation is always "
                        "distributed and gathered exactly")
    g.add_argument("--valid_freq", type=int, default=1, help="validate every N epochs")
    g.add_argument("--log_freq", type=int, default=10, help="log the train loss every N steps")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--note", type=str, default="", help="appended to the run folder name")
    g.add_argument("--script", type=str, default="", help="launch script, copied into the run")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_lora", choices=sorted(mv.MODELS))
    g.add_argument("--method", default=None, choices=list(ckpt.METHODS),
                   help="lora | full (fine-tuning) | linear (probe); default: lora for *_lora "
                        "models, full otherwise")
    g.add_argument("--finetune", default="", help="pre-trained weights (MRM.pth, CXR_MAE.pth, ...)")
    g.add_argument("--unsafe_load", action="store_true",
                   help="DANGEROUS: unpickle --finetune without the weights-only guard")
    g.add_argument("--depth", default=None, type=int,
                   help="number of transformer blocks, if not the architecture's (small tests)")
    g.add_argument("--input_size", default=224, type=int)
    g.add_argument("--drop_path", type=float, default=0.1)
    g.set_defaults(global_pool=True)
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="classify from the cls token instead of mean-pooled patch tokens")
    g.add_argument("--nb_classes", default=None, type=int,
                   help="number of classes (default: from the data set; checked against it)")
    g.add_argument("--lora_rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=32.0)
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument("--lora_pos", type=str, default="attn",
                   help=f"where to put adapters: {sorted(lora.POSITIONS)} or a comma list")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", default=64, type=int, help="per process")
    g.add_argument("--eval_batch_size", default=None, type=int, help="default: 4 x batch_size")
    g.add_argument("--epochs", default=50, type=int)
    g.add_argument("--accum_iter", default=1, type=int)
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    g.add_argument("--lr", type=float, default=None, help="absolute lr (sgd recipe)")
    g.add_argument("--blr", type=float, default=1e-3, help="lr = blr * effective batch / 256")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay (adamw)")
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--warmup_epochs", type=float, default=5)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--clip_grad", type=float, default=None)
    g.add_argument("--backbone_dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="hold the frozen backbone in this dtype (half the memory, no per-step "
                        "cast); needs --amp of the same precision; LoRA and head stay fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, more compute)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="auto: bf16 where the device computes it natively (recent GPUs, CPUs with "
                        "AMX / AVX512-BF16), fp16 with loss scaling on older GPUs, else fp32")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="data set folder (default: the demo set)")
    g.add_argument("--dataset", default=None, choices=list(datasets.DATASET_KINDS),
                   help="default: inferred from the --data_path folder name")
    g.add_argument("--data_size", default="100%", choices=sorted(datasets.TRAIN_SPLIT_FILES))
    g.add_argument("--split_dir", default=None, help="folder of the split files")
    g.add_argument("--cache", default="auto", choices=["auto", "on", "off"],
                   help="read the preprocessed image cache (python -m datasets.cache)")
    g.add_argument("--skip_bad", action="store_true", help="skip unreadable images, and report them")
    g.add_argument("--norm", default=None, choices=sorted(datasets.NORM_STATS),
                   help="input normalisation; default follows the pre-trained weights")
    g.add_argument("--recipe", default=None, choices=["sgd", "adamw"],
                   help="augmentation recipe; default follows --optimizer as in the paper")
    g.add_argument("--device_aug", action="store_true",
                   help="sgd recipe: crop / flip / normalise uint8 batches on the training device "
                        "instead of in the loader workers")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.25)
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--num_workers", default=min(8, os.cpu_count() or 1), type=int)
    g.add_argument("--pin_mem", action="store_true", default=torch.cuda.is_available(),
                   help="pinned host memory for faster copies to the GPU")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

    # Flags of the reference code kept so that its scripts run unchanged.
    g = p.add_argument_group("accepted for compatibility")
    for flag in ("--smoothing", "--mixup", "--cutmix"):
        g.add_argument(flag, type=float, default=0.0, help="must be 0 (multi-label BCE)")
    g.add_argument("--color_jitter", type=float, default=None, help="unused (RandAugment)")
    g.add_argument("--resplit", action="store_true")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--mixup_mode", type=str, default="batch")
    g.add_argument("--from_begin", action="store_true")
    g.add_argument("--world_size", default=1, type=int, help="set by torchrun")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by torchrun")
    g.add_argument("--dist_on_itp", action="store_true")
    g.add_argument("--dist_url", default="env://")
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

    if args.preset:
        fill(PRESETS[args.preset])
    args.demo = args.demo or (args.data_path is None and not args.eval)
    if args.demo:
        demo = dict(DEMO_DEFAULTS)
        if "data_path" in explicit:  # a data set of the user's (e.g. datasets.demo --rsna): its own kind
            demo.pop("dataset")
        fill(demo)
        if args.finetune and "model" not in explicit:
            args.model = "vit_base_patch16_lora"
    if args.data_path is None:
        raise ArgumentError("--data_path is required with --eval (the data to evaluate on)")

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
    for flag in ("batch_size", "epochs", "accum_iter", "valid_freq", "input_size", "log_freq"):
        if getattr(args, flag) <= 0:
            raise ArgumentError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.input_size % 16:
        raise ArgumentError(f"--input_size {args.input_size} is not a multiple of the patch size 16")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise ArgumentError(f"--warmup_epochs {args.warmup_epochs} must be in [0, --epochs]")
    if args.eval and not args.resume:
        raise ArgumentError("--eval needs --resume <checkpoint> (the model to evaluate)")
    if args.finetune and not Path(args.finetune).is_file():
        raise ArgumentError(f"--finetune: file not found: {args.finetune}")
    if not args.finetune and not args.demo and not args.eval:
        raise ArgumentError("--finetune is required (the pre-trained weights); without it the "
                            "backbone would be random. Use --demo for a run on synthetic data.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if args.norm is None:
        args.norm = infer_norm(args.finetune) if args.finetune else "mrm"
        if args.norm is None:
            raise ArgumentError(f"--norm: cannot tell the normalisation of {args.finetune}; pass "
                                "--norm mrm, cxr_mae or imagenet")
    if args.backbone_dtype != "fp32":
        if args.method == "full":
            raise ArgumentError(f"--backbone_dtype {args.backbone_dtype} needs a frozen backbone "
                                "(--method lora or linear), not full fine-tuning")
        if args.amp != args.backbone_dtype:
            raise ArgumentError(f"--backbone_dtype {args.backbone_dtype} needs --amp "
                                f"{args.backbone_dtype} (got --amp {args.amp})")
    args.recipe = args.recipe or args.optimizer
    if args.device_aug and args.recipe != "sgd":
        raise ArgumentError("--device_aug implements the sgd recipe (crop + flip) only; the "
                            f"{args.recipe} recipe's RandAugment runs in the loader")
    args.eval_batch_size = args.eval_batch_size or 4 * args.batch_size
    return args


def run_folder(args: argparse.Namespace, eff_batch: int) -> Path:
    """The run folder: named after the settings as the paper's code names it, or as given."""
    if args.run_name == "auto":
        name = (f"{args.model}_rank{args.lora_rank}_pos{args.lora_pos}_{args.data_size}_"
                f"{args.optimizer}_{args.epochs}_{args.lr:g}_{eff_batch}_{args.note}").rstrip("_")
        return Path(args.output_dir) / name.replace("%", "pct")
    return Path(args.output_dir) / args.run_name if args.run_name else Path(args.output_dir)


def check_run_folder(out: Path, args: argparse.Namespace) -> None:
    """Refuse to write into a folder that holds another run, unless resuming or overwriting."""
    markers = [m for m in ("config.json", "log.txt", "checkpoint-last.json") if (out / m).exists()]
    if markers and not args.resume and not args.overwrite:
        raise ArgumentError(f"output folder {out} already holds a run ({', '.join(markers)}): pass "
                            "--resume auto to continue it, --overwrite to replace it, or another "
                            "--output_dir / --note")


def clear_run_folder(out: Path) -> None:
    """Remove an old run's own files (for --overwrite), so logs and checkpoints do not mix."""
    for pattern in RUN_FILES:
        for old in out.glob(pattern):
            old.unlink()


class SeededSampler(Sampler):
    """Yields (index, seed) pairs so each sample's augmentation depends only on (seed, epoch,
    index): the same with any number of workers, and reproducible after a resume."""

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch * 7_919) % (2**31)
        return ((i, (base + i * 104_729) % (2**31)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """Reseeds the RNGs before each sample's transform (see SeededSampler)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        seed_everything(seed)
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


def build_loader(dataset: Dataset, dist_info: DistInfo, *, train: bool, batch_size: int,
                 seed: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """Shuffled, seeded training loader or an ordered evaluation loader (sharded when distributed)."""
    # Pinned host memory only helps copies to an accelerator; without one torch warns.
    pin_memory = pin_memory and torch.accelerator.is_available()
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    if train:
        base = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                  shuffle=True, seed=seed)
        # Dropping the last partial batch (as the paper) only when there is more than one.
        drop_last = len(base) > batch_size
        return DataLoader(SeededDataset(dataset), sampler=SeededSampler(base, seed),
                          drop_last=drop_last, **common)
    sampler = (DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                  shuffle=False) if dist_info.distributed
               else SequentialSampler(dataset))
    return DataLoader(dataset, sampler=sampler, drop_last=False, **common)


def build_model(args: argparse.Namespace, num_classes: int) -> tuple[torch.nn.Module, dict | None]:
    """Plain timm ViT -> pre-trained weights (checked) -> LoRA -> freeze, in that order."""
    model = mv.MODELS[args.arch](num_classes=num_classes, img_size=args.input_size,
                                 drop_path_rate=args.drop_path, global_pool=args.global_pool,
                                 **args.model_kwargs)
    if args.finetune:
        mv.load_pretrained(model, args.finetune, allow_unsafe_pickle=args.unsafe_load)
    else:
        logger.warning("no --finetune: the backbone is randomly initialised (demo only)")
    lora_cfg = None
    if args.method == "lora":
        lora.inject_lora(model, rank=args.lora_rank, alpha=args.lora_alpha,
                         dropout=args.lora_dropout, pos=args.lora_pos)
        lora_cfg = dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        pos=args.lora_pos)
        lora.mark_only_lora_as_trainable(model)
    elif args.method == "linear":
        lora.mark_only_lora_as_trainable(model)  # no adapters: only fc_norm + head
    else:
        model.requires_grad_(True)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, lora_cfg


def write_predictions(path: Path, dataset, indices: np.ndarray, probs: np.ndarray,
                      targets: np.ndarray) -> None:
    """Per-image predictions: path, one probability per class, then the labels."""
    names = list(dataset.class_names)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", *names, *(f"label_{n}" for n in names)])
            for i, p, t in zip(indices, probs, targets):
                w.writerow([dataset.paths[i], *(f"{v:.8f}" for v in p), *(int(v) for v in t)])

    ckpt.atomic_write(path, write)


def nan_to_none(d: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: undefined per-class metrics become null."""
    return {k: (None if (v is None or math.isnan(v)) else float(v)) for k, v in d.items()}


def test_and_report(args: argparse.Namespace, checkpoint: Path, out: Path, dist_info: DistInfo,
                    device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """Evaluate a saved checkpoint on the test (or val) split and write every report."""
    model, config = ckpt.load_trained(checkpoint, pretrained=args.finetune or None, device=device,
                                      allow_unsafe_pickle=args.unsafe_load)
    lora.merge(model)  # inference at the cost of a plain ViT
    transform = datasets.build_transform(is_train=False, recipe=config["eval_recipe"],
                                         input_size=config["img_size"], norm=config["norm"])
    dataset = datasets.build_dataset(args.eval_split, args.data_path, dataset=args.dataset,
                                     transform=transform, split_dir=args.split_dir,
                                     cache=args.cache, skip_bad=args.skip_bad)
    if list(dataset.class_names) != list(config["class_names"]):
        raise ArgumentError(f"{checkpoint} was trained on classes {config['class_names']}, "
                            f"but {dataset.split_file} has {dataset.class_names}")
    loader = build_loader(dataset, dist_info, train=False, batch_size=args.eval_batch_size,
                          seed=args.seed, num_workers=args.num_workers, pin_memory=args.pin_mem)
    stats = evaluate(model, loader, device, dataset.class_names, amp_dtype,
                     progress=not args.no_progress and dist_info.is_main)
    trainable, total = lora.count_parameters(model)  # load_trained restores the trained set
    split = args.eval_split
    results = {
        "split": split, "dataset": dataset.kind, "data_size": args.data_size,
        "weights": Path(config["pretrained"]).stem if config.get("pretrained") else "none",
        "method": config["method"], "model": config["model"],
        "lora_rank": (config.get("lora") or {}).get("rank"),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "num_images": stats["num_images"], "loss": stats["loss"],
        "mean_auroc": stats["mean_auroc"], "mean_auprc": stats["mean_auprc"],
        "auroc": nan_to_none(stats["auroc"]), "auprc": nan_to_none(stats["auprc"]),
        "class_names": list(dataset.class_names), "checkpoint": str(checkpoint),
        "epoch": config.get("epoch"),
    }
    if dist_info.is_main:
        stem = f"results_{split}"
        ckpt.write_json(out / f"{stem}.json", results)
        write_predictions(out / f"predictions_{split}.csv", dataset, stats["indices"],
                          stats["probs"], stats["targets"])
        from util import reports  # matplotlib is imported only when reports are written

        reports.write_auroc_tables(results, out, stem=stem)
        reports.save_roc_curves(stats["targets"], stats["probs"], dataset.class_names,
                                out / f"roc_{split}.png")
        print(f"{split} mean AUROC {100 * results['mean_auroc']:.2f} over {results['num_images']} "
              f"images ({checkpoint})")
        table = out / f"{stem}_auroc.md"
        if table.exists():
            print(table.read_text())
    return results


def main(args: argparse.Namespace) -> dict:
    """Train (or only evaluate), then test the best checkpoint. Returns the test results."""
    dist_info, device = init_distributed(args.device)
    setup_logging(dist_info.is_main)
    amp_dtype = resolve_amp(args.amp, device)
    use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
    if args.demo and dist_info.is_main and not Path(args.data_path, "train_list.txt").exists():
        logger.info("writing the synthetic demo data set to %s", args.data_path)
        datasets.make_demo_dataset(args.data_path)
    if dist_info.distributed:
        dist.barrier()
    args.dataset = args.dataset or datasets.infer_dataset_kind(args.data_path)

    if args.eval:
        resume = Path(args.resume)
        out = Path(args.output_dir) if "output_dir" in args.explicit else resume.parent
        out.mkdir(parents=True, exist_ok=True)
        return test_and_report(args, resume, out, dist_info, device, amp_dtype)

    eff_batch = args.batch_size * args.accum_iter * dist_info.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    out = run_folder(args, eff_batch)
    if args.resume == "auto":
        # Nothing to continue yet (e.g. stopped during the first epoch): start afresh there.
        args.overwrite = args.overwrite or not (out / "checkpoint-last.json").exists()
        args.resume = str(out / "checkpoint-last") if not args.overwrite else ""
    check_run_folder(out, args)
    log_dir = Path(args.log_dir) if args.log_dir else out / "logs"

    # Data first: a bad split file or image fails here, before anything is written.
    seed_everything(args.seed)
    norm_mean, norm_std = datasets.NORM_STATS[args.norm]
    batch_transform = None
    if args.device_aug:
        from datasets.device_aug import DeviceAugment, build_uint8_transform

        train_tf = build_uint8_transform(round(args.input_size * 8 / 7))
        batch_transform = DeviceAugment(args.input_size, args.norm).to(device)
    else:
        train_tf = datasets.build_transform(is_train=True, recipe=args.recipe,
                                           input_size=args.input_size, norm=args.norm, aa=args.aa,
                                           reprob=args.reprob, remode=args.remode,
                                           recount=args.recount)
    eval_tf = datasets.build_transform(is_train=False, recipe=args.recipe,
                                      input_size=args.input_size, norm=args.norm)
    data_kw = dict(dataset=args.dataset, split_dir=args.split_dir, cache=args.cache,
                   skip_bad=args.skip_bad)
    train_set = datasets.build_dataset("train", args.data_path, data_size=args.data_size,
                                       transform=train_tf, **data_kw)
    val_set = datasets.build_dataset("val", args.data_path, transform=eval_tf, **data_kw)
    class_names = list(train_set.class_names)
    if args.nb_classes is not None and args.nb_classes != len(class_names):
        raise ArgumentError(f"--nb_classes {args.nb_classes} but {train_set.split_file} has "
                            f"{len(class_names)} label columns ({args.dataset})")
    loader_kw = dict(seed=args.seed, num_workers=args.num_workers, pin_memory=args.pin_mem)
    train_loader = build_loader(train_set, dist_info, train=True, batch_size=args.batch_size,
                                **loader_kw)
    val_loader = build_loader(val_set, dist_info, train=False, batch_size=args.eval_batch_size,
                              **loader_kw)

    model, lora_cfg = build_model(args, len(class_names))
    model.to(device)
    if args.backbone_dtype != "fp32":
        lora.cast_frozen_(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.backbone_dtype])
    params = [p for p in model.parameters() if p.requires_grad]
    param_line = lora.trainable_report(model)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.layer_decay)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    pretrained = str(Path(args.finetune).resolve()) if args.finetune else None
    config = ckpt.model_config(
        model=args.arch, method=args.method, class_names=class_names, img_size=args.input_size,
        global_pool=args.global_pool, norm=args.norm, mean=norm_mean, std=norm_std,
        pretrained=pretrained, pretrained_sha256=ckpt.file_sha256(pretrained) if pretrained else None,
        lora_cfg=lora_cfg, drop_path_rate=args.drop_path, eval_recipe=args.recipe,
        dataset=args.dataset, model_kwargs=args.model_kwargs)

    start_epoch, best, best_epoch = args.start_epoch, -math.inf, None
    if args.resume:
        start_epoch, best, best_epoch = resume_training(args.resume, model, optimizer, scaler, config)

    ddp_model = model
    if dist_info.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(ddp_model) if args.compile else ddp_model

    writer = None
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not args.resume:
            clear_run_folder(out)
        setup_logging(True, out / "train.log")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
        run_info = {"args": {k: v for k, v in vars(args).items() if k != "explicit"},
                    "git_commit": git_commit(), "torch": torch.__version__,
                    "timm": timm.__version__, "python": platform.python_version(),
                    "world_size": dist_info.world_size, "trainable": param_line,
                    "command": " ".join(sys.argv)}
        ckpt.write_json(out / "config.json", run_info)
        if args.script and Path(args.script).is_file():
            (out / Path(args.script).name).write_text(Path(args.script).read_text())
        print(param_line)
        logger.info("run folder %s; %d train / %d val images; lr %.3g; amp %s; device %s",
                    out, len(train_set), len(val_set), args.lr, amp_dtype, device)

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
                batch_transform=batch_transform,
                progress=not args.no_progress and dist_info.is_main)
        except NonFiniteLossError as err:
            last = out / "checkpoint-last.json"
            kept = f"the last good checkpoint is {out / 'checkpoint-last'}" if last.exists() \
                else "no checkpoint was written yet"
            raise NonFiniteLossError(f"{err}; {kept} (lower --lr or try --amp none)") from None
        line = f"epoch {epoch}: train loss {train_stats['loss']:.4f}, lr {train_stats['lr']:.3g}"
        log = {"epoch": epoch, "train_loss": train_stats["loss"], "lr": train_stats["lr"]}
        if (epoch + 1) % args.valid_freq == 0 or epoch + 1 == args.epochs:
            # Merged adapters: validation costs exactly a plain ViT; unmerge restores the
            # base weights bit-exactly.
            lora.merge(model)
            try:
                stats = evaluate(model, val_loader, device, class_names, amp_dtype,
                                 progress=not args.no_progress and dist_info.is_main)
            finally:
                lora.unmerge(model)
            log.update(val_loss=stats["loss"], val_mean_auroc=stats["mean_auroc"],
                       val_mean_auprc=stats["mean_auprc"], val_auroc=nan_to_none(stats["auroc"]))
            line += f", val loss {stats['loss']:.4f}, val mean AUROC {100 * stats['mean_auroc']:.2f}"
            if dist_info.is_main:
                writer.add_scalar("val/loss", stats["loss"], epoch)
                writer.add_scalar("val/mean_auroc", stats["mean_auroc"], epoch)
                for name, value in stats["auroc"].items():
                    if not math.isnan(value):
                        writer.add_scalar(f"val/auroc/{name}", value, epoch)
            if stats["mean_auroc"] > best or best_epoch is None:
                best, best_epoch = stats["mean_auroc"], epoch
                if dist_info.is_main:
                    ckpt.save_checkpoint(out / "checkpoint-best", model, config,
                                         extra={"epoch": epoch, "val_mean_auroc": best})
        if dist_info.is_main:
            state = {"optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "epoch": epoch,
                     "best_metric": best, "best_epoch": best_epoch, "rng": rng_state(),
                     "args": {k: v for k, v in vars(args).items() if k != "explicit"}}
            # Resume state first, then the tensors and config, so a config always has both.
            ckpt.save_resume_state(out / "checkpoint-last.state.pt", state)
            ckpt.save_checkpoint(out / "checkpoint-last", model, config,
                                 extra={"epoch": epoch, "val_mean_auroc": best})
            with open(out / "log.txt", "a") as f:
                f.write(json.dumps(log) + "\n")
            writer.flush()
            print(f"{line}, best {100 * best:.2f} (epoch {best_epoch}), {time.time() - t0:.1f}s",
                  flush=True)

    if writer is not None:
        writer.close()
    if dist_info.distributed:
        dist.barrier()
    if best_epoch is None:
        raise ArgumentError("no epoch was validated (nothing to test): check --epochs / --start_epoch")
    return test_and_report(args, out / "checkpoint-best", out, dist_info, device, amp_dtype)


def resume_training(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler, config: dict) -> tuple[int, float, int | None]:
    """Restore trained tensors, optimizer, scaler and counters; returns (next epoch, best, its epoch)."""
    tensors_path, _ = ckpt.checkpoint_paths(path)
    saved = ckpt.read_config(path)
    for key in ("model", "method", "class_names", "lora", "global_pool", "img_size"):
        if saved.get(key) != config.get(key):
            raise ArgumentError(f"--resume {path}: {key} is {saved.get(key)!r} there but "
                                f"{config.get(key)!r} in this run")
    state_path = tensors_path.with_suffix(".state.pt")
    if not state_path.is_file():
        raise ArgumentError(f"--resume {path}: no resume state ({state_path.name}); only "
                            "checkpoint-last can be resumed")
    ckpt.load_trained_tensors(model, tensors_path, all_tensors=bool(saved.get("backbone_in_file")))
    state = ckpt.load_resume_state(state_path)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    logger.info("resumed from %s (epoch %d done, best %.4f)", path, state["epoch"], state["best_metric"])
    return state["epoch"] + 1, state["best_metric"], state["best_epoch"]


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
    try:
        main(args)
    except (ArgumentError, NonFiniteLossError, datasets.DataError, mv.PretrainedWeightsError,
            ckpt.CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
