"""Layers shared by every model: feature embedding, MLPs, target attention, the CTR/CVR head.

Written once here so model files hold only what makes each model different.
"""

from __future__ import annotations

import torch
from torch import nn

from qdrank.data.batch import MAX_POSITION, Batch
from qdrank.data.features import FeatureMap


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` is true (0 where nothing is valid)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float = 0.0, out_dim: int | None = None,
                 act: type[nn.Module] = nn.ReLU):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), act(), nn.Dropout(dropout)]
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)
        self.out_dim = out_dim if out_dim is not None else d


class FeatureEmbedder(nn.Module):
    """Turns the id/dense tensors of a :class:`Batch` into vectors of width ``dim``.

    One shared embedding table holds every sparse feature (see :mod:`qdrank.data.features`).
    Item side features live in buffers indexed by item row, so an item is embedded the same way
    whether it is a candidate or a history behaviour, and checkpoints carry them.
    """

    def __init__(self, fmap: FeatureMap, dim: int):
        super().__init__()
        self.fmap = fmap
        self.dim = dim
        self.table = nn.Embedding(fmap.vocab_size, dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=0.02)
        with torch.no_grad():
            self.table.weight[0].zero_()
        n_items = len(fmap.item_vocab) + 2
        self.register_buffer("item_sparse", torch.zeros(n_items, fmap.n_slots("item"), dtype=torch.long))
        self.register_buffer("item_dense", torch.zeros(n_items, fmap.n_numeric("item")))
        self.dense = nn.ModuleDict({r: nn.Linear(fmap.n_numeric(r), dim) for r in
                                    ("user", "context", "candidate", "item", "behavior") if fmap.n_numeric(r)})
        self.time = nn.Embedding(fmap.time_buckets + 1, dim, padding_idx=0)
        self._layout = {r: [(s, w) for _, s, w in fmap.slot_layout(r)] for r in
                        ("user", "context", "candidate", "item", "behavior")}

    def set_item_tables(self, sparse, dense) -> None:
        with torch.no_grad():
            self.item_sparse.copy_(torch.as_tensor(sparse))
            self.item_dense.copy_(torch.as_tensor(dense))

    def n_fields(self, role: str) -> int:
        return len(self._layout[role]) + (1 if role in self.dense else 0)

    def fields(self, role: str, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[..., S] ids + [..., N] dense -> [..., F, dim]: one vector per feature (lists mean-pooled)."""
        emb = self.table(ids)
        out = []
        for start, width in self._layout[role]:
            if width == 1:
                out.append(emb[..., start, :])
            else:
                out.append(masked_mean(emb[..., start:start + width, :], ids[..., start:start + width] > 0, -2))
        if role in self.dense:
            out.append(self.dense[role](dense))
        if not out:
            return emb.new_zeros(*ids.shape[:-1], 0, self.dim)
        return torch.stack(out, dim=-2)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        """Hashed token ids [..., T] -> mean of their embeddings [..., dim]."""
        return masked_mean(self.table(ids), ids > 0, -2)

    def item_fields(self, rows: torch.Tensor) -> torch.Tensor:
        return self.fields("item", self.item_sparse[rows], self.item_dense[rows])

    def item(self, rows: torch.Tensor) -> torch.Tensor:
        """Item rows [...] -> [..., dim]: id + side features, summed (zero for padding rows)."""
        v = self.item_fields(rows).sum(-2)
        return v * (rows > 0).unsqueeze(-1).to(v.dtype)

    def user(self, b: Batch) -> torch.Tensor:
        return self.fields("user", b.user_sparse, b.user_dense)

    def context(self, b: Batch) -> torch.Tensor:
        return self.fields("context", b.ctx_sparse, b.ctx_dense)

    def query(self, b: Batch) -> torch.Tensor:
        return self.text(b.query)

    def history(self, b: Batch) -> torch.Tensor:
        """Behaviour tokens [R, L, dim]: item + behaviour features (action...) + its query + time gap."""
        x = self.item(b.hist_item)
        beh = self.fields("behavior", b.hist_sparse, b.hist_dense)
        if beh.shape[-2]:
            x = x + beh.sum(-2)
        x = x + self.text(b.hist_query) + self.time(b.hist_time)
        return x * b.hist_mask.unsqueeze(-1).to(x.dtype)

    def candidate(self, b: Batch) -> torch.Tensor:
        """Candidate vectors [N, dim]: the item plus the impression's own features (price shown...)."""
        x = self.item(b.cand_item)
        c = self.fields("candidate", b.cand_sparse, b.cand_dense)
        return x + c.sum(-2) if c.shape[-2] else x


class TargetAttention(nn.Module):
    """DIN's activation unit: weight each key by an MLP of [q, k, q-k, q*k], no softmax."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32), softmax: bool = False):
        super().__init__()
        self.mlp = MLP(4 * dim, hidden, out_dim=1, act=nn.SiLU)
        self.softmax = softmax

    def forward(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [N, d], keys [N, L, d], mask [N, L] -> [N, d]."""
        qe = q.unsqueeze(1).expand_as(keys)
        w = self.mlp(torch.cat([qe, keys, qe - keys, qe * keys], -1)).squeeze(-1)
        if self.softmax:
            w = w.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        else:
            w = w * mask.to(w.dtype)
        return (w.unsqueeze(-1) * keys).sum(1)


class TwoTaskHead(nn.Module):
    """Shared MLP trunk, then a CTR logit and a CVR logit."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        self.trunk = MLP(in_dim, hidden, dropout)
        self.ctr = nn.Linear(self.trunk.out_dim, 1)
        self.cvr = nn.Linear(self.trunk.out_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.ctr(h).squeeze(-1), self.cvr(h).squeeze(-1)


class PositionBias(nn.Module):
    """Shallow position tower (PAL-style): a logit offset per shown position.

    Logged impressions carry their position, so training and offline evaluation estimate the
    click probability of the impression as it was shown (comparable with the simulator's oracle,
    whose true CTR includes position bias). A live request has no position (0 = unknown = no
    offset), so serving ranks by relevance alone; the offset is the same for every candidate at
    a given position and cannot be gamed by the ranker.
    """

    def __init__(self):
        super().__init__()
        self.bias = nn.Embedding(MAX_POSITION, 1, padding_idx=0)
        nn.init.zeros_(self.bias.weight)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        return self.bias(position).squeeze(-1)
