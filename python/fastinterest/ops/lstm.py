"""`fastinterest::` custom ops for the LSTM, and the functional API on top.

Ops (torch.library.custom_op, each with a fake implementation):
    fastinterest::lstm_forward   (x, lengths, h0, c0, weights, ...) -> [out, h_n, c_n, *ws]
    fastinterest::lstm_backward  (grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, out, ws, ...)
                                 -> [grad_x, grad_h0, grad_c0, *grad_weights]
The forward op has autograd (register_autograd) through the backward op.

x: [B, T, E] (batch_first) or [T, B, E]; lengths: integer [B] on the CPU (or x's device), each in
[0, T]; h0, c0: [num_layers * dirs, B, H] or None; weights: torch.nn.LSTM's flat parameter order.
The backend ("ext", "triton", "numba", "reference") is resolved in Python before the op is called and
passed in as a string, so a compiled graph sees a constant (DESIGN.md section 3). `ws` is the
backend's saved workspace (shapes from its `ws_shapes`), empty when need_ws is False.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from ..backends import registry_lstm as _reg

INDEX_DTYPES = (torch.int32, torch.int64)


def _impl(backend: str):
    return _reg.IMPLS[backend]


# ---------------------------------------------------------------- validation
def check_lengths_meta(lengths: Tensor, x: Tensor, B: int) -> None:
    """Type/device/shape checks (no data access; safe under torch.compile)."""
    if not isinstance(lengths, Tensor):
        raise TypeError(f"fastinterest lstm: lengths must be a Tensor, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"fastinterest lstm: lengths must be an integer tensor (int32/int64), got {lengths.dtype}")
    if lengths.device.type != "cpu" and lengths.device != x.device:
        raise ValueError(f"fastinterest lstm: lengths must be on the CPU or on the input's device ({x.device}), "
                         f"got {lengths.device}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"fastinterest lstm: lengths must have shape [B] = [{B}], got {list(lengths.shape)}")


def check_lengths_values(lengths: Tensor, T: int) -> None:
    """ValueError naming the first length outside [0, T] (reads the data)."""
    if lengths.numel() == 0:
        return
    bad = (lengths < 0) | (lengths > T)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"fastinterest lstm: lengths[{i}] = {int(lengths[i])} is outside [0, T = {T}] "
                         f"(T is the padded time dimension of the input)")


def check_input(x: Tensor, input_size: int, weights: Sequence[Tensor]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fastinterest lstm: input must be a Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"fastinterest lstm: input must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"fastinterest lstm: input must be 3-D ([B, T, E] or [T, B, E]), got shape {list(x.shape)}")
    if x.shape[2] != input_size:
        raise ValueError(f"fastinterest lstm: input.size(-1) must be equal to input_size = {input_size}, "
                         f"got {x.shape[2]}")
    if weights and weights[0].dtype != x.dtype:
        raise TypeError(f"fastinterest lstm: input dtype {x.dtype} does not match the weights' {weights[0].dtype}")


def check_state(h: Optional[Tensor], name: str, shape: Tuple[int, int, int], x: Tensor) -> None:
    if h is None:
        return
    if not isinstance(h, Tensor):
        raise TypeError(f"fastinterest lstm: {name} must be a Tensor, got {type(h).__name__}")
    if tuple(h.shape) != tuple(shape):
        raise ValueError(f"fastinterest lstm: {name} must have shape [num_layers * num_directions, B, H] = "
                         f"{list(shape)}, got {list(h.shape)}")
    if h.dtype != x.dtype or h.device != x.device:
        raise TypeError(f"fastinterest lstm: {name} must be {x.dtype} on {x.device} like the input, got "
                        f"{h.dtype} on {h.device}")


def _lengths_cpu(lengths: Tensor) -> Tensor:
    return lengths.to(device="cpu", dtype=torch.int64)


def _dims(x: Tensor, batch_first: bool):
    return (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])


# ---------------------------------------------------------------- forward op
def lstm_forward(x: Tensor, lengths: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: List[Tensor],
                 has_bias: bool, num_layers: int, bidirectional: bool, batch_first: bool, dropout: float,
                 training: bool, need_ws: bool, backend: str) -> List[Tensor]:
    """The forward op's function. Called directly (without the custom op's dispatch) for inference outside
    torch.compile, where no gradient can flow: see nn.LSTM._run."""
    B, T = _dims(x, batch_first)
    lengths = _lengths_cpu(lengths)
    check_lengths_values(lengths, T)
    out, h_n, c_n, ws = _impl(backend).forward(x, lengths, h0, c0, list(weights), has_bias, num_layers,
                                               bidirectional, batch_first, dropout, training, need_ws)
    return [out, h_n, c_n, *ws]


@torch.library.custom_op("fastinterest::lstm_forward", mutates_args=())
def lstm_forward_op(x: Tensor, lengths: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: List[Tensor],
                    has_bias: bool, num_layers: int, bidirectional: bool, batch_first: bool, dropout: float,
                    training: bool, need_ws: bool, backend: str) -> List[Tensor]:
    return lstm_forward(x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional, batch_first, dropout,
                        training, need_ws, backend)


@lstm_forward_op.register_fake
def _(x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional, batch_first, dropout, training, need_ws,
      backend):
    B, T = _dims(x, batch_first)
    E = x.shape[2]
    H = weights[1].shape[1]
    dirs = 2 if bidirectional else 1
    out = x.new_empty((B, T, dirs * H) if batch_first else (T, B, dirs * H))
    h_n = x.new_empty(num_layers * dirs, B, H)
    c_n = x.new_empty(num_layers * dirs, B, H)
    dropout_active = dropout > 0 and training and num_layers > 1
    impl = _impl(backend)
    if backend == "ext":
        shapes = impl.ws_shapes(B, T, E, H, num_layers, dirs, dropout_active, need_ws, device=x.device.type)
    else:
        shapes = impl.ws_shapes(B, T, E, H, num_layers, dirs, dropout_active, need_ws)
    ws = [x.new_empty(s) for s in shapes]
    return [out, h_n, c_n, *ws]


# ---------------------------------------------------------------- backward op
@torch.library.custom_op("fastinterest::lstm_backward", mutates_args=())
def lstm_backward_op(grad_out: Optional[Tensor], grad_hn: Optional[Tensor], grad_cn: Optional[Tensor], x: Tensor,
                     lengths: Tensor,
                     h0: Optional[Tensor], c0: Optional[Tensor], weights: List[Tensor], out: Tensor,
                     ws: List[Tensor], has_bias: bool, num_layers: int, bidirectional: bool, batch_first: bool,
                     dropout: float, backend: str) -> List[Tensor]:
    gx, gh0, gc0, gw = _impl(backend).backward(grad_out, grad_hn, grad_cn, x, _lengths_cpu(lengths), h0, c0,
                                               list(weights), has_bias, out, list(ws), num_layers, bidirectional,
                                               batch_first, dropout)
    return [gx, gh0, gc0, *gw]


@lstm_backward_op.register_fake
def _(grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, out, ws, has_bias, num_layers, bidirectional,
      batch_first, dropout, backend):
    B = x.shape[0] if batch_first else x.shape[1]
    H = weights[1].shape[1]
    L = num_layers * (2 if bidirectional else 1)
    return [torch.empty_like(x), x.new_empty(L, B, H), x.new_empty(L, B, H), *[torch.empty_like(w) for w in weights]]


def _setup_context(ctx, inputs, output):
    (x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional, batch_first, dropout, training, need_ws,
     backend) = inputs
    ctx.cfg = (has_bias, num_layers, bidirectional, batch_first, dropout, backend, need_ws)
    ctx.has_h0, ctx.has_c0 = h0 is not None, c0 is not None
    ctx.n_w = len(weights)
    # The workspace outputs never receive gradients: do not let autograd materialise zeros for them
    # (a [B*T, 4H] zero fill per layer and direction); missing gradients arrive as None.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, lengths, h0, c0, output[0], *weights, *output[3:])


def _backward(ctx, grads):
    has_bias, num_layers, bidirectional, batch_first, dropout, backend, need_ws = ctx.cfg
    if not need_ws:
        raise RuntimeError("fastinterest lstm: backward through a forward run with need_ws=False (inference mode); "
                           "run the forward with gradients enabled")
    saved = ctx.saved_tensors
    x, lengths, h0, c0, out = saved[:5]
    weights = list(saved[5:5 + ctx.n_w])
    ws = list(saved[5 + ctx.n_w:])
    g_out, g_hn, g_cn = (None if g is None else g.contiguous() for g in grads[:3])
    res = lstm_backward_op(g_out, g_hn, g_cn, x, lengths, h0, c0, weights, out, ws, has_bias, num_layers,
                           bidirectional, batch_first, dropout, backend)
    gx, gh0, gc0 = res[0], res[1], res[2]
    gw = list(res[3:])
    return (gx, None, gh0 if ctx.has_h0 else None, gc0 if ctx.has_c0 else None, gw, None, None, None, None, None,
            None, None, None)


lstm_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- functional API
def lstm(x: Tensor, lengths: Optional[Tensor], hx: Optional[Tuple[Tensor, Tensor]], weights: Sequence[Tensor], *,
         has_bias: bool = True, num_layers: int = 1, bidirectional: bool = False, batch_first: bool = False,
         dropout: float = 0.0, training: bool = False, backend: Optional[str] = None):
    """LSTM over a padded batch with per-sequence lengths -> (out, (h_n, c_n)).

    Outputs past a sequence's length are zero; h_n/c_n are each sequence's state at its last valid
    step (h0/c0 for length 0). lengths=None means every sequence is full length.
    """
    H = weights[1].shape[1]
    dirs = 2 if bidirectional else 1
    check_input(x, weights[0].shape[1], weights)
    B, T = _dims(x, batch_first)
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64)
    else:
        check_lengths_meta(lengths, x, B)
    h0, c0 = (None, None) if hx is None else hx
    check_state(h0, "h0", (num_layers * dirs, B, H), x)
    check_state(c0, "c0", (num_layers * dirs, B, H), x)
    be = _dispatch.resolve("lstm", x.device, x.dtype, backend)
    need_ws = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)
                                           or (h0 is not None and h0.requires_grad)
                                           or (c0 is not None and c0.requires_grad))
    res = lstm_forward_op(x, lengths, h0, c0, list(weights), has_bias, num_layers, bidirectional, batch_first,
                          float(dropout), bool(training), bool(need_ws), be)
    return res[0], (res[1], res[2])
