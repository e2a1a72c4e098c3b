"""Fused sparse optimizers for `fastinterest.nn.Embedding` / `EmbeddingBag`.

Pass one as `fused_optimizer=` and the module's backward applies the update to the touched rows in
place (duplicate indices summed first), leaving `weight.grad` None. These objects only hold the
hyper-parameters; the per-row state lives in the module as buffers (so it is part of `state_dict`).

    emb = fastinterest.nn.EmbeddingBag(10**6, 64, mode="sum",
                                       fused_optimizer=fastinterest.optim.FusedRowWiseAdagrad(lr=0.05))
    emb(indices, offsets).sum().backward()     # rows updated here; no optimizer.step() needed
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.reference_embedding import OPT_ADAGRAD, OPT_ADAM, OPT_ROWWISE_ADAGRAD, OPT_SGD


class FusedOptimizer:
    code: int = -1

    def hyper(self) -> list[float]:
        raise NotImplementedError

    def state_shapes(self, num_rows: int, dim: int) -> dict[str, tuple]:
        """Buffers the module keeps for this optimizer (name -> shape); float state in accumulation dtype."""
        return {}

    def init_value(self, name: str) -> float:
        return 0.0

    def _check(self, **vals):
        for k, v in vals.items():
            if not isinstance(v, (int, float)) or v != v:
                raise TypeError(f"{type(self).__name__}: {k} must be a number, got {v!r}")


@dataclass
class FusedSGD(FusedOptimizer):
    """w -= lr * g (torch.optim.SGD on the sparse gradient, no momentum)."""
    lr: float = 0.01
    code = OPT_SGD

    def __post_init__(self):
        self._check(lr=self.lr)

    def hyper(self):
        return [float(self.lr)]


@dataclass
class FusedAdagrad(FusedOptimizer):
    """torch.optim.Adagrad (lr_decay=0, weight_decay=0): s += g*g; w -= lr * g / (sqrt(s) + eps)."""
    lr: float = 0.01
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    code = OPT_ADAGRAD

    def __post_init__(self):
        self._check(lr=self.lr, eps=self.eps, initial_accumulator_value=self.initial_accumulator_value)

    def hyper(self):
        return [float(self.lr), float(self.eps)]

    def state_shapes(self, num_rows, dim):
        return {"sum": (num_rows, dim)}

    def init_value(self, name):
        return float(self.initial_accumulator_value)


@dataclass
class FusedRowWiseAdagrad(FusedOptimizer):
    """FBGEMM's row-wise Adagrad: one accumulator per row, s[r] += mean(g*g); w -= lr*g/(sqrt(s[r])+eps)."""
    lr: float = 0.01
    eps: float = 1e-8
    code = OPT_ROWWISE_ADAGRAD

    def __post_init__(self):
        self._check(lr=self.lr, eps=self.eps)

    def hyper(self):
        return [float(self.lr), float(self.eps)]

    def state_shapes(self, num_rows, dim):
        return {"momentum": (num_rows,)}


@dataclass
class FusedAdam(FusedOptimizer):
    """Lazy Adam on the touched rows only: the same result as torch.optim.SparseAdam."""
    lr: float = 0.001
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    code = OPT_ADAM

    def __post_init__(self):
        self._check(lr=self.lr, eps=self.eps, beta1=self.betas[0], beta2=self.betas[1])
        if not (0.0 <= self.betas[0] < 1.0 and 0.0 <= self.betas[1] < 1.0):
            raise ValueError(f"FusedAdam: betas must be in [0, 1), got {self.betas}")

    def hyper(self):
        return [float(self.lr), float(self.betas[0]), float(self.betas[1]), float(self.eps)]

    def state_shapes(self, num_rows, dim):
        return {"exp_avg": (num_rows, dim), "exp_avg_sq": (num_rows, dim), "step": ()}


__all__ = ["FusedOptimizer", "FusedSGD", "FusedAdagrad", "FusedRowWiseAdagrad", "FusedAdam"]
