"""Non-learned baselines, scored with exactly the same protocol as the models.

Every baseline is fitted on the *training* split only and answers two questions for a batch of
histories (a `SequenceBatch`):

* `category_scores(batch) -> [N, C]`: how strongly each person is interested in each category
  (compared with the model's interest head: AUC, GAUC, F1, ...);
* `item_scores(batch) -> [N, V]`: a score per item for next-item ranking (HR@K, NDCG@K, MRR).

Baselines:
* `MostPopular`: global counts (items, categories) — the same list for everyone.
* `PersonalFrequency`: the person's own most frequent categories / items in the history, global
  popularity as a tie-breaker.
* `ItemKNN`: item-to-item co-occurrence (within a window of the training sequences), cosine
  normalised and pruned to the top neighbours (each item is its own neighbour, similarity 1); a person's score for item j is
  sum_i w_i * sim(i, j) over the history items i, more recent events weighted more.
  Category scores are the same construction on category sequences.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["Baseline", "MostPopular", "PersonalFrequency", "ItemKNN", "training_sequences", "default_baselines"]


def training_sequences(train, field: str = "item") -> list[np.ndarray]:
    """One sequence per person from the training split: its longest history with the target appended
    (when the field is "item"). Works whether the split holds one row per person or every prefix."""
    ids = getattr(train, field)
    lengths = np.asarray(train.lengths)
    persons = np.asarray(train.person)
    cut = np.asarray(getattr(train, "cut_time", lengths))
    if not len(persons):
        return []
    # the row with the latest cut (then the longest history) per person
    order = np.lexsort((lengths, cut, persons))
    last_of_person = np.r_[persons[order][1:] != persons[order][:-1], True]
    seqs = []
    for r in order[last_of_person]:
        s = ids[r, : lengths[r]]
        if field == "item":
            s = np.r_[s, train.target_item[r]]
        seqs.append(np.asarray(s, dtype=np.int64))
    return seqs


def _counts(seqs: list[np.ndarray], n: int) -> np.ndarray:
    c = np.zeros(n, dtype=np.float64)
    if seqs:
        np.add.at(c, np.concatenate(seqs), 1.0)
    c[:2] = 0.0  # padding and unknown never score
    return c


def _history_matrix(ids: np.ndarray, lengths: np.ndarray, n: int, decay: float = 1.0) -> sp.csr_matrix:
    """[N, n] sparse weights of each history; weight decay**(steps before the last event)."""
    N, T = ids.shape
    t = np.arange(T)[None, :]
    valid = t < lengths[:, None]
    age = (lengths[:, None] - 1 - t)
    w = np.where(valid & (ids >= 2), decay ** np.clip(age, 0, None), 0.0)  # pads and unknowns weigh 0
    rows = np.repeat(np.arange(N), T)
    m = sp.csr_matrix((w.reshape(-1), (rows, ids.reshape(-1))), shape=(N, n))
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


class Baseline:
    name = "baseline"

    def fit(self, train, n_items: int, n_categories: int) -> "Baseline":
        raise NotImplementedError

    def category_scores(self, batch) -> np.ndarray:
        raise NotImplementedError

    def item_scores(self, batch) -> np.ndarray:
        raise NotImplementedError


class MostPopular(Baseline):
    """Global popularity. Category "probability" = the share of training examples whose label window
    holds the category (a calibrated prior); item score = training frequency."""

    name = "most_popular"

    def fit(self, train, n_items, n_categories):
        self.item_pop = _counts(training_sequences(train, "item"), n_items)
        tc = np.asarray(train.target_categories, dtype=np.float64)
        self.cat_prior = tc.mean(0) if len(tc) else np.zeros(n_categories)
        self.cat_prior[:2] = 0.0
        return self

    def category_scores(self, batch):
        return np.broadcast_to(self.cat_prior, (len(batch), self.cat_prior.size)).copy()

    def item_scores(self, batch):
        return np.broadcast_to(self.item_pop, (len(batch), self.item_pop.size)).copy()


class PersonalFrequency(Baseline):
    """The person's own history: share of its events in each category / count of each item."""

    name = "personal_frequency"

    def fit(self, train, n_items, n_categories):
        self.pop = MostPopular().fit(train, n_items, n_categories)
        self.n_items, self.n_categories = n_items, n_categories
        return self

    def category_scores(self, batch):
        lengths = np.asarray(batch.lengths)
        h = _history_matrix(np.asarray(batch.category), lengths, self.n_categories).toarray()
        share = h / np.maximum(lengths, 1)[:, None]
        # popularity only breaks ties (and scores people with an empty history)
        return share + 1e-3 * self.pop.cat_prior[None, :] / max(self.pop.cat_prior.max(), 1e-12)

    def item_scores(self, batch):
        h = _history_matrix(np.asarray(batch.item), np.asarray(batch.lengths), self.n_items).toarray()
        return h + 1e-3 * self.pop.item_pop[None, :] / max(self.pop.item_pop.max(), 1.0)


def _cooccurrence_similarity(seqs: list[np.ndarray], n: int, window: int, top: int) -> sp.csr_matrix:
    rows, cols = [], []
    for s in seqs:
        for d in range(1, min(window, len(s) - 1) + 1):
            rows.append(s[:-d])
            cols.append(s[d:])
    if not rows:
        return sp.csr_matrix((n, n))
    r, c = np.concatenate(rows), np.concatenate(cols)
    keep = (r >= 2) & (c >= 2) & (r != c)
    r, c = r[keep], c[keep]
    co = sp.coo_matrix((np.ones(r.size), (r, c)), shape=(n, n)).tocsr()
    co = co + co.T  # symmetric co-occurrence counts
    freq = _counts(seqs, n)
    inv = np.zeros(n)
    inv[freq > 0] = 1.0 / np.sqrt(freq[freq > 0])
    sim = sp.diags(inv) @ co @ sp.diags(inv)  # cosine between occurrence vectors
    sim = sim.tocsr()
    # keep the `top` strongest neighbours of each item
    data, indices, indptr = [], [], [0]
    for i in range(n):
        lo, hi = sim.indptr[i], sim.indptr[i + 1]
        v, j = sim.data[lo:hi], sim.indices[lo:hi]
        if v.size > top:
            sel = np.argpartition(-v, top)[:top]
            v, j = v[sel], j[sel]
        data.append(v)
        indices.append(j)
        indptr.append(indptr[-1] + v.size)
    pruned = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=(n, n))
    # an item is its own nearest neighbour (cosine 1): repeat consumption is common in behaviour logs
    return (pruned + sp.diags((freq > 0).astype(np.float64))).tocsr()


class ItemKNN(Baseline):
    """Item co-occurrence nearest neighbours (and the same on categories)."""

    name = "item_knn"

    def __init__(self, window: int = 5, neighbours: int = 100, decay: float = 0.9):
        self.window, self.neighbours, self.decay = window, neighbours, decay

    def fit(self, train, n_items, n_categories):
        self.pop = MostPopular().fit(train, n_items, n_categories)
        self.n_items, self.n_categories = n_items, n_categories
        self.item_sim = _cooccurrence_similarity(training_sequences(train, "item"), n_items, self.window,
                                                 self.neighbours)
        self.cat_sim = _cooccurrence_similarity(training_sequences(train, "category"), n_categories,
                                                self.window, self.neighbours)
        return self

    def _scores(self, ids, lengths, n, sim, prior):
        h = _history_matrix(np.asarray(ids), np.asarray(lengths), n, self.decay)
        s = np.asarray((h @ sim).todense())
        return s + 1e-6 * prior[None, :] / max(prior.max(), 1e-12)

    def category_scores(self, batch):
        return self._scores(batch.category, batch.lengths, self.n_categories, self.cat_sim, self.pop.cat_prior)

    def item_scores(self, batch):
        return self._scores(batch.item, batch.lengths, self.n_items, self.item_sim, self.pop.item_pop)


def default_baselines() -> list[Baseline]:
    return [MostPopular(), PersonalFrequency(), ItemKNN()]
