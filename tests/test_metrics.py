"""Metrics against scikit-learn (the oracle) on random data, and the ranking protocol on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

sk = pytest.importorskip("sklearn.metrics")

from fastinterest.metrics import (  # noqa: E402
    accuracy, best_f1_threshold, full_ranking_metrics, gauc, log_loss, metrics_from_ranks, pr_curve,
    precision_recall_f1, roc_auc, roc_curve, sampled_ranking_metrics,
)


@pytest.fixture(params=[0, 1, 2])
def rng(request):
    return np.random.default_rng(request.param)


def test_accuracy_precision_recall_f1_binary(rng):
    y = rng.integers(0, 2, 500)
    p = rng.integers(0, 2, 500)
    assert accuracy(y, p) == pytest.approx(sk.accuracy_score(y, p))
    pr, rc, f1 = precision_recall_f1(y, p, "micro")
    assert pr == pytest.approx(sk.precision_score(y, p))
    assert rc == pytest.approx(sk.recall_score(y, p))
    assert f1 == pytest.approx(sk.f1_score(y, p))


@pytest.mark.parametrize("average", ["micro", "macro"])
def test_precision_recall_f1_multilabel(rng, average):
    y = (rng.random((200, 7)) < 0.3).astype(int)
    p = (rng.random((200, 7)) < 0.3).astype(int)
    y[:, 3] = 0  # a label that never occurs
    p[:, 3] = 0
    pr, rc, f1 = precision_recall_f1(y, p, average)
    kw = dict(average=average, zero_division=0)
    assert pr == pytest.approx(sk.precision_score(y, p, **kw))
    assert rc == pytest.approx(sk.recall_score(y, p, **kw))
    assert f1 == pytest.approx(sk.f1_score(y, p, **kw))


def test_roc_auc_with_ties(rng):
    y = rng.integers(0, 2, 1000)
    s = np.round(rng.random(1000) + 0.3 * y, 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s))
    assert roc_auc(np.ones(5), np.arange(5)) != roc_auc(np.ones(5), np.arange(5))  # NaN with one class


def test_roc_and_pr_curves_match_sklearn(rng):
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 2)
    fpr, tpr, _ = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(sk.roc_auc_score(y, s))
    precision, recall, thr = pr_curve(y, s)
    skp, skr, skt = sk.precision_recall_curve(y, s)
    # scikit-learn orders by increasing threshold and appends (1, 0); compare the common points
    np.testing.assert_allclose(precision[::-1], skp[:-1])
    np.testing.assert_allclose(recall[::-1], skr[:-1])
    np.testing.assert_allclose(thr[::-1], skt)


def test_gauc_is_weighted_mean_of_group_aucs(rng):
    groups = rng.integers(0, 20, 2000)
    y = rng.integers(0, 2, 2000)
    s = rng.random(2000) + 0.2 * y
    y[groups == 5] = 1  # a single-class group is skipped
    total = weight = 0.0
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            total += m.sum() * sk.roc_auc_score(y[m], s[m])
            weight += m.sum()
    assert gauc(y, s, groups) == pytest.approx(total / weight)


def test_log_loss(rng):
    y = rng.integers(0, 2, 400)
    p = rng.random(400)
    assert log_loss(y, p) == pytest.approx(sk.log_loss(y, p))


def test_best_f1_threshold_maximises_f1(rng):
    y = rng.integers(0, 2, 300)
    s = rng.random(300) + 0.5 * y
    t = best_f1_threshold(y, s)
    best = sk.f1_score(y, s >= t)
    for other in np.linspace(0, 1.5, 31):
        assert sk.f1_score(y, s >= other) <= best + 1e-12


def test_full_ranking_matches_sklearn_without_ties(rng):
    N, V = 64, 50
    scores = rng.random((N, V))
    targets = rng.integers(2, V, N)
    res = full_ranking_metrics(scores, targets, ks=(5, 10), invalid_items=())
    onehot = np.zeros((N, V))
    onehot[np.arange(N), targets] = 1
    assert res["hr@10"] == pytest.approx(sk.top_k_accuracy_score(targets, scores, k=10, labels=np.arange(V)))
    assert res["hr@5"] == pytest.approx(sk.top_k_accuracy_score(targets, scores, k=5, labels=np.arange(V)))
    assert res["ndcg@10"] == pytest.approx(sk.ndcg_score(onehot, scores, k=10))
    # one relevant label: label-ranking average precision is the reciprocal rank
    assert res["mrr"] == pytest.approx(sk.label_ranking_average_precision_score(onehot, scores))


def test_full_ranking_ties_are_expected_over_random_tie_break(rng):
    N, V = 40, 30
    scores = np.round(rng.random((N, V)), 1)  # heavy ties
    targets = rng.integers(0, V, N)
    onehot = np.zeros((N, V))
    onehot[np.arange(N), targets] = 1
    res = full_ranking_metrics(scores, targets, ks=(10,), invalid_items=())
    # scikit-learn's ndcg averages the gain over tied positions, the same expectation
    assert res["ndcg@10"] == pytest.approx(sk.ndcg_score(onehot, scores, k=10))
    const = full_ranking_metrics(np.zeros((N, V)), targets, ks=(10,), invalid_items=())
    assert const["hr@10"] == pytest.approx(10 / V)
    assert const["mrr"] == pytest.approx(np.mean(1.0 / np.arange(1, V + 1)))


def test_exclusions_remove_competitors_but_never_the_target():
    scores = np.array([[9.0, 8.0, 7.0, 6.0, 5.0]])
    # target 4 is last; padding (0) and unknown (1) never compete -> rank 3 of 3
    r = full_ranking_metrics(scores, [4], ks=(1, 3), invalid_items=(0, 1))
    assert r["hr@1"] == 0.0 and r["hr@3"] == 1.0 and r["mrr"] == pytest.approx(1 / 3)
    # the person has seen items 2 and 4: 2 is excluded, the target 4 stays
    r = full_ranking_metrics(scores, [4], ks=(1,), invalid_items=(0, 1), history_items=np.array([[2, 4, 0]]))
    assert r["mrr"] == pytest.approx(1 / 2)


def test_torch_scores_give_the_same_ranks(rng):
    torch = pytest.importorskip("torch")
    scores = np.round(rng.random((16, 40)), 1).astype(np.float32)
    targets = rng.integers(2, 40, 16)
    a = full_ranking_metrics(scores, targets)
    b = full_ranking_metrics(torch.from_numpy(scores), targets)
    assert a == b


def test_sampled_protocol_is_labelled_and_correct():
    cand = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.9], [0.5, 0.5, 0.1]])
    res = sampled_ranking_metrics(cand, ks=(1,))
    assert set(res) == {"sampled2_hr@1", "sampled2_ndcg@1", "sampled2_mrr"}
    assert res["sampled2_hr@1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert res["sampled2_mrr"] == pytest.approx((1 + 1 / 3 + (1 + 0.5) / 2) / 3)


def test_metrics_from_ranks_empty():
    res = metrics_from_ranks(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert res["n"] == 0
