"""The synthetic source: contract, determinism, chunking, ground truth and that the signal is real."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from qdrank.data.schema import ORACLE_COLUMNS, SPEC, validate_dataset
from qdrank.data.sources.synthetic import SCALES, T0, prepare

TABLES = ("requests", "impressions", "behaviors", "items", "users")
TINY = SCALES["tiny"]


def _read(path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(path / f"{t}.parquet") for t in TABLES}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "tiny"
    report = prepare(out=out, scale="tiny", seed=0)
    return out, report, _read(out)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """Enough data for AUC comparisons to be far outside sampling noise (~100k impressions)."""
    out = tmp_path_factory.mktemp("syn") / "sig"
    prepare(out=out, seed=1, n_users=1000, n_items=2000, n_categories=20, n_requests=5000,
            candidates_per_request=20, history_per_user=50)
    return _read(out)


def test_tiny_validates_and_counts(tiny):
    out, report, t = tiny
    assert validate_dataset(out) == report
    assert report.n_requests == len(t["requests"]) == TINY["n_requests"]
    assert report.n_impressions == len(t["impressions"]) == TINY["n_requests"] * TINY["candidates_per_request"]
    assert report.n_behaviors == len(t["behaviors"])
    assert len(t["items"]) == TINY["n_items"] and len(t["users"]) == TINY["n_users"]
    assert t["items"]["category"].nunique() == TINY["n_categories"]
    imp = t["impressions"]
    assert (imp.groupby("request_id").size() == TINY["candidates_per_request"]).all()
    assert not imp.duplicated(["request_id", "item_id"]).any()
    assert (imp.groupby("request_id")["position"].apply(lambda p: sorted(p) == list(range(len(p))))).all()
    assert set(t["behaviors"]["action"]) == {"impression", "click", "cart", "purchase"}
    assert t["requests"]["device"].isin(["mobile", "desktop", "app"]).all()
    assert ((t["requests"]["timestamp"] % 86400) // 3600 == t["requests"]["hour"]).all()
    assert t["requests"]["user_id"].isin(t["users"]["user_id"]).all()
    assert imp["item_id"].isin(t["items"]["item_id"]).all()
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert {"age_group", "gender", "city_tier", "device", "hour"} <= set(spec["gate"])
    assert all(spec["features"][c]["type"] == "ignore" for c in ORACLE_COLUMNS)
    assert not list(out.parent.glob(".tiny.tmp-*"))  # atomic: no temp dir left behind


def test_same_seed_identical_different_seed_differs(tiny, tmp_path):
    _, _, a = tiny
    prepare(out=tmp_path / "again", scale="tiny", seed=0)
    b = _read(tmp_path / "again")
    for name in TABLES:
        pd.testing.assert_frame_equal(a[name], b[name])
    prepare(out=tmp_path / "other", scale="tiny", seed=1)
    c = _read(tmp_path / "other")
    assert not a["impressions"].equals(c["impressions"])
    assert not a["behaviors"].equals(c["behaviors"])


def test_chunking_does_not_change_data(tiny, tmp_path):
    _, _, a = tiny
    report = prepare(out=tmp_path / "chunked", scale="tiny", seed=0, chunk_requests=7)
    assert report.n_impressions == len(a["impressions"])
    b = _read(tmp_path / "chunked")
    for name in TABLES:
        pd.testing.assert_frame_equal(a[name], b[name])


def test_scale_preset_and_explicit_override(tmp_path):
    r = prepare(out=tmp_path / "d", scale="tiny", n_requests=300)
    assert r.n_requests == 300 and r.n_impressions == 300 * TINY["candidates_per_request"]
    with pytest.raises(ValueError):
        prepare(out=tmp_path / "e", scale="huge")
    with pytest.raises(ValueError):
        prepare(out=tmp_path / "e", n_items=10, n_categories=5, candidates_per_request=10)
    assert not (tmp_path / "e").exists()


def test_ground_truth_consistent(tiny):
    _, _, t = tiny
    imp, req, beh = t["impressions"], t["requests"], t["behaviors"]
    assert (imp["purchase"] <= imp["click"]).all()
    assert imp["true_ctr"].between(0, 1).all() and imp["true_cvr"].between(0, 1).all()
    # click ~ Bernoulli(true_ctr): the mean agrees within 4 standard errors
    p = imp["true_ctr"].to_numpy()
    se = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(imp["click"].mean() - p.mean()) < 4 * se
    clicked = imp[imp["click"] == 1]
    q = clicked["true_cvr"].to_numpy()
    assert abs(clicked["purchase"].mean() - q.mean()) < 4 * np.sqrt((q * (1 - q)).sum()) / len(q) + 1e-9
    assert 0.03 < imp["click"].mean() < 0.25
    # history strictly before every request; each request's own outcomes logged at its own timestamp
    assert req["timestamp"].min() >= T0
    first_req = req.groupby("user_id")["timestamp"].min()
    hist = beh[beh["timestamp"] < T0]
    last_hist = hist.groupby("user_id")["timestamp"].max()
    assert (last_hist.reindex(first_req.index) < first_req).all()
    assert hist["user_id"].nunique() == TINY["n_users"]
    own = imp.merge(req, on="request_id")
    for action, col in (("click", "click"), ("purchase", "purchase")):
        pos = own[own[col] == 1][["user_id", "item_id", "timestamp", "query"]]
        logged = beh[beh["action"] == action].merge(pos, on=["user_id", "item_id", "timestamp", "query"])
        assert len(logged.drop_duplicates()) == len(pos.drop_duplicates()) > 0
    assert len(beh[beh["timestamp"] >= T0]) >= imp["click"].sum() + imp["purchase"].sum()


def test_signal_is_real(medium):
    t = medium
    imp, req, beh, items = t["impressions"], t["requests"], t["behaviors"], t["items"]
    y = imp["click"].to_numpy()
    oracle = roc_auc_score(y, imp["true_ctr"])
    assert 0.65 < oracle < 0.95

    # query intent category: the query's words are the category name or words of item titles
    word_cat: dict[str, str] = {}
    for title, cat in zip(items["title"], items["category"]):
        for w in title.split()[1:]:
            word_cat[w] = cat
    qcat = req["query"].map(lambda q: next((word_cat[w] for w in q.split() if w in word_cat), None))
    assert qcat.notna().all()
    df = imp.merge(req.assign(qcat=qcat), on="request_id").merge(items, on="item_id")
    match = (df["category"] == df["qcat"]).to_numpy(float)
    auc_query = roc_auc_score(df["click"], match)
    assert auc_query > 0.55

    # the user's preferred price level, estimated from PAST purchases only (any category)
    past = beh[(beh["action"] == "purchase") & (beh["timestamp"] < T0)].merge(items, on="item_id")
    pref = past.groupby("user_id")["price_level"].mean()
    est = df["user_id"].map(pref).fillna(items["price_level"].mean()).to_numpy()
    price_match = -np.abs(df["price_level"].to_numpy() - est)
    auc_both = roc_auc_score(df["click"], match + 0.5 * price_match)
    assert auc_both > auc_query + 0.02
    # and both stay below the oracle ceiling
    assert auc_both < oracle


def test_session_mode_writes_sessions_with_moods(tmp_path):
    """The `sessions` option: bursts of behaviours, each request preceded by its own session."""
    import pandas as pd

    from qdrank.data.sources import synthetic

    small = dict(n_users=40, n_items=400, n_categories=8, n_requests=300, candidates_per_request=10,
                 history_per_user=64, seed=3)
    synthetic.prepare(None, tmp_path / "s", session_drift=0.6, session_behaviors=4, **small)
    synthetic.prepare(None, tmp_path / "p", **small)
    req = pd.read_parquet(tmp_path / "s" / "requests.parquet")
    beh = pd.read_parquet(tmp_path / "s" / "behaviors.parquet").sort_values(["user_id", "timestamp"])
    # every request has behaviours of its own user 1-20 minutes before it
    for r in req.sample(40, random_state=0).itertuples():
        mine = beh[(beh.user_id == r.user_id) & (beh.timestamp < r.timestamp) & (beh.timestamp >= r.timestamp - 1200)]
        assert len(mine) >= 1
    # pre-request history comes in sessions: most consecutive gaps are within a session (< 30 min)
    hist = beh[beh.timestamp < synthetic.T0]
    gaps = hist.groupby("user_id")["timestamp"].diff().dropna()
    assert (gaps < 1800).mean() > 0.8 and (gaps > 1800).any()
    # moods change the ground truth: same seed, same sizes, other click probabilities
    imp_s = pd.read_parquet(tmp_path / "s" / "impressions.parquet")
    imp_p = pd.read_parquet(tmp_path / "p" / "impressions.parquet")
    assert len(imp_s) == len(imp_p) and not imp_s["true_ctr"].equals(imp_p["true_ctr"])
    # the true session of every behaviour: history sessions are blocks of SESSION_LEN consecutive
    # behaviours of a user; a request's own session holds its prefix and its outcomes
    assert beh["session"].notna().all() and "session" not in pd.read_parquet(tmp_path / "p" / "behaviors.parquet")
    h = beh[beh.session.str.startswith("h")]
    assert h.groupby(["user_id", "session"]).size().max() == synthetic.SESSION_LEN
    assert (h.groupby(["user_id", "session"])["timestamp"].agg(lambda t: t.max() - t.min()) < 1800).all()
    r = beh[beh.session.str.startswith("r")]
    rid = r.session.str[1:].astype(int)
    when = req.set_index("request_id").loc[rid]
    assert (when["user_id"].to_numpy() == r["user_id"].to_numpy()).all()
    assert ((when["timestamp"].to_numpy() - r["timestamp"].to_numpy()) <= 1200).all()
    assert r.session.nunique() == len(req)  # every request has its own session
    with pytest.raises(ValueError, match="session_drift"):
        synthetic.prepare(None, tmp_path / "x", session_drift=1.5, **small)


def test_true_rel_is_true_ctr_without_the_position_factor(tiny):
    """true_rel (the counterfactual oracle) = true_ctr * (1 + kappa_device * position), recomputed from
    the generator's click formula; equal to true_ctr at the top position."""
    from qdrank.data.sources.synthetic import _KAPPA, DEVICES

    assert "true_rel" in ORACLE_COLUMNS
    _, _, t = tiny
    imp = t["impressions"].merge(t["requests"][["request_id", "device"]], on="request_id")
    kappa = _KAPPA[imp["device"].map({d: i for i, d in enumerate(DEVICES)}).to_numpy()]
    rel = imp["true_ctr"].to_numpy() * (1.0 + kappa * imp["position"].to_numpy())
    np.testing.assert_allclose(imp["true_rel"].to_numpy(), rel, rtol=1e-12)
    top = imp["position"].to_numpy() == 0
    np.testing.assert_array_equal(imp["true_rel"].to_numpy()[top], imp["true_ctr"].to_numpy()[top])
    assert (imp["true_rel"] >= imp["true_ctr"]).all() and imp["true_rel"].between(0, 1).all()
    spec = yaml.safe_load((tiny[0] / SPEC).read_text())
    assert spec["features"]["true_rel"] == {"type": "ignore"}


def test_category_taste_sets_the_price_level_per_category(tiny, tmp_path):
    """``category_taste=1``: the preferred price level of an item's category is the user's level for
    that category; the other draws of the data (requests, shown items, positions) are unchanged."""
    from qdrank.data.sources.synthetic import _G_DEV, _World

    w = _World(0, 50, 400, 8, 10)
    w.set_category_taste(1.0, seed=0)
    users, items = np.full(400, 3), np.arange(400)
    device, hour, disc = np.zeros(400, np.int64), np.full(400, 12), np.zeros(400)
    qidx = np.zeros(400, np.int64)
    z1, _ = w.logits(np.random.default_rng(1), users, items, qidx, device, hour, disc)
    old = w.category_level[3].copy()
    w.category_level[3] = (old % 5) + 1                     # another level for every category
    z2, _ = w.logits(np.random.default_rng(1), users, items, qidx, device, hour, disc)
    lv, cat = w.level[items], w.cat[items]
    want = -0.7 * w.gamma[3] * _G_DEV[0] * (np.abs(lv - w.category_level[3][cat]) - np.abs(lv - old[cat]))
    np.testing.assert_allclose(z2 - z1, want, atol=1e-9)

    _, _, base = tiny
    prepare(out=tmp_path / "c", scale="tiny", seed=0, category_taste=1.0)
    t = _read(tmp_path / "c")
    pd.testing.assert_frame_equal(t["requests"], base["requests"])
    for col in ("request_id", "item_id", "position"):
        assert t["impressions"][col].equals(base["impressions"][col])
    assert not t["impressions"]["true_rel"].equals(base["impressions"]["true_rel"])
    with pytest.raises(ValueError, match="category_taste"):
        prepare(out=tmp_path / "x", scale="tiny", category_taste=2.0)
