"""The one place where training/evaluation/apps call `fastinterest.data` (so its API is used consistently)."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_splits", "read_vocab", "DEFAULT_DATA_PARAMS"]

# train_stride: events between consecutive training cuts of a person. The trainer learns at every step
# of each history (dense loss), so overlapping prefixes add little: 20 keeps epochs short.
DEFAULT_DATA_PARAMS = {"max_len": 100, "split": "leave_last_out", "label_window_events": 5, "train_stride": 20}


def read_vocab(prepared_dir) -> dict:
    return json.loads((Path(prepared_dir) / "vocab.json").read_text())


def load_splits(prepared_dir, *, max_len: int = 100, split: str = "leave_last_out", label_window_events: int = 5,
                train_stride: int = 20, **kw):
    """(splits {"train", "valid", "test": SequenceBatch}, vocab dict, Prepared) for a prepared directory."""
    from ..data import build_examples, load_prepared

    prepared = load_prepared(prepared_dir)
    splits = build_examples(prepared, max_len=max_len, split=split, label_window_events=label_window_events,
                            train_stride=train_stride, **kw)
    return splits, read_vocab(prepared_dir), prepared
