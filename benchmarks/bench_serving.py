"""In-process serving latency: p50/p99 of ``Ranker.rank`` per request.

    .venv/bin/python benchmarks/bench_serving.py [--run RUN_DIR | --model din] [--quick]
        [--history 100,1000,10000] [--candidates 100,500,2000] [--history-mode model|run]
        [--threads 1] [--repeats 100] [--backend torch|onnx] [--inline-history 10000]
        [--out reports/bench/serving.json]

Without ``--run`` it prepares the tiny synthetic dataset and trains a short run of ``--model``
(``--set`` passes training overrides, e.g. ``--set model.layers=4 --set model.dim=64``).

Measured, per (history H, candidates N): the user has H behaviours in the SQLite store; with
``--history-mode model`` (default) the serving ``max_history`` is H, so the model consumes H
behaviours; with ``run`` it keeps the run's ``data.max_history`` (H only costs the store read).
Also: the serving fast paths against their reference forms (``fast_vs_reference``, alternating
call by call: the before/after ratio of this machine at this moment); single-step vs 50-step denoising (models whose config has ``denoise_steps``), and shared
request encoding (R=1, N candidates) vs scoring every (user, candidate) pair as its own request
(R=N requests of one candidate); a request with ``--inline-history`` behaviours in its body; 8
requests scored in one forward (micro-batching) vs one by one. Per configuration the breakdown is
``decode_check`` (msgspec decode + checks), ``encode`` (-> Batch), ``model`` (forward), ``respond``
(ranking + JSON encoding); ``rank_bytes`` is all of it, JSON bytes in -> JSON bytes out.
Results go to JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qdrank.data.batch import Batch
from qdrank.serving.ranker import Ranker, ServingConfig
from qdrank.serving.schemas import decode_json, encode_json
from qdrank.serving.store import HistoryStore
from qdrank.utils.io import atomic_write_json

TS = 2_000_000_000


def train_tiny(model: str, sets: list[str], work: Path) -> Path:
    from qdrank.config import build_config
    from qdrank.data.dataset import SearchLogDataset
    from qdrank.data.sources import synthetic
    from qdrank.training.trainer import Trainer

    data, run = work / "data", work / "run"
    synthetic.prepare(None, data, seed=0, scale="tiny")
    cfg = build_config(model, overrides=["train.max_epochs=1", "train.max_steps_per_epoch=3",
                                         "train.progress=false", *sets])
    ds = SearchLogDataset(data, cfg.data, log=lambda m: None)
    Trainer(cfg, ds, run, log=lambda m: None).fit()
    return run


def make_request(ranker: Ranker, user: str, n_cand: int, rng: np.random.Generator) -> dict:
    items = ranker.fmap.item_vocab
    cands = []
    for i in rng.integers(0, len(items), n_cand):
        it = items[int(i)]
        cands.append({"item_id": int(it) if it.isdigit() else it, "price": float(rng.uniform(5, 500)),
                      "discount": 0.0})
    return {"user_id": user, "query": "red running shoes sale", "timestamp": TS,
            "context": {"device": "app", "hour": 21}, "candidates": cands}


def fill_store(store: HistoryStore, ranker: Ranker, user: str, n: int, rng: np.random.Generator) -> None:
    items = ranker.fmap.item_vocab
    acts = ["click", "cart", "purchase", "impression"]
    store.append({"user_id": user, "item_id": items[int(i)], "timestamp": TS - 10 * (n - k),
                  "action": acts[k % 4], "query": f"query {k % 37}"}
                 for k, i in enumerate(rng.integers(0, len(items), n)))


def timed(fn, repeats: int, budget_s: float) -> dict:
    """Wall-clock and CPU time (this thread's) per call. On a shared machine the CPU time is the
    better estimate of what an idle core would take; the wall time includes waiting for a core."""
    fn()  # warm-up
    times, cpu = [], []
    t_end = time.perf_counter() + budget_s
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - c0) * 1e3)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > t_end and len(times) >= 5:
            break
    return latency_stats(times, cpu)


def latency_stats(times: list[float], cpu: list[float]) -> dict:
    """Wall and CPU milliseconds per call -> count, p50, p99 and mean of each."""
    a, c = np.array(times), np.array(cpu)
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "cpu_p50_ms": float(np.percentile(c, 50)),
            "cpu_p99_ms": float(np.percentile(c, 99)), "cpu_mean_ms": float(c.mean())}


def alternating(calls: dict[str, Callable[[int], object]], repeats: int, budget_s: float,
                switch: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Each call of ``calls`` in turn (call ``i`` gets its index), ``repeats`` times each or until
    ``budget_s`` runs out, so every arm sees the same machine load: a before/after ratio measured in
    one run. ``switch(key)`` runs before each call, outside the timing. -> key -> :func:`latency_stats`."""
    keys = list(calls)
    times: dict[str, list] = {k: [] for k in keys}
    cpu: dict[str, list] = {k: [] for k in keys}
    t_end = time.perf_counter() + budget_s
    for i in range(len(keys) * repeats):
        key = keys[i % len(keys)]
        if switch is not None:
            switch(key)
        t0, c0 = time.perf_counter(), time.thread_time()
        calls[key](i)
        cpu[key].append((time.thread_time() - c0) * 1e3)
        times[key].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > t_end and i >= 10:
            break
    return {k: latency_stats(times[k], cpu[k]) for k in keys}


def fmt(v: dict) -> str:
    return (f"p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms (cpu p50 {v['cpu_p50_ms']:.2f} "
            f"p99 {v['cpu_p99_ms']:.2f})")


def rank_bytes(r: Ranker, raw: bytes) -> bytes:
    """JSON bytes -> decoded, checked, encoded, scored, ranked -> JSON bytes."""
    return encode_json(r.rank(decode_json(raw)))


def per_pair_batch(b: Batch) -> Batch:
    """R=N requests of one candidate each: the request side repeated for every candidate."""
    n = b.cand_item.shape[0]
    rep = {f.name: getattr(b, f.name) for f in dataclasses.fields(Batch)}
    for k in ("request_id", "user_sparse", "user_dense", "ctx_sparse", "ctx_dense", "query", "hist_item",
              "hist_sparse", "hist_dense", "hist_query", "hist_time", "hist_age", "hist_session", "hist_len"):
        rep[k] = rep[k].expand(n, *rep[k].shape[1:]).contiguous()
    rep["cand_req"] = torch.arange(n)
    return Batch(**rep)


def fast_vs_reference(r: Ranker, base: Ranker, user: str, rng: np.random.Generator, repeats: int,
                      budget: float) -> dict:
    """``rank_bytes`` with the serving fast paths (traced request encoder, per-request history matches
    and overlap, folded head) against the reference forms (eager encoder, ``inference_fast`` off),
    alternating call by call so both see the same machine load; scores compared too."""
    raws = [encode_json(make_request(base, user, 500, rng)) for _ in range(4)]
    switches = [m for m in r.model.modules() if isinstance(getattr(m, "inference_fast", None), bool)]
    traced = r.traced

    def mode(fast: bool) -> None:
        r.traced = traced if fast else None
        for m in switches:
            m.inference_fast = fast

    res: dict = {"request_encoder": r.trace_status, "switches": len(switches)}
    diffs = []
    for raw in raws:
        mode(False)
        ref = r.rank(decode_json(raw))
        mode(True)
        got = r.rank(decode_json(raw))
        a, b = ({c.item_id: c.score for c in x.candidates} for x in (ref, got))
        diffs.append(max(abs(a[k] - b[k]) for k in a))
    res["max_abs_score_diff"] = float(max(diffs))
    def call(i: int) -> None:
        rank_bytes(r, raws[i % 4])

    res.update(alternating({"fast": call, "reference": call}, repeats, budget,
                           switch=lambda key: mode(key == "fast")))
    mode(True)
    res["speedup_p50"] = res["reference"]["p50_ms"] / res["fast"]["p50_ms"]
    res["cpu_speedup_p50"] = res["reference"]["cpu_p50_ms"] / res["fast"]["cpu_p50_ms"]
    return res


def traced_layers_ab(base: Ranker, store: HistoryStore, user: str, h: int, rng: np.random.Generator,
                     repeats: int, budget: float) -> dict | None:
    """``rank_bytes`` at history ``h`` with the request encoder traced over the model's fast layer forms
    against a trace of their reference forms (``set_fast_layers``), alternating call by call: what
    the fast layers are worth inside the trace serving runs (CPU time; None: no such layer)."""
    from qdrank.models.layers import set_fast_layers

    if base.onnx is not None or not any(isinstance(getattr(m, "fast", None), bool) for m in base.model.modules()):
        return None
    cfg = ServingConfig.build(base.serving, max_history=h)
    set_fast_layers(base.model, False)
    try:
        ref = Ranker(base.model, base.cfg, base.fmap, cfg, store)
    finally:
        set_fast_layers(base.model, True)
    fast = Ranker(base.model, base.cfg, base.fmap, cfg, store)
    raw = encode_json(make_request(base, user, 500, rng))
    res = {"history": h, "candidates": 500, "traced": [fast.trace_status, ref.trace_status],
           **alternating({"fast": lambda i: rank_bytes(fast, raw), "reference": lambda i: rank_bytes(ref, raw)},
                         repeats, budget)}
    res["cpu_speedup_p50"] = res["reference"]["cpu_p50_ms"] / res["fast"]["cpu_p50_ms"]
    return res


def base_parser(doc: str) -> argparse.ArgumentParser:
    """Arguments every serving benchmark takes: which run (or a tiny model trained on the spot)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run directory from `qdrank train` (default: train a tiny one)")
    p.add_argument("--model", default="din", help="model of the tiny run when --run is not given")
    p.add_argument("--set", action="append", default=[], help="overrides of the tiny run")
    p.add_argument("--quick", action="store_true")
    return p


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--history", help="comma list (default 100,1000,10000; quick 100,1000)")
    p.add_argument("--candidates", help="comma list (default 100,500,2000; quick 100,500)")
    p.add_argument("--history-mode", choices=["model", "run"], default="model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=0, help="default 200 (quick 30)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per configuration at most")
    p.add_argument("--max-pairs", type=float, default=2e7, help="skip N*H above this (memory guard)")
    p.add_argument("--inline-history", type=int, default=10_000, help="behaviours in a request body (0 = skip)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--skip-extra", action="store_true", help="only the latency grid (no denoise / per-pair)")
    p.add_argument("--out", default="reports/bench/serving.json")
    a = p.parse_args(argv)

    hs = [int(x) for x in (a.history or ("100,1000" if a.quick else "100,1000,10000")).split(",")]
    ns = [int(x) for x in (a.candidates or ("100,500" if a.quick else "100,500,2000")).split(",")]
    repeats = a.repeats or (30 if a.quick else 200)
    tmp = tempfile.TemporaryDirectory()
    run = Path(a.run) if a.run else train_tiny(a.model, a.set, Path(tmp.name))
    rng = np.random.default_rng(0)
    store = HistoryStore(None)
    base = Ranker.load(run, store=store, num_threads=a.threads, backend=a.backend)
    torch.set_num_threads(a.threads)
    out: dict = {"model": base.cfg.model_name, "run": str(run), "model_config": dataclasses.asdict(base.cfg.model),
                 "run_max_history": base.cfg.data.max_history, "history_mode": a.history_mode,
                 "threads": a.threads, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                   "python": sys.version.split()[0], "torch": torch.__version__},
                 "request_encoder": base.trace_status, "latency": [], "denoise": None, "shared_encoding": None}
    print(f"model {out['model']} ({sum(p.numel() for p in base.model.parameters()):,} parameters), "
          f"threads {a.threads}, history mode {a.history_mode}")

    def ranker_for(h: int, **extra) -> Ranker:
        over = dict(num_threads=a.threads, max_history=h if a.history_mode == "model" else 0,
                    backend=a.backend, **extra)
        if not extra and over["max_history"] in (0, base.encoder.L):
            return base
        m, cfg, fmap = base.model, base.cfg, base.fmap
        if "denoise_steps" in extra:
            from qdrank.training.checkpoint import load_model

            m, cfg, fmap = load_model(run, model_overrides={"denoise_steps": extra["denoise_steps"]})
        return Ranker(m, cfg, fmap, ServingConfig.build(**over), store)

    for h in hs:
        user = f"bench-user-{h}"
        fill_store(store, base, user, h, rng)
        r = ranker_for(h)
        for n in ns:
            row = {"history": h, "candidates": n, "history_used": min(h, r.encoder.L)}
            if n * row["history_used"] > a.max_pairs:
                row["skipped"] = f"N*H = {n * row['history_used']:,} > --max-pairs"
                out["latency"].append(row)
                print(row)
                continue
            req = make_request(base, user, n, rng)
            raw = encode_json(req)
            try:
                # the whole request path, bytes in -> bytes out (what the HTTP worker thread does)
                row["rank_bytes"] = timed(lambda: rank_bytes(r, raw), repeats, a.budget)  # noqa: B023
                row["rank_dict"] = timed(lambda: r.rank(req), repeats, a.budget / 2)  # noqa: B023
                checked = r.check(decode_json(raw))
                enc = r.encoder.encode(checked, r.store)
                logits = r.logits(enc.batch)
                row["decode_check"] = timed(lambda: r.check(decode_json(raw)), repeats, a.budget / 4)  # noqa: B023
                row["encode"] = timed(lambda: r.encoder.encode(checked, r.store), repeats, a.budget / 4)  # noqa: B023
                row["model"] = timed(lambda: r.logits(enc.batch), repeats, a.budget / 2)  # noqa: B023
                row["respond"] = timed(lambda: encode_json(r.respond(enc, *logits)), repeats,  # noqa: B023
                                       a.budget / 4)
            except (RuntimeError, MemoryError, IndexError) as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out["latency"].append(row)
            print({k: (v if not isinstance(v, dict) else fmt(v)) for k, v in row.items()}, flush=True)

    # a request carrying --inline-history behaviours in its body (the model keeps the run's most recent)
    if a.inline_history:
        r = ranker_for(0)
        req = make_request(base, "inline-user", 500, rng)
        items = base.fmap.item_vocab
        req["history"] = [{"item_id": items[int(i)], "timestamp": TS - 10 * (a.inline_history - k),
                           "action": "click", "query": f"query {k % 37}"}
                          for k, i in enumerate(rng.integers(0, len(items), a.inline_history))]
        raw = encode_json(req)
        out["inline_history"] = {"behaviours": a.inline_history, "candidates": 500, "body_bytes": len(raw),
                                 "history_used": r.encoder.L,
                                 "rank_bytes": timed(lambda: rank_bytes(r, raw), repeats, a.budget)}
        print(f"inline history {a.inline_history:,} behaviours ({len(raw) / 1e6:.1f} MB body): "
              f"{fmt(out['inline_history']['rank_bytes'])}", flush=True)

    # the serving fast paths against their reference forms, interleaved in this run (same requests)
    h = min(100, max(hs))
    r = ranker_for(h)
    if r.onnx is None:
        out["fast_vs_reference"] = fast_vs_reference(r, base, f"bench-user-{h}", rng, repeats, a.budget)
        fr = out["fast_vs_reference"]
        print(f"fast paths vs reference forms (history {h}, 500 candidates): {fmt(fr['fast'])} vs "
              f"{fmt(fr['reference'])} (x{fr['cpu_speedup_p50']:.2f} in CPU time)", flush=True)

    # the model's fast layer forms inside the traced encoder vs its reference forms, at the longest history
    ab = traced_layers_ab(base, store, f"bench-user-{max(hs)}", max(hs), rng, repeats, a.budget)
    if ab is not None:
        out["traced_fast_layers"] = ab
        print(f"traced encoder, fast vs reference layers (history {ab['history']:,}, 500 candidates): CPU p50 "
              f"{ab['fast']['cpu_p50_ms']:.2f} vs {ab['reference']['cpu_p50_ms']:.2f} ms, p99 "
              f"{ab['fast']['cpu_p99_ms']:.2f} vs {ab['reference']['cpu_p99_ms']:.2f} ms "
              f"(x{ab['cpu_speedup_p50']:.2f})", flush=True)

    # micro-batching: 8 requests in one forward vs one by one
    r = ranker_for(min(100, max(hs)))
    if r.onnx is None:
        reqs = [r.check(make_request(base, f"bench-user-{min(100, max(hs))}", 500, rng)) for _ in range(8)]
        one = timed(lambda: [r.rank(q) for q in reqs], max(5, repeats // 4), a.budget / 2)
        many = timed(lambda: r.rank_many(reqs), max(5, repeats // 4), a.budget / 2)
        out["micro_batch"] = {"requests": 8, "candidates": 500, "one_by_one": one, "batched": many,
                              "speedup_p50": one["p50_ms"] / many["p50_ms"]}
        out["micro_batch"]["cpu_speedup_p50"] = one["cpu_p50_ms"] / many["cpu_p50_ms"]
        print(f"8 requests: one by one {fmt(one)}, one forward {fmt(many)} "
              f"(x{out['micro_batch']['cpu_speedup_p50']:.2f} in CPU time)", flush=True)

    # shared request encoding vs one request per (user, candidate) pair
    if a.skip_extra:
        atomic_write_json(Path(a.out), out)
        print(f"wrote {a.out}")
        return 0
    h, n = min(100, max(hs)), 500
    r = ranker_for(h)
    user = f"bench-user-{h}"
    if r.onnx is None:  # an ONNX session scores one request per call: no per-pair batch
        enc = r.encode(make_request(base, user, n, rng))
        pairs = per_pair_batch(enc.batch)
        shared = timed(lambda: r.logits(enc.batch), repeats, a.budget)
        sep = timed(lambda: r.logits(pairs), max(5, repeats // 5), a.budget)
        c1, _ = r.logits(enc.batch)
        c2, _ = r.logits(pairs)
        out["shared_encoding"] = {"history": h, "candidates": n, "shared": shared, "per_pair": sep,
                                  "speedup_p50": sep["p50_ms"] / shared["p50_ms"],
                                  "max_abs_diff": float((c1 - c2).abs().max())}
        print(f"shared encoding: {shared['p50_ms']:.2f} ms vs per pair {sep['p50_ms']:.2f} ms "
              f"(x{out['shared_encoding']['speedup_p50']:.1f})")

    if hasattr(base.cfg.model, "denoise_steps"):
        res = {}
        req = make_request(base, user, n, rng)
        for steps in (1, 50):
            rs = ranker_for(h, denoise_steps=steps)
            res[f"steps_{steps}"] = timed(lambda: rs.rank(req), repeats, a.budget)  # noqa: B023
        out["denoise"] = {"history": h, "candidates": n, **res}
        print("denoise:", {k: fmt(v) for k, v in res.items()})
    atomic_write_json(Path(a.out), out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
