"""Drive every CUDA kernel of the ext backend once, on small inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/gpu_sanitize.py

Embedding-bag: each mode, int32/int64 indices, per-sample weights, padding_idx, the dense, sparse and
fused-optimizer backwards, deterministic and atomic, row widths for every variant of the sum kernel. LSTM: the fused persistent kernel (H <= 256) and
the alternating GEMM + pointwise path (H > 256), bidirectional, two layers, zero lengths, float32 and
bfloat16, forward and backward; EmbeddingLSTM projected-table inference and step(). Exits non-zero on
any Python error; the sanitizer reports memory errors itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import torch  # noqa: E402

import fastinterest.nn as fnn  # noqa: E402
import fastinterest.optim as fopt  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
torch.manual_seed(0)
V, D = 97, 37  # odd sizes: tails everywhere
idx = torch.randint(0, V, (200,), device=dev)
off = torch.tensor([0, 0, 5, 60, 61, 150], device=dev)  # an empty bag first
for mode in ("sum", "mean", "max"):
    for itype in (torch.int32, torch.int64):
        for opt in (None, "sgd", "adagrad", "rowwise", "adam", "sparse"):
            for det in (True, False):
                fused = {None: None, "sparse": None, "sgd": fopt.FusedSGD(0.1), "adagrad": fopt.FusedAdagrad(0.1),
                         "rowwise": fopt.FusedRowWiseAdagrad(0.1), "adam": fopt.FusedAdam(0.01)}[opt]
                m = fnn.EmbeddingBag(V, D, mode=mode, padding_idx=3, sparse=opt == "sparse", backend="ext",
                                     device=dev, fused_optimizer=fused, deterministic=det)
                psw = torch.rand(200, device=dev) if mode == "sum" else None
                y = m(idx.to(itype), off.to(itype), per_sample_weights=psw)
                y.backward(torch.randn_like(y))
for wd in (torch.float16, torch.bfloat16):
    m = fnn.EmbeddingBag(V, 300, mode="sum", backend="ext", device=dev, weight_dtype=wd)
    m(idx, off).sum().backward()
for Dw in (16, 64, 100, 256, 300):   # the sum kernel's 1, 2, 4, 8 columns per lane, and the general kernel
    for fused in (fopt.FusedRowWiseAdagrad(0.1), fopt.FusedAdam(0.01)):   # row-wise over several chunks at 300
        m = fnn.EmbeddingBag(V, Dw, mode="mean", backend="ext", device=dev, fused_optimizer=fused)
        for _ in range(2):
            m(idx, off).sum().backward()
dev == "cuda" and torch.cuda.synchronize()
print("embedding: ok")

for H in (64, 320):
    for dtype in (torch.float32, torch.bfloat16) if dev == "cuda" else (torch.float32,):
        ref = torch.nn.LSTM(24, H, num_layers=2, batch_first=True, bidirectional=True)
        m = fnn.LSTM.from_torch(ref, backend="ext").to(dev).to(dtype)
        x = torch.randn(9, 7, 24, device=dev, dtype=dtype, requires_grad=True)
        lengths = torch.tensor([7, 0, 3, 1, 7, 2, 0, 5, 6])
        o, (h, c) = m(x, lengths=lengths)
        (o.float().sum() + h.float().sum() + c.float().sum()).backward()
dev == "cuda" and torch.cuda.synchronize()
print("lstm: ok")

m = fnn.EmbeddingLSTM([1000, 10], 32, 64, num_layers=2).to(dev)
ids = [torch.randint(0, 1000, (8, 9), device=dev), torch.randint(0, 10, (8, 9), device=dev)]
with torch.no_grad():
    m(ids, torch.tensor([9, 0, 3, 9, 1, 2, 8, 9]))
    state = None
    for t in range(3):
        y, state = m.step([ids[0][:, t], ids[1][:, t]], state)
out, _ = m(ids, torch.full((8,), 9))
out.sum().backward()
dev == "cuda" and torch.cuda.synchronize()
print("embedding_lstm: ok")
