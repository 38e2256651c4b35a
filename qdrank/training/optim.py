"""Optimizers for a model whose embedding table dwarfs everything else.

A dense Adam step touches every row of the table every batch (zeroing its gradient, two moment
updates, a square root and a division per element) although a batch reads a few thousand of its
rows. The row-wise optimizers here take the table's row-sparse gradient and update only the rows
the batch touched, as TorchRec's fused embedding optimizers do; the dense parameters keep
``torch.optim.Adam``. :class:`CombinedOptimizer` presents both as one optimizer, so checkpoints
save and resume it like any other.

``train.embedding_optimizer``:

* ``dense``: one ``torch.optim.Adam`` over everything (the reference path).
* ``adam``: lazy Adam on the table (per-element moments, updated only on touched rows; the bias
  correction uses the global step, as ``torch.optim.SparseAdam``). A row touched at every step
  follows exactly the dense Adam trajectory; an untouched row stays put instead of drifting on
  its stale momentum.
* ``rowwise_adagrad``: TorchRec's EXACT_ROWWISE_ADAGRAD: one accumulator per row (mean squared
  gradient of the row), so its state is 1/dim of Adam's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qdrank.config import TrainConfig
from qdrank.models.layers import unique_ids

EMBEDDING_OPTIMIZERS = ("dense", "adam", "rowwise_adagrad")


def coalesce_rows(g: torch.Tensor) -> torch.Tensor:
    """``g.coalesce()`` of a row-sparse gradient (one sparse dimension, duplicate rows summed).

    The same tensor, built as ``unique`` + ``index_add``: measured 2.4 ms against coalesce's
    9.2 ms on one CPU thread for a batch's 33k looked-up rows (4.8k distinct)."""
    if g.is_coalesced() or g.sparse_dim() != 1:
        return g.coalesce()
    rows, inv = unique_ids(g._indices()[0], g.shape[0])
    vals = g._values()
    summed = vals.new_zeros(rows.shape[0], *vals.shape[1:]).index_add_(0, inv, vals)
    return torch.sparse_coo_tensor(rows[None], summed, g.shape, is_coalesced=True, check_invariants=False)


def _rows_and_values(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(touched row indices [K], their summed gradients [K, dim]) of a row-sparse or dense grad.

    A dense gradient (data-parallel runs reduce the table's gradient densely) counts a row as
    touched when any of its entries is non-zero."""
    g = p.grad
    if g.is_sparse:
        g = coalesce_rows(g)
        return g.indices()[0], g.values()
    rows = g.abs().sum(1).nonzero().squeeze(1)
    return rows, g[rows]


class RowWiseAdam(torch.optim.Optimizer):
    """Lazy Adam for 2-D tables with row-sparse gradients: only touched rows move."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                rows, g = _rows_and_values(p)
                if wd:
                    g = g + wd * p.index_select(0, rows)
                step = float(st["step"])
                # index_select / index_copy_: ~5x faster on CPU than ``t[rows]`` / ``t[rows] = x``
                m = st["exp_avg"].index_select(0, rows).lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                denom = (v.sqrt_() / (1 - b2 ** step) ** 0.5).add_(eps)
                p.index_copy_(0, rows, p.index_select(0, rows).addcdiv_(m, denom, value=-lr / (1 - b1 ** step)))
        return None


class RowWiseAdagrad(torch.optim.Optimizer):
    """Exact row-wise Adagrad (TorchRec's EXACT_ROWWISE_ADAGRAD): one accumulator per row."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                st["step"] += 1
                rows, g = _rows_and_values(p)
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * p.index_select(0, rows)
                acc = st["sum"].index_select(0, rows) + g.pow(2).mean(1)
                st["sum"].index_copy_(0, rows, acc)
                p.index_copy_(0, rows, p.index_select(0, rows) - group["lr"] * g / (acc.sqrt() + group["eps"]).unsqueeze(1))
        return None


class CombinedOptimizer:
    """Several optimizers stepped together and saved as one (parameter ids numbered across them,
    in order), so checkpointing code written for one ``torch.optim.Optimizer`` keeps working."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        state, groups, base = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            state.update({base + pid: s for pid, s in sd["state"].items()})
            groups += [{**g, "params": [base + pid for pid in g["params"]]} for g in sd["param_groups"]]
            base += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups, state, base = list(sd["param_groups"]), sd["state"], 0
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}: was train.embedding_optimizer changed?")
        for o in self.optimizers:
            mine, groups = groups[:len(o.param_groups)], groups[len(o.param_groups):]
            n = sum(len(g["params"]) for g in mine)
            o.load_state_dict({
                "state": {pid - base: s for pid, s in state.items() if base <= int(pid) < base + n},
                "param_groups": [{**g, "params": [pid - base for pid in g["params"]]} for g in mine]})
            base += n


def build_optimizer(model: torch.nn.Module, t: TrainConfig, sparse_grad: bool = True
                    ) -> torch.optim.Optimizer | CombinedOptimizer:
    """Adam for the dense parameters; ``t.embedding_optimizer`` for the shared embedding table.

    With a row-wise optimizer the table's gradient is made row-sparse when ``sparse_grad`` (the
    trainer turns it off under data parallelism, which reduces gradients densely)."""
    if t.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"train.embedding_optimizer={t.embedding_optimizer!r}; choose one of: "
                         f"{', '.join(EMBEDDING_OPTIMIZERS)}")
    emb = model.emb
    if t.embedding_optimizer == "dense":
        emb.sparse_grad = False
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    table = emb.table.weight
    dense = [p for p in model.parameters() if p is not table]
    emb.sparse_grad = sparse_grad
    lr = t.embedding_lr or t.lr
    rowwise = (RowWiseAdam([table], lr=lr, weight_decay=t.weight_decay) if t.embedding_optimizer == "adam"
               else RowWiseAdagrad([table], lr=lr, weight_decay=t.weight_decay))
    # not fused=True: 4x less optimizer CPU time on one idle thread, but one parallel region per
    # tensor, which cost seconds per step on the shared 2-core machine (README "Training throughput")
    adam = torch.optim.Adam(dense, lr=t.lr, weight_decay=t.weight_decay)
    return CombinedOptimizer([adam, rowwise])


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes row-sparse gradients (coalesced in
    place, so duplicate rows are summed before their norm is taken)."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = coalesce_rows(p.grad)
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
    return total
