"""`prepare` on small hand-written files: cleaning rules, ordering, encoding, outputs, malformed files."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from fastinterest.data import DROP_RULES, DataError, load_prepared, prepare

T = 1_704_067_200  # 2024-01-01T00:00:00Z

HEADER = "user_id,platform,timestamp,action,item_id,category,query,value\n"
ROWS = [
    f"acct-ann,shop,{T},view,A,books|novels,,",                   # kept
    f"acct-ann,shop,{T},view,A,books|novels,,",                   # duplicate of the row above
    f"acct-ann,Shop ,{T - 100},Click,B,music,,3.5",               # kept; platform/action normalised
    "acct-bob,shop,2024-01-01T00:00:00Z,cart,A,books,,",          # kept (ISO time = T)
    "acct-bob,shop,,view,A,,,",                                   # missing_field (timestamp)
    f",shop,{T + 100},view,A,,,",                                 # missing_field (user)
    "acct-cy,search,garbage,search,C,,Red Shoes!,",               # bad_timestamp
    "acct-cy,search,0,search,C,,red,",                            # timestamp_out_of_range
    f"acct-cy,search,{T + 100},hover,C,,,",                       # unknown_action
    f'acct-cy,search,{T + 100},search,C,,"Red shoes, cheap!",',   # kept, query red shoes cheap
    f"acct-cy,social,{T + 100},like,D,,,",                        # kept (another account)
    "acct-ann,shop,1",                                            # malformed_row (3 fields)
]
# a bot: 12 events of one account in one second (threshold 10), plus one normal event
ROWS += [f"acct-bot,shop,{T + 500},view,item{i},books,," for i in range(12)]
ROWS += [f"acct-bot,shop,{T + 900},view,item0,books,,"]
def assert_tables_equal(a: pa.Table, b: pa.Table) -> None:
    """Equal column by column (NaN equals NaN, unlike `Table.equals`)."""
    assert a.schema == b.schema
    for name in a.column_names:
        if pa.types.is_floating(a.schema.field(name).type):
            np.testing.assert_array_equal(a.column(name).to_numpy(), b.column(name).to_numpy())
        else:
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


EXPECTED_DROPPED = {"malformed_row": 1, "missing_field": 2, "bad_timestamp": 1, "timestamp_out_of_range": 1,
                    "unknown_action": 1, "duplicate": 1, "bot_burst": 12}


@pytest.fixture
def events_csv(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(HEADER + "\n".join(ROWS) + "\n", encoding="utf-8")
    return path


def person_of(out, platform: str, account: str) -> int:
    mapping = pq.read_table(out / "mapping.parquet").to_pylist()
    return next(m["person"] for m in mapping if m["platform"] == platform and m["account_id"] == account)


def test_rules_counts_and_report(events_csv, tmp_path):
    out = tmp_path / "out"
    report = prepare(events_csv, out, key="s3cr3t-key", write_mapping=True)
    assert report["dropped"] == EXPECTED_DROPPED and list(report["dropped"]) == list(DROP_RULES)
    assert report["rows_read"] == len(ROWS)
    assert report["rows_kept"] == len(ROWS) - sum(EXPECTED_DROPPED.values()) == 6
    assert report["persons"] == 5 and report["accounts"] == 5      # ann, bob, cy@search, cy@social, bot
    assert report["events_per_platform"] == {"shop": 4, "search": 1, "social": 1}
    assert report["items"] == 5 and report["categories"] == 3
    assert {"read_s", "sort_s", "write_s", "total_s"} <= set(report["timings"])
    assert "a row with 3 fields instead of 8" in report["malformed_examples"][0]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["dropped"] == EXPECTED_DROPPED
    config = json.loads((out / "config.json").read_text())
    assert config["min_count"] == 1 and config["pseudonym"]["key_source"] == "argument"
    for f in out.iterdir():  # the key itself is never written
        assert b"s3cr3t-key" not in f.read_bytes()


def test_encoded_events_order_and_lists(events_csv, tmp_path):
    out = tmp_path / "out"
    prepare(events_csv, out, key="k", write_mapping=True)
    table = pq.read_table(out / "events.parquet")
    assert [str(table.schema.field(c).type) for c in table.column_names] == [
        "int32", "int64", "int16", "int16", "int32", "int32", "list<element: int32>", "list<element: int32>", "float"]
    vocab = json.loads((out / "vocab.json").read_text())
    for v in vocab.values():
        assert v["tokens"][:2] == ["<pad>", "<unk>"]
    cat, item, query = (vocab[k]["tokens"] for k in ("category", "item", "query"))
    assert cat == ["<pad>", "<unk>", "books", "music", "novels"]          # books twice, then ties by name
    assert query == ["<pad>", "<unk>", "cheap", "red", "shoes"]
    assert vocab["action"]["tokens"][2:4] == ["click", "cart"] or vocab["action"]["counts"][2] >= 1
    rows = table.to_pylist()
    # sorted by person then time; ann's earlier click comes first
    assert [r["person"] for r in rows] == sorted(r["person"] for r in rows)
    ann = [r for r in rows if r["person"] == person_of(out, "shop", "acct-ann")]
    assert [r["timestamp"] for r in ann] == [T - 100, T]
    assert [item[r["item"]] for r in ann] == ["B", "A"]
    assert cat[ann[1]["category"]] == "books" and [cat[c] for c in ann[1]["categories"]] == ["books", "novels"]
    assert ann[0]["value"] == 3.5 and np.isnan(ann[1]["value"])
    cy = [r for r in rows if r["person"] == person_of(out, "search", "acct-cy")]
    assert [query[q] for q in cy[0]["query"]] == ["red", "shoes", "cheap"] and cy[0]["categories"] == []
    assert cy[0]["category"] == 0  # <pad>: no category
    platform = vocab["platform"]["tokens"]
    assert {platform[r["platform"]] for r in rows} == {"shop", "search", "social"}


def test_min_count_sends_rare_tokens_to_unk(events_csv, tmp_path):
    out = tmp_path / "out"
    prepare(events_csv, out, key="k", min_count=2)
    prepared = load_prepared(out)
    items = prepared.vocab["item"]
    assert items.tokens == ["<pad>", "<unk>", "A"]                   # A twice (ann + bob); the rest once
    assert items.counts[1] == 4                                       # B, C, D, item0 -> <unk>
    assert set(prepared.events.item.tolist()) == {1, 2}
    assert prepared.vocab["category"].tokens == ["<pad>", "<unk>", "books"]


def test_bursts_can_be_disabled(events_csv, tmp_path):
    report = prepare(events_csv, tmp_path / "out", key="k", max_events_per_second=0)
    assert report["dropped"]["bot_burst"] == 0 and report["rows_kept"] == 6 + 12


def test_ties_keep_input_order_across_platforms(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(HEADER + "\n".join([
        f"p1,social,{T},like,X,,,", f"p1,shop,{T},view,Y,,,", f"p1,video,{T},view,Z,,,", f"p1,shop,{T - 1},view,W,,,",
    ]) + "\n")
    links = tmp_path / "links.csv"
    links.write_text("platform,account_id,person_id\nsocial,p1,P\nshop,p1,P\nvideo,p1,P\n")
    prepare(path, tmp_path / "out", links=links, key="k")
    prepared = load_prepared(tmp_path / "out")
    items = prepared.vocab["item"].decode(prepared.events.item)
    assert items == ["W", "X", "Y", "Z"] and prepared.n_persons == 1


def test_parquet_input_matches_csv(events_csv, tmp_path):
    table = pacsv.read_csv(events_csv, parse_options=pacsv.ParseOptions(invalid_row_handler=lambda r: "skip"),
                           convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    pq.write_table(table, tmp_path / "events.parquet")
    prepare(events_csv, tmp_path / "a", key="k")
    prepare(tmp_path / "events.parquet", tmp_path / "b", key="k")
    a, b = (pq.read_table(tmp_path / d / "events.parquet") for d in "ab")
    assert_tables_equal(a, b)
    assert (tmp_path / "a" / "vocab.json").read_text() == (tmp_path / "b" / "vocab.json").read_text()


def test_prepare_is_deterministic(events_csv, tmp_path):
    prepare(events_csv, tmp_path / "a", key="k")
    prepare(events_csv, tmp_path / "b", key="k", threads=1, chunk_rows=4)
    for name in ("events.parquet", "persons.parquet"):
        assert_tables_equal(pq.read_table(tmp_path / "a" / name), pq.read_table(tmp_path / "b" / name))


# --- pseudonyms and raw ids ---------------------------------------------------------------------------

def test_pseudonyms_are_keyed_and_raw_ids_never_written(events_csv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(events_csv, out, key="secret")
    for f in out.iterdir():
        assert b"acct-" not in f.read_bytes(), f"raw account id in {f.name}"
    assert not (out / "mapping.parquet").exists()
    persons = pq.read_table(out / "persons.parquet").to_pylist()
    expected = hashlib.blake2b("shop\x1facct-ann".encode(), key=b"secret", digest_size=16).hexdigest()
    assert expected in {p["pseudonym"] for p in persons}
    assert [p["pseudonym"] for p in persons] == sorted(p["pseudonym"] for p in persons)  # ids follow pseudonyms
    # another key, other pseudonyms; the environment variable is used when no key is given
    prepare(events_csv, tmp_path / "other", key="other")
    other = {p["pseudonym"] for p in pq.read_table(tmp_path / "other" / "persons.parquet").to_pylist()}
    assert other.isdisjoint({p["pseudonym"] for p in persons})
    monkeypatch.setenv("FASTINTEREST_PSEUDONYM_KEY", "secret")
    prepare(events_csv, tmp_path / "env")
    env = pq.read_table(tmp_path / "env" / "persons.parquet").column("pseudonym").to_pylist()
    assert env == [p["pseudonym"] for p in persons]
    assert json.loads((tmp_path / "env" / "config.json").read_text())["pseudonym"]["key_source"] == "environment"


def test_default_key_warns(events_csv, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTINTEREST_PSEUDONYM_KEY", raising=False)
    with pytest.warns(UserWarning, match="public default key"):
        prepare(events_csv, tmp_path / "out")


def test_mapping_only_when_asked_and_removed_otherwise(events_csv, tmp_path):
    out = tmp_path / "out"
    prepare(events_csv, out, key="k", write_mapping=True)
    mapping = pq.read_table(out / "mapping.parquet").to_pylist()
    assert {(m["platform"], m["account_id"]) for m in mapping} == {
        ("shop", "acct-ann"), ("shop", "acct-bob"), ("search", "acct-cy"), ("social", "acct-cy"),
        ("shop", "acct-bot")}
    persons = {p["person"]: p["pseudonym"] for p in pq.read_table(out / "persons.parquet").to_pylist()}
    assert all(persons[m["person"]] == m["pseudonym"] for m in mapping)
    prepare(events_csv, out, key="k")  # re-run without the flag into the same directory
    assert not (out / "mapping.parquet").exists()


# --- malformed files ------------------------------------------------------------------------------------

def test_missing_column_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user_id,platform,timestamp,item_id\nu,shop,1704067200,A\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 1: missing required column\(s\) action") as err:
        prepare(path, tmp_path / "out", key="k")
    assert err.value.line == 1 and err.value.path.endswith("bad.csv")


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes((HEADER + f"u,shop,{T},view,A,,,\n" + f"u,shop,{T},view,caf").encode()
                     + b"\xe9\xff,,,\n" + f"u,shop,{T + 1},view,B,,,\n".encode())
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        prepare(path, tmp_path / "out", key="k")
    assert err.value.line == 3 and "latin.csv" in str(err.value)


@pytest.mark.parametrize("content, message", [(b"", "empty file"), (b"\n\n", "empty file")])
def test_empty_files(tmp_path, content, message):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare(path, tmp_path / "out", key="k")


def test_header_only_and_all_bad_rows_say_nothing_is_left(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text(HEADER)
    with pytest.raises(DataError, match="no valid events"):
        prepare(path, tmp_path / "out", key="k")


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file") as err:
        prepare(path, tmp_path / "out", key="k")
    assert "x.parquet" in str(err.value)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user_id": ["u"], "platform": ["shop"], "timestamp": [T], "item_id": ["A"]}), path)
    with pytest.raises(DataError, match="missing required column"):
        prepare(path, tmp_path / "out", key="k")


def test_bad_options(events_csv, tmp_path):
    with pytest.raises(DataError, match="unknown format"):
        prepare(events_csv, tmp_path / "o", key="k", format="nope")
    with pytest.raises(DataError, match="empty time range"):
        prepare(events_csv, tmp_path / "o", key="k", min_time=10, max_time=5)
    with pytest.raises(DataError, match="file not found"):
        prepare(tmp_path / "missing.csv", tmp_path / "o", key="k")


def test_several_files_and_gzip_equal_one_file(events_csv, tmp_path):
    import gzip

    lines = events_csv.read_text().splitlines(keepends=True)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv.gz"
    first.write_text("".join(lines[:10]))
    with gzip.open(second, "wt") as f:
        f.write(lines[0] + "".join(lines[10:]))
    one = prepare(events_csv, tmp_path / "one", key="k")
    two = prepare([first, second], tmp_path / "two", key="k", threads=2, chunk_rows=3)
    assert one["dropped"] == two["dropped"] and one["rows_read"] == two["rows_read"]
    assert_tables_equal(pq.read_table(tmp_path / "one" / "events.parquet"),
                        pq.read_table(tmp_path / "two" / "events.parquet"))
