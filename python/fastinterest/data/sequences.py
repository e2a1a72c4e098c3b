"""Training examples from a prepared data set: fixed-length histories, next-item and interest labels.

An *example* is a person and a *cut*: the index of the first label event. Its input is the person's
events strictly before the cut's second (the last `max_len` of them), left-aligned and padded with 0;
its labels come from the label window that starts at the cut: the next `label_window_events` events, or
all events in the next `label_window_seconds` seconds. The target item is the cut event's item.

No-leak rule: cuts always sit at the first event of a second, so every input event is strictly earlier
than ``cut_time`` and events in the same second as the target are on the label side.

Splits
------
``leave_last_out``: per person, *test* labels are the person's last window, *valid* labels the window
before it, and *train* examples are earlier cuts (the latest window before valid, then every
`train_stride` events back) whose labels end before the valid cut.

``time``: a global cut time T (`time_cut`, or the `time_quantile` of all event times). *train* examples
have their labels entirely before T; *valid* is each person's first window at or after T; *test* is the
window right after the valid one. Inputs always end before the example's own cut.

All work is vectorised over persons and examples with numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .prepared import EventTable, Prepared


@dataclass
class SequenceBatch:
    """Examples as numpy arrays (N examples, T = max_len, C = category vocabulary size).

    ``item``/``category``/``action``/``platform``/``timestamp`` are int64 ``[N, T]``, left-aligned: the first
    ``lengths[i]`` columns hold the events in time order, the rest is 0 (``<pad>``).
    """

    item: np.ndarray                # int64 [N, T]
    category: np.ndarray            # int64 [N, T] primary category per event
    action: np.ndarray              # int64 [N, T]
    platform: np.ndarray            # int64 [N, T]
    lengths: np.ndarray             # int64 [N], 0 allowed
    person: np.ndarray              # int64 [N]
    target_item: np.ndarray         # int64 [N] the item of the first label event (0 when no label)
    target_categories: np.ndarray   # float32 [N, C] multi-hot categories of the label window
    cut_time: np.ndarray            # int64 [N] time of the first label event; inputs are strictly earlier
    timestamp: np.ndarray           # int64 [N, T] unix seconds of each input event (0 at pads): lets training
                                    # apply the cut rule inside a history (steps that end a second)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return self.item.shape[1]

    def subset(self, idx) -> "SequenceBatch":
        """The examples at `idx` (indices, a slice or a boolean mask)."""
        return SequenceBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def concat(batches: list["SequenceBatch"]) -> "SequenceBatch":
        return SequenceBatch(**{f.name: np.concatenate([getattr(b, f.name) for b in batches])
                                for f in fields(SequenceBatch)})


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(starts[i], starts[i] + lengths[i])`` and, for each element, its i."""
    lengths = np.asarray(lengths, dtype=np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    if not len(owner):
        return np.zeros(0, dtype=np.int64), owner
    first = np.cumsum(lengths) - lengths
    return starts[owner] + (np.arange(len(owner)) - first[owner]), owner


class _Timeline:
    """Index arithmetic on events sorted by (person, timestamp)."""

    def __init__(self, events: EventTable, n_persons: int):
        self.ts = events.timestamp
        self.person = events.person
        offsets = events.person_offsets(n_persons)
        self.start, self.end = offsets[:-1], offsets[1:]
        n = len(self.ts)
        new_second = np.ones(n, dtype=bool)
        if n > 1:
            new_second[1:] = (self.person[1:] != self.person[:-1]) | (self.ts[1:] != self.ts[:-1])
        # group_start[i]: the first event of i's (person, second)
        self.group_start = np.maximum.accumulate(np.where(new_second, np.arange(n), 0)) if n else np.zeros(0, int)
        self.t0 = int(self.ts.min()) if n else 0
        self.key = (self.person.astype(np.int64) << 32) | (self.ts - self.t0)

    def first_at_or_after(self, person: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Global index of person's first event with timestamp >= t (the person's end if none)."""
        rel = np.clip(np.asarray(t, dtype=np.int64) - self.t0, 0, (1 << 32) - 1)
        return np.searchsorted(self.key, (person.astype(np.int64) << 32) | rel, side="left")

    def next_group_start(self, idx: np.ndarray, person: np.ndarray) -> np.ndarray:
        """The smallest group start >= idx (idx itself when it starts a second, else the next second)."""
        end = self.end[person]
        inside = idx < end
        out = idx.copy()
        mid = inside & (self.group_start[np.minimum(idx, len(self.ts) - 1)] != idx)
        out[mid] = self.first_at_or_after(person[mid], self.ts[idx[mid]] + 1)
        return out


@dataclass
class _Windows:
    events: int
    seconds: int | None

    def last_cut(self, tl: _Timeline, person: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """The cut whose label window is the last one ending at `limit` (exclusive; limit > person start)."""
        if self.seconds is not None:
            return tl.first_at_or_after(person, tl.ts[limit - 1] - self.seconds + 1)
        return tl.group_start[np.maximum(limit - self.events, tl.start[person])]

    def label_end(self, tl: _Timeline, person: np.ndarray, cut: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """End (exclusive) of the label window starting at `cut`, never past `limit`."""
        if self.seconds is not None:
            end = tl.first_at_or_after(person, tl.ts[cut] + self.seconds)
        else:
            end = cut + self.events
        return np.minimum(end, limit)


def _strided_cuts(tl: _Timeline, win: _Windows, person: np.ndarray, limit: np.ndarray, stride: int,
                  min_history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train cuts: the last window before `limit`, then every `stride` events back; ``(person, cut, limit)``."""
    ok = limit > tl.start[person]
    person, limit = person[ok], limit[ok]
    first_cut = win.last_cut(tl, person, limit)
    lowest = tl.start[person] + min_history
    n_cuts = np.where(first_cut >= lowest, (first_cut - lowest) // stride + 1, 0)
    steps, owner = _ranges(np.zeros(len(n_cuts), dtype=np.int64), n_cuts)
    cut = tl.group_start[first_cut[owner] - steps * stride]
    person, limit = person[owner], limit[owner]
    keep = cut >= tl.start[person] + min_history
    if len(cut) > 1:  # snapping to the start of a second can make two cuts equal
        keep[1:] &= cut[1:] != cut[:-1]
    return person[keep], cut[keep], limit[keep]


def _gather(events: EventTable, tl: _Timeline, person: np.ndarray, cut: np.ndarray, label_end: np.ndarray,
            max_len: int, n_categories: int, block: int = 65536) -> SequenceBatch:
    """Materialise examples; inputs are the last `max_len` events before each cut."""
    order = np.lexsort((cut, person))
    person, cut, label_end = person[order], cut[order], label_end[order]
    n = len(cut)
    lo = np.maximum(cut - max_len, tl.start[person])
    lengths = (cut - lo).astype(np.int64)
    mats = {name: np.zeros((n, max_len), dtype=np.int64)
            for name in ("item", "category", "action", "platform", "timestamp")}
    columns = np.arange(max_len)
    last = max(len(events) - 1, 0)
    for b in range(0, n, block):  # bounded temporaries
        sl = slice(b, b + block)
        idx = np.minimum(lo[sl, None] + columns, last)
        mask = columns < lengths[sl, None]
        for name in mats:
            mats[name][sl] = np.where(mask, getattr(events, name)[idx], 0)
    # Multi-hot labels over the label window [cut, label_end).
    targets = np.zeros((n, n_categories), dtype=np.float32)
    label_events, owner = _ranges(cut, label_end - cut)
    if len(label_events):
        off = events.categories_offsets
        cat_pos, owner2 = _ranges(off[label_events], off[label_events + 1] - off[label_events])
        targets[owner[owner2], events.categories_values[cat_pos]] = 1.0
        targets[:, 0] = 0.0  # <pad> is not a label
    has_label = label_end > cut
    target_item = np.where(has_label, events.item[np.minimum(cut, last)], 0).astype(np.int64)
    cut_time = events.timestamp[np.minimum(cut, last)].astype(np.int64) if n else np.zeros(0, np.int64)
    return SequenceBatch(**mats, lengths=lengths, person=person.astype(np.int64), target_item=target_item,
                         target_categories=targets, cut_time=cut_time)


def build_examples(
    prepared: Prepared,
    max_len: int = 100,
    split: str = "leave_last_out",
    time_cut: int | None = None,
    label_window_events: int = 5,
    label_window_seconds: int | None = None,
    min_history: int = 1,
    train_stride: int = 5,
    time_quantile: float = 0.8,
) -> dict[str, SequenceBatch]:
    """Build ``{"train", "valid", "test"}`` examples (see the module docstring for the splits).

    Args:
        max_len: T, the number of most recent input events kept.
        split: ``"leave_last_out"`` or ``"time"``.
        time_cut: the global cut (unix seconds) of the time split; default: the `time_quantile` of event times.
        label_window_events: labels = the next N events from the cut (used when `label_window_seconds` is None).
        label_window_seconds: labels = events in ``[cut_time, cut_time + S)`` instead.
        min_history: the least number of input events of an example (0 allows empty histories).
        train_stride: events between consecutive train cuts of a person.
    """
    if max_len < 1 or train_stride < 1 or min_history < 0:
        raise ValueError("max_len and train_stride must be >= 1 and min_history >= 0")
    if label_window_seconds is None and label_window_events < 1:
        raise ValueError("label_window_events must be >= 1 (or give label_window_seconds)")
    if label_window_seconds is not None and label_window_seconds < 1:
        raise ValueError("label_window_seconds must be >= 1")
    events = prepared.events
    tl = _Timeline(events, prepared.n_persons)
    win = _Windows(label_window_events, label_window_seconds)
    persons = np.flatnonzero(tl.end > tl.start)
    C = prepared.n_categories
    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def held_out(person, cut, limit):
        """Keep examples with enough history and a non-empty label window."""
        ok = (cut >= tl.start[person] + min_history) & (cut < limit)
        return person[ok], cut[ok], win.label_end(tl, person[ok], cut[ok], limit[ok])

    if split == "leave_last_out":
        end = tl.end[persons]
        test_cut = win.last_cut(tl, persons, end)
        parts["test"] = held_out(persons, test_cut, end)
        has_prefix = test_cut > tl.start[persons]
        p_v, limit_v = persons[has_prefix], test_cut[has_prefix]
        valid_cut = win.last_cut(tl, p_v, limit_v)
        parts["valid"] = held_out(p_v, valid_cut, limit_v)
        p_t, c_t, l_t = _strided_cuts(tl, win, p_v, valid_cut, train_stride, min_history)
        parts["train"] = (p_t, c_t, win.label_end(tl, p_t, c_t, l_t))
    elif split == "time":
        if time_cut is None:
            time_cut = int(np.quantile(events.timestamp, time_quantile)) if len(events) else 0
        boundary = tl.first_at_or_after(persons, np.full(len(persons), time_cut))
        p_t, c_t, l_t = _strided_cuts(tl, win, persons, boundary, train_stride, min_history)
        parts["train"] = (p_t, c_t, win.label_end(tl, p_t, c_t, l_t))
        end = tl.end[persons]
        parts["valid"] = held_out(persons, boundary, end)
        after_valid = boundary < end
        p_x, b_x, e_x = persons[after_valid], boundary[after_valid], end[after_valid]
        test_cut = tl.next_group_start(win.label_end(tl, p_x, b_x, e_x), p_x)
        parts["test"] = held_out(p_x, test_cut, e_x)
    else:
        raise ValueError(f"split must be 'leave_last_out' or 'time', got {split!r}")
    return {name: _gather(events, tl, *parts[name], max_len, C) for name in ("train", "valid", "test")}


def build_person_histories(source: Prepared | EventTable, max_len: int = 100) -> SequenceBatch:
    """Each person's last `max_len` events (all of them, no cut): inputs for serving and prediction.

    One row per person (``person == row``); there are no labels: ``target_item`` is 0,
    ``target_categories`` has 0 columns, and ``cut_time`` is one second after the person's last event.
    """
    events = source.events if isinstance(source, Prepared) else source
    n_persons = source.n_persons if isinstance(source, Prepared) else events.n_persons
    tl = _Timeline(events, n_persons)
    persons = np.arange(n_persons)
    end = tl.end
    batch = _gather(events, tl, persons, end, end, max_len, 0)
    last = np.maximum(end - 1, 0)
    has = end > tl.start
    batch.cut_time = np.where(has, events.timestamp[np.minimum(last, max(len(events) - 1, 0))] + 1, 0) \
        if len(events) else np.zeros(n_persons, np.int64)
    return batch
