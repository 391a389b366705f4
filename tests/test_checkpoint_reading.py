"""Which file a command reads: a run folder for its best checkpoint (predict, export, not
training's --resume), and the pre-trained file's shapes read without its data at parse time."""
import pytest
import torch
from safetensors.torch import save_file

import export
import main_finetune_lora as mfl
import models_vit_lora as mv
from _fakes import mrm_checkpoint, trained_checkpoint
from checkpoints import load_merged, load_trained, resolve_checkpoint


def test_a_run_folder_stands_for_its_best_checkpoint_and_a_path_for_itself(tmp_path):
    stem, _ = trained_checkpoint(tmp_path)
    assert resolve_checkpoint(stem.parent) == stem
    assert resolve_checkpoint(stem) == stem
    assert resolve_checkpoint(str(stem) + ".json") == stem.with_suffix(".json")
    missing = tmp_path / "nowhere" / "checkpoint-last"
    assert resolve_checkpoint(missing) == missing  # not a folder: named as given, refused later


def test_export_of_a_run_folder_exports_its_best_checkpoint(tmp_path):
    stem, _ = trained_checkpoint(tmp_path)
    out = tmp_path / "export" / "model"
    assert export.main(["--checkpoint", str(stem.parent), "--output", str(out)]) == 0
    merged, _ = load_merged(out)
    adapter, _ = load_trained(stem)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapter.eval()(x), atol=1e-4, rtol=0)


def test_resume_of_a_run_folder_is_not_taken_for_its_best_checkpoint(tmp_path, capsys):
    """Training continues from checkpoint-last; a folder given to --resume is refused, never
    silently read as the run's best epoch."""
    stem, mrm = trained_checkpoint(tmp_path)
    from _fakes import demo_data_and_weights

    data, weights = demo_data_and_weights(tmp_path / "d")
    code = mfl.cli(["--data_path", str(data), "--finetune", str(weights), "--model",
                    "vit_tiny_patch16_lora", "--depth", "2", "--input_size", "32", "--epochs", "1",
                    "--device", "cpu", "--num_workers", "0", "--output_dir", str(tmp_path / "o"),
                    "--resume", str(stem.parent)])
    assert code != 0
    assert str(stem.parent) in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_pretrained_file_is_described_from_its_shapes_alone(tmp_path, suffix):
    """Parsing reads the tensors' shapes and dtypes only (meta tensors): a file of any size
    costs the command line no read of its data, and the shapes give the same description."""
    path = tmp_path / f"MRM{suffix}"
    if suffix == ".pth":
        tensors = mrm_checkpoint(path)
    else:
        tensors = mrm_checkpoint(tmp_path / "MRM.pth")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    shapes = mv.read_checkpoint(path, device="meta")
    shapes = shapes.get("model", shapes)
    assert all(t.is_meta for t in shapes.values())
    for key, value in tensors.items():
        assert (shapes[key].shape, shapes[key].dtype) == (value.shape, value.dtype), key
    info = mv.describe_weights(path)
    full = mv.describe_weights(path, state_dict=mv.extract_state_dict(mv.read_checkpoint(path)))
    assert (info.arch, info.input_size, info.geometry) == (full.arch, full.input_size, full.geometry)
