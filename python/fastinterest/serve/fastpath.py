"""The bookkeeping of `Session.append` for one event per person, compiled (numba) when numba is installed.

An append of one event per person does little arithmetic besides the LSTM step: copy the persons' states
out of the state arrays, slide their windows, count the categories of the windows, write the results
back. In numpy that is some forty array calls per batch, each costing about a microsecond whatever its
size, and even one compiled call costs a few microseconds just to check its arguments; so the work
before the step is one call and the work after it another (the same contracts as the numpy functions
here, which are the reference and the fallback):

    prepare(h, c, window, n_events, rows, table, num_categories, share, h0, c0, win, n1, user)
        # state rows -> step inputs h0, c0 [L, B, H]; the windows slid by the new events (win), the new
        # counts n1 and the category shares user[:, H:] (the part of the user vector the step does not give)
    publish(h, c, window, n_events, last_seq, user, stale, rows, h1, c1, win, n1, first, user1) -> rows written
        # user1[:, :H] = the step's top layer h1[L - 1], then every row written back with last_seq = first + b,
        # the log position of its event (a row whose stored last_seq is already >= that holds a newer state of
        # that person, pulled from another process: kept)

and, for `Session.interests`, the interest head and the top k in one call (compiled only: its numpy form
is `Session._interest_probs` + `_top_k`, against which Session checks it at load):

    head_topk(user, rows, wt, b, idx, val)  # user[rows] [n, U] @ wt [U, C] + b [C] -> sigmoid -> ids 0, 1
                                            # (pad, unk) last -> the k = idx.shape[1] best per row, ties by
                                            # lower id (rows: straight from the state arrays, no copy first)

Shapes: the state arrays are those of `PersonStates` (h, c [P, L, H] float32, window [P, 4, W] int32,
n_events and last_seq [P] int64, user [P, U] float32, stale [P] bool); rows [B] int64 (distinct);
h0, c0, h1, c1 [L, B, H] float32 (the LSTM kernels' layout); win [B, 4, W] int32; table [B, 5] int64
(item, category, action, platform, timestamp of each person's new event); n1 [B] int64; first an int;
user [B, U] float32.

`NUMPY` holds prepare and publish in numpy (the reference); `implementation()` the ones to use: the
compiled ones when numba is importable and not switched off with FASTINTEREST_SERVE_NUMBA=0, else NUMPY.
`Session` checks the compiled ones against NUMPY at load and falls back to NUMPY, with a warning, when
they differ. Compiled functions are cached on disk (numba's cache), so only the first load of a fresh
install compiles them (seconds).
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
    """One implementation of prepare and publish (see the module docstring)."""

    def __init__(self, name: str, prepare, publish):
        self.name, self.prepare, self.publish = name, prepare, publish

    def __repr__(self) -> str:
        return f"fastpath.Functions({self.name!r})"


# ---------------------------------------------------------------------------- numpy: the reference
def _prepare_np(h, c, window, n_events, rows, table, num_categories, share, h0, c0, win, n1, user):
    h0[...] = h[rows].transpose(1, 0, 2)
    c0[...] = c[rows].transpose(1, 0, 2)
    win[...] = window[rows]
    n0 = n_events[rows]
    B, _, W = win.shape
    H = h.shape[2]
    full = n0 >= W
    if full.any():
        win[full, :, :-1] = win[full, :, 1:]
    win[np.arange(B), :, np.minimum(n0, W - 1)] = table[:, :4]
    n1[...] = n0 + 1
    if share:
        cats = win[:, 1]
        counted = (np.arange(W)[None, :] < np.minimum(n1, W)[:, None]) & (cats >= 2)
        idx = np.nonzero(counted)[0]
        counts = np.bincount(idx * num_categories + cats[counted], minlength=B * num_categories)
        counts = counts.reshape(B, num_categories).astype(np.float32)
        user[:, H:] = counts / np.maximum(counted.sum(1, keepdims=True), 1).astype(np.float32)


def _publish_np(h, c, window, n_events, last_seq, user, stale, rows, h1, c1, win, n1, first, user1):
    user1[:, : h1.shape[2]] = h1[-1]
    seq = first + np.arange(len(rows), dtype=np.int64)
    newer = seq > last_seq[rows]
    if not newer.all():
        rows, h1, c1, win, n1, seq, user1 = (rows[newer], h1[:, newer], c1[:, newer], win[newer], n1[newer],
                                             seq[newer], user1[newer])
    h[rows], c[rows] = h1.transpose(1, 0, 2), c1.transpose(1, 0, 2)
    window[rows], n_events[rows], last_seq[rows], user[rows] = win, n1, seq, user1
    stale[rows] = True
    return len(rows)


NUMPY = Functions("numpy", _prepare_np, _publish_np)


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)

    @_jit
    def prepare(h, c, window, n_events, rows, table, num_categories, share, h0, c0, win, n1,
                user):  # pragma: no cover - compiled
        L, H = h.shape[1], h.shape[2]
        B, _, W = win.shape
        counts = np.zeros(num_categories, np.int64)
        for b in range(B):
            r = rows[b]
            for layer in range(L):
                h0[layer, b, :] = h[r, layer, :]
                c0[layer, b, :] = c[r, layer, :]
            n = n_events[r]
            pos = n
            if n >= W:  # a full window: drop the oldest event
                for j in range(4):
                    win[b, j, : W - 1] = window[r, j, 1:]
                pos = W - 1
            else:
                win[b] = window[r]
            for j in range(4):
                win[b, j, pos] = table[b, j]
            n1[b] = n + 1
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
    def publish(h, c, window, n_events, last_seq, user, stale, rows, h1, c1, win, n1, first,
                user1):  # pragma: no cover - compiled
        L, H = h.shape[1], h.shape[2]
        written = 0
        for b in range(rows.shape[0]):
            user1[b, :H] = h1[L - 1, b, :]
            r = rows[b]
            seq = first + b
            if seq <= last_seq[r]:  # a newer state of this person (pulled from another process) wins
                continue
            for layer in range(L):
                h[r, layer, :] = h1[layer, b, :]
                c[r, layer, :] = c1[layer, b, :]
            window[r] = win[b]
            n_events[r] = n1[b]
            last_seq[r] = seq
            user[r] = user1[b]
            stale[r] = True
            written += 1
        return written

    @_jit
    def head_topk(user, rows, wt, b, idx, val):  # pragma: no cover - compiled
        n, k, C = rows.shape[0], idx.shape[1], wt.shape[1]
        if n == 0:
            return
        sub = np.empty((n, user.shape[1]), user.dtype)
        for i in range(n):
            sub[i] = user[rows[i]]
        z = np.dot(sub, wt)   # [n, C] (BLAS)
        one = np.float32(1.0)
        for i in range(n):
            row = z[i]
            for j in range(C):
                row[j] = one / (one + np.exp(-(row[j] + b[j])))
            for j in range(min(2, C)):
                row[j] = -np.inf
            # the k best, best first, by insertion in id order: an id goes before a kept one only if its value is
            # greater, or the kept one is NaN and it is not; so ties stay in id order and NaN comes last, as in a
            # stable sort (k * C comparisons at most, usually about C)
            count = 0
            for j in range(C):
                v = row[j]
                pos = count
                while pos > 0 and (v > val[i, pos - 1] or (val[i, pos - 1] != val[i, pos - 1] and v == v)):
                    pos -= 1
                if pos >= k:
                    continue
                last = min(count, k - 1)
                for t in range(last, pos, -1):
                    idx[i, t] = idx[i, t - 1]
                    val[i, t] = val[i, t - 1]
                idx[i, pos] = j
                val[i, pos] = v
                if count < k:
                    count += 1


def compiled() -> Functions | None:
    """The numba functions, or None (numba missing, or FASTINTEREST_SERVE_NUMBA=0)."""
    if numba is None or os.environ.get("FASTINTEREST_SERVE_NUMBA", "1") == "0":
        return None
    return Functions("numba", prepare, publish)


def compiled_head_topk():
    """The compiled `head_topk`, or None (numba missing, or FASTINTEREST_SERVE_NUMBA=0)."""
    if numba is None or os.environ.get("FASTINTEREST_SERVE_NUMBA", "1") == "0":
        return None
    return head_topk


def implementation() -> Functions:
    return compiled() or NUMPY
