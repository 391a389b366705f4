"""The Python snippets of README.md and docs/USING_A_MODEL.md run as written (on files the
test makes in place of the user's) and print what their comments say."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import models_vit_lora as mv
from tests._fakes import mrm_checkpoint, trained_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(page: str, heading: str) -> list[str]:
    """The ```python blocks of ``page``'s section ``heading`` (up to the next heading)."""
    text = (ROOT / page).read_text()
    section = text.split(heading, 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"{page}: no python block under {heading!r}"
    return blocks


def run_snippet(code: str, namespace: dict | None = None) -> tuple[dict, str]:
    """Run ``code`` (in ``namespace``, continuing an earlier part); its namespace and output."""
    namespace = {} if namespace is None else namespace
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<snippet>", "exec"), namespace)
    return namespace, out.getvalue()


def test_the_readme_python_api_builds_the_model_it_says(tmp_path):
    (block,) = python_blocks("README.md", "## Python API")
    mrm = tmp_path / "MRM.pth"
    mrm_checkpoint(mrm, arch="vit_base_patch16", depth=12)
    stem, _ = trained_checkpoint(tmp_path / "trained")
    assert "pretrained_weights/MRM.pth" in block and "output_dir/<run>/checkpoint-best" in block
    code = (block.replace("pretrained_weights/MRM.pth", str(mrm))
            .replace("output_dir/<run>/checkpoint-best", str(stem)))
    built, by_hand, loaded = code.split("\n\n")  # the config, by hand, a trained checkpoint
    namespace, printed = run_snippet(built)
    # The printed line is the one the snippet's comment shows.
    promised = [line.lstrip("# ").strip() for line in block.splitlines()
                if line.startswith("# trainable params:")]
    assert promised and printed.strip() == promised[0]
    # "The same by hand" trains exactly the same parameters as the config-built model.
    trainable = {n for n, p in namespace["model"].named_parameters() if p.requires_grad}
    namespace, _ = run_snippet(by_hand, namespace)
    assert {n for n, p in namespace["model"].named_parameters() if p.requires_grad} == trainable
    namespace, _ = run_snippet(loaded, namespace)
    assert isinstance(namespace["config"], mv.ModelConfig)
    assert namespace["config"].method == "lora"


def test_using_a_model_predicts_as_its_snippet_says(tmp_path):
    block = python_blocks("docs/USING_A_MODEL.md", "## Predictions")[0]
    stem, _ = trained_checkpoint(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80), dtype=np.uint8)).save(
        tmp_path / "a.png")
    code = (block.replace("output/nih_1_mrm/checkpoint-best", str(stem))
            .replace('"a.png"', repr(str(tmp_path / "a.png")))
            .replace('"b.dcm"', repr(str(tmp_path / "b.dcm"))))  # missing: a failure
    namespace, _ = run_snippet(code)
    probs, failures = namespace["probs"], namespace["failures"]
    config = namespace["config"]
    assert probs.shape == (2, len(config.class_names))
    assert np.isfinite(probs[0]).all() and np.isnan(probs[1]).all()
    assert list(failures) == [1]
    # The accessors the page names next to the snippet exist on the config it returns.
    assert config.method_settings.scaling == pytest.approx(32 / 4)


def test_reproduce_names_the_lr_each_method_keeps_from_the_lora_preset():
    """docs/REPRODUCE.md's table: the methods without an lr for the setting's optimizer run at
    the LoRA preset's lr it names, and every other method at a different one."""
    import methods
    from util.presets import resolve_preset

    def lr_of(preset: str, method: str) -> float:
        values, _ = resolve_preset(preset, method, methods.get(method).preset_lr)
        return values["lr"] or values["blr"] * values["global_batch"] / 256

    text = (ROOT / "docs/REPRODUCE.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9_-]+)` \|.*\| ([\d.]+) \(([A-Za-z, ]+)\) \|$", text, flags=re.M)
    assert len(rows) == 18
    comparison = ("bitfit", "ssf", "adaptformer", "vpt")
    for preset, lr, named in rows:
        keep = {m.strip().lower() for m in named.split(",")}
        assert lr_of(preset, "lora") == pytest.approx(float(lr))
        assert keep < set(comparison), (preset, keep)
        for method in comparison:
            same = lr_of(preset, method) == pytest.approx(float(lr))
            assert same == (method in keep), (preset, method, lr_of(preset, method), lr)
