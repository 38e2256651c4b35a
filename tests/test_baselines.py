"""Baselines (#8): each on a tiny hand-built log with a known answer, the GBDT feature builder on odd
logs, checkpoint round trips and serving parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from test_serving import build_store, request_body
from test_unseen_logs import odd_log  # noqa: F401  (fixture)

from qdrank.data.batch import TENSOR_FIELDS, select_requests
from qdrank.data.dataset import SearchLogDataset
from qdrank.evaluation.evaluate import predict
from qdrank.models.registry import available_models, model_class
from qdrank.serving.ranker import Ranker
from qdrank.training.checkpoint import load_model
from qdrank.training.trainer import Trainer, build_model

BASELINES = ("logged_order", "popularity", "history_match", "text_match", "gbdt")
FAST = {"gbdt": ("model.trees=40", "model.min_data_in_leaf=5", "model.num_threads=1")}


def write_log(d: Path, requests: list[tuple], impressions: list[tuple], behaviors: list[tuple],
              items: pd.DataFrame | None = None) -> Path:
    """requests (request_id, user_id, timestamp, query, split); impressions (request_id, item_id,
    position, click); behaviours (user_id, item_id, timestamp, action)."""
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(requests, columns=["request_id", "user_id", "timestamp", "query", "split"]).to_parquet(
        d / "requests.parquet", index=False)
    pd.DataFrame(impressions, columns=["request_id", "item_id", "position", "click"]).to_parquet(
        d / "impressions.parquet", index=False)
    pd.DataFrame(behaviors, columns=["user_id", "item_id", "timestamp", "action"]).to_parquet(
        d / "behaviors.parquet", index=False)
    if items is not None:
        items.to_parquet(d / "items.parquet", index=False)
    return d


def fitted(name: str, data: Path, *overrides: str):
    cfg = tiny_config(name, *FAST.get(name, ()), *overrides)
    ds = SearchLogDataset(data, cfg.data, log=lambda m: None)
    model = build_model(cfg, ds)
    model.fit_data(ds)
    return model.eval(), ds


def test_scores(model, ds: SearchLogDataset, split: str = "test") -> dict[int, np.ndarray]:
    """request id -> candidate scores (in logged order) on ``split``."""
    out = {}
    for r in ds.requests_of(split):
        with torch.inference_mode():
            out[int(ds.request_id[r])] = model(ds.make_batch(np.array([r]))).ctr_logit.numpy()
    return out


test_scores.__test__ = False  # a helper, not a test


def test_registry_lists_the_baselines():
    models = available_models()
    for name in BASELINES:
        assert name in models
        assert model_class(name).gradient_trained is False
    assert model_class("logged_order").uses_logged_position is True
    assert model_class("dnn").gradient_trained is True and model_class("dnn").uses_logged_position is False


def test_popularity_ranks_train_popular_item_first(tmp_path):
    # train: item 10 clicked 8/10 times, item 11 2/10, item 12 0/10; test shows all three + unseen 13
    reqs, imps = [], []
    for i in range(10):
        reqs.append((i, i % 3, 100 + i, "q", "train"))
        imps += [(i, 10, 0, int(i < 8)), (i, 11, 1, int(i < 2)), (i, 12, 2, 0)]
    reqs += [(20, 1, 200, "q", "valid"), (21, 2, 300, "q", "test")]
    imps += [(20, 10, 0, 1), (20, 11, 1, 0), (21, 12, 0, 0), (21, 11, 1, 0), (21, 10, 2, 1), (21, 13, 3, 0)]
    data = write_log(tmp_path / "log", reqs, imps, [(0, 10, 50, "click")])
    model, ds = fitted("popularity", data)
    s = test_scores(model, ds)[21]  # candidates 12, 11, 10, 13
    assert s[2] > s[1] > s[0]
    a, b = model.pop.prior.tolist()
    assert s[3] == pytest.approx(float(np.log(a / b)), abs=1e-5)  # the unseen item gets the prior
    assert model.n_parameters() == 0 and sum(p.numel() for p in model.parameters()) == 0


def test_history_match_ranks_the_item_seen_before_first(tmp_path):
    items = pd.DataFrame({"item_id": [1, 2, 3, 4, 5], "category": ["a", "a", "b", "c", "c"]})
    reqs = [(0, 7, 1000, "q", "train"), (4, 8, 1100, "q", "train"), (1, 8, 1000, "q", "valid"),
            (2, 7, 2000, "q", "test"), (3, 9, 2000, "q", "test")]
    imps = [(0, 1, 0, 1), (0, 3, 1, 0), (4, 2, 0, 1), (4, 5, 1, 0), (1, 1, 0, 1), (1, 2, 1, 0),
            (2, 4, 0, 0), (2, 2, 1, 0), (2, 3, 2, 0), (2, 1, 3, 1),
            (3, 1, 0, 1), (3, 3, 1, 0)]
    # user 7 clicked item 1 long ago; its request at t=2000 sees it; the same-second behaviour on
    # item 3 must not count (strictly earlier history); user 9 has no history
    behs = [(7, 1, 500, "click"), (7, 3, 2000, "click"), (8, 5, 10, "click")]
    data = write_log(tmp_path / "log", reqs, imps, behs, items)
    model, ds = fitted("history_match", data)
    s = test_scores(model, ds)
    assert np.argmax(s[2]) == 3                    # item 1: seen before
    assert s[2][1] > s[2][0] == s[2][2] == 0       # item 2 shares item 1's category; 3 and 4 nothing
    assert (s[3] == 0).all()


def test_history_match_recency_and_action_weights(tmp_path):
    reqs = [(0, 1, 1000, "q", "test"), (1, 2, 1000, "q", "train"), (3, 2, 1100, "q", "train"),
            (2, 3, 1000, "q", "valid")]
    imps = [(0, 10, 0, 0), (0, 11, 1, 1), (1, 10, 0, 0), (3, 11, 0, 1), (2, 10, 0, 1)]
    behs = [(1, 10, 100, "view"), (1, 11, 200, "view"), (1, 12, 300, "view")]
    data = write_log(tmp_path / "log", reqs, imps, behs)
    model, ds = fitted("history_match", data, "model.decay=0.5")
    s = test_scores(model, ds)[0]
    w = model.matcher.action_weight[1].item()
    np.testing.assert_allclose(s, [0.25 * w, 0.5 * w], rtol=1e-5)  # item 11 is the more recent


def test_text_match_ranks_the_matching_title_first(tmp_path):
    items = pd.DataFrame({"item_id": [1, 2, 3, 4],
                          "title": ["Red running shoes", "blue phone case", "garden chair", "red lamp"],
                          "category": ["footwear", "phones", "shoes", "lighting"]})
    reqs = [(0, 1, 100, "phone", "train"), (1, 1, 150, "chair", "train"), (2, 2, 200, "lamp", "valid"),
            (3, 3, 300, "red running shoes", "test"), (4, 3, 400, "", "test")]
    imps = [(0, 2, 0, 1), (1, 3, 0, 1), (2, 4, 0, 1),
            (3, 2, 0, 0), (3, 3, 1, 0), (3, 4, 2, 0), (3, 1, 3, 1), (4, 1, 0, 0), (4, 2, 1, 1)]
    data = write_log(tmp_path / "log", reqs, imps, [(1, 1, 50, "click")], items)
    model, ds = fitted("text_match", data)
    s = test_scores(model, ds)
    q = s[3]  # candidates 2 (nothing), 3 (category "shoes"), 4 ("red"), 1 (all three words + bigrams)
    assert np.argmax(q) == 3 and q[0] == 0
    assert q[1] > 0 and q[2] > 0                    # a category value and a title word both count
    assert (s[4] == 0).all()                        # an empty query matches nothing


def test_logged_order_reproduces_positions(tiny_dataset):
    cfg, ds = tiny_dataset
    model = model_class("logged_order")(ds.fmap, tiny_config("logged_order").model)
    rows = ds.requests_of("test")[:20]
    with torch.inference_mode():
        s = model(ds.make_batch(rows)).ctr_logit.numpy()
    pos = ds.position[ds.candidate_index(rows)]
    np.testing.assert_array_equal(s, -pos.astype(np.float32))
    b = ds.make_batch(rows)
    b.position[:3] = 0   # unknown position: shown after all known ones
    with torch.inference_mode():
        assert model(b).ctr_logit[:3].max() < model(b).ctr_logit[3:].min()


def planted_log(d: Path, seed: int = 0) -> Path:
    """Clicks depend on a candidate feature 'quality' only (and on nothing the position says)."""
    rng = np.random.default_rng(seed)
    n_req, k = 500, 10
    reqs = [(i, int(rng.integers(0, 50)), 1000 + i, "q", "train" if i < 350 else ("valid" if i < 420 else "test"))
            for i in range(n_req)]
    rows = []
    for i in range(n_req):
        quality = rng.normal(size=k)
        p = 1 / (1 + np.exp(-(2.5 * quality - 2)))
        for j in range(k):
            rows.append((i, int(rng.integers(0, 300)), j, int(rng.random() < p[j]), float(quality[j])))
    write_log(d, reqs, [r[:4] for r in rows], [(0, 1, 10, "click")])
    imp = pd.read_parquet(d / "impressions.parquet")
    imp["quality"] = [r[4] for r in rows]
    imp.to_parquet(d / "impressions.parquet", index=False)
    return d


def test_gbdt_learns_a_planted_feature(tmp_path):
    data = planted_log(tmp_path / "log")
    cfg = tiny_config("gbdt", *FAST["gbdt"])
    ds = SearchLogDataset(data, cfg.data, log=lambda m: None)
    res = Trainer(cfg, ds, tmp_path / "run", log=lambda m: None).fit()
    assert res["test"]["serving_ctr_auc"] > 0.75 and res["test"]["serving_ctr_gauc"] > 0.75
    assert res["best_epoch"] == 0 and res["n_parameters"] == 0
    assert res["fitted"]["trees"] > 0
    top = next(iter(res["fitted"]["top_features_by_gain"]))
    assert "quality" in top  # the planted feature (or its rank in the request) carries the most gain


def string_ids_no_positions(src: Path, dst: Path) -> Path:
    """The odd log with string user/item ids and no position column."""
    dst.mkdir(parents=True)
    req = pd.read_parquet(src / "requests.parquet")
    imp = pd.read_parquet(src / "impressions.parquet").drop(columns=["position"])
    beh = pd.read_parquet(src / "behaviors.parquet")
    for t in (req, beh):
        t["user_id"] = "u" + t["user_id"].astype(str)
    for t in (imp, beh):
        t["item_id"] = "item-" + t["item_id"].astype(str)
    req.to_parquet(dst / "requests.parquet", index=False)
    imp.to_parquet(dst / "impressions.parquet", index=False)
    beh.to_parquet(dst / "behaviors.parquet", index=False)
    return dst


@pytest.mark.parametrize("variant", ["int_ids", "string_ids_no_positions"])
def test_gbdt_features_on_odd_logs(odd_log, tmp_path, variant):  # noqa: F811
    data = odd_log if variant == "int_ids" else string_ids_no_positions(odd_log, tmp_path / "str")
    model, ds = fitted("gbdt", data)
    feats = model.features
    assert len(set(feats.names)) == len(feats.names)
    assert not ds.fmap.has_category and "items.parquet" not in {p.name for p in data.iterdir()}
    b = ds.make_batch(ds.requests_of("test"))
    x = feats(b, model.emb.item_sparse, model.emb.item_dense).numpy()
    assert x.shape == (len(b.click), len(feats.names))
    cat = np.zeros(x.shape[1], dtype=bool)
    cat[feats.categorical] = True
    assert np.isfinite(x[:, ~cat]).all()                     # only categoricals may be missing (NaN)
    assert (np.nan_to_num(x[:, cat], nan=0) >= 0).all()
    # empty / null queries cover nothing; history counts are counts
    empty = (b.query[b.cand_req] == 0).all(-1).numpy()
    assert empty.any() and (x[empty, feats.names.index("text_overlap")] == 0).all()
    hist_cols = [i for i, n in enumerate(feats.names) if n.startswith("history_")]
    assert (x[:, hist_cols] >= 0).all()
    assert x[:, feats.names.index("history_any.item")].sum() > 0  # some users met the candidate before
    with torch.inference_mode():
        s = model(b).ctr_logit
    assert torch.isfinite(s).all() and len(s) == len(b.click)


def test_group_rank():
    from qdrank.models.layers import group_rank

    v = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 4.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    r = group_rank(v, g)
    torch.testing.assert_close(r, torch.tensor([1.0, 0.0, 1 / 3, 1 / 3, 0.0, 0.0, 0.0]))
    # the pairwise form an export records gives the same values, on other inputs than it was traced with
    traced = torch.jit.trace(group_rank, (v, g), check_trace=False)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 9, 300):
        vals = torch.randint(0, 6, (n,), generator=gen).float()  # many ties
        grp = torch.sort(torch.randint(0, 7, (n,), generator=gen)).values
        assert torch.equal(traced(vals, grp), group_rank(vals, grp))


@pytest.mark.parametrize("k", [0, 1, 2, 7, 64, 1000])
def test_sorted_lookup_is_searchsorted(k):
    """The exportable binary search finds what ``torch.searchsorted`` finds, present or not."""
    from qdrank.models.baselines.common import sorted_lookup

    g = torch.Generator().manual_seed(k)
    keys = torch.unique(torch.randint(0, 3 * k + 1, (k,), generator=g))
    x = torch.randint(-2, 3 * k + 3, (50, 3), generator=g)
    at, found = sorted_lookup(keys, x)
    assert found.shape == x.shape
    if keys.numel() == 0:
        assert not found.any()
        return
    ref = torch.searchsorted(keys, x).clamp_max(keys.numel() - 1)
    assert torch.equal(at, ref)
    assert torch.equal(found, keys[ref] == x)
    assert found.any() and not found.all()


def _synthetic_booster(params: dict, seed: int = 0):
    """A LightGBM booster on numeric features with NaN and zeros, and a categorical feature with
    NaN, negative and fractional values; -> (booster, probe matrix with unseen values)."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    n = 3000
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[rng.random(n) < 0.15, 0] = np.nan                        # a numeric feature with missing values
    x[rng.random(n) < 0.3, 1] = 0.0                             # many exact zeros (zero_as_missing)
    x[:, 3] = rng.integers(0, 12, n)                            # a categorical feature
    x[rng.random(n) < 0.1, 3] = np.nan
    y = (np.nan_to_num(x[:, 0], nan=1.0) + x[:, 1] + np.isin(x[:, 3], [2, 5, 7]) + 0.5 * x[:, 2]
         + rng.normal(scale=0.5, size=n) > 0.8).astype(np.float32)
    ds = lgb.Dataset(x, y, categorical_feature=[3], free_raw_data=False)
    booster = lgb.train({"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 5, "min_data_per_group": 5,
                         "cat_smooth": 1.0, "max_cat_to_onehot": 2, "verbose": -1, "seed": seed, **params}, ds, 40)
    probe = rng.normal(size=(2000, 4)).astype(np.float32)
    probe[rng.random(2000) < 0.2, 0] = np.nan
    probe[rng.random(2000) < 0.2, 1] = 0.0
    probe[rng.random(2000) < 0.1, 1] = np.nan
    probe[rng.random(2000) < 0.05, 2] = np.inf
    probe[:, 3] = rng.integers(-2, 15, 2000)                    # negative and unseen categories
    probe[rng.random(2000) < 0.1, 3] = np.nan
    probe[rng.random(2000) < 0.1, 3] += 0.5                     # fractional: truncated like LightGBM does
    probe[:200] = x[:200]                                       # training rows: thresholds' own neighbourhood
    return booster, probe


@pytest.mark.parametrize("params, missing_type", [({}, "NaN"), ({"zero_as_missing": True}, "Zero"),
                                                   ({"use_missing": False}, "None")])
def test_tree_ensemble_matches_lightgbm(params, missing_type):
    """The torch evaluation of a booster equals ``booster.predict(raw_score=True)`` (numeric splits with
    each missing type, categorical splits, NaN, zeros, inf, negative / unseen / fractional categories)."""
    from qdrank.models.baselines.trees import TreeEnsemble

    booster, probe = _synthetic_booster(params)
    dump = booster.dump_model()
    nodes = []

    def walk(n):
        if "split_feature" in n:
            nodes.append((n["decision_type"], n["missing_type"], n["default_left"]))
            walk(n["left_child"])
            walk(n["right_child"])

    for t in dump["tree_info"]:
        walk(t["tree_structure"])
    kinds = {k for k, _, _ in nodes}
    assert kinds == {"<=", "=="}, kinds  # both decision types are exercised
    assert missing_type in {m for k, m, _ in nodes if k == "<="}
    trees = TreeEnsemble().load(dump)
    ref = booster.predict(probe, raw_score=True)
    got = trees(torch.from_numpy(probe)).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5
    assert np.std(ref) > 0.1  # the probe reaches different leaves


def test_tree_thresholds_round_down_exactly():
    """x <= t (float64 threshold) and x <= the stored float32 threshold agree for float32 x around t."""
    from qdrank.models.baselines.trees import round_down_float32

    t = np.array([0.1, -0.1, 1 / 3, 1e300, -1e300, 0.0, 2.5, 1e-40], dtype=np.float64)
    r = round_down_float32(t)
    for ti, ri in zip(t, r):
        base = np.float32(ti) if np.isfinite(np.float32(ti)) else np.float32(np.sign(ti) * 3e38)
        xs = [base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(-np.inf)),
              np.float32(np.inf), np.float32(-np.inf)]
        for x in xs:
            assert (np.float64(x) <= ti) == (x <= ri), (ti, x)


def test_gbdt_scores_with_the_tree_tensors_as_lightgbm_does(tiny_data):
    """The fitted gbdt's torch scores (used by evaluation, serving and export) equal its booster's raw scores."""
    model, ds = fitted("gbdt", tiny_data)
    assert model.trees.n_trees == model.booster.num_trees() > 1
    b = ds.make_batch(ds.requests_of("test"))
    x = model.features(b, model.emb.item_sparse, model.emb.item_dense)
    ref = model.booster.predict(x.numpy(), raw_score=True)
    with torch.inference_mode():
        got = model(b).ctr_logit.numpy()               # eager: LightGBM's predict (the fast path)
        model.booster_fast_path = False
        walked = model(b).ctr_logit.numpy()            # the tensor walk that traced/exported graphs use
        model.booster_fast_path = True
    assert np.abs(got - ref).max() < 1e-5 and np.abs(walked - ref).max() < 1e-5 and np.std(ref) > 0
    # missing categoricals (NaN), unseen category values and zeroed numerics reach the same leaves too
    x = x.clone()
    x[::3, model.features.categorical] = float("nan")
    x[1::5, model.features.categorical] = 10_000.0
    x[2::7, len(model.features.categorical):] = 0.0
    ref = model.booster.predict(x.numpy(), raw_score=True)
    assert np.abs(model.trees(x).numpy() - ref).max() < 1e-5


@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory, tiny_data) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("baseline_runs")
    runs = {}
    for name in BASELINES:
        cfg = tiny_config(name, *FAST.get(name, ()))
        ds = SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)
        Trainer(cfg, ds, base / name, log=lambda m: None).fit()
        runs[name] = base / name
    return runs


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_checkpoint_reloads_and_scores_identically(baseline_runs, tiny_data, name):
    run = baseline_runs[name]
    assert not list(run.glob("*.pt")) and not list(run.glob("*.pkl"))
    model, cfg, fmap = load_model(run)
    assert model.n_parameters() == 0
    ds = SearchLogDataset(tiny_data, cfg.data, fmap=fmap, log=lambda m: None)
    fresh = build_model(cfg, ds)
    fresh.fit_data(ds)
    fresh.eval()
    rows = ds.requests_of("test")
    b = ds.make_batch(rows)
    with torch.inference_mode():
        a, c = model(b).ctr_logit, fresh(b).ctr_logit
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    assert a.std() > 0  # not a constant ranker on logged requests


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "logged_order"])
def test_baseline_served_equals_evaluation(baseline_runs, tiny_data, tmp_path_factory, name):
    ranker = Ranker.load(baseline_runs[name], store=build_store(tmp_path_factory.getbasetemp(), tiny_data))
    ds = SearchLogDataset(tiny_data, ranker.cfg.data, fmap=ranker.fmap, log=lambda m: None)
    pred = predict(ranker.model, ds, "test", 4096)  # candidates in logged order
    order = pd.read_parquet(tiny_data / "requests.parquet").sort_values("request_id")["request_id"].to_numpy()
    checked = 0
    for row in (920, 950, 990):
        ds_row = int(np.flatnonzero(ds.request_id == order[row])[0])
        if ds.split[ds_row] != 2:
            continue
        enc = ranker.encode(request_body(tiny_data, row))
        served, _ = ranker.logits(enc.batch)
        ref = pred["serving_ctr"][pred["group"] == order[row]]
        np.testing.assert_allclose(served.numpy(), ref, rtol=0, atol=1e-5)
        checked += 1
    assert checked == 3


def test_logged_order_serves_ties(baseline_runs, tiny_data):
    """A live request has no position: logged_order cannot rank it (as-shown family only)."""
    ranker = Ranker.load(baseline_runs["logged_order"])
    served, _ = ranker.logits(ranker.encode(request_body(tiny_data, 950)).batch)
    assert (served == served[0]).all()


def test_gbdt_follows_the_runs_seed(tmp_path):
    """A benchmark's seeds are seeds for gbdt too (out-of-fold assignment, feature sampling): the same
    train.seed refits the same booster, another one a different booster."""
    data = planted_log(tmp_path / "log")
    cfg = tiny_config("gbdt", *FAST["gbdt"], "model.feature_fraction=0.5")
    ds = SearchLogDataset(data, cfg.data, log=lambda m: None)
    texts = []
    for seed in (0, 0, 1):
        model = build_model(cfg, ds)
        model.fit_data(ds, seed=seed)
        texts.append(bytes(model.booster_model.numpy()))
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_gbdt_out_of_fold_counts_leave_their_fold_out(tiny_dataset):
    """Fold k's click statistics, ``total - counts of fold k``, are the counts of the other folds'
    requests alone; folds are a hash of the request id and the seed, and every fold is used."""
    from qdrank.models.baselines.gbdt import request_folds
    from qdrank.models.baselines.gbdt_features import LabelCounts

    _, ds = tiny_dataset
    model = build_model(tiny_config("gbdt"), ds)
    k, seed = 3, 7
    batches = [b for b, _ in model.batches(ds, "train", batch_size=500)]
    assert len(batches) > 1

    def counts(keep_fold):
        return LabelCounts.sum([model.features.label_counts(
            select_requests(b, keep_fold(request_folds(b.request_id, seed, k))), model.emb.item_sparse)
            for b in batches])

    total = counts(lambda f: torch.ones_like(f, dtype=torch.bool))
    assert total.clicks.sum() == sum(float(b.click.sum()) for b in batches)
    for i in range(k):
        left_out = LabelCounts.sum([total, counts(lambda f, i=i: f == i)], [1.0, -1.0])
        others = counts(lambda f, i=i: f != i)
        assert others.clicks.sum() > 0 and others.clicks.sum() < total.clicks.sum()
        np.testing.assert_array_equal(left_out.clicks, others.clicks)
        np.testing.assert_array_equal(left_out.shown, others.shown)
        a, o = left_out.affinity, others.affinity
        assert torch.equal(a.keys, o.keys) and torch.equal(a.pairs, o.pairs)
        assert torch.equal(a.tokens, o.tokens) and torch.equal(a.categories, o.categories)
    ids = torch.arange(10_000)
    assert torch.equal(request_folds(ids, seed, k), request_folds(ids, seed, k))
    assert not torch.equal(request_folds(ids, seed, k), request_folds(ids, seed + 1, k))
    assert torch.bincount(request_folds(ids, seed, k)).min() > 3000


def test_gbdt_training_rows_do_not_depend_on_when_counts_are_merged(tiny_dataset, monkeypatch):
    """The per-batch click counts are merged as they stream in (flat memory on long logs); merging
    after every other batch gives the training matrix that merging once at the end gives."""
    from qdrank.models.baselines import gbdt

    _, ds = tiny_dataset
    model = build_model(tiny_config("gbdt"), ds)
    model.features.fit(ds, model.batches(ds, "train"))
    monkeypatch.setattr(model.cfg, "folds", 3)
    full = model.batches
    monkeypatch.setattr(model, "batches", lambda d, split, rows=None, batch_size=0: full(d, split, rows, 200))
    assert sum(1 for _ in model.batches(ds, "train")) > 6  # several merges per fold
    out = {}
    for every in (2, 10**9):
        monkeypatch.setattr(gbdt, "COUNT_MERGE_EVERY", every)
        out[every] = model._train_matrix(ds, seed=3)
    for a, b in zip(out[2], out[10**9]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert np.isfinite(out[2][0]).any() and out[2][0].shape[0] == len(out[2][1])


def test_select_requests_is_the_batch_of_those_requests(tiny_dataset):
    _, ds = tiny_dataset
    rows = ds.requests_of("train")[:40]
    keep = torch.zeros(len(rows), dtype=torch.bool)
    keep[::3] = True
    keep[7] = True
    got = select_requests(ds.make_batch(rows), keep)
    want = ds.make_batch(rows[keep.numpy()])
    for f in TENSOR_FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f
