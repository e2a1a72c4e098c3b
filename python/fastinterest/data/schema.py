"""The raw event schema that every input is turned into, and the shared constants of `fastinterest.data`.

Raw events
==========
One row per event. CSV (with a header row; `.csv` or `.csv.gz`) or Parquet (`.parquet` / `.pq`);
files are read in chunks, so an input larger than memory works (only the compact encoded columns,
about 40 bytes per event, are kept).

=============  ========  ==================================================================================
column         needed    meaning
=============  ========  ==================================================================================
``user_id``    required  the account on that platform (any string; the same string on two platforms is two
                         accounts unless a links file joins them)
``platform``   required  where the event happened (``shop``, ``search``, ``taobao``, ...); case-insensitive
``timestamp``  required  unix seconds (integer or decimal), or ISO-8601 (``2024-01-05T12:34:56Z``,
                         ``2024-01-05 12:34:56+08:00``, ``2024-01-05``); read as UTC when no offset is given
``action``     required  one of the configured actions (case-insensitive). Default vocabulary:
                         view, click, search, cart, favorite, purchase, like, comment, share, rate
``item_id``    required  the item engaged with (any string)
``category``   optional  one or several categories of the item, ``|``-separated (``books|sci-fi``);
                         the first one is the event's primary category
``query``      optional  search text; lower-cased and split into word tokens
``value``      optional  a number: rating, price, dwell seconds, ... (NaN when missing or not a number)
=============  ========  ==================================================================================

Extra columns are ignored. Empty strings count as missing.

Links between accounts (optional)
=================================
A CSV or Parquet file in one of two shapes; chains of links join one person (union-find), accounts
that no link mentions stay persons of their own:

* ``platform, account_id, person_id``: all accounts with the same ``person_id`` are one person;
* ``platform_a, account_a, platform_b, account_b``: each row says the two accounts are one person.

Cleaning rules
==============
Every input row is either kept or dropped under exactly one rule, the first that applies, in this
order (the names are the keys of ``report.json["dropped"]``):

1. ``malformed_row``: a CSV line with the wrong number of fields;
2. ``missing_field``: a required field is null or empty;
3. ``bad_timestamp``: the timestamp cannot be parsed;
4. ``timestamp_out_of_range``: outside ``[min_time, max_time)`` (default 1990-01-01 .. 2100-01-01 UTC;
   the Taobao adapter narrows it to the dataset's documented days);
5. ``unknown_action``: the action is not in the configured vocabulary;
6. ``duplicate``: the same account, instant, action, item, categories, query and value as an earlier
   row (the first copy is kept);
7. ``bot_burst``: one account has more than ``max_events_per_second`` events within one second: all
   events of that account in that second are dropped.

A malformed *file* (missing required columns, bytes that are not UTF-8, an empty file, a file that is
not CSV/Parquet) raises `DataError` naming the file, the line and the problem.
"""
from __future__ import annotations

from pathlib import Path

#: Required columns of the raw schema, in order.
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "platform", "timestamp", "action", "item_id")
#: Optional columns of the raw schema.
OPTIONAL_COLUMNS: tuple[str, ...] = ("category", "query", "value")
RAW_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

#: The default action vocabulary; anything else is dropped as ``unknown_action``.
DEFAULT_ACTIONS: tuple[str, ...] = (
    "view", "click", "search", "cart", "favorite", "purchase", "like", "comment", "share", "rate",
)

CATEGORY_SEPARATOR = "|"
#: Query text is lower-cased and split on anything that is not a letter or a digit (RE2 syntax).
QUERY_SPLIT = r"[^\p{L}\p{N}]+"

#: Reserved tokens present in every vocabulary.
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

#: Default valid time range [min, max) in unix seconds: 1990-01-01 .. 2100-01-01 UTC.
DEFAULT_MIN_TIME = 631_152_000
DEFAULT_MAX_TIME = 4_102_444_800

#: Default bot threshold: more events than this from one account within one second is a bot burst.
DEFAULT_MAX_EVENTS_PER_SECOND = 10

#: The drop rules, in the order they are applied (see the module docstring).
DROP_RULES: tuple[str, ...] = (
    "malformed_row", "missing_field", "bad_timestamp", "timestamp_out_of_range",
    "unknown_action", "duplicate", "bot_burst",
)

#: Vocabularies written to ``vocab.json``.
VOCAB_NAMES: tuple[str, ...] = ("item", "category", "action", "platform", "query")


class DataError(ValueError):
    """A malformed input file or an impossible request, with the file and line it concerns.

    ``str(err)`` reads ``"<path>, line <line>: <problem>"`` so the message alone says what to fix.
    """

    def __init__(self, problem: str, path: str | Path | None = None, line: int | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}" if where else problem)
