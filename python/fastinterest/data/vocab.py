"""Vocabularies (token <-> id) with a min-count and an out-of-vocabulary bucket, and label encoders.

Every vocabulary reserves id 0 for ``<pad>`` (padding / missing) and id 1 for ``<unk>`` (tokens seen
fewer than `min_count` times, and tokens never seen); real tokens follow from id 2 in descending count
order, ties broken by the token (code-point order). ``counts[1]`` is the number of occurrences that fell
into the ``<unk>`` bucket.
"""
from __future__ import annotations

from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import PAD_ID, PAD_TOKEN, UNK_ID, UNK_TOKEN


class Vocab:
    """A token vocabulary; see the module docstring for the id layout.

    >>> v, ids = Vocab.from_counts(["b", "a", "c"], [5, 5, 1], min_count=2)
    >>> v.tokens, list(ids)
    (['<pad>', '<unk>', 'a', 'b'], [3, 2, 1])
    """

    def __init__(self, tokens: Sequence[str] | pa.Array, counts: Sequence[int] | None = None, name: str = ""):
        array = tokens if isinstance(tokens, pa.Array) else pa.array(list(tokens), pa.string())
        array = array.cast(pa.string())
        if array.slice(0, 2).to_pylist() != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(f"a vocabulary starts with {PAD_TOKEN!r}, {UNK_TOKEN!r}; got {array.slice(0, 2)}")
        self.name = name
        self._array = array
        self.counts: list[int] = (np.asarray(counts, dtype=np.int64).tolist() if counts is not None
                                  else [0] * len(array))
        if len(self.counts) != len(array):
            raise ValueError("tokens and counts differ in length")
        if pc.count_distinct(array).as_py() != len(array) or array.null_count:
            raise ValueError("duplicate or missing tokens in vocabulary")

    @cached_property
    def tokens(self) -> list[str]:
        """The tokens, by id."""
        return self._array.to_pylist()

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, tokens: Sequence[str] | pa.Array, counts: Sequence[int] | np.ndarray, *,
                    min_count: int = 1, keep: Iterable[str] = (), name: str = "") -> tuple["Vocab", np.ndarray]:
        """Build from distinct tokens and their counts.

        Tokens with ``count >= min_count`` (or listed in `keep`, even with count 0) get their own id;
        the others go to ``<unk>``. Returns the vocabulary and, for each input token, its id
        (int32), so that codes into `tokens` can be mapped with one gather.
        """
        tokens = tokens if isinstance(tokens, pa.Array) else pa.array(list(tokens), pa.string())
        counts = np.asarray(counts, dtype=np.int64)
        if len(tokens) != len(counts):
            raise ValueError("tokens and counts differ in length")
        keep_mask = counts >= max(1, int(min_count))
        keep = list(keep)
        if keep:
            keep_mask |= pc.is_in(tokens, value_set=pa.array(keep, pa.string())).to_numpy(zero_copy_only=False)
        # A raw token spelled like a reserved one cannot get its own id.
        keep_mask &= ~pc.is_in(tokens, value_set=pa.array([PAD_TOKEN, UNK_TOKEN])).to_numpy(zero_copy_only=False)
        kept = np.flatnonzero(keep_mask)
        table = pa.table({"count": pa.array(counts[kept]), "token": tokens.take(pa.array(kept))})
        order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("token", "ascending")]).to_numpy()
        ranked = kept[order]
        ids = np.full(len(tokens), UNK_ID, dtype=np.int32)
        ids[ranked] = np.arange(2, 2 + len(ranked), dtype=np.int32)
        unk_count = int(counts[~keep_mask].sum())
        ranked_tokens = tokens.cast(pa.string()).take(pa.array(ranked))
        vocab = cls(pa.concat_arrays([pa.array([PAD_TOKEN, UNK_TOKEN]), ranked_tokens]),
                    np.concatenate([[0, unk_count], counts[ranked]]), name=name)
        return vocab, ids

    @classmethod
    def build(cls, sequence: Iterable[str], *, min_count: int = 1, name: str = "") -> "Vocab":
        """Count a stream of tokens and build a vocabulary from it."""
        arr = pa.array(list(sequence), pa.string())
        vc = pc.value_counts(arr.drop_null())
        vocab, _ = cls.from_counts(vc.field("values"), vc.field("counts").to_numpy(), min_count=min_count, name=name)
        return vocab

    # --- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: dict, name: str = "") -> "Vocab":
        return cls(d["tokens"], d.get("counts"), name=name)

    # --- lookups ------------------------------------------------------------------------------------
    @cached_property
    def _index(self) -> dict[str, int]:
        """token -> id, built on first use (large item vocabularies rarely need it)."""
        return {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self._array)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __repr__(self) -> str:
        return f"Vocab({self.name or 'unnamed'}, {len(self)} tokens)"

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens and self.counts == other.counts

    def id(self, token: str | None) -> int:
        """The id of one token: 0 for None/empty, 1 when out of vocabulary."""
        if token is None or token == "":
            return PAD_ID
        return self._index.get(token, UNK_ID)

    def token(self, idx: int) -> str:
        return self.tokens[idx]

    def encode(self, tokens: Sequence[str | None] | pa.Array) -> np.ndarray:
        """Ids (int64) of many tokens at once: ``None``/empty -> 0, out of vocabulary -> 1."""
        arr = tokens if isinstance(tokens, (pa.Array, pa.ChunkedArray)) else pa.array(list(tokens), pa.string())
        if not pa.types.is_string(arr.type):
            arr = arr.cast(pa.string())
        found = pc.index_in(arr, value_set=self._array)
        ids = pc.fill_null(found, UNK_ID).to_numpy(zero_copy_only=False).astype(np.int64)
        blank = pc.fill_null(pc.equal(pc.utf8_length(arr), 0), True).to_numpy(zero_copy_only=False)
        ids[blank] = PAD_ID
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    # --- one-hot / multi-hot ------------------------------------------------------------------------
    def one_hot(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return one_hot(ids, len(self))

    def multi_hot(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        return multi_hot(id_lists, len(self))


def one_hot(ids: Sequence[int] | np.ndarray, n_classes: int, *, dtype=np.float32) -> np.ndarray:
    """``[N, n_classes]`` one-hot rows; an id out of ``[0, n_classes)`` raises IndexError."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
        raise IndexError(f"ids must lie in [0, {n_classes}); got [{ids.min()}, {ids.max()}]")
    out = np.zeros((len(ids), n_classes), dtype=dtype)
    out[np.arange(len(ids)), ids] = 1
    return out


def multi_hot(id_lists: Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray], n_classes: int, *,
              dtype=np.float32, ignore_pad: bool = True) -> np.ndarray:
    """``[N, n_classes]`` multi-hot rows from a list of id lists, or from ``(offsets, values)`` of a
    flattened list column (``offsets`` has N+1 entries). The ``<pad>`` id 0 is left unset by default."""
    if isinstance(id_lists, tuple) and len(id_lists) == 2 and isinstance(id_lists[0], np.ndarray):
        offsets, values = (np.asarray(a, dtype=np.int64) for a in id_lists)
        n = len(offsets) - 1
        rows = np.repeat(np.arange(n), np.diff(offsets))
        values = values[offsets[0]:offsets[-1]]
    else:
        lengths = [len(x) for x in id_lists]
        n = len(lengths)
        rows = np.repeat(np.arange(n), lengths)
        values = np.fromiter((i for x in id_lists for i in x), dtype=np.int64, count=sum(lengths))
    if values.size and (values.min() < 0 or values.max() >= n_classes):
        raise IndexError(f"ids must lie in [0, {n_classes}); got [{values.min()}, {values.max()}]")
    out = np.zeros((n, n_classes), dtype=dtype)
    out[rows, values] = 1
    if ignore_pad and n_classes:
        out[:, PAD_ID] = 0
    return out


class LabelEncoder:
    """Plain label encoding (no pad/unk): sorted distinct labels -> 0..K-1.

    >>> enc = LabelEncoder().fit(["b", "a", "b"])
    >>> enc.classes, enc.transform(["a", "b"]).tolist()
    (['a', 'b'], [0, 1])
    """

    def __init__(self):
        self.classes: list[str] = []
        self._index: dict[str, int] = {}

    def fit(self, labels: Iterable[str]) -> "LabelEncoder":
        self.classes = sorted(set(labels))
        self._index = {c: i for i, c in enumerate(self.classes)}
        return self

    def transform(self, labels: Iterable[str]) -> np.ndarray:
        try:
            return np.array([self._index[x] for x in labels], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"unknown label {exc.args[0]!r}; known: {self.classes}") from None

    def fit_transform(self, labels: Sequence[str]) -> np.ndarray:
        return self.fit(labels).transform(labels)

    def inverse_transform(self, ids: Iterable[int]) -> list[str]:
        return [self.classes[int(i)] for i in ids]
