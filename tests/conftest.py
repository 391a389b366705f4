"""Shared test fixtures: the repository root on sys.path, the shared reference data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests are CPU-only and small; two threads match the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def reference_splits() -> Path:
    """The paper's published split files, or skip when ../shared is absent."""
    path = SHARED / "reference_splits"
    if not path.is_dir():
        pytest.skip("../shared/reference_splits not present")
    return path
