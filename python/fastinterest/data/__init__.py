"""fastinterest.data: raw behaviour events -> clean, linked, pseudonymised, encoded sequences and splits.

Raw schema, links and cleaning rules: see `fastinterest.data.schema`. Data set adapters: `adapters`.

Prepared data set (``fastinterest prepare ... --out DIR``, the contract the model, training and serving
code rely on):

* ``DIR/events.parquet``: one row per kept event, sorted by ``person`` then ``timestamp`` (stable: input
  order on ties). Columns ``person`` int32 (0..P-1), ``timestamp`` int64 (unix seconds UTC), ``platform``
  int16, ``action`` int16, ``item`` int32, ``category`` int32 (the first category, 0 = ``<pad>`` when none),
  ``categories`` list<int32>, ``query`` list<int32> (query word ids, empty if none), ``value`` float32 (NaN
  if missing). Ids index the vocabularies.
* ``DIR/vocab.json``: ``{"item"|"category"|"action"|"platform"|"query": {"tokens": [...], "counts": [...]}}``;
  id 0 = ``<pad>``, 1 = ``<unk>`` (below min-count / unseen), real tokens from 2 by descending count, ties by token.
* ``DIR/persons.parquet``: ``person``, ``pseudonym`` (keyed hash), ``n_events``, ``n_accounts``, ``platforms``.
* ``DIR/report.json``: rows read/kept, ``dropped`` per rule, persons, accounts, items, categories,
  events per platform, links, timings. ``DIR/config.json``: the options used (never the key).
* ``DIR/mapping.parquet`` (raw platform, account_id -> person, pseudonym) only with ``write_mapping``.

Python API: `generate_synthetic`, `prepare`, `load_prepared` -> `Prepared`, `build_examples` ->
``{"train", "valid", "test"}`` of `SequenceBatch`, `build_person_histories`, `events_from_records`,
`planted_interests`, `Vocab`.
"""
from __future__ import annotations

from .adapters import ADAPTERS, FORMATS, get_adapter
from .linking import DEFAULT_KEY, KEY_ENV, connected_components, pseudonymise, resolve_key
from .prepare import prepare
from .prepared import EventTable, Prepared, events_from_records, load_prepared, load_vocab
from .schema import (
    DEFAULT_ACTIONS, DROP_RULES, OPTIONAL_COLUMNS, PAD_ID, RAW_COLUMNS, REQUIRED_COLUMNS, UNK_ID, DataError,
)
from .sequences import SequenceBatch, build_examples, build_person_histories
from .synthetic import generate_synthetic, planted_interests
from .vocab import LabelEncoder, Vocab, multi_hot, one_hot

__all__ = [
    "ADAPTERS", "DEFAULT_ACTIONS", "DEFAULT_KEY", "DROP_RULES", "DataError", "EventTable", "FORMATS", "KEY_ENV",
    "LabelEncoder", "OPTIONAL_COLUMNS", "PAD_ID", "Prepared", "RAW_COLUMNS", "REQUIRED_COLUMNS", "SequenceBatch",
    "UNK_ID", "Vocab", "build_examples", "build_person_histories", "connected_components", "events_from_records",
    "generate_synthetic", "get_adapter", "load_prepared", "load_vocab", "multi_hot", "one_hot", "planted_interests",
    "prepare", "pseudonymise", "resolve_key",
]
