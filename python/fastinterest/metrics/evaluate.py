"""One evaluation protocol for every scorer (trained models and baselines alike).

A *scorer* is any object with
    name: str
    category_scores(batch) -> [N, C] array   (interest strength per category; probabilities for models)
    item_scores(batch)     -> [N, V] array or torch tensor (next-item scores)
and `evaluate_scorer` computes, on one split (a `SequenceBatch`):

* interest (multi-label over categories, pad/unk columns dropped): `auc` (micro: all (person, category)
  pairs pooled), `auc_macro` (mean per-category AUC), `gauc` (per-person AUC weighted by #categories, DIN),
  `log_loss`, and at a decision threshold chosen on the validation split to maximise micro F1:
  `accuracy`, `precision`, `recall`, `f1` (micro) and `precision_macro`, `recall_macro`, `f1_macro`
  (per category);
* next item, full ranking over the whole vocabulary: `hr@K`, `ndcg@K`, `mrr`
  (seen items excluded only when `exclude_seen=True`; the target itself always competes);
* next item, sampled protocol (labelled): `sampled<n>_hr@K`, ... and `click_auc_sampled<n>`, the AUC of
  the target against the sampled negatives (the (person, candidate) click-probability view);
* `per_platform`: the interest AUC and NDCG@K per platform of the person's last observed event.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .classification import accuracy, best_f1_threshold, gauc, log_loss, precision_recall_f1, roc_auc
from .ranking import RankAccumulator, metrics_from_ranks, sample_negatives, sampled_ranking_metrics, seen_mask

__all__ = ["Scorer", "evaluate_scorer", "interest_arrays", "INVALID_IDS"]

INVALID_IDS = (0, 1)  # <pad>, <unk>: never a label, never a recommendation


class Scorer(Protocol):
    name: str

    def category_scores(self, batch) -> np.ndarray: ...

    def item_scores(self, batch): ...


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield np.arange(lo, min(n, lo + size))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


def interest_arrays(scorer, batch, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(y_true [N, C'], scores [N, C']) with the pad/unk category columns removed."""
    parts = [_to_numpy(scorer.category_scores(batch.subset(idx))).astype(np.float32) for idx in
             _chunks(len(batch), chunk)]
    C = np.asarray(batch.target_categories).shape[1]
    scores = np.concatenate(parts) if parts else np.zeros((0, C), np.float32)
    keep = np.ones(C, dtype=bool)
    keep[list(INVALID_IDS)] = False
    return np.asarray(batch.target_categories)[:, keep] > 0.5, scores[:, keep]


def _macro_auc(y: np.ndarray, s: np.ndarray) -> float:
    aucs = [roc_auc(y[:, c], s[:, c]) for c in range(y.shape[1]) if 0 < y[:, c].sum() < y.shape[0]]
    return float(np.mean(aucs)) if aucs else float("nan")


def _last_platform(batch) -> np.ndarray:
    if hasattr(batch, "target_platform"):
        return np.asarray(batch.target_platform)
    lengths = np.asarray(batch.lengths)
    rows = np.arange(len(lengths))
    return np.where(lengths > 0, np.asarray(batch.platform)[rows, np.maximum(lengths - 1, 0)], 0)


def evaluate_scorer(scorer, test, valid=None, *, ks=(10,), exclude_seen: bool = False, chunk: int = 128,
                    num_sampled: int = 100, seed: int = 0, platform_names=None, keep_curves: bool = False,
                    threshold: float | None = None) -> dict:
    """All metrics of `scorer` on the `test` split (see the module docstring for the keys).

    valid: the validation split, used only to choose the interest decision threshold (when `threshold`
    is not given); without either, the threshold is 0.5.
    platform_names: list mapping platform ids to names (the vocabulary), for `per_platform`.
    keep_curves: also return `_curve_true` / `_curve_score` (flattened interest labels and scores) for plots.
    """
    out: dict = {"scorer": getattr(scorer, "name", type(scorer).__name__), "n_rows": len(test)}

    # ---- interests
    y, s = interest_arrays(scorer, test)
    if threshold is None:
        if valid is not None and len(valid):
            vy, vs = interest_arrays(scorer, valid)
            threshold = best_f1_threshold(vy, vs)
        else:
            threshold = 0.5
    pred = s >= threshold
    out["auc"] = roc_auc(y, s)
    out["auc_macro"] = _macro_auc(y, s)
    groups = np.repeat(np.arange(y.shape[0]), y.shape[1])
    out["gauc"] = gauc(y, s, groups)
    out["log_loss"] = log_loss(y, s) if (s.size and s.min() >= 0 and s.max() <= 1) else float("nan")
    out["threshold"] = float(threshold)
    out["accuracy"] = accuracy(y, pred)
    out["precision"], out["recall"], out["f1"] = precision_recall_f1(y, pred, "micro")
    out["precision_macro"], out["recall_macro"], out["f1_macro"] = precision_recall_f1(y, pred, "macro")

    # ---- next item
    targets = np.asarray(test.target_item)
    acc = RankAccumulator()
    sampled, click = [], []
    n_items = None
    for idx in _chunks(len(test), chunk):
        part = test.subset(idx)
        scores = scorer.item_scores(part)
        n_items = scores.shape[1]
        mask = seen_mask(np.asarray(part.item), n_items) if exclude_seen else np.zeros((len(idx), n_items), bool)
        mask[:, list(INVALID_IDS)] = True
        acc.add(scores, targets[idx], mask)
        negs = sample_negatives(targets[idx], n_items, num_sampled, seed=seed + int(idx[0]))
        cols = np.concatenate([targets[idx][:, None], negs], axis=1)
        cand = _to_numpy(scores[np.arange(len(idx))[:, None], cols] if isinstance(scores, np.ndarray)
                         else scores.gather(1, _as_long_tensor(cols, scores)))
        sampled.append(cand)
    if n_items is not None:
        out.update({k: v for k, v in acc.result(ks, n_items=n_items).items() if k != "n"})
        cand = np.concatenate(sampled).astype(np.float64)
        out.update(sampled_ranking_metrics(cand, ks))
        lab = np.zeros_like(cand, dtype=bool)
        lab[:, 0] = True
        out[f"click_auc_sampled{num_sampled}"] = roc_auc(lab, cand)
        out["protocol"] = {"ranking": "full" + (", seen items excluded" if exclude_seen else ""),
                           "sampled_negatives": num_sampled, "ties": "expected value under random tie-break",
                           "threshold_from": "valid" if valid is not None else "fixed"}

    # ---- per platform (of the last observed event)
    if n_items is not None:
        plat = _last_platform(test)
        above, tied = acc.per_row()
        per = {}
        for p in np.unique(plat):
            rows = plat == p
            name = platform_names[p] if platform_names is not None and p < len(platform_names) else str(int(p))
            r = metrics_from_ranks(above[rows], tied[rows], ks, n_items=n_items)
            per[name] = {"n": int(rows.sum()), "auc": roc_auc(y[rows], s[rows]),
                         **{f"ndcg@{k}": r[f"ndcg@{k}"] for k in ks}, **{f"hr@{k}": r[f"hr@{k}"] for k in ks}}
        out["per_platform"] = per
    if keep_curves:
        out["_curve_true"], out["_curve_score"] = y.reshape(-1), s.reshape(-1)
    return out


def _as_long_tensor(cols, like):
    import torch

    return torch.as_tensor(cols, dtype=torch.long, device=like.device)
