"""History rule, time split, training-only vocabularies and batch layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qdrank.config import DataConfig
from qdrank.data.dataset import SearchLogDataset, history_bounds, split_by_time
from qdrank.data.schema import write_dataset


def make_log(tmp_path, n_req=20):
    """User u0 issues a request every 100 s; each request's own click is logged at the same second."""
    ts = 1000 + 100 * np.arange(n_req)
    req = pd.DataFrame({"request_id": np.arange(n_req), "user_id": "u0", "timestamp": ts,
                        "query": ["shoes"] * n_req})
    imp = pd.DataFrame({"request_id": np.repeat(np.arange(n_req), 2),
                        "item_id": [f"i{r}" if k == 0 else f"n{r}" for r in range(n_req) for k in range(2)],
                        "click": [1, 0] * n_req})
    beh = pd.DataFrame({"user_id": "u0", "item_id": [f"i{r}" for r in range(n_req)], "timestamp": ts,
                        "action": "click"})
    write_dataset(tmp_path / "d", {"requests.parquet": req, "impressions.parquet": imp, "behaviors.parquet": beh})
    return tmp_path / "d"


def test_same_second_click_never_enters_history(tmp_path):
    ds = SearchLogDataset(make_log(tmp_path), DataConfig(max_history=5), log=lambda m: None)
    b = ds.make_batch(np.arange(len(ds.request_id)))
    item_of_row = {2 + i: k for i, k in enumerate(ds.fmap.item_vocab)}
    for r in range(len(ds.request_id)):
        n = int(b.hist_len[r])
        assert n == min(r, 5)  # only strictly earlier requests' clicks
        hist = [item_of_row[int(x)] for x in b.hist_item[r, :n]]
        own = f"i{int(ds.request_id[r])}"
        assert own not in hist
        # most recent L, chronological
        assert hist == [f"i{k}" for k in range(max(0, r - 5), r)]
        assert bool((b.hist_item[r, n:] == 0).all())


def test_history_bounds_strictly_earlier():
    beh_user = np.array([1, 1, 1, 2, 2])
    beh_ts = np.array([10, 20, 30, 5, 40])
    start, end = history_bounds(beh_user, beh_ts, np.array([1, 1, 2, 3]), np.array([20, 31, 40, 100]), 10)
    assert end.tolist() == [1, 3, 4, 5] and start.tolist() == [0, 0, 3, 5]


def test_time_split_keeps_ties_together():
    ts = np.array([1, 2, 3, 4, 5, 6, 7, 8, 8, 8])
    s = split_by_time(ts, (0.8, 0.1, 0.1))
    assert set(s[ts == 8]) == {s[-1]}  # same second, same split
    assert (np.diff(s[np.argsort(ts, kind="stable")]) >= 0).all()


def test_vocab_fitted_on_train_only(tmp_path):
    ds = SearchLogDataset(make_log(tmp_path), DataConfig(), log=lambda m: None)
    vocab = set(ds.fmap.features["item_id"].vocab)
    train_rows = ds.requests_of("train")
    test_rows = ds.requests_of("test")
    assert f"n{int(ds.request_id[train_rows[0]])}" in vocab
    assert f"n{int(ds.request_id[test_rows[-1]])}" not in vocab  # shown only in test: OOV id


def test_batch_groups_whole_requests(tiny_dataset):
    cfg, ds = tiny_dataset
    groups = ds.batch_rows("train", 100, shuffle=True, seed=1)
    seen = np.concatenate(groups)
    assert sorted(seen.tolist()) == sorted(ds.requests_of("train").tolist())
    b = ds.make_batch(groups[0])
    assert b.cand_req.max() == len(groups[0]) - 1
    assert len(b.click) == ds.n_impressions(groups[0])
    assert b.hist_item.shape == (len(groups[0]), cfg.data.max_history)


def test_type_inference_is_reported(tmp_path):
    msgs = []
    SearchLogDataset(make_log(tmp_path), DataConfig(), log=msgs.append)
    d = tmp_path / "d2"
    req = pd.read_parquet(tmp_path / "d" / "requests.parquet").assign(device="m", score=0.5)
    write_dataset(d, {"requests.parquet": req, "impressions.parquet": pd.read_parquet(tmp_path / "d" / "impressions.parquet"),
                      "behaviors.parquet": pd.read_parquet(tmp_path / "d" / "behaviors.parquet")})
    msgs = []
    ds = SearchLogDataset(d, DataConfig(), log=msgs.append)
    assert any("device=categorical" in m and "score=numeric" in m for m in msgs)
    assert ds.fmap.features["device"].role == "context"
    assert ds.fmap.gate == ["device", "score"]


@pytest.mark.parametrize("n", [0, 3])
def test_empty_histories_are_fine(tmp_path, n):
    d = make_log(tmp_path)
    beh = pd.read_parquet(d / "behaviors.parquet").iloc[:n]
    beh.to_parquet(d / "behaviors.parquet", index=False)
    ds = SearchLogDataset(d, DataConfig(), log=lambda m: None)
    b = ds.make_batch(np.arange(5))
    assert int(b.hist_len.sum()) <= n * 5


def test_registered_batch_input_reaches_the_model(tiny_dataset):
    """A model adds an input by registering a builder and naming it: no other file changes."""
    import numpy as np
    import pytest

    from qdrank.data.batch import batch_input, batch_inputs

    _, ds = tiny_dataset

    @batch_input("test_candidate_count")
    def candidate_count(d, rows, cand):
        return (d.imp_end[rows] - d.imp_start[rows]).astype(np.int64)

    try:
        rows = ds.requests_of("train")[:5]
        b = ds.make_batch(rows, ("test_candidate_count",))
        assert b.extra["test_candidate_count"].tolist() == (ds.imp_end[rows] - ds.imp_start[rows]).tolist()
        assert b.to("cpu").extra["test_candidate_count"].tolist() == b.extra["test_candidate_count"].tolist()
        assert ds.make_batch(rows).extra == {}
        with pytest.raises(KeyError, match="unknown batch input"):
            ds.make_batch(rows, ("no_such_input",))
        with pytest.raises(ValueError, match="registered twice"):
            batch_input("test_candidate_count")(lambda d, r, c: r)
    finally:
        from qdrank.data import batch as batch_module

        batch_module._INPUTS.pop("test_candidate_count", None)
    assert "test_candidate_count" not in batch_inputs()
