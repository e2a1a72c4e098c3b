"""Adapters: Taobao and Amazon on the real files in ../shared/data, MovieLens on small files written here."""
from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from fastinterest.data import DataError, build_examples, load_prepared, prepare

TAOBAO_RANGE = (1_511_539_200, 1_512_316_800)  # 2017-11-25 .. 2017-12-04, UTC+8
BEHAVIOUR = {"pv": "view", "cart": "cart", "fav": "favorite", "buy": "purchase"}


def test_taobao_head_and_tail(shared_data, tmp_path):
    files = [shared_data / "taobao_userbehavior" / d / "UserBehavior.csv" for d in ("fattydelivery_head",
                                                                                     "betashepherd_tail")]
    rows = [r for f in files for r in csv.reader(f.open())]
    in_range = [r for r in rows if TAOBAO_RANGE[0] <= int(r[4]) < TAOBAO_RANGE[1]]
    report = prepare(files, tmp_path / "out", format="taobao", key="k")
    assert report["rows_read"] == len(rows) == 14_321
    assert report["dropped"]["timestamp_out_of_range"] == len(rows) - len(in_range) > 0
    assert report["rows_kept"] == len(in_range)
    assert report["persons"] == len({r[0] for r in in_range}) == 157
    assert report["items"] == len({r[1] for r in in_range}) and report["categories"] == len({r[2] for r in in_range})
    assert report["events_per_platform"] == {"taobao": len(in_range)}
    prepared = load_prepared(tmp_path / "out")
    actions = prepared.vocab["action"]
    got = Counter(actions.decode(prepared.events.action))
    assert got == Counter(BEHAVIOUR[r[3]] for r in in_range)
    assert set(actions.tokens[2:]) == {"view", "cart", "favorite", "purchase"}
    # every event has exactly its one category id
    cat_tokens = prepared.vocab["category"].decode(prepared.events.category)
    assert Counter(cat_tokens) == Counter(r[2] for r in in_range)
    ex = build_examples(prepared, max_len=50)
    assert 150 <= len(ex["test"]) <= 157 and len(ex["train"]) > 1000  # a few persons have <= 5 events


def test_amazon_cross_domain(shared_data, tmp_path):
    folder = shared_data / "amazon_food_kitchen"
    report = prepare(folder, tmp_path / "out", format="amazon-cdsr", key="k")
    assert report["rows_read"] == report["rows_kept"] == 163_234
    assert report["persons"] == 16_579 and report["accounts"] == 2 * 16_579
    assert report["items"] == 24_354 + 29_000
    assert report["links"]["persons_with_several_accounts"] == 16_579   # one person across both domains
    assert set(report["events_per_platform"]) == {"food", "kitchen"}
    persons = pq.read_table(tmp_path / "out" / "persons.parquet")
    n_events = persons.column("n_events").to_numpy()
    assert n_events.min() >= 6 and n_events.max() <= 15
    prepared = load_prepared(tmp_path / "out")
    assert prepared.vocab["category"].tokens[2:] == sorted(["food", "kitchen"], key=lambda d: -report[
        "events_per_platform"][d])
    # the item ids are ASINs, and the domain decides platform and category alike
    assert all(len(t) == 10 for t in prepared.vocab["item"].tokens[2:50])
    platform_names = prepared.vocab["platform"].decode(prepared.events.platform)
    category_names = prepared.vocab["category"].decode(prepared.events.category)
    assert platform_names == category_names
    # spot-check one user against the raw line: sorted by time, stable
    line = (folder / "test_new.txt").read_text().splitlines()[0].split("\t")
    items_y = {int(r.split("\t")[2]): r.split("\t")[1] for r in (folder / "items_y.txt").read_text().splitlines()}
    items_x = {int(r.split("\t")[2]): r.split("\t")[1] for r in (folder / "items_x.txt").read_text().splitlines()}
    events = [e.split("|") for e in line[2:] if e]
    expected = [items_x[int(i)] if int(i) < len(items_x) else items_y[int(i) - len(items_x)]
                for i, ts, *_ in sorted(events, key=lambda e: int(e[1]))]
    found = [p for p in range(prepared.n_persons)
             if prepared.vocab["item"].decode(prepared.events.item[prepared.person_offsets[p]:
                                                                   prepared.person_offsets[p + 1]]) == expected]
    assert len(found) == 1


def test_amazon_without_metadata_and_bad_file(tmp_path):
    (tmp_path / "val_new.txt").write_text("0\t1\t5|1393113600|x|\t29300|1393200000|x|\n"
                                          "1\t2\t7|1393113600|x|\t29301|1393113600|x|\t8|1393000000|x|\n")
    report = prepare(tmp_path, tmp_path / "out", format="amazon-cdsr", key="k")
    assert report["persons"] == 2 and report["rows_kept"] == 5
    assert report["events_per_platform"] == {"food": 3, "kitchen": 2}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "val_new.txt").write_text("0\t1\tnot-an-item|1|x|\n")
    with pytest.raises(DataError, match="item index"):
        prepare(tmp_path / "bad", tmp_path / "out2", format="amazon-cdsr", key="k")
    with pytest.raises(DataError, match="no train_new.txt"):
        prepare(tmp_path / "out", tmp_path / "out3", format="amazon-cdsr", key="k")


U_ITEM = [
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
    "3|Café Society (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0",
]
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
RATINGS = [("196", "1", "3", "881250949"), ("196", "2", "5", "881250950"), ("186", "3", "1", "891717742"),
           ("186", "1", "4", "891717000"), ("22", "2", "2", "878887116")]


def test_movielens_u_data(tmp_path):
    (tmp_path / "u.item").write_bytes("\n".join(U_ITEM).encode("latin-1") + b"\n")
    (tmp_path / "u.genre").write_text("\n".join(f"{g}|{i}" for i, g in enumerate(GENRES)) + "\n\n")
    (tmp_path / "u.data").write_text("\n".join("\t".join(r) for r in RATINGS) + "\n")
    report = prepare(tmp_path / "u.data", tmp_path / "out", format="movielens", key="k")
    assert report["rows_kept"] == 5 and report["persons"] == 3 and report["items"] == 3
    prepared = load_prepared(tmp_path / "out")
    e, cats = prepared.events, prepared.vocab["category"]
    items = prepared.vocab["item"].decode(e.item)
    by_item = {it: sorted(cats.decode(e.categories_of(i))) for i, it in enumerate(items)}
    assert by_item == {"1": ["Animation", "Children's", "Comedy"], "2": ["Action", "Adventure", "Thriller"],
                       "3": ["Drama"]}
    assert sorted(e.value.tolist()) == [1, 2, 3, 4, 5]
    assert prepared.vocab["action"].tokens[2:] == ["rate"] and prepared.vocab["platform"].tokens[2:] == ["movielens"]
    # per person in time order: user 186 rated item 1 before item 3
    p186 = [i for i in range(len(e)) if items[i] in ("1", "3") and e.value[i] in (4, 1)]
    assert [items[i] for i in p186] == ["1", "3"]


def test_movielens_recbole_atomic(tmp_path):
    (tmp_path / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                       + "\n".join("\t".join(r) for r in RATINGS) + "\n")
    (tmp_path / "ml.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                      "1\tToy Story\t1995\tAnimation Children's Comedy\n"
                                      "2\tGoldenEye\t1995\tAction Adventure Thriller\n")
    report = prepare(tmp_path / "ml.inter", tmp_path / "out", format="movielens", key="k")
    assert report["rows_kept"] == 5 and report["persons"] == 3
    prepared = load_prepared(tmp_path / "out")
    e, cats = prepared.events, prepared.vocab["category"]
    items = prepared.vocab["item"].decode(e.item)
    assert {it: sorted(cats.decode(e.categories_of(i))) for i, it in enumerate(items)} == {
        "1": ["Animation", "Children's", "Comedy"], "2": ["Action", "Adventure", "Thriller"], "3": []}
    # the directory form finds the .inter file
    assert prepare(tmp_path, tmp_path / "out2", format="movielens", key="k")["rows_kept"] == 5
    np.testing.assert_array_equal(np.sort(e.value), [1, 2, 3, 4, 5])
