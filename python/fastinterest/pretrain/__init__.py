"""Pretraining of item and category vectors on behaviour sequences (DESIGN.md: pretrain/).

* `train_item2vec`: word2vec (skip-gram or CBOW) via gensim;
* `train_glove`: GloVe's weighted least squares on distance-weighted co-occurrence counts, trained with
  `fastinterest.nn.Embedding` + `fastinterest.optim.FusedAdagrad`;
* `pretrain_vectors(train_split, sizes, method)` runs one of them on the training sequences only (no
  validation/test events, so evaluation does not leak), for items and for categories;
* `save_vectors` / `load_vectors`: one safetensors file, tensors "item" [V_item, D] and "category"
  [V_category, D] aligned to the prepared vocabulary, metadata {method, dim, window, ...}. Pass it to
  `fastinterest train --pretrained FILE` (the model's embedding_dim follows D).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .glove import cooccurrence, train_glove  # noqa: F401
from .item2vec import train_item2vec  # noqa: F401

__all__ = ["train_item2vec", "train_glove", "cooccurrence", "pretrain_vectors", "save_vectors", "load_vectors",
           "METHODS"]

METHODS = ("word2vec", "cbow", "glove")


def pretrain_vectors(train, sizes: dict[str, int], method: str = "word2vec", *, dim: int = 64, window: int = 5,
                     epochs: int | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Vectors for the "item" and "category" fields from the training split's sequences.

    train: the training SequenceBatch; sizes: {"item": V_item, "category": V_category};
    method: "word2vec" (skip-gram), "cbow" or "glove". Returns ({field: [V, dim] float32}, info).
    """
    from ..metrics.baselines import training_sequences

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    vectors, info = {}, {"method": method, "dim": dim, "window": window, "seed": seed}
    for field in ("item", "category"):
        seqs = training_sequences(train, field)
        if method == "glove":
            vec, gi = train_glove(seqs, sizes[field], dim, window=window, epochs=epochs or 25, seed=seed,
                                  return_info=True)
            info[f"{field}_implementation"] = gi["implementation"]
            info[f"{field}_pairs"] = gi["pairs"]
            info[f"{field}_final_loss"] = gi["losses"][-1] if gi["losses"] else None
        else:
            vec = train_item2vec(seqs, sizes[field], dim, window=window, sg=(method == "word2vec"),
                                 epochs=epochs or 5, seed=seed)
        vectors[field] = vec
        info[f"{field}_coverage"] = float((np.abs(vec).sum(1) > 0)[2:].mean()) if len(vec) > 2 else 0.0
    return vectors, info


def save_vectors(path, vectors: dict[str, np.ndarray], info: dict) -> Path:
    from ..train.checkpoint import save_tensors_atomic

    path = Path(path)
    save_tensors_atomic(path, {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in vectors.items()},
                        {"format": "fastinterest.vectors", **info})
    return path


def load_vectors(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta
