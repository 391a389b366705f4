"""LoRA layer and model helpers: counts, freezing, gradients, merge / unmerge."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lora
import models_vit_lora as mv
from lora import LoRALinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_lora_layer import ReferenceLoRALinear  # noqa: E402


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


@pytest.mark.parametrize("pos", ["attn", "qkv", "qkv_fused", "proj", "mlp", "attn,proj", "all"])
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


def test_qkv_fused_is_one_pair_over_the_whole_qkv_and_does_not_mix_with_its_slices():
    assert lora.parse_lora_pos("qkv_fused,proj") == {"attn.qkv": (True,), "attn.proj": (True,)}
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=3, img_size=32, lora_pos="qkv_fused",
                                     lora_rank=2)
    qkv = model.blocks[0].attn.qkv
    # One rank-2 pair for all 576 rows (PEFT's shape), not a pair per third.
    assert qkv.lora_A.shape == (2, 192) and qkv.lora_B.shape == (576, 2)
    qkv.lora_B.data.normal_()
    torch.testing.assert_close(qkv.delta_weight(), qkv.lora_B @ qkv.lora_A * qkv.scaling)
    for mixed in ("qkv_fused,q", "attn,qkv_fused", "all,qkv_fused"):
        with pytest.raises(ValueError, match="whole .qkv_fused. and in slices"):
            lora.parse_lora_pos(mixed)


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


# --- The forward against the previous formulation -------------------------------------
# The previous forward built B expanded to the full output width (zero rows for slices that
# are not adapted), a full-width update, then scaled and added it. It is the reference here
# and the peer of bench/bench_lora_layer.py, which keeps it.
reference_forward = ReferenceLoRALinear.forward


PATTERNS = [(True,), (True, False, True), (False, True, False), (True, True, True),
            (False, True, True, False)]


def lora_layer(parts, seed=0, dropout=0.0, in_features=16, out_features=48):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features), rank=2, dropout=dropout, parts=parts)
    layer.lora_B.data.normal_()
    return layer


def outputs_and_grads(forward, layer, x, amp=None):
    """Output and the gradients of A, B, x (and of a trainable base) for a fixed output grad."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    if amp is None:
        y = forward(x)
    else:
        with torch.autocast("cpu", dtype=amp):
            y = forward(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.float() * weights).sum().backward()
    grads = {"y": y.detach(), "x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    return grads


def assert_same(new, ref, rel=None, **tol):
    """Same keys, dtypes and values; with ``rel`` the tolerance is relative to each
    tensor's largest value (bf16 rounds each of them to ~3 significant digits)."""
    assert set(new) == set(ref)
    for key in ref:
        assert new[key].dtype == ref[key].dtype, key
        if rel is not None:
            tol = {"atol": rel * ref[key].abs().max().item(), "rtol": 0}
        torch.testing.assert_close(new[key], ref[key], msg=key, **tol)


@pytest.mark.parametrize("parts", PATTERNS)
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16)])
def test_forward_equals_reference_fp32(parts, shape):
    layer = lora_layer(parts)
    x = torch.randn(shape)
    new = outputs_and_grads(layer, layer, x)
    ref = outputs_and_grads(lambda t: reference_forward(layer, t), layer, x)
    assert new["lora_B"].abs().sum() > 0 and new["lora_A"].abs().sum() > 0
    assert new["y"].shape == (*shape[:-1], 48)
    assert_same(new, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parts", [(True,), (True, False, True), (False, True, True, False)])
def test_forward_equals_reference_under_bf16_autocast(parts):
    layer = lora_layer(parts)
    x = torch.randn(2, 5, 16)
    new = outputs_and_grads(layer, layer, x, amp=torch.bfloat16)
    ref = outputs_and_grads(lambda t: reference_forward(layer, t), layer, x, amp=torch.bfloat16)
    assert new["y"].dtype == torch.bfloat16 and new["lora_A"].dtype == torch.float32
    assert_same(new, ref, rel=2e-2)
    # And close to the fp32 result, as far as bf16 allows.
    exact = outputs_and_grads(layer, layer, x)
    assert_same({k: v.float() for k, v in new.items()}, exact, rel=2e-2)


@pytest.mark.parametrize("parts", [(True,), (True, False, True)])
def test_forward_with_bf16_base_outside_autocast(parts):
    layer = lora_layer(parts)
    layer.base_layer.to(torch.bfloat16)  # as lora.cast_frozen_ leaves it; LoRA stays fp32
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    new = outputs_and_grads(layer, layer, x)
    ref = outputs_and_grads(lambda t: reference_forward(layer, t), layer, x)
    assert new["y"].dtype == torch.bfloat16 and new["lora_B"].dtype == torch.float32
    assert new["x"].dtype == torch.bfloat16
    assert_same(new, ref, rel=2e-2)
    # LoRA's own gradients stay fp32 products, as in the earlier formulation (not bf16 ones).
    for key in ("lora_A", "lora_B"):
        torch.testing.assert_close(new[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_forward_never_builds_the_expanded_B():
    layer = lora_layer((True, False, True))

    def refuse():
        raise AssertionError("the forward built the full-width B")

    layer._expanded_B = refuse
    layer(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_unadapted_slice_is_the_base_output():
    layer = lora_layer((True, False, True))
    x = torch.randn(4, 16)
    y = layer(x)
    assert torch.equal(y[:, 16:32], layer.base_layer(x)[:, 16:32])
    assert not torch.equal(y[:, :16], layer.base_layer(x)[:, :16])


def test_same_dropout_mask_as_reference():
    layer = lora_layer((True, False, True), dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(1)
    new = outputs_and_grads(layer, layer, x)
    torch.manual_seed(1)
    ref = outputs_and_grads(lambda t: reference_forward(layer, t), layer, x)
    assert_same(new, ref, atol=1e-5, rtol=1e-5)
    layer.eval()  # dropout off: output no longer depends on the seed
    torch.manual_seed(2)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(a, layer(x))


def test_trainable_base_gets_the_reference_gradients():
    layer = lora_layer((True, False, True))
    layer.base_layer.requires_grad_(True)  # e.g. full fine-tuning of a LoRA-wrapped model
    x = torch.randn(2, 5, 16)
    new = outputs_and_grads(layer, layer, x)
    ref = outputs_and_grads(lambda t: reference_forward(layer, t), layer, x)
    assert "base_layer.weight" in new
    assert_same(new, ref, atol=1e-5, rtol=1e-5)


class _PaddedLinear(nn.Module):
    """A base whose output is a view (rows padded for the product, then cut off), as a
    low-precision linear that needs aligned shapes may return."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        padded = torch.cat([x, x.new_zeros(3, x.shape[-1])])
        return self.linear(padded)[: x.shape[0]]


class _OutputSavingLinear(nn.Module):
    """A base that keeps its own output for backward (exp does)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return torch.exp(self.linear(x))


def test_base_returning_a_view_gets_the_reference_gradients():
    layer = lora_layer((True, False, True))
    layer.base_layer = _PaddedLinear(layer.base_layer)
    x = torch.randn(2, 5, 16)
    new = outputs_and_grads(layer, layer, x)
    ref = outputs_and_grads(lambda t: reference_forward(layer, t.reshape(-1, 16)).view(2, 5, 48),
                            layer, x)
    assert_same(new, ref, atol=1e-5, rtol=1e-5)


def test_base_that_saves_its_output_is_refused_not_silently_wrong():
    layer = lora_layer((True, False, True))
    layer.base_layer = _OutputSavingLinear(layer.base_layer)
    x = torch.randn(4, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        layer(x).sum().backward()


@pytest.mark.parametrize("parts", [(True,), (True, False, True)])
def test_forward_equals_reference_compiled(parts):
    torch._dynamo.reset()
    layer = lora_layer(parts)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 16)
    new = outputs_and_grads(compiled, layer, x)
    ref = outputs_and_grads(lambda t: reference_forward(layer, t), layer, x)
    assert_same(new, ref, atol=1e-5, rtol=1e-5)


def test_merged_forward_is_the_base():
    layer = lora_layer((True, False, True))
    x = torch.randn(2, 5, 16)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_grad_checkpointing_gives_the_same_gradients():
    def run(checkpointing):
        torch.manual_seed(0)
        model = mv.vit_tiny_patch16_lora(depth=2, num_classes=3, img_size=32, lora_dropout=0.1)
        randomize_lora(model)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        torch.manual_seed(1)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = run(False), run(True)
    assert any(n.endswith("lora_A") for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_lora_over_a_graph_break_keeps_its_gradients():
    """A base whose output is made outside the compiled graph (a graph break, as the FP8
    base's weight cache is) hands that output to the LoRA add as a graph input: the
    gradients must still reach A and B."""
    torch.manual_seed(0)

    class OutsideGraph(nn.Linear):
        @torch.compiler.disable
        def forward(self, x):
            return super().forward(x)

    base = OutsideGraph(32, 96).requires_grad_(False)
    layer = LoRALinear(base, rank=4, parts=(True, False, True))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 32, requires_grad=True)
    eager_grads = torch.autograd.grad(layer(x).square().sum(), [layer.lora_A, layer.lora_B, x])
    compiled = torch.compile(layer, backend="aot_eager")
    got = torch.autograd.grad(compiled(x).square().sum(), [layer.lora_A, layer.lora_B, x])
    for a, b in zip(got, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
