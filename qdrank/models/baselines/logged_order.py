"""``logged_order``: rank as the log shows, score = -position (the production ranker's order).

It reads the logged position, which a live request does not have (every candidate then ties), so it
belongs to the as-shown metric family only (``uses_logged_position``): the reference a new ranker
has to be compared with, not a ranker to serve.
"""

from __future__ import annotations

import torch

from qdrank.data.batch import MAX_POSITION, Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.shards import ShardedDataset
from qdrank.models.baselines.common import Baseline


class LoggedOrder(Baseline):
    uses_logged_position = True

    def fit_data(self, ds: SearchLogDataset | ShardedDataset, seed: int = 0) -> None:
        """Nothing to fit: the order is the log's."""

    def candidate_scores(self, batch: Batch) -> torch.Tensor:
        pos = batch.position.float()
        # position 0 = unknown: shown after every known position
        return -torch.where(batch.position > 0, pos, torch.full_like(pos, float(MAX_POSITION)))
