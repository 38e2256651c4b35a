"""Attention layers shared by the sequence models (SASRec, SIM, QIN).

* :func:`masked_softmax` — softmax that is exactly 0 on masked keys and all-zero (never NaN) for a
  row with no valid key (an empty history).
* :class:`MultiHeadAttention` — scaled dot-product softmax attention with a boolean mask and an
  optional additive logit bias (used by QIN to inject relevance scores).
* :class:`TransformerBlock` — a standard pre-LN block (self-attention + feed-forward, residuals).
* :func:`causal_mask` — causal & key-padding mask for left-aligned histories.
* :class:`MultiHeadTargetAttention` — one query vector (the candidate, the search query...)
  attending over a set of behaviours; SIM's Exact Search Unit and QIN's attention units.
* :func:`masked_topk` / :func:`gather_tokens` — deterministic per-row top-K selection of
  behaviours and gathering them (SIM's General Search Unit, QIN's Relevance Search Unit).
"""

from __future__ import annotations

import torch
from torch import nn

from qdrank.models.layers import Dropout


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` restricted to ``mask``; rows with no valid entry give all zeros."""
    mask = mask.expand_as(logits)
    x = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return x.softmax(dim) * mask.to(logits.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head softmax attention: queries [B, Lq, d] over keys/values [B, Lk, d]."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"model.dim ({dim}) must be a positive multiple of model.heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """mask [B, Lq, Lk] (or broadcastable) true = may attend; bias [B, Lq, Lk] added to the
        logits of every head. -> [B, Lq, d]."""
        B, Lq, d = q.shape
        Lk = kv.shape[1]
        h, dh = self.heads, d // self.heads
        qh = self.q(q).view(B, Lq, h, dh).transpose(1, 2)      # [B, h, Lq, dh]
        kh = self.k(kv).view(B, Lk, h, dh).transpose(1, 2)
        vh = self.v(kv).view(B, Lk, h, dh).transpose(1, 2)
        logits = qh @ kh.transpose(-1, -2) / dh ** 0.5           # [B, h, Lq, Lk]
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        m = mask.unsqueeze(1) if mask.dim() == 3 else mask
        w = self.drop(masked_softmax(logits, m.expand(B, h, Lq, Lk)))
        out = (w @ vh).transpose(1, 2).reshape(B, Lq, d)
        return self.out(out)


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid [B, L] -> [B, L, L]: position i may attend to valid positions j <= i."""
    L = valid.shape[1]
    tril = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    return tril.unsqueeze(0) & valid.unsqueeze(1)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, ff_mult: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim))
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, d], mask [B, L, L] (see :func:`causal_mask`) -> [B, L, d]."""
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.drop(self.ff(self.ln2(x)))


class MultiHeadTargetAttention(nn.Module):
    """A single query vector per row attends (multi-head softmax) over a set of tokens."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, dropout)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """q [N, d], keys [N, K, d], mask [N, K], bias [N, K] -> [N, d] (0 where no key is valid)."""
        out = self.attn(q.unsqueeze(1), keys, mask.unsqueeze(1),
                        None if bias is None else bias.unsqueeze(1)).squeeze(1)
        return out * mask.any(-1, keepdim=True).to(out.dtype)


def masked_topk(scores: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` positions of ``scores`` [B, L] among ``mask``, deterministically.

    Returns (idx [B, K], valid [B, K]) with K = min(k, L); ``valid`` is false where a row has fewer
    than K selectable positions. Ties go to the later (more recent, for chronological left-aligned
    histories) position; the result does not depend on trailing padding columns.
    """
    L = scores.shape[-1]
    k = max(0, min(int(k), L))
    s = scores.detach().masked_fill(~mask, float("-inf")).flip(-1)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no stable sort, but its TopK is specified to put the lower index first on ties:
        # on the flipped scores that is the same (later position first) order.
        order = torch.topk(s, k, dim=-1, largest=True, sorted=True).indices
    else:
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    idx = (L - 1) - order
    return idx, mask.gather(-1, idx)


def gather_tokens(x: torch.Tensor, rows: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """x [R, L, d] -> x[rows[n], idx[n, j]] as [N, K, d] (rows None: row n of x itself)."""
    if rows is None:
        rows = torch.arange(idx.shape[0], device=idx.device)
    return x[rows.unsqueeze(-1), idx]
