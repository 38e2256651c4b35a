"""The evaluation protocol: the serving family is what a live request gets, the as-shown family
adds the logged position, the counterfactual oracle, the LR schedule and embedding L2."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from test_serving import build_run, build_store, request_body

from qdrank.config import ConfigError, build_config
from qdrank.data.dataset import SearchLogDataset
from qdrank.evaluation.evaluate import evaluate, metrics_from_predictions, predict, selection_metric
from qdrank.evaluation.metrics import compute_all, sigmoid
from qdrank.models.base import RankModel
from qdrank.serving.ranker import Ranker
from qdrank.training.trainer import Trainer, add_embedding_l2, embedding_parameters, lr_factor


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data):
    base = tmp_path_factory.getbasetemp()
    ranker = Ranker.load(build_run(base, tiny_data), store=build_store(base, tiny_data))
    ds = SearchLogDataset(tiny_data, ranker.cfg.data, fmap=ranker.fmap, log=lambda m: None)
    return ranker, ds


def test_serving_family_scores_equal_ranker_rank(served, tiny_data):
    """For logged test requests, the serving family's scores are the CTRs `Ranker.rank` returns, and
    the serving metrics over those requests are the metrics of the Ranker's scores."""
    ranker, ds = served
    pred = predict(ranker.model, ds, "test", 4096)
    order = pd.read_parquet(tiny_data / "requests.parquet").sort_values("request_id")["request_id"].to_numpy()
    test_ids = set(ds.request_id[ds.requests_of("test")].tolist())
    rows = [r for r in range(len(order)) if int(order[r]) in test_ids][:6]
    assert len(rows) == 6
    y, s_rank, s_eval, s_shown, groups = [], [], [], [], []
    for r in rows:
        ds_row = int(np.flatnonzero(ds.request_id == order[r])[0])
        idx = np.arange(ds.imp_start[ds_row], ds.imp_end[ds_row])
        body = request_body(tiny_data, r)  # candidates in the log's order, as the dataset keeps them
        resp = ranker.rank(body)
        body_items = [c["item_id"] for c in body["candidates"]]
        assert len(set(body_items)) == len(body_items) == len(idx)
        assert torch.equal(ranker.encode(body).batch.cand_item, ds.make_batch(np.array([ds_row])).cand_item)
        by_item = {c.item_id: c.ctr for c in resp.candidates}
        k = np.flatnonzero(pred["group"] == order[r])  # this request's impressions, in logged order
        assert len(k) == len(idx)
        served_ctr = np.array([by_item[i] for i in body_items])
        np.testing.assert_allclose(sigmoid(pred["serving_ctr"][k]), served_ctr, rtol=1e-5, atol=1e-7)
        y.append(ds.click[idx])
        s_rank.append(np.log(served_ctr) - np.log1p(-served_ctr))
        s_eval.append(pred["serving_ctr"][k])
        s_shown.append(pred["as_shown_ctr"][k])
        groups.append(np.full(len(idx), ds_row))
    y, groups = np.concatenate(y), np.concatenate(groups)
    # the position tower moved the as-shown scores away from the served ones
    assert np.abs(np.concatenate(s_shown) - np.concatenate(s_eval)).max() > 1e-4
    a, b = compute_all(y, np.concatenate(s_rank), groups), compute_all(y, np.concatenate(s_eval), groups)
    assert a["gauc"] == pytest.approx(b["gauc"], abs=1e-9, nan_ok=True)


def test_evaluate_reports_both_families_oracle_and_true_rel(served):
    ranker, ds = served
    m = evaluate(ranker.model, ds, "test", 4096)
    for fam in ("serving", "as_shown"):
        assert 0 < m[f"{fam}_ctr_gauc"] < 1 and 0 < m[f"{fam}_ctr_auc"] < 1
        assert m[f"oracle_{fam}_ctr_gauc"] > 0.6
    assert m["serving_cvr_auc"] == m["as_shown_cvr_auc"]  # the CVR score has no position input
    assert m["serving_ctr_auc"] != m["as_shown_ctr_auc"]
    assert 0 < m["serving_rel_gauc"] < 1 and 0 < m["serving_rel_ndcg10"] <= 1
    # the as-shown oracle (true_ctr includes the position factor) explains the log better
    assert m["oracle_as_shown_ctr_auc"] > m["oracle_serving_ctr_auc"]
    assert selection_metric(m) == m["serving_ctr_gauc"]
    # the one-process path from raw predictions gives the same figures
    pred = predict(ranker.model, ds, "test", 4096)
    m2 = metrics_from_predictions(ds, pred)
    assert set(m2) == set(m)
    for k in m:
        assert m2[k] == pytest.approx(m[k], abs=1e-6, nan_ok=True), k


class _ByLoggedPosition(RankModel):
    """Scores by the logged position (the shape of the ``logged_order`` baseline)."""

    uses_logged_position = True

    def encode_request(self, batch):
        return {}

    def score(self, state, batch):
        return -batch.position.float(), torch.zeros(len(batch.position))


def test_model_reading_logged_position_is_as_shown_only(tiny_dataset):
    cfg, ds = tiny_dataset
    model = _ByLoggedPosition(ds.fmap, cfg.model)
    m = evaluate(model, ds, "test", 4096)
    assert not any(k.startswith("serving_") for k in m)
    assert m["as_shown_ctr_gauc"] > 0.55  # position predicts clicks on the simulated log
    assert "oracle_serving_ctr_gauc" in m  # the oracle is still shown in both families
    assert selection_metric(m) == m["as_shown_ctr_gauc"]


def test_lr_schedule():
    t = build_config("dnn", overrides=["train.max_epochs=4", "train.lr_warmup_epochs=0.5",
                                       "train.lr_min_ratio=0.1"]).train
    n = 10  # steps per epoch: warm-up 5 steps, then cosine to 0.1 at step 40
    f = [lr_factor(t, s, n) for s in range(4 * n)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[5:], f[6:]))
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 34 / 35)))
    t_lin = build_config("dnn", overrides=["train.lr_schedule=linear", "train.lr_warmup_epochs=0"]).train
    assert lr_factor(t_lin, 0, 10) == 1.0 and lr_factor(t_lin, 50, 10) == pytest.approx(1 - 0.95 * 0.5)
    t_c = build_config("dnn", overrides=["train.lr_schedule=constant", "train.lr_warmup_epochs=0"]).train
    assert {lr_factor(t_c, s, 10) for s in range(100)} == {1.0}
    with pytest.raises(ConfigError, match="lr_schedule"):
        build_config("dnn", overrides=["train.lr_schedule=steps"])


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_l2_only_on_looked_up_rows(sparse):
    emb = torch.nn.Embedding(6, 3, sparse=sparse)
    ids = torch.tensor([1, 4, 4])
    emb(ids).sum().backward()
    before = emb.weight.grad.to_dense().clone()
    add_embedding_l2([emb.weight], 0.5)
    after = emb.weight.grad.to_dense()
    w = emb.weight.detach()
    for r in range(6):
        expected = before[r] + (0.5 * w[r] if r in (1, 4) else 0.0)
        assert torch.allclose(after[r], expected), r


def test_trainer_with_embedding_l2_and_schedule(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    cfg = tiny_config("dnn", "train.max_epochs=1", "train.emb_l2=0.01", "train.lr_schedule=linear")
    tr = Trainer(cfg, ds, tmp_path / "r", log=lambda m: None)
    assert len(embedding_parameters(tr.model)) >= 2 and tr.step.emb_params
    res = tr.fit()
    assert res["best_epoch"] == 0 and res["epochs_run"] == 1 and res["converged"] is False
    assert tr.optimizer.param_groups[0]["lr"] < cfg.train.lr  # decayed within the epoch
