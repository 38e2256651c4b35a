"""DNN baseline: mean-pooled history, query, user and context, candidate; an MLP on top.

The model's own part is the mean-pooled history as a request vector; the query, the profile, the
candidate and the shared cross features (candidate x query, candidate x pooled history, query-item
overlap) come from :class:`~qdrank.models.base.RankModel`.
"""

from __future__ import annotations

from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.layers import masked_mean


class DNN(RankModel):
    def __init__(self, fmap: FeatureMap, cfg):
        super().__init__(fmap, cfg)
        self.build_head(n_request_vectors=1)

    def encode(self, batch: Batch) -> RequestState:
        tokens = self.emb.history(batch)
        return {"req": masked_mean(tokens, batch.hist_mask, 1), "tokens": tokens}
