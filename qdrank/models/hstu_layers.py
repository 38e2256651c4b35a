"""The HSTU layer (Zhai et al., ICML 2024) and the encode-once / score-many stack shared by the
``hstu`` and ``mtgr`` models.

One HSTU layer on tokens ``X``::

    U, V, Q, K = split(SiLU(f1(Norm(X))))
    A          = SiLU(Q K^T / sqrt(d_head) + rab) / n     (pointwise, no softmax; masked)
    Y          = X + f2(Dropout(U * Norm(A V)))

``n`` is the true length of the (unpadded) token sequence a candidate belongs to: request tokens
plus the one candidate token, the same number for every token of that sequence. ``rab`` is a
learned relative attention bias: one table over bucketed relative positions and one over pairs of
time-gap buckets (see :class:`RelativeBias`). ``Norm`` is a :class:`GroupLayerNorm`: with one group
it is an ordinary LayerNorm; MTGR gives each token group (user / context / history / candidate) its
own affine parameters.

Tokens are either *static* (user profile / context fields: no position, visible to every token,
attend only to static tokens) or *sequence* tokens (behaviours, causal by position). The request's
tokens are encoded once (:meth:`HSTUStack.encode`), caching every layer's keys and values; each
candidate is then one extra token appended to its request's sequence (:meth:`HSTUStack.candidates`)
that attends to the cached keys/values of every layer plus itself, never to other candidates. This
is exactly the full-sequence computation with that candidate appended (tested against a naive
implementation), at the cost of one token per candidate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qdrank.models.layers import Dropout, RequestSlots, from_slots, per_request, request_slots, to_slots

#: time-gap bucket of a candidate: the request happens "now", gap 0 -> 1 + floor(log2(1 + 0)) = 1
CANDIDATE_TIME_BUCKET = 1


def position_bucket(dist: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Relative distance (>= 0) -> bucket in [0, n_buckets): exact below n_buckets // 2, then log2."""
    exact = max(n_buckets // 2, 1)
    d = dist.clamp_min(0)
    log_b = exact + torch.floor(torch.log2(d.clamp_min(1).to(torch.float32) / exact)).to(torch.long)
    return torch.where(d < exact, d, log_b).clamp(max=n_buckets - 1)


def rows(table: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """``table(idx)`` for a table without padding row, as ``index_select``: the same values and
    gradient, but its backward (an index_add) is ~8x faster on CPU than the embedding backward
    for a small table read at every (query, key) pair (measured: 1.8 vs 14.9 ms for 196k lookups)."""
    return table.weight.index_select(0, idx.reshape(-1)).view(*idx.shape, table.weight.shape[-1])


class GroupLayerNorm(nn.Module):
    """LayerNorm with separate affine parameters per token group (one group = plain LayerNorm).

    Equivalent to one ``nn.LayerNorm`` per group: the normalisation itself has no parameters.
    """

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(n_groups, dim))
        self.bias = nn.Parameter(torch.zeros(n_groups, dim))

    def forward(self, x: torch.Tensor, group: int | torch.Tensor = 0) -> torch.Tensor:
        """``group``: an int for all tokens, or ids broadcastable to ``x.shape[:-1]``."""
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        return y * self.weight[group] + self.bias[group]


class RelativeBias(nn.Module):
    """rab of one layer: a per-head bias from relative position buckets plus one from time buckets.

    The data carries, per behaviour, only the log2 bucket of (request time - behaviour time), not
    raw timestamps, so the relative-time term is a table over the *pair* (query bucket, key bucket),
    which determines the bucket of their time difference as closely as the data allows. Static
    tokens use time bucket 0 and an extra position bucket of their own.
    """

    def __init__(self, heads: int, pos_buckets: int, time_buckets: int):
        super().__init__()
        self.pos_buckets, self.n_time = pos_buckets, time_buckets + 1
        self.pos = nn.Embedding(pos_buckets + 1, heads)          # last row: pairs with a static token
        self.time = nn.Embedding(self.n_time * self.n_time, heads)
        nn.init.zeros_(self.pos.weight)
        nn.init.zeros_(self.time.weight)

    def forward(self, pos_idx: torch.Tensor, time_q: torch.Tensor, time_k: torch.Tensor) -> torch.Tensor:
        """pos_idx [..., Tq, Tk] buckets, time_q [..., Tq], time_k [..., Tk] -> [..., H, Tq, Tk]."""
        tq = time_q.clamp(0, self.n_time - 1).unsqueeze(-1)
        tk = time_k.clamp(0, self.n_time - 1).unsqueeze(-2)
        b = rows(self.pos, pos_idx) + rows(self.time, tq * self.n_time + tk)
        return b.movedim(b.dim() - 1, b.dim() - 3)      # positive dims: ONNX export rejects negative perms


class HSTULayer(nn.Module):
    """One HSTU layer, split into project / attend / output so candidates can reuse cached K, V."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0, n_groups: int = 1):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.in_norm = GroupLayerNorm(dim, n_groups)
        self.f1 = nn.Linear(dim, 4 * inner)
        self.attn_norm = GroupLayerNorm(inner, n_groups)
        self.f2 = nn.Linear(inner, dim)
        self.drop = Dropout(dropout)

    def project(self, x: torch.Tensor, group: int | torch.Tensor = 0):
        """x [..., T, d] -> U [..., T, H*dh]; Q, K, V [..., H, T, dh]."""
        u, v, q, k = F.silu(self.f1(self.in_norm(x, group))).chunk(4, dim=-1)

        def heads(t):
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(-2, -3)
        return u, heads(q), heads(k), heads(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
               n: torch.Tensor) -> torch.Tensor:
        """Pointwise attention. q [..., H, Tq, dh], k/v [..., H, Tk, dh], bias [..., H, Tq, Tk],
        mask [..., 1|H, Tq, Tk] bool, n [...] sequence lengths -> [..., Tq, H*dh]."""
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        a = F.silu(s) * mask.to(s.dtype) / n.to(s.dtype).clamp_min(1.0)[..., None, None, None]
        return torch.matmul(a, v).transpose(-2, -3).flatten(-2)

    def attend_candidates(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                          cache_v: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, n: torch.Tensor,
                          s: RequestSlots) -> torch.Tensor:
        """:meth:`attend` of one candidate token per row over its request's cached keys/values and
        itself, run per request: q, k, v [N, H, 1, dh] (candidates); cache_k/v [R, H, T, dh];
        bias [R, H, 1, T + 1] (the last column: the candidate's own key); mask [R, T]; n [R]
        -> [N, 1, H*dh]. The cached history is read in place (one matmul per request over its
        candidates, :func:`~qdrank.models.layers.request_slots`), never copied per candidate."""
        scale, r = math.sqrt(self.head_dim), s.cand_req
        qs = to_slots(q.squeeze(-2), s).transpose(1, 2)                          # [R, H, C, dh]
        hist = torch.matmul(qs, cache_k.transpose(-1, -2)) / scale + bias[..., :-1]  # [R, H, C, T]
        a = F.silu(hist) * (mask.to(hist.dtype) / n.to(hist.dtype).clamp_min(1.0)[:, None])[:, None, None]
        out = from_slots(torch.matmul(a, cache_v).transpose(1, 2), s)            # [N, H, dh]
        own = (q * k).sum(-1) / scale + bias[r, :, :, -1]                        # [N, H, 1]
        out = out + F.silu(own) / n[r].to(own.dtype).clamp_min(1.0)[:, None, None] * v.squeeze(-2)
        return out.flatten(-2).unsqueeze(-2)

    def output(self, x: torch.Tensor, u: torch.Tensor, av: torch.Tensor, group: int | torch.Tensor = 0
               ) -> torch.Tensor:
        return x + self.drop(self.f2(u * self.attn_norm(av, group)))

    def forward(self, x, bias, mask, n, group: int | torch.Tensor = 0):
        """Full-sequence layer: x [..., T, d] -> (new x, K, V)."""
        u, q, k, v = self.project(x, group)
        return self.output(x, u, self.attend(q, k, v, bias, mask, n), group), k, v


class HSTUStack(nn.Module):
    """``layers`` HSTU layers (each with its own rab) over request tokens + one candidate token.

    Request tokens are described per request row by ``pos`` (position among sequence tokens),
    ``time`` (time-gap bucket, 0 for static/padding), ``static`` and ``valid`` flags, and ``group``
    ids ([T] or [R, T]). Visibility: key j is visible to query i iff j is valid and (j is static, or
    neither is static and pos_j <= pos_i). A candidate sits at position ``n_seq`` (the number of
    valid sequence tokens), sees every valid request token and itself.
    """

    def __init__(self, dim: int, layers: int, heads: int, head_dim: int, time_buckets: int,
                 pos_buckets: int = 32, dropout: float = 0.0, n_groups: int = 1):
        super().__init__()
        self.pos_buckets = pos_buckets
        self.layers = nn.ModuleList(HSTULayer(dim, heads, head_dim, dropout, n_groups) for _ in range(layers))
        self.rab = nn.ModuleList(RelativeBias(heads, pos_buckets, time_buckets) for _ in range(layers))
        self.final_norm = GroupLayerNorm(dim, n_groups)
        self.fast = True  # candidates: per-request attention (False: per-candidate gathered K/V)

    def pair_positions(self, pos_q, pos_k, static_q, static_k) -> torch.Tensor:
        """Relative position bucket of every (query, key) pair [..., Tq, Tk]."""
        b = position_bucket(pos_q.unsqueeze(-1) - pos_k.unsqueeze(-2), self.pos_buckets)
        either_static = static_q.unsqueeze(-1) | static_k.unsqueeze(-2)
        return b.masked_fill(either_static, self.pos_buckets)

    def encode(self, x: torch.Tensor, pos: torch.Tensor, time: torch.Tensor, static: torch.Tensor,
               valid: torch.Tensor, group: int | torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
        """Request tokens x [R, T, d] (rest [R, T]; n [R] = true length incl. the candidate) ->
        cache of per-layer K/V and what candidates need; request outputs under ``"out"``."""
        vis = valid.unsqueeze(-2) & (static.unsqueeze(-2) | (~static.unsqueeze(-1) & ~static.unsqueeze(-2)
                                                             & (pos.unsqueeze(-2) <= pos.unsqueeze(-1))))
        mask = vis.unsqueeze(-3)                                      # [R, 1, T, T]
        pos_idx = self.pair_positions(pos, pos, static, static)
        cache = {"pos": pos, "time": time, "static": static, "valid": valid, "n": n,
                 "n_seq": (valid & ~static).sum(-1)}
        for i, (layer, rab) in enumerate(zip(self.layers, self.rab)):
            x, k, v = layer(x, rab(pos_idx, time, time), mask, n, group)
            cache[f"k{i}"], cache[f"v{i}"] = k, v
        cache["out"] = x
        return cache

    def candidates(self, cache: dict[str, torch.Tensor], x: torch.Tensor, cand_req: torch.Tensor,
                   group: int = 0) -> torch.Tensor:
        """Candidate tokens x [N, d] of requests ``cand_req`` [N] -> final representations [N, d].

        Everything but the candidate's own token depends on its request only (positions, time
        gaps, mask, length), so the attention bias is built once per request and the attention
        runs per request (:meth:`HSTULayer.attend_candidates`); :meth:`candidates_reference`
        (``fast = False``) gathers the request's keys and values per candidate instead."""
        if not per_request(self.fast):
            return self.candidates_reference(cache, x, cand_req, group)
        pos_c = cache["n_seq"]                                         # [R]
        static_k = cache["static"]
        pos_k = torch.cat([cache["pos"], pos_c[:, None]], -1)         # [R, T+1]: the last key is the candidate
        static_k = torch.cat([static_k, torch.zeros_like(static_k[:, :1])], -1)
        time_k = torch.cat([cache["time"], torch.full_like(pos_c[:, None], CANDIDATE_TIME_BUCKET)], -1)
        pos_idx = self.pair_positions(pos_c[:, None], pos_k, torch.zeros_like(static_k[:, :1]), static_k)
        time_q = torch.full_like(pos_c[:, None], CANDIDATE_TIME_BUCKET)
        s = request_slots(cand_req, pos_c.shape[0])
        h = x.unsqueeze(-2)                                            # [N, 1, d]
        for i, (layer, rab) in enumerate(zip(self.layers, self.rab)):
            u, q, k, v = layer.project(h, group)                      # k, v [N, H, 1, dh]
            av = layer.attend_candidates(q, k, v, cache[f"k{i}"], cache[f"v{i}"], rab(pos_idx, time_q, time_k),
                                         cache["valid"], cache["n"], s)
            h = layer.output(h, u, av, group)
        return self.final_norm(h.squeeze(-2), group)

    def candidates_reference(self, cache: dict[str, torch.Tensor], x: torch.Tensor, cand_req: torch.Tensor,
                             group: int = 0) -> torch.Tensor:
        """:meth:`candidates` with the request's keys/values gathered per candidate (one sequence each)."""
        r = cand_req
        pos_c = cache["n_seq"][r]                                      # [N]
        static_k = cache["static"][r]                                  # [N, T]
        pos_k = torch.cat([cache["pos"][r], pos_c[:, None]], -1)      # [N, T+1]
        static_k = torch.cat([static_k, torch.zeros_like(static_k[:, :1])], -1)
        time_k = torch.cat([cache["time"][r], torch.full_like(pos_c[:, None], CANDIDATE_TIME_BUCKET)], -1)
        pos_idx = self.pair_positions(pos_c[:, None], pos_k, torch.zeros_like(static_k[:, :1]), static_k)
        time_q = torch.full_like(pos_c[:, None], CANDIDATE_TIME_BUCKET)
        mask = torch.cat([cache["valid"][r], torch.ones_like(static_k[:, :1])], -1)[:, None, None, :]
        n = cache["n"][r]
        h = x.unsqueeze(-2)                                            # [N, 1, d]
        for i, (layer, rab) in enumerate(zip(self.layers, self.rab)):
            u, q, k, v = layer.project(h, group)                      # k, v [N, H, 1, dh]
            keys = torch.cat([cache[f"k{i}"][r], k], -2)
            vals = torch.cat([cache[f"v{i}"][r], v], -2)
            h = layer.output(h, u, layer.attend(q, keys, vals, rab(pos_idx, time_q, time_k), mask, n), group)
        return self.final_norm(h.squeeze(-2), group)
