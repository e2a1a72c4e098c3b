"""InterestModel and the MLP baseline: shapes, heads, layer families agree, pretrained init, learning.

`toy_splits` (also used by the other model/app tests) builds tiny SequenceBatch-like splits with planted
interests, independent of fastinterest.data, so these tests only exercise the model code.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from fastinterest.models import InterestModel, MLPInterestModel, ModelScorer, as_id_tensors


@dataclass
class ToyBatch:
    item: np.ndarray
    category: np.ndarray
    action: np.ndarray
    platform: np.ndarray
    lengths: np.ndarray
    person: np.ndarray
    target_item: np.ndarray
    target_categories: np.ndarray
    cut_time: np.ndarray

    def __len__(self):
        return len(self.lengths)

    def subset(self, idx):
        return ToyBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


TOY_CATS, TOY_ITEMS_PER_CAT = 12, 8


def toy_item_category(item):
    return 2 + (np.asarray(item) - 2) // TOY_ITEMS_PER_CAT


def toy_splits(persons=300, max_len=20, window=3, seed=0):
    """Persons with 2 planted categories (90% of their events); leave-last-out train/valid/test.
    Vocabulary: items 2.., categories 2..13, actions 2..4, platforms 2..3 (0 = pad, 1 = unk)."""
    rng = np.random.default_rng(seed)
    C = 2 + TOY_CATS
    V = 2 + TOY_CATS * TOY_ITEMS_PER_CAT
    planted = np.stack([rng.choice(TOY_CATS, 2, replace=False) + 2 for _ in range(persons)])
    seqs = []
    for p in range(persons):
        L = int(rng.integers(6, max_len + 1)) + 2 + window
        cats = np.where(rng.random(L) < 0.9, planted[p][rng.integers(0, 2, L)], rng.integers(2, C, L))
        items = 2 + (cats - 2) * TOY_ITEMS_PER_CAT + rng.integers(0, TOY_ITEMS_PER_CAT, L)
        seqs.append((items, cats, rng.integers(2, 5, L), rng.integers(2, 4, L)))

    def split(offset):
        N = persons
        out = {k: np.zeros((N, max_len + 2), np.int64) for k in ("item", "category", "action", "platform")}
        lengths = np.zeros(N, np.int64)
        tgt = np.zeros(N, np.int64)
        tcat = np.zeros((N, C), np.float32)
        for p, (it, ca, ac, pl) in enumerate(seqs):
            end = len(it) - window - offset  # history = events [0, end)
            start = max(0, end - (max_len + 2))
            for k, arr in zip(("item", "category", "action", "platform"), (it, ca, ac, pl)):
                out[k][p, : end - start] = arr[start:end]
            lengths[p] = end - start
            tgt[p] = it[end]
            tcat[p, ca[end:end + window]] = 1.0
        return ToyBatch(**out, lengths=lengths, person=np.arange(N), target_item=tgt, target_categories=tcat,
                        cut_time=np.full(N, 10 - offset))

    vocab = {"item": {"tokens": ["<pad>", "<unk>"] + [f"i{j}" for j in range(2, V)], "counts": [0] * V},
             "category": {"tokens": ["<pad>", "<unk>"] + [f"c{j}" for j in range(2, C)], "counts": [0] * C},
             "action": {"tokens": ["<pad>", "<unk>", "view", "cart", "buy"], "counts": [0] * 5},
             "platform": {"tokens": ["<pad>", "<unk>", "web", "app"], "counts": [0] * 4},
             "query": {"tokens": ["<pad>", "<unk>"], "counts": [0, 0]}}
    return {"train": split(2), "valid": split(1), "test": split(0)}, vocab, planted


SIZES = [2 + TOY_CATS * TOY_ITEMS_PER_CAT, 2 + TOY_CATS, 5, 4]


def _ids(B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, n, (B, T), generator=g) for n in SIZES]
    lengths = torch.tensor([7, 3, 0, 1, 5])[:B]
    for x in ids:
        x[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # left-aligned, pads after
    return ids, lengths


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_shapes_and_heads(encoder):
    model = InterestModel(*SIZES, embedding_dim=8, hidden_size=16, encoder=encoder, layers="torch").eval()
    ids, lengths = _ids()
    user, logits = model(ids, lengths)
    assert user.shape == (5, 16 + SIZES[1]) and logits.shape == (5, SIZES[1])
    assert torch.all(user[2] == 0)  # empty history -> zero user vector
    # the user vector ends with the history's category share
    share = user[:, 16:].detach()
    torch.testing.assert_close(share.sum(1), (lengths > 0).float())
    c = ids[1][0, 0]
    assert float(share[0, c]) == pytest.approx(float((ids[1][0] == c).sum()) / 7)
    full = model.item_logits(user)
    assert full.shape == (5, SIZES[0])
    cand = torch.tensor([3, 9, 40])
    torch.testing.assert_close(model.item_logits(user, cand), full[:, cand])
    per_row = torch.tensor([[3, 9], [4, 5], [6, 7], [8, 9], [10, 11]])
    torch.testing.assert_close(model.item_logits(user, per_row), full.gather(1, per_row))
    p = model.click_probability(user, cand)
    assert torch.all((p > 0) & (p < 1))
    # the repeat term: + w log(1 + occurrences in the history)
    with_hist = model.item_logits(user, None, ids[0], lengths)
    n = torch.zeros(5, SIZES[0])
    for b in range(5):
        for t in range(int(lengths[b])):
            if ids[0][b, t] >= 2:
                n[b, ids[0][b, t]] += 1
    torch.testing.assert_close(with_hist, full + model.repeat_weight.detach() * torch.log1p(n))
    torch.testing.assert_close(model.item_logits(user, cand, ids[0], lengths), with_hist[:, cand])
    torch.testing.assert_close(model.item_logits(user, per_row, ids[0], lengths), with_hist.gather(1, per_row))


def test_mlp_factory_and_config_round_trip():
    m = MLPInterestModel(*SIZES, embedding_dim=8, hidden_size=16, layers="torch")
    assert m.config["encoder"] == "mlp"
    m2 = InterestModel.from_config(m.config)
    m2.load_state_dict(m.state_dict())
    ids, lengths = _ids()
    torch.testing.assert_close(m.eval()(ids, lengths)[1], m2.eval()(ids, lengths)[1])


def test_layer_families_compute_the_same_function():
    torch.manual_seed(0)
    ref = InterestModel(*SIZES, embedding_dim=8, hidden_size=16, layers="torch").eval()
    ids, lengths = _ids()
    u_ref, l_ref = ref(ids, lengths)
    for layers in ("torch_padded", "fastinterest"):
        with _maybe_warns():
            other = InterestModel(*SIZES, embedding_dim=8, hidden_size=16, layers=layers).eval()
        other.load_state_dict(ref.state_dict())  # same parameter names in every family
        u, l = other(ids, lengths)
        torch.testing.assert_close(u, u_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(l, l_ref, atol=1e-5, rtol=1e-4)


class _maybe_warns:
    """The fastinterest family may warn that it falls back to torch layers; that is fine here."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def test_item_dropout_acts_only_in_training():
    m = InterestModel(*SIZES, embedding_dim=8, hidden_size=16, layers="torch", item_dropout=1.0, dropout=0.0)
    ids, lengths = _ids()
    no_items = [torch.zeros_like(ids[0])] + ids[1:]  # id 0: the zero padding row
    emb = m.encoder.embeddings
    m.train()
    torch.testing.assert_close(emb(ids), emb(no_items))  # p = 1: every item vector is left out
    m.eval()
    assert not torch.allclose(emb(ids), emb(no_items))
    assert InterestModel.from_config(m.config).encoder.embeddings.item_dropout == 1.0


def test_invalid_choices_raise():
    with pytest.raises(ValueError):
        InterestModel(*SIZES, encoder="gru")
    with pytest.raises(ValueError):
        InterestModel(*SIZES, layers="cudnn")


def test_load_pretrained():
    m = InterestModel(*SIZES, embedding_dim=8, hidden_size=16, layers="torch")
    vec = torch.zeros(SIZES[0], 8)
    vec[5] = torch.arange(8.0)
    vec[6] = -torch.arange(8.0)
    assert m.load_pretrained({"item": vec, "query": torch.zeros(3, 8)}) == ["item"]
    w = m.encoder.embeddings.item.weight
    cos = torch.nn.functional.cosine_similarity(w[5], vec[5], dim=0)
    assert cos > 0.999 and torch.all(w[0] == 0)
    with pytest.raises(ValueError, match="shape"):
        m.load_pretrained({"category": torch.zeros(3, 8)})


def test_scorer_batches_match_one_shot():
    splits, _, _ = toy_splits(persons=40)
    m = InterestModel(*SIZES, embedding_dim=8, hidden_size=16, layers="torch")
    test = splits["test"]
    a = ModelScorer(m, batch_size=7).category_scores(test)
    ids, lengths = as_id_tensors(test)
    with torch.no_grad():
        b = torch.sigmoid(m.eval()(ids, lengths)[1]).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert ModelScorer(m, batch_size=7).item_scores(test).shape == (40, SIZES[0])
