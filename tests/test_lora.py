"""LoRA layer and model helpers: counts, freezing, gradients, merge / unmerge."""
import pytest
import torch
import torch.nn as nn

import lora
import models_vit_lora as mv
from lora import LoRALinear


def tiny(**kw):
    kw.setdefault("num_classes", 5)
    kw.setdefault("img_size", 32)
    return mv.vit_tiny_patch16(depth=2, **kw)


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora.lora_layers(model):
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.1


@pytest.mark.parametrize("rank,expected", [(4, 159_758), (8, 307_214), (32, 1_191_950)])
def test_paper_trainable_counts_vit_base(rank, expected):
    model = mv.vit_base_patch16_lora(num_classes=14, lora_rank=rank)
    trainable, total = lora.count_parameters(model)
    assert trainable == expected
    if rank == 4:
        assert total == 85_956_878
        line = lora.trainable_report(model)
        assert line == "trainable params: 159,758 || all params: 85,956,878 || trainable%: 0.1859"
    # A is 2r x 768 and B is 1536 x r in each of the 12 blocks.
    qkv = model.blocks[0].attn.qkv
    assert tuple(qkv.lora_A.shape) == (2 * rank, 768)
    assert tuple(qkv.lora_B.shape) == (1536, rank)


def test_only_lora_fc_norm_head_train_and_all_get_gradients():
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=3, img_size=32)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in names:
        assert n.endswith(("lora_A", "lora_B")) or n.startswith(("fc_norm.", "head.")), n
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} <= names
    assert sum(n.endswith("lora_A") for n in names) == 2
    randomize_lora(model)  # B != 0 so that A receives a gradient
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_lora_at_init_equals_plain_model():
    torch.manual_seed(0)
    plain = tiny()
    adapted = tiny()
    adapted.load_state_dict(plain.state_dict())
    lora.inject_lora(adapted, rank=4, pos="all")
    plain.eval(), adapted.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(adapted(x), plain(x), atol=0, rtol=0)


@pytest.mark.parametrize("pos", ["attn", "qkv", "proj", "mlp", "attn,proj", "all"])
def test_merge_equals_unmerged_and_unmerge_restores(pos):
    torch.manual_seed(0)
    model = tiny()
    lora.inject_lora(model, rank=4, pos=pos)
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    assert lora.merge(model) > 0
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    # Merge state does not depend on train()/eval().
    model.train(), model.eval()
    assert all(layer.merged for _, layer in lora.lora_layers(model))
    with pytest.warns(UserWarning, match="already merged"):
        assert lora.merge(model) == 0  # second merge is refused, nothing added twice
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    lora.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_attn_adapts_q_and_v_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 24), rank=2, parts=(True, False, True))
    layer.lora_B.data.normal_()
    delta = layer.delta_weight()
    assert delta[:8].abs().sum() > 0 and delta[16:].abs().sum() > 0
    assert torch.count_nonzero(delta[8:16]) == 0
    # Each adapted slice uses its own A rows and B block: q = B_q @ A_q * scaling.
    torch.testing.assert_close(delta[:8], layer.lora_B[:8] @ layer.lora_A[:2] * 16.0)
    torch.testing.assert_close(delta[16:], layer.lora_B[8:] @ layer.lora_A[2:] * 16.0)


def test_merge_into_bf16_base_restores_exactly():
    base = nn.Linear(16, 48).to(torch.bfloat16)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=2, parts=(True, False, True))
    layer.lora_B.data.normal_()
    layer.merge()
    assert not torch.equal(base.weight, original)
    layer.unmerge()
    assert torch.equal(base.weight, original)


def test_qkv_subsets_combine():
    assert lora.parse_lora_pos("q,v") == lora.parse_lora_pos("attn") == {"attn.qkv": (True, False, True)}
    assert lora.parse_lora_pos("k") == {"attn.qkv": (False, True, False)}
    assert lora.parse_lora_pos("attn,k,proj") == {"attn.qkv": (True, True, True),
                                                  "attn.proj": (True,)}
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=3, img_size=32, lora_pos="k", lora_rank=2)
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_A.shape == (2, 192) and qkv.lora_B.shape == (192, 2)
    qkv.lora_B.data.normal_()
    delta = qkv.delta_weight()
    assert torch.count_nonzero(delta[:192]) == 0 and torch.count_nonzero(delta[384:]) == 0


@pytest.mark.parametrize("bad", ["attention", "attn,", "", "mlp,foo"])
def test_unknown_lora_pos_rejected(bad):
    with pytest.raises(ValueError, match="lora_pos"):
        lora.parse_lora_pos(bad)


def test_bad_rank_and_double_injection_rejected():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    model = tiny()
    lora.inject_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject_lora(model)


def test_lora_state_dict_holds_only_trainable():
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=3, img_size=32, lora_pos="attn,mlp")
    sd = lora.lora_state_dict(model)
    assert set(sd) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.1.mlp.fc2.lora_B" in sd and "blocks.0.attn.qkv.base_layer.weight" not in sd


def test_merged_state_dict_loads_into_plain_model():
    torch.manual_seed(0)
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=3, img_size=32, lora_pos="all")
    randomize_lora(model)
    model.eval()
    plain = mv.vit_tiny_patch16(depth=2, num_classes=3, img_size=32).eval()
    plain.load_state_dict(lora.merged_state_dict(model), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), model(x), atol=1e-4, rtol=1e-4)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
