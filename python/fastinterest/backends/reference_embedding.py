"""Pure-torch embedding-bag: the oracle every other backend is tested against, and the last resort.

The backend contract (every backend module implements these two functions with the same meaning):

    forward(weight, indices, offsets, psw, mode, skip_idx) -> (out, maxpos)
        weight [V, D]; indices [N] int32/int64 (already range-checked);
        offsets [B + 1] int32/int64 (bag b = indices[offsets[b]:offsets[b+1]]) or None (bag b = {indices[b]});
        psw [N] per-sample weights or None (mode sum only); mode 0 sum, 1 mean, 2 max;
        skip_idx: a row that contributes nothing (EmbeddingBag padding_idx) or -1.
        out [B, D] in the accumulation dtype (float64 for float64 tables, else float32; empty bag -> 0);
        maxpos [B, D] int64 = position j in `indices` of each maximum (mode max; -1 empty bag), else [0].

    backward(grad_out, weight, indices, offsets, psw, maxpos, mode, skip_idx, opt, hp, s1, s2, step)
        opt OPT_SPARSE -> (rows [U] int64 ascending, values [U, D]): the coalesced gradient
        opt OPT_DENSE  -> dense gradient [V, D]
        opt OPT_SGD/ADAGRAD/ROWWISE_ADAGRAD/ADAM -> None; updates weight (and s1, s2, step) in place,
            with the formulas of torch.optim.SGD / Adagrad / FBGEMM row-wise Adagrad / SparseAdam
            (see csrc/cpu/embedding_kernels.h). Duplicate indices are summed first; rows of skip_idx
            receive nothing.
"""
from __future__ import annotations

import math

import torch

MODE_SUM, MODE_MEAN, MODE_MAX = 0, 1, 2
OPT_SPARSE, OPT_DENSE, OPT_SGD, OPT_ADAGRAD, OPT_ROWWISE_ADAGRAD, OPT_ADAM = range(6)


def acc_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def bag_ids(indices: torch.Tensor, offsets: torch.Tensor | None, B: int) -> torch.Tensor:
    """Bag number of every position."""
    if offsets is None:
        return torch.arange(indices.numel(), device=indices.device)
    sizes = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(B, device=indices.device), sizes, output_size=indices.numel())


def _kept_and_scale(indices, offsets, B, mode, skip_idx):
    idx = indices.long()
    bags = bag_ids(indices, offsets, B)
    keep = idx != skip_idx if skip_idx >= 0 else torch.ones_like(idx, dtype=torch.bool)
    counts = torch.zeros(B, dtype=torch.long, device=idx.device).index_add_(0, bags, keep.long())
    return idx, bags, keep, counts


def forward(weight, indices, offsets, psw, mode, skip_idx):
    B = indices.numel() if offsets is None else offsets.numel() - 1
    D = weight.shape[1]
    acc = acc_dtype(weight.dtype)
    idx, bags, keep, counts = _kept_and_scale(indices, offsets, B, mode, skip_idx)
    rows = weight.index_select(0, idx).to(acc)
    if mode == MODE_MAX:
        out = torch.full((B, D), -math.inf, dtype=acc, device=weight.device)
        rows_k = rows.masked_fill(~keep[:, None], -math.inf)
        out.scatter_reduce_(0, bags[:, None].expand(-1, D), rows_k, reduce="amax", include_self=True)
        # position of the first maximum per (bag, dim)
        n = idx.numel()
        is_max = (rows_k == out.index_select(0, bags)) & keep[:, None]
        pos = torch.where(is_max, torch.arange(n, device=idx.device)[:, None], torch.full_like(idx, n)[:, None])
        maxpos = torch.full((B, D), n, dtype=torch.long, device=weight.device)
        maxpos.scatter_reduce_(0, bags[:, None].expand(-1, D), pos, reduce="amin", include_self=True)
        empty = counts == 0
        out[empty] = 0
        maxpos[empty] = -1
        return out, maxpos
    if psw is not None:
        rows = rows * psw.to(acc)[:, None]
    rows = rows * keep[:, None].to(acc)
    out = torch.zeros((B, D), dtype=acc, device=weight.device).index_add_(0, bags, rows)
    if mode == MODE_MEAN:
        out = out / counts.clamp(min=1).to(acc)[:, None]
    return out, torch.empty(0, dtype=torch.long, device=weight.device)


def coalesced_grad(grad_out, indices, offsets, psw, maxpos, mode, skip_idx, V):
    """The gradient as (rows ascending, summed values)."""
    B, D = grad_out.shape
    idx, bags, keep, counts = _kept_and_scale(indices, offsets, B, mode, skip_idx)
    if mode == MODE_MAX:
        n = idx.numel()
        valid = maxpos >= 0
        pos = maxpos[valid]
        dims = torch.arange(D, device=idx.device).expand(B, D)[valid]
        vals_flat = grad_out[valid]
        per_pos = torch.zeros((n, D), dtype=grad_out.dtype, device=idx.device)
        per_pos.index_put_((pos, dims), vals_flat, accumulate=True)
    else:
        scale = keep.to(grad_out.dtype)
        if psw is not None:
            scale = scale * psw.to(grad_out.dtype)
        if mode == MODE_MEAN:
            scale = scale / counts.clamp(min=1).to(grad_out.dtype).index_select(0, bags)
        per_pos = grad_out.index_select(0, bags) * scale[:, None]
    sel = keep
    rows, inverse = torch.unique(idx[sel], sorted=True, return_inverse=True)
    vals = torch.zeros((rows.numel(), D), dtype=grad_out.dtype, device=idx.device)
    vals.index_add_(0, inverse, per_pos[sel])
    return rows, vals


def apply_update(weight, rows, g, opt, hp, s1, s2, step):
    """Applies a fused-optimizer update with the summed gradient g [U, D] of `rows` (in place)."""
    acc = g.dtype
    w = weight.index_select(0, rows).to(acc)
    if opt == OPT_SGD:
        w = w + (-hp[0]) * g
    elif opt == OPT_ADAGRAD:
        s = s1.index_select(0, rows) + g * g
        s1.index_copy_(0, rows, s)
        w = w + (-hp[0]) * (g / (s.sqrt() + hp[1]))
    elif opt == OPT_ROWWISE_ADAGRAD:
        s = s1.index_select(0, rows) + (g * g).mean(dim=1)
        s1.index_copy_(0, rows, s)
        w = w + ((-hp[0]) / (s.sqrt() + hp[1]))[:, None] * g
    elif opt == OPT_ADAM:
        step += 1
        t = int(step.item())
        lr, b1, b2, eps = hp[:4]
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        m, v = s1.index_select(0, rows), s2.index_select(0, rows)
        numer = (g - m) * (1 - b1) + m
        vsq = (g * g - v) * (1 - b2) + v
        s1.index_copy_(0, rows, numer)
        s2.index_copy_(0, rows, vsq)
        w = w + (-step_size) * (numer / (vsq.sqrt() + eps))
    else:
        raise ValueError(f"unknown optimizer code {opt}")
    weight.index_copy_(0, rows, w.to(weight.dtype))


def backward(grad_out, weight, indices, offsets, psw, maxpos, mode, skip_idx, opt, hp, s1, s2, step):
    V = weight.shape[0]
    rows, g = coalesced_grad(grad_out, indices, offsets, psw, maxpos, mode, skip_idx, V)
    if opt == OPT_SPARSE:
        return rows, g
    if opt == OPT_DENSE:
        dense = torch.zeros((V, weight.shape[1]), dtype=grad_out.dtype, device=weight.device)
        dense.index_copy_(0, rows, g)
        return dense
    apply_update(weight, rows, g, opt, hp, s1, s2, step)
    return None
