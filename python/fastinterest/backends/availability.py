"""Shared availability probes for backends: each returns None when usable, else a reason."""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache

from .. import _ext


def ext(device: str) -> str | None:
    if device == "cpu":
        return _ext.cpu_reason()
    if device == "cuda":
        return _ext.cuda_reason()
    return f"no native module for {device}"


@lru_cache(maxsize=None)
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def numba(device: str) -> str | None:
    if device != "cpu":
        return "the numba backend runs on CPU only"
    return None if _has("numba") else "numba is not installed (pip install 'fastinterest[numba]')"


def triton(device: str) -> str | None:
    if not _has("triton"):
        return "triton is not installed (pip install 'fastinterest[triton]')"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "triton runs on CPU only under TRITON_INTERPRET=1 (the interpreter, for tests)"
        return None
    if device == "cuda":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device is visible to torch"
    return f"triton does not run on {device}"


def always(device: str) -> str | None:
    """Pure torch runs wherever torch has the device."""
    if device == "cuda":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device is visible to torch"
    return None


class LazyModule:
    """A backend module imported on first attribute access (numba/triton imports are slow)."""

    def __init__(self, name: str):
        self._name, self._mod = name, None

    def __getattr__(self, attr):
        if self._mod is None:
            self._mod = importlib.import_module(self._name)
        return getattr(self._mod, attr)
