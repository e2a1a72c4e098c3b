"""Next-item ranking metrics: HR@K, NDCG@K, MRR.

Two protocols, always labelled in the output:

* **full ranking** (`full_ranking_metrics`, the research standard, as RecBole): the target is ranked
  against every item of the vocabulary (minus the ones excluded: padding/unknown ids, and optionally
  the items the person has already seen, except the target itself).
* **sampled** (`sampled_ranking_metrics`): the target is ranked against `num_negatives` items drawn at
  random (uniformly, seeded) among the items that are not the target. Numbers are much higher than with
  full ranking and are not comparable with them; keys carry a `sampled<n>_` prefix.

Ties: a model that gives the target and `t` other items the same score could have placed the target
anywhere among those `t + 1` positions. We report the *expected* metric under a uniformly random
tie-break, computed exactly (not sampled), so constant scores are not rewarded and the result is
deterministic.
"""
from __future__ import annotations

import numpy as np

__all__ = ["target_ranks", "metrics_from_ranks", "full_ranking_metrics", "sampled_ranking_metrics", "RankAccumulator"]


def target_ranks(scores, targets, exclude_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """For each row: (#items scoring strictly above the target, #other items tied with it).

    scores: [N, V] float (numpy or torch); targets: [N] int item ids; exclude_mask: [N, V] bool, True =
    the item does not compete (never applied to the target itself).
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(scores, torch.Tensor):
        s = scores.detach().float()
        tg = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=s.device)
        t_score = s.gather(1, tg[:, None])
        above = s > t_score
        tied = s == t_score
        if exclude_mask is not None:
            keep = ~torch.as_tensor(exclude_mask, device=s.device).bool()
            keep.scatter_(1, tg[:, None], True)
            above &= keep
            tied &= keep
        if above.device.type == "cpu":  # numpy counts bool rows ~8x faster than torch's sum reduction
            return (np.count_nonzero(above.numpy(), axis=1).astype(np.int64),
                    np.count_nonzero(tied.numpy(), axis=1).astype(np.int64) - 1)
        return above.sum(1).cpu().numpy(), (tied.sum(1) - 1).cpu().numpy()
    s = np.asarray(scores, dtype=np.float64)
    tg = np.asarray(targets, dtype=np.int64)
    rows = np.arange(s.shape[0])
    t_score = s[rows, tg][:, None]
    above = s > t_score
    tied = s == t_score
    if exclude_mask is not None:
        m = np.array(exclude_mask, dtype=bool, copy=True)
        m[rows, tg] = False
        above &= ~m
        tied &= ~m
    return above.sum(1), tied.sum(1) - 1


def _expected(prefix: np.ndarray, above: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """Mean of f(p) over 0-based positions p in [above, above + tied], given prefix sums of f."""
    return (prefix[above + tied + 1] - prefix[above]) / (tied + 1)


def metrics_from_ranks(above, tied, ks=(10,), n_items: int | None = None) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item: 1/log2(rank+1), 1-based rank) and MRR, averaged over rows."""
    above = np.asarray(above, dtype=np.int64)
    tied = np.asarray(tied, dtype=np.int64)
    if above.size == 0:
        return {**{f"hr@{k}": float("nan") for k in ks}, **{f"ndcg@{k}": float("nan") for k in ks},
                "mrr": float("nan"), "n": 0}
    n = int(n_items if n_items is not None else (above + tied).max() + 1) + 1
    pos = np.arange(n, dtype=np.float64)  # 0-based position
    out: dict[str, float] = {}
    for k in ks:
        hit = np.r_[0.0, np.cumsum(pos < k)]
        out[f"hr@{k}"] = float(_expected(hit, above, tied).mean())
    for k in ks:
        gain = np.r_[0.0, np.cumsum(np.where(pos < k, 1.0 / np.log2(pos + 2.0), 0.0))]
        out[f"ndcg@{k}"] = float(_expected(gain, above, tied).mean())
    rr = np.r_[0.0, np.cumsum(1.0 / (pos + 1.0))]
    out["mrr"] = float(_expected(rr, above, tied).mean())
    out["n"] = int(above.size)
    return out


class RankAccumulator:
    """Collects (above, tied) per chunk of rows so that [N, V] scores never need to exist at once."""

    def __init__(self):
        self.above: list[np.ndarray] = []
        self.tied: list[np.ndarray] = []

    def add(self, scores, targets, exclude_mask=None) -> None:
        a, t = target_ranks(scores, targets, exclude_mask)
        self.above.append(np.asarray(a))
        self.tied.append(np.asarray(t))

    def result(self, ks=(10,), n_items=None) -> dict[str, float]:
        if not self.above:
            return metrics_from_ranks(np.zeros(0, np.int64), np.zeros(0, np.int64), ks)
        return metrics_from_ranks(np.concatenate(self.above), np.concatenate(self.tied), ks, n_items)

    def per_row(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.above), np.concatenate(self.tied)


def seen_mask(history_items: np.ndarray, n_items: int) -> np.ndarray:
    """[N, V] bool: True where row n's history (left-aligned ids, 0 = pad) contains the item."""
    h = np.asarray(history_items, dtype=np.int64)
    m = np.zeros((h.shape[0], n_items), dtype=bool)
    rows = np.repeat(np.arange(h.shape[0]), h.shape[1])
    m[rows, h.reshape(-1)] = True
    m[:, 0] = False  # padding is handled by `invalid_items`
    return m


def full_ranking_metrics(scores, targets, ks=(10,), invalid_items=(0, 1), history_items=None) -> dict[str, float]:
    """Full-ranking HR@K / NDCG@K / MRR for one block of rows.

    scores [N, V]; targets [N]; invalid_items: ids that never compete (padding, unknown);
    history_items [N, T] (optional): exclude the items each person has already seen (target kept).
    """
    n_items = np.asarray(scores.shape)[1]
    mask = np.zeros((len(targets), n_items), dtype=bool) if history_items is None else seen_mask(history_items, n_items)
    mask[:, list(invalid_items)] = True
    acc = RankAccumulator()
    acc.add(scores, targets, mask)
    return acc.result(ks, n_items=int(n_items))


def sample_negatives(targets, n_items: int, num_negatives: int, seed: int = 0, low: int = 2) -> np.ndarray:
    """[N, num_negatives] item ids drawn uniformly from [low, n_items), re-drawn where equal to the target."""
    rng = np.random.default_rng(seed)
    t = np.asarray(targets, dtype=np.int64)[:, None]
    neg = rng.integers(low, n_items, size=(t.shape[0], num_negatives))
    clash = neg == t
    while clash.any():
        neg[clash] = rng.integers(low, n_items, size=int(clash.sum()))
        clash = neg == t
    return neg


def sampled_ranking_metrics(candidate_scores, ks=(10,)) -> dict[str, float]:
    """Metrics of the sampled protocol. candidate_scores [N, 1 + n]: column 0 = the target's score,
    the others = the sampled negatives' scores. Keys are prefixed `sampled<n>_`."""
    s = np.asarray(candidate_scores, dtype=np.float64)
    above = (s[:, 1:] > s[:, :1]).sum(1)
    tied = (s[:, 1:] == s[:, :1]).sum(1)
    res = metrics_from_ranks(above, tied, ks, n_items=s.shape[1])
    n = s.shape[1] - 1
    return {f"sampled{n}_{k}": v for k, v in res.items() if k != "n"}
