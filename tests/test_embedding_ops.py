"""torch.library integration: opcheck on every embedding op, torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import fastinterest.nn as fnn
import fastinterest.optim as fopt
from fastinterest import _dispatch
from fastinterest.backends.reference_embedding import OPT_ROWWISE_ADAGRAD
from fastinterest.ops import embedding as E


def _backends():
    return [b for b in ("ext", "numba", "reference") if not _dispatch.why_not("embedding_bag", b, "cpu", torch.float32)]


def _case(mode=0):
    torch.manual_seed(0)
    w = torch.randn(20, 8, requires_grad=True)
    idx = torch.tensor([1, 4, 4, 7, 19, 0, 3])
    off = torch.tensor([0, 3, 3, 7])
    return w, idx, off


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck_forward(backend, mode):
    w, idx, off = _case()
    psw = torch.rand(idx.numel(), requires_grad=True) if mode == 0 else None
    args = (w, idx, off, psw, mode, -1, -1, backend, E.OPT_DENSE, [], None, None, None, True)
    torch.library.opcheck(E.embedding_bag_op, args)


@pytest.mark.parametrize("backend", _backends())
def test_opcheck_backward_ops(backend):
    w, idx, off = _case()
    w = w.detach()
    go = torch.randn(3, 8)
    maxpos = torch.empty(0, dtype=torch.long)
    torch.library.opcheck(E.embedding_bag_backward_op, (go, w, idx, off, None, maxpos, 1, -1, backend, True))
    torch.library.opcheck(E.embedding_bag_backward_sparse_op, (go, w, idx, off, None, maxpos, 0, -1, backend, True),
                          test_utils=("test_schema", "test_faketensor"))
    s1 = torch.zeros(20)
    torch.library.opcheck(E.embedding_bag_backward_fused_op,
                          (go, w.clone(), idx, off, None, maxpos, 0, -1, OPT_ROWWISE_ADAGRAD, [0.1, 1e-8], s1, None, None,
                           backend, True),
                          test_utils=("test_schema", "test_faketensor"))


class TwoTables(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.bag = fnn.EmbeddingBag(50, 16, mode="mean", **kw)
        self.emb = fnn.Embedding(30, 16, padding_idx=0, **kw)
        self.lin = torch.nn.Linear(16, 1)

    def forward(self, idx, off, seq):
        return self.lin(self.bag(idx, off) + self.emb(seq).sum(1)).squeeze(1)


@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_fullgraph(fused):
    torch.manual_seed(0)
    kw = {"fused_optimizer": fopt.FusedSGD(lr=0.1)} if fused else {}
    eager = TwoTables(**kw)
    compiled_model = TwoTables(**kw)
    compiled_model.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 50, (12,))
    off = torch.tensor([0, 4, 9])
    seq = torch.randint(0, 30, (3, 5))
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    a = eager(idx, off, seq)
    b = compiled(idx, off, seq)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    if fused:
        torch.testing.assert_close(compiled_model.bag.weight, eager.bag.weight)
        torch.testing.assert_close(compiled_model.emb.weight, eager.emb.weight)
        assert compiled_model.bag.weight.grad is None
    else:
        torch.testing.assert_close(compiled_model.bag.weight.grad, eager.bag.weight.grad)
        torch.testing.assert_close(compiled_model.emb.weight.grad, eager.emb.weight.grad)
