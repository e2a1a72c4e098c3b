"""Ordering and the cleaning rules that look across rows: exact duplicates and bot bursts.

Both work on events already sorted by (person, timestamp, input order), where every second of a
person is one contiguous *group*: a duplicate or a burst can only live inside a group with more than
one row, so only those (few) rows are examined.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


def stable_order(person: np.ndarray, timestamp: np.ndarray, threads: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort events by person, then timestamp, keeping input order on ties.

    Returns ``(order, person[order], timestamp[order])``. One stable radix pass puts events into 256
    buckets of consecutive person ids, then each bucket (small enough for the CPU caches) is sorted by
    the packed (person, timestamp) key, `threads` buckets at a time: about twice as fast as one big
    stable sort, and the sorted key gives the sorted person and time columns for free.
    """
    n = len(person)
    if n == 0:
        return np.zeros(0, dtype=np.int64), person[:0], timestamp[:0]
    t0 = int(timestamp.min())
    if int(person.max()) >= (1 << 31) or int(timestamp.max()) - t0 >= (1 << 32):
        order = np.lexsort((timestamp, person))  # keys that do not pack into one int64
        return order, person[order], timestamp[order]
    key = (person.astype(np.int64) << 32) | (timestamp - t0)
    shift = max(0, int(person.max()).bit_length() - 8)
    bucket = (person >> shift).astype(np.uint16)
    order = np.argsort(bucket, kind="stable")  # radix sort for 16-bit keys
    bounds = np.concatenate([[0], np.cumsum(np.bincount(bucket, minlength=1 << 8))])
    del bucket
    key = key[order]

    def sort_bucket(b: int) -> None:
        lo, hi = bounds[b], bounds[b + 1]
        if hi - lo > 1:
            within = np.argsort(key[lo:hi], kind="stable")
            order[lo:hi] = order[lo:hi][within]
            key[lo:hi] = key[lo:hi][within]

    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(sort_bucket, range(len(bounds) - 1)))
    else:
        for b in range(len(bounds) - 1):
            sort_bucket(b)
    return order, key >> 32, (key & 0xFFFFFFFF) + t0


def second_groups(person: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Group id of each sorted event: consecutive events of one person in one second share a group."""
    n = len(person)
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = (person[1:] != person[:-1]) | (timestamp[1:] != timestamp[:-1])
    return np.cumsum(new) - 1


def _comparable(values: np.ndarray) -> np.ndarray:
    """Floats as their bit patterns with one NaN, so that NaN equals NaN; other dtypes unchanged."""
    if values.dtype.kind != "f":
        return values
    values = values.astype(np.float32)
    return np.where(np.isnan(values), np.float32(np.nan), values).view(np.uint32)


def find_duplicates(group: np.ndarray, order: np.ndarray, fields: list[np.ndarray]) -> np.ndarray:
    """Mark every sorted row equal to an earlier row of its group in all `fields` (the first copy stays).

    `group` comes from `second_groups` on the sorted events, `order` maps sorted rows to input rows, and
    `fields` are per input row, the first one an integer id (the account); rows of a group are in input
    order, so "earlier" is input order.
    """
    n = len(group)
    dup = np.zeros(n, dtype=bool)
    if n < 2:
        return dup
    sizes = np.bincount(group)
    rows = np.flatnonzero(sizes[group] > 1)
    if not len(rows):
        return dup
    # Duplicates share the first field (the account) too: keep rows whose (group, field 0) repeats.
    pair = group[rows].astype(np.int64) * (int(fields[0].max()) + 1) + fields[0][order[rows]]
    by_pair = np.argsort(pair, kind="stable")
    repeated = np.zeros(len(rows), dtype=bool)
    same_pair = pair[by_pair][1:] == pair[by_pair][:-1]
    repeated[by_pair[1:][same_pair]] = True
    repeated[by_pair[:-1][same_pair]] = True
    rows = rows[repeated]
    if len(rows) < 2:
        return dup
    keys = [group[rows]] + [_comparable(f[order[rows]]) for f in fields]
    # lexsort: the last key is primary; the row position (input order) breaks the remaining ties.
    by_value = np.lexsort([rows] + keys[::-1])
    same = np.ones(len(rows) - 1, dtype=bool)
    for k in keys:
        ks = k[by_value]
        same &= ks[1:] == ks[:-1]
    dup[rows[by_value[1:][same]]] = True
    return dup


def find_bursts(group: np.ndarray, order: np.ndarray, account: np.ndarray, keep: np.ndarray,
                max_per_second: int) -> np.ndarray:
    """Mark kept sorted rows whose account has more than `max_per_second` kept events in that second.

    `account` is per input row (`order` maps sorted rows to input rows); ``max_per_second <= 0`` disables
    the rule.
    """
    n = len(group)
    burst = np.zeros(n, dtype=bool)
    if max_per_second <= 0 or n == 0:
        return burst
    sizes = np.bincount(group[keep], minlength=int(group[-1]) + 1)
    rows = np.flatnonzero(keep & (sizes[group] > max_per_second))
    if not len(rows):
        return burst
    acc = account[order[rows]].astype(np.int64)
    pair = group[rows].astype(np.int64) * (int(acc.max()) + 1) + acc
    _, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
    burst[rows[counts[inverse] > max_per_second]] = True
    return burst
