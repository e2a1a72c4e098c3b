"""Classification metrics on numpy arrays (no scikit-learn needed at run time; the tests use it as the oracle).

All functions take `y_true` in {0, 1} and either predicted labels or scores, 1-D (or anything that
flattens to 1-D). Multi-label interest prediction is scored by flattening (person, category) pairs
("micro") or per category ("macro"); see `interest_metrics` in `fastinterest.metrics.evaluate`.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy", "precision_recall_f1", "roc_auc", "gauc", "log_loss", "roc_curve", "pr_curve",
    "best_f1_threshold",
]


def _flat(a, dtype=None) -> np.ndarray:
    return np.asarray(a, dtype=dtype).reshape(-1)


def accuracy(y_true, y_pred) -> float:
    """Fraction of exact matches (element-wise over the flattened arrays)."""
    t, p = _flat(y_true), _flat(y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def _prf(tp, fp, fn):
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp, dtype=np.float64), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp, dtype=np.float64), where=(tp + fn) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return precision, recall, f1


def precision_recall_f1(y_true, y_pred, average: str = "micro") -> tuple[float, float, float]:
    """Precision, recall and F1 for binary or multi-label 0/1 predictions.

    `y_true`, `y_pred`: [N] or [N, C] 0/1 arrays.
    average="micro": pool every (row, column) decision, then compute the ratios (for 1-D input this
    is the ordinary binary precision/recall/F1 of the positive class).
    average="macro": per column (label) ratios, then their unweighted mean over columns; a column with
    no true and no predicted positive scores 0 (scikit-learn's `zero_division=0`).
    """
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if average == "micro":
        tp, fp, fn = (np.array(float(np.sum(x))) for x in (t & p, ~t & p, t & ~p))
        pr, rc, f1 = _prf(tp, fp, fn)
        return float(pr), float(rc), float(f1)
    if average == "macro":
        if t.ndim == 1:
            t, p = t[:, None], p[:, None]
        tp = (t & p).sum(0).astype(np.float64)
        fp = (~t & p).sum(0).astype(np.float64)
        fn = (t & ~p).sum(0).astype(np.float64)
        pr, rc, f1 = _prf(tp, fp, fn)
        return float(pr.mean()), float(rc.mean()), float(f1.mean())
    raise ValueError(f"average must be 'micro' or 'macro', not {average!r}")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing the average rank (as scipy.stats.rankdata(method='average'))."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction). NaN when only one class is present."""
    t = _flat(y_true).astype(bool)
    s = _flat(y_score, np.float64)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(y_true, y_score, groups, weights: str = "count") -> float:
    """Group AUC (Zhou et al., DIN, KDD 2018): the AUC inside each group (e.g. a person), averaged.

    Groups with a single class are skipped. weights="count" weights each group by its number of
    samples (the DIN definition, "impressions"); weights="uniform" gives each group equal weight.
    Returns NaN when no group has both classes.
    """
    t = _flat(y_true).astype(bool)
    s = _flat(y_score, np.float64)
    g = _flat(groups)
    order = np.argsort(g, kind="mergesort")
    t, s, g = t[order], s[order], g[order]
    bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    total, weight = 0.0, 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        tt = t[lo:hi]
        if tt.all() or not tt.any():
            continue
        w = float(hi - lo) if weights == "count" else 1.0
        total += w * roc_auc(tt, s[lo:hi])
        weight += w
    return total / weight if weight else float("nan")


def log_loss(y_true, y_prob, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps]."""
    t = _flat(y_true, np.float64)
    p = np.clip(_flat(y_prob, np.float64), eps, 1 - eps)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log1p(-p)))


def _binary_clf_curve(y_true, y_score):
    """False/true positive counts at each distinct score threshold, highest threshold first."""
    t = _flat(y_true).astype(np.float64)
    s = _flat(y_score, np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(t)[last]
    fps = (last + 1) - tps
    return fps, tps, s[last]


def roc_curve(y_true, y_score):
    """(fpr, tpr, thresholds), starting at (0, 0); for plots."""
    fps, tps, thr = _binary_clf_curve(y_true, y_score)
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.zeros_like(fps)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.zeros_like(tps)
    return fpr, tpr, np.r_[np.inf, thr]


def pr_curve(y_true, y_score):
    """(precision, recall, thresholds) with recall increasing; for plots and threshold choice."""
    fps, tps, thr = _binary_clf_curve(y_true, y_score)
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / tps[-1] if tps[-1] > 0 else np.zeros_like(tps)
    return precision, recall, thr


def best_f1_threshold(y_true, y_score) -> float:
    """The score threshold (predict positive when score >= threshold) that maximises F1 on this data.

    Used to pick a decision threshold on the validation split, then applied unchanged to the test split,
    so that methods whose scores are not calibrated probabilities (baselines) are treated fairly.
    """
    precision, recall, thr = pr_curve(y_true, y_score)
    if thr.size == 0:
        return 0.5
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thr[int(np.argmax(f1))])
