"""``qdrank benchmark`` and ``qdrank demo``: every model under one budget, honestly compared.

Protocol (the same for every model):
1. One dataset load, one feature map (fitted on the train split), shared by all runs.
2. Same budget: ``train.max_epochs``, early stopping on validation GAUC with ``train.patience``,
   same batch size.
3. Hyper-parameter search on VALIDATION only, alike for every model: the grid (default
   ``train.lr`` in {0.001, 0.003} x ``model.dropout`` in {0.0, 0.2}) is trained with the first
   seed; the point with the best validation GAUC is then trained with every seed.
4. Test metrics of those runs: mean ± std over seeds, RelaImpr over the base model, parameters,
   training time and inference milliseconds per request.

Every run lives in ``OUT/runs/MODEL/HP/seedK``; a finished run (``result.json``) is never redone
and an interrupted one resumes from its last epoch, so an interrupted benchmark picks up where it
stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qdrank.config import RunConfig, build_config
from qdrank.data.dataset import SearchLogDataset
from qdrank.evaluation.metrics import rela_impr
from qdrank.evaluation.report import aggregate, bar_plot, format_value, markdown_table, write_report
from qdrank.training import checkpoint as ckpt

DEFAULT_GRID = {"train.lr": [0.001, 0.003], "model.dropout": [0.0, 0.2]}
METRIC_KEYS = ("ctr_auc", "ctr_gauc", "ctr_gauc_w", "ctr_logloss", "cvr_auc", "cvr_gauc")


@dataclass
class Variant:
    """A row of a comparison: a model plus its own overrides (an ablation switch, say)."""

    label: str
    model: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class BenchmarkSpec:
    data: Path
    models: list[str | Variant]
    seeds: int = 3
    overrides: list[str] = field(default_factory=list)  # applied to every model
    search: bool = True
    grid: dict[str, list] = field(default_factory=lambda: dict(DEFAULT_GRID))
    base_model: str = "dnn"
    title: str | None = None


def parse_grid(text: str) -> dict[str, list]:
    """``"train.lr=0.001,0.003;model.dropout=0,0.2"`` -> ``{"train.lr": [0.001, 0.003], ...}``."""
    import yaml

    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, values = part.partition("=")
        if not values or "." not in key:
            raise ValueError(f"--grid expects section.key=v1,v2;... got {part!r}")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def grid_points(grid: dict[str, list], search: bool) -> list[dict]:
    if not search or not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def point_tag(point: dict) -> str:
    return "default" if not point else "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())


def _run_once(cfg: RunConfig, ds: SearchLogDataset, run_dir: Path, log) -> dict:
    """Train (or resume, or reuse) one run; returns its result.json content plus timings."""
    from qdrank.evaluation.evaluate import predict
    from qdrank.training.trainer import Trainer
    from qdrank.utils.runtime import resolve_device

    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    resume = (run_dir / ckpt.STATE_DIR / ckpt.STATE_JSON).exists()
    trainer = Trainer(cfg, ds, run_dir, resume=resume, log=lambda m: None)
    t0 = time.perf_counter()
    res = trainer.fit()
    res["train_seconds"] = time.perf_counter() - t0
    # inference cost: the whole test split, per request
    device = resolve_device(cfg.train.device)
    n_req = len(ds.requests_of("test"))
    t1 = time.perf_counter()
    predict(trainer.model, ds, "test", cfg.train.eval_batch_size, device)
    res["infer_ms_per_request"] = 1000 * (time.perf_counter() - t1) / max(n_req, 1)
    ckpt.write_json(result_file, res)
    return res


def run_benchmark(spec: BenchmarkSpec, out: Path, log=None) -> dict:
    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v if isinstance(v, Variant) else Variant(v, v) for v in spec.models]
    base_cfg = build_config(variants[0].model, overrides=spec.overrides)
    ds = SearchLogDataset(spec.data, base_cfg.data, log=log)
    points = grid_points(spec.grid, spec.search)
    total = len(variants) * (len(points) - 1 + spec.seeds) if len(points) > 1 else len(variants) * spec.seeds
    bar = tqdm(total=total, desc="benchmark", unit="run", dynamic_ncols=True)
    per_model: dict[str, dict] = {}
    for var in variants:
        model = var.label
        common = [*spec.overrides, *var.overrides]
        # 1. search on validation with the first seed
        search = []
        for point in points:
            ov = [*common, *(f"{k}={v}" for k, v in point.items()), "train.seed=0", "train.progress=false"]
            cfg = build_config(var.model, overrides=ov)
            bar.set_postfix_str(f"{model} {point_tag(point)} seed 0")
            res = _run_once(cfg, ds, out / "runs" / model / point_tag(point) / "seed0", log)
            search.append((res["best_valid_gauc"], point, res))
            bar.update(1)
        best_valid, best_point, first = max(search, key=lambda s: s[0] if s[0] == s[0] else -1)
        if len(points) > 1:
            bar.update(-1)  # the chosen point's seed 0 counts once
        runs = [first]
        for seed in range(1, spec.seeds):
            ov = [*common, *(f"{k}={v}" for k, v in best_point.items()), f"train.seed={seed}",
                  "train.progress=false"]
            cfg = build_config(var.model, overrides=ov)
            bar.set_postfix_str(f"{model} {point_tag(best_point)} seed {seed}")
            runs.append(_run_once(cfg, ds, out / "runs" / model / point_tag(best_point) / f"seed{seed}", log))
            bar.update(1)
        if len(points) > 1:
            bar.update(1)
        per_model[model] = {
            "model": var.model, "overrides": var.overrides, "chosen": best_point, "search": [{"point": p, "valid_gauc": v} for v, p, _ in search],
            "test": aggregate([r["test"] for r in runs], METRIC_KEYS),
            "valid": aggregate([r["valid"] for r in runs], METRIC_KEYS),
            "n_parameters": runs[0]["n_parameters"],
            "train_seconds": aggregate(runs, ["train_seconds"])["train_seconds"],
            "infer_ms_per_request": aggregate(runs, ["infer_ms_per_request"])["infer_ms_per_request"],
            "oracle": {k: v for k, v in runs[0]["test"].items() if k.startswith("oracle_")},
        }
        t = per_model[model]["test"]
        log(f"{model}: test CTR AUC {format_value(t['ctr_auc'])}  GAUC {format_value(t['ctr_gauc'])}")
    bar.close()
    return write_benchmark_report(spec, ds, per_model, out)


def write_benchmark_report(spec: BenchmarkSpec, ds: SearchLogDataset, per_model: dict, out: Path) -> dict:
    base = per_model.get(spec.base_model)
    rows = []
    for model, r in per_model.items():
        row = {"model": model, **{k: r["test"][k] for k in METRIC_KEYS if k in r["test"]}}
        if base is not None:
            row["relaimpr"] = f"{rela_impr(r['test']['ctr_auc']['mean'], base['test']['ctr_auc']['mean']):+.1f}"
        row["params"] = f"{r['n_parameters'] / 1e6:.2f}M"
        row["train_s"] = f"{r['train_seconds']['mean']:.0f}"
        row["infer_ms"] = f"{r['infer_ms_per_request']['mean']:.2f}"
        rows.append(row)
    oracle = next((r["oracle"] for r in per_model.values() if r["oracle"]), {})
    if oracle:
        # formatted as text so the ceiling is shown but never "bolded best" among the models
        rows.append({"model": "oracle (true probabilities)",
                     **{k.removeprefix("oracle_"): f"{v:.4f}" for k, v in oracle.items()}})
    def measured(key: str) -> bool:
        return any(not math.isnan(r["test"].get(key, {}).get("mean", float("nan"))) for r in per_model.values())

    cols = [(k, h) for k, h in (("ctr_auc", "CTR AUC"), ("ctr_gauc", "CTR GAUC"), ("cvr_auc", "CVR AUC"),
                                ("cvr_gauc", "CVR GAUC")) if measured(k)]
    metric_cols = [k for k, _ in cols]
    cols += [("relaimpr", f"RelaImpr vs {spec.base_model} (%)"), ("params", "Params"), ("train_s", "Train s"),
             ("infer_ms", "ms/request")]
    title = spec.title or f"Test metrics on {spec.data} (mean ± std over {spec.seeds} seed(s))"
    md = markdown_table(rows, cols, title=title, bold_best=set(metric_cols))
    md += (f"\n\nSplit sizes (requests): train {len(ds.requests_of('train')):,}, valid "
           f"{len(ds.requests_of('valid')):,}, test {len(ds.requests_of('test')):,}. GAUC = unweighted mean AUC "
           "over test requests with both labels. CVR is post-click (on clicked impressions). Model rows: "
           "hyper-parameters chosen on validation GAUC" + (" from " + json.dumps(spec.grid) if spec.search else "")
           + "." + (" The oracle row scores with the true click/purchase probabilities of the simulator." if oracle
                    else "") + " A missing column had nothing to measure (e.g. CVR GAUC needs requests with"
           " two clicked impressions).\n")
    verdicts = rank_summary({"models": per_model}, "diffusiongs")
    if verdicts:
        md += ("\nDiffusionGS against each peer (difference of means; it 'ties' where the difference is within"
               " the seeds' spread, sqrt(std_a^2 + std_b^2)):\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    plot_rows = [r for r in rows if not r["model"].startswith("oracle")]
    metrics = metric_cols
    reference = {k: float(oracle[f"oracle_{k}"]) for k in metrics if f"oracle_{k}" in oracle}
    payload = {"data": str(spec.data), "seeds": spec.seeds, "models": per_model, "overrides": spec.overrides,
               "grid": spec.grid if spec.search else None, "rows": rows}
    write_report(out, "results", payload, md,
                 plot=lambda p: bar_plot(plot_rows, metrics, p, title=f"{Path(spec.data).name}: test metrics",
                                         reference=reference or None))
    print(md)
    print(f"\nreport: {out}/results.md, results.json, results.png")
    return payload


DEMO_MODELS_ORDER = ("dnn", "din", "sasrec", "sim", "qin", "hstu", "mtgr", "diffusiongs", "ifusion")


def run_demo(out: Path, models: list[str] | None = None, log=None) -> dict:
    """The README's main job: synthetic data -> every registered model -> table + plot."""
    from qdrank.data.sources import prepare_source
    from qdrank.models.registry import available_models

    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out)
    data = out / "data"
    if not (data / "requests.parquet").exists():
        log(f"preparing synthetic data in {data}")
        prepare_source("synthetic", None, data, seed=0, scale="demo")
    known = available_models()
    models = models or [m for m in DEMO_MODELS_ORDER if m in known] + [m for m in known if m not in DEMO_MODELS_ORDER]
    spec = BenchmarkSpec(data=data, models=models, seeds=1, search=False,
                         overrides=["train.max_epochs=3", "train.patience=1"],
                         title="qdrank demo: synthetic search log, test split (1 seed, no search)")
    return run_benchmark(spec, out, log=log)


def rank_summary(payload: dict, model: str = "diffusiongs") -> list[str]:
    """Plain sentences: where ``model`` wins, ties or loses vs each peer, in units of the seeds' spread."""
    ms = payload["models"]
    if model not in ms:
        return []
    me = ms[model]["test"]
    lines = []
    for other, r in ms.items():
        if other == model:
            continue
        for key in ("ctr_auc", "ctr_gauc"):
            a, b = me[key], r["test"][key]
            diff = a["mean"] - b["mean"]
            spread = float(np.hypot(a["std"], b["std"])) or float("nan")
            verdict = "ties" if abs(diff) <= spread or spread != spread else ("wins" if diff > 0 else "loses")
            lines.append(f"{verdict} vs {other} on {key}: {diff:+.4f} (spread {spread:.4f})")
    return lines
