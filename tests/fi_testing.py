"""Helpers shared by the tests (a module of its own: `conftest` is ambiguous with tests/data/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import torch

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
