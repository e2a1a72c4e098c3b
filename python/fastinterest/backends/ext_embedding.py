"""Adapter from torch tensors to the native embedding kernels (_C_cpu on CPU, _C_cuda on GPU).

Python allocates every output and workspace with torch (so torch's allocator sees all memory) and
passes raw addresses; the kernels never allocate device memory. Contract: see reference_embedding.py.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _ext
from .reference_embedding import OPT_DENSE, OPT_SPARSE, OPT_ADAM, acc_dtype

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int32: 4,
              torch.int64: 5}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _module(device: torch.device):
    return _ext.cuda() if device.type == "cuda" else _ext.cpu()


def _launch_arg(device: torch.device) -> int:
    """The last argument of the kernels' entry points: the CUDA stream, or the CPU thread count."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return torch.get_num_threads()


def _launch_args(device: torch.device) -> dict:
    return {"stream" if device.type == "cuda" else "nthreads": _launch_arg(device)}


def first_bad_index(indices: torch.Tensor, num_rows: int) -> int:
    """Position of the first index outside [0, num_rows), or -1 (CPU tensors)."""
    return _ext.cpu().first_bad_index(indices.data_ptr(), DTYPE_CODE[indices.dtype], indices.numel(), num_rows)


def _cuda_index_pair(indices, offsets):
    """The CUDA kernels take offsets of the indices' dtype (halves their instantiations): int32 offsets
    for int32 indices, unless the positions could overflow int32 (N >= 2^31), then both in int64."""
    if offsets is None or not indices.is_cuda or offsets.dtype == indices.dtype:
        return indices, offsets
    if indices.dtype == torch.int32 and indices.numel() >= 2**31:
        return indices.long(), offsets.long()
    return indices, offsets.to(indices.dtype)


# The CPU kernel validates indices and offsets as it reads them (no separate pass): the op skips its
# Python checks for this backend on the CPU and, on BadInput, runs them to raise the precise error.
VALIDATES_ON_CPU = True


class BadInput(Exception):
    """The CPU kernel met an out-of-range index or offset (it read no memory outside the table)."""


def _on(device: torch.device):
    """The CUDA kernels launch on the current device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(weight, indices, offsets, psw, mode, skip_idx):
    if weight.device.type != "cuda":
        return _forward(weight, indices, offsets, psw, mode, skip_idx)
    with _on(weight.device):
        return _forward(weight, indices, offsets, psw, mode, skip_idx)


def backward(grad_out, weight, indices, offsets, psw, maxpos, mode, skip_idx, opt, hp, s1, s2, step,
             deterministic: bool = True):
    with _on(weight.device):
        return _backward(grad_out, weight, indices, offsets, psw, maxpos, mode, skip_idx, opt, hp, s1, s2, step,
                         deterministic)


def _forward(weight, indices, offsets, psw, mode, skip_idx):
    indices, offsets = _cuda_index_pair(indices, offsets)
    V, D = weight.shape
    B = indices.numel() if offsets is None else offsets.numel() - 1
    acc = acc_dtype(weight.dtype)
    out = torch.empty((B, D), dtype=acc, device=weight.device)
    maxpos = torch.empty((B, D) if mode == 2 else (0,), dtype=torch.long, device=weight.device)
    # positional: pybind11's keyword matching cost several microseconds a call
    # (weight, wdtype, V, D, idx, idtype, N, off, odtype, B, psw, mode, skip_idx, out, maxpos, nthreads | stream)
    bad = _module(weight.device).embedding_forward(
        weight.data_ptr(), DTYPE_CODE[weight.dtype], V, D, indices.data_ptr(), DTYPE_CODE[indices.dtype],
        indices.numel(), _ptr(offsets), DTYPE_CODE[offsets.dtype] if offsets is not None else 5, B, _ptr(psw), mode,
        skip_idx, out.data_ptr(), maxpos.data_ptr() if mode == 2 else 0, _launch_arg(weight.device))
    if bad and weight.device.type == "cpu":
        raise BadInput()
    return out, maxpos


def _backward(grad_out, weight, indices, offsets, psw, maxpos, mode, skip_idx, opt, hp, s1, s2, step,
              deterministic: bool = True):
    indices, offsets = _cuda_index_pair(indices, offsets)
    V, D = weight.shape
    B = grad_out.shape[0]
    N = indices.numel()
    acc = acc_dtype(weight.dtype)
    rows = vals = dense = None
    if opt == OPT_SPARSE:
        rows = torch.empty(N, dtype=torch.long, device=weight.device)
        vals = torch.empty((N, D), dtype=acc, device=weight.device)
    elif opt == OPT_DENSE:
        dense = torch.zeros((V, D), dtype=acc, device=weight.device)
    mod = _module(weight.device)
    kwargs = dict(
        grad_out=grad_out.data_ptr(), weight=weight.data_ptr(), wdtype=DTYPE_CODE[weight.dtype], V=V, D=D,
        idx=indices.data_ptr(), idtype=DTYPE_CODE[indices.dtype], N=N,
        off=_ptr(offsets), odtype=DTYPE_CODE[offsets.dtype] if offsets is not None else 5, B=B,
        psw=_ptr(psw), mode=mode, skip_idx=skip_idx, maxpos=maxpos.data_ptr() if mode == 2 else 0,
        opt=opt, hp=list(hp) + [0.0] * (4 - len(hp)), s1=_ptr(s1), s2=_ptr(s2),
        step=_ptr(step) if opt == OPT_ADAM else 0,
        out_rows=_ptr(rows), out_vals=_ptr(vals), dense=_ptr(dense), **_launch_args(weight.device))
    if weight.device.type == "cuda":
        U = _cuda_backward(mod, kwargs, weight, N, deterministic)
    else:
        U = mod.embedding_backward(**kwargs)
    if opt == OPT_SPARSE:
        return rows[:U], vals[:U]
    if opt == OPT_DENSE:
        return dense
    return None


def _cuda_backward(mod, kwargs, weight, N, deterministic):
    """The CUDA backward needs workspaces (sort buffers, segment lists) allocated by torch."""
    nbytes = mod.embedding_backward_workspace_bytes(N=N, B=kwargs["B"], V=kwargs["V"], D=kwargs["D"],
                                                     deterministic=deterministic, wdtype=kwargs["wdtype"])
    ws = torch.empty(nbytes, dtype=torch.uint8, device=weight.device)
    counter = torch.zeros(1, dtype=torch.long, device=weight.device)  # number of distinct rows
    mod.embedding_backward(workspace=ws.data_ptr(), workspace_bytes=nbytes, num_unique=counter.data_ptr(),
                           deterministic=deterministic, **kwargs)
    return int(counter.item()) if kwargs["opt"] == OPT_SPARSE else 0
