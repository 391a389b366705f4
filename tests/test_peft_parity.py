"""Our LoRA layer against HF PEFT's on the same timm ViT with the same A/B values.

PEFT imports transformers, which looks for HF's `datasets`; our `datasets/` package would
shadow it, so the comparison runs in a subprocess that imports PEFT before the
repository is on sys.path.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("peft")
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
