"""Evaluate a run directory against the baselines on one split and write RUN/metrics.json + report.

    result = evaluate_run("runs/demo", "data/prepared")        # test split, baselines, plots
    result["ndcg@10"], result["baselines"]["item_knn"]["ndcg@10"]

The data split is rebuilt with the parameters the run was trained with (config.json "data"), the
baselines are fitted on its training part, and every scorer goes through `evaluate_scorer` (same
protocol, same decision-threshold rule: chosen on the validation split).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..metrics import default_baselines, evaluate_scorer, write_report
from ..metrics.report import HEADLINE, metrics_table
from .data import load_splits

__all__ = ["evaluate_run", "planted_metrics", "planted_recovery", "read_train_log"]


def read_train_log(run_dir) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def planted_metrics(scores: np.ndarray, persons, lengths, planted: dict, k: int = 3) -> dict:
    """How well category scores [P, C] (one row per person) recover planted (synthetic ground-truth) interests.

    planted: {person id: set of category ids}; persons/lengths: the rows' person ids and history lengths
    (persons without history or without planted interests are skipped).
    `auc`: ROC-AUC of the scores against the planted sets over all (person, category) pairs (pad/unk
    columns left out); `all_in_top{k}`: share of persons whose planted categories (any k of them when more
    than k were planted) are all among their top k; `recall@{k}`: mean share of planted categories found.
    """
    from ..metrics import roc_auc

    scores = np.array(scores, dtype=np.float64, copy=True)
    persons, lengths = np.asarray(persons), np.asarray(lengths)
    rows = [r for r, p in enumerate(persons) if planted.get(int(p)) and lengths[r] > 0]
    if not rows:
        return {"auc": float("nan"), f"all_in_top{k}": float("nan"), f"recall@{k}": float("nan"), "persons": 0}
    truth = np.zeros((len(rows), scores.shape[1]), dtype=bool)
    for i, r in enumerate(rows):
        truth[i, sorted(planted[int(persons[r])])] = True
    sub = scores[rows]
    auc = roc_auc(truth[:, 2:], sub[:, 2:])
    sub[:, :2] = -np.inf
    top = np.argsort(-sub, axis=1, kind="stable")[:, :k]
    found = truth[np.arange(len(rows))[:, None], top].sum(1)
    need = np.minimum(truth.sum(1), k)
    return {"auc": auc, f"all_in_top{k}": float(np.mean(found >= need)), f"recall@{k}": float(np.mean(found / need)),
            "persons": len(rows)}


def planted_recovery(app, planted: dict, k: int = 3) -> dict:
    """`planted_metrics` of a trained run (an `InterestApp`: every person's full history)."""
    probs = app.run.interest_probabilities(app.user_vectors())
    return planted_metrics(probs, app.persons, app.histories.lengths, planted, k)


def evaluate_run(run_dir, prepared_dir=None, *, split: str = "test", baselines: bool = True,
                 exclude_seen: bool = False, compare=(), truth=None, write: bool = True, log=print) -> dict:
    """Metrics of the run (top level) and of the baselines (and other runs in `compare`) under "baselines"."""
    from ..apps import InterestApp, Run

    t0 = time.perf_counter()
    run = Run.load(run_dir)
    prepared_dir = prepared_dir or run.prepared_dir
    splits, vocab, prepared = load_splits(prepared_dir, **run.data_params)
    test, valid = splits[split], splits.get("valid")
    kw = dict(exclude_seen=exclude_seen, platform_names=vocab["platform"]["tokens"], keep_curves=True)
    main = evaluate_scorer(run.scorer, test, valid, **kw)
    others: dict[str, dict] = {}
    fitted = {}
    if baselines:
        sizes = (len(vocab["item"]["tokens"]), len(vocab["category"]["tokens"]))
        for b in default_baselines():
            fitted[b.name] = b.fit(splits["train"], *sizes)
            others[b.name] = evaluate_scorer(b, test, valid, **kw)
    for other_dir in compare:
        other = Run.load(other_dir)
        name = f"{other.config['model']['encoder']}:{Path(other_dir).name}"
        others[name] = evaluate_scorer(other.scorer, test, valid, **kw)
    extra = {"split": split, "run": str(run_dir), "data": str(prepared_dir),
             "model": run.config["model"]["encoder"], "layers": run.model.layers,
             "n_train": len(splits["train"]), "n_valid": len(valid) if valid is not None else 0, "n_test": len(test)}
    if truth is not None:
        from ..data import planted_interests

        app = InterestApp.from_prepared(run, prepared_dir)
        planted = planted_interests(truth, prepared_dir)
        extra["planted"] = planted_recovery(app, planted)
        for name, b in fitted.items():  # the baselines, on the same full histories
            others[name]["planted"] = planted_metrics(b.category_scores(app.histories), app.persons,
                                                      app.histories.lengths, planted)
    extra["seconds"] = time.perf_counter() - t0
    result = {**main, "baselines": others, **extra}
    if write:
        paths = write_report(run_dir, main, others, main_name=f"{run.config['model']['encoder']} (this run)",
                             train_log=read_train_log(run_dir), extra=extra)
        result["_paths"] = {k: str(v) for k, v in paths.items()}
    if log:
        log(metrics_table({f"{run.config['model']['encoder']} (this run)": main, **others}, HEADLINE))
        if "planted" in extra:
            rows = {"model": extra["planted"], **{n: r["planted"] for n, r in others.items() if "planted" in r}}
            log("planted interests (synthetic truth):\n" + metrics_table(rows, ["auc", "all_in_top3", "recall@3"]))
    return result
