"""THE backend registry: which backend runs an op on a device/dtype, and why.

Every implementation registers one `Impl` record saying what it supports. `resolve()` applies the
precedence of DESIGN.md section 3:

    backend= argument  >  FASTINTEREST_<OP>_BACKEND  >  FASTINTEREST_BACKEND  >  device priority list

A backend named explicitly (argument or environment) that cannot run raises `BackendError` listing
every reason; the automatic choice falls through quietly and logs once why it skipped a backend.
`python -m fastinterest.info` prints the table from these same records.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger("fastinterest")

BACKENDS = ("ext", "triton", "numba", "reference")
PRIORITY = {"cuda": ("ext", "triton", "reference"), "cpu": ("ext", "numba", "reference")}


class BackendError(RuntimeError):
    """No (or not the requested) backend can run this op here; the message lists why."""


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    devices: frozenset
    dtypes: frozenset                          # dtypes of the main data tensor (weights / input)
    available: Callable[[str], str | None]     # device type -> None if usable, else reason
    notes: str = ""


_REGISTRY: dict[tuple[str, str], Impl] = {}
_LOGGED: set = set()


def register(op: str, backend: str, devices, dtypes, available: Callable[[str], str | None], notes: str = ""):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY[(op, backend)] = Impl(op, backend, frozenset(devices), frozenset(dtypes), available, notes)


def ops() -> list[str]:
    _ensure_loaded()
    return sorted({op for op, _ in _REGISTRY})


def impls(op: str) -> list[Impl]:
    _ensure_loaded()
    return [_REGISTRY[(op, b)] for b in BACKENDS if (op, b) in _REGISTRY]


def why_not(op: str, backend: str, device: str, dtype: torch.dtype) -> str | None:
    """None if `backend` can run `op` on `device` with `dtype`, else the reason it cannot."""
    _ensure_loaded()
    impl = _REGISTRY.get((op, backend))
    if impl is None:
        return f"{backend} has no implementation of {op}"
    if device not in impl.devices:
        return f"{backend} runs {op} on {sorted(impl.devices)}, not on {device}"
    if dtype not in impl.dtypes:
        names = sorted(str(d).replace("torch.", "") for d in impl.dtypes)
        return f"{backend} supports {names} for {op} on {device}, not {str(dtype).replace('torch.', '')}"
    return impl.available(device)


def available_backends(op: str, device: str, dtype: torch.dtype) -> list[str]:
    return [b for b in BACKENDS if why_not(op, b, device, dtype) is None]


def resolve(op: str, device: torch.device | str, dtype: torch.dtype, backend: str | None = None) -> str:
    """Pick the backend that runs `op` (see module docstring for the precedence).

    Under torch.compile the choice is evaluated once while tracing and baked into the graph as a
    constant string (the op receives it as an argument).
    """
    return _resolve(op, torch.device(device).type, dtype, backend)


_RESOLVED: dict = {}


@torch.compiler.assume_constant_result
def _resolve(op: str, dev: str, dtype: torch.dtype, backend: str | None) -> str:
    # memoised per (op, device, dtype, argument, environment): the answer only changes with them (the
    # backends' availability is fixed once their modules are imported), and the lookup runs on every call
    # of every op (the loop below, with its availability checks, cost ~5 us a call)
    key = (op, dev, dtype, backend, os.environ.get(f"FASTINTEREST_{op.upper()}_BACKEND"),
           os.environ.get("FASTINTEREST_BACKEND"))
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = _resolve_uncached(op, dev, dtype, backend)
    return hit


def _resolve_uncached(op: str, dev: str, dtype: torch.dtype, backend: str | None) -> str:
    source = "argument"
    if backend is None:
        env_op = f"FASTINTEREST_{op.upper()}_BACKEND"
        if os.environ.get(env_op):
            backend, source = os.environ[env_op].strip().lower(), env_op
        elif os.environ.get("FASTINTEREST_BACKEND"):
            backend, source = os.environ["FASTINTEREST_BACKEND"].strip().lower(), "FASTINTEREST_BACKEND"
    if backend is not None:
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r} (from {source}); expected one of {BACKENDS}")
        reason = why_not(op, backend, dev, dtype)
        if reason is not None:
            others = {b: why_not(op, b, dev, dtype) for b in BACKENDS if b != backend}
            lines = "\n".join(f"  {b}: {r or 'available'}" for b, r in others.items())
            raise BackendError(f"backend {backend!r} (from {source}) cannot run {op} on {dev}/{dtype}: "
                               f"{reason}\nother backends:\n{lines}")
        return backend
    reasons = []
    for cand in PRIORITY.get(dev, ("reference",)):
        reason = why_not(op, cand, dev, dtype)
        if reason is None:
            return cand
        reasons.append(f"{cand}: {reason}")
        key = (op, cand, dev, dtype)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.info("fastinterest: %s on %s/%s skips %s: %s", op, dev, dtype, cand, reason)
    raise BackendError(f"no backend can run {op} on {dev}/{dtype}:\n  " + "\n  ".join(reasons))


_LOADED = False


def _ensure_loaded():
    """Import the modules whose import registers implementations."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    for mod in ("fastinterest.backends", ):
        importlib.import_module(mod)
