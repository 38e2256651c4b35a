"""Tables and plots that every command writes: aggregation over seeds, Markdown tables,
grouped bar charts and an atomic ``write_report`` (``name.json`` + ``name.md`` + ``name.png``).

A *row* is ``{"model": "DIN", "<metric key>": value, ...}`` where a value is a float, an int,
a string, or an aggregate ``{"mean": .., "std": .., ...}`` as returned by :func:`aggregate`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qdrank.utils.io import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["aggregate", "bar_plot", "family_rows", "format_value", "markdown_table", "serving_plot", "write_report"]

MISSING = "–"  # en dash


# --------------------------------------------------------------------------- aggregation


def _as_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def aggregate(runs: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Mean / sample std over per-seed runs of one model.

    Returns ``{key: {"mean", "std", "n", "values"}}``. NaN (or ``None``) values are skipped;
    ``n`` counts the non-NaN values used, ``std`` is the sample std (ddof=1) when ``n > 1`` else 0.0,
    ``mean`` is NaN when ``n == 0``. ``values`` lists every value found (NaN included) in run
    order; runs without the key are ignored.
    """
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [_as_float(r[key]) if r.get(key) is not None else float("nan") for r in runs if key in r]
        used = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
        n = int(used.size)
        mean = float(used.mean()) if n else float("nan")
        std = float(used.std(ddof=1)) if n > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "n": n, "values": values}
    return out


# --------------------------------------------------------------------------- markdown


def _mean_of(v: Any) -> float:
    """Comparable number of a cell (aggregate -> mean); NaN when not numeric."""
    if isinstance(v, Mapping):
        return _as_float(v.get("mean"))
    if isinstance(v, bool) or isinstance(v, str) or v is None:
        return float("nan")
    return _as_float(v)


def format_value(v: Any, digits: int = 4) -> str:
    """Render one cell: float -> ``0.7123``, aggregate -> ``0.7123 ± 0.0021`` (mean alone when it has
    ``n`` < 2 values), missing -> ``–``."""
    if v is None:
        return MISSING
    if isinstance(v, Mapping):
        mean = _as_float(v.get("mean"))
        if math.isnan(mean):
            return MISSING
        std = _as_float(v.get("std"))
        if math.isnan(std) or v.get("n", 2) < 2:  # one value has no spread to show
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return MISSING if math.isnan(float(v)) else f"{float(v):.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    title: str | None = None,
    bold_best: set[str] | None = None,
    digits: int = 4,
) -> str:
    """GitHub Markdown table, one line per row.

    ``columns`` are ``(key, header)`` pairs; a ``"model"`` column is prepended unless listed.
    For every key in ``bold_best`` (metrics where higher is better) the cell(s) with the
    highest mean are bolded. ``title`` becomes a ``###`` heading above the table.
    """
    cols = list(columns)
    if not any(k == "model" for k, _ in cols):
        cols = [("model", "Model"), *cols]
    bold_best = bold_best or set()
    best: dict[str, float] = {}
    for key in bold_best:
        means = [m for m in (_mean_of(r.get(key)) for r in rows) if not math.isnan(m)]
        if means:
            best[key] = max(means)

    lines: list[str] = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(h for _, h in cols) + " |")
    lines.append("|" + "|".join(":---" if k == "model" else "---:" for k, _ in cols) + "|")
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            text = format_value(v, digits)
            if key in best and text != MISSING and _mean_of(v) == best[key]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def family_rows(name: str, m: Mapping[str, Any]) -> tuple[list[dict], list[tuple[str, str]]]:
    """One metrics dict of :func:`qdrank.evaluation.evaluate.evaluate` as table rows: one row per
    metric family (serving first), then the oracle rows on simulated data. Returns (rows, columns)."""
    fams = ("serving", "as_shown")
    keys = ("ctr_auc", "ctr_gauc", "ctr_gauc_w", "ctr_logloss", "cvr_auc", "cvr_gauc")
    rows: list[dict] = []
    for fam in fams:
        if f"{fam}_ctr_auc" in m:
            rows.append({"model": name, "family": fam, **{k: m[f"{fam}_{k}"] for k in keys if f"{fam}_{k}" in m}})
        else:
            rows.append({"model": name, "family": fam, **dict.fromkeys(keys, "n/a")})
    if "serving_rel_gauc" in m:
        rows[0].update(rel_gauc=m["serving_rel_gauc"], rel_ndcg10=m.get("serving_rel_ndcg10"))
    for fam, what in (("serving", "true_rel"), ("as_shown", "true_ctr")):
        o = {k: m[f"oracle_{fam}_{k}"] for k in keys if f"oracle_{fam}_{k}" in m}
        if o:
            rows.append({"model": f"oracle (ranks by {what})", "family": fam, **o})
    present = [k for k in keys if any(k in r and r[k] != "n/a" for r in rows)]
    cols = [("family", "Family"), *((k, k) for k in present)]
    if "serving_rel_gauc" in m:
        cols += [("rel_gauc", "GAUC vs true_rel"), ("rel_ndcg10", "NDCG@10 vs true_rel")]
    return rows, cols


# --------------------------------------------------------------------------- plots


VERDICT_COLOURS = {"wins": "tab:green", "loses": "tab:red", "ties": "0.45"}


def serving_plot(models: Mapping[str, Mapping[str, Any]], metric: str, path: str | Path, title: str,
                 reference: float | None = None, verdicts: Mapping[str, Any] | None = None) -> Path:
    """One bar per model: mean of ``metric`` over seeds, std error bar and every seed as a dot.

    ``models`` is the benchmark's ``per_model`` (``{"kind", "uses_logged_position", "test":
    {metric: aggregate}}``); baselines are grey and hatched, a model without the metric's family
    shows "n/a"; ``reference`` (the oracle) is a dashed line. With ``verdicts`` (the benchmark's
    :func:`compute_verdicts`), a second panel shows each learned model's paired difference to the
    best baseline with its 95% interval: the differences that decide a verdict are often too small
    to see on the bars.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    names = list(models)
    paired = dict((verdicts or {}).get("vs_best_baseline") or {})
    width = max(4.0, 0.62 * len(names) + 1.6)
    fig = Figure(figsize=(width + (3.6 if paired else 0.0), 4.4), dpi=120)
    FigureCanvasAgg(fig)
    if paired:
        ax, ax_diff = fig.subplots(1, 2, gridspec_kw={"width_ratios": [width, 3.6]})
    else:
        ax, ax_diff = fig.subplots(), None
    lo_vals: list[float] = []
    hi_vals: list[float] = []
    for i, name in enumerate(names):
        r = models[name]
        agg = r["test"].get(metric, {})
        mean, std = _mean_std(agg)
        base = r.get("kind") == "baseline"
        if math.isnan(mean):
            ax.annotate("n/a", xy=(i, 0.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8, color="0.4")
            continue
        ax.bar(i, mean, yerr=std, width=0.7, color="0.75" if base else "tab:blue", hatch="//" if base else None,
               edgecolor="0.35", capsize=3, zorder=2)
        seeds = [v for v in agg.get("values", []) if v is not None and not math.isnan(_as_float(v))]
        ax.scatter([i] * len(seeds), seeds, s=9, color="black", zorder=3)
        top = max([mean + std, *seeds])  # above the error bar and every seed's dot
        ax.annotate(f"{mean:.4f}", xy=(i, top), xytext=(0, 4), textcoords="offset points", ha="center",
                    va="bottom", fontsize=7, rotation=90 if len(names) > 6 else 0, zorder=4,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        lo_vals += [mean - std, *seeds]
        hi_vals += [mean + std, *seeds]
    handles = [Patch(facecolor="0.75", hatch="//", edgecolor="0.35", label="baseline"),
               Patch(facecolor="tab:blue", edgecolor="0.35", label="learned model")]
    if reference is not None and not math.isnan(_as_float(reference)):
        # named in the legend, not beside the line, where it would cover the bars' labels
        handles.append(ax.axhline(float(reference), color="0.2", linestyle="--", linewidth=1.2, zorder=1,
                                  label=f"oracle {float(reference):.4f}"))
        lo_vals.append(float(reference))
        hi_vals.append(float(reference))
    if lo_vals:
        lo, hi = min(lo_vals), max(hi_vals)
        span = max(hi - lo, 1e-3)
        ax.set_ylim(max(lo - 0.35 * span, 0.0), hi + 0.45 * span)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                       fontsize=8)
    ax.set_ylabel(metric)
    ax.grid(axis="y", linestyle=":", linewidth=0.6, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    if ax_diff is not None:
        _paired_panel(ax_diff, paired, str(verdicts.get("best_baseline")))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _paired_panel(ax, paired: Mapping[str, Mapping[str, Any]], baseline: str) -> None:
    """Each model's mean paired difference to ``baseline`` with its 95% interval, coloured by verdict."""
    names = list(paired)[::-1]  # the first model on top
    for y, name in enumerate(names):
        c = paired[name]
        mean, lo, hi = (_as_float(c.get(k)) for k in ("diff_mean", "ci_low", "ci_high"))
        colour = VERDICT_COLOURS.get(str(c.get("verdict")), "0.45")
        if not (math.isnan(lo) or math.isnan(hi)):
            ax.plot([lo, hi], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
        ax.plot([mean], [y], "o", color=colour, markersize=5)
        ax.annotate(str(c.get("verdict")), xy=(mean, y), xytext=(0, 5), textcoords="offset points",
                    ha="center", fontsize=7, color=colour)
    ax.axvline(0.0, color="0.2", linewidth=1.0, linestyle="--")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel(f"paired difference to {baseline} (95% CI)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", linestyle=":", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(f"vs best baseline ({baseline})", fontsize=9)


def _mean_std(v: Any) -> tuple[float, float]:
    if isinstance(v, Mapping):
        std = _as_float(v.get("std", 0.0))
        return _as_float(v.get("mean")), 0.0 if math.isnan(std) else std
    return _mean_of(v), 0.0


def bar_plot(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    path: str | Path,
    title: str,
    reference: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    digits: int = 4,
) -> Path:
    """Grouped bar chart (one group per metric, one bar per model) with std error bars.

    Each metric gets its own panel with a y-axis zoomed to its data range (AUCs of
    competing models differ in the 2nd-3rd decimal, and metrics such as AUC and logloss
    live on different scales). ``reference`` draws a dashed horizontal line per metric
    (e.g. an oracle ceiling). Saved as PNG (Agg backend, dpi 120) atomically at ``path``.
    """
    # Object-oriented API on an explicit Agg canvas: no pyplot global state, no display.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    reference = dict(reference or {})
    labels = dict(labels or {})
    models = [str(r.get("model", f"model{i}")) for i, r in enumerate(rows)]
    n_models, n_metrics = len(models), max(len(metrics), 1)
    cmap = matplotlib.colormaps["tab10" if n_models <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(n_models)]

    panel_w = max(2.6, 0.55 * n_models + 1.0)
    fig = Figure(figsize=(min(panel_w * n_metrics + 0.6, 30.0), 4.6), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_metrics, squeeze=False)[0]
    rotate = n_models > 4
    for ax, metric in zip(axes, metrics):
        ms = [_mean_std(r.get(metric)) for r in rows]
        means = np.array([m for m, _ in ms], dtype=np.float64)
        stds = np.array([s for _, s in ms], dtype=np.float64)
        x = np.arange(n_models)
        ok = ~np.isnan(means)
        ax.bar(x[ok], means[ok], yerr=stds[ok], color=[colors[i] for i in x[ok]], width=0.75,
               capsize=3, error_kw={"elinewidth": 1.0, "ecolor": "0.25"}, zorder=2)
        lo_vals = list(means[ok] - stds[ok])
        hi_vals = list(means[ok] + stds[ok])
        ref = reference.get(metric)
        if ref is not None and not math.isnan(_as_float(ref)):
            ref = float(ref)
            ax.axhline(ref, color="0.2", linestyle="--", linewidth=1.2, zorder=3)
            ax.annotate(f"ref {ref:.{digits}f}", xy=(1.0, ref), xycoords=("axes fraction", "data"),
                        xytext=(-2, 3), textcoords="offset points", ha="right", va="bottom",
                        fontsize=8, color="0.2")
            lo_vals.append(ref)
            hi_vals.append(ref)
        if lo_vals:
            lo, hi = float(np.min(lo_vals)), float(np.max(hi_vals))
            span = max(hi - lo, 1e-3 * max(abs(hi), 1.0), 1e-9)
            lo_lim = lo - 0.35 * span
            if lo >= 0.0:
                lo_lim = max(lo_lim, 0.0)
            ax.set_ylim(lo_lim, hi + 0.45 * span)
        for i in x[ok]:
            ax.annotate(f"{means[i]:.{digits}f}", xy=(i, means[i] + stds[i]), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7.5,
                        rotation=90 if rotate else 0, zorder=4)
        if not ok.all():
            for i in x[~ok]:
                ax.annotate("n/a", xy=(i, 0.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=7.5, color="0.4")
        ax.set_title(labels.get(metric, metric), fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(models, rotation=35 if rotate else 0, ha="right" if rotate else "center",
                           fontsize=8)
        ax.grid(axis="y", linestyle=":", linewidth=0.6, zorder=0)
        ax.tick_params(axis="y", labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- report


def write_report(
    out_dir: str | Path,
    name: str,
    payload: Any,
    markdown: str,
    plot: Callable[[Path], Any] | None = None,
) -> dict[str, Path]:
    """Write ``name.json`` (NaN -> null), ``name.md`` and, if ``plot`` is given, ``name.png``.

    ``plot`` is called with a temporary ``.png`` path in ``out_dir`` and must write the
    image there (e.g. ``lambda p: bar_plot(rows, metrics, p, title)``); it is then moved
    onto ``name.png``. Without ``plot`` an earlier ``name.png`` is removed: it would not show
    this report. Every file is written atomically. Returns ``{"json", "md"[, "png"]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {
        "json": atomic_write_json(out_dir / f"{name}.json", payload),
        "md": atomic_write_text(out_dir / f"{name}.md", markdown if markdown.endswith("\n") else markdown + "\n"),
    }
    png = out_dir / f"{name}.png"
    if plot is None:
        png.unlink(missing_ok=True)
        return paths
    with atomic_output(png) as tmp:
        plot(tmp)
    paths["png"] = png
    return paths
