"""Numba (CPU) embedding-bag kernels: same contract as backends/reference_embedding.py.

Forward: one parallel loop over bags; sum/mean accumulate each block of columns in vector registers
while prefetching rows ahead (two small LLVM intrinsics, see the forward section), max is plain numba.
Backward: a stable sort of the kept positions by row groups each row's occurrences in position order;
a parallel loop over rows sums each row's gradient in that fixed order and applies the fused update,
so the result does not depend on the thread count.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..backends.reference_embedding import (MODE_MAX, MODE_MEAN, OPT_ADAGRAD, OPT_ADAM, OPT_DENSE,
                                            OPT_ROWWISE_ADAGRAD, OPT_SGD, OPT_SPARSE, acc_dtype)


# ---------------------------------------------------------------- forward
# The sum/mean forward is bound by gathering random rows. Two things the C++ kernel does that plain
# numba code cannot express are done here with small LLVM intrinsics:
#   * software prefetch of the row _PF positions ahead (llvm.prefetch, as __builtin_prefetch(p, 0, 1));
#   * accumulators held in vector registers for a block of up to 8 vectors of columns, so no partial
#     sum goes through memory between rows (numba's `out[b, d] += w[r, d]` loop stores and reloads
#     the output row for every index and checks aliasing on every row: ~1.5x slower).
# Everything else (bag bounds, counts, threading over bags, the max mode) is ordinary numba.
_PF = 12  # rows prefetched ahead of the one being summed (as the C++ kernel)
_PF_LOCALITY = 1  # llvm.prefetch locality 1 = prefetcht2 (T0, 3, measured no faster here under load)
_VEC_BYTES = 32  # one accumulator register (AVX2); LLVM splits or joins it on other targets
_BLOCK = 8  # accumulator registers per column block: 64 float32 / 32 float64 columns
_I32, _I64 = ir.IntType(32), ir.IntType(64)


def _emit_prefetch(builder, ptr, nbytes):
    """Prefetch for read (_PF_LOCALITY) every cache line of [ptr, ptr + nbytes) (nbytes a constant
    or an i64 value)."""
    i8p = ir.IntType(8).as_pointer()
    # the pointer's mangling is "p0" with opaque pointers (LLVM >= 15), "p0i8" with typed ones
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                        f"llvm.prefetch.{i8p.intrinsic_name}")
    p = builder.bitcast(ptr, i8p)
    if isinstance(nbytes, int):
        offs = list(range(0, nbytes, 64)) + ([nbytes - 1] if nbytes % 64 else [])
        for o in offs:
            builder.call(fn, [builder.gep(p, [_I64(o)]), _I32(0), _I32(_PF_LOCALITY), _I32(1)])
        return
    with cgutils.for_range_slice(builder, _I64(0), nbytes, _I64(64)) as (o, _):
        builder.call(fn, [builder.gep(p, [o]), _I32(0), _I32(_PF_LOCALITY), _I32(1)])


def _c_float_matrix(t):
    return isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" and isinstance(t.dtype, types.Float)


@intrinsic
def _prefetch_row(typingctx, w, r):
    """Prefetch the whole row w[r, :] of a C-contiguous matrix."""
    if not _c_float_matrix(w) or not isinstance(r, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        wa = context.make_array(signature.args[0])(context, builder, args[0])
        D = builder.extract_value(wa.shape, 1)
        rv = context.cast(builder, args[1], signature.args[1], types.int64)
        esz = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        _emit_prefetch(builder, builder.gep(wa.data, [builder.mul(rv, D)]), builder.mul(D, _I64(esz)))
        return context.get_dummy_value()

    return types.void(w, r), codegen


@intrinsic
def _sum_block(typingctx, w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c0, nv, vec):
    """out[b, c0:c0+n] = scale * sum over j in [j0, j1) with idx[j] != skip of (psw[j] *) w[idx[j], c0:c0+n].

    n = nv registers of _VEC_BYTES (vec=1) or nv single columns (vec=0); nv and vec are literals. The
    rows are summed in index order in registers, each prefetched _PF positions ahead (across bags).
    """
    if not (isinstance(nv, types.IntegerLiteral) and isinstance(vec, types.IntegerLiteral)):
        return None
    if not (_c_float_matrix(w) and _c_float_matrix(out) and out.dtype == w.dtype and isinstance(idx, types.Array)
            and idx.ndim == 1 and idx.layout == "C" and isinstance(idx.dtype, types.Integer)
            and isinstance(psw, types.Array) and psw.ndim == 1 and psw.dtype == w.dtype):
        return None
    NV = nv.literal_value
    sig = types.void(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c0, nv, vec)

    def codegen(context, builder, signature, args):
        aw, ai, aj0, aj1, askip, ap, ahas, ascale, ao, ab, ac0 = signature.args[:11]
        wa = context.make_array(aw)(context, builder, args[0])
        ia = context.make_array(ai)(context, builder, args[1])
        pa = context.make_array(ap)(context, builder, args[5])
        oa = context.make_array(ao)(context, builder, args[8])
        vj0, vj1, vskip, vb, vc0 = (context.cast(builder, args[k], t, types.int64)
                                    for k, t in ((2, aj0), (3, aj1), (4, askip), (9, ab), (10, ac0)))
        has = context.cast(builder, args[6], ahas, types.boolean)
        ety = context.get_data_type(aw.dtype)
        esz = context.get_abi_sizeof(ety)
        W = _VEC_BYTES // esz if vec.literal_value else 1
        vty = ir.VectorType(ety, W) if W > 1 else ety
        sfx = (f"v{W}" if W > 1 else "") + f"f{aw.dtype.bitwidth}"
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                                 f"llvm.fmuladd.{sfx}")

        def splat(x):
            if W == 1:
                return x
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, _I32(0))
            zeros = ir.Constant(ir.VectorType(_I32, W), [0] * W)
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)

        D = builder.extract_value(wa.shape, 1)
        N = builder.extract_value(ia.shape, 0)
        ibits = ai.dtype.bitwidth

        def index_at(j):
            v = builder.load(builder.gep(ia.data, [j]))
            if ibits < 64:
                v = builder.sext(v, _I64) if ai.dtype.signed else builder.zext(v, _I64)
            return v

        def block_ptr(r):
            return builder.gep(wa.data, [builder.add(builder.mul(r, D), vc0)])

        def merge(*incoming):
            """One phi per accumulator, joining the NV-vectors of the given (values, block) pairs."""
            out = []
            for k in range(NV):
                p = builder.phi(vty)
                for values, block in incoming:
                    p.add_incoming(values[k], block)
                out.append(p)
            return out

        def emit_loop(use_psw, exit_to):
            """Sum loop; returns (header block, final accumulator phis). Branches to exit_to when done."""
            pre = builder.block
            hdr = builder.append_basic_block("fi.sum.hdr")
            body = builder.append_basic_block("fi.sum.body")
            add = builder.append_basic_block("fi.sum.add")
            latch = builder.append_basic_block("fi.sum.latch")
            builder.branch(hdr)
            builder.position_at_end(hdr)
            j = builder.phi(_I64)
            acc = [builder.phi(vty) for _ in range(NV)]
            j.add_incoming(vj0, pre)
            for a in acc:
                a.add_incoming(ir.Constant(vty, None), pre)
            builder.cbranch(builder.icmp_signed("<", j, vj1), body, exit_to)
            builder.position_at_end(body)
            jp = builder.add(j, _I64(_PF))
            with builder.if_then(builder.icmp_signed("<", jp, N), likely=True):
                _emit_prefetch(builder, block_ptr(index_at(jp)), NV * W * esz)
            r = index_at(j)
            body_end = builder.block
            builder.cbranch(builder.icmp_signed("==", r, vskip), latch, add)
            builder.position_at_end(add)
            base = block_ptr(r)
            vp = builder.bitcast(base, vty.as_pointer())
            s = splat(builder.load(builder.gep(pa.data, [j]))) if use_psw else None
            new = []
            for k in range(NV):
                v = builder.load(builder.gep(vp, [_I64(k)]), align=esz)
                new.append(builder.call(fmuladd, [s, v, acc[k]]) if use_psw else builder.fadd(acc[k], v))
            builder.branch(latch)
            builder.position_at_end(latch)
            nxt = merge((acc, body_end), (new, add))
            j.add_incoming(builder.add(j, _I64(1)), latch)
            for k in range(NV):
                acc[k].add_incoming(nxt[k], latch)
            builder.branch(hdr)
            return hdr, acc

        entry = builder.block
        with_psw = builder.append_basic_block("fi.sum.psw")
        plain = builder.append_basic_block("fi.sum.plain")
        done = builder.append_basic_block("fi.sum.done")
        builder.position_at_end(entry)
        builder.cbranch(has, with_psw, plain)
        builder.position_at_end(with_psw)
        h1, acc1 = emit_loop(True, done)
        builder.position_at_end(plain)
        h2, acc2 = emit_loop(False, done)
        builder.position_at_end(done)
        final = merge((acc1, h1), (acc2, h2))
        sc = splat(context.cast(builder, args[7], ascale, aw.dtype))
        Do = builder.extract_value(oa.shape, 1)
        ovp = builder.bitcast(builder.gep(oa.data, [builder.add(builder.mul(vb, Do), vc0)]), vty.as_pointer())
        for k in range(NV):
            builder.store(builder.fmul(final[k], sc), builder.gep(ovp, [_I64(k)]), align=esz)
        return context.get_dummy_value()

    return sig, codegen


# Validation happens inside the kernels, as in the C++ path (the op then skips its separate Python passes,
# ~1 ms at V=1M, 16384 x 20): a bag whose bounds leave [0, N] or that holds an index outside [0, V) is
# not read (its output is zeroed) and the kernel returns a non-zero count, so forward raises BadInput
# and the op runs its Python checks for the precise error. No row outside the table is ever read.
@njit(cache=True)
def _bad_outside_bags(idx, off, has_off, B, V):
    """The checks that belong to no bag: offsets start at 0 and end at N; indices after the last bag
    (refused) are still checked, so that the precise error can name them."""
    if not has_off:
        return 0
    N = idx.shape[0]
    bad = 0
    if off[0] != 0 or off[B] != N:
        bad = 1
    for j in range(min(max(off[B], 0), N), N):
        r = idx[j]
        if r < 0 or r >= V:
            bad = 1
    return bad


@njit(cache=True)
def _bag(idx, off, has_off, b, skip, V):
    """(start, end, kept rows) of bag b, or end = -1 when its bounds or one of its indices are invalid."""
    if has_off:
        j0 = np.int64(off[b])
        j1 = np.int64(off[b + 1])
        if j0 < 0 or j0 > j1 or j1 > idx.shape[0]:
            return j0, np.int64(-1), 0
    else:
        j0 = np.int64(b)
        j1 = j0 + 1
    count = 0
    for j in range(j0, j1):
        r = idx[j]
        if r < 0 or r >= V:
            return j0, np.int64(-1), 0
        if r != skip:
            count += 1
    return j0, j1, count


@njit(parallel=True, cache=True)
def _forward_sum(w, idx, off, has_off, psw, has_psw, mean, skip, out):
    """Modes sum and mean: out[b] = scale * sum of the bag's kept rows (times psw); scale = 1/count for mean.
    Returns the number of invalid spots found (0: all valid)."""
    B, D = out.shape
    V = w.shape[0]
    VW = _VEC_BYTES // w.itemsize
    full = D // (_BLOCK * VW)
    vecs = (D - full * _BLOCK * VW) // VW
    cols = D - full * _BLOCK * VW - vecs * VW
    bad = _bad_outside_bags(idx, off, has_off, B, V)
    for b in prange(B):
        j0, j1, count = _bag(idx, off, has_off, b, skip, V)
        if j1 < 0:
            bad += 1
            for d in range(D):
                out[b, d] = 0
            continue
        scale = 1.0
        if mean and count > 0:
            scale = 1.0 / count
        c = 0
        for _ in range(full):
            _sum_block(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c, 8, 1)
            c += _BLOCK * VW
        # the remaining columns: 4, 2, 1 vector registers, then 4, 2, 1 single columns
        if vecs & 4:
            _sum_block(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c, 4, 1)
            c += 4 * VW
        if vecs & 2:
            _sum_block(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c, 2, 1)
            c += 2 * VW
        if vecs & 1:
            _sum_block(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c, 1, 1)
            c += VW
        if cols & 4:
            _sum_block(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c, 4, 0)
            c += 4
        if cols & 2:
            _sum_block(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c, 2, 0)
            c += 2
        if cols & 1:
            _sum_block(w, idx, j0, j1, skip, psw, has_psw, scale, out, b, c, 1, 0)
    return bad


@njit(parallel=True, cache=True)
def _forward_max(w, idx, off, has_off, skip, out, maxpos):
    """Mode max: out[b, d] = max over the bag's kept rows, maxpos[b, d] = its position (the first on ties);
    an empty bag gives 0 and -1. Returns the number of invalid spots found (0: all valid)."""
    B, D = out.shape
    V = w.shape[0]
    N = idx.shape[0]
    bad = _bad_outside_bags(idx, off, has_off, B, V)
    for b in prange(B):
        j0, j1, _ = _bag(idx, off, has_off, b, skip, V)
        o = out[b]
        mp = maxpos[b]
        if j1 < 0:
            bad += 1
            j1 = j0  # read nothing: zeros and -1 below
        anyv = False
        for j in range(j0, j1):
            if j + _PF < N:
                _prefetch_row(w, idx[j + _PF])
            r = idx[j]
            if r == skip:
                continue
            wr = w[r]
            if not anyv:
                for d in range(D):
                    o[d] = wr[d]
                    mp[d] = j
                anyv = True
            else:
                for d in range(D):  # branch-free so that it vectorises; strict: the first maximum wins
                    v = wr[d]
                    cur = o[d]
                    gt = v > cur
                    o[d] = v if gt else cur
                    mp[d] = j if gt else mp[d]
        if not anyv:
            for d in range(D):
                o[d] = 0
                mp[d] = -1
    return bad


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


def _threads(work: int) -> int:
    """numba threads for this call: torch's setting (as the C++ path), one for small calls (a parallel region
    costs more than it saves below a few thousand rows, as in the C++ kernels)."""
    if work < 2048:
        return 1
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


_NO_OFFSETS = np.zeros(1, dtype=np.int64)

# The forward validates indices and offsets as it reads them (see _bag): the op skips its Python checks
# for this backend on the CPU and, on BadInput, runs them to raise the precise error.
VALIDATES_ON_CPU = True


class BadInput(Exception):
    """The forward met an out-of-range index or offset (it read no memory outside the table)."""


def forward(weight, indices, offsets, psw, mode, skip_idx):
    D = weight.shape[1]
    B = indices.numel() if offsets is None else offsets.numel() - 1
    acc = acc_dtype(weight.dtype)
    out = torch.empty((B, D), dtype=acc)
    maxpos = torch.empty((B, D) if mode == MODE_MAX else (0,), dtype=torch.long)
    w = _np(weight.contiguous())  # the kernels index rows as w.data + r * D
    idx = _np(indices.contiguous())
    has_off = offsets is not None
    # offsets in int64 (B + 1 values: cheap) halves the compiled variants; indices stay as they are
    off = _np(offsets.to(torch.int64).contiguous()) if has_off else _NO_OFFSETS
    numba.set_num_threads(_threads(indices.numel()))
    if mode == MODE_MAX:
        bad = _forward_max(w, idx, off, has_off, skip_idx, _np(out), _np(maxpos))
    else:
        has = psw is not None
        p = _np(psw.to(acc).contiguous()) if has else np.zeros(1, dtype=w.dtype)
        bad = _forward_sum(w, idx, off, has_off, p, has, mode == MODE_MEAN, skip_idx, _np(out))
    if bad:
        raise BadInput()
    return out, maxpos


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
