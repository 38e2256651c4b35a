"""Data preparation time and training throughput (samples/s) per model; writes a JSON report.

    .venv/bin/python benchmarks/bench_pipeline.py [--scale small] [--models dnn,din] [--steps 30]

Figures are machine-dependent: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from qdrank.config import build_config
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.sources import prepare_source
from qdrank.models.registry import available_models, model_class
from qdrank.training.trainer import build_model
from qdrank.utils.io import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", default="small")
    # training throughput: models fitted without gradient steps (baselines) have no step to time
    ap.add_argument("--models", default=",".join(m for m in available_models() if model_class(m).gradient_trained))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--out", default="reports/bench/pipeline.json")
    a = ap.parse_args()
    report: dict = {"scale": a.scale, "threads": torch.get_num_threads(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "syn"
        t = time.perf_counter()
        rep = prepare_source("synthetic", None, d, seed=0, scale=a.scale)
        report["prepare_seconds"] = time.perf_counter() - t
        report["impressions"] = rep.n_impressions
        report["prepare_impressions_per_s"] = rep.n_impressions / report["prepare_seconds"]
        print(f"prepare synthetic/{a.scale}: {rep.n_impressions:,} impressions in {report['prepare_seconds']:.2f}s")
        cfg0 = build_config("dnn")
        t = time.perf_counter()
        ds = SearchLogDataset(d, cfg0.data, log=lambda m: None)
        report["load_seconds"] = time.perf_counter() - t
        print(f"load + encode: {report['load_seconds']:.2f}s")
        for name in a.models.split(","):
            cfg = build_config(name, overrides=[f"train.batch_size={a.batch_size}"])
            model = build_model(cfg, ds)
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            groups = ds.batch_rows("train", a.batch_size, shuffle=True, seed=0)[: a.steps + 3]
            batches = [ds.make_batch(g) for g in groups]
            n, elapsed = 0, 0.0
            for i, b in enumerate(batches):
                t = time.perf_counter()
                out = model(b)
                loss, _ = model.loss(b, out)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i >= 3:  # warm-up excluded
                    elapsed += time.perf_counter() - t
                    n += len(b.click)
            sps = n / max(elapsed, 1e-9)
            report["models"][name] = {"train_samples_per_s": sps, "params": model.n_parameters()}
            print(f"{name:12s} {sps:10.0f} samples/s   {model.n_parameters() / 1e6:.2f}M params")
    atomic_write_json(Path(a.out), report)
    print(f"wrote {a.out}")
    print(json.dumps({k: v for k, v in report.items() if k != "models"}))


if __name__ == "__main__":
    main()
