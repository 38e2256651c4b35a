"""``history_match``: is the candidate, or its category, in the user's strictly-earlier history?

Each past behaviour that matches counts ``decay ** age`` (age 0 = the most recent behaviour), times a
weight for its action type, times ``item_weight`` for the same item or ``category_weight`` for the
same category (``FeatureMap.has_category``). Action weights are fitted on the training split: the
click rate of candidates whose item the user met before with that action, relative to the overall
click rate (so a purchase can weigh more than an impression, as the data says).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.features import FeatureMap
from qdrank.data.shards import ShardedDataset
from qdrank.models.baselines.common import Baseline, FittedBuffers, sparse_features
from qdrank.models.layers import BehaviourActions, history_feature_match, history_item_match, history_recency

PRIOR_STRENGTH = 20.0  # pseudo-candidates pulling a rare action's click rate to the overall rate


@dataclass
class HistoryMatchConfig(ModelConfig):
    decay: float = 0.9            # weight of a behaviour = decay ** (number of later behaviours)
    item_weight: float = 1.0      # same item
    category_weight: float = 0.3  # same category (only when the data names one)
    fit_action_weights: bool = True


class HistoryMatcher(FittedBuffers):
    """Action weights and recency for history matches (the matches themselves are the shared
    ``history_item_match`` / ``history_feature_match`` of ``qdrank.models.layers``).

    ``features`` are the item's categorical/list side features (category, brand, genres...); a list
    feature matches when the two items share any value.
    """

    def __init__(self, fmap: FeatureMap, decay: float = 0.9):
        super().__init__()
        self.fmap, self.decay = fmap, decay
        self.features = sparse_features(fmap, "item")
        self.action = BehaviourActions.of(fmap)
        self.n_actions = self.action.n
        # weight per action local id (0 = missing/unknown action, 1.. = vocab order)
        self.register_buffer("action_weight", torch.ones(self.n_actions + 1))

    def recency(self, batch: Batch) -> torch.Tensor:
        """[R, L] decay ** (number of later behaviours), 0 on padding."""
        return history_recency(batch, self.decay)

    def fit(self, batches) -> None:
        """Action weights from training batches: click rate of candidates met before with action a,
        over the overall click rate (shrunk towards 1 for rare actions)."""
        if self.n_actions == 0:
            return
        clicks = np.zeros(self.n_actions + 1)
        seen = np.zeros(self.n_actions + 1)
        total_c = total_n = 0.0
        for b, _ in batches:
            m = history_item_match(b)
            a = self.action.ids(b)[b.cand_req]
            onehot = torch.zeros(m.shape[0], self.n_actions + 1, device=m.device)
            onehot.scatter_add_(1, torch.where(m, a, torch.zeros_like(a)), m.float())
            met = (onehot > 0).float()
            clicks += (met * b.click.unsqueeze(1)).sum(0).cpu().numpy()
            seen += met.sum(0).cpu().numpy()
            total_c += float(b.click.sum())
            total_n += float(b.click.numel())
        base = total_c / max(total_n, 1.0)
        if base <= 0:
            return
        rate = (clicks + PRIOR_STRENGTH * base) / (seen + PRIOR_STRENGTH)
        self.action_weight.copy_(torch.from_numpy(rate / base).float().to(self.action_weight.device))

    def weighted(self, batch: Batch) -> torch.Tensor:
        """[N, L] recency x action weight of each behaviour, gathered to candidates."""
        w = self.recency(batch) * self.action_weight[self.action.ids(batch)]
        return w[batch.cand_req]


class HistoryMatch(Baseline):
    config_class = HistoryMatchConfig

    def __init__(self, fmap: FeatureMap, cfg: HistoryMatchConfig):
        super().__init__(fmap, cfg)
        self.matcher = HistoryMatcher(fmap, cfg.decay)
        self.category = next(((s, w) for n, s, w in self.matcher.features if n == fmap.has_category), None)

    def fit_data(self, ds: SearchLogDataset | ShardedDataset, seed: int = 0) -> None:
        if self.cfg.fit_action_weights:
            self.matcher.fit(self.batches(ds, "train"))

    def candidate_scores(self, batch: Batch) -> torch.Tensor:
        m = self.cfg.item_weight * history_item_match(batch).float()
        if self.category is not None:
            m = m + self.cfg.category_weight * history_feature_match(batch, self.emb.item_sparse,
                                                                          *self.category).float()
        return (self.matcher.weighted(batch) * m).sum(-1)

    def summary(self) -> dict:
        act = self.fmap.features.get("action")
        names = ["(none)", *(act.vocab if act is not None else [])]
        return {"action_weight": dict(zip(names, self.matcher.action_weight.tolist()))}
