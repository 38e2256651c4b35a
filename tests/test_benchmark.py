"""Benchmark protocol: search on validation, seeds aggregated, finished runs never redone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qdrank.config import build_config
from qdrank.evaluation.benchmark import (
    BASELINES,
    DEFAULT_GRID,
    REPORT_SCHEMA,
    BenchmarkSpec,
    Variant,
    benchmark_tables,
    compute_verdicts,
    grid_points,
    ordered_variants,
    paired_comparison,
    run_benchmark,
)
from qdrank.evaluation.report import aggregate

FAST = ["data.max_history=10", "data.query_buckets=1000", "model.dim=8", "train.batch_size=1024",
        "train.max_epochs=1", "train.progress=false"]


def test_grid_points():
    assert grid_points({"train.lr": [1, 2], "model.dropout": [0, 0.5]}, True) == [
        {"train.lr": 1, "model.dropout": 0}, {"train.lr": 1, "model.dropout": 0.5},
        {"train.lr": 2, "model.dropout": 0}, {"train.lr": 2, "model.dropout": 0.5}]
    assert grid_points({"train.lr": [1, 2]}, False) == [{}]


@pytest.mark.parametrize("point", grid_points(DEFAULT_GRID, True), ids=str)
def test_default_grid_points_are_valid_settings(point):
    """Every point of the default search reaches the config it names (a misspelt key would fail)."""
    cfg = build_config("din", overrides=[f"{k}={v}" for k, v in point.items()])
    for key, value in point.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


def test_benchmark_search_seeds_and_resume(tiny_data, tmp_path):
    spec = BenchmarkSpec(data=tiny_data, models=["dnn", "din"], seeds=2, overrides=FAST,
                         grid={"train.lr": [0.001, 0.003]}, baselines=False)
    out = tmp_path / "b"
    payload = run_benchmark(spec, out, log=lambda m: None)
    dnn = payload["models"]["dnn"]
    assert len(dnn["search"]) == 2 and dnn["chosen"] in [{"train.lr": 0.001}, {"train.lr": 0.003}]
    assert dnn["test"]["serving_ctr_gauc"]["n"] == 2 and dnn["test"]["as_shown_ctr_gauc"]["n"] == 2
    chosen = max(dnn["search"], key=lambda s: s["valid_gauc"])["point"]
    assert dnn["chosen"] == chosen  # selected on validation (serving GAUC)
    assert dnn["best_epoch"] == [0, 0] and dnn["converged"] == [False, False]  # 1 epoch: best is the last
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).exists()
    md = (out / "results.md").read_text()
    assert "oracle (ranks by true_rel)" in md and "oracle (ranks by true_ctr)" in md and "±" in md
    assert "serving family (primary)" in md and "as_shown family (secondary)" in md
    assert "not converged: 2/2" in md and "vs true_rel" in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == REPORT_SCHEMA and saved["primary_metric"] == "serving_ctr_gauc"
    assert saved["order"] == ["dnn", "din"] and saved["oracle"]["oracle_serving_ctr_gauc"] > 0.5
    assert set(saved["verdicts"]["pairwise"]["dnn"]) == {"din"}
    assert saved["verdicts"]["pairwise"]["dnn"]["din"]["n"] == 2
    # simulated data: the same paired verdicts on NDCG@10 against true_rel, per seed
    rel = saved["verdicts_rel_ndcg"]
    assert rel["metric"] == "serving_rel_ndcg10" and rel["pairwise"]["dnn"]["din"]["n"] == 2
    assert rel["pairwise"]["dnn"]["din"]["diffs"] == pytest.approx(np.subtract(
        dnn["test"]["serving_rel_ndcg10"]["values"], payload["models"]["din"]["test"]["serving_rel_ndcg10"]["values"]))
    assert "NDCG@10 against true_rel" in md and "score the same in both families" not in md
    # a second call redoes nothing: every result.json stays as it was
    results = sorted(out.glob("runs/*/*/seed*/result.json"))
    assert len(results) == 2 * (2 + 1)
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_benchmark(spec, out, log=lambda m: None)
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert again["models"]["dnn"]["test"] == json.loads(json.dumps(dnn["test"]))


def test_paired_comparison_t_interval_and_verdicts():
    from scipy import stats

    a, b = [0.71, 0.72, 0.70, 0.73, 0.72], [0.70, 0.70, 0.69, 0.71, 0.70]
    c = paired_comparison(a, b)
    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert c["n"] == 5 and c["diff_mean"] == pytest.approx(d.mean())
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert c["verdict"] == "wins" and paired_comparison(b, a)["verdict"] == "loses"
    # a mean difference inside the seeds' paired noise ties
    assert paired_comparison([0.71, 0.69, 0.72, 0.68, 0.70], [0.70, 0.70, 0.70, 0.70, 0.70])["verdict"] == "ties"
    # pairs with a NaN are dropped; one pair has no interval and ties
    one = paired_comparison([0.8, float("nan")], [0.7, 0.7])
    assert one["n"] == 1 and one["verdict"] == "ties" and math.isnan(one["ci_low"])


def test_baselines_come_first_in_one_fixed_order():
    spec = BenchmarkSpec(data=".", models=["dnn", "gbdt", "din", "popularity", Variant("x", "logged_order")],
                         baselines=False)
    assert [v.label for v in ordered_variants(spec)] == ["x", "popularity", "gbdt", "dnn", "din"]
    assert BASELINES[0] == "logged_order"
    # with baselines=True only registered ones are added (none is unknown to the registry)
    from qdrank.models.registry import available_models

    added = [v.model for v in ordered_variants(BenchmarkSpec(data=".", models=["dnn"]))]
    assert added[-1] == "dnn" and all(m in available_models() for m in added)


def test_rows_trained_without_the_position_tower_are_named():
    from qdrank.evaluation.benchmark import _has_position_tower

    spec = BenchmarkSpec(data=".", models=[], overrides=["model.position_bias=false"])
    assert not _has_position_tower(spec, {"model": "din", "chosen": {}})
    assert _has_position_tower(spec, {"model": "din", "chosen": {"model.position_bias": True}})  # the search point wins
    assert _has_position_tower(BenchmarkSpec(data=".", models=[]), {"model": "din", "chosen": {}, "overrides": []})
    assert not _has_position_tower(BenchmarkSpec(data=".", models=[]),
                                   {"model": "din", "chosen": {"model.position_bias": False}})


def _fake(kind, values, logged=False, best=(2, 3, 4), conv=(True, True, False)):
    keys = ("serving_ctr_gauc", "as_shown_ctr_gauc", "serving_ctr_auc", "as_shown_ctr_auc")
    runs = [{k: (float("nan") if logged and k.startswith("serving") else v) for k in keys} for v in values]
    return {"model": "m", "kind": kind, "uses_logged_position": logged, "test": aggregate(runs, keys),
            "best_epoch": list(best), "converged": list(conv), "n_parameters": 1000,
            "train_seconds": {"mean": 1.0}, "infer_ms_per_request": {"mean": 0.1}, "oracle": {}}


def test_tables_and_verdicts_logged_position_and_best_baseline():
    per = {"logged_order": _fake("baseline", [0.9, 0.9, 0.9], logged=True),
           "popularity": _fake("baseline", [0.60, 0.60, 0.60]),
           "gbdt": _fake("baseline", [0.65, 0.66, 0.64]),
           "dnn": _fake("learned", [0.70, 0.71, 0.705]),
           "din": _fake("learned", [0.64, 0.66, 0.65])}
    v = compute_verdicts(per)
    assert v["best_baseline"] == "gbdt"  # logged_order has no serving score: never the best baseline
    assert v["vs_best_baseline"]["dnn"]["verdict"] == "wins"
    assert v["vs_best_baseline"]["din"]["verdict"] == "ties"
    assert v["pairwise"]["din"]["dnn"]["verdict"] == "loses"
    tables, _, md = benchmark_tables(BenchmarkSpec(data=".", models=[]), per, v)
    serving = {r["model"]: r for r in tables["serving"]}
    assert serving["logged_order (baseline)"]["serving_ctr_gauc"] == "n/a"
    assert {r["model"]: r for r in tables["as_shown"]}["logged_order (baseline)"]["as_shown_ctr_gauc"]["mean"] == 0.9
    assert serving["dnn"]["best_epoch"] == "3,4,5 (not converged: 1/3)"
    assert serving["gbdt (baseline)"]["best_epoch"] == "n/a"
    assert md.index("logged_order") < md.index("| dnn")


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


def test_variant_rows_from_the_command_line(tiny_data, tmp_path, capsys):
    """``--variant LABEL=MODEL:key=value`` adds a row: the model with its own overrides, beside the
    plain models; a malformed or duplicate one is refused in one line (exit 2)."""
    from qdrank.cli import main

    out = tmp_path / "v"
    args = ["benchmark", "--data", str(tiny_data), "--models", "dnn", "--variant", "dnn_w4=dnn:model.dim=4",
            "--seeds", "1", "--no-search", "--no-baselines", "--out", str(out)]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["order"] == ["dnn", "dnn_w4"] and saved["models"]["dnn_w4"]["model"] == "dnn"
    cfg = {p.parts[-4]: json.loads((p.parent / "config.json").read_text()) for p in out.glob("runs/*/*/seed0/result.json")}
    assert cfg["dnn_w4"]["model"]["dim"] == 4 and cfg["dnn"]["model"]["dim"] == 8
    for bad, why in (("dnn_w4", "LABEL=MODEL"), ("a/b=dnn", "label"), ("x=dnn:dim", "section.key=value"),
                     ("dnn=dnn:model.dim=4", "twice")):
        capsys.readouterr()
        assert main([*args[:5], "--variant", bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err
    # a well-formed row naming an unknown model or key fails before any row trains
    for bad, why in (("x=nosuch", "unknown model 'nosuch'"), ("x=dnn:model.nosuch=1", "unknown key 'model.nosuch'")):
        capsys.readouterr()
        late = tmp_path / f"late_{bad.split('=')[1].split(':')[0]}"
        late_args = list(args)
        late_args[late_args.index("--out") + 1] = str(late)
        assert main([*late_args, "--variant", bad]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and not (late / "runs").exists()
