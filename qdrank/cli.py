"""The ``qdrank`` command line. Each sub-command is a thin layer over a library function.

Errors: a user mistake (bad config, dataset, damaged run, unexportable model) or an OS error (read-only
or full disk, a path under a file) ends the command with one line ``error: ...`` on stderr and exit
code 2, never a traceback (:func:`main`). Commands that write check their output location before
they load data.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

DATA_ENV = "QDRANK_DATA"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _resolve_input(source: str, given: str | None) -> Path | None:
    if given:
        return Path(given)
    if source == "synthetic":
        return None
    base = os.environ.get(DATA_ENV)
    if base:
        sub = {"movielens": "movielens-100k"}.get(source, source)
        return Path(base) / sub
    raise SystemExit(f"error: `data prepare {source}` needs --input PATH (or ${DATA_ENV} pointing at a folder "
                     f"that holds {source}/)")


# ---- data ---------------------------------------------------------------------------------
def cmd_prepare(a) -> None:
    from qdrank.config import parse_key_values
    from qdrank.data.sources import prepare_source
    from qdrank.utils.io import ensure_writable_dir

    opts = parse_key_values(a.option, "--option")
    if a.scale:
        opts["scale"] = a.scale
    ensure_writable_dir(Path(a.out).resolve().parent)  # the dataset is built beside --out, then renamed
    rep = prepare_source(a.source, _resolve_input(a.source, a.input), Path(a.out), seed=a.seed, **opts)
    print(f"wrote {a.out}: {rep.n_requests:,} requests, {rep.n_impressions:,} impressions, "
          f"{rep.n_behaviors:,} behaviours (validated)")


def cmd_validate(a) -> None:
    from qdrank.data.schema import validate_dataset

    rep = validate_dataset(Path(a.dir))
    print(f"OK {a.dir}: {rep.n_requests:,} requests, {rep.n_impressions:,} impressions, {rep.n_behaviors:,} "
          f"behaviours; tables {', '.join(rep.tables)}")
    for w in rep.warnings:
        print(f"warning: {w}")


def cmd_shard(a) -> None:
    from qdrank.config import build_config
    from qdrank.data.shards import write_shards

    cfg = build_config("dnn", overrides=a.set)
    m = write_shards(Path(a.dir), Path(a.out), cfg.data, rows_per_shard=a.rows_per_shard, log=_log)
    parts = ", ".join(f"{k} {v['requests']:,} requests / {len(v['shards'])} shards" for k, v in m["splits"].items())
    print(f"wrote {a.out}: {parts}")


def cmd_inspect(a) -> None:
    from qdrank.data.inspect import format_inspection, inspect_dataset

    d = inspect_dataset(Path(a.dir))
    print(json.dumps(d, indent=2) if a.json else format_inspection(d))


# ---- train / evaluate ---------------------------------------------------------------------
def cmd_train(a) -> None:
    from qdrank.config import build_config
    from qdrank.data.shards import open_dataset
    from qdrank.training import checkpoint as ckpt
    from qdrank.training.trainer import Trainer
    from qdrank.utils.io import ensure_writable_dir

    cfg = build_config(a.model, Path(a.config) if a.config else None, a.set)
    ensure_writable_dir(Path(a.out))  # before minutes of loading data
    for f in ckpt.clean_run_dir(Path(a.out)):
        _log(f"removed {f.name}: a temp file left by an interrupted run")
    ds = open_dataset(a.data, cfg.data, log=_log)
    if int(os.environ.get("RANK", "0")) == 0:
        _log("features:\n" + ds.fmap.describe())
    trainer = Trainer(cfg, ds, Path(a.out), resume=a.resume, log=_log)
    res = trainer.fit()
    if trainer.ctx.main:
        from qdrank.evaluation.evaluate import format_families

        t = res["test"]
        cvr = next((t[k] for k in ("serving_cvr_auc", "as_shown_cvr_auc") if k in t), None)
        print(f"{cfg.model_name}: test CTR {format_families(t)}" + (f"  CVR AUC {cvr:.4f}" if cvr is not None else "")
              + f"  (best epoch {res['best_epoch'] + 1} of {res['epochs_run']}"
              + ("" if res["converged"] else ", not converged") + f"; run in {a.out})")


def cmd_evaluate(a) -> None:
    from qdrank.data.shards import open_dataset
    from qdrank.evaluation.evaluate import evaluate, require_split
    from qdrank.evaluation.report import markdown_table, write_report
    from qdrank.training import checkpoint as ckpt
    from qdrank.utils.io import ensure_writable_dir
    from qdrank.utils.runtime import resolve_device

    run = Path(a.run)
    model, cfg, fmap = ckpt.load_model(run)
    out = Path(a.out) if a.out else run / f"eval_{a.split}"
    ensure_writable_dir(out)  # before the evaluation, not after it
    data = a.data or ckpt.read_run_json(run / "data.json", run)["path"]
    ds = open_dataset(data, cfg.data, fmap=fmap, log=_log)
    require_split(ds, a.split, data)
    device = resolve_device(cfg.train.device)
    model.to(device)
    from qdrank.evaluation.report import family_rows

    m = evaluate(model, ds, a.split, cfg.train.eval_batch_size, device, progress=True)
    rows, cols = family_rows(cfg.model_name, m)
    md = markdown_table(rows, cols, title=f"{cfg.model_name} on {data} ({a.split}): serving (primary) and "
                        "as_shown (logged position) metric families")
    write_report(out, "evaluation", {"run": str(run), "data": str(data), "split": a.split, "metrics": m}, md)
    print(md)
    print(f"\nreport written to {out}/evaluation.json and .md")


# ---- demo / benchmark ---------------------------------------------------------------------
def cmd_demo(a) -> None:
    from qdrank.evaluation.benchmark import run_demo
    from qdrank.utils.io import ensure_writable_dir

    ensure_writable_dir(Path(a.out))
    run_demo(Path(a.out), models=a.models.split(",") if a.models else None, log=_log)


def cmd_benchmark(a) -> None:
    from qdrank.evaluation.benchmark import (
        DEFAULT_GRID,
        BenchmarkSpec,
        parse_grid,
        parse_variant,
        run_benchmark,
    )
    from qdrank.utils.io import ensure_writable_dir

    ensure_writable_dir(Path(a.out))
    if a.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {a.seeds}")
    models: list = [m for m in a.models.split(",") if m]
    models += [parse_variant(v) for v in a.variant]
    labels = [m if isinstance(m, str) else m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--models / --variant name a row twice: {', '.join(sorted(labels))}")
    spec = BenchmarkSpec(data=Path(a.data), models=models, seeds=a.seeds,
                         overrides=a.set or [], search=not a.no_search, base_model=a.base,
                         grid=parse_grid(a.grid) if a.grid else dict(DEFAULT_GRID), baselines=not a.no_baselines)
    run_benchmark(spec, Path(a.out), log=_log)


def cmd_ablate(a) -> None:
    from qdrank.evaluation.ablation import run_ablation
    from qdrank.utils.io import ensure_writable_dir

    ensure_writable_dir(Path(a.out))
    run_ablation(Path(a.data), Path(a.out), seeds=a.seeds, overrides=a.set, log=_log, model=a.model,
                 tables=a.tables.split(",") if a.tables else None)


def cmd_explain(a) -> None:
    from qdrank.evaluation.explain import explain_request, steering
    from qdrank.utils.io import ensure_writable_dir

    ensure_writable_dir(Path(a.out).resolve().parent)
    if a.steering:
        r = steering(Path(a.run), Path(a.data) if a.data else None, a.steering, Path(a.out), split=a.split)
        print(f"query steering over {r['measured']} {a.split} requests ({r['relevance']}): mean correlation of "
              f"||d_t|| with relevance {r['mean_correlation']:.3f} (std {r['std_correlation']:.3f}, "
              f"{100 * r['share_positive']:.0f}% positive); plot {r['plot']}")
        return
    if a.request is None:
        raise ValueError("explain needs --request ID (one request's Figure 3) or --steering N (N requests)")
    r = explain_request(Path(a.run), Path(a.data) if a.data else None, a.request, Path(a.out))
    print(f"request {r['request_id']} (query {r['query']!r}): {len(r['items'])} history items; "
          f"correlation of P(click) and ||d_t|| = {r['correlation']:.3f}; plot {r['plot']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qdrank", description="Personalized search ranking with query-conditioned "
                                "diffusion: data, training, evaluation, benchmarks, serving.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare, validate and inspect datasets").add_subparsers(dest="data_cmd",
                                                                                                  required=True)
    pr = data.add_parser("prepare", help="convert a source (trivago, movielens, jdsearch, aliexpress, synthetic)")
    pr.add_argument("source")
    pr.add_argument("--input", help=f"folder with the source files (default: ${DATA_ENV}/SOURCE)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--scale", help="synthetic: tiny | demo | small | medium | large | sessions")
    pr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="converter option")
    pr.set_defaults(func=cmd_prepare)
    v = data.add_parser("validate", help="check a dataset directory against the format")
    v.add_argument("dir")
    v.set_defaults(func=cmd_validate)
    sh = data.add_parser("shard", help="write request-major Parquet shards for streaming training (large logs)")
    sh.add_argument("dir")
    sh.add_argument("--out", required=True)
    sh.add_argument("--rows-per-shard", type=int, default=20_000, help="requests per shard file")
    sh.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                    help="data settings the shards bake in (history length, split, buckets); runs must match")
    sh.set_defaults(func=cmd_shard)
    i = data.add_parser("inspect", help="print counts, label rates, history lengths, splits")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("train", help="train one model")
    t.add_argument("--data", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a trained run")
    e.add_argument("run")
    e.add_argument("--data", help="dataset (default: the one it was trained on)")
    e.add_argument("--split", default="test", choices=["train", "valid", "test"])
    e.add_argument("--out")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="synthetic data -> train every model -> results table and plot")
    d.add_argument("--out", default="reports/demo")
    d.add_argument("--models", help="comma list (default: all registered)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("benchmark", help="baselines and models under one budget: both metric families, mean ± std "
                       "over seeds, paired verdicts")
    b.add_argument("--data", required=True)
    b.add_argument("--models", default="dnn,din", help="learned models (the registered baselines are added)")
    b.add_argument("--seeds", type=int, default=5)
    b.add_argument("--no-baselines", action="store_true", help="do not add the registered baselines")
    b.add_argument("--variant", action="append", default=[], metavar="LABEL=MODEL:KEY=VALUE[:KEY=VALUE]",
                   help="an extra row: MODEL with its own overrides, e.g. ifusion_cfg=ifusion:model.guidance=cfg")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every model")
    b.add_argument("--no-search", action="store_true", help="skip the validation hyper-parameter search")
    b.add_argument("--grid", help='search grid, e.g. "train.listwise_weight=0,1;model.position_bias=true,false" (the default)')
    b.add_argument("--base", default="dnn", help="RelaImpr base model")
    b.add_argument("--out", required=True)
    b.set_defaults(func=cmd_benchmark)

    ab = sub.add_parser("ablate", help="the papers' ablations: DiffusionGS Tables 3-5 + layer sweep; iFusion "
                                       "Figures 3 and 4a")
    ab.add_argument("model", choices=["diffusiongs", "ifusion"])
    ab.add_argument("--data", required=True)
    ab.add_argument("--seeds", type=int, default=3)
    ab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every variant")
    ab.add_argument("--tables", metavar="NAMES", help="only these tables, comma-separated (default all): "
                    "diffusiongs table3,table4,table5,figure4; ifusion figure3a,figure3b,figure3c,figure4a")
    ab.add_argument("--out", required=True)
    ab.set_defaults(func=cmd_ablate)

    ex = sub.add_parser("explain", help="Figure 3 for one request: P(click) per history item vs ||d_t||")
    ex.add_argument("run")
    ex.add_argument("--data")
    ex.add_argument("--request", type=int, help="one request: the paper's Figure 3")
    ex.add_argument("--steering", type=int, metavar="N",
                    help="N requests: mean correlation of ||d_t|| with relevance to the query")
    ex.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ex.add_argument("--out", required=True)
    ex.set_defaults(func=cmd_explain)

    for register in _extension_commands():
        register(sub)
    return p


def _extension_commands():
    """Sub-commands defined next to the code they drive (serve, store, export)."""
    import importlib

    out = []
    for mod in ("qdrank.serving.cli",):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        out.append(m.register)
    return out


_OS_HINTS = {  # what to do, by errno (the OS already says what went wrong)
    errno.EACCES: "fix the permissions or choose another location",
    errno.EPERM: "fix the permissions or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOSPC: "free disk space or choose another location",
    getattr(errno, "EDQUOT", -1): "free space within your quota or choose another location",
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another location",
    errno.EISDIR: "give a file path, not a directory",
    errno.ENOENT: "check the path",
    errno.EEXIST: "remove it or choose another path",
}


def format_error(e: BaseException) -> str:
    """One line ``error: <path>: <what> — <what to do>`` for an OS error, ``error: <message>`` otherwise."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        path = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        hint = _OS_HINTS.get(e.errno, "check the path, its permissions and the free disk space")
        return f"error: {path}: {e.strerror} — {hint}"
    if isinstance(e, sqlite3.Error):
        return f"error: SQLite store: {e} — check the --store path, its permissions and free disk space"
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"error: {msg}"


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show warnings as ``warning: <message>`` (no source line) while a command runs."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qdrank.config import ConfigError
    from qdrank.data.schema import DatasetError

    # CheckpointError (damaged run) and ExportError are ValueErrors; importing them here would load torch
    user_errors = (DatasetError, ConfigError, ValueError, OSError, sqlite3.Error)
    try:
        with _one_line_warnings():
            args.func(args)
    except user_errors as e:
        print(format_error(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
