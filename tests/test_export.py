"""export.py: merged .safetensors loads strictly into stock timm and matches the adapter model."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import lora
import models_vit_lora as mv
import predict
from datasets import NORM_STATS
from checkpoints import (
    MERGED_FORMAT,
    ExportError,
    export_merged,
    export_paths,
    load_merged,
    max_output_difference,
)
from export import main as export_main
from _fakes import trained_checkpoint
from checkpoints import load_trained, model_config

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    stem, mrm = trained_checkpoint(root, class_names=CLASSES, img_size=64)
    return stem, mrm


def test_export_loads_strict_into_timm_and_matches(trained, tmp_path):
    stem, _ = trained
    model, config = load_trained(stem)
    tensors_path, config_path = export_merged(model, config, tmp_path / "merged", source=stem)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))  # source untouched
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(CLASSES),
                            global_pool="avg", depth=2, img_size=64).eval()
    ref.load_state_dict(load_file(str(tensors_path)), strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), atol=1e-4, rtol=0)
    cfg = json.loads(config_path.read_text())
    assert cfg["format"] == MERGED_FORMAT
    assert cfg["class_names"] == CLASSES and cfg["num_classes"] == 3
    assert cfg["model"] == "vit_tiny_patch16" and cfg["timm_model"] == "vit_tiny_patch16_224"
    assert cfg["img_size"] == 64 and cfg["global_pool"] is True and cfg["timm_kwargs"]["global_pool"] == "avg"
    assert cfg["norm"] == "mrm" and cfg["mean"] == list(NORM_STATS["mrm"][0])
    assert cfg["std"] == list(NORM_STATS["mrm"][1]) and cfg["eval_recipe"] == "sgd"
    # The JSON alone rebuilds the model, as the export's docstring promises.
    again = timm.create_model(cfg["timm_model"], pretrained=False, **cfg["timm_kwargs"])
    again.load_state_dict(load_file(str(tensors_path)), strict=True)


def test_cli_export_then_predict_without_pretrained_file(trained, tmp_path, capsys):
    stem, mrm = trained
    out = tmp_path / "export" / "nih_lora"
    assert export_main(["--checkpoint", str(stem), "--output", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    tensors_path, config_path = export_paths(out)
    assert tensors_path.is_file() and config_path.is_file()
    merged, cfg = load_merged(out)
    adapter, _ = load_trained(stem, mrm)
    assert max_output_difference(adapter, merged, 64) < 1e-4

    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.uint8)).save(img)
    results = {}
    for name, ckpt in (("adapter", stem), ("merged", out.with_suffix(".safetensors"))):
        csv_path = tmp_path / f"{name}.csv"
        rc = predict.main(["--checkpoint", str(ckpt), "--inputs", str(img), "--output",
                           str(csv_path), "--amp", "none", "--num_workers", "0"])
        assert rc == 0
        row = csv_path.read_text().splitlines()[1].split(",")
        results[name] = np.array([float(v) for v in row[1:]])
    np.testing.assert_allclose(results["merged"], results["adapter"], atol=2e-6)


def test_failed_check_writes_nothing_and_keeps_the_earlier_export(trained, tmp_path, monkeypatch,
                                                                  capsys):
    """The export is renamed into place only after it reproduced the adapter model."""
    import export

    stem, _ = trained
    old = tmp_path / "export" / "model"
    old.parent.mkdir()
    earlier = {old.with_suffix(".safetensors"): b"earlier tensors",
               old.with_suffix(".json"): b'{"format": "earlier"}'}
    for path, data in earlier.items():
        path.write_bytes(data)
    monkeypatch.setattr(export, "max_output_difference", lambda *a, **k: 0.5)  # a bad export
    new = tmp_path / "export" / "fresh"
    for out in (old, new):
        assert export_main(["--checkpoint", str(stem), "--output", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("export.py: error: ") and err.count("\n") == 1
        assert "differ from the adapter model by 0.5 > --atol" in err
    assert {p: p.read_bytes() for p in old.parent.iterdir()} == earlier  # no temporary left
    # Into folders the command had to make: none of them is left behind.
    deep = tmp_path / "new" / "exports" / "model"
    assert export_main(["--checkpoint", str(stem), "--output", str(deep)]) == 1
    assert "differ from the adapter model" in capsys.readouterr().err and not (tmp_path / "new").exists()
    monkeypatch.undo()
    # An export is a file the user has: replaced only when asked.
    assert export_main(["--checkpoint", str(stem), "--output", str(old)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in old.parent.iterdir()} == earlier
    assert export_main(["--checkpoint", str(stem), "--output", str(old), "--overwrite"]) == 0
    assert sorted(p.name for p in old.parent.iterdir()) == ["model.json", "model.safetensors"]
    assert load_merged(old)[1].class_names == CLASSES


def test_load_merged_refuses_an_adapter_checkpoint(trained):
    stem, _ = trained
    with pytest.raises(ExportError, match="not a merged export"):
        load_merged(stem)


def test_export_of_merged_model_and_token_pooling(tmp_path):
    torch.manual_seed(0)
    model = mv.vit_tiny_patch16_lora(depth=2, num_classes=2, img_size=32, global_pool=False)
    for _, layer in lora.lora_layers(model):
        layer.lora_B.data.normal_(0, 0.1)
    model.eval()
    mean, std = NORM_STATS["cxr_mae"]
    config = model_config(model="vit_tiny_patch16", method="lora", class_names=["a", "b"],
                          img_size=32, global_pool=False, norm="cxr_mae", mean=mean, std=std,
                          pretrained=None, pretrained_sha256=None,
                          method_settings={"rank": 4, "alpha": 32.0, "dropout": 0.1, "pos": "attn"},
                          model_kwargs={"depth": 2}, eval_recipe="adamw")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    lora.merge(model)  # an already merged model exports the same tensors (no double delta)
    export_merged(model, config, tmp_path / "m")
    loaded, cfg = load_merged(tmp_path / "m.json")
    assert cfg.global_pool is False and cfg.extras["timm_kwargs"]["global_pool"] == "token"
    assert cfg.eval_recipe == "adamw"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=0)


def test_vit_base_export_strict_timm(tmp_path):
    """The real ViT-B/16 shapes and names: what users load with timm.create_model."""
    # Built on the meta device and filled directly: timm's initialisation of 86M weights
    # would take longer than the rest of the test on a small CPU.
    with torch.device("meta"):
        model = mv.vit_base_patch16_lora(num_classes=14, lora_rank=4)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.uniform_(-0.035, 0.035, generator=g)
    mean, std = NORM_STATS["mrm"]
    config = model_config(model="vit_base_patch16", method="lora",
                          class_names=[f"c{i}" for i in range(14)], img_size=224,
                          global_pool=True, norm="mrm", mean=mean, std=std, pretrained=None,
                          pretrained_sha256=None,
                          method_settings={"rank": 4, "alpha": 32.0, "dropout": 0.1, "pos": "attn"})
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        expected = model(x)
    tensors_path, _ = export_merged(model, config, tmp_path / "vitb")
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=14,
                                global_pool="avg")
    ref.load_state_dict(load_file(str(tensors_path)), strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), expected, atol=1e-4, rtol=0)


KILLED_EXPORT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import export
export.max_output_difference = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
export.main(["--checkpoint", sys.argv[2], "--output", sys.argv[3]])
"""


def test_an_export_killed_half_way_leaves_nothing_after_the_next(trained, tmp_path):
    """A SIGKILL leaves the temporary folder of the pair; the next export into that folder
    removes it, and only it: another running export's and a user's hidden folders stay."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from util import io

    stem, _ = trained
    out = tmp_path / "model"
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(Path(__file__).parents[1]),
                             str(stem), str(out)])
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".model.") and any(left.iterdir())  # the half-written pair
    running = tmp_path / f".model.{io._machine()}-{os.getpid()}.abcdefgh.tmp"
    mine = tmp_path / ".model.mine.tmp"
    for folder in (running, mine):
        folder.mkdir()
        (folder / "x").write_text("kept")
    assert export_main(["--checkpoint", str(stem), "--output", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, running.name, "model.json", "model.safetensors"])


def test_a_model_on_weights_that_need_unsafe_load_predicts_and_exports_with_it(tmp_path, capsys):
    """--unsafe_load trains on a pre-trained file the weights-only reader refuses; predict.py
    and export.py take the same flag for the same file (and refuse without it)."""
    stem, _ = trained_checkpoint(tmp_path / "unsafe", class_names=CLASSES, img_size=64, unsafe=True)
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.uint8)).save(img)
    predict_argv = ["--checkpoint", str(stem), "--inputs", str(img), "--output", str(tmp_path / "p.csv"),
                    "--amp", "none", "--num_workers", "0"]
    export_argv = ["--checkpoint", str(stem), "--output", str(tmp_path / "merged")]
    for main, argv in ((predict.main, predict_argv), (export_main, export_argv)):
        assert main(argv) == 2
        assert "pass --unsafe_load" in capsys.readouterr().err
        assert main([*argv, "--unsafe_load"]) == 0
    adapter, _ = load_trained(stem, allow_unsafe_pickle=True)
    assert max_output_difference(adapter, load_merged(tmp_path / "merged")[0], 64) < 1e-4
    assert (tmp_path / "p.csv").read_text().startswith("path,Atelectasis,Cardiomegaly,Effusion")
