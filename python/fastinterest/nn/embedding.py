"""Drop-in `Embedding` and `EmbeddingBag`: torch's constructor, forward, parameter names and state_dict,
running on the fastest available backend, with optional half-precision rows and fused sparse optimizers.

Extra keyword arguments (all optional):
    backend         force a backend ("ext", "triton", "numba", "reference"); default: the dispatcher's choice
    weight_dtype    storage dtype of the rows (e.g. torch.float16 / torch.bfloat16 for inference tables);
                    lookups accumulate in float32 and return float32
    fused_optimizer a fastinterest.optim.Fused* object: backward updates the touched rows in place and
                    leaves weight.grad None; its state is kept as buffers (part of state_dict)
    deterministic   CUDA: False picks the faster atomic backward (CPU backward is always deterministic)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import embedding as F
from ..optim import FusedOptimizer

_OPT_PREFIX = "optim_"


class _FusedMixin:
    """Keeps a fused optimizer's per-row state as buffers named optim_<name>."""

    def _init_fused(self, optimizer: Optional[FusedOptimizer]):
        if optimizer is not None and not isinstance(optimizer, FusedOptimizer):
            raise TypeError("fused_optimizer must be a fastinterest.optim.Fused* object, got "
                            f"{type(optimizer).__name__}")
        self.fused_optimizer = optimizer
        self._state_names: list[str] = []
        if optimizer is None:
            return
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        V, D = self.weight.shape
        for name, shape in optimizer.state_shapes(V, D).items():
            if name == "step":
                buf = torch.zeros((1,), dtype=torch.long, device=self.weight.device)
            else:
                buf = table_empty(shape, acc, self.weight.device).fill_(optimizer.init_value(name))
            self.register_buffer(_OPT_PREFIX + name, buf)
            self._state_names.append(name)

    def _fused(self):
        if self.fused_optimizer is None or not self.training:
            return None
        return self.fused_optimizer, {n: getattr(self, _OPT_PREFIX + n) for n in self._state_names}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a plain torch state_dict (weight only) loads into a module with a fused optimizer: its state
        # keeps its initial value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[:] = [k for k in missing_keys if not k[len(prefix):].startswith(_OPT_PREFIX)]


_HUGE = 1 << 21
_HUGEPAGE_MIN_BYTES = 16 << 20


def table_empty(shape, dtype, device=None) -> Tensor:
    """torch.empty for a large CPU table, backed by transparent huge pages where the OS allows.

    The table is a 2 MiB-aligned view into a slightly larger buffer that is advised
    (madvise MADV_HUGEPAGE) before it is first written: random row gathers then rarely miss the TLB
    (measured ~15-30% faster forward on this machine's 1M x 64 table). Small tables, other devices,
    or a missing native module get a plain torch.empty.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < _HUGEPAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        from .. import _ext

        advise = _ext.cpu().advise_hugepages
    except (_ext.ExtensionUnavailable, AttributeError):
        return torch.empty(shape, dtype=dtype, device=device)
    buf = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
    start = (-buf.data_ptr()) % _HUGE
    view = buf[start:start + nbytes]
    advise(view.data_ptr(), nbytes)
    return view.view(dtype).view(shape)


def _make_weight(num_embeddings, embedding_dim, _weight, device, dtype, weight_dtype, padding_idx):
    if _weight is not None:
        if tuple(_weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(f"_weight has shape {tuple(_weight.shape)}, expected ({num_embeddings}, {embedding_dim})")
        dev = torch.device(device) if device is not None else _weight.device
        w = table_empty(_weight.shape, weight_dtype or dtype or _weight.dtype, dev)
        with torch.no_grad():
            w.copy_(_weight.detach())
        return nn.Parameter(w)
    w = table_empty((num_embeddings, embedding_dim), weight_dtype or dtype or torch.get_default_dtype(), device)
    with torch.no_grad():
        if weight_dtype is None:
            nn.init.normal_(w)
        else:  # draw in float32, store rounded
            w.copy_(torch.randn(w.shape, device=w.device))
        if padding_idx is not None:
            w[padding_idx].fill_(0)
    return nn.Parameter(w)


def _check_common(num_embeddings, embedding_dim, padding_idx, max_norm, scale_grad_by_freq):
    if max_norm is not None:
        raise NotImplementedError("fastinterest Embedding/EmbeddingBag: max_norm is not supported; "
                                  "renormalise the weight yourself or use torch.nn.Embedding")
    if scale_grad_by_freq:
        raise NotImplementedError("fastinterest Embedding/EmbeddingBag: scale_grad_by_freq is not supported")
    if not isinstance(num_embeddings, int) or num_embeddings <= 0 or not isinstance(embedding_dim, int) \
            or embedding_dim <= 0:
        raise ValueError(f"num_embeddings and embedding_dim must be positive ints, got {num_embeddings}, {embedding_dim}")
    if padding_idx is not None:
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx {padding_idx} must be within num_embeddings ({num_embeddings})")
        padding_idx = padding_idx + num_embeddings if padding_idx < 0 else padding_idx
    return padding_idx


class Embedding(_FusedMixin, nn.Module):
    """torch.nn.Embedding drop-in (max_norm / scale_grad_by_freq raise NotImplementedError)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Optional[Tensor] = None, _freeze: bool = False, device=None,
                 dtype=None, *, backend: Optional[str] = None, weight_dtype: Optional[torch.dtype] = None,
                 fused_optimizer: Optional[FusedOptimizer] = None, deterministic: bool = True):
        super().__init__()
        self.padding_idx = _check_common(num_embeddings, embedding_dim, padding_idx, max_norm, scale_grad_by_freq)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.max_norm, self.norm_type, self.scale_grad_by_freq = None, norm_type, False
        self.sparse, self.backend, self.deterministic = sparse, backend, deterministic
        self.weight = _make_weight(num_embeddings, embedding_dim, _weight, device, dtype, weight_dtype,
                                   self.padding_idx)
        self.weight.requires_grad_(not _freeze)
        self._init_fused(fused_optimizer)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.randn_like(self.weight, dtype=torch.float32).to(self.weight.dtype))
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(self.weight, input, self.padding_idx, self.sparse, self.backend, self._fused(),
                           self.deterministic)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.sparse:
            s += ", sparse=True"
        if self.fused_optimizer is not None:
            s += f", fused_optimizer={self.fused_optimizer}"
        return s

    @classmethod
    def from_torch(cls, module: nn.Embedding, **kwargs) -> "Embedding":
        if module.max_norm is not None:
            raise NotImplementedError("fastinterest Embedding.from_torch: max_norm is not supported")
        kwargs.setdefault("sparse", module.sparse)
        return cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                   _weight=module.weight.detach().clone(), **kwargs)

    def to_torch(self) -> nn.Embedding:
        w = self.weight.detach()
        m = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, sparse=self.sparse,
                         _weight=w.clone(), device=w.device, dtype=w.dtype)
        return m


class EmbeddingBag(_FusedMixin, nn.Module):
    """torch.nn.EmbeddingBag drop-in (max_norm / scale_grad_by_freq raise NotImplementedError)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: Optional[float] = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                 _weight: Optional[Tensor] = None, include_last_offset: bool = False,
                 padding_idx: Optional[int] = None, device=None, dtype=None, *, backend: Optional[str] = None,
                 weight_dtype: Optional[torch.dtype] = None, fused_optimizer: Optional[FusedOptimizer] = None,
                 deterministic: bool = True):
        super().__init__()
        self.padding_idx = _check_common(num_embeddings, embedding_dim, padding_idx, max_norm, scale_grad_by_freq)
        if mode not in F.MODES:
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode
        self.max_norm, self.norm_type, self.scale_grad_by_freq = None, norm_type, False
        self.sparse, self.include_last_offset = sparse, include_last_offset
        self.backend, self.deterministic = backend, deterministic
        self.weight = _make_weight(num_embeddings, embedding_dim, _weight, device, dtype, weight_dtype,
                                   self.padding_idx)
        self._init_fused(fused_optimizer)

    def reset_parameters(self) -> None:
        Embedding.reset_parameters(self)

    def forward(self, input: Tensor, offsets: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        return F.embedding_bag(self.weight, input, offsets, self.mode, per_sample_weights, self.include_last_offset,
                               self.padding_idx, self.sparse, self.backend, self._fused(), self.deterministic)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.fused_optimizer is not None:
            s += f", fused_optimizer={self.fused_optimizer}"
        return s

    @classmethod
    def from_torch(cls, module: nn.EmbeddingBag, **kwargs) -> "EmbeddingBag":
        if module.max_norm is not None:
            raise NotImplementedError("fastinterest EmbeddingBag.from_torch: max_norm is not supported")
        kwargs.setdefault("sparse", module.sparse)
        return cls(module.num_embeddings, module.embedding_dim, mode=module.mode,
                   _weight=module.weight.detach().clone(), include_last_offset=module.include_last_offset,
                   padding_idx=module.padding_idx, **kwargs)

    def to_torch(self) -> nn.EmbeddingBag:
        w = self.weight.detach()
        return nn.EmbeddingBag(self.num_embeddings, self.embedding_dim, mode=self.mode, sparse=self.sparse,
                               _weight=w.clone(), include_last_offset=self.include_last_offset,
                               padding_idx=self.padding_idx, device=w.device, dtype=w.dtype)
