"""HSTU (Zhai et al., ICML 2024, "Actions speak louder than words") as a ranker.

Ranking setup of generative-recommenders: the candidate is appended to the behaviour sequence and
attends to it through HSTU layers (pointwise SiLU attention normalised by the sequence length,
relative position + time-gap attention bias, U-gating). The history is encoded once per request
(history tokens attend causally among themselves) and every layer's keys/values are cached; each
candidate is one extra token attending to its request's cached keys/values plus itself, so
candidates never see each other (see :mod:`qdrank.models.hstu_layers`).

The query enters by being added (through a learned projection) to the candidate token: the
history encoding stays query-independent and an empty query (zero vector) adds nothing. The
candidate's final representation is the model's candidate vector in the CTR/CVR head; the query,
the profile, the candidate and the shared cross features come from
:class:`~qdrank.models.base.RankModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.hstu_layers import HSTUStack


@dataclass
class HSTUConfig(ModelConfig):
    layers: int = 2
    heads: int = 2
    head_dim: int = 0          # 0 = dim // heads
    pos_buckets: int = 32      # relative-position buckets of the attention bias (exact up to half, then log2)


def stack_from_config(fmap: FeatureMap, cfg, n_groups: int = 1) -> HSTUStack:
    head_dim = cfg.head_dim or max(cfg.dim // cfg.heads, 1)
    return HSTUStack(cfg.dim, cfg.layers, cfg.heads, head_dim, fmap.time_buckets, cfg.pos_buckets,
                     cfg.dropout, n_groups)


class HSTU(RankModel):
    config_class = HSTUConfig

    def __init__(self, fmap: FeatureMap, cfg: HSTUConfig):
        super().__init__(fmap, cfg)
        self.stack = stack_from_config(fmap, cfg)
        self.query_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.build_head(n_candidate_vectors=1)

    def encode(self, batch: Batch) -> RequestState:
        h = self.emb.history(batch)
        R, L = batch.hist_item.shape
        pos = torch.arange(L, device=h.device).expand(R, L)
        valid = batch.hist_mask
        cache = self.stack.encode(h, pos, batch.hist_time, torch.zeros_like(valid), valid, 0,
                                  valid.sum(-1) + 1)
        return {**cache, "tokens": h, "query": self.emb.query(batch)}

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        r = batch.cand_req
        return [self.stack.candidates(state, c + self.query_proj(state["query"])[r], r)]
