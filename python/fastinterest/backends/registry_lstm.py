"""Registers the LSTM implementations with the dispatcher (op name: `lstm`).

Every backend module follows the contract of `reference_lstm` (forward / backward / ws_shapes), and
the ext backend also offers the inference fast paths used by `fastinterest.nn.LSTM` outside autograd.
"""
from __future__ import annotations

import torch

from .. import _dispatch
from . import availability

_F32_64 = {torch.float32, torch.float64}

_Lazy = availability.LazyModule


IMPLS = {
    "reference": _Lazy("fastinterest.backends.reference_lstm"),
    "ext": _Lazy("fastinterest.backends.ext_lstm"),
    "numba": _Lazy("fastinterest.numba.lstm"),
    "triton": _Lazy("fastinterest.triton.lstm"),
}


def _ext_available(device: str):
    why = availability.ext(device)
    if why is not None:
        return why
    from .. import _ext

    mod = _ext.cpu() if device == "cpu" else _ext.cuda()
    if not hasattr(mod, "lstm_forward"):
        return f"the {'CPU' if device == 'cpu' else 'CUDA'} module was built without the LSTM kernels"
    return None


_dispatch.register("lstm", "ext", {"cpu", "cuda"}, _F32_64 | {torch.bfloat16}, _ext_available,
                   "C++ on CPU (float32 with AVX2+FMA at run time, float64 portable, bfloat16 computed in float32; "
                   "OpenMP); CUDA kernels on GPU (float32, float64, bfloat16 with float32 state): the recurrence "
                   "fused with the gates, the input projection one GEMM")
_dispatch.register("lstm", "triton", {"cuda", "cpu"}, {torch.float32, torch.bfloat16}, availability.triton,
                   "Triton recurrence kernel; on CPU only under TRITON_INTERPRET=1 (bfloat16 computed in float32 there)")
_dispatch.register("lstm", "numba", {"cpu"}, _F32_64, availability.numba, "numba njit recurrence (CPU)")
_dispatch.register("lstm", "reference", {"cpu", "cuda"}, _F32_64 | {torch.float16, torch.bfloat16},
                   availability.always, "pure torch, padded with masks (the test oracle's twin)")
