"""GloVe (Pennington, Socher & Manning, EMNLP 2014) on behaviour sequences.

1. Co-occurrence counts: for every pair of ids at distance d <= window inside a sequence,
   X[i, j] += 1/d and X[j, i] += 1/d (the paper's distance weighting, symmetric context).
2. Weighted least squares over the non-zero entries:
       J = sum_ij f(X_ij) (w_i . w~_j + b_i + b~_j - log X_ij)^2,   f(x) = min(1, (x / x_max)^alpha)
   with x_max = 100 and alpha = 3/4 as in the paper, trained with AdaGrad on mini-batches of entries.
3. The vectors are w + w~ (the paper's choice).

The four tables (w, w~, b, b~) are `fastinterest.nn.Embedding`s with a fused AdaGrad
(`fastinterest.optim.FusedAdagrad`): the backward pass updates only the touched rows in place, no
optimizer.step(), no dense gradient. While those are not importable, the same maths runs on
`torch.nn.Embedding(sparse=True)` + `torch.optim.Adagrad`; `train_glove` reports which one ran.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["cooccurrence", "glove_weight", "train_glove"]


def cooccurrence(sequences, vocab_size: int, window: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values): the non-zero entries of the symmetric distance-weighted co-occurrence
    matrix; ids < 2 (pad, unk) are ignored."""
    keys, vals = [], []
    for s in sequences:
        s = np.asarray(s, dtype=np.int64)
        for d in range(1, min(window, len(s) - 1) + 1):
            a, b = s[:-d], s[d:]
            ok = (a >= 2) & (b >= 2)
            a, b = a[ok], b[ok]
            w = np.full(a.size, 1.0 / d)
            keys += [a * vocab_size + b, b * vocab_size + a]
            vals += [w, w]
    if not keys:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0)
    k, v = np.concatenate(keys), np.concatenate(vals)
    uniq, inv = np.unique(k, return_inverse=True)
    total = np.bincount(inv, weights=v)
    return uniq // vocab_size, uniq % vocab_size, total


def glove_weight(x, x_max: float = 100.0, alpha: float = 0.75):
    return torch.clamp((x / x_max) ** alpha, max=1.0)


def _tables(vocab_size: int, dim: int, lr: float, use_fastinterest: bool):
    """Four embedding tables (w, w~, b, b~) and the optimizer to step (None with fused updates)."""
    g = torch.Generator().manual_seed(0)

    def init(rows, cols):
        return (torch.rand(rows, cols, generator=g) - 0.5) / cols

    if use_fastinterest:
        try:
            from fastinterest.nn import Embedding
            from fastinterest.optim import FusedAdagrad

            tabs = [Embedding(vocab_size, d, _weight=init(vocab_size, d),
                              fused_optimizer=FusedAdagrad(lr=lr, eps=1e-8)) for d in (dim, dim, 1, 1)]
            return tabs, None, "fastinterest.nn.Embedding + FusedAdagrad"
        except (ImportError, AttributeError, RuntimeError):
            pass
    tabs = [torch.nn.Embedding(vocab_size, d, sparse=True, _weight=init(vocab_size, d)) for d in (dim, dim, 1, 1)]
    opt = torch.optim.Adagrad([p for t in tabs for p in t.parameters()], lr=lr, eps=1e-8)
    return tabs, opt, "torch.nn.Embedding(sparse=True) + torch.optim.Adagrad"


def train_glove(sequences, vocab_size: int, dim: int = 64, *, window: int = 5, epochs: int = 25,
                lr: float = 0.05, batch_size: int = 4096, x_max: float = 100.0, alpha: float = 0.75,
                seed: int = 0, use_fastinterest: bool = True, return_info: bool = False):
    """Train GloVe on id sequences; returns [vocab_size, dim] float32 vectors (w + w~; zero rows for ids
    that never co-occur), and with return_info=True also {"implementation", "losses", "pairs"}."""
    rows, cols, vals = cooccurrence(sequences, vocab_size, window)
    out = np.zeros((vocab_size, dim), dtype=np.float32)
    info = {"implementation": None, "losses": [], "pairs": int(rows.size)}
    if rows.size == 0:
        return (out, info) if return_info else out
    torch.manual_seed(seed)
    (w, wt, b, bt), opt, info["implementation"] = _tables(vocab_size, dim, lr, use_fastinterest)
    i_all = torch.as_tensor(rows)
    j_all = torch.as_tensor(cols)
    x_all = torch.as_tensor(vals, dtype=torch.float32)
    logx_all, f_all = torch.log(x_all), glove_weight(x_all, x_max, alpha)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(rows.size, generator=g)
        total = 0.0
        for lo in range(0, rows.size, batch_size):
            idx = perm[lo:lo + batch_size]
            i, j = i_all[idx], j_all[idx]
            pred = (w(i) * wt(j)).sum(1) + b(i).squeeze(1) + bt(j).squeeze(1)
            loss = 0.5 * (f_all[idx] * (pred - logx_all[idx]) ** 2).sum()
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if opt is not None:
                opt.step()
            total += float(loss.detach())
        info["losses"].append(total / rows.size)
    with torch.no_grad():
        vec = (w.weight + wt.weight).float().numpy()
    seen = np.zeros(vocab_size, dtype=bool)
    seen[rows] = True
    out[seen] = vec[seen]
    return (out, info) if return_info else out
