"""Files the tests make themselves (pre-training checkpoints with MAE / MRM key names), and
the command line of a tiny training run."""
from __future__ import annotations

import argparse
import pathlib
from pathlib import Path

import torch

import lora
import models_vit_lora as mv
from datasets import CLASS_NAMES, NORM_STATS
from checkpoints import file_sha256, model_config, save_checkpoint


def encoder_state(arch: str = "vit_tiny_patch16", depth: int = 2, img_size: int = 224,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random encoder tensors with the timm / MAE names (cls-token model, `norm.*` kept)."""
    torch.manual_seed(seed)
    model = mv.MODELS[arch](depth=depth, img_size=img_size, global_pool=False, num_classes=0)
    # Non-trivial LayerNorm affine values so that a wrong mapping changes the output.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if "norm" in k:
            state[k] = state[k] + 0.1 * torch.randn_like(state[k])
    return state


def mrm_checkpoint(path: Path, arch: str = "vit_tiny_patch16", depth: int = 2,
                   text_branch: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write an MRM/MAE-style pre-training file; return the encoder tensors it holds."""
    enc = encoder_state(arch, depth, seed=seed)
    dim = enc["cls_token"].shape[-1]
    dec = 32
    full = dict(enc)
    full["mask_token"] = torch.zeros(1, 1, dec)
    full["decoder_embed.weight"] = torch.randn(dec, dim)
    full["decoder_embed.bias"] = torch.zeros(dec)
    full["decoder_pos_embed"] = torch.zeros(1, 197, dec)
    full["decoder_blocks.0.norm1.weight"] = torch.ones(dec)
    full["decoder_blocks.0.attn.qkv.weight"] = torch.randn(3 * dec, dec)
    full["decoder_norm.weight"] = torch.ones(dec)
    full["decoder_pred.weight"] = torch.randn(16 * 16 * 3, dec)
    if text_branch:
        full["bert_encoder.embeddings.word_embeddings.weight"] = torch.randn(50, 16)
        full["bert_encoder.encoder.layer.0.attention.self.query.weight"] = torch.randn(16, 16)
        full["bert_mlp.0.weight"] = torch.randn(16, dim)
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, lr=None,
                              blr=1.5e-4, batch_size=64, output_dir="./out", norm_pix_loss=True)
    torch.save({"model": full, "optimizer": {"state": {}, "param_groups": []}, "epoch": 199,
                "scaler": {"scale": 65536.0, "_growth_tracker": 3}, "args": args}, path)
    return enc


def trained_checkpoint(root: Path, class_names=None, img_size: int = 64, global_pool: bool = True,
                       seed: int = 0, unsafe: bool = False) -> tuple[Path, Path]:
    """A tiny LoRA checkpoint on a fake MRM file, with non-zero LoRA and head: (stem, MRM path).
    ``unsafe``: the MRM file pickles a class the weights-only reader refuses (a pathlib path)."""
    class_names = list(class_names or CLASS_NAMES["nih"])
    root.mkdir(parents=True, exist_ok=True)
    mrm = root / "MRM.pth"
    mrm_checkpoint(mrm)
    if unsafe:
        saved = torch.load(mrm, weights_only=False)
        saved["args"].output_dir = pathlib.PurePosixPath("./out")
        torch.save(saved, mrm)
    torch.manual_seed(seed)
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=len(class_names), img_size=img_size,
                                     global_pool=global_pool)
    mv.load_pretrained(model, mrm, allow_unsafe_pickle=unsafe)
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora.lora_layers(model):
        layer.lora_B.data = 0.1 * torch.randn(layer.lora_B.shape, generator=g)
    model.head.weight.data = 0.5 * torch.randn(model.head.weight.shape, generator=g)
    if global_pool:
        model.fc_norm.weight.data += 0.1 * torch.randn(model.fc_norm.weight.shape, generator=g)
    mean, std = NORM_STATS["mrm"]
    config = model_config(
        model="vit_tiny_patch16", method="lora", class_names=class_names, img_size=img_size,
        global_pool=global_pool, norm="mrm", mean=mean, std=std, pretrained=str(mrm),
        pretrained_sha256=file_sha256(mrm),
        method_settings={"rank": 4, "alpha": 32.0, "dropout": 0.1, "pos": "attn"},
        model_kwargs={"depth": 2}, dataset="nih", eval_recipe="sgd")
    stem = root / "run" / "checkpoint-best"
    save_checkpoint(stem, model, config)
    return stem, mrm


def demo_data_and_weights(root: Path, num_images: int = 60, seed: int = 1) -> tuple[Path, Path]:
    """A small NIH-layout demo data set (32 px) and a fake depth-2 MRM checkpoint beside it."""
    from datasets import make_demo_dataset

    data = make_demo_dataset(root / "NIH_demo", num_images=num_images, image_size=32, seed=seed)
    weights = root / "MRM.pth"
    mrm_checkpoint(weights)
    return data, weights


def tiny_run_args(data, weights, out, *extra: str, seed: int) -> list[str]:
    """Flags of a fast training run on demo data: depth-2 tiny ViT at 32 px, 2 epochs, fp32."""
    return ["--data_path", str(data), "--dataset", "nih", "--finetune", str(weights),
            "--model", "vit_tiny_patch16_lora", "--depth", "2", "--input_size", "32",
            "--batch_size", "16", "--num_workers", "0", "--amp", "none", "--log_freq", "1",
            "--epochs", "2", "--warmup_epochs", "1", "--lr", "0.05", "--output_dir", str(out),
            "--run_name", "", "--no_progress", "--seed", str(seed), *extra]
