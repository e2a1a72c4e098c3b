"""Run (load a run dir for inference) and InterestApp (predict, recommend, target, similar, explain) on a
small model trained on toy data with planted interests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinterest.apps import ArrayBatch, InterestApp, Run, cosine_top_k
from fastinterest.train import TrainConfig, Trainer

from test_model import TOY_ITEMS_PER_CAT, toy_splits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    splits, vocab, planted = toy_splits(persons=150)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(epochs=6, embedding_dim=16, hidden_size=32, batch_size=32, negatives=32, lr=1e-2,
                      layers="torch", patience=50)
    trainer = Trainer(cfg, progress=False, log=lambda *_: None)
    trainer.fit(splits, out, vocab=vocab, data_info={"max_len": 22})
    run = Run.load(out)
    histories = splits["test"]  # one row per person, person == row
    return run, InterestApp(run, histories), trainer, splits, planted


def test_run_load_reproduces_the_trained_model(trained):
    run, app, trainer, splits, _ = trained
    test = splits["test"]
    a = run.user_vectors(test)
    trainer.model.eval()
    with torch.no_grad():
        from fastinterest.models import as_id_tensors

        ids, lengths = as_id_tensors(test)
        b = trainer.model.encode(ids, lengths)[0].numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    raw = run.user_vectors_from_arrays(test.item, test.category, test.action, test.platform, test.lengths)
    np.testing.assert_allclose(raw, a, atol=1e-6)
    assert run.data_params["max_len"] == 22
    # any layer family serves any run (same parameter names)
    other = Run.load(run.run_dir, layers="torch_padded")
    np.testing.assert_allclose(other.user_vectors(test), a, atol=1e-5)
    probs = run.interest_probabilities(a)
    assert probs.shape == (len(test), run.model.num_categories) and np.all((probs > 0) & (probs < 1))
    scores = run.item_scores(a[:3], history_items=test.item[:3], lengths=test.lengths[:3])
    assert scores.shape == (3, run.model.num_items)
    cand = np.array([5, 9])
    np.testing.assert_allclose(run.item_scores(a[:3], cand, test.item[:3], test.lengths[:3]), scores[:, cand],
                               atol=1e-5)
    click = run.click_probability(a[:3], cand)
    assert np.all((click > 0) & (click < 1))


def test_predict_interests_recovers_planted_categories(trained):
    run, app, _, _, planted = trained
    hits = 0
    for p in range(len(planted)):
        top2 = {c for c, _ in app.predict_interests(p, k=2)}
        hits += top2 == {f"c{c}" for c in planted[p]}
    assert hits / len(planted) > 0.7
    with pytest.raises(ValueError):
        app.predict_interests()
    with pytest.raises(KeyError):
        app.predict_interests(10_000)


def test_recommend_excludes_seen_and_special_items(trained):
    run, app, _, splits, planted = trained
    test = splits["test"]
    for p in range(5):
        recs = app.recommend(p, k=10)
        ids = [run.id_of("item", tok) for tok, _ in recs]
        seen = set(test.item[p, : test.lengths[p]].tolist())
        assert len(recs) == 10 and not (set(ids) & seen) and min(ids) >= 2
        assert [s for _, s in recs] == sorted([s for _, s in recs], reverse=True)
        with_seen = [run.id_of("item", tok) for tok, _ in app.recommend(p, k=10, exclude_seen=False)]
        assert set(with_seen) & seen  # repeat items (the repeat term) come back when allowed
    # recommendations (seen items allowed) follow the planted categories
    in_planted = np.mean([(2 + (run.id_of("item", tok) - 2) // TOY_ITEMS_PER_CAT) in set(planted[p])
                          for p in range(50) for tok, _ in app.recommend(p, k=5, exclude_seen=False)])
    assert in_planted > 0.6  # random: 2 of 12 categories


def test_target_users(trained):
    run, app, _, _, planted = trained
    c = 5
    top = app.target_users(f"c{c}", k=10)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True)
    precision = np.mean([c in planted[int(person)] for person, _ in top])
    assert precision >= 0.8  # ~1/6 of persons have any given category planted
    with pytest.raises(KeyError):
        app.target_users("no-such-category")


def test_similar_users_is_exact_cosine(trained):
    run, app, _, _, _ = trained
    res = app.similar_users(3, k=5)
    assert all(person != 3 for person, _ in res) and len(res) == 5
    v = app.user_vectors()
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    sims = vn @ vn[3]
    sims[3] = -np.inf
    expected = np.argsort(-sims, kind="stable")[:5]
    assert [p for p, _ in res] == expected.tolist()
    np.testing.assert_allclose([s for _, s in res], sims[expected], atol=1e-5)
    idx, s = cosine_top_k(v, v[3], 5, exclude=3, use_faiss=True)  # falls back to exact numpy without faiss
    assert idx.tolist() == expected.tolist()


def test_explain_is_leave_one_out(trained):
    run, app, _, splits, planted = trained
    p = 7
    c = f"c{sorted(planted[p])[0]}"
    res = app.explain(p, c, k=50)
    assert res["method"] == "leave-one-out occlusion"
    test = splits["test"]
    L = int(test.lengths[p])
    assert len(res["events"]) == L
    # check one event by hand: remove it, recompute
    ev = res["events"][0]
    i = ev["position"]
    keep = [t for t in range(L) if t != i]
    fields = [np.zeros((1, test.item.shape[1]), np.int64) for _ in range(4)]
    for f, arr in zip(fields, (test.item, test.category, test.action, test.platform)):
        f[0, : L - 1] = arr[p, keep]
    without = run.interest_probabilities(run.user_vectors(ArrayBatch(*fields, np.array([L - 1]))))[0,
                                                                                                  run.id_of("category", c)]
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    assert res["unit"] == "log-odds"
    assert ev["contribution"] == pytest.approx(logit(res["probability"]) - logit(without), abs=1e-3)
    # events of the planted category itself support the interest on average
    own = [e["contribution"] for e in res["events"] if e["category"] == c]
    other = [e["contribution"] for e in res["events"] if e["category"] != c]
    assert np.mean(own) > np.mean(other)
