"""Baselines, the shared evaluation protocol and the report writer, on tiny hand-checkable data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinterest.metrics import ItemKNN, MostPopular, PersonalFrequency, evaluate_scorer, write_report
from fastinterest.metrics.baselines import training_sequences

from test_model import SIZES, ToyBatch, toy_splits


def _batch(items, cats, targets, tcats, persons=None, C=6):
    items = np.asarray(items)
    N, T = items.shape
    lengths = (items > 0).sum(1)
    tc = np.zeros((N, C), np.float32)
    for r, cs in enumerate(tcats):
        tc[r, cs] = 1
    return ToyBatch(item=items, category=np.asarray(cats), action=np.full((N, T), 2) * (items > 0),
                    platform=np.full((N, T), 2) * (items > 0), lengths=lengths,
                    person=np.arange(N) if persons is None else np.asarray(persons),
                    target_item=np.asarray(targets), target_categories=tc, cut_time=np.zeros(N, np.int64))


@pytest.fixture
def tiny():
    # items 2..7, categories: item 2,3 -> cat 2; 4,5 -> cat 3; 6,7 -> cat 4
    cat = {0: 0, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 4}
    items = np.array([[2, 3, 2, 0], [4, 5, 4, 5], [6, 2, 0, 0]])
    cats = np.vectorize(cat.get)(items)
    train = _batch(items, cats, targets=[3, 4, 7], tcats=[[2], [3], [4]])
    return train, cat


def test_training_sequences_take_latest_row_per_person():
    items = np.array([[2, 0, 0], [2, 3, 0], [4, 0, 0]])
    b = _batch(items, items, targets=[3, 4, 5], tcats=[[], [], []], persons=[0, 0, 1])
    b.cut_time = np.array([1, 2, 1])
    seqs = training_sequences(b, "item")
    assert [s.tolist() for s in seqs] == [[2, 3, 4], [4, 5]]


def test_most_popular(tiny):
    train, _ = tiny
    b = MostPopular().fit(train, 8, 6)
    s = b.item_scores(train)
    # counts over histories + targets: 2 x3, 3 x2, 4 x3, 5 x2, 6 x1, 7 x1
    assert s[0].tolist() == [0, 0, 3, 2, 3, 2, 1, 1]
    np.testing.assert_allclose(b.category_scores(train)[1], [0, 0, 1 / 3, 1 / 3, 1 / 3, 0])


def test_personal_frequency(tiny):
    train, _ = tiny
    b = PersonalFrequency().fit(train, 8, 6)
    cs = b.category_scores(train)
    assert np.argmax(cs[0]) == 2 and cs[0, 2] == pytest.approx(1.0, abs=1e-2)
    assert cs[2, 2] == pytest.approx(0.5, abs=1e-2) and cs[2, 4] == pytest.approx(0.5, abs=1e-2)
    it = b.item_scores(train)
    assert np.argmax(it[0]) == 2  # item 2 occurs twice in person 0's history


def test_item_knn_scores_cooccurring_items(tiny):
    train, _ = tiny
    b = ItemKNN(window=2).fit(train, 8, 6)
    sim = b.item_sim.toarray()
    assert sim[4, 5] > 0 and sim[4, 6] == 0  # 4 and 5 co-occur, 4 and 6 never do
    assert np.allclose(sim, sim.T)
    assert sim[2, 2] == 1.0  # an item is its own neighbour
    probe = _batch([[5, 0, 0, 0]], [[3, 0, 0, 0]], targets=[4], tcats=[[3]])
    s = b.item_scores(probe)[0]
    assert s[4] > s[6] and s[4] > s[2]


def test_evaluate_scorer_on_an_oracle_and_a_constant():
    splits, _, _ = toy_splits(persons=60)
    test, valid = splits["test"], splits["valid"]

    class Oracle:
        name = "oracle"

        def category_scores(self, batch):
            return np.asarray(batch.target_categories, dtype=np.float32)

        def item_scores(self, batch):
            s = np.zeros((len(batch), SIZES[0]))
            s[np.arange(len(batch)), batch.target_item] = 1.0
            return s

    class Constant(Oracle):
        name = "constant"

        def category_scores(self, batch):
            return np.full(np.asarray(batch.target_categories).shape, 0.5, np.float32)

        def item_scores(self, batch):
            return np.zeros((len(batch), SIZES[0]))

    r = evaluate_scorer(Oracle(), test, valid)
    assert r["auc"] == 1.0 and r["gauc"] == 1.0 and r["f1"] == 1.0 and r["accuracy"] == 1.0
    assert r["hr@10"] == 1.0 and r["ndcg@10"] == 1.0 and r["mrr"] == 1.0
    assert r["sampled100_hr@10"] == 1.0 and r["click_auc_sampled100"] == 1.0
    assert set(r["per_platform"]) <= {"web", "app"} or set(r["per_platform"]) <= {"2", "3"}
    c = evaluate_scorer(Constant(), test, valid)
    assert c["auc"] == 0.5 and c["hr@10"] == pytest.approx(10 / (SIZES[0] - 2))  # pad/unk never compete


def test_write_report(tmp_path):
    splits, _, _ = toy_splits(persons=60)
    b = PersonalFrequency().fit(splits["train"], SIZES[0], SIZES[1])
    r = evaluate_scorer(b, splits["test"], splits["valid"], keep_curves=True, platform_names=["<pad>", "<unk>", "web",
                                                                                               "app"])
    log = [{"epoch": 1, "train_loss": 1.0, "valid_auc": 0.7}, {"epoch": 2, "train_loss": 0.8, "valid_auc": 0.8}]
    paths = write_report(tmp_path, r, {"most_popular": r}, train_log=log, extra={"split": "test"})
    doc = json.loads((tmp_path / "metrics.json").read_text())
    for k in ("auc", "gauc", "accuracy", "precision", "recall", "f1", "hr@10", "ndcg@10", "mrr"):
        assert isinstance(doc[k], float) and isinstance(doc["baselines"]["most_popular"][k], float)
    assert "_curve_true" not in doc and doc["split"] == "test"
    for name in ("roc", "pr", "training", "platforms"):
        assert paths[name].exists() and paths[name].read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "| most_popular |" in md and "plots/roc.png" in md
