"""Loads the compiled native modules.

`cpu()` / `cuda()` return the pybind11 module or raise `ExtensionUnavailable` explaining why it is
missing (not built, failed to import, no CUDA driver). A missing module never breaks `import
fastinterest`: it fails only when a kernel from it is asked for (bitsandbytes' pattern).
"""
from __future__ import annotations

import importlib
from functools import lru_cache


class ExtensionUnavailable(RuntimeError):
    """The native module needed for this call cannot be used here; the message says why."""


@lru_cache(maxsize=None)
def _load(name: str):
    try:
        return importlib.import_module(f"fastinterest.{name}"), None
    except ImportError as exc:  # not built, or built against something absent here
        return None, f"fastinterest.{name} could not be imported ({exc}); reinstall fastinterest " \
                     f"from source with a C++ compiler{' and a CUDA toolkit' if name == '_C_cuda' else ''}"


def cpu():
    mod, why = _load("_C_cpu")
    if mod is None:
        raise ExtensionUnavailable(why)
    return mod


def cpu_reason() -> str | None:
    """None when the C++ CPU module is usable, else the reason it is not."""
    return _load("_C_cpu")[1]


def cuda():
    mod, why = _load("_C_cuda")
    if mod is None:
        raise ExtensionUnavailable(why)
    return mod


def cuda_reason() -> str | None:
    """None when the CUDA module is built and a CUDA device is visible, else the reason."""
    why = _load("_C_cuda")[1]
    if why:
        return why
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def build_info() -> dict:
    info = {}
    for name in ("_C_cpu", "_C_cuda"):
        mod, why = _load(name)
        info[name] = dict(mod.build_info()) if mod is not None else {"unavailable": why}
    return info
