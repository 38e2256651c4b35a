"""Serving: request encoding, ranking, history rule, store, limits, export parity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config

from qdrank.serving.ranker import Ranker, RequestEncoder, RequestError, ServingConfig, encode_request
from qdrank.serving.schemas import RankRequest
from qdrank.serving.store import HistoryStore


def build_run(base: Path, data: Path) -> Path:
    """Train a tiny DIN run once per session (shared by test_serving*.py through the temp dir)."""
    from qdrank.data.dataset import SearchLogDataset
    from qdrank.training.trainer import Trainer

    run = base / "serving_run"
    if not (run / "model.safetensors").exists():
        cfg = tiny_config("din", "train.max_epochs=1")
        ds = SearchLogDataset(data, cfg.data, log=lambda m: None)
        Trainer(cfg, ds, run, log=lambda m: None).fit()
    return run


def build_store(base: Path, data: Path) -> Path:
    f = base / "serving_store.sqlite"
    if not f.exists():
        with HistoryStore(f) as st:
            st.load_dataset(data)
    return f


def request_body(data: Path, row: int, extra_items: tuple = ()) -> dict:
    """Request ``row`` of requests.parquet (sorted by request id) as a serving request."""
    req = pd.read_parquet(data / "requests.parquet").sort_values("request_id").iloc[row]
    imp = pd.read_parquet(data / "impressions.parquet")
    imp = imp[imp["request_id"] == req["request_id"]]
    return {"user_id": int(req["user_id"]), "query": str(req["query"]), "timestamp": int(req["timestamp"]),
            "context": {"device": str(req["device"]), "hour": int(req["hour"])},
            "candidates": [{"item_id": int(i), "price": float(p), "discount": float(d)}
                           for i, p, d in zip(imp["item_id"], imp["price"], imp["discount"])]
            + [{"item_id": x} for x in extra_items]}


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tiny_data) -> Path:
    return build_run(tmp_path_factory.getbasetemp(), tiny_data)


@pytest.fixture(scope="session")
def store_file(tmp_path_factory, tiny_data) -> Path:
    return build_store(tmp_path_factory.getbasetemp(), tiny_data)


@pytest.fixture(scope="session")
def ranker(run_dir, store_file) -> Ranker:
    return Ranker.load(run_dir, store=store_file)


def scores_by_item(resp) -> dict:
    return {c.item_id: c.score for c in resp.candidates}


# ---- ranking --------------------------------------------------------------------------------------
def test_rank_returns_all_candidates_sorted(ranker, tiny_data):
    body = request_body(tiny_data, 700, extra_items=(10**9, "no-such-item"))
    resp = ranker.rank(body)
    assert sorted(map(str, (c.item_id for c in resp.candidates))) == sorted(str(c["item_id"]) for c in body["candidates"])
    s = [c.score for c in resp.candidates]
    assert s == sorted(s, reverse=True)
    assert resp.formula == "ctr_cvr" and ranker.fmap.has_purchase
    for c in resp.candidates:
        assert 0 < c.ctr < 1 and 0 < c.cvr < 1
        assert c.score == pytest.approx(c.ctr * c.cvr)
    assert resp.unknown_items == 2
    assert {c.item_id for c in resp.candidates if not c.known} == {10**9, "no-such-item"}
    assert resp.unknown_user is False and resp.history_source == "store" and resp.history_used > 0


def test_rank_is_deterministic(ranker, tiny_data):
    body = request_body(tiny_data, 650)
    a, b = ranker.rank(body), ranker.rank(RankRequest.model_validate(body))
    assert [(c.item_id, c.score) for c in a.candidates] == [(c.item_id, c.score) for c in b.candidates]


def test_unknown_user_counted(ranker, tiny_data):
    body = request_body(tiny_data, 650)
    body["user_id"] = "never-seen-user"
    resp = ranker.rank(body)
    assert resp.unknown_user is True and resp.unknown_users == 1
    assert resp.history_used == 0  # the store has no behaviours of that user


def test_serving_matches_training_batches(ranker, tiny_data):
    """The served logits of logged requests equal the model's on the training loader's batch."""
    from qdrank.data.dataset import SearchLogDataset

    ds = SearchLogDataset(tiny_data, ranker.cfg.data, fmap=ranker.fmap, log=lambda m: None)
    order = pd.read_parquet(tiny_data / "requests.parquet").sort_values("request_id")["request_id"].to_numpy()
    checked = 0
    for row in (600, 800, 950):
        rid = order[row]
        ds_row = int(np.flatnonzero(ds.request_id == rid)[0])
        enc = ranker.encode(request_body(tiny_data, row))
        b = ds.make_batch(np.array([ds_row]))
        assert int(enc.batch.hist_len[0]) == int(b.hist_len[0])
        assert torch.equal(enc.batch.hist_session, b.hist_session)  # no session column: all -1 (test_sessions.py)
        with torch.inference_mode():
            ref = ranker.model(b, use_position=False)
        ctr, cvr = ranker.logits(enc.batch)
        assert torch.equal(enc.batch.cand_item, b.cand_item)
        assert torch.allclose(ctr, ref.ctr_logit, atol=1e-5) and torch.allclose(cvr, ref.cvr_logit, atol=1e-5)
        checked += int(b.hist_len[0] > 0)
    assert checked > 0


def test_inline_history_equals_store_history(ranker, tiny_data):
    body = request_body(tiny_data, 900)
    from_store = ranker.rank(body)
    hist = ranker.store.history(body["user_id"], body["timestamp"], 10**6)
    assert len(hist) > 0
    inline = ranker.rank({**body, "history": hist})
    assert inline.history_source == "inline" and inline.history_used == from_store.history_used
    assert scores_by_item(inline) == scores_by_item(from_store)


def test_history_rule(ranker, tiny_data):
    body = request_body(tiny_data, 900)
    ts = body["timestamp"]
    hist = ranker.store.history(body["user_id"], ts, 10**6)
    base = ranker.rank({**body, "history": hist})
    item = hist[0]["item_id"]
    same_second = {"item_id": item, "timestamp": ts, "action": "purchase", "query": "x"}
    later = {"item_id": item, "timestamp": ts + 100, "action": "purchase", "query": "x"}
    r = ranker.rank({**body, "history": [*hist, same_second, later]})
    assert r.history_used == base.history_used
    assert scores_by_item(r) == scores_by_item(base)
    earlier = {"item_id": item, "timestamp": ts - 1, "action": "purchase", "query": "x"}
    r2 = ranker.rank({**body, "history": [*hist, earlier]})
    assert r2.history_used == min(base.history_used + 1, ranker.encoder.L)
    assert scores_by_item(r2) != scores_by_item(base)


def test_history_keeps_most_recent_max_history(ranker, tiny_data):
    body = request_body(tiny_data, 900)
    ts, L = body["timestamp"], ranker.encoder.L
    recent = [{"item_id": int(ranker.fmap.item_vocab[i]), "timestamp": ts - 1000 + i, "action": "click"}
              for i in range(L)]
    old_a = [{"item_id": int(ranker.fmap.item_vocab[50 + i]), "timestamp": ts - 10**6 + i, "action": "purchase"}
             for i in range(7)]
    old_b = [{**e, "item_id": int(ranker.fmap.item_vocab[90])} for e in old_a]
    a = ranker.rank({**body, "history": old_a + recent[::-1]})  # unordered input is sorted by time
    b = ranker.rank({**body, "history": recent + old_b})
    assert a.history_used == L
    assert scores_by_item(a) == scores_by_item(b)


def test_score_formula_options(ranker, tiny_data):
    body = request_body(tiny_data, 700)
    base = {c.item_id: c for c in ranker.rank(body).candidates}
    r = Ranker(ranker.model, ranker.cfg, ranker.fmap, ServingConfig.build(alpha=0.5), ranker.store)
    for c in r.rank(body).candidates:
        assert c.score == pytest.approx(base[c.item_id].ctr * base[c.item_id].cvr ** 0.5)
    r = Ranker(ranker.model, ranker.cfg, ranker.fmap, ServingConfig.build(formula="ctr"), ranker.store)
    resp = r.rank(body)
    assert resp.formula == "ctr" and all(c.score == c.ctr for c in resp.candidates)
    with pytest.raises(ValueError, match="formula"):
        ServingConfig.build(formula="ctr*cvr")
    with pytest.raises(ValueError, match="unknown serving option"):
        ServingConfig.build(max_candidate=5)


# ---- encoding ----------------------------------------------------------------------------------------
def test_fast_encoder_matches_feature_map(ranker):
    fmap = ranker.fmap
    enc = RequestEncoder(fmap, ranker.cfg.data)
    rows = [{"device": "app", "hour": 3, "price": 12.5, "discount": 0.1},
            {"device": "toaster", "hour": 3.0, "price": None, "discount": "0.25"},
            {"device": None, "hour": "23", "price": 1e9},
            {}]
    for role in ("context", "candidate"):
        sp, de = enc.role_rows(role, rows, ("body",))
        df = pd.DataFrame(rows)
        np.testing.assert_array_equal(sp, fmap.encode_sparse(role, df))
        np.testing.assert_allclose(de, fmap.encode_numeric(role, df), rtol=1e-6)
    ctx, _ = enc.role_rows("context", rows, ("body",))
    dev = fmap.features["device"]
    col = [f.name for f in fmap.role_features("context", sparse=True)].index("device")
    assert ctx[1, col] == dev.offset and ctx[2, col] == 0  # OOV id, missing id
    np.testing.assert_array_equal(enc.text("Red running shoes", 16), fmap.encode_text(["Red running shoes"], 16)[0])


def test_encode_request_function(ranker, tiny_data, store_file):
    body = request_body(tiny_data, 700, extra_items=("zzz",))
    with HistoryStore(store_file) as st:
        batch, n_unknown, unknown_user = encode_request(ranker.fmap, ranker.cfg.data, body, st)
    assert batch.n_requests == 1 and batch.cand_item.shape[0] == len(body["candidates"])
    assert n_unknown == 1 and unknown_user is False
    assert int(batch.hist_len[0]) > 0 and batch.hist_item.shape == (1, ranker.cfg.data.max_history)


def test_bad_feature_values_name_the_field(ranker, tiny_data):
    body = request_body(tiny_data, 700)
    body["candidates"][2]["price"] = "cheap"
    with pytest.raises(RequestError) as e:
        ranker.rank(body)
    assert e.value.loc == ("body", "candidates", 2, "price") and e.value.status == 422
    body = request_body(tiny_data, 700)
    body["context"]["device"] = ["app", "web"]
    with pytest.raises(RequestError) as e:
        ranker.rank(body)
    assert e.value.loc == ("body", "context", "device")


def test_schema_rejects_nan_and_empty(tiny_data):
    from pydantic import ValidationError

    body = request_body(tiny_data, 700)
    for bad in ({"context": {"hour": math.nan}}, {"candidates": []}, {"timestamp": math.inf},
                {"candidates": [{"item_id": 1, "price": math.inf}]}, {"query": "x" * 100_000},
                {"user_id": {"a": 1}}):
        with pytest.raises(ValidationError) as e:
            RankRequest.model_validate({**body, **bad})
        assert list(bad)[0] in str(e.value)


def test_limits_are_413(ranker, tiny_data):
    body = request_body(tiny_data, 700)
    r = Ranker(ranker.model, ranker.cfg, ranker.fmap, ServingConfig.build(max_candidates=5,
                                                                          max_history_inline=3), ranker.store)
    with pytest.raises(RequestError) as e:
        r.rank(body)
    assert e.value.status == 413 and e.value.loc == ("body", "candidates")
    small = {**body, "candidates": body["candidates"][:5],
             "history": [{"item_id": 1, "timestamp": 1, "action": "click"}] * 4}
    with pytest.raises(RequestError) as e:
        r.rank(small)
    assert e.value.status == 413 and e.value.loc == ("body", "history")
    assert len(r.rank({**small, "history": small["history"][:3]}).candidates) == 5


# ---- store --------------------------------------------------------------------------------------------
def test_store_load_cli_and_append(tmp_path, tiny_data):
    from qdrank.cli import main

    f = tmp_path / "s.sqlite"
    assert main(["store", "load", "--data", str(tiny_data), "--store", str(f)]) == 0
    beh = pd.read_parquet(tiny_data / "behaviors.parquet")
    with HistoryStore(f) as st:
        assert st.counts() == {"behaviors": len(beh), "users": len(pd.read_parquet(tiny_data / "users.parquet"))}
        u = int(beh["user_id"].iloc[0])
        mine = beh[beh["user_id"] == u].sort_values("timestamp", kind="stable")
        t = int(mine["timestamp"].iloc[-1])
        h = st.history(u, t, 3)
        exp = mine[mine["timestamp"] < t].tail(3)
        assert [x["timestamp"] for x in h] == exp["timestamp"].tolist()
        assert [x["item_id"] for x in h] == exp["item_id"].astype(str).tolist()
        assert st.profile(u) is not None and st.profile("nobody") is None
        st.append([{"user_id": u, "item_id": 5, "timestamp": t - 1, "action": "cart", "colour": "red"}])
        h2 = st.history(str(u), t, 3)
        assert h2[-1]["item_id"] == "5" and h2[-1]["colour"] == "red" and h2[-1]["action"] == "cart"


# ---- export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity(fmt, ranker, run_dir, tiny_data, tmp_path):
    from qdrank.serving.export import batch_inputs, export_run, onnx_feed

    enc = ranker.encode(request_body(tiny_data, 900))
    assert int(enc.batch.hist_len[0]) > 0
    out = export_run(run_dir, fmt, tmp_path / f"m.{fmt}", example=enc.batch)
    assert out.exists() and (tmp_path / f"m.{fmt}.json").exists()
    other = ranker.encode(request_body(tiny_data, 910, extra_items=(1, 2, 3)))  # another N
    for b in (enc.batch, other.batch):
        ref_ctr, ref_cvr = ranker.logits(b)
        if fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            ctr, cvr = sess.run(None, onnx_feed(sess, b))
        else:
            m = torch.jit.load(str(out))
            with torch.inference_mode():
                ctr, cvr = (x.numpy() for x in m(*batch_inputs(b)))
        assert ctr.shape == tuple(ref_ctr.shape)
        assert np.abs(ctr - ref_ctr.numpy()).max() < 1e-5
        assert np.abs(cvr - ref_cvr.numpy()).max() < 1e-5


# ---- request rules (#13) ----------------------------------------------------------------------------------
def test_ids_are_never_coerced_and_long_ids_refused(ranker, tiny_data):
    from qdrank.serving.schemas import MAX_ID_LENGTH

    body = request_body(tiny_data, 700)
    for bad in ("1" * (MAX_ID_LENGTH + 1), 2**63, -(2**63) - 1, 1.5, True, "", None):
        with pytest.raises(RequestError) as e:
            ranker.rank({**body, "user_id": bad})
        assert e.value.loc == ("body", "user_id") and e.value.status == 422, bad
    with pytest.raises(RequestError) as e:
        ranker.rank({**body, "candidates": [*body["candidates"], {"item_id": "9" * (MAX_ID_LENGTH + 1)}]})
    assert e.value.loc == ("body", "candidates", len(body["candidates"]), "item_id")
    # the longest allowed string id is served, as a string (unknown user), never as a number
    long_id = "7" * MAX_ID_LENGTH
    resp = ranker.rank({**body, "user_id": long_id})
    assert resp.unknown_user is True and resp.history_used == 0
    same = [ranker.rank({**body, "user_id": u}) for u in (body["user_id"], str(body["user_id"]),
                                                          float(body["user_id"]))]
    assert all(r.unknown_user is False for r in same)
    assert scores_by_item(same[0]) == scores_by_item(same[1]) == scores_by_item(same[2])


def test_feature_values_follow_the_features_type(ranker, tiny_data):
    body = request_body(tiny_data, 700)
    cases = [({"context": {"device": {}}}, ("body", "context", "device")),          # an object: never a value
             ({"context": {"device": ["app"]}}, ("body", "context", "device")),     # categorical: one value
             ({"context": {"unknown_feature": {"a": 1}}}, ("body", "context", "unknown_feature")),
             ({"candidates": [{"item_id": 1, "price": [1, 2]}]}, ("body", "candidates", 0, "price")),  # numeric
             ({"candidates": [{"item_id": 1}, {"item_id": 2, "price": "inf"}]}, ("body", "candidates", 1, "price"))]
    assert ranker.fmap.features["price"].type == "numeric" and ranker.fmap.features["device"].type == "categorical"
    for patch, loc in cases:
        with pytest.raises(RequestError) as e:
            ranker.rank({**body, **patch})
        assert e.value.loc == loc and e.value.status == 422, patch
    # what the schema allows is served: unknown features of any scalar/list value, numeric strings, null
    ok = ranker.rank({**body, "context": {**body["context"], "colour": ["red", 1, None], "flag": True},
                      "candidates": [{**c, "price": "19.5", "size": {"no": 1} and None} for c in body["candidates"]]})
    assert len(ok.candidates) == len(body["candidates"])


def test_training_encodes_numerics_as_serving_does(ranker, tiny_data):
    """The same raw candidate row gives the same ``cand_dense`` value in a training batch
    (``FeatureMap.encode_numeric``, which the dataset and the shards use) as in a live request: huge,
    infinite and missing values included (clipped to +/- NUMERIC_Z_CLIP, missing = 0)."""
    import pandas as pd

    from qdrank.serving.schemas import NUMERIC_Z_CLIP

    body = request_body(tiny_data, 700)
    names = [f.name for f in ranker.fmap.role_features("candidate", sparse=False)]
    j = names.index("price")
    values = [1e300, -1e300, "1e999", "-1e999", None, 12.5, 0.0, -3.0]  # "1e999": inf once parsed
    cands = [{**body["candidates"][i % len(body["candidates"])], "price": v} for i, v in enumerate(values)]
    served = ranker.encode({**body, "candidates": cands}).batch.cand_dense[:, j].numpy()
    trained = ranker.fmap.encode_numeric("candidate", pd.DataFrame({"price": values}))[:, j]
    assert served.tolist() == trained.tolist()
    assert abs(trained[0]) == NUMERIC_Z_CLIP and trained[2] == trained[0] and trained[4] == 0.0


def test_huge_numbers_are_clipped(ranker, tiny_data):
    from qdrank.serving.schemas import NUMERIC_Z_CLIP

    body = request_body(tiny_data, 700)
    j = [f.name for f in ranker.fmap.role_features("candidate", sparse=False)].index("price")
    for v, sign in ((1e300, 1), (10**400, 1), (-1e300, -1), ("1e999", 1)):
        cands = [{**c, "price": v} for c in body["candidates"]]
        enc = ranker.encode({**body, "candidates": cands})
        x = enc.batch.cand_dense[:, j]
        assert torch.isfinite(x).all() and float(x.abs().max()) <= NUMERIC_Z_CLIP
        f = ranker.fmap.features["price"]
        if sign > 0 or not f.log:
            assert float(x[0]) == pytest.approx(sign * NUMERIC_Z_CLIP), v
        resp = ranker.rank({**body, "candidates": cands})
        assert all(math.isfinite(c.score) for c in resp.candidates)


def test_model_info_has_no_absolute_paths(ranker):
    import json

    def strings(v):
        if isinstance(v, dict):
            for k, x in v.items():
                yield str(k)
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)
        elif isinstance(v, str):
            yield v

    info = ranker.info()
    json.dumps(info)
    bad = [s for s in strings(info) if s.startswith("/") or str(Path.home()) in s or "/tmp" in s]
    assert not bad, bad[:5]
    assert info["run"] == ranker.run_dir.name and info["serving"]["store"] == Path(ranker.store.path).name


# ---- micro-batching and backends ------------------------------------------------------------------------
def test_rank_many_equals_rank(ranker, tiny_data):
    bodies = [request_body(tiny_data, 700), request_body(tiny_data, 900, extra_items=(5, "nope")),
              {**request_body(tiny_data, 650), "user_id": "x" * 300}, request_body(tiny_data, 910)]
    out = ranker.rank_many(bodies)
    assert isinstance(out[2], RequestError) and out[2].loc == ("body", "user_id")
    for b, r in zip(bodies, out):
        if isinstance(r, RequestError):
            continue
        single = ranker.rank(b)
        assert [c.item_id for c in r.candidates] == [c.item_id for c in single.candidates] or \
            np.allclose([c.score for c in r.candidates], [c.score for c in single.candidates], atol=1e-6)
        a, s = scores_by_item(r), scores_by_item(single)
        assert a.keys() == s.keys() and max(abs(a[k] - s[k]) for k in a) < 1e-5
        assert r.history_used == single.history_used


@pytest.fixture(scope="module")
def untrained(tiny_data):
    """One tiny dataset's feature map, shared by untrained models of every registered kind."""
    from qdrank.data.dataset import SearchLogDataset

    cfg = tiny_config("din")
    return SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)


def _parity_requests(fmap, tiny_data) -> list[dict]:
    items = [int(x) for x in fmap.item_vocab[:40]]
    out = []
    for row, n_hist, n_extra in ((700, 0, 0), (900, 3, 2), (910, 15, 9)):
        b = request_body(tiny_data, row, extra_items=tuple(items[:n_extra]))
        ts = b["timestamp"]
        b["history"] = [{"item_id": items[i], "timestamp": ts - 100 * (i + 1), "action": "click", "query": "red shoes"}
                        for i in range(n_hist)]
        out.append(b)
    return out


@pytest.mark.parametrize("model_name", __import__("qdrank.models.registry", fromlist=["x"]).available_models())
def test_onnx_backend_matches_torch(model_name, untrained, tiny_data):
    """``backend="onnx"`` scores every request as PyTorch does (max |diff| < 1e-4), per model."""
    from qdrank.models.registry import model_class

    torch.manual_seed(0)
    cfg = tiny_config(model_name, *(("model.trees=40", "model.num_threads=1") if model_name == "gbdt" else ()))
    model = model_class(model_name)(untrained.fmap, cfg.model)
    if not model.gradient_trained:  # a baseline scores from its fitted statistics (gbdt: its trees)
        model.emb.set_item_tables(*untrained.item_tables())
        model.fit_data(untrained)
    model.eval()
    ref = Ranker(model, cfg, untrained.fmap, ServingConfig.build())
    onnx = Ranker(model, cfg, untrained.fmap, ServingConfig.build(backend="onnx"))
    for body in _parity_requests(untrained.fmap, tiny_data):
        enc = ref.encode(body)
        a, b = ref.logits(enc.batch), onnx.logits(enc.batch)
        for x, y in zip(a, b):
            assert x.shape == y.shape and float((x - y).abs().max()) < 1e-4, model_name
        ra, rb = ref.rank(body), onnx.rank(body)
        assert [c.item_id for c in ra.candidates] == [c.item_id for c in rb.candidates] or \
            max(abs(p.score - q.score) for p, q in zip(ra.candidates, rb.candidates)) < 1e-4


def test_onnx_backend_at_a_serving_history_width_other_than_the_runs(untrained, tiny_data, tmp_path):
    """``max_history`` raised at serving: the ONNX graph is exported at that width and scores as PyTorch;
    an ``onnx_path`` exported at another width is refused by name, not failed on the first request."""
    from qdrank.models.registry import model_class
    from qdrank.serving.export import example_batch, export_model

    torch.manual_seed(0)
    cfg = tiny_config("din")
    model = model_class("din")(untrained.fmap, cfg.model).eval()
    wide = 2 * cfg.data.max_history
    ref = Ranker(model, cfg, untrained.fmap, ServingConfig.build(max_history=wide))
    onnx = Ranker(model, cfg, untrained.fmap, ServingConfig.build(backend="onnx", max_history=wide))
    for body in _parity_requests(untrained.fmap, tiny_data):
        enc = ref.encode(body)
        assert enc.batch.hist_item.shape[1] == wide
        for x, y in zip(ref.logits(enc.batch), onnx.logits(enc.batch)):
            assert float((x - y).abs().max()) < 1e-4
    narrow = export_model(model, example_batch(untrained.fmap, cfg), tmp_path / "narrow.onnx", "onnx", "din")
    with pytest.raises(ValueError, match="narrow.onnx.*exported for histories"):
        Ranker(model, cfg, untrained.fmap, ServingConfig.build(backend="onnx", max_history=wide, onnx_path=str(narrow)))
