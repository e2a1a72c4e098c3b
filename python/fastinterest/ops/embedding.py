"""`fastinterest::` custom ops for embedding / embedding-bag, and the functional API on top.

Ops (torch.library.custom_op, each with a fake implementation; the forward has autograd):
    fastinterest::embedding_bag                 forward -> (out [B, D], maxpos)
    fastinterest::embedding_bag_backward        dense gradient [V, D]
    fastinterest::embedding_bag_backward_sparse coalesced gradient (rows [U], values [U, D])
    fastinterest::embedding_bag_backward_fused  gradient applied in place by a fused optimizer

The backend is resolved in Python before the op is called and passed in as a string, so a compiled
graph sees a constant (DESIGN.md section 3). `opt` says what backward produces: OPT_DENSE,
OPT_SPARSE, or a fused optimizer code (whose state tensors ride along as op inputs).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from ..backends import registry_embedding as _reg
from ..backends.reference_embedding import (MODE_MAX, MODE_MEAN, MODE_SUM, OPT_DENSE, OPT_SPARSE, acc_dtype,
                                            bag_ids)

MODES = {"sum": MODE_SUM, "mean": MODE_MEAN, "max": MODE_MAX}
INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------- validation inside the op (data-dependent)
def _check_indices(weight: Tensor, indices: Tensor) -> None:
    """IndexError naming the first out-of-range position, before any kernel reads memory."""
    V = weight.shape[0]
    if indices.numel() == 0:
        return
    if indices.device.type == "cpu" and _dispatch.why_not("embedding_bag", "ext", "cpu", torch.float32) is None:
        from ..backends.ext_embedding import first_bad_index

        pos = first_bad_index(indices, V)
    else:
        bad = ((indices < 0) | (indices >= V)).nonzero()
        pos = int(bad[0, 0]) if bad.numel() else -1
    if pos >= 0:
        raise IndexError(f"fastinterest embedding: index {int(indices[pos])} at position {pos} is out of range "
                         f"for a table of {V} rows (valid: 0..{V - 1})")


def _check_offsets(offsets: Optional[Tensor], n: int) -> None:
    if offsets is None or offsets.numel() == 0:
        return
    off = offsets.long()
    if int(off[0]) != 0:
        raise ValueError(f"fastinterest embedding_bag: offsets[0] must be 0, got {int(off[0])}")
    steps = off[1:] - off[:-1]
    if steps.numel() and bool((steps < 0).any()):
        pos = int((steps < 0).nonzero()[0, 0]) + 1
        raise ValueError(f"fastinterest embedding_bag: offsets must be non-decreasing; offsets[{pos}]="
                         f"{int(off[pos])} < offsets[{pos - 1}]={int(off[pos - 1])}")
    if int(off[-1]) != n:
        # below n, the indices after the last offset would belong to no bag: torch's forward skips them but its
        # backward hands them uninitialised gradients, so that input is refused rather than half-supported
        raise ValueError(f"fastinterest embedding_bag: offsets end at {int(off[-1])} but there are {n} indices; "
                         "with include_last_offset=True the last offset must equal the number of indices")


def _input_is_valid(V: int, indices: Tensor, offsets: Optional[Tensor]) -> bool:
    """All index and offset checks as one device-side reduction and a single host read. The precise
    checks above each read a value back (four device synchronisations on a GPU, measured ~0.25 ms of the
    0.35 ms forward on an H200 at V = 1M, 16384 bags x 20); here they run only once this says no."""
    n = indices.numel()
    flags = []
    if n:
        lo, hi = torch.aminmax(indices)
        flags += [lo < 0, hi >= V]
    if offsets is not None and offsets.numel():
        flags += [offsets[0] != 0, offsets[-1] != n]
        if offsets.numel() > 1:
            flags.append((offsets[1:] < offsets[:-1]).any())
    return not flags or not bool(torch.stack(flags).any())


def _impl(backend: str):
    return _reg.IMPLS[backend]


# ---------------------------------------------------------------- forward op
@torch.library.custom_op("fastinterest::embedding_bag", mutates_args=())
def embedding_bag_op(weight: Tensor, indices: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor],
                     bag_mode: int, skip_idx: int, grad_skip_idx: int, backend: str, opt: int, hp: List[float],
                     s1: Optional[Tensor], s2: Optional[Tensor], step: Optional[Tensor],
                     deterministic: bool) -> Tuple[Tensor, Tensor]:
    return _forward(weight, indices, offsets, per_sample_weights, bag_mode, skip_idx, backend)


def _forward(weight, indices, offsets, per_sample_weights, bag_mode, skip_idx, backend):
    impl = _impl(backend)
    if weight.device.type == "cpu" and getattr(impl, "VALIDATES_ON_CPU", False):
        try:
            return impl.forward(weight, indices, offsets, per_sample_weights, bag_mode, skip_idx)
        except impl.BadInput:
            _check_indices(weight, indices)
            _check_offsets(offsets, indices.numel())
            raise ValueError("fastinterest embedding_bag: malformed indices or offsets") from None
    if not _input_is_valid(weight.shape[0], indices, offsets):
        _check_indices(weight, indices)
        _check_offsets(offsets, indices.numel())
        raise ValueError("fastinterest embedding_bag: malformed indices or offsets")  # not reached
    return impl.forward(weight, indices, offsets, per_sample_weights, bag_mode, skip_idx)


@embedding_bag_op.register_fake
def _(weight, indices, offsets, per_sample_weights, bag_mode, skip_idx, grad_skip_idx, backend, opt, hp, s1, s2, step,
      deterministic):
    B = indices.shape[0] if offsets is None else offsets.shape[0] - 1
    D = weight.shape[1]
    out = weight.new_empty((B, D), dtype=acc_dtype(weight.dtype))
    maxpos = weight.new_empty((B, D) if bag_mode == MODE_MAX else (0,), dtype=torch.long)
    return out, maxpos


# ---------------------------------------------------------------- backward ops
@torch.library.custom_op("fastinterest::embedding_bag_backward", mutates_args=())
def embedding_bag_backward_op(grad_out: Tensor, weight: Tensor, indices: Tensor, offsets: Optional[Tensor],
                              per_sample_weights: Optional[Tensor], maxpos: Tensor, bag_mode: int, skip_idx: int,
                              backend: str, deterministic: bool) -> Tensor:
    return _impl(backend).backward(grad_out, weight, indices, offsets, per_sample_weights, maxpos, bag_mode, skip_idx,
                                   OPT_DENSE, [], None, None, None, **_det(backend, deterministic))


@embedding_bag_backward_op.register_fake
def _(grad_out, weight, indices, offsets, per_sample_weights, maxpos, bag_mode, skip_idx, backend, deterministic):
    return grad_out.new_empty(weight.shape)


@torch.library.custom_op("fastinterest::embedding_bag_backward_sparse", mutates_args=())
def embedding_bag_backward_sparse_op(grad_out: Tensor, weight: Tensor, indices: Tensor, offsets: Optional[Tensor],
                                     per_sample_weights: Optional[Tensor], maxpos: Tensor, bag_mode: int, skip_idx: int,
                                     backend: str, deterministic: bool) -> Tuple[Tensor, Tensor]:
    return _impl(backend).backward(grad_out, weight, indices, offsets, per_sample_weights, maxpos, bag_mode, skip_idx,
                                   OPT_SPARSE, [], None, None, None, **_det(backend, deterministic))


@embedding_bag_backward_sparse_op.register_fake
def _(grad_out, weight, indices, offsets, per_sample_weights, maxpos, bag_mode, skip_idx, backend, deterministic):
    u = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty((u,), dtype=torch.long), grad_out.new_empty((u, weight.shape[1]))


@torch.library.custom_op("fastinterest::embedding_bag_backward_fused",
                         mutates_args=("weight", "s1", "s2", "step"))
def embedding_bag_backward_fused_op(grad_out: Tensor, weight: Tensor, indices: Tensor, offsets: Optional[Tensor],
                                    per_sample_weights: Optional[Tensor], maxpos: Tensor, bag_mode: int, skip_idx: int,
                                    opt: int, hp: List[float], s1: Optional[Tensor], s2: Optional[Tensor],
                                    step: Optional[Tensor], backend: str, deterministic: bool) -> None:
    _impl(backend).backward(grad_out, weight, indices, offsets, per_sample_weights, maxpos, bag_mode, skip_idx, opt, hp,
                            s1, s2, step, **_det(backend, deterministic))


@embedding_bag_backward_fused_op.register_fake
def _(grad_out, weight, indices, offsets, per_sample_weights, maxpos, bag_mode, skip_idx, opt, hp, s1, s2, step, backend,
      deterministic):
    return None


def _det(backend: str, deterministic: bool) -> dict:
    return {"deterministic": deterministic} if backend == "ext" else {}


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (weight, indices, offsets, psw, bag_mode, skip_idx, grad_skip_idx, backend, opt, hp, s1, s2, step,
     deterministic) = inputs
    ctx.args = (bag_mode, grad_skip_idx, backend, opt, list(hp), deterministic)
    ctx.save_for_backward(weight, indices, offsets, psw, output[1], s1, s2, step)
    ctx.weight_dtype = weight.dtype


def _backward(ctx, grad_out, _grad_maxpos):
    weight, indices, offsets, psw, maxpos, s1, s2, step = ctx.saved_tensors
    mode, skip, backend, opt, hp, deterministic = ctx.args
    grad_out = grad_out.contiguous()
    grad_psw = None
    if ctx.needs_input_grad[3]:
        # d out[b] / d psw[j] = weight[idx[j]]: computed before any fused update changes the rows
        B = grad_out.shape[0]
        rows = weight.index_select(0, indices.long()).to(grad_out.dtype)
        bags = bag_ids(indices, offsets, B)
        grad_psw = (grad_out.index_select(0, bags) * rows).sum(1)
        if skip >= 0:
            grad_psw = grad_psw * (indices != skip).to(grad_psw.dtype)
        grad_psw = grad_psw.to(psw.dtype)
    grad_weight = None
    if ctx.needs_input_grad[0]:
        if opt == OPT_DENSE:
            grad_weight = embedding_bag_backward_op(grad_out, weight, indices, offsets, psw, maxpos, mode, skip,
                                                    backend, deterministic).to(ctx.weight_dtype)
        elif opt == OPT_SPARSE:
            rows, vals = embedding_bag_backward_sparse_op(grad_out, weight, indices, offsets, psw, maxpos, mode, skip,
                                                          backend, deterministic)
            grad_weight = torch.sparse_coo_tensor(rows.unsqueeze(0), vals.to(ctx.weight_dtype), weight.shape,
                                                  is_coalesced=True, check_invariants=False)
        else:  # fused optimizer: the update happens here; weight.grad stays None
            embedding_bag_backward_fused_op(grad_out, weight, indices, offsets, psw, maxpos, mode, skip, opt, hp, s1,
                                            s2, step, backend, deterministic)
    return (grad_weight, None, None, grad_psw) + (None,) * 10


embedding_bag_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- functional API
def _check_index_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastinterest embedding: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"fastinterest embedding: {name} must be int32 or int64, got {t.dtype}")


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("fastinterest embedding: weight must be a 2-D tensor [num_embeddings, embedding_dim]")
    if not weight.is_floating_point():
        raise TypeError(f"fastinterest embedding: weight must be floating point, got {weight.dtype}")


def _contiguous_weight(weight: Tensor, fused) -> Tensor:
    """The kernels address rows as weight + row * D: a strided weight (a column slice, a transpose) is
    copied for them (autograd carries the gradient back to it), unless a fused optimizer must update it
    in place."""
    if weight.is_contiguous():
        return weight
    if fused is not None:
        raise ValueError("fastinterest embedding: a fused optimizer updates the weight in place, so it must be "
                         f"contiguous (got strides {weight.stride()} for shape {tuple(weight.shape)})")
    return weight.contiguous()


def _fused_args(fused, device):
    """(opt code, hyper-parameters, s1, s2, step) from `fused` = (FusedOptimizer, state dict) or None."""
    if fused is None:
        return None
    optimizer, state = fused
    names = list(optimizer.state_shapes(0, 0))
    s1 = state[names[0]] if len(names) > 0 else None
    s2 = state[names[1]] if len(names) > 1 and names[1] != "step" else None
    step = state.get("step")
    return optimizer.code, optimizer.hyper(), s1, s2, step


def embedding_bag(weight: Tensor, input: Tensor, offsets: Optional[Tensor] = None, mode: str = "mean",
                  per_sample_weights: Optional[Tensor] = None, include_last_offset: bool = False,
                  padding_idx: Optional[int] = None, sparse: bool = False, backend: Optional[str] = None,
                  fused=None, deterministic: bool = True) -> Tensor:
    """Like torch.nn.functional.embedding_bag (without max_norm), on the fastest available backend.

    fused: (FusedOptimizer, state dict of tensors) to apply the update in backward (weight.grad stays None).
    deterministic: CUDA only; False selects the faster atomic backward.
    """
    _check_weight(weight)
    weight = _contiguous_weight(weight, fused)
    _check_index_tensor("input", input)
    if mode not in MODES:
        raise ValueError(f"fastinterest embedding_bag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
    V = weight.shape[0]
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("fastinterest embedding_bag: offsets must be None when input is 2-D [B, L]")
        B, L = input.shape
        offsets = torch.arange(0, B * L + 1, max(L, 1), device=input.device, dtype=input.dtype) if L else \
            torch.zeros(B + 1, dtype=input.dtype, device=input.device)
        if per_sample_weights is not None:
            if per_sample_weights.shape != input.shape:
                raise ValueError(f"fastinterest embedding_bag: per_sample_weights shape {tuple(per_sample_weights.shape)}"
                                 f" must match input shape {tuple(input.shape)}")
            per_sample_weights = per_sample_weights.reshape(-1)
        input = input.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("fastinterest embedding_bag: offsets are required when input is 1-D")
        _check_index_tensor("offsets", offsets)
        if offsets.dim() != 1:
            raise ValueError(f"fastinterest embedding_bag: offsets must be 1-D, got shape {tuple(offsets.shape)}")
        if not include_last_offset:
            offsets = torch.nn.functional.pad(offsets, (0, 1), value=input.numel())
        elif offsets.numel() == 0:
            raise ValueError("fastinterest embedding_bag: include_last_offset=True needs at least one offset")
    else:
        raise ValueError(f"fastinterest embedding_bag: input must be 1-D or 2-D, got {input.dim()}-D")
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError("fastinterest embedding_bag: per_sample_weights is only supported for mode='sum'")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"fastinterest embedding_bag: per_sample_weights has shape "
                             f"{tuple(per_sample_weights.shape)}, expected {tuple(input.shape)}")
        if not per_sample_weights.is_floating_point():
            raise TypeError(f"fastinterest embedding_bag: per_sample_weights must be floating point, "
                            f"got {per_sample_weights.dtype}")
        per_sample_weights = per_sample_weights.to(acc_dtype(weight.dtype)).contiguous()
    for name, t in (("input", input), ("offsets", offsets), ("per_sample_weights", per_sample_weights)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"fastinterest embedding_bag: {name} is on {t.device} but weight is on {weight.device}")
    skip = _padding(padding_idx, V)
    backend = _dispatch.resolve("embedding_bag", weight.device, weight.dtype, backend)
    opt, hp, s1, s2, step = _fused_args(fused, weight.device) or (OPT_SPARSE if sparse else OPT_DENSE, [], None,
                                                                  None, None)
    if _plain_call(weight, per_sample_weights):
        return _forward(weight, input.contiguous(), offsets.contiguous(), per_sample_weights, MODES[mode], skip,
                        backend)[0]
    out, _ = embedding_bag_op(weight, input.contiguous(), offsets.contiguous(), per_sample_weights, MODES[mode], skip,
                              skip, backend, opt, hp, s1, s2, step, deterministic)
    return out


def embedding(weight: Tensor, input: Tensor, padding_idx: Optional[int] = None, sparse: bool = False,
              backend: Optional[str] = None, fused=None, deterministic: bool = True) -> Tensor:
    """Like torch.nn.functional.embedding (without max_norm): out[..., :] = weight[input[...]].

    The padding row is returned as stored and receives no gradient, as in torch.
    """
    _check_weight(weight)
    weight = _contiguous_weight(weight, fused)
    _check_index_tensor("input", input)
    if input.device != weight.device:
        raise ValueError(f"fastinterest embedding: input is on {input.device} but weight is on {weight.device}")
    V, D = weight.shape
    skip = _padding(padding_idx, V)
    backend = _dispatch.resolve("embedding_bag", weight.device, weight.dtype, backend)
    opt, hp, s1, s2, step = _fused_args(fused, weight.device) or (OPT_SPARSE if sparse else OPT_DENSE, [], None,
                                                                  None, None)
    flat = input.reshape(-1).contiguous()
    if _plain_call(weight, None):
        return _forward(weight, flat, None, None, MODE_SUM, -1, backend)[0].view(*input.shape, D)
    out, _ = embedding_bag_op(weight, flat, None, None, MODE_SUM, -1, skip, backend, opt, hp, s1, s2, step,
                              deterministic)
    return out.view(*input.shape, D)


def _plain_call(weight: Tensor, psw: Optional[Tensor]) -> bool:
    """Inference outside torch.compile: no gradient can flow, so the forward runs without the custom op's
    dispatch (autograd wrapper, redispatch: ~3x torch's whole per-call cost on small batches). Same
    function, same checks, same result as the op."""
    if torch.is_grad_enabled() and (weight.requires_grad or (psw is not None and psw.requires_grad)):
        return False
    try:
        return not torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def _padding(padding_idx: Optional[int], V: int) -> int:
    if padding_idx is None:
        return -1
    if not -V <= padding_idx < V:
        raise ValueError(f"fastinterest embedding: padding_idx {padding_idx} is out of range for {V} rows")
    return padding_idx + V if padding_idx < 0 else padding_idx
