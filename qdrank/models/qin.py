"""QIN (Guo et al., CIKM 2023): Query-dominant user Interest Network.

The paper's idea: a user's whole history is rich but noisy for one search, so the *query* decides
which behaviours matter. Two cascaded units:

1. **Relevance Search Unit (RSU)**, two stages.

   - Query stage (once per request): every behaviour is scored by cosine relevance to the query
     in a shared relevance space (query projection vs. item projection); the ``query_topk`` most
     relevant behaviours form the query sub-sequence.
   - Target stage (per candidate): the query sub-sequence is re-scored by cosine relevance to the
     candidate in the same item space; the ``target_topk`` best are kept (0 = keep all).

   Top-K is not differentiable, so (our choice) the cosine relevances are also added, with learned
   scales, to the attention logits of the next unit: they *reweight* the kept behaviours and the
   relevance projections are trained end to end by the ranking loss.
2. **Fused Attention Unit (FAU)**: multi-head softmax target attention of the candidate over the
   filtered behaviours, plus a query-target branch: the query attends over the query sub-sequence
   (request level) and its result and the query meet the candidate in the head.

Faithful simplification: the paper relies on pretrained multimodal query/item embeddings for RSU
relevance and computes FAU attention on the ID and attribute fields separately, fusing them by the
user's engagement depth. Here the relevance space is learned, and the FAU attends over the full
behaviour tokens, which already sum item ID, attributes, the engagement action, the behaviour's
query and its time gap, so engagement still shapes the attention. Without query text the query
vector is zero, every relevance is 0 and the RSU falls back to the most recent behaviours.

Head: the query-branch interest is the model's request vector and interest (crossed with the
candidate), the target interest its candidate vector; the query, the profile, the candidate and
the shared cross features come from :class:`~qdrank.models.base.RankModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.transformer import MultiHeadTargetAttention, gather_tokens, masked_topk


@dataclass
class QINConfig(ModelConfig):
    query_topk: int = 20         # RSU stage 1: behaviours kept by relevance to the query
    target_topk: int = 10        # RSU stage 2: of those, kept by relevance to the candidate (0 = all)
    heads: int = 2               # FAU attention heads


class QIN(RankModel):
    config_class = QINConfig

    def __init__(self, fmap: FeatureMap, cfg: QINConfig):
        super().__init__(fmap, cfg)
        if cfg.query_topk < 1 or cfg.target_topk < 0:
            raise ValueError(f"model.query_topk must be >= 1 and model.target_topk >= 0, got "
                             f"{cfg.query_topk} and {cfg.target_topk}")
        d = cfg.dim
        # no bias on the query side: an empty query maps to 0 and is irrelevant to everything
        self.rel_query = nn.Linear(d, d, bias=False)
        self.rel_item = nn.Linear(d, d)
        self.rel_scale = nn.Parameter(torch.ones(2))   # query / target relevance -> attention logits
        self.query_attn = MultiHeadTargetAttention(d, cfg.heads, cfg.dropout)
        self.target_attn = MultiHeadTargetAttention(d, cfg.heads, cfg.dropout)
        self.build_head(n_request_vectors=1, n_candidate_vectors=1, interest=True)

    def encode(self, batch: Batch) -> RequestState:
        hist = self.emb.history(batch)
        mask = batch.hist_mask
        q = self.emb.query(batch)
        hp = F.normalize(self.rel_item(hist), dim=-1)                    # [R, L, d]
        qp = F.normalize(self.rel_query(q), dim=-1)                      # [R, d]
        rel_q = torch.bmm(hp, qp.unsqueeze(-1)).squeeze(-1)              # [R, L] cosine
        idx, keep = masked_topk(rel_q, mask, self.cfg.query_topk)
        sub = gather_tokens(hist, None, idx)                              # [R, Kq, d]
        sub_rel = rel_q.gather(1, idx)
        u_q = self.query_attn(q, sub, keep, self.rel_scale[0] * sub_rel)
        return {"req": u_q, "interest": u_q, "tokens": hist, "sub": sub, "sub_keep": keep, "sub_rel": sub_rel,
                "sub_proj": gather_tokens(hp, None, idx)}

    def target_select(self, state: RequestState, batch: Batch, c: torch.Tensor):
        """RSU stage 2 -> (idx into the query sub-sequence [N, Kt], keep [N, Kt], bias [N, Kt])."""
        r = batch.cand_req
        cp = F.normalize(self.rel_item(c), dim=-1)
        rel_t = torch.bmm(state["sub_proj"][r], cp.unsqueeze(-1)).squeeze(-1)   # [N, Kq]
        keep_q = state["sub_keep"][r]
        k = self.cfg.target_topk or rel_t.shape[1]
        idx, keep = masked_topk(rel_t, keep_q, k)
        bias = self.rel_scale[0] * state["sub_rel"][r].gather(1, idx) + self.rel_scale[1] * rel_t.gather(1, idx)
        return idx, keep, bias

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        idx, keep, bias = self.target_select(state, batch, c)
        keys = gather_tokens(state["sub"], batch.cand_req, idx)
        return [self.target_attn(c, keys, keep, bias)]
