"""Evaluation report: metrics.json, report.md and PNG plots (ROC, precision-recall, training curves,
per-platform breakdown).

metrics.json layout (serving and the CLI read it):
    {"auc": ..., "gauc": ..., "accuracy": ..., "precision": ..., "recall": ..., "f1": ..., "hr@10": ...,
     "ndcg@10": ..., "mrr": ..., <more model metrics>, "per_platform": {...}, "protocol": {...},
     "baselines": {"most_popular": {same keys}, "personal_frequency": {...}, "item_knn": {...}},
     "split": "test", "run": "...", "data": "..."}
NaN values are written as null.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .classification import pr_curve, roc_curve

__all__ = ["write_json_atomic", "clean_for_json", "metrics_table", "write_report", "HEADLINE"]

HEADLINE = ["auc", "gauc", "accuracy", "precision", "recall", "f1", "hr@10", "ndcg@10", "mrr"]


def clean_for_json(obj):
    """Drop private keys (leading underscore), turn numpy scalars into Python and NaN/inf into None."""
    if isinstance(obj, dict):
        return {str(k): clean_for_json(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [clean_for_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path, obj) -> None:
    """Write JSON to `path` via a temporary file and os.replace (readers never see a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(clean_for_json(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def metrics_table(rows: dict[str, dict], keys=HEADLINE) -> str:
    """Markdown table: one row per scorer, one column per metric; the best value of each column in bold."""
    best = {}
    for k in keys:
        vals = [r.get(k) for r in rows.values() if isinstance(r.get(k), (int, float)) and math.isfinite(r.get(k))]
        if vals:
            best[k] = min(vals) if k in ("log_loss",) else max(vals)
    lines = ["| scorer | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k)
            s = _fmt(v)
            cells.append(f"**{s}**" if k in best and v == best[k] else s)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(path: Path, curves: dict, kind: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, (y, s) in curves.items():
        if kind == "roc":
            x, yy, _ = roc_curve(y, s)
        else:
            yy, x, _ = pr_curve(y, s)
        # thin out very long curves for small PNGs
        step = max(1, len(x) // 2000)
        ax.plot(x[::step], yy[::step], label=name, lw=1.2)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", lw=0.7)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("interest ROC (person x category)")
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("interest precision-recall")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(path: Path, log: list[dict]) -> None:
    plt = _plt()
    epochs = [r["epoch"] for r in log]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    axes[0].plot(epochs, [r.get("train_loss") for r in log], marker="o", label="train loss")
    if any("valid_loss" in r for r in log):
        axes[0].plot(epochs, [r.get("valid_loss") for r in log], marker="o", label="valid loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    for key in ("valid_auc", "valid_ndcg@10", "valid_hr@10"):
        if any(key in r for r in log):
            axes[1].plot(epochs, [r.get(key) for r in log], marker="o", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].legend(fontsize=7)
    fig.suptitle("training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_platforms(path: Path, rows: dict[str, dict]) -> None:
    plt = _plt()
    platforms = sorted({p for r in rows.values() for p in (r.get("per_platform") or {})})
    if not platforms:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    width = 0.8 / max(1, len(rows))
    for i, (name, r) in enumerate(rows.items()):
        per = r.get("per_platform") or {}
        for ax, key in zip(axes, ("auc", "ndcg@10")):
            vals = [(per.get(p) or {}).get(key) or 0.0 for p in platforms]
            ax.bar([j + i * width for j in range(len(platforms))], vals, width, label=name)
    for ax, key in zip(axes, ("interest AUC", "NDCG@10")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(platforms))])
        ax.set_xticklabels(platforms, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{key} by platform of the last event")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir, main: dict, baselines: dict[str, dict] | None = None, *, main_name: str = "model",
                 train_log: list[dict] | None = None, extra: dict | None = None,
                 metrics_file: str = "metrics.json") -> dict[str, Path]:
    """Write metrics.json (main metrics at top level, baselines under "baselines"), report.md and plots.

    main / baselines[name]: dicts from `evaluate_scorer` (with keep_curves=True to get ROC/PR plots).
    Returns the paths written.
    """
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    baselines = baselines or {}
    doc = {**main, "baselines": baselines, **(extra or {})}
    paths = {"metrics": out_dir / metrics_file}
    write_json_atomic(paths["metrics"], doc)

    rows = {main_name: main, **baselines}
    curves = {n: (r["_curve_true"], r["_curve_score"]) for n, r in rows.items() if "_curve_true" in r}
    if curves:
        _plot_curves(plots / "roc.png", curves, "roc")
        _plot_curves(plots / "pr.png", curves, "pr")
        paths["roc"], paths["pr"] = plots / "roc.png", plots / "pr.png"
    if train_log:
        _plot_training(plots / "training.png", train_log)
        paths["training"] = plots / "training.png"
    if any(r.get("per_platform") for r in rows.values()):
        _plot_platforms(plots / "platforms.png", rows)
        paths["platforms"] = plots / "platforms.png"

    md = ["# Evaluation report", ""]
    for k, v in (extra or {}).items():
        if isinstance(v, (str, int, float)):
            md.append(f"- {k}: `{v}`")
    proto = main.get("protocol") or {}
    if proto:
        md.append(f"- protocol: {json.dumps(clean_for_json(proto))}")
    md += ["", "## Headline metrics", "", metrics_table(rows), ""]
    more = ["auc_macro", "f1_macro", "log_loss", "threshold"] + sorted(
        k for k in main if k.startswith(("sampled", "click_auc")))
    md += ["## More metrics", "", metrics_table(rows, more), ""]
    per = main.get("per_platform") or {}
    if per:
        md += ["## Per platform (model)", "", "| platform | n | auc | ndcg@10 | hr@10 |", "|---|---:|---:|---:|---:|"]
        for p, r in per.items():
            md.append(f"| {p} | {r['n']} | {_fmt(r.get('auc'))} | {_fmt(r.get('ndcg@10'))} | {_fmt(r.get('hr@10'))} |")
        md.append("")
    md += ["## Plots", ""] + [f"![{k}](plots/{p.name})" for k, p in paths.items() if k != "metrics"] + [""]
    (out_dir / "report.md").write_text("\n".join(md))
    paths["report"] = out_dir / "report.md"
    return paths
