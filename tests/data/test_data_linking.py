"""Account linking: union-find, both links-file shapes, chains through accounts without events."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from fastinterest.data import DataError, connected_components, prepare
from fastinterest.data.linking import link_accounts, read_links

T = 1_704_067_200
HEADER = "user_id,platform,timestamp,action,item_id\n"


def test_connected_components_chain_star_and_singletons():
    # chain 5-4-3-2, star 7-{8,9}, 0 and 1 and 6 alone; edges in scrambled order
    a = np.array([4, 3, 9, 2, 7])
    b = np.array([5, 4, 7, 3, 8])
    comp = connected_components(10, a, b)
    assert comp.tolist() == [0, 1, 2, 2, 2, 2, 6, 7, 7, 7]


def test_connected_components_long_chain_and_cycles():
    n = 10_000
    perm = np.random.default_rng(0).permutation(n)
    comp = connected_components(n, perm[:-1], perm[1:])            # one random path through every node
    assert (comp == 0).all()
    comp = connected_components(4, np.array([0, 1, 2, 3]), np.array([1, 2, 0, 3]))  # a cycle and a self-loop
    assert comp.tolist() == [0, 0, 0, 3]
    assert connected_components(3, np.array([], int), np.array([], int)).tolist() == [0, 1, 2]


def test_link_accounts_bridges_through_link_only_accounts():
    accounts = pa.array(["shop\x1fa", "video\x1fb", "social\x1fc"])
    # a ~ ghost, ghost ~ b (the ghost account has no events), c alone
    comp, rep = link_accounts(accounts, pa.array(["shop\x1fa", "web\x1fghost"]),
                              pa.array(["web\x1fghost", "video\x1fb"]))
    assert comp[0] == comp[1] != comp[2]
    assert rep.to_pylist() == ["shop\x1fa", "shop\x1fa", "social\x1fc"]  # smallest string of the component


def write_events(path, rows):
    path.write_text(HEADER + "\n".join(rows) + "\n")
    return path


def persons_by_account(out):
    m = pq.read_table(out / "mapping.parquet").to_pylist()
    return {(r["platform"], r["account_id"]): r["person"] for r in m}


@pytest.mark.parametrize("shape", ["pairs", "groups", "groups-parquet"])
def test_prepare_links_chains_into_one_person(tmp_path, shape):
    events = write_events(tmp_path / "e.csv", [
        f"a1,shop,{T},view,X", f"b1,search,{T + 1},click,X", f"c1,social,{T + 2},like,Y", f"d1,video,{T + 3},view,Z",
        f"e1,shop,{T + 4},view,Z",
    ])
    if shape == "pairs":  # a1~b1, b1~c1 (chain), d1~ghost (no events): e1 stays alone
        links = tmp_path / "links.csv"
        links.write_text("platform_a,account_a,platform_b,account_b\nshop,a1,search,b1\nSEARCH, b1 ,social,c1\n"
                         "video,d1,web,ghost\n,,,\n")
    else:
        table = pa.table({"platform": ["shop", "search", "search", "social", "video"],
                          "account_id": ["a1", "b1", "b1", "c1", "d1"],
                          "person_id": ["P", "P", "Q", "Q", "R"]})      # P and Q share b1: one person
        links = tmp_path / ("links.parquet" if shape.endswith("parquet") else "links.csv")
        if links.suffix == ".parquet":
            pq.write_table(table, links)
        else:
            pacsv.write_csv(table, links)
    report = prepare(events, tmp_path / "out", links=links, key="k", write_mapping=True)
    p = persons_by_account(tmp_path / "out")
    assert p[("shop", "a1")] == p[("search", "b1")] == p[("social", "c1")]
    assert len({p[("shop", "a1")], p[("video", "d1")], p[("shop", "e1")]}) == 3
    assert report["persons"] == 3 and report["accounts"] == 5
    assert report["links"]["persons_with_several_accounts"] == 1
    assert report["links"]["rows_skipped"] == (1 if shape == "pairs" else 0)
    persons = pq.read_table(tmp_path / "out" / "persons.parquet").to_pylist()
    big = next(x for x in persons if x["person"] == p[("shop", "a1")])
    assert big["n_accounts"] == 3 and big["n_events"] == 3 and big["platforms"] == ["search", "shop", "social"]


def test_unlinked_accounts_stay_separate_even_with_equal_ids(tmp_path):
    events = write_events(tmp_path / "e.csv", [f"same,shop,{T},view,X", f"same,video,{T},view,X"])
    report = prepare(events, tmp_path / "out", key="k")
    assert report["persons"] == 2


def test_links_file_with_wrong_columns(tmp_path):
    links = tmp_path / "links.csv"
    links.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="links file needs the columns"):
        read_links(links)
