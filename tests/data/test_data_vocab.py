"""Vocabularies: id layout, min-count and OOV bucket, encode/decode, one-hot / multi-hot, label encoding."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from fastinterest.data import LabelEncoder, Vocab, multi_hot, one_hot


def test_from_counts_orders_by_count_then_token_and_buckets_rare_tokens():
    vocab, ids = Vocab.from_counts(["b", "a", "c", "d", "e"], [5, 5, 9, 1, 2], min_count=2, name="item")
    assert vocab.tokens == ["<pad>", "<unk>", "c", "a", "b", "e"]
    assert vocab.counts == [0, 1, 9, 5, 5, 2]        # <unk> counts the one occurrence of "d"
    assert ids.tolist() == [4, 3, 2, 1, 5]
    assert vocab.encode(["c", "d", "zzz", None, "", "e"]).tolist() == [2, 1, 1, 0, 0, 5]
    assert vocab.decode([2, 3, 1]) == ["c", "a", "<unk>"]
    assert vocab.id("a") == 3 and vocab.id("nope") == 1 and vocab.id(None) == 0
    assert "a" in vocab and "d" not in vocab and len(vocab) == 6


def test_min_count_one_keeps_every_seen_token_but_not_zero_counts():
    vocab, ids = Vocab.from_counts(["x", "y"], [1, 0])
    assert vocab.tokens == ["<pad>", "<unk>", "x"] and ids.tolist() == [2, 1]


def test_keep_forces_tokens_even_with_zero_count():
    vocab, _ = Vocab.from_counts(["view", "cart"], [3, 0], keep=["view", "cart"])
    assert vocab.tokens == ["<pad>", "<unk>", "view", "cart"]


def test_reserved_spellings_cannot_take_an_id():
    vocab, ids = Vocab.from_counts(["<unk>", "a"], [10, 1])
    assert vocab.tokens == ["<pad>", "<unk>", "a"] and ids.tolist() == [1, 2]


def test_round_trip_dict_and_build():
    vocab = Vocab.build(["a", "b", "a", None, "c", "a"], min_count=2)
    assert vocab.tokens == ["<pad>", "<unk>", "a"] and vocab.counts == [0, 2, 3]
    again = Vocab.from_dict(vocab.to_dict())
    assert again == vocab
    with pytest.raises(ValueError):
        Vocab(["a", "b"])
    assert vocab.encode(pa.array(["a", "q"])).tolist() == [2, 1]


def test_one_hot_and_multi_hot():
    np.testing.assert_array_equal(one_hot([2, 0], 3), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(IndexError):
        one_hot([3], 3)
    mh = multi_hot([[2, 3], [], [0, 2]], 4)
    np.testing.assert_array_equal(mh, [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]])  # <pad> never set
    offsets, values = np.array([0, 2, 2, 4]), np.array([2, 3, 0, 2])
    np.testing.assert_array_equal(multi_hot((offsets, values), 4), mh)
    vocab = Vocab(["<pad>", "<unk>", "x"])
    assert vocab.one_hot([2]).shape == (1, 3) and vocab.multi_hot([[1, 2]]).tolist() == [[0, 1, 1]]


def test_label_encoder():
    enc = LabelEncoder()
    assert enc.fit_transform(["b", "a", "b"]).tolist() == [1, 0, 1]
    assert enc.inverse_transform([0, 1]) == ["a", "b"]
    with pytest.raises(ValueError, match="unknown label"):
        enc.transform(["c"])
