"""Shared test fixtures: the repository root on sys.path, the shared reference data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests are CPU-only and small: two threads (the CI machine's cores), shared among the
# test processes of ``pytest -n N``; commands the tests start inherit the same count.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, 2 // _WORKERS)))

SHARED = ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def fresh_logging():
    """Each test starts with logging as a new process has it: a command run in-process by an
    earlier test (its handlers, its run's log file) does not write into this one's output."""
    import logging

    yield
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
        handler.close()
    logging.root.setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def reference_splits() -> Path:
    """The paper's published split files, or skip when ../shared is absent."""
    path = SHARED / "reference_splits"
    if not path.is_dir():
        pytest.skip("../shared/reference_splits not present")
    return path


@pytest.fixture(scope="session")
def vit_base_file(tmp_path_factory):
    """A ViT-B/16 pre-training file in MAE's layout (12 blocks, 224 px), written once: tests
    of the paper's flags hard-link it under the names they need (MRM.pth, CXR_MAE.pth)."""
    from _fakes import mrm_checkpoint

    path = tmp_path_factory.mktemp("vit_base") / "vit_base_mae.pth"
    mrm_checkpoint(path, arch="vit_base_patch16", depth=12)

    def named(folder: Path, name: str) -> Path:
        target = Path(folder) / name
        os.link(path, target)
        return target

    return named


def pytest_configure(config):
    # Known without pytest-xdist too (a plain `pytest tests` warns of no unknown mark).
    config.addinivalue_line("markers", "xdist_group(name): tests sharing one module fixture, "
                                       "run by one test process under --dist loadgroup")
