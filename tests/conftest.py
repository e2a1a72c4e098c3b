"""Shared test set-up: Triton's CPU interpreter, 2 threads, the shared data folder fixture."""
from __future__ import annotations

import os

import pytest
import torch

# Triton runs on CPU only under its interpreter; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)

from fi_testing import SHARED_DATA  # noqa: E402


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
