"""Our LoRA layer against HF PEFT's on the same timm ViT with the same A/B values.

PEFT imports transformers, which looks for HF's `datasets`; our `datasets/` package would
shadow it, so the comparison runs in a subprocess that imports PEFT before the
repository is on sys.path.
"""
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Found, not imported: PEFT is imported only by the subprocesses.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="HF PEFT is not installed")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import peft, torch                       # before the repository is importable
    sys.path.append(sys.argv[1])
    import lora, models_vit_lora as mv

    def compare(pos, rank=4, alpha=32.0):
        torch.manual_seed(0)
        ours = mv.vit_tiny_patch16(depth=2, num_classes=3, img_size=32)
        theirs = mv.vit_tiny_patch16(depth=2, num_classes=3, img_size=32)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            base = ours.eval().forward_features(x)
        lora.inject_lora(ours, rank=rank, alpha=alpha, dropout=0.0, pos=pos)
        layers = dict(lora.lora_layers(ours))
        for layer in layers.values():
            layer.lora_B.data.normal_()
        n_parts = {name: sum(l.parts) for name, l in layers.items()}
        # Our fused-qkv layer gives each slice its own rank-r pair: the same map as one
        # PEFT LoRA of rank r * n_slices with a block-diagonal B (and alpha scaled alike).
        n = max(n_parts.values())
        targets = sorted({name.split(".", 2)[-1] for name in layers})
        cfg = peft.LoraConfig(r=rank * n, lora_alpha=alpha * n, lora_dropout=0.0,
                              target_modules=targets)
        theirs = peft.get_peft_model(theirs, cfg)
        for name, layer in layers.items():
            assert n_parts[name] == n, "mixed slice counts not compared here"
            m = theirs.base_model.model.get_submodule(name)
            m.lora_A["default"].weight.data.copy_(layer.lora_A.data)
            m.lora_B["default"].weight.data.copy_(layer._expanded_B().data)
        ours.eval(); theirs.eval()
        with torch.no_grad():
            a = ours.forward_features(x)
            b = theirs.base_model.model.forward_features(x)
        return {"max_abs_diff": (a - b).abs().max().item(),
                "lora_effect": (b - base).abs().max().item(), "layers": len(layers)}

    print(json.dumps({pos: compare(pos) for pos in sys.argv[2:]}))
""")


def test_matches_hf_peft(tmp_path):
    script = tmp_path / "parity.py"
    script.write_text(SCRIPT)
    positions = ["qkv", "proj", "mlp"]
    proc = subprocess.run([sys.executable, str(script), str(ROOT), *positions], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(positions)
    for pos, result in results.items():
        check(pos, result)


def check(pos, result):
    assert result["layers"] >= 2, pos
    assert result["lora_effect"] > 0.1, pos  # the adapters really change the features
    assert result["max_abs_diff"] < 1e-5, (pos, result)


# DoRA and IA3 against PEFT's on the same timm ViT, in train mode: the same trainable count,
# logits and every trainable tensor's gradient; with LoRA dropout too (both draw one mask per
# adapted layer from the same seed, so the masks are the same). PEFT adapts a whole linear
# with one adapter: on the fused qkv ours is then one DoRA slice over all of it (our
# `--lora_pos qkv` gives each third its own pair), and IA3 scales q, k and v (`--ia3_attn qkv`).
FAMILY_SCRIPT = textwrap.dedent("""
    import json, sys
    import peft, torch                       # before the repository is importable
    sys.path.append(sys.argv[1])
    import lora, models_vit_lora as mv
    from lora import dora, ia3
    F = torch.nn.functional

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 2, (4, 3), generator=g).float()

    def pair():
        torch.manual_seed(0)
        ours = mv.vit_tiny_patch16(depth=2, num_classes=3, img_size=32)
        theirs = mv.vit_tiny_patch16(depth=2, num_classes=3, img_size=32)
        theirs.load_state_dict(ours.state_dict())
        with torch.no_grad():
            base = ours.forward_features(x)
        return ours, theirs, base

    def run(model, x, y):
        model.train()
        torch.manual_seed(5)  # the same dropout masks: both draw one per adapted layer, in order
        logits = model(x)
        F.binary_cross_entropy_with_logits(logits, y).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads

    def with_head(model):
        for name in lora.HEAD_MODULES:
            getattr(model, name).requires_grad_(True)
        with torch.no_grad():
            model.head.weight.normal_(std=0.1)
        return model

    def compare(ours, theirs, base, names):
        # names: our parameter name -> PEFT's (reshaped alike); base: features before adapting
        theirs.head.weight.data.copy_(ours.head.weight)
        a, ga = run(ours, x, y)
        b, gb = run(theirs, x, y)
        with torch.no_grad():
            effect = (ours.forward_features(x) - base).abs().max().item()
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
        grad_diff = max((ga[n] - gb[names.get(n, n)].reshape(ga[n].shape)).abs().max().item()
                        for n in ga)
        grad_scale = max(v.abs().max().item() for v in ga.values())
        return {"trainable": [count(ours), count(theirs)], "logit_diff": (a - b).abs().max().item(),
                "grad_diff": grad_diff, "grad_scale": grad_scale, "tensors": [len(ga), len(gb)],
                "effect": effect}

    def dora_case(targets, dropout):
        ours, theirs, base = pair()
        # qkv_fused: one DoRA slice over the whole fused qkv, as PEFT adapts it.
        dora.inject_dora(ours, rank=4, alpha=8.0, dropout=dropout,
                         pos="qkv_fused" if targets == ["qkv"] else "mlp")
        dora.mark_trainable(ours)
        with_head(ours)
        cfg = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=dropout, target_modules=targets,
                              use_dora=True)
        theirs = with_head(peft.get_peft_model(theirs, cfg).base_model.model)
        names = {}
        for name, layer in dora.dora_layers(ours):
            with torch.no_grad():
                layer.lora_B.normal_(std=0.2)
                layer.lora_magnitude.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude))
            m = theirs.get_submodule(name)
            m.lora_A["default"].weight.data.copy_(layer.lora_A)
            m.lora_B["default"].weight.data.copy_(layer.lora_B)
            m.lora_magnitude_vector["default"].weight.data.copy_(layer.lora_magnitude)
            for ours_key, key in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                                  ("lora_magnitude", "lora_magnitude_vector.default.weight")):
                names[f"{name}.{ours_key}"] = f"{name}.{key}"
        return compare(ours, theirs, base, names)

    def ia3_case():
        ours, theirs, base = pair()
        ia3.inject_ia3(ours, parts=(True, True, True))
        ia3.mark_trainable(ours)
        cfg = peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"])
        theirs = with_head(peft.get_peft_model(theirs, cfg).base_model.model)
        with_head(ours)
        names = {}
        for i, block in enumerate(ours.blocks):
            for ours_mod, name in ((block.attn.qkv, f"blocks.{i}.attn.qkv"),
                                   (block.mlp.act, f"blocks.{i}.mlp.fc2")):
                with torch.no_grad():
                    ours_mod.ia3_scale.uniform_(0.5, 1.5)
                peft_l = theirs.get_submodule(name).ia3_l["default"]
                peft_l.data.copy_(ours_mod.ia3_scale.reshape(peft_l.shape))
                own = "attn.qkv" if name.endswith("qkv") else "mlp.act"
                names[f"blocks.{i}.{own}.ia3_scale"] = f"{name}.ia3_l.default"
        return compare(ours, theirs, base, names)

    print(json.dumps({"dora_qkv": dora_case(["qkv"], 0.0), "dora_mlp": dora_case(["fc1", "fc2"], 0.0),
                      "dora_qkv_dropout": dora_case(["qkv"], 0.3), "ia3_qkv_fc2": ia3_case()}))
""")


def test_dora_and_ia3_match_hf_peft(tmp_path):
    script = tmp_path / "family.py"
    script.write_text(FAMILY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(ROOT)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == ["dora_mlp", "dora_qkv", "dora_qkv_dropout", "ia3_qkv_fc2"]
    for case, r in results.items():
        assert r["trainable"][0] == r["trainable"][1], (case, r)
        assert r["tensors"][0] == r["tensors"][1], (case, r)
        assert r["logit_diff"] < 1e-5, (case, r)
        assert r["effect"] > 0.1, (case, r)  # the adapters really change the features
        assert r["grad_scale"] > 1e-3, (case, r)  # the gradients compared are not all zero
        assert r["grad_diff"] < 1e-5 * max(1.0, r["grad_scale"]), (case, r)
