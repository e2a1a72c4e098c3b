"""Trainer: learning, run-directory format, resume after a kill, DDP (torchrun, gloo) on toy data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinterest.metrics import evaluate_scorer
from fastinterest.models import ModelScorer
from fastinterest.train import TrainConfig, Trainer, latest_checkpoint, read_config
from fastinterest.train.checkpoint import load_tensors

from test_model import toy_splits

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(embedding_dim=16, hidden_size=32, batch_size=32, negatives=32, lr=1e-2, layers="torch_padded", patience=50)


@pytest.fixture(scope="module")
def toy():
    return toy_splits(persons=160)


def _fit(splits, vocab, out, **kw):
    cfg = TrainConfig(**{**SMALL, **kw})
    return Trainer(cfg, progress=False, log=lambda *_: None).fit(splits, out, vocab=vocab, data_info={"max_len": 22})


def test_training_learns_planted_interests(toy, tmp_path):
    splits, vocab, _ = toy
    # the pure LSTM (no history-share / repeat skip features, which alone would score well): it must learn
    summary = _fit(splits, vocab, tmp_path / "run", epochs=8, history_share=False, repeat_term=False)
    log = summary["log"]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    res = evaluate_scorer(ModelScorer(Trainer_model(tmp_path / "run")), splits["test"], splits["valid"])
    assert res["auc"] > 0.75, res["auc"]  # untrained: ~0.5; the planted categories are learnable


def Trainer_model(run_dir):
    from fastinterest.apps import Run

    return Run.load(run_dir).model


def test_run_directory_format(toy, tmp_path):
    splits, vocab, _ = toy
    out = tmp_path / "run"
    _fit(splits, vocab, out, epochs=2)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert {"config.json", "model.safetensors", "vocab.json", "train_log.jsonl"} <= set(files)
    assert all(f.endswith((".json", ".jsonl", ".safetensors")) for f in files), files  # never pickle
    cfg = read_config(out)
    assert cfg["format"] == "fastinterest.run" and cfg["format_version"] == 1
    assert set(cfg["model"]) == {"num_items", "num_categories", "num_actions", "num_platforms", "embedding_dim",
                                 "hidden_size", "num_layers", "dropout", "encoder", "layers", "history_share",
                                 "repeat_term", "item_dropout", "item_init_std"}
    assert cfg["best"]["epoch"] in (1, 2) and cfg["train"]["seed"] == 0
    assert json.loads((out / "vocab.json").read_text()) == vocab
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "valid_auc" in log[0] and log[0]["sequences_per_s"] > 0
    assert latest_checkpoint(out).name == "epoch-0002"


def test_resume_after_kill_reproduces_the_uninterrupted_run(toy, tmp_path):
    splits, vocab, _ = toy
    _fit(splits, vocab, tmp_path / "straight", epochs=3, dropout=0.2)
    # "killed" after epoch 2: run 2 epochs, leave a half-written checkpoint behind, resume to 3
    _fit(splits, vocab, tmp_path / "killed", epochs=2, dropout=0.2)
    half = tmp_path / "killed" / "checkpoint" / ".epoch-0003.tmp999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path / "killed").name == "epoch-0002"
    _fit(splits, vocab, tmp_path / "killed", epochs=3, dropout=0.2)
    a = load_tensors(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_tensors(latest_checkpoint(tmp_path / "killed") / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    la = (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()
    lb = (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["train_loss"] for x in la] == [json.loads(x)["train_loss"] for x in lb]


def test_early_stopping_keeps_the_best_epoch(toy, tmp_path):
    splits, vocab, _ = toy
    # lr=0 never improves after epoch 1: stops after 1 + patience epochs, best = epoch 1
    summary = _fit(splits, vocab, tmp_path / "run", epochs=10, lr=0.0, patience=2)
    assert summary["epochs_run"] == 3 and summary["best"]["epoch"] == 1


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from test_model import toy_splits
    from fastinterest.train import TrainConfig, Trainer
    splits, vocab, _ = toy_splits(persons=160)
    cfg = TrainConfig(**json.loads(sys.argv[2]))
    s = Trainer(cfg, progress=False, log=lambda *_: None).fit(splits, sys.argv[1], vocab=vocab)
    if s["rank"] == 0:
        print("RESULT", json.dumps({{"world": s["world_size"], "auc": s["log"][-1]["valid_auc"]}}))
""")


@pytest.mark.slow
def test_ddp_two_processes_matches_single_process(tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    cfg = json.dumps({**SMALL, "epochs": 5})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    results = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script),
               str(tmp_path / f"run{n}"), cfg]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][0]
        results[n] = json.loads(line.split(" ", 1)[1])
    assert results[2]["world"] == 2
    assert abs(results[2]["auc"] - results[1]["auc"]) < 0.05, results


def test_an_empty_training_split_is_refused(toy, tmp_path):
    splits, vocab, _ = toy
    empty = {**splits, "train": splits["train"].subset(np.zeros(0, dtype=np.int64))}
    with pytest.raises(ValueError, match="no training examples"):
        _fit(empty, vocab, tmp_path / "run", epochs=1)


def test_dense_steps_follow_the_cut_rule():
    """Dense training steps predict event t+1 only where it starts a new second, as the splits' cuts do."""
    from fastinterest.train.trainer import _cut_steps, _dense_interest_labels

    times = np.array([[10, 10, 11, 12, 12, 0], [5, 6, 7, 8, 9, 10]])
    cats = np.array([[2, 3, 4, 5, 2, 0], [2, 2, 3, 3, 4, 4]])
    lengths = np.array([5, 6])
    assert _cut_steps(times, lengths).tolist() == [[False, True, True, False, False], [True] * 5]
    rows, steps, labels = _dense_interest_labels(cats, lengths, 10, 1, 6, np.random.default_rng(0), times)
    assert sorted(steps[rows == 0].tolist()) == [1, 2] and sorted(steps[rows == 1].tolist()) == [0, 1, 2, 3, 4]
    for r, t, lab in zip(rows, steps, labels):
        assert np.flatnonzero(lab).tolist() == [cats[r, t + 1]]
    rows, steps, _ = _dense_interest_labels(cats, lengths, 10, 1, 6, np.random.default_rng(0))  # no timestamps
    assert sorted(steps[rows == 0].tolist()) == [0, 1, 2, 3]


def test_raised_share_gain_keeps_a_calibrated_bias(toy):
    from fastinterest.train.warmstart import fit_warm_start

    splits, _, _ = toy
    plain = fit_warm_start(splits["train"], 2 + 12 * 8, 14)
    sharp = fit_warm_start(splits["train"], 2 + 12 * 8, 14, min_share_gain=3 * plain["share_gain"])
    assert sharp["fitted_share_gain"] == pytest.approx(plain["share_gain"])
    assert sharp["share_gain"] == pytest.approx(3 * plain["share_gain"])
    assert sharp["interest_bias"] < plain["interest_bias"]  # a steeper gain on shares >= 0 needs a lower bias


def test_fit_logistic_matches_sklearn():
    lm = pytest.importorskip("sklearn.linear_model")
    from fastinterest.train.warmstart import fit_logistic

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 2))
    y = rng.random(2000) < 1 / (1 + np.exp(-(1.5 * X[:, 0] - 0.7 * X[:, 1] + 0.3)))
    w = fit_logistic(np.c_[X, np.ones(len(X))], y, ridge=0.0)
    ref = lm.LogisticRegression(C=1e9, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(w[:2], ref.coef_[0], atol=1e-3)
    assert w[2] == pytest.approx(ref.intercept_[0], abs=1e-3)


def test_warm_start_fits_the_toy_data(toy):
    from fastinterest.train.warmstart import fit_warm_start

    splits, _, _ = toy
    ws = fit_warm_start(splits["train"], 2 + 12 * 8, 14)
    assert ws["share_gain"] > 1.0  # planted categories: the history share predicts the next ones
    assert ws["item_bias"].shape == (2 + 12 * 8,)


def _dense_item_loss_reference(model, ids, lengths, outputs, negatives, step_ok=None):
    """The dense next-item loss as plain autograd ops (the form `InterestLoss._dense_item_loss` replaced)."""
    import torch.nn.functional as F

    items = ids[0]
    B, T = items.shape
    steps = torch.arange(T - 1)
    valid = steps[None, :] < (lengths[:, None] - 1)
    if step_ok is not None:
        valid = valid & step_ok[:, : T - 1]
    valid = valid.to(outputs.dtype)
    q = model.item_query(outputs[:, :-1])
    nxt = items[:, 1:]
    w, b = model.encoder.item_weight, model.item_bias
    pos = (q * w[nxt]).sum(-1) + b[nxt]
    neg = q @ w[negatives].t() + b[negatives]
    if model.repeat_term:
        real = items >= 2
        upto = torch.arange(T)[None, :] <= steps[:, None]
        same = (items[:, None, :] == nxt[:, :, None]) & real[:, None, :] & upto[None]
        n_pos = same.sum(2).to(outputs.dtype)
        n_neg = ((items[:, :, None] == negatives[None, None, :]) & real[:, :, None]).to(outputs.dtype).cumsum(1)[:, :-1]
        pos = pos + model.repeat_weight * torch.log1p(n_pos)
        neg = neg + model.repeat_weight * torch.log1p(n_neg)
    hit = nxt[:, :, None] == negatives[None, None, :]
    neg_loss = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
    neg_loss = (neg_loss * (~hit)).sum(-1) / (~hit).sum(-1).clamp(min=1)
    per_step = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none") + neg_loss
    return (per_step * valid).sum(), int(valid.sum())


@pytest.mark.parametrize("repeat_term", [True, False])
@pytest.mark.parametrize("step_mask", [False, True])
def test_dense_item_loss_equals_the_plain_autograd_form(repeat_term, step_mask):
    """The fused dense next-item loss (one GEMM, sparse hits and repeat counts, `_NegSoftplusSum`) gives the
    loss and every gradient of the plain autograd form, in float64: items drawn from a small vocabulary so
    that hits, repeated negatives and repeat counts all occur, padding and length-0/1 rows included."""
    from fastinterest.models import InterestModel
    from fastinterest.train.trainer import InterestLoss

    torch.manual_seed(3)
    V, B, T, S = 40, 7, 9, 24
    model = InterestModel(V, 6, 4, 3, embedding_dim=5, hidden_size=8, repeat_term=repeat_term).double()
    with torch.no_grad():
        model.item_bias.normal_()
        if repeat_term:
            model.repeat_weight.fill_(0.7)
    lengths = torch.tensor([9, 5, 1, 0, 9, 2, 7])
    items = torch.randint(2, V, (B, T))
    items[torch.arange(T)[None, :] >= lengths[:, None]] = 0           # padding
    ids = [items, torch.randint(2, 6, (B, T)), torch.randint(2, 4, (B, T)), torch.randint(2, 3, (B, T))]
    negatives = torch.randint(2, V, (S,))
    negatives[:3] = negatives[3]                                        # duplicated samples
    negatives[5] = items[0, 3]                                          # certainly a hit and a repeat
    step_ok = torch.rand(B, T) > 0.3 if step_mask else None
    outputs = torch.randn(B, T, 8, dtype=torch.float64, requires_grad=True)
    params = [outputs] + [p for p in model.parameters() if p.requires_grad]
    got, n_got = InterestLoss(model, TrainConfig())._dense_item_loss(ids, lengths, outputs, negatives, step_ok)
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    want, n_want = _dense_item_loss_reference(model, ids, lengths, outputs, negatives, step_ok)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    assert n_got == n_want > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want):
        if a is None or b is None:
            assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S", [256, 13, 1])
def test_fused_negative_bce_kernel_matches_torch(dtype, S):
    """The native pass of `_NegSoftplusSum` (AVX2 for float32 where the CPU has it, scalar otherwise): the
    weighted softplus sum and the weighted sigmoid gradient against torch in float64, including large
    positive and negative logits, zero weights and row lengths that are not a multiple of 8."""
    from fastinterest import _ext
    from fastinterest.train.trainer import _neg_softplus_kernel

    if _ext.cpu_reason() is not None:
        pytest.skip("native extension unavailable")
    torch.manual_seed(S)
    R = 37
    x = (torch.randn(R, S, dtype=torch.float64) * 6).to(dtype)
    x[0, 0], x[1, -1], x[2, 0] = 95.0, -95.0, 0.0
    w = torch.rand(R, dtype=torch.float64).to(dtype)
    w[3] = 0.0
    kernel = _neg_softplus_kernel(x, w)
    assert kernel is not None
    g = torch.full_like(x, float("nan"))                   # every entry must be written
    total = kernel(x.data_ptr(), w.data_ptr(), g.data_ptr(), R, S, 0 if dtype == torch.float32 else 1, 2)
    xd, wd = x.double(), w.double()
    want = (torch.nn.functional.softplus(xd).sum(1) * wd).sum().item()
    want_g = torch.sigmoid(xd) * wd[:, None]
    tol = 1e-6 if dtype == torch.float32 else 1e-12   # float64: summation order (sequential vs pairwise)
    assert abs(total - want) <= tol * abs(want)
    torch.testing.assert_close(g.double(), want_g, rtol=tol, atol=tol)
    empty = torch.empty(0, S, dtype=dtype)
    assert kernel(empty.data_ptr(), w.data_ptr(), empty.data_ptr(), 0, S, 0 if dtype == torch.float32 else 1, 2) == 0.0


def test_dense_item_loss_float32_kernel_equals_torch_ops(monkeypatch):
    """The training loss in float32 gives the same value and gradients with the native pass as with the
    torch ops it replaces (FASTINTEREST_LOSS_KERNEL=0)."""
    from fastinterest.models import InterestModel
    from fastinterest.train.trainer import InterestLoss

    torch.manual_seed(4)
    V, B, T, S = 300, 6, 12, 64
    model = InterestModel(V, 6, 4, 3, embedding_dim=8, hidden_size=16)
    lengths = torch.tensor([12, 7, 3, 0, 12, 9])
    items = torch.randint(2, V, (B, T))
    ids = [items, torch.randint(2, 6, (B, T)), torch.randint(2, 4, (B, T)), torch.randint(2, 3, (B, T))]
    negatives = torch.randint(2, V, (S,))
    negatives[0] = items[0, 5]
    outputs = torch.randn(B, T, 16, requires_grad=True)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTINTEREST_LOSS_KERNEL", flag)
        loss, _ = InterestLoss(model, TrainConfig())._dense_item_loss(ids, lengths, outputs, negatives)
        results.append((loss, torch.autograd.grad(loss, [outputs, model.item_bias, model.repeat_weight])))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
