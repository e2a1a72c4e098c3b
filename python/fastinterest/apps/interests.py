"""Applications on a trained run: predict interests, recommend, target users, similar users, explain.

    app = InterestApp.from_prepared(Run.load("runs/demo"), "data/prepared")
    app.predict_interests(person=17, k=5)          # [(category, probability), ...]
    app.predict_interests(events=records, k=5)     # a new person from raw event records
    app.recommend(17, k=10)                        # unseen items by score
    app.target_users("c_12", k=100)                # the persons most interested in a category
    app.similar_users(17, k=10)                    # cosine similarity of user vectors
    app.explain(17, "c_12", k=5)                   # the past events that drive that interest

`explain` uses **leave-one-out occlusion**: each past event is removed in turn (the later events shift
left, as if it had never happened) and the drop of the interest's log-odds (logit) is that event's
contribution (positive = the event supports the interest). Log-odds rather than probability because a
confident prediction (p ~ 1) would hide every contribution in the probability's flat tail. Exact for
the model, no gradients, one batched forward pass of T sequences.

Persons are the prepared person ids (ints); a token of the prepared persons table (pseudonym) is
accepted where the table is known.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .run import ArrayBatch, Run

__all__ = ["InterestApp", "cosine_top_k"]


def cosine_top_k(vectors: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None,
                 use_faiss: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities) of the k rows of `vectors` most similar to `query`.

    Exact search (normalised dot products). With use_faiss=None, faiss (IndexFlatIP, also exact) is used
    when it is installed and there are more than 100,000 rows.
    """
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    vn = v / np.maximum(norms, 1e-12)
    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    want = min(len(v), k + (exclude is not None))
    if use_faiss is None:
        use_faiss = len(v) > 100_000
    if use_faiss:
        try:
            import faiss

            index = faiss.IndexFlatIP(vn.shape[1])
            index.add(vn)
            sims, idx = index.search(q, want)
            sims, idx = sims[0], idx[0]
        except ImportError:
            use_faiss = False
    if not use_faiss:
        s = vn @ q[0]
        idx = np.argsort(-s, kind="stable")[:want]
        sims = s[idx]
    keep = idx != exclude if exclude is not None else np.ones(len(idx), bool)
    return idx[keep][:k], sims[keep][:k]


class InterestApp:
    """A `Run` plus every person's history (one row per person, a SequenceBatch with a `person` field)."""

    def __init__(self, run: Run, histories, person_names: dict | None = None, vocab_lookup=None):
        self.run, self.histories = run, histories
        self.persons = np.asarray(histories.person)
        self._row = {int(p): i for i, p in enumerate(self.persons)}
        self._names = {str(v): int(k) for k, v in (person_names or {}).items()}
        self._person_names = person_names or {}
        self._vectors: np.ndarray | None = None
        self._vocab_lookup = vocab_lookup  # prepared vocab object for events_from_records, when available

    @classmethod
    def from_prepared(cls, run: Run, prepared_dir=None) -> "InterestApp":
        """Histories from `fastinterest.data.build_person_histories` on the prepared dir (default: the run's)."""
        from ..data import build_person_histories, load_prepared

        prepared_dir = prepared_dir or run.prepared_dir
        if prepared_dir is None:
            raise ValueError("no prepared data directory given and the run does not record one")
        prepared = load_prepared(prepared_dir)
        histories = build_person_histories(prepared, run.data_params["max_len"])
        names = _person_names(Path(prepared_dir))
        return cls(run, histories, names, vocab_lookup=getattr(prepared, "vocab", None))

    # ---- lookups
    def row_of(self, person) -> int:
        """Row of a person given its id (int or numeric string) or its name in the persons table."""
        key = self._names.get(str(person))
        if key is None:
            try:
                key = int(person)
            except (TypeError, ValueError):
                raise KeyError(f"unknown person {person!r}") from None
        if key not in self._row:
            raise KeyError(f"unknown person {person!r}")
        return self._row[key]

    def person_name(self, person_id: int):
        return self._person_names.get(int(person_id), int(person_id))

    def user_vectors(self) -> np.ndarray:
        """[P, H] vectors of every person (computed once, in batches)."""
        if self._vectors is None:
            self._vectors = self.run.user_vectors(self.histories)
        return self._vectors

    def _history(self, person) -> ArrayBatch:
        r = self.row_of(person)
        h = self.histories
        return ArrayBatch(*(np.asarray(getattr(h, f))[r:r + 1] for f in ("item", "category", "action", "platform",
                                                                            "lengths")))

    def _events_batch(self, events):
        """A new person's raw event records (dicts in the raw schema) -> a one-row history batch, encoded
        with the run's vocabulary (unknown tokens -> <unk>) by fastinterest.data.events_from_records."""
        from ..data import build_person_histories, events_from_records

        table = events_from_records(events, self._vocab_lookup if self._vocab_lookup is not None else self.run.vocab)
        return build_person_histories(table, self.run.data_params["max_len"]).subset(slice(0, 1))

    # ---- applications
    def predict_interests(self, person=None, *, events=None, k: int = 10) -> list[tuple[str, float]]:
        """Top-k categories by interest probability, for a known person or a new one from raw events."""
        if (person is None) == (events is None):
            raise ValueError("give exactly one of person= or events=")
        if person is not None:
            vec = self.user_vectors()[self.row_of(person)][None, :]
        else:
            vec = self.run.user_vectors(self._events_batch(events))
        probs = self.run.interest_probabilities(vec)[0]
        probs[:2] = -np.inf  # pad, unk
        top = np.argsort(-probs, kind="stable")[:k]
        names = self.run.tokens("category")
        return [(names[c], float(probs[c])) for c in top]

    def recommend(self, person, k: int = 10, exclude_seen: bool = True) -> list[tuple[str, float]]:
        """Top-k items by the item head's score; items in the person's history excluded by default."""
        r = self.row_of(person)
        h = self.histories
        scores = self.run.item_scores(self.user_vectors()[r][None, :], None, np.asarray(h.item)[r:r + 1],
                                      np.asarray(h.lengths)[r:r + 1])[0]
        scores[:2] = -np.inf
        if exclude_seen:
            h = np.asarray(self.histories.item)[r, : int(np.asarray(self.histories.lengths)[r])]
            scores[h] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        names = self.run.tokens("item")
        return [(names[i], float(scores[i])) for i in top if np.isfinite(scores[i])]

    def target_users(self, category, k: int = 100) -> list[tuple[object, float]]:
        """The k persons with the highest interest probability for `category` (a token or an id)."""
        c = self.run.id_of("category", category)
        probs = self.run.interest_probabilities(self.user_vectors())[:, c]
        top = np.argsort(-probs, kind="stable")[:k]
        return [(self.person_name(self.persons[i]), float(probs[i])) for i in top]

    def similar_users(self, person, k: int = 10, use_faiss: bool | None = None) -> list[tuple[object, float]]:
        """The k persons whose user vectors are closest (cosine) to this person's, the person excluded."""
        r = self.row_of(person)
        vecs = self.user_vectors()
        idx, sims = cosine_top_k(vecs, vecs[r], k, exclude=r, use_faiss=use_faiss)
        return [(self.person_name(self.persons[i]), float(s)) for i, s in zip(idx, sims)]

    def explain(self, person, category, k: int = 10) -> dict:
        """Leave-one-out occlusion: which past events raise (or lower) the interest in `category`.

        Returns {"category", "probability", "method", "unit": "log-odds", "events": [{"position",
        "steps_before_end", "item", "category", "action", "platform", "contribution"}, ...]}, the k events
        with the largest |contribution| first; contribution = logit(p with the event) - logit(p without)."""
        c = self.run.id_of("category", category)
        one = self._history(person)
        L = int(one.lengths[0])
        base = float(self.run.interest_probabilities(self.run.user_vectors(one))[0, c])
        if L == 0:
            return {"category": str(category), "probability": base, "method": "leave-one-out occlusion",
                    "unit": "log-odds", "events": []}
        T = one.item.shape[1]
        variants = {}
        for f in ("item", "category", "action", "platform"):
            seq = np.asarray(getattr(one, f))[0]
            rows = np.zeros((L, T), dtype=np.int64)
            for i in range(L):
                kept = np.r_[seq[:i], seq[i + 1:L]]
                rows[i, : L - 1] = kept
            variants[f] = rows
        batch = ArrayBatch(variants["item"], variants["category"], variants["action"], variants["platform"],
                           np.full(L, L - 1, dtype=np.int64))
        without = self.run.interest_probabilities(self.run.user_vectors(batch))[:, c]
        contrib = _logit(base) - _logit(without)
        order = np.argsort(-np.abs(contrib), kind="stable")[:k]
        tok = {f: self.run.tokens(f) for f in ("item", "category", "action", "platform")}
        events = [{"position": int(i), "steps_before_end": int(L - 1 - i),
                   **{f: tok[f][int(np.asarray(getattr(one, f))[0, i])] for f in tok},
                   "contribution": float(contrib[i])} for i in order]
        return {"category": self.run.tokens("category")[c], "probability": base,
                "method": "leave-one-out occlusion", "unit": "log-odds", "events": events}


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _person_names(prepared_dir: Path) -> dict:
    """person id -> pseudonym from persons.parquet (empty when absent)."""
    path = prepared_dir / "persons.parquet"
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    if "person" not in t.column_names or "pseudonym" not in t.column_names:
        return {}
    return dict(zip(t.column("person").to_pylist(), t.column("pseudonym").to_pylist()))
