"""The optional ``session`` column of behaviors.parquet, end to end: format, ``Batch.hist_session``
(in memory and served, store and inline), the store's migration, and iFusion's ``session_source``."""

from __future__ import annotations

import copy
import dataclasses
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from test_serving import request_body

from qdrank.data import schema
from qdrank.data.batch import (
    HISTORY_FIELDS,
    NO_SESSION,
    history_session_ordinals,
    session_codes,
    session_ordinals,
)
from qdrank.data.dataset import SearchLogDataset
from qdrank.models.ifusion import session_slots
from qdrank.serving.ranker import Ranker, RequestEncoder
from qdrank.serving.schemas import RequestError, check_events, check_rank_request
from qdrank.serving.store import HistoryStore

SESSION_SECONDS = 200_000  # a session = a user's ~2.3 days: not what iFusion's 30-minute gap rule finds


def with_sessions(src: Path, out: Path) -> Path:
    """``src`` with a string ``session`` column in behaviors.parquet (every 9th behaviour unknown)."""
    tables = {f.name: pd.read_parquet(f) for f in src.glob("*.parquet")}
    beh = tables[schema.BEHAVIORS]
    beh["session"] = [None if i % 9 == 4 else f"u{u}-{t // SESSION_SECONDS}"
                      for i, (u, t) in enumerate(zip(beh["user_id"], beh["timestamp"]))]
    schema.write_dataset(out, tables, schema.load_spec(src))
    return out


@pytest.fixture(scope="module")
def session_data(tiny_data, tmp_path_factory) -> Path:
    return with_sessions(tiny_data, tmp_path_factory.mktemp("sessions") / "data")


@pytest.fixture(scope="module")
def session_ds(session_data):
    return SearchLogDataset(session_data, tiny_config("ifusion").data, log=lambda m: None)


@pytest.fixture(scope="module")
def session_store(session_data, tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("sessions") / "store.sqlite"
    with HistoryStore(f) as st:
        st.load_dataset(session_data)
    return f


def reference_ordinals(sessions: list) -> list[int]:
    """hist_session of one chronological history, by the documented rule, one behaviour at a time."""
    ids, current, k = [], None, -1
    for s in sessions:
        if not pd.isna(s) and s != current:
            k, current = k + 1, s
        ids.append(k if current is not None else None)
    return [-1 if i is None else k - i for i in ids]


# ---- the rule -------------------------------------------------------------------------------------
def test_session_ordinals_known_answers():
    assert reference_ordinals(["a", "a", None, "b", "a", "a"]) == [2, 2, 2, 1, 0, 0]
    got = history_session_ordinals([None, "a", "a", None, "b", 7, "7", 7.0, None])
    assert got.tolist() == [-1, 2, 2, 2, 1, 0, 0, 0, 0]  # 7, "7" and 7.0 are one id; a null continues
    assert history_session_ordinals([None, None]).tolist() == [-1, -1]
    assert history_session_ordinals([]).tolist() == []
    # padded batch rows (left-aligned): padding is -1 and does not shift the ordinals
    codes = np.stack([session_codes(["x", "y", "y", None]), session_codes(["x", "x", None, None])])
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    assert session_ordinals(codes, valid).tolist() == [[1, 0, 0, 0], [0, 0, -1, -1]]
    assert session_codes([None, float("nan"), pd.NA]).tolist() == [NO_SESSION] * 3


def test_session_is_reserved_not_a_feature(session_ds, session_data, tmp_path):
    assert "session" not in session_ds.fmap.features  # test sessions are ids no training row has
    bad = tmp_path / "bad"
    tables = {f.name: pd.read_parquet(f) for f in session_data.glob("*.parquet")}
    with pytest.raises(schema.DatasetError, match="'session' is a reserved column of behaviors.parquet"):
        schema.write_dataset(bad, tables, {"features": {"session": {"type": "categorical"}}})


# ---- training batches -----------------------------------------------------------------------------
def test_dataset_hist_session_follows_the_log(session_ds, session_data):
    """Every request's hist_session is the rule applied to its raw history (strictly earlier, most recent L)."""
    ds, L = session_ds, session_ds.cfg.max_history
    beh = pd.read_parquet(session_data / schema.BEHAVIORS)
    beh = beh.assign(_row=np.arange(len(beh))).sort_values(["user_id", "timestamp", "_row"], kind="stable")
    by_user = {u: g for u, g in beh.groupby("user_id")}
    req = pd.read_parquet(session_data / schema.REQUESTS).set_index("request_id")
    rows = ds.requests_of("test")[:150]
    b = ds.make_batch(rows)
    multi = 0
    for i, rid in enumerate(b.request_id.tolist()):
        r = req.loc[rid]
        h = by_user.get(r["user_id"])
        sess = [] if h is None else h[h["timestamp"] < r["timestamp"]]["session"].tolist()[-L:]
        want = reference_ordinals(sess) + [-1] * (L - len(sess))
        assert b.hist_session[i].tolist() == want, rid
        multi += max(want) >= 2
    assert multi > 10, "the fixture should give histories of several sessions"
    assert "hist_session" in HISTORY_FIELDS


def test_without_the_column_every_behaviour_is_unknown(tiny_dataset):
    _, ds = tiny_dataset
    b = ds.make_batch(ds.requests_of("valid")[:20])
    assert b.hist_session.shape == b.hist_item.shape and bool((b.hist_session == -1).all())


# ---- serving --------------------------------------------------------------------------------------
def _requests_with_sessions(ds, data, n=6) -> list[tuple[int, dict]]:
    """(dataset row, serving body) of logged test requests whose histories hold several sessions."""
    order = pd.read_parquet(data / schema.REQUESTS).sort_values("request_id")["request_id"].to_numpy()
    pos = {int(r): i for i, r in enumerate(order)}
    out = []
    for row in ds.requests_of("test"):
        if int(ds.make_batch(np.array([row])).hist_session.max()) >= 2:
            out.append((int(row), request_body(data, pos[int(ds.request_id[row])])))
        if len(out) == n:
            break
    assert len(out) == n
    return out


def test_serving_batch_equals_dataset_batch_with_sessions(session_ds, session_data, session_store):
    """Store and inline histories encode to the training loader's history tensors, hist_session included."""
    ds = session_ds
    enc = RequestEncoder(ds.fmap, ds.cfg)
    with HistoryStore(session_store) as store:
        for row, body in _requests_with_sessions(ds, session_data):
            ref = ds.make_batch(np.array([row]))
            from_store = enc.encode(check_rank_request(body), store).batch
            hist = store.history(body["user_id"], body["timestamp"], 10**6)
            assert {h["session"] for h in hist} - {None}, "the store holds the session ids"
            inline = enc.encode(check_rank_request({**body, "history": hist}), None).batch
            assert torch.equal(from_store.user_sparse, ref.user_sparse)  # the store's profile (inline: none)
            for got in (from_store, inline):
                for f in (*HISTORY_FIELDS, "hist_len", "cand_item", "ctx_sparse", "query"):
                    assert torch.equal(getattr(got, f), getattr(ref, f)), f


def test_store_migrates_a_store_made_before_sessions(tmp_path):
    f = tmp_path / "old.sqlite"
    with sqlite3.connect(f) as c:  # the schema before the session column
        c.executescript("""
            CREATE TABLE behaviors (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, timestamp INTEGER NOT NULL,
                                    item_id TEXT NOT NULL, action TEXT NOT NULL, query TEXT, features TEXT);
            CREATE TABLE users (user_id TEXT PRIMARY KEY, profile TEXT NOT NULL);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            INSERT INTO behaviors (user_id, timestamp, item_id, action, query, features)
                VALUES ('7', 10, 'i1', 'click', 'q', NULL), ('7', 20, 'i2', 'click', NULL, '{"dwell": 3}');
        """)
    with HistoryStore(f) as st:
        assert st.history(7, 100, 10) == [
            {"item_id": "i1", "timestamp": 10, "action": "click", "query": "q", "session": None},
            {"dwell": 3, "item_id": "i2", "timestamp": 20, "action": "click", "query": None, "session": None}]
        st.append([{"user_id": 7, "item_id": "i3", "timestamp": 30, "action": "click", "session": 42},
                   {"user_id": 7, "item_id": "i4", "timestamp": 40, "action": "click", "session": "s"}])
        assert st.history_columns(7, 100, 10)["session"] == [None, None, "42", "s"]
    with HistoryStore(f) as st:  # reopening a migrated store changes nothing
        assert st.counts()["behaviors"] == 4
    cols = [r[1] for r in sqlite3.connect(f).execute("PRAGMA table_info(behaviors)")]
    assert cols.count("session") == 1


@pytest.mark.parametrize("bad, msg", [(1.5, "expected an integer or string id"), ("", "1 to 256 characters"),
                                      ([1], "expected an integer or string id"), ("x" * 300, "1 to 256")])
def test_bad_session_values_are_refused_naming_the_field(bad, msg):
    beh = {"item_id": 1, "timestamp": 5, "action": "click"}
    with pytest.raises(RequestError, match=msg) as e:
        check_rank_request({"user_id": 1, "candidates": [{"item_id": 1}],
                            "history": [{**beh, "session": "a"}, {**beh, "session": bad}]})
    assert e.value.loc == ("body", "history", 1, "session") and e.value.status == 422
    with pytest.raises(RequestError) as e:
        check_events({"events": [{"user_id": 1, **beh, "session": None}, {"user_id": 1, **beh, "session": bad}]})
    assert e.value.loc == ("body", "events", 1, "session")
    ok = check_events({"events": [{"user_id": 1, **beh, "session": s} for s in (None, 3, "s", 2.0)]})
    assert [e["session"] for e in ok] == [None, 3, "s", 2]


# ---- iFusion ----------------------------------------------------------------------------------------
def test_session_slots_from_the_column():
    L, k = 8, 3
    hist_len = torch.tensor([6, 5, 3, 4])
    session = torch.tensor([[4, 3, 2, 2, 1, 0, -1, -1],     # three sessions in the window of 4
                            [4, 3, 2, 1, 0, -1, -1, -1],    # four: the oldest two share slot 0
                            [-1, 1, 0, -1, -1, -1, -1, -1],  # no known session before the first: slot 0
                            [-1, -1, -1, -1, -1, -1, -1, -1]])  # no session ids at all
    age = torch.tensor([[0.0] * 8] * 3 + [[9000.0, 5000.0, 4990.0, 100.0, 0, 0, 0, 0]])
    col = session_slots(hist_len, L, 4, k, age, 1800, session, "column")
    assert col.tolist() == [[-1, -1, 0, 0, 1, 2, -1, -1],
                            [-1, 0, 0, 1, 2, -1, -1, -1],
                            [0, 1, 2, -1, -1, -1, -1, -1],
                            [0, 0, 0, 0, -1, -1, -1, -1]]
    gap = session_slots(hist_len, L, 4, k, age, 1800)
    auto = session_slots(hist_len, L, 4, k, age, 1800, session, "auto")
    assert auto[:3].tolist() == col[:3].tolist()       # requests with session ids: the column
    assert auto[3].tolist() == gap[3].tolist() == [0, 1, 1, 2, -1, -1, -1, -1]  # without: the gap rule
    assert torch.equal(session_slots(hist_len, L, 4, k, age, 1800, session, "gap"), gap)


def test_ifusion_trains_on_sessions_and_serves_them(session_ds, session_data, session_store, tmp_path):
    from qdrank.training.trainer import Trainer

    cfg = tiny_config("ifusion", "train.max_epochs=1", "model.dropout=0.0")
    assert cfg.model.session_source == "auto"
    run = tmp_path / "run"
    result = Trainer(cfg, session_ds, run, log=lambda m: None).fit()
    assert np.isfinite(result["test"]["serving_ctr_auc"])
    ranker = Ranker.load(run, store=session_store)
    assert ranker.trace_status == "traced", ranker.trace_status  # probes have no sessions; the trace still reads them
    model = ranker.model
    requests = _requests_with_sessions(session_ds, session_data, 4)
    for row, body in requests:
        b = session_ds.make_batch(np.array([row]))
        enc = ranker.encode(body)
        assert torch.equal(enc.batch.hist_session, b.hist_session)
        with torch.inference_mode():
            ref = model(b, use_position=False)
        ctr, _ = ranker.logits(enc.batch)
        torch.testing.assert_close(ctr, ref.ctr_logit, atol=1e-5, rtol=1e-5)
        resp = ranker.rank(body)
        assert resp.history_source == "store" and len(resp.candidates) == len(body["candidates"])
    # the session ids steer the model: without them (the gap rule) the fused interest differs (weights
    # moved off their one-epoch values so that every path matters)
    b = session_ds.make_batch(np.array([row for row, _ in requests]))
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        with_ids = model.encode_request(b)["fused"]
        without = model.encode_request(dataclasses.replace(b, hist_session=torch.full_like(b.hist_session, -1)))
    assert float((with_ids - without["fused"]).abs().max()) > 1e-3
