"""``popularity``: the item's click-through rate in the training period, shrunk to a Beta prior.

The prior is fitted from the training split by the method of moments (the spread of item CTRs
beyond binomial noise), so rarely shown items sit near the global CTR and unseen items get it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.features import FeatureMap
from qdrank.data.shards import ShardedDataset
from qdrank.models.baselines.common import Baseline, FittedBuffers

MIN_SHOWN = 5         # items shown at least this often estimate the spread of CTRs
MAX_STRENGTH = 1e4    # prior pseudo-impressions when CTRs barely vary beyond noise


def beta_prior(clicks: np.ndarray, shown: np.ndarray) -> tuple[float, float]:
    """(a, b) of a Beta prior on per-item CTR, by the method of moments on items shown enough."""
    total = float(shown.sum())
    m = float(clicks.sum()) / total if total else 0.0
    m = min(max(m, 1e-6), 1 - 1e-6)
    keep = shown >= MIN_SHOWN
    strength = MAX_STRENGTH
    if keep.sum() >= 2:
        rate = clicks[keep] / shown[keep]
        w = shown[keep] / shown[keep].sum()
        var = float((w * (rate - m) ** 2).sum()) - float((w * m * (1 - m) / shown[keep]).sum())
        if var > 0:
            strength = float(np.clip(m * (1 - m) / var - 1, 1.0, MAX_STRENGTH))
    return m * strength, (1 - m) * strength


class ItemPopularity(FittedBuffers):
    """Train-split clicks and impressions per item row, with a fitted Beta prior."""

    def __init__(self, fmap: FeatureMap):
        super().__init__()
        n = len(fmap.item_vocab) + 2
        self.register_buffer("clicks", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("shown", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("prior", torch.tensor([1.0, 1.0], dtype=torch.float64))

    def fit(self, ds: SearchLogDataset) -> None:
        """Counts over the training split."""
        imp = ds.candidate_index(ds.requests_of("train"))
        n = self.clicks.shape[0]
        items = ds.cand_item[imp]
        self.set_counts(np.bincount(items, weights=ds.click[imp], minlength=n),
                        np.bincount(items, minlength=n).astype(np.float64))

    def fit_batches(self, batches: Iterable[Batch]) -> None:
        """The same counts from streamed training batches (shards): the candidates' items and clicks."""
        n = self.clicks.shape[0]
        clicks, shown = np.zeros(n), np.zeros(n)
        for b in batches:
            c, k = self.batch_counts(b)
            clicks += c
            shown += k
        self.set_counts(clicks, shown)

    def batch_counts(self, b: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, impressions) per item row of one batch's candidates: additive over batches."""
        n, items = self.clicks.shape[0], b.cand_item.cpu().numpy()
        return (np.bincount(items, weights=b.click.cpu().numpy().astype(np.float64), minlength=n),
                np.bincount(items, minlength=n).astype(np.float64))

    def set_counts(self, clicks: np.ndarray, shown: np.ndarray) -> None:
        """Keep these counts (and the prior fitted from them)."""
        clicks, shown = clicks.copy(), shown.copy()
        clicks[:2], shown[:2] = 0, 0  # padding / unknown item rows get the prior
        a, b = beta_prior(clicks, shown)
        dev = self.clicks.device
        self.clicks.copy_(torch.from_numpy(clicks).to(dev))
        self.shown.copy_(torch.from_numpy(shown).to(dev))
        self.prior.copy_(torch.tensor([a, b], dtype=torch.float64, device=dev))

    def logit(self, items: torch.Tensor) -> torch.Tensor:
        """Logit of the smoothed CTR of item rows."""
        c, n = self.clicks[items], self.shown[items]
        a, b = self.prior[0], self.prior[1]
        p = (c + a) / (n + a + b)
        return torch.log(p) - torch.log1p(-p)


class Popularity(Baseline):
    def __init__(self, fmap: FeatureMap, cfg):
        super().__init__(fmap, cfg)
        self.pop = ItemPopularity(fmap)

    def fit_data(self, ds: SearchLogDataset | ShardedDataset, seed: int = 0) -> None:
        if isinstance(ds, SearchLogDataset):
            self.pop.fit(ds)
        else:
            self.pop.fit_batches(b for b, _ in self.batches(ds, "train"))

    def candidate_scores(self, batch: Batch) -> torch.Tensor:
        return self.pop.logit(batch.cand_item)

    def summary(self) -> dict:
        a, b = self.pop.prior.tolist()
        return {"prior_ctr": a / (a + b), "prior_strength": a + b, "items_shown": int((self.pop.shown > 0).sum())}
