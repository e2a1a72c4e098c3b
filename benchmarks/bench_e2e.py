"""End-to-end InterestModel: training throughput (sequences/s) and evaluation time, on our layers
(`fastinterest.nn.Embedding` + `fastinterest.nn.LSTM`) vs the same model on stock torch layers
(`torch.nn.Embedding` + `torch.nn.LSTM`, packed — the textbook way — and padded), same data, same run.

    PYTHONPATH=python python benchmarks/bench_e2e.py [--events 60000] [--batch 256] [--hidden 128] [--dim 64]

Data: the synthetic generator (planted interests) -> prepare -> leave-last-out training examples.
Train: one optimizer step (forward, BCE losses with sampled negatives, backward, Adam) per batch over a
fixed list of length-bucketed batches; every provider starts from the same weights and must reach the
same loss on the first batch (checked before timing). Eval: user vectors + interest probabilities +
full item scores for the test split.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Sweep, check_close, measure_interleaved, setup_threads  # noqa: E402

PROVIDERS = {"fi-ext": "fastinterest", "torch": "torch", "torch_padded": "torch_padded"}


def build_data(events: int, seed: int, max_len: int):
    from fastinterest.cli import main as cli
    from fastinterest.train.data import load_splits

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    cli(["generate", "--events", str(events), "--out", str(tmp / "events.csv"), "--seed", str(seed)])
    cli(["prepare", "--events", str(tmp / "events.csv"), "--links", str(tmp / "events.links.csv"),
         "--out", str(tmp / "prepared")])
    splits, vocab, _ = load_splits(tmp / "prepared", max_len=max_len)
    return splits, vocab


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=60000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--batches", type=int, default=6, help="training batches per timed call")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup_threads(args.threads)
    warnings.simplefilter("ignore")
    import torch

    from fastinterest.models import ModelScorer
    from fastinterest.models.encoder import resolve_layers
    from fastinterest.train.trainer import InterestLoss, TrainConfig, Trainer, _length_buckets, vocab_sizes

    splits, vocab = build_data(args.events, 0, args.max_len)
    train, test = splits["train"], splits["test"]
    sizes = vocab_sizes(vocab, splits)
    rng = np.random.default_rng(0)
    batches = _length_buckets(rng.permutation(len(train)), np.asarray(train.lengths), args.batch, rng)[:args.batches]
    seqs = sum(len(b) for b in batches)
    print(f"data: {len(train)} train rows, {len(test)} test rows, V_item={sizes[0]}, C={sizes[1]}; "
          f"{len(batches)} batches, {seqs} sequences, mean length "
          f"{np.mean([train.lengths[b].mean() for b in batches]):.1f}")

    case = {"B": args.batch, "D": args.dim, "H": args.hidden, "T": args.max_len}
    sweep_train = Sweep("e2e_train", baseline="torch")
    sweep_eval = Sweep("e2e_eval", baseline="torch")
    ref_state, ref_loss = None, None
    train_fns, eval_fns = {}, {}
    for provider, layers in PROVIDERS.items():
        if resolve_layers(layers) != layers:
            print(f"skip {provider}: {layers} layers are not available here")
            continue
        cfg = TrainConfig(embedding_dim=args.dim, hidden_size=args.hidden, layers=layers, negatives=256, dropout=0.0)
        trainer = Trainer(cfg, progress=False)
        model = trainer.build_model(sizes)
        if ref_state is None:
            ref_state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ref_state)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = InterestLoss(model, cfg)
        gen = torch.Generator().manual_seed(0)
        negs = torch.randint(2, sizes[0], (cfg.negatives,), generator=gen)
        tensors = [trainer._batch_tensors(train, rows, "cpu") for rows in batches]

        # correctness first: the same first-batch loss as the stock torch model
        with torch.no_grad():
            first = loss_fn(*tensors[0], negs)[0]
        if ref_loss is None:
            ref_loss = first
        check_close(first, ref_loss, atol=1e-4, rtol=1e-4, what=f"{provider} first-batch loss")

        def train_pass(loss_fn=loss_fn, opt=opt, negs=negs, tensors=tensors):
            for ids, lengths, t_item, t_cat in tensors:
                loss = loss_fn(ids, lengths, t_item, t_cat, negs)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        def evaluate(scorer=ModelScorer(model, batch_size=1024)):
            scorer.category_scores(test)
            scorer.item_scores(test)

        train_fns[provider], eval_fns[provider] = train_pass, evaluate

    # the providers timed round-robin (harness.measure_interleaved): a slow spell of the shared machine
    # lands on all of them
    for provider, stats in measure_interleaved(train_fns, warmup=1, repeat=args.repeat, max_seconds=120).items():
        sweep_train.add(case, provider, stats, seq_per_s=seqs / (stats["median_ms"] / 1e3))
    for provider, stats in measure_interleaved(eval_fns, warmup=1, repeat=max(3, args.repeat // 2),
                                               max_seconds=120).items():
        sweep_eval.add({**case, "N": len(test)}, provider, stats, seq_per_s=len(test) / (stats["median_ms"] / 1e3))

    cmd = "PYTHONPATH=python python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:])
    out = sweep_train.write(command=cmd)
    sweep_eval.write(command=cmd)
    print(sweep_train.markdown())
    print(sweep_eval.markdown())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"{time.perf_counter() - t0:.0f} s")
    sys.exit(rc)
