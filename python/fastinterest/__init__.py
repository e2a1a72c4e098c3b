"""fastinterest: fused embedding and LSTM kernels and a cross-platform user-interest modeling system.

Layers (see DESIGN.md): csrc (torch-free kernels) -> _ext/_dispatch -> backends -> ops -> nn
-> data / pretrain / models / train / metrics / apps / serve.
Heavy submodules are imported lazily so that `import fastinterest` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"nn", "optim", "ops", "data", "pretrain", "models", "train", "metrics", "apps", "serve", "info"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"fastinterest.{name}")
    raise AttributeError(f"module 'fastinterest' has no attribute {name!r}")
