"""Shared test helpers: backends that can run here, tolerances per dtype, the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton runs on CPU only under its interpreter; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TOL = {  # (atol, rtol) per dtype, used by every parity test
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False, msg=msg or None)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
