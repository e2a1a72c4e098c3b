"""Sequence engines: run a trained model's embeddings + LSTM from a given state, for serving.

An engine turns event ids into LSTM states (h, c), each [num_layers, B, H]:

    engine.run(ids, lengths, state=None)  # ids: 4 LongTensors [B, T] (item, category, action, platform),
                                          # left-aligned; -> the state after each row's lengths[b] events
    engine.step(ids_t, state)             # ids_t: 4 LongTensors [B]; one event per row -> the next state

`run` from `state=None` is the model's own forward over a history; `run(new, state=s)` continues a
stored state by the new events only, which is how `Session.append` stays O(new events).

Two families, with the same maths and the same weights (those of the run):
* `FusedEngine` ("fastinterest"): `fastinterest.nn.EmbeddingLSTM` built from the model's tables and
  LSTM; in inference the first layer's input projection is folded into the tables, and `step` is one
  fused kernel call (through `EmbeddingLSTM.step_fn()`, bound to the weights once at warm-up);
* `TorchEngine` ("torch"): stock `torch.nn.Embedding` + `torch.nn.LSTM` (PackedSequence for `run`, a
  one-step sequence for `step`) — what a service built on stock PyTorch layers would do.

Engines are read-only after construction; `warm_up()` builds their caches once so that many threads
may then call them at once.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["FusedEngine", "TorchEngine", "make_engine"]

FIELDS = ("item", "category", "action", "platform")


def _lstm_modules(model):
    encoder = model.encoder
    if not hasattr(encoder, "lstm"):
        raise ValueError("serving needs an LSTM run (encoder='lstm'): the MLP baseline has no sequence state "
                         "to advance event by event")
    embeddings = [getattr(encoder.embeddings, f) for f in FIELDS]
    return embeddings, encoder.lstm


class TorchEngine:
    """Stock torch.nn layers (see the module docstring)."""

    name = "torch"

    def __init__(self, model):
        embeddings, lstm = _lstm_modules(model)
        weight = embeddings[0].weight
        # Copies as plain torch modules, whatever class the run's model used (same parameter names).
        self.embeddings = nn.ModuleList([nn.Embedding(e.num_embeddings, e.embedding_dim, padding_idx=e.padding_idx,
                                                      device=weight.device, dtype=weight.dtype)
                                         for e in embeddings])
        for dst, src in zip(self.embeddings, embeddings):
            dst.load_state_dict(src.state_dict())
        self.lstm = nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias, batch_first=True,
                            device=weight.device, dtype=weight.dtype)
        self.lstm.load_state_dict(lstm.state_dict())
        for module in (self.embeddings, self.lstm):
            module.eval().requires_grad_(False)
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        self.device, self.dtype = weight.device, weight.dtype

    def _embed(self, ids):
        out = None
        for emb, x in zip(self.embeddings, ids):
            e = emb(x)
            out = e if out is None else out + e
        return out

    @torch.no_grad()
    def run(self, ids, lengths, state=None):
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        B = int(lengths.shape[0])
        if state is None:
            z = torch.zeros(self.num_layers, B, self.hidden_size, device=self.device, dtype=self.dtype)
            state = (z, z)
        if B == 0 or int(lengths.max()) == 0:
            return state[0].clone(), state[1].clone()
        x = self._embed(ids)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, c) = self.lstm(packed, state)
        empty = (lengths == 0).to(self.device)
        if bool(empty.any()):  # a row without events keeps its state
            keep = empty.view(1, B, 1)
            h, c = torch.where(keep, state[0], h), torch.where(keep, state[1], c)
        return h, c

    @torch.no_grad()
    def step(self, ids_t, state):
        x = self._embed([t.unsqueeze(1) for t in ids_t])
        _, (h, c) = self.lstm(x, state)
        return h, c

    def warm_up(self) -> None:
        ids = [torch.full((2, 3), 2, dtype=torch.long, device=self.device) for _ in FIELDS]
        h, c = self.run(ids, torch.tensor([3, 1]))
        self.step([t[:, 0] for t in ids], (h, c))


class FusedEngine:
    """fastinterest.nn.EmbeddingLSTM on the run's weights (see the module docstring)."""

    name = "fastinterest"

    def __init__(self, model, backend: str | None = None):
        from ..nn import EmbeddingLSTM

        embeddings, lstm = _lstm_modules(model)
        self.net = EmbeddingLSTM.from_torch(list(embeddings), lstm, batch_first=True, backend=backend)
        self.net.eval().requires_grad_(False)
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        weight = embeddings[0].weight
        self.device, self.dtype = weight.device, weight.dtype
        self._step = None  # set by warm_up()

    @torch.no_grad()
    def run(self, ids, lengths, state=None):
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if state is None and int(lengths.shape[0]):
            z = torch.zeros(self.num_layers, int(lengths.shape[0]), self.hidden_size, device=self.device,
                            dtype=self.dtype)
            state = (z, z)
        _, (h, c) = self.net(list(ids), lengths, hx=state)
        return h, c

    def step(self, ids_t, state):
        if self._step is not None:
            return self._step(ids_t, state)
        with torch.no_grad():
            return self.net.step(list(ids_t), state)[1]

    def warm_up(self) -> None:
        """Build the module's caches once, then decide whether `step` may skip the per-call checks.

        `EmbeddingLSTM.step` validates its arguments, resolves the backend and re-checks its cached (projected)
        weights on every call, which costs more than the step itself for a few users. In serving the weights
        never change, so `step` calls the module's `step_fn()` (the same kernel, bound once to the weights) —
        only if that gives exactly what the public `step` gives here; otherwise the public `step` is used."""
        self._step = None
        ids = [torch.full((2, 3), 2, dtype=torch.long, device=self.device) for _ in FIELDS]
        h, c = self.run(ids, torch.tensor([3, 1]))
        ids_t = [torch.arange(2, 4, device=self.device) for _ in FIELDS]
        with torch.no_grad():
            _, (h_ref, c_ref) = self.net.step(ids_t, (h, c))
        try:
            fn = self.net.step_fn()
            h_fast, c_fast = fn(ids_t, (h, c))
            if torch.equal(h_fast, h_ref) and torch.equal(c_fast, c_ref):
                self._step = fn
        except (AttributeError, TypeError, RuntimeError):  # an older module, or its internals changed: public step
            self._step = None


def make_engine(model, layers: str = "fastinterest", backend: str | None = None):
    """The engine for `layers` ("fastinterest" or "torch"). "fastinterest" falls back to the stock layers,
    with a warning, when fastinterest.nn cannot be used here (the warning says why)."""
    if layers == "torch":
        if backend is not None:
            raise ValueError("backend= selects a fastinterest kernel; it has no meaning with layers='torch'")
        return TorchEngine(model)
    if layers != "fastinterest":
        raise ValueError(f"layers must be 'fastinterest' or 'torch', not {layers!r}")
    try:
        return FusedEngine(model, backend=backend)
    except (ImportError, AttributeError) as exc:
        if backend is not None:
            raise
        warnings.warn(f"fastinterest.nn.EmbeddingLSTM unavailable ({type(exc).__name__}: {exc}); serving on "
                      "stock torch layers", stacklevel=2)
        return TorchEngine(model)
