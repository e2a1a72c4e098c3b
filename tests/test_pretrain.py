"""Pretraining: co-occurrence counts, GloVe (fused fastinterest tables vs the torch fallback), item2vec,
vectors aligned to the vocabulary, the safetensors file and model initialisation from it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinterest.pretrain import cooccurrence, load_vectors, pretrain_vectors, save_vectors, train_glove
from fastinterest.pretrain.glove import _tables

from test_model import SIZES, toy_splits


def _clusters(n_seq=200, seed=0):
    """Sequences that stay inside one of two item clusters: {2..6} or {7..11}."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n_seq):
        lo = 2 if i % 2 == 0 else 7
        seqs.append(rng.integers(lo, lo + 5, size=12))
    return seqs


def _cos(v, a, b):
    return float(v[a] @ v[b] / (np.linalg.norm(v[a]) * np.linalg.norm(v[b])))


def _within_minus_between(v):
    within = np.mean([_cos(v, a, b) for a in range(2, 7) for b in range(2, 7) if a != b] +
                     [_cos(v, a, b) for a in range(7, 12) for b in range(7, 12) if a != b])
    between = np.mean([_cos(v, a, b) for a in range(2, 7) for b in range(7, 12)])
    return within - between


def test_cooccurrence_distance_weighted_and_symmetric():
    rows, cols, vals = cooccurrence([np.array([2, 3, 4, 0]), np.array([3, 1, 2])], vocab_size=5, window=2)
    X = np.zeros((5, 5))
    X[rows, cols] = vals
    expected = np.zeros((5, 5))
    expected[2, 3] = expected[3, 2] = 1.0   # adjacent in the first sequence
    expected[3, 4] = expected[4, 3] = 1.0
    expected[2, 4] = expected[4, 2] = 0.5   # distance 2
    expected[3, 2] += 0.5                   # second sequence: 3 and 2 at distance 2 (the unk between is skipped)
    expected[2, 3] += 0.5
    np.testing.assert_allclose(X, expected)


def test_glove_learns_clusters_and_reports_its_implementation():
    vec, info = train_glove(_clusters(), 14, dim=8, window=3, epochs=30, lr=0.05, return_info=True)
    assert vec.shape == (14, 8) and np.all(vec[[0, 1, 12, 13]] == 0)  # pad, unk, never-seen ids
    assert info["losses"][-1] < info["losses"][0] * 0.5
    assert _within_minus_between(vec) > 0.5
    assert info["implementation"] in ("fastinterest.nn.Embedding + FusedAdagrad",
                                      "torch.nn.Embedding(sparse=True) + torch.optim.Adagrad")


def test_glove_fused_tables_match_the_torch_adagrad_fallback():
    tabs, opt, impl = _tables(20, 4, 0.05, use_fastinterest=True)
    if opt is not None:
        pytest.skip(f"fastinterest.nn.Embedding with FusedAdagrad not available here ({impl} ran)")
    a, ia = train_glove(_clusters(40), 14, dim=4, window=2, epochs=3, return_info=True, use_fastinterest=True)
    b, ib = train_glove(_clusters(40), 14, dim=4, window=2, epochs=3, return_info=True, use_fastinterest=False)
    assert ia["implementation"] != ib["implementation"]
    np.testing.assert_allclose(ia["losses"], ib["losses"], rtol=1e-4)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_item2vec_learns_clusters_and_is_deterministic():
    pytest.importorskip("gensim")
    from fastinterest.pretrain import train_item2vec

    a = train_item2vec(_clusters(), 14, dim=8, window=3, epochs=20, seed=1)
    b = train_item2vec(_clusters(), 14, dim=8, window=3, epochs=20, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.all(a[[0, 1, 12, 13]] == 0)
    assert _within_minus_between(a) > 0.3
    cbow = train_item2vec(_clusters(), 14, dim=8, window=3, epochs=20, sg=False, seed=1)
    assert not np.allclose(cbow, a)


@pytest.mark.parametrize("method", ["word2vec", "glove"])
def test_pretrain_vectors_file_and_model_init(tmp_path, method):
    pytest.importorskip("gensim")
    splits, vocab, _ = toy_splits(persons=80)
    sizes = {"item": SIZES[0], "category": SIZES[1]}
    vectors, info = pretrain_vectors(splits["train"], sizes, method, dim=8, epochs=3)
    assert vectors["item"].shape == (SIZES[0], 8) and vectors["category"].shape == (SIZES[1], 8)
    assert info["item_coverage"] > 0.9
    path = save_vectors(tmp_path / "v.safetensors", vectors, info)
    loaded, meta = load_vectors(path)
    assert meta["method"] == method and meta["format"] == "fastinterest.vectors"
    np.testing.assert_array_equal(loaded["item"].numpy(), vectors["item"])

    from fastinterest.train import TrainConfig, Trainer

    logs = []
    cfg = TrainConfig(epochs=1, embedding_dim=8, hidden_size=8, layers="torch", pretrained=str(path), negatives=8)
    trainer = Trainer(cfg, progress=False, log=logs.append)
    trainer.fit(splits, tmp_path / "run", vocab=vocab)
    assert any("initialised category, item" in line for line in logs)
    with pytest.raises(ValueError, match="expects"):
        TrainerBadDim = Trainer(TrainConfig(epochs=1, embedding_dim=16, hidden_size=8, layers="torch",
                                            pretrained=str(path)), progress=False, log=lambda *_: None)
        TrainerBadDim.fit(splits, tmp_path / "run2", vocab=vocab)
