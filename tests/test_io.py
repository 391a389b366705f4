"""Crash-safe writes keep the permissions the umask allows, whatever the writer does."""
import errno
import os
import stat

import pytest
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


@pytest.mark.parametrize("link_error", [None, errno.ENOSYS, errno.EPERM])
def test_a_new_file_is_never_written_over_with_or_without_hard_links(tmp_path, monkeypatch, link_error):
    """replace=False: the file moves into place only if its name is still free, also where
    the file system has no hard links (FUSE answers ENOSYS)."""
    from util import io

    if link_error is not None:
        def no_links(*args, **kwargs):
            raise OSError(link_error, os.strerror(link_error))
        monkeypatch.setattr(os, "link", no_links)
    new = io.write_csv(tmp_path / "new.csv", ["a"], [[1]], replace=False)
    assert new.read_text() == "a\n1\n"
    (tmp_path / "taken.csv").write_text("theirs")
    with pytest.raises(io.OutputError, match="taken.csv appeared while this command ran"):
        io.write_csv(tmp_path / "taken.csv", ["a"], [[1]], replace=False)
    assert (tmp_path / "taken.csv").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.csv", "taken.csv"]
