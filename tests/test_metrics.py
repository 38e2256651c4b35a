import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from qdrank.evaluation.metrics import (
    GradedRankingMetrics,
    RankingMetrics,
    auc,
    compute_all,
    gauc,
    graded_group_stats,
    logloss,
    rela_impr,
    sigmoid,
)


def _data(n, n_groups, seed, decimals=1):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(np.int64)
    s = np.round(rng.normal(size=n) + 0.7 * y, decimals)  # many ties
    g = rng.integers(0, n_groups, n).astype(np.int64) * 7919 - 12345  # sparse, negative ids
    return y, s, g


def _loop_gauc(y, s, g):
    aucs, ws = [], []
    for gid in np.unique(g):
        m = g == gid
        if y[m].min() == y[m].max():
            continue
        aucs.append(roc_auc_score(y[m], s[m]))
        ws.append(m.sum())
    aucs, ws = np.array(aucs), np.array(ws, dtype=float)
    return aucs.mean(), (aucs * ws).sum() / ws.sum(), len(aucs)


@pytest.mark.parametrize("n", [2, 3, 5, 17, 100, 1000, 20000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[-1] = 0, 1  # both classes present
    s = np.round(rng.normal(size=n) + 0.5 * y, 1)
    assert abs(auc(y, s) - roc_auc_score(y, s)) < 1e-10


def test_auc_edge_cases():
    assert auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0
    assert auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert auc(np.array([1, 0]), np.array([3.0, -3.0])) == 1.0
    assert auc(np.array([0, 1, 1, 0]), np.zeros(4)) == 0.5
    assert math.isnan(auc(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3])))
    assert math.isnan(auc(np.array([0, 0]), np.array([0.1, 0.2])))
    assert math.isnan(auc(np.array([]), np.array([])))
    assert isinstance(auc(np.array([0, 1]), np.array([0.1, 0.9])), float)


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError):
        auc(np.array([0, 1]), np.array([0.1]))


@pytest.mark.parametrize("n,n_groups", [(50, 10), (500, 40), (5000, 300), (3000, 2500)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_loop(n, n_groups, seed):
    y, s, g = _data(n, n_groups, seed)
    # explicitly add a size-1 group and an all-positive / all-negative group
    y = np.concatenate([y, [1], [1, 1, 1], [0, 0]])
    s = np.concatenate([s, [0.3], [0.1, 0.2, 0.2], [0.5, -0.5]])
    g = np.concatenate([g, [10**12], [10**12 + 1] * 3, [-(10**12)] * 2]).astype(np.int64)
    perm = np.random.default_rng(seed + 100).permutation(len(y))  # unsorted input
    y, s, g = y[perm], s[perm], g[perm]
    res = gauc(y, s, g)
    ref_u, ref_w, ref_n = _loop_gauc(y, s, g)
    assert res["n_groups"] == ref_n
    assert abs(res["gauc"] - ref_u) < 1e-10
    assert abs(res["gauc_w"] - ref_w) < 1e-10


def test_gauc_single_group_equals_auc_and_no_valid_group():
    y, s, _ = _data(400, 1, 3)
    res = gauc(y, s, np.zeros_like(y))
    assert res["n_groups"] == 1
    assert abs(res["gauc"] - auc(y, s)) < 1e-12 and abs(res["gauc_w"] - auc(y, s)) < 1e-12
    res = gauc(np.array([1, 0, 1]), np.array([0.1, 0.2, 0.3]), np.array([1, 2, 3]))
    assert res["n_groups"] == 0 and math.isnan(res["gauc"]) and math.isnan(res["gauc_w"])


def test_gauc_weighted_differs_from_unweighted():
    # group A (4 impressions) perfectly ranked, group B (2 impressions) inverted
    y = np.array([1, 0, 0, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.1, 0.9])
    g = np.array([1, 1, 1, 1, 2, 2])
    res = gauc(y, s, g)
    assert res["gauc"] == pytest.approx(0.5)
    assert res["gauc_w"] == pytest.approx(4 / 6)


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 1000)
    y = (rng.random(1000) < p).astype(int)
    assert abs(logloss(y, p) - log_loss(y, p)) < 1e-10
    assert np.isfinite(logloss(np.array([1, 0]), np.array([0.0, 1.0])))  # clipped


def test_rela_impr():
    assert rela_impr(0.75, 0.70) == pytest.approx(25.0)
    assert rela_impr(0.70, 0.70) == pytest.approx(0.0)
    assert rela_impr(0.65, 0.70) == pytest.approx(-25.0)


def test_sigmoid_stable():
    x = np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0])
    out = sigmoid(x)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [0.0, 1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-1)), 1.0])


def test_compute_all_keys_and_values():
    y, s, g = _data(2000, 100, 5)
    res = compute_all(y, s, g)
    assert set(res) == {"auc", "gauc", "gauc_w", "logloss", "n", "n_groups", "pos_rate"}
    assert math.isnan(res["logloss"])
    assert res["n"] == 2000 and res["pos_rate"] == pytest.approx(y.mean())
    assert res["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    res_sig = compute_all(y, s, g, prob="sigmoid")
    assert res_sig["logloss"] == pytest.approx(log_loss(y, sigmoid(s)), abs=1e-10)
    res_p = compute_all(y, s, g, prob=sigmoid(s))
    assert res_p["logloss"] == pytest.approx(res_sig["logloss"])


def _assert_close(a, b, auc_tol=1e-3):
    """Stateful (sum-reducible) metrics vs the exact one-shot ones: everything equal up to float
    summation order, except the histogram AUC (within ``auc_tol``)."""
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], abs=auc_tol if k == "auc" else 1e-12), k


def _by_group_chunks(g, n_chunks):
    """Index chunks that keep every group whole (as evaluation batches keep requests whole)."""
    ids = np.unique(g)
    return [np.flatnonzero(np.isin(g, part)) for part in np.array_split(ids, n_chunks)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_error_below_1e3(seed):
    """The fixed-histogram global AUC against the exact AUC, on continuous logits (model-like) and
    on probabilities passed through logit (the oracle's path)."""
    rng = np.random.default_rng(seed)
    n = 200_000
    y = (rng.random(n) < 0.12).astype(np.int64)
    s = rng.normal(size=n) * 1.5 + 0.8 * y - 2.0
    m = RankingMetrics(scores_are_logits=True)
    m.update(y, s, np.arange(n) // 20)
    assert abs(m.compute()["auc"] - roc_auc_score(y, s)) < 1e-3
    assert abs(m.compute()["auc"] - roc_auc_score(y, s)) < 1e-4  # the documented ~1e-5 regime
    p = sigmoid(s)
    from qdrank.evaluation.metrics import logit

    m2 = RankingMetrics()
    m2.update(y, logit(p), np.arange(n) // 20, probs=p)
    assert abs(m2.compute()["auc"] - roc_auc_score(y, p)) < 1e-3
    # a score range far outside [-16, 16] collapses into the edge bins: documented, and visible
    m3 = RankingMetrics()
    m3.update(y, s * 100, np.arange(n) // 20)
    assert abs(m3.compute()["auc"] - roc_auc_score(y, s)) > 1e-3


def test_ranking_metrics_chunked_equals_one_shot():
    y, s, g = _data(5000, 300, 7, decimals=3)
    p = sigmoid(s)
    m = RankingMetrics()
    for idx in _by_group_chunks(g, 7):
        m.update(y[idx], s[idx], g[idx], p[idx])
    _assert_close(m.compute(), compute_all(y, s, g, prob=p))
    assert len(m) == len(y)
    m.reset()
    assert len(m) == 0


def test_ranking_metrics_ties_in_one_bin_count_half():
    m = RankingMetrics()
    m.update(np.array([0, 1, 1, 0]), np.zeros(4), np.array([1, 1, 2, 2]))
    assert m.compute()["auc"] == 0.5 and m.compute()["gauc"] == 0.5


def test_ranking_metrics_torch_inputs_and_logits():
    torch = pytest.importorskip("torch")
    y, s, g = _data(1000, 50, 8, decimals=3)
    m = RankingMetrics(scores_are_logits=True)
    m.update(torch.tensor(y, dtype=torch.float32), torch.tensor(s, dtype=torch.float64), torch.tensor(g))
    _assert_close(m.compute(), compute_all(y, s, g, prob="sigmoid"))
    m2 = RankingMetrics()
    m2.update(torch.tensor(y), torch.tensor(s, dtype=torch.bfloat16), torch.tensor(g))
    assert np.isfinite(m2.compute()["auc"])


def test_ranking_metrics_merge_equals_union():
    """Two ranks' states add up to the one-process metrics (sum-reducible)."""
    y, s, g = _data(4000, 200, 9, decimals=3)
    p = sigmoid(s)
    a, b = _by_group_chunks(g, 2)
    r0, r1 = RankingMetrics(), RankingMetrics()
    r0.update(y[a], s[a], g[a], p[a])
    r1.update(y[b], s[b], g[b], p[b])
    one = RankingMetrics()
    one.update(y, s, g, p)
    merged = RankingMetrics.from_states([r0.state(), r1.state()])
    _assert_close(merged.compute(), compute_all(y, s, g, prob=p))
    assert merged.compute()["auc"] == one.compute()["auc"]  # histogram counts add exactly
    r0.merge([r1.state()])
    _assert_close(r0.compute(), one.compute(), auc_tol=0.0)
    # an empty rank's state merges cleanly; states are fixed-size arrays whatever the data size
    merged2 = RankingMetrics.from_states([RankingMetrics().state(), r1.state()])
    assert merged2.compute()["n"] == len(b)
    assert {k: v.shape for k, v in RankingMetrics().state().items()} == {k: v.shape for k, v in r1.state().items()}


def test_ranking_metrics_mixed_probs_raises():
    m = RankingMetrics()
    m.update(np.array([0, 1]), np.array([0.1, 0.2]), np.array([1, 1]), np.array([0.4, 0.6]))
    m.update(np.array([0, 1]), np.array([0.1, 0.2]), np.array([2, 2]))
    with pytest.raises(ValueError):
        m.compute()


def _loop_graded(rel, s, g, k=10):
    aucs, ndcgs = [], []
    for gid in np.unique(g):
        r, sc = rel[g == gid], s[g == gid]
        num = den = 0.0
        for i in range(len(r)):
            for j in range(len(r)):
                if r[i] > r[j]:
                    den += 1
                    num += 1.0 if sc[i] > sc[j] else 0.5 if sc[i] == sc[j] else 0.0
        if den:
            aucs.append(num / den)
        order = np.argsort(-sc, kind="stable")
        gain = np.array([r[sc == sc[i]].mean() for i in order])[:k]  # ties: the expected gain
        disc = 1 / np.log2(np.arange(2, len(gain) + 2))
        ideal = np.sort(r)[::-1][:k]
        if (ideal * disc).sum() > 0:
            ndcgs.append((gain * disc).sum() / (ideal * disc).sum())
    return np.mean(aucs), np.mean(ndcgs)


def test_graded_metrics_match_a_loop():
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(60), rng.integers(1, 25, 60))
    rel = np.round(rng.random(g.size), 2)  # some equal relevances: those pairs are skipped
    s = np.round(rel + rng.normal(size=g.size) * 0.3, 1)  # score ties count 1/2
    perm = rng.permutation(g.size)
    m = GradedRankingMetrics(10)
    m.update(rel[perm], s[perm], g[perm])
    out = m.compute()
    exp_auc, exp_ndcg = _loop_graded(rel, s, g)
    assert out["gauc"] == pytest.approx(exp_auc, abs=1e-12)
    assert out["ndcg10"] == pytest.approx(exp_ndcg, abs=1e-12)
    pa, nd, n = graded_group_stats(rel, rel, g)  # ranking by the truth itself is perfect
    assert np.nanmin(pa) == 1.0 and np.nanmin(nd) == pytest.approx(1.0)
    # sum-reducible: two halves of the groups merge into the same figures
    a, b = _by_group_chunks(g, 2)
    m0, m1 = GradedRankingMetrics(10), GradedRankingMetrics(10)
    m0.update(rel[a], s[a], g[a])
    m1.update(rel[b], s[b], g[b])
    assert m0.merge([m1.state()]).compute() == pytest.approx(out)
