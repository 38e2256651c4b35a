"""DIN (Zhou et al., KDD 2018): the candidate attends over the behaviour history."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.layers import TargetAttention


@dataclass
class DINConfig(ModelConfig):
    attention_hidden: tuple[int, ...] = (64, 32)


class DIN(RankModel):
    config_class = DINConfig

    def __init__(self, fmap: FeatureMap, cfg: DINConfig):
        super().__init__(fmap, cfg)
        self.attention = TargetAttention(cfg.dim, cfg.attention_hidden)
        self.build_head(n_request_vectors=1, n_candidate_vectors=3)

    def encode_request(self, batch: Batch) -> RequestState:
        q = self.emb.query(batch)
        return {"req": torch.cat([q, self.profile(batch)], -1), "hist": self.emb.history(batch),
                "mask": batch.hist_mask, "query": q}

    def score(self, state: RequestState, batch: Batch):
        c = self.emb.candidate(batch)
        r = batch.cand_req
        interest = self.attention(c, state["hist"][r], state["mask"][r])
        x = self.head_input(batch, [state["req"]], [c, interest, c * state["query"][r]])
        return self.head(x)
