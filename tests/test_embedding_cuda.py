"""Embedding on a GPU: every GPU backend against the CPU oracle (skipped without a CUDA device)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastinterest.nn as fnn
import fastinterest.optim as fopt
from fastinterest import _dispatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def gpu_backends(dtype=torch.float32):
    return [b for b in ("ext", "triton") if torch.cuda.is_available()
            and _dispatch.why_not("embedding_bag", b, "cuda", dtype) is None]


def case(V=1000, B=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 30, (B,), generator=g)
    sizes[3] = 0
    idx = torch.randint(0, V, (int(sizes.sum()),), generator=g)
    idx[1] = idx[0]
    off = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    return idx, off


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("D", [64, 123, 300])
def test_forward_backward_parity(dtype, mode, D):
    V = 1000
    idx, off = case(V)
    w = torch.randn(V, D)
    for b in gpu_backends(dtype):
        m = fnn.EmbeddingBag(V, D, mode=mode, _weight=w, weight_dtype=dtype, backend=b, device="cuda")
        ref_w = m.weight.detach().double().cpu().requires_grad_(True)
        expect = TF.embedding_bag(idx, ref_w, off, mode=mode)
        out = m(idx.cuda(), off.cuda())
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double().cpu(), expect.detach(), atol=tol, rtol=tol)
        g = torch.randn_like(expect)
        (expect * g).sum().backward()
        (out * g.cuda().to(out.dtype)).sum().backward()
        torch.testing.assert_close(m.weight.grad.double().cpu(), ref_w.grad, atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise", "adam"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_fused_optimizers_match_cpu(name, deterministic):
    V, D = 500, 64
    make = {"sgd": lambda: fopt.FusedSGD(0.1), "adagrad": lambda: fopt.FusedAdagrad(0.1),
            "rowwise": lambda: fopt.FusedRowWiseAdagrad(0.1), "adam": lambda: fopt.FusedAdam(0.01)}[name]
    w = torch.randn(V, D)
    for b in gpu_backends():
        # each module on its own copy: _weight is used as the parameter itself (as torch does), and a fused
        # optimizer updates it in place
        cpu = fnn.EmbeddingBag(V, D, mode="mean", _weight=w.clone(), fused_optimizer=make(), backend="ext")
        gpu = fnn.EmbeddingBag(V, D, mode="mean", _weight=w.clone(), fused_optimizer=make(), backend=b,
                               device="cuda", deterministic=deterministic)
        for step in range(3):
            idx, off = case(V, seed=step)
            g = torch.randn(off.numel(), D)
            cpu(idx, off).backward(g)
            gpu(idx.cuda(), off.cuda()).backward(g.cuda())
        torch.testing.assert_close(gpu.weight.detach().cpu(), cpu.weight.detach(), atol=1e-4, rtol=1e-4)


def test_deterministic_backward_is_bitwise_repeatable():
    V, D = 50, 64
    idx = torch.randint(0, V, (100000,), device="cuda")
    off = torch.arange(0, 100000, 10, device="cuda")
    g = torch.randn(off.numel(), D, device="cuda")
    res = []
    for _ in range(3):
        m = fnn.EmbeddingBag(V, D, mode="sum", _weight=torch.ones(V, D), device="cuda", backend="ext",
                             fused_optimizer=fopt.FusedAdagrad(0.1))
        m(idx, off).backward(g)
        res.append(m.weight.detach().clone())
    assert torch.equal(res[0], res[1]) and torch.equal(res[0], res[2])


def test_out_of_range_index_raises_on_gpu():
    m = fnn.EmbeddingBag(10, 64, mode="sum", device="cuda")
    with pytest.raises(IndexError, match="position 1"):
        m(torch.tensor([0, 10], device="cuda"), torch.tensor([0], device="cuda"))


# ---------------------------------------------------------------- torch.library on the GPU
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck_on_gpu(mode):
    from fastinterest.backends.reference_embedding import OPT_ROWWISE_ADAGRAD
    from fastinterest.ops import embedding as E

    torch.manual_seed(0)
    idx = torch.tensor([1, 4, 4, 7, 19, 0, 3], device="cuda")
    off = torch.tensor([0, 3, 3, 7], device="cuda")
    for b in gpu_backends():
        w = torch.randn(20, 8, device="cuda", requires_grad=True)
        psw = torch.rand(idx.numel(), device="cuda", requires_grad=True) if mode == 0 else None
        torch.library.opcheck(E.embedding_bag_op, (w, idx, off, psw, mode, -1, -1, b, E.OPT_DENSE, [], None, None,
                                                   None, True))
        go = torch.randn(3, 8, device="cuda")
        maxpos = torch.empty(0, dtype=torch.long, device="cuda")
        wd = w.detach()
        torch.library.opcheck(E.embedding_bag_backward_op, (go, wd, idx, off, None, maxpos, 1, -1, b, True))
        torch.library.opcheck(E.embedding_bag_backward_fused_op,
                              (go, wd.clone(), idx, off, None, maxpos, 0, -1, OPT_ROWWISE_ADAGRAD, [0.1, 1e-8],
                               torch.zeros(20, device="cuda"), None, None, b, True),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_on_gpu():
    torch.manual_seed(0)
    eager = fnn.EmbeddingBag(50, 16, mode="mean", device="cuda")
    compiled_model = fnn.EmbeddingBag(50, 16, mode="mean", device="cuda")
    compiled_model.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 50, (12,), device="cuda")
    off = torch.tensor([0, 4, 9], device="cuda")
    compiled = torch.compile(compiled_model, fullgraph=True)   # inductor: the GPU path users take
    a, b = eager(idx, off), compiled(idx, off)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(compiled_model.weight.grad, eager.weight.grad)


@pytest.mark.parametrize("name", ["rowwise", "adam"])
def test_fused_optimizers_wide_rows(name):
    """D = 300 spans two 256-column chunks of the update kernel (row-wise Adagrad's mean square must
    cover the whole row); several steps check Adam's device-side step counter."""
    V, D = 200, 300
    make = {"rowwise": lambda: fopt.FusedRowWiseAdagrad(0.1), "adam": lambda: fopt.FusedAdam(0.01)}[name]
    w = torch.randn(V, D)
    cpu = fnn.EmbeddingBag(V, D, mode="sum", _weight=w.clone(), fused_optimizer=make(), backend="ext")
    gpu = fnn.EmbeddingBag(V, D, mode="sum", _weight=w.clone(), fused_optimizer=make(), backend="ext", device="cuda")
    for step in range(4):
        idx, off = case(V, seed=10 + step)
        g = torch.randn(off.numel(), D)
        cpu(idx, off).backward(g)
        gpu(idx.cuda(), off.cuda()).backward(g.cuda())
    torch.testing.assert_close(gpu.weight.detach().cpu(), cpu.weight.detach(), atol=1e-4, rtol=1e-4)


def test_indices_after_the_last_offset_raise_on_gpu():
    m = fnn.EmbeddingBag(10, 8, mode="sum", include_last_offset=True, device="cuda")
    with pytest.raises(ValueError, match="offsets end at 3 but there are 5 indices"):
        m(torch.tensor([1, 2, 3, 7, 8], device="cuda"), torch.tensor([0, 2, 3], device="cuda"))
