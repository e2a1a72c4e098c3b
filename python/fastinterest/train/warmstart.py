"""Warm start: fit the frequency baselines' few parameters on the training split, then start the model
from them (`InterestModel.warm_start`).

* interest: logistic regression of "category c is in the label window" on the share of c in the
  history: logit = a * share + b (all (row, category) pairs of up to `max_rows` training rows);
* items: logistic regression of "item j is the next item" (target vs uniformly sampled negatives) on
  log(1 + occurrences of j in the history) and log(1 + training count of j): logit = r * log(1 + n_j) +
  p * log(1 + count_j) + c, giving the repeat weight r and a popularity item bias p * log(1 + count_j) + c.

Each is a 2- or 3-parameter model fitted with Newton's method (a small ridge keeps it defined when a
feature is constant). The data decides the signs: on the synthetic data the share predicts the next
categories (a > 0); on Amazon Food-Kitchen the next event tends to switch domain (a < 0).
"""
from __future__ import annotations

import numpy as np

__all__ = ["fit_logistic", "fit_warm_start"]


def fit_logistic(X: np.ndarray, y: np.ndarray, iters: int = 25, ridge: float = 1e-4, offset=None) -> np.ndarray:
    """Weights of logistic regression (last column of X is the intercept if the caller adds one);
    `offset` [n]: a fixed term added to every logit (its coefficient is not fitted)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    off = 0.0 if offset is None else np.asarray(offset, dtype=np.float64)
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        z = np.clip(X @ w + off, -30, 30)
        p = 1.0 / (1.0 + np.exp(-z))
        g = X.T @ (p - y) / len(y) + ridge * w
        H = (X * (p * (1 - p))[:, None]).T @ X / len(y) + ridge * np.eye(X.shape[1])
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _shares(cat: np.ndarray, lengths: np.ndarray, C: int) -> np.ndarray:
    N, T = cat.shape
    valid = (np.arange(T)[None, :] < lengths[:, None]) & (cat >= 2)
    share = np.zeros((N, C))
    np.add.at(share, (np.repeat(np.arange(N), T), cat.reshape(-1)), valid.reshape(-1).astype(np.float64))
    return share / np.maximum(valid.sum(1, keepdims=True), 1)


def fit_warm_start(train, n_items: int, n_categories: int, *, max_rows: int = 4000, negatives: int = 20,
                   seed: int = 0, min_share_gain: float = 0.0) -> dict:
    """{"share_gain", "interest_bias", "repeat_weight", "item_bias" [V], "fitted_share_gain"} fitted on the
    training split. With `min_share_gain`, a fitted gain in [0, min_share_gain) is raised to it and the bias
    refitted for that gain, so the sharper start stays as calibrated as it can be. A negative fitted gain is kept:
    raised to -20 it claims that a category with half of the history's events has odds of e^-10 (on Amazon
    Food-Kitchen, gain -20 with the fitted bias +0.34 started at an interest loss of 1.8 instead of 0.69, 3.1 even
    with the bias refitted, and the large corrective gradients went into the LSTM)."""
    rng = np.random.default_rng(seed)
    n = len(train)
    rows = rng.choice(n, size=min(n, max_rows), replace=False) if n else np.zeros(0, np.int64)
    lengths = np.asarray(train.lengths)[rows]
    has = lengths > 0
    rows, lengths = rows[has], lengths[has]
    out = {"share_gain": 0.0, "interest_bias": 0.0, "repeat_weight": 0.0, "item_bias": np.zeros(n_items),
           "fitted_share_gain": 0.0}
    if rows.size == 0:
        return out
    # interest
    share = _shares(np.asarray(train.category)[rows], lengths, n_categories)[:, 2:]
    y = np.asarray(train.target_categories)[rows][:, 2:] > 0.5
    a, b = fit_logistic(np.stack([share.reshape(-1), np.ones(share.size)], 1), y.reshape(-1))
    out["fitted_share_gain"] = float(a)
    if 0 <= a < min_share_gain:
        a = float(min_share_gain)
        (b,) = fit_logistic(np.ones((share.size, 1)), y.reshape(-1), offset=a * share.reshape(-1))
    out["share_gain"], out["interest_bias"] = float(a), float(b)
    # items
    items_all = np.asarray(train.item)
    counts = np.bincount(np.r_[items_all[items_all >= 2], np.asarray(train.target_item)], minlength=n_items)[:n_items]
    counts[:2] = 0
    logpop = np.log1p(counts.astype(np.float64))
    items = items_all[rows]
    T = items.shape[1]
    valid = (np.arange(T)[None, :] < lengths[:, None]) & (items >= 2)
    target = np.asarray(train.target_item)[rows]
    cand = np.concatenate([target[:, None], rng.integers(2, max(3, n_items), size=(rows.size, negatives))], 1)
    occ = ((items[:, None, :] == cand[:, :, None]) & valid[:, None, :]).sum(2)
    label = np.zeros(cand.shape, dtype=bool)
    label[:, 0] = True
    X = np.stack([np.log1p(occ).reshape(-1), logpop[cand].reshape(-1), np.ones(cand.size)], 1)
    r, p, c = fit_logistic(X, label.reshape(-1))
    out["repeat_weight"] = float(r)
    bias = p * logpop + c
    bias[:2] = c
    out["item_bias"] = bias
    return out
