"""`fastinterest pretrain DIR --method word2vec|cbow|glove --out FILE`."""
from __future__ import annotations

import argparse
import json
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain item/category vectors (item2vec or GloVe) on a prepared dir",
                              description=__doc__)
    p.add_argument("prepared", help="prepared data directory (from `fastinterest prepare`)")
    p.add_argument("--method", choices=["word2vec", "cbow", "glove"], default="word2vec")
    p.add_argument("--out", required=True, help="output .safetensors file (tensors 'item' and 'category')")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="default: 5 (word2vec/cbow), 25 (glove)")
    p.add_argument("--max-len", type=int, default=100)
    p.add_argument("--split", default="leave_last_out", help="split whose training part is used")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import pretrain_vectors, save_vectors
    from ..train.data import load_splits

    t0 = time.perf_counter()
    splits, vocab, _ = load_splits(args.prepared, max_len=args.max_len, split=args.split)
    sizes = {f: len(vocab[f]["tokens"]) for f in ("item", "category")}
    vectors, info = pretrain_vectors(splits["train"], sizes, args.method, dim=args.dim, window=args.window,
                                     epochs=args.epochs, seed=args.seed)
    info["prepared"] = str(args.prepared)
    save_vectors(args.out, vectors, info)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out}")
    return 0
