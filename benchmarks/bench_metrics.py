"""Timing of the vectorised ranking metrics on 1M impressions in 100k requests.

    .venv/bin/python benchmarks/bench_metrics.py [--n 1000000] [--groups 100000] [--repeats 3]
                                                 [--out reports/bench/metrics.json]

Prints best-of-``repeats`` wall times for ``auc``, ``gauc`` and ``compute_all`` (and
sklearn's ``roc_auc_score`` for reference when installed) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qdrank.evaluation.metrics import auc, compute_all, gauc
from qdrank.utils.io import atomic_write_json


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def make_data(n: int, n_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, n_groups, n).astype(np.int64)
    y = (rng.random(n) < 0.1).astype(np.float32)
    s = (rng.normal(size=n) + 0.8 * y).astype(np.float32)  # float32 model outputs: some ties
    return y, s, g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reports/bench/metrics.json"))
    ap.add_argument("--no-sklearn", action="store_true", help="skip the sklearn reference timing")
    args = ap.parse_args(argv)

    y, s, g = make_data(args.n, args.groups, args.seed)
    timings: dict[str, float] = {}
    values: dict[str, Any] = {}
    timings["auc_s"], values["auc"] = best_of(lambda: auc(y, s), args.repeats)
    timings["gauc_s"], values["gauc"] = best_of(lambda: gauc(y, s, g), args.repeats)
    timings["compute_all_s"], _ = best_of(lambda: compute_all(y, s, g, prob="sigmoid"), args.repeats)
    if not args.no_sklearn:
        try:
            from sklearn.metrics import roc_auc_score
        except ImportError:  # pragma: no cover - optional
            pass
        else:
            timings["sklearn_roc_auc_s"], values["sklearn_auc"] = best_of(
                lambda: roc_auc_score(y, s), args.repeats
            )

    print(f"n={args.n:,} impressions, {args.groups:,} groups, best of {args.repeats}")
    for k, v in timings.items():
        print(f"  {k[:-2]:<18s} {v * 1000:8.1f} ms")
    print(f"  auc={values['auc']:.6f} gauc={values['gauc']['gauc']:.6f} "
          f"gauc_w={values['gauc']['gauc_w']:.6f} n_groups={values['gauc']['n_groups']}")

    payload = {
        "n": args.n,
        "groups": args.groups,
        "repeats": args.repeats,
        "seed": args.seed,
        "timings_s": timings,
        "values": values,
        "env": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
    }
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
