"""Peak memory of the streaming pipeline (prepare -> shard -> train DNN from shards) vs log size.

    .venv/bin/python benchmarks/bench_memory.py [--sizes 1m,3m,10m] [--steps 200] [--baseline-max 3000000]

Each stage runs as its own ``qdrank`` subprocess; its peak RSS is the child's ``ru_maxrss``
(``os.wait4``). ``train`` is one DNN epoch from the shards, capped at ``--steps`` batches
(``train.max_steps_per_epoch``; 0 = the full epoch), followed by the full streamed evaluation of
the validation split (twice: after the epoch and for the final report) and of the test split.
``train (in-memory)`` is the same run from the dataset directory (the whole log loaded), for
sizes up to ``--baseline-max`` impressions. Writes a JSON report and prints a Markdown table.
"""

from __future__ import annotations

import argparse
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


def run_stage(args: list[str], log: Path) -> dict:
    """Run ``python -m qdrank.cli ARGS``; its peak RSS (MiB) and wall seconds."""
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "qdrank.cli", *args], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"stage failed ({p.returncode}): qdrank {' '.join(args)}; see {log}:\n"
                         + log.read_text()[-2000:])
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1m,3m,10m", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--steps", type=int, default=200, help="training batches per epoch (0 = full epoch)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-max", type=int, default=3_000_000,
                    help="also train from the directory (in memory) up to this many impressions")
    ap.add_argument("--workdir", help="where datasets and shards go (default: a temporary folder)")
    ap.add_argument("--out", default="reports/bench/memory.json")
    a = ap.parse_args()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="qdrank-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    train_set = ["--set", f"train.max_steps_per_epoch={a.steps}", "--set", "train.max_epochs=1",
                 "--set", "train.progress=false", "--set", f"train.num_threads={a.threads}",
                 "--set", f"train.batch_size={a.batch_size}"]
    report: dict = {"steps_per_epoch": a.steps, "batch_size": a.batch_size, "threads": a.threads, "sizes": {}}
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
            res["train"] = run_stage(["train", "--data", str(s), "--model", "dnn", "--out", str(work / f"run-{size}"),
                                      *train_set], work / f"train-{size}.log")
            res["train"]["result"] = json.loads((work / f"run-{size}" / "result.json").read_text())["test"].get("serving_ctr_auc")
            if manifest["n_impressions"] <= a.baseline_max:
                res["train_in_memory"] = run_stage(["train", "--data", str(d), "--model", "dnn", "--out",
                                                    str(work / f"run-mem-{size}"), *train_set],
                                                   work / f"train-mem-{size}.log")
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
    lines = ["| impressions | requests | behaviours | prepare | shard | train DNN from shards | train DNN in memory |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(r: dict, stage: str) -> str:
        x = r.get(stage)
        return f"{x['peak_rss_mib']:,.0f} MiB ({x['seconds']:.0f} s)" if x else "-"

    for r in report["sizes"].values():
        lines.append(f"| {r['impressions']:,} | {r['requests']:,} | {r['behaviors']:,} | {cell(r, 'prepare')} | "
                     f"{cell(r, 'shard')} | {cell(r, 'train')} | {cell(r, 'train_in_memory')} |")
    lines.append(f"\nPeak RSS per stage (seconds in brackets); training capped at {cap}, "
                 f"{report['threads']} threads, then full streamed valid/test evaluation.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
