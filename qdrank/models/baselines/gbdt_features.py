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
* **popularity** (``popularity``'s :class:`ItemPopularity`): smoothed train CTR (leave-one-out on
  training rows, so the booster cannot read a row's own label) and train impressions;
* **history** (``history_match``'s :class:`HistoryMatcher`): the recency- and action-weighted
  history-match score; and counts of the user's strictly-earlier behaviours on the same item and
  on items sharing each categorical/list side feature (category, brand...), per action type.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.features import FeatureMap
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

    def fit(self, ds: SearchLogDataset, item_sparse: torch.Tensor, rows: np.ndarray | None = None) -> None:
        """From the training split's clicks (or those of the given training request rows)."""
        if self.category is None:
            return
        s, w = self.category
        rows = ds.requests_of("train") if rows is None else rows
        imp = ds.candidate_index(rows)
        req = np.repeat(rows, ds.imp_end[rows] - ds.imp_start[rows])
        clicked = ds.click[imp] > 0
        if not clicked.any():
            return
        q = torch.from_numpy(ds.query[req[clicked]])
        cats = item_sparse.cpu()[torch.from_numpy(ds.cand_item[imp[clicked]]), s:s + w]
        keys, valid = self._pairs(q, cats)
        uk, n_tc = torch.unique(keys[valid], return_counts=True)
        # clicks per token (a query's token once per clicked impression, whatever its categories)
        t = (q - self.fmap.text_offset).clamp_min(0)
        tok = torch.where(q > 0, t, torch.full_like(t, -1))
        n_t = torch.bincount(tok[tok >= 0], minlength=self.fmap.query_buckets).double()
        c_all = (cats - self.cat_offset).clamp(0, self.n_cat - 1)
        n_c = torch.bincount(c_all[cats > 0], minlength=self.n_cat).double()
        p_c = (n_c + 1) / (n_c.sum() + self.n_cat)
        tt, cc = uk // self.n_cat, uk % self.n_cat
        p_tc = (n_tc.double() + AFFINITY_PRIOR * p_c[cc]) / (n_t[tt] + AFFINITY_PRIOR)
        dev = self.keys.device
        self.keys = uk.to(dev)
        self.lift = torch.log(p_tc / p_c[cc]).float().to(dev)
        self.token_clicks.copy_(n_t.float().to(dev))

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

    def fit(self, ds: SearchLogDataset, item_sparse: torch.Tensor, batches) -> None:
        self.text.fit(ds)
        self.hist.fit(batches)
        self.fit_label_statistics(ds, item_sparse)

    def fit_label_statistics(self, ds: SearchLogDataset, item_sparse: torch.Tensor,
                             rows: np.ndarray | None = None) -> None:
        """The features computed from training clicks (popularity, query-category affinity).

        A booster trained on rows whose own click is inside these statistics learns to read its
        label from them; the GBDT fits them out of fold for its training rows (see ``gbdt``)."""
        self.pop.fit(ds, rows)
        self.affinity.fit(ds, item_sparse, rows)

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
