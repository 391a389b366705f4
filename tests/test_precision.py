"""util.precision: one autocast path for training, evaluation, prediction and heatmaps."""
import pytest
import torch

from datasets.loader import accelerator_available
from util import precision


def test_autocast_none_is_fp32_and_bf16_autocasts_on_cpu():
    cpu = torch.device("cpu")
    x = torch.randn(4, 4)
    with precision.autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
        assert (x @ x).dtype == torch.float32
    with precision.autocast(cpu, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16


def test_resolve_amp_and_names():
    cpu = torch.device("cpu")
    assert precision.resolve_amp("none", cpu) is None
    assert precision.resolve_amp("fp16", cpu) is torch.float16
    assert precision.resolve_amp("auto", cpu) is (torch.bfloat16 if precision.cpu_has_fast_bf16() else None)
    with pytest.raises(ValueError, match="--amp 'fp8'"):
        precision.resolve_amp("fp8", cpu)
    assert [precision.precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == [
        "fp32", "bf16", "fp16"]


def test_accelerator_check_works_without_torch_accelerator(monkeypatch):
    """torch < 2.6 has no torch.accelerator: the loader's pin-memory check must not need it."""
    expected = accelerator_available()
    monkeypatch.delattr(torch, "accelerator", raising=False)
    assert accelerator_available() == expected
