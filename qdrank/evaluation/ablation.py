"""``qdrank ablate diffusiongs``: the paper's ablations (Tables 3-5, Figure 4) as one command.

Every variant is DiffusionGS with one switch changed (``--set model.KEY=VALUE``), trained under
the same budget and seeds with the default hyper-parameters (no per-variant search, so a switch
is the only difference). The default variant is trained once and shared by all tables. Every table
reports both metric families (serving first; see :mod:`qdrank.evaluation.evaluate`). The default
runs are also scored with the full T-step reverse chain to report the gap between the paper's
single-step online mode and T-step denoising.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from qdrank.config import build_config
from qdrank.evaluation.benchmark import METRIC_KEYS, BenchmarkSpec, Variant, point_tag, run_benchmark
from qdrank.evaluation.report import aggregate, markdown_table, write_report

DEFAULT = "diffusiongs"
TABLES: dict[str, list[tuple[str, list[str]]]] = {
    "Table 3: query injection": [("add (default)", []), ("cat", ["model.injection=cat"]),
                                 ("cross", ["model.injection=cross"])],
    "Table 4: User-aware Denoising Layer gate": [("user (default)", []), ("learnt U (HSTU-style)", ["model.gate=learnt"]),
                                                  ("no U (softmax QKV)", ["model.gate=none"])],
    "Table 5: noise intensity": [("default: 50 steps, 0.005-0.01", []), ("no noise", ["model.noise=none"]),
                                 ("heavy: 2000 steps, up to 0.1", ["model.noise=heavy"])],
    "Figure 4: number of layers": [(f"{k} layers", [f"model.layers={k}"]) for k in (2, 4, 6, 8)],
}
DEFAULT_LAYERS = [f"model.layers={build_config(DEFAULT).model.layers}"]  # that row is the default model


# iFusion (its Figure 3 a-c, Figure 4a): one switch per row; the schedules' runs are also scored
# with several inference step counts (Figure 4a is schedule x steps)
IFUSION_TABLES: dict[str, list[tuple[str, list[str]]]] = {
    "Figure 3a: guidance": [("DCFG (default)", []), ("single-gamma CFG", ["model.guidance=cfg"]),
                            ("no guidance (gammas 0)", ["model.gamma_cp=0.0", "model.gamma_tf=0.0"])],
    "Figure 3b: session fusion": [("AR / MARN (default)", []), ("NAR", ["model.fusion=nar"])],
    "Figure 3c: consistency loss": [("on (default)", []), ("off", ["model.cons_weight=0.0"])],
    "Figure 4a: noise schedule": [("cosine (default)", []), ("linear", ["model.schedule=linear"]),
                                  ("sqrt", ["model.schedule=sqrt"])],
}
IFUSION_STEPS = (1, 2, 5, 10, 50)


def table_key(title: str) -> str:
    """A table's short name on the command line: ``"Figure 4a: noise schedule"`` -> ``figure4a``."""
    return title.split(":", 1)[0].replace(" ", "").lower()


def select_tables(model: str = DEFAULT, keys: list[str] | None = None) -> dict[str, list[tuple[str, list[str]]]]:
    """The ablation tables of ``model``, or only those named in ``keys`` (``qdrank ablate --tables``),
    in the paper's order; an unknown name is an error listing the valid ones."""
    spec = IFUSION_TABLES if model == "ifusion" else TABLES
    if not keys:
        return dict(spec)
    by_key = {table_key(t): t for t in spec}
    wanted = [table_key(k) for k in keys if k.strip()]
    unknown = [k for k in wanted if k not in by_key]
    if unknown or not wanted:
        raise ValueError(f"--tables {','.join(keys)!s}: unknown table(s) {unknown} for {model}; choose from: "
                         f"{', '.join(by_key)}")
    return {t: rows for t, rows in spec.items() if table_key(t) in wanted}


def _label(overrides: list[str], model: str = DEFAULT) -> str:
    return model if not overrides else model + "[" + ",".join(o.removeprefix("model.") for o in overrides) + "]"


def variants(model: str = DEFAULT, tables: dict | None = None) -> list[Variant]:
    """One run per distinct switch of ``tables`` (default: all of ``model``'s); the default model once."""
    tables = select_tables(model) if tables is None else tables
    default_rows = DEFAULT_LAYERS if model == DEFAULT else []
    seen: dict[str, Variant] = {}
    for rows in tables.values():
        for _, ov in rows:
            ov = [] if ov == default_rows else ov  # the default depth is the default model
            seen.setdefault(_label(ov, model), Variant(_label(ov, model), model, ov))
    return list(seen.values())


def steps_sweep(out: Path, data: Path, seeds: int, label: str, overrides: list[str], steps: tuple[int, ...]
                ) -> dict[int, dict]:
    """Test metrics of one variant's runs re-scored with each number of inference steps (no retraining)."""
    from qdrank.data.dataset import SearchLogDataset
    from qdrank.evaluation.evaluate import metrics_from_predictions, predict
    from qdrank.training import checkpoint as ckpt
    from qdrank.utils.runtime import resolve_device

    runs = sorted((out / "runs" / label / point_tag({})).glob("seed*"))[:seeds]
    res: dict[int, list] = {k: [] for k in steps}
    ds = None
    for run in runs:
        model, cfg, fmap = ckpt.load_model(run)
        ds = ds or SearchLogDataset(data, cfg.data, fmap=fmap, log=lambda m: None)
        for k in steps:
            if k > model.schedule.steps:
                continue
            model.denoise_steps = k
            res[k].append(metrics_from_predictions(ds, predict(model, ds, "test", cfg.train.eval_batch_size,
                                                               resolve_device("cpu"))))
    return {k: aggregate(v, ["serving_ctr_auc", "serving_ctr_gauc"]) for k, v in res.items() if v}


def denoise_gap(out: Path, data: Path, seeds: int, overrides: list[str]) -> dict | None:
    """Test serving AUC of the default runs with 1 denoising step vs the full T-step chain."""
    from qdrank.data.dataset import SearchLogDataset
    from qdrank.evaluation.evaluate import metrics_from_predictions, predict
    from qdrank.training import checkpoint as ckpt
    from qdrank.utils.runtime import resolve_device

    runs = sorted((out / "runs" / DEFAULT / point_tag({})).glob("seed*"))[:seeds]
    if not runs:
        return None
    res: dict[str, list] = {"1": [], "T": []}
    max_diff = 0.0
    ds = None
    for run in runs:
        model, cfg, fmap = ckpt.load_model(run)
        if getattr(model, "schedule", None) is None:
            return None
        ds = ds or SearchLogDataset(data, cfg.data, fmap=fmap, log=lambda m: None)
        logits = {}
        for key, steps in (("1", 1), ("T", model.schedule.steps)):
            model.denoise_steps = steps
            pred = predict(model, ds, "test", cfg.train.eval_batch_size, resolve_device("cpu"))
            logits[key] = pred["serving_ctr"]
            res[key].append(metrics_from_predictions(ds, pred))
        max_diff = max(max_diff, float(np.abs(logits["1"] - logits["T"]).max()))
    agg = {k: aggregate(v, ["serving_ctr_auc", "serving_ctr_gauc"]) for k, v in res.items()}
    gap = [a["serving_ctr_auc"] - b["serving_ctr_auc"] for a, b in zip(res["1"], res["T"])]
    return {"one_step": agg["1"], "t_steps": agg["T"], "auc_gap_mean": float(np.mean(gap)),
            "auc_gap_max_abs": float(np.max(np.abs(gap))), "max_abs_logit_diff": max_diff}


def run_ablation(data: Path, out: Path, seeds: int = 3, overrides: list[str] | None = None, log=None,
                 model: str = DEFAULT, tables: list[str] | None = None) -> dict:
    """Train every variant of the selected tables (``tables``: short names, default all) and write
    ``ablation.{md,json,png}`` under ``out``."""
    if model not in (DEFAULT, "ifusion"):
        raise ValueError(f"no ablations are defined for {model!r}; choose diffusiongs or ifusion")
    chosen = select_tables(model, tables)
    if model == "ifusion":
        return run_ifusion_ablation(data, out, seeds, overrides, log, chosen)
    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out)
    spec = BenchmarkSpec(data=Path(data), models=variants(DEFAULT, chosen), seeds=seeds, overrides=overrides or [],
                         search=False, base_model=DEFAULT, title=f"DiffusionGS ablation variants on {data}",
                         baselines=False)
    payload = run_benchmark(spec, out, log=log)
    per = payload["models"]
    cols = _columns(per)
    md_parts = [f"# DiffusionGS ablations on `{data}`\n\nmean ± std of test metrics over {seeds} seed(s); "
                "each variant changes one switch of the default model. serving = position-free scores "
                "(primary), as_shown = logged position through the position tower.\n"]
    tables = _tables(per, chosen, DEFAULT_LAYERS, DEFAULT, cols, md_parts)
    gap = denoise_gap(out, Path(data), seeds, overrides or [])
    if gap:
        md_parts.append(f"### Single-step vs T-step denoising (default model, test)\n\n"
                        f"1 step: serving AUC {gap['one_step']['serving_ctr_auc']['mean']:.4f} ± "
                        f"{gap['one_step']['serving_ctr_auc']['std']:.4f}; "
                        f"T steps: serving AUC {gap['t_steps']['serving_ctr_auc']['mean']:.4f} ± "
                        f"{gap['t_steps']['serving_ctr_auc']['std']:.4f}; "
                        f"mean gap (1 - T) {gap['auc_gap_mean']:+.5f}, largest |gap| {gap['auc_gap_max_abs']:.5f}; "
                        f"largest |CTR logit difference| over test impressions {gap['max_abs_logit_diff']:.2e}.\n")
    md = "\n\n".join(md_parts)
    scaling = tables.get("Figure 4: number of layers")

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = [2, 4, 6, 8]
        keys = [k for k, _ in cols]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
        for ax, (k, label) in zip(np.atleast_1d(axes), cols):
            m = [r[k]["mean"] if k in r else np.nan for r in scaling]
            s = [r[k]["std"] if k in r else 0 for r in scaling]
            ax.errorbar(layers, m, yerr=s, marker="o", capsize=4)
            ax.set_xticks(layers)
            ax.set_xlabel("User-aware Denoising Layers")
            ax.set_title(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"DiffusionGS scaling ({Path(data).name}, {seeds} seed(s))")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    result = {"model": DEFAULT, "data": str(data), "seeds": seeds, "tables": tables, "denoise_gap": gap}
    write_report(out, "ablation", result, md, plot=plot if scaling else None)
    print(md)
    print(f"\nwritten: {out}/ablation.md, ablation.json" + (", ablation.png (scaling plot)" if scaling else ""))
    return result


def _columns(per: dict) -> list[tuple[str, str]]:
    return [(k, h) for k, h in (("serving_ctr_auc", "serving CTR AUC"), ("serving_ctr_gauc", "serving CTR GAUC"),
                                ("serving_cvr_auc", "serving CVR AUC"), ("serving_cvr_gauc", "serving CVR GAUC"),
                                ("serving_rel_gauc", "serving GAUC vs true_rel"),
                                ("as_shown_ctr_auc", "as_shown CTR AUC"), ("as_shown_ctr_gauc", "as_shown CTR GAUC"))
            if any(not math.isnan(r["test"].get(k, {}).get("mean", float("nan"))) for r in per.values())]


def _tables(per: dict, spec: dict, default_rows: list[str], model: str, cols: list, md_parts: list[str]) -> dict:
    """One Markdown table per entry of ``spec`` (rows = variants' test metrics), appended to ``md_parts``."""
    tables = {}
    for title, rows in spec.items():
        trows = []
        for name, ov in rows:
            ov = [] if ov == default_rows else ov
            r = per[_label(ov, model)]
            trows.append({"model": name, "switch": " ".join(f"--set {o}" for o in ov) or "(default)",
                          **{k: r["test"][k] for k in METRIC_KEYS if k in r["test"]}})
        tables[title] = trows
        md_parts.append(markdown_table(trows, [("switch", "Switch"), *cols], title=title,
                                       bold_best={k for k, _ in cols}))
    return tables


def run_ifusion_ablation(data: Path, out: Path, seeds: int = 3, overrides: list[str] | None = None,
                         log=None, chosen: dict | None = None) -> dict:
    """iFusion's Figure 3 (CFG vs DCFG, AR vs NAR, consistency on/off) and Figure 4a (schedule x
    inference steps), every variant trained under one budget, the default once; ``chosen``: a subset
    of :data:`IFUSION_TABLES` (:func:`select_tables`)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out)
    chosen = select_tables("ifusion") if chosen is None else chosen
    spec = BenchmarkSpec(data=Path(data), models=variants("ifusion", chosen), seeds=seeds,
                         overrides=overrides or [], search=False, base_model="ifusion",
                         title=f"iFusion ablation variants on {data}", baselines=False)
    per = run_benchmark(spec, out, log=log)["models"]
    cols = _columns(per)
    md_parts = [f"# iFusion ablations on `{data}`\n\nmean ± std of test metrics over {seeds} seed(s); each "
                "variant changes one switch of the default model (serving = position-free, primary).\n"]
    tables = _tables(per, chosen, [], "ifusion", cols, md_parts)
    sweep = {}
    for name, ov in chosen.get("Figure 4a: noise schedule", []):
        sweep[name] = steps_sweep(out, Path(data), seeds, _label(ov, "ifusion"), ov, IFUSION_STEPS)
    head = "| schedule | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in IFUSION_STEPS) + " |"
    for key, metric in (("serving_ctr_gauc", "serving CTR GAUC (primary)"), ("serving_ctr_auc", "serving CTR AUC")):
        if not sweep:
            break
        lines = [f"### Figure 4a: {metric} by schedule and inference steps (test)", "", head,
                 "|:---|" + "---:|" * len(IFUSION_STEPS)]
        for name, by_k in sweep.items():
            cells = [f"{by_k[k][key]['mean']:.4f} ± {by_k[k][key]['std']:.4f}" if k in by_k else "–"
                     for k in IFUSION_STEPS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        md_parts.append("\n".join(lines) + "\n")
    md = "\n\n".join(md_parts)

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, by_k in sweep.items():
            ks = [k for k in IFUSION_STEPS if k in by_k]
            ax.errorbar(ks, [by_k[k]["serving_ctr_gauc"]["mean"] for k in ks],
                        yerr=[by_k[k]["serving_ctr_gauc"]["std"] for k in ks], marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xticks(list(IFUSION_STEPS), [str(k) for k in IFUSION_STEPS])
        ax.set_xlabel("inference steps")
        ax.set_ylabel("serving CTR GAUC (test)")
        ax.set_title(f"iFusion Figure 4a ({Path(data).name}, {seeds} seed(s))", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    result = {"model": "ifusion", "data": str(data), "seeds": seeds, "tables": tables,
              "steps": {name: {str(k): v for k, v in by_k.items()} for name, by_k in sweep.items()}}
    write_report(out, "ablation", result, md, plot=plot if sweep else None)
    print(md)
    print(f"\nwritten: {out}/ablation.md, ablation.json" + (", ablation.png (schedule x steps)" if sweep else ""))
    return result
