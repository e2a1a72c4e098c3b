"""Loading a prepared data set into numpy, and encoding a new person's raw events with its vocabularies."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .encode import parse_timestamps, parse_values
from .schema import (
    CATEGORY_SEPARATOR, DEFAULT_MAX_TIME, DEFAULT_MIN_TIME, QUERY_SPLIT, RAW_COLUMNS, DataError, VOCAB_NAMES,
)
from .vocab import Vocab


def _list_column(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column as ``(offsets int64 [N+1] starting at 0, values int32)``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int32)
    return offsets - offsets[0], values


@dataclass
class EventTable:
    """Encoded events as numpy arrays, sorted by person then time (input order on ties).

    ``categories`` and ``query`` are list columns stored flat: the categories of event ``i`` are
    ``categories_values[categories_offsets[i]:categories_offsets[i + 1]]``.
    """

    person: np.ndarray               # int32 [N]
    timestamp: np.ndarray            # int64 [N] unix seconds
    platform: np.ndarray             # int16 [N]
    action: np.ndarray               # int16 [N]
    item: np.ndarray                 # int32 [N]
    category: np.ndarray             # int32 [N] primary category (0 = none)
    categories_offsets: np.ndarray   # int64 [N + 1]
    categories_values: np.ndarray    # int32
    query_offsets: np.ndarray        # int64 [N + 1]
    query_values: np.ndarray         # int32
    value: np.ndarray                # float32 [N], NaN = missing

    def __len__(self) -> int:
        return len(self.timestamp)

    @property
    def n_persons(self) -> int:
        return int(self.person[-1]) + 1 if len(self.person) else 0

    def person_offsets(self, n_persons: int | None = None) -> np.ndarray:
        """``[P + 1]``: the events of person p are ``offsets[p]:offsets[p + 1]``."""
        n = self.n_persons if n_persons is None else n_persons
        return np.searchsorted(self.person, np.arange(n + 1)).astype(np.int64)

    def categories_of(self, i: int) -> np.ndarray:
        return self.categories_values[self.categories_offsets[i]:self.categories_offsets[i + 1]]

    def query_of(self, i: int) -> np.ndarray:
        return self.query_values[self.query_offsets[i]:self.query_offsets[i + 1]]

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "EventTable":
        def col(name, dtype):
            return table.column(name).to_numpy().astype(dtype, copy=False)

        cat_off, cat_val = _list_column(table.column("categories"))
        q_off, q_val = _list_column(table.column("query"))
        return cls(person=col("person", np.int32), timestamp=col("timestamp", np.int64),
                   platform=col("platform", np.int16), action=col("action", np.int16), item=col("item", np.int32),
                   category=col("category", np.int32), categories_offsets=cat_off, categories_values=cat_val,
                   query_offsets=q_off, query_values=q_val, value=col("value", np.float32))


@dataclass
class Prepared:
    """A prepared data set in memory: events (numpy), vocabularies, report and config."""

    events: EventTable
    vocab: dict[str, Vocab]
    report: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_persons(self) -> int:
        return int(self.report.get("persons", self.events.n_persons))

    @property
    def n_items(self) -> int:
        return len(self.vocab["item"])

    @property
    def n_categories(self) -> int:
        return len(self.vocab["category"])

    @cached_property
    def person_offsets(self) -> np.ndarray:
        return self.events.person_offsets(self.n_persons)

    def persons(self) -> pa.Table:
        """persons.parquet: person, pseudonym, n_events, n_accounts, platforms."""
        if self.path is None:
            raise DataError("this data set was not loaded from disk")
        return pq.read_table(self.path / "persons.parquet")


def load_vocab(path: str | Path) -> dict[str, Vocab]:
    """Read ``vocab.json`` (a prepared directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "vocab.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: Vocab.from_dict(data[name], name=name) for name in VOCAB_NAMES if name in data}


def load_prepared(path: str | Path) -> Prepared:
    """Load a directory written by `prepare` (events as numpy arrays + vocab + report + config)."""
    path = Path(path)
    if not (path / "events.parquet").exists():
        raise DataError("not a prepared directory (no events.parquet)", path)
    table = pq.read_table(path / "events.parquet")
    report = json.loads((path / "report.json").read_text()) if (path / "report.json").exists() else {}
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    return Prepared(events=EventTable.from_arrow(table), vocab=load_vocab(path), report=report, config=config,
                    path=path)


def _records_table(records: Sequence[Mapping]) -> pa.Table:
    """Raw-schema table from dicts; every field but ``value`` is read as text (as from a CSV)."""
    columns = {}
    for name in RAW_COLUMNS:
        raw = [r.get(name) for r in records]
        if name == "value":
            columns[name] = pa.array([None if v is None or v == "" else str(v) for v in raw], pa.string())
        elif name == "category":
            columns[name] = pa.array([None if v is None else (CATEGORY_SEPARATOR.join(map(str, v))
                                      if isinstance(v, (list, tuple)) else str(v)) for v in raw], pa.string())
        else:
            columns[name] = pa.array([None if v is None else str(v) for v in raw], pa.string())
    return pa.table(columns)


def events_from_records(records: Sequence[Mapping], vocab: Mapping[str, Vocab | dict] | Prepared | str | Path, *,
                        strict: bool = False, min_time: int = DEFAULT_MIN_TIME,
                        max_time: int = DEFAULT_MAX_TIME) -> EventTable:
    """Encode the raw events of one NEW person (dicts in the raw schema, any platforms) with an existing
    vocabulary, for cold-start prediction.

    Unknown items, categories, query words, actions and platforms become ``<unk>`` (1). Records without a
    platform, action, item or a usable timestamp cannot be placed and are skipped (``strict=True``
    raises `DataError` instead, naming the record). ``user_id`` is not needed. The result is sorted by
    time (stable) and every event has ``person == 0``; feed it to `build_person_histories`.
    `vocab` is a `Prepared`, a prepared directory, ``{name: Vocab}`` or the parsed ``vocab.json``.
    """
    if isinstance(vocab, Prepared):
        vocab = vocab.vocab
    elif isinstance(vocab, (str, Path)):
        vocab = load_vocab(vocab)
    else:  # Vocab objects, or the parsed vocab.json ({"item": {"tokens": [...], "counts": [...]}, ...})
        vocab = {name: v if isinstance(v, Vocab) else Vocab.from_dict(v, name=name) for name, v in vocab.items()}
    table = _records_table(records)
    n = table.num_rows
    seconds, present, parsed = parse_timestamps(table.column("timestamp"))
    ok = present & parsed & (seconds >= min_time) & (seconds < max_time)
    text = {}
    for name in ("platform", "action", "item_id"):
        col = pc.utf8_trim_whitespace(table.column(name).combine_chunks())
        if name != "item_id":
            col = pc.utf8_lower(col)
        text[name] = col
        ok &= pc.fill_null(pc.greater(pc.utf8_length(col), 0), False).to_numpy(zero_copy_only=False)
    if strict and not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise DataError(f"record {bad} has no usable platform, action, item_id or timestamp: {dict(records[bad])}")
    keep = np.flatnonzero(ok)
    keep = keep[np.argsort(seconds[keep], kind="stable")]
    take = pa.array(keep)

    def encode_lists(column: pa.Array, v: Vocab, lower: bool, pattern: str | None) -> tuple[np.ndarray, np.ndarray]:
        col = pc.utf8_trim_whitespace(column.take(take))
        if lower:
            col = pc.utf8_lower(col)
        lists = pc.split_pattern_regex(col, pattern) if pattern else pc.split_pattern(col, CATEGORY_SEPARATOR)
        lists = pc.fill_null(lists, pa.scalar([], pa.list_(pa.string())))
        flat = pc.utf8_trim_whitespace(pc.list_flatten(lists))
        parent = pc.list_parent_indices(lists).to_numpy()
        nonempty = pc.greater(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)
        ids = v.encode(flat.filter(pa.array(nonempty))).astype(np.int32)
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(parent[nonempty], minlength=len(keep)))
        return offsets, ids

    cat_off, cat_val = encode_lists(table.column("category").combine_chunks(), vocab["category"], False, None)
    q_off, q_val = encode_lists(table.column("query").combine_chunks(), vocab["query"], True, QUERY_SPLIT)
    has_category = cat_off[1:] > cat_off[:-1]
    first = np.zeros(len(keep), dtype=np.int32)  # primary category: the first one, 0 when none
    first[has_category] = cat_val[cat_off[:-1][has_category]]
    values = parse_values(table.column("value"), n)[keep]
    return EventTable(
        person=np.zeros(len(keep), dtype=np.int32), timestamp=seconds[keep],
        platform=vocab["platform"].encode(text["platform"].take(take)).astype(np.int16),
        action=vocab["action"].encode(text["action"].take(take)).astype(np.int16),
        item=vocab["item"].encode(text["item_id"].take(take)).astype(np.int32),
        category=first, categories_offsets=cat_off, categories_values=cat_val,
        query_offsets=q_off, query_values=q_val, value=values.astype(np.float32))
