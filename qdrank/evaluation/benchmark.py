"""``qdrank benchmark`` and ``qdrank demo``: baselines and models under one budget, honestly compared.

Protocol (the same for every model):
1. One dataset load, one feature map (fitted on the train split), shared by all runs.
2. Two metric families (see :mod:`qdrank.evaluation.evaluate`): ``serving`` (position-free, the
   scores a live request gets; primary) and ``as_shown`` (logged position through the position
   tower; secondary). Early stopping, the search and the verdicts use serving CTR GAUC.
3. Same budget: ``train.max_epochs``, early stopping with ``train.patience``, same batch size,
   the default learning-rate schedule and embedding regularisation.
4. Baselines (:data:`BASELINES`: the rankers a search team already runs, fitted on the train split)
   come first in every table, then the learned models. They are not searched.
5. Hyper-parameter search on VALIDATION only, alike for every learned model: the grid (default
   :data:`DEFAULT_GRID`) is trained with the first seed; the point with the best validation serving
   GAUC is then trained with every seed.
6. Test metrics of those runs: mean ± std over seeds (5 by default); each run's best epoch, flagged
   "not converged" where it is the last epoch trained.
7. Verdicts: a paired comparison over seeds (seed k of one model against seed k of the other) of
   test serving CTR GAUC, against the best position-free baseline and against each peer: mean
   difference and its 95% t-interval; "wins" only when the interval excludes 0 above, "loses"
   when it excludes 0 below, else "ties".

Every run lives in ``OUT/runs/MODEL/HP/seedK``; a finished run (``result.json``) is never redone
and an interrupted one resumes from its last epoch, so an interrupted benchmark picks up where it
stopped. ``OUT/results.json`` (schema :data:`REPORT_SCHEMA`) holds every figure of the tables and
is small enough to commit under ``docs/results/``.
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
from qdrank.evaluation.evaluate import FAMILIES, PRIMARY, REL_K
from qdrank.evaluation.metrics import rela_impr
from qdrank.evaluation.report import aggregate, format_value, markdown_table, serving_plot, write_report
from qdrank.training import checkpoint as ckpt

REPORT_SCHEMA = "qdrank.benchmark/2"
# What moved validation serving GAUC most in a DIN sweep on synthetic small (README "Loss" and
# "Position"): the in-request softmax term (helps where requests are many, over-fits Trivago) and
# the position tower (costs serving GAUC where the logged ranker already ordered by relevance).
# The learning rate moved it less than the seeds' spread around the default.
DEFAULT_GRID = {"train.listwise_weight": [0.0, 1.0], "model.position_bias": [True, False]}
DEFAULT_SEEDS = 5
# Baselines, in table order (one place): names not in the model registry are skipped.
BASELINES = ("logged_order", "popularity", "history_match", "text_match", "gbdt")
FAMILY_METRICS = ("ctr_auc", "ctr_gauc", "ctr_gauc_w", "ctr_logloss", "cvr_auc", "cvr_gauc")
REL_METRICS = ("serving_rel_gauc", f"serving_rel_ndcg{REL_K}")
METRIC_KEYS = tuple(f"{f}_{k}" for f in FAMILIES for k in FAMILY_METRICS) + REL_METRICS
VERDICT_METRIC = PRIMARY
NA = "n/a"


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
    seeds: int = DEFAULT_SEEDS
    overrides: list[str] = field(default_factory=list)  # applied to every model
    search: bool = True
    grid: dict[str, list] = field(default_factory=lambda: dict(DEFAULT_GRID))
    base_model: str = "dnn"
    title: str | None = None
    baselines: bool = True       # add every registered baseline (BASELINES) not already listed


def is_baseline(model: str) -> bool:
    return model in BASELINES


def registered_baselines() -> list[str]:
    from qdrank.models.registry import available_models

    known = available_models()
    return [b for b in BASELINES if b in known]


def ordered_variants(spec: BenchmarkSpec) -> list[Variant]:
    """Baselines first (in :data:`BASELINES` order), then the learned models as given."""
    variants = [v if isinstance(v, Variant) else Variant(v, v) for v in spec.models]
    if spec.baselines:
        have = {v.model for v in variants}
        variants += [Variant(b, b) for b in registered_baselines() if b not in have]
    rank = {b: i for i, b in enumerate(BASELINES)}
    return sorted(variants, key=lambda v: (0, rank[v.model]) if is_baseline(v.model) else (1, 0))


def uses_logged_position(model: str) -> bool:
    from qdrank.models.registry import model_class

    return bool(getattr(model_class(model), "uses_logged_position", False))


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


def parse_variant(text: str) -> Variant:
    """``"ifusion_cfg=ifusion:model.guidance=cfg[:key=value...]"`` -> a row with its own overrides
    (``--variant``: an ablation switch beside the plain models, under the same budget and search)."""
    import re

    label, sep, rest = text.partition("=")
    model, *overrides = rest.split(":")
    if not sep or not label or not model:
        raise ValueError(f"--variant expects LABEL=MODEL:section.key=value[:...], got {text!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", label):
        raise ValueError(f"--variant label {label!r} may only hold letters, digits, '_', '.' and '-' "
                         f"(it names the run folder)")
    for o in overrides:
        key, eq, _ = o.partition("=")
        if not eq or "." not in key:
            raise ValueError(f"--variant {label}: {o!r} is not section.key=value")
    return Variant(label, model.strip(), overrides)


def grid_points(grid: dict[str, list], search: bool) -> list[dict]:
    if not search or not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def point_overrides(point: dict) -> list[str]:
    """A search point as ``--set`` overrides."""
    return [f"{k}={v}" for k, v in point.items()]


def point_tag(point: dict) -> str:
    return "default" if not point else "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())


# --------------------------------------------------------------------------- paired verdicts


def paired_comparison(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Per-seed differences ``a[k] - b[k]`` (pairs with a NaN dropped): mean, ``level`` t-interval
    and the verdict: "wins" / "loses" when the interval excludes 0, else "ties" (also with < 2
    pairs, where no interval exists: ``ci_low``/``ci_high`` are NaN)."""
    from scipy import stats

    diffs = [float(x) - float(y) for x, y in zip(a, b)
             if x is not None and y is not None and not (math.isnan(float(x)) or math.isnan(float(y)))]
    n = len(diffs)
    mean = float(np.mean(diffs)) if n else float("nan")
    lo = hi = float("nan")
    if n >= 2:
        sd = float(np.std(diffs, ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    verdict = "wins" if lo > 0 else "loses" if hi < 0 else "ties"
    return {"diff_mean": mean, "ci_low": lo, "ci_high": hi, "n": n, "diffs": diffs, "verdict": verdict}


def verdict_text(c: dict) -> str:
    if c["n"] < 2:
        return f"{c['verdict']} ({c['diff_mean']:+.4f}, {c['n']} seed: no interval)"
    return f"{c['verdict']} ({c['diff_mean']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}])"


def compute_verdicts(per_model: dict, metric: str = VERDICT_METRIC) -> dict:
    """Paired verdicts on ``metric`` (test): every learned model vs the best position-free
    baseline (highest mean) and vs each other learned model."""
    def vals(name: str) -> list:
        return per_model[name]["test"].get(metric, {}).get("values", [])

    def mean(name: str) -> float:
        return per_model[name]["test"].get(metric, {}).get("mean", float("nan"))

    bases = [m for m, r in per_model.items() if r["kind"] == "baseline" and not math.isnan(mean(m))]
    learned = [m for m, r in per_model.items() if r["kind"] == "learned"]
    best = max(bases, key=mean) if bases else None
    out = {"metric": metric, "split": "test", "level": 0.95, "best_baseline": best,
           "vs_best_baseline": {}, "pairwise": {}}
    for m in learned:
        if best is not None:
            out["vs_best_baseline"][m] = paired_comparison(vals(m), vals(best))
        out["pairwise"][m] = {o: paired_comparison(vals(m), vals(o)) for o in learned if o != m}
    return out


def verdict_sentence(verdicts: dict, what: str = "test serving CTR GAUC") -> str:
    """One plain sentence: which learned models beat the best baseline on ``what``, by how much."""
    best = verdicts["best_baseline"]
    if best is None:
        return f"No position-free baseline was run, so no model can be said to beat one on {what}."
    vs = verdicts["vs_best_baseline"]
    wins = [(m, c) for m, c in vs.items() if c["verdict"] == "wins"]
    if not wins:
        return (f"No learned model beats the best position-free baseline ({best}) on {what} "
                "(95% paired interval over seeds).")
    parts = [f"{m} by {c['diff_mean']:+.4f} (95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}])" for m, c in wins]
    return f"On {what}, {', '.join(parts)} beat the best position-free baseline ({best})."


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
    variants = ordered_variants(spec)
    search_points = grid_points(spec.grid, spec.search)
    # every row's settings at every point it will train are built now: an unknown model or key in
    # the last row fails before the first row trains, not hours later
    for var in variants:
        for point in [{}] if is_baseline(var.model) else search_points:
            build_config(var.model, overrides=[*spec.overrides, *var.overrides, *point_overrides(point)])
    base_cfg = build_config(variants[0].model, overrides=spec.overrides)
    ds = SearchLogDataset(spec.data, base_cfg.data, log=log)
    n_pts = {v.label: 1 if is_baseline(v.model) else len(search_points) for v in variants}
    bar = tqdm(total=sum(n - 1 + spec.seeds for n in n_pts.values()), desc="benchmark", unit="run",
               dynamic_ncols=True)
    per_model: dict[str, dict] = {}
    for var in variants:
        model = var.label
        common = [*spec.overrides, *var.overrides]
        points = [{}] if is_baseline(var.model) else search_points
        # 1. search on validation with the first seed
        search = []
        for point in points:
            ov = [*common, *point_overrides(point), "train.seed=0", "train.progress=false"]
            cfg = build_config(var.model, overrides=ov)
            bar.set_postfix_str(f"{model} {point_tag(point)} seed 0")
            res = _run_once(cfg, ds, out / "runs" / model / point_tag(point) / "seed0", log)
            search.append((res["best_valid_gauc"], point, res))
            bar.update(1)
        best_valid, best_point, first = max(search, key=lambda s: s[0] if s[0] == s[0] else -1)
        runs = [first]
        for seed in range(1, spec.seeds):
            ov = [*common, *point_overrides(best_point), f"train.seed={seed}",
                  "train.progress=false"]
            cfg = build_config(var.model, overrides=ov)
            bar.set_postfix_str(f"{model} {point_tag(best_point)} seed {seed}")
            runs.append(_run_once(cfg, ds, out / "runs" / model / point_tag(best_point) / f"seed{seed}", log))
            bar.update(1)
        per_model[model] = {
            "model": var.model, "kind": "baseline" if is_baseline(var.model) else "learned",
            "uses_logged_position": uses_logged_position(var.model),
            "overrides": var.overrides, "chosen": best_point,
            "search": [{"point": p, "valid_gauc": v} for v, p, _ in search],
            "test": aggregate([r["test"] for r in runs], METRIC_KEYS),
            "valid": aggregate([r["valid"] for r in runs], METRIC_KEYS),
            "best_epoch": [r.get("best_epoch") for r in runs],
            "epochs_run": [r.get("epochs_run") for r in runs],
            "converged": [r.get("converged") for r in runs],
            "n_parameters": runs[0].get("n_parameters", 0),
            "train_seconds": aggregate(runs, ["train_seconds"])["train_seconds"],
            "infer_ms_per_request": aggregate(runs, ["infer_ms_per_request"])["infer_ms_per_request"],
            "oracle": {k: v for k, v in runs[0]["test"].items() if k.startswith("oracle_")},
        }
        t = per_model[model]["test"]
        log(f"{model}: test serving CTR GAUC {format_value(t[PRIMARY])}  as_shown "
            f"{format_value(t['as_shown_ctr_gauc'])}")
    bar.close()
    return write_benchmark_report(spec, ds, per_model, out)


def _has_position_tower(spec: BenchmarkSpec, r: dict) -> bool:
    """Whether a learned row's runs trained the position tower: ``model.position_bias`` of the config
    its runs were built from (the benchmark's overrides, the row's own, then its chosen point)."""
    point = [f"{k}={v}" for k, v in r.get("chosen", {}).items()]
    cfg = build_config(r["model"], overrides=[*spec.overrides, *r.get("overrides", []), *point])
    return cfg.model.position_bias


def _epochs_cell(r: dict) -> str:
    """Best epoch per seed (1-based); "not converged" where it is the last epoch trained."""
    if r["kind"] == "baseline" or not any(e is not None for e in r["best_epoch"]):
        return NA
    cells, stuck = [], 0
    for best, conv in zip(r["best_epoch"], r["converged"]):
        cells.append("?" if best is None else str(best + 1))
        stuck += conv is False
    text = ",".join(cells)
    return text + (f" (not converged: {stuck}/{len(cells)})" if stuck else "")


def _metric_cells(r: dict, fam: str) -> dict:
    keys = [f"{fam}_{k}" for k in FAMILY_METRICS] + (list(REL_METRICS) if fam == "serving" else [])
    if fam == "serving" and r["uses_logged_position"]:
        return dict.fromkeys(keys, NA)
    return {k: r["test"][k] for k in keys if k in r["test"]}


def benchmark_tables(spec: BenchmarkSpec, per_model: dict, verdicts: dict) -> tuple[dict, dict, str]:
    """Rows of the serving (primary) and as_shown tables, and their Markdown."""
    base = per_model.get(spec.base_model)
    oracle = next((r["oracle"] for r in per_model.values() if r["oracle"]), {})

    def measured(key: str) -> bool:
        return any(not math.isnan(r["test"].get(key, {}).get("mean", float("nan"))) for r in per_model.values())

    tables, md = {}, []
    heads = {"ctr_auc": "CTR AUC", "ctr_gauc": "CTR GAUC", "ctr_gauc_w": "CTR GAUC (imp.-weighted)",
             "ctr_logloss": "CTR logloss", "cvr_auc": "CVR AUC", "cvr_gauc": "CVR GAUC"}
    for fam in FAMILIES:
        rows = []
        for model, r in per_model.items():
            row = {"model": model + (" (baseline)" if r["kind"] == "baseline" else ""), "kind": r["kind"],
                   **_metric_cells(r, fam)}
            if fam == "serving":
                row["best_epoch"] = _epochs_cell(r)
                vs = verdicts["vs_best_baseline"].get(model)
                row["verdict"] = verdict_text(vs) if vs else ""
                if base is not None and not r["uses_logged_position"] and not base["uses_logged_position"]:
                    row["relaimpr"] = (f"{rela_impr(r['test'][f'{fam}_ctr_auc']['mean'], base['test'][f'{fam}_ctr_auc']['mean']):+.1f}")
                row["params"] = f"{r['n_parameters'] / 1e6:.2f}M"
                row["train_s"] = f"{r['train_seconds']['mean']:.0f}"
                row["infer_ms"] = f"{r['infer_ms_per_request']['mean']:.2f}"
            rows.append(row)
        if oracle:
            # text cells: the ceiling is shown but never "bolded best" among the models
            what = "true_rel" if fam == "serving" else "true_ctr"
            rows.append({"model": f"oracle (ranks by {what})", "kind": "oracle",
                         **{k.replace(f"oracle_{fam}_", f"{fam}_"): f"{v:.4f}" for k, v in oracle.items()
                            if k.startswith(f"oracle_{fam}_") and v == v}})
        cols = [(f"{fam}_{k}", h) for k, h in heads.items() if measured(f"{fam}_{k}")]
        if fam == "serving":
            cols += [(k, h) for k, h in ((REL_METRICS[0], "GAUC vs true_rel"),
                                         (REL_METRICS[1], f"NDCG@{REL_K} vs true_rel")) if measured(k)]
        metric_cols = [k for k, _ in cols if not k.endswith("logloss")]  # bold = highest: not for a loss
        if fam == "serving":
            if verdicts["best_baseline"]:
                cols.append(("verdict", f"vs best baseline ({verdicts['best_baseline']})"))
            cols += [("best_epoch", "Best epoch"), ("relaimpr", f"RelaImpr vs {spec.base_model} (%)"),
                     ("params", "Params"), ("train_s", "Train s"), ("infer_ms", "ms/request")]
            title = "serving family (primary): position-free, the scores a live request gets"
        else:
            title = "as_shown family (secondary): logged position through the position tower"
        tables[fam] = rows
        md.append(markdown_table(rows, cols, title=title, bold_best=set(metric_cols)))
    return tables, oracle, "\n".join(md)


def write_benchmark_report(spec: BenchmarkSpec, ds: SearchLogDataset, per_model: dict, out: Path) -> dict:
    """Write ``results.{json,md,png}``. The JSON (schema ``qdrank.benchmark/2``)::

        schema, data, dataset, seeds, primary_metric ("serving_ctr_gauc"), families, overrides, grid,
        split_sizes {train, valid, test}, order [labels, table order], baselines [labels],
        models {label: {model, kind ("baseline" | "learned"), uses_logged_position, overrides, chosen,
                        search [{point, valid_gauc}], test {METRIC: {mean, std, n, values[per seed]}},
                        valid {...}, best_epoch [per seed, 0-based], epochs_run [..], converged [..],
                        n_parameters, train_seconds {mean, ...}, infer_ms_per_request {mean, ...},
                        oracle {oracle_{family}_{ctr,cvr}_{auc,gauc,gauc_w}: float}}},
        oracle {...} | null,
        verdicts {metric, split, level, best_baseline, vs_best_baseline {model: CMP},
                  pairwise {model: {peer: CMP}}}  with CMP = {diff_mean, ci_low, ci_high, n, diffs, verdict},
        tables {serving: [row], as_shown: [row]}  (the Markdown rows; "n/a" where a family is missing)

    METRIC is one of :data:`METRIC_KEYS` (``{serving,as_shown}_{ctr,cvr}_{auc,gauc,...}``,
    ``serving_rel_gauc``, ``serving_rel_ndcg10``). NaN is written as null.
    """
    verdicts = compute_verdicts(per_model)
    tables, oracle, md_tables = benchmark_tables(spec, per_model, verdicts)
    rel_key = f"serving_rel_ndcg{REL_K}"  # simulated data: the ranking against the truth, paired too
    rel_verdicts = compute_verdicts(per_model, rel_key) if oracle else None
    no_tower = [m for m, r in per_model.items() if r["kind"] == "learned" and not _has_position_tower(spec, r)]
    split_sizes = {s: len(ds.requests_of(s)) for s in ("train", "valid", "test")}
    title = spec.title or f"Test metrics on {spec.data} (mean ± std over {spec.seeds} seed(s))"
    md = f"## {title}\n\n" + md_tables
    md += (f"\nSplit sizes (requests): train {split_sizes['train']:,}, valid {split_sizes['valid']:,}, test "
           f"{split_sizes['test']:,}. GAUC = unweighted mean AUC over test requests with both labels. The serving "
           "family scores without the logged position (exactly what `Ranker.rank` returns); as_shown adds the "
           "logged position through the position tower. CVR is post-click (on clicked impressions). Baselines "
           "are fitted on the train split and not searched; learned models' hyper-parameters are chosen on "
           "validation serving GAUC" + (" from " + json.dumps(spec.grid) if spec.search else "") + ". Best epoch "
           "is 1-based per seed; 'not converged' marks runs whose best epoch was the last one trained."
           + (" The oracle rows rank by the simulator's true probabilities; 'vs true_rel' columns score each "
              "model's serving ranking against the position-free true click probability (pairwise AUC within a "
              "request, NDCG@10)." if oracle else "") + " n/a: a model that reads the logged position has no "
           "serving score. A missing cell had nothing to measure."
           + (f" Trained without the position tower (`model.position_bias=false`), {', '.join(no_tower)} "
              "score the same in both families." if no_tower else "") + "\n")
    md += ("\n**Verdicts** (test serving CTR GAUC, paired over seeds: mean difference [95% t-interval]; 'wins' "
           "only when the interval excludes 0):\n\n" + verdict_sentence(verdicts) + "\n")
    if rel_verdicts:
        vs = rel_verdicts["vs_best_baseline"]
        md += ("\n" + verdict_sentence(rel_verdicts, f"NDCG@{REL_K} against true_rel (test, serving)") + " Per "
               "model: " + "; ".join(f"{m} {verdict_text(c)}" for m, c in vs.items()) + ".\n")
    learned = list(verdicts["pairwise"])
    if len(learned) > 1:
        rows = [{"model": m, **{o: verdict_text(c) for o, c in verdicts["pairwise"][m].items()}}
                for m in learned]
        md += "\n" + markdown_table(rows, [(o, f"vs {o}") for o in learned], title="Learned models, pairwise")
    payload = {
        "schema": REPORT_SCHEMA, "data": str(spec.data), "dataset": Path(spec.data).name, "seeds": spec.seeds,
        "primary_metric": PRIMARY, "families": list(FAMILIES), "overrides": spec.overrides,
        "grid": spec.grid if spec.search else None, "split_sizes": split_sizes,
        "order": list(per_model), "baselines": [m for m, r in per_model.items() if r["kind"] == "baseline"],
        "models": per_model, "oracle": oracle or None, "verdicts": verdicts, "verdicts_rel_ndcg": rel_verdicts,
        "tables": tables,
    }
    plot_models = {m: r for m, r in per_model.items()}
    write_report(out, "results", payload, md,
                 plot=lambda p: serving_plot(plot_models, PRIMARY, p,
                                             title=f"{Path(spec.data).name}: test serving CTR GAUC "
                                                   f"({spec.seeds} seed(s))",
                                             reference=oracle.get("oracle_serving_ctr_gauc"),
                                             verdicts=verdicts))
    print(md)
    print(f"\nreport: {out}/results.md, results.json, results.png")
    return payload


# 6 epochs: with the cosine schedule DNN's validation serving GAUC on the demo data plateaus by epoch
# 5-6 (measured: 0.6372 at epoch 5 of 6; 0.6447 at epoch 8 of 10), while 3 epochs stop it rising.
# The demo does not search (one seed, minutes): it takes the point that the benchmark's validation
# search chose for every model on synthetic small, the same simulator (README "Results"): the
# in-request softmax term on, the position tower off.
DEMO_OVERRIDES = ["train.max_epochs=6", "train.patience=2", "train.listwise_weight=1", "model.position_bias=false"]
DEMO_MODELS_ORDER = ("dnn", "din", "sasrec", "sim", "qin", "hstu", "mtgr", "diffusiongs", "ifusion")


def run_demo(out: Path, models: list[str] | None = None, log=None) -> dict:
    """The README's main job: synthetic data -> baselines + the main learned models -> table + plot."""
    from qdrank.data.sources import prepare_source
    from qdrank.models.registry import available_models

    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out)
    data = out / "data"
    if not (data / "requests.parquet").exists():
        log(f"preparing synthetic data in {data}")
        prepare_source("synthetic", None, data, seed=0, scale="demo")
    known = [m for m in available_models() if not is_baseline(m)]
    # the main peers of each paper; `qdrank benchmark --models ...` runs any of the registry
    models = models or [m for m in DEMO_MODELS_ORDER if m in known]
    spec = BenchmarkSpec(data=data, models=models, seeds=1, search=False, overrides=DEMO_OVERRIDES,
                         title="qdrank demo: synthetic search log, test split (1 seed, no search)")
    return run_benchmark(spec, out, log=log)
