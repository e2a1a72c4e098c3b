"""LSTM on a CUDA device: ext (fused persistent kernel for H <= 256, alternating GEMM + pointwise above)
and triton, against torch.nn.LSTM (cuDNN) with the same weights. Skipped without a GPU."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from fastinterest import _dispatch  # noqa: E402
from fastinterest.nn import LSTM, EmbeddingLSTM  # noqa: E402

# cuDNN's LSTM defaults to TF32 tensor cores; the reference must be full float32
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float64: dict(atol=1e-9, rtol=1e-7),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _backends(dtype):
    if not torch.cuda.is_available():
        return []
    return [b for b in _dispatch.available_backends("lstm", "cuda", dtype) if b != "reference"]


def _ref(ref, x, lengths, hx):
    keep = (lengths > 0).nonzero().flatten()
    ps = pack_padded_sequence(x[keep], lengths[keep].cpu(), batch_first=True, enforce_sorted=False)
    o, (h, c) = ref(ps, None if hx is None else (hx[0][:, keep].contiguous(), hx[1][:, keep].contiguous()))
    o, _ = pad_packed_sequence(o, batch_first=True, total_length=x.shape[1])
    return keep, o, h, c


@pytest.mark.parametrize("backend", _backends(torch.float32))
@pytest.mark.parametrize("H", [64, 128, 320])          # 320: the alternating (GEMM + pointwise) path
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cuda_parity_float32(backend, H, bidirectional):
    torch.manual_seed(0)
    dev = "cuda"
    B, T, E = 37, 23, 48
    ref = torch.nn.LSTM(E, H, num_layers=2, batch_first=True, bidirectional=bidirectional).to(dev)
    m = LSTM.from_torch(ref, backend=backend)
    x = torch.randn(B, T, E, device=dev)
    lengths = torch.randint(0, T + 1, (B,))
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(2 * dirs, B, H, device=dev), torch.randn(2 * dirs, B, H, device=dev))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    keep, ro, rh, rc = _ref(ref, x1, lengths, hx)
    o, (h, c) = m(x2, hx, lengths=lengths)
    tol = TOL[torch.float32]
    torch.testing.assert_close(o[keep], ro, **tol)
    torch.testing.assert_close(h[:, keep], rh, **tol)
    torch.testing.assert_close(c[:, keep], rc, **tol)
    assert torch.all(o[lengths.to(dev) == 0] == 0)
    (ro.sum() + rh.sum() + rc.sum()).backward()
    (o[keep].sum() + h[:, keep].sum() + c[:, keep].sum()).backward()
    torch.testing.assert_close(x2.grad[keep], x1.grad[keep], **tol)
    for (name, p_ref), p in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=lambda s: f"grad {name}: {s}")


@pytest.mark.parametrize("backend", _backends(torch.float64))
def test_cuda_parity_float64_h256(backend):
    """float64 at H = 256: the fused forward fits in shared memory, the fused backward does not (the
    alternating path takes over instead of failing the launch)."""
    torch.manual_seed(3)
    dev = "cuda"
    ref = torch.nn.LSTM(16, 256, batch_first=True).to(dev).double()
    m = LSTM.from_torch(ref, backend=backend)
    x = torch.randn(9, 6, 16, device=dev, dtype=torch.float64)
    lengths = torch.tensor([6, 0, 3, 1, 6, 2, 5, 4, 6])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    keep, ro, rh, rc = _ref(ref, x1, lengths, None)
    o, (h, c) = m(x2, lengths=lengths)
    tol = TOL[torch.float64]
    torch.testing.assert_close(o[keep], ro, **tol)
    torch.testing.assert_close(c[:, keep], rc, **tol)
    (ro.sum() + rh.sum()).backward()
    (o[keep].sum() + h[:, keep].sum()).backward()
    torch.testing.assert_close(x2.grad[keep], x1.grad[keep], **tol)
    for (name, p_ref), p in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=lambda s: f"grad {name}: {s}")


@pytest.mark.parametrize("backend", _backends(torch.bfloat16))
def test_cuda_bfloat16(backend):
    torch.manual_seed(1)
    dev = "cuda"
    ref = torch.nn.LSTM(32, 64, batch_first=True).to(dev)
    m = LSTM.from_torch(ref, backend=backend).to(torch.bfloat16)
    x = torch.randn(16, 12, 32, device=dev)
    lengths = torch.randint(1, 13, (16,))
    keep, ro, rh, rc = _ref(ref, x, lengths, None)
    o, (h, c) = m(x.to(torch.bfloat16), lengths=lengths)
    torch.testing.assert_close(o.float(), ro.detach(), **TOL[torch.bfloat16])
    o.float().sum().backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in m.parameters())


def test_cuda_embedding_lstm_and_step():
    torch.manual_seed(2)
    dev = "cuda"
    m = EmbeddingLSTM([1000, 10], 32, 64, num_layers=2).to(dev)
    ids = [torch.randint(0, 1000, (8, 9), device=dev), torch.randint(0, 10, (8, 9), device=dev)]
    lengths = torch.full((8,), 9)
    with torch.no_grad():
        out, (h, c) = m(ids, lengths)
        state = None
        for t in range(9):
            y, state = m.step([ids[0][:, t], ids[1][:, t]], state)
        torch.testing.assert_close(y, out[:, -1], **TOL[torch.float32])


def test_cuda_opcheck_and_compile():
    from fastinterest.ops import lstm as lstm_ops

    torch.manual_seed(9)
    dev = "cuda"
    B, T, E, H = 3, 4, 5, 8
    for backend in _backends(torch.float32):
        weights = [torch.randn(4 * H, E, device=dev) * 0.3, torch.randn(4 * H, H, device=dev) * 0.3,
                   torch.randn(4 * H, device=dev) * 0.1, torch.randn(4 * H, device=dev) * 0.1]
        x = torch.randn(B, T, E, device=dev)
        lengths = torch.tensor([4, 1, 3])
        h0, c0 = torch.randn(1, B, H, device=dev), torch.randn(1, B, H, device=dev)
        args = (x.requires_grad_(), lengths, h0, c0, [w.requires_grad_() for w in weights], True, 1, False, True,
                0.0, True, True, backend)
        torch.library.opcheck(lstm_ops.lstm_forward_op, args)
    m = LSTM(6, 8, batch_first=True).to(dev)
    x = torch.randn(3, 4, 6, device=dev)
    lengths = torch.tensor([4, 2, 3])

    def f(x, lengths):
        o, (h, c) = m(x, lengths=lengths)
        return o.sum() + h.sum() + c.sum()

    got = torch.compile(f, fullgraph=True)(x, lengths)
    torch.testing.assert_close(got, f(x, lengths))
    got.backward()
