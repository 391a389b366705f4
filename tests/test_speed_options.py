"""Every speed option gives the same outputs / gradients as the plain path (stated tolerances)."""
import copy
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import lora
import models_vit_lora as mv


def lora_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=5, img_size=32, lora_dropout=0.0,
                                     drop_path_rate=0.0, **kw)
    for _, layer in lora.lora_layers(model):
        layer.lora_B.data.normal_(std=0.05)
    model.head.weight.data.normal_(std=0.05)
    return model


def loss_and_grads(model, x, y, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 2, (4, 5), generator=g).float()


def test_grad_checkpointing_same_loss_and_gradients(batch):
    x, y = batch
    plain = lora_model()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    l1, g1 = loss_and_grads(plain, x, y)
    l2, g2 = loss_and_grads(ckpt, x, y)
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=0)
    assert set(g1) == set(g2) and any(n.endswith("lora_A") for n in g1)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_frozen_backbone_matches_bf16_autocast(batch):
    """Holding frozen weights in bf16 = what autocast computes with them anyway (stated
    tolerance: LayerNorm affine weights are rounded to bf16 too, ~0.4% relative)."""
    x, y = batch
    ref = lora_model()
    fast = copy.deepcopy(ref)
    n_cast = lora.cast_frozen_(fast, torch.bfloat16)
    assert n_cast > 0
    assert all(p.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters() if not p.requires_grad)
    frozen_bytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()  # noqa: E731
                                 if not p.requires_grad)
    assert frozen_bytes(fast) * 2 == frozen_bytes(ref)
    l1, g1 = loss_and_grads(ref, x, y, torch.bfloat16)
    l2, g2 = loss_and_grads(fast, x, y, torch.bfloat16)
    torch.testing.assert_close(l2, l1, atol=2e-2, rtol=2e-2)
    for n in g1:
        cos = F.cosine_similarity(g1[n].flatten(), g2[n].flatten(), dim=0)
        assert cos > 0.98, (n, cos)


def test_merged_eval_equals_unmerged_eval_bf16_backbone(batch):
    x, _ = batch
    model = lora_model().eval()
    lora.cast_frozen_(model, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x).float()
        lora.merge(model)
        merged = model(x).float()
        lora.unmerge(model)
    torch.testing.assert_close(merged, ref, atol=5e-2, rtol=5e-2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-exact restore


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU code, or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.parametrize("backend", [
    "aot_eager",  # graph capture + AOT autograd: what --compile traces, in seconds
    # What --compile runs: generated C++ kernels (~50 s on 2 cores with a cold cache).
    pytest.param("inductor", marks=pytest.mark.skipif(
        _cxx_compiler() is None, reason="inductor needs a C++ compiler for CPU code (none on PATH)")),
])
def test_torch_compile_same_outputs_and_gradients(batch, backend):
    x, y = batch
    eager = lora_model()
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend=backend)
    l1, g1 = loss_and_grads(eager, x, y)
    l2, _ = loss_and_grads(compiled, x, y)
    g2 = {n: p.grad for n, p in compiled_src.named_parameters() if p.requires_grad}
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)


def test_linear_probe_builds_no_graph_through_backbone(batch):
    """Nothing upstream of the first trainable tensor is differentiated: with only the
    head trainable, no backbone activation requires grad."""
    x, y = batch
    model = mv.vit_tiny_patch16(depth=2, num_classes=5, img_size=32)
    lora.mark_only_lora_as_trainable(model)
    feats = model.forward_features(x)
    assert not feats.requires_grad
    _, grads = loss_and_grads(model, x, y)
    assert set(grads) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def test_loader_workers_pinned_persistent_give_the_same_batches(tmp_path, recwarn):
    """Worker processes, persistent workers and pinned memory (asked for; used only with an
    accelerator) change where batches are made, not what they hold: the seeded train loader
    (random crops and flips) and the eval loader give the same tensors as the single-process
    loader, epoch after epoch."""
    import datasets
    from datasets.loader import accelerator_available, build_loader
    from util.misc import DistInfo

    root = datasets.make_demo_dataset(tmp_path / "NIH_demo", num_images=40, image_size=48, seed=2)
    single = DistInfo(rank=0, world_size=1, local_rank=0)

    def batches(train, num_workers, pin_memory, epochs=2):
        transform = datasets.build_transform(train, recipe="sgd", input_size=32, norm="mrm")
        ds = datasets.build_dataset("train" if train else "val", root, transform=transform, cache="off")
        loader = build_loader(ds, single, train=train, batch_size=4, seed=5, num_workers=num_workers,
                              pin_memory=pin_memory)
        out = []
        for epoch in range(epochs):
            if train:
                loader.sampler.set_epoch(epoch)
            out.append([(x.clone(), y.clone()) for x, y in loader])
        return loader, out

    for train in (True, False):
        _, plain = batches(train, num_workers=0, pin_memory=False)
        loader, fast = batches(train, num_workers=2, pin_memory=True)
        assert loader.persistent_workers and loader.num_workers == 2
        assert loader.pin_memory == accelerator_available()
        for epoch_plain, epoch_fast in zip(plain, fast, strict=True):
            assert len(epoch_plain) == len(epoch_fast) > 1
            for (x0, y0), (x1, y1) in zip(epoch_plain, epoch_fast):
                assert torch.equal(x0, x1) and torch.equal(y0, y1)
        if train:  # the augmentation really is random: epochs differ
            assert not torch.equal(plain[0][0][0], plain[1][0][0])
    assert not [w for w in recwarn if "pin_memory" in str(w.message)]


@pytest.mark.parametrize("log_freq,expected", [(5, 3), (4, 4), (1, 11)])
def test_training_reads_the_loss_back_once_per_log_window(monkeypatch, log_freq, expected):
    """The loop reads the loss back to the host (a device sync) only at the end of each
    log_freq window and once for the epoch mean: 10 steps with log_freq 5 read it 3 times."""
    from engine_finetune import train_one_epoch

    model = lora_model()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 2, (2, 5), generator=g))
              for _ in range(10)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    stats = train_one_epoch(model, loader, optimizer, torch.device("cpu"), 0, set_lr=lambda e: 0.01,
                            log_freq=log_freq, progress=False)
    assert len(reads) == expected
    assert math.isfinite(stats["loss"]) and stats["lr"] == 0.01
