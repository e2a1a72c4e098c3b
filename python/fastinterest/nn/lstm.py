"""Drop-in `LSTM` and the fused `EmbeddingLSTM`.

`LSTM` takes torch.nn.LSTM's constructor, parameter names, state_dict and forward (padded tensor or
PackedSequence in, the same out), plus the fast path `forward(x, hx=None, lengths=...)` on a padded
batch with per-sequence lengths (any order, zeros allowed; outputs past a length are zero; h_n/c_n
are the state at each sequence's last valid step) and `step(x_t, (h, c))` for serving
(`EmbeddingLSTM.step_fn()`: the same step bound once to the weights, for a serving loop).

`EmbeddingLSTM` sums one embedding per id field (item, category, action, ...) per event and runs the
LSTM over the events. In inference the first layer's input projection is folded into the tables
(rows of emb_f W_ih^T, bias folded in, cached and rebuilt when a weight changes), so a step gathers
and sums rows instead of running a GEMM.

Extra keyword arguments: backend= (force "ext", "triton", "numba" or "reference").
"""
from __future__ import annotations

import math
import os
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import _dispatch
from ..ops import lstm as F

__all__ = ["LSTM", "EmbeddingLSTM"]

_PROJECT_LIMIT_BYTES = 3 << 30     # projected inference tables larger than this fall back to gather + GEMM


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


class _Cache:
    """Derived tensors (packed or projected weights) keyed on the identity, storage and version of their
    sources: an in-place update (optimizer step, load_state_dict) bumps `_version`, a `.data` swap
    changes the storage pointer, and a replaced Parameter fails the weak identity check."""

    def __init__(self):
        self._key = None
        self._refs: tuple = ()
        self.value = None

    def get(self, sources: Sequence[Tensor], build):
        key = tuple((t.data_ptr(), t._version) for t in sources)
        if key == self._key and len(self._refs) == len(sources) and all(r() is t for r, t in zip(self._refs,
                                                                                                  sources)):
            return self.value
        self.value = None
        self.value = build()
        self._key = key
        self._refs = tuple(weakref.ref(t) for t in sources)
        return self.value

    def clear(self):
        self._key, self._refs, self.value = None, (), None


class LSTM(nn.Module):
    """torch.nn.LSTM drop-in running on fastinterest's fused kernels (see the module docstring)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__()
        if proj_size:
            raise NotImplementedError("fastinterest.nn.LSTM: proj_size > 0 (LSTM with projections) is not supported; "
                                      "use torch.nn.LSTM for it")
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             f"element being zeroed, got {dropout!r}")
        self.mode = "LSTM"
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, 0
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        dirs = 2 if bidirectional else 1
        self._flat_weights_names: List[str] = []
        for layer in range(num_layers):
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                in_size = input_size if layer == 0 else hidden_size * dirs
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"] + ([f"bias_ih{sfx}", f"bias_hh{sfx}"] if bias else [])
                shapes = [(4 * hidden_size, in_size), (4 * hidden_size, hidden_size)] + \
                         ([(4 * hidden_size,), (4 * hidden_size,)] if bias else [])
                for n, s in zip(names, shapes):
                    setattr(self, n, nn.Parameter(torch.empty(s, **factory)))
                self._flat_weights_names += names
        self._packs = {}
        self.reset_parameters()

    # ---------------------------------------------------------------- torch.nn.LSTM compatibility
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for w in self.parameters():
                w.uniform_(-stdv, stdv)

    @property
    def _flat_weights(self) -> List[Tensor]:
        params = self._parameters   # direct dict access: nn.Module.__getattr__ is slow on the serving path
        return [params[n] for n in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[Tensor]]:
        per = 4 if self.bias else 2
        w = self._flat_weights
        return [w[i:i + per] for i in range(0, len(w), per)]

    def flatten_parameters(self) -> None:  # torch API; nothing to do here
        return None

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    @classmethod
    def from_torch(cls, module: nn.LSTM, **kwargs) -> "LSTM":
        """A fastinterest LSTM carrying a copy of `module`'s weights."""
        if getattr(module, "proj_size", 0):
            raise NotImplementedError("fastinterest.nn.LSTM.from_torch: proj_size > 0 is not supported")
        w = module.weight_ih_l0
        m = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                module.dropout, module.bidirectional, device=w.device, dtype=w.dtype, **kwargs)
        m.load_state_dict(module.state_dict())
        m.train(module.training)
        return m

    def to_torch(self) -> nn.LSTM:
        w = self.weight_ih_l0
        m = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first, self.dropout,
                    self.bidirectional, device=w.device, dtype=w.dtype)
        m.load_state_dict(self.state_dict())
        m.train(self.training)
        return m

    # ---------------------------------------------------------------- forward
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _check_hx(self, hx, B: int, x: Tensor):
        if hx is None:
            return None, None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("fastinterest.nn.LSTM: hx must be a tuple (h0, c0)")
        shape = (self.num_layers * self.num_directions, B, self.hidden_size)
        F.check_state(hx[0], "h0", shape, x)
        F.check_state(hx[1], "c0", shape, x)
        return hx[0], hx[1]

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None):
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("fastinterest.nn.LSTM: lengths= cannot be combined with a PackedSequence input")
            return self._forward_packed(input, hx)
        if not isinstance(input, Tensor):
            raise TypeError(f"fastinterest.nn.LSTM: input must be a Tensor or a PackedSequence, "
                            f"got {type(input).__name__}")
        if input.dim() == 2:  # unbatched [T, E]
            if lengths is not None:
                raise ValueError("fastinterest.nn.LSTM: lengths= needs a batched (3-D) input")
            if hx is not None:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise ValueError("fastinterest.nn.LSTM: for unbatched 2-D input, hx must be 2-D "
                                     f"[num_layers * num_directions, H], got {list(hx[0].shape)}")
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            out, (h, c) = self.forward(input.unsqueeze(1 if not self.batch_first else 0), hx)
            return out.squeeze(1 if not self.batch_first else 0), (h.squeeze(1), c.squeeze(1))
        return self._run(input, hx, lengths)

    def _run(self, x: Tensor, hx, lengths: Optional[Tensor]):
        weights = self._flat_weights
        F.check_input(x, self.input_size, weights)
        B, T = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        if lengths is not None:
            F.check_lengths_meta(lengths, x, B)
        h0, c0 = self._check_hx(hx, B, x)
        # memoised outside torch.compile (resolve is a traced constant there): it dominated B = 1 calls
        backend = _dispatch.resolve("lstm", x.device, x.dtype, self.backend) if _compiling() else \
            self._resolve(x.device, x.dtype)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)
                                            or (h0 is not None and h0.requires_grad)
                                            or (c0 is not None and c0.requires_grad))
        if not grad and not _compiling() and backend == "ext" and x.device.type == "cpu" and \
                x.dtype in (torch.float32, torch.float64):
            return self._infer_ext(x, None, lengths, h0, c0)
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64)
        # Inference outside torch.compile: the op's function without the custom op's dispatch (autograd
        # wrapper, redispatch): ~0.28 ms per call on the 2-core CPU, the bulk of the 0.4-0.7 ms of host work
        # per call measured on an H200 (benchmarks/results/nvidia-h200/gpu_profile_2026-11-28.txt).
        op = F.lstm_forward if not grad and not _compiling() else F.lstm_forward_op
        res = op(x, lengths, h0, c0, weights, self.bias, self.num_layers, self.bidirectional, self.batch_first,
                 self.dropout, self.training, bool(grad), backend)
        return res[0], (res[1], res[2])

    def _forward_packed(self, ps: PackedSequence, hx):
        padded, lens = torch.nn.utils.rnn.pad_packed_sequence(ps, batch_first=self.batch_first)
        out, (h, c) = self._run(padded, hx, lens)
        # Re-pack in the input's own order (its sorted_indices and batch_sizes).
        bs = ps.batch_sizes
        T = bs.shape[0]
        B = int(bs[0]) if T else 0
        order = ps.sorted_indices if ps.sorted_indices is not None else torch.arange(B)
        order = order.to(torch.int64).cpu()
        t = torch.arange(T)
        active = torch.arange(B).unsqueeze(0) < bs.unsqueeze(1)           # [T, B] in sorted positions
        bidx = order.unsqueeze(0).expand(T, B)[active]
        tidx = t.unsqueeze(1).expand(T, B)[active]
        dev = out.device
        data = out[bidx.to(dev), tidx.to(dev)] if self.batch_first else out[tidx.to(dev), bidx.to(dev)]
        return PackedSequence(data, bs, ps.sorted_indices, ps.unsorted_indices), (h, c)

    # ---------------------------------------------------------------- inference fast path (C++, no autograd)
    def _packed_whh(self, kind: str = "fwd"):
        from ..backends import ext_lstm

        cache = self._packs.setdefault("whh_" + kind, _Cache())
        dirs = self.num_directions
        per = 4 if self.bias else 2
        w = self._flat_weights
        whh = [w[k * per + 1] for k in range(self.num_layers * dirs)]
        kern = ext_lstm.kernel()
        return cache.get(whh, lambda: [kern.pack(t, kind, self.hidden_size) for t in whh])

    def _packed_x(self):
        """'fwd' panels of every W_ih and the folded biases (for the x-input mode and step())."""
        from ..backends import ext_lstm

        cache = self._packs.setdefault("wih", _Cache())
        w = self._flat_weights
        kern = ext_lstm.kernel()
        per = 4 if self.bias else 2

        def build():
            out = []
            for k in range(self.num_layers * self.num_directions):
                wih = w[k * per]
                b = (w[k * per + 2] + w[k * per + 3]).detach().contiguous() if self.bias else None
                out.append((kern.pack(wih, "fwd", self.hidden_size), b))
            return out

        return cache.get(w, build)

    def _serving(self):
        """Packed weights and their pointer lists for step(), rebuilt when a weight changes."""
        from ..backends import ext_lstm

        cache = self._packs.setdefault("serving", _Cache())
        w = self._flat_weights
        per = 4 if self.bias else 2
        n = self.num_layers * self.num_directions
        return cache.get(w, lambda: ext_lstm.serving_pointers(
            self._packed_whh(), self._packed_x(), [w[k * per + 1].detach() for k in range(n)],
            [w[k * per].detach() for k in range(n)]))

    def _infer_ext(self, x: Optional[Tensor], tables, lengths: Optional[Tensor], h0, c0, ids_bt=None,
                   B: Optional[int] = None, T: Optional[int] = None, dtype=None):
        from ..backends import ext_lstm

        if x is not None:
            B, T = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        if lengths is not None:
            lengths = lengths.to(device="cpu", dtype=torch.int64)
        args = (x, tables, ids_bt, lengths, B, T, dtype or x.dtype, h0, c0, self.hidden_size, self.num_layers,
                self.bidirectional, self.batch_first, self._serving())
        if not torch.is_grad_enabled():
            return ext_lstm.infer(*args)
        with torch.no_grad():
            return ext_lstm.infer(*args)

    # ---------------------------------------------------------------- serving
    def _resolve(self, device, dtype) -> str:
        """_dispatch.resolve, memoised on everything it reads (serving calls step() in a hot loop)."""
        key = (device, dtype, self.backend, os.environ.get("FASTINTEREST_LSTM_BACKEND"),
               os.environ.get("FASTINTEREST_BACKEND"))
        memo = self.__dict__.setdefault("_resolved", {})
        be = memo.get(key)
        if be is None:
            be = memo[key] = _dispatch.resolve("lstm", device, dtype, self.backend)
        return be

    def step(self, x_t: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None):
        """Advance B sequences by one event: x_t [B, E], state (h, c) each [num_layers, B, H] (None: zeros)
        -> (h_top [B, H], (h, c)). Equal to one more step of the full-sequence forward. Unidirectional."""
        if self.bidirectional:
            raise ValueError("fastinterest.nn.LSTM.step: a bidirectional LSTM cannot be advanced step by step")
        if not isinstance(x_t, Tensor) or x_t.dim() != 2 or x_t.shape[1] != self.input_size:
            raise ValueError(f"fastinterest.nn.LSTM.step: x_t must be [B, input_size = {self.input_size}], got "
                             f"{list(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__}")
        B = x_t.shape[0]
        h, c = self._step_state(state, B, x_t)
        return self._step(x_t, None, h, c)

    def _step_state(self, state, B: int, ref: Tensor, dtype=None):
        shape = (self.num_layers, B, self.hidden_size)
        dtype = dtype or ref.dtype
        if state is None:
            z = torch.zeros(shape, dtype=dtype, device=ref.device)
            return z, z
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError("step: state must be a tuple (h, c)")
        h, c = state
        for name, s in (("h", h), ("c", c)):
            if not isinstance(s, Tensor) or tuple(s.shape) != shape:
                raise ValueError(f"step: state {name} must have shape [num_layers, B, H] = {list(shape)}, got "
                                 f"{list(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
        return h, c

    def _step(self, x_t: Optional[Tensor], tables, h: Tensor, c: Tensor, ids=None):
        """One step; layer 0 reads x_t [B, E] or (tables, ids) = projected tables + [B] ids per field."""
        dtype = h.dtype
        grad = torch.is_grad_enabled() and (any(w.requires_grad for w in self._flat_weights) or h.requires_grad or
                                            c.requires_grad or (x_t is not None and x_t.requires_grad))
        backend = self._resolve(h.device, dtype)
        if not grad and not _compiling() and backend == "ext" and h.device.type == "cpu" and \
                dtype in (torch.float32, torch.float64):
            from ..backends import ext_lstm

            return ext_lstm.step(x_t, tables, ids, h, c, self._serving(), self.hidden_size)
        # Any backend / autograd: the cell in torch (same maths as the kernels). torch.lstm_cell is
        # nn.LSTMCell's op: on a GPU two GEMMs and one fused pointwise kernel instead of ~10 launches.
        weights = self._flat_weights
        H = self.hidden_size
        per = 4 if self.bias else 2
        hs, cs = [], []
        inp = x_t
        for layer in range(self.num_layers):
            w_ih, w_hh = weights[layer * per], weights[layer * per + 1]
            if layer == 0 and tables is not None:
                gates = sum(t[i] for t, i in zip(tables, ids)) + h[layer] @ w_hh.t()
                i, f, g, o = gates.split(H, 1)
                c_new = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
            else:
                b_ih, b_hh = (weights[layer * per + 2], weights[layer * per + 3]) if self.bias else (None, None)
                h_new, c_new = torch.lstm_cell(inp, (h[layer], c[layer]), w_ih, w_hh, b_ih, b_hh)
            hs.append(h_new)
            cs.append(c_new)
            inp = h_new
        return inp, (torch.stack(hs), torch.stack(cs))


def _as_list(v, n: int, name: str):
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"EmbeddingLSTM: {name} has {len(v)} entries for {n} id fields")
        return list(v)
    return [v] * n


class EmbeddingLSTM(nn.Module):
    """Embedding(s) + LSTM in one module; forward(ids, lengths, hx=None) -> (output, (h_n, c_n)).

    num_embeddings: an int (one id field) or a list of table sizes (one table per field, e.g.
    [V_item, V_category, V_action, V_platform]); forward then takes a list of id tensors, one per
    field, each [B, T] (batch_first, the default) or [T, B], whose embeddings are summed per event.
    padding_idx: an int or a list per field. fused_optimizer: a fastinterest.optim.Fused* object;
    the embedding gradient is applied by it inside backward (weight.grad stays None). project_tables:
    "auto" (default; fold W_ih into the tables in inference unless they would exceed 3 GiB), True, False.
    """

    def __init__(self, num_embeddings: Union[int, Sequence[int]], embedding_dim: int, hidden_size: int,
                 num_layers: int = 1, padding_idx: Union[None, int, Sequence[Optional[int]]] = None,
                 batch_first: bool = True, bias: bool = True, dropout: float = 0.0, bidirectional: bool = False,
                 *, fused_optimizer=None, sparse: bool = False, project_tables: Union[str, bool] = "auto",
                 backend: Optional[str] = None, embedding_backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        from .embedding import Embedding

        self.multi = isinstance(num_embeddings, (list, tuple))
        sizes = list(num_embeddings) if self.multi else [num_embeddings]
        if not sizes:
            raise ValueError("EmbeddingLSTM: num_embeddings must not be empty")
        pads = _as_list(padding_idx, len(sizes), "padding_idx")
        self.num_embeddings = sizes if self.multi else sizes[0]
        self.embedding_dim, self.hidden_size, self.num_layers = embedding_dim, hidden_size, num_layers
        self.batch_first, self.bidirectional = batch_first, bidirectional
        self.padding_idx = padding_idx
        self.project_tables = project_tables
        self.embeddings = nn.ModuleList([
            Embedding(V, embedding_dim, padding_idx=p, sparse=sparse, fused_optimizer=fused_optimizer,
                      backend=embedding_backend, device=device, dtype=dtype) for V, p in zip(sizes, pads)])
        self.lstm = LSTM(embedding_dim, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, backend=backend)
        self._proj = _Cache()

    @property
    def embedding(self):
        """The (first) embedding table."""
        return self.embeddings[0]

    @property
    def num_fields(self) -> int:
        return len(self.embeddings)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}")

    @classmethod
    def from_torch(cls, embedding: Union[nn.Module, Sequence[nn.Module]], lstm: nn.LSTM, **kwargs) -> "EmbeddingLSTM":
        """From torch.nn.Embedding (or a list, one per field) and a torch.nn.LSTM (or fastinterest LSTM)."""
        embs = list(embedding) if isinstance(embedding, (list, tuple, nn.ModuleList)) else [embedding]
        multi = isinstance(embedding, (list, tuple, nn.ModuleList))
        sizes = [e.num_embeddings for e in embs]
        dims = {e.embedding_dim for e in embs}
        if len(dims) != 1 or lstm.input_size != embs[0].embedding_dim:
            raise ValueError(f"EmbeddingLSTM.from_torch: embedding dims {sorted(dims)} must all equal the LSTM's "
                             f"input_size {lstm.input_size}")
        w = embs[0].weight
        kwargs.setdefault("batch_first", lstm.batch_first)
        m = cls(sizes if multi else sizes[0], embs[0].embedding_dim, lstm.hidden_size, lstm.num_layers,
                padding_idx=[e.padding_idx for e in embs] if multi else embs[0].padding_idx, bias=lstm.bias,
                dropout=lstm.dropout, bidirectional=lstm.bidirectional, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            for dst, src in zip(m.embeddings, embs):
                dst.weight.copy_(src.weight)
            m.lstm.load_state_dict(lstm.state_dict())
        return m

    # ---------------------------------------------------------------- inputs
    def _ids(self, ids) -> List[Tensor]:
        lst = list(ids) if isinstance(ids, (list, tuple)) else [ids]
        if len(lst) != self.num_fields:
            raise ValueError(f"EmbeddingLSTM: got {len(lst)} id tensors for {self.num_fields} id fields")
        shape = None
        for f, t in enumerate(lst):
            if not isinstance(t, Tensor):
                raise TypeError(f"EmbeddingLSTM: ids of field {f} must be a Tensor, got {type(t).__name__}")
            if t.dtype not in F.INDEX_DTYPES:
                raise TypeError(f"EmbeddingLSTM: ids must be int32 or int64, got {t.dtype} for field {f}")
            if t.dim() != 2:
                raise ValueError(f"EmbeddingLSTM: ids must be 2-D ([B, T] with batch_first, else [T, B]); field {f} "
                                 f"has shape {list(t.shape)}")
            if shape is not None and t.shape != shape:
                raise ValueError(f"EmbeddingLSTM: all id fields must have the same shape; field {f} has "
                                 f"{list(t.shape)}, field 0 has {list(shape)}")
            shape = t.shape
        return lst

    def _check_ids_range(self, ids: List[Tensor], lengths: Optional[Tensor]):
        # every field's check in one device read (on a GPU each bool() is a synchronisation)
        bads = []
        for t, emb in zip(ids, self.embeddings):
            if t.numel() == 0:
                continue
            bad = (t < 0) | (t >= emb.num_embeddings)
            if lengths is not None:
                T = t.shape[1] if self.batch_first else t.shape[0]
                valid = torch.arange(T, device=t.device).unsqueeze(0) < lengths.to(t.device).unsqueeze(1)
                bad = bad & (valid if self.batch_first else valid.t())
            bads.append(bad.any())
        if not bads or not bool(torch.stack(bads).any()):
            return
        for f, (t, emb) in enumerate(zip(ids, self.embeddings)):
            V = emb.num_embeddings
            if t.numel() == 0:
                continue
            bad = (t < 0) | (t >= V)
            if lengths is not None:
                T = t.shape[1] if self.batch_first else t.shape[0]
                valid = torch.arange(T, device=t.device).unsqueeze(0) < lengths.to(t.device).unsqueeze(1)
                bad = bad & (valid if self.batch_first else valid.t())
            if bool(bad.any()):
                pos = bad.nonzero()[0].tolist()
                raise IndexError(f"EmbeddingLSTM: index {int(t[tuple(pos)])} at {pos} of id field {f} is out of range "
                                 f"for a table of {V} rows (valid: 0..{V - 1})")

    def _projected(self):
        """Per direction, per field: emb_f.weight @ W_ih^T (+ b_ih + b_hh in field 0) -> [V_f, 4H]."""
        lstm = self.lstm
        per = 4 if lstm.bias else 2
        w = lstm._flat_weights
        dirs = lstm.num_directions
        srcs = [e._parameters["weight"] for e in self.embeddings] + [w[d * per + j] for d in range(dirs)
                                                                     for j in range(per) if j != 1]

        def build():
            from .embedding import table_empty

            with torch.no_grad():
                tabs = []
                for d in range(dirs):
                    wih = w[d * per]
                    row = []
                    for f, e in enumerate(self.embeddings):
                        # huge pages where the OS allows (table_empty): the recurrence gathers one random
                        # 4H-wide row per event, and with 4 KiB pages nearly every one missed the TLB
                        t = table_empty((e.num_embeddings, wih.shape[0]), wih.dtype, wih.device)
                        torch.mm(e.weight.to(wih.dtype), wih.t(), out=t)
                        if f == 0 and lstm.bias:
                            t += w[d * per + 2] + w[d * per + 3]
                        row.append(t)
                    tabs.append(row)
                return tabs

        return self._proj.get(srcs, build)

    def _use_projection(self) -> bool:
        if self.project_tables in (True, False):
            return bool(self.project_tables)
        if "_proj_auto" not in self.__dict__:
            total = sum(e.num_embeddings for e in self.embeddings) * 4 * self.hidden_size * self.lstm.num_directions
            self._proj_auto = total * self.lstm.weight_ih_l0.element_size() <= _PROJECT_LIMIT_BYTES
        return self._proj_auto

    def embed(self, ids: List[Tensor], lengths: Optional[Tensor] = None) -> Tensor:
        """Sum of the fields' embeddings per event: [B, T, E] (or [T, B, E])."""
        x = None
        for t, emb in zip(ids, self.embeddings):
            e = emb(t)
            x = e if x is None else x + e
        return x

    # ---------------------------------------------------------------- forward
    def forward(self, ids: Union[Tensor, Sequence[Tensor]], lengths: Optional[Tensor] = None,
                hx: Optional[Tuple[Tensor, Tensor]] = None):
        ids = self._ids(ids)
        B, T = (ids[0].shape[0], ids[0].shape[1]) if self.batch_first else (ids[0].shape[1], ids[0].shape[0])
        lstm = self.lstm
        dtype = lstm.weight_ih_l0.dtype
        ref = lstm.weight_ih_l0
        if lengths is not None:
            F.check_lengths_meta(lengths, ref, B)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if hx is not None and torch.is_grad_enabled():
            grad = grad or hx[0].requires_grad or hx[1].requires_grad
        if not grad and not _compiling() and ref.device.type == "cpu" and dtype in (torch.float32, torch.float64) \
                and _dispatch.resolve("lstm", ref.device, dtype, lstm.backend) == "ext" and self._use_projection():
            if lengths is not None:
                F.check_lengths_values(lengths.to("cpu", torch.int64), T)
            h0, c0 = lstm._check_hx(hx, B, ref)
            tables = self._projected()
            ids_bt = [t if self.batch_first else t.t() for t in ids]
            return lstm._infer_ext(None, tables, lengths, h0, c0, ids_bt=ids_bt, B=B, T=T, dtype=dtype)
        if not _compiling():
            self._check_ids_range(ids, lengths)
        if lengths is not None:
            # ids past a sequence's length are never used: point them at a harmless row
            Tn = ids[0].shape[1] if self.batch_first else ids[0].shape[0]
            valid = torch.arange(Tn, device=ids[0].device).unsqueeze(0) < lengths.to(ids[0].device).unsqueeze(1)
            if not self.batch_first:
                valid = valid.t()
            ids = [t.masked_fill(~valid, e.padding_idx if e.padding_idx is not None else 0)
                   for t, e in zip(ids, self.embeddings)]
        x = self.embed(ids)
        return lstm(x, hx, lengths=lengths)

    def _check_step_ids(self, lst: List[Tensor]) -> None:
        for f, t in enumerate(lst):
            V = self.embeddings[f].num_embeddings
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
                bad = ((t < 0) | (t >= V)).nonzero()[0, 0]
                raise IndexError(f"EmbeddingLSTM.step: index {int(t[bad])} at [{int(bad)}] of id field {f} is out "
                                 f"of range for a table of {V} rows")

    def step(self, ids_t: Union[Tensor, Sequence[Tensor]], state: Optional[Tuple[Tensor, Tensor]] = None):
        """Advance B users by one event each: ids_t [B] per field -> (h_top [B, H], (h, c)), state
        [num_layers, B, H] each (None: zeros). Equal to one more step of the full forward."""
        lst = list(ids_t) if isinstance(ids_t, (list, tuple)) else [ids_t]
        if len(lst) != self.num_fields:
            raise ValueError(f"EmbeddingLSTM.step: got {len(lst)} id tensors for {self.num_fields} id fields")
        B = None
        for f, t in enumerate(lst):
            if not isinstance(t, Tensor) or t.dtype not in F.INDEX_DTYPES or t.dim() != 1:
                raise TypeError(f"EmbeddingLSTM.step: ids of field {f} must be a 1-D int32/int64 tensor [B]")
            if B is not None and t.shape[0] != B:
                raise ValueError(f"EmbeddingLSTM.step: all id fields must have the same length [B]; field {f} has "
                                 f"{t.shape[0]}, field 0 has {B}")
            B = t.shape[0]
        lstm = self.lstm
        if lstm.bidirectional:
            raise ValueError("EmbeddingLSTM.step: a bidirectional LSTM cannot be advanced step by step")
        ref = lstm.weight_ih_l0
        h, c = lstm._step_state(state, B, ref)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not grad and self._use_projection():
            tables = self._projected()[0]
            if not (ref.device.type == "cpu" and lstm._resolve(ref.device, ref.dtype) == "ext"):
                self._check_step_ids(lst)   # the C++ step checks them itself (IndexError)
            return lstm._step(None, tables, h, c, ids=lst)
        self._check_step_ids(lst)
        x = self.embed([t.unsqueeze(1) for t in lst])[:, 0]
        return lstm._step(x, None, h, c)

    def step_fn(self):
        """`step` for a serving loop, bound to the weights as they are now: returns f(ids_t, (h, c)) -> (h', c').

        ids_t: a list of [B] int32/int64 tensors, one per field (strided views are fine); h, c: [num_layers, B, H].
        Inference only (no autograd). It skips what `step` re-does on every call — argument type and shape checks,
        backend resolution, the weight-version checks of its caches — so it must be rebuilt after any change of the
        weights; ids out of range still raise IndexError. Where the fused CPU kernel does not run, f is `step`
        under torch.no_grad()."""
        lstm = self.lstm
        ref = lstm.weight_ih_l0

        def checked(ids_t, state):
            with torch.no_grad():
                return self.step(list(ids_t), state)[1]

        if lstm.bidirectional or _compiling() or ref.device.type != "cpu" or \
                ref.dtype not in (torch.float32, torch.float64) or not self._use_projection() or \
                lstm._resolve(ref.device, ref.dtype) != "ext":
            return checked
        from ..backends import ext_lstm

        with torch.no_grad():
            tables = self._projected()[0]
            ptrs = lstm._serving()
        H = lstm.hidden_size

        def fast(ids_t, state):
            return ext_lstm.step(None, tables, ids_t, state[0], state[1], ptrs, H)[1]

        return fast
