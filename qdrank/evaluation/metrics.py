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

:class:`RankingMetrics` accumulates chunks (numpy arrays or torch tensors) during
evaluation and exposes ``state()`` / ``merge()`` so distributed ranks can all-gather their
raw states and compute exact global metrics (group ids are global request ids, so merging
is concatenation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "RankingMetrics",
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


class RankingMetrics:
    """Accumulates (labels, scores, groups[, probs]) chunks and computes :func:`compute_all`.

    ``scores_are_logits=True`` makes ``compute()`` derive probabilities as ``sigmoid(scores)``
    when no ``probs`` were given, so logloss is reported.

    Distributed use: each rank calls ``state()``, the states are all-gathered (e.g. with
    ``torch.distributed.all_gather_object``), and one object calls ``merge(states)`` (or
    ``RankingMetrics.from_states(states)``) before ``compute()``. Group ids must be global
    request ids, so merging is plain concatenation and the result is exact.
    """

    _KEYS = ("labels", "scores", "groups", "probs")

    def __init__(self, scores_are_logits: bool = False) -> None:
        self.scores_are_logits = scores_are_logits
        self.reset()

    def reset(self) -> None:
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._groups: list[np.ndarray] = []
        self._probs: list[np.ndarray | None] = []

    def __len__(self) -> int:
        return int(sum(a.shape[0] for a in self._labels))

    def update(self, labels: Any, scores: Any, groups: Any, probs: Any = None) -> None:
        y = _check_labels(labels)
        s = _to_numpy(scores, np.float64)
        g = _to_numpy(groups, np.int64)
        p = None if probs is None else _to_numpy(probs, np.float64)
        _check_same_length(y, s, g, *([] if p is None else [p]))
        if y.size == 0:
            return
        self._labels.append(y.copy())
        self._scores.append(s.copy())
        self._groups.append(g.copy())
        self._probs.append(None if p is None else p.copy())

    def _concat_probs(self) -> np.ndarray | None:
        have = [p is not None for p in self._probs]
        if not any(have):
            return None
        if not all(have):
            raise ValueError("probs were given for some chunks but not for others")
        return np.concatenate(self._probs)  # type: ignore[arg-type]

    def state(self) -> dict[str, np.ndarray]:
        """Raw concatenated arrays; ``probs`` is an empty array when none were given."""
        probs = self._concat_probs()
        return {
            "labels": np.concatenate(self._labels) if self._labels else np.empty(0, np.float64),
            "scores": np.concatenate(self._scores) if self._scores else np.empty(0, np.float64),
            "groups": np.concatenate(self._groups) if self._groups else np.empty(0, np.int64),
            "probs": probs if probs is not None else np.empty(0, np.float64),
        }

    def merge(self, other_states: Sequence[Mapping[str, Any]]) -> RankingMetrics:
        """Append other ranks' ``state()`` dicts to this accumulator (in place); returns self."""
        for st in other_states:
            labels = _to_numpy(st["labels"], np.float64)
            if labels.size == 0:
                continue
            probs = st.get("probs")
            if probs is not None and _to_numpy(probs).size == 0:
                probs = None
            self.update(labels, st["scores"], st["groups"], probs)
        return self

    @classmethod
    def from_states(cls, states: Sequence[Mapping[str, Any]], scores_are_logits: bool = False) -> RankingMetrics:
        return cls(scores_are_logits=scores_are_logits).merge(states)

    def compute(self) -> dict[str, float | int]:
        st = self.state()
        probs: Any = self._concat_probs()
        if probs is None and self.scores_are_logits:
            probs = "sigmoid"
        return compute_all(st["labels"], st["scores"], st["groups"], prob=probs)
