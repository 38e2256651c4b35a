"""DIN (Zhou et al., KDD 2018): the candidate attends over the behaviour history.

The model's own part is the attention-pooled interest per candidate; the query, the profile, the
candidate and the shared cross features come from :class:`~qdrank.models.base.RankModel`.
"""

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
        self.build_head(n_candidate_vectors=1)

    def encode(self, batch: Batch) -> RequestState:
        return {"tokens": self.emb.history(batch)}

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        return [self.attention(c, state["tokens"], batch.hist_mask, batch.cand_req)]
