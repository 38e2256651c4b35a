"""Benchmark protocol: search on validation, seeds aggregated, finished runs never redone."""

from __future__ import annotations

import json

from qdrank.evaluation.benchmark import BenchmarkSpec, grid_points, rank_summary, run_benchmark

FAST = ["data.max_history=10", "data.query_buckets=1000", "model.dim=8", "train.batch_size=1024",
        "train.max_epochs=1", "train.progress=false"]


def test_grid_points():
    assert grid_points({"train.lr": [1, 2], "model.dropout": [0, 0.5]}, True) == [
        {"train.lr": 1, "model.dropout": 0}, {"train.lr": 1, "model.dropout": 0.5},
        {"train.lr": 2, "model.dropout": 0}, {"train.lr": 2, "model.dropout": 0.5}]
    assert grid_points({"train.lr": [1, 2]}, False) == [{}]


def test_benchmark_search_seeds_and_resume(tiny_data, tmp_path):
    spec = BenchmarkSpec(data=tiny_data, models=["dnn", "din"], seeds=2, overrides=FAST,
                         grid={"train.lr": [0.001, 0.003]})
    out = tmp_path / "b"
    payload = run_benchmark(spec, out, log=lambda m: None)
    dnn = payload["models"]["dnn"]
    assert len(dnn["search"]) == 2 and dnn["chosen"] in [{"train.lr": 0.001}, {"train.lr": 0.003}]
    assert dnn["test"]["ctr_auc"]["n"] == 2
    chosen = max(dnn["search"], key=lambda s: s["valid_gauc"])["point"]
    assert dnn["chosen"] == chosen  # selected on validation
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).exists()
    md = (out / "results.md").read_text()
    assert "oracle" in md and "±" in md
    # a second call redoes nothing: every result.json stays as it was
    results = sorted(out.glob("runs/*/*/seed*/result.json"))
    assert len(results) == 2 * (2 + 1)
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_benchmark(spec, out, log=lambda m: None)
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert again["models"]["dnn"]["test"] == json.loads(json.dumps(dnn["test"]))
    assert any(line.endswith(")") and "vs din on ctr_auc" in line for line in rank_summary(payload, "dnn"))


def test_interrupted_run_resumes(tiny_data, tmp_path):
    """A run directory with a saved epoch but no result.json is resumed, not restarted."""
    from qdrank.config import build_config
    from qdrank.data.dataset import SearchLogDataset
    from qdrank.training import checkpoint as ckpt
    from qdrank.training.trainer import Trainer

    spec = BenchmarkSpec(data=tiny_data, models=["dnn"], seeds=1, overrides=[*FAST, "train.max_epochs=2"],
                         search=False)
    out = tmp_path / "b"
    run = out / "runs" / "dnn" / "default" / "seed0"
    cfg = build_config("dnn", overrides=[*spec.overrides, "train.seed=0", "train.max_epochs=1"])
    ds = SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)
    Trainer(cfg, ds, run).fit()
    (run / "result.json").unlink()  # as if killed after epoch 1
    first_epoch = json.loads((run / ckpt.STATE_DIR / ckpt.STATE_JSON).read_text())["epoch"]
    run_benchmark(spec, out, log=lambda m: None)
    lines = (run / ckpt.METRICS).read_text().splitlines()
    assert first_epoch == 0 and [json.loads(x)["epoch"] for x in lines] == [0, 1]
