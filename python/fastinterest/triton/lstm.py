"""LSTM recurrence in Triton, on the packed layout of `fastinterest.backends.ext_lstm`.

One program owns BLOCK_B length-sorted positions for the whole sequence and keeps their h, c (and in
backward dL/dh, dL/dc) in registers across steps; per step it computes h @ W_hh^T with tl.dot per gate
(W_hh read from L2/global) and the gate pointwise, so no grid-wide synchronisation is needed.
Backward recomputes dh = dgates @ W_hh from the dgates it just produced, in registers.

Float32 state and arithmetic; bfloat16 tensors are loaded and converted at once. On the CPU
(TRITON_INTERPRET=1) bfloat16 arithmetic is broken, so the wrapper upcasts there; tanh is
2*sigmoid(2x)-1 (libdevice.tanh is unavailable in the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import ext_lstm as _drv


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _lstm_fwd_kernel(xproj_ptr, ldx, whh_ptr, h0_ptr, c0_ptr, perm_ptr, len_ptr, bs_ptr, off_ptr, out_ptr, ldo,
                     gates_ptr, cws_ptr, hn_ptr, cn_ptr, hs_ptr, B, H, maxlen,
                     REVERSE: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, SAVE: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    p = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    pmask = p < B
    j = tl.arange(0, BLOCK_H)
    jmask = j < H
    k = tl.arange(0, BLOCK_H)
    kmask = k < H
    b = tl.load(perm_ptr + p, mask=pmask, other=0)
    L = tl.load(len_ptr + b, mask=pmask, other=0)
    m2 = pmask[:, None] & jmask[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + b[:, None] * H + j[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_C0:
        c = tl.load(c0_ptr + b[:, None] * H + j[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        c = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    wm = kmask[:, None] & jmask[None, :]
    # W_g^T [k, j] = W_hh[g*H + j, k]
    wT = whh_ptr + j[None, :] * H + k[:, None]
    if BLOCK_K < BLOCK_H:  # chunked recurrence: h goes through hs [B, H] (this program's rows only)
        tl.store(hs_ptr + p[:, None] * H + j[None, :], h, mask=m2)
        tl.debug_barrier()
    for s in range(0, maxlen):
        n = tl.load(bs_ptr + s)
        act = (p < n) & pmask
        if REVERSE:
            t = L - 1 - s
        else:
            t = tl.zeros_like(L) + s
        t = tl.where(act, t, 0)
        row = tl.load(off_ptr + t, mask=act, other=0) + p
        am = act[:, None] & jmask[None, :]
        xrow = xproj_ptr + row[:, None] * ldx + j[None, :]
        if BLOCK_K == BLOCK_H:
            gi = tl.dot(h, tl.load(wT, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
            gf = tl.dot(h, tl.load(wT + H * H, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
            gg = tl.dot(h, tl.load(wT + 2 * H * H, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
            go = tl.dot(h, tl.load(wT + 3 * H * H, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
        else:
            # the four [H, H] weight tiles of a large H do not fit in shared memory: sum over K chunks,
            # reading this step's h back from hs
            gi = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            gf = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            gg = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            go = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for kc in range(0, H, BLOCK_K):
                kk = kc + tl.arange(0, BLOCK_K)
                km = kk < H
                hk = tl.load(hs_ptr + p[:, None] * H + kk[None, :], mask=pmask[:, None] & km[None, :], other=0.0)
                wk = whh_ptr + j[None, :] * H + kk[:, None]
                wkm = km[:, None] & jmask[None, :]
                gi += tl.dot(hk, tl.load(wk, mask=wkm, other=0.0).to(tl.float32), input_precision="ieee")
                gf += tl.dot(hk, tl.load(wk + H * H, mask=wkm, other=0.0).to(tl.float32), input_precision="ieee")
                gg += tl.dot(hk, tl.load(wk + 2 * H * H, mask=wkm, other=0.0).to(tl.float32), input_precision="ieee")
                go += tl.dot(hk, tl.load(wk + 3 * H * H, mask=wkm, other=0.0).to(tl.float32), input_precision="ieee")
        gi += tl.load(xrow, mask=am, other=0.0).to(tl.float32)
        gf += tl.load(xrow + H, mask=am, other=0.0).to(tl.float32)
        gg += tl.load(xrow + 2 * H, mask=am, other=0.0).to(tl.float32)
        go += tl.load(xrow + 3 * H, mask=am, other=0.0).to(tl.float32)
        ig = _sigmoid(gi)
        fg = _sigmoid(gf)
        g_ = _tanh(gg)
        og = _sigmoid(go)
        c_new = fg * c + ig * g_
        h_new = og * _tanh(c_new)
        tl.store(out_ptr + row[:, None] * ldo + j[None, :], h_new.to(out_ptr.dtype.element_ty), mask=am)
        if SAVE:
            grow = gates_ptr + row[:, None] * (4 * H) + j[None, :]
            tl.store(grow, ig.to(gates_ptr.dtype.element_ty), mask=am)
            tl.store(grow + H, fg.to(gates_ptr.dtype.element_ty), mask=am)
            tl.store(grow + 2 * H, g_.to(gates_ptr.dtype.element_ty), mask=am)
            tl.store(grow + 3 * H, og.to(gates_ptr.dtype.element_ty), mask=am)
            tl.store(cws_ptr + row[:, None] * H + j[None, :], c_new.to(cws_ptr.dtype.element_ty), mask=am)
        h = tl.where(am, h_new, h)
        c = tl.where(am, c_new, c)
        if BLOCK_K < BLOCK_H:
            tl.debug_barrier()  # every thread has read hs for this step
            tl.store(hs_ptr + p[:, None] * H + j[None, :], h, mask=m2)
            tl.debug_barrier()  # and sees the whole new h in the next
    tl.store(hn_ptr + b[:, None] * H + j[None, :], h.to(hn_ptr.dtype.element_ty), mask=m2)
    tl.store(cn_ptr + b[:, None] * H + j[None, :], c.to(cn_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _lstm_bwd_kernel(go_ptr, ldg, ghn_ptr, gcn_ptr, gates_ptr, cws_ptr, out_ptr, ldo, h0_ptr, c0_ptr, whh_ptr,
                     perm_ptr, len_ptr, bs_ptr, off_ptr, dg_ptr, hprev_ptr, dh0_ptr, dc0_ptr, dgs_ptr, B, H, maxlen,
                     REVERSE: tl.constexpr, HAS_GO: tl.constexpr, HAS_GHN: tl.constexpr, HAS_GCN: tl.constexpr,
                     HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    p = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    pmask = p < B
    j = tl.arange(0, BLOCK_H)
    jmask = j < H
    k = tl.arange(0, BLOCK_H)
    kmask = k < H
    b = tl.load(perm_ptr + p, mask=pmask, other=0)
    L = tl.load(len_ptr + b, mask=pmask, other=0)
    m2 = pmask[:, None] & jmask[None, :]
    if HAS_GHN:
        dh_next = tl.load(ghn_ptr + b[:, None] * H + j[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        dh_next = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_GCN:
        dc = tl.load(gcn_ptr + b[:, None] * H + j[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        dc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    wm = jmask[:, None] & kmask[None, :]
    # W_g [j, k] = W_hh[g*H + j, k]: dh[b, k] = sum_j dgate_g[b, j] W_hh[g*H + j, k]
    w = whh_ptr + j[:, None] * H + k[None, :]
    for s_ in range(0, maxlen):
        s = maxlen - 1 - s_
        n = tl.load(bs_ptr + s)
        act = (p < n) & pmask
        if REVERSE:
            t = L - 1 - s
            tp = L - s
        else:
            t = tl.zeros_like(L) + s
            tp = tl.zeros_like(L) + s - 1
        t = tl.where(act, t, 0)
        sv = tl.zeros_like(L) + s
        has_prev = act & (sv > 0)
        tp = tl.where(has_prev, tp, 0)
        row = tl.load(off_ptr + t, mask=act, other=0) + p
        prow = tl.load(off_ptr + tp, mask=has_prev, other=0) + p
        am = act[:, None] & jmask[None, :]
        pm = has_prev[:, None] & jmask[None, :]
        dh = dh_next
        if HAS_GO:
            dh += tl.load(go_ptr + row[:, None] * ldg + j[None, :], mask=am, other=0.0).to(tl.float32)
        grow = gates_ptr + row[:, None] * (4 * H) + j[None, :]
        ig = tl.load(grow, mask=am, other=0.0).to(tl.float32)
        fg = tl.load(grow + H, mask=am, other=0.0).to(tl.float32)
        gg = tl.load(grow + 2 * H, mask=am, other=0.0).to(tl.float32)
        og = tl.load(grow + 3 * H, mask=am, other=0.0).to(tl.float32)
        tc = _tanh(tl.load(cws_ptr + row[:, None] * H + j[None, :], mask=am, other=0.0).to(tl.float32))
        dct = dc + dh * og * (1.0 - tc * tc)
        cp = tl.load(cws_ptr + prow[:, None] * H + j[None, :], mask=pm, other=0.0).to(tl.float32)
        hp = tl.load(out_ptr + prow[:, None] * ldo + j[None, :], mask=pm, other=0.0).to(tl.float32)
        first = act & (sv == 0)
        fm = first[:, None] & jmask[None, :]
        if HAS_C0:
            cp += tl.load(c0_ptr + b[:, None] * H + j[None, :], mask=fm, other=0.0).to(tl.float32)
        if HAS_H0:
            hp += tl.load(h0_ptr + b[:, None] * H + j[None, :], mask=fm, other=0.0).to(tl.float32)
        di = tl.where(am, dct * gg * ig * (1.0 - ig), 0.0)
        df = tl.where(am, dct * cp * fg * (1.0 - fg), 0.0)
        dg = tl.where(am, dct * ig * (1.0 - gg * gg), 0.0)
        do = tl.where(am, dh * tc * og * (1.0 - og), 0.0)
        drow = dg_ptr + row[:, None] * (4 * H) + j[None, :]
        tl.store(drow, di.to(dg_ptr.dtype.element_ty), mask=am)
        tl.store(drow + H, df.to(dg_ptr.dtype.element_ty), mask=am)
        tl.store(drow + 2 * H, dg.to(dg_ptr.dtype.element_ty), mask=am)
        tl.store(drow + 3 * H, do.to(dg_ptr.dtype.element_ty), mask=am)
        tl.store(hprev_ptr + row[:, None] * H + j[None, :], hp.to(hprev_ptr.dtype.element_ty), mask=am)
        if BLOCK_K == BLOCK_H:
            rec = tl.dot(di, tl.load(w, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
            rec += tl.dot(df, tl.load(w + H * H, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
            rec += tl.dot(dg, tl.load(w + 2 * H * H, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
            rec += tl.dot(do, tl.load(w + 3 * H * H, mask=wm, other=0.0).to(tl.float32), input_precision="ieee")
        else:
            # large H: the dgates go through dgs [B, 4H] (this program's rows) and the product is
            # summed over chunks of the hidden units
            srow = dgs_ptr + p[:, None] * (4 * H) + j[None, :]
            tl.debug_barrier()  # every thread has read dgs of the previous step
            tl.store(srow, di, mask=m2)
            tl.store(srow + H, df, mask=m2)
            tl.store(srow + 2 * H, dg, mask=m2)
            tl.store(srow + 3 * H, do, mask=m2)
            tl.debug_barrier()
            rec = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for jc in range(0, 4 * H, BLOCK_K):  # rows of W_hh: gate-major, all four gates
                jj = jc + tl.arange(0, BLOCK_K)
                jm = jj < 4 * H
                dk = tl.load(dgs_ptr + p[:, None] * (4 * H) + jj[None, :], mask=pmask[:, None] & jm[None, :],
                             other=0.0)
                wk = tl.load(whh_ptr + jj[:, None] * H + k[None, :], mask=jm[:, None] & kmask[None, :], other=0.0)
                rec += tl.dot(dk, wk.to(tl.float32), input_precision="ieee")
        dh_next = tl.where(am, rec, dh_next)
        dc = tl.where(am, dct * fg, dc)
    tl.store(dh0_ptr + b[:, None] * H + j[None, :], dh_next.to(dh0_ptr.dtype.element_ty), mask=m2)
    tl.store(dc0_ptr + b[:, None] * H + j[None, :], dc.to(dc0_ptr.dtype.element_ty), mask=m2)


def _blocks(B: int, H: int, device):
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps). BLOCK_K < BLOCK_H: the recurrent product is summed over K
    chunks through a scratch buffer, because the four [H, H] float32 weight tiles of one step need
    4 * 4 * H^2 bytes of shared memory (H = 128: 256 KiB, over the 227 KiB of an H100/H200)."""
    BLOCK_H = max(16, triton.next_power_of_2(H))
    if device.type == "cpu":   # the interpreter: few, fat programs
        return max(16, triton.next_power_of_2(B)), BLOCK_H, BLOCK_H, 4
    if BLOCK_H <= 64:
        return 16, BLOCK_H, BLOCK_H, 4
    return 16, BLOCK_H, 32 if BLOCK_H <= 256 else 16, 4 if BLOCK_H <= 128 else 8


def _dev_plan(plan, device):
    if device.type == "cpu":
        return plan.perm, plan.lengths, plan.batch_sizes, plan.offsets
    lengths, perm, bs, off, _ = _drv.device_plan(plan, device)
    return perm, lengths, bs, off


class TritonKernel:
    padded_io = False

    def forward(self, plan, H, reverse, xproj, whh, h0, c0, out, zero_padding, gates_ws, c_ws, h_n, c_n,
                whh_packed=None):
        B = plan.B
        BLOCK_B, BLOCK_H, BLOCK_K, warps = _blocks(B, H, xproj.device)
        perm, lens, bs, off = _dev_plan(plan, xproj.device)
        save = gates_ws is not None
        dummy = h_n
        hs = torch.empty(B, H, dtype=torch.float32, device=xproj.device) if BLOCK_K < BLOCK_H else h_n
        _lstm_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            xproj, xproj.stride(0), whh.contiguous(), h0 if h0 is not None else dummy,
            c0 if c0 is not None else dummy, perm, lens, bs, off, out, out.stride(0),
            gates_ws if save else dummy, c_ws if save else dummy, h_n, c_n, hs, B, H, plan.maxlen,
            REVERSE=reverse, HAS_H0=h0 is not None, HAS_C0=c0 is not None, SAVE=save, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, num_warps=warps, num_stages=1)

    def backward(self, plan, H, reverse, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out, h0, c0, whh, dgates, hprev,
                 dh0, dc0):
        B = plan.B
        BLOCK_B, BLOCK_H, BLOCK_K, warps = _blocks(B, H, dgates.device)
        perm, lens, bs, off = _dev_plan(plan, dgates.device)
        dummy = dh0
        dgs = torch.empty(B, 4 * H, dtype=torch.float32, device=dgates.device) if BLOCK_K < BLOCK_H else dh0
        _lstm_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            grad_out if grad_out is not None else dummy, grad_out.stride(0) if grad_out is not None else 0,
            grad_hn if grad_hn is not None else dummy, grad_cn if grad_cn is not None else dummy, gates_ws, c_ws, out,
            out.stride(0), h0 if h0 is not None else dummy, c0 if c0 is not None else dummy, whh.contiguous(), perm,
            lens, bs, off, dgates, hprev, dh0, dc0, dgs, B, H, plan.maxlen,
            REVERSE=reverse, HAS_GO=grad_out is not None, HAS_GHN=grad_hn is not None, HAS_GCN=grad_cn is not None,
            HAS_H0=h0 is not None, HAS_C0=c0 is not None, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
            num_warps=warps, num_stages=1)


_KERNEL = TritonKernel()


def _upcast(device, dtype):
    """The interpreter cannot do bfloat16 arithmetic: compute in float32 there."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def forward(x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional, batch_first, dropout, training,
            need_ws):
    if _upcast(x.device, x.dtype):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        out, h_n, c_n, ws = _drv.packed_forward(_KERNEL, x.float(), lengths, f(h0), f(c0), [w.float() for w in weights],
                                                has_bias, num_layers, bidirectional, batch_first, dropout, training,
                                                need_ws)
        return out.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype), [w.to(x.dtype) for w in ws]
    return _drv.packed_forward(_KERNEL, x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional,
                               batch_first, dropout, training, need_ws)


def backward(grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, has_bias, out, ws, num_layers, bidirectional,
             batch_first, dropout):
    if _upcast(x.device, x.dtype):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        gx, gh, gc, gw = _drv.packed_backward(_KERNEL, f(grad_out), f(grad_hn), f(grad_cn), x.float(), lengths, f(h0),
                                              f(c0), [w.float() for w in weights], has_bias, out.float(),
                                              [w.float() for w in ws], num_layers, bidirectional, batch_first, dropout)
        return gx.to(x.dtype), gh.to(x.dtype), gc.to(x.dtype), [g.to(x.dtype) for g in gw]
    return _drv.packed_backward(_KERNEL, grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, has_bias, out, ws,
                                num_layers, bidirectional, batch_first, dropout)


def ws_shapes(B, T, E, H, num_layers, dirs, dropout_active, need_ws):
    return _drv.packed_ws_shapes(TritonKernel.padded_io, B, T, E, H, num_layers, dirs, dropout_active, need_ws)
