"""Run directories and checkpoints: safetensors + JSON only (never pickle), written atomically.

Run directory (what `fastinterest train --out RUN` writes; `fastinterest.apps.Run.load` and serving read it):

    RUN/config.json          {"format": "fastinterest.run", "format_version": 1,
                              "model": {num_items, num_categories, num_actions, num_platforms, embedding_dim,
                                        hidden_size, num_layers, dropout, encoder, layers},
                              "train": {TrainConfig fields}, "data": {"prepared": path, "max_len", "split",
                              "label_window_events", "n_train", "n_valid", "n_test"},
                              "best": {"epoch", "metric", "value"}, "layers_used": "fastinterest"|"torch"|...}
    RUN/model.safetensors    the best weights: the InterestModel state_dict (float32), metadata
                              {"format": "fastinterest.run", "epoch": "...", "metric": "...", "value": "..."}
    RUN/vocab.json           the prepared vocabulary (same layout as the prepared dir's vocab.json)
    RUN/train_log.jsonl      one JSON object per epoch (loss, throughput, validation metrics)
    RUN/checkpoint/epoch-NNNN/{model.safetensors, optimizer.safetensors, state.json}
                             the resumable state after epoch NNNN (the last two are kept)
    RUN/metrics.json, RUN/report.md, RUN/plots/*.png     written by `fastinterest evaluate`

Every file is written to a temporary name and moved into place with os.replace, and a checkpoint
directory is renamed into place only when complete, so a run killed at any moment resumes from the
last complete epoch.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..metrics.report import clean_for_json, write_json_atomic

__all__ = ["FORMAT", "FORMAT_VERSION", "save_tensors_atomic", "load_tensors", "save_checkpoint",
           "latest_checkpoint", "load_checkpoint", "save_best", "read_config", "optimizer_to_tensors",
           "optimizer_from_tensors"]

FORMAT = "fastinterest.run"
FORMAT_VERSION = 1


def save_tensors_atomic(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(clean, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_config(run_dir) -> dict:
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{run_dir}: not a fastinterest run directory (format={cfg.get('format')!r})")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{run_dir}: run format version {cfg['format_version']} is newer than this code "
                         f"({FORMAT_VERSION})")
    return cfg


# ---- optimizer state <-> tensors + JSON (torch's own state_dict would need pickle)
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---- resumable checkpoints
def save_checkpoint(run_dir, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """Write RUN/checkpoint/epoch-NNNN/ completely under a temporary name, then rename it into place."""
    root = Path(run_dir) / "checkpoint"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".epoch-{epoch:04d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_tensors_atomic(tmp / "model.safetensors", model.state_dict(), {"format": FORMAT, "epoch": epoch})
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_tensors_atomic(tmp / "optimizer.safetensors", opt_tensors)
    write_json_atomic(tmp / "state.json", {**state, "epoch": epoch, "optimizer": opt_meta})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(p for p in root.glob("epoch-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    root = Path(run_dir) / "checkpoint"
    done = sorted(p for p in root.glob("epoch-*") if p.is_dir() and (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state) from a checkpoint directory; returns its state.json dict."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_tensors(path / "model.safetensors"))
    if optimizer is not None:
        optimizer_from_tensors(optimizer, load_tensors(path / "optimizer.safetensors"), state["optimizer"])
    return state


def save_best(run_dir, model: torch.nn.Module, epoch: int, metric: str, value: float) -> None:
    save_tensors_atomic(Path(run_dir) / "model.safetensors", model.state_dict(),
                        {"format": FORMAT, "epoch": epoch, "metric": metric, "value": value})


def write_config(run_dir, config: dict) -> None:
    write_json_atomic(Path(run_dir) / "config.json", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                        **clean_for_json(config)})
