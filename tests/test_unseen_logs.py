"""An odd-but-valid log, as an outside tool might write it, goes through every model end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from qdrank.data.dataset import SearchLogDataset
from qdrank.models.registry import available_models, model_class
from qdrank.training.trainer import Trainer


@pytest.fixture(scope="module")
def odd_log(tmp_path_factory):
    rng = np.random.default_rng(7)
    n_req, n_users, n_items = 300, 40, 120
    ts = np.sort(rng.integers(1_600_000_000, 1_600_500_000, n_req))
    req = pd.DataFrame({
        "request_id": np.arange(1000, 1000 + n_req, dtype=np.int64),
        "user_id": rng.integers(0, n_users, n_req).astype(np.int64),
        "timestamp": ts.astype(np.int64),
        "query": [None if i % 7 == 0 else ("Größe " + str(i % 5) + " 鞋") for i in range(n_req)],
        "filters": [[f"f{i % 3}", "cheap"] if i % 4 else [] for i in range(n_req)],     # list feature
        "scene": [None if i % 9 == 0 else f"s{i % 2}" for i in range(n_req)],          # nullable category
    })
    rows = []
    for r in req.itertuples():
        if r.request_id % 25 == 0:
            continue  # a request without impressions (warned about, not trained on)
        for p in range(int(rng.integers(2, 8))):
            rows.append((r.request_id, int(rng.integers(0, n_items)), p, bool(rng.random() < 0.3)))
    imp = pd.DataFrame(rows, columns=["request_id", "item_id", "position", "click"])
    imp["position"] = imp["position"].astype("Int64")
    imp.loc[imp.index % 11 == 0, "position"] = pd.NA                # unknown positions
    imp["price"] = rng.lognormal(3, 1, len(imp))
    imp.loc[imp.index % 13 == 0, "price"] = np.nan                   # missing numeric value
    imp["purchase"] = np.where(imp["click"], (rng.random(len(imp)) < 0.3).astype(float), np.nan)
    beh = pd.DataFrame({
        "user_id": rng.integers(0, n_users - 5, 2000).astype(np.int64),  # some users never act
        "item_id": rng.integers(0, n_items + 50, 2000).astype(np.int64),  # some items never shown
        "timestamp": rng.integers(1_599_000_000, 1_600_500_000, 2000).astype(np.int64),
        "action": rng.choice(["view", "click", "buy"], 2000),
    })
    d = tmp_path_factory.mktemp("odd") / "log"
    d.mkdir()
    req.to_parquet(d / "requests.parquet", index=False)
    imp.to_parquet(d / "impressions.parquet", index=False)
    beh.to_parquet(d / "behaviors.parquet", index=False)
    return d


def test_odd_log_loads_with_inferred_types(odd_log):
    msgs = []
    ds = SearchLogDataset(odd_log, tiny_config("dnn").data, log=msgs.append)
    f = ds.fmap.features
    assert f["filters"].type == "list" and f["scene"].type == "categorical" and f["price"].type == "numeric"
    assert any("requests have no impressions" in m for m in msgs)
    assert any("inferred feature types" in m for m in msgs)
    assert ds.fmap.has_purchase and ds.fmap.has_position
    assert ds.fmap.has_category is None
    b = ds.make_batch(ds.requests_of("train"))
    assert np.isfinite(b.cand_dense.numpy()).all()


@pytest.mark.parametrize("model", sorted(available_models()))
def test_every_model_trains_on_odd_log(odd_log, tmp_path, model):
    extra = ["model.gsu=soft"] if model == "sim" else []
    cfg = tiny_config(model, "train.max_epochs=1", *extra)
    ds = SearchLogDataset(odd_log, cfg.data, log=lambda m: None)
    res = Trainer(cfg, ds, tmp_path / model).fit()
    fam = "as_shown" if getattr(model_class(model), "uses_logged_position", False) else "serving"
    assert 0.0 <= res["test"][f"{fam}_ctr_auc"] <= 1.0
    assert np.isfinite(res["test"][f"{fam}_ctr_logloss"])
