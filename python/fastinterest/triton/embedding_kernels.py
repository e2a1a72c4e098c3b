"""Triton kernels for embedding-bag (imported only when triton is installed). See embedding.py."""
import triton
import triton.language as tl


@triton.jit
def bag_forward_kernel(w_ptr, idx_ptr, off_ptr, psw_ptr, out_ptr, maxpos_ptr, B, D, max_len, skip,
                       HAS_PSW: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: BLOCK_B bags x all D columns (BLOCK_D >= D). Rows are loaded in their storage dtype
    # and accumulated in float32 (or float64 for float64 tables: the output pointer's type).
    pid = tl.program_id(0)
    bags = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = bags < B
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(off_ptr + bags, mask=bmask, other=0).to(tl.int64)
    end = tl.load(off_ptr + bags + 1, mask=bmask, other=0).to(tl.int64)
    length = end - start
    out_ty = out_ptr.dtype.element_ty
    if MODE == 2:
        acc = tl.full((BLOCK_B, BLOCK_D), float("-inf"), out_ty)
        arg = tl.full((BLOCK_B, BLOCK_D), -1, tl.int64)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_D), out_ty)
    count = tl.zeros((BLOCK_B,), tl.int32)
    for j in range(0, max_len):
        valid = bmask & (j < length)
        pos = start + j
        r = tl.load(idx_ptr + pos, mask=valid, other=0).to(tl.int64)
        keep = valid & (r != skip)
        m2 = keep[:, None] & cmask[None, :]
        v = tl.load(w_ptr + r[:, None] * D + cols[None, :], mask=m2, other=0.0).to(out_ty)
        count += keep.to(tl.int32)
        if MODE == 2:
            better = m2 & ((v > acc) | (arg < 0))
            acc = tl.where(better, v, acc)
            arg = tl.where(better, pos[:, None], arg)
        else:
            if HAS_PSW:
                s = tl.load(psw_ptr + pos, mask=keep, other=0.0).to(out_ty)
                v = v * s[:, None]
            acc += v
    omask = bmask[:, None] & cmask[None, :]
    optr = bags[:, None].to(tl.int64) * D + cols[None, :]
    if MODE == 2:
        acc = tl.where(arg < 0, 0.0, acc)
        tl.store(maxpos_ptr + optr, arg, mask=omask)
    if MODE == 1:
        acc = acc / tl.maximum(count, 1).to(out_ty)[:, None]
    tl.store(out_ptr + optr, acc, mask=omask)


# D is not specialised: Triton 3.6 on sm_90 fails to compile this kernel when it knows D is a multiple of
# 16 ("'tt.load' op failed to verify that mask type matches ptr type" in its layout pass; H200, D = 64,
# for row and column blocks of 32, 64 and 128 alike), while D = 123 and D = 300 compile and pass.
@triton.jit(do_not_specialize=["D"])
def bag_backward_kernel(go_ptr, w_ptr, seg_ptr, spos_ptr, bag_ptr, scale_ptr, maxpos_ptr, rows_ptr,
                        vals_ptr, dense_ptr, s1_ptr, s2_ptr, U, D, max_seg, h0, h1, h2, h3,
                        MODE: tl.constexpr, OPT: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: BLOCK_U distinct rows. Segment u holds the positions of row u sorted by position,
    # so each row's gradient is summed in a fixed order (deterministic), then the update is applied.
    pid = tl.program_id(0)
    us = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    umask = us < U
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(seg_ptr + us, mask=umask, other=0)
    end = tl.load(seg_ptr + us + 1, mask=umask, other=0)
    acc_ty = go_ptr.dtype.element_ty
    g = tl.zeros((BLOCK_U, BLOCK_D), acc_ty)
    for k in range(0, max_seg):
        valid = umask & (start + k < end)
        j = tl.load(spos_ptr + start + k, mask=valid, other=0)
        b = tl.load(bag_ptr + j, mask=valid, other=0)
        m2 = valid[:, None] & cmask[None, :]
        go = tl.load(go_ptr + b[:, None] * D + cols[None, :], mask=m2, other=0.0)
        if MODE == 2:
            mp = tl.load(maxpos_ptr + b[:, None] * D + cols[None, :], mask=m2, other=-1)
            g += tl.where(mp == j[:, None], go, 0.0)
        else:
            s = tl.load(scale_ptr + j, mask=valid, other=0.0)
            g += go * s[:, None]
    r = tl.load(rows_ptr + us, mask=umask, other=0)
    m2 = umask[:, None] & cmask[None, :]
    ptr = r[:, None] * D + cols[None, :]
    if OPT == 0:
        tl.store(vals_ptr + us[:, None].to(tl.int64) * D + cols[None, :], g, mask=m2)
    elif OPT == 1:
        tl.store(dense_ptr + ptr, g, mask=m2)
    else:
        w = tl.load(w_ptr + ptr, mask=m2, other=0.0).to(acc_ty)
        if OPT == 2:
            w = w + (-h0) * g
        elif OPT == 3:
            s = tl.load(s1_ptr + ptr, mask=m2, other=0.0) + g * g
            tl.store(s1_ptr + ptr, s, mask=m2)
            w = w + (-h0) * (g / (tl.sqrt(s) + h1))
        elif OPT == 4:
            sq = tl.sum(tl.where(m2, g * g, 0.0), axis=1) / D
            s = tl.load(s1_ptr + r, mask=umask, other=0.0) + sq
            tl.store(s1_ptr + r, s, mask=umask)
            w = w + ((-h0) / (tl.sqrt(s) + h1))[:, None] * g
        else:
            m = tl.load(s1_ptr + ptr, mask=m2, other=0.0)
            v = tl.load(s2_ptr + ptr, mask=m2, other=0.0)
            numer = (g - m) * (1.0 - h1) + m
            vsq = (g * g - v) * (1.0 - h2) + v
            tl.store(s1_ptr + ptr, numer, mask=m2)
            tl.store(s2_ptr + ptr, vsq, mask=m2)
            w = w + (-h0) * (numer / (tl.sqrt(vsq) + h3))
        tl.store(w_ptr + ptr, w.to(w_ptr.dtype.element_ty), mask=m2)
