"""Serving fast paths (#12) compute the scores of the reference forms, for every registered model.

The inference-only rewrites (``inference_fast`` switches: history matches counted once per
request, per-request scaled columns folded into the head's first layer) must give the logits of the
reference forms (|diff| < 1e-5) on single requests and on micro-batches of uneven requests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_cross import reference_history_match
from test_serving import request_body

from qdrank.data.dataset import SearchLogDataset
from qdrank.models.layers import CrossFeatures, Scaled, folded_linear, materialize
from qdrank.models.registry import available_models, model_class
from qdrank.serving.ranker import Ranker, ServingConfig, concat_batches


def switches(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inference_fast", None), bool)]


def set_fast(model: torch.nn.Module, on: bool) -> None:
    for m in switches(model):
        m.inference_fast = on


@pytest.fixture(scope="module")
def ds(tiny_data):
    return SearchLogDataset(tiny_data, tiny_config("din").data, log=lambda m: None)


def _requests(fmap, tiny_data) -> list[dict]:
    """Requests with no, short and long inline histories; histories repeat some candidates' items (hits)."""
    out = []
    for row, n_hist, n_extra in ((700, 0, 0), (900, 3, 2), (910, 15, 9), (650, 20, 30)):
        b = request_body(tiny_data, row, extra_items=tuple(int(x) for x in fmap.item_vocab[:n_extra]))
        ts = b["timestamp"]
        seen = [c["item_id"] for c in b["candidates"]]
        b["history"] = [{"item_id": seen[i % len(seen)] if i % 3 else int(fmap.item_vocab[i]),
                         "timestamp": ts - 100 * (i + 1), "action": "click", "query": "red shoes"}
                        for i in range(n_hist)]
        out.append(b)
    return out


@pytest.mark.parametrize("model_name", available_models())
def test_fast_inference_equals_reference_for_every_model(model_name, ds, tiny_data):
    model, cfg = _model(model_name, ds)
    if model.gradient_trained:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    model.eval()
    if getattr(model, "cross_features", None) is not None and model.gradient_trained:
        assert len(switches(model)) >= 2  # the cross block and the head both have an inference form
    ranker = Ranker(model, cfg, ds.fmap, ServingConfig.build())
    batches = [ranker.encode(b).batch for b in _requests(ds.fmap, tiny_data)]
    batches.append(concat_batches(batches))  # a micro-batch: 4 requests, uneven candidate counts
    for b in batches:
        set_fast(model, False)
        ref = ranker.logits(b)
        set_fast(model, True)
        got = ranker.logits(b)
        for x, y in zip(ref, got):
            assert x.shape == y.shape and float((x - y).abs().max()) < 1e-5, model_name


def test_history_match_per_request_equals_reference(ds, tiny_data):
    """Training batch (16 requests, uneven): per-request counting == [N, L] reference == plain Python."""
    from qdrank.models.base import RankModel

    cfg = tiny_config("din")
    model: RankModel = model_class("din")(ds.fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    rows = ds.requests_of("train")
    rows = rows[(ds.hist_end[rows] - ds.hist_start[rows]) >= 2][:16]
    b = ds.make_batch(rows)
    cf = model.cross_features
    with torch.no_grad():
        ref = cf.history_match_reference(b, model.emb.item_sparse)
        fast = cf.history_match_per_request(b, model.emb.item_sparse)
        assert torch.equal(cf.history_match(b, model.emb.item_sparse), fast)  # the inference dispatch
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, reference_history_match(model, b), atol=1e-5, rtol=1e-5)
    per = 2 + cf.n_actions  # per feature: count, recency share, count per action type
    counts = [g * per + j for g in range(fast.shape[1] // per) for j in range(per) if j != 1]
    assert torch.equal(fast[:, counts], ref[:, counts]) and fast[:, counts].max() > 0  # exact, and hits


def test_history_match_list_features_on_the_request_grid(ds):
    """A list-valued item feature (any shared value is a hit) on the per-request form == reference."""
    fmap = ds.fmap
    cf = CrossFeatures(fmap, 8)
    g = torch.Generator().manual_seed(3)
    n_items = len(fmap.item_vocab) + 2
    # synthetic item table: one single-valued feature (slot 0) and one 3-wide list feature (slots 1-3)
    item_sparse = torch.randint(1, 6, (n_items, 4), generator=g)
    item_sparse[:, 3] = 0  # lists of 2 values, padded
    item_sparse[0] = 0
    item_sparse[5, 1:] = 0  # an item with an empty list never hits
    cf.history_slots = [(0, 1), (1, 3)]
    cf.n_history = (2 + cf.n_actions) * (1 + len(cf.history_slots))
    assert cf.n_actions > 1  # per-action counts are part of what is compared
    cf.single_slots = torch.tensor([0])
    R, L = 3, 7
    hist = torch.randint(2, 12, (R, L), generator=g)
    lens = torch.tensor([7, 0, 4])
    hist[torch.arange(L)[None] >= lens[:, None]] = 0
    cand_req = torch.tensor([0, 2, 0, 1, 2, 2, 0])
    cand = torch.tensor([3, 5, 1, 4, 9, 2, 5])

    hist_sparse = torch.zeros(R, L, fmap.n_slots("behavior"), dtype=torch.long)
    hist_sparse[..., cf.action.slot] = cf.action.offset + torch.randint(0, cf.n_actions + 1, (R, L), generator=g)

    class B:  # the batch fields history_match reads
        hist_item, hist_len, cand_item = hist, lens, cand
        hist_mask = hist > 0
    B.hist_sparse = hist_sparse

    B.cand_req = cand_req
    with torch.no_grad():
        ref = cf.history_match_reference(B, item_sparse)
        fast = cf.history_match_per_request(B, item_sparse)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    per = 2 + cf.n_actions
    assert ref[:, 2 * per].max() > 0 and ref[:, 2 * per + 2:3 * per].max() > 0  # list hits, per action too


@pytest.mark.parametrize("hidden", [(), (8,)])
def test_folded_first_layer_equals_concatenated(hidden):
    """Scaled parts (c times a per-request vector) folded into the weights == materialised columns."""
    from qdrank.models.layers import TwoTaskHead

    torch.manual_seed(0)
    d = 5
    c, other = torch.randn(7, d), torch.randn(7, 3)
    s1, s2 = torch.randn(3, d), torch.randn(3, d)
    req = torch.randn(3, 4)
    parts = [Scaled(c, None), other, Scaled(c, s1), Scaled(c, s2)]
    head = TwoTaskHead(4 + 3 * d + 3, hidden, 0.0).eval()
    for cand_req in (torch.tensor([0, 0, 1, 2, 2, 2, 1]), torch.tensor([0, 0, 0, 1, 1, 2, 2])):
        x = torch.cat([req[cand_req], materialize(parts, cand_req)], -1)
        with torch.no_grad():
            ref = head(x)
            got = head.forward_split(req, parts, cand_req)
            lin = head.trunk[0] if hidden else head.ctr
            torch.testing.assert_close(folded_linear(lin, req, parts, cand_req), lin(x), atol=1e-5, rtol=1e-5)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    one = torch.zeros(7, dtype=torch.long)  # one request: broadcast, no gather
    with torch.no_grad():
        x = torch.cat([req[:1][one], materialize([Scaled(c, s1[:1]), other], one)], -1)
        lin = torch.nn.Linear(4 + d + 3, 6)
        torch.testing.assert_close(folded_linear(lin, req[:1], [Scaled(c, s1[:1]), other], one), lin(x),
                                   atol=1e-5, rtol=1e-5)


# ---- traced request encoder ------------------------------------------------------------------------
def _model(model_name: str, ds) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_config(model_name, "model.dropout=0.0",
                      *(("model.trees=40", "model.num_threads=1") if model_name == "gbdt" else ()))
    model = model_class(model_name)(ds.fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    if not model.gradient_trained:
        model.fit_data(ds)
    return model.eval(), cfg


@pytest.mark.parametrize("model_name", available_models())
def test_traced_request_encoder_scores_as_eager(model_name, ds, tiny_data):
    """``trace_encoder`` on (default) and off give the same logits, single requests and micro-batches;
    the neural models of the benchmarks do run traced."""
    model, cfg = _model(model_name, ds)
    traced = Ranker(model, cfg, ds.fmap, ServingConfig.build())
    eager = Ranker(model, cfg, ds.fmap, ServingConfig.build(trace_encoder=False))
    assert eager.traced is None and eager.trace_status == "off"
    assert traced.info()["serving"]["request_encoder"] == traced.trace_status
    if model_name in ("dnn", "din", "diffusiongs", "ifusion"):
        assert traced.trace_status == "traced" and traced.traced.batches, traced.trace_status
    batches = [traced.encode(b).batch for b in _requests(ds.fmap, tiny_data)]
    for b in [*batches, concat_batches(batches)]:
        for x, y in zip(eager.logits(b), traced.logits(b)):
            assert x.shape == y.shape and float((x - y).abs().max()) < 1e-5, model_name


def test_traced_diffusiongs_encoder_takes_the_folded_udl_form(ds, tiny_data, monkeypatch):
    """DiffusionGS's request trace records the folded UDL attention (history 20 > width 16: the range
    where it pays) and scores as the eager reference layers do."""
    from qdrank.models.diffusiongs import UserAwareDenoisingLayer

    model, cfg = _model("diffusiongs", ds)
    calls = []
    fold = UserAwareDenoisingLayer.folded_attention
    monkeypatch.setattr(UserAwareDenoisingLayer, "folded_attention",
                        lambda self, *a: calls.append(torch.jit.is_tracing()) or fold(self, *a))
    traced = Ranker(model, cfg, ds.fmap, ServingConfig.build())
    assert traced.trace_status == "traced" and any(calls), (traced.trace_status, calls)
    for layer in model.layers:
        layer.fast = False
    reference = Ranker(model, cfg, ds.fmap, ServingConfig.build(trace_encoder=False))
    for req in _requests(ds.fmap, tiny_data):
        b = traced.encode(req).batch
        for x, y in zip(reference.logits(b), traced.logits(b)):
            assert float((x - y).abs().max()) < 1e-5


def test_an_encoder_that_branches_on_the_data_is_served_eagerly(ds, tiny_data):
    """A Python branch on the history length is frozen by a trace; the probes catch it at load."""
    from qdrank.models.dnn import DNN

    class Branchy(DNN):
        def encode(self, batch):
            st = super().encode(batch)
            if int(batch.hist_len.max()) > 2:  # the trace would keep whichever branch its example took
                st["req"] = st["req"] * 2
            return st

    cfg = tiny_config("dnn")
    model = Branchy(ds.fmap, cfg.model).eval()
    model.emb.set_item_tables(*ds.item_tables())
    r = Ranker(model, cfg, ds.fmap, ServingConfig.build())
    assert r.traced is None and r.trace_status.startswith("eager (ValueError: the trace differs"), r.trace_status
    ref = Ranker(model, cfg, ds.fmap, ServingConfig.build(trace_encoder=False))
    for body in _requests(ds.fmap, tiny_data):
        b = r.encode(body).batch
        torch.testing.assert_close(r.logits(b)[0], ref.logits(b)[0], atol=0, rtol=0)


def test_store_history_columns_equal_rows(tmp_path):
    """The column read (what the encoder uses) holds what the per-behaviour dicts hold, features included."""
    from qdrank.serving.store import HistoryStore

    with HistoryStore(tmp_path / "s.sqlite") as st:
        st.append([{"user_id": 7, "item_id": i, "timestamp": 100 + i % 5, "action": "click",
                    "query": None if i % 3 == 0 else f"q{i}", **({"dwell": i} if i % 2 else {}),
                    **({"session": i // 10 if i % 4 else f"s{i // 10}"} if i % 7 else {})}
                   for i in range(40)])
        for before, limit in ((1000, 25), (103, 100), (50, 10)):
            rows = st.history(7, before, limit)
            cols = st.history_columns(7, before, limit)
            names = {k for r in rows for k in r} | {"item_id", "timestamp", "action", "query", "session"}
            assert set(cols) == names
            for k in names:
                assert cols[k] == [r.get(k) for r in rows], k
        assert st.history_columns(7, 1000, 0)["item_id"] == []
