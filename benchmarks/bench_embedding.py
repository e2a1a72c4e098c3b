"""Embedding-bag benchmarks: forward and training step (forward + backward + optimizer) against
stock PyTorch (and fbgemm-gpu-cpu when installed), plus the memory probes that bound them.

    python benchmarks/bench_embedding.py                 # headline cases + sweep, CPU, 2 threads
    python benchmarks/bench_embedding.py --quick         # headline forward only (the README's quick table)
    python benchmarks/bench_embedding.py --device cuda   # on a GPU (used by gpu_check.sh)

Providers: torch (nn.EmbeddingBag; training = sparse gradient + torch.optim), fbgemm (CPU TBE with fused
SGD / row-wise Adagrad), fi-ext, fi-numba, fi-triton (GPU), and probe-* (memory system limits).
Correctness of every provider is checked against torch before it is timed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Sweep, check_close, measure, measure_interleaved, setup_threads  # noqa: E402

import torch  # noqa: E402

import fastinterest.nn as fnn  # noqa: E402
import fastinterest.optim as fopt  # noqa: E402
from fastinterest import _dispatch, _ext  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse invariant checks")


def make_indices(V, B, L, dist, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dist == "uniform":
        idx = torch.randint(0, V, (B * L,), generator=g)
    else:  # Zipf(1.05) over a random permutation of the rows: skewed like real item popularity
        ranks = torch.arange(1, V + 1, dtype=torch.float64)
        p = ranks.pow(-1.05)
        p /= p.sum()
        draws = torch.multinomial(p.float(), B * L, replacement=True, generator=g) if V <= 2**24 else \
            torch.randint(0, V, (B * L,), generator=g)
        perm = torch.randperm(V, generator=g)
        idx = perm[draws]
    offsets = torch.arange(0, B * L, L)
    return idx.to(device), offsets.to(device)


def sync_fn(device):
    return torch.cuda.synchronize if device == "cuda" else None


def fbgemm_tbe(V, D, weight, optimizer, lr):
    """fbgemm's CPU table-batched embedding (one table) with a fused optimizer, or None if absent."""
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                             SplitTableBatchedEmbeddingBagsCodegen)
    except Exception:
        return None
    opt = {"sgd": OptimType.EXACT_SGD, "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD}[optimizer]
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(V, D, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                optimizer=opt, learning_rate=lr, eps=1e-8)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(weight)
    return tbe


def fi_backends(device, dtype=torch.float32):
    names = {"ext": "fi-ext", "numba": "fi-numba", "triton": "fi-triton"}
    out = []
    for b in ("ext", "numba", "triton"):
        if _dispatch.why_not("embedding_bag", b, device, dtype) is None:
            if b == "triton" and device == "cpu":
                continue  # the interpreter is for tests only
            out.append((b, names[b]))
    return out


def bench_forward(sweep, V, D, B, L, dist, device, weight_dtypes=("float32",), psw=False, probe=True):
    torch.manual_seed(0)
    idx, offsets = make_indices(V, B, L, dist, device)
    w32 = torch.randn(V, D, device=device)
    ref = torch.nn.EmbeddingBag(V, D, mode="sum", _weight=w32, device=device)
    ps = torch.rand(B * L, device=device) if psw else None
    case = dict(V=V, D=D, B=B, L=L, dist=dist, psw=psw)
    sync = sync_fn(device)
    with torch.no_grad():
        expect = ref(idx, offsets, per_sample_weights=ps)
        # every provider is built and checked first, then all are timed round-robin (measure_interleaved)
        calls = {("torch", "float32"): lambda: ref(idx, offsets, per_sample_weights=ps)}
        elem = {"float32": 4}
        for wd in weight_dtypes:
            dt = getattr(torch, wd)
            elem[wd] = torch.tensor([], dtype=dt).element_size()
            for b, name in fi_backends(device, dt):
                mod = fnn.EmbeddingBag(V, D, mode="sum", _weight=w32, weight_dtype=dt, backend=b, device=device)
                got = mod(idx, offsets, per_sample_weights=ps)
                tol = 1e-4 if wd == "float32" else 5e-2 * math.sqrt(L)
                check_close(got, expect, atol=tol, rtol=1e-3 if wd == "float32" else 2e-2, what=f"{name} {wd}")
                calls[(name, wd)] = (lambda m: lambda: m(idx, offsets, per_sample_weights=ps))(mod)
        if device == "cpu" and not psw:
            tbe = fbgemm_tbe(V, D, w32, "sgd", 0.01)
            if tbe is not None:
                full_offsets = torch.cat([offsets, torch.tensor([B * L])]).long()
                got = tbe(idx.long(), full_offsets)
                check_close(got, expect, atol=1e-4, rtol=1e-3, what="fbgemm forward")
                calls[("fbgemm", "float32")] = lambda: tbe(idx.long(), full_offsets)
        if probe and device == "cpu" and hasattr(_ext.cpu(), "probe_gather_sum") and not psw:
            out = torch.empty(B, D)
            nt = torch.get_num_threads()
            w_probe = w32.clone()   # its own copy: w32 is torch's weight, which the probe would leave warm
            calls[("probe-gather", "float32")] = lambda: _ext.cpu().probe_gather_sum(
                w_probe.data_ptr(), D, idx.data_ptr(), B, L, out.data_ptr(), 8, nt)
        stats = measure_interleaved({k: fn for k, fn in calls.items()}, sync=sync)
        for (name, wd), st in stats.items():
            sweep.add({**case, "rows": wd}, name, st, GBps=B * L * D * elem[wd] / 1e6 / st["median_ms"])
        if probe and device == "cuda" and not psw:
            # the GPU ceiling: a device-to-device copy of 1 GiB (bytes read + written), the figure the
            # "% of HBM bandwidth" targets are read against
            src = torch.empty(2**28, device=device)
            dst = torch.empty_like(src)
            st = measure(lambda: dst.copy_(src), repeat=7, sync=sync)
            sweep.add({**case, "rows": "float32"}, "probe-copy", st, GBps=2 * src.numel() * 4 / 1e6 / st["median_ms"])
            del src, dst
        if probe and device == "cpu" and hasattr(_ext.cpu(), "probe_seq_read") and not psw:
            # streaming read of the whole table: the ceiling for any access pattern
            nt = torch.get_num_threads()
            st = measure(lambda: _ext.cpu().probe_seq_read(w32.data_ptr(), w32.numel(), nt), repeat=7)
            sweep.add({**case, "rows": "float32"}, "probe-seqread", st, GBps=w32.numel() * 4 / 1e6 / st["median_ms"])


TORCH_OPTS = {
    "sgd": (lambda p, lr: torch.optim.SGD(p, lr=lr), lambda lr: fopt.FusedSGD(lr)),
    "adagrad": (lambda p, lr: torch.optim.Adagrad(p, lr=lr), lambda lr: fopt.FusedAdagrad(lr)),
    "adam": (lambda p, lr: torch.optim.SparseAdam(p, lr=lr), lambda lr: fopt.FusedAdam(lr)),
    "rowwise_adagrad": (lambda p, lr: torch.optim.Adagrad(p, lr=lr), lambda lr: fopt.FusedRowWiseAdagrad(lr)),
}


def bench_train(sweep, V, D, B, L, dist, device, optimizer, lr=0.01):
    """One training step: forward, backward of a fixed upstream gradient, optimizer update."""
    torch.manual_seed(0)
    idx, offsets = make_indices(V, B, L, dist, device)
    w0 = torch.randn(V, D, device=device)
    grad = torch.randn(B, D, device=device)
    case = dict(V=V, D=D, B=B, L=L, dist=dist, opt=optimizer)
    sync = sync_fn(device)
    make_torch_opt, make_fused = TORCH_OPTS[optimizer]
    # baseline: torch's sparse gradient + the matching torch optimizer (row-wise Adagrad has no torch
    # equivalent; torch's element-wise Adagrad is its closest stock stand-in and is labelled as such)
    ref = torch.nn.EmbeddingBag(V, D, mode="sum", sparse=True, _weight=w0.clone(), device=device)
    topt = make_torch_opt(list(ref.parameters()), lr)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        ref(idx, offsets).backward(grad)
        topt.step()

    torch_step()
    expect = ref.weight.detach().clone()
    # the least bytes a fused step must move (the "% of HBM bandwidth" for backward + update is
    # read against these): gathered rows, the upstream gradient, each touched row and its optimizer
    # state read and written once
    U = int(torch.unique(idx).numel())
    state = {"sgd": 0, "adagrad": D, "rowwise_adagrad": 1, "adam": 2 * D}[optimizer]
    nbytes = 4 * (B * L * D + B * D + 2 * U * (D + state))

    def gbps(st):   # GPU rows only (the CPU tables keep their columns)
        return {} if device == "cpu" else {"GBps": nbytes / 1e6 / st["median_ms"]}

    st = measure(torch_step, sync=sync, repeat=7, warmup=1)
    sweep.add(case, "torch", st, **gbps(st))
    for b, name in fi_backends(device):
        mod = fnn.EmbeddingBag(V, D, mode="sum", _weight=w0.clone(), backend=b, device=device,
                               fused_optimizer=make_fused(lr))

        def fi_step():
            mod(idx, offsets).backward(grad)

        fi_step()
        if optimizer != "rowwise_adagrad":
            check_close(mod.weight.detach(), expect, atol=1e-4, rtol=1e-4, what=f"{name} {optimizer} first step")
        assert mod.weight.grad is None
        st = measure(fi_step, sync=sync, repeat=7, warmup=1)
        sweep.add(case, name, st, **gbps(st))
        del mod
    if device == "cpu" and optimizer in ("sgd", "rowwise_adagrad"):
        tbe = fbgemm_tbe(V, D, w0, optimizer, lr)
        if tbe is not None:
            off = torch.cat([offsets, torch.tensor([B * L])]).long()

            def fb_step():
                tbe(idx.long(), off).backward(grad)

            sweep.add(case, "fbgemm", measure(fb_step, repeat=7, warmup=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="headline forward cases only")
    ap.add_argument("--no-sweep", action="store_true", help="headline forward and training cases only")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = ap.parse_args(argv)
    setup_threads(args.threads)
    dev = args.device
    cmd = "python benchmarks/bench_embedding.py " + " ".join(argv if argv is not None else sys.argv[1:])
    half = ("float32", "float16", "bfloat16")
    V, D, B, L = 10**6, 64, 16384, 20
    fwd = Sweep("embedding_forward_headline", device=dev)
    for dist in ("uniform", "zipf"):
        bench_forward(fwd, V, D, B, L, dist, dev, weight_dtypes=half)
    if dev == "cuda":   # the headline case reads 84 MB, a few microseconds of HBM: add one that fills it
        bench_forward(fwd, 10**7, D, 65536, 50, "uniform", dev, weight_dtypes=half)
    fwd.write(args.out, command=cmd)
    if args.quick:
        return
    train = Sweep("embedding_train_headline", device=dev)
    for opt in ("sgd", "adagrad", "rowwise_adagrad", "adam"):
        bench_train(train, V, D, B, L, "uniform", dev, opt)
    bench_train(train, V, D, B, L, "zipf", dev, "rowwise_adagrad")
    train.write(args.out, command=cmd)
    if args.no_sweep:
        return
    sweep = Sweep("embedding_forward_sweep", device=dev)
    for Vs in (10**4, 10**5, 10**7):
        bench_forward(sweep, Vs, 64, B, L, "uniform", dev, probe=True)
    for Ds in (16, 128, 256):
        bench_forward(sweep, V, Ds, B, L, "uniform", dev)
    for Ls, Bs in ((1, 65536), (100, 4096)):
        bench_forward(sweep, V, D, Bs, Ls, "uniform", dev)
        bench_forward(sweep, V, D, Bs, Ls, "zipf", dev)
    bench_forward(sweep, V, D, B, L, "uniform", dev, psw=True)
    bench_forward(sweep, V, D, B, L, "zipf", dev, psw=True, weight_dtypes=half)
    sweep.write(args.out, command=cmd)
    tsweep = Sweep("embedding_train_sweep", device=dev)
    for Vs, Ds in ((10**5, 64), (10**7, 16), (10**6, 128)):
        bench_train(tsweep, Vs, Ds, B, L, "uniform", dev, "rowwise_adagrad")
        bench_train(tsweep, Vs, Ds, B, L, "uniform", dev, "sgd")
    tsweep.write(args.out, command=cmd)


if __name__ == "__main__":
    main()
