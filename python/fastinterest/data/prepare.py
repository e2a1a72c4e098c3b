"""`prepare`: raw event files -> a clean, linked, pseudonymised, encoded data set on disk.

Pipeline (each step vectorised; no Python loop runs over events):

1. read   - the adapter streams chunks in the raw schema; `ChunkEncoder` parses, drops rows under the
            per-row rules and keeps int32 codes (see `encode`).
2. link   - accounts = distinct (platform, user_id); links (files and adapter-made) join them into persons
            with union-find; each person gets a keyed pseudonym; person ids follow pseudonym order.
3. sort   - stable sort by (person, timestamp): input order is kept on ties.
4. clean  - duplicates and bot bursts, found within each person-second (see `clean`).
5. vocab  - vocabularies with min-count and ``<unk>`` bucket; codes become vocabulary ids.
6. write  - events.parquet, persons.parquet, vocab.json, config.json, report.json (+ mapping.parquet).

Output layout (the contract other subsystems rely on) is described in `fastinterest.data`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from .adapters import get_adapter
from .clean import find_bursts, find_duplicates, second_groups, stable_order
from .encode import ChunkEncoder, EncodedEvents
from .io import DEFAULT_CHUNK_ROWS, MalformedRows, file_size
from .linking import account_strings, link_accounts, pseudonymise, read_links, resolve_key
from .schema import (
    CATEGORY_SEPARATOR, DEFAULT_MAX_EVENTS_PER_SECOND, DEFAULT_MAX_TIME, DEFAULT_MIN_TIME, DROP_RULES, DataError,
    PAD_ID, QUERY_SPLIT, VOCAB_NAMES,
)
from .vocab import Vocab

PSEUDONYM_ALGORITHM = "blake2b-128 keyed, over the person's smallest 'platform\\x1faccount_id'"
#: Per-event int32 columns moved together through the sort (``value`` travels as its float32 bits).
_PACKED = ("account", "action", "item_id", "category", "query", "value")


def _progress(total: int | None, desc: str, enabled: bool | None):
    """A tqdm bar; ``enabled=None`` lets tqdm decide (off when stderr is not a terminal)."""
    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True, leave=False, file=sys.stderr,
                disable=None if enabled is None else not enabled)


def _accounts(platform: np.ndarray, user: np.ndarray, n_platforms: int, n_users: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (platform, user) pairs: ``(account code per event, platform code per account,
    user code per account)``; accounts are numbered in (platform, user) code order."""
    key = platform.astype(np.int64) * n_users + user
    cells = n_platforms * n_users
    if cells <= (1 << 25):  # a dense presence table: O(n), no sort
        present = np.zeros(cells, dtype=bool)
        present[key] = True
        keys = np.flatnonzero(present)
        lookup = np.full(cells, -1, dtype=np.int32)
        lookup[keys] = np.arange(len(keys), dtype=np.int32)
        account = lookup[key]
    else:
        keys, account = np.unique(key, return_inverse=True)
        account = account.astype(np.int32)
    return account, (keys // n_users).astype(np.int32), (keys % n_users).astype(np.int32)


def _token_lists(raw: pa.Array, *, lower: bool, pattern: str | None) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Split each distinct raw string into tokens: ``(parent raw index per token, token code, token values)``."""
    text = pc.utf8_trim_whitespace(raw)
    if lower:
        text = pc.utf8_lower(text)
    lists = pc.split_pattern_regex(text, pattern) if pattern else pc.split_pattern(text, CATEGORY_SEPARATOR)
    tokens = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    parent = pc.list_parent_indices(lists).to_numpy()
    nonempty = pc.greater(pc.utf8_length(tokens), 0)
    tokens, parent = tokens.filter(nonempty), parent[nonempty.to_numpy(zero_copy_only=False)]
    encoded = pc.dictionary_encode(tokens)
    return parent, encoded.indices.to_numpy().astype(np.int64), encoded.dictionary


def _list_vocab(raw_values: pa.Array, raw_code: np.ndarray, name: str, min_count: int, *, lower: bool,
                pattern: str | None) -> tuple[Vocab, pa.ListArray, np.ndarray, int]:
    """Vocabulary of the tokens inside a list-valued column (categories, query words).

    Returns the vocabulary, a ListArray of token ids per distinct raw string (plus one empty list at
    the end, for events without a value: ``raw_code == -1``), and the first token id per raw string
    (`PAD_ID` when empty; same extra slot), and the number of distinct tokens in the events.
    """
    n_raw = len(raw_values)
    parent, token_code, token_values = _token_lists(raw_values, lower=lower, pattern=pattern)
    raw_counts = np.bincount(raw_code[raw_code >= 0], minlength=n_raw)
    token_counts = np.bincount(token_code, weights=raw_counts[parent], minlength=len(token_values)).astype(np.int64)
    vocab, ids = Vocab.from_counts(token_values, token_counts, min_count=min_count, name=name)
    offsets = np.zeros(n_raw + 2, dtype=np.int32)
    offsets[1:n_raw + 1] = np.cumsum(np.bincount(parent, minlength=n_raw))
    offsets[n_raw + 1] = offsets[n_raw]
    token_ids = ids[token_code].astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_ids, pa.int32()))
    first = np.full(n_raw + 1, PAD_ID, dtype=np.int32)
    has = offsets[1:n_raw + 1] > offsets[:n_raw]
    first[:n_raw][has] = token_ids[offsets[:n_raw][has]]
    return vocab, lists, first, int(np.count_nonzero(token_counts))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


class _Clock:
    """Wall-clock seconds per pipeline step, for the report."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.cpu_start = time.process_time()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        total = time.perf_counter() - self.start
        self.timings["total_s"] = round(total, 3)
        self.timings["cpu_s"] = round(time.process_time() - self.cpu_start, 3)  # all threads
        return total


@dataclass
class _Persons:
    """Accounts and the persons they form (all arrays are per account unless noted)."""

    account: np.ndarray      # per event: account code
    platform: np.ndarray     # platform code (into the platform dictionary)
    user: np.ndarray         # user code (into the user_id dictionary)
    rank: np.ndarray         # person rank = position of the person's pseudonym in sorted order
    pseudonyms: np.ndarray   # per rank: the pseudonym (object array of str)
    n_links: int
    links_skipped: int


def _link(enc: EncodedEvents, link_paths: list[Path], adapter_links, key: bytes) -> _Persons:
    """Accounts from the events, persons from the links, pseudonyms from the key."""
    d = enc.dictionaries
    account, acc_platform, acc_user = _accounts(
        enc.codes.pop("platform"), enc.codes.pop("user_id"), len(d["platform"]), len(d["user_id"]))
    names = account_strings(d["platform"].take(pa.array(acc_platform)), d["user_id"].take(pa.array(acc_user)))
    pairs = [read_links(p) for p in link_paths] + ([(*adapter_links, 0)] if adapter_links else [])
    link_a = pa.concat_arrays([p[0] for p in pairs]) if pairs else pa.array([], pa.string())
    link_b = pa.concat_arrays([p[1] for p in pairs]) if pairs else pa.array([], pa.string())
    component, representative = link_accounts(names, link_a, link_b)
    # One pseudonym per component (from its representative account string); ranks follow pseudonym order,
    # so person ids do not reveal the input order.
    is_component = np.zeros(len(component), dtype=bool)  # component ids are node ids: relabel densely
    is_component[component] = True
    acc_comp = (np.cumsum(is_component) - 1)[component]
    n_components = int(is_component.sum())
    some_account = np.zeros(n_components, dtype=np.int64)
    some_account[acc_comp] = np.arange(len(acc_comp))
    pseudonyms = np.array(pseudonymise(representative.take(pa.array(some_account)).to_pylist(), key), dtype=object)
    by_pseudonym = np.argsort(pseudonyms.astype(str), kind="stable")
    comp_rank = np.empty(n_components, dtype=np.int64)
    comp_rank[by_pseudonym] = np.arange(n_components)
    return _Persons(account=account, platform=acc_platform, user=acc_user, rank=comp_rank[acc_comp],
                    pseudonyms=pseudonyms[by_pseudonym], n_links=len(link_a),
                    links_skipped=sum(p[2] for p in pairs))


def _vocabularies(d: dict[str, pa.Array], kept: dict[str, np.ndarray], event_platform: np.ndarray,
                  actions: Sequence[str], min_count: int) -> tuple[dict[str, Vocab], dict[str, np.ndarray], dict]:
    """Build the five vocabularies from the kept events' codes; returns them, the encoded columns of
    events.parquet that come from them, and counts for the report."""
    vocabs: dict[str, Vocab] = {}
    columns: dict[str, np.ndarray | pa.Array] = {}
    item_counts = np.bincount(kept["item_id"], minlength=len(d["item_id"]))
    with ThreadPoolExecutor(max_workers=1) as pool:  # the large item vocabulary, beside the others
        item_vocab = pool.submit(Vocab.from_counts, d["item_id"], item_counts, min_count=min_count, name="item")
        small, n_categories, n_query_tokens = _small_vocabularies(d, kept, event_platform, actions, min_count,
                                                                  columns)
        vocabs.update(small)
        vocabs["item"], item_ids = item_vocab.result()
    columns["item"] = item_ids[kept["item_id"]]
    counts = {"items": int(np.count_nonzero(item_counts)), "categories": n_categories, "query_tokens": n_query_tokens,
              "platform_counts": np.bincount(columns["platform"], minlength=len(vocabs["platform"]))}
    return vocabs, columns, counts


def _small_vocabularies(d: dict[str, pa.Array], kept: dict[str, np.ndarray], event_platform: np.ndarray,
                        actions: Sequence[str], min_count: int, columns: dict) -> tuple[dict[str, Vocab], int, int]:
    """The action, platform, category and query vocabularies (their columns go into `columns`), and the
    numbers of distinct categories and query words."""
    vocabs: dict[str, Vocab] = {}
    action_counts = np.bincount(kept["action"], minlength=len(d["action"]))
    vocabs["action"], action_ids = Vocab.from_counts(d["action"], action_counts, keep=actions, name="action")
    columns["action"] = action_ids[kept["action"]].astype(np.int16)
    platform_counts = np.bincount(event_platform, minlength=len(d["platform"]))
    vocabs["platform"], platform_ids = Vocab.from_counts(d["platform"], platform_counts, name="platform")
    columns["platform"] = platform_ids[event_platform].astype(np.int16)
    vocabs["category"], category_lists, first_category, n_categories = _list_vocab(
        d["category"], kept["category"], "category", min_count, lower=False, pattern=None)
    vocabs["query"], query_lists, _, n_query_tokens = _list_vocab(
        d["query"], kept["query"], "query", min_count, lower=True, pattern=QUERY_SPLIT)
    # raw code -1 (no value) selects the extra empty list at the end
    cat_index = np.where(kept["category"] >= 0, kept["category"], len(d["category"]))
    query_index = np.where(kept["query"] >= 0, kept["query"], len(d["query"]))
    columns["category"] = first_category[cat_index]
    columns["categories"] = category_lists.take(pa.array(cat_index))
    columns["query"] = query_lists.take(pa.array(query_index))
    return vocabs, n_categories, n_query_tokens


def _persons_table(person: np.ndarray, account: np.ndarray, persons: _Persons, person_rank: np.ndarray,
                   platform_names: pa.Array) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """persons.parquet, plus (the accounts with kept events, the person of each of them)."""
    n_persons = len(person_rank)
    kept_accounts = np.flatnonzero(np.bincount(account, minlength=len(persons.rank)))
    person_of_rank = np.full(len(persons.pseudonyms), -1, dtype=np.int64)
    person_of_rank[person_rank] = np.arange(n_persons)
    account_person = person_of_rank[persons.rank[kept_accounts]]
    # each person's platforms, sorted by name
    names = np.array(platform_names.to_pylist(), dtype=object)
    name_order = np.argsort(names.astype(str), kind="stable")
    name_rank = np.empty(len(names), dtype=np.int64)
    name_rank[name_order] = np.arange(len(names))
    pairs = np.unique(account_person * len(names) + name_rank[persons.platform[kept_accounts]])
    offsets = np.zeros(n_persons + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.bincount(pairs // len(names), minlength=n_persons))
    table = pa.table({
        "person": pa.array(np.arange(n_persons, dtype=np.int32)),
        "pseudonym": pa.array(persons.pseudonyms[person_rank].tolist(), pa.string()),
        "n_events": pa.array(np.diff(np.searchsorted(person, np.arange(n_persons + 1))).astype(np.int64)),
        "n_accounts": pa.array(np.bincount(account_person, minlength=n_persons).astype(np.int32)),
        "platforms": pa.ListArray.from_arrays(pa.array(offsets),
                                              pa.array(names[name_order][pairs % len(names)].tolist(), pa.string())),
    })
    return table, kept_accounts, account_person


def _write_persons(out: Path, person: np.ndarray, account: np.ndarray, persons: _Persons, person_rank: np.ndarray,
                   d: dict[str, pa.Array], write_mapping: bool) -> tuple[pa.Table, int]:
    """Write persons.parquet, and mapping.parquet when asked (else remove a stale one)."""
    table, kept_accounts, account_person = _persons_table(person, account, persons, person_rank, d["platform"])
    pq.write_table(table, out / "persons.parquet")
    if write_mapping:
        pq.write_table(pa.table({
            "platform": d["platform"].take(pa.array(persons.platform[kept_accounts])),
            "account_id": d["user_id"].take(pa.array(persons.user[kept_accounts])),
            "person": pa.array(account_person, pa.int32()),
            "pseudonym": table.column("pseudonym").take(pa.array(account_person)),
        }), out / "mapping.parquet")
    elif (out / "mapping.parquet").exists():
        (out / "mapping.parquet").unlink()  # never leave raw ids from an earlier run beside new data
    return table, len(kept_accounts)


def prepare(
    events: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    links: str | Path | Sequence[str | Path] | None = None,
    format: str = "generic",
    key: str | bytes | None = None,
    min_count: int = 1,
    max_events_per_second: int | None = None,
    min_time: int | None = None,
    max_time: int | None = None,
    actions: Sequence[str] | None = None,
    write_mapping: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Clean, link, pseudonymise and encode raw events into `out` (see the package docstring for the
    files written). Returns the report (also written to ``out/report.json``).

    Args:
        events: one or more event files (or a directory, for the amazon-cdsr and movielens formats).
        links: links files (``platform, account_id, person_id`` or ``platform_a, account_a, platform_b,
            account_b``); the amazon-cdsr adapter adds its own links.
        format: ``generic``, ``taobao``, ``amazon-cdsr`` or ``movielens`` (see `adapters`).
        key: pseudonym key; default ``$FASTINTEREST_PSEUDONYM_KEY``, else a public default (warns).
        min_count: tokens (items, categories, query words) seen fewer times go to ``<unk>``.
        max_events_per_second: bot threshold per account (``<= 0`` disables the rule; default: the adapter's,
            normally `schema.DEFAULT_MAX_EVENTS_PER_SECOND`).
        min_time, max_time: valid timestamps ``[min_time, max_time)``, unix seconds (adapter or global default).
        actions: the action vocabulary (default: the adapter's, normally `schema.DEFAULT_ACTIONS`).
        write_mapping: also write ``mapping.parquet`` (raw platform/account -> person). Holds raw ids!
        chunk_rows: rows per streamed chunk.
        threads: chunks encoded at once while the next is read, and threads for sorting (default: the CPU
            count, at most 4).
        progress: show tqdm bars (None: only on a terminal).
    """
    clock = _Clock()
    paths = [Path(p) for p in ([events] if isinstance(events, (str, Path)) else events)]
    link_paths = [Path(p) for p in ([links] if isinstance(links, (str, Path)) else (links or []))]
    if not paths:
        raise DataError("no event files given")
    adapter = get_adapter(format)
    actions = tuple(actions) if actions else adapter.actions
    if max_events_per_second is None:
        max_events_per_second = (DEFAULT_MAX_EVENTS_PER_SECOND if adapter.max_events_per_second is None
                                 else adapter.max_events_per_second)
    default_range = adapter.time_range or (DEFAULT_MIN_TIME, DEFAULT_MAX_TIME)
    min_time = default_range[0] if min_time is None else int(min_time)
    max_time = default_range[1] if max_time is None else int(max_time)
    if min_time >= max_time:
        raise DataError(f"empty time range: min_time {min_time} >= max_time {max_time}")
    key_bytes, key_source = resolve_key(key)
    out = Path(out)
    threads = threads or min(4, os.cpu_count() or 1)

    # 1. read: parse, apply the per-row rules, keep int32 codes -------------------------------------------
    encoder = ChunkEncoder(actions=actions, min_time=min_time, max_time=max_time)
    malformed = MalformedRows()
    with _progress(adapter.total_rows(paths), "read", progress) as bar:
        encoder.add_all(adapter.chunks(paths, chunk_rows, malformed), threads=threads, on_chunk=bar.update)
    enc: EncodedEvents = encoder.finish(threads=threads)
    dropped = {rule: 0 for rule in DROP_RULES}
    dropped.update(enc.dropped)
    dropped["malformed_row"] = malformed.count
    rows_read = enc.rows_read + malformed.count
    clock.lap("read_s")

    # 2. link accounts into persons ------------------------------------------------------------------------
    persons = _link(enc, link_paths, adapter.links(paths), key_bytes)
    clock.lap("link_s")

    # 3. sort by (person, time), stable ----------------------------------------------------------------------
    order, rank_sorted, time_sorted = stable_order(persons.rank[persons.account], enc.timestamp, threads=threads)
    # The other columns travel together as rows of one int32 matrix: one random gather moves them all.
    packed = np.empty((len(order), len(_PACKED)), dtype=np.int32)
    for i, name in enumerate(_PACKED):
        packed[:, i] = persons.account if name == "account" else enc.value.view(np.int32) if name == "value" \
            else enc.codes.pop(name)
    d = enc.dictionaries
    del enc
    clock.lap("sort_s")

    # 4. duplicates, then bot bursts (only rows sharing a person-second are compared) ------------------------
    group = second_groups(rank_sorted, time_sorted)
    fields = {name: packed[:, i] for i, name in enumerate(_PACKED)}
    fields["value"] = fields["value"].view(np.float32)  # compared as floats: NaN equals NaN
    dup = find_duplicates(group, order, list(fields.values()))
    burst = find_bursts(group, order, fields["account"], ~dup, max_events_per_second)
    del fields
    dropped["duplicate"], dropped["bot_burst"] = int(dup.sum()), int(burst.sum())
    keep = ~(dup | burst)
    if not keep.all():
        order, rank_sorted, time_sorted = order[keep], rank_sorted[keep], time_sorted[keep]
    del group, dup, burst, keep
    n_kept = len(order)
    if n_kept == 0:
        raise DataError(f"no valid events in {', '.join(map(str, paths))} (dropped: {dropped})")
    new_person = np.ones(n_kept, dtype=bool)  # dense person ids 0..P-1, in pseudonym order
    new_person[1:] = rank_sorted[1:] != rank_sorted[:-1]
    person = (np.cumsum(new_person) - 1).astype(np.int32)
    person_rank = rank_sorted[new_person]
    del rank_sorted
    packed = np.take(packed, order, axis=0)  # every kept event to its output position
    del order
    kept = {name: packed[:, i] for i, name in enumerate(_PACKED)}  # column views
    account, value = kept.pop("account"), kept.pop("value").view(np.float32)
    clock.lap("clean_s")

    # 5. vocabularies, while persons.parquet (and mapping.parquet) are written in the background ----------
    out.mkdir(parents=True, exist_ok=True)
    background = ThreadPoolExecutor(max_workers=2)
    persons_written = background.submit(_write_persons, out, person, account, persons, person_rank, d,
                                        write_mapping)
    vocabs, columns, counts = _vocabularies(d, kept, persons.platform[account], actions, min_count)
    del kept
    clock.lap("vocab_s")

    # 6. write events.parquet (in the background) and the JSON files -----------------------------------------
    events_table = pa.table({
        "person": pa.array(person, pa.int32()),
        "timestamp": pa.array(time_sorted, pa.int64()),
        "platform": pa.array(columns["platform"], pa.int16()),
        "action": pa.array(columns["action"], pa.int16()),
        "item": pa.array(columns["item"], pa.int32()),
        "category": pa.array(columns["category"], pa.int32()),
        "categories": columns["categories"],
        "query": columns["query"],
        "value": pa.array(value, pa.float32()),
    })
    del columns
    # Dictionary pages only for the tiny vocabularies: hashing the large id columns costs more than it saves.
    events_written = background.submit(pq.write_table, events_table, out / "events.parquet",
                                       row_group_size=1 << 20, use_dictionary=["platform", "action"])
    (out / "vocab.json").write_text(  # compact: item vocabularies are large
        json.dumps({name: vocabs[name].to_dict() for name in VOCAB_NAMES}, ensure_ascii=False,
                   separators=(",", ":")), encoding="utf-8")
    _write_json(out / "config.json", {
        "inputs": [str(p) for p in paths], "links": [str(p) for p in link_paths], "format": format,
        "min_count": min_count, "max_events_per_second": max_events_per_second,
        "min_time": min_time, "max_time": max_time, "actions": list(actions),
        "write_mapping": write_mapping, "chunk_rows": chunk_rows,
        "pseudonym": {"algorithm": PSEUDONYM_ALGORITHM, "key_source": key_source},
    })
    persons_table, n_kept_accounts = persons_written.result()
    events_written.result()
    background.shutdown()
    del events_table
    clock.lap("write_s")

    total = clock.total()
    n_accounts = persons_table.column("n_accounts").to_numpy()
    multi = n_accounts > 1
    report = {
        "rows_read": rows_read,
        "rows_kept": n_kept,
        "dropped": dropped,
        "persons": len(person_rank),
        "accounts": n_kept_accounts,
        "items": counts["items"],
        "categories": counts["categories"],
        "query_tokens": counts["query_tokens"],
        "events_per_platform": {vocabs["platform"].tokens[i]: int(counts["platform_counts"][i])
                                for i in range(2, len(vocabs["platform"]))},
        "vocab_sizes": {name: len(v) for name, v in vocabs.items()},
        "links": {"pairs": persons.n_links, "rows_skipped": persons.links_skipped,
                  "persons_with_several_accounts": int(multi.sum()),
                  "accounts_in_linked_persons": int(n_accounts[multi].sum())},
        "time_range": {"first": int(time_sorted.min()), "last": int(time_sorted.max())},
        "input_bytes": int(sum(file_size(p) for p in paths)),
        "malformed_examples": malformed.examples,
        "timings": clock.timings,
        "events_per_second": round(rows_read / total, 1) if total > 0 else None,
    }
    if report["rows_kept"] != rows_read - sum(dropped.values()):
        raise AssertionError("bookkeeping error: every row must be kept or dropped exactly once")
    _write_json(out / "report.json", report)
    return report
