"""Adapters: read public data sets and turn them into chunks of the raw event schema (see `schema`).

Formats (``--format``):

* ``generic``: CSV with a header row (``.csv``, ``.csv.gz``, ``.tsv``) or Parquet, already in the raw schema.
* ``taobao``: Taobao UserBehavior CSV without header, ``user_id,item_id,category_id,behavior_type,timestamp``;
  platform ``taobao``; behaviours pv -> view, cart -> cart, fav -> favorite, buy -> purchase.
* ``amazon-cdsr``: C2DSR cross-domain sequences (``val_new.txt``, ``test_new.txt``, optional
  ``train_new.txt``; give the directory or the files); platforms ``food`` and ``kitchen``, action ``rate``.
* ``movielens``: ``u.data`` (with ``u.item`` and ``u.genre`` beside it) or a RecBole atomic ``X.inter``
  (with ``X.item`` beside it), or a directory holding one; platform ``movielens``, action ``rate``.

Decisions worth knowing:

* Taobao: the data set covers 2017-11-25 .. 2017-12-03 (UTC+8); the adapter makes that the valid time range,
  so the few out-of-range timestamps of the original file are dropped as ``timestamp_out_of_range``.
* Amazon (C2DSR Food-Kitchen): each review is an event with action ``rate`` (no rating value is given).
  Timestamps are whole days, so the bot-burst rule is off unless asked for.
  The *domain* is both the platform and the category (``food`` / ``kitchen``), so interest labels say which
  domain a person engages with next, and next-item targets stay cross-domain. Items are their ASINs when
  ``items_x.txt`` / ``items_y.txt`` are beside the sequences, else the dataset's item index. A user is the same
  person in both domains: the adapter links ``(food, u)`` with ``(kitchen, u)`` for every user (the account id
  is the reviewer id from ``userlist.txt`` when present, else the user index).
* MovieLens: a rating is an event with action ``rate`` and ``value`` = the rating; an item's genres are its
  categories (``u.item`` genre flags named by ``u.genre``; RecBole's ``class``/``genre`` token list).
  ``u.item`` is Latin-1, as published.

Small fixed files (the Amazon sequences, item metadata) are read whole; event files stream in chunks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .io import MalformedRows, file_format, iter_csv, iter_parquet, read_table
from .linking import account_strings
from .schema import CATEGORY_SEPARATOR, DEFAULT_ACTIONS, DataError, RAW_COLUMNS, REQUIRED_COLUMNS

FORMATS = ("generic", "taobao", "amazon-cdsr", "movielens")


def _constant(value: str, n: int) -> pa.DictionaryArray:
    """A column holding one string n times, stored as a dictionary (no per-row string)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


def _map_values(column: pa.Array | pa.ChunkedArray, mapping: dict[str, str]) -> pa.DictionaryArray:
    """Map the values of a string column through `mapping` (unmapped values pass through unchanged)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column.cast(pa.string()))
    values = [mapping.get(v, v) if v is not None else None for v in encoded.dictionary.to_pylist()]
    return pa.DictionaryArray.from_arrays(encoded.indices, pa.array(values, pa.string()))


class Adapter:
    """Base class. Subclasses implement `chunks` and may provide links, actions and a time range."""

    name = "base"
    #: Action vocabulary used when the caller does not give one.
    actions: tuple[str, ...] = DEFAULT_ACTIONS
    #: Valid time range [min, max) used when the caller does not give one (None: the global default).
    time_range: tuple[int, int] | None = None
    #: Bot threshold used when the caller does not give one (None: the global default; 0: rule off).
    max_events_per_second: int | None = None

    def chunks(self, paths: Sequence[Path], chunk_rows: int, malformed: MalformedRows) -> Iterator[pa.Table]:
        raise NotImplementedError

    def links(self, paths: Sequence[Path]) -> tuple[pa.Array, pa.Array] | None:
        """Pairs of canonical account strings the data set itself implies (None: no links)."""
        return None

    def total_rows(self, paths: Sequence[Path]) -> int | None:
        """Rows to expect, when cheap to know (for progress bars)."""
        return None


class GenericAdapter(Adapter):
    """CSV with a header row, or Parquet, already in the raw schema."""

    name = "generic"

    def chunks(self, paths, chunk_rows, malformed):
        for path in paths:
            if file_format(path) == "parquet":
                # Repetitive strings come back dictionary-encoded (cheap); timestamps are mostly distinct.
                yield from iter_parquet(path, columns=RAW_COLUMNS, required=REQUIRED_COLUMNS, chunk_rows=chunk_rows,
                                        dictionary_columns=("user_id", "platform", "action", "item_id", "category",
                                                            "query"))
            else:
                delimiter = "\t" if str(path).lower().endswith((".tsv", ".tsv.gz")) else ","
                yield from iter_csv(path, delimiter=delimiter, string_columns=RAW_COLUMNS,
                                    required=REQUIRED_COLUMNS, chunk_rows=chunk_rows, malformed=malformed)

    def total_rows(self, paths):
        import pyarrow.parquet as pq
        if all(file_format(p) == "parquet" for p in paths):
            try:
                return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
            except Exception:  # a broken file is reported when it is read
                return None
        return None


class TaobaoAdapter(Adapter):
    """Taobao UserBehavior.csv (no header): user_id,item_id,category_id,behavior_type,timestamp."""

    name = "taobao"
    COLUMNS = ("user_id", "item_id", "category", "behavior_type", "timestamp")
    BEHAVIOURS = {"pv": "view", "cart": "cart", "fav": "favorite", "buy": "purchase"}
    actions = ("view", "cart", "favorite", "purchase")
    #: 2017-11-25 00:00:00 .. 2017-12-04 00:00:00 in UTC+8, the data set's documented days.
    time_range = (1_511_539_200, 1_512_316_800)

    def chunks(self, paths, chunk_rows, malformed):
        for path in paths:
            for table in iter_csv(path, column_names=self.COLUMNS, string_columns=self.COLUMNS,
                                  chunk_rows=chunk_rows, malformed=malformed):
                n = table.num_rows
                yield pa.table({
                    "user_id": table.column("user_id"),
                    "platform": _constant("taobao", n),
                    "timestamp": table.column("timestamp"),
                    "action": _map_values(table.column("behavior_type"), self.BEHAVIOURS),
                    "item_id": table.column("item_id"),
                    "category": table.column("category"),
                })


class AmazonCDSRAdapter(Adapter):
    """C2DSR Food-Kitchen cross-domain sequences; see the module docstring for the choices made."""

    name = "amazon-cdsr"
    actions = ("rate",)
    max_events_per_second = 0  # timestamps are days: many reviews share one "second"
    SEQUENCE_FILES = ("train_new.txt", "val_new.txt", "test_new.txt")
    DOMAINS = ("food", "kitchen")

    def _sequence_files(self, paths: Sequence[Path]) -> list[Path]:
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                found = [path / f for f in self.SEQUENCE_FILES if (path / f).exists()]
                if not found:
                    raise DataError(f"no {', '.join(self.SEQUENCE_FILES)} in this directory", path)
                files += found
            else:
                files.append(path)
        return files

    @staticmethod
    def _read_lines(path: Path) -> pa.Array:
        if not path.exists():
            raise DataError("file not found", path)
        data = path.read_bytes()
        if not data.strip():
            raise DataError("empty file", path, line=1)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise DataError(f"bytes that are not valid UTF-8 ({exc.reason})", path, line=line) from None
        return pa.array(text.splitlines(), pa.string())

    @staticmethod
    def _lookup_file(directory: Path, name: str, value_col: int, key_col: int) -> pa.Array | None:
        """Read a ``a \\t b \\t c`` table beside the sequences; returns values indexed by the integer key."""
        path = directory / name
        if not path.exists():
            return None
        lines = AmazonCDSRAdapter._read_lines(path)
        parts = pc.split_pattern(lines, "\t")
        keys = pc.cast(pc.list_element(parts, key_col), pa.int64()).to_numpy()
        values = pc.list_element(parts, value_col)
        out = [None] * (int(keys.max()) + 1 if len(keys) else 0)
        for k, v in zip(keys.tolist(), values.to_pylist()):
            out[k] = v
        return pa.array(out, pa.string())

    def _parse(self, path: Path) -> tuple[pa.Table, pa.Array]:
        """Parse one sequence file: a raw-schema table and the distinct user ids in it."""
        directory = path.parent
        items_x = self._lookup_file(directory, "items_x.txt", value_col=1, key_col=2)
        items_y = self._lookup_file(directory, "items_y.txt", value_col=1, key_col=2)
        users = self._lookup_file(directory, "userlist.txt", value_col=0, key_col=1)
        n_x = len(items_x) if items_x is not None else 29207  # Food items come first (PROVENANCE.md)

        lines = self._read_lines(path)
        lines = lines.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0))
        fields = pc.split_pattern(pc.utf8_rtrim_whitespace(lines), "\t")
        n_fields = pc.list_value_length(fields).to_numpy()
        short = np.flatnonzero(n_fields < 3)
        if len(short):
            raise DataError("expected 'user \\t seq \\t item|ts|date| ...'", path, line=int(short[0]) + 1)
        user_idx = pc.list_element(fields, 0)
        events = pc.list_slice(fields, 2)
        flat = pc.list_flatten(events)
        parent = pc.list_parent_indices(events)
        parts = pc.split_pattern(flat, "|")
        try:
            item = pc.cast(pc.list_element(parts, 0), pa.int64()).to_numpy()
        except pa.ArrowInvalid as exc:
            raise DataError(f"an item index is not an integer: {exc}", path) from None
        timestamp = pc.list_element(parts, 1)

        kitchen = item >= n_x
        domain = pa.DictionaryArray.from_arrays(pa.array(kitchen.astype(np.int32)), pa.array(self.DOMAINS))
        if items_x is not None and items_y is not None:
            local = np.where(kitchen, item - n_x, item)
            asin_x = items_x.take(pa.array(np.where(kitchen, 0, local)))
            asin_y = items_y.take(pa.array(np.where(kitchen, local, 0).clip(0, len(items_y) - 1)))
            item_id = pc.if_else(pa.array(kitchen), asin_y, asin_x)
        else:
            item_id = pa.array(item).cast(pa.string())
        if users is not None:
            idx = pc.cast(user_idx, pa.int64())
            user_id = pc.if_else(pc.less(idx, len(users)), users.take(pc.min_element_wise(idx, len(users) - 1)),
                                 user_idx)
        else:
            user_id = user_idx
        event_user = user_id.take(parent)
        table = pa.table({
            "user_id": event_user, "platform": domain, "timestamp": timestamp,
            "action": _constant("rate", len(item)), "item_id": item_id, "category": domain,
        })
        return table, pc.unique(user_id)

    def __init__(self):
        self._parsed: dict[Path, tuple[pa.Table, pa.Array]] = {}

    def _parse_cached(self, path: Path) -> tuple[pa.Table, pa.Array]:
        if path not in self._parsed:
            self._parsed[path] = self._parse(path)
        return self._parsed[path]

    def chunks(self, paths, chunk_rows, malformed):
        for path in self._sequence_files(paths):
            table, _ = self._parse_cached(path)
            for batch in table.to_batches(max_chunksize=chunk_rows):
                yield pa.Table.from_batches([batch])

    def links(self, paths):
        users = pa.concat_arrays([self._parse_cached(p)[1] for p in self._sequence_files(paths)])
        users = pc.unique(pc.utf8_trim_whitespace(users))
        return (account_strings(_constant(self.DOMAINS[0], len(users)).dictionary_decode(), users),
                account_strings(_constant(self.DOMAINS[1], len(users)).dictionary_decode(), users))


class MovieLensAdapter(Adapter):
    """MovieLens ``u.data`` + ``u.item`` (+ ``u.genre``), or RecBole atomic ``.inter`` + ``.item``."""

    name = "movielens"
    actions = ("rate",)
    GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                   "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                   "Sci-Fi", "Thriller", "War", "Western")

    @staticmethod
    def _event_file(path: Path) -> Path:
        if path.is_dir():
            found = sorted(path.glob("*.inter")) or ([path / "u.data"] if (path / "u.data").exists() else [])
            if not found:
                raise DataError("no u.data or *.inter file in this directory", path)
            return found[0]
        return path

    def _u_item(self, path: Path) -> tuple[pa.Array, pa.Array] | None:
        """(item ids, '|'-joined genres) from u.item beside u.data."""
        item_file = path.parent / "u.item"
        if not item_file.exists():
            return None
        genres = list(self.GENRES_100K)
        genre_file = path.parent / "u.genre"
        if genre_file.exists():
            rows = [ln.split("|") for ln in genre_file.read_text(encoding="latin-1").splitlines() if ln.strip()]
            genres = [name for name, _ in sorted(((r[0], int(r[1])) for r in rows if len(r) >= 2),
                                                 key=lambda x: x[1])]
        try:
            table = pacsv.read_csv(
                item_file, read_options=pacsv.ReadOptions(column_names=None, autogenerate_column_names=True,
                                                          encoding="latin-1"),
                parse_options=pacsv.ParseOptions(delimiter="|", quote_char=False),
                convert_options=pacsv.ConvertOptions(column_types={"f0": pa.string()}))
        except pa.ArrowInvalid as exc:
            raise DataError(f"cannot parse u.item: {exc}", item_file) from None
        n_cols = table.num_columns
        if n_cols < 5 + len(genres):
            raise DataError(f"expected {5 + len(genres)} '|'-separated fields, found {n_cols}", item_file, line=1)
        flags = np.stack([pc.fill_null(table.column(5 + g), 0).to_numpy() for g in range(len(genres))], axis=1)
        joined = [CATEGORY_SEPARATOR.join(genres[g] for g in np.flatnonzero(row)) for row in flags]
        return table.column(0).combine_chunks(), pa.array(joined, pa.string())

    @staticmethod
    def _recbole_item(path: Path) -> tuple[pa.Array, pa.Array] | None:
        """(item ids, '|'-joined genres) from X.item beside X.inter."""
        item_file = path.with_suffix(".item")
        if not item_file.exists():
            return None
        table = read_table(item_file, delimiter="\t", quoting=False)
        names = {c.split(":")[0]: c for c in table.column_names}
        genre_col = next((names[c] for c in ("class", "genre", "genres") if c in names), None)
        if "item_id" not in names or genre_col is None:
            raise DataError("a RecBole .item file needs item_id and class/genre columns", item_file, line=1)
        genres = pc.utf8_trim_whitespace(table.column(genre_col).combine_chunks().cast(pa.string()))
        joined = pc.binary_join(pc.split_pattern_regex(genres, r"\s+"), CATEGORY_SEPARATOR)
        return table.column(names["item_id"]).combine_chunks().cast(pa.string()), joined

    def chunks(self, paths, chunk_rows, malformed):
        for path in paths:
            path = self._event_file(path)
            if path.suffix == ".inter":
                metadata = self._recbole_item(path)
                stream = iter_csv(path, delimiter="\t", quoting=False, chunk_rows=chunk_rows, malformed=malformed,
                                  string_columns=("user_id:token", "item_id:token", "timestamp:float"))
            else:
                metadata = self._u_item(path)
                stream = iter_csv(path, column_names=("user_id", "item_id", "rating", "timestamp"), delimiter="\t",
                                  quoting=False, string_columns=("user_id", "item_id", "timestamp"),
                                  chunk_rows=chunk_rows, malformed=malformed)
            # RecBole names columns "name:type"; the rating becomes the event's value.
            rename = {"user_id": "user_id", "item_id": "item_id", "rating": "value", "timestamp": "timestamp"}
            for table in stream:
                cols = {}
                for name in table.column_names:
                    base = name.split(":")[0]
                    if base in rename:
                        cols[rename[base]] = table.column(name)
                if {"user_id", "item_id", "timestamp"} - set(cols):
                    raise DataError("MovieLens ratings need user_id, item_id and timestamp columns", path, line=1)
                n = table.num_rows
                item = cols["item_id"].combine_chunks().cast(pa.string())
                out = {
                    "user_id": cols["user_id"], "platform": _constant("movielens", n),
                    "timestamp": cols["timestamp"], "action": _constant("rate", n), "item_id": item,
                }
                if metadata is not None:
                    ids, genres = metadata
                    out["category"] = genres.take(pc.index_in(item, value_set=ids))
                if "value" in cols:
                    out["value"] = cols["value"]
                yield pa.table(out)


ADAPTERS: dict[str, type[Adapter]] = {
    "generic": GenericAdapter, "taobao": TaobaoAdapter,
    "amazon-cdsr": AmazonCDSRAdapter, "movielens": MovieLensAdapter,
}


def get_adapter(fmt: str) -> Adapter:
    try:
        return ADAPTERS[fmt]()
    except KeyError:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(ADAPTERS)}") from None
