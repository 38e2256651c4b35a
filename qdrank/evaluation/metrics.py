"""Vectorised ranking metrics (AUC, GAUC, logloss, RelaImpr) and a stateful accumulator.

All functions take numpy arrays (labels ``y`` in {0, 1}, real-valued scores ``s``, int64
group / request ids ``g``) and return Python floats. Nothing loops in Python over
impressions or groups: AUC is the Mann-Whitney statistic computed from average ranks after
one sort, GAUC does the same inside groups after one ``np.lexsort`` by (group, score) and
reduces per group with ``np.bincount``. Ties in score count 1/2, exactly as
``sklearn.metrics.roc_auc_score``.

Naming of the two GAUC variants (the literature uses "GAUC" for both):

* ``gauc``   -- unweighted mean of per-request AUCs (DiffusionGS paper, torchrec
  ``metrics/gauc.py``): every request counts the same.
* ``gauc_w`` -- impression-weighted mean, ``sum_g n_g * AUC_g / sum_g n_g`` (DIN,
  FuxiCTR): large requests count more.

Requests whose labels are all equal (no positive or no negative) have no AUC and are
skipped by both; ``n_groups`` reports how many were used.

The stateful metrics (:class:`RankingMetrics`, :class:`GradedRankingMetrics`) keep only
*sum-reducible* states, as torchrec's metric modules do: every state is a fixed-shape array
that adds across chunks and across ``torchrun`` ranks (an all-reduce of 2 MiB per AUC, never a
gather of raw predictions):

* GAUC: per-request AUCs are computed when a request's impressions arrive (a request's
  impressions must come in one ``update`` call: evaluation batches keep requests whole), and
  only their sum, impression-weighted sum and count are kept.
* global AUC: a fixed histogram of scores per class (:data:`HIST_BINS` bins over logits in
  ``[-HIST_RANGE, HIST_RANGE]``; scores outside share the edge bins). AUC is then exact for the
  binned scores, counting pairs in one bin as ties (1/2). The error against the exact AUC is at
  most half the fraction of (positive, negative) pairs that share a bin: for bins of 2.4e-4 logit
  it is ~1e-5 on model scores (tests check < 1e-3). Scores are treated as logits: pass
  probabilities through ``logit`` first (e.g. the oracle's true probabilities).
* logloss and the label rate: sums and counts.

The exact one-shot functions (:func:`auc`, :func:`gauc`, :func:`compute_all`) stay for
tests and analyses that hold every prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "GradedRankingMetrics",
    "HIST_BINS",
    "HIST_RANGE",
    "RankingMetrics",
    "SumState",
    "graded_group_stats",
    "logit",
    "auc",
    "compute_all",
    "gauc",
    "logloss",
    "rela_impr",
    "sigmoid",
]


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any, dtype: Any | None = None) -> np.ndarray:
    """numpy / list / torch tensor (any device, bf16 included) -> 1-D numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    arr = np.asarray(x)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr.reshape(-1)


def _check_labels(y: np.ndarray) -> np.ndarray:
    y = _to_numpy(y, np.float64)
    if y.size and np.any((y != 0.0) & (y != 1.0)):
        raise ValueError("labels must be in {0, 1}")
    return y


def _check_scores(s: Any) -> np.ndarray:
    s = _to_numpy(s, np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _check_same_length(*arrays: np.ndarray) -> None:
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays[1:]):
        raise ValueError(f"length mismatch: {[a.shape[0] for a in arrays]}")


def sigmoid(x: Any) -> np.ndarray:
    """Numerically stable logistic function on a numpy array."""
    x = _to_numpy(x, np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _dense_rank(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense 0-based rank of each element (equal values share a rank) and the rank count."""
    order = np.argsort(x)  # unstable, SIMD-accelerated; stability is irrelevant for ranks
    xs = x[order]
    step = np.empty(x.shape[0], dtype=np.int64)
    step[0] = 0
    np.not_equal(xs[1:], xs[:-1], out=step[1:])
    ranks_sorted = np.cumsum(step)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks, int(ranks_sorted[-1]) + 1


def _group_auc_stats(
    y: np.ndarray, s: np.ndarray, g: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (n, n_pos, sum of average ranks of positives), ranks 1-based within group.

    Sorting is by (group, score). Instead of ``np.lexsort`` (a slow stable multi-key sort)
    the pair is packed into one int64 key ``group_rank * n_scores + score_rank`` and sorted
    with numpy's fast unstable ``argsort``; stability does not matter because equal keys are
    exactly the tie blocks, whose members all get the block's average rank. ``n > 0``.
    """
    n = y.shape[0]
    if g is None:
        order = np.argsort(s)
        ks = s[order]
        group_start = np.zeros(n, dtype=bool)
        group_start[0] = True
    else:
        s_rank, n_scores = _dense_rank(s)
        g_min, g_max = int(g.min()), int(g.max())
        if (g_max - g_min + 1) * n_scores < 2**62:
            g_key = g - g_min
        else:  # sparse / huge ids: compress them first (n_groups * n_scores <= n**2 fits)
            g_key = np.unique(g, return_inverse=True)[1].reshape(-1).astype(np.int64, copy=False)
        key = g_key * n_scores + s_rank
        order = np.argsort(key)
        ks = key[order]
        gs = ks // n_scores
        group_start = np.empty(n, dtype=bool)
        group_start[0] = True
        np.not_equal(gs[1:], gs[:-1], out=group_start[1:])
    ys = y[order]
    block_start = np.empty(n, dtype=bool)
    block_start[0] = True
    np.not_equal(ks[1:], ks[:-1], out=block_start[1:])
    block_start |= group_start

    gid = np.cumsum(group_start) - 1  # group index of each sorted position
    g_first = np.flatnonzero(group_start)  # sorted position where each group starts
    b_first = np.flatnonzero(block_start)
    b_size = np.diff(np.append(b_first, n))
    # 1-based rank within the group of a block's first element, averaged over the block
    b_avg_rank = (b_first - g_first[gid[b_first]] + 1) + (b_size - 1) / 2.0
    avg_rank = np.repeat(b_avg_rank, b_size)

    n_groups = g_first.shape[0]
    g_n = np.diff(np.append(g_first, n)).astype(np.float64)
    g_pos = np.bincount(gid, weights=ys, minlength=n_groups)
    g_rank_pos = np.bincount(gid, weights=ys * avg_rank, minlength=n_groups)
    return g_n, g_pos, g_rank_pos


def _auc_from_stats(g_n: np.ndarray, g_pos: np.ndarray, g_rank_pos: np.ndarray) -> np.ndarray:
    g_neg = g_n - g_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        return (g_rank_pos - g_pos * (g_pos + 1) / 2.0) / (g_pos * g_neg)


# --------------------------------------------------------------------------- functions


def auc(y: Any, s: Any) -> float:
    """Exact ROC AUC, ties counted 1/2 (average ranks), O(n log n). NaN if only one class."""
    y = _check_labels(y)
    s = _check_scores(s)
    _check_same_length(y, s)
    if y.size == 0:
        return float("nan")
    g_n, g_pos, g_rank_pos = _group_auc_stats(y, s, None)
    if g_pos[0] == 0 or g_pos[0] == g_n[0]:
        return float("nan")
    return float(_auc_from_stats(g_n, g_pos, g_rank_pos)[0])


def gauc(y: Any, s: Any, g: Any) -> dict[str, float | int]:
    """Group AUC over requests ``g``.

    Returns ``{"gauc": unweighted mean of per-group AUCs (DiffusionGS paper, torchrec),
    "gauc_w": impression-weighted mean (DIN, FuxiCTR), "n_groups": groups used}``.
    Groups whose labels are all equal are skipped; if none remain both means are NaN.
    Input order is arbitrary (groups need not be contiguous).
    """
    y = _check_labels(y)
    s = _check_scores(s)
    g = _to_numpy(g, np.int64)
    _check_same_length(y, s, g)
    if y.size == 0:
        return {"gauc": float("nan"), "gauc_w": float("nan"), "n_groups": 0}
    g_n, g_pos, g_rank_pos = _group_auc_stats(y, s, g)
    valid = (g_pos > 0) & (g_pos < g_n)
    n_used = int(valid.sum())
    if n_used == 0:
        return {"gauc": float("nan"), "gauc_w": float("nan"), "n_groups": 0}
    aucs = _auc_from_stats(g_n[valid], g_pos[valid], g_rank_pos[valid])
    w = g_n[valid]
    return {
        "gauc": float(aucs.mean()),
        "gauc_w": float(np.dot(aucs, w) / w.sum()),
        "n_groups": n_used,
    }


def logloss(y: Any, p: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to [eps, 1 - eps])."""
    y = _check_labels(y)
    p = np.clip(_to_numpy(p, np.float64), eps, 1.0 - eps)
    _check_same_length(y, p)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def rela_impr(model_auc: float, base_auc: float) -> float:
    """RelaImpr (DIN): ``((model_auc - 0.5) / (base_auc - 0.5) - 1) * 100``, in percent."""
    return float(((model_auc - 0.5) / (base_auc - 0.5) - 1.0) * 100.0)


def compute_all(y: Any, s: Any, g: Any, prob: Any = None) -> dict[str, float | int]:
    """All ranking metrics at once.

    Keys: ``auc, gauc, gauc_w, logloss, n, n_groups, pos_rate``. ``logloss`` needs
    probabilities: pass ``prob`` as an array, or ``prob="sigmoid"`` when ``s`` are logits
    (then ``prob = sigmoid(s)``); with ``prob=None`` it is NaN.
    """
    y = _check_labels(y)
    s = _check_scores(s)
    g = _to_numpy(g, np.int64)
    _check_same_length(y, s, g)
    if isinstance(prob, str):
        if prob != "sigmoid":
            raise ValueError(f"prob must be an array, None or 'sigmoid', got {prob!r}")
        prob = sigmoid(s)
    ga = gauc(y, s, g)
    return {
        "auc": auc(y, s),
        "gauc": ga["gauc"],
        "gauc_w": ga["gauc_w"],
        "logloss": logloss(y, prob) if prob is not None else float("nan"),
        "n": int(y.size),
        "n_groups": ga["n_groups"],
        "pos_rate": float(y.mean()) if y.size else float("nan"),
    }


# --------------------------------------------------------------------------- stateful

HIST_BINS = 2**17     # global-AUC histogram bins ...
HIST_RANGE = 16.0     # ... uniform over logits in [-16, 16] (bin width 2.4e-4)


def logit(p: Any, eps: float = 1e-12) -> np.ndarray:
    """log(p / (1 - p)), clipped to keep 0 and 1 finite (monotone, so ranking is unchanged)."""
    p = np.clip(_to_numpy(p, np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


class SumState:
    """A metric whose whole state is a dict of fixed-shape float64 arrays that add up.

    Chunks add into the state with ``update``; ranks combine with ``merge(states)`` (in
    process) or an all-reduce of ``state()`` (see ``qdrank.evaluation.evaluate``).
    """

    def _init_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reset(self) -> None:
        self._s = self._init_state()

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._s.items()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        for k, v in self._s.items():
            arr = _to_numpy(state[k], np.float64).reshape(v.shape)
            self._s[k] = arr.copy()

    def merge(self, other_states: Sequence[Mapping[str, Any]]) -> SumState:
        """Add other chunks' or ranks' ``state()`` dicts into this one (in place); returns self."""
        for st in other_states:
            for k, v in self._s.items():
                v += _to_numpy(st[k], np.float64).reshape(v.shape)
        return self


class RankingMetrics(SumState):
    """AUC (histogram), GAUC (per-request sums), logloss and label rate of binary labels.

    ``update(labels, scores, groups, probs=None)``: ``scores`` rank (treated as logits for the
    AUC histogram); ``probs`` give logloss, or ``scores_are_logits=True`` derives them as
    ``sigmoid(scores)``. Every request (group) must arrive whole in one call.
    ``compute()`` returns the keys of :func:`compute_all`.
    """

    def __init__(self, scores_are_logits: bool = False, bins: int = HIST_BINS, score_range: float = HIST_RANGE
                 ) -> None:
        self.scores_are_logits = scores_are_logits
        self.bins, self.score_range = int(bins), float(score_range)
        self.reset()

    def _init_state(self) -> dict[str, np.ndarray]:
        z = np.zeros
        return {"hist_pos": z(self.bins), "hist_neg": z(self.bins), "n": z(1), "pos": z(1),
                "logloss_sum": z(1), "logloss_n": z(1), "gauc_sum": z(1), "gauc_w_sum": z(1),
                "gauc_w_den": z(1), "n_groups": z(1)}

    def __len__(self) -> int:
        return int(self._s["n"][0])

    def _bin(self, s: np.ndarray) -> np.ndarray:
        r = self.score_range
        b = np.floor((np.clip(s, -r, r) + r) * (self.bins / (2 * r))).astype(np.int64)
        return np.minimum(b, self.bins - 1)

    def update(self, labels: Any, scores: Any, groups: Any, probs: Any = None) -> None:
        y = _check_labels(labels)
        s = _check_scores(scores)
        g = _to_numpy(groups, np.int64)
        p = None if probs is None else _to_numpy(probs, np.float64)
        _check_same_length(y, s, g, *([] if p is None else [p]))
        if y.size == 0:
            return
        st = self._s
        b = self._bin(s)
        st["hist_pos"] += np.bincount(b, weights=y, minlength=self.bins)
        st["hist_neg"] += np.bincount(b, weights=1.0 - y, minlength=self.bins)
        st["n"] += y.size
        st["pos"] += y.sum()
        if p is None and self.scores_are_logits:
            p = sigmoid(s)
        if p is not None:
            st["logloss_sum"] += logloss(y, p) * y.size
            st["logloss_n"] += y.size
        g_n, g_pos, g_rank_pos = _group_auc_stats(y, s, g)
        valid = (g_pos > 0) & (g_pos < g_n)
        if valid.any():
            aucs = _auc_from_stats(g_n[valid], g_pos[valid], g_rank_pos[valid])
            st["gauc_sum"] += aucs.sum()
            st["gauc_w_sum"] += np.dot(aucs, g_n[valid])
            st["gauc_w_den"] += g_n[valid].sum()
            st["n_groups"] += int(valid.sum())

    @classmethod
    def from_states(cls, states: Sequence[Mapping[str, Any]], scores_are_logits: bool = False) -> RankingMetrics:
        m = cls(scores_are_logits=scores_are_logits)
        m.merge(states)
        return m

    def histogram_auc(self) -> float:
        """AUC of the binned scores: pairs in one bin count 1/2."""
        hp, hn = self._s["hist_pos"], self._s["hist_neg"]
        n_pos, n_neg = hp.sum(), hn.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(hn) - hn
        return float((np.dot(hp, neg_below) + 0.5 * np.dot(hp, hn)) / (n_pos * n_neg))

    def compute(self) -> dict[str, float | int]:
        st = self._s
        n, n_groups, ll_n = int(st["n"][0]), int(st["n_groups"][0]), st["logloss_n"][0]
        if 0 < ll_n < n:
            raise ValueError("probs were given for some chunks but not for others")
        nan = float("nan")
        return {
            "auc": self.histogram_auc(),
            "gauc": float(st["gauc_sum"][0] / n_groups) if n_groups else nan,
            "gauc_w": float(st["gauc_w_sum"][0] / st["gauc_w_den"][0]) if n_groups else nan,
            "logloss": float(st["logloss_sum"][0] / ll_n) if ll_n else nan,
            "n": n,
            "n_groups": n_groups,
            "pos_rate": float(st["pos"][0] / n) if n else nan,
        }


# --------------------------------------------------------------------------- graded relevance


def graded_group_stats(rel: Any, s: Any, g: Any, k: int = 10, max_pairs: int = 2**24
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group pairwise AUC and NDCG@k of scores ``s`` against graded relevance ``rel`` >= 0.

    Pairwise AUC of a group: among pairs with different ``rel``, the share the scores order the
    same way (score ties count 1/2); NaN where every ``rel`` is equal. NDCG@k uses gain ``rel``
    and discount ``1 / log2(rank + 1)``, averaged over the orders of tied scores (each member of a
    tie block gets the block's mean gain), so it does not depend on input order; NaN where the
    ideal DCG is 0. Returns ``(pair_auc, ndcg, n)`` per group (groups in sorted id order).
    Vectorised over groups padded to the largest group, processed in slices of ~``max_pairs``.
    """
    rel, s = _to_numpy(rel, np.float64), _check_scores(s)
    g = _to_numpy(g, np.int64)
    _check_same_length(rel, s, g)
    if rel.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.lexsort((np.arange(g.size), g))  # by group, input order kept inside a group
    gs, rel, s = g[order], rel[order], s[order]
    start = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    n = np.diff(np.r_[start, gs.size])
    K = int(n.max())
    col = np.arange(gs.size) - np.repeat(start, n)
    row = np.repeat(np.arange(start.size), n)
    R_rel = np.full((start.size, K), np.nan)
    R_s = np.full((start.size, K), np.nan)
    R_rel[row, col], R_s[row, col] = rel, s
    pair_auc = np.empty(start.size)
    ndcg = np.empty(start.size)
    disc = 1.0 / np.log2(np.arange(2, K + 2))
    kk = min(k, K)
    step = max(1, max_pairs // (K * K))
    for a in range(0, start.size, step):
        r, sc = R_rel[a:a + step], R_s[a:a + step]
        more = r[:, :, None] > r[:, None, :]          # rel_i > rel_j (NaN pads compare False)
        ds = sc[:, :, None] - sc[:, None, :]
        conc = np.where(more, (ds > 0) + 0.5 * (ds == 0), 0.0).sum((1, 2))
        n_pairs = more.sum((1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            pair_auc[a:a + step] = np.where(n_pairs > 0, conc / np.maximum(n_pairs, 1), np.nan)
        # NDCG@k: expected DCG of the model order over random tie-breaking (a tie block's members
        # share the block's mean gain), pads last; against the ideal order
        sc_k = np.where(np.isnan(sc), -np.inf, sc)
        by_s = np.argsort(-sc_k, axis=1, kind="stable")
        s_sorted = np.take_along_axis(sc_k, by_s, 1)
        gain = np.nan_to_num(np.take_along_axis(r, by_s, 1))
        new_block = np.ones_like(s_sorted, dtype=bool)
        new_block[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
        bid = np.cumsum(new_block.ravel()) - 1
        mean_gain = np.bincount(bid, weights=gain.ravel()) / np.bincount(bid)
        gain = mean_gain[bid].reshape(gain.shape)[:, :kk]
        ideal = -np.sort(-np.nan_to_num(r), axis=1)[:, :kk]
        dcg, idcg = gain @ disc[:kk], ideal @ disc[:kk]
        with np.errstate(invalid="ignore", divide="ignore"):
            ndcg[a:a + step] = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)
    return pair_auc, ndcg, n.astype(np.float64)


class GradedRankingMetrics(SumState):
    """Ranking quality against a graded truth (the simulator's ``true_rel``), sum-reducible.

    ``compute()`` -> ``{"gauc": mean per-request pairwise AUC, "ndcgK": mean per-request
    NDCG@K, "n_groups"}``. Requests must arrive whole in one ``update`` call.
    """

    def __init__(self, k: int = 10) -> None:
        self.k = k
        self.reset()

    def _init_state(self) -> dict[str, np.ndarray]:
        return {k: np.zeros(1) for k in ("auc_sum", "auc_n", "ndcg_sum", "ndcg_n")}

    def update(self, rel: Any, scores: Any, groups: Any) -> None:
        pa, nd, _ = graded_group_stats(rel, scores, groups, self.k)
        st = self._s
        st["auc_sum"] += np.nansum(pa)
        st["auc_n"] += np.count_nonzero(~np.isnan(pa))
        st["ndcg_sum"] += np.nansum(nd)
        st["ndcg_n"] += np.count_nonzero(~np.isnan(nd))

    def compute(self) -> dict[str, float | int]:
        st, nan = self._s, float("nan")
        return {"gauc": float(st["auc_sum"][0] / st["auc_n"][0]) if st["auc_n"][0] else nan,
                f"ndcg{self.k}": float(st["ndcg_sum"][0] / st["ndcg_n"][0]) if st["ndcg_n"][0] else nan,
                "n_groups": int(st["auc_n"][0])}
