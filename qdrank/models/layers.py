"""Layers shared by every model: feature embedding, MLPs, target attention, the cross features,
the CTR/CVR head.

Written once here so model files hold only what makes each model different.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qdrank.data.batch import MAX_POSITION, Batch
from qdrank.data.features import FeatureMap


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` is true (0 where nothing is valid)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on CPU (``fast = True``, the default).

    The same distribution (each entry kept with probability ``1 - p``, kept entries scaled by
    ``1 / (1 - p)``; ``p`` rounded to a multiple of 2**-16), drawn as 16-bit integers, four per
    64-bit ``random_`` draw, instead of one ``bernoulli_`` draw per entry: ~5x less time for the
    mask on CPU, where ``bernoulli_`` was 5-17% of a training step (README "Training
    throughput"). Other random numbers than ``nn.Dropout``'s, so a fixed seed gives another
    (equally likely) run. ``fast = False`` (``set_fast_layers``) is ``nn.Dropout`` itself; CUDA
    always uses it.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.fast or x.device.type != "cpu" or self.p >= 1.0:
            return F.dropout(x, self.p, True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(1 << 63), (1 << 63) - 1)
        cut = round(self.p * 65536) - 32768  # int16 values are uniform over [-32768, 32768)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= cut
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


def unique_ids(ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(ids, return_inverse=True)`` for ids in [0, size), flattened.

    When ``size`` is not much larger than the number of ids, a mark-and-cumsum over [0, size)
    replaces the sort (3x faster for a batch's ~13k ids in a 55k-row table); otherwise, and under a
    trace (an export keeps its ``Unique`` op), the sort."""
    flat = ids.reshape(-1)
    if size > 8 * flat.numel() + 4096 or torch.jit.is_tracing():
        rows, inv = torch.unique(flat, return_inverse=True)
        return rows, inv
    mark = torch.zeros(size, dtype=torch.bool, device=ids.device)
    mark[flat] = True
    rows = mark.nonzero().squeeze(1)
    local = torch.cumsum(mark, 0).sub_(1)
    return rows, local.index_select(0, flat)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a 1-D ``index`` as ``index_select``: the same values, but its backward
    (``index_add_``) is several times faster on CPU than the accumulating ``index_put_`` of
    ``x[index]`` (request vectors gathered to candidates)."""
    return x.index_select(0, index)


def group_rank(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per element, the share of its group's elements with a strictly smaller value (0..1).

    ``group`` must be sorted (candidates of a request are contiguous). Ties share a rank. Eagerly this
    sorts (O(N log N) for the large batches of fitting and evaluation); inside an ONNX / TorchScript
    export it compares all pairs (stable sorts and ``cummax`` have no ONNX operator; a served request
    has few candidates). Both count the same integers, so they give identical values.
    """
    n = values.shape[0]
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        same = group.unsqueeze(0) == group.unsqueeze(1)                                  # [N, N]
        smaller = ((values.unsqueeze(0) < values.unsqueeze(1)) & same).sum(1).to(values.dtype)
        return smaller / (same.sum(1) - 1).clamp_min(1).to(values.dtype)
    if n == 0:
        return values.new_zeros(0)
    counts = torch.bincount(group)
    start = torch.cumsum(counts, 0) - counts
    # sort by (group, value): group-major because the sort below is stable
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sv, sg = values[order], group[order]
    pos = torch.arange(n, device=values.device)
    # first index of each run of equal (group, value) -> number of strictly smaller in the group
    new_run = torch.ones(n, dtype=torch.bool, device=values.device)
    new_run[1:] = (sv[1:] != sv[:-1]) | (sg[1:] != sg[:-1])
    run_start = torch.cummax(torch.where(new_run, pos, torch.zeros_like(pos)), 0).values
    smaller = (run_start - start[sg]).to(values.dtype)
    denom = (counts[sg] - 1).clamp_min(1).to(values.dtype)
    out = torch.empty_like(values)
    out[order] = smaller / denom
    return out


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float = 0.0, out_dim: int | None = None,
                 act: type[nn.Module] = nn.ReLU):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), act(), Dropout(dropout)]
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)
        self.out_dim = out_dim if out_dim is not None else d


class _Rows(torch.autograd.Function):
    """``table[rows]`` for sorted distinct ``rows`` whose gradient is a coalesced row-sparse
    tensor of those rows (what ``nn.Embedding(sparse=True)`` gives, without a row per lookup)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = table.shape
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(rows[None], grad, ctx.shape, is_coalesced=True, check_invariants=False), None


class FeatureEmbedder(nn.Module):
    """Turns the id/dense tensors of a :class:`Batch` into vectors of width ``dim``.

    One shared embedding table holds every sparse feature (see :mod:`qdrank.data.features`).
    Item side features live in buffers indexed by item row, so an item is embedded the same way
    whether it is a candidate or a history behaviour, and checkpoints carry them.

    Two paths compute the same function (to float rounding). The fast path (``fast = True``, the
    default) embeds each distinct item of a batch once, history and candidates together, then
    gathers; every sum or mean of ids is one fused ``embedding_bag`` with per-id weights (0 for
    padding, 1/n in an n-id list), so a behaviour token costs one bag instead of a gather per
    field. The reference path (``fast = False``) looks up every slot and pools per field.
    ``sparse_grad`` makes the table's gradient row-sparse (for the row-wise optimizers of
    :mod:`qdrank.training.optim`); padding id 0 never receives a gradient on either path.
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
        self.fast = True
        self._items_cache: tuple | None = None

    @property
    def sparse_grad(self) -> bool:
        return self.table.sparse

    @sparse_grad.setter
    def sparse_grad(self, on: bool) -> None:
        self.table.sparse = bool(on)

    def set_item_tables(self, sparse, dense) -> None:
        with torch.no_grad():
            self.item_sparse.copy_(torch.as_tensor(sparse))
            self.item_dense.copy_(torch.as_tensor(dense))

    def n_fields(self, role: str) -> int:
        return len(self._layout[role]) + (1 if role in self.dense else 0)

    # ---- fused lookups (fast path) -------------------------------------------------------
    def _weights(self, role: str | None, ids: torch.Tensor) -> torch.Tensor:
        """Per-id pooling weights [..., S]: 1 for a present id, 1/n for each of n ids of a list
        field (``role=None``: the whole row is one list, as for a query), 0 for padding."""
        w = (ids > 0).to(self.table.weight.dtype)
        spans = [(0, ids.shape[-1])] if role is None else [(s, n) for s, n in self._layout[role] if n > 1]
        for start, width in spans:
            seg = w[..., start:start + width]
            w[..., start:start + width] = seg / seg.sum(-1, keepdim=True).clamp_min(1.0)
        return w

    @torch.compiler.disable  # torch 2.13's inductor fails on embedding_bag's sparse backward
    def _bag(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[..., k] * table[ids[..., k]]`` -> [..., dim], one fused EmbeddingBag.

        No ``padding_idx``: padding carries weight 0, so row 0 gets an exact zero gradient, and
        the backward pass skips the padding bookkeeping (measured faster on CPU). With a
        row-sparse gradient the bag reads a compact copy of the rows it uses (:class:`_Rows`), so
        its gradient has one row per distinct id instead of one per looked-up slot: at history
        1,000 that is ~5k rows instead of ~280k, which autograd would otherwise zero-fill, copy at
        every accumulation and coalesce."""
        lead, k = ids.shape[:-1], ids.shape[-1]
        if k == 0:
            return self.table.weight.new_zeros(*lead, self.dim)
        ids, weights = ids.reshape(-1, k), weights.reshape(-1, k)
        if self.sparse_grad:
            rows, local = unique_ids(ids, self.table.weight.shape[0])
            out = F.embedding_bag(local.view(ids.shape), _Rows.apply(self.table.weight, rows), mode="sum", per_sample_weights=weights)
        else:
            out = F.embedding_bag(ids, self.table.weight, mode="sum", per_sample_weights=weights)
        return out.view(*lead, self.dim)

    def _pooled(self, role: str, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Sum of a role's feature vectors [..., dim] (= ``fields(...).sum(-2)``), fused."""
        x = self._bag(ids, self._weights(role, ids))
        return x + self.dense[role](dense) if role in self.dense else x

    def _item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Item rows [U] -> [U, dim] (zero for padding rows), fused."""
        v = self._pooled("item", self.item_sparse[rows], self.item_dense[rows])
        return v * (rows > 0).unsqueeze(-1).to(v.dtype)

    def _batch_items(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(history item vectors [R, L, dim], candidate item vectors [N, dim]), each distinct
        item of the batch embedded once. Kept until both halves are used by the same forward
        pass; the key holds the batch's tensors themselves and the weights' version counters,
        so another batch, an optimizer step or a grad-mode change never sees stale vectors."""
        weights = [self.table.weight, self.item_sparse, self.item_dense,
                   *(self.dense["item"].parameters() if "item" in self.dense else ())]
        key = (b.hist_item, b.cand_item, torch.is_grad_enabled(), *(t._version for t in weights))
        c = self._items_cache
        if c is not None and c[0][0] is key[0] and c[0][1] is key[1] and c[0][2:] == key[2:]:
            return c[1], c[2]
        rows = torch.cat([b.hist_item.reshape(-1), b.cand_item])
        uniq, inv = unique_ids(rows, self.item_sparse.shape[0])
        vec = self._item_vectors(uniq).index_select(0, inv)
        n_hist = b.hist_item.numel()
        out = (vec[:n_hist].view(*b.hist_item.shape, self.dim), vec[n_hist:])
        self._items_cache = (key, *out)
        return out

    def _used_items(self) -> None:
        """Drop the batch's item vectors once history and candidates both took theirs."""
        if self._items_cache is not None:
            if len(self._items_cache) == 4:
                self._items_cache = None
            else:
                self._items_cache = (*self._items_cache, True)

    # ---- per-field vectors (both paths) ----------------------------------------------------
    def fields(self, role: str, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[..., S] ids + [..., N] dense -> [..., F, dim]: one vector per feature (lists mean-pooled)."""
        if self.fast and ids.shape[-1] and all(w == 1 for _, w in self._layout[role]):
            emb = self._bag(ids.unsqueeze(-1), (ids > 0).to(self.table.weight.dtype).unsqueeze(-1))
            if role in self.dense:
                emb = torch.cat([emb, self.dense[role](dense).unsqueeze(-2)], dim=-2)
            return emb
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
        if self.fast:
            return self._bag(ids, self._weights(None, ids))
        return masked_mean(self.table(ids), ids > 0, -2)

    def item_fields(self, rows: torch.Tensor) -> torch.Tensor:
        return self.fields("item", self.item_sparse[rows], self.item_dense[rows])

    def item(self, rows: torch.Tensor) -> torch.Tensor:
        """Item rows [...] -> [..., dim]: id + side features, summed (zero for padding rows)."""
        if self.fast:
            return self._item_vectors(rows.reshape(-1)).view(*rows.shape, self.dim)
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
        if self.fast:
            x = self._batch_items(b)[0]
            self._used_items()
            ids = torch.cat([b.hist_sparse, b.hist_query], -1)
            w = torch.cat([self._weights("behavior", b.hist_sparse), self._weights(None, b.hist_query)], -1)
            x = x + self._bag(ids, w)
            if "behavior" in self.dense:
                x = x + self.dense["behavior"](b.hist_dense)
        else:
            x = self.item(b.hist_item)
            beh = self.fields("behavior", b.hist_sparse, b.hist_dense)
            if beh.shape[-2]:
                x = x + beh.sum(-2)
            x = x + self.text(b.hist_query)
        x = x + self.time(b.hist_time)
        return x * b.hist_mask.unsqueeze(-1).to(x.dtype)

    def candidate(self, b: Batch) -> torch.Tensor:
        """Candidate vectors [N, dim]: the item plus the impression's own features (price shown...)."""
        if self.fast:
            x = self._batch_items(b)[1]
            self._used_items()
            return x + self._pooled("candidate", b.cand_sparse, b.cand_dense) if self.n_fields("candidate") else x
        x = self.item(b.cand_item)
        c = self.fields("candidate", b.cand_sparse, b.cand_dense)
        return x + c.sum(-2) if c.shape[-2] else x


class RequestSlots(NamedTuple):
    """Where each candidate sits in a request-major [R, C] grid (C = most candidates of a request).

    Candidates of one request share its history, so work that reads the history per candidate
    can run as one batched matmul per request over this grid instead of gathering the history
    once per candidate. ``dense``: every request has C candidates, in order, so the grid is a view.
    """

    cand_req: torch.Tensor   # [N]
    slot: torch.Tensor       # [N] position of the candidate among its request's candidates
    n_requests: int
    width: int               # C
    dense: bool


def per_request(fast: bool) -> bool:
    """Whether to take a per-request fast path: ``fast`` and not under a trace (an export). The grid's
    width and layout are read from the batch as Python numbers, which a trace would freeze at the
    example's candidate count; the reference forms have no such number."""
    return fast and not torch.jit.is_tracing()


def inference_path(fast: bool) -> bool:
    """Whether to take an inference-only fast form: :func:`per_request` and no autograd (training
    and anything that needs gradients keep the reference form)."""
    return per_request(fast) and not torch.is_grad_enabled()


def request_slots(cand_req: torch.Tensor, n_requests: int) -> RequestSlots:
    """The grid of ``cand_req`` [N] (any order; request-major batches make it a plain view)."""
    n = cand_req.shape[0]
    counts = torch.bincount(cand_req, minlength=n_requests)
    width = int(counts.max()) if n else 0
    ordered = n == 0 or bool((cand_req[1:] >= cand_req[:-1]).all())
    order = torch.arange(n, device=cand_req.device) if ordered else torch.argsort(cand_req, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(cand_req)
    slot[order] = torch.arange(n, device=cand_req.device) - start[cand_req[order]]
    return RequestSlots(cand_req, slot, n_requests, width, ordered and n == n_requests * width)


def to_slots(x: torch.Tensor, s: RequestSlots) -> torch.Tensor:
    """[N, ...] -> [R, C, ...]; empty slots hold zeros (their results are never read back)."""
    if s.dense:
        return x.view(s.n_requests, s.width, *x.shape[1:])
    out = x.new_zeros(s.n_requests, s.width, *x.shape[1:])
    return out.index_put((s.cand_req, s.slot), x)


def from_slots(x: torch.Tensor, s: RequestSlots) -> torch.Tensor:
    """[R, C, ...] -> [N, ...], the inverse of :func:`to_slots`."""
    if s.dense:
        return x.reshape(-1, *x.shape[2:])
    return x[s.cand_req, s.slot]


def request_bmm(a: torch.Tensor, b: torch.Tensor, cand_req: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """``torch.bmm(a, b[cand_req])``: a [N, m, k] per candidate, b [R, k, n] per request -> [N, m, n].

    ``fast`` runs it as one matmul per request over its candidates (:func:`request_slots`), without
    copying ``b`` per candidate (nor scattering its gradient back); False: the literal form."""
    if not per_request(fast):
        return torch.bmm(a, b[cand_req])
    s = request_slots(cand_req, b.shape[0])
    grid = to_slots(a, s)                                                   # [R, C, m, k]
    out = torch.bmm(grid.flatten(1, 2), b).view(*grid.shape[:3], b.shape[-1])
    return from_slots(out, s)


class TargetAttention(nn.Module):
    """DIN's activation unit: weight each key by an MLP of [q, k, q-k, q*k], no softmax.

    Two forms of the same function. The reference (``fast = False``) builds the concatenated
    [N, L, 4d] input per (candidate, behaviour). The fast form (default) uses that the MLP's first
    layer is linear in its four blocks: ``W1 q + W2 k + W3 (q-k) + W4 (q*k) = (W1 + W3) q +
    (W2 - W3) k + W4 (q*k)``: the key part once per request behaviour [R, L, h], the query part
    once per candidate [N, h], and only ``W4 (q*k)`` per (candidate, behaviour), as one matmul over
    the request-major grid (:func:`request_slots`), so the history is never copied per candidate.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32), softmax: bool = False):
        super().__init__()
        self.mlp = MLP(4 * dim, hidden, out_dim=1, act=nn.SiLU)
        self.softmax = softmax
        self.fast = True

    def _weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores [..., L] from the rest of the MLP, masked (or softmaxed over the valid keys)."""
        for m in list(self.mlp)[1:]:
            h = m(h)
        w = h.squeeze(-1)
        if self.softmax:
            return w.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        return w * mask.to(w.dtype)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                cand_req: torch.Tensor | None = None) -> torch.Tensor:
        """q [N, d]; keys [R, L, d], mask [R, L] per request and ``cand_req`` [N] (None: keys and
        mask are already per candidate, R = N) -> [N, d]."""
        if not per_request(self.fast):
            return self.forward_reference(q, keys, mask, cand_req)
        if cand_req is None:
            cand_req = torch.arange(q.shape[0], device=q.device)
        s = request_slots(cand_req, keys.shape[0])
        first = self.mlp[0]
        w1, w2, w3, w4 = first.weight.split(q.shape[-1], dim=1)
        kh = F.linear(keys, w2 - w3)                                          # [R, L, h]
        qh = to_slots(F.linear(q, w1 + w3, first.bias), s)                    # [R, C, h]
        # under autocast the pair product is formed in the autocast dtype: the matmul below would
        # cast it anyway, and the [R, C, L, d] tensor is the largest of the step (x1.36 on the
        # attention's fwd + bwd in bf16)
        dev = q.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
        qk = to_slots(q.to(dt), s).unsqueeze(2) * keys.to(dt).unsqueeze(1)    # [R, C, L, d]
        h = F.linear(qk, w4) + kh.unsqueeze(1) + qh.unsqueeze(2)
        w = self._weights(h, mask.unsqueeze(1))                               # [R, C, L]
        return from_slots(torch.bmm(w, keys), s)

    def forward_reference(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                          cand_req: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's form: the MLP over the concatenated [q, k, q-k, q*k] of every pair."""
        if cand_req is not None:
            keys, mask = keys[cand_req], mask[cand_req]
        qq = q.unsqueeze(1).expand_as(keys)
        h = self.mlp[0](torch.cat([qq, keys, qq - keys, qq * keys], -1))
        w = self._weights(h, mask)
        return torch.bmm(w.unsqueeze(1), keys).squeeze(1)


def set_fast_layers(model: nn.Module, on: bool) -> None:
    """Switch every layer with a fast and a reference form (a boolean ``fast`` attribute: target
    attention, the HSTU stack, SIM's GSU...) to one or the other. The embedder keeps its own switch
    (``model.emb.fast``), measured apart."""
    for m in model.modules():
        if not isinstance(m, FeatureEmbedder) and isinstance(getattr(m, "fast", None), bool):
            m.fast = on


#: hashed words/bigrams kept per categorical side value (``CrossFeatures``)
SIDE_VALUE_TOKENS = 4
#: categorical features with more values than this (ids, not names) are not tokenised
MAX_SIDE_VOCAB = 100_000


HISTORY_DECAY = 0.9  # weight of a behaviour in the recency-weighted match: decay ** (later behaviours)
MAX_ACTIONS_SPLIT = 8  # more behaviour action types than this: history-match counts over all actions only
HISTORY_COUNT_SCALE = math.log1p(50)  # count column = log1p(hits) / this (1 = every behaviour of a default
#                                       50-behaviour window hits)


def history_recency(batch: Batch, decay: float = HISTORY_DECAY) -> torch.Tensor:
    """[R, L] ``decay ** (number of later behaviours)``, 0 on padding (histories are left-aligned)."""
    L = batch.hist_item.shape[1]
    age = (batch.hist_len.unsqueeze(1) - 1 - torch.arange(L, device=batch.hist_item.device)).clamp_min(0)
    return decay ** age.float() * batch.hist_mask


def history_item_match(batch: Batch) -> torch.Tensor:
    """[N, L] the behaviour's item is the candidate (known items only: rows 0/1 are pad/OOV)."""
    h = batch.hist_item[batch.cand_req]
    return (h == batch.cand_item.unsqueeze(1)) & (batch.cand_item > 1).unsqueeze(1)


def history_feature_match(batch: Batch, item_sparse: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """[N, L] the behaviour's item shares a value of the item feature at slots [start, start+width)
    with the candidate (a list feature matches on any shared value)."""
    c = item_sparse[batch.cand_item, start:start + width]                       # [N, W]
    h = item_sparse[batch.hist_item, start:start + width][batch.cand_req]       # [N, L, W]
    eq = (h.unsqueeze(-1) == c.unsqueeze(1).unsqueeze(2)) & (c > 0).unsqueeze(1).unsqueeze(2)
    return eq.any(-1).any(-1) & batch.hist_mask[batch.cand_req]


class BehaviourActions(NamedTuple):
    """Where the behaviours' ``action`` feature (click, cart, purchase...) sits in ``hist_sparse``."""

    slot: int | None     # None: the data has no action feature
    offset: int          # its OOV id; values are offset + 1 .. offset + n
    n: int               # number of action types

    @classmethod
    def of(cls, fmap: FeatureMap) -> BehaviourActions:
        act = fmap.features.get("action")
        slot = next((s for f, s, _ in fmap.slot_layout("behavior") if f.name == "action"), None)
        return cls(slot, act.offset if act is not None else 0, len(act.vocab) if act is not None and slot is not None else 0)

    def ids(self, batch: Batch) -> torch.Tensor:
        """[R, L] local action ids 1..n (0 = padding, unknown action or no action feature)."""
        if self.slot is None:
            return torch.zeros_like(batch.hist_item)
        a = batch.hist_sparse[..., self.slot]
        return torch.where(a > self.offset, a - self.offset, torch.zeros_like(a))

    def onehot(self, batch: Batch) -> torch.Tensor:
        """[R, L, n] one-hot of each behaviour's action type (all 0 for padding / an unknown action)."""
        return F.one_hot(self.ids(batch), self.n + 1)[..., 1:].float()


class CrossFeatures(nn.Module):
    """The cross features of a candidate and its request, the same for every neural model.

    Per candidate, ``width = 2 * dim + 4 + n_history (+ dim) + n_rank`` columns::

        [ c * q,  c * h,  text share, text any, side share, side any,  history matches,  k * q,  ranks ]

    ``c`` is the candidate vector, ``q`` the request's query vector, ``h`` the masked mean of its
    history tokens. The overlap columns compare the request's hashed query tokens with the
    candidate's own tokens: *text* = its text features (item and impression roles), already in the
    query's hashed token space; *side* = the words of its categorical side values (category,
    brand...), hashed into that space here once from the feature map's vocabularies. *share* is
    the fraction of the query's tokens found, *any* whether one is (both 0 for an empty query).
    The item id and features with more than ``MAX_SIDE_VOCAB`` values are not tokenised.

    *history matches* (``history=True``, ``model.cross_history``): for the candidate's item, then
    for each of its categorical side features (category, brand...), how often the user's earlier
    behaviours hit the same value (``log1p(count) / log1p(50)``) and how recently (the share of the
    weights ``HISTORY_DECAY ** later behaviours`` that falls on hits); both in [0, 1]; then, when the
    behaviours have an ``action`` feature with at most ``MAX_ACTIONS_SPLIT`` types, the count per
    action type (click, cart, purchase...). A pooled history ``h`` blurs an exact repeat; these
    columns carry it, as the ``history_match`` and ``gbdt`` baselines see it, so every neural model
    gets the same evidence as the baselines it is compared with.

    *k * q* (``category=True``, ``model.cross_category``, when the dataset declares a ``category``):
    the query vector times the embedding of the candidate's category value alone. ``c`` sums the
    item's id, brand, price... vectors, which blurs the query -> category affinity (the ``gbdt``
    baseline's strongest feature); on synthetic ``small`` DIN separated query-category matches from
    the rest at GAUC 0.87 without these columns, against gbdt's 1.00.

    *ranks* (``rank=True``, ``model.cross_rank``): each numeric candidate and item feature (price,
    discount...) as the share of the request's other candidates with a smaller value, the ``gbdt``
    baseline's ``rank_in_request`` columns (5% of its gain on Trivago, where the price rank of a hotel
    within the list matters).

    At inference (no autograd, not under an export trace; ``inference_fast``, default on) the history
    matches are counted once per request: every (request, value) of its behaviours is counted,
    recency-summed and counted per action once (a sort), and each candidate looks its values up,
    instead of comparing every candidate with every behaviour ([N, L] per side feature). Counts are
    identical, the recency shares equal up to float summation order; training keeps the reference form.
    """

    N_OVERLAP = 4
    ROLES = ("item", "candidate")
    #: composite (request, value) keys: request * KEY_STRIDE + value (item rows and table ids are far below it)
    KEY_STRIDE = 1 << 40

    def __init__(self, fmap: FeatureMap, dim: int, history: bool = True, category: bool = True,
                 rank: bool = False):
        super().__init__()
        # numeric candidate / item features (price...) ranked within their request
        self.n_rank = (fmap.n_numeric("candidate") + fmap.n_numeric("item")) if rank else 0
        # the item slots of the dataset's declared category: q * category vector, a learned query ->
        # category affinity that the summed candidate vector (id + brand + price + ...) blurs
        self.category_slots = next(((s, w) for f, s, w in fmap.slot_layout("item") if f.name == fmap.has_category),
                                   None) if category else None
        self.history_slots = ([(s, w) for f, s, w in fmap.slot_layout("item") if f.type in ("categorical", "list")
                               and f.name != "item_id" and len(f.vocab) <= MAX_SIDE_VOCAB] if history else [])
        # per action type (click, cart, purchase...): a purchase of the same brand says more than an impression
        self.action = BehaviourActions.of(fmap)
        self.n_actions = self.action.n if history and self.action.n <= MAX_ACTIONS_SPLIT else 0
        self.n_history = (2 + self.n_actions) * (1 + len(self.history_slots)) if history else 0
        self.inference_fast = True  # per-request history matches at inference (see the class docstring)
        self.register_buffer("single_slots", torch.tensor([s for s, w in self.history_slots if w == 1],
                                                          dtype=torch.long), persistent=False)
        self.width = (2 * dim + self.N_OVERLAP + self.n_history + (dim if self.category_slots else 0)
                      + self.n_rank)
        tables = [np.zeros((1, SIDE_VALUE_TOKENS), dtype=np.int64)]     # row 0: missing value
        n_rows = 1
        self.has_tokens: dict[str, bool] = {}
        for role in self.ROLES:
            text, side, shift = [], [], []
            for f, start, width in fmap.slot_layout(role):
                slots = list(range(start, start + width))
                if f.type == "text":
                    text += slots
                elif f.type in ("categorical", "list") and f.name != "item_id" and len(f.vocab) <= MAX_SIDE_VOCAB:
                    # rows: the feature's OOV id (no tokens), then one row per vocabulary value
                    tables.append(np.zeros((1, SIDE_VALUE_TOKENS), dtype=np.int64))
                    if f.vocab:
                        tables.append(fmap.encode_text(f.vocab, SIDE_VALUE_TOKENS))
                    side += slots
                    shift += [n_rows - f.offset] * width
                    n_rows += 1 + len(f.vocab)
            self.has_tokens[role] = bool(text or side)
            self.register_buffer(f"{role}_text_slots", torch.tensor(text, dtype=torch.long), persistent=False)
            self.register_buffer(f"{role}_side_slots", torch.tensor(side, dtype=torch.long), persistent=False)
            self.register_buffer(f"{role}_side_shift", torch.tensor(shift, dtype=torch.long), persistent=False)
        self.register_buffer("side_tokens", torch.from_numpy(np.concatenate(tables)), persistent=False)

    def tokens(self, role: str, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A role's sparse ids [..., S] -> (text token ids [..., Tt], side-value token ids [..., Ts]), 0 = none."""
        text = sparse[..., getattr(self, f"{role}_text_slots")]
        ids = sparse[..., getattr(self, f"{role}_side_slots")]
        rows = torch.where(ids > 0, ids + getattr(self, f"{role}_side_shift"), torch.zeros_like(ids))
        return text, self.side_tokens[rows].flatten(-2)

    @staticmethod
    def overlap(query: torch.Tensor, text: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Query tokens [N, Q] vs the candidate's text [N, Tt] and side [N, Ts] tokens -> [N, 4] floats
        (text share, text any, side share, side any)."""
        valid = query > 0                                       # padding (0) never counts as a match
        eq = query.unsqueeze(-1) == torch.cat([text, side], -1).unsqueeze(-2)       # [N, Q, Tt + Ts]
        t = text.shape[-1]
        hit = torch.stack([eq[..., :t].any(-1), eq[..., t:].any(-1)], 1) & valid.unsqueeze(1)  # [N, 2, Q]
        share = hit.sum(-1) / valid.sum(-1, keepdim=True).clamp_min(1)
        return torch.stack([share, hit.any(-1)], -1).flatten(1).float()

    def _inference(self) -> bool:
        return inference_path(self.inference_fast)

    def overlap_request(self, query: torch.Tensor, cand_req: torch.Tensor, text: torch.Tensor,
                        side: torch.Tensor) -> torch.Tensor:
        """:meth:`overlap` with the query per request ([R, Q]). One request at inference: its query's
        tokens (padding dropped) against every candidate, without a copy of the query per candidate."""
        if query.shape[0] != 1 or not self._inference():
            return self.overlap(query[cand_req], text, side)
        q = query[0]
        q = q[q > 0]                                                                # [Qv]
        if not q.numel():
            return text.new_zeros(text.shape[0], 4, dtype=torch.float32)
        t = text.shape[-1]
        eq = torch.cat([text, side], -1).unsqueeze(-1) == q                         # [N, Tt + Ts, Qv]
        hit = torch.stack([eq[:, :t].any(1), eq[:, t:].any(1)], 1)                  # [N, 2, Qv]
        share = hit.sum(-1) / q.new_full((1, 1), q.numel())
        return torch.stack([share, hit.any(-1)], -1).flatten(1).float()

    def history_match(self, batch: Batch, item_sparse: torch.Tensor) -> torch.Tensor:
        """[N, n_history]: (log-scaled count, recency-weighted share) of history hits on the candidate's
        item, then on each item side feature."""
        if not self.n_history:
            return torch.zeros(batch.cand_item.shape[0], 0, device=batch.cand_item.device)
        if self._inference():
            return self.history_match_per_request(batch, item_sparse)
        return self.history_match_reference(batch, item_sparse)

    def history_match_reference(self, batch: Batch, item_sparse: torch.Tensor) -> torch.Tensor:
        """The literal form: every candidate against every behaviour of its request, [N, L] per feature."""
        recency = history_recency(batch)[batch.cand_req]                            # [N, L]
        # both columns ~[0, 1]: the count on a log scale (a constant scale, so padding never changes a
        # score), and the recency-weighted share of the history that hits
        count_scale = HISTORY_COUNT_SCALE
        total = recency.sum(-1).clamp_min(1e-6)
        matches = [history_item_match(batch), *(history_feature_match(batch, item_sparse, s, w)
                                                for s, w in self.history_slots)]
        actions = self.action.onehot(batch)[batch.cand_req] if self.n_actions else None  # [N, L, A]
        cols = []
        for m in matches:
            m = m.float()
            cols += [torch.log1p(m.sum(-1)) / count_scale, (m * recency).sum(-1) / total]
            if actions is not None:
                cols += list((torch.log1p(torch.bmm(m.unsqueeze(1), actions).squeeze(1)) / count_scale).unbind(-1))
        return torch.stack(cols, -1)

    def category_vectors(self, table: nn.Embedding, item_sparse: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[N, d] the embedding of each item's category value (mean over a list's values, 0 if none)."""
        s, w = self.category_slots
        ids = item_sparse[items, s:s + w]
        return masked_mean(table(ids), ids > 0, 1)

    def history_match_per_request(self, batch: Batch, item_sparse: torch.Tensor) -> torch.Tensor:
        """:meth:`history_match_reference`, counted per request (no [N, L] comparison for single-valued
        features; list features compare on the request grid, without copying the history per candidate)."""
        hist, cand, cand_req = batch.hist_item, batch.cand_item, batch.cand_req
        R, L = hist.shape
        if L == 0:
            return self.history_match_reference(batch, item_sparse)
        mask = hist > 0
        recency = history_recency(batch)                                            # [R, L]
        total = gather_rows(recency.sum(-1).clamp_min(1e-6), cand_req)                           # [N]
        n_items, width = item_sparse.shape
        # keys per behaviour and per candidate: the item row, then each single-valued side feature's id
        # (shifted past the item rows; ids of different features never collide: one shared table)
        single = self.single_slots
        flat = item_sparse.reshape(-1)
        h_side = flat.take((hist * width).unsqueeze(-1) + single) + n_items              # [R, L, F-1]
        c_side = flat.take((cand * width).unsqueeze(-1) + single)                        # [N, F-1]
        h_key = torch.cat([hist.unsqueeze(-1), h_side], -1)                         # [R, L, F]
        c_key = torch.cat([cand.unsqueeze(-1), c_side + n_items], -1)               # [N, F]
        c_ok = torch.cat([(cand > 1).unsqueeze(-1), c_side > 0], -1)                # known item / a value
        stride = self.KEY_STRIDE
        req = torch.arange(R, device=hist.device).mul_(stride)
        h_key = torch.where(mask.unsqueeze(-1), h_key + req[:, None, None], -1)     # padding: no candidate's key
        F_ = h_key.shape[-1]
        keys, inv, counts = torch.unique(h_key.reshape(-1), return_inverse=True, return_counts=True)
        weights = torch.zeros(keys.shape[0], dtype=recency.dtype, device=hist.device).index_add_(
            0, inv, recency.unsqueeze(-1).expand(R, L, F_).reshape(-1))
        c_key = c_key + gather_rows(req, cand_req).unsqueeze(-1)
        pos = torch.searchsorted(keys, c_key).clamp_max(keys.shape[0] - 1)
        hit = (keys.take(pos) == c_key) & c_ok                                          # [N, F]
        count = torch.where(hit, counts.take(pos), 0).to(recency.dtype)
        share = torch.where(hit, weights.take(pos), 0) / total.unsqueeze(-1)
        groups = [torch.log1p(count).unsqueeze(-1) / HISTORY_COUNT_SCALE, share.unsqueeze(-1)]
        actions = self.action.onehot(batch) if self.n_actions else None             # [R, L, A]
        if actions is not None:  # hits per action type: the behaviours' one-hots summed per key
            A = actions.shape[-1]
            per_key = torch.zeros(keys.shape[0], A, dtype=recency.dtype, device=hist.device).index_add_(
                0, inv, actions.unsqueeze(2).expand(R, L, F_, A).reshape(-1, A))
            per_cand = per_key.index_select(0, pos.reshape(-1)).view(*pos.shape, A)      # [N, F, A]
            groups.append(torch.log1p(torch.where(hit.unsqueeze(-1), per_cand, 0)) / HISTORY_COUNT_SCALE)
        cols = torch.cat(groups, -1)                                                # [N, F, 2 + A]
        if len(single) == len(self.history_slots):
            return cols.flatten(1)
        out, k = [cols[:, 0]], 1  # list features: any shared value, on the request grid
        s_ = request_slots(cand_req, R)
        for start, w in self.history_slots:
            if w == 1:
                out.append(cols[:, k])
                k += 1
                continue
            hv = item_sparse[hist, start:start + w]                                 # [R, L, W]
            cv = to_slots(item_sparse[cand, start:start + w], s_)                   # [R, C, W]
            eq = (hv[:, None, :, :, None] == cv[:, :, None, None, :]) & (cv > 0)[:, :, None, None, :]
            m = (eq.flatten(-2).any(-1) & mask.unsqueeze(1)).to(recency.dtype)      # [R, C, L]
            n = from_slots(m.sum(-1), s_)
            wsum = from_slots(torch.bmm(m, recency.unsqueeze(-1)).squeeze(-1), s_)
            out.append(torch.stack([torch.log1p(n) / HISTORY_COUNT_SCALE, wsum / total], -1))
            if actions is not None:
                out.append(torch.log1p(from_slots(torch.bmm(m, actions), s_)) / HISTORY_COUNT_SCALE)
        return torch.cat(out, -1)

    def request_ranks(self, cand_dense: torch.Tensor, item_dense: torch.Tensor, cand_req: torch.Tensor
                      ) -> torch.Tensor:
        """[N, n_rank]: per numeric candidate then item feature, the share of the request's other
        candidates with a smaller value (:func:`group_rank`, the gbdt baseline's ``rank_in_request``).
        It is what a pointwise head cannot see: whether this hotel is the cheap one *of this list*."""
        values = torch.cat([cand_dense, item_dense], -1).float()
        return torch.stack([group_rank(v, cand_req) for v in values.unbind(-1)], -1)

    def parts(self, c: torch.Tensor, q: torch.Tensor, h: torch.Tensor, overlap: torch.Tensor,
              history: torch.Tensor | None = None, category: torch.Tensor | None = None,
              ranks: torch.Tensor | None = None) -> list[HeadPart]:
        """The block's columns (class docstring) as head-input parts, with q and h per request ([R, d]): ``c * q``,
        ``c * h`` and ``k * q`` stay unmaterialised (:class:`Scaled`), so an inference head folds them
        into its first layer (:meth:`TwoTaskHead.forward_split`)."""
        parts: list[HeadPart] = [Scaled(c, q), Scaled(c, h), overlap.to(c.dtype)]
        if self.n_history:
            parts.append(history.to(c.dtype))
        if self.category_slots:
            parts.append(Scaled(category.to(c.dtype), q))
        if self.n_rank:
            parts.append(ranks.to(c.dtype))
        return parts


class Scaled(NamedTuple):
    """Head-input columns ``c * s[cand_req]`` (``s`` None: ``c`` itself), not materialised.

    Such columns enter the head's first layer linearly in ``c`` with a per-request scale, so at
    inference ``W_k (c * s_r) = (W_k diag(s_r)) c``: the scales fold into one [H, d] weight per
    request and the candidates need one [N, d] x [d, H] product for all of them together, instead of
    gathering ``s`` per candidate and multiplying a [N, K * d] input."""

    c: torch.Tensor              # [N, d]
    s: torch.Tensor | None       # [R, d] per request, or None (the columns are c)


HeadPart = torch.Tensor | Scaled


def materialize(parts: list[HeadPart], cand_req: torch.Tensor) -> torch.Tensor:
    """Head-input parts -> the concatenated candidate input [N, Dc] (the reference form)."""
    cols = [p if isinstance(p, torch.Tensor) else (p.c if p.s is None else p.c * gather_rows(p.s, cand_req))
            for p in parts]
    return torch.cat(cols, -1)


def split_linear(layer: nn.Linear, req: torch.Tensor, cand: torch.Tensor, cand_req: torch.Tensor) -> torch.Tensor:
    """``layer(cat([req[cand_req], cand], -1))`` with the request share computed once per request.

    req [R, Dr] -> [R, h] once, gathered to candidates; cand [N, Dc] -> [N, h]; summed.
    """
    k = req.shape[-1]
    w = layer.weight
    return gather_rows(F.linear(req, w[:, :k], layer.bias), cand_req) + F.linear(cand, w[:, k:])


def folded_linear(layer: nn.Linear, req: torch.Tensor, parts: list[HeadPart], cand_req: torch.Tensor) -> torch.Tensor:
    """``split_linear(layer, req, materialize(parts, cand_req), cand_req)`` with every :class:`Scaled`
    part folded into a per-request weight (one product per candidate vector, see :class:`Scaled`).

    Equal up to float summation order. One request (a served request) never gathers: its request
    share is broadcast."""
    w = layer.weight
    k = req.shape[-1]
    out_req = F.linear(req, w[:, :k], layer.bias)                              # [R, H]
    plain, plain_w = [], []
    groups: dict[int, tuple[torch.Tensor, list]] = {}
    col = k
    for p in parts:
        x = p if isinstance(p, torch.Tensor) else p.c
        wk = w[:, col:col + x.shape[-1]]
        col += x.shape[-1]
        if isinstance(p, torch.Tensor):
            plain.append(p)
            plain_w.append(wk)
        else:
            groups.setdefault(id(p.c), (p.c, []))[1].append((wk, p.s))
    if col != w.shape[1]:
        raise ValueError(f"head input has {col} columns, the layer expects {w.shape[1]}")
    R = req.shape[0]
    out = None
    if plain:
        out = F.linear(torch.cat(plain, -1) if len(plain) > 1 else plain[0],
                       torch.cat(plain_w, 1) if len(plain_w) > 1 else plain_w[0])
    for c, terms in groups.values():
        m = None                                                                # [R, H, d]
        for wk, s in terms:
            t = wk.unsqueeze(0) if s is None else wk.unsqueeze(0) * s.unsqueeze(1)
            m = t if m is None else m + t
        if m.shape[0] != R:
            m = m.expand(R, -1, -1)
        y = F.linear(c, m[0]) if R == 1 else request_bmm(c.unsqueeze(1), m.transpose(1, 2), cand_req).squeeze(1)
        out = y if out is None else out + y
    if out is None:
        return out_req[cand_req]
    return out + (out_req if R == 1 else out_req[cand_req])


class TwoTaskHead(nn.Module):
    """Shared MLP trunk, then a CTR logit and a CVR logit.

    ``inference_fast`` (default on): without autograd and outside an export trace,
    :meth:`forward_split` folds per-request scaled candidate columns into the first layer
    (:func:`folded_linear`); training and exports use the concatenated form."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        self.trunk = MLP(in_dim, hidden, dropout)
        self.ctr = nn.Linear(self.trunk.out_dim, 1)
        self.cvr = nn.Linear(self.trunk.out_dim, 1)
        self.inference_fast = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference (concatenated) form: x [N, Dr + Dc]."""
        h = self.trunk(x)
        return self.ctr(h).squeeze(-1), self.cvr(h).squeeze(-1)

    def forward_split(self, req: torch.Tensor, cand: torch.Tensor | list[HeadPart], cand_req: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Equal to ``forward(cat([req[cand_req], cand], -1))``; the first layer's request share is
        computed once per request (req [R, Dr]) and only the candidate share per candidate. ``cand``
        is the candidate input [N, Dc] or its parts (:class:`Scaled` parts folded at inference)."""
        layers = list(self.trunk)
        first = layers[0] if layers else None
        linear = split_linear
        if isinstance(cand, list):
            if inference_path(self.inference_fast):
                linear = folded_linear
            else:
                cand = materialize(cand, cand_req)
        if first is None:  # no hidden layer: the logits themselves are the first layer
            return (linear(self.ctr, req, cand, cand_req).squeeze(-1),
                    linear(self.cvr, req, cand, cand_req).squeeze(-1))
        h = linear(first, req, cand, cand_req)
        for m in layers[1:]:
            h = m(h)
        return self.ctr(h).squeeze(-1), self.cvr(h).squeeze(-1)


class PositionBias(nn.Module):
    """Shallow position tower (PAL-style): a logit offset per shown position.

    A training-time debiasing device. A logged click mixes relevance with where the old ranker
    showed the item (top positions get clicked more whatever they hold). Training adds this
    offset for the logged position so the position effect is explained by the tower and not
    absorbed into the relevance score (PAL, Guo et al. 2019). A live request has no position, so
    serving scores without it (``forward(use_position=False)``, what ``Ranker.rank`` computes),
    and the primary ``serving`` metric family evaluates exactly that. The ``as_shown`` family
    adds the offset for the logged position: it measures how well the model explains the log,
    inflated by the old ranker's ordering, and is reported second. The offset is the same for
    every candidate at a given position, so it cannot change a live ranking.
    """

    def __init__(self):
        super().__init__()
        self.bias = nn.Embedding(MAX_POSITION, 1, padding_idx=0)
        nn.init.zeros_(self.bias.weight)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        return self.bias(position).squeeze(-1)
