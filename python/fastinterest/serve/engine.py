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
  `bind_step` binds that kernel call to fixed numpy buffers as well (the per-request path of appends);
* `TorchEngine` ("torch"): stock `torch.nn.Embedding` + `torch.nn.LSTM` (PackedSequence for `run`, a
  one-step sequence for `step`) — what a service built on stock PyTorch layers would do.

Engines are read-only after construction; `warm_up()` builds their caches once so that many threads
may then call them at once.
"""
from __future__ import annotations

import warnings

import numpy as np
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

    def bind_step(self, table: np.ndarray, h0: np.ndarray, c0: np.ndarray, h1: np.ndarray, c1: np.ndarray):
        """A no-argument function that advances B persons by one event between fixed numpy buffers: ids from the
        columns 0-3 of `table` [B, 5] int64, states h0, c0 -> h1, c1 (each [L, B, H] float32, C-contiguous); or
        None where the fused CPU kernel does not run (then `step` is the way).

        Why: even `step_fn()` allocates the output tensors and rebuilds the kernel's argument lists (pointers of
        every table, id column and layer) on every call — about twice the kernel's own time for one person. For
        buffers allocated once, those lists are fixed, so they are built here once and each call is the kernel
        call alone. It reaches into `EmbeddingLSTM` internals (the projected tables and packed weights that
        `step_fn()` itself binds), so it is used only after it gave exactly what the public `step` gives on
        these buffers; any difference or error -> None."""
        try:
            fn = self._bind_kernel(table, h0, c0, h1, c1)
        except (ImportError, AttributeError, TypeError, KeyError, IndexError, RuntimeError, ValueError):
            return None
        if fn is None:
            return None
        L, B, H = h0.shape
        rng = np.random.default_rng(0)
        vocab = [e.num_embeddings for e in self.net.embeddings]
        saved = [a.copy() for a in (table, h0, c0)]
        try:
            table[:, :4] = np.stack([rng.integers(0, v, B) for v in vocab], axis=1)
            h0[...] = rng.standard_normal(h0.shape)
            c0[...] = rng.standard_normal(c0.shape)
            fn()
            with torch.no_grad():
                _, (h_ref, c_ref) = self.net.step([torch.from_numpy(table[:, j].copy()) for j in range(4)],
                                                  (torch.from_numpy(h0.copy()), torch.from_numpy(c0.copy())))
            same = np.array_equal(h1, h_ref.numpy()) and np.array_equal(c1, c_ref.numpy())
        except (TypeError, IndexError, RuntimeError, ValueError):
            same = False
        finally:
            for a, s in zip((table, h0, c0), saved):
                a[...] = s
        return fn if same else None

    def _bind_kernel(self, table, h0, c0, h1, c1):
        """The kernel call of `EmbeddingLSTM.step_fn()`'s fused branch with its arguments fixed (see `bind_step`)."""
        net = self.net
        lstm = net.lstm
        ref = lstm.weight_ih_l0
        if lstm.bidirectional or ref.device.type != "cpu" or ref.dtype != torch.float32 or \
                not net._use_projection() or lstm._resolve(ref.device, ref.dtype) != "ext":
            return None
        if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] < 4 or not table.flags.c_contiguous:
            return None
        L, B, H = h0.shape
        for a in (h0, c0, h1, c1):
            if a.dtype != np.float32 or a.shape != (L, B, H) or not a.flags.c_contiguous:
                return None
        from ..backends import ext_lstm

        with torch.no_grad():
            tables = net._projected()[0]
            ptrs = lstm._serving()
        if len(tables) != 4 or L != self.num_layers or H != self.hidden_size:
            return None
        kernel = ext_lstm.kernel().m.lstm_step
        code = ext_lstm.DTYPE_CODES[torch.float32]
        ids, stride = table.ctypes.data, table.strides[0] // table.itemsize
        tabs = [(t.data_ptr(), t.shape[0], ids + j * table.itemsize, True, stride, 0) for j, t in enumerate(tables)]
        layer = B * H * 4
        hl, cl, hnl, cnl = ([a.ctypes.data + i * layer for i in range(L)] for a in (h0, c0, h1, c1))
        whh, wih, bias = ptrs[0], ptrs[1], ptrs[2]
        keep = (tables, ptrs, table, h0, c0, h1, c1)   # the memory behind every pointer stays alive with fn
        get_threads = torch.get_num_threads

        def fn(_keep=keep):
            kernel(code, get_threads(), B, H, None, 0, tabs, whh, wih, bias, hl, cl, hnl, cnl)

        return fn


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
