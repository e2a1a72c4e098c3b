"""LSTM / EmbeddingLSTM benchmarks (issue 3): inference, training (forward + backward), B=1 latency and
serving step(), against stock PyTorch from the same run.

    python benchmarks/bench_lstm.py                 # CPU, 2 threads (~5 minutes)
    python benchmarks/bench_lstm.py --quick         # the headline cases only
    python benchmarks/bench_lstm.py --device cuda   # GPU: cudnn vs fi-ext / fi-triton

Data: full-length sequences, and a length mix drawn from the real per-user event counts of the Taobao
UserBehavior head + tail slices (../shared/data/taobao_userbehavior; full 9-day histories), truncated
at T = 100. Models: EmbeddingLSTM (V = 100k, the interest layer) against nn.Embedding + nn.LSTM run
padded ("torch") or packed ("torch_packed"); plain LSTM for the B = 1 latency and step().
Correctness is checked against torch before anything is timed; the providers of one case are timed
round-robin (harness.measure_interleaved). Results: benchmarks/results/<device>/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))

import harness  # noqa: E402
from harness import Sweep, check_close, measure, measure_interleaved, setup_threads  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "taobao_userbehavior"
V = 100_000


LENGTHS_FILE = None  # --lengths-file: the same counts, one per line (a GPU machine has no ../shared)


def taobao_lengths() -> list[int]:
    """Per-user event counts of the head + tail slices (complete histories)."""
    if LENGTHS_FILE is not None:
        return [int(x) for x in Path(LENGTHS_FILE).read_text().split()]
    counts: dict[tuple[str, str], int] = {}
    for part in ("fattydelivery_head", "betashepherd_tail"):
        path = DATA / part / "UserBehavior.csv"
        if not path.exists():
            continue
        with open(path) as f:
            for line in f:
                key = (part, line.split(",", 1)[0])
                counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise SystemExit(f"no Taobao data under {DATA}")
    return list(counts.values())


def length_mix(B: int, T: int, seed: int = 0):
    import torch

    real = torch.tensor(taobao_lengths())
    g = torch.Generator().manual_seed(seed)
    pick = real[torch.randint(0, real.numel(), (B,), generator=g)]
    return pick.clamp(max=T)


class Case:
    """One EmbeddingLSTM workload and its providers."""

    def __init__(self, device, B, T, E, H, lengths, seed=0):
        import torch

        import fastinterest.nn as fnn

        torch.manual_seed(seed)
        self.device, self.B, self.T, self.E, self.H = device, B, T, E, H
        self.lengths = lengths
        self.ids = torch.randint(0, V, (B, T), device=device)
        self.emb = torch.nn.Embedding(V, E).to(device)
        self.lstm = torch.nn.LSTM(E, H, batch_first=True).to(device)
        self.fi = fnn.EmbeddingLSTM.from_torch(self.emb, self.lstm).to(device)
        self.full = bool((lengths == T).all())

    # -------------------------------------------------------------- torch providers
    def torch_padded(self, grad: bool):
        x = self.emb(self.ids)
        out, (h, c) = self.lstm(x)
        return out, h

    def torch_packed(self, grad: bool):
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        x = self.emb(self.ids)
        ps = pack_padded_sequence(x, self.lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(ps)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=self.T)
        return out, h

    def fi_run(self, grad: bool):
        out, (h, c) = self.fi(self.ids, self.lengths)
        return out, h

    def train_step(self, fn, params):
        def run():
            for p in params:
                p.grad = None
            out, h = fn(True)
            (out.sum() + h.sum()).backward()
        return run


def _sync(device):
    import torch

    return torch.cuda.synchronize if device == "cuda" else None


def bench_embedding_lstm(args, sweeps):
    import torch

    device = args.device
    inf = sweeps["inference"]
    trn = sweeps["training"]
    shapes = [(64, 128)] if args.quick else [(64, 128), (128, 256)]
    # GPU targets: >= 2x cuDNN at B <= 64 and >= cuDNN at B = 1024 with variable lengths
    batches = (256,) if device == "cpu" else (64, 256, 1024)
    for B, (E, H), mix in ((B, s, m) for B in batches for s in shapes for m in ("full", "taobao")):
        if args.quick and (E, H) != (64, 128):
            continue
        T = 50 if mix == "full" else 100
        lengths = torch.full((B,), T) if mix == "full" else length_mix(B, T)
        T = int(lengths.max()) if mix == "taobao" else T
        lengths = lengths.clamp(max=T)
        c = Case(device, B, T, E, H, lengths)
        case = {"model": "EmbeddingLSTM", "B": B, "T": T, "E": E, "H": H, "V": V, "lengths": mix,
                "mean_len": round(float(lengths.float().mean()), 1)}
        sync = _sync(device)
        # correctness first (valid steps and final state)
        with torch.no_grad():
            ref_out, ref_h = c.torch_packed(False)
            out, h = c.fi_run(False)
        check_close(out, ref_out, atol=2e-4, rtol=1e-3, what=f"fi-ext output {case}")
        check_close(h, ref_h, atol=2e-4, rtol=1e-3, what=f"fi-ext h_n {case}")
        rep = 7 if H >= 256 else 11
        heavy = dict(repeat=rep, warmup=2, sync=sync)
        # the providers of a case are timed round-robin (harness.measure_interleaved): on this shared
        # machine a slow spell then lands on all of them instead of on whichever ran during it
        base = "cudnn" if device == "cuda" else "torch"
        with torch.no_grad():
            fns = {base: lambda: c.torch_padded(False)}
            if not c.full:
                fns["torch_packed"] = lambda: c.torch_packed(False)
            fns["fi-ext"] = lambda: c.fi_run(False)
            for name, stats in measure_interleaved(fns, **heavy).items():
                inf.add(case, name, stats)
            if args.compile and (E, H) == (64, 128):
                comp = torch.compile(lambda: c.torch_padded(False))
                comp()
                inf.add(case, "torch_compile", measure(comp, **heavy))
            for be in (args.fallbacks if B == 256 else ()):   # the fallbacks at one batch size
                c.fi.lstm.backend = be
                inf.add(case, f"fi-{be}", measure(lambda: c.fi_run(False), repeat=3, warmup=1, sync=sync))
            c.fi.lstm.backend = None
        # training: forward + backward (dense embedding gradient on both sides)
        tparams = list(c.emb.parameters()) + list(c.lstm.parameters())
        fparams = list(c.fi.parameters())
        for p in tparams + fparams:
            p.grad = None
        out, h = c.fi_run(True)
        (out.sum() + h.sum()).backward()
        rout, rh = c.torch_packed(True)
        (rout.sum() + rh.sum()).backward()
        for (n, p), q in zip(c.lstm.named_parameters(), c.fi.lstm.parameters()):
            check_close(q.grad, p.grad, atol=2e-3, rtol=2e-3, what=f"grad {n} {case}")
        check_close(c.fi.embedding.weight.grad, c.emb.weight.grad, atol=2e-3, rtol=2e-3,
                    what=f"grad embedding {case}")
        fns = {base: c.train_step(c.torch_padded, tparams)}
        if not c.full:
            fns["torch_packed"] = c.train_step(c.torch_packed, tparams)
        fns["fi-ext"] = c.train_step(c.fi_run, fparams)
        for name, stats in measure_interleaved(fns, **heavy).items():
            trn.add(case, name, stats)
        for be in (args.fallbacks if B == 256 else ()):
            c.fi.lstm.backend = be
            trn.add(case, f"fi-{be}", measure(c.train_step(c.fi_run, fparams), repeat=3, warmup=1, sync=sync))
        c.fi.lstm.backend = None
        if args.out_each:   # after every case: a run stopped by a time limit keeps what it measured
            for sw in (inf, trn):
                sw.write(Path(args.out_each), command="(partial)")


def bench_latency(args, sweep):
    """B = 1 (and small B) whole-sequence inference and one serving step()."""
    import torch

    import fastinterest.nn as fnn

    device = args.device
    sync = _sync(device)
    shapes = [(64, 128)] if args.quick else [(64, 128), (128, 256)]
    for E, H in shapes:
        torch.manual_seed(0)
        ref = torch.nn.LSTM(E, H, batch_first=True).to(device)
        m = fnn.LSTM.from_torch(ref).to(device)
        base = "cudnn" if device == "cuda" else "torch"
        for B, T in ((1, 50), (16, 50)) if not args.quick else ((1, 50),):
            x = torch.randn(B, T, E, device=device)
            with torch.no_grad():
                check_close(m(x)[0], ref(x)[0], atol=2e-5, rtol=1e-4, what="B=1 output")
                case = {"model": "LSTM", "B": B, "T": T, "E": E, "H": H, "op": "forward"}
                for name, stats in measure_interleaved({base: lambda: ref(x), "fi-ext": lambda: m(x)}, repeat=200,
                                                       warmup=20, sync=sync).items():
                    sweep.add(case, name, stats)
        # serving: advance a batch of users by one event
        for B in (1, 64):
            x = torch.randn(B, E, device=device)
            hx = (torch.randn(1, B, H, device=device), torch.randn(1, B, H, device=device))
            with torch.no_grad():
                y, _ = m.step(x, hx)
                r, _ = ref(x.unsqueeze(1), hx)
                check_close(y, r[:, 0], atol=2e-5, rtol=1e-4, what="step")
                case = {"model": "LSTM", "B": B, "T": 1, "E": E, "H": H, "op": "step"}
                fns = {base: lambda: ref(x.unsqueeze(1), hx), "fi-ext": lambda: m.step(x, hx)}
                for name, stats in measure_interleaved(fns, repeat=300, warmup=20, sync=sync).items():
                    sweep.add(case, name, stats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="headline cases only")
    ap.add_argument("--compile", action="store_true", help="add torch.compile providers (slow to compile)")
    ap.add_argument("--fallbacks", default="", help="comma list of extra backends to time: numba,triton")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/)")
    ap.add_argument("--lengths-file", default=None,
                    help="per-user event counts, one per line, instead of reading ../shared/data (GPU machine)")
    ap.add_argument("--write-lengths", default=None, metavar="FILE",
                    help="write the per-user event counts from ../shared/data to FILE and exit (for --lengths-file)")
    args = ap.parse_args(argv)
    args.out_each = args.out if args.device == "cuda" else None
    if args.write_lengths:
        Path(args.write_lengths).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_lengths).write_text("\n".join(map(str, taobao_lengths())) + "\n")
        return
    global LENGTHS_FILE
    LENGTHS_FILE = args.lengths_file
    args.fallbacks = [b for b in args.fallbacks.split(",") if b]
    setup_threads(args.threads)
    if args.device == "cuda":
        import torch

        os.environ.pop("TRITON_INTERPRET", None)
        # cuDNN's LSTM uses TF32 tensor cores by default; ours computes in full float32, so compare
        # like with like (and the correctness checks before timing hold at float32 tolerances)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sweeps = {"inference": Sweep("embedding_lstm_inference", baseline="cudnn" if args.device == "cuda" else "torch",
                                 device=args.device),
              "training": Sweep("embedding_lstm_training", baseline="cudnn" if args.device == "cuda" else "torch",
                                device=args.device)}
    lat = Sweep("lstm_latency", baseline="cudnn" if args.device == "cuda" else "torch", device=args.device)
    bench_latency(args, lat)
    if args.out_each:
        lat.write(Path(args.out_each), command="(partial)")
    bench_embedding_lstm(args, sweeps)
    cmd = "python benchmarks/bench_lstm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for s in (lat, *sweeps.values()):
        out = s.write(Path(args.out) if args.out else None, command=cmd.strip())
    print(f"results in {out}")
    print(lat.markdown())
    for s in sweeps.values():
        print(s.markdown())


if __name__ == "__main__":
    main()
