"""`Run`: a trained run directory loaded for inference — the object serving (issue 6) builds on.

    run = Run.load("runs/demo")              # reads config.json, model.safetensors, vocab.json; no pickle
    vecs = run.user_vectors(batch)           # [N, H] float32, batch = a SequenceBatch (numpy, left-aligned)
    vecs = run.user_vectors_from_arrays(item, category, action, platform, lengths)   # same, raw arrays
    probs = run.interest_probabilities(vecs) # [N, C] sigmoid of the interest head
    scores = run.item_scores(vecs)           # [N, V] item logits (next item / click score)

All methods are inference-only (no gradients, eval mode), run `batch_size` rows at a time and take/return
numpy. Ids follow `run.vocab` (the prepared vocabulary copied into the run: id 0 = <pad>, 1 = <unk>).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models import FIELDS, InterestModel, ModelScorer
from ..train.checkpoint import load_tensors, read_config

__all__ = ["Run", "ArrayBatch"]


@dataclass
class ArrayBatch:
    """Minimal SequenceBatch-compatible holder for raw id arrays (left-aligned [N, T], lengths [N])."""

    item: np.ndarray
    category: np.ndarray
    action: np.ndarray
    platform: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, idx) -> "ArrayBatch":
        return ArrayBatch(*(np.asarray(getattr(self, f))[idx] for f in (*FIELDS, "lengths")))


class Run:
    """A trained model with its configuration and vocabulary (see the module docstring)."""

    def __init__(self, run_dir: Path, model: InterestModel, config: dict, vocab: dict, batch_size: int = 1024,
                 device: str = "cpu"):
        self.run_dir, self.model, self.config, self.vocab = Path(run_dir), model, config, vocab
        self.scorer = ModelScorer(model, name=Path(run_dir).name, batch_size=batch_size, device=device)
        self._index: dict[str, dict[str, int]] = {}

    @classmethod
    def load(cls, run_dir, *, device: str = "cpu", layers: str | None = None, batch_size: int = 1024) -> "Run":
        """Load RUN/config.json + RUN/model.safetensors + RUN/vocab.json.

        layers: override the layer family recorded at training time ("fastinterest", "torch", ...): the
        parameter names are the same, so any family can serve any run.
        """
        run_dir = Path(run_dir)
        config = read_config(run_dir)
        overrides = {"layers": layers} if layers else {}
        model = InterestModel.from_config(config["model"], **overrides)
        model.load_state_dict(load_tensors(run_dir / "model.safetensors"))
        model.to(device).eval()
        vocab_path = run_dir / "vocab.json"
        import json

        vocab = json.loads(vocab_path.read_text()) if vocab_path.exists() else {}
        return cls(run_dir, model, config, vocab, batch_size=batch_size, device=device)

    # ---- metadata
    @property
    def data_params(self) -> dict:
        """max_len / split / label_window_events / train_stride used at training time (evaluate with the same)."""
        from ..train.data import DEFAULT_DATA_PARAMS

        d = self.config.get("data") or {}
        return {k: d.get(k, v) for k, v in DEFAULT_DATA_PARAMS.items()}

    @property
    def prepared_dir(self) -> str | None:
        return (self.config.get("data") or {}).get("prepared")

    def tokens(self, field: str) -> list[str]:
        return self.vocab[field]["tokens"]

    def id_of(self, field: str, token) -> int:
        """Vocabulary id of a token (a numeric string that is a valid id is accepted as an id)."""
        if field not in self._index:
            self._index[field] = {t: i for i, t in enumerate(self.tokens(field))}
        idx = self._index[field].get(str(token))
        if idx is None:
            raise KeyError(f"unknown {field} {token!r} (not in the run's vocabulary)")
        return idx

    # ---- inference
    def user_vectors(self, batch) -> np.ndarray:
        """[N, H] user vectors of a SequenceBatch-like object (fields item/category/action/platform/lengths)."""
        return self.scorer.user_vectors(batch)

    def user_vectors_from_arrays(self, item, category, action, platform, lengths) -> np.ndarray:
        return self.user_vectors(ArrayBatch(*(np.asarray(a, dtype=np.int64) for a in
                                              (item, category, action, platform, lengths))))

    @torch.no_grad()
    def interest_probabilities(self, user_vectors) -> np.ndarray:
        u = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32))
        return torch.sigmoid(self.model.interest_logits(u)).numpy()

    @torch.no_grad()
    def item_scores(self, user_vectors, candidates=None, history_items=None, lengths=None) -> np.ndarray:
        """[N, V] logits for every item, or [N, K] for candidate ids [K] / [N, K].

        history_items [N, T] + lengths [N] (the rows' histories, as given to `user_vectors`) add the
        model's repeat term (items the person already interacted with); without them it is left out,
        which does not change the order among items the person has not seen.
        """
        u = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32))
        cand = None if candidates is None else torch.as_tensor(np.asarray(candidates), dtype=torch.long)
        hist = None if history_items is None else torch.as_tensor(np.asarray(history_items), dtype=torch.long)
        lens = None if lengths is None else torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        return self.model.item_logits(u, cand, hist, lens).numpy()

    def click_probability(self, user_vectors, candidates, history_items=None, lengths=None) -> np.ndarray:
        """sigmoid(item score) of (person, candidate) pairs: [N, K]."""
        return 1.0 / (1.0 + np.exp(-self.item_scores(user_vectors, candidates, history_items, lengths)))
