"""One generic feature builder for the GBDT baseline, derived from any dataset in the canonical format.

Every feature is computed from :class:`Batch` tensors plus buffers fitted on the training split, so
a live request gets the same features as evaluation. Nothing here names a dataset's column; the
feature map says which columns exist and what role and type they have.

Features (per candidate):

* **ids**: every categorical user / context / candidate / item feature with at most
  ``max_cat_values`` values, as a LightGBM categorical (local vocabulary index, 0 = unseen value;
  larger vocabularies such as raw item or user ids enter through the statistics below instead);
* **numerics**: every numeric user / context / candidate / item feature, and for candidate and item
  numerics (price...) their rank within the request (share of the request's candidates below);
* **request**: number of candidates, history length, number of query tokens;
* **text** (``text_match``'s :class:`TextOverlap`): IDF mass of query tokens found in the item's
  text, in its categorical values, in its category, and the share of the query covered;
* **query-category affinity**: how much more often training queries with these tokens led to
  clicks on this category than on average (log-lift, learned from training clicks);
* **popularity** (``popularity``'s :class:`ItemPopularity`): smoothed train CTR (out of fold for
  training rows, so the booster cannot read a row's own label: see ``gbdt``) and train impressions;
* **history** (``history_match``'s :class:`HistoryMatcher`): the recency- and action-weighted
  history-match score; and counts of the user's strictly-earlier behaviours on the same item and
  on items sharing each categorical/list side feature (category, brand...), per action type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.features import FeatureMap
from qdrank.data.shards import ShardedDataset
from qdrank.models.baselines.common import (
    FittedBuffers,
    group_sizes,
    sorted_lookup,
    sparse_features,
)
from qdrank.models.baselines.history_match import HistoryMatcher
from qdrank.models.baselines.popularity import ItemPopularity
from qdrank.models.baselines.text_match import TextOverlap
from qdrank.models.layers import MAX_ACTIONS_SPLIT, group_rank, history_feature_match, history_item_match

AFFINITY_PRIOR = 10.0     # pseudo-clicks pulling a rare query token's category shares to the average


def lightgbm_names(names: list[str]) -> list[str]:
    """Feature names LightGBM accepts (no JSON special characters), unique."""
    out: list[str] = []
    for n in names:
        n = re.sub(r'[",:\[\]{}\s]', "_", n)
        out.append(n if n not in out else f"{n}_{len(out)}")
    return out


@dataclass
class AffinityCounts:
    """The click counts :class:`QueryCategoryAffinity` is fitted from: per (token, category) key
    (sorted, unique), per token, per category. Sums and differences of them are the counts of unions
    and differences of click sets, so folds can be left out without a second pass."""

    keys: torch.Tensor        # [K] token * n_cat + category, sorted
    pairs: torch.Tensor       # [K] float64 clicks with that token and category
    tokens: torch.Tensor      # [query_buckets] float64
    categories: torch.Tensor  # [n_cat] float64

    @staticmethod
    def sum(parts: list[AffinityCounts], signs: list[float] | None = None) -> AffinityCounts:
        """``sum_i signs[i] * parts[i]`` in one merge of the keys (not one per part: the key set of
        a large log is millions); keys whose count falls to 0 are dropped."""
        signs = signs or [1.0] * len(parts)
        keys, inv = torch.unique(torch.cat([p.keys for p in parts]), return_inverse=True)
        pairs = torch.zeros(len(keys), dtype=torch.float64).index_add_(
            0, inv, torch.cat([s * p.pairs for s, p in zip(signs, parts)]))
        keep = pairs > 0
        return AffinityCounts(keys[keep], pairs[keep], sum(s * p.tokens for s, p in zip(signs, parts)),
                              sum(s * p.categories for s, p in zip(signs, parts)))


class QueryCategoryAffinity(FittedBuffers):
    """log P(click on category c | query token t) / P(click on c), from training clicks.

    A search team's "query classification": a query word that led to clicks on a category predicts
    the category even where the word never appears in the item's text.
    """

    def __init__(self, fmap: FeatureMap, category: tuple[int, int] | None):
        super().__init__()
        self.fmap, self.category = fmap, category
        f = fmap.features.get(fmap.has_category or "")
        self.cat_offset = f.offset if f is not None else 0
        self.n_cat = len(f.vocab) + 1 if f is not None else 1
        self.register_buffer("keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("lift", torch.zeros(0))
        self.register_buffer("token_clicks", torch.zeros(fmap.query_buckets))

    def _pairs(self, q: torch.Tensor, cats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, Q] token ids x [N, W] category ids -> ([N, Q, W] keys, valid mask)."""
        t = (q - self.fmap.text_offset).clamp_min(0)
        c = (cats - self.cat_offset).clamp(0, self.n_cat - 1)
        keys = t.unsqueeze(-1) * self.n_cat + c.unsqueeze(1)
        return keys, (q > 0).unsqueeze(-1) & (cats > 0).unsqueeze(1)

    def batch_counts(self, b: Batch, item_sparse: torch.Tensor) -> AffinityCounts:
        """The counts of one batch's clicked candidates (additive over batches: streamed fitting)."""
        clicked = b.click > 0
        s, w = self.category if self.category is not None else (0, 0)
        return self.counts(b.query[b.cand_req[clicked]].cpu(), item_sparse[b.cand_item[clicked], s:s + w].cpu())

    def counts(self, q: torch.Tensor, cats: torch.Tensor) -> AffinityCounts:
        """Counts of clicked impressions: q [M, Q] their query tokens, cats [M, W] their category ids."""
        keys, valid = self._pairs(q, cats)
        uk, n_tc = torch.unique(keys[valid], return_counts=True)
        # clicks per token (a query's token once per clicked impression, whatever its categories)
        t = (q - self.fmap.text_offset).clamp_min(0)
        tok = torch.where(q > 0, t, torch.full_like(t, -1))
        n_t = torch.bincount(tok[tok >= 0], minlength=self.fmap.query_buckets).double()
        c_all = (cats - self.cat_offset).clamp(0, self.n_cat - 1)
        n_c = torch.bincount(c_all[cats > 0], minlength=self.n_cat).double()
        return AffinityCounts(uk, n_tc.double(), n_t, n_c)

    def set_counts(self, c: AffinityCounts) -> None:
        """Keep the log-lifts these counts give."""
        if self.category is None:
            return
        p_c = (c.categories + 1) / (c.categories.sum() + self.n_cat)
        tt, cc = c.keys // self.n_cat, c.keys % self.n_cat
        p_tc = (c.pairs + AFFINITY_PRIOR * p_c[cc]) / (c.tokens[tt] + AFFINITY_PRIOR)
        dev = self.keys.device
        self.keys = c.keys.to(dev)
        self.lift = torch.log(p_tc / p_c[cc]).float().to(dev)
        self.token_clicks.copy_(c.tokens.float().to(dev))

    def score(self, batch: Batch, item_sparse: torch.Tensor) -> torch.Tensor:
        """[N] mean over query tokens of the best log-lift over the candidate's category values."""
        n = batch.cand_item.shape[0]
        if self.category is None or self.keys.numel() == 0:
            return torch.zeros(n, device=batch.cand_item.device)
        s, w = self.category
        keys, valid = self._pairs(batch.query[batch.cand_req], item_sparse[batch.cand_item, s:s + w])
        at, found = sorted_lookup(self.keys, keys)
        found = found & valid
        # a token never followed by a click on this category: its share shrunk from 0 to the average
        t = (batch.query[batch.cand_req] - self.fmap.text_offset).clamp(0, self.fmap.query_buckets - 1)
        unseen = torch.log(AFFINITY_PRIOR / (self.token_clicks[t] + AFFINITY_PRIOR)).unsqueeze(-1)
        lift = torch.where(found, self.lift[at], unseen.expand_as(keys).to(self.lift.dtype))
        lift = torch.where(valid, lift, torch.full_like(lift, -1e9)).amax(-1)   # best category value
        has = valid.any(-1)
        lift = torch.where(has, lift, torch.zeros_like(lift))
        return lift.sum(-1) / has.sum(-1).clamp_min(1)


@dataclass
class LabelCounts:
    """Counts behind the features computed from training clicks (popularity, query-category affinity)."""

    clicks: np.ndarray
    shown: np.ndarray
    affinity: AffinityCounts

    @staticmethod
    def sum(parts: list[LabelCounts], signs: list[float] | None = None) -> LabelCounts:
        """``sum_i signs[i] * parts[i]`` (see :meth:`AffinityCounts.sum`)."""
        signs = signs or [1.0] * len(parts)
        return LabelCounts(sum(s * p.clicks for s, p in zip(signs, parts)), sum(s * p.shown for s, p in zip(signs, parts)),
                           AffinityCounts.sum([p.affinity for p in parts], signs))


class GBDTFeatures(FittedBuffers):
    """Builds the [N, F] feature matrix; ``names`` and ``categorical`` describe its columns."""

    def __init__(self, fmap: FeatureMap, max_cat_values: int = 1000, decay: float = 0.9):
        super().__init__()
        self.fmap = fmap
        self.text = TextOverlap(fmap)
        self.hist = HistoryMatcher(fmap, decay)
        self.pop = ItemPopularity(fmap)
        self.category = next(((s, w) for n, s, w in self.hist.features if n == fmap.has_category), None)
        self.affinity = QueryCategoryAffinity(fmap, self.category)
        self.ids = {r: [(fmap.features[n], s) for n, s, _ in
                        sparse_features(fmap, r, ("categorical",), exclude=())
                        if len(fmap.features[n].vocab) <= max_cat_values]
                    for r in ("user", "context", "candidate", "item")}
        num = {r: [f.name for f in fmap.role_features(r, sparse=False)] for r in ("user", "context", "candidate", "item")}
        n_act = self.hist.n_actions
        act = fmap.features.get("action")
        self.split_actions = 0 < n_act <= MAX_ACTIONS_SPLIT
        self.action_names = ["any", *(act.vocab if self.split_actions and act is not None else [])]
        names: list[str] = []
        for r in ("user", "context", "candidate", "item"):
            names += [f"{r}.{f.name}" for f, _ in self.ids[r]]
        n_cat = len(names)
        for r in ("user", "context", "candidate", "item"):
            names += [f"{r}.{n}" for n in num[r]]
        names += [f"rank_in_request.{n}" for r in ("candidate", "item") for n in num[r]]
        names += ["n_candidates", "history_len", "query_tokens",
                  "text_overlap", "value_overlap", "category_overlap", "query_coverage",
                  "query_category_affinity", "popularity_logit", "popularity_log_shown", "history_match"]
        names += [f"history_{a}.item" for a in self.action_names]
        names += [f"history_{a}.{n}" for n, _, _ in self.hist.features for a in self.action_names]
        self.names = lightgbm_names(names)
        self.categorical = list(range(n_cat))

    def fit(self, ds: SearchLogDataset | ShardedDataset, batches) -> None:
        """What is fitted from the training split apart from the click statistics, which the caller
        sets from counts (:meth:`label_counts`, :meth:`set_label_counts`): a booster trained on rows
        whose own click is inside these statistics learns to read its label from them, so the GBDT
        gives its training rows out-of-fold statistics (see ``gbdt``)."""
        self.text.fit(ds)
        self.hist.fit(batches)

    def label_counts(self, b: Batch, item_sparse: torch.Tensor) -> LabelCounts:
        """The click statistics' counts of one batch (additive: sums over batches, differences leave
        a fold out)."""
        return LabelCounts(*self.pop.batch_counts(b), self.affinity.batch_counts(b, item_sparse))

    def set_label_counts(self, c: LabelCounts) -> None:
        """Popularity and query-category affinity from these counts."""
        self.pop.set_counts(c.clicks, c.shown)
        self.affinity.set_counts(c.affinity)

    def label_state(self) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """A copy of the click statistics' buffers, to put back with :meth:`set_label_state`."""
        return [(m, n, t.clone()) for m in (self.pop, self.affinity) for n, t in m.named_buffers(recurse=False)]

    @staticmethod
    def set_label_state(state: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
        for m, n, t in state:
            setattr(m, n, t)  # swaps the buffer (no copy: it is the saved tensor itself)

    def _counts(self, match: torch.Tensor, actions: torch.Tensor | None) -> list[torch.Tensor]:
        """[N, L] matches -> counts over all actions, then per action type (``actions``: [N, L, A]
        one-hot of the behaviour's action, when split)."""
        m = match.float()
        out = [m.sum(-1)]
        if actions is not None:
            out += list(torch.bmm(m.unsqueeze(1), actions).squeeze(1).unbind(-1))
        return out

    @torch.no_grad()
    def __call__(self, batch: Batch, item_sparse: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """[N, F] float32; NaN marks a missing categorical value."""
        items, req = batch.cand_item, batch.cand_req
        n = items.shape[0]
        isp, ide = item_sparse[items], item_dense[items]
        sparse = {"user": batch.user_sparse[req], "context": batch.ctx_sparse[req], "candidate": batch.cand_sparse,
                  "item": isp}
        dense = {"user": batch.user_dense[req], "context": batch.ctx_dense[req], "candidate": batch.cand_dense,
                 "item": ide}
        cols: list[torch.Tensor] = []
        for r in ("user", "context", "candidate", "item"):
            for f, s in self.ids[r]:
                ids = sparse[r][:, s]
                cols.append(torch.where(ids > 0, (ids - f.offset).float(), torch.full((n,), float("nan"),
                                                                                      device=ids.device)))
        for r in ("user", "context", "candidate", "item"):
            cols += list(dense[r].float().unbind(-1))
        for r in ("candidate", "item"):
            cols += [group_rank(c, req) for c in dense[r].float().unbind(-1)]
        counts = group_sizes(req, batch.n_requests)
        overlap, q_idf = self.text.match(batch, item_sparse)
        cols += [counts[req].float(), batch.hist_len[req].float(), (batch.query[req] > 0).sum(-1).float(),
                 *overlap.unbind(-1), (overlap[:, 0] + overlap[:, 1]) / q_idf.clamp_min(1e-6),
                 self.affinity.score(batch, item_sparse),
                 self.pop.logit(items).float(), torch.log1p(self.pop.shown[items]).float()]
        weights = self.hist.weighted(batch)
        item_m = history_item_match(batch)
        cols.append((weights * item_m).sum(-1))
        actions = None
        if self.split_actions:
            actions = self.hist.action.onehot(batch)[req]
        cols += self._counts(item_m, actions)
        for _, s, w in self.hist.features:
            cols += self._counts(history_feature_match(batch, item_sparse, s, w), actions)
        if not cols:
            return torch.zeros(n, 0)
        return torch.stack([c.float() for c in cols], -1)
