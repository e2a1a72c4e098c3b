"""`fastinterest train DIR --out RUN`, `fastinterest evaluate RUN [DIR]`, `fastinterest demo`.

Distributed training on CPU (gloo) or GPU (nccl):
    torchrun --nproc_per_node=2 -m fastinterest train DIR --out RUN
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .trainer import TrainConfig

_HELP = {
    "model": "lstm (InterestModel) or mlp (the MLP baseline)",
    "layers": "fastinterest | torch | torch_padded",
    "metric": "early-stopping metric on the validation split (a+b sums two)",
    "pretrained": "safetensors vectors from `fastinterest pretrain` (sets embedding_dim)",
    "dense": "also train at every earlier step of each history",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=_HELP.get(f.name))
        else:
            typ = {"label_window": int}.get(f.name, type(f.default) if f.default is not None else str)
            p.add_argument(flag, type=typ, default=f.default, help=_HELP.get(f.name))


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an interest model on a prepared dir",
                              description="Train InterestModel (or the MLP baseline) into a run directory. "
                                          "Resumes from RUN/checkpoint when present. Under torchrun, trains "
                                          "with DistributedDataParallel.")
    p.add_argument("prepared", help="prepared data directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--max-len", type=int, default=100)
    p.add_argument("--split", default="leave_last_out", choices=["leave_last_out", "time"])
    p.add_argument("--label-window-events", type=int, default=5)
    p.add_argument("--train-stride", type=int, default=20, help="events between training cuts of a person")
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN has checkpoints")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm progress bars")
    _add_config_args(p)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("evaluate", help="evaluate a run against the baselines (writes RUN/metrics.json)")
    e.add_argument("run", help="run directory")
    e.add_argument("prepared", nargs="?", default=None, help="prepared dir (default: the one the run used)")
    e.add_argument("--split", default="test", choices=["test", "valid"])
    e.add_argument("--exclude-seen", action="store_true", help="full ranking without the person's seen items")
    e.add_argument("--no-baselines", action="store_true")
    e.add_argument("--compare", nargs="*", default=[], help="other run dirs (e.g. the MLP) to report as baselines")
    e.add_argument("--truth", default=None, help="synthetic truth.json: also score planted-interest recovery")
    e.set_defaults(func=run_evaluate)

    d = subparsers.add_parser("demo", help="synthetic data -> prepare -> pretrain -> train -> evaluate -> examples")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--events", type=int, default=60000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--layers", default="fastinterest")
    d.set_defaults(func=run_demo)


def _config_from_args(args) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if cfg.pretrained:
        from ..pretrain import load_vectors

        vecs, _ = load_vectors(cfg.pretrained)
        dims = {int(v.shape[1]) for v in vecs.values()}
        if len(dims) == 1:
            cfg.embedding_dim = dims.pop()
    return cfg


def train_on_prepared(prepared, out, cfg: TrainConfig, *, max_len=100, split="leave_last_out",
                      label_window_events=5, train_stride=20, resume=True, progress=None, log=print) -> dict:
    from .data import load_splits
    from .trainer import Trainer

    splits, vocab, data = load_splits(prepared, max_len=max_len, split=split, label_window_events=label_window_events,
                                      train_stride=train_stride)
    if not len(splits["train"]):
        raise ValueError(_no_training_examples(data, split, label_window_events))
    info = {"prepared": str(Path(prepared).resolve()), "max_len": max_len, "split": split,
            "label_window_events": label_window_events, "train_stride": train_stride,
            **{f"n_{k}": len(v) for k, v in splits.items()}}
    if cfg.label_window is None:  # dense interest labels: by default the same window as the data's labels
        cfg = dataclasses.replace(cfg, label_window=label_window_events)
    trainer = Trainer(cfg, progress=progress, log=log)
    return trainer.fit(splits, out, vocab=vocab, data_info=info, resume=resume)


def _no_training_examples(prepared, split: str, window: int) -> str:
    """Why a split has no training examples, and what to change (short sequences, e.g. Amazon CDSR: 6..15 events)."""
    import numpy as np

    n = np.diff(prepared.events.person_offsets(prepared.n_persons))
    n = n[n > 0]
    lengths = (f"persons have {int(np.median(n))} events (median; max {int(n.max())})" if len(n) else "there are no events")
    if split == "leave_last_out":
        why = (f"each person's last {window} events label the test split and the {window} before them the validation "
               f"split; a training example needs >= 1 input event and labels that end before those, i.e. more than "
               f"{2 * window} events (more when events share a timestamp)")
    else:
        why = "no person has a full label window before the global time cut"
    return (f"no training examples: {why}, and {lengths}. Use a shorter label window (--label-window-events 1 "
            f"predicts the next event, the leave-one-out protocol of sequential recommendation) or another split.")


def run_train(args) -> int:
    cfg = _config_from_args(args)
    try:
        summary = train_on_prepared(args.prepared, args.out, cfg, max_len=args.max_len, split=args.split,
                                    label_window_events=args.label_window_events, train_stride=args.train_stride,
                                    resume=not args.no_resume,
                                    progress=args.progress)
    except ValueError as exc:
        if not str(exc).startswith("no training examples"):
            raise
        print(f"fastinterest train: error: {exc}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        print(json.dumps({k: summary[k] for k in ("best", "epochs_run", "run_dir", "layers_used", "world_size")}))
    return 0


def run_evaluate(args) -> int:
    from .evaluation import evaluate_run

    res = evaluate_run(args.run, args.prepared, split=args.split, baselines=not args.no_baselines,
                       exclude_seen=args.exclude_seen, compare=args.compare, truth=args.truth)
    print(f"wrote {res['_paths']['metrics']} and {res['_paths']['report']}")
    return 0


def run_demo(args) -> int:
    """The whole pipeline on synthetic data with planted interests, in a few minutes on 2 cores."""
    from ..apps import InterestApp, Run
    from ..cli import main as cli_main
    from ..pretrain import pretrain_vectors, save_vectors
    from .data import load_splits
    from .evaluation import evaluate_run

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events, prepared, run_dir = out / "events.csv", out / "prepared", out / "run"
    vectors = out / "item2vec.safetensors"

    def step(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    step(f"generate {args.events} synthetic events -> {events}")
    rc = cli_main(["generate", "--events", str(args.events), "--out", str(events), "--seed", str(args.seed)])
    if rc:
        return rc
    truth = _find_truth(events)
    step(f"prepare -> {prepared}")
    links = events.with_name(f"{events.stem}.links.csv")
    rc = cli_main(["prepare", "--events", str(events), "--out", str(prepared)]
                  + (["--links", str(links)] if links.exists() else []))
    if rc:
        return rc
    step("pretrain item2vec (skip-gram) on the training sequences")
    splits, vocab, _ = load_splits(prepared)
    sizes = {f: len(vocab[f]["tokens"]) for f in ("item", "category")}
    vecs, info = pretrain_vectors(splits["train"], sizes, "word2vec", dim=32, seed=args.seed)
    save_vectors(vectors, vecs, info)
    step(f"train InterestModel ({args.layers} layers) -> {run_dir}")
    cfg = TrainConfig(epochs=args.epochs, embedding_dim=32, hidden_size=64, layers=args.layers, pretrained=str(vectors),
                      seed=args.seed, patience=3, batch_size=128)
    train_on_prepared(prepared, run_dir, cfg, resume=False, progress=False)
    step("evaluate against the baselines")
    res = evaluate_run(run_dir, prepared, truth=truth)
    step("example outputs")
    app = InterestApp.from_prepared(Run.load(run_dir), prepared)
    person = app.persons[0]
    print(f"person {app.person_name(person)}: interests {_short(app.predict_interests(person, k=3))}")
    print(f"  recommend: {_short(app.recommend(person, k=5))}")
    print(f"  similar users: {_short(app.similar_users(person, k=3))}")
    top_cat = app.predict_interests(person, k=1)[0][0]
    ex = app.explain(person, top_cat, k=3)
    print(f"  why {top_cat} ({ex['method']}): " + "; ".join(
        f"{e['item']}/{e['category']} {e['contribution']:+.3f}" for e in ex["events"]))
    print(f"  target users for {top_cat}: {_short(app.target_users(top_cat, k=3))}")
    planted = res.get("planted") or {}
    if planted:
        print(f"planted interests recovered: all in top-3 for {planted.get('all_in_top3', float('nan')):.1%} of "
              f"{planted.get('persons')} persons, planted-interest AUC {planted.get('auc', float('nan')):.4f} "
              f"(next-window interest AUC on the test split {res['auc']:.4f})")
    step(f"done: report {res['_paths']['report']}")
    return 0


def _short(pairs) -> str:
    return ", ".join(f"{a} ({b:.3f})" for a, b in pairs)


def _find_truth(events: Path):
    for cand in (events.with_name("truth.json"), events.parent / f"{events.stem}.truth.json",
                 events.with_suffix(".truth.json")):
        if cand.exists():
            return cand
    print("note: the generator wrote no truth.json; planted-interest recovery is skipped", file=sys.stderr)
    return None
