"""The synthetic generator: exact fault counts, planted interests, shape of the data, determinism."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from fastinterest.data import DataError, generate_synthetic, load_prepared, planted_interests, prepare


def test_every_injected_fault_is_counted_exactly(synthetic):
    report, summary = synthetic["report"], synthetic["summary"]
    expected = dict(synthetic["faults"], malformed_row=0)
    assert report["dropped"] == {rule: expected[rule] for rule in report["dropped"]}
    assert report["rows_read"] == summary["rows"] == 20_000
    assert report["rows_kept"] == summary["valid_events"] == 20_000 - sum(synthetic["faults"].values())
    truth = json.loads((synthetic["root"] / "events.truth.json").read_text())
    assert truth["faults"] == synthetic["faults"]
    assert report["persons"] == summary["persons"] == truth["persons"]   # links join every generated person


def test_planted_interests_map_back_and_dominate_events(synthetic):
    planted = planted_interests(synthetic["summary"]["truth"], synthetic["prepared"], key=synthetic["key"])
    prepared = load_prepared(synthetic["prepared"])
    assert len(planted) == prepared.n_persons
    assert all(len(c) in (2, 3) and min(c) >= 2 for c in planted.values())
    offsets, category = prepared.person_offsets, prepared.events.category
    share = np.array([np.isin(category[offsets[p]:offsets[p + 1]], sorted(c)).mean() for p, c in planted.items()])
    # ~85% of draws come from the interests (+ noise hitting them, - funnels from noise)
    assert 0.75 < share.mean() < 0.95
    with pytest.raises(DataError, match="wrong key"):
        planted_interests(synthetic["summary"]["truth"], synthetic["prepared"], key="wrong key")


def test_every_planted_interest_drives_a_real_share_of_behaviour(synthetic):
    """Weights have a floor (default 0.2): no planted interest that produces next to no events."""
    truth = json.loads((synthetic["root"] / "events.truth.json").read_text())
    weights = [w for person in truth["people"] for w in person["weights"]]
    assert min(weights) >= 0.2 - 1e-4
    assert all(abs(sum(person["weights"]) - 1) < 1e-3 for person in truth["people"])
    with pytest.raises(ValueError, match="min_interest_weight"):
        generate_synthetic(1000, synthetic["root"] / "x.csv", min_interest_weight=0.4)


def test_next_item_beats_popularity(synthetic):
    """A trivial sequence rule (repeat the last item) beats the most-popular-item guess by far."""
    prepared = load_prepared(synthetic["prepared"])
    e = prepared.events
    same_person = e.person[1:] == e.person[:-1]
    repeat_hit = (e.item[1:] == e.item[:-1])[same_person].mean()
    popular_hit = (e.item == np.bincount(e.item).argmax()).mean()
    assert repeat_hit > 0.2 and repeat_hit > 5 * popular_hit


def test_shape_of_the_data(tmp_path):
    s = generate_synthetic(60_000, tmp_path / "e.parquet", seed=3, fault_rate=0.0)
    truth = json.loads((tmp_path / "e.truth.json").read_text())
    lengths = np.array([p["events"] for p in truth["people"]])
    assert 35 <= np.median(lengths) <= 70 and lengths.max() >= 400
    platforms = np.array([len(p["accounts"]) for p in truth["people"]])
    assert (platforms >= 3).mean() > 0.75 and platforms.max() == 4
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == s["rows"] == s["valid_events"] == 60_000
    rows = table.to_pylist()
    searches = [r for r in rows if r["action"] == "search"]
    assert searches and all(r["query"] for r in searches) and all(r["platform"] == "search" for r in searches)
    assert not any(r["query"] for r in rows if r["action"] != "search")
    words = {w for r in searches for w in r["query"].split()}
    assert "tent" in words or "novel" in words or len(words) > 20
    actions_by_platform = {}
    for r in rows:
        actions_by_platform.setdefault(r["platform"], set()).add(r["action"])
    assert actions_by_platform["social"] <= {"like", "comment", "share", "view"}
    assert "purchase" in actions_by_platform["shop"] and "purchase" not in actions_by_platform["video"]
    assert any("T" in r["timestamp"] for r in rows if r["platform"] == "social")
    assert all(r["timestamp"].isdigit() for r in rows if r["platform"] == "shop")
    links = pacsv.read_csv(tmp_path / "e.links.csv")
    assert links.column_names == ["platform_a", "account_a", "platform_b", "account_b"]
    assert links.num_rows == int((platforms - 1).sum())


def test_deterministic_by_seed(tmp_path):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    generate_synthetic(3000, tmp_path / "a.csv", seed=11)
    generate_synthetic(3000, tmp_path / "b.csv", seed=11)
    generate_synthetic(3000, tmp_path / "c.csv", seed=12)
    assert digest(tmp_path / "a.csv") == digest(tmp_path / "b.csv") != digest(tmp_path / "c.csv")
    assert digest(tmp_path / "a.links.csv") == digest(tmp_path / "b.links.csv")
    assert (tmp_path / "a.truth.json").read_text() == (tmp_path / "b.truth.json").read_text()


def test_faults_from_rate_and_validation(tmp_path):
    s = generate_synthetic(5000, tmp_path / "e.csv", seed=1, fault_rate=0.05)
    assert sum(s["faults"].values()) <= 250 and s["faults"]["bot_burst"] % 11 == 0 and s["faults"]["bot_burst"] > 0
    report = prepare(tmp_path / "e.csv", tmp_path / "out", links=s["links"], key="k")
    assert {k: v for k, v in report["dropped"].items() if k != "malformed_row"} == s["faults"]
    with pytest.raises(ValueError, match="bursts of at least"):
        generate_synthetic(1000, tmp_path / "x.csv", faults={"bot_burst": 5})
    with pytest.raises(ValueError, match="n_categories"):
        generate_synthetic(1000, tmp_path / "x.csv", n_categories=99)
