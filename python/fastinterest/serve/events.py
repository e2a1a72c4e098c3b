"""Raw events -> vocabulary ids, fast enough for a request path.

`fastinterest.data.events_from_records` is the reference encoder (Arrow, vectorised, made for whole
files and new-person lookups). A serving request carries a handful of events, where building Arrow arrays
costs more than the work; `EventEncoder` does the same thing with dict lookups, and the tests check
that both give the same ids. The one difference is on purpose: a record that `events_from_records`
would skip (no platform, action, item_id or usable timestamp) is an error here, named by its position,
because a service must not silently drop what a client sent.

An event is a dict in the raw schema (`fastinterest.data.schema`):

    {"platform": "shop", "action": "view", "item_id": "I1000262", "timestamp": 1704164136,
     "category": "laptops|computers"}       # category optional; a list of categories is accepted too

Normalisation as in `prepare`: platform and action are trimmed and lower-cased, item ids and categories
trimmed; the primary category is the first non-empty one (0 = none); unknown tokens map to `<unk>` (1).
Timestamps are unix seconds (int or float) or ISO-8601 text (UTC when no offset is given). Events are
put in time order (stable on ties). Other keys (user_id, query, value, ...) are allowed and ignored.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from ..data.schema import (
    CATEGORY_SEPARATOR,
    DEFAULT_MAX_TIME,
    DEFAULT_MIN_TIME,
    PAD_ID,
    UNK_ID,
)

__all__ = ["FIELDS", "EncodedEvents", "EventEncoder", "EventError"]

FIELDS = ("item", "category", "action", "platform")  # the model's input order (fastinterest.models.FIELDS)


class EventError(ValueError):
    """An event that cannot be encoded; the message names the event's position and the field."""


@dataclass(frozen=True)
class EncodedEvents:
    """One person's events as ids, in time order: `table` int64 [n, 5] with the columns item, category,
    action, platform (the model's FIELDS order) and timestamp; `raw` the original dicts in the same order."""

    table: np.ndarray
    raw: tuple = ()

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> np.ndarray:
        """[n, 4] ids in FIELDS order."""
        return self.table[:, :4]

    def field(self, name: str) -> np.ndarray:
        return self.table[:, _COLUMN[name]]

    @property
    def item(self) -> np.ndarray:
        return self.table[:, 0]

    @property
    def category(self) -> np.ndarray:
        return self.table[:, 1]

    @property
    def action(self) -> np.ndarray:
        return self.table[:, 2]

    @property
    def platform(self) -> np.ndarray:
        return self.table[:, 3]

    @property
    def timestamp(self) -> np.ndarray:
        return self.table[:, 4]

    def tail(self, n: int) -> EncodedEvents:
        """The last n events (all of them when there are fewer)."""
        if len(self) <= n:
            return self
        return EncodedEvents(self.table[-n:], raw=self.raw[-n:])


_COLUMN = {name: j for j, name in enumerate((*FIELDS, "timestamp"))}


def _text(value, what: str, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise EventError(f"event {index}: {what} must be a string, got {type(value).__name__}")


def _timestamp(value, index: int, min_time: int, max_time: int) -> int:
    if isinstance(value, bool) or value is None:
        raise EventError(f"event {index}: timestamp must be unix seconds or ISO-8601 text, got {value!r}")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise EventError(f"event {index}: timestamp must be finite, got {value!r}")
        seconds = math.floor(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            seconds = int(text)
        elif text.replace(".", "", 1).isdigit():   # decimal seconds
            seconds = math.floor(float(text))
        else:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise EventError(f"event {index}: cannot parse timestamp {value!r} (unix seconds or ISO-8601)") \
                    from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            seconds = math.floor(parsed.timestamp())
    else:
        raise EventError(f"event {index}: timestamp must be unix seconds or ISO-8601 text, "
                         f"got {type(value).__name__}")
    if not min_time <= seconds < max_time:
        raise EventError(f"event {index}: timestamp {value!r} is outside [{min_time}, {max_time}) unix seconds")
    return seconds


class EventEncoder:
    """Encodes raw event dicts with a run's vocabulary (the parsed vocab.json)."""

    def __init__(self, vocab: Mapping[str, Mapping], *, min_time: int = DEFAULT_MIN_TIME,
                 max_time: int = DEFAULT_MAX_TIME):
        missing = [f for f in FIELDS if f not in vocab]
        if missing:
            raise ValueError(f"the vocabulary has no {', '.join(missing)} field(s)")
        self.index = {f: {tok: i for i, tok in enumerate(vocab[f]["tokens"])} for f in FIELDS}
        self.min_time, self.max_time = min_time, max_time

    def _id(self, field: str, token: str) -> int:
        return self.index[field].get(token, UNK_ID)

    def _category(self, value, index: int) -> int:
        if value is None:
            return PAD_ID
        if isinstance(value, (list, tuple)):
            parts = [_text(v, "each category", index) for v in value]
            parts = [p for text in parts for p in text.split(CATEGORY_SEPARATOR)]
        else:
            parts = _text(value, "category", index).split(CATEGORY_SEPARATOR)
        for part in parts:
            part = part.strip()
            if part:
                return self._id("category", part)
        return PAD_ID

    def encode(self, events: Sequence[Mapping]) -> EncodedEvents:
        """Validate and encode a list of raw events (see the module docstring); raises EventError.

        This runs for every event of every request, so the common case (a dict of strings and an integer
        timestamp) takes the shortest path; anything else goes through the general helpers."""
        if not isinstance(events, (list, tuple)):
            raise EventError(f"events must be a list of objects, got {type(events).__name__}")
        row = self._row
        rows = [row(ev, i) for i, ev in enumerate(events)]
        table = np.array(rows, dtype=np.int64).reshape(len(rows), 5)
        raw = tuple(events)
        t = table[:, 4]
        if len(t) > 1 and bool(np.any(t[1:] < t[:-1])):   # put in time order (stable on ties)
            order = np.argsort(t, kind="stable")
            table = table[order]
            raw = tuple(raw[int(j)] for j in order)
        return EncodedEvents(table, raw=raw)

    def encode_many(self, lists: Sequence[Sequence[Mapping]]) -> list[EncodedEvents]:
        """`encode` of each list (the same results and errors); when every list holds one event — an append
        batch of single events — the events are encoded into one [n, 5] table and each result is a row of it."""
        if not all(type(x) is list and len(x) == 1 for x in lists):
            return [self.encode(x) for x in lists]
        table = self.encode_table(lists)
        return [EncodedEvents(table[i:i + 1], raw=(x[0],)) for i, x in enumerate(lists)]

    def encode_table(self, lists: Sequence[list]) -> np.ndarray:
        """The events of lists that hold one event each (an append batch of single events) as one table [n, 5]
        (the columns of `EncodedEvents.table`, row i = lists[i][0]); raises EventError like `encode`."""
        row = self._row
        return np.array([row(x[0], 0) for x in lists], dtype=np.int64).reshape(len(lists), 5)

    def _row(self, ev, i: int) -> tuple:
        """(item, category, action, platform, timestamp) of event number i (raises EventError)."""
        if type(ev) is not dict and not isinstance(ev, Mapping):
            raise EventError(f"event {i} must be an object, got {type(ev).__name__}")
        index = self.index
        platform, action, item, ts = ev.get("platform"), ev.get("action"), ev.get("item_id"), ev.get("timestamp")
        platform = (platform if type(platform) is str else self._required(platform, "platform", i)).strip().lower()
        action = (action if type(action) is str else self._required(action, "action", i)).strip().lower()
        item = (item if type(item) is str else self._required(item, "item_id", i)).strip()
        if not (platform and action and item):
            missing = "platform" if not platform else "action" if not action else "item_id"
            raise EventError(f"event {i}: missing {missing}")
        if type(ts) is not int or not self.min_time <= ts < self.max_time:
            ts = _timestamp(self._required(ts, "timestamp", i), i, self.min_time, self.max_time)
        cat = ev.get("category")
        if cat is None:
            cat_id = PAD_ID
        elif type(cat) is str and CATEGORY_SEPARATOR not in cat:
            cat = cat.strip()
            cat_id = index["category"].get(cat, UNK_ID) if cat else PAD_ID
        else:
            cat_id = self._category(cat, i)
        return (index["item"].get(item, UNK_ID), cat_id, index["action"].get(action, UNK_ID),
                index["platform"].get(platform, UNK_ID), ts)

    @staticmethod
    def _required(value, key: str, index: int):
        """A present, non-empty field as text (timestamps are returned as they are)."""
        if value is None or value == "":
            raise EventError(f"event {index}: missing {key}")
        if key == "timestamp":
            return value
        return _text(value, key, index)
