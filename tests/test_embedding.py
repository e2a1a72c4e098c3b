"""Embedding / EmbeddingBag: parity with torch on every backend the dispatcher says can run here,
float64 gradcheck, fused optimizers against torch's optimizers, determinism, edge cases, bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF

import fastinterest.nn as fnn
import fastinterest.optim as fopt
from fastinterest import _dispatch
from fastinterest.ops.embedding import embedding_bag

from fi_testing import assert_close

warnings.filterwarnings("ignore", message="Sparse invariant checks")

ALL = ["ext", "numba", "triton", "reference"]


def backends(dtype=torch.float32):
    out = []
    for b in ALL:
        why = _dispatch.why_not("embedding_bag", b, "cpu", dtype)
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=why)) if why else b)
    return out


def make_case(V=50, D=16, B=7, seed=0, idx_dtype=torch.int64, empty=True, dup=True):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 6, (B,), generator=g)
    if empty:
        sizes[1] = 0  # an empty bag
    N = int(sizes.sum())
    idx = torch.randint(0, V, (N,), generator=g)
    if dup and N > 3:
        idx[2] = idx[1]  # duplicate inside one bag
        idx[-1] = idx[0]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    return idx.to(idx_dtype), offsets.to(idx_dtype)


# ---------------------------------------------------------------- forward + backward parity
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_bag_parity_with_torch(backend, mode, padding_idx, idx_dtype):
    V, D = 50, 16 if backend != "triton" else 32
    idx, offsets = make_case(V, D, idx_dtype=idx_dtype)
    if padding_idx is not None:
        idx[0] = padding_idx
    ref = torch.nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx)
    ours = fnn.EmbeddingBag.from_torch(ref, backend=backend)
    out_ref = ref(idx.long(), offsets.long())
    out = ours(idx, offsets)
    assert_close(out, out_ref)
    g = torch.randn_like(out_ref)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("backend", backends())
def test_per_sample_weights_and_their_gradient(backend):
    V, D = 40, 32
    idx, offsets = make_case(V, D, seed=1)
    psw = torch.rand(idx.numel(), requires_grad=True)
    psw_ref = psw.detach().clone().requires_grad_(True)
    ref = torch.nn.EmbeddingBag(V, D, mode="sum")
    ours = fnn.EmbeddingBag.from_torch(ref, backend=backend)
    a = ours(idx, offsets, per_sample_weights=psw)
    b = ref(idx, offsets, per_sample_weights=psw_ref)
    assert_close(a, b)
    g = torch.randn_like(b)
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert_close(ours.weight.grad, ref.weight.grad)
    assert_close(psw.grad, psw_ref.grad)


@pytest.mark.parametrize("backend", backends())
def test_two_d_input_and_include_last_offset(backend):
    V, D = 30, 16
    ref = torch.nn.EmbeddingBag(V, D, mode="mean")
    ours = fnn.EmbeddingBag.from_torch(ref, backend=backend)
    x = torch.randint(0, V, (5, 4))
    assert_close(ours(x), ref(x))
    idx, offsets = make_case(V, D, seed=3)
    ref2 = torch.nn.EmbeddingBag(V, D, mode="sum", include_last_offset=True)
    ours2 = fnn.EmbeddingBag.from_torch(ref2, backend=backend)
    off_last = torch.cat([offsets, torch.tensor([idx.numel()])])
    assert_close(ours2(idx, off_last), ref2(idx, off_last))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_parity_and_padding_gradient(backend, padding_idx):
    V, D = 20, 16
    ref = torch.nn.Embedding(V, D, padding_idx=padding_idx)
    with torch.no_grad():
        ref.weight.add_(1.0)  # padding row non-zero: forward must still return it as stored
    ours = fnn.Embedding.from_torch(ref, backend=backend)
    x = torch.randint(0, V, (3, 5))
    x[0, 0] = 0
    x[1, 1] = x[0, 1]  # duplicates
    a, b = ours(x), ref(x)
    assert a.shape == (3, 5, D)
    assert_close(a, b)
    g = torch.randn_like(b)
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("backend", backends())
def test_sparse_gradient_matches_torch(backend):
    V, D = 30, 16
    idx, offsets = make_case(V, D, seed=5)
    ref = torch.nn.EmbeddingBag(V, D, mode="sum", sparse=True)
    ours = fnn.EmbeddingBag.from_torch(ref, backend=backend)
    assert ours.sparse
    g = torch.randn(offsets.numel(), D)
    (ours(idx, offsets) * g).sum().backward()
    (ref(idx, offsets) * g).sum().backward()
    assert ours.weight.grad.is_sparse
    assert_close(ours.weight.grad.to_dense(), ref.weight.grad.to_dense())


@pytest.mark.parametrize("backend", [b for b in backends(torch.float64)])
def test_gradcheck_float64(backend):
    V, D = 12, 5 if backend != "triton" else 16
    idx, offsets = make_case(V, D, B=4, seed=7)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    psw = torch.rand(idx.numel(), dtype=torch.float64, requires_grad=True)
    for mode in ("sum", "mean", "max"):
        fn = (lambda w, p: embedding_bag(w, idx, offsets, "sum", per_sample_weights=p, backend=backend)) \
            if mode == "sum" else (lambda w, p, m=mode: embedding_bag(w, idx, offsets, m, backend=backend) + 0 * p.sum())
        assert torch.autograd.gradcheck(fn, (w, psw), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- half-precision rows
@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_half_rows_accumulate_in_float32(backend, wdtype):
    if _dispatch.why_not("embedding_bag", backend, "cpu", wdtype):
        pytest.skip(_dispatch.why_not("embedding_bag", backend, "cpu", wdtype))
    V, D = 40, 24
    idx, offsets = make_case(V, D, seed=9)
    w = torch.randn(V, D)
    ours = fnn.EmbeddingBag(V, D, mode="sum", _weight=w, weight_dtype=wdtype, backend=backend)
    assert ours.weight.dtype == wdtype
    out = ours(idx, offsets)
    assert out.dtype == torch.float32
    # exact oracle: the same rounded rows summed in float64
    expect = TF.embedding_bag(idx, ours.weight.detach().double(), offsets, mode="sum")
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


# The C++ forward compiles the common widths (16, 32, 64, 128) as their own kernels and handles every
# other width with a runtime stride (blocks of 64 and 8 columns, then a scalar tail): check each shape
# of that block structure, every storage type, with and without per-sample weights and padding_idx,
# against the same rows summed in float64. The bags are long enough to exercise the prefetch that
# reaches into the next bags.
@pytest.mark.parametrize("backend", ["ext", "numba"])
@pytest.mark.parametrize("D", [1, 3, 7, 8, 16, 20, 32, 40, 64, 72, 77, 128, 136, 203])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B", [9, 300])   # 300 bags: more than 2048 indices, the threaded path
def test_forward_every_width_and_storage(backend, D, wdtype, idx_dtype, B):
    if _dispatch.why_not("embedding_bag", backend, "cpu", wdtype):
        pytest.skip(_dispatch.why_not("embedding_bag", backend, "cpu", wdtype))
    V = 300
    g = torch.Generator().manual_seed(D)
    sizes = torch.randint(0, 40, (B,), generator=g)
    sizes[3] = 0
    sizes[5] = 4
    idx = torch.randint(0, V, (int(sizes.sum()),), generator=g)
    idx[::7] = 5  # padding_idx occurrences
    first5 = int(sizes[:5].sum())
    idx[first5:first5 + 4] = 5  # bag 5: padding only (mean of nothing = 0)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    psw = torch.rand(idx.numel(), generator=g) + 0.5
    w = torch.randn(V, D, generator=g)
    for mode, padding_idx, p in [("sum", None, None), ("sum", 5, None), ("sum", None, psw), ("sum", 5, psw),
                                 ("mean", None, None), ("mean", 5, None)]:
        ours = fnn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx, _weight=w, weight_dtype=wdtype,
                                backend=backend)
        with torch.no_grad():
            out = ours(idx.to(idx_dtype), offsets.to(idx_dtype), per_sample_weights=p)
        rows = ours.weight.detach().double()
        if padding_idx is not None:
            rows[padding_idx] = 0.0
        expect = TF.embedding_bag(idx, rows, offsets, mode="sum", per_sample_weights=None if p is None else p.double())
        if mode == "mean":
            kept = torch.zeros(B, dtype=torch.float64).index_add_(
                0, torch.repeat_interleave(torch.arange(B), sizes), (idx != (padding_idx if padding_idx is not None
                                                                            else -1)).double())
            expect = expect / kept.clamp(min=1).unsqueeze(1)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5,
                                   msg=f"{mode} padding_idx={padding_idx} psw={p is not None}")


# ---------------------------------------------------------------- fused optimizers
TORCH_OPT = {
    "sgd": (lambda: fopt.FusedSGD(lr=0.3), lambda p: torch.optim.SGD(p, lr=0.3)),
    "adagrad": (lambda: fopt.FusedAdagrad(lr=0.3, eps=1e-10), lambda p: torch.optim.Adagrad(p, lr=0.3, eps=1e-10)),
    "adam": (lambda: fopt.FusedAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-8),
             lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.9), eps=1e-8)),
}


@pytest.mark.parametrize("backend", backends(torch.float64))
@pytest.mark.parametrize("name", list(TORCH_OPT))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_fused_optimizer_equals_torch_optimizer(backend, name, mode):
    V, D = 25, 16
    make_fused, make_torch = TORCH_OPT[name]
    # torch has no sparse gradient for mode max: the oracle takes the dense gradient's touched rows
    ref = torch.nn.EmbeddingBag(V, D, mode=mode, sparse=mode != "max", dtype=torch.float64, padding_idx=2)
    ours = fnn.EmbeddingBag.from_torch(ref, backend=backend, fused_optimizer=make_fused(), sparse=False)
    topt = make_torch(list(ref.parameters()))
    for step in range(4):
        idx, offsets = make_case(V, D, seed=100 + step)  # duplicates and an empty bag in each step
        idx[3 % idx.numel()] = 2
        g = torch.randn(offsets.numel(), D, dtype=torch.float64)
        topt.zero_grad()
        (ref(idx, offsets) * g).sum().backward()
        if mode == "max":
            rows = torch.unique(idx[idx != 2])
            ref.weight.grad = torch.sparse_coo_tensor(rows[None], ref.weight.grad[rows], (V, D))
        topt.step()
        (ours(idx, offsets) * g).sum().backward()
        assert ours.weight.grad is None
        torch.testing.assert_close(ours.weight.detach(), ref.weight.detach(), atol=1e-12, rtol=1e-12)
    state = ours.state_dict()
    assert "weight" in state and any(k.startswith("optim_") for k in state) or name == "sgd"


@pytest.mark.parametrize("backend", backends(torch.float64))
def test_rowwise_adagrad_formula(backend):
    V, D, lr, eps = 20, 16, 0.2, 1e-8
    w0 = torch.randn(V, D, dtype=torch.float64)
    ours = fnn.EmbeddingBag(V, D, mode="sum", _weight=w0.clone(), dtype=torch.float64, backend=backend,
                            fused_optimizer=fopt.FusedRowWiseAdagrad(lr=lr, eps=eps))
    w, acc = w0.clone(), torch.zeros(V, dtype=torch.float64)
    for step in range(3):
        idx, offsets = make_case(V, D, seed=200 + step)
        g = torch.randn(offsets.numel(), D, dtype=torch.float64)
        (ours(idx, offsets) * g).sum().backward()
        # oracle: dense gradient from torch, then FBGEMM's row-wise rule on the touched rows
        wt = w.clone().requires_grad_(True)
        (TF.embedding_bag(idx, wt, offsets, mode="sum") * g).sum().backward()
        rows = torch.unique(idx)
        gr = wt.grad[rows]
        acc[rows] += (gr * gr).mean(1)
        w[rows] -= lr * gr / (acc[rows].sqrt() + eps)[:, None]
        torch.testing.assert_close(ours.weight.detach(), w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.optim_momentum, acc)


@pytest.mark.parametrize("backend", backends())
def test_fused_embedding_module(backend):
    V, D = 30, 16
    ref = torch.nn.Embedding(V, D, sparse=True, padding_idx=0)
    ours = fnn.Embedding.from_torch(ref, backend=backend, fused_optimizer=fopt.FusedSGD(lr=0.5))
    topt = torch.optim.SGD(ref.parameters(), lr=0.5)
    x = torch.randint(0, V, (4, 6))
    x[0, :3] = 7
    x[1, 0] = 0
    g = torch.randn(4, 6, D)
    (ref(x) * g).sum().backward()
    topt.step()
    (ours(x) * g).sum().backward()
    assert_close(ours.weight.detach(), ref.weight.detach())


def test_fused_optimizer_inactive_in_eval():
    m = fnn.EmbeddingBag(10, 4, mode="sum", fused_optimizer=fopt.FusedSGD(lr=1.0))
    m.eval()
    before = m.weight.detach().clone()
    m(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    assert torch.equal(m.weight.detach(), before)
    assert m.weight.grad is not None  # eval mode: plain dense gradient, no update


def test_state_dict_round_trip_with_torch():
    ref = torch.nn.EmbeddingBag(10, 4, mode="max", padding_idx=1)
    ours = fnn.EmbeddingBag(10, 4, mode="max", padding_idx=1, fused_optimizer=fopt.FusedAdam())
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.weight, ref.weight)
    assert set(ours.state_dict()) == {"weight", "optim_exp_avg", "optim_exp_avg_sq", "optim_step"}
    back = ours.to_torch()
    assert isinstance(back, torch.nn.EmbeddingBag) and back.mode == "max" and back.padding_idx == 1
    assert torch.equal(back.weight, ref.weight)
    plain = fnn.EmbeddingBag(10, 4, mode="max", padding_idx=1)
    assert list(plain.state_dict()) == list(ref.state_dict())


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", [b for b in ("ext", "numba") if not _dispatch.why_not("embedding_bag", b, "cpu",
                                                                                          torch.float32)])
def test_backward_bitwise_deterministic_across_threads(backend):
    V, D = 500, 32
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 40, (20000,), generator=g)  # heavy duplication
    offsets = torch.arange(0, 20000, 10)
    grad = torch.randn(offsets.numel(), D, generator=g)
    results = []
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 1, 2):
            torch.set_num_threads(nt)
            m = fnn.EmbeddingBag(V, D, mode="mean", _weight=torch.ones(V, D), backend=backend,
                                 fused_optimizer=fopt.FusedAdagrad(lr=0.1))
            m(idx, offsets).backward(grad)
            results.append(m.weight.detach().clone())
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert torch.equal(r, results[0])


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", backends())
def test_edge_cases(backend):
    V = 20
    D = 123 if backend != "triton" else 48
    ref = torch.nn.EmbeddingBag(V, D, mode="mean")
    ours = fnn.EmbeddingBag.from_torch(ref, backend=backend)
    # all bags empty
    idx = torch.empty(0, dtype=torch.long)
    off = torch.zeros(3, dtype=torch.long)
    out = ours(idx, off)
    assert out.shape == (3, D) and torch.count_nonzero(out) == 0
    # single bag, single index, odd D
    assert_close(ours(torch.tensor([4]), torch.tensor([0])), ref(torch.tensor([4]), torch.tensor([0])))
    # non-contiguous input
    x = torch.randint(0, V, (6, 4)).t()
    assert not x.is_contiguous()
    assert_close(ours(x), ref(x))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", backends())
def test_out_of_range_indices_raise(backend):
    m = fnn.EmbeddingBag(10, 16, mode="sum", backend=backend)
    with pytest.raises(IndexError, match=r"index 10 at position 2"):
        m(torch.tensor([1, 2, 10, 3]), torch.tensor([0, 2]))
    with pytest.raises(IndexError, match=r"index -1 at position 0"):
        m(torch.tensor([-1, 2]), torch.tensor([0]))
    e = fnn.Embedding(10, 16, backend=backend)
    with pytest.raises(IndexError, match="out of range"):
        e(torch.tensor([[0, 99]]))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
def test_bad_input_found_inside_the_kernel(backend, mode, itype):
    """The C++ kernel validates while it reads (no separate pass): every malformed input still raises the
    precise error, on the threaded path too, and never reads outside the table or the indices."""
    V, D, B, L = 50, 8, 300, 10   # N = 3000 >= the kernel's threading threshold
    m = fnn.EmbeddingBag(V, D, mode=mode, backend=backend)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (B * L,), generator=g).to(itype)
    off = torch.arange(0, B * L, L).to(itype)
    m(idx, off)   # valid
    bad = idx.clone()
    bad[2917] = V
    bad[2950] = -5
    with pytest.raises(IndexError, match=rf"index {V} at position 2917"):
        m(bad, off)
    tail = idx.clone()
    tail[-1] = 10 ** 6     # after the last offset with include_last_offset: never read, still invalid
    mi = fnn.EmbeddingBag(V, D, mode=mode, backend=backend, include_last_offset=True)
    with pytest.raises(IndexError, match="at position 2999"):
        mi(tail, torch.tensor([0, 5, 2000], dtype=itype))
    far = off.clone()
    far[150] = 2 ** 30 if itype == torch.int32 else 10 ** 12  # would read far past the indices
    with pytest.raises(ValueError, match="non-decreasing"):
        m(idx, far)
    with pytest.raises(ValueError, match="offsets end at"):
        mi(idx, torch.tensor([0, 5, 3001], dtype=itype))
    with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
        m(idx, off + 1)
    assert_close(m(idx, off), torch.nn.functional.embedding_bag(idx.long(), m.weight.detach(), off.long(), mode=mode))


def test_bad_offsets_and_types_raise():
    m = fnn.EmbeddingBag(10, 4, mode="sum")
    idx = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="non-decreasing"):
        m(idx, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="offsets end at"):
        fnn.EmbeddingBag(10, 4, mode="sum", include_last_offset=True)(idx, torch.tensor([0, 2, 9]))
    with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
        m(idx, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="int32 or int64"):
        m(idx.float(), torch.tensor([0]))
    with pytest.raises(TypeError, match="int32 or int64"):
        m(idx, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="per_sample_weights"):
        m(idx, torch.tensor([0]), per_sample_weights=torch.ones(3))
    with pytest.raises(ValueError, match="only supported for mode='sum'"):
        fnn.EmbeddingBag(10, 4, mode="mean")(idx, torch.tensor([0]), per_sample_weights=torch.ones(4))
    with pytest.raises(ValueError, match="offsets are required"):
        m(idx)
    with pytest.raises(NotImplementedError, match="max_norm"):
        fnn.Embedding(10, 4, max_norm=1.0)
    with pytest.raises(TypeError, match="fused_optimizer"):
        fnn.Embedding(10, 4, fused_optimizer="sgd")


def test_mixed_devices_raise():
    m = fnn.EmbeddingBag(10, 4, mode="sum")
    with pytest.raises(ValueError, match="is on meta but weight is on cpu"):
        m(torch.tensor([1, 2], device="meta"), torch.tensor([0], device="meta"))
    with pytest.raises(ValueError, match="is on meta but weight is on cpu"):
        fnn.Embedding(10, 4)(torch.tensor([1, 2], device="meta"))


def test_named_backend_that_cannot_run_raises_with_reasons():
    with pytest.raises(_dispatch.BackendError, match="other backends"):
        fnn.EmbeddingBag(10, 4, mode="sum", backend="numba", weight_dtype=torch.float16)(torch.tensor([1]),
                                                                                         torch.tensor([0]))
    with pytest.raises(_dispatch.BackendError, match="unknown backend"):
        fnn.EmbeddingBag(10, 4, mode="sum", backend="cuda-magic")(torch.tensor([1]), torch.tensor([0]))


def test_env_override(monkeypatch):
    monkeypatch.setenv("FASTINTEREST_EMBEDDING_BAG_BACKEND", "reference")
    assert _dispatch.resolve("embedding_bag", "cpu", torch.float32) == "reference"
    monkeypatch.setenv("FASTINTEREST_EMBEDDING_BAG_BACKEND", "")
    monkeypatch.setenv("FASTINTEREST_BACKEND", "reference")
    assert _dispatch.resolve("embedding_bag", "cpu", torch.float32) == "reference"
    assert _dispatch.resolve("embedding_bag", "cpu", torch.float32, backend="numba" if not _dispatch.why_not(
        "embedding_bag", "numba", "cpu", torch.float32) else "reference") in ("numba", "reference")


@pytest.mark.parametrize("backend", [b for b in ("ext", "numba") if not _dispatch.why_not("embedding_bag", b, "cpu",
                                                                                          torch.float32)])
@pytest.mark.parametrize("V", [300, 300_000])  # counting-sort grouping vs radix-sort grouping in C++
def test_fused_update_small_and_large_tables(backend, V):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (3000,), generator=g)
    idx[::7] = idx[0]
    off = torch.arange(0, 3000, 6)
    grad = torch.randn(off.numel(), 16, generator=g)
    w0 = torch.randn(V, 16, generator=g)
    out = []
    for b in (backend, "reference"):
        m = fnn.EmbeddingBag(V, 16, mode="mean", _weight=w0, backend=b, padding_idx=5,
                             fused_optimizer=fopt.FusedRowWiseAdagrad(lr=0.1))
        m(idx, off).backward(grad)
        out.append((m.weight.detach(), m.optim_momentum))
    assert_close(out[0][0], out[1][0])
    assert_close(out[0][1], out[1][1])


@pytest.mark.parametrize("backend", backends())
def test_indices_after_the_last_offset_are_refused(backend):
    """include_last_offset=True with offsets[-1] < N would leave the tail in no bag (torch's backward gives
    those rows uninitialised gradients; one backend here crashed on it): a clear error instead."""
    m = fnn.EmbeddingBag(10, 3, mode="sum", include_last_offset=True, backend=backend)
    idx = torch.tensor([1, 2, 3, 7, 8])
    with pytest.raises(ValueError, match="offsets end at 3 but there are 5 indices"):
        m(idx, torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="offsets end at 0 but there are 5 indices"):
        m(idx, torch.tensor([0]))
    psw = torch.rand(5, requires_grad=True)
    with pytest.raises(ValueError, match="offsets end at"):
        m(idx, torch.tensor([0, 2, 3]), per_sample_weights=psw)
    out = m(idx, torch.tensor([0, 2, 5]))   # ending at N is the normal case
    out.sum().backward()
    assert m.weight.grad is not None


@pytest.mark.parametrize("backend", backends())
def test_strided_weight(backend):
    """A column slice of a bigger table: the kernels get a contiguous copy and the gradient flows back to
    the slice; a fused optimizer, which updates in place, refuses it."""
    big = torch.randn(20, 9, requires_grad=True)
    w = big[:, 2:6]
    idx = torch.tensor([1, 4, 4, 7, 19, 0])
    off = torch.tensor([0, 2, 6])
    out = embedding_bag(w, idx, off, mode="sum", backend=backend)
    ref_big = big.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.embedding_bag(idx, ref_big[:, 2:6], off, mode="sum")
    assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert_close(big.grad, ref_big.grad)
    with pytest.raises(ValueError, match="must be contiguous"):
        embedding_bag(w.detach(), idx, off, mode="sum", backend=backend,
                                     fused=(fopt.FusedSGD(0.1), {}))
