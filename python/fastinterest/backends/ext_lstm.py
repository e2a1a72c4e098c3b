"""LSTM on the packed layout: the driver shared by the ext (C++), numba and triton backends, and the
ext kernel adapter.

Layout (as torch's PackedSequence; see csrc/cpu/lstm_kernels.h): sequences sorted by length,
descending and stable; step t holds batch_sizes[t] rows; N = sum(lengths) rows in all, so padding
costs nothing. Per layer:

    xproj [N, dirs*4H] = x_packed @ W_ih^T + b    one large GEMM (torch)
    recurrence per direction                      the kernel (h W_hh^T fused with the gates)
    backward: dgates [N, 4H] per direction        the kernel (BPTT)
              dW_ih = dgates^T x, dW_hh = dgates^T hprev, db = sum dgates, dx = dgates W_ih  (torch)

A kernel object provides `forward(...)`, `backward(...)` on tensor views (see `ExtKernel`) and says
whether it can read and write padded [B, T, H] views directly (`padded_io`); if not, the driver packs
and unpacks with index_select / index_copy.

Workspace `ws` (saved for backward, allocated here with torch.empty, capacity M = B*T rows, the first
N used): per layer, per direction gates [M, 4H] and c [M, H]; then, per layer below the top (and the
top too when the kernel lacks padded_io), the packed layer output [M, dirs*H]; then per layer below
the top with dropout, the dropout mask [M, dirs*H].
"""
from __future__ import annotations

import threading

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _ext
from ..nn.embedding import table_empty
from .reference_lstm import layer_weights

DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
_PROJECT_FIRST_BELOW = 3   # batches smaller than one 3-row tile project all steps first (see infer)


def _configure_from_env() -> None:
    import os

    v = os.environ.get("FASTINTEREST_LSTM_UNIT_SPLIT_MIN")
    if v and _ext.cpu_reason() is None and hasattr(_ext.cpu(), "lstm_set_unit_split_min"):
        _ext.cpu().lstm_set_unit_split_min(int(v))


_configure_from_env()


def _torch_sgemm() -> int:
    """Address of the Fortran sgemm_ inside torch's own CPU library (MKL in the x86 wheels), or 0."""
    import ctypes
    import os

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.cast(ctypes.CDLL(path).sgemm_, ctypes.c_void_p).value or 0
            except (OSError, AttributeError):
                return 0
    return 0


def _configure_blas() -> None:
    """Opt-in (FASTINTEREST_LSTM_BLAS=1): hand torch's BLAS to the C++ recurrence (float32 batches of
    >= FASTINTEREST_LSTM_GEMM_MIN_ROWS sequences, default 32); the kernel self-tests it first.

    Off by default: on the 2-core EPYC we measure on, the sgemm itself is fast (~146 GFLOP/s at 256
    rows) but the step's table gather and gate pointwise cost the same either way, and the BLAS loses
    on shrinking batches (EmbeddingLSTM inference, Taobao length mix: 44.8 ms BLAS vs 38.5 ms tiles;
    full length 32.2 vs 27.2 ms; benchmarks/bench_lstm.py --quick, same machine, interleaved with torch).
    """
    import os

    if _ext.cpu_reason() is not None or not hasattr(_ext.cpu(), "lstm_set_sgemm"):
        return
    if os.environ.get("FASTINTEREST_LSTM_BLAS", "0") != "1":
        _ext.cpu().lstm_set_sgemm(0)
        return
    fn = _torch_sgemm()
    if fn:
        try:
            _ext.cpu().lstm_set_sgemm(fn, int(os.environ.get("FASTINTEREST_LSTM_GEMM_MIN_ROWS", "0")))
        except RuntimeError:
            _ext.cpu().lstm_set_sgemm(0)


_configure_blas()


def _raw(w: Tensor) -> int:
    """Address of a row-major weight for the BLAS path, or 0 (not contiguous)."""
    return w.data_ptr() if w.is_contiguous() else 0


# ---------------------------------------------------------------- CPU workspace pool
class WorkspacePool:
    """Reuses large CPU workspaces across calls.

    torch's CPU allocator hands big blocks back to the OS on free, so every training step page-faults
    its tens of MB of workspace in again; in this VM a fault costs ~4 us and a fresh 52 MB buffer
    ~55 ms to first touch. A pooled buffer is handed out (as a view) only while nothing but the pool
    references its storage, so a workspace still saved by autograd is never reused. Memory stays
    allocated up to `max_bytes` (like CUDA's caching allocator); `empty_cache()` releases it. New buffers
    are huge-page advised (`table_empty`). Thread-safe. Also holds the LSTM's outputs and input gradient.
    """

    def __init__(self, max_bytes: int = 1 << 30, min_bytes: int = 1 << 20):
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self.bufs: List[Tensor] = []
        self._count = getattr(torch._C, "_storage_Use_Count", None)
        # a buffer is free when only the pool references it: the check and the hand-out are one step
        self._lock = threading.Lock()

    def _free(self, base: Tensor) -> bool:
        # the pool's tensor + the temporary storage object made here = 2
        return self._count(base.untyped_storage()._cdata) <= 2

    def empty(self, shape, dtype: torch.dtype) -> Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        if self._count is None or nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            return self._take(shape, dtype, nbytes, itemsize)

    def _take(self, shape, dtype: torch.dtype, nbytes: int, itemsize: int) -> Tensor:
        best = None
        for base in self.bufs:
            n = base.numel()
            if nbytes <= n <= 2 * nbytes and (best is None or n < best.numel()) and self._free(base):
                best = base
        if best is None:
            total = sum(b.numel() for b in self.bufs)
            while self.bufs and total + nbytes > self.max_bytes:
                free = [b for b in self.bufs if self._free(b)]
                if not free:
                    return torch.empty(shape, dtype=dtype)
                victim = max(free, key=lambda b: b.numel())
                # by identity: list.remove compares with ==, elementwise for tensors (an error for others' shapes)
                self.bufs = [b for b in self.bufs if b is not victim]
                total -= victim.numel()
            # huge pages where the OS allows (a fresh 13 MB buffer took ~3300 page faults, ~10 ms of
            # system time, to first touch; as 2 MiB pages, 7)
            view = table_empty((nbytes,), torch.uint8)
            # the pool's own tensor on that storage, not the view: a view keeps its base tensor alive,
            # whose storage reference would make the buffer look in use forever
            best = torch.empty(0, dtype=torch.uint8).set_(view.untyped_storage(), view.storage_offset(), (nbytes,))
            del view
            self.bufs.append(best)
        # a fresh tensor on the pooled storage (not a view: ws tensors are custom-op outputs)
        return torch.empty(0, dtype=dtype).set_(best.untyped_storage(), best.storage_offset() // itemsize,
                                                tuple(int(d) for d in shape))

    def empty_cache(self) -> None:
        with self._lock:
            self.bufs = [b for b in self.bufs if not self._free(b)]


POOL = WorkspacePool()


def empty_cache() -> None:
    """Release the LSTM's cached CPU workspaces that nothing uses."""
    POOL.empty_cache()


def _empty(shape, like: Tensor) -> Tensor:
    """Workspace allocation: pooled on the CPU, torch.empty elsewhere."""
    if like.device.type == "cpu":
        return POOL.empty(shape, like.dtype)
    return like.new_empty(shape)


# ---------------------------------------------------------------- length plan
class Plan(NamedTuple):
    lengths: Tensor      # [B] int64, batch order
    perm: Tensor         # [B] position -> batch row
    batch_sizes: Tensor  # [T]
    offsets: Tensor      # [T+1]
    pack_index: Tensor   # [N] flat padded row (b*T+t if batch_first else t*B+b) of each packed row
    N: int
    maxlen: int
    B: int
    T: int

    @property
    def desc(self):
        return (self.lengths.data_ptr(), self.perm.data_ptr(), self.batch_sizes.data_ptr(), self.offsets.data_ptr(),
                self.B, self.T)


_tls = threading.local()


def device_plan(plan: Plan, device) -> tuple:
    """(lengths, perm, batch_sizes, offsets, pack_index) of `plan` on `device`: one pinned, asynchronous
    copy per plan, shared by every layer and direction of a call (per thread). A copy from pageable
    memory synchronises the stream first: the five separate copies per layer and direction this replaces
    each drained the GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return plan.lengths, plan.perm, plan.batch_sizes, plan.offsets, plan.pack_index
    hit = getattr(_tls, "plan", None)
    if hit is not None and hit[0] is plan and hit[1] == device:
        return hit[2]
    host = torch.cat([plan.lengths, plan.perm, plan.batch_sizes, plan.offsets, plan.pack_index])
    moved = host.pin_memory().to(device, non_blocking=True)
    sizes = [plan.lengths.numel(), plan.perm.numel(), plan.batch_sizes.numel(), plan.offsets.numel(),
             plan.pack_index.numel()]
    parts = tuple(moved.split(sizes))
    _tls.plan = (plan, device, parts)
    return parts


def _has_ext_plan() -> bool:
    return _ext.cpu_reason() is None and hasattr(_ext.cpu(), "lstm_plan")


def make_plan(lengths: Tensor, B: int, T: int, batch_first: bool) -> Plan:
    """lengths: int64 [B] on the CPU (validated by the caller; the C++ plan re-checks)."""
    lengths = lengths.to(torch.int64).contiguous()
    if _has_ext_plan():
        perm = torch.empty(B, dtype=torch.int64)
        bs = torch.empty(T, dtype=torch.int64)
        off = torch.empty(T + 1, dtype=torch.int64)
        idx = torch.empty(max(B * T, 1), dtype=torch.int64)
        N, maxlen = _ext.cpu().lstm_plan(lengths.data_ptr(), B, T, perm.data_ptr(), bs.data_ptr(), off.data_ptr(),
                                         idx.data_ptr(), batch_first)
        return Plan(lengths, perm, bs, off, idx[:N], N, maxlen, B, T)
    return make_plan_torch(lengths, B, T, batch_first)


def make_plan_torch(lengths: Tensor, B: int, T: int, batch_first: bool) -> Plan:
    lengths = lengths.to(torch.int64).contiguous()
    perm = torch.sort(lengths, descending=True, stable=True).indices
    Ls = lengths[perm]
    t = torch.arange(T, dtype=torch.int64)
    active = Ls.unsqueeze(0) > t.unsqueeze(1)                     # [T, B]
    bs = active.sum(1)
    off = torch.zeros(T + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(bs, 0)
    flat = perm.unsqueeze(0) * T + t.unsqueeze(1) if batch_first else t.unsqueeze(1) * B + perm.unsqueeze(0)
    idx = flat[active]
    N = int(off[-1])
    return Plan(lengths, perm, bs, off, idx, N, int(Ls[0]) if B else 0, B, T)


# ---------------------------------------------------------------- the ext kernel
def _mat(t: Tensor):
    """Descriptor (ptr, ld, sb, st, padded) of a 2-D packed view [rows, H] or a 3-D batch-first padded
    view [B, T, H] (columns contiguous)."""
    if t.dim() == 2:
        return (t.data_ptr(), t.stride(0), 0, 0, False)
    return (t.data_ptr(), 0, t.stride(0), t.stride(1), True)


def _p(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class ExtKernel:
    """The C++ recurrence (csrc/cpu/lstm_cpu.cpp); float32 (AVX2 at run time) and float64.

    fused_input: the kernel reads the layer input x itself and applies W_ih inside the recurrence tile
    (K = E + H per step) instead of a separate x W_ih^T GEMM: on this CPU that was 30-40% faster than
    MKL's K = 64..128 GEMM plus the [N, 4H] round trip, and layer 0 needs no packing copy."""
    padded_io = True
    fused_input = True

    def __init__(self):
        self.m = _ext.cpu()

    def pack(self, w: Tensor, kind: str, H: int) -> Tensor:
        w = w.detach().contiguous()
        K = w.shape[1]
        dst = torch.empty(self.m.lstm_packed_numel(kind, H, K), dtype=w.dtype)
        self.m.lstm_pack(DTYPE_CODES[w.dtype], kind, w.data_ptr(), K, H, K, dst.data_ptr())
        return dst

    def forward(self, plan: Plan, H: int, reverse: bool, xproj: Optional[Tensor], whh: Tensor, h0, c0, out: Tensor,
                zero_padding: bool, gates_ws, c_ws, h_n, c_n, whh_packed: Optional[Tensor] = None,
                x_in: Optional[Tensor] = None, w_ih: Optional[Tensor] = None, bias: Optional[Tensor] = None):
        """Gate input: xproj [N, 4H] view, or (x_in: packed [N, E] or batch-first padded [B, T, E] view,
        w_ih [4H, E], bias [4H] or None)."""
        wp = whh_packed if whh_packed is not None else self.pack(whh, "fwd", H)
        if x_in is not None:
            wi = self.pack(w_ih, "fwd", H)
            b = bias.detach().contiguous() if bias is not None else None
            wih = w_ih.detach()
            self.m.lstm_forward(DTYPE_CODES[x_in.dtype], torch.get_num_threads(), H, reverse, plan.desc, None,
                                _mat(x_in), x_in.shape[-1], wi.data_ptr(), _p(b), [], wp.data_ptr(), _p(h0), _p(c0),
                                _mat(out), zero_padding, _p(gates_ws), _p(c_ws), _p(h_n), _p(c_n),
                                whh_raw=_raw(whh), wih_raw=_raw(wih))
            return
        self.m.lstm_forward(DTYPE_CODES[xproj.dtype], torch.get_num_threads(), H, reverse, plan.desc, _mat(xproj),
                            None, 0, 0, 0, [], wp.data_ptr(), _p(h0), _p(c0), _mat(out), zero_padding, _p(gates_ws),
                            _p(c_ws), _p(h_n), _p(c_n), whh_raw=_raw(whh))

    def backward(self, plan: Plan, H: int, reverse: bool, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out, h0, c0,
                 whh: Tensor, dgates, hprev, dh0, dc0):
        wp = self.pack(whh, "bwd", H)
        self.m.lstm_backward(DTYPE_CODES[dgates.dtype], torch.get_num_threads(), H, reverse, plan.desc,
                             None if grad_out is None else _mat(grad_out), _p(grad_hn), _p(grad_cn), _p(gates_ws),
                             _p(c_ws), _mat(out), _p(h0), _p(c0), wp.data_ptr(), _p(dgates), _p(hprev), _p(dh0),
                             _p(dc0), hprev.stride(0) if hprev is not None else 0)


class CudaKernel:
    """The CUDA recurrence (csrc/cuda/lstm_cuda.cu): the fused persistent kernel when H <= 256 and its grid
    fits on the device at once, else per step a cuBLAS GEMM through torch + one fused pointwise kernel.
    float32, float64, bfloat16 (state kept in float32/float64)."""
    padded_io = False
    CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}

    def __init__(self):
        self.m = _ext.cuda()

    @staticmethod
    def _plan_args(plan: Plan, device):
        dev = device_plan(plan, device)[:4]
        args = dict(lengths=dev[0].data_ptr(), perm=dev[1].data_ptr(), batch_sizes=dev[2].data_ptr(),
                    offsets=dev[3].data_ptr(), B=plan.B, maxlen=plan.maxlen,
                    n0=int(plan.batch_sizes[0]) if plan.maxlen > 0 else 0,
                    stream=torch.cuda.current_stream(device).cuda_stream)
        return args, dev

    # The kernels launch on the current device: make it the tensors' device (a model on cuda:1 while
    # cuda:0 is current would otherwise launch into another device's stream).
    def forward(self, plan: Plan, H: int, reverse: bool, xproj: Tensor, *args, **kwargs):
        with torch.cuda.device(xproj.device):
            return self._forward(plan, H, reverse, xproj, *args, **kwargs)

    def backward(self, plan: Plan, H: int, reverse: bool, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out: Tensor,
                 *args):
        with torch.cuda.device(out.device):
            return self._backward(plan, H, reverse, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out, *args)

    def _forward(self, plan: Plan, H: int, reverse: bool, xproj: Tensor, whh: Tensor, h0, c0, out: Tensor,
                 zero_padding: bool, gates_ws, c_ws, h_n, c_n, whh_packed: Optional[Tensor] = None):
        dev = xproj.device
        acc = torch.float64 if xproj.dtype == torch.float64 else torch.float32
        B = plan.B
        sa, sb, sc = (torch.empty(B, H, dtype=acc, device=dev) for _ in range(3))
        whh = whh.contiguous()
        args, keep = self._plan_args(plan, dev)
        args.update(H=H, reverse=reverse, xproj=xproj.data_ptr(), ldx=xproj.stride(0), whh=whh.data_ptr(),
                    h0=_p(h0), c0=_p(c0), out=out.data_ptr(), ldo=out.stride(0), gates_ws=_p(gates_ws),
                    c_ws=_p(c_ws), h_n=h_n.data_ptr(), c_n=c_n.data_ptr(), state_a=sa.data_ptr(),
                    state_b=sb.data_ptr(), state_c=sc.data_ptr(), hw=0, s=0, n=0, swap=False, mode="init")
        code = self.CODES[xproj.dtype]
        self.m.lstm_forward(code, args)
        args["mode"] = "fused"
        if not self.m.lstm_forward(code, args):
            whhT = whh.t().to(acc)
            bs = plan.batch_sizes.tolist()
            for s in range(plan.maxlen):
                prev = sb if s % 2 else sa
                hw = prev[:bs[s]] @ whhT
                args.update(mode="step", s=s, n=bs[s], swap=bool(s % 2), hw=hw.data_ptr())
                self.m.lstm_forward(code, args)
        args["mode"] = "finish"
        self.m.lstm_forward(code, args)
        del keep

    def _backward(self, plan: Plan, H: int, reverse: bool, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out, h0, c0,
                  whh: Tensor, dgates, hprev, dh0, dc0):
        dev = dgates.device
        acc = torch.float64 if dgates.dtype == torch.float64 else torch.float32
        B = plan.B
        dg, dg2 = (torch.empty(B, 4 * H, dtype=acc, device=dev) for _ in range(2))
        dcs = torch.empty(B, H, dtype=acc, device=dev)
        dh0_from = torch.empty(B, H, dtype=acc, device=dev)
        whh = whh.contiguous()
        args, keep = self._plan_args(plan, dev)
        args.update(H=H, reverse=reverse, grad_out=_p(grad_out), ldg=grad_out.stride(0) if grad_out is not None else 0,
                    grad_hn=_p(grad_hn), grad_cn=_p(grad_cn), gates_ws=gates_ws.data_ptr(), c_ws=c_ws.data_ptr(),
                    out=out.data_ptr(), ldo=out.stride(0), h0=_p(h0), c0=_p(c0), whh=whh.data_ptr(),
                    dgates=dgates.data_ptr(), hprev=_p(hprev), dh0=_p(dh0), dc0=_p(dc0), state_dg=dg.data_ptr(),
                    state_dg2=dg2.data_ptr(), state_dc=dcs.data_ptr(), dhw=0, dh0_from=dh0_from.data_ptr(),
                    s=0, n=0, n_next=0, mode="init")
        code = self.CODES[dgates.dtype]
        self.m.lstm_backward(code, args)
        args["mode"] = "fused"
        if not self.m.lstm_backward(code, args):
            w = whh.to(acc)
            bs = plan.batch_sizes.tolist()
            for s in reversed(range(plan.maxlen)):
                n_next = bs[s + 1] if s + 1 < plan.maxlen else 0
                dhw = dg[:n_next] @ w if n_next else dh0_from
                args.update(mode="step", s=s, n=bs[s], n_next=n_next, dhw=dhw.data_ptr())
                self.m.lstm_backward(code, args)
            n0 = args["n0"]
            if n0:
                torch.mm(dg[:n0], w, out=dh0_from[:n0])
        args["mode"] = "finish"
        self.m.lstm_backward(code, args)
        del keep


# ---------------------------------------------------------------- the driver
def _dims(x: Tensor, batch_first: bool):
    return (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])


def _bf(t: Tensor, batch_first: bool) -> Tensor:
    """Batch-first view of a padded tensor."""
    return t if batch_first else t.transpose(0, 1)


def packed_ws_shapes(padded_io: bool, B: int, T: int, E: int, H: int, num_layers: int, dirs: int, dropout_active: bool,
              need_ws: bool) -> List[List[int]]:
    if not need_ws:
        return []
    M = B * T
    shapes = []
    for _layer in range(num_layers):
        for _d in range(dirs):
            shapes += [[M, 4 * H], [M, H]]
    n_out = num_layers - 1 if padded_io else num_layers
    shapes += [[M, dirs * H] for _ in range(n_out)]
    if dropout_active:
        shapes += [[M, dirs * H] for _ in range(num_layers - 1)]
    return shapes


def _split_ws(ws: List[Tensor], padded_io: bool, num_layers: int, dirs: int, dropout_active: bool):
    k = 0
    cells = []
    for _layer in range(num_layers):
        row = []
        for _d in range(dirs):
            row.append((ws[k], ws[k + 1]))
            k += 2
        cells.append(row)
    n_out = num_layers - 1 if padded_io else num_layers
    outs = ws[k:k + n_out]
    k += n_out
    masks = ws[k:k + num_layers - 1] if dropout_active else []
    return cells, outs, masks


def _input_projection(src: Tensor, layer_w, has_bias: bool) -> Tensor:
    """src [N, in] @ [W_ih of every direction]^T (+ b_ih + b_hh) -> [N, dirs*4H], one GEMM. W^T is made
    contiguous first: MKL has pathological cases for the transposed view (a [5, 6] @ [6, 24] float64
    product took 12 ms) and is never slower this way."""
    wT = torch.cat([w[0] for w in layer_w]).t().contiguous() if len(layer_w) > 1 else layer_w[0][0].t().contiguous()
    if has_bias:
        b = torch.cat([w[2] + w[3] for w in layer_w]) if len(layer_w) > 1 else layer_w[0][2] + layer_w[0][3]
        return torch.addmm(b, src, wT)
    return src @ wT


def packed_forward(kernel, x: Tensor, lengths: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                   weights: List[Tensor], has_bias: bool, num_layers: int, bidirectional: bool, batch_first: bool,
                   dropout: float, training: bool, need_ws: bool, packed_whh: Optional[List[Tensor]] = None):
    x = x.contiguous()
    B, T = _dims(x, batch_first)
    E = x.shape[2]
    dirs = 2 if bidirectional else 1
    H = weights[1].shape[1]
    M = B * T
    dropout_active = dropout > 0 and training and num_layers > 1
    lw = layer_weights(weights, has_bias, num_layers, dirs)
    plan = make_plan(lengths, B, T, batch_first)
    N = plan.N
    shapes = packed_ws_shapes(kernel.padded_io, B, T, E, H, num_layers, dirs, dropout_active, True)
    ws = [_empty(s, x) for s in shapes]
    for w in ws:  # rows past N are never read; keep the op's outputs deterministic
        w[plan.N:].zero_()
    cells, louts, masks = _split_ws(ws, kernel.padded_io, num_layers, dirs, dropout_active)
    h_n = x.new_empty(num_layers * dirs, B, H)
    c_n = x.new_empty(num_layers * dirs, B, H)
    out = _empty((B, T, dirs * H) if batch_first else (T, B, dirs * H), x)   # pooled on the CPU: no page faults
    if N == 0:
        out.zero_()
        h_n.copy_(h0) if h0 is not None else h_n.zero_()
        c_n.copy_(c0) if c0 is not None else c_n.zero_()
        return out, h_n, c_n, (ws if need_ws else [])
    h0 = h0.contiguous() if h0 is not None else None
    c0 = c0.contiguous() if c0 is not None else None
    pidx = device_plan(plan, x.device)[4]
    fused_in = getattr(kernel, "fused_input", False)
    layer_in = _bf(x, batch_first) if fused_in else x.reshape(M, E).index_select(0, pidx)
    for layer in range(num_layers):
        top = layer == num_layers - 1
        xproj = None if fused_in else _input_projection(layer_in, lw[layer], has_bias)
        direct = top and kernel.padded_io
        lo = None if direct else louts[layer][:N]
        for d in range(dirs):
            k = layer * dirs + d
            g_ws, cc_ws = (cells[layer][d][0][:N], cells[layer][d][1][:N]) if need_ws else (None, None)
            target = _bf(out, batch_first)[..., d * H:(d + 1) * H] if direct else lo[:, d * H:(d + 1) * H]
            common = dict(whh_packed=None if packed_whh is None else packed_whh[k])
            if fused_in:
                w_ih, _, b_ih, b_hh = lw[layer][d]
                common.update(x_in=layer_in, w_ih=w_ih, bias=(b_ih + b_hh) if has_bias else None)
            kernel.forward(plan, H, d == 1, None if fused_in else xproj[:, d * 4 * H:(d + 1) * 4 * H],
                           lw[layer][d][1], None if h0 is None else h0[k], None if c0 is None else c0[k], target,
                           direct, g_ws, cc_ws, h_n[k], c_n[k], **common)
        if not top:
            layer_in = lo
            if dropout_active:
                mask = masks[layer][:N]
                mask.bernoulli_(1 - dropout).div_(1 - dropout)
                layer_in = lo * mask
        elif not direct:
            out.view(M, dirs * H).zero_().index_copy_(0, pidx, lo)
    return out, h_n, c_n, (ws if need_ws else [])


def packed_backward(kernel, grad_out: Tensor, grad_hn: Optional[Tensor], grad_cn: Optional[Tensor], x: Tensor,
                    lengths: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: List[Tensor],
                    has_bias: bool, out: Tensor, ws: List[Tensor], num_layers: int, bidirectional: bool,
                    batch_first: bool, dropout: float):
    x = x.contiguous()
    B, T = _dims(x, batch_first)
    E = x.shape[2]
    dirs = 2 if bidirectional else 1
    H = weights[1].shape[1]
    M = B * T
    dropout_active = dropout > 0 and num_layers > 1 and len(ws) > len(packed_ws_shapes(kernel.padded_io, B, T, E, H,
                                                                                  num_layers, dirs, False, True))
    lw = layer_weights(weights, has_bias, num_layers, dirs)
    cells, louts, masks = _split_ws(ws, kernel.padded_io, num_layers, dirs, dropout_active)
    plan = make_plan(lengths, B, T, batch_first)
    N = plan.N
    per = 4 if has_bias else 2
    gw: List[Optional[Tensor]] = [None] * len(weights)
    grad_h0 = x.new_empty(num_layers * dirs, B, H)
    grad_c0 = x.new_empty(num_layers * dirs, B, H)
    if N == 0:
        for i, w in enumerate(weights):
            gw[i] = torch.zeros_like(w)
        grad_h0.copy_(grad_hn) if grad_hn is not None else grad_h0.zero_()
        grad_c0.copy_(grad_cn) if grad_cn is not None else grad_c0.zero_()
        return torch.zeros_like(x), grad_h0, grad_c0, gw
    h0 = h0.contiguous() if h0 is not None else None
    c0 = c0.contiguous() if c0 is not None else None
    grad_hn = grad_hn.contiguous() if grad_hn is not None else None
    grad_cn = grad_cn.contiguous() if grad_cn is not None else None
    pidx = device_plan(plan, x.device)[4]
    go_packed = None
    if grad_out is not None:
        grad_out = grad_out.contiguous()
        if not kernel.padded_io:
            go_packed = grad_out.reshape(M, dirs * H).index_select(0, pidx)
    g_above = None
    grad_x = None
    merged = kernel.padded_io   # the C++ CPU kernel writes hprev with a row stride
    for layer in reversed(range(num_layers)):
        top = layer == num_layers - 1
        if layer == 0:
            xin = torch.index_select(x.reshape(M, E), 0, pidx, out=_empty((N, E), x))
        else:
            xin = louts[layer - 1][:N]
            if dropout_active:
                xin = xin * masks[layer - 1][:N]
        dx = None
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh = lw[layer][d][0], lw[layer][d][1]
            cols = slice(d * H, (d + 1) * H)
            if top:
                if grad_out is None:
                    go = None
                elif kernel.padded_io:
                    go = _bf(grad_out, batch_first)[..., cols]
                else:
                    go = go_packed[:, cols]
                fo = _bf(out, batch_first)[..., cols] if kernel.padded_io else louts[layer][:N, cols]
            else:
                go = g_above[:, cols]
                fo = louts[layer][:N, cols]
            dg = _empty((N, 4 * H), x)
            if merged:
                # [x | hprev | 1] side by side (the kernel writes hprev into its columns): the weight and bias
                # gradients are one GEMM, dgates^T [x | hprev | 1], instead of two GEMMs and a column sum
                # (each GEMM packed the [N, 4H] dgates again; ~8-10% less time on the Taobao-mix training step)
                Ein = xin.shape[1]
                xh = _empty((N, Ein + H + 1), x)
                xh[:, :Ein].copy_(xin)
                xh[:, Ein + H].fill_(1.0)
                hp = xh[:, Ein:Ein + H]
            else:
                hp = _empty((N, H), x)
            kernel.backward(plan, H, d == 1, go, None if grad_hn is None else grad_hn[k],
                            None if grad_cn is None else grad_cn[k], cells[layer][d][0][:N], cells[layer][d][1][:N], fo,
                            None if h0 is None else h0[k], None if c0 is None else c0[k], w_hh, dg, hp, grad_h0[k],
                            grad_c0[k])
            gt = dg.t()
            if merged:
                gm = gt @ (xh if has_bias else xh[:, :Ein + H])
                gw[k * per] = gm[:, :Ein].contiguous()
                gw[k * per + 1] = gm[:, Ein:Ein + H].contiguous()
                if has_bias:
                    gw[k * per + 2] = gm[:, Ein + H].contiguous()
                    gw[k * per + 3] = gw[k * per + 2].clone()
            else:
                gw[k * per] = gt @ xin
                gw[k * per + 1] = gt @ hp
                if has_bias:
                    gb = dg.sum(0)
                    gw[k * per + 2] = gb
                    gw[k * per + 3] = gb.clone()
            dx = dg @ w_ih if dx is None else dx.addmm_(dg, w_ih)
        if layer > 0:
            g_above = dx * masks[layer - 1][:N] if dropout_active else dx
        else:
            grad_x = _empty((M, E), x).zero_().index_copy_(0, pidx, dx).view(x.shape)
    return grad_x, grad_h0, grad_c0, gw


# ---------------------------------------------------------------- backend entry points (contract: reference_lstm)
_KERNEL: Optional[ExtKernel] = None
_CUDA_KERNEL: Optional[CudaKernel] = None


def kernel() -> ExtKernel:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = ExtKernel()
    return _KERNEL


def cuda_kernel() -> CudaKernel:
    global _CUDA_KERNEL
    if _CUDA_KERNEL is None:
        _CUDA_KERNEL = CudaKernel()
    return _CUDA_KERNEL


def _kernel_for(device: torch.device):
    return cuda_kernel() if device.type == "cuda" else kernel()


def _cpu_upcast(x: Tensor) -> bool:
    """bfloat16/float16 on the CPU run in float32 (no half arithmetic there) and are cast back."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _f32(t):
    return None if t is None else t.float()


def forward(x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional, batch_first, dropout, training,
            need_ws):
    if _cpu_upcast(x):
        out, h_n, c_n, ws = forward(x.float(), lengths, _f32(h0), _f32(c0), [w.float() for w in weights], has_bias,
                                    num_layers, bidirectional, batch_first, dropout, training, need_ws)
        return out.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype), [w.to(x.dtype) for w in ws]
    return packed_forward(_kernel_for(x.device), x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional,
                          batch_first, dropout, training, need_ws)


def backward(grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, has_bias, out, ws, num_layers, bidirectional,
             batch_first, dropout):
    if _cpu_upcast(x):
        gx, gh, gc, gw = backward(_f32(grad_out), _f32(grad_hn), _f32(grad_cn), x.float(), lengths, _f32(h0), _f32(c0),
                                  [w.float() for w in weights], has_bias, out.float(), [w.float() for w in ws],
                                  num_layers, bidirectional, batch_first, dropout)
        return gx.to(x.dtype), gh.to(x.dtype), gc.to(x.dtype), [g.to(x.dtype) for g in gw]
    return packed_backward(_kernel_for(x.device), grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, has_bias,
                           out, ws, num_layers, bidirectional, batch_first, dropout)


def ws_shapes(B, T, E, H, num_layers, dirs, dropout_active, need_ws, device: str = "cpu"):
    padded_io = CudaKernel.padded_io if device == "cuda" else ExtKernel.padded_io
    return packed_ws_shapes(padded_io, B, T, E, H, num_layers, dirs, dropout_active, need_ws)


# ---------------------------------------------------------------- inference fast paths (no autograd, CPU)
def _tables_desc(tables: List[Tensor], ids_bt: List[Tensor]):
    """(table ptr, V, ids ptr, ids is int64, stride b, stride t) per field; ids_bt are [B, T] views."""
    return [(tab.data_ptr(), tab.shape[0], ids.data_ptr(), ids.dtype == torch.int64, ids.stride(0), ids.stride(1))
            for tab, ids in zip(tables, ids_bt)]


def infer(x: Optional[Tensor], tables, ids_bt, lengths: Optional[Tensor], B: int, T: int, dtype: torch.dtype,
          h0: Optional[Tensor], c0: Optional[Tensor], H: int, num_layers: int, bidirectional: bool,
          batch_first: bool, ptrs: tuple):
    """Whole-sequence inference on the C++ kernels: the whole stack (plan, projections, every layer and
    direction) in one native call, no workspace kept (csrc/cpu/lstm_cpu.cpp, lstm_infer).

    Layer 0 reads projected tables when given (tables[d][f] [V_f, 4H] per direction and field, ids_bt
    [B, T] views per field), otherwise x through the packed W_ih; ptrs = serving_pointers(...) (packed
    W_hh, packed W_ih, folded biases per layer and direction, cached by the module). lengths: int64
    [B] on the CPU or None (all T).
    """
    m = kernel().m
    dirs = 2 if bidirectional else 1
    # the output from the pool: a buffer the caller has dropped is handed out again instead of being
    # page-faulted in afresh on every call (see WorkspacePool)
    out = POOL.empty((B, T, dirs * H) if batch_first else (T, B, dirs * H), dtype)
    h_n = torch.empty(num_layers * dirs, B, H, dtype=dtype)
    c_n = torch.empty(num_layers * dirs, B, H, dtype=dtype)
    outv = _bf(out, batch_first)
    x_desc, E, tabs = None, 0, []
    if x is not None:
        if x.stride(-1) != 1:
            x = x.contiguous()
        xb = _bf(x, batch_first)
        x_desc, E = (xb.data_ptr(), 0, xb.stride(0), xb.stride(1), True), x.shape[-1]
    else:
        tabs = [_tables_desc(tables[d], ids_bt) for d in range(dirs)]
    if lengths is not None:
        lengths = lengths.to(dtype=torch.int64).contiguous()
    h0 = h0.contiguous() if h0 is not None else None
    c0 = c0.contiguous() if c0 is not None else None
    m.lstm_infer(DTYPE_CODES[dtype], torch.get_num_threads(), B, T, H, num_layers, dirs, batch_first,
                 _p(lengths), x_desc, E, tabs, ptrs[0], ptrs[1], ptrs[2], _p(h0), _p(c0),
                 (outv.data_ptr(), 0, outv.stride(0), outv.stride(1), True), h_n.data_ptr(), c_n.data_ptr(),
                 _PROJECT_FIRST_BELOW, ptrs[4], ptrs[5])
    return out, (h_n, c_n)


def serving_pointers(packed_whh: List[Tensor], packed_x, whh: List[Tensor], wih: List[Tensor]) -> tuple:
    """Per-(layer, direction) pointer lists for `step` and `infer` (computed once per weight version by the
    module): packed W_hh, packed W_ih, folded biases, the tensors kept alive while the pointers are
    held, and the row-major W_hh / W_ih for the BLAS path."""
    return ([p.data_ptr() for p in packed_whh], [p[0].data_ptr() for p in packed_x],
            [0 if p[1] is None else p[1].data_ptr() for p in packed_x], (packed_whh, packed_x, whh, wih),
            [_raw(w) for w in whh], [_raw(w) for w in wih])


def step(x_t: Optional[Tensor], tables, ids, h: Tensor, c: Tensor, ptrs: tuple, H: int):
    """One step of a unidirectional stack for B users: x_t [B, E] or (tables [V_f, 4H] per field, ids
    [B] per field); h, c [num_layers, B, H]; ptrs from serving_pointers -> (h_top [B, H], (h', c'))."""
    m = kernel().m
    L, B = h.shape[0], h.shape[1]
    if not h.is_contiguous():
        h = h.contiguous()
    if not c.is_contiguous():
        c = c.contiguous()
    h_new = torch.empty_like(h)
    c_new = torch.empty_like(c)
    lstride = B * H * h.element_size()
    hp, cp, hn, cn = h.data_ptr(), c.data_ptr(), h_new.data_ptr(), c_new.data_ptr()
    if tables is not None:
        xd, E0 = None, 0
        tabs = [(t.data_ptr(), t.shape[0], i.data_ptr(), i.dtype == torch.int64, i.stride(0), 0)
                for t, i in zip(tables, ids)]
    else:
        if x_t.stride(-1) != 1:
            x_t = x_t.contiguous()
        xd, E0, tabs = (x_t.data_ptr(), x_t.stride(0), 0, 0, False), x_t.shape[1], []
    if L == 1:
        hl, cl, hnl, cnl = [hp], [cp], [hn], [cn]
    else:
        r = range(L)
        hl, cl = [hp + i * lstride for i in r], [cp + i * lstride for i in r]
        hnl, cnl = [hn + i * lstride for i in r], [cn + i * lstride for i in r]
    m.lstm_step(DTYPE_CODES[h.dtype], torch.get_num_threads(), B, H, xd, E0, tabs, ptrs[0], ptrs[1], ptrs[2],
                hl, cl, hnl, cnl)
    return h_new[L - 1], (h_new, c_new)
