"""Where the time of the GPU paths goes: torch.profiler over a few calls of each hot path, printing the
CUDA kernels' total time against the wall time per call (the gap is host overhead: Python, launches,
synchronisations). Run by benchmarks/gpu_check.sh (stage `profile`):

    python3 benchmarks/gpu_profile.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fastinterest.nn as fnn  # noqa: E402
import fastinterest.optim as fopt  # noqa: E402

torch.backends.cudnn.allow_tf32 = False
dev = "cuda"


def report(name, fn, calls=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    kern = sorted((e for e in ev if e.device_time_total > 0 and e.device_type.name == "CUDA"),
                  key=lambda e: -e.device_time_total)
    gpu = sum(e.device_time_total for e in kern) / calls / 1e3
    print(f"\n## {name}: wall {wall:.3f} ms per call, GPU kernels {gpu:.3f} ms per call")
    for e in kern[:8]:
        print(f"  {e.device_time_total / calls / 1e3:8.3f} ms  x{e.count // calls:<4d} {e.key[:90]}")
    syncs = [e for e in ev if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense")]
    for e in syncs:
        print(f"  host: {e.key} x{e.count // calls} per call")


torch.manual_seed(0)
V, D, B, L = 10**6, 64, 16384, 20
idx = torch.randint(0, V, (B * L,), device=dev)
off = torch.arange(0, B * L, L, device=dev)
ref = torch.nn.EmbeddingBag(V, D, mode="sum", device=dev)
ours = fnn.EmbeddingBag.from_torch(ref)
with torch.no_grad():
    report("nn.EmbeddingBag forward V=1M D=64 16384x20", lambda: ref(idx, off))
    report("fi EmbeddingBag forward (ext)", lambda: ours(idx, off))
g = torch.randn(B, D, device=dev)
train = fnn.EmbeddingBag(V, D, mode="sum", device=dev, fused_optimizer=fopt.FusedSGD(0.01))
report("fi EmbeddingBag forward+backward+SGD (ext)", lambda: train(idx, off).backward(g))

for Bq, H in ((1, 128), (64, 128), (1024, 128)):
    lstm = torch.nn.LSTM(64, H, batch_first=True).to(dev)
    m = fnn.LSTM.from_torch(lstm)
    x = torch.randn(Bq, 50, 64, device=dev)
    lengths = torch.full((Bq,), 50)
    with torch.no_grad():
        report(f"cuDNN LSTM B={Bq} T=50 H={H}", lambda: lstm(x))
        report(f"fi LSTM B={Bq} T=50 H={H} (lengths=)", lambda: m(x, lengths=lengths))
