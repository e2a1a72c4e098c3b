"""Examples and splits: no leakage on either split, left alignment, labels, strides, histories, new persons."""
from __future__ import annotations

import numpy as np
import pytest

from fastinterest.data import (
    DataError, EventTable, Prepared, Vocab, build_examples, build_person_histories, events_from_records, load_prepared,
)


def make_prepared(people: list[list[tuple[int, int, list[int]]]], n_categories: int = 8) -> Prepared:
    """A Prepared from per-person lists of (timestamp, item, categories), already in time order."""
    rows = [(p, t, item, cats) for p, events in enumerate(people) for (t, item, cats) in events]
    n = len(rows)
    lengths = [len(r[3]) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    events = EventTable(
        person=np.array([r[0] for r in rows], np.int32), timestamp=np.array([r[1] for r in rows], np.int64),
        platform=np.full(n, 2, np.int16), action=np.full(n, 3, np.int16), item=np.array([r[2] for r in rows], np.int32),
        category=np.array([r[3][0] if r[3] else 0 for r in rows], np.int32), categories_offsets=offsets,
        categories_values=np.array([c for r in rows for c in r[3]], np.int32),
        query_offsets=np.zeros(n + 1, np.int64), query_values=np.zeros(0, np.int32),
        value=np.full(n, np.nan, np.float32))
    cats = ["<pad>", "<unk>"] + [f"c{i}" for i in range(2, n_categories)]
    return Prepared(events=events, vocab={"category": Vocab(cats), "item": Vocab(["<pad>", "<unk>", "x"])},
                    report={"persons": len(people)})


def check_no_leak_and_alignment(prepared: Prepared, batch, max_len: int) -> None:
    """Every example's input is exactly the person's last <= max_len events strictly before cut_time,
    left-aligned; the target is the first event at cut_time."""
    e = prepared.events
    off = prepared.person_offsets
    for i in range(len(batch)):
        p, cut = int(batch.person[i]), int(batch.cut_time[i])
        ts = e.timestamp[off[p]:off[p + 1]]
        before = np.flatnonzero(ts < cut) + off[p]
        want = before[-max_len:]
        L = int(batch.lengths[i])
        assert L == len(want)
        assert (batch.item[i, :L] == e.item[want]).all() and (batch.item[i, L:] == 0).all()
        assert (batch.category[i, :L] == e.category[want]).all() and (batch.category[i, L:] == 0).all()
        assert (batch.action[i, :L] == e.action[want]).all() and (batch.platform[i, :L] == e.platform[want]).all()
        at_cut = np.flatnonzero(ts == cut) + off[p]
        assert len(at_cut) and batch.target_item[i] == e.item[at_cut[0]]


def label_multi_hot(prepared: Prepared, idx: np.ndarray) -> np.ndarray:
    e = prepared.events
    out = np.zeros(prepared.n_categories, np.float32)
    for j in idx:
        out[e.categories_values[e.categories_offsets[j]:e.categories_offsets[j + 1]]] = 1
    out[0] = 0
    return out


PEOPLE = [
    # person 0: 30 events, one per second, except a tie (3 events at t=1022)
    [(1000 + k if k < 20 else 1022 if k < 23 else 1000 + k, 2 + k, [2 + k % 5]) for k in range(30)],
    # person 1: 4 events
    [(5000 + 10 * k, 40 + k, [3]) for k in range(4)],
    # person 2: 1 event
    [(9000, 50, [4])],
]


def test_leave_last_out_exact_cuts_and_labels():
    prepared = make_prepared(PEOPLE)
    ex = build_examples(prepared, max_len=8, label_window_events=5, train_stride=3, min_history=1)
    t0 = prepared.events.timestamp
    off = prepared.person_offsets
    # person 0: test = last 5 events (cut index 25), valid = 5 before (cut 20 -> the tie starts at 20)
    test0 = ex["test"].subset(ex["test"].person == 0)
    assert len(test0) == 1 and test0.cut_time[0] == t0[25] and test0.lengths[0] == 8
    np.testing.assert_array_equal(test0.target_categories[0], label_multi_hot(prepared, np.arange(25, 30)))
    valid0 = ex["valid"].subset(ex["valid"].person == 0)
    assert valid0.cut_time.tolist() == [1022] and valid0.lengths[0] == 8   # events 20..22 share second 1022
    np.testing.assert_array_equal(valid0.target_categories[0], label_multi_hot(prepared, np.arange(20, 25)))
    train0 = ex["train"].subset(ex["train"].person == 0)
    cut_index = [int(np.searchsorted(t0[:30], c)) for c in train0.cut_time]
    assert cut_index == [3, 6, 9, 12, 15]            # 15, then every 3 events back, >= min_history
    for i, c in enumerate(cut_index):                 # labels: the next 5 events, never past the valid cut (20)
        want = label_multi_hot(prepared, np.arange(c, min(c + 5, 20)))
        np.testing.assert_array_equal(train0.target_categories[i], want)
    # person 1 (4 events): test cut at 1 (max(4-5, 0) -> 0 has no history, so... min_history=1 drops it)
    assert (ex["test"].person == 1).sum() == 0 and (ex["test"].person == 2).sum() == 0
    ex0 = build_examples(prepared, max_len=8, label_window_events=5, min_history=0)
    p1 = ex0["test"].subset(ex0["test"].person == 1)
    assert p1.lengths.tolist() == [0] and p1.cut_time.tolist() == [5000]   # empty history allowed
    for split in ex0.values():
        check_no_leak_and_alignment(prepared, split, 8)
    assert int(off[-1]) == 35


def test_window_of_one_event_is_classic_leave_one_out():
    prepared = make_prepared([[(100 + k, 10 + k, [2]) for k in range(6)]])
    ex = build_examples(prepared, max_len=3, label_window_events=1, train_stride=1)
    assert ex["test"].target_item.tolist() == [15] and ex["valid"].target_item.tolist() == [14]
    assert ex["train"].target_item.tolist() == [11, 12, 13]
    assert ex["test"].item.tolist() == [[12, 13, 14]] and ex["train"].item[0].tolist() == [10, 0, 0]


def test_label_window_in_seconds():
    events = [(0, 10, [2]), (50, 11, [3]), (100, 12, [4]), (130, 13, [5]), (160, 14, [6]), (300, 15, [7])]
    prepared = make_prepared([events])
    ex = build_examples(prepared, max_len=10, label_window_events=1, label_window_seconds=100, train_stride=1,
                        min_history=0)
    # test: the last window is anchored at the last event (t=300): (200, 300] -> cut at t=300
    assert ex["test"].cut_time.tolist() == [300]
    # valid: the last window before the test cut, anchored at t=160: (60, 160] -> cut at t=100, labels 100..160
    assert ex["valid"].cut_time.tolist() == [100]
    np.testing.assert_array_equal(np.flatnonzero(ex["valid"].target_categories[0]), [4, 5, 6])
    # train: the last window before t=100, anchored at t=50: (-50, 50] -> cut at t=0 (empty history), labels 0, 50
    assert ex["train"].cut_time.tolist() == [0] and ex["train"].lengths.tolist() == [0]
    np.testing.assert_array_equal(np.flatnonzero(ex["train"].target_categories[0]), [2, 3])
    for split in ex.values():
        check_no_leak_and_alignment(prepared, split, 10)


def test_time_split_exact():
    prepared = make_prepared(PEOPLE)
    ex = build_examples(prepared, max_len=50, split="time", time_cut=1024, label_window_events=2, train_stride=4)
    # person 0: events at/after 1024 start at index 24; valid labels 24,25; test cut after them (26)
    v = ex["valid"].subset(ex["valid"].person == 0)
    assert v.cut_time.tolist() == [1024] and v.lengths.tolist() == [24]
    t = ex["test"].subset(ex["test"].person == 0)
    assert t.cut_time.tolist() == [1026] and t.lengths.tolist() == [26]
    tr = ex["train"].subset(ex["train"].person == 0)
    assert (tr.cut_time < 1024).all() and len(tr) >= 4
    # persons 1 and 2 are entirely after the cut: no train example, no valid without history
    assert set(ex["train"].person.tolist()) == {0}
    assert 1 in ex["test"].person.tolist()           # person 1: valid window is its history
    for split in ex.values():
        check_no_leak_and_alignment(prepared, split, 50)


def test_no_leak_on_both_splits_of_synthetic_data(synthetic):
    prepared = load_prepared(synthetic["prepared"])
    for split, kwargs in [("leave_last_out", {}), ("time", {"label_window_seconds": 3600}),
                          ("time", {"time_cut": int(np.quantile(prepared.events.timestamp, 0.5))})]:
        ex = build_examples(prepared, max_len=20, split=split, **kwargs)
        assert all(len(b) for b in ex.values())
        for batch in ex.values():
            idx = np.random.default_rng(0).choice(len(batch), min(300, len(batch)), replace=False)
            check_no_leak_and_alignment(prepared, batch.subset(idx), 20)
            assert batch.item.dtype == np.int64 and batch.target_categories.dtype == np.float32
            assert batch.target_categories.shape == (len(batch), prepared.n_categories)
            # (a window of category-less social events has no label; rare)
            assert (batch.target_categories.sum(1) >= 1).mean() > 0.95 and (batch.target_categories[:, 0] == 0).all()
        if split == "time":
            cut = kwargs.get("time_cut") or int(np.quantile(prepared.events.timestamp, 0.8))
            assert (ex["train"].cut_time < cut).all() and (ex["valid"].cut_time >= cut).all()
        # per person: every train cut < the valid cut < the test cut
        cuts = {name: {} for name in ex}
        for name, b in ex.items():
            for p, c in zip(b.person.tolist(), b.cut_time.tolist()):
                cuts[name].setdefault(p, []).append(c)
        for p, (valid_cut,) in cuts["valid"].items():
            assert max(cuts["train"].get(p, [-1])) < valid_cut
        for p, (test_cut,) in cuts["test"].items():
            assert test_cut > cuts["valid"].get(p, [-1])[0]
    ll = build_examples(prepared, max_len=20)
    assert len(np.unique(ll["test"].person)) == len(ll["test"])     # one test example per person


def test_sequence_batch_subset_concat_len():
    prepared = make_prepared(PEOPLE)
    b = build_examples(prepared, max_len=4)["train"]
    s = b.subset([0, 2])
    assert len(s) == 2 and s.max_len == 4 and (s.item[1] == b.item[2]).all()
    both = type(b).concat([s, s])
    assert len(both) == 4 and both.target_categories.shape == (4, 8)


def test_person_histories_and_new_person_records(synthetic):
    prepared = make_prepared(PEOPLE)
    h = build_person_histories(prepared, max_len=5)
    assert len(h) == 3 and h.person.tolist() == [0, 1, 2] and h.lengths.tolist() == [5, 4, 1]
    assert h.item[0].tolist() == [27, 28, 29, 30, 31] and h.cut_time.tolist() == [1030, 5031, 9001]
    assert h.target_categories.shape == (3, 0)
    # a new person's raw records, encoded with a real vocabulary
    real = load_prepared(synthetic["prepared"])
    item_tokens = real.vocab["item"].tokens
    records = [
        {"platform": "Shop", "timestamp": "2024-01-02T00:00:00Z", "action": "view", "item_id": item_tokens[2],
         "category": "books|no-such-category"},
        {"platform": "search", "timestamp": 1704067200, "action": "search", "item_id": "never-seen",
         "query": "Tent LANTERN zzzz"},
        {"platform": "tiktok", "timestamp": "1704067300", "action": "teleport", "item_id": item_tokens[3]},
        {"platform": "shop", "timestamp": "garbage", "action": "view", "item_id": "x"},      # skipped
    ]
    enc = events_from_records(records, real)
    assert len(enc) == 3 and enc.timestamp.tolist() == [1704067200, 1704067300, 1704153600]  # time order
    assert enc.item.tolist() == [1, 3, 2]                                  # OOV -> 1
    assert enc.platform.tolist()[1] == 1 and enc.action.tolist()[1] == 1   # unknown platform / action -> <unk>
    query = real.vocab["query"]
    assert query.decode(enc.query_of(0)) == [t if t in query else "<unk>" for t in ("tent", "lantern", "zzzz")]
    cats = real.vocab["category"]
    assert enc.categories_of(2).tolist() == [cats.id("books"), 1] and enc.category[2] == cats.id("books")
    one = build_person_histories(enc, max_len=2)
    assert len(one) == 1 and one.item.tolist() == [[3, 2]]
    with pytest.raises(DataError, match="record 3"):
        events_from_records(records, real, strict=True)
    raw_vocab = {name: v.to_dict() for name, v in real.vocab.items()}    # the parsed vocab.json works too
    assert events_from_records(records[:1], raw_vocab).item.tolist() == [2]


def test_bad_arguments():
    prepared = make_prepared(PEOPLE)
    with pytest.raises(ValueError):
        build_examples(prepared, split="random")
    with pytest.raises(ValueError):
        build_examples(prepared, max_len=0)
