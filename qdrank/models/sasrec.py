"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the behaviour sequence.

The behaviour tokens (item + side info + action + behaviour query + time gap, see
:meth:`FeatureEmbedder.history`) get a learned position embedding and pass through ``layers``
pre-LN causal self-attention blocks. The output at the last valid position (index
``hist_len - 1``) is the user state; an empty history gives a zero state.

Positions: SASRec left-pads every sequence to a fixed length so the most recent behaviour always
sits at the same (last) position. Our histories are left-aligned with variable length, so the
position id is counted back from the most recent behaviour (0 = most recent), which gives the
same meaning; behaviours older than ``max_len`` share the last position embedding.

Ranking head (target-aware, as in search ranking): the user state is the model's request vector
and its interest (crossed with the candidate); the query, the profile, the candidate and the shared
cross features come from :class:`~qdrank.models.base.RankModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.layers import Dropout
from qdrank.models.transformer import TransformerBlock, causal_mask


@dataclass
class SASRecConfig(ModelConfig):
    layers: int = 2
    heads: int = 2
    max_len: int = 200          # distinct position embeddings (counted back from the latest behaviour)


def state_at(x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """x [R, L, d] -> x[r, length[r] - 1] as [R, d]; zero where ``length`` <= 0."""
    state = x[torch.arange(x.shape[0], device=x.device), (length - 1).clamp_min(0)]
    return state * (length > 0).unsqueeze(-1).to(state.dtype)


class SASRec(RankModel):
    config_class = SASRecConfig

    def __init__(self, fmap: FeatureMap, cfg: SASRecConfig):
        super().__init__(fmap, cfg)
        d = cfg.dim
        self.max_len = cfg.max_len
        self.pos = nn.Embedding(cfg.max_len, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(d)
        self.build_extra(cfg)
        self.build_head(n_request_vectors=1, interest=True)

    def build_extra(self, cfg: SASRecConfig) -> None:
        """Layers a subclass adds (built before the head, so the head's width never shifts their init)."""

    def sequence(self, batch: Batch, add: torch.Tensor | None = None, length: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[R, L, d]: causal self-attention outputs; position i has seen behaviours 0..i only.

        ``length`` [R] keeps only each history's first ``length`` behaviours; ``add`` [R, d] is added
        to every valid token (DiffuRec feeds its noisy target that way); ``tokens``: ``emb.history(batch)``
        when already computed."""
        L = batch.hist_mask.shape[1]
        length = batch.hist_len.clamp(0, L) if length is None else length.clamp(0, L)
        ar = torch.arange(L, device=length.device)
        valid = ar[None, :] < length[:, None]
        pos = (length.unsqueeze(1) - 1 - ar).clamp(0, self.max_len - 1)
        m = valid.unsqueeze(-1).to(self.pos.weight.dtype)
        x = (self.emb.history(batch) if tokens is None else tokens) + self.pos(pos)
        if add is not None:
            x = x + add.unsqueeze(1)
        x = self.drop(x * m)
        mask = causal_mask(valid)
        for blk in self.blocks:
            x = blk(x, mask) * m
        return self.ln(x)

    def user_state(self, batch: Batch, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[R, d]: the sequence output at the last valid position (zero for an empty history)."""
        valid = batch.hist_mask
        if valid.shape[1] == 0:
            return self.pos.weight.new_zeros(valid.shape[0], self.cfg.dim)
        return state_at(self.sequence(batch, tokens=tokens), batch.hist_len.clamp(0, valid.shape[1]))

    def encode(self, batch: Batch) -> RequestState:
        tokens = self.emb.history(batch)
        u = self.user_state(batch, tokens)
        return {"req": u, "interest": u, "tokens": tokens}
