"""FP8 products for the frozen backbone (lora/fp8.py, --backbone_dtype fp8), on the CPU."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets
import lora
import main_finetune_lora as mfl
import models_vit_lora as mv
from _fakes import mrm_checkpoint, tiny_run_args
from lora.fp8 import Float8Linear, check_fp8_support, to_float8_

# e4m3 keeps 3 mantissa bits (about 2.6% rms relative rounding error per operand), e5m2 two:
# a correct forward lands near 4% relative error, the input gradient near 6%. A wrong scale
# or a transposed weight is off by 100% or more.
FWD_REL_TOL = 0.06
DGRAD_REL_TOL = 0.09


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def frozen_linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).requires_grad_(False)


def tiny_vit(seed: int = 0) -> nn.Module:
    """A depth-2 LoRA ViT at 32 px, frozen, with a non-zero LoRA update."""
    torch.manual_seed(seed)
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=14, img_size=32, lora_dropout=0.0)
    lora.mark_trainable(model)
    for _, layer in lora.lora_layers(model):
        layer.lora_B.data.normal_(std=0.05)
    return model


@pytest.mark.parametrize("shape", [(64, 96), (64, 64), (192, 576)])
def test_output_and_input_gradient_close_to_fp32(shape):
    """Square weights included: a transposed layout would pass the shape checks there."""
    ref = frozen_linear(*shape)
    fp8 = Float8Linear.from_linear(copy.deepcopy(ref))
    x = torch.randn(4, 10, shape[0], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = fp8(x), ref(x_ref)
    grad = torch.randn_like(out_ref)
    out.backward(grad)
    out_ref.backward(grad)
    assert out.shape == out_ref.shape and out.dtype == torch.float32
    assert rel_error(out.detach(), out_ref.detach()) < FWD_REL_TOL
    assert rel_error(x.grad, x_ref.grad) < DGRAD_REL_TOL
    assert not torch.equal(out.detach(), out_ref.detach())  # the fp8 path ran, not F.linear


def test_autocast_output_dtype_and_gradient_dtype():
    ref = frozen_linear(64, 32)
    fp8 = Float8Linear.from_linear(copy.deepcopy(ref))
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp8(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32  # the input's dtype
    assert rel_error(out.detach(), ref(x).detach()) < FWD_REL_TOL
    assert rel_error(x.grad, ref.weight.sum(0).expand(8, -1)) < DGRAD_REL_TOL


def test_activation_scale_follows_the_input_magnitude():
    """Dynamic amax scaling: tiny and huge activations keep their relative accuracy (a fixed
    scale would flush 1e-4 to zero in e4m3 and saturate 1e4 at 448)."""
    ref = frozen_linear(64, 48)
    fp8 = Float8Linear.from_linear(copy.deepcopy(ref))
    for magnitude in (1e-4, 1e4):
        x = torch.randn(16, 64) * magnitude
        out, out_ref = fp8(x) - ref.bias, ref(x) - ref.bias
        assert rel_error(out.detach(), out_ref.detach()) < FWD_REL_TOL, magnitude


def test_odd_shapes_fall_back_to_the_ordinary_product(monkeypatch):
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    odd = frozen_linear(20, 24)  # in_features not a multiple of 16
    fp8 = Float8Linear.from_linear(copy.deepcopy(odd))
    assert not fp8.fp8_eligible
    x = torch.randn(3, 20, requires_grad=True)
    out = fp8(x)
    torch.testing.assert_close(out, odd(x), atol=0, rtol=0)
    out.sum().backward()
    assert x.grad is not None and not calls
    aligned = Float8Linear.from_linear(frozen_linear(32, 16))
    aligned(torch.randn(3, 32, requires_grad=True)).sum().backward()
    assert len(calls) == 2  # forward and input gradient


def test_refuses_a_weight_that_requires_grad():
    fp8 = Float8Linear.from_linear(frozen_linear(32, 32))
    fp8.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no weight gradient"):
        fp8(torch.randn(2, 32))


def test_converts_frozen_block_linears_only():
    model = tiny_vit()
    assert to_float8_(model) == 2 * 4  # qkv (base layer), proj, fc1, fc2 per block
    for blk in model.blocks:
        assert isinstance(blk.attn.qkv, lora.LoRALinear)
        assert isinstance(blk.attn.qkv.base_layer, Float8Linear)
        for linear in (blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert isinstance(linear, Float8Linear)
    assert type(model.head) is nn.Linear and type(model.patch_embed.proj) is nn.Conv2d
    assert to_float8_(model) == 0  # already converted
    full = mv.vit_tiny_patch16(depth=2, num_classes=14, img_size=32)  # every tensor trainable
    assert to_float8_(full) == 0
    assert not any(isinstance(m, Float8Linear) for m in full.modules())
    with pytest.raises(ValueError, match="no 'blocks'"):
        to_float8_(nn.Sequential(nn.Linear(16, 16)))


def test_state_dict_keys_and_values_unchanged():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_float8_(model)
    model(torch.randn(2, 3, 32, 32))  # the fp8 cache exists now
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    again = tiny_vit(seed=1)
    again.load_state_dict(after, strict=True)  # an unconverted model takes it as it is


def test_lora_gradients_close_to_the_unconverted_model():
    ref = tiny_vit()
    fp8 = copy.deepcopy(ref)
    to_float8_(fp8)
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 14)).float()
    for model in (ref, fp8):
        F.binary_cross_entropy_with_logits(model(x), y).backward()
    assert rel_error(fp8(x).detach(), ref(x).detach()) < 0.1
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    names = [n for n in grads if "lora_" in n]
    assert len(names) == 4
    for name, param in fp8.named_parameters():
        if name in grads:
            cos = F.cosine_similarity(param.grad.flatten(), grads[name].flatten(), dim=0)
            assert cos > 0.98, (name, cos.item())


def test_compiled_fp8_model_gives_the_eager_gradients():
    """Under torch.compile (AOT autograd) the LoRA tensors get the eager fp8 model's gradients:
    the fp8 weight cache is a graph break, and LoRA's add must not lose them across it."""
    eager = tiny_vit()
    to_float8_(eager)
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend="aot_eager")
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 14)).float()
    for model in (eager, compiled):
        F.binary_cross_entropy_with_logits(model(x), y).backward()
    got = dict(compiled_src.named_parameters())
    trained = [n for n, p in eager.named_parameters() if p.requires_grad]
    assert sum("lora_" in n for n in trained) == 4
    for name in trained:
        assert got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, dict(eager.named_parameters())[name].grad,
                                   atol=1e-6, rtol=1e-5, msg=name)


def test_compiled_fp8_model_has_no_graph_breaks_and_follows_merges():
    """Compiled, the fp8 layers trace without graph breaks (one graph per training batch
    shape and one for evaluation, not one per linear), and merged evaluation reads the fp8
    weights remade by merge() / unmerge(): the same logits as the eager model."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_vit()
    to_float8_(model)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(1)
    for epoch in range(2):
        for batch in (4, 3):  # a last, smaller batch
            x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 2, (batch, 14)).float()
            for net, params in ((compiled, model), (eager, eager)):
                net.train()
                F.binary_cross_entropy_with_logits(net(x), y).backward()
                with torch.no_grad():
                    for p in params.parameters():
                        if p.grad is not None:
                            p -= 0.5 * p.grad
                            p.grad = None
        lora.merge(model)
        lora.merge(eager)
        with torch.inference_mode():
            model.eval(), eager.eval()
            x = torch.randn(5, 3, 32, 32)
            torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
        lora.unmerge(model)
        lora.unmerge(eager)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_merge_and_unmerge_refresh_the_fp8_weight():
    model = tiny_vit()
    reference = copy.deepcopy(model)
    to_float8_(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        base = model.blocks[0].attn.qkv.base_layer
        first = base.float8_weight().q.float().clone()
        lora.merge(model)
        lora.merge(reference)
        merged = model(x)
        # A stale cache would drop the LoRA update (merged layers skip the adapter path).
        assert not torch.equal(base.float8_weight().q.float(), first)
        assert rel_error(merged, reference(x)) < 0.1
        assert rel_error(merged, unmerged) < 0.1
        lora.unmerge(model)
        torch.testing.assert_close(base.float8_weight().q.float(), first, atol=0, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=0, rtol=0)


def test_cache_follows_a_new_storage_and_refresh():
    fp8 = Float8Linear.from_linear(frozen_linear(32, 32))
    first = fp8.float8_weight()
    scale = first.inv_scale.clone()
    assert fp8.float8_weight() is first  # unchanged weight: the same cache
    fp8.weight.data = fp8.weight.data * 2  # a new storage (as .to() or cast_frozen_ give)
    assert torch.equal(fp8.float8_weight().inv_scale, scale * 2)
    # Remade in place: a compiled graph holding these tensors reads the new values.
    assert fp8.float8_weight() is first
    fp8.weight.data.mul_(0.5)  # through .data: no version bump, the cache cannot tell
    assert torch.equal(fp8.float8_weight().inv_scale, scale * 2)
    fp8.refresh()
    assert torch.equal(fp8.float8_weight().inv_scale, scale)
    torch.testing.assert_close(fp8.float8_weight().q_t, fp8.float8_weight().q.t(), atol=0, rtol=0)


def test_sgd_steps_reduce_the_loss():
    model = tiny_vit()
    to_float8_(model)
    torch.manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8, 14)).float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    lora_a = model.blocks[0].attn.qkv.lora_A.detach().clone()
    losses = []
    for _ in range(5):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(model.blocks[0].attn.qkv.lora_A, lora_a)  # gradients reached LoRA
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


@pytest.mark.parametrize("capability,refused", [((8, 0), True), ((8, 6), True), ((8, 9), False),
                                                ((9, 0), False)])
def test_cuda_capability_check(monkeypatch, capability, refused):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if refused:
        with pytest.raises(ValueError, match=r"--backbone_dtype fp8 .*has %d\.%d" % capability):
            check_fp8_support(torch.device("cuda"))
    else:
        check_fp8_support(torch.device("cuda"))
    check_fp8_support(torch.device("cpu"))  # the CPU runs the products (here: emulated)


def test_old_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(ValueError, match="--backbone_dtype fp8 needs torch 2.5 or later"):
        check_fp8_support(torch.device("cpu"))


def test_flag_refused_on_an_old_gpu_and_for_full_fine_tuning(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    for flags, message in ((["--device", "cuda"], "--backbone_dtype fp8 needs a GPU"),
                           (["--device", "cpu", "--method", "full", "--model", "vit_tiny_patch16"],
                            "--backbone_dtype fp8 needs a frozen backbone")):
        with pytest.raises(SystemExit) as exc:
            mfl.cli(["--demo", "--backbone_dtype", "fp8", "--check_args",
                     "--output_dir", str(tmp_path), *flags])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_fp8_run_end_to_end_then_eval_predict_export(tmp_path):
    """A one-epoch fp8 run records the setting; the saved adapter (trainable tensors only)
    evaluates, predicts and exports in ordinary precision, like any other checkpoint."""
    import export
    import predict

    data = datasets.make_demo_dataset(tmp_path / "NIH_demo", num_images=48, image_size=32, seed=1)
    weights = tmp_path / "MRM.pth"
    mrm_checkpoint(weights)
    out = tmp_path / "run"
    argv = tiny_run_args(data, weights, out, "--amp", "bf16", "--epochs", "1", "--warmup_epochs", "0",
                         "--ci_resamples", "0", "--backbone_dtype", "fp8",
                         "--compile", "on", "--compile_backend", "aot_eager", seed=0)
    assert mfl.cli(argv) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["backbone_dtype"] == "fp8"
    results = json.loads((out / "results_test.json").read_text())
    again = tmp_path / "eval"
    assert mfl.cli(["--eval", "--resume", str(out / "checkpoint-best"), "--data_path", str(data),
                    "--amp", "bf16", "--num_workers", "0", "--ci_resamples", "0",
                    "--output_dir", str(again), "--no_progress"]) == 0
    reloaded = json.loads((again / "results_test.json").read_text())
    assert reloaded["mean_auroc"] == pytest.approx(results["mean_auroc"], abs=1e-6)
    model, _ = predict.load_model(out / "checkpoint-best")
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert export.main(["--checkpoint", str(out / "checkpoint-best"),
                        "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged.safetensors").is_file()


def test_bench_contender_ours_fp8(monkeypatch):
    """bench/bench_model.py's ours_fp8: ours with FP8 block linears, the same trained set,
    timed under bf16 on FP8 GPUs only (any precision on the CPU, when asked for)."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    monkeypatch.setitem(sys.modules, "peft", None)  # the PEFT peer is not needed: skip its import
    import bench_model as bm

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    ours = bm.build("ours", "vit_tiny_patch16", 32, rank=4, alpha=32.0, dropout=0.0, device=cpu)
    fp8 = bm.build("ours_fp8", "vit_tiny_patch16", 32, rank=4, alpha=32.0, dropout=0.0, device=cpu)
    trained = lambda m: {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trained(fp8) == trained(ours)
    assert sum(isinstance(m, Float8Linear) for m in fp8.modules()) == 12 * 4
    bm.Trainer("ours_fp8", fp8).step(torch.randn(2, 3, 32, 32), torch.ones(2, 14),
                                     bm.amp_context("ours_fp8", cpu, None))
    assert bm.valid_case("ours_fp8", "fp32", cpu) and bm.valid_case("ours_fp8", "bf16", cpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert bm.valid_case("ours_fp8", "bf16", cuda) and not bm.valid_case("ours_fp8", "fp32", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not bm.valid_case("ours_fp8", "bf16", cuda)
    result = {"train": {"ours_fp8:bf16": {"img_s": 3.0}, "ours:bf16": {"img_s": 2.0}},
              "eval": {"ours_fp8_merged:bf16": {"img_s": 1.0}, "ours_merged:bf16": {"img_s": 4.0}},
              "memory": {}}
    ratios = bm.ratios(result, ["bf16"], cpu)
    assert ratios["train ours_fp8/ours bf16"] == 1.5
    assert ratios["eval ours_fp8_merged/ours_merged bf16"] == 0.25
