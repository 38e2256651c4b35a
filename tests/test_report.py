import json
import math
from pathlib import Path

import numpy as np
import pytest

from qdrank.evaluation.report import aggregate, bar_plot, format_value, markdown_table, write_report
from qdrank.utils.io import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows():
    runs_a = [{"ctr_auc": 0.70, "cvr_auc": 0.80}, {"ctr_auc": 0.72, "cvr_auc": float("nan")}]
    runs_b = [{"ctr_auc": 0.75, "cvr_auc": 0.78}, {"ctr_auc": 0.77, "cvr_auc": 0.79}]
    return [
        {"model": "A", **aggregate(runs_a, ["ctr_auc", "cvr_auc"])},
        {"model": "B", **aggregate(runs_b, ["ctr_auc", "cvr_auc"]), "note": "ours"},
        {"model": "C", "ctr_auc": 0.74},
    ]


def test_aggregate_mean_std_nan():
    runs = [{"a": 1.0, "b": float("nan")}, {"a": 2.0, "b": float("nan")}, {"a": 4.0}]
    agg = aggregate(runs, ["a", "b", "c"])
    assert agg["a"]["mean"] == pytest.approx(7 / 3)
    assert agg["a"]["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert agg["a"]["n"] == 3 and agg["a"]["values"] == [1.0, 2.0, 4.0]
    assert math.isnan(agg["b"]["mean"]) and agg["b"]["n"] == 0 and agg["b"]["std"] == 0.0
    assert agg["c"]["n"] == 0 and agg["c"]["values"] == []
    one = aggregate([{"a": 0.5}, {"a": float("nan")}], ["a"])["a"]
    assert one["mean"] == 0.5 and one["std"] == 0.0 and one["n"] == 1
    assert isinstance(aggregate([{"a": np.float32(0.5)}], ["a"])["a"]["mean"], float)


def test_markdown_table_renders_pm_bold_and_missing():
    md = markdown_table(
        _rows(),
        [("ctr_auc", "CTR AUC"), ("cvr_auc", "CVR AUC"), ("note", "Note")],
        title="Results",
        bold_best={"ctr_auc", "cvr_auc"},
    )
    lines = md.strip().splitlines()
    assert lines[0] == "### Results"
    assert "| Model | CTR AUC | CVR AUC | Note |" in lines
    assert "±" in md
    row_a = next(ln for ln in lines if ln.startswith("| A "))
    row_b = next(ln for ln in lines if ln.startswith("| B "))
    row_c = next(ln for ln in lines if ln.startswith("| C "))
    assert "**0.7600 ± 0.0141**" in row_b  # best CTR AUC
    assert "| **0.8000** |" in row_a  # best CVR AUC (NaN seed skipped: one value, no spread shown)
    assert "ours" in row_b
    assert row_c.count("–") == 2  # missing cvr_auc and note
    assert md.count("**") == 4


def test_format_value():
    assert format_value(0.71234) == "0.7123"
    assert format_value({"mean": 0.7123, "std": 0.0021}) == "0.7123 ± 0.0021"
    assert format_value(float("nan")) == "–"
    assert format_value(None) == "–"
    assert format_value(12) == "12"
    assert format_value("a|b") == "a\\|b"


def test_bar_plot_writes_png(tmp_path):
    path = bar_plot(_rows(), ["ctr_auc", "cvr_auc"], tmp_path / "plot.png", "t", reference={"ctr_auc": 0.8})
    data = Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_serving_plot_adds_the_paired_panel_with_verdicts(tmp_path):
    """With verdicts the figure gains a panel of paired differences (wider), a NaN interval included."""
    from qdrank.evaluation.report import serving_plot

    def row(kind, values):
        return {"kind": kind, "uses_logged_position": False, "test": aggregate([{"g": v} for v in values], ["g"])}

    models = {"gbdt": row("baseline", [0.70, 0.71]), "din": row("learned", [0.72, 0.73]),
              "dnn": row("learned", [0.69, 0.70])}
    verdicts = {"best_baseline": "gbdt", "vs_best_baseline": {
        "din": {"diff_mean": 0.02, "ci_low": 0.01, "ci_high": 0.03, "verdict": "wins"},
        "dnn": {"diff_mean": -0.01, "ci_low": float("nan"), "ci_high": float("nan"), "verdict": "ties"}}}
    plain = serving_plot(models, "g", tmp_path / "a.png", "t", reference=0.8)
    panel = serving_plot(models, "g", tmp_path / "b.png", "t", reference=0.8, verdicts=verdicts)

    def width(p):  # PNG IHDR: big-endian width at bytes 16..20
        return int.from_bytes(Path(p).read_bytes()[16:20], "big")

    assert Path(panel).read_bytes().startswith(PNG_MAGIC) and width(panel) > width(plain)


def test_write_report_json_md_png(tmp_path):
    rows = _rows()
    payload = {"rows": rows, "x": np.float32(1.5), "n": np.int64(3), "arr": np.array([1.0, np.nan]),
               "inf": float("inf")}
    md = markdown_table(rows, [("ctr_auc", "CTR AUC")])
    paths = write_report(tmp_path / "out", "bench", payload, md,
                         plot=lambda p: bar_plot(rows, ["ctr_auc", "cvr_auc"], p, "t"))
    assert set(paths) == {"json", "md", "png"}
    text = paths["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    obj = json.loads(text)
    assert obj["x"] == 1.5 and obj["n"] == 3 and obj["arr"] == [1.0, None] and obj["inf"] is None
    assert obj["rows"][0]["cvr_auc"]["values"][1] is None
    assert text.startswith("{\n  ")  # indent=2
    assert paths["md"].read_text() == md
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md", "bench.png"]
    # without a plot, only json + md
    paths2 = write_report(tmp_path / "out2", "r", {"a": 1}, "x", plot=None)
    assert set(paths2) == {"json", "md"} and paths2["md"].read_text() == "x\n"
    # rewritten without a plot, the earlier report's plot goes: it would not show this report
    write_report(tmp_path / "out", "bench", payload, md, plot=None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md"]


def test_atomic_writes_leave_no_temp_files(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "t.txt", "hello")
    assert p.read_text() == "hello"
    atomic_write_text(p, "again")  # overwrite
    assert p.read_text() == "again"
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "a" / "c.json", {"v": float("nan"), "w": [np.int32(2)]})
    assert json.loads((tmp_path / "a" / "c.json").read_text()) == {"v": None, "w": [2]}
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == ["b.bin", "c.json", "t.txt"]


def test_atomic_output_failure_keeps_old_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["x.txt"]
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "y.json", {"bad": object()})
    assert [x.name for x in tmp_path.iterdir()] == ["x.txt"]
