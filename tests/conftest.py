"""pytest's fixtures and session settings; the helpers tests import are in tests/helpers.py."""

from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SMOKE_ENV, write_random_dataset  # noqa: F401  (re-exported for older imports)

torch.set_num_threads(1)  # tiny networks: one thread is as fast and never oversubscribes the CPU


@pytest.fixture
def random_dataset(tmp_path) -> Path:
    return write_random_dataset(tmp_path / "random.npz")
