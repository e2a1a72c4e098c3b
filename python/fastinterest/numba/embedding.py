"""Numba (CPU) embedding-bag kernels: same contract as backends/reference_embedding.py.

Forward: one parallel loop over bags. Backward: a stable sort of the kept positions by row groups
each row's occurrences in position order; a parallel loop over rows sums each row's gradient in that
fixed order and applies the fused update, so the result does not depend on the thread count.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from ..backends.reference_embedding import (MODE_MAX, MODE_MEAN, OPT_ADAGRAD, OPT_ADAM, OPT_DENSE,
                                            OPT_ROWWISE_ADAGRAD, OPT_SGD, OPT_SPARSE, acc_dtype)


@njit(parallel=True, cache=True)
def _forward(w, idx, off, psw, has_psw, mode, skip, out, maxpos):
    B, D = out.shape
    for b in prange(B):
        start, end = off[b], off[b + 1]
        if mode == 2:
            anyv = False
            for j in range(start, end):
                r = idx[j]
                if r == skip:
                    continue
                if not anyv:
                    for d in range(D):
                        out[b, d] = w[r, d]
                        maxpos[b, d] = j
                    anyv = True
                else:
                    for d in range(D):
                        v = w[r, d]
                        if v > out[b, d]:
                            out[b, d] = v
                            maxpos[b, d] = j
            if not anyv:
                for d in range(D):
                    out[b, d] = 0
                    maxpos[b, d] = -1
            continue
        for d in range(D):
            out[b, d] = 0
        count = 0
        for j in range(start, end):
            r = idx[j]
            if r == skip:
                continue
            count += 1
            s = psw[j] if has_psw else 1.0
            for d in range(D):
                out[b, d] += s * w[r, d]
        if mode == 1 and count > 0:
            inv = 1.0 / count
            for d in range(D):
                out[b, d] *= inv


@njit(cache=True)
def _groups(idx, skip):
    """Kept positions sorted by row (stable), and the segment starts of each distinct row."""
    keep = np.nonzero(idx != skip)[0]
    order = keep[np.argsort(idx[keep], kind="mergesort")]
    n = order.shape[0]
    starts = np.empty(n + 1, dtype=np.int64)
    u = 0
    for i in range(n):
        if i == 0 or idx[order[i]] != idx[order[i - 1]]:
            starts[u] = i
            u += 1
    starts[u] = n
    return order, starts[: u + 1]


@njit(parallel=True, cache=True)
def _backward(grad_out, w, idx, off, psw, has_psw, maxpos, mode, skip, opt, hp, s1, s2, step_size, out_rows,
              out_vals, dense):
    B, D = grad_out.shape
    N = idx.shape[0]
    bag_of = np.empty(N, dtype=np.int64)
    scale = np.ones(B, dtype=grad_out.dtype)
    for b in prange(B):
        cnt = 0
        for j in range(off[b], off[b + 1]):
            bag_of[j] = b
            if idx[j] != skip:
                cnt += 1
        if mode == 1 and cnt > 0:
            scale[b] = 1.0 / cnt
    order, starts = _groups(idx, skip)
    U = starts.shape[0] - 1
    for u in prange(U):
        g = np.zeros(D, dtype=grad_out.dtype)
        r = idx[order[starts[u]]]
        for i in range(starts[u], starts[u + 1]):
            j = order[i]
            b = bag_of[j]
            if mode == 2:
                for d in range(D):
                    if maxpos[b, d] == j:
                        g[d] += grad_out[b, d]
            else:
                s = (psw[j] if has_psw else 1.0) * scale[b]
                for d in range(D):
                    g[d] += s * grad_out[b, d]
        if opt == 0:
            out_rows[u] = r
            out_vals[u, :] = g
        elif opt == 1:
            dense[r, :] = g
        elif opt == 2:
            for d in range(D):
                w[r, d] = w[r, d] + (-hp[0]) * g[d]
        elif opt == 3:
            for d in range(D):
                s1[r, d] += g[d] * g[d]
                w[r, d] = w[r, d] + (-hp[0]) * (g[d] / (math.sqrt(s1[r, d]) + hp[1]))
        elif opt == 4:
            sq = 0.0
            for d in range(D):
                sq += g[d] * g[d]
            s1[r, 0] += sq / D
            sc = (-hp[0]) / (math.sqrt(s1[r, 0]) + hp[1])
            for d in range(D):
                w[r, d] = w[r, d] + sc * g[d]
        else:
            for d in range(D):
                numer = (g[d] - s1[r, d]) * (1.0 - hp[1]) + s1[r, d]
                vsq = (g[d] * g[d] - s2[r, d]) * (1.0 - hp[2]) + s2[r, d]
                s1[r, d] = numer
                s2[r, d] = vsq
                w[r, d] = w[r, d] + (-step_size) * (numer / (math.sqrt(vsq) + hp[3]))
    return U


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _offsets(indices, offsets):
    if offsets is None:
        return np.arange(indices.numel() + 1, dtype=np.int64)
    return _np(offsets).astype(np.int64, copy=False)


def forward(weight, indices, offsets, psw, mode, skip_idx):
    V, D = weight.shape
    B = indices.numel() if offsets is None else offsets.numel() - 1
    acc = acc_dtype(weight.dtype)
    out = torch.empty((B, D), dtype=acc)
    maxpos = torch.empty((B, D) if mode == MODE_MAX else (0, 0), dtype=torch.long)
    has = psw is not None
    p = _np(psw) if has else np.zeros(1, dtype=_np(out).dtype)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _forward(_np(weight), _np(indices).astype(np.int64, copy=False), _offsets(indices, offsets), p, has, mode,
             skip_idx, _np(out), _np(maxpos))
    return out, (maxpos if mode == MODE_MAX else maxpos.reshape(0))


def backward(grad_out, weight, indices, offsets, psw, maxpos, mode, skip_idx, opt, hp, s1, s2, step):
    V, D = weight.shape
    acc = acc_dtype(weight.dtype)
    N = indices.numel()
    rows = torch.empty(N if opt == OPT_SPARSE else 0, dtype=torch.long)
    vals = torch.empty((N, D) if opt == OPT_SPARSE else (0, D), dtype=acc)
    dense = torch.zeros((V, D) if opt == OPT_DENSE else (0, D), dtype=acc)
    hp_arr = np.array(list(hp) + [0.0] * (4 - len(hp)), dtype=np.float64)
    step_size = 0.0
    if opt == OPT_ADAM:
        step += 1
        t = int(step.item())
        step_size = hp[0] * math.sqrt(1 - hp[2] ** t) / (1 - hp[1] ** t)
    dummy = np.zeros((1, 1), dtype=_np(grad_out).dtype)
    st1 = dummy if s1 is None else (_np(s1).reshape(V, -1))
    st2 = dummy if s2 is None else _np(s2)
    has = psw is not None
    p = _np(psw) if has else np.zeros(1, dtype=dummy.dtype)
    mp = _np(maxpos) if mode == MODE_MAX else np.zeros((1, 1), dtype=np.int64)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    U = _backward(_np(grad_out), _np(weight), _np(indices).astype(np.int64, copy=False),
                  _offsets(indices, offsets), p, has, mp, mode, skip_idx, opt, hp_arr.astype(dummy.dtype), st1,
                  st2, step_size, _np(rows), _np(vals), _np(dense))
    if opt == OPT_SPARSE:
        return rows[:U], vals[:U]
    if opt == OPT_DENSE:
        return dense
    return None
