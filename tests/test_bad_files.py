"""Files that are not what they should be: a clear one-line error naming the file, never a
traceback, never the --unsafe_load advice for something that is no pickle; NaN models refused."""
import json
import logging
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import models_vit_lora as mv
import predict
from _fakes import encoder_state, mrm_checkpoint, trained_checkpoint
from datasets import make_demo_dataset
from checkpoints import ExportError, export_merged, export_paths, load_merged
from checkpoints import (
    CheckpointError,
    checkpoint_paths,
    load_resume_state,
    load_trained,
    save_resume_state,
)

UNSAFE = "--unsafe_load"


def _torch_zip_bytes(tmp_path) -> bytes:
    path = tmp_path / "real.pth"
    torch.save({"model": encoder_state()}, path)
    return path.read_bytes()


def _legacy_bytes(tmp_path) -> bytes:
    path = tmp_path / "legacy.pth"
    torch.save({"model": encoder_state()}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def _png_bytes(tmp_path) -> bytes:
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
    return path.read_bytes()


def _other_zip_bytes(tmp_path) -> bytes:
    path = tmp_path / "weights.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MRM.pth", b"x")
    return path.read_bytes()


def _safetensors_bytes(tmp_path) -> bytes:
    path = tmp_path / "w.safetensors"
    save_file(encoder_state(), str(path))
    return path.read_bytes()


# (file content maker, words the message must contain)
NOT_CHECKPOINTS = {
    "random": (lambda t: np.random.default_rng(0).bytes(5000), "unrecognised binary data"),
    "html": (lambda t: b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>",
             "an HTML page (a failed download?"),
    "png": (_png_bytes, "a PNG image"),
    "jpeg": (lambda t: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200), "a JPEG image"),
    "gzip": (lambda t: b"\x1f\x8b\x08\x00" + bytes(100), "a gzip archive"),
    "empty": (lambda t: b"", "an empty file"),
    "text": (lambda t: b"MRM weights: see the README\n", "a text file (it begins 'MRM weights"),
    "lfs": (lambda t: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
            "a Git LFS pointer"),
    "xml": (lambda t: b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
            "an XML document"),
    "truncated zip": (lambda t: _torch_zip_bytes(t)[:3000],
                      "truncated or damaged PyTorch checkpoint"),
    "truncated legacy": (lambda t: _legacy_bytes(t)[:3000], "truncated PyTorch checkpoint"),
    "other zip": (_other_zip_bytes, "a zip archive of 1 files (MRM.pth)"),
    "plain pickle": (lambda t: b"\x80\x04\x95" + bytes(30), "a Python pickle not written by torch.save"),
    "truncated safetensors": (lambda t: _safetensors_bytes(t)[:60], "truncated safetensors file"),
    "damaged safetensors": (lambda t: _safetensors_bytes(t)[:-100], "damaged safetensors file"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_pretrained_file_that_is_no_checkpoint_says_what_it_is(tmp_path, name):
    make, words = NOT_CHECKPOINTS[name]
    path = tmp_path / "MRM.pth"
    path.write_bytes(make(tmp_path))
    with pytest.raises(mv.PretrainedWeightsError) as info:
        mv.load_pretrained(mv.vit_tiny_patch16(depth=2, num_classes=2), path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message
    assert UNSAFE not in message and "run code" not in message
    assert "\n" not in message


class _Payload:
    def __reduce__(self):
        return (os.getpid, ())


def test_real_pickle_with_foreign_global_keeps_the_unsafe_advice(tmp_path):
    path = tmp_path / "MRM.pth"
    torch.save({"model": encoder_state(), "extra": _Payload()}, path)
    with pytest.raises(mv.PretrainedWeightsError, match=f"refused to unpickle.*{UNSAFE}"):
        mv.read_checkpoint(path)


def test_format_comes_from_content_not_name(tmp_path):
    """safetensors saved as .pth and a torch file saved as .safetensors both load."""
    enc = encoder_state()
    save_file(enc, str(tmp_path / "w.pth"))
    torch.save({"model": enc}, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        report = mv.load_pretrained(mv.vit_tiny_patch16(depth=2, num_classes=2), tmp_path / name)
        assert len(report.matched) == len(enc) - 2  # all but norm.* (fc_norm model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_pretrained_tensor_refused_by_name(tmp_path, bad):
    enc = encoder_state()
    enc["blocks.1.attn.qkv.weight"][3, 5] = bad
    torch.save({"model": enc}, tmp_path / "diverged.pth")
    model = mv.vit_tiny_patch16(depth=2, num_classes=2)
    before = model.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(mv.PretrainedWeightsError,
                       match=r"diverged\.pth: 1 tensor holds NaN or infinite.*blocks\.1\.attn\.qkv"
                             r"\.weight \((1 NaN, 0 inf|0 NaN, 1 inf)"):
        mv.load_pretrained(model, tmp_path / "diverged.pth")
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)  # nothing copied


@pytest.mark.parametrize("dtype", [torch.int8, torch.complex64, torch.bool])
def test_a_weight_that_is_not_floating_point_is_refused_by_name(tmp_path, dtype):
    """Copying an int8 (quantised) or complex tensor would cast it silently into other weights."""
    enc = encoder_state()
    enc["blocks.0.mlp.fc1.weight"] = (enc["blocks.0.mlp.fc1.weight"] * 127).round().to(dtype)
    enc["pos_embed"] = enc["pos_embed"].to(dtype)
    torch.save({"model": enc}, tmp_path / "quantised.pth")
    model = mv.vit_tiny_patch16(depth=2, num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(mv.PretrainedWeightsError, match=rf"quantised\.pth: 2 weight tensors are not "
                       rf"floating point.*blocks\.0\.mlp\.fc1\.weight \({name}\)"):
        mv.load_pretrained(model, tmp_path / "quantised.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing copied


def test_nan_in_ignored_decoder_keys_is_harmless(tmp_path):
    """Only the tensors that enter the model are checked: the MAE decoder is dropped."""
    path = tmp_path / "MRM.pth"
    mrm_checkpoint(path)
    obj = torch.load(path, weights_only=False)
    obj["model"]["decoder_pred.weight"].fill_(float("nan"))
    torch.save({"model": obj["model"]}, path)
    mv.load_pretrained(mv.vit_tiny_patch16(depth=2, num_classes=2), path)


# ---------------------------------------------------------------------------------------
# Trained checkpoints and merged exports
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_files")
    stem, mrm = trained_checkpoint(root, img_size=32)
    model, config = load_trained(stem)
    export = root / "export" / "merged"
    export_merged(model, config, export, source=stem)
    data = make_demo_dataset(root / "demo", num_images=12, image_size=32, seed=2)
    return {"stem": stem, "mrm": mrm, "export": export, "data": data}


def copy_pair(paths: tuple, dest) -> tuple:
    """Copy a (tensors, config) pair to ``dest`` (a stem); returns the new pair."""
    new = (dest.with_suffix(".safetensors"), dest.with_suffix(".json"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in zip(paths, new):
        shutil.copyfile(src, dst)
    return new


def poison(tensors_path, key=None):
    """Put a NaN into one tensor of a safetensors file; returns the tensor's name."""
    tensors = load_file(str(tensors_path))
    key = key or sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(tensors_path))
    return key


# (what is done to the tensors and config files, words the message must contain)
DAMAGE = {
    "html tensors": (lambda t, c: t.write_bytes(b"<html><body>502 Bad Gateway</body></html>"),
                     "not a safetensors file: it looks like an HTML page"),
    "truncated tensors": (lambda t, c: t.write_bytes(t.read_bytes()[:-64]),
                          "damaged safetensors file"),
    "empty tensors": (lambda t, c: t.write_bytes(b""), "an empty file"),
    "damaged json": (lambda t, c: c.write_text(c.read_text()[:-40]),
                     "invalid JSON (Unterminated string starting at: line"),
    "empty json": (lambda t, c: c.write_text(""), "config is an empty file"),
    "binary json": (lambda t, c: c.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"),
                    "config is not JSON text: it looks like a PNG image"),
    "json list": (lambda t, c: c.write_text("[1, 2]"), "must be a JSON object, found list"),
    "json fields": (lambda t, c: c.write_text(json.dumps(
        {**json.loads(c.read_text()), "img_size": "large", "class_names": None})),
        "'img_size' is 'large' (expected int)"),
    "json missing": (lambda t, c: c.write_text(json.dumps(
        {k: v for k, v in json.loads(c.read_text()).items() if k != "num_classes"})),
        "'num_classes' missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("kind", ["checkpoint", "export"])
def test_damaged_checkpoint_or_export_named_by_predict_exit_2(trained, tmp_path, capsys, damage,
                                                              kind):
    source = checkpoint_paths(trained["stem"]) if kind == "checkpoint" else export_paths(trained["export"])
    tensors, config = copy_pair(source, tmp_path / kind / "model")
    act, words = DAMAGE[damage]
    act(tensors, config)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(image)
    out = tmp_path / "p.csv"
    rc = predict.main(["--checkpoint", str(tensors.with_suffix("")), "--inputs", str(image),
                       "--output", str(out), "--num_workers", "0", "--amp", "none"])
    assert rc == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("predict.py: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    message = errors[0]
    assert words in message
    assert str(tensors if "tensors" in damage else config) in message
    assert UNSAFE not in message
    assert not out.exists()


def test_nonfinite_checkpoint_and_export_refused_by_name(trained, tmp_path, capsys):
    tensors, _ = copy_pair(checkpoint_paths(trained["stem"]), tmp_path / "ckpt" / "checkpoint-best")
    key = poison(tensors, "head.weight")
    with pytest.raises(CheckpointError, match=rf"{tensors}: 1 tensor holds NaN.*{key} \(1 NaN"):
        load_trained(tensors)
    merged, _ = copy_pair(export_paths(trained["export"]), tmp_path / "exp" / "merged")
    key = poison(merged, "blocks.0.attn.qkv.weight")
    with pytest.raises(ExportError, match=rf"{merged}: 1 tensor holds NaN.*{key} \(1 NaN"):
        load_merged(merged)
    # predict names the file and exits 2 instead of writing blank probabilities.
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(image)
    for ckpt in (tensors, merged):
        rc = predict.main(["--checkpoint", str(ckpt), "--inputs", str(image), "--output",
                           str(tmp_path / "p.csv"), "--num_workers", "0"])
        assert rc == 2 and f"{ckpt}: 1 tensor holds NaN" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_export_of_a_nan_model_refused(trained, tmp_path):
    model, config = load_trained(trained["stem"])
    with torch.no_grad():
        model.fc_norm.bias[0] = float("inf")
    with pytest.raises(ExportError, match=r"merged model of .*fc_norm\.bias \(0 NaN, 1 inf"):
        export_merged(model, config, tmp_path / "out")
    assert not export_paths(tmp_path / "out")[0].exists()


def test_damaged_resume_state(tmp_path):
    path = tmp_path / "checkpoint-last.state.pt"
    save_resume_state(path, {"optimizer": {"state": {}, "param_groups": []}, "epoch": 3})
    assert load_resume_state(path)["epoch"] == 3
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated or damaged PyTorch"):
        load_resume_state(path)
    path.write_bytes(b"<!doctype html><p>nope")
    with pytest.raises(CheckpointError, match=r"not a resume state .*: it looks like an HTML"):
        load_resume_state(path)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match=r"not a resume state of this tool"):
        load_resume_state(path)


# ---------------------------------------------------------------------------------------
# Non-finite outputs at prediction
# ---------------------------------------------------------------------------------------

def _nan_for_bright_images(model):
    """A model whose outputs are NaN for images brighter than average, finite otherwise."""
    forward = model.forward

    def patched(x):
        out = forward(x)
        bright = x.flatten(1).mean(1) > 0
        return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)

    model.forward = patched
    return model


def test_nonfinite_outputs_are_failures_not_blank_rows(trained, tmp_path, monkeypatch, capsys,
                                                       caplog):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 40), 250, dtype=np.uint8)).save(images / "bright.png")
    Image.fromarray(np.full((40, 40), 5, dtype=np.uint8)).save(images / "dark.png")
    model, config = predict.load_model(trained["stem"])
    _nan_for_bright_images(model)
    probs, failures = predict.predict_images(model, config, [images / "bright.png",
                                                             images / "dark.png"])
    assert list(failures) == [0] and failures[0].startswith(predict.NON_FINITE_REASON)
    assert np.isnan(probs[0]).all() and np.isfinite(probs[1]).all()

    monkeypatch.setattr(predict, "load_model", lambda *a, **k: (model, config))
    out = tmp_path / "p.csv"
    rc = predict.main(["--checkpoint", str(trained["stem"]), "--inputs", str(images), "--output",
                       str(out), "--num_workers", "0", "--amp", "none", "--heatmap_class", "all"])
    assert rc == predict.EXIT_NON_FINITE
    printed = capsys.readouterr().out
    assert "0 failed" not in printed and "1 failed (1 with non-finite model outputs)" in printed
    assert f"{images / 'bright.png'}" in caplog.text and "NaN or infinite outputs" in caplog.text
    rows = out.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(images / "dark.png"))
    failed = predict.failures_path(out).read_text()
    assert "bright.png" in failed and predict.NON_FINITE_REASON in failed
    heatmaps = sorted(p.name for p in (tmp_path / "p_heatmaps").iterdir())
    assert len(heatmaps) == len(config.class_names)
    assert all("__dark.png__" in name for name in heatmaps)  # only the finite image is drawn


def test_heatmaps_skip_nonfinite_outputs(trained, tmp_path):
    from datasets import load_image
    from util.heatmap import save_heatmaps

    model, config = predict.load_model(trained["stem"])
    with torch.no_grad():
        model.head.bias[2] = float("nan")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(image)
    written, failures = save_heatmaps(model, [image], ["x.png"], 2, "c", tmp_path / "h",
                                      predict.eval_transform(config), load_image, 32, 32)
    assert written == [] and "non-finite" in failures[0]


# ---------------------------------------------------------------------------------------
# The training entry point: one "error:" line, exit 1
# ---------------------------------------------------------------------------------------

def _train_cli(args):
    import main_finetune_lora as mfl

    handlers, level = logging.root.handlers[:], logging.root.level
    try:  # the entry point configures the root logger for its own process
        return mfl.cli(args)
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level


def _error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("main_finetune_lora.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_entry_script_html_finetune_file(trained, tmp_path, capsys):
    weights = tmp_path / "MRM.pth"
    weights.write_text("<!DOCTYPE html><html>404</html>")
    rc = _train_cli(["--data_path", str(trained["data"]), "--dataset", "nih", "--finetune",
                     str(weights), "--model", "vit_tiny_patch16_lora", "--depth", "2",
                     "--input_size", "32", "--epochs", "1", "--warmup_epochs", "0",
                     "--num_workers", "0", "--amp", "none", "--output_dir", str(tmp_path / "o"),
                     "--run_name", "", "--no_progress"])
    assert rc == 1
    line = _error_line(capsys)
    assert f"{weights}: not a PyTorch checkpoint: it looks like an HTML page" in line
    assert UNSAFE not in line


@pytest.mark.parametrize("damage", ["nan", "json"])
def test_entry_script_eval_of_bad_checkpoint(trained, tmp_path, capsys, damage):
    tensors, config = copy_pair(checkpoint_paths(trained["stem"]), tmp_path / "run" / "checkpoint-best")
    if damage == "nan":
        poison(tensors, "head.bias")
        expected = f"{tensors}: 1 tensor holds NaN or infinite values"
    else:
        config.write_text("{\"format\": ")
        expected = f"{config}: damaged checkpoint config: invalid JSON"
    rc = _train_cli(["--eval", "--resume", str(tensors.with_suffix("")), "--data_path",
                     str(trained["data"]), "--dataset", "nih", "--num_workers", "0", "--amp",
                     "none", "--output_dir", str(tmp_path / "eval"), "--no_progress"])
    assert rc == 1
    assert expected in _error_line(capsys)


# ---------------------------------------------------------------------------------------
# A run's committed checkpoint edited afterwards; a full disk while writing
# ---------------------------------------------------------------------------------------

def _committed_run(trained, tmp_path):
    """A run folder whose commit.json names a copy of the trained checkpoint."""
    from util.runfolder import RunFolder

    folder = tmp_path / "run"
    folder.mkdir()
    RunFolder(folder).commit(1, lambda pending: copy_pair(checkpoint_paths(trained["stem"]),
                                                          pending / "checkpoint-best"), log=[])
    return folder / "checkpoint-best"


@pytest.mark.parametrize("edit", [
    lambda o: o.update(class_names=[*o["class_names"][1:], o["class_names"][0]]),
    lambda o: o["method_settings"].update(alpha=64.0),
    lambda o: o.update(img_size=64),
])
def test_checkpoint_json_edited_after_its_run_committed_it_is_refused(trained, tmp_path, edit,
                                                                      capsys):
    stem = _committed_run(trained, tmp_path)
    load_trained(stem)  # as committed: loads
    tensors, config = checkpoint_paths(stem)
    obj = json.loads(config.read_text())
    edit(obj)
    config.write_text(json.dumps(obj))
    with pytest.raises(CheckpointError, match=rf"{config} changed after its run committed it"):
        load_trained(stem)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(image)
    out = tmp_path / "p.csv"
    rc = predict.main(["--checkpoint", str(stem), "--inputs", str(image), "--output", str(out),
                       "--num_workers", "0", "--amp", "none"])
    assert rc != 0 and not out.exists()


def test_tensors_replaced_after_the_commit_are_refused(trained, tmp_path):
    stem = _committed_run(trained, tmp_path)
    tensors, _ = checkpoint_paths(stem)
    state = load_file(str(tensors))
    state["head.bias"] = state["head.bias"] + 1
    save_file(state, str(tensors))
    with pytest.raises(CheckpointError, match=rf"{tensors} changed after its run committed it"):
        load_trained(stem)


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_evil_resume_state_is_refused_without_the_unsafe_load_advice(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-last.state.pt"
    torch.save({"optimizer": {}, "epoch": 1, "payload": _Touch(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_resume_state(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused to unpickle") and "\n" not in message
    assert UNSAFE not in message and "was not written by it" in message
    assert not marker.exists()


def _full_disk_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    # What safetensors raises on a full disk (seen on a 64 kB tmpfs).
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _full_disk_torch_save(*args, **kwargs):
    # What torch.save raises on a full disk (seen on a 64 kB tmpfs).
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_full_disk_while_saving_keeps_the_earlier_files(trained, tmp_path, monkeypatch):
    import checkpoints
    from util.io import OutputError

    model, config = load_trained(trained["stem"])
    stem, state = tmp_path / "run" / "checkpoint-last", tmp_path / "run" / "checkpoint-last.state.pt"
    export = tmp_path / "export" / "merged"
    checkpoints.save_checkpoint(stem, model, config)
    save_resume_state(state, {"optimizer": {}, "epoch": 1})
    export_merged(model, config, export)
    folders = (stem.parent, export.parent)
    before = {p: p.read_bytes() for folder in folders for p in folder.iterdir()}

    monkeypatch.setattr(checkpoints, "save_file", _full_disk_safetensors)
    for write, target in ((lambda: checkpoints.save_checkpoint(stem, model, config),
                           checkpoint_paths(stem)[0]),
                          (lambda: export_merged(model, config, export), export_paths(export)[0])):
        with pytest.raises(OutputError, match=rf"no space left on device while writing {target}$"):
            write()
    monkeypatch.setattr(checkpoints.torch, "save", _full_disk_torch_save)
    with pytest.raises(OutputError, match=rf"no space left on device while writing {state}$"):
        save_resume_state(state, {"optimizer": {}, "epoch": 2})
    assert {p: p.read_bytes() for folder in folders for p in folder.iterdir()} == before
