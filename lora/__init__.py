"""A small LoRA implementation for timm Vision Transformers.

    model = vit_base_patch16(num_classes=14)      # plain timm ViT
    load_pretrained(model, "MRM.pth")             # weights first
    inject_lora(model, rank=4, pos="attn")        # then adapters (q, v of qkv)
    mark_trainable(model)                         # LoRA + fc_norm + head
"""
from .folding import Mergeable, canonical_name, merge, merged_state_dict, unmerge
from .fp8 import Float8Linear, check_fp8_support, to_float8_
from .layers import LoRALinear
from .model import (
    BACKBONE_DTYPES,
    HEAD_MODULES,
    POSITIONS,
    cast_frozen_,
    check_backbone_dtype,
    count_parameters,
    inject_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    mark_trainable,
    parse_lora_pos,
    print_trainable_parameters,
    set_backbone_dtype_,
    trainable_report,
    trainable_state_dict,
)

__all__ = [
    "BACKBONE_DTYPES", "HEAD_MODULES", "POSITIONS", "Float8Linear", "LoRALinear", "Mergeable", "canonical_name", "cast_frozen_",
    "check_backbone_dtype", "check_fp8_support", "count_parameters", "to_float8_",
    "inject_lora", "lora_layers", "lora_state_dict", "mark_only_lora_as_trainable", "mark_trainable",
    "merge", "merged_state_dict", "parse_lora_pos", "print_trainable_parameters", "set_backbone_dtype_", "trainable_report",
    "trainable_state_dict", "unmerge",
]
