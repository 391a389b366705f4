"""Crash-safe writes keep the permissions the umask allows, whatever the writer does."""
import os
import stat

import torch
from safetensors.torch import save_file

from util.io import atomic_write


def test_safetensors_written_atomically_follow_the_umask(tmp_path):
    """safetensors replaces the file it writes with a 0600 one; a checkpoint on a shared
    server must still be readable by the group and others as the umask allows."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda p: save_file({"x": torch.zeros(2)}, p))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left
