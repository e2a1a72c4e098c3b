"""Turn raw event chunks into compact integer columns, applying the per-row cleaning rules on the way.

`ChunkEncoder.add(table)` takes one chunk in the raw schema (see `schema`), parses timestamps and values,
drops rows under the rules ``missing_field``, ``bad_timestamp``, ``timestamp_out_of_range`` and
``unknown_action`` (counting each), and dictionary-encodes the string columns of the kept rows. Only
int32 codes, int64 timestamps and float32 values stay in memory, plus each chunk's distinct strings;
`ChunkEncoder.finish()` merges the per-chunk dictionaries into global ones and returns `EncodedEvents`.

Everything is vectorised with pyarrow compute and numpy; work that depends on the string itself
(trimming, lower-casing, splitting categories, tokenising queries) is done on the distinct values only.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import DEFAULT_ACTIONS, DEFAULT_MAX_TIME, DEFAULT_MIN_TIME, DataError, REQUIRED_COLUMNS

#: String columns kept as dictionary codes. ``category`` and ``query`` keep the whole raw string
#: (split into tokens later, once per distinct string).
CODED_COLUMNS = ("user_id", "platform", "action", "item_id", "category", "query")

_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"

# ----------------------------------------------------------------------------------------------------
# Parsing helpers (`events_from_records` uses them too)
# ----------------------------------------------------------------------------------------------------

def _to_numpy(arr: pa.Array | pa.ChunkedArray, fill) -> np.ndarray:
    """A pyarrow array as numpy, nulls replaced by `fill`."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        arr = pc.fill_null(arr, fill)
    return arr.to_numpy(zero_copy_only=False)


def _parse_iso8601(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strict ISO-8601 parser, vectorised over the raw UTF-8 bytes of a string array.

    Accepts ``YYYY-MM-DD``, optionally followed by ``T`` or a space and ``HH:MM``, ``:SS``, a fraction
    (``.123``, dropped) and a zone (``Z``, ``+HH``, ``+HHMM``, ``+HH:MM`` or ``-``...; none means UTC).
    Days that do not exist (2023-02-29) and out-of-range fields are rejected. Returns ``(unix seconds, ok)``.
    """
    n = len(strings)
    strings = strings.cast(pa.string())
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32)[strings.offset:strings.offset + n + 1]
    data_buffer = strings.buffers()[2]
    raw = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    # Zero padding after the last string lets every read at a fixed distance from a string's start stay in
    # bounds; reads past a string's own end (into the next string) are guarded by `length` below.
    data = np.zeros(len(raw) + 64, dtype=np.uint8)
    data[:len(raw)] = raw
    start = offsets[:-1].astype(np.int64)
    length = (offsets[1:] - offsets[:-1]).astype(np.int64)

    def char(pos) -> np.ndarray:
        return data[start + pos]

    def number(pos, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Value of the `size` digits at `pos` (a number or one per string), and whether all are digits."""
        value = np.zeros(n, dtype=np.int64)
        ok = np.ones(n, dtype=bool)
        for k in range(size):
            d = char(pos + k).astype(np.int64) - ord("0")
            ok &= (d >= 0) & (d <= 9)
            value = value * 10 + d
        return value, ok

    # date
    year, ok = number(0, 4)
    month, ok_month = number(5, 2)
    day, ok_day = number(8, 2)
    ok &= ok_month & ok_day & (char(4) == ord("-")) & (char(7) == ord("-")) & (length >= 10)
    # time of day
    has_time = (length > 10) & ((char(10) == ord("T")) | (char(10) == ord(" ")))
    hour, ok_hour = number(11, 2)
    minute, ok_minute = number(14, 2)
    ok &= ~has_time | (ok_hour & ok_minute & (char(13) == ord(":")) & (length >= 16))
    has_second = has_time & (length > 16) & (char(16) == ord(":"))
    second, ok_second = number(17, 2)
    ok &= ~has_second | (ok_second & (length >= 19))
    hour, minute = np.where(has_time, hour, 0), np.where(has_time, minute, 0)
    second = np.where(has_second, second, 0)
    pos = np.where(has_second, 19, np.where(has_time, 16, 10))
    # a fraction of a second is skipped (at least one digit after the point)
    fraction = has_second & (length > 19) & ((char(19) == ord(".")) | (char(19) == ord(",")))
    pos = pos + fraction
    more = fraction
    while True:
        d = char(pos).astype(np.int64) - ord("0")
        more = more & (pos < length) & (d >= 0) & (d <= 9)
        if not more.any():
            break
        pos = pos + more
    ok &= ~fraction | (pos > 20)
    # zone
    c = np.where(pos < length, char(pos), 0)
    zulu = c == ord("Z")
    sign = np.where(c == ord("+"), 1, np.where(c == ord("-"), -1, 0))
    zone_hour, ok_zone_hour = number(pos + 1, 2)
    colon = (char(pos + 3) == ord(":")).astype(np.int64)
    zone_minute, ok_zone_minute = number(pos + 3 + colon, 2)
    zone_len = np.where(ok_zone_minute, 5 + colon, 3)
    zoned = (sign != 0) & ok_zone_hour & has_time
    zone_hour = np.where(zoned, zone_hour, 0)
    zone_minute = np.where(zoned & ok_zone_minute, zone_minute, 0)
    end = np.where(zulu, pos + 1, np.where(zoned, pos + zone_len, pos))
    ok &= end == length  # nothing left over, and no read past the string's end counted
    offset = sign * (zone_hour * 3600 + zone_minute * 60)
    # ranges
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    days_in_month = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 0, 12)] + (
        leap & (month == 2))
    ok &= (month >= 1) & (month <= 12) & (day >= 1) & (day <= days_in_month)
    ok &= (hour < 24) & (minute < 60) & (second < 60) & (zone_hour < 24) & (zone_minute < 60)
    # days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil)
    y = year - (month <= 2)
    era = np.floor_divide(y, 400)
    year_of_era = y - era * 400
    day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    seconds = days * 86400 + hour * 3600 + minute * 60 + second - offset
    if strings.null_count:
        ok &= _to_numpy(pc.is_valid(strings), False)
    return np.where(ok, seconds, 0), ok


def _parse_text_timestamps(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse trimmed, non-digit timestamp text: ISO-8601, or signed / decimal unix seconds."""
    seconds, parsed = _parse_iso8601(strings)
    rest = np.flatnonzero(~parsed)
    if len(rest):
        sub = strings.take(pa.array(rest))
        numeric = _to_numpy(pc.match_substring_regex(sub, _NUMBER), False)
        if numeric.any():
            as_float = pc.cast(sub.filter(pa.array(numeric)), pa.float64()).to_numpy(zero_copy_only=False)
            finite = np.isfinite(as_float) & (np.abs(as_float) < 1e15)
            idx = rest[numeric][finite]
            seconds[idx], parsed[idx] = np.floor(as_float[finite]).astype(np.int64), True
    return seconds, parsed


def parse_timestamps(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a timestamp column of any type to unix seconds.

    Returns ``(seconds int64, present bool, parsed bool)``: `present` is False for null/empty entries
    (a missing field), `parsed` is True where a value was read (integers, decimals, ISO-8601 text,
    Arrow timestamps and dates; ISO text without an offset is UTC).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    t = column.type
    present = _to_numpy(pc.is_valid(column), False)
    if pa.types.is_integer(t):
        return _to_numpy(column.cast(pa.int64()), 0), present, present.copy()
    if pa.types.is_floating(t):
        values = _to_numpy(column.cast(pa.float64()), np.nan)
        parsed = present & np.isfinite(values) & (np.abs(values) < 1e15)
        return np.where(parsed, np.floor(np.nan_to_num(values)), 0).astype(np.int64), present, parsed
    if pa.types.is_timestamp(t):
        seconds = column.cast(pa.timestamp("s", tz=t.tz))
        return _to_numpy(seconds.cast(pa.int64()), 0), present, present.copy()
    if pa.types.is_date(t):
        return _to_numpy(column.cast(pa.timestamp("s")).cast(pa.int64()), 0), present, present.copy()
    if pa.types.is_dictionary(t):  # parse each distinct value once
        seconds, present_d, parsed_d = parse_timestamps(column.dictionary)
        idx = _to_numpy(column.indices, -1).astype(np.int64)
        valid = idx >= 0
        idx[~valid] = 0
        if not len(seconds):
            return np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)
        return seconds[idx], present_d[idx] & valid, parsed_d[idx] & valid
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        column = column.cast(pa.string())
    # Fast path: plain digits (unix seconds) need no trimming or pattern matching.
    # (ASCII digits only: utf8_is_digit also accepts "²" or "١٢٣", which no integer cast reads)
    digits = _to_numpy(pc.and_(pc.ascii_is_decimal(column), pc.less_equal(pc.binary_length(column), 18)), False)
    seconds = np.zeros(n, dtype=np.int64)
    if digits.any():
        seconds[digits] = pc.cast(column.filter(pa.array(digits)), pa.int64()).to_numpy()
    parsed = digits.copy()
    rest = np.flatnonzero(~digits & present)
    if len(rest):
        text = pc.utf8_trim_whitespace(column.take(pa.array(rest)))
        nonempty = _to_numpy(pc.greater(pc.utf8_length(text), 0), False)
        present[rest[~nonempty]] = False  # blank text is a missing field
        idx = rest[nonempty]
        seconds[idx], parsed[idx] = _parse_text_timestamps(text.filter(pa.array(nonempty)))
    return seconds, present, parsed


def parse_values(column: pa.Array | pa.ChunkedArray | None, n: int) -> np.ndarray:
    """The optional ``value`` column as float32; NaN where missing, not a number, or not finite."""
    if column is None:
        return np.full(n, np.nan, dtype=np.float32)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        out = _to_numpy(column.cast(pa.float64()), np.nan)
    else:
        try:  # the usual case: every non-empty entry is a number
            out = _to_numpy(pc.cast(column, pa.float64()), np.nan)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            text = pc.utf8_trim_whitespace(column.cast(pa.string()))
            numeric = _to_numpy(pc.match_substring_regex(text, _NUMBER), False)
            out = np.full(n, np.nan)
            if numeric.any():
                out[numeric] = pc.cast(text.filter(pa.array(numeric)), pa.float64()).to_numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        out = out.astype(np.float32)  # values beyond float32 become inf, then NaN below
    out[~np.isfinite(out)] = np.nan
    return out


def _lower_trim(values: pa.Array) -> pa.Array:
    return pc.utf8_lower(pc.utf8_trim_whitespace(values))


def _trim(values: pa.Array) -> pa.Array:
    return pc.utf8_trim_whitespace(values)


#: How the distinct values of each coded column are normalised.
NORMALISERS: dict[str, Callable[[pa.Array], pa.Array]] = {
    "user_id": _trim, "platform": _lower_trim, "action": _lower_trim,
    "item_id": _trim, "category": _trim, "query": _trim,
}


def dictionary_codes(column: pa.Array | pa.ChunkedArray | None, n: int,
                     normalise: Callable[[pa.Array], pa.Array] | None = None) -> tuple[np.ndarray, pa.Array]:
    """Dictionary-encode a column: ``(codes int32, distinct values)``; code -1 = null or empty.

    Normalisation runs on the distinct values only; values that normalise to the same string share one code.
    """
    if column is None:
        return np.full(n, -1, dtype=np.int32), pa.array([], pa.string())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):  # already encoded (Parquet dictionary pages, adapters)
        encoded = column
        if not pa.types.is_string(encoded.dictionary.type):
            encoded = pa.DictionaryArray.from_arrays(encoded.indices, encoded.dictionary.cast(pa.string()))
    else:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = column.cast(pa.string())
        encoded = pc.dictionary_encode(column)
    codes = _to_numpy(encoded.indices, -1).astype(np.int32, copy=False)
    values = encoded.dictionary
    if normalise is not None:
        values = normalise(values)
    # Merge values that became equal, and send empty strings to -1.
    merged = pc.dictionary_encode(values)
    uniq = merged.dictionary
    remap = merged.indices.to_numpy().astype(np.int32)
    empty = _to_numpy(pc.equal(pc.utf8_length(uniq), 0), False)
    if empty.any() or len(uniq) != len(values):
        keep = ~empty
        new_id = np.cumsum(keep, dtype=np.int32) - 1
        new_id[empty] = -1
        lookup = np.append(new_id[remap], np.int32(-1))  # index -1 (null) -> -1
        codes = lookup[codes]
        uniq = uniq.filter(pa.array(keep))
    return codes, uniq


def merge_dictionaries(chunk_values: Sequence[pa.Array]) -> tuple[pa.Array, list[np.ndarray]]:
    """Merge per-chunk distinct values into one global dictionary.

    Returns the global values and, per chunk, an int32 array mapping its local codes to global ones
    (with one extra slot at the end so that local code -1 maps to -1).
    """
    if not chunk_values:
        return pa.array([], pa.string()), []
    everything = pa.concat_arrays([v.cast(pa.string()) for v in chunk_values])
    encoded = pc.dictionary_encode(everything)
    global_codes = encoded.indices.to_numpy().astype(np.int32)
    maps, start = [], 0
    for values in chunk_values:
        stop = start + len(values)
        maps.append(np.append(global_codes[start:stop], np.int32(-1)))
        start = stop
    return encoded.dictionary, maps


# ----------------------------------------------------------------------------------------------------
# The chunk encoder
# ----------------------------------------------------------------------------------------------------

@dataclass
class EncodedEvents:
    """All kept-so-far events as global integer codes, in input order.

    ``codes[name]`` indexes ``dictionaries[name]`` (distinct normalised strings); -1 = missing
    (only possible for the optional ``category`` and ``query``).
    """

    timestamp: np.ndarray                       # int64 unix seconds
    value: np.ndarray                           # float32, NaN = missing
    codes: dict[str, np.ndarray]                # int32 per CODED_COLUMNS name
    dictionaries: dict[str, pa.Array]
    rows_read: int
    dropped: dict[str, int]

    def __len__(self) -> int:
        return len(self.timestamp)


@dataclass
class _Chunk:
    """One encoded chunk: the kept rows' values and codes into the chunk's own distinct values."""

    rows: int
    dropped: dict[str, int]
    timestamp: np.ndarray
    value: np.ndarray
    codes: dict[str, np.ndarray]
    values: dict[str, pa.Array]


def encode_chunk(table: pa.Table, allowed_actions: pa.Array, min_time: int, max_time: int) -> _Chunk:
    """Parse, check and dictionary-encode one chunk in the raw schema (pure: safe to run in threads)."""
    n = table.num_rows
    names = table.column_names
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing_cols:  # the readers check files; this guards direct API use
        raise DataError(f"missing required column(s) {', '.join(missing_cols)}")
    codes, values = {}, {}
    for name in CODED_COLUMNS:
        codes[name], values[name] = dictionary_codes(
            table.column(name) if name in names else None, n, NORMALISERS[name])
    seconds, ts_present, ts_parsed = parse_timestamps(table.column("timestamp"))

    # The per-row rules, each row counted under the first one it breaks.
    missing = ~ts_present
    for name in ("user_id", "platform", "action", "item_id"):
        missing |= codes[name] < 0
    bad_ts = ~missing & ~ts_parsed
    out_of_range = ~missing & ~bad_ts & ((seconds < min_time) | (seconds >= max_time))
    action_allowed = np.append(_to_numpy(pc.is_in(values["action"], value_set=allowed_actions), False), False)
    unknown = ~missing & ~bad_ts & ~out_of_range & ~action_allowed[codes["action"]]
    keep = ~(missing | bad_ts | out_of_range | unknown)
    dropped = {"missing_field": int(missing.sum()), "bad_timestamp": int(bad_ts.sum()),
               "timestamp_out_of_range": int(out_of_range.sum()), "unknown_action": int(unknown.sum())}

    value = parse_values(table.column("value") if "value" in names else None, n)
    if not keep.all():
        seconds, value = seconds[keep], value[keep]
        codes = {k: v[keep] for k, v in codes.items()}
    return _Chunk(rows=n, dropped=dropped, timestamp=seconds, value=value, codes=codes, values=values)


@dataclass
class ChunkEncoder:
    """Encodes raw chunks (optionally in worker threads) and merges them; see the module docstring."""

    actions: Sequence[str] = DEFAULT_ACTIONS
    min_time: int = DEFAULT_MIN_TIME
    max_time: int = DEFAULT_MAX_TIME
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {
        "missing_field": 0, "bad_timestamp": 0, "timestamp_out_of_range": 0, "unknown_action": 0})
    _chunks: list[_Chunk] = field(default_factory=list)

    def __post_init__(self):
        self._allowed = pa.array(sorted({a.strip().lower() for a in self.actions}), pa.string())

    def _append(self, chunk: _Chunk) -> None:
        self.rows_read += chunk.rows
        for rule, count in chunk.dropped.items():
            self.dropped[rule] += count
        self._chunks.append(chunk)

    def add(self, table: pa.Table) -> None:
        """Encode one chunk in the raw schema."""
        self._append(encode_chunk(table, self._allowed, self.min_time, self.max_time))

    def add_all(self, tables: Iterable[pa.Table], threads: int = 1, on_chunk: Callable[[int], None] | None = None
                ) -> None:
        """Encode a stream of chunks, `threads` at a time while the next ones are read; chunks keep their order."""
        if threads <= 1:
            for table in tables:
                self.add(table)
                if on_chunk:
                    on_chunk(table.num_rows)
            return
        with ThreadPoolExecutor(max_workers=threads) as pool:
            pending: deque = deque()
            for table in tables:
                pending.append(pool.submit(encode_chunk, table, self._allowed, self.min_time, self.max_time))
                while len(pending) > threads:
                    self._collect(pending.popleft(), on_chunk)
            while pending:
                self._collect(pending.popleft(), on_chunk)

    def _collect(self, future, on_chunk) -> None:
        chunk = future.result()
        self._append(chunk)
        if on_chunk:
            on_chunk(chunk.rows)

    def finish(self, threads: int = 1) -> EncodedEvents:
        """Merge the chunks into global codes, `threads` columns at a time (the chunk buffers are released)."""
        chunks, self._chunks = self._chunks, []

        def merge(name: str) -> tuple[pa.Array, np.ndarray]:
            values, maps = merge_dictionaries([c.values[name] for c in chunks])
            parts = [m[c.codes[name]] for m, c in zip(maps, chunks)]
            for c in chunks:  # free as we go
                c.codes[name] = None
            return values, np.concatenate(parts) if parts else np.zeros(0, np.int32)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            merged = dict(zip(CODED_COLUMNS, pool.map(merge, CODED_COLUMNS)))
        dictionaries = {name: merged[name][0] for name in CODED_COLUMNS}
        codes = {name: merged[name][1] for name in CODED_COLUMNS}
        timestamp = np.concatenate([c.timestamp for c in chunks]) if chunks else np.zeros(0, np.int64)
        value = np.concatenate([c.value for c in chunks]) if chunks else np.zeros(0, np.float32)
        return EncodedEvents(timestamp=timestamp, value=value, codes=codes, dictionaries=dictionaries,
                             rows_read=self.rows_read, dropped=dict(self.dropped))
