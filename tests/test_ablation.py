"""`qdrank ablate diffusiongs` and `qdrank explain` end to end on the tiny synthetic data."""

from __future__ import annotations

import json

import pytest

from qdrank.cli import main
from qdrank.evaluation.ablation import DEFAULT_LAYERS, TABLES, variants

FAST = ["data.max_history=10", "data.query_buckets=1000", "model.dim=8", "train.batch_size=2048",
        "train.max_epochs=1", "train.progress=false", "model.heads=1"]


def test_variants_cover_every_table_row_once():
    labels = [v.label for v in variants()]
    assert len(labels) == len(set(labels)) == 10  # default shared by all tables
    switches = {tuple(v.overrides) for v in variants()}
    for rows in TABLES.values():
        for _, ov in rows:
            assert tuple([] if ov == DEFAULT_LAYERS else ov) in switches


def test_ablate_and_explain_cli(tiny_data, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "diffusiongs", "--data", str(tiny_data), "--seeds", "1", "--out", str(out)]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert set(res["tables"]) == set(TABLES)
    assert [r["model"] for r in res["tables"]["Figure 4: number of layers"]] == ["2 layers", "4 layers", "6 layers",
                                                                               "8 layers"]
    for rows in res["tables"].values():
        for r in rows:
            assert 0.0 <= r["serving_ctr_auc"]["mean"] <= 1.0
    gap = res["denoise_gap"]
    assert gap is not None and abs(gap["auc_gap_mean"]) < 0.05
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "ablation.md").read_text()
    assert "Table 3" in md and "--set model.injection=cat" in md

    # explain a test request with a non-empty history, from the default variant's run
    run = out / "runs" / "diffusiongs" / "default" / "seed0"
    import numpy as np

    from qdrank.data.dataset import SearchLogDataset
    from qdrank.training.checkpoint import load_model

    _, cfg, fmap = load_model(run)
    ds = SearchLogDataset(tiny_data, cfg.data, fmap=fmap, log=lambda m: None)
    rows = ds.requests_of("test")
    row = rows[np.argmax(ds.hist_end[rows] - ds.hist_start[rows])]
    png = tmp_path / "fig3.png"
    assert main(["explain", str(run), "--request", str(int(ds.request_id[row])), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "correlation" in capsys.readouterr().out

    # steering over many requests, against the generator's ground-truth intent
    png2 = tmp_path / "steering.png"
    assert main(["explain", str(run), "--steering", "40", "--out", str(png2)]) == 0
    printed = capsys.readouterr().out
    assert "ground truth (true_intent)" in printed and "mean correlation" in printed
    assert png2.read_bytes()[:4] == b"\x89PNG"
    from qdrank.evaluation.explain import _relevance, steering

    res = steering(run, None, 40, tmp_path / "s2.png")
    assert res["measured"] > 10 and -1 <= res["mean_correlation"] <= 1
    # the ground truth is exactly "the history item's category is the request's intent"
    import pandas as pd

    model, _, _ = load_model(run)
    b = ds.make_batch(rows[:6])
    req = pd.read_parquet(tiny_data / "requests.parquet").set_index("request_id")["true_intent"]
    intents = [req[int(r)] for r in b.request_id]
    rel, src = _relevance(fmap, model, b, intents)
    items = pd.read_parquet(tiny_data / "items.parquet").set_index("item_id")["category"]
    for r in range(b.n_requests):
        for t in range(int(b.hist_len[r])):
            item = int(fmap.item_vocab[int(b.hist_item[r, t]) - 2])
            assert rel[r, t] == float(items[item] == intents[r])
    # without ground truth: the share of the query's words found in the item's title/category
    rel2, src2 = _relevance(fmap, model, b, [None] * b.n_requests)
    assert "overlap" in src2 and bool(((rel2 >= 0) & (rel2 <= 1)).all())
    assert float(rel2[b.hist_mask].mean()) > 0


def test_explain_rejects_models_without_dynamic_interest(tiny_dataset, tmp_path):
    from conftest import tiny_config

    from qdrank.evaluation.explain import explain_request
    from qdrank.training.trainer import Trainer

    _, ds = tiny_dataset
    Trainer(tiny_config("dnn", "train.max_epochs=1"), ds, tmp_path / "r").fit()
    with pytest.raises(ValueError, match="no dynamic interest"):
        explain_request(tmp_path / "r", None, int(ds.request_id[0]), tmp_path / "x.png")


def test_ablate_ifusion_cli(tiny_data, tmp_path):
    """iFusion's Figure 3 (CFG vs DCFG, AR vs NAR, consistency) and Figure 4a (schedule x steps)."""
    from qdrank.evaluation.ablation import IFUSION_STEPS, IFUSION_TABLES

    labels = [v.label for v in variants("ifusion")]
    assert len(labels) == len(set(labels)) == 7  # the default shared by all figures
    out = tmp_path / "abl_if"
    args = ["ablate", "ifusion", "--data", str(tiny_data), "--seeds", "1", "--out", str(out)]
    for s in [*FAST, "model.short_len=4", "model.sessions=2", "model.diffusion_steps=10"]:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert res["model"] == "ifusion" and set(res["tables"]) == set(IFUSION_TABLES)
    for rows in res["tables"].values():
        for row in rows:
            assert 0 <= row["serving_ctr_auc"]["mean"] <= 1
    # the schedules' runs re-scored at every step count the schedule has (T = 10 here)
    for by_k in res["steps"].values():
        assert set(by_k) == {str(k) for k in IFUSION_STEPS if k <= 10}
    md = (out / "ablation.md").read_text()
    assert "Figure 3a" in md and "Figure 4a" in md and "--set model.guidance=cfg" in md
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_ablate_tables_select_a_subset(tiny_data, tmp_path, capsys):
    """``--tables`` trains only the variants of the named tables; an unknown name is a clear error."""
    from qdrank.evaluation.ablation import IFUSION_TABLES, select_tables

    assert list(select_tables("ifusion", ["figure4a"])) == ["Figure 4a: noise schedule"]
    assert [v.label for v in variants("ifusion", select_tables("ifusion", ["Figure 4a"]))] == [
        "ifusion", "ifusion[schedule=linear]", "ifusion[schedule=sqrt]"]
    assert list(select_tables("diffusiongs", ["figure4", "table3"])) == ["Table 3: query injection",
                                                                          "Figure 4: number of layers"]
    assert select_tables("ifusion") == IFUSION_TABLES
    with pytest.raises(ValueError, match="unknown table.*figure3a, figure3b"):
        select_tables("ifusion", ["table3"])
    assert main(["ablate", "ifusion", "--data", str(tiny_data), "--tables", "figure9", "--out",
                 str(tmp_path / "bad")]) != 0
    assert "figure4a" in capsys.readouterr().err

    out = tmp_path / "abl_3b"
    args = ["ablate", "ifusion", "--data", str(tiny_data), "--seeds", "1", "--tables", "figure3b", "--out", str(out)]
    for s in [*FAST, "model.short_len=4", "model.sessions=2", "model.diffusion_steps=10"]:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert list(res["tables"]) == ["Figure 3b: session fusion"] and res["steps"] == {}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["ifusion", "ifusion[fusion=nar]"]
    assert not (out / "ablation.png").exists()
