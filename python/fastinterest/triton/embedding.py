"""Triton embedding-bag backend: same contract as backends/reference_embedding.py.

The forward runs BLOCK_B bags per program; the backward groups positions by row with torch's stable
sort (deterministic), then one kernel sums each row's gradient in position order and applies the
fused update. On CPU this runs only under TRITON_INTERPRET=1 (tests): there every program instance
costs milliseconds, so blocks are large.
"""
from __future__ import annotations

import math

import torch
import triton

from ..backends.reference_embedding import (MODE_MAX, MODE_MEAN, OPT_ADAM, OPT_DENSE, OPT_SPARSE, acc_dtype,
                                            bag_ids)
from .embedding_kernels import bag_backward_kernel, bag_forward_kernel


def _blocks(n_items: int, device: torch.device, gpu_block: int) -> int:
    if device.type == "cpu":  # interpreter: few, fat programs
        return max(16, min(1024, triton.next_power_of_2(max(1, n_items))))
    return gpu_block


def _offsets(indices, offsets):
    if offsets is None:
        return torch.arange(indices.numel() + 1, device=indices.device, dtype=torch.long)
    return offsets


def forward(weight, indices, offsets, psw, mode, skip_idx):
    V, D = weight.shape
    off = _offsets(indices, offsets)
    B = off.numel() - 1
    acc = acc_dtype(weight.dtype)
    out = torch.empty((B, D), dtype=acc, device=weight.device)
    maxpos = torch.empty((B, D) if mode == MODE_MAX else (0,), dtype=torch.long, device=weight.device)
    if B == 0:
        return out, maxpos
    max_len = int((off[1:] - off[:-1]).max()) if B else 0
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_B = _blocks(B, weight.device, max(1, 4096 // BLOCK_D))
    grid = (triton.cdiv(B, BLOCK_B),)
    bag_forward_kernel[grid](weight, indices, off, psw if psw is not None else out, out,
                             maxpos if mode == MODE_MAX else out, B, D, max_len, skip_idx,
                             HAS_PSW=psw is not None, MODE=mode, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
    return out, maxpos


def backward(grad_out, weight, indices, offsets, psw, maxpos, mode, skip_idx, opt, hp, s1, s2, step):
    V, D = weight.shape
    dev = weight.device
    off = _offsets(indices, offsets)
    B = off.numel() - 1
    idx = indices.long()
    keep = idx != skip_idx
    pos = keep.nonzero().squeeze(1)
    order = torch.sort(idx[pos], stable=True).indices
    spos = pos[order]
    rows, counts = torch.unique_consecutive(idx[spos], return_counts=True)
    U = rows.numel()
    seg = torch.zeros(U + 1, dtype=torch.long, device=dev)
    seg[1:] = counts.cumsum(0)
    bags = bag_ids(indices, off, B)
    scale = keep.to(grad_out.dtype)
    if psw is not None:
        scale = scale * psw
    if mode == MODE_MEAN:
        cnt = torch.zeros(B, dtype=grad_out.dtype, device=dev).index_add_(0, bags, keep.to(grad_out.dtype))
        scale = scale / cnt.clamp(min=1).index_select(0, bags)
    vals = torch.empty((U, D) if opt == OPT_SPARSE else (0,), dtype=grad_out.dtype, device=dev)
    dense = torch.zeros((V, D), dtype=grad_out.dtype, device=dev) if opt == OPT_DENSE else vals
    h = list(hp) + [0.0] * (4 - len(hp))
    if opt == OPT_ADAM:
        step += 1
        t = int(step.item())
        h[0] = hp[0] * math.sqrt(1 - hp[2] ** t) / (1 - hp[1] ** t)
    if U:
        BLOCK_D = triton.next_power_of_2(D)
        BLOCK_U = _blocks(U, dev, max(1, 4096 // BLOCK_D))
        max_seg = int(counts.max())
        dummy = grad_out
        bag_backward_kernel[(triton.cdiv(U, BLOCK_U),)](
            grad_out, weight, seg, spos, bags, scale, maxpos if mode == MODE_MAX else dummy, rows, vals, dense,
            s1 if s1 is not None else dummy, s2 if s2 is not None else dummy, U, D, max_seg,
            float(h[0]), float(h[1]), float(h[2]), float(h[3]), MODE=mode, OPT=opt, BLOCK_U=BLOCK_U, BLOCK_D=BLOCK_D)
    if opt == OPT_SPARSE:
        return rows, vals
    if opt == OPT_DENSE:
        return dense
    return None
