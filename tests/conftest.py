import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared benchmark/training data folder; tests that need it skip when it is absent."""
    p = Path(os.environ.get("OMNIMINI_DATA", REPO.parent / "shared" / "data"))
    if not p.is_dir():
        pytest.skip(f"shared data folder not found at {p} (set OMNIMINI_DATA)")
    return p
