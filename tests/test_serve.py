"""Serving (issue 6): Session (state, append, cold start, threads, durability), the HTTP app (every endpoint,
validation, micro-batching, back-pressure, metrics), and a real server process killed with SIGKILL.

One tiny trained run is built once for the module (synthetic events -> prepare -> 1 epoch of training);
the model's window (max_len) is 30 events so appends soon push old events out of it.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

import httpx
from fastinterest.serve import EventError, Session, StateMismatch
from fastinterest.serve.app import ServeConfig, create_app
from fastinterest.serve.engine import TorchEngine
from fastinterest.serve.events import EventEncoder

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 30
T0 = 1_704_164_136  # 2024-01-02


# ---------------------------------------------------------------------------- the trained run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fastinterest.data import generate_synthetic, prepare
    from fastinterest.train import TrainConfig
    from fastinterest.train.cli import train_on_prepared

    root = tmp_path_factory.mktemp("serve")
    generate_synthetic(2500, root / "events.csv", seed=3, n_categories=12, median_length=25.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the public default pseudonym key
        prepare(root / "events.csv", root / "prepared", progress=False)
    cfg = TrainConfig(epochs=1, embedding_dim=16, hidden_size=24, batch_size=64, negatives=16, max_valid_rows=100,
                      layers="torch")
    train_on_prepared(root / "prepared", root / "run", cfg, max_len=WINDOW, resume=False, progress=False,
                      log=lambda *a: None)
    return root


@pytest.fixture(scope="module")
def session(trained):
    s = Session(trained / "run", state=":memory:")
    yield s
    s.close()


def ev(item, t, category="books", action="view", platform="shop"):
    return {"platform": platform, "action": action, "item_id": item, "timestamp": t, "category": category}


def vocab_tokens(session, field):
    return [t for t in session.run.tokens(field)[2:]]


def some_events(session, n, seed=0, t0=T0):
    rng = np.random.default_rng(seed)
    items, cats = vocab_tokens(session, "item"), vocab_tokens(session, "category")
    return [ev(items[rng.integers(len(items))], t0 + i, cats[rng.integers(len(cats))],
               ["view", "click", "cart"][rng.integers(3)], ["shop", "search", "video"][rng.integers(3)])
            for i in range(n)]


def reference_user(session, items, cats, actions, platforms):
    """The run's own forward over one full history (stock torch path): (user vector, (h, c))."""
    ids = [torch.as_tensor([x], dtype=torch.long) for x in (items, cats, actions, platforms)]
    lengths = torch.as_tensor([len(items)])
    with torch.no_grad():
        user, _ = session.model.encode(ids, lengths)
    return user[0].numpy()


def window_history(session, person):
    """(items, cats, actions, platforms) of a prepared person's last WINDOW events, from the prepared data."""
    from fastinterest.data import build_person_histories, load_prepared

    hist = build_person_histories(load_prepared(session.run.prepared_dir), WINDOW)
    r = int(person)
    L = int(hist.lengths[r])
    return [list(np.asarray(getattr(hist, f))[r, :L]) for f in ("item", "category", "action", "platform")]


def assert_same_answer(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Two answers agree: the same header fields, the same ranked names, scores within atol."""
    lists = [k for k in ("interests", "items", "persons") if k in a]
    assert {k: v for k, v in a.items() if k not in lists} == {k: v for k, v in b.items() if k not in lists}
    for key in lists:  # entries are {name: ..., score: ...}
        names_a, scores_a = zip(*(x.values() for x in a[key])) if a[key] else ((), ())
        names_b, scores_b = zip(*(x.values() for x in b[key])) if b[key] else ((), ())
        assert names_a == names_b, key
        np.testing.assert_allclose(scores_a, scores_b, atol=atol)


# ---------------------------------------------------------------------------- events
def test_event_encoder_matches_events_from_records(session):
    from fastinterest.data import events_from_records

    items, cats = vocab_tokens(session, "item"), vocab_tokens(session, "category")
    records = [
        {"user_id": "u", "platform": " SHOP ", "action": "View", "item_id": f" {items[0]} ", "timestamp": T0 + 5,
         "category": f"{cats[1]}|{cats[0]}"},
        {"user_id": "u", "platform": "search", "action": "click", "item_id": "never-seen", "timestamp": "2024-01-02T00:00:00Z",
         "category": "no-such-category"},
        {"user_id": "u", "platform": "video", "action": "cart", "item_id": items[3], "timestamp": str(T0 + 1)},
        {"user_id": "u", "platform": "mars", "action": "teleport", "item_id": items[2], "timestamp": T0 + 1,
         "category": [f" {cats[2]} ", cats[0]]},
        {"user_id": "u", "platform": "shop", "action": "view", "item_id": items[4], "timestamp": float(T0) + 0.7,
         "category": "|" + cats[3]},
        {"user_id": "u", "platform": "shop", "action": "like", "item_id": items[5], "timestamp": f"{T0 + 3}.25",
         "category": cats[4]},
        {"user_id": "u", "platform": "shop", "action": "view", "item_id": items[6], "timestamp": "2024-01-02 08:00:00+08:00"},
    ]
    ours = EventEncoder(session.run.vocab).encode(records)
    ref = events_from_records(records, session.run.vocab)
    for f in ("item", "category", "action", "platform", "timestamp"):
        assert np.asarray(getattr(ours, f)).tolist() == np.asarray(getattr(ref, f)).astype(np.int64).tolist(), f
    assert ours.item[0] == 1 and ours.category[0] == 1  # unknown item and category -> <unk>
    assert [r["item_id"] for r in ours.raw][:3] == ["never-seen", items[6], items[4]]  # raw dicts in time order


@pytest.mark.parametrize("bad, message", [
    ({"action": "view", "item_id": "x", "timestamp": T0}, "event 0: missing platform"),
    ({"platform": "shop", "action": "view", "item_id": " ", "timestamp": T0}, "event 0: missing item_id"),
    ({"platform": "shop", "action": "view", "item_id": "x", "timestamp": "yesterday"}, "cannot parse timestamp"),
    ({"platform": "shop", "action": "view", "item_id": "x", "timestamp": 12}, "outside"),
    ({"platform": ["shop"], "action": "view", "item_id": "x", "timestamp": T0}, "platform must be a string"),
    ({"platform": "shop", "action": "view", "item_id": "x", "timestamp": True}, "timestamp must be"),
    ({"platform": "shop", "action": "view", "item_id": "x", "timestamp": T0, "category": 3.5}, "category must be"),
    ("not an object", "event 0 must be an object"),
])
def test_event_encoder_rejects_bad_events(session, bad, message):
    with pytest.raises(EventError, match=message):
        session.encode_events([bad])


# ---------------------------------------------------------------------------- Session: state and answers
def test_known_person_matches_the_full_forward_and_interest_app(session):
    from fastinterest.apps import InterestApp

    person = 0
    hist = window_history(session, person)
    assert len(hist[0]) > 0
    user, known = session.user_vectors([person])
    assert known[0]
    np.testing.assert_allclose(user[0], reference_user(session, *hist), atol=2e-5)
    app = InterestApp.from_prepared(session.run)
    expected = app.predict_interests(person, k=5)
    got = session.interests(person, k=5)
    assert got["source"] == "model" and got["n_events"] >= len(hist[0])
    assert [x["category"] for x in got["interests"]] == [c for c, _ in expected]
    np.testing.assert_allclose([x["probability"] for x in got["interests"]], [p for _, p in expected], atol=1e-5)
    assert got["person"] == session.states.keys[session.states.row("0")]  # answered under the pseudonym


def test_append_equals_recomputing_the_whole_stream(trained):
    s = Session(trained / "run", state=":memory:")
    person = "1"
    hist = window_history(s, person)
    new = some_events(s, 2 * WINDOW + 3, seed=1)
    stream = [list(x) for x in hist]
    # one event (the step path), then 4 at once (a forward from the stored state), then one per call
    chunks = [new[:1], new[1:5]] + [[e] for e in new[5:]]
    for chunk in chunks:
        out = s.append(person, chunk)
        enc = s.encode_events(chunk)
        for lst, f in zip(stream, ("item", "category", "action", "platform")):
            lst.extend(enc.field(f).tolist())
        assert out["appended"] == len(chunk)
    # the model over the whole stream (the LSTM state runs over all of it; history features read the window)
    ids = [torch.as_tensor([x], dtype=torch.long) for x in stream]
    h_ref, c_ref = TorchEngine(s.model).run(ids, torch.as_tensor([len(stream[0])]))  # stock nn.LSTM, from scratch
    state = s.person_state(person)
    np.testing.assert_allclose(state["h"], h_ref[:, 0].numpy(), atol=5e-5)
    np.testing.assert_allclose(state["c"], c_ref[:, 0].numpy(), atol=5e-5)
    for j, f in enumerate(("item", "category", "action", "platform")):
        assert state["window"][f].tolist() == stream[j][-WINDOW:], f
    # the user vector = [h ; category shares of the window], as the model computes it for that window
    user, _ = s.user_vectors([person])
    expected = s.model.user_from_state(torch.as_tensor(state["h"][-1:]), torch.as_tensor([stream[1][-WINDOW:]]),
                                       torch.as_tensor([WINDOW]))[0].numpy()
    np.testing.assert_allclose(user[0], expected, atol=1e-6)
    # while the stream fits in the window it equals the model's own forward over it
    fresh = "fits-in-window"
    s.append(fresh, new[:10])
    s.append(fresh, new[10:12])
    enc = s.encode_events(new[:12])
    np.testing.assert_allclose(s.user_vectors([fresh])[0][0],
                               reference_user(s, *(enc.field(f).tolist() for f in ("item", "category", "action",
                                                                                      "platform"))), atol=2e-5)
    s.close()


class _CountingEngine:
    """Wraps an engine and records the shape of every call (what an append really computes)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.num_layers, self.hidden_size, self.name = engine.num_layers, engine.hidden_size, engine.name

    def run(self, ids, lengths, state=None):
        self.calls.append(("run", tuple(ids[0].shape)))
        return self.engine.run(ids, lengths, state)

    def step(self, ids_t, state):
        self.calls.append(("step", tuple(ids_t[0].shape)))
        return self.engine.step(ids_t, state)


def test_append_only_computes_the_new_events(trained):
    s = Session(trained / "run", state=":memory:")
    long_person = int(np.argmax(s.states.n_events[: s.states.size]))
    assert s.states.n_events[long_person] >= WINDOW  # a full history
    key = s.states.keys[long_person]
    s.engine = _CountingEngine(s.engine)
    s.append(key, some_events(s, 1))
    assert s.engine.calls == [("step", (1,))]
    s.engine.calls.clear()
    s.append_batch([key, "someone-new", key], [some_events(s, 3), some_events(s, 1), some_events(s, 2, seed=5)])
    assert s.engine.calls == [("run", (2, 5))]  # 2 persons; the longest has 3 + 2 new events
    s.close()


def test_fused_and_stock_torch_layers_give_the_same_answers(trained):
    fused = Session(trained / "run", state=":memory:", layers="fastinterest")
    stock = Session(trained / "run", state=":memory:", layers="torch")
    assert (fused.layers, stock.layers) == ("fastinterest", "torch")
    n = fused.states.size
    np.testing.assert_allclose(fused.states.user[:n], stock.states.user[:n], atol=2e-5)
    events = some_events(fused, 7, seed=2)
    for s in (fused, stock):
        s.append("3", events[:1])
        s.append("3", events[1:])
    np.testing.assert_allclose(fused.person_state("3")["h"], stock.person_state("3")["h"], atol=2e-5)
    a, b = fused.interests(events=events, k=4), stock.interests(events=events, k=4)
    assert [x["category"] for x in a["interests"]] == [x["category"] for x in b["interests"]]
    fused.close(), stock.close()


def test_recompute_mode_equals_the_state_while_the_stream_fits_the_window(trained):
    """The stateless baseline (every read reruns the LSTM over the window) gives the stateful answers."""
    stateful = Session(trained / "run", state=":memory:")
    stateless = Session(trained / "run", state=":memory:", recompute=True, layers="torch")
    short = [k for k, r in stateful.states.index.items() if 0 < stateful.states.n_events[r] < WINDOW - 5][:3]
    events = some_events(stateful, 4, seed=12)
    for s in (stateful, stateless):
        s.append(short[0], events)
        s.append("newcomer", events[:2])
    for person in short + ["newcomer"]:
        assert_same_answer(stateful.interests(person, k=5), stateless.interests(person, k=5))
        assert_same_answer(stateful.recommend(person, k=5), stateless.recommend(person, k=5), atol=1e-4)
    assert_same_answer(stateful.similar(short[1], k=4), stateless.similar(short[1], k=4))
    cat = stateful.run.tokens("category")[2]
    assert_same_answer(stateful.target(cat, k=5), stateless.target(cat, k=5))
    stateful.close(), stateless.close()


def test_cold_start_is_answered_from_popularity(session):
    vocab = session.run.vocab
    counts = np.asarray(vocab["category"]["counts"], float)
    counts[:2] = 0
    top_cats = [vocab["category"]["tokens"][i] for i in np.argsort(-counts, kind="stable")[:3]]
    for who in ({"person": "never-seen-before"}, {"events": []}):
        got = session.interests(**who, k=3)
        assert got["source"] == "popularity" and got["n_events"] == 0
        assert [x["category"] for x in got["interests"]] == top_cats
        np.testing.assert_allclose(got["interests"][0]["probability"], counts.max() / counts.sum())
    item_counts = np.asarray(vocab["item"]["counts"], float)
    item_counts[:2] = 0
    rec = session.recommend("never-seen-before", k=4)
    assert rec["source"] == "popularity"
    assert [x["item"] for x in rec["items"]] == [vocab["item"]["tokens"][i]
                                                 for i in np.argsort(-item_counts, kind="stable")[:4]]
    sim = session.similar("never-seen-before", k=3)
    assert sim["source"] == "popularity" and len(sim["persons"]) == 3  # the most typical persons
    assert session.person_state("never-seen-before") is None  # reads do not create persons


def test_similar_recommend_target_agree_with_the_definitions(session):
    from fastinterest.apps import cosine_top_k

    st = session.states
    rows = st.known_rows()
    vecs = st.user[rows]
    r = 4
    got = session.similar(st.keys[rows[r]], k=5)
    idx, sims = cosine_top_k(vecs, vecs[r], 5, exclude=r)
    assert [x["person"] for x in got["persons"]] == [st.keys[rows[i]] for i in idx]
    np.testing.assert_allclose([x["similarity"] for x in got["persons"]], sims, atol=1e-5)

    cat = session.run.tokens("category")[3]
    probs = session.run.interest_probabilities(vecs)[:, 3]
    got = session.target(cat, k=6)
    by_key = {st.keys[r]: p for r, p in zip(rows, probs)}
    np.testing.assert_allclose([x["probability"] for x in got["persons"]], np.sort(probs)[::-1][:6], atol=1e-6)
    np.testing.assert_allclose([x["probability"] for x in got["persons"]], [by_key[x["person"]] for x in got["persons"]],
                               atol=1e-6)  # the top 6 (up to float ties), each with its own probability
    item = session.run.tokens("item")[5]
    got_item = session.target(item=item, k=3)
    assert got_item["item"] == item and len(got_item["persons"]) == 3
    assert all(0 <= x["probability"] <= 1 for x in got_item["persons"])

    person = st.keys[rows[2]]
    seen = set(session.person_state(person)["window"]["item"].tolist())
    top = session.recommend(person, k=20)["items"]
    assert not {session.item_id(x["item"]) for x in top} & seen
    with_seen = session.recommend(person, k=len(session.run.tokens("item")), exclude_seen=False)["items"]
    assert {session.item_id(x["item"]) for x in with_seen} >= seen - {0, 1}
    with pytest.raises(KeyError, match="unknown category"):
        session.target("no-such-category")


def test_batch_forms_equal_single_calls(session):
    st = session.states
    persons = [st.keys[r] for r in st.known_rows()[:5]] + ["cold-one"]
    events = some_events(session, 12, seed=9)
    batch = session.interests_batch(persons + [None], events=[None] * len(persons) + [events], k=3)
    single = [session.interests(p, k=3) for p in persons] + [session.interests(events=events, k=3)]
    for a, b in zip(batch, single):
        assert_same_answer(a, b)
    rec = session.recommend_batch(persons, k=[2, 3, 4, 5, 6, 7])
    assert [len(r["items"]) for r in rec] == [2, 3, 4, 5, 6, 7]
    sim = session.similar_batch(persons, k=2)
    for a, p in zip(sim, persons):
        assert_same_answer(a, session.similar(p, k=2))
    cats = session.run.tokens("category")[2:5]
    tgt = session.target_batch(cats + [None], items=[None, None, None, session.run.tokens("item")[2]], k=4)
    for a, c in zip(tgt, cats):
        assert_same_answer(a, session.target(c, k=4))
    assert tgt[3]["item"] == session.run.tokens("item")[2] and len(tgt[3]["persons"]) == 4


def test_concurrent_calls_equal_serial_ones(trained):
    s = Session(trained / "run", state=":memory:")
    st = s.states
    persons = [st.keys[r] for r in st.known_rows()[:12]]
    events = some_events(s, 20, seed=4)
    cat = s.run.tokens("category")[2]
    calls = []
    for i, p in enumerate(persons):
        calls += [("interests", {"person": p, "k": 5}), ("recommend", {"person": p, "k": 5}),
                  ("similar", {"person": p, "k": 5}), ("interests", {"events": events[: i + 1], "k": 3})]
    calls.append(("target", {"category": cat, "k": 10}))

    def call(c):
        name, kw = c
        return getattr(s, name)(**kw)

    serial = [call(c) for c in calls]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(call, calls * 3))
    for a, b in zip(serial * 3, parallel):
        assert_same_answer(a, b)
    # appends from many threads (each thread its own person) = the same appends made serially
    other = Session(trained / "run", state=":memory:")
    streams = {f"t{i}": some_events(s, 6, seed=10 + i) for i in range(6)}

    def feed(item):
        person, evs = item
        for e in evs:
            s.append(person, [e])

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(feed, streams.items()))
    for person, evs in streams.items():
        for e in evs:
            other.append(person, [e])
        np.testing.assert_allclose(s.person_state(person)["h"], other.person_state(person)["h"], atol=1e-6)
        assert s.person_state(person)["n_events"] == 6
    s.close(), other.close()


def test_appends_are_durable_and_restart_restores_the_same_state(trained, tmp_path):
    path = tmp_path / "state.sqlite3"
    s = Session(trained / "run", state=path)
    events = some_events(s, 9, seed=6)
    s.append("5", events[:4])
    s.append("brand-new", events[4:])
    s.append("5", events[:1])
    before = {p: s.person_state(p) for p in ("5", "brand-new")}
    answers = s.interests_batch(["5", "brand-new"], k=5)
    s.close()
    again = Session(trained / "run", state=path)
    for p, st in before.items():
        now = again.person_state(p)
        for key in ("h", "c"):
            assert np.array_equal(now[key], st[key]), key  # bit for bit
        for f in st["window"]:
            assert np.array_equal(now["window"][f], st["window"][f]), f
        assert now["n_events"] == st["n_events"]
    assert again.interests_batch(["5", "brand-new"], k=5) == answers
    assert len(again.store.events_of("brand-new")) == 5
    # a second session on the same file (another worker process) sees and continues the first one's appends
    other = Session(trained / "run", state=path)
    again.append("brand-new", events[:2])
    assert other.person_state("brand-new")["n_events"] == 7
    other.append("brand-new", events[2:3])
    assert again.person_state("brand-new")["n_events"] == 8
    ref = Session(trained / "run", state=":memory:")
    for chunk in (events[4:], events[:2], events[2:3]):  # the same calls (each call is put in time order)
        ref.append("brand-new", chunk)
    np.testing.assert_allclose(again.person_state("brand-new")["h"], ref.person_state("brand-new")["h"], atol=5e-6)
    again.close(), other.close(), ref.close()
    with pytest.raises(StateMismatch, match="another run"):
        Session(trained / "run", state=path, max_len=WINDOW + 1)


def _state_arrays(s, keys):
    """Copies of the in-memory state rows of `keys`: (h, c, window, n_events, last_seq, user)."""
    st = s.states
    rows = np.asarray([st.row(k) for k in keys])
    return (st.h[rows].copy(), st.c[rows].copy(), st.window[rows].copy(), st.n_events[rows].copy(),
            st.last_seq[rows].copy(), st.user[rows].copy())


def _single_event_rounds(s, persons, rounds, seed):
    """Append one event to each of `persons` per call (the request path of `append`), `rounds` times."""
    for r in range(rounds):
        batch = some_events(s, len(persons), seed=seed + r, t0=T0 + 10_000 * (r + 1))
        s.append_batch(persons, [[e] for e in batch])


def test_single_event_path_equals_the_general_path(trained):
    """Appending one event to known, distinct persons (the per-request fast path: one step, the windows and
    user vectors by `fastpath`, preallocated step inputs) gives what the general path gives."""
    fast = Session(trained / "run", state=":memory:")
    general = Session(trained / "run", state=":memory:")
    general._fp = None                      # every append through `_advance_general`
    st = fast.states
    long_rows = [r for r in st.known_rows() if st.n_events[r] >= WINDOW][:3]   # full windows: they slide
    short_rows = [r for r in st.known_rows() if 0 < st.n_events[r] < WINDOW - 5][:3]
    persons = [st.keys[r] for r in long_rows + short_rows]
    assert len(long_rows) == 3 and len(short_rows) == 3
    for s in (fast, general):
        s.append("new-person", some_events(s, 2, seed=3))   # a new person: general path in both
        _single_event_rounds(s, persons + ["new-person"], 7, seed=40)
        _single_event_rounds(s, persons[:1], 2, seed=60)    # B = 1
    keys = persons + ["new-person"]
    a, b = _state_arrays(fast, keys), _state_arrays(general, keys)
    for name, x, y in zip(("h", "c", "window", "n_events", "last_seq", "user"), a, b):
        if name == "user":
            np.testing.assert_allclose(x, y, atol=1e-6)
        else:
            assert np.array_equal(x, y), name
    for f in ("interests_batch", "recommend_batch", "similar_batch"):
        for x, y in zip(getattr(fast, f)(keys, k=5), getattr(general, f)(keys, k=5)):
            assert_same_answer(x, y, atol=1e-6)
    # the unit vectors (`similar`) are derived lazily from the user vectors the appends wrote
    P = st.size
    unit = st.unit[:P]
    norms = np.linalg.norm(st.user[:P], axis=1, keepdims=True)
    np.testing.assert_allclose(unit, st.user[:P] / np.maximum(norms, 1e-12), atol=1e-6)
    fast.close(), general.close()


def test_compiled_fastpath_equals_numpy(trained, monkeypatch):
    """The numba functions of `fastpath` (gather, windows + user vectors, scatter, interest head + top k) give
    what their numpy forms give; FASTINTEREST_SERVE_NUMBA=0 switches them off."""
    from fastinterest.serve import fastpath

    pytest.importorskip("numba")
    compiled = Session(trained / "run", state=":memory:")
    assert compiled._fp.name == "numba" and compiled._head_topk is not None
    monkeypatch.setenv("FASTINTEREST_SERVE_NUMBA", "0")
    plain = Session(trained / "run", state=":memory:")
    assert plain._fp is fastpath.NUMPY and plain._head_topk is None
    st = compiled.states
    persons = [st.keys[r] for r in st.known_rows()[:9]]
    for s in (compiled, plain):
        _single_event_rounds(s, persons, 2 * WINDOW, seed=70)   # every window fills and slides
    for name, x, y in zip(("h", "c", "window", "n_events", "last_seq", "user"), _state_arrays(compiled, persons),
                          _state_arrays(plain, persons)):
        assert np.array_equal(x, y), name
    for k in (1, 5, 100):   # k above the number of categories: every category, pad and unk last
        for x, y in zip(compiled.interests_batch(persons + ["cold"], k=k), plain.interests_batch(persons + ["cold"], k=k)):
            assert_same_answer(x, y, atol=1e-6)
    compiled.close(), plain.close()


def test_in_memory_state_equals_the_persisted_state_after_restart(trained, tmp_path):
    """Every state the appends leave in memory (the fast path included) is the one a restart loads from disk."""
    path = tmp_path / "state.sqlite3"
    s = Session(trained / "run", state=path)
    st = s.states
    persons = [st.keys[r] for r in st.known_rows()[:5]]
    s.append("fresh", some_events(s, 3, seed=80))
    _single_event_rounds(s, persons + ["fresh"], WINDOW + 4, seed=90)
    s.append_batch(persons[:2], [some_events(s, 2, seed=99, t0=T0 + 10**7)] * 2)   # several events at once
    keys = persons + ["fresh"]
    before = _state_arrays(s, keys)
    answers = s.interests_batch(keys, k=5)
    s.close()
    again = Session(trained / "run", state=path)
    for name, x, y in zip(("h", "c", "window", "n_events", "last_seq", "user"), before, _state_arrays(again, keys)):
        assert np.array_equal(x, y), name   # bit for bit (the user vector is recomputed from the stored state)
    assert again.interests_batch(keys, k=5) == answers
    assert again.store.count_events() == 3 + (WINDOW + 4) * 6 + 4
    again.close()


def test_a_restart_without_checkpoint_replays_the_log(trained, tmp_path):
    """The states are checkpointed behind the log: a process that dies without closing (kill -9) leaves every
    acknowledged event in the log, and the next start replays the events after the last checkpoint."""
    path = tmp_path / "state.sqlite3"
    s = Session(trained / "run", state=path, checkpoint_every=25)   # a checkpoint every 25 events or so
    st = s.states
    persons = [st.keys[r] for r in st.known_rows()[:4]]
    s.append("fresh", some_events(s, 3, seed=5))
    _single_event_rounds(s, persons + ["fresh"], 13, seed=7)
    s.append_batch([persons[0], "fresh", persons[0]], [some_events(s, 2, seed=8, t0=T0 + 10**7)] * 3)
    assert 0 < s.store.watermark() < s.store.count_events()   # checkpoints were written, the tail was not
    keys = persons + ["fresh"]
    before = _state_arrays(s, keys)
    answers = s.interests_batch(keys, k=5)
    # the file as a kill -9 leaves it (copied while `s` is idle): the last checkpoint and the whole log
    crash = tmp_path / "crash.sqlite3"
    for suffix in ("", "-wal", ".log"):
        shutil.copyfile(str(path) + suffix, str(crash) + suffix)
    s.close()   # the checkpoint at close: the next start loads every state as it was, bit for bit
    assert s.store is None
    again = Session(trained / "run", state=path)
    for name, x, y in zip(("h", "c", "window", "n_events", "last_seq", "user"), before, _state_arrays(again, keys)):
        assert np.array_equal(x, y), name
    again.close()
    crashed = Session(trained / "run", state=crash)   # replays the events after the last checkpoint
    after = _state_arrays(crashed, keys)
    for name, x, y in zip(("h", "c", "window", "n_events", "last_seq", "user"), before, after):
        if name in ("h", "c", "user"):   # replayed in other batches than the appends ran in
            np.testing.assert_allclose(y, x, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(x, y), name
    for a, b in zip(crashed.interests_batch(keys, k=5), answers):
        assert_same_answer(a, b, atol=1e-6)
    assert crashed.store.count_events() == 3 + 13 * 5 + 6
    crashed.close()


def test_single_event_path_with_a_state_file_equals_the_general_path(trained, tmp_path):
    """With a state file, the request path (one record at the log's end, `StateStore.append_events`) leaves the
    same states and the same log as the general path (every append in a transaction), and a restart restores it."""
    fast = Session(trained / "run", state=tmp_path / "fast.sqlite3")
    general = Session(trained / "run", state=tmp_path / "general.sqlite3")
    general._fp = None
    st = fast.states
    persons = [st.keys[r] for r in st.known_rows()[:5]]
    for s in (fast, general):
        s.append("fresh", some_events(s, 2, seed=11))
        _single_event_rounds(s, persons + ["fresh"], WINDOW + 3, seed=12)
        _single_event_rounds(s, ["fresh"], 2, seed=13)
    keys = persons + ["fresh"]
    for name, x, y in zip(("h", "c", "window", "n_events", "last_seq", "user"), _state_arrays(fast, keys),
                          _state_arrays(general, keys)):
        assert np.array_equal(x, y), name
    assert list(fast.store.log.events()) == list(general.store.log.events())
    assert fast.appended_events("fresh") == general.appended_events("fresh")
    before = _state_arrays(fast, keys)
    fast.close(), general.close()
    again = Session(trained / "run", state=tmp_path / "fast.sqlite3")
    for name, x, y in zip(("h", "c", "window", "n_events", "last_seq", "user"), before, _state_arrays(again, keys)):
        assert np.array_equal(x, y), name
    again.close()


def test_appends_of_two_processes_on_one_store_interleave(trained, tmp_path):
    """Two sessions on one state file (two worker processes) append single events to the same persons in turn:
    each append finds the log moved on by the other one (`append_events` declines), replays those events, and
    appends after them; both end with the states of the whole log replayed in order."""
    path = tmp_path / "state.sqlite3"
    a, b = Session(trained / "run", state=path), Session(trained / "run", state=path)
    persons = [a.states.keys[r] for r in a.states.known_rows()[:3]]
    events = some_events(a, 24, seed=21, t0=T0 + 10**6)
    for i, e in enumerate(events):
        (a if i % 2 == 0 else b).append(persons[i % 3], [e])
    seq = a.store.last_seq()
    assert seq == len(events)
    assert a.store.append_events([("x", T0, 2, 2, 2, 2, "{}")], after=seq - 1) is None   # the log moved on
    assert a.store.last_seq() == seq                                                      # nothing written
    ref = Session(trained / "run", state=":memory:")
    for i, e in enumerate(events):
        ref.append(persons[i % 3], [e])
    for s in (a, b):
        s.interests_batch(persons)   # a read picks up the other session's last appends
        for p in persons:
            got, want = s.person_state(p), ref.person_state(p)
            assert got["n_events"] == want["n_events"]
            np.testing.assert_allclose(got["h"], want["h"], atol=1e-6)
    a.close(), b.close(), ref.close()


_KILL_AFTER_APPENDS = """
import os, signal, sys
from fastinterest.serve import Session
s = Session(sys.argv[1], state=sys.argv[2])
person = s.states.keys[int(s.states.known_rows()[0])]
for i in range(int(sys.argv[3])):
    s.append(person, [{"platform": "shop", "action": "view", "item_id": "kill-%d" % i, "timestamp": 1704164136 + i}])
    print(person, i, flush=True)   # acknowledged
os.kill(os.getpid(), signal.SIGKILL)   # no close, no checkpoint
"""


def test_an_acknowledged_single_event_append_survives_kill_9(trained, tmp_path):
    """An append on the request path is committed before it returns: killed right after, the process leaves
    every acknowledged event in the log, and a restart replays them."""
    path = tmp_path / "state.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_APPENDS, str(trained / "run"), str(path), "7"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acked = proc.stdout.split("\n")[:-1]
    assert len(acked) == 7
    person = acked[0].split()[0]
    again = Session(trained / "run", state=path)
    assert [e["item_id"] for e in again.appended_events(person)] == [f"kill-{i}" for i in range(7)]
    fresh = Session(trained / "run", state=":memory:")
    n0 = fresh.person_state(person)["n_events"]
    assert again.person_state(person)["n_events"] == n0 + 7
    again.close(), fresh.close()


_APPEND_WORKER = """
import json, sys
from fastinterest.serve import Session
import os, time
run, state, tag, persons, n = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
s = Session(run, state=state)
print("ready", flush=True)
while not os.path.exists(state + ".go"):   # both workers start appending together
    time.sleep(0.001)
for i in range(n):
    s.append(persons[i % len(persons)], [{"platform": "shop", "action": "view", "item_id": "%s-%d" % (tag, i),
                                          "timestamp": 1704164136 + i}])
    time.sleep(0.001)
s.close()
print("done", flush=True)
"""


def test_two_worker_processes_append_to_one_store_at_once(trained, tmp_path):
    """Two processes (what `serve --workers 2` runs) append single events for the same persons at the same time:
    the log holds every event once, and a session opened afterwards has the states of the whole log applied in
    log order (a fresh in-memory session fed the logged events in that order)."""
    path = tmp_path / "state.sqlite3"
    first = Session(trained / "run", state=path)   # creates the store (and shows which persons exist)
    persons = [first.states.keys[r] for r in first.states.known_rows()[:3]]
    first.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND_WORKER, str(trained / "run"), str(path), tag,
                               json.dumps(persons), "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for tag in ("a", "b")]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    Path(str(path) + ".go").touch()
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "done", err
    after = Session(trained / "run", state=path)
    logged = list(after.store.log.events())
    assert [e[0] for e in logged] == list(range(1, 81))
    tags = [json.loads(e[7])["item_id"][0] for e in logged]
    assert sum(x != y for x, y in zip(tags, tags[1:])) >= 2   # the two workers' appends did interleave
    for tag in ("a", "b"):   # each worker's events once, in its order
        assert [json.loads(e[7])["item_id"] for e in logged if json.loads(e[7])["item_id"].startswith(tag)] == [
            f"{tag}-{i}" for i in range(40)]
    ref = Session(trained / "run", state=":memory:")
    for e in logged:
        ref.append(e[1], [json.loads(e[7])])
    for p in persons:
        got, want = after.person_state(p), ref.person_state(p)
        assert got["n_events"] == want["n_events"]
        np.testing.assert_allclose(got["h"], want["h"], atol=1e-6)
        np.testing.assert_allclose(got["c"], want["c"], atol=1e-6)
    after.close(), ref.close()


def test_head_topk_ranks_like_a_stable_sort():
    """`fastpath.head_topk` (rows read straight from the state arrays, the k best by insertion) ranks like the
    numpy head + `_top_k` (a stable sort): ties by lower id, NaN last, pad and unk (ids 0, 1) after every
    other id, k up to the number of ids. Integer weights make every logit exact, so that both compute the same
    probabilities and the rankings must be equal."""
    from fastinterest.serve import fastpath
    from fastinterest.serve.session import _top_k

    pytest.importorskip("numba")
    rng = np.random.default_rng(5)
    U, C = 6, 10
    wt = rng.integers(-3, 4, (U, C)).astype(np.float32)
    wt[:, 4] = wt[:, 2]                    # ids 2 and 4 always tie
    wt[:, 7] = 0.0                         # id 7: its bias alone
    b = rng.integers(-2, 3, C).astype(np.float32)
    b[4] = b[2]
    b[6] = 60.0                            # id 6 saturates at 1.0
    b[8] = np.nan                          # id 8: NaN, ranked after every number
    user = rng.integers(-2, 3, (8, U)).astype(np.float32)
    user[3] = 0.0                          # every logit its bias: more ties
    user[5] *= 50.0                        # large logits: probabilities saturate to 0 or 1 (ties)
    rows = np.asarray([5, 3, 0, 7, 3, 1], np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        probs = (np.float32(1.0) / (np.float32(1.0) + np.exp(-(user[rows] @ wt + b)))).astype(np.float32)
    probs[:, :2] = -np.inf
    for k in (1, 3, C - 2, C):
        idx, val = np.empty((len(rows), k), np.int64), np.empty((len(rows), k), np.float32)
        fastpath.head_topk(user, rows, wt, b, idx, val)
        idx_ref, val_ref = _top_k(probs, k)
        assert np.array_equal(idx, idx_ref), k
        np.testing.assert_allclose(val, val_ref, rtol=0, atol=1e-6)


def test_bound_step_equals_the_module_step(session):
    """`FusedEngine.bind_step` (the kernel call bound to fixed numpy buffers) = the public `step`; the buffers of
    an engine without it (stock torch layers) fall back to its `step`."""
    from fastinterest.serve.session import _StepBuffers

    engine = session.engine
    L, H = engine.num_layers, engine.hidden_size
    for B in (1, 5):
        buf = _StepBuffers(engine, L, B, H, WINDOW, session.states.user_dim, torch.device("cpu"))
        rng = np.random.default_rng(B)
        buf.table[:, :4] = np.stack([rng.integers(0, getattr(session.model.encoder.embeddings, f).num_embeddings, B)
                                     for f in ("item", "category", "action", "platform")], axis=1)
        buf.h0[...] = rng.standard_normal(buf.h0.shape)
        buf.c0[...] = rng.standard_normal(buf.c0.shape)
        buf.step()
        ids = [torch.from_numpy(buf.table[:, j].copy()) for j in range(4)]
        h, c = engine.step(ids, (torch.from_numpy(buf.h0.copy()), torch.from_numpy(buf.c0.copy())))
        assert np.array_equal(buf.h1, h.numpy()) and np.array_equal(buf.c1, c.numpy())
        if engine.name == "fastinterest":
            assert buf.step != buf._engine_step   # the bound kernel call
    stock = TorchEngine(session.model)
    buf = _StepBuffers(stock, L, 2, H, WINDOW, session.states.user_dim, torch.device("cpu"))
    assert buf.step == buf._engine_step


def test_engine_step_equals_the_module_step(session):
    """The serving step (`EmbeddingLSTM.step_fn`, bound once) = the public `step`: ids as strided columns of an
    events table, and ids out of range raise."""
    engine = session.engine
    if engine.name != "fastinterest":
        pytest.skip("stock torch layers: no fused step")
    L, H = engine.num_layers, engine.hidden_size
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(L, 5, H, generator=gen)
    c = torch.randn(L, 5, H, generator=gen)
    table = torch.stack([torch.randint(0, getattr(session.model.encoder.embeddings, f).num_embeddings, (5,),
                                       generator=gen) for f in ("item", "category", "action", "platform")] +
                        [torch.zeros(5, dtype=torch.long)], dim=1)   # [5, 5]: columns are strided views
    ids = [table[:, j] for j in range(4)]
    with torch.no_grad():
        _, (h_ref, c_ref) = engine.net.step([t.contiguous() for t in ids], (h, c))
    h_new, c_new = engine.step(ids, (h, c))
    assert torch.equal(h_new, h_ref) and torch.equal(c_new, c_ref)
    bad = table.clone()
    bad[2, 0] = session.model.encoder.embeddings.item.num_embeddings
    with pytest.raises(IndexError):
        engine.step([bad[:, j] for j in range(4)], (h, c))


def test_encode_many_equals_encode(session):
    items, cats = vocab_tokens(session, "item"), vocab_tokens(session, "category")
    lists = [[ev(items[i], T0 + i, cats[i % len(cats)], action=" Click ", platform="SHOP")] for i in range(5)]
    lists.append([ev("not-in-vocab", T0, None)])
    many = session.encoder.encode_many(lists)
    for got, evs in zip(many, lists):
        want = session.encoder.encode(evs)
        assert np.array_equal(got.table, want.table) and got.raw == want.raw
    mixed = lists[:2] + [some_events(session, 3)]   # not one event each: per-list encode
    assert [len(e) for e in session.encoder.encode_many(mixed)] == [1, 1, 3]
    with pytest.raises(EventError, match="event 0: missing platform"):
        session.encoder.encode_many([[ev(items[0], T0)], [{"action": "view", "item_id": "x", "timestamp": T0}]])


def test_session_input_errors(session):
    with pytest.raises(ValueError, match="exactly one of person or events"):
        session.interests_batch(["a"], events=[some_events(session, 1)])
    with pytest.raises(TypeError, match="person is a string or an integer"):
        session.interests(3.5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        session.interests("0", k=0)
    with pytest.raises(EventError, match="no events"):
        session.append("0", [])


# ---------------------------------------------------------------------------- HTTP app (in process)
@pytest.fixture(scope="module")
def http_session(trained):
    s = Session(trained / "run", state=":memory:")
    yield s
    s.close()


class AppClient:
    """An httpx AsyncClient on the ASGI app with its lifespan running (startup and shutdown)."""

    def __init__(self, app):
        self.app = app

    async def __aenter__(self):
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")
        return self.client

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self._lifespan.__aexit__(None, None, None)


def run_async(coro):
    return asyncio.run(coro)


def test_every_endpoint_answers(http_session):
    cfg = ServeConfig(run=str(http_session.run_dir), max_wait_ms=0)
    person = http_session.states.keys[0]
    cat = http_session.run.tokens("category")[2]
    item = http_session.run.tokens("item")[2]
    events = some_events(http_session, 5, seed=7)

    async def go():
        async with AppClient(create_app(cfg, session=http_session)) as c:
            health = (await c.get("/healthz")).json()
            assert health["status"] == "ok" and health["layers"] == "fastinterest" and health["persons"] > 0
            r = await c.post("/interests", json={"person": person, "k": 3})
            assert r.status_code == 200 and r.json() == http_session.interests(person, k=3)
            r = await c.post("/interests", json={"events": events})
            assert r.status_code == 200 and len(r.json()["interests"]) == 10
            r = await c.post("/recommend", json={"person": person, "k": 4, "exclude_seen": False})
            assert r.json() == http_session.recommend(person, k=4, exclude_seen=False)
            r = await c.post("/similar", json={"person": person, "k": 2})
            assert r.json() == http_session.similar(person, k=2)
            r = await c.post("/target", json={"category": cat, "k": 5})
            assert r.json() == http_session.target(cat, k=5)
            r = await c.post("/target", json={"item": item, "k": 5})
            assert r.status_code == 200 and r.json()["item"] == item
            r = await c.post("/append", json={"person": "http-new", "events": events})
            assert r.json() == {"person": "http-new", "appended": 5, "n_events": 5}
            r = await c.post("/interests", json={"person": "http-new"})
            assert r.json()["source"] == "model" and r.json()["n_events"] == 5
            r = await c.post("/interests", json={"person": "cold-http"})
            assert r.json()["source"] == "popularity"
            text = (await c.get("/metrics")).text
            assert 'fastinterest_requests_total{endpoint="interests",status="200"} 4.0' in text
            assert 'fastinterest_batch_size_count{method="append"} 1.0' in text
            assert "fastinterest_request_seconds_bucket" in text and "fastinterest_appended_events_total 5.0" in text
            assert (await c.get("/interests")).status_code == 405
            assert (await c.post("/nothing", json={})).status_code == 404

    run_async(go())


@pytest.mark.parametrize("path, body, status, message", [
    ("/interests", b'{"person": "x", "k": 3', 400, "malformed JSON"),
    ("/interests", b"\xff\xfe", 400, "malformed JSON"),
    ("/interests", b'[1, 2]', 422, "must be a JSON object"),
    ("/interests", b'{"person": "x", "events": []}', 422, "exactly one of person or events"),
    ("/interests", b'{"persn": "x"}', 422, "unknown field(s) 'persn'"),
    ("/interests", b'{"person": 1.5}', 422, "person must be a string or an integer"),
    ("/interests", b'{"person": "x", "k": "3"}', 422, "k must be an integer"),
    ("/interests", b'{"person": "x", "k": 0}', 422, "k must be between 1 and"),
    ("/recommend", b'{"person": "x", "exclude_seen": "yes"}', 422, "exclude_seen must be true or false"),
    ("/target", b'{"category": "no-such-category"}', 422, "unknown category"),
    ("/target", b'{"category": 7}', 422, "category must be a string"),
    ("/target", b'{}', 422, "exactly one of category or item"),
    ("/append", b'{"person": "x"}', 422, "append needs person and events"),
    ("/append", b'{"person": "x", "events": []}', 422, "events must not be empty"),
    ("/append", b'{"person": "x", "events": {"a": 1}}', 422, "events must be a list"),
    ("/append", b'{"person": "x", "events": [{"platform": "shop"}]}', 422, "event 0: missing action"),
    ("/append", json.dumps({"person": "x", "events": [ev("i", T0)] * 6}).encode(), 413, "too many events: 6"),
    ("/interests", b'{"person": "' + b"x" * 3000 + b'"}', 413, "request body over"),
])
def test_validation_errors_are_4xx_with_a_clear_message(http_session, path, body, status, message):
    cfg = ServeConfig(run=str(http_session.run_dir), max_events=5, max_body_bytes=2048)

    async def go():
        async with AppClient(create_app(cfg, session=http_session)) as c:
            r = await c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, r.text
            assert message in r.json()["error"]

    run_async(go())


def test_a_body_without_content_length_is_cut_off_at_the_limit(http_session):
    cfg = ServeConfig(run=str(http_session.run_dir), max_body_bytes=2048)

    async def chunks():
        yield b'{"person": "'
        for _ in range(100):
            yield b"x" * 100   # 10 kB in chunks, no Content-Length
        yield b'"}'

    async def go():
        async with AppClient(create_app(cfg, session=http_session)) as c:
            r = await c.post("/interests", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and "request body over 2048 bytes" in r.json()["error"]

    run_async(go())


def test_concurrent_requests_are_micro_batched_and_equal_serial_answers(http_session):
    cfg = ServeConfig(run=str(http_session.run_dir), max_batch=16, max_wait_ms=5)
    st = http_session.states
    persons = [st.keys[r] for r in st.known_rows()[:24]]
    histories = [some_events(http_session, 3 + i, seed=i) for i in range(8)]
    serial = [http_session.interests(p, k=4) for p in persons] + \
             [http_session.interests(events=h, k=4) for h in histories]

    async def go():
        async with AppClient(create_app(cfg, session=http_session)) as c:
            bodies = [{"person": p, "k": 4} for p in persons] + [{"events": h, "k": 4} for h in histories]
            rs = await asyncio.gather(*(c.post("/interests", json=b) for b in bodies))
            metrics = (await c.get("/metrics")).text
            return [r.json() for r in rs], metrics

    answers, metrics = run_async(go())
    for a, b in zip(answers, serial):
        assert_same_answer(a, b)
    count = float(metrics.split('fastinterest_batch_size_count{method="interests"} ')[1].split()[0])
    assert count < len(serial)  # 32 requests in fewer batch calls
    assert 'fastinterest_batch_size_bucket{le="1.0",method="interests"}' in metrics


def test_overload_is_refused_with_429_and_shutdown_with_503(http_session):
    cfg = ServeConfig(run=str(http_session.run_dir), max_batch=1, max_wait_ms=0, max_queue=2)
    release = threading.Event()

    class Slow:
        """The session with an interests_batch that blocks until released."""

        def __getattr__(self, name):
            return getattr(http_session, name)

        def interests_batch(self, *a, **kw):
            release.wait(10)
            return http_session.interests_batch(*a, **kw)

    app = create_app(cfg, session=Slow())

    async def go():
        async with AppClient(app) as c:
            tasks = [asyncio.create_task(c.post("/interests", json={"person": "x"})) for _ in range(8)]
            await asyncio.sleep(0.3)
            release.set()
            rs = await asyncio.gather(*tasks)
            codes = sorted(r.status_code for r in rs)
            # bounded: at most max_queue waiting + max_batch computing are accepted, the rest refused at once
            assert set(codes) <= {200, 429} and 2 <= codes.count(200) <= 3, codes
            assert next(r for r in rs if r.status_code == 429).headers["retry-after"] == "1"
            app.state.ctx["status"] = "draining"  # what the lifespan sets when shutdown begins
            r = await c.post("/interests", json={"person": "x"})
            assert r.status_code == 503 and "draining" in r.json()["error"]
            assert (await c.get("/healthz")).status_code == 503
            app.state.ctx["status"] = "ok"
            assert 'fastinterest_rejected_total{method="interests",reason="queue_full"}' in (await c.get("/metrics")).text

    run_async(go())


def test_micro_batcher_batches_drains_on_close_and_expires_stale_requests():
    from fastinterest.serve.batching import MicroBatcher, Unavailable

    calls = []

    def double(items):
        calls.append(len(items))
        time.sleep(0.05)
        return [2 * x for x in items]

    async def go():
        b = MicroBatcher("double", double, max_batch=4, max_wait=0.005, max_queue=100, queue_timeout=0.12)
        b.start()
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.01)  # the first batch is computing while the next requests queue up
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 10)]
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        # queued at most ~0.15 s: those still waiting after 0.12 s are refused instead of computed late
        assert results[0] == 0 and all(r == 2 * i for i, r in enumerate(results) if not isinstance(r, Exception))
        assert any(isinstance(r, Unavailable) for r in results) and max(calls) <= 4
        calls.clear()
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        await b.close()                        # shutdown: what was queued is still answered
        assert [await p for p in pending] == [0, 2, 4]
        with pytest.raises(Unavailable, match="shutting down"):
            await b.submit(1)

    run_async(go())


# ---------------------------------------------------------------------------- a real server process
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(run_dir, state, port, log_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fastinterest", "serve", str(run_dir), "--port", str(port), "--state", str(state),
           "--threads", "1", "--max-wait-ms", "0"]
    with open(log_path, "a") as log:  # the server keeps its own copy of the file descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 120 s")


def test_kill_9_mid_stream_loses_no_acknowledged_event(trained, tmp_path):
    state = tmp_path / "state.sqlite3"
    port = _free_port()
    log = tmp_path / "server.log"
    proc = _start_server(trained / "run", state, port, log)
    url = f"http://127.0.0.1:{port}"
    probe = Session(trained / "run", state=":memory:")
    streams = {f"p{i}": some_events(probe, 400, seed=20 + i) for i in range(4)}
    streams["0"] = some_events(probe, 400, seed=30)       # a prepared person too
    acked = {p: 0 for p in streams}                       # events acknowledged per person
    seen_after = {p: None for p in streams}               # (n_events, interests) read after the last ack
    stop = threading.Event()

    def client(person):
        evs = streams[person]
        with httpx.Client(base_url=url, timeout=10) as c:
            i = 0
            while not stop.is_set() and i < len(evs):
                batch = evs[i:i + 1 + i % 3]
                try:
                    r = c.post("/append", json={"person": person, "events": batch})
                except httpx.HTTPError:
                    return
                assert r.status_code == 200, r.text
                acked[person] += len(batch)
                i += len(batch)
                try:
                    seen_after[person] = (r.json()["n_events"], c.post("/interests", json={"person": person}).json())
                except httpx.HTTPError:
                    return

    threads = [threading.Thread(target=client, args=(p,)) for p in streams]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGKILL)                  # mid-stream: appends are in flight
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(20)
    assert sum(acked.values()) > 10, acked

    proc = _start_server(trained / "run", state, port, log)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            for person, n_acked in acked.items():
                base = probe.person_state(person)["n_events"] if probe.person_state(person) else 0
                now = c.post("/interests", json={"person": person}).json()
                # every acknowledged event is there; at most the one in-flight append may be there too
                assert base + n_acked <= now["n_events"] <= base + n_acked + 3, (person, n_acked, now)
                last = seen_after[person]
                if last is not None and now["n_events"] == last[0]:
                    assert_same_answer(now, last[1], atol=1e-6)   # the same state, so the same answer
        # the stored states equal a replay of the stored events from scratch
        replay = Session(trained / "run", state=":memory:")
        store_view = Session(trained / "run", state=state)
        for person in streams:
            replay.append(person, store_view.appended_events(person))
            np.testing.assert_allclose(store_view.person_state(person)["h"], replay.person_state(person)["h"],
                                       atol=5e-6)
        store_view.close(), replay.close()
        # graceful shutdown: SIGTERM -> uvicorn finishes, the lifespan closes the store (SQLite folds the WAL
        # into the database and removes it when the last connection closes), then uvicorn re-raises SIGTERM
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert not Path(str(state) + "-wal").exists()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        probe.close()
