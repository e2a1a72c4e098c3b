"""Registers the embedding-bag implementations with the dispatcher (op name: `embedding_bag`)."""
from __future__ import annotations

import torch

from .. import _dispatch
from . import availability

_F32_64 = {torch.float32, torch.float64}
_HALF = {torch.float16, torch.bfloat16}

_Lazy = availability.LazyModule


IMPLS = {
    "reference": _Lazy("fastinterest.backends.reference_embedding"),
    "ext": _Lazy("fastinterest.backends.ext_embedding"),
    "numba": _Lazy("fastinterest.numba.embedding"),
    "triton": _Lazy("fastinterest.triton.embedding"),
}


def _ext_available(device: str):
    why = availability.ext(device)
    if why is None and device == "cuda":
        from .. import _ext

        if not hasattr(_ext.cuda(), "embedding_forward"):
            return "the CUDA module was built without the embedding kernels"
    return why


_dispatch.register("embedding_bag", "ext", {"cpu", "cuda"}, _F32_64 | _HALF, _ext_available,
                   "C++ (OpenMP, AVX2 at run time) on CPU; CUDA kernels on GPU")
_dispatch.register("embedding_bag", "triton", {"cuda", "cpu"}, _F32_64 | _HALF, availability.triton,
                   "Triton kernels; on CPU only under TRITON_INTERPRET=1")
_dispatch.register("embedding_bag", "numba", {"cpu"}, _F32_64, availability.numba, "numba njit(parallel)")
_dispatch.register("embedding_bag", "reference", {"cpu", "cuda"}, _F32_64 | _HALF, availability.always,
                   "pure torch (the test oracle)")
