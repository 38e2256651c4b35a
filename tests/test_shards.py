"""Request-major shards: the streamed batches are the in-memory loader's, field for field."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config

from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.schema import DatasetError, write_dataset
from qdrank.data.shards import ShardedDataset, open_dataset, write_shards
from qdrank.evaluation.benchmark import BASELINES
from qdrank.models.registry import available_models
from qdrank.training.trainer import Trainer

ORACLE = ("true_ctr", "true_cvr")


def odd_log(path):
    """String user ids, behaviours tied at one second (also with requests), a list feature, a
    nullable category, an int feature with nulls (numeric), unknown positions and purchases,
    requests without impressions, a users table that lacks some users, session ids with nulls."""
    rng = np.random.default_rng(3)
    n_req, n_users, n_items = 400, 30, 90
    ts = rng.integers(1_000, 60_000, n_req) // 50 * 50          # many requests share a second
    req = pd.DataFrame({
        "request_id": rng.permutation(np.arange(5000, 5000 + n_req)).astype(np.int64),  # not time order
        "user_id": [f"u{k}" for k in rng.integers(0, n_users, n_req)],
        "timestamp": ts.astype(np.int64),
        "query": [None if i % 7 == 0 else f"red shoe {i % 5}" for i in range(n_req)],
        "filters": [[f"f{i % 3}", "cheap"] if i % 4 else [] for i in range(n_req)],
        "scene": [None if i % 9 == 0 else f"s{i % 2}" for i in range(n_req)],
        "slot": pd.array([None if i % 6 == 0 else i % 4 for i in range(n_req)], dtype="Int64"),
    })
    rows = []
    for r in req.itertuples():
        if r.request_id % 23 == 0:
            continue
        for p in range(int(rng.integers(1, 9))):
            rows.append((r.request_id, f"i{rng.integers(0, n_items)}", p, int(rng.random() < 0.3)))
    imp = pd.DataFrame(rows, columns=["request_id", "item_id", "position", "click"])
    imp["position"] = imp["position"].astype("Int64")
    imp.loc[imp.index % 11 == 0, "position"] = pd.NA
    imp["price"] = rng.lognormal(7, 1, len(imp))                  # > 1000: log-standardised
    imp.loc[imp.index % 13 == 0, "price"] = np.nan
    imp["purchase"] = np.where(imp["click"] == 1, (rng.random(len(imp)) < 0.3).astype(float), np.nan)
    n_beh = 3000
    beh = pd.DataFrame({
        "user_id": [f"u{k}" for k in rng.integers(0, n_users - 3, n_beh)],
        "item_id": [f"i{k}" for k in rng.integers(0, n_items + 20, n_beh)],
        "timestamp": (rng.integers(0, 60_000, n_beh) // 100 * 100).astype(np.int64),  # ties with requests
        "action": rng.choice(["view", "click", "buy"], n_beh),
        "dwell": rng.exponential(3.0, n_beh),
    })
    # session ids: ~8 hours of a user, some unknown (null); consecutive behaviours change sessions
    beh["session"] = [None if i % 7 == 0 else f"{u}-{t // 30_000}" for i, (u, t) in
                      enumerate(zip(beh["user_id"], beh["timestamp"]))]
    users = pd.DataFrame({"user_id": [f"u{k}" for k in range(0, n_users, 2)],
                          "tier": [f"t{k % 3}" for k in range(0, n_users, 2)]})
    write_dataset(path, {"requests.parquet": req, "impressions.parquet": imp, "behaviors.parquet": beh,
                         "users.parquet": users})
    return path


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    return odd_log(tmp_path_factory.mktemp("shards") / "odd")


@pytest.fixture(params=["synthetic", "odd"])
def data_dir(request, tiny_data, odd_data):
    return tiny_data if request.param == "synthetic" else odd_data


def _cfg():
    return tiny_config("dnn", "data.max_history=7").data


def _shards(src, tmp_path, cfg, **kw):
    # tiny buckets and shards so that bucketing, piece merging and carry-over are all exercised
    write_shards(src, tmp_path / "shards", cfg, **{"rows_per_shard": 90, "row_group_size": 16,
                                                  "bucket_rows": 700, "log": lambda m: None, **kw})
    return tmp_path / "shards"


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        for f in dataclasses.fields(Batch):
            if f.name == "extra":
                assert x.extra.keys() == y.extra.keys()
                for k in x.extra:
                    assert torch.equal(x.extra[k], y.extra[k]), k
                continue
            u, v = getattr(x, f.name), getattr(y, f.name)
            assert u.dtype == v.dtype and u.shape == v.shape, (f.name, u.dtype, v.dtype, u.shape, v.shape)
            assert torch.equal(u, v), f.name


def test_streamed_batches_equal_in_memory_batches(data_dir, tmp_path):
    cfg = _cfg()
    ds = SearchLogDataset(data_dir, cfg, log=lambda m: None)
    sd = ShardedDataset(_shards(data_dir, tmp_path, cfg), cfg)
    assert len(sd.splits["train"]["shards"]) > 2
    extra = tuple(c for c in ORACLE if c in ds.oracle_columns)
    assert sd.oracle_columns == ds.oracle_columns
    for split in ("train", "valid", "test"):
        a = list(ds.iter_batches(split, 97, extra_inputs=extra))
        b = list(sd.iter_batches(split, 97, extra_inputs=extra))
        assert_same_batches(a, b)
        assert sd.n_requests(split) == len(ds.requests_of(split))
    assert any(int(b.hist_len.max()) == cfg.max_history for b in sd.iter_batches("test", 97))  # windows cut
    sessions = torch.cat([b.hist_session for b in sd.iter_batches("train", 97)])
    if "session" in pd.read_parquet(data_dir / "behaviors.parquet").columns:  # several sessions per window
        assert int(sessions.max()) >= 1 and bool((sessions == -1).any())
    else:
        assert bool((sessions == -1).all())
    s1, d1 = ds.item_tables()
    s2, d2 = sd.item_tables()
    assert np.array_equal(s1, s2) and np.array_equal(d1, d2)


def test_shard_feature_map_equals_loader_feature_map(data_dir, tmp_path):
    cfg = _cfg()
    a = SearchLogDataset(data_dir, cfg, log=lambda m: None).fmap.to_dict()
    b = ShardedDataset(_shards(data_dir, tmp_path, cfg), cfg).fmap.to_dict()
    fa, fb = a.pop("features"), b.pop("features")
    assert a == b
    assert list(fa) == list(fb)  # same features, same order, so the same id offsets
    for name in fa:
        x, y = dict(fa[name]), dict(fb[name])
        # numeric statistics merged chunk by chunk: equal up to float rounding
        for k in ("mean", "std"):
            assert x.pop(k) == pytest.approx(y.pop(k), rel=1e-12, abs=1e-12), (name, k)
        assert x == y, name
    assert any(f["type"] == "numeric" and f["log"] for f in fa.values()) or "price" not in fa


def test_two_ranks_read_disjoint_shards_covering_every_request(tiny_data, tmp_path):
    cfg = _cfg()
    sd = ShardedDataset(_shards(tiny_data, tmp_path, cfg), cfg)
    ds = SearchLogDataset(tiny_data, cfg, log=lambda m: None)
    for split in ("train", "test"):
        files = [{s["file"] for s in sd.shard_files(split, rank=r, world=2)} for r in range(2)]
        assert not files[0] & files[1]
        ids = [torch.cat([b.request_id for b in sd.iter_batches(split, 200, rank=r, world=2)]) for r in range(2)]
        assert not set(ids[0].tolist()) & set(ids[1].tolist())
        assert sorted(ids[0].tolist() + ids[1].tolist()) == sorted(ds.request_id[ds.requests_of(split)].tolist())
    # training: each rank its own shards in a seeded order, the same number of batches on both
    runs = [list(sd.iter_batches("train", 128, shuffle=True, seed=5, rank=r, world=2)) for r in range(2)]
    assert len(runs[0]) == len(runs[1]) > 0
    seen = [set(torch.cat([b.request_id for b in run]).tolist()) for run in runs]
    assert not seen[0] & seen[1]


def test_shuffle_is_seeded_and_matches_memory_when_one_buffer_holds_the_split(tiny_data, tmp_path):
    cfg = _cfg()
    ds = SearchLogDataset(tiny_data, cfg, log=lambda m: None)
    one = ShardedDataset(_shards(tiny_data, tmp_path, cfg, rows_per_shard=10**6), cfg, shuffle_buffer=10**6)
    assert_same_batches(list(ds.iter_batches("train", 150, shuffle=True, seed=3)),
                        list(one.iter_batches("train", 150, shuffle=True, seed=3)))
    many = ShardedDataset(_shards(tiny_data, tmp_path / "m", cfg), cfg, shuffle_buffer=64)
    ids = [torch.cat([b.request_id for b in many.iter_batches("train", 150, shuffle=True, seed=s)]) for s in (3, 3, 4)]
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])
    assert sorted(ids[0].tolist()) == sorted(ds.request_id[ds.requests_of("train")].tolist())


def test_run_from_shards_equals_run_from_directory(tiny_data, tmp_path):
    cfg = tiny_config("dnn", "train.max_epochs=2", "train.max_steps_per_epoch=6", "model.dropout=0.0",
                      "train.device=cpu")  # compared bit for bit: CUDA's scatter-adds are not deterministic
    ds = SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)
    shard_dir = _shards(tiny_data, tmp_path, cfg.data, rows_per_shard=10**6)
    sd = ShardedDataset(shard_dir, cfg.data, shuffle_buffer=10**6)  # one buffer: the in-memory order
    res_a = Trainer(cfg, ds, tmp_path / "a", log=lambda m: None).fit()
    res_b = Trainer(cfg, sd, tmp_path / "b", log=lambda m: None).fit()
    for split in ("valid", "test"):
        assert res_a[split].keys() == res_b[split].keys()
        for k, v in res_a[split].items():
            assert v == pytest.approx(res_b[split][k], rel=1e-5, abs=1e-6, nan_ok=True), (split, k)
    assert "oracle_as_shown_ctr_auc" in res_b["test"]
    assert isinstance(open_dataset(shard_dir, cfg.data), ShardedDataset)
    assert isinstance(open_dataset(tiny_data, cfg.data, log=lambda m: None), SearchLogDataset)


def _assert_close_tree(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close_tree(a[k], b[k])
    else:
        assert a == pytest.approx(b, rel=1e-6)


@pytest.fixture(scope="module")
def baseline_shards(tiny_data, tmp_path_factory):
    cfg = tiny_config("popularity")
    return _shards(tiny_data, tmp_path_factory.mktemp("bshards"), cfg.data, rows_per_shard=10**6)


@pytest.mark.parametrize("name", [b for b in BASELINES if b in available_models()])
def test_baselines_fit_from_shards_as_from_the_folder(name, tiny_data, baseline_shards, tmp_path):
    """Every baseline fits from shards to the metrics of its in-memory fit (gbdt too: its
    out-of-fold statistics fold requests by a hash of their id, and are counted from batches)."""
    cfg = tiny_config(name)
    sd = ShardedDataset(baseline_shards, cfg.data)
    ds = SearchLogDataset(tiny_data, cfg.data, fmap=sd.fmap, log=lambda m: None)
    folder = Trainer(cfg, ds, tmp_path / "f", log=lambda m: None).fit()
    shards = Trainer(cfg, sd, tmp_path / "s", log=lambda m: None).fit()
    _assert_close_tree(folder["fitted"], shards["fitted"])  # what was fitted (priors, action weights...)
    for split in ("valid", "test"):
        assert folder[split].keys() == shards[split].keys()
        for k, v in folder[split].items():
            assert v == pytest.approx(shards[split][k], rel=1e-6, abs=1e-9, nan_ok=True), (name, split, k)


def test_shards_refuse_other_data_settings_and_feature_maps(tiny_data, tmp_path):
    cfg = _cfg()
    path = _shards(tiny_data, tmp_path, cfg)
    with pytest.raises(DatasetError, match="max_history"):
        ShardedDataset(path, dataclasses.replace(cfg, max_history=9))
    other = SearchLogDataset(tiny_data, dataclasses.replace(cfg, min_count=3), log=lambda m: None).fmap
    with pytest.raises(DatasetError, match="another feature map"):
        ShardedDataset(path, cfg, fmap=other)


def test_shard_errors_name_file_row_and_field(tmp_path):
    req = pd.DataFrame({"request_id": [1, 2], "user_id": [1, 1], "timestamp": [10, 20], "query": ["a", "b"]})
    imp = pd.DataFrame({"request_id": [1, 2, 2], "item_id": [5, 6, 7], "click": [1, 0, 0]})
    beh = pd.DataFrame({"user_id": [1], "item_id": [5], "timestamp": [5], "action": ["click"]})
    d = tmp_path / "d"
    write_dataset(d, {"requests.parquet": req, "impressions.parquet": imp, "behaviors.parquet": beh})
    imp.assign(request_id=[1, 2, 99]).to_parquet(d / "impressions.parquet", index=False)
    with pytest.raises(DatasetError, match=r"impressions.parquet, column 'request_id', row 2 \(value 99\)"):
        write_shards(d, tmp_path / "s", _cfg(), log=lambda m: None)
    assert not (tmp_path / "s").exists()
    with pytest.raises(DatasetError, match="dataset directory does not exist"):
        write_shards(tmp_path / "nothing_here", tmp_path / "s", _cfg(), log=lambda m: None)


def test_cli_shard_then_two_rank_torchrun_reads_own_shards(tiny_data, tmp_path):
    """`qdrank data shard` + `torchrun` 2 processes training from the shards; the 2-rank evaluation
    in result.json equals a 1-process `qdrank evaluate` of the same checkpoint."""
    small = ["data.max_history=20", "data.query_buckets=2000", "model.dim=16", "train.batch_size=512",
             "train.progress=false", "train.max_epochs=1", "train.device=cpu"]  # gloo: a 1-GPU machine has no 2 ranks
    sets = sum((["--set", s] for s in small), [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shards = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "qdrank.cli", "data", "shard", str(tiny_data), "--out", str(shards),
                        "--rows-per-shard", "100", "--set", "data.max_history=20", "--set", "data.query_buckets=2000"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train 800 requests / 8 shards" in r.stdout
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "qdrank.cli", "train",
                        "--data", str(shards), "--model", "dnn", "--out", str(out), *sets],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((out / "result.json").read_text())["test"]
    r = subprocess.run([sys.executable, "-m", "qdrank.cli", "evaluate", str(out), "--split", "test"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((out / "eval_test" / "evaluation.json").read_text())["metrics"]
    assert one.keys() == two.keys()
    for k, v in two.items():
        assert v == pytest.approx(one[k], rel=1e-5, abs=1e-6, nan_ok=True), k
    r = subprocess.run([sys.executable, "-m", "qdrank.cli", "train", "--data", str(shards), "--model", "dnn",
                        "--out", str(tmp_path / "x"), "--set", "data.max_history=30"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "shards were built with data.max_history=20" in r.stderr
    assert "Traceback" not in r.stderr
