"""`InterestModel`: event history -> user vector -> interest and item heads.

    event embedding  x_t = E_item[i] + E_cat[c] + E_action[a] + E_platform[p]            [B, T, D]
    sequence state   h   = LSTM state at the last valid event (MLP baseline: pooled)    [B, H]
    user vector      u   = [h ; s]   s = the share of the history's events per category   [B, H + C]
    interest logits      = W_c u + b_c                   (one sigmoid per category)       [B, C]
    item logits          = (W_q h) . E_item[j] + b_j + w_r log(1 + n_j)                     [B, V]
                           (item embeddings tied; n_j = times item j occurs in the history)

Heads:
(a) multi-label interest per category: `interest_logits(u)`, probabilities with sigmoid;
(b) item scores: `item_logits(u)` against every item (next-item recommendation, full ranking) or
    `item_logits(u, candidates)`; `click_probability(u, candidates)` = sigmoid of the same score, the
    (person, candidate) click probability the item head is trained for (BCE with sampled negatives).

The two history features are skip connections around the LSTM ("what the person did, counted"): the
category share `s` is part of the user vector (so `Run.user_vectors` carry it and the interest head
needs nothing else), and the repeat term w_r log(1 + n_j) lets the item head re-rank items the person
already interacted with (repeat consumption, common in behaviour logs). The repeat term needs the
history's item ids: `item_logits(..., history_items=...)`; without them it is left out. Both can be
switched off (`history_share=False`, `repeat_term=False`) for a pure LSTM.

The configuration is the JSON-able dict `model.config`; `InterestModel.from_config(config)` rebuilds the
module (weights then come from a safetensors state dict, see fastinterest.train.checkpoint).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .encoder import FIELDS, LSTMEncoder, PooledEncoder

__all__ = ["InterestModel", "MLPInterestModel", "as_id_tensors", "category_share", "item_counts"]


def as_id_tensors(batch, device=None):
    """(list of the 4 id tensors [B, T] in FIELDS order, lengths [B]) from a SequenceBatch (numpy)."""
    ids = [torch.as_tensor(np.asarray(getattr(batch, f)), dtype=torch.long, device=device) for f in FIELDS]
    lengths = torch.as_tensor(np.asarray(batch.lengths), dtype=torch.long)
    return ids, lengths


def category_share(cat_ids: torch.Tensor, upto: torch.Tensor, num_categories: int) -> torch.Tensor:
    """[B, C] share of the events at positions < upto[b] of row b in each category (pad/unk ignored).

    cat_ids: [B, T] (left-aligned); upto: [B] number of leading events to count (a length or step + 1).
    """
    T = cat_ids.shape[1]
    valid = (torch.arange(T, device=cat_ids.device)[None, :] < upto.to(cat_ids.device)[:, None]) & (cat_ids >= 2)
    counts = torch.zeros(cat_ids.shape[0], num_categories, device=cat_ids.device)
    counts.scatter_add_(1, cat_ids, valid.float())
    return counts / valid.sum(1, keepdim=True).clamp(min=1).float()


def item_counts(item_ids: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor | None,
                num_items: int) -> torch.Tensor:
    """How often each candidate occurs in each history: [B, V] (candidates None), [B, K] ([K] or [B, K])."""
    T = item_ids.shape[1]
    valid = (torch.arange(T, device=item_ids.device)[None, :] < lengths.to(item_ids.device)[:, None]) & (item_ids >= 2)
    if candidates is None:
        counts = torch.zeros(item_ids.shape[0], num_items, device=item_ids.device)
        return counts.scatter_add_(1, item_ids, valid.float())
    cand = candidates if candidates.dim() == 2 else candidates.unsqueeze(0).expand(item_ids.shape[0], -1)
    return ((item_ids.unsqueeze(1) == cand.unsqueeze(2)) & valid.unsqueeze(1)).sum(2).float()


def _history_counts(item_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each history position [B, T]: how often its item occurs in the valid part of the row, and whether
    it is the item's first valid occurrence (pads, unknowns and positions past the length: count 0, False)."""
    T = item_ids.shape[1]
    valid = (torch.arange(T, device=item_ids.device)[None, :] < lengths.to(item_ids.device)[:, None]) & (item_ids >= 2)
    same = (item_ids[:, :, None] == item_ids[:, None, :]) & valid[:, None, :] & valid[:, :, None]   # [B, T, T]
    n = same.sum(2).float()
    earlier = torch.ones(T, T, dtype=torch.bool, device=item_ids.device).tril(-1)              # s < t
    first = valid & ~(same & earlier[None]).any(2)
    return n, first


class InterestModel(nn.Module):
    """Sequence model of a person's interests (see the module docstring).

    encoder: "lstm" (the model) or "mlp" (the pooled-behaviour baseline, also `MLPInterestModel`).
    layers: "fastinterest" | "torch" | "torch_padded" (see fastinterest.models.encoder).
    """

    def __init__(self, num_items: int, num_categories: int, num_actions: int, num_platforms: int, *,
                 embedding_dim: int = 64, hidden_size: int = 128, num_layers: int = 1, dropout: float = 0.1,
                 encoder: str = "lstm", layers: str = "fastinterest", history_share: bool = True,
                 repeat_term: bool = True, item_dropout: float = 0.0, item_init_std: float = 1.0):
        super().__init__()
        self.item_init_std = float(item_init_std)
        vocab_sizes = [num_items, num_categories, num_actions, num_platforms]
        kw = dict(embedding_dim=embedding_dim, hidden_size=hidden_size, num_layers=num_layers, dropout=dropout)
        if encoder == "lstm":
            self.encoder = LSTMEncoder(vocab_sizes, layers=layers, item_dropout=item_dropout, **kw)
        elif encoder == "mlp":
            self.encoder = PooledEncoder(vocab_sizes, layers=layers, **{**kw, "num_layers": max(2, num_layers)})
        else:
            raise ValueError(f"encoder must be 'lstm' or 'mlp', not {encoder!r}")
        self.hidden_size, self.num_categories, self.num_items = hidden_size, num_categories, num_items
        self.history_share, self.repeat_term = bool(history_share), bool(repeat_term)
        self.user_dim = hidden_size + (num_categories if history_share else 0)
        self.interest_head = nn.Linear(self.user_dim, num_categories)
        self.item_query = nn.Linear(hidden_size, embedding_dim)
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.state_dropout = nn.Dropout(dropout)  # on the LSTM state before both heads (training only)
        self.repeat_weight = nn.Parameter(torch.tensor(1.0 if repeat_term else 0.0), requires_grad=repeat_term)
        self.config = {"num_items": int(num_items), "num_categories": int(num_categories),
                       "num_actions": int(num_actions), "num_platforms": int(num_platforms),
                       "embedding_dim": int(embedding_dim), "hidden_size": int(hidden_size),
                       "num_layers": int(num_layers), "dropout": float(dropout), "encoder": encoder,
                       "layers": layers, "history_share": self.history_share, "repeat_term": self.repeat_term,
                       "item_dropout": float(item_dropout), "item_init_std": float(item_init_std)}
        self._init_weights()

    def _init_weights(self) -> None:
        for name in FIELDS:
            emb = getattr(self.encoder.embeddings, name)
            # std 1: torch.nn.Embedding's default (small inits plateau); the item table may start smaller
            # (`item_init_std`): it is also the item head's output table, where the random rows of items that
            # training rarely or never touches add noise of the query's size to every full-ranking score
            std = self.item_init_std if name == "item" else 1.0
            nn.init.normal_(emb.weight, std=std)
            with torch.no_grad():
                emb.weight[0].zero_()
        if self.history_share:
            # a generic start: "the categories the person already does" (share block = 4 I, state block = 0).
            # The Trainer replaces it by `warm_start` with values fitted on the training data.
            with torch.no_grad():
                self.interest_head.weight[:, self.hidden_size:] = 4.0 * torch.eye(self.num_categories)
                self.interest_head.weight[:, : self.hidden_size] = 0.0

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "InterestModel":
        cfg = {**config, **overrides}
        return cls(cfg.pop("num_items"), cfg.pop("num_categories"), cfg.pop("num_actions"),
                   cfg.pop("num_platforms"), **cfg)

    # ---- the pieces
    @property
    def layers(self) -> str:
        """The layer family actually running ("fastinterest" may have fallen back to "torch")."""
        return self.encoder.layers

    def user_from_state(self, h: torch.Tensor, cat_ids: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
        """User vector [R, user_dim] from sequence states h [R, H] and the first `upto` events of cat_ids [R, T]."""
        h = self.state_dropout(h)
        if not self.history_share:
            return h
        return torch.cat([h, category_share(cat_ids, upto, self.num_categories).to(h.dtype)], dim=1)

    def encode(self, ids, lengths):
        """ids: 4 id tensors [B, T] (item, category, action, platform); lengths [B].
        Returns (user [B, user_dim], per-step LSTM outputs [B, T, H], or None for the MLP)."""
        h, outputs = self.encoder(ids, lengths)
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        return self.user_from_state(h, ids[1], lengths), outputs

    def interest_logits(self, user: torch.Tensor) -> torch.Tensor:
        return self.interest_head(user)

    def item_logits(self, user: torch.Tensor, candidates: torch.Tensor | None = None,
                    history_items: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """user [B, user_dim] (or [B, H]); candidates None (all items -> [B, V]), [K] (shared -> [B, K]) or
        [B, K]. With history_items [B, T] and lengths [B], adds the repeat term."""
        q = self.item_query(user[..., : self.hidden_size])
        w = self.encoder.item_weight
        if candidates is None:
            out = torch.addmm(self.item_bias, q, w.t())
            if self.repeat_term and history_items is not None:
                # only the (at most T) items of each history get a repeat term: add it there in place instead
                # of building dense [B, V] counts (same values, far less memory traffic on a large vocabulary)
                n, first = _history_counts(history_items, lengths)
                out.scatter_add_(1, history_items.to(out.device),
                                      self.repeat_weight * torch.log1p(n) * first.to(out.dtype))
            return out
        if candidates.dim() == 1:
            out = q @ w[candidates].t() + self.item_bias[candidates]
        else:
            out = torch.einsum("bd,bkd->bk", q, w[candidates]) + self.item_bias[candidates]
        if self.repeat_term and history_items is not None:
            n = item_counts(history_items, lengths, candidates, self.num_items)
            out = out + self.repeat_weight * torch.log1p(n)
        return out

    def click_probability(self, user, candidates, history_items=None, lengths=None) -> torch.Tensor:
        return torch.sigmoid(self.item_logits(user, candidates, history_items, lengths))

    def forward(self, ids, lengths):
        """(user [B, user_dim], interest logits [B, C])."""
        user, _ = self.encode(ids, lengths)
        return user, self.interest_logits(user)

    @torch.no_grad()
    def warm_start(self, share_gain: float, interest_bias: float, repeat_weight: float | None = None,
                   item_bias=None) -> None:
        """Start the heads as the frequency baselines fitted on the training data (see
        `fastinterest.train.warmstart`): interest logit = share_gain * share_c + interest_bias, item logit =
        repeat_weight * log(1 + n_j) + item_bias[j]. The LSTM-state parts start at zero (interest head's
        state block, item query weights), so training adds what the sequence tells beyond the counts
        instead of starting from noise on top of them. (Adam moves a weight by ~lr per step: a few hundred
        steps could not carry a gain or bias to these values from a generic init.)"""
        if self.history_share:
            self.interest_head.weight.zero_()
            self.interest_head.weight[:, self.hidden_size:] = share_gain * torch.eye(self.num_categories)
        self.interest_head.bias.fill_(float(interest_bias))
        self.item_query.weight.zero_()
        self.item_query.bias.zero_()
        if repeat_weight is not None and self.repeat_term:
            self.repeat_weight.fill_(float(repeat_weight))
        if item_bias is not None:
            self.item_bias.copy_(torch.as_tensor(np.asarray(item_bias), dtype=torch.float32))

    # ---- initialisation from pretrained vectors
    @torch.no_grad()
    def load_pretrained(self, vectors: dict[str, torch.Tensor]) -> list[str]:
        """Copy pretrained rows (aligned to our vocabularies, e.g. from fastinterest.pretrain) into the
        embedding tables with the same name ("item", "category"); returns the fields that were set.
        Rows are centred and rescaled to the tables' initial standard deviation so the sum of fields stays balanced;
        rows that are all zero (ids the pretraining never saw) keep their random initialisation."""
        done = []
        for name, vec in vectors.items():
            if name not in FIELDS:
                continue
            emb = getattr(self.encoder.embeddings, name)
            vec = torch.as_tensor(vec, dtype=emb.weight.dtype)
            if tuple(vec.shape) != tuple(emb.weight.shape):
                raise ValueError(f"pretrained {name!r} vectors have shape {tuple(vec.shape)}, the model "
                                 f"expects {tuple(emb.weight.shape)} (same vocabulary and embedding_dim)")
            known = vec.abs().sum(1) > 0
            if known.any():
                # centre (word2vec-style vectors share a large common direction that would make every
                # item score alike in the tied item head), then match the table's initial scale
                vec = vec - vec[known].mean(0, keepdim=True)
                std = vec[known].std().clamp(min=1e-8)
                emb.weight[known] = vec[known] * (emb.weight.std() / std)
            emb.weight[0].zero_()
            done.append(name)
        return done


def MLPInterestModel(num_items, num_categories, num_actions, num_platforms, **kw) -> InterestModel:
    """The MLP baseline: pooled behaviours -> ReLU layers -> the same heads as `InterestModel`."""
    return InterestModel(num_items, num_categories, num_actions, num_platforms, encoder="mlp", **kw)
