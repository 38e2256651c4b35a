"""MTGR (Meituan, arXiv 2505.18654, "MTGR: Industrial-scale generative recommendation") as a ranker.

HSTU layers (shared with ``hstu``, :mod:`qdrank.models.hstu_layers`) over a token sequence made of
feature groups::

    [user-profile field tokens | context field tokens + query token | behaviour tokens | candidate]

* Group Layer Normalisation: every LayerNorm of every layer has separate parameters per group
  (user / context / history / candidate).
* Dynamic mask: user/context tokens attend to each other and are visible to all tokens; history is
  causal; the candidate sees everything before it and itself, never another candidate. The request
  part is encoded once and its keys/values cached; candidates are scored as appended tokens.
* MTGR's DLRM-style cross features are not kept as a private input: every neural model's head gets
  the same shared cross features (candidate x query, candidate x pooled history, query-item token
  overlap; :class:`~qdrank.models.layers.CrossFeatures`, ``model.cross``). The candidate token is
  the plain candidate vector; its final representation is the model's candidate vector in the head.
* Static tokens carry a learned field embedding (they have no position); the query token is the
  mean query embedding (zero for an empty query) plus its field embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.hstu import HSTUConfig, stack_from_config

USER, CONTEXT, HISTORY, CANDIDATE = range(4)


@dataclass
class MTGRConfig(HSTUConfig):
    pass


class MTGR(RankModel):
    config_class = MTGRConfig

    def __init__(self, fmap: FeatureMap, cfg: MTGRConfig):
        super().__init__(fmap, cfg)
        d = cfg.dim
        n_user, n_ctx = self.emb.n_fields("user"), self.emb.n_fields("context")
        self.stack = stack_from_config(fmap, cfg, n_groups=4)
        self.field_emb = nn.Parameter(torch.randn(n_user + n_ctx + 1, d) * 0.02)
        self.register_buffer("static_group", torch.tensor([USER] * n_user + [CONTEXT] * (n_ctx + 1)),
                             persistent=False)
        self.build_head(n_candidate_vectors=1)

    def encode(self, batch: Batch) -> RequestState:
        user, ctx, q = self.emb.user(batch), self.emb.context(batch), self.emb.query(batch)
        static = torch.cat([user, ctx, q.unsqueeze(-2)], -2) + self.field_emb      # [R, S, d]
        hist = self.emb.history(batch)                                              # [R, L, d]
        (R, S), L = static.shape[:2], hist.shape[1]
        dev = hist.device
        x = torch.cat([static, hist], -2)
        pos = torch.cat([torch.zeros(S, dtype=torch.long, device=dev), torch.arange(L, device=dev)]).expand(R, -1)
        time = torch.cat([batch.hist_time.new_zeros(R, S), batch.hist_time], -1)
        is_static = torch.cat([torch.ones(R, S, dtype=torch.bool, device=dev), torch.zeros_like(batch.hist_mask)], -1)
        valid = is_static | torch.cat([batch.hist_mask.new_zeros(R, S), batch.hist_mask], -1)
        group = torch.cat([self.static_group, torch.full((L,), HISTORY, dtype=torch.long, device=dev)])
        cache = self.stack.encode(x, pos, time, is_static, valid, group, valid.sum(-1) + 1)
        return {**cache, "tokens": hist}

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        return [self.stack.candidates(state, c, batch.cand_req, CANDIDATE)]
