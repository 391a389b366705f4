"""Files the tests make themselves: pre-training checkpoints with MAE / MRM key names."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import models_vit_lora as mv


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
