"""LSTM recurrence in numba (CPU), on the packed layout of `fastinterest.backends.ext_lstm`.

Per step, the active rows' h @ W_hh^T is one np.dot (BLAS through scipy; numba runs no threads of
its own here, so there is one thread pool), then the gate pointwise in a compiled loop. Backward
mirrors the C++ kernel: dgates per packed row, dh = dgates(t+1) @ W_hh, the carries dL/dh_n, dL/dc_n.
The input projection and weight gradients are GEMMs in torch (the shared driver).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from ..backends import ext_lstm as _drv


@njit(cache=True)
def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(cache=True)
def _fwd(xproj, whhT, h0, c0, perm, Ls, bs, offsets, maxlen, reverse, out, gates, cws, save, h_n, c_n):
    """xproj [N, 4H] (strided rows); whhT [H, 4H] = W_hh^T; h0, c0 [B, H] batch order; out [N, H];
    gates [N, 4H], cws [N, H] (written when save); h_n, c_n [B, H] batch order."""
    B = perm.shape[0]
    H = whhT.shape[0]
    h = np.empty((B, H), dtype=whhT.dtype)
    c = np.empty((B, H), dtype=whhT.dtype)
    for p in range(B):
        h[p] = h0[perm[p]]
        c[p] = c0[perm[p]]
    for s in range(maxlen):
        n = bs[s]
        g = np.dot(h[:n], whhT)
        for p in range(n):
            t = Ls[p] - 1 - s if reverse else s
            row = offsets[t] + p
            for j in range(H):
                ig = _sig(g[p, j] + xproj[row, j])
                fg = _sig(g[p, H + j] + xproj[row, H + j])
                gg = math.tanh(g[p, 2 * H + j] + xproj[row, 2 * H + j])
                og = _sig(g[p, 3 * H + j] + xproj[row, 3 * H + j])
                cv = fg * c[p, j] + ig * gg
                hv = og * math.tanh(cv)
                c[p, j] = cv
                h[p, j] = hv
                out[row, j] = hv
                if save:
                    gates[row, j] = ig
                    gates[row, H + j] = fg
                    gates[row, 2 * H + j] = gg
                    gates[row, 3 * H + j] = og
                    cws[row, j] = cv
    for p in range(B):
        h_n[perm[p]] = h[p]
        c_n[perm[p]] = c[p]


@njit(cache=True)
def _bwd(go, has_go, ghn, gcn, gates, cws, out, h0, c0, whh, perm, Ls, bs, offsets, maxlen, reverse, dgates, hprev,
         dh0, dc0):
    """go [N, H] (dL/dh per step, used when has_go); ghn, gcn, h0, c0 [B, H] batch order; gates [N, 4H],
    cws [N, H], out [N, H] from the forward; whh [4H, H]. Writes dgates [N, 4H], hprev [N, H], dh0, dc0."""
    B = perm.shape[0]
    H = whh.shape[1]
    dh_init = np.empty((B, H), dtype=whh.dtype)
    dc = np.empty((B, H), dtype=whh.dtype)
    for p in range(B):
        dh_init[p] = ghn[perm[p]]
        dc[p] = gcn[perm[p]]
    R = np.zeros((0, H), dtype=whh.dtype)
    for s in range(maxlen - 1, -2, -1):
        n_next = bs[s + 1] if s + 1 < maxlen else 0
        if n_next > 0:
            D = np.empty((n_next, 4 * H), dtype=whh.dtype)
            for p in range(n_next):
                t1 = Ls[p] - 1 - (s + 1) if reverse else s + 1
                D[p] = dgates[offsets[t1] + p]
            R = np.dot(D, whh)
        if s < 0:
            break
        n = bs[s]
        for p in range(n):
            t = Ls[p] - 1 - s if reverse else s
            row = offsets[t] + p
            b = perm[p]
            if s > 0:
                tp = Ls[p] - 1 - (s - 1) if reverse else s - 1
                prow = offsets[tp] + p
            else:
                prow = -1
            for j in range(H):
                dhv = R[p, j] if p < n_next else dh_init[p, j]
                if has_go:
                    dhv += go[row, j]
                ig = gates[row, j]
                fg = gates[row, H + j]
                gg = gates[row, 2 * H + j]
                og = gates[row, 3 * H + j]
                tc = math.tanh(cws[row, j])
                dcv = dc[p, j] + dhv * og * (1.0 - tc * tc)
                cp = cws[prow, j] if prow >= 0 else c0[b, j]
                dgates[row, j] = dcv * gg * ig * (1.0 - ig)
                dgates[row, H + j] = dcv * cp * fg * (1.0 - fg)
                dgates[row, 2 * H + j] = dcv * ig * (1.0 - gg * gg)
                dgates[row, 3 * H + j] = dhv * tc * og * (1.0 - og)
                dc[p, j] = dcv * fg
                hprev[row, j] = out[prow, j] if prow >= 0 else h0[b, j]
    n0 = bs[0] if maxlen > 0 else 0
    for p in range(B):
        b = perm[p]
        for j in range(H):
            dh0[b, j] = R[p, j] if p < n0 else dh_init[p, j]
            dc0[b, j] = dc[p, j]


def _np(t):
    return t.detach().numpy()


class NumbaKernel:
    padded_io = False

    def forward(self, plan, H, reverse, xproj, whh, h0, c0, out, zero_padding, gates_ws, c_ws, h_n, c_n,
                whh_packed=None):
        B = plan.B
        dt = xproj.dtype
        z = torch.zeros(B, H, dtype=dt)
        save = gates_ws is not None
        g = gates_ws if save else torch.empty(1, 4 * H, dtype=dt)
        cw = c_ws if save else torch.empty(1, H, dtype=dt)
        _fwd(_np(xproj), _np(whh.t().contiguous()), _np(h0 if h0 is not None else z), _np(c0 if c0 is not None else z),
             _np(plan.perm), _np(plan.lengths[plan.perm]), _np(plan.batch_sizes), _np(plan.offsets), plan.maxlen,
             reverse, _np(out), _np(g), _np(cw), save, _np(h_n), _np(c_n))

    def backward(self, plan, H, reverse, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out, h0, c0, whh, dgates, hprev,
                 dh0, dc0):
        B = plan.B
        dt = dgates.dtype
        z = torch.zeros(B, H, dtype=dt)
        go = grad_out if grad_out is not None else torch.empty(1, H, dtype=dt)
        _bwd(_np(go), grad_out is not None, _np(grad_hn if grad_hn is not None else z),
             _np(grad_cn if grad_cn is not None else z), _np(gates_ws), _np(c_ws), _np(out),
             _np(h0 if h0 is not None else z), _np(c0 if c0 is not None else z), _np(whh.contiguous()),
             _np(plan.perm), _np(plan.lengths[plan.perm]), _np(plan.batch_sizes), _np(plan.offsets), plan.maxlen,
             reverse, _np(dgates), _np(hprev), _np(dh0), _np(dc0))


_KERNEL = NumbaKernel()


def forward(x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional, batch_first, dropout, training,
            need_ws):
    return _drv.packed_forward(_KERNEL, x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional,
                               batch_first, dropout, training, need_ws)


def backward(grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, has_bias, out, ws, num_layers, bidirectional,
             batch_first, dropout):
    return _drv.packed_backward(_KERNEL, grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, has_bias, out, ws,
                                num_layers, bidirectional, batch_first, dropout)


def ws_shapes(B, T, E, H, num_layers, dirs, dropout_active, need_ws):
    return _drv.packed_ws_shapes(NumbaKernel.padded_io, B, T, E, H, num_layers, dirs, dropout_active, need_ws)
