"""Training-step and evaluation throughput and peak memory: our LoRA ViT against its peers.

    python bench/bench_model.py --quick                       # CPU, a few minutes
    python bench/bench_model.py --amp fp32,bf16 --json bench/results/model_cpu.json
    python bench/bench_model.py --device cuda --batch_size 64 --amp bf16,fp32
    python bench/bench_model.py --methods all                 # every registered method + PEFT's

Every contender (``--impls``) is the same timm ViT built from the same seed; ``--methods``
adds the other registered fine-tuning methods, each with HF PEFT's version at the same
targets where PEFT has one. All live in one process and are timed round-robin (``--steps``
steps each, ``--rounds`` times, median), so a busy machine slows them alike: compare the
ratios. Peak memory: ``max_memory_allocated`` on CUDA, the peak RSS of a fresh subprocess
per contender on a CPU; FLOPs counted by torch, MFU against the GPU's bf16 peak. The
contenders, the measurements and the goals: bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

# PEFT imports transformers, which probes for Hugging Face's `datasets`: import it before
# the repository root (whose `datasets/` package would shadow it) is on sys.path.
try:
    import peft
except ImportError:  # the PEFT peer is then skipped
    peft = None

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _common  # noqa: E402  (puts the repository on sys.path)
from _common import resolve_device, timed  # noqa: E402
import lora  # noqa: E402
import methods  # noqa: E402
import models_vit_lora as mv  # noqa: E402
from paper_style import paper_autocast, to_paper_style  # noqa: E402
from util.io import write_json  # noqa: E402
from util.precision import autocast, cpu_has_fast_bf16  # noqa: E402

NUM_CLASSES = 14
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
TRAIN_IMPLS = ("ours", "ours_bf16w", "peft", "paper", "full")
OPTIONAL_IMPLS = ("ours_gc", "ours_compile", "ours_cudagraphs", "peft_compile", "ours_fp8",
                  "ours_fp8_compile")
COMPILED_IMPLS = ("ours_compile", "ours_cudagraphs", "peft_compile", "ours_fp8_compile")
# Methods of the registry that already are contenders under another name.
BUILT_IN = {"lora": "ours", "full": "full"}
# Contenders that are a method at other settings than its defaults (flag destination ->
# value): the targets HF PEFT's version of the method adapts on timm's ViT.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dora_qkv": ("dora", {"lora_pos": "qkv_fused"}),
    "ia3_qkv": ("ia3", {"ia3_attn": "qkv"}),
}
# HF PEFT's versions of registered methods: peer -> the method it is compared with.
PEERS = {"peft_dora": "dora", "peft_ia3": "ia3"}

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device-name fragment, first match wins;
# "H100" is the SXM card ("NVIDIA H100 80GB HBM3").
GPU_BF16_PEAK: dict[str, float] = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
                                   "H100": 989e12, "GH200": 989e12, "A100": 312e12,
                                   "L40S": 362e12, "L4": 121e12}

# Goals of the performance issue: (ratio or value name prefix, comparison, threshold). A
# goal about our training step counts each way of ours that the issue allows (the bf16- or
# FP8-held backbone, compiled against compiled).
GOALS: tuple[tuple[str, str, float], ...] = (
    ("train ours/peft", ">=", 1.5),
    ("train ours_bf16w/peft", ">=", 1.5),
    ("train ours_fp8/peft", ">=", 1.5),
    ("train ours_compile/peft_compile", ">=", 1.25),
    ("train ours_fp8_compile/peft_compile", ">=", 1.25),
    ("train ours/paper as run", ">=", 3.0),
    ("memory ours/full", "<=", 0.6),
    ("memory ours_bf16w/full", "<=", 0.6),
    ("memory ours_fp8/full", "<=", 0.6),
    ("memory ours_gc/full", "<=", 0.6),
    ("eval merged/plain", ">=", 0.97),
    ("mfu ours", ">=", 0.35),  # each of our contenders; the issue asks it at batch 128
    # The PEFT-methods issue: each method against HF PEFT's at the same targets and batch.
    ("train dora_qkv/peft_dora", ">=", 1.5),
    ("memory dora_qkv/peft_dora", "<=", 0.8),
    ("train ia3_qkv/peft_ia3", ">=", 1.2),
)

# The ratios reported, "<table> <numerator>/<denominator>", each at every precision measured
# ("<name> <precision>"). Train and eval compare img/s, memory compares peak MB; in the eval
# table "merged" and "unmerged" stand for ours.
RATIOS: tuple[str, ...] = (
    "train ours/peft", "train ours/full", "train ours_bf16w/peft", "train ours_compile/peft",
    "train ours_compile/peft_compile", "train ours_cudagraphs/peft",
    "train ours_cudagraphs/peft_compile", "train ours/paper", "train ours_gc/peft",
    "train ours_fp8/ours", "train ours_fp8/peft", "train ours_fp8_compile/peft_compile",
    "train ours_fp8_compile/peft",
    "memory ours/full", "memory ours/peft", "memory ours_bf16w/full", "memory ours_gc/full",
    "memory ours_fp8/full",
    "eval merged/plain", "eval unmerged/plain", "eval ours_bf16w_merged/plain", "eval peft/plain",
    "eval paper/plain", "eval ours_fp8_merged/ours_merged",
    "train dora_qkv/peft_dora", "memory dora_qkv/peft_dora", "train dora/peft_dora",
    "memory dora/peft_dora", "train ia3_qkv/peft_ia3", "memory ia3_qkv/peft_ia3",
    "train ia3/peft_ia3", "memory ia3/peft_ia3", "eval peft_dora/plain", "eval peft_ia3/plain",
)
FIELDS = {"train": "img_s", "eval": "img_s", "memory": "peak_mb"}


def bf16_peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, or None (CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK.items() if key in name), None)


def default_precisions(device: torch.device) -> list[str]:
    """fp32 everywhere, plus bf16 where the device computes it natively, plus the
    paper's fp16 on CUDA."""
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]  # fp16: the paper's engine, as it runs
    return ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]


def fp8_runs_on(device: torch.device) -> bool:
    """Whether FP8 products run on ``device`` (CUDA compute capability 8.9+, or the CPU)."""
    try:
        lora.check_fp8_support(device)
    except ValueError:
        return False
    return True


def valid_case(impl: str, prec: str, device: torch.device) -> bool:
    """Whether (implementation, precision) is measured: the paper's code autocasts CUDA only
    (fp16 is its own engine's precision, timed for it alone), the bf16-held backbone only
    makes sense under bf16 autocast, FP8 needs a device that runs it (on a GPU it is timed
    under bf16 autocast, its peer)."""
    if prec == "fp16":
        return impl == "paper" and device.type == "cuda"
    if impl == "ours_bf16w":
        return prec == "bf16"
    if impl.startswith("ours_fp8"):
        return fp8_runs_on(device) and (prec == "bf16" or device.type == "cpu")
    if impl == "ours_cudagraphs":
        return device.type == "cuda"
    if impl == "paper" and prec != "fp32":
        return device.type == "cuda"
    return True


def method_contenders() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every registered method that is not a built-in contender, under its own name, and the
    same-target variants of those that have a PEFT peer: contender -> (method, flag values
    that differ from the flags' defaults)."""
    return {**{name: (name, {}) for name in methods.REGISTRY if name not in BUILT_IN}, **VARIANTS}


def all_impls() -> tuple[str, ...]:
    """Every contender name ``--impls`` accepts."""
    return TRAIN_IMPLS + OPTIONAL_IMPLS + tuple(method_contenders()) + tuple(PEERS)


def expand_methods(spec: str) -> list[str]:
    """The contenders ``--methods`` adds: for each method named ("all": every registered
    one), its contender, and its same-target variant and PEFT peer where they exist."""
    if not spec:
        return []
    names = list(methods.REGISTRY) if spec == "all" else [n.strip() for n in spec.split(",")]
    unknown = [n for n in names if n not in methods.REGISTRY]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(methods.REGISTRY)} or all")
    out: list[str] = []
    contenders = method_contenders()
    for name in names:
        out.append(BUILT_IN.get(name, name))
        if name == "lora":
            out.append("peft")
        out += [c for c, (m, flags) in contenders.items() if m == name and flags]
        out += [p for p, m in PEERS.items() if m == name]
    return list(dict.fromkeys(out))


def method_settings(method: str, rank: int, alpha: float, dropout: float,
                    overrides: dict[str, Any] | None = None) -> Any:
    """A method's settings from its flags' defaults, LoRA's rank, alpha and dropout as this
    script's flags give them, and ``overrides`` (flag destination -> value)."""
    values = {f.dest: f.options.get("default") for f in methods.all_flags()}
    values.update(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout, **(overrides or {}))
    return methods.get(method).from_flags(values)


def build_peer(impl: str, model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """A HF PEFT peer on the plain ViT ``model``: its adapters, and fc_norm + head trained."""
    if peft is None:
        raise RuntimeError(f"the '{impl}' peer needs HF PEFT (pip install peft)")
    if impl in ("peft", "peft_compile", "peft_dora"):
        cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                              target_modules=["qkv"], use_dora=impl == "peft_dora")
    elif impl == "peft_ia3":
        # PEFT scales the output of a target and the input of a feedforward one: q, k, v
        # (the whole fused qkv) and fc2's input, the MLP's inner activation.
        cfg = peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"])
    else:
        raise ValueError(f"unknown PEFT peer {impl!r}")
    # get_peft_model adapts the timm ViT in place; its forward is the ViT's own.
    model = peft.get_peft_model(model, cfg).base_model.model
    for name in lora.HEAD_MODULES:  # the same classifier is trained as in ours
        getattr(model, name).requires_grad_(True)
    return model


def build(impl: str, arch: str, img_size: int, rank: int, alpha: float, dropout: float,
          device: torch.device) -> nn.Module:
    """One implementation's training model on ``device``, trainable parameters set."""
    torch.manual_seed(0)  # the same backbone weights for every implementation
    ours = impl.startswith("ours")
    contender = method_contenders().get(impl)
    if ours:
        method, settings = "lora", mv.LoRASpec(rank=rank, alpha=alpha, dropout=dropout, pos="attn")
    elif contender is not None:
        method, settings = contender[0], method_settings(contender[0], rank, alpha, dropout,
                                                         contender[1])
    else:  # peers start from the plain model (every tensor trainable), set their own trained set
        method, settings = "full", None
    config = mv.ModelConfig(
        model=arch, method=method, class_names=[f"class{k}" for k in range(NUM_CLASSES)],
        img_size=img_size, global_pool=True, norm="mrm", mean=(0.5,) * 3, std=(0.25,) * 3,
        method_settings=settings)
    model = mv.build_model(config)
    if impl == "ours_gc":
        model.set_grad_checkpointing(True)  # recompute block activations in backward
    elif impl in ("peft", "peft_compile", *PEERS):
        model = build_peer(impl, model, rank, alpha, dropout)
    elif impl == "paper":
        to_paper_style(model, rank=rank, alpha=alpha, dropout=dropout)
    elif impl == "full":
        model.requires_grad_(True)
    elif not ours and contender is None:
        raise ValueError(f"unknown implementation {impl!r}; choose from {all_impls()}")
    model.to(device)
    if impl == "ours_bf16w":
        lora.cast_frozen_(model, torch.bfloat16)
    if impl.startswith("ours_fp8"):
        lora.to_float8_(model)
    if impl.endswith("_compile"):
        model = torch.compile(model)
    if impl == "ours_cudagraphs":
        model = torch.compile(model, mode="reduce-overhead")
    return model


def amp_context(impl: str, device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast each implementation's training loop would use."""
    if impl == "paper":
        return lambda: paper_autocast(device, dtype)
    return lambda: autocast(device, dtype)


class Trainer:
    """One implementation's model, optimizer and a closure for one training step."""

    def __init__(self, impl: str, model: nn.Module) -> None:
        self.impl, self.model = impl, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=1e-4, momentum=0.9)

    def step(self, x: torch.Tensor, y: torch.Tensor, amp: Callable[[], contextlib.AbstractContextManager],
             scaler: torch.amp.GradScaler | None = None) -> None:
        """Forward, BCE-with-logits, backward, optimizer step. With a ``scaler``, as the
        paper's engine steps under fp16: a scaled backward and step, and the loss read on the
        host (it logs every step's loss, a sync per step)."""
        self.model.train()
        with amp():
            logits = self.model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        if scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(self.optimizer)
            scaler.update()
            loss.item()
        self.optimizer.zero_grad(set_to_none=True)


def step_fn(trainer: Trainer, prec: str, x: torch.Tensor, y: torch.Tensor,
            device: torch.device) -> Callable[[], None]:
    """One training step of ``trainer`` at ``prec``, as its own loop would run it."""
    amp = amp_context(trainer.impl, device, PRECISIONS[prec])
    if prec == "fp16":  # only the paper's engine trains in fp16, with a loss scaler
        scaler = torch.amp.GradScaler(device.type)
        return lambda: trainer.step(x, y, amp, scaler)
    return lambda: trainer.step(x, y, amp)


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------

def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory_here(impl: str, prec: str, cfg: dict[str, Any], device: torch.device,
                        steps: int) -> dict[str, Any]:
    """Peak memory (MB) of training steps of one implementation, measured in this process."""
    x, y = make_batch(cfg["batch_size"], cfg["img_size"], device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    else:
        base_rss = _proc_status_kb("VmRSS")
        base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer = Trainer(impl, build(impl, cfg["arch"], cfg["img_size"], cfg["rank"], cfg["alpha"],
                                  cfg["dropout"], device))
    step = step_fn(trainer, prec, x, y, device)
    timed(step, 1, device)  # one step: allocates gradients and optimizer state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        gc.collect()
        reset = base_rss is not None and _reset_peak_rss()
    timed(step, steps, device)
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    elif reset:
        peak, method = (_proc_status_kb("VmHWM") - base_rss) * 1024, "VmHWM after reset - VmRSS before build"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_max) * 1024
        method = "ru_maxrss increase (includes build transients)"
    del trainer
    return {"impl": impl, "prec": prec, "peak_mb": round(peak / 2**20, 1), "method": method}


def measure_memory_subprocess(impl: str, prec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``measure_memory_here`` in a fresh interpreter (CPU: RSS is per process)."""
    flags = ("model", "batch_size", "img_size", "rank", "alpha", "dropout", "mem_steps", "threads")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory_worker", f"{impl}:{prec}",
           "--device", "cpu", *(arg for f in flags for arg in (f"--{f}", str(getattr(args, f))))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(BENCH))
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {impl}:{prec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------

def make_batch(batch_size: int, img_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of images and 14 multi-hot labels."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g)
    y = torch.randint(0, 2, (batch_size, NUM_CLASSES), generator=g).float()
    return x.to(device), y.to(device)


def median_rates(cases: dict[str, Callable[[], None]], batch_size: int, steps: int, rounds: int,
                 device: torch.device) -> dict[str, dict[str, Any]]:
    """Images/s of each case: ``steps`` calls per round, cases interleaved, median of rounds."""
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            rates[name].append(steps * batch_size / timed(fn, steps, device))
    return {name: {"img_s": statistics.median(r), "rounds": [round(v, 3) for v in r]}
            for name, r in rates.items()}


def selected_impls(args: argparse.Namespace) -> list[str]:
    """The contenders asked for (``--impls`` + ``--methods``), less the PEFT peers when HF
    PEFT is not installed (with a note)."""
    impls = list(dict.fromkeys(args.impls.split(",") + expand_methods(args.methods)))
    for name in ("peft", "peft_compile", *PEERS):
        if peft is None and name in impls:
            print(f"HF PEFT not installed: the '{name}' peer is skipped", file=sys.stderr)
            impls.remove(name)
    return impls


def bench_config(args: argparse.Namespace) -> dict[str, Any]:
    """What every contender is built and stepped with."""
    return dict(arch=args.model, img_size=args.img_size, rank=args.rank, alpha=args.alpha,
                dropout=args.dropout, batch_size=args.batch_size)


def measure_memories(cases: list[tuple[str, str]], cfg: dict[str, Any], args: argparse.Namespace,
                     device: torch.device) -> dict[str, Any]:
    """Peak memory of each (contender, precision): in this process on CUDA, in a fresh
    subprocess each on a CPU."""
    memory: dict[str, Any] = {}
    for impl, prec in cases:
        key = f"{impl}:{prec}"
        memory[key] = (measure_memory_here(impl, prec, cfg, device, args.mem_steps)
                       if device.type == "cuda" else measure_memory_subprocess(impl, prec, args))
        print(f"memory {key} {memory[key]['peak_mb']} MB", file=sys.stderr)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return memory


def prepare_steps(trainers: dict[str, Trainer], cases: list[tuple[str, str]], x: torch.Tensor,
                  y: torch.Tensor, warmup: int, device: torch.device,
                  ) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    """One step closure per case, warmed up; the first step of each also counts its FLOPs
    (they do not depend on the dtype; compiled contenders are not counted)."""
    train_fns: dict[str, Callable[[], None]] = {}
    flops: dict[str, int] = {}
    for impl, prec in cases:
        fn = step_fn(trainers[impl], prec, x, y, device)
        key = f"{impl}:{prec}"
        flops[key] = count_flops(fn) if impl not in COMPILED_IMPLS else 0
        for _ in range(warmup):
            fn()
        train_fns[key] = fn
    return train_fns, flops


def annotate_train(train: dict[str, dict[str, Any]], trainers: dict[str, Trainer],
                   flops: dict[str, int], batch_size: int, device: torch.device) -> None:
    """Add the trainable count, GFLOP per step, TFLOP/s and MFU to each training row."""
    peak = bf16_peak_flops(device)
    for key, r in train.items():
        impl = key.split(":")[0]
        r["trainable"] = sum(p.numel() for p in trainers[impl].params)
        fl = flops.get(key) or flops.get(f"ours:{key.split(':')[1]}", 0)  # compiled = same work
        r["gflop_step"] = round(fl / 1e9, 2)
        r["tflop_s"] = fl * r["img_s"] / batch_size / 1e12
        r["mfu"] = r["tflop_s"] * 1e12 / peak if peak else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All measurements; returns the results as plain data."""
    device = resolve_device(args.device)
    precs = args.amp.split(",") if args.amp != "auto" else default_precisions(device)
    impls = selected_impls(args)
    cfg = bench_config(args)
    if {"ours_fp8", "ours_fp8_compile"} & set(impls) and not fp8_runs_on(device):
        print(f"no FP8 products on {device} (CUDA compute capability 8.9+ needed): the "
              "'ours_fp8' contender is skipped", file=sys.stderr)
    cases = [(i, p) for i in impls for p in precs if valid_case(i, p, device)]
    result: dict[str, Any] = {"machine": machine_info(device), "config": {
        **cfg, "steps": args.steps, "rounds": args.rounds, "precisions": precs,
        "eval_batch_size": args.eval_batch_size, "impls": impls}}

    # Peak memory first, while nothing else is allocated.
    result["memory"] = {} if args.no_memory else measure_memories(cases, cfg, args, device)
    if args.json and result["memory"]:
        write_json(args.json, {**result, "partial": "memory done, throughput not"})

    x, y = make_batch(args.batch_size, args.img_size, device)
    impls = [i for i in impls if any(c[0] == i for c in cases)]
    trainers = {impl: Trainer(impl, build(impl, args.model, args.img_size, args.rank, args.alpha,
                                          args.dropout, device)) for impl in impls}
    train_fns, flops = prepare_steps(trainers, cases, x, y, args.warmup, device)
    train = median_rates(train_fns, args.batch_size, args.steps, args.rounds, device)
    annotate_train(train, trainers, flops, args.batch_size, device)
    result["train"] = train
    if args.json:  # kept if a time limit stops the evaluation phase
        write_json(args.json, {**result, "partial": "training done, evaluation not"})
    for key, r in train.items():
        print(f"train {key}: {r['img_s']:.2f} img/s", flush=True)

    result["eval"] = run_eval(trainers, precs, args, device)
    result["ratios"] = ratios(result, precs, device)
    result["goals"] = check_goals(goal_values(result["ratios"], result["train"]))
    return result


def run_eval(trainers: dict[str, Trainer], precs: list[str], args: argparse.Namespace,
             device: torch.device) -> dict[str, Any]:
    """Inference images/s (no_grad, eval mode) of the plain ViT and the adapted models."""
    def merged(impl: str, merge: Callable[[nn.Module], Any] = lora.merge) -> nn.Module:
        model = copy.deepcopy(trainers[impl].model)
        merge(model)
        return model

    models: dict[str, nn.Module] = {}
    if "full" in trainers:
        models["plain"] = trainers["full"].model  # the plain ViT: same architecture, no adapters
    if "ours" in trainers:
        models["ours_merged"], models["ours_unmerged"] = merged("ours"), trainers["ours"].model
    models.update({f"{i}_merged": merged(i) for i in ("ours_bf16w", "ours_fp8") if i in trainers})
    models.update({i: trainers[i].model for i in ("peft", "paper", *PEERS) if i in trainers})
    for impl, (name, _) in method_contenders().items():
        if impl in trainers:  # merged where the method merges, as evaluation runs it
            method = methods.get(name)
            if method.not_mergeable:
                models[impl] = trainers[impl].model
            else:
                models[f"{impl}_merged"] = merged(impl, method.merge)
    xe, _ = make_batch(args.eval_batch_size, args.img_size, device)
    fns: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        model.eval()
        for prec in precs:
            impl = next((i for i in ("paper", "ours_bf16w", "ours_fp8") if name.startswith(i)), "ours")
            if not valid_case(impl, prec, device):
                continue
            amp = amp_context(impl, device, PRECISIONS[prec])

            def fn(m: nn.Module = model, a: Callable[[], contextlib.AbstractContextManager] = amp) -> None:
                with torch.no_grad(), a():
                    m(xe)

            fn()  # warm-up
            fns[f"{name}:{prec}"] = fn
    # A forward pass is short next to the load swings of a shared machine: interleave the
    # contenders batch by batch (steps x rounds slots) and take the median batch.
    return median_rates(fns, args.eval_batch_size, 1, args.steps * args.rounds, device)


def ratios(result: dict[str, Any], precs: list[str], device: torch.device) -> dict[str, float]:
    """The ratios the issue asks for, from whatever cases were measured."""
    out: dict[str, float] = {}

    def put(name: str, table: str, num: str, den: str) -> None:
        rows, field = result.get(table, {}), FIELDS[table]
        if num in rows and den in rows and rows[den][field]:
            out[name] = round(rows[num][field] / rows[den][field], 3)

    alias = {"merged": "ours_merged", "unmerged": "ours_unmerged"}
    for p in precs:
        for name in RATIOS:
            table, pair = name.split(" ")
            num, den = pair.split("/")
            put(f"{name} {p}", table, f"{alias.get(num, num)}:{p}", f"{den}:{p}")
        for impl, (method, _) in method_contenders().items():  # each method against LoRA
            put(f"train {impl}/ours {p}", "train", f"{impl}:{p}", f"ours:{p}")
            put(f"memory {impl}/ours {p}", "memory", f"{impl}:{p}", f"ours:{p}")
            evaluated = impl if methods.get(method).not_mergeable else f"{impl}_merged"
            put(f"eval {evaluated}/plain {p}", "eval", f"{evaluated}:{p}", f"plain:{p}")
    # "As the paper's code runs": ours at the precision our loop picks on this device against
    # the paper's engine at its own (fp16 + GradScaler on CUDA, fp32 elsewhere).
    best = "bf16" if "bf16" in precs and "bf16" in default_precisions(device) else "fp32"
    paper = "fp16" if device.type == "cuda" and "fp16" in precs else "fp32"
    put("train ours/paper as run", "train", f"ours:{best}", f"paper:{paper}")
    return out


def goal_values(rat: dict[str, float], train: dict[str, Any]) -> dict[str, float]:
    """What the goals are checked on: the ratios, and the MFU of each of our contenders
    ("mfu ours_compile bf16")."""
    values = dict(rat)
    for key, r in train.items():
        if key.startswith("ours") and r.get("mfu") is not None:
            values["mfu " + key.replace(":", " ")] = round(r["mfu"], 4)
    return values


def check_goals(values: dict[str, float]) -> list[dict[str, Any]]:
    """Each measured value that one of the issue's goals is about, and whether it is met. A
    goal "a/b" covers "a/b <precision>"; the MFU goal "mfu ours" covers each of ours."""
    found = []
    for prefix, op, threshold in GOALS:
        for key, value in values.items():
            if key == prefix or key.startswith(prefix + " ") or (
                    prefix == "mfu ours" and key.startswith("mfu ours")):
                met = value >= threshold if op == ">=" else value <= threshold
                found.append({"ratio": key, "value": value, "goal": f"{op} {threshold}", "met": met})
    return found


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {**_common.machine_info(device), "python": platform.python_version(),
            "cpu_fast_bf16": cpu_has_fast_bf16(), "peft": getattr(peft, "__version__", None),
            "timm": timm.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["bf16_peak_tflops"] = (bf16_peak_flops(device) or 0) / 1e12 or None
    return info


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def format_report(result: dict[str, Any]) -> str:
    """Markdown tables (training, evaluation) and the ratios against the goals."""
    cfg, mach = result["config"], result["machine"]
    lines = [f"device {mach.get('gpu', mach['device'])}, torch {mach['torch']}, {mach['threads']} threads, "
             f"{cfg['arch']} {cfg['img_size']} px, batch {cfg['batch_size']}, rank {cfg['rank']}, "
             f"{cfg['steps']} steps x {cfg['rounds']} rounds (median)", "",
             "| training step | precision | img/s | peak MB | trainable | GFLOP/step | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in result["train"].items():
        impl, prec = key.split(":")
        mem = result["memory"].get(key, {}).get("peak_mb", "-")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {impl} | {prec} | {r['img_s']:.2f} | {mem} | {r['trainable']:,} | "
                     f"{r['gflop_step']} | {r['tflop_s']:.3f} | {mfu} |")
    lines += ["", "| evaluation (no_grad) | precision | img/s |", "|---|---|---|"]
    for key, r in result["eval"].items():
        impl, prec = key.split(":")
        lines.append(f"| {impl} | {prec} | {r['img_s']:.2f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in result["ratios"].items()]
    lines += ["", "goals:"]
    lines += [f"  {'MET ' if g['met'] else 'NOT '} {g['ratio']} = {g['value']:.2f} (goal {g['goal']})"
              for g in result["goals"]]
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16", choices=sorted(mv.ARCHS))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_batch_size", type=int, default=None, help="default: --batch_size")
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (the paper's 0.1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case after the FLOP count")
    p.add_argument("--mem_steps", type=int, default=2, help="steps measured for peak memory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--amp", default="auto",
                   help="comma list of fp32,bf16,fp16 (fp16: the paper peer only, CUDA); "
                        "auto: fp32, plus bf16 where it is native, plus fp16 on CUDA")
    p.add_argument("--impls", default=",".join(TRAIN_IMPLS),
                   help=f"comma list from {all_impls()}")
    p.add_argument("--methods", default="",
                   help="also time these registered methods (comma list, or all), each with its "
                        "same-target variant and HF PEFT peer where there is one: "
                        f"{list(methods.REGISTRY)}")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--quick", action="store_true",
                   help="batch 4, 2 steps, 1 round, no extra warm-up, 1 memory step: a few minutes on a CPU")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--memory_worker", default=None, help=argparse.SUPPRESS)
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``parser.error``) counts, precisions, contenders and sizes that cannot run."""
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    for flag in ("batch_size", "steps", "rounds", "mem_steps", "rank"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    bad = [p for p in args.amp.split(",") if p not in PRECISIONS] if args.amp != "auto" else []
    if bad:
        parser.error(f"--amp: unknown precision(s) {bad}; use a comma list of {sorted(PRECISIONS)}")
    unknown = [i for i in args.impls.split(",") if i not in all_impls()]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {all_impls()}")
    try:
        expand_methods(args.methods)
    except ValueError as err:
        parser.error(str(err))
    if args.img_size % 16:
        parser.error(f"--img_size {args.img_size} is not a multiple of the patch size 16")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Command line."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the short settings, for each flag not given on the command line
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        quick = {"batch_size": 4, "steps": 2, "rounds": 1, "warmup": 0, "mem_steps": 1}
        for flag, value in quick.items():
            if f"--{flag}" not in given:
                setattr(args, flag, value)
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    check_args(parser, args)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        impl, prec = args.memory_worker.split(":")
        device = resolve_device(args.device)
        print(json.dumps(measure_memory_here(impl, prec, bench_config(args), device, args.mem_steps)))
        return None

    result = run(args)
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
