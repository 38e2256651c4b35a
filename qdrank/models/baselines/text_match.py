"""``text_match``: how much of the query the candidate's text and categorical values cover.

Item (and candidate) text features are already hashed into the query's token space by the feature
map. At fit time the VALUES of every categorical/list side feature (category names, brands,
genres...) are hashed into that space too, so the query word "shoes" meets the category "shoes".
Each query token found counts with its IDF over the training queries (rare words weigh more).
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
from qdrank.models.baselines.common import FIT_BATCH, Baseline, FittedBuffers, sorted_lookup, sparse_features

VALUE_TOKENS = 4  # tokens kept per categorical value ("running shoes" -> running, shoes, running_shoes)
MATCH_GROUPS = ("text", "value", "category")


@dataclass
class TextMatchConfig(ModelConfig):
    value_weight: float = 1.0   # weight of query tokens found in categorical values vs in text
    idf: bool = True            # weigh query tokens by their IDF over training queries (else 1)


class TextOverlap(FittedBuffers):
    """Query tokens found in a candidate's text, in its categorical values, in its category.

    ``match(batch, item_sparse)`` -> [N, 3] IDF-weighted sums (text, all values, category only)
    plus the query's total IDF per candidate, for coverage.
    """

    def __init__(self, fmap: FeatureMap, use_idf: bool = True):
        super().__init__()
        self.fmap, self.use_idf = fmap, use_idf
        self.item_text = [(s, w) for _, s, w in sparse_features(fmap, "item", ("text",))]
        self.cand_text = [(s, w) for _, s, w in sparse_features(fmap, "candidate", ("text",))]
        self.item_values = sparse_features(fmap, "item")
        self.cand_values = sparse_features(fmap, "candidate")
        self.register_buffer("idf", torch.ones(fmap.query_buckets))
        # global ids of categorical values (sorted) and their hashed tokens [V, VALUE_TOKENS]
        self.register_buffer("value_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("value_tokens", torch.zeros(0, VALUE_TOKENS, dtype=torch.long))

    def fit(self, ds: SearchLogDataset | ShardedDataset) -> None:
        """IDF over the training queries (in memory, or streamed from shards) and the hashed tokens
        of every categorical value in the vocabularies."""
        fmap, dev = self.fmap, self.idf.device
        if isinstance(ds, ShardedDataset):  # each batch holds every request of it once
            parts = [b.query.numpy() for b in ds.iter_batches("train", FIT_BATCH)]
            q = np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.int64)
        else:
            q = ds.query[ds.requests_of("train")]
        if self.use_idf and len(q):
            df = np.zeros(fmap.query_buckets)
            for row in q:  # document frequency: each token once per query
                toks = np.unique(row[row > 0]) - fmap.text_offset
                df[toks] += 1
            idf = np.log((len(q) + 1) / (df + 1)) + 1.0
            self.idf.copy_(torch.from_numpy(idf).float().to(dev))
        ids, toks = [], []
        for name in dict.fromkeys(n for n, _, _ in self.item_values + self.cand_values):
            f = fmap.features[name]
            if f.vocab:
                ids.append(f.offset + 1 + np.arange(len(f.vocab)))
                toks.append(fmap.encode_text(f.vocab, VALUE_TOKENS))
        if ids:
            all_ids, all_toks = np.concatenate(ids), np.concatenate(toks)
            order = np.argsort(all_ids)
            self.value_ids = torch.from_numpy(all_ids[order]).to(dev)
            self.value_tokens = torch.from_numpy(all_toks[order]).to(dev)

    def _values(self, ids: torch.Tensor) -> torch.Tensor:
        """Categorical ids [N, S] -> their hashed tokens [N, S * VALUE_TOKENS] (0 where none)."""
        if self.value_ids.numel() == 0 or ids.shape[1] == 0:
            return ids.new_zeros(ids.shape[0], 0)
        at, found = sorted_lookup(self.value_ids, ids)
        found = found & (ids > 0)
        return (self.value_tokens[at] * found.unsqueeze(-1)).flatten(1)

    @staticmethod
    def _slots(x: torch.Tensor, layout) -> torch.Tensor:
        if not layout:
            return x.new_zeros(x.shape[0], 0)
        return torch.cat([x[:, s:s + w] for s, w in layout], 1)

    def match(self, batch: Batch, item_sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ([N, 3] IDF mass of query tokens found per group (text, value, category), [N] query IDF)."""
        isp = item_sparse[batch.cand_item]
        text = torch.cat([self._slots(isp, self.item_text), self._slots(batch.cand_sparse, self.cand_text)], 1)
        cat_name = self.fmap.has_category
        cat_layout = [(s, w) for n, s, w in self.item_values if n == cat_name]
        groups = [text,
                  torch.cat([self._values(self._slots(isp, [(s, w) for _, s, w in self.item_values])),
                             self._values(self._slots(batch.cand_sparse, [(s, w) for _, s, w in self.cand_values]))], 1),
                  self._values(self._slots(isp, cat_layout))]
        q = batch.query[batch.cand_req]                                      # [N, Q]
        valid = q > 0
        w = self.idf[(q - self.fmap.text_offset).clamp(0, self.fmap.query_buckets - 1)] * valid
        out = []
        for toks in groups:
            if toks.shape[1] == 0:
                out.append(w.new_zeros(q.shape[0]))
                continue
            hit = (q.unsqueeze(-1) == toks.unsqueeze(1)).any(-1) & valid     # [N, Q]
            out.append((w * hit).sum(-1))
        return torch.stack(out, -1), w.sum(-1)


class TextMatch(Baseline):
    config_class = TextMatchConfig

    def __init__(self, fmap: FeatureMap, cfg: TextMatchConfig):
        super().__init__(fmap, cfg)
        self.text = TextOverlap(fmap, cfg.idf)

    def fit_data(self, ds: SearchLogDataset | ShardedDataset, seed: int = 0) -> None:
        self.text.fit(ds)

    def candidate_scores(self, batch: Batch) -> torch.Tensor:
        m, _ = self.text.match(batch, self.emb.item_sparse)
        return m[:, 0] + self.cfg.value_weight * m[:, 1]

    def summary(self) -> dict:
        return {"categorical_values_hashed": int(self.text.value_ids.numel())}
