"""Batch inference helpers: a trained model as a *scorer* for `fastinterest.metrics.evaluate_scorer`
and the applications (numpy in, numpy/torch out, no gradients, fixed-size chunks)."""
from __future__ import annotations

import numpy as np
import torch

from .interest import as_id_tensors

__all__ = ["ModelScorer"]


class ModelScorer:
    """Wraps an `InterestModel` for inference on `SequenceBatch`es.

    user_vectors(batch) -> [N, H] float32 numpy; category_scores(batch) -> [N, C] interest probabilities;
    item_scores(batch) -> [N, V] torch tensor of item logits (higher = more likely next).
    Rows are processed `batch_size` at a time; the padded width is trimmed to the longest history
    of each chunk (valid because histories are left-aligned).
    """

    def __init__(self, model, name: str = "model", batch_size: int = 1024, device: str | torch.device = "cpu"):
        self.model, self.name, self.batch_size, self.device = model, name, batch_size, torch.device(device)

    def _chunks(self, batch):
        n = len(batch)
        for lo in range(0, n, self.batch_size):
            part = batch.subset(np.arange(lo, min(n, lo + self.batch_size)))
            ids, lengths = as_id_tensors(part, self.device)
            width = max(1, int(lengths.max())) if len(lengths) else 1
            yield [x[:, :width] for x in ids], lengths

    @torch.no_grad()
    def user_tensor(self, batch) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            parts = [self.model.encode(ids, lengths)[0] for ids, lengths in self._chunks(batch)]
        finally:
            self.model.train(was)
        if not parts:
            return torch.zeros(0, self.model.config["hidden_size"])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def user_vectors(self, batch) -> np.ndarray:
        return self.user_tensor(batch).cpu().numpy()

    @torch.no_grad()
    def category_scores(self, batch) -> np.ndarray:
        return torch.sigmoid(self.model.interest_logits(self.user_tensor(batch))).cpu().numpy()

    @torch.no_grad()
    def item_scores(self, batch) -> torch.Tensor:
        """[N, V] item logits, with the repeat term computed from each row's history."""
        was = self.model.training
        self.model.eval()
        try:
            parts = []
            for ids, lengths in self._chunks(batch):
                user, _ = self.model.encode(ids, lengths)
                parts.append(self.model.item_logits(user, None, ids[0], lengths))
        finally:
            self.model.train(was)
        if len(parts) == 1:  # the common case (callers pass chunks): no copy of the [N, V] scores
            return parts[0]
        return torch.cat(parts) if parts else torch.zeros(0, self.model.num_items)
