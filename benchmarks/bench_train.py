"""Training-step throughput (impressions/s) per model: the reference path against the fast path
and each speed switch on its own; writes a JSON report.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py [--models dnn,din] [--ablate]
        [--profile reports/bench/profiles] [--out reports/bench/train.json]

Setting (issue #9): 2 threads, batches of ~1,024 impressions (whole requests), history 50, width
64, synthetic ``small`` (prepared into --data once if missing); DiffusionGS also at history
1,000. Every variant (a set of switches) gets its own model and optimizer; variants run
interleaved in blocks of --block steps, --rounds times, on the same batches, after a warm-up
block, each round starting at the next variant, so machine load drifts and the cost of following
another variant's block hit every variant alike. A variant's figure is the median over
rounds of impressions / wall time of its block, batch building included (that is what
``train.prefetch`` hides); impressions per process-CPU-second are reported beside it, as they
suffer less when other processes share the cores. Compare ratios measured in one run; absolute
figures are machine-dependent.

Switches (reference value -> fast value):
  fused     ``model.emb.fast``: unique items once per batch + fused EmbeddingBags (False -> True)
  layers    ``set_fast_layers``: per-request rewrites of DIN's target attention, the HSTU/MTGR
            candidate attention and SIM/TWIN's GSU scores, the UDL's folded attention (the same
            function, tests/test_speed.py), and Dropout's cheap CPU mask (the same distribution)
            (reference forms -> fast forms)
  sparse    ``train.embedding_optimizer``: dense Adam -> row-wise lazy Adam on row-sparse grads
  prefetch  ``train.prefetch``: 0 -> 2 batches built ahead in a thread
  bf16      ``train.autocast``: none -> auto (bf16 autocast where the hardware has fast bf16
            matmuls, as on this CPU: AVX-512 BF16; the default)
  compile   ``train.compile``: False -> True (measured, off by default; compile time reported)
  trim      ``TrainStep.trim``: history columns that are padding in every request of the batch
            dropped before the step (``qdrank.data.batch.trim_history``; the same function) (False -> True)
  nodrop    ``model.dropout``: configured -> 0 (measured, not a default: it changes the model)
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch

from qdrank.config import build_config
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.sources import prepare_source
from qdrank.models.layers import set_fast_layers
from qdrank.models.registry import available_models
from qdrank.training.prefetch import prefetch
from qdrank.training.trainer import TrainStep, build_model
from qdrank.utils.io import atomic_write_json

TARGETS = {"dnn": 60_000, "din": 30_000, "diffusiongs": 30_000, "diffusiongs@1000": 5_000}
OTHER_TARGET = 15_000
REFERENCE = {"fused": False, "layers": False, "embedding_optimizer": "dense", "prefetch": 0, "autocast": "none", "compile": False,
             "nodrop": False, "trim": False}
FAST = {"fused": True, "layers": True, "embedding_optimizer": "adam", "prefetch": 2, "autocast": "auto", "compile": False,
        "nodrop": False, "trim": True}
TOGGLES = {"fused": ("fused", True), "layers": ("layers", True), "sparse": ("embedding_optimizer", "adam"), "prefetch": ("prefetch", 2),
           "bf16": ("autocast", "auto"), "compile": ("compile", True), "nodrop": ("nodrop", True),
           "trim": ("trim", True)}


def variants(ablate: bool, extra: list[str]) -> dict[str, dict]:
    """reference, fast, and with --ablate: reference + each default switch alone, fast + nodrop
    (``extra`` adds named switches, e.g. compile; ``-name``: fast without that switch; ``copy``: a
    second fast variant, whose ratio to fast shows the run's noise)."""
    out = {"reference": dict(REFERENCE), "fast": dict(FAST)}
    names = [n for n in TOGGLES if n != "compile"] if ablate else []  # compile: opt in, it is slow
    for name in dict.fromkeys(names + extra):
        if name == "copy":  # a second, identical fast variant: the noise floor of the comparison
            out["fast-copy"] = dict(FAST)
            continue
        if name.startswith("-"):  # the fast path without one switch: what that switch buys
            key = TOGGLES[name[1:]][0]
            out[f"fast{name}"] = {**FAST, key: REFERENCE[key]}
            continue
        key, value = TOGGLES[name]
        if FAST[key] == value:
            out[f"ref+{name}"] = {**REFERENCE, key: value}
        else:
            out[f"fast+{name}"] = {**FAST, key: value}
    return out


class Runner:
    """One variant: its model, TrainStep and batch source."""

    def __init__(self, name: str, sw: dict, model_name: str, ds: SearchLogDataset, dim: int, threads: int):
        over = [f"model.dim={dim}", f"train.embedding_optimizer={sw['embedding_optimizer']}",
                f"train.prefetch={sw['prefetch']}", f"train.autocast={sw['autocast']}",
                f"train.compile={str(sw['compile']).lower()}", f"train.num_threads={threads}"]
        if sw["nodrop"]:
            over.append("model.dropout=0")
        cfg = build_config(model_name, overrides=over)
        cfg = dataclasses.replace(cfg, data=ds.cfg)
        self.name, self.ds, self.cfg = name, ds, cfg
        self.model = build_model(cfg, ds)
        self.model.emb.fast = sw["fused"]
        set_fast_layers(self.model, sw["layers"])
        self.model.train()
        self.step = TrainStep(self.model, cfg.train, torch.device("cpu"))
        self.step.trim = sw["trim"]

    def block(self, groups: list) -> tuple[int, float, float]:
        """Train on ``groups``; -> (impressions, wall seconds, process CPU seconds)."""
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        make = (self.ds.make_batch(rows, self.model.extra_inputs) for rows in groups)
        for b in prefetch(make, self.cfg.train.prefetch):
            self.step(b)
            n += len(b.click)
        return n, time.perf_counter() - t0, time.process_time() - c0


def bench_model(label: str, model_name: str, ds: SearchLogDataset, vs: dict[str, dict], a) -> dict:
    groups = ds.batch_rows("train", a.batch_size, shuffle=True, seed=0)
    need = a.block * (a.rounds + 1)
    groups = (groups * (need // max(len(groups), 1) + 1))[:need]
    runners, rates, cpu_rates, build_s, warm_s = {}, {}, {}, {}, {}
    for name, sw in vs.items():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        runners[name] = Runner(name, sw, model_name, ds, a.dim, a.threads)
        build_s[name] = time.perf_counter() - t0
        rates[name], cpu_rates[name] = [], []
    names = list(runners)
    for r in range(a.rounds + 1):
        chunk = groups[r * a.block:(r + 1) * a.block]
        # each round starts at another variant: the block right after the reference path's ran
        # ~30% slower on the loaded machine (a variant identical to "fast" measured x1.38 of it)
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runners[name]
            n, s, c = run.block(chunk)
            if r == 0:
                warm_s[name] = s  # includes torch.compile's compilation for compile variants
            else:
                rates[name].append(n / s)
                cpu_rates[name].append(n / c)
    out = {}
    ref = statistics.median(rates["reference"])
    cpu_ref = statistics.median(cpu_rates["reference"])
    for name, rs in rates.items():
        med, cpu = statistics.median(rs), statistics.median(cpu_rates[name])
        out[name] = {"impressions_per_s": med, "rounds": rs, "ratio_to_reference": med / ref,
                     "impressions_per_cpu_s": cpu, "cpu_ratio_to_reference": cpu / cpu_ref,
                     "warmup_block_seconds": warm_s[name], "build_seconds": build_s[name],
                     "switches": vs[name]}
    if "fast" in out:
        for name in out:
            out[name]["ratio_to_fast"] = out[name]["impressions_per_s"] / out["fast"]["impressions_per_s"]
    target = TARGETS.get(label, OTHER_TARGET)
    print(f"{label:18s} " + "  ".join(f"{n}={v['impressions_per_s']:.0f} (x{v['ratio_to_reference']:.2f}, "
                                      f"cpu x{v['cpu_ratio_to_reference']:.2f})" for n, v in out.items())
          + f"   target {target:,}", flush=True)
    if a.profile and model_name in a.profile_models.split(","):
        for name in ("reference", "fast"):
            write_profile(Path(a.profile) / f"{label.replace('@', '_h')}_{name}.txt", runners[name],
                          groups[: a.block])
    return {"target": target, "variants": out}


def write_profile(path: Path, run: Runner, groups: list) -> None:
    """torch.profiler table of ``groups`` steps, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    batches = [run.ds.make_batch(g, run.model.extra_inputs) for g in groups]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            run.step(b)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"  profile -> {path}")


def load(path: Path, max_history: int) -> SearchLogDataset:
    cfg = build_config("dnn", overrides=[f"data.max_history={max_history}"])
    return SearchLogDataset(path, cfg.data, log=lambda m: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/syn_small", help="synthetic small; prepared here if missing")
    ap.add_argument("--models", default=",".join(available_models()))
    ap.add_argument("--long-history", type=int, default=1000, help="DiffusionGS history length run too; 0 = skip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=5, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=4, help="timed blocks per variant (after one warm-up block)")
    ap.add_argument("--ablate", action="store_true", help="also each switch on its own")
    ap.add_argument("--variants", default="", help="extra switches to measure, e.g. compile,nodrop; -layers = fast without layers; "
                    "copy = a second fast variant (the noise floor)")
    ap.add_argument("--profile", default="", help="folder for profiler tables of reference and fast")
    ap.add_argument("--profile-models", default="dnn,din,diffusiongs")
    ap.add_argument("--out", default="reports/bench/train.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    if not (data / "dataset.yaml").exists():
        print(f"preparing synthetic small into {data}")
        prepare_source("synthetic", None, data, seed=0, scale="small")
    vs = variants(a.ablate, [v for v in a.variants.split(",") if v])
    report: dict = {"data": str(data), "threads": a.threads, "batch_size": a.batch_size, "history": a.history,
                    "dim": a.dim, "block": a.block, "rounds": a.rounds, "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "models": {}}
    ds = load(data, a.history)
    for name in a.models.split(","):
        report["models"][name] = bench_model(name, name, ds, vs, a)
    if a.long_history and "diffusiongs" in a.models.split(","):
        ds = load(data, a.long_history)
        label = f"diffusiongs@{a.long_history}"
        report["models"][label] = bench_model(label, "diffusiongs", ds, vs, a)
    print_table(report)
    atomic_write_json(Path(a.out), report)
    print(f"wrote {a.out}")


def print_table(report: dict) -> None:
    names = list(next(iter(report["models"].values()))["variants"])
    print("\n| model | " + " | ".join(names) + " | fast / reference | target |")
    print("|---" * (len(names) + 3) + "|")
    for m, r in report["models"].items():
        v = r["variants"]
        cells = [f"{v[n]['impressions_per_s']:,.0f}" for n in names]
        ratio = v["fast"]["ratio_to_reference"] if "fast" in v else float("nan")
        print(f"| {m} | " + " | ".join(cells) + f" | x{ratio:.2f} | {r['target']:,} |")


if __name__ == "__main__":
    main()
