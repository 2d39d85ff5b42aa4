"""pytest's fixtures and session settings; the helpers tests import are in tests/helpers.py."""

import ctypes
import ctypes.util
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SMOKE_ENV, write_random_dataset  # noqa: F401  (re-exported for older imports)


def usable_library(name: str) -> bool:
    try:
        return ctypes.util.find_library(name) is not None and bool(ctypes.CDLL(ctypes.util.find_library(name)))
    except OSError:
        return False


if "MUJOCO_GL" not in os.environ and usable_library("EGL"):  # the render tests draw headless where EGL loads;
    os.environ["MUJOCO_GL"] = "egl"  # elsewhere (no libEGL) nothing is forced, as the scripts force nothing
torch.set_num_threads(1)  # tiny networks: one thread is as fast and never oversubscribes the CPU


@pytest.fixture
def random_dataset(tmp_path) -> Path:
    return write_random_dataset(tmp_path / "random.npz")
