"""fastinterest.nn.LSTM / EmbeddingLSTM and the fastinterest::lstm ops on every available backend.

Parity with torch.nn.LSTM carrying the same weights (padded, packed and lengths= input): outputs, h_n,
c_n and the gradient of every parameter, the input and h0/c0; float64 gradcheck; step() against the
full forward; edge cases; bad input. Triton runs under TRITON_INTERPRET=1 (set before it is imported).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from fastinterest import _dispatch  # noqa: E402
from fastinterest.nn import LSTM, EmbeddingLSTM  # noqa: E402
from fastinterest.ops import lstm as lstm_ops  # noqa: E402

BACKENDS = _dispatch.available_backends("lstm", "cpu", torch.float32)
BACKENDS64 = _dispatch.available_backends("lstm", "cpu", torch.float64)
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-8)}
GTOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float64: dict(atol=1e-9, rtol=1e-7)}


def _close(a, b, dtype, what, grad=False):
    tol = (GTOL if grad else TOL)[dtype]
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, **tol), f"{what}: max abs err {err:.3g}"


def _torch_reference(ref, x, lengths, hx, batch_first):
    """torch.nn.LSTM on the sequences with length > 0 (packed), re-expanded to the full batch: zero
    outputs and h0/c0 (or zeros) as the final state of empty sequences."""
    B = lengths.shape[0]
    T = x.shape[1] if batch_first else x.shape[0]
    keep = (lengths > 0).nonzero().flatten()
    L = ref.num_layers * (2 if ref.bidirectional else 1)
    H = ref.hidden_size
    out = x.new_zeros((B, T, H * (2 if ref.bidirectional else 1)) if batch_first else
                      (T, B, H * (2 if ref.bidirectional else 1)))
    h_n = hx[0].clone() if hx is not None else x.new_zeros(L, B, H)
    c_n = hx[1].clone() if hx is not None else x.new_zeros(L, B, H)
    if keep.numel():
        xs = x[keep] if batch_first else x[:, keep]
        ps = pack_padded_sequence(xs, lengths[keep], batch_first=batch_first, enforce_sorted=False)
        hk = None if hx is None else (hx[0][:, keep], hx[1][:, keep])
        o, (h, c) = ref(ps, hk)
        o, _ = pad_packed_sequence(o, batch_first=batch_first, total_length=T)
        if batch_first:
            out = out.index_copy(0, keep, o)
        else:
            out = out.index_copy(1, keep, o)
        h_n = h_n.index_copy(1, keep, h)
        c_n = c_n.index_copy(1, keep, c)
    return out, (h_n, c_n)


def _loss(out, h, c, seed=1):
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(out.shape, generator=g, dtype=out.dtype)
    wh = torch.randn(h.shape, generator=g, dtype=h.dtype)
    wc = torch.randn(c.shape, generator=g, dtype=c.dtype)
    return (out * wo).sum() + (h * wh).sum() + (c * wc).sum()


CONFIGS = [
    # (num_layers, bidirectional, batch_first, with_hx, H)
    (1, False, True, False, 16),
    (1, False, False, True, 20),
    (2, False, True, True, 12),
    (1, True, True, False, 16),
    (2, True, False, True, 20),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'bf' if c[2] else 'tf'}-"
                                                        f"{'hx' if c[3] else 'nohx'}-H{c[4]}")
@pytest.mark.parametrize("kind", ["lengths", "packed", "padded"])
def test_parity_with_torch(backend, cfg, kind):
    num_layers, bidir, bf, with_hx, H = cfg
    dtype = torch.float32
    torch.manual_seed(0)
    E, B, T = 13, 6, 7
    ref = torch.nn.LSTM(E, H, num_layers=num_layers, batch_first=bf, bidirectional=bidir)
    m = LSTM.from_torch(ref, backend=backend)
    x = torch.randn((B, T, E) if bf else (T, B, E))
    if kind == "padded":
        lengths = torch.full((B,), T)
    else:
        lengths = torch.tensor([5, 7, 0, 1, 7, 3])
        if kind == "packed":
            lengths = lengths.clamp(min=1)
    L = num_layers * (2 if bidir else 1)
    hx = (torch.randn(L, B, H), torch.randn(L, B, H)) if with_hx else None

    x1 = x.clone().requires_grad_()
    hx1 = tuple(t.clone().requires_grad_() for t in hx) if hx else None
    ro, (rh, rc) = _torch_reference(ref, x1, lengths, hx1, bf)
    _loss(ro, rh, rc).backward()

    x2 = x.clone().requires_grad_()
    hx2 = tuple(t.clone().requires_grad_() for t in hx) if hx else None
    if kind == "lengths":
        o, (h, c) = m(x2, hx2, lengths=lengths)
    elif kind == "padded":
        o, (h, c) = m(x2, hx2)
    else:
        ps = pack_padded_sequence(x2, lengths, batch_first=bf, enforce_sorted=False)
        po, (h, c) = m(ps, hx2)
        ref_ps = pack_padded_sequence(ro.detach(), lengths, batch_first=bf, enforce_sorted=False)
        _close(po.data, ref_ps.data, dtype, "packed output data")
        assert torch.equal(po.batch_sizes, ref_ps.batch_sizes)
        o, _ = pad_packed_sequence(po, batch_first=bf, total_length=T)
    _close(o, ro.detach(), dtype, "output")
    _close(h, rh.detach(), dtype, "h_n")
    _close(c, rc.detach(), dtype, "c_n")
    _loss(o, h, c).backward()
    _close(x2.grad, x1.grad, dtype, "grad input", grad=True)
    if hx:
        _close(hx2[0].grad, hx1[0].grad, dtype, "grad h0", grad=True)
        _close(hx2[1].grad, hx1[1].grad, dtype, "grad c0", grad=True)
    for (name, p_ref), p in zip(ref.named_parameters(), m.parameters()):
        _close(p.grad, p_ref.grad, dtype, f"grad {name}", grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_large_batch(backend):
    """A batch big enough that the C++ kernel splits rows across threads (and tiles cut at n_next)."""
    torch.manual_seed(11)
    B, T, E, H = 41, 9, 7, 20
    ref = torch.nn.LSTM(E, H, batch_first=True, bidirectional=True)
    m = LSTM.from_torch(ref, backend=backend)
    x = torch.randn(B, T, E)
    lengths = torch.randint(0, T + 1, (B,))
    hx = (torch.randn(2, B, H), torch.randn(2, B, H))
    _check_train_and_infer(m, ref, x, lengths, hx, True)


def _check_train_and_infer(m, ref, x, lengths, hx, batch_first):
    """m against torch.nn.LSTM `ref` (same weights), float32: outputs, h_n, c_n, the input and every
    parameter gradient with autograd, then the no-grad path's output and c_n. Returns the reference."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ro, (rh, rc) = _torch_reference(ref, x1, lengths, hx, batch_first)
    o, (h, c) = m(x2, hx, lengths=lengths)
    _close(o, ro.detach(), torch.float32, "output")
    _close(h, rh.detach(), torch.float32, "h_n")
    _close(c, rc.detach(), torch.float32, "c_n")
    _loss(ro, rh, rc).backward()
    _loss(o, h, c).backward()
    _close(x2.grad, x1.grad, torch.float32, "grad input", grad=True)
    for (name, p_ref), p in zip(ref.named_parameters(), m.parameters()):
        _close(p.grad, p_ref.grad, torch.float32, f"grad {name}", grad=True)
    with torch.no_grad():
        o2, (h2, c2) = m(x, hx, lengths=lengths)
    _close(o2, ro.detach(), torch.float32, "inference output")
    _close(c2, rc.detach(), torch.float32, "inference c_n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_matches_training_path(backend):
    """The no-grad fast path and the autograd op give the same numbers."""
    torch.manual_seed(1)
    m = LSTM(9, 24, num_layers=2, batch_first=True, bidirectional=True, backend=backend)
    x = torch.randn(5, 8, 9)
    lengths = torch.tensor([8, 0, 3, 8, 1])
    with torch.no_grad():
        o1, (h1, c1) = m(x, lengths=lengths)
    o2, (h2, c2) = m(x, lengths=lengths)
    for a, b, w in ((o1, o2, "out"), (h1, h2, "h_n"), (c1, c2, "c_n")):
        _close(a, b.detach(), torch.float32, w)
    # tiny batches take the x-in-kernel input mode on ext
    with torch.no_grad():
        o3, (h3, c3) = m(x[:2], lengths=lengths[:2])
    _close(o3, o2[:2].detach(), torch.float32, "small-batch out")
    _close(h3, h2[:, :2].detach(), torch.float32, "small-batch h_n")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 2, 6])
@pytest.mark.parametrize("cfg", CONFIGS + [(3, True, True, True, 12), (3, False, False, False, 8)],
                         ids=lambda c: f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'bf' if c[2] else 'tf'}-"
                                       f"{'hx' if c[3] else 'nohx'}-H{c[4]}")
def test_inference_parity_with_torch(cfg, B, dtype):
    """The no-grad path of every backend (ext: the whole stack in one native call; B < 3 projects
    every step first) against torch.nn.LSTM: 1-3 layers, both directions, both layouts, a
    non-contiguous input, lengths with zeros, h0/c0 given or not."""
    num_layers, bidir, bf, with_hx, H = cfg
    torch.manual_seed(B * 7 + num_layers)
    E, T = 11, 6
    ref = torch.nn.LSTM(E, H, num_layers=num_layers, batch_first=bf, bidirectional=bidir).to(dtype)
    L = num_layers * (2 if bidir else 1)
    hx = (torch.randn(L, B, H, dtype=dtype), torch.randn(L, B, H, dtype=dtype)) if with_hx else None
    x = torch.randn((T, B, E) if bf else (B, T, E), dtype=dtype).transpose(0, 1)   # non-contiguous
    lengths = torch.tensor([6, 0, 3, 1, 6, 2][:B])
    ro, (rh, rc) = _torch_reference(ref, x, lengths, hx, bf)
    for backend in (BACKENDS if dtype == torch.float32 else BACKENDS64):
        m = LSTM.from_torch(ref, backend=backend)
        with torch.no_grad():
            o, (h, c) = m(x, hx, lengths=lengths)
            of, _ = m(x, hx)   # full length
        rf, _ = ref(x, hx)
        _close(o, ro.detach(), dtype, f"{backend} output")
        _close(h, rh.detach(), dtype, f"{backend} h_n")
        _close(c, rc.detach(), dtype, f"{backend} c_n")
        _close(of, rf.detach(), dtype, f"{backend} full-length output")


@pytest.fixture
def blas_for_every_batch():
    """Route every float32 recurrence of the C++ backend through the BLAS path (normally only batches
    of >= 32 sequences take it), and restore the setting afterwards."""
    from fastinterest import _ext
    from fastinterest.backends import ext_lstm

    if _ext.cpu_reason() is not None or not hasattr(_ext.cpu(), "lstm_blas"):
        pytest.skip("no C++ LSTM kernels")
    fn, rows = _ext.cpu().lstm_blas()
    if not fn:
        fn = ext_lstm._torch_sgemm()
    if not fn:
        pytest.skip("torch exports no sgemm_ here")
    _ext.cpu().lstm_set_sgemm(fn, 1)
    yield
    _ext.cpu().lstm_set_sgemm(fn, rows)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'bf' if c[2] else 'tf'}-"
                                                        f"{'hx' if c[3] else 'nohx'}-H{c[4]}")
def test_blas_path_parity(blas_for_every_batch, cfg):
    """The BLAS recurrence (sgemm per step + fused pointwise) against torch: outputs, states and every
    gradient (the training forward feeds the BPTT workspaces), lengths with zeros, and the no-grad
    stack and EmbeddingLSTM (projected tables) paths."""
    num_layers, bidir, bf, with_hx, H = cfg
    torch.manual_seed(9)
    E, B, T = 13, 6, 7
    ref = torch.nn.LSTM(E, H, num_layers=num_layers, batch_first=bf, bidirectional=bidir)
    m = LSTM.from_torch(ref, backend="ext")
    x = torch.randn((B, T, E) if bf else (T, B, E))
    lengths = torch.tensor([5, 7, 0, 1, 7, 3])
    L = num_layers * (2 if bidir else 1)
    hx = (torch.randn(L, B, H), torch.randn(L, B, H)) if with_hx else None
    _check_train_and_infer(m, ref, x, lengths, hx, bf)
    # EmbeddingLSTM inference: projected tables (two fields) through the BLAS path
    emb = [torch.nn.Embedding(30, E), torch.nn.Embedding(4, E)]
    if not bidir and bf:
        el = EmbeddingLSTM.from_torch(emb, ref)
        ids = [torch.randint(0, 30, (B, T)), torch.randint(0, 4, (B, T))]
        xe = emb[0](ids[0]) + emb[1](ids[1])
        re, (rhe, rce) = _torch_reference(ref, xe.detach(), lengths, hx, bf)
        with torch.no_grad():
            oe, (he, ce) = el(ids, lengths, hx)
        _close(oe, re, torch.float32, "EmbeddingLSTM output")
        _close(he, rhe, torch.float32, "EmbeddingLSTM h_n")


@pytest.mark.parametrize("backend", BACKENDS64)
def test_gradcheck_float64(backend):
    torch.manual_seed(2)
    B, T, E, H = 3, 3, 2, 3
    weights = []
    for layer in range(2):
        for _d in range(2):
            inp = E if layer == 0 else 2 * H
            weights += [torch.randn(4 * H, inp, dtype=torch.float64) * 0.5, torch.randn(4 * H, H, dtype=torch.float64)
                        * 0.5, torch.randn(4 * H, dtype=torch.float64) * 0.1,
                        torch.randn(4 * H, dtype=torch.float64) * 0.1]
    x = torch.randn(B, T, E, dtype=torch.float64)
    h0 = torch.randn(4, B, H, dtype=torch.float64)
    c0 = torch.randn(4, B, H, dtype=torch.float64)
    lengths = torch.tensor([3, 0, 2])
    inputs = [t.requires_grad_() for t in [x, h0, c0] + weights]

    def fn(x, h0, c0, *w):
        o, (h, c) = lstm_ops.lstm(x, lengths, (h0, c0), list(w), num_layers=2, bidirectional=True, batch_first=True,
                                  backend=backend)
        return o, h, c

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_full_forward(backend):
    torch.manual_seed(3)
    m = LSTM(11, 16, num_layers=2, batch_first=True, backend=backend)
    B, T = 4, 5
    x = torch.randn(B, T, 11)
    with torch.no_grad():
        out, (h_n, c_n) = m(x)
        state = None
        for t in range(T):
            y, state = m.step(x[:, t], state)
            _close(y, out[:, t], torch.float32, f"step {t} output")
    _close(state[0], h_n, torch.float32, "step h")
    _close(state[1], c_n, torch.float32, "step c")
    # step() under autograd (torch cell) agrees too
    y, _ = m.step(x[:, 0])
    _close(y.detach(), out[:, 0], torch.float32, "step with grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["T1", "B1", "all_zero", "D123", "unsorted"])
def test_edge_cases(backend, case):
    torch.manual_seed(4)
    E, H, B, T = 8, 16, 4, 6
    lengths = torch.tensor([6, 2, 4, 1])
    if case == "T1":
        T, lengths = 1, torch.tensor([1, 0, 1, 1])
    elif case == "B1":
        B, lengths = 1, torch.tensor([4])
    elif case == "all_zero":
        lengths = torch.zeros(B, dtype=torch.int64)
    elif case == "D123":
        E = 123
    elif case == "unsorted":
        lengths = torch.tensor([1, 6, 3, 6])
    ref = torch.nn.LSTM(E, H, batch_first=True, bidirectional=True)
    m = LSTM.from_torch(ref, backend=backend)
    x = torch.randn(B, T, E)
    hx = (torch.randn(2, B, H), torch.randn(2, B, H))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ro, (rh, rc) = _torch_reference(ref, x1, lengths, hx, True)
    o, (h, c) = m(x2, hx, lengths=lengths)
    _close(o, ro.detach(), torch.float32, "output")
    _close(h, rh.detach(), torch.float32, "h_n")
    _close(c, rc.detach(), torch.float32, "c_n")
    for t in range(T):
        assert torch.all(o[lengths <= t, t] == 0), "outputs past a sequence's length must be zero"
    if ro.requires_grad:
        _loss(ro, rh, rc).backward()
        _loss(o, h, c).backward()
        _close(x2.grad, x1.grad, torch.float32, "grad input", grad=True)
        for (name, p_ref), p in zip(ref.named_parameters(), m.parameters()):
            _close(p.grad, p_ref.grad, torch.float32, f"grad {name}", grad=True)


def test_dropout_between_layers_trains():
    torch.manual_seed(5)
    m = LSTM(8, 16, num_layers=2, dropout=0.5, batch_first=True)
    x = torch.randn(3, 5, 8, requires_grad=True)
    o, _ = m(x, lengths=torch.tensor([5, 2, 4]))
    o.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(x)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- module API
def test_api_state_dict_and_conversion():
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, bias=False)
    m = LSTM(5, 7, num_layers=2, bidirectional=True, bias=False)
    assert list(m.state_dict().keys()) == list(ref.state_dict().keys())
    m.load_state_dict(ref.state_dict())
    back = m.to_torch()
    for (k1, v1), (k2, v2) in zip(back.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(NotImplementedError, match="proj_size"):
        LSTM(5, 7, proj_size=3)
    # unbatched input like torch
    x = torch.randn(4, 5)
    o, (h, c) = m(x)
    ro, (rh, rc) = ref(x)
    _close(o, ro, torch.float32, "unbatched output")
    _close(h, rh, torch.float32, "unbatched h")


def test_bad_input_raises():
    m = LSTM(4, 8, batch_first=True)
    x = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=torch.tensor([5, 6, 1]))
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=torch.tensor([5, -1, 1]))
    with pytest.raises(TypeError, match="integer"):
        m(x, lengths=torch.tensor([5.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="device"):
        m(x, lengths=torch.tensor([5, 1, 1], device="meta"))
    with pytest.raises(ValueError, match="shape"):
        m(x, lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match="h0"):
        m(x, (torch.zeros(1, 2, 8), torch.zeros(1, 3, 8)))
    with torch.no_grad():  # the fast path validates as well
        with pytest.raises(ValueError, match="lengths"):
            m(x, lengths=torch.tensor([9, 1, 1]))
    e = EmbeddingLSTM(10, 4, 8)
    ids = torch.randint(0, 10, (3, 5))
    ids[1, 2] = 10
    with pytest.raises(IndexError, match="out of range"):
        e(ids, torch.tensor([5, 5, 5]))
    with torch.no_grad(), pytest.raises(IndexError, match="out of range"):
        e(ids, torch.tensor([5, 5, 5]))
    with pytest.raises(TypeError, match="int32 or int64"):
        e(ids.float(), torch.tensor([5, 5, 5]))
    # an out-of-range id past a sequence's length is never read
    with torch.no_grad():
        e(ids, torch.tensor([5, 2, 5]))


# ---------------------------------------------------------------- EmbeddingLSTM
def _emb_reference(embs, ref_lstm, ids, lengths, hx=None):
    x = sum(e(i) for e, i in zip(embs, ids))
    return _torch_reference(ref_lstm, x, lengths, hx, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fields", [1, 3])
def test_embedding_lstm_parity(backend, fields):
    torch.manual_seed(6)
    sizes = [50, 7, 4][:fields]
    E, H, B, T = 8, 16, 5, 6
    embs = [torch.nn.Embedding(V, E, padding_idx=0 if f == 0 else None) for f, V in enumerate(sizes)]
    ref = torch.nn.LSTM(E, H, num_layers=2, batch_first=True)
    m = EmbeddingLSTM.from_torch(embs if fields > 1 else embs[0], ref, backend=backend)
    ids = [torch.randint(0, V, (B, T)) for V in sizes]
    lengths = torch.tensor([6, 0, 3, 6, 1])
    arg = ids if fields > 1 else ids[0]
    ro, (rh, rc) = _emb_reference(embs, ref, ids, lengths)
    with torch.no_grad():
        o, (h, c) = m(arg, lengths)
    _close(o, ro.detach(), torch.float32, "inference output")
    _close(h, rh.detach(), torch.float32, "inference h_n")
    # training path and gradients
    o, (h, c) = m(arg, lengths)
    _close(o, ro.detach(), torch.float32, "training output")
    _loss(ro, rh, rc).backward()
    _loss(o, h, c).backward()
    for f in range(fields):
        _close(m.embeddings[f].weight.grad, embs[f].weight.grad, torch.float32, f"grad table {f}", grad=True)
    for (name, p_ref), p in zip(ref.named_parameters(), m.lstm.parameters()):
        _close(p.grad, p_ref.grad, torch.float32, f"grad {name}", grad=True)


@pytest.mark.parametrize("fields,num_layers", [(1, 1), (2, 2)])
def test_embedding_lstm_inference_many_sequences(fields, num_layers):
    """Inference on a batch that spans several tile groups of both threads (the C++ forward walks the
    positions in groups of tiles and reads or gathers their table rows a group at a time)."""
    torch.manual_seed(16)
    sizes = [300, 11][:fields]
    E, H, B, T = 12, 24, 157, 23
    embs = [torch.nn.Embedding(V, E) for V in sizes]
    ref = torch.nn.LSTM(E, H, num_layers=num_layers, batch_first=True)
    ids = [torch.randint(0, V, (B, T)) for V in sizes]
    lengths = torch.randint(0, T + 1, (B,))
    lengths[:40] = T
    ro, (rh, rc) = _emb_reference(embs, ref, ids, lengths)
    for backend in BACKENDS:
        m = EmbeddingLSTM.from_torch(embs if fields > 1 else embs[0], ref, backend=backend)
        with torch.inference_mode():
            o, (h, c) = m(ids if fields > 1 else ids[0], lengths)
        _close(o, ro.detach(), torch.float32, f"{backend} output")
        _close(h, rh.detach(), torch.float32, f"{backend} h_n")
        _close(c, rc.detach(), torch.float32, f"{backend} c_n")


def test_embedding_lstm_cache_invalidation_and_step():
    torch.manual_seed(7)
    m = EmbeddingLSTM([30, 5], 8, 16, num_layers=2)
    ids = [torch.randint(0, 30, (3, 4)), torch.randint(0, 5, (3, 4))]
    lengths = torch.tensor([4, 4, 4])
    with torch.no_grad():
        o1, _ = m(ids, lengths)
        m.embeddings[0].weight[ids[0][0, 0]] += 1.0          # in-place change of a table
        o2, _ = m(ids, lengths)
        m.lstm.weight_ih_l0.mul_(0.5)                          # and of W_ih
        o3, _ = m(ids, lengths)
        m.project_tables = False
        o4, _ = m(ids, lengths)
    assert not torch.allclose(o1, o2) and not torch.allclose(o2, o3)
    _close(o3, o4, torch.float32, "projected vs gathered")
    with torch.no_grad():
        m.project_tables = "auto"
        state = None
        for t in range(4):
            y, state = m.step([ids[0][:, t], ids[1][:, t]], state)
            _close(y, o3[:, t], torch.float32, f"step {t}")


def test_embedding_lstm_large_projected_tables_sit_on_huge_pages():
    """A projected table of at least 16 MiB (V x 4H) is allocated by `table_empty`: 2 MiB aligned and advised
    for transparent huge pages (its random row gathers then rarely miss the TLB), with the same result as the
    gathered-embedding path."""
    from fastinterest import _ext

    if _ext.cpu_reason() is not None:
        pytest.skip("native extension unavailable")
    torch.manual_seed(9)
    m = EmbeddingLSTM(33_000, 8, 32)                  # 33000 x 128 floats = 16.1 MiB
    ids = torch.randint(0, 33_000, (3, 6))
    lengths = torch.tensor([6, 2, 0])
    with torch.no_grad():
        o1, (h1, _) = m(ids, lengths)
        (tables,) = m._projected()
        assert tables[0].data_ptr() % (1 << 21) == 0 and tables[0].shape == (33_000, 128)
        m.project_tables = False
        o2, (h2, _) = m(ids, lengths)
    _close(o1, o2, torch.float32, "projected (huge pages) vs gathered")
    _close(h1, h2, torch.float32, "h_n")


def test_embedding_lstm_fused_optimizer():
    from fastinterest.optim import FusedSGD

    torch.manual_seed(8)
    m = EmbeddingLSTM(20, 8, 16, fused_optimizer=FusedSGD(lr=0.1))
    plain = EmbeddingLSTM(20, 8, 16)
    plain.load_state_dict(m.state_dict(), strict=False)
    ids = torch.randint(0, 20, (4, 5))
    lengths = torch.tensor([5, 3, 1, 0])
    before = m.embedding.weight.detach().clone()
    m(ids, lengths)[0].sum().backward()
    plain(ids, lengths)[0].sum().backward()
    assert m.embedding.weight.grad is None
    _close(m.embedding.weight.detach(), before - 0.1 * plain.embedding.weight.grad, torch.float32,
           "fused SGD update", grad=True)


# ---------------------------------------------------------------- ops: opcheck and torch.compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.manual_seed(9)
    B, T, E, H = 3, 4, 5, 8
    weights = [torch.randn(4 * H, E) * 0.3, torch.randn(4 * H, H) * 0.3, torch.randn(4 * H) * 0.1,
               torch.randn(4 * H) * 0.1]
    x = torch.randn(B, T, E)
    lengths = torch.tensor([4, 1, 3])
    h0, c0 = torch.randn(1, B, H), torch.randn(1, B, H)
    args = (x.requires_grad_(), lengths, h0, c0, [w.requires_grad_() for w in weights], True, 1, False, True, 0.0,
            True, True, backend)
    torch.library.opcheck(lstm_ops.lstm_forward_op, args)
    res = lstm_ops.lstm_forward_op(*args)
    bargs = (torch.randn_like(res[0]), torch.randn_like(res[1]), torch.randn_like(res[2]), x.detach(), lengths, h0, c0,
             [w.detach() for w in weights], res[0].detach(), [r.detach() for r in res[3:]], True, 1, False, True, 0.0,
             backend)
    torch.library.opcheck(lstm_ops.lstm_backward_op, bargs)


def test_torch_compile_fullgraph():
    torch.manual_seed(10)
    m = LSTM(6, 8, num_layers=1, batch_first=True)
    e = EmbeddingLSTM([20, 4], 6, 8)
    x = torch.randn(3, 4, 6)
    ids = [torch.randint(0, 20, (3, 4)), torch.randint(0, 4, (3, 4))]
    lengths = torch.tensor([4, 2, 3])

    def f(x, ids, lengths):
        o, (h, c) = m(x, lengths=lengths)
        o2, (h2, c2) = e(ids, lengths)
        return o.sum() + h.sum() + o2.sum() + c2.sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    ref = f(x, ids, lengths)
    got = cf(x, ids, lengths)
    _close(got.detach(), ref.detach(), torch.float32, "compiled")
    got.backward()


def test_step_bad_ids_raise():
    e = EmbeddingLSTM([10, 3], 4, 8)
    with torch.no_grad(), pytest.raises(IndexError, match="out of range"):
        e.step([torch.tensor([1, 10]), torch.tensor([0, 1])])
    with pytest.raises(IndexError, match="out of range"):
        e.step([torch.tensor([1, 2]), torch.tensor([0, -1])])
    m = LSTM(4, 8, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        m.step(torch.randn(2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("through", ["h_n", "out"])
def test_gradient_through_one_output(backend, through):
    """Only h_n (or only the output) receives a gradient: the others arrive as None, not zeros."""
    torch.manual_seed(12)
    ref = torch.nn.LSTM(5, 12, num_layers=2, batch_first=True)
    m = LSTM.from_torch(ref, backend=backend)
    x = torch.randn(4, 6, 5)
    lengths = torch.tensor([6, 2, 5, 1])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ro, (rh, rc) = _torch_reference(ref, x1, lengths, None, True)
    o, (h, c) = m(x2, lengths=lengths)
    (rh.sum() if through == "h_n" else ro.sum()).backward()
    (h.sum() if through == "h_n" else o.sum()).backward()
    _close(x2.grad, x1.grad, torch.float32, "grad input", grad=True)
    for (name, p_ref), p in zip(ref.named_parameters(), m.parameters()):
        _close(p.grad, p_ref.grad, torch.float32, f"grad {name}", grad=True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_triton_chunked_recurrence(monkeypatch, bidirectional):
    """The K-chunked recurrence that Triton uses on a GPU for H > 64 (weights too big for shared memory),
    forced here under the interpreter with small chunks (H = 20 over chunks of 8: a partial last chunk)."""
    import triton

    from fastinterest.triton import lstm as tlstm

    def chunked(B, H, device):
        return 16, max(16, triton.next_power_of_2(H)), 8, 4

    monkeypatch.setattr(tlstm, "_blocks", chunked)
    torch.manual_seed(3)
    E, H, B, T = 7, 20, 19, 6  # B > BLOCK_B: two programs
    ref = torch.nn.LSTM(E, H, num_layers=2, batch_first=True, bidirectional=bidirectional)
    m = LSTM.from_torch(ref, backend="triton")
    x = torch.randn(B, T, E)
    lengths = torch.randint(0, T + 1, (B,))
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(2 * dirs, B, H), torch.randn(2 * dirs, B, H))
    _check_train_and_infer(m, ref, x, lengths, hx, True)
