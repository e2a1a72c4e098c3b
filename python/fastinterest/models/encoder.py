"""Sequence encoders: a person's event history -> a user vector.

Every event is the sum of four embeddings (item + category + action + platform). The LSTM encoder runs
an LSTM over the events and takes the state at each sequence's last valid step; the pooled encoder
(the MLP baseline) averages the event embeddings and applies ReLU layers.

Inputs are LEFT-aligned id tensors [B, T] (padding id 0 after the `lengths[b]` valid events) and
`lengths` [B]; a zero-length history gives a zero user vector before the heads.

`layers` selects who runs the embedding + LSTM (same maths, same parameter names, so checkpoints move
freely between them):
* "fastinterest": `fastinterest.nn.Embedding` + `fastinterest.nn.LSTM(lengths=...)` — our fused kernels
  (falls back to the stock torch layers, with a warning, while those modules are not importable);
* "torch": stock `torch.nn.Embedding` + `torch.nn.LSTM` on a PackedSequence (the textbook way);
* "torch_padded": stock layers on the padded batch, reading the output at each last valid step (exact
  for left-aligned sequences; the padded steps are wasted work).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["FIELDS", "EventEmbedding", "LSTMEncoder", "PooledEncoder", "resolve_layers"]

FIELDS = ("item", "category", "action", "platform")
LAYER_CHOICES = ("fastinterest", "torch", "torch_padded")


def _fastinterest_modules():
    """(Embedding, LSTM) classes of fastinterest.nn, or None with the reason."""
    try:
        from fastinterest import nn as fnn

        return fnn.Embedding, fnn.LSTM, None
    except (ImportError, AttributeError) as exc:  # the extension or the module is not there yet
        return None, None, f"{type(exc).__name__}: {exc}"


_warned: set[str] = set()


def resolve_layers(layers: str) -> str:
    """The layer family that will actually run: "fastinterest" degrades to "torch" when unavailable."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, not {layers!r}")
    if layers == "fastinterest":
        emb, lstm, why = _fastinterest_modules()
        if emb is None:
            if why not in _warned:
                _warned.add(why)
                warnings.warn(f"fastinterest.nn layers unavailable ({why}); using stock torch layers", stacklevel=3)
            return "torch"
    return layers


class EventEmbedding(nn.Module):
    """Four embedding tables; an event's vector is their sum. Parameter names: `{field}.weight`."""

    def __init__(self, vocab_sizes, dim: int, layers: str = "torch", item_dropout: float = 0.0):
        super().__init__()
        emb_cls = nn.Embedding
        if resolve_layers(layers) == "fastinterest":
            emb_cls = _fastinterest_modules()[0]
        for name, n in zip(FIELDS, vocab_sizes):
            setattr(self, name, emb_cls(int(n), dim, padding_idx=0))
        self.dim = dim
        self.item_dropout = float(item_dropout)

    def forward(self, ids) -> torch.Tensor:
        """ids: 4 tensors [B, T] -> [B, T, D]."""
        out = None
        for name, x in zip(FIELDS, ids):
            e = getattr(self, name)(x)
            if name == "item" and self.training and self.item_dropout > 0:
                # item dropout: in training, an event's item vector is left out (as for an unknown item) with
                # probability item_dropout, so the sequence state cannot rest on memorised rare item ids
                keep = torch.rand(x.shape, device=e.device) >= self.item_dropout
                e = e * keep.unsqueeze(-1).to(e.dtype)
            out = e if out is None else out + e
        return out


def _last_valid(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """outputs [B, T, H] -> [B, H] at step lengths-1 (zeros where the length is 0)."""
    idx = (lengths.clamp(min=1) - 1).to(outputs.device)
    last = outputs.gather(1, idx.view(-1, 1, 1).expand(-1, 1, outputs.shape[2])).squeeze(1)
    return last * (lengths > 0).to(outputs.device, outputs.dtype).unsqueeze(1)


class LSTMEncoder(nn.Module):
    """EventEmbedding -> LSTM. forward(ids, lengths) -> (user [B, H], outputs [B, T, H])."""

    def __init__(self, vocab_sizes, embedding_dim: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, layers: str = "fastinterest", item_dropout: float = 0.0):
        super().__init__()
        self.requested_layers = layers
        self.layers = resolve_layers(layers)
        self.embeddings = EventEmbedding(vocab_sizes, embedding_dim, self.layers, item_dropout)
        lstm_cls = _fastinterest_modules()[1] if self.layers == "fastinterest" else nn.LSTM
        self.lstm = lstm_cls(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True,
                             dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.hidden_size = hidden_size

    @property
    def item_weight(self) -> torch.Tensor:
        return self.embeddings.item.weight

    def forward(self, ids, lengths):
        x = self.dropout(self.embeddings(ids))
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if self.layers == "fastinterest":
            outputs, _ = self.lstm(x, lengths=lengths)
        elif self.layers == "torch":
            B, T = x.shape[:2]
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                                       enforce_sorted=False)
            out, _ = self.lstm(packed)
            outputs, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        else:  # torch_padded: outputs before each sequence's end do not depend on the trailing pads
            outputs, _ = self.lstm(x)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None])
        outputs = outputs * mask.unsqueeze(2).to(outputs.dtype)
        return _last_valid(outputs, lengths), outputs


class PooledEncoder(nn.Module):
    """The MLP baseline: mean of the event embeddings over the valid steps -> (Linear, ReLU) x layers."""

    def __init__(self, vocab_sizes, embedding_dim: int, hidden_size: int, num_layers: int = 2,
                 dropout: float = 0.0, layers: str = "torch"):
        super().__init__()
        self.embeddings = EventEmbedding(vocab_sizes, embedding_dim, "torch" if layers != "fastinterest" else layers)
        dims = [embedding_dim] + [hidden_size] * max(1, num_layers)
        mlp: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mlp += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*mlp)
        self.hidden_size = hidden_size
        self.layers = "torch"

    @property
    def item_weight(self) -> torch.Tensor:
        return self.embeddings.item.weight

    def forward(self, ids, lengths):
        x = self.embeddings(ids)
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=x.device)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
        pooled = (x * mask.unsqueeze(2)).sum(1) / lengths.clamp(min=1).unsqueeze(1).to(x.dtype)
        user = self.mlp(pooled) * (lengths > 0).to(x.dtype).unsqueeze(1)
        return user, None
