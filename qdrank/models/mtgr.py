"""MTGR (Meituan, arXiv 2505.18654, "MTGR: Industrial-scale generative recommendation") as a ranker.

HSTU layers (shared with ``hstu``, :mod:`qdrank.models.hstu_layers`) over a token sequence made of
feature groups::

    [user-profile field tokens | context field tokens + query token | behaviour tokens | candidate]

* Group Layer Normalisation: every LayerNorm of every layer has separate parameters per group
  (user / context / history / candidate).
* Dynamic mask: user/context tokens attend to each other and are visible to all tokens; history is
  causal; the candidate sees everything before it and itself, never another candidate. The request
  part is encoded once and its keys/values cached; candidates are scored as appended tokens.
* DLRM-style cross features, kept as in MTGR: candidate * query, candidate * mean user field, and a
  query / item-text match (share of the query's hashed words/bigrams found in the candidate's text
  features, and whether any is) are folded into the candidate token and fed to the head.
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
N_MATCH = 2


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
        self.register_buffer("item_text_slots", self._text_slots(fmap, "item"), persistent=False)
        self.register_buffer("cand_text_slots", self._text_slots(fmap, "candidate"), persistent=False)
        self.cross = nn.Linear(2 * d + N_MATCH, d)
        self.match_proj = nn.Linear(N_MATCH, d)
        self.build_head(n_request_vectors=1, n_candidate_vectors=5)

    @staticmethod
    def _text_slots(fmap: FeatureMap, role: str) -> torch.Tensor:
        slots = [s for f, start, w in fmap.slot_layout(role) if f.type == "text" for s in range(start, start + w)]
        return torch.tensor(slots, dtype=torch.long)

    def text_match(self, batch: Batch) -> torch.Tensor:
        """[N, 2]: share of the query's hashed tokens found in the candidate's text features, any match."""
        text = torch.cat([self.emb.item_sparse[batch.cand_item][:, self.item_text_slots],
                          batch.cand_sparse[:, self.cand_text_slots]], -1)           # [N, T]
        q = batch.query[batch.cand_req]                                             # [N, Q]
        hit = ((q.unsqueeze(-1) == text.unsqueeze(-2)) & (text > 0).unsqueeze(-2)).any(-1) & (q > 0)
        share = hit.sum(-1).float() / (q > 0).sum(-1).clamp_min(1).float()
        return torch.stack([share, hit.any(-1).float()], -1)

    def encode_request(self, batch: Batch) -> RequestState:
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
        user_mean = user.mean(-2) if user.shape[-2] else q.new_zeros(q.shape)
        return {**cache, "req": torch.cat([q, self.profile(batch)], -1), "query": q, "user": user_mean}

    def score(self, state: RequestState, batch: Batch):
        r = batch.cand_req
        c = self.emb.candidate(batch)
        cq, cu = c * state["query"][r], c * state["user"][r]
        match = self.text_match(batch)
        h = self.stack.candidates(state, c + self.cross(torch.cat([cq, cu, match], -1)), r, CANDIDATE)
        return self.head(self.head_input(batch, [state["req"]], [h, c, cq, cu, self.match_proj(match)]))
