"""The bookkeeping of `Session.append` for one event per person, compiled (numba) when numba is installed.

An append of one event per person does little arithmetic besides the LSTM step: copy the persons' states
out of the state arrays, slide their windows, count the categories of the windows, write the results
back. In numpy that is some forty array calls per batch, each costing about a microsecond whatever its
size, so for a few persons they cost several times the step itself. Here each stage is one compiled
call over plain arrays (the same contracts as the numpy code in `Session`, which stays the reference and
the fallback):

    gather(h, c, window, n_events, rows, h0, c0, win0, n0)      # state rows -> step layout
    slide_and_user(h_top, win, n0, table, num_categories, share, n1, user)
    scatter(h, c, window, n_events, last_seq, user, stale, rows, h1, c1, win, n1, seq, user1) -> rows written

and, for `Session.interests`, the interest head and the top k in one call (compiled only: its numpy form
is `Session._interest_probs` + `_top_k`, against which Session checks it at load):

    head_topk(user, wt, b, idx, val)    # user [n, U] @ wt [U, C] + b [C] -> sigmoid -> ids 0, 1 (pad, unk)
                                        # last -> the k = idx.shape[1] best per row, ties by lower id

Shapes: the state arrays are those of `PersonStates` (h, c [P, L, H] float32, window [P, 4, W] int32,
n_events and last_seq [P] int64, user [P, U] float32, stale [P] bool); rows [B] int64 (distinct);
h0, c0, h1, c1 [L, B, H] float32 (the LSTM kernels' layout); win [B, 4, W] int32; table [B, 5] int64
(item, category, action, platform, timestamp of each person's new event); user [B, U] float32.

`NUMPY` holds the same three functions in numpy (the reference); `implementation()` the ones to use:
the compiled ones when numba is importable and not switched off with FASTINTEREST_SERVE_NUMBA=0, else
NUMPY. `Session` checks the compiled ones against NUMPY at load and falls back to NUMPY, with a
warning, when they differ. Compiled functions are cached on disk (numba's cache), so only the first
load of a fresh install compiles them (seconds).
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["NUMPY", "Functions", "compiled", "compiled_head_topk", "implementation"]

try:  # optional: without numba, Session uses its numpy code
    import numba
except ImportError:  # pragma: no cover - depends on the environment
    numba = None


class Functions:
    """One implementation of the three functions (see the module docstring)."""

    def __init__(self, name: str, gather, slide_and_user, scatter):
        self.name, self.gather, self.slide_and_user, self.scatter = name, gather, slide_and_user, scatter

    def __repr__(self) -> str:
        return f"fastpath.Functions({self.name!r})"


# ---------------------------------------------------------------------------- numpy: the reference
def _gather_np(h, c, window, n_events, rows, h0, c0, win0, n0):
    h0[...] = h[rows].transpose(1, 0, 2)
    c0[...] = c[rows].transpose(1, 0, 2)
    win0[...] = window[rows]
    n0[...] = n_events[rows]


def _slide_and_user_np(h_top, win, n0, table, num_categories, share, n1, user):
    B, _, W = win.shape
    H = h_top.shape[1]
    full = n0 >= W
    if full.any():
        win[full, :, :-1] = win[full, :, 1:]
    win[np.arange(B), :, np.minimum(n0, W - 1)] = table[:, :4]
    n1[...] = n0 + 1
    user[:, :H] = h_top
    if share:
        cats = win[:, 1]
        counted = (np.arange(W)[None, :] < np.minimum(n1, W)[:, None]) & (cats >= 2)
        rows = np.nonzero(counted)[0]
        counts = np.bincount(rows * num_categories + cats[counted], minlength=B * num_categories)
        counts = counts.reshape(B, num_categories).astype(np.float32)
        user[:, H:] = counts / np.maximum(counted.sum(1, keepdims=True), 1).astype(np.float32)


def _scatter_np(h, c, window, n_events, last_seq, user, stale, rows, h1, c1, win, n1, seq, user1):
    newer = seq > last_seq[rows]
    if not newer.all():
        rows, h1, c1, win, n1, seq, user1 = (rows[newer], h1[:, newer], c1[:, newer], win[newer], n1[newer],
                                             seq[newer], user1[newer])
    h[rows], c[rows] = h1.transpose(1, 0, 2), c1.transpose(1, 0, 2)
    window[rows], n_events[rows], last_seq[rows], user[rows] = win, n1, seq, user1
    stale[rows] = True
    return len(rows)


NUMPY = Functions("numpy", _gather_np, _slide_and_user_np, _scatter_np)


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)

    @_jit
    def gather(h, c, window, n_events, rows, h0, c0, win0, n0):  # pragma: no cover - compiled
        L = h.shape[1]
        for b in range(rows.shape[0]):
            r = rows[b]
            for layer in range(L):
                h0[layer, b, :] = h[r, layer, :]
                c0[layer, b, :] = c[r, layer, :]
            win0[b] = window[r]
            n0[b] = n_events[r]

    @_jit
    def slide_and_user(h_top, win, n0, table, num_categories, share, n1, user):  # pragma: no cover - compiled
        B, _, W = win.shape
        H = h_top.shape[1]
        counts = np.zeros(num_categories, np.int64)
        for b in range(B):
            n = n0[b]
            pos = n
            if n >= W:  # a full window: drop the oldest event
                for j in range(4):
                    for t in range(W - 1):
                        win[b, j, t] = win[b, j, t + 1]
                pos = W - 1
            for j in range(4):
                win[b, j, pos] = table[b, j]
            n1[b] = n + 1
            user[b, :H] = h_top[b]
            if share:  # the share of the window's events per category (pad and unk, ids < 2, not counted)
                counts[:] = 0
                total = 0
                for t in range(min(n + 1, W)):
                    k = win[b, 1, t]
                    if k >= 2:
                        counts[k] += 1
                        total += 1
                denom = np.float32(max(total, 1))
                for k in range(num_categories):
                    user[b, H + k] = np.float32(counts[k]) / denom

    @_jit
    def scatter(h, c, window, n_events, last_seq, user, stale, rows, h1, c1, win, n1, seq,
                user1):  # pragma: no cover - compiled
        L = h.shape[1]
        written = 0
        for b in range(rows.shape[0]):
            r = rows[b]
            if seq[b] <= last_seq[r]:  # a newer state of this person (pulled from another process) wins
                continue
            for layer in range(L):
                h[r, layer, :] = h1[layer, b, :]
                c[r, layer, :] = c1[layer, b, :]
            window[r] = win[b]
            n_events[r] = n1[b]
            last_seq[r] = seq[b]
            user[r] = user1[b]
            stale[r] = True
            written += 1
        return written

    @_jit
    def head_topk(user, wt, b, idx, val):  # pragma: no cover - compiled
        if user.shape[0] == 0:
            return
        C = wt.shape[1]
        z = np.dot(user, wt)   # [n, C] (BLAS)
        one = np.float32(1.0)
        taken = np.zeros(C, np.bool_)
        for i in range(z.shape[0]):
            row = z[i]
            for j in range(C):
                row[j] = one / (one + np.exp(-(row[j] + b[j])))
            for j in range(min(2, C)):
                row[j] = -np.inf
            taken[:] = False
            for t in range(idx.shape[1]):   # the k best by selection: ties by lower id, NaN last (a stable sort)
                best = -1
                for j in range(C):
                    if taken[j]:
                        continue
                    if best < 0 or row[j] > row[best] or (row[best] != row[best] and row[j] == row[j]):
                        best = j
                taken[best] = True
                idx[i, t] = best
                val[i, t] = row[best]


def compiled() -> Functions | None:
    """The numba functions, or None (numba missing, or FASTINTEREST_SERVE_NUMBA=0)."""
    if numba is None or os.environ.get("FASTINTEREST_SERVE_NUMBA", "1") == "0":
        return None
    return Functions("numba", gather, slide_and_user, scatter)


def compiled_head_topk():
    """The compiled `head_topk`, or None (numba missing, or FASTINTEREST_SERVE_NUMBA=0)."""
    if numba is None or os.environ.get("FASTINTEREST_SERVE_NUMBA", "1") == "0":
        return None
    return head_topk


def implementation() -> Functions:
    return compiled() or NUMPY
