"""DNN baseline: mean-pooled history, query, user and context, candidate; an MLP on top."""

from __future__ import annotations

import torch

from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.layers import masked_mean


class DNN(RankModel):
    def __init__(self, fmap: FeatureMap, cfg):
        super().__init__(fmap, cfg)
        self.build_head(n_request_vectors=2, n_candidate_vectors=3)

    def encode_request(self, batch: Batch) -> RequestState:
        hist = masked_mean(self.emb.history(batch), batch.hist_mask, 1)
        q = self.emb.query(batch)
        return {"req": torch.cat([hist, q, self.profile(batch)], -1), "hist": hist, "query": q}

    def score(self, state: RequestState, batch: Batch):
        c = self.emb.candidate(batch)
        x = self.head_input(batch, [state["req"]], [c, c * state["query"][batch.cand_req],
                                                     c * state["hist"][batch.cand_req]])
        return self.head(x)
