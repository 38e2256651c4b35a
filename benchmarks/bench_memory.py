"""Peak memory of the streaming pipeline (prepare -> shard -> train DNN from shards) vs log size.

    .venv/bin/python benchmarks/bench_memory.py [--sizes 1m,3m,10m] [--steps 100] [--eval-batches 20] [--gbdt]
    .venv/bin/python benchmarks/bench_memory.py --train-only SHARDS_OR_DIR [--steps 100]

Each stage runs as its own subprocess; its peak RSS is the child's ``ru_maxrss`` (``os.wait4``).
``train`` builds the DNN through ``Trainer`` (model, Adam, item tables) on the streamed data and
runs ``--steps`` shuffled training batches (``0`` = the whole epoch), then streams ``--eval-batches``
batches of the test split through the model: a capped epoch, because a full 10M-impression epoch
plus evaluation takes hours on a shared 2-core machine. ``--cli-train`` runs ``qdrank train``
instead (one epoch capped by ``train.max_steps_per_epoch``, then full valid/test evaluation).
``train (in-memory)`` is the same stage on the dataset directory (the whole log loaded), for sizes
up to ``--baseline-max`` impressions. ``--gbdt`` adds ``qdrank train --model gbdt`` from the shards
(a full LightGBM fit: features counted in streamed passes, the feature matrix in memory for
LightGBM, then streamed valid/test evaluation). Writes a JSON report and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# synthetic sizes: 1m = scale medium, 10m = scale large, 3m in between (catalogue grows too)
SIZES: dict[str, list[str]] = {
    "1m": ["--scale", "medium"],
    "3m": ["--option", "n_users=60000", "--option", "n_items=50000", "--option", "n_categories=50",
           "--option", "n_requests=150000"],
    "10m": ["--scale", "large"],
}


def run_stage(args: list[str], log: Path, command: list[str] | None = None) -> dict:
    """Run ``python -m qdrank.cli ARGS`` (or ``command``); its peak RSS (MiB) and wall seconds."""
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(command or [sys.executable, "-m", "qdrank.cli", *args], stdout=f,
                             stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"stage failed ({p.returncode}): qdrank {' '.join(args)}; see {log}:\n"
                         + log.read_text()[-2000:])
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t}


def train_steps(data: str, steps: int, eval_batches: int, batch_size: int, threads: int, run_dir: str) -> None:
    """The capped training stage (runs in the child process): Trainer's model and optimizer,
    ``steps`` shuffled batches, then ``eval_batches`` test batches through the model."""
    import torch

    from qdrank.config import build_config
    from qdrank.data.shards import open_dataset
    from qdrank.training.trainer import Trainer

    cfg = build_config("dnn", overrides=[f"train.batch_size={batch_size}", f"train.num_threads={threads}",
                                         "train.progress=false"])
    ds = open_dataset(data, cfg.data, log=lambda m: None)
    tr = Trainer(cfg, ds, Path(run_dir), log=lambda m: None)
    tr.net.train()
    n = 0
    t0 = time.perf_counter()
    batches = ds.iter_batches("train", batch_size, shuffle=True, seed=0, extra_inputs=tr.model.extra_inputs)
    for b in itertools.islice(batches, steps or None):
        b = b.to(tr.device)
        loss, _ = tr.model.loss(b, tr.net(b), cfg.train.cvr_weight)
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        n += len(b.click)
    train_s = time.perf_counter() - t0
    tr.model.eval()
    m = 0
    with torch.inference_mode():
        for b in itertools.islice(ds.iter_batches("test", cfg.train.eval_batch_size), eval_batches or None):
            tr.model(b.to(tr.device))
            m += len(b.click)
    print(json.dumps({"trained_impressions": n, "train_seconds": train_s, "evaluated_impressions": m}))


def train_stage(a, data: Path, run_dir: Path, log: Path) -> dict:
    res = run_stage([], log, [sys.executable, __file__, "--stage-train", str(data), "--steps", str(a.steps),
                              "--eval-batches", str(a.eval_batches), "--batch-size", str(a.batch_size),
                              "--threads", str(a.threads), "--run-dir", str(run_dir)])
    res.update(json.loads(log.read_text().strip().splitlines()[-1]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1m,3m,10m", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--steps", type=int, default=100, help="training batches (0 = the full epoch)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-max", type=int, default=3_000_000,
                    help="also train from the directory (in memory) up to this many impressions")
    ap.add_argument("--workdir", help="where datasets and shards go (default: a temporary folder)")
    ap.add_argument("--out", default="reports/bench/memory.json")
    ap.add_argument("--eval-batches", type=int, default=20, help="test batches streamed after training (0 = all)")
    ap.add_argument("--cli-train", action="store_true", help="train with `qdrank train` (full evaluation)")
    ap.add_argument("--gbdt", action="store_true", help="also fit gbdt (LightGBM LambdaRank) from the shards")
    ap.add_argument("--train-only", metavar="DATA", help="only the training stage, on this shard/dataset folder")
    ap.add_argument("--stage-train", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage_train:
        train_steps(a.stage_train, a.steps, a.eval_batches, a.batch_size, a.threads, a.run_dir)
        return
    if a.train_only:
        with tempfile.TemporaryDirectory() as tmp:
            res = train_stage(a, Path(a.train_only), Path(tmp) / "run", Path(tmp) / "train.log")
        print(json.dumps({"data": a.train_only, "steps": a.steps, "eval_batches": a.eval_batches, **res}))
        return
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="qdrank-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    train_set = ["--set", f"train.max_steps_per_epoch={a.steps}", "--set", "train.max_epochs=1",
                 "--set", "train.progress=false", "--set", f"train.num_threads={a.threads}",
                 "--set", f"train.batch_size={a.batch_size}"]
    report: dict = {"steps_per_epoch": a.steps, "batch_size": a.batch_size, "threads": a.threads,
                    "eval_batches": a.eval_batches, "cli_train": a.cli_train, "sizes": {}}
    try:
        for size in a.sizes.split(","):
            d, s = work / f"data-{size}", work / f"shards-{size}"
            res: dict = {}
            res["prepare"] = run_stage(["data", "prepare", "synthetic", *SIZES[size], "--out", str(d)],
                                       work / f"prepare-{size}.log")
            man_line = (work / f"prepare-{size}.log").read_text().strip().splitlines()[-1]
            res["shard"] = run_stage(["data", "shard", str(d), "--out", str(s)], work / f"shard-{size}.log")
            manifest = json.loads((s / "manifest.json").read_text())
            res.update(impressions=manifest["n_impressions"], requests=manifest["n_requests"],
                       behaviors=manifest["n_behaviors"], prepared=man_line,
                       shard_mib=sum(f.stat().st_size for f in s.iterdir()) / 2**20)
            for key, src, run in (("train", s, f"run-{size}"), ("train_in_memory", d, f"run-mem-{size}")):
                if key == "train_in_memory" and manifest["n_impressions"] > a.baseline_max:
                    continue
                if a.cli_train:
                    res[key] = run_stage(["train", "--data", str(src), "--model", "dnn", "--out", str(work / run),
                                          *train_set], work / f"{run}.log")
                else:
                    res[key] = train_stage(a, src, work / run, work / f"{run}.log")
            if a.gbdt:
                res["gbdt"] = run_stage(["train", "--data", str(s), "--model", "gbdt", "--out",
                                         str(work / f"run-gbdt-{size}"), "--set", "train.progress=false"],
                                        work / f"run-gbdt-{size}.log")
                shutil.rmtree(work / f"run-gbdt-{size}", ignore_errors=True)
            shutil.rmtree(work / f"run-{size}", ignore_errors=True)
            shutil.rmtree(work / f"run-mem-{size}", ignore_errors=True)
            report["sizes"][size] = res
            print(json.dumps({size: res}), flush=True)
            if not a.workdir:
                shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(s, ignore_errors=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    print(f"wrote {out}")


def markdown(report: dict) -> str:
    cap = f"{report['steps_per_epoch']} batches of {report['batch_size']}" if report["steps_per_epoch"] else "full epoch"
    gbdt = any("gbdt" in r for r in report["sizes"].values())
    lines = ["| impressions | requests | behaviours | prepare | shard | train DNN from shards | train DNN in memory |"
             + (" gbdt from shards (full fit + evaluation) |" if gbdt else ""),
             "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gbdt else "")]
    def cell(r: dict, stage: str) -> str:
        x = r.get(stage)
        return f"{x['peak_rss_mib']:,.0f} MiB ({x['seconds']:.0f} s)" if x else "-"

    for r in report["sizes"].values():
        lines.append(f"| {r['impressions']:,} | {r['requests']:,} | {r['behaviors']:,} | {cell(r, 'prepare')} | "
                     f"{cell(r, 'shard')} | {cell(r, 'train')} | {cell(r, 'train_in_memory')} |"
                     + (f" {cell(r, 'gbdt')} |" if gbdt else ""))
    then = ("then full streamed valid/test evaluation (`qdrank train`)" if report.get("cli_train") else
            f"then {report.get('eval_batches') or 'all'} streamed test batches of 8192")
    lines.append(f"\nPeak RSS per stage (seconds in brackets); training capped at {cap}, "
                 f"{report['threads']} threads, {then}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
