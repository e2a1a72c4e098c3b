"""Chunked reading of CSV and Parquet files, with every file-level problem turned into a `DataError`.

Readers yield `pyarrow.Table` chunks of a bounded number of rows, so a file larger than memory can be
streamed. Rows with the wrong number of CSV fields are skipped and counted (`MalformedRows`), never fatal;
a missing column, bytes that are not UTF-8, an empty file or an unreadable Parquet file raise `DataError`.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .schema import DataError

#: Rows per chunk when streaming (about 40-80 MB of raw strings per chunk).
DEFAULT_CHUNK_ROWS = 1_000_000


def file_format(path: str | Path) -> str:
    """``"parquet"`` for ``.parquet``/``.pq`` files, else ``"csv"`` (also ``.tsv``, ``.txt``, ``.gz``...)."""
    name = str(path).lower()
    return "parquet" if name.endswith((".parquet", ".pq")) else "csv"


@dataclass
class MalformedRows:
    """Counts CSV rows skipped because they have the wrong number of fields, and says where the first few are."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5
    current_path: str = ""

    def handler(self, row) -> str:
        """`pyarrow.csv.ParseOptions.invalid_row_handler`: count the row and skip it."""
        self.count += 1
        if len(self.examples) < self.max_examples:
            where = f", line {row.number}" if row.number is not None else ""
            # No row text: it may hold raw account ids, and reports must not.
            self.examples.append(f"{self.current_path}{where}: a row with {row.actual_columns} fields instead "
                                 f"of {row.expected_columns}")
        return "skip"


def _check_not_empty(path: Path) -> None:
    if not path.exists():
        raise DataError("file not found", path)
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", path, line=1)


def _first_non_utf8_line(path: Path) -> tuple[int, str] | None:
    """Scan a (possibly gzipped) text file for the first line that is not valid UTF-8 (error path only)."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, f"bytes that are not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)"
    return None


def _csv_error(path: Path, exc: Exception, rows_before: int, header_lines: int) -> DataError:
    """Translate a pyarrow CSV exception into a `DataError` with the best line number we can find."""
    message = str(exc)
    if "UTF8" in message or "UTF-8" in message or "utf8" in message:
        found = _first_non_utf8_line(path)
        if found is not None:
            return DataError(found[1] + "; re-encode the file as UTF-8", path, line=found[0])
    if "Empty CSV file" in message:
        return DataError("empty file (no header line)", path, line=1)
    return DataError(f"cannot parse CSV: {message}", path, line=rows_before + header_lines + 1)


def iter_csv(
    path: str | Path,
    *,
    column_names: Sequence[str] | None = None,
    delimiter: str = ",",
    string_columns: Sequence[str] = (),
    required: Sequence[str] = (),
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    malformed: MalformedRows | None = None,
    quoting: bool = True,
) -> Iterator[pa.Table]:
    """Stream a CSV file as tables of about `chunk_rows` rows.

    Args:
        column_names: the names of a file without a header row (its first line is data); ``None`` reads
            the names from the header.
        string_columns: columns read as strings whatever they look like (the rest is type-inferred).
        required: columns that must be present, else `DataError` at line 1.
        malformed: collects rows with the wrong number of fields (skipped); ``None`` makes them fatal.
    """
    path = Path(path)
    _check_not_empty(path)
    header_lines = 0 if column_names else 1
    # Aim for `chunk_rows` rows per block from the average line length of the file's start.
    with (gzip.open if str(path).lower().endswith(".gz") else open)(path, "rb") as f:
        head = f.read(1 << 16)
    avg_line = max(8, len(head) // max(1, head.count(b"\n")))
    block_size = int(min(max(avg_line * chunk_rows, 1 << 20), 1 << 30))
    read_options = pacsv.ReadOptions(
        column_names=list(column_names) if column_names else None, block_size=block_size, use_threads=True)
    if malformed is not None:
        malformed.current_path = str(path)
    parse_options = pacsv.ParseOptions(
        delimiter=delimiter, quote_char='"' if quoting else False,
        invalid_row_handler=malformed.handler if malformed is not None else None)
    convert_options = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in string_columns},
        null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True)
    rows = 0
    try:
        reader = pacsv.open_csv(path, read_options=read_options, parse_options=parse_options,
                                convert_options=convert_options)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise _csv_error(path, exc, rows, header_lines) from None
    names = reader.schema.names
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"missing required column(s) {', '.join(missing)} (found: {', '.join(names)})",
                        path, line=1)
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise _csv_error(path, exc, rows, header_lines) from None
        rows += batch.num_rows
        yield pa.Table.from_batches([batch])


def iter_parquet(
    path: str | Path,
    *,
    columns: Sequence[str] | None = None,
    required: Sequence[str] = (),
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    dictionary_columns: Sequence[str] | None = None,
) -> Iterator[pa.Table]:
    """Stream a Parquet file as tables of at most `chunk_rows` rows (only `columns` that exist are read).

    `dictionary_columns` (default: every string column) are returned dictionary-encoded.
    """
    path = Path(path)
    _check_not_empty(path)
    try:
        schema = pq.read_schema(path)
        names = schema.names
        # String columns come back dictionary-encoded straight from Parquet's dictionary pages, which
        # saves decoding every string and hashing it again.
        strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        wanted_dict = strings if dictionary_columns is None else [c for c in dictionary_columns if c in strings]
        pf = pq.ParquetFile(path, read_dictionary=wanted_dict)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"not a readable Parquet file: {exc}", path) from None
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"missing required column(s) {', '.join(missing)} (found: {', '.join(names)})", path)
    wanted = [c for c in (columns or names) if c in names]
    rows = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=wanted, use_threads=True):
            rows += batch.num_rows
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read Parquet data after row {rows}: {exc}", path) from None


def read_table(path: str | Path, *, required: Sequence[str] = (), string_columns: Sequence[str] = (),
               **csv_kwargs) -> pa.Table:
    """Read a whole (small) CSV or Parquet file, e.g. a links file or item metadata."""
    if file_format(path) == "parquet":
        chunks = list(iter_parquet(path, required=required))
    else:
        chunks = list(iter_csv(path, required=required, string_columns=string_columns, **csv_kwargs))
    if not chunks:  # a header and no rows
        return pa.table({name: pa.array([], pa.string()) for name in required})
    return pa.concat_tables(chunks)


def file_size(path: str | Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
