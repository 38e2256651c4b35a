"""DiffusionGS speed/memory benchmark: linear vs quadratic UDL attention over history lengths.

Not a test. Fabricates Batch tensors for a small hand-made FeatureMap (no dataset needed) and
measures, per history length L and attention path:

* training throughput (impressions/s and requests/s; forward + backward + Adam step; fastest step),
* inference latency for one request with 500 candidates (single denoising step, eval mode),
  split into encode_request (the per-request part) and the total,
* peak memory: on CPU each configuration runs in a fresh subprocess and reports its peak RSS
  (``resource.getrusage``) minus the RSS before the work; on CUDA ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/bench_diffusiongs.py [--quick] [--device cpu|cuda] [--out reports/bench/diffusiongs.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qdrank.data.batch import Batch  # noqa: E402
from qdrank.data.features import Feature, FeatureMap  # noqa: E402
from qdrank.models.diffusiongs import DiffusionGS, DiffusionGSConfig  # noqa: E402

LENGTHS = (50, 200, 1000, 10000)
QUADRATIC_MAX_L = 1000        # (Q K^T) at L=10000 is [R, H, 1e4, 1e4] per layer: skipped
N_CANDIDATES = 500
TRAIN_CANDS_PER_REQUEST = 10


# ---- synthetic inputs ---------------------------------------------------------------------------
def make_feature_map(n_items: int = 5000, n_users: int = 1000) -> FeatureMap:
    specs = [("user_id", "user", n_users), ("age_group", "user", 8), ("gender", "user", 3),
             ("device", "context", 3), ("hour", "context", 24),
             ("item_id", "item", n_items), ("category", "item", 20), ("action", "behavior", 4)]
    feats, offset = {}, 1
    for name, role, n in specs:
        feats[name] = Feature(name, role, "categorical", slots=1, offset=offset, vocab=[str(i) for i in range(n)])
        offset += 1 + n
    feats["price"] = Feature("price", "candidate", "numeric")
    feats["activity"] = Feature("activity", "user", "numeric")
    query_buckets = 2000
    return FeatureMap(features=feats, text_offset=offset, query_buckets=query_buckets, max_query_tokens=8,
                      max_list_len=8, time_buckets=32, vocab_size=offset + query_buckets,
                      gate=["age_group", "gender", "activity", "device", "hour"], user_key_type="int",
                      item_key_type="int", has_purchase=True, has_position=False, max_position=64,
                      item_vocab=[str(i) for i in range(n_items)], has_category="category")


def _ids(fmap: FeatureMap, role: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    cols = [f.offset + 1 + torch.randint(len(f.vocab), shape, generator=g) for f, _, _ in fmap.slot_layout(role)]
    return torch.stack(cols, -1) if cols else torch.zeros(*shape, 0, dtype=torch.long)


def fake_batch(fmap: FeatureMap, R: int, L: int, cands_per_request: int, g: torch.Generator) -> Batch:
    """R requests with full histories of length L and ``cands_per_request`` candidates each."""
    n_items = len(fmap.item_vocab)
    N = R * cands_per_request

    def text(*shape):
        return fmap.text_offset + torch.randint(fmap.query_buckets, shape, generator=g)

    def dense(role, *shape):
        return torch.randn(*shape, fmap.n_numeric(role), generator=g)

    return Batch(
        request_id=torch.arange(R), user_sparse=_ids(fmap, "user", (R,), g), user_dense=dense("user", R),
        ctx_sparse=_ids(fmap, "context", (R,), g), ctx_dense=dense("context", R), query=text(R, 4),
        hist_item=2 + torch.randint(n_items, (R, L), generator=g), hist_sparse=_ids(fmap, "behavior", (R, L), g),
        hist_dense=dense("behavior", R, L), hist_query=text(R, L, 4),
        hist_time=1 + torch.randint(fmap.time_buckets - 1, (R, L), generator=g),
        hist_age=torch.rand(R, L, generator=g).mul(86_400).sort(-1, descending=True).values,
        hist_session=torch.full((R, L), -1),
        hist_len=torch.full((R,), L), cand_req=torch.arange(R).repeat_interleave(cands_per_request),
        cand_item=2 + torch.randint(n_items, (N,), generator=g), cand_sparse=_ids(fmap, "candidate", (N,), g),
        cand_dense=dense("candidate", N), position=torch.zeros(N, dtype=torch.long),
        click=(torch.rand(N, generator=g) < 0.2).float(), purchase=(torch.rand(N, generator=g) < 0.05).float(),
    )


def build(fmap: FeatureMap, impl: str, dim: int, layers: int, device: str) -> DiffusionGS:
    torch.manual_seed(0)
    model = DiffusionGS(fmap, DiffusionGSConfig(dim=dim, layers=layers, attention_impl=impl, dropout=0.0))
    n = len(fmap.item_vocab) + 2
    g = torch.Generator().manual_seed(1)
    sparse = torch.zeros(n, fmap.n_slots("item"), dtype=torch.long)
    for j, (f, _, _) in enumerate(fmap.slot_layout("item")):
        sparse[2:, j] = f.offset + 1 + torch.randint(len(f.vocab), (n - 2,), generator=g)
    model.emb.set_item_tables(sparse, torch.zeros(n, fmap.n_numeric("item")))
    return model.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- one configuration --------------------------------------------------------------------------
def measure(L: int, impl: str, device: str, quick: bool, dim: int, layers: int) -> dict:
    fmap = make_feature_map()
    model = build(fmap, impl, dim, layers, device)
    g = torch.Generator().manual_seed(L)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    R = max(1, min(64, 16384 // L))  # ~16k history tokens per training batch
    train_steps, infer_reps = (2, 3) if quick else (4, 10)

    # training
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    batch = fake_batch(fmap, R, L, TRAIN_CANDS_PER_REQUEST, g).to(device)
    times = []
    for i in range(train_steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = model(batch)
        loss, _ = model.loss(batch, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i:  # first step is warm-up
            times.append(time.perf_counter() - t0)
    step_s = min(times)  # min: the least disturbed by other load on shared cores

    # inference: one request, 500 candidates, single denoising step
    model.eval()
    req = fake_batch(fmap, 1, L, N_CANDIDATES, g).to(device)
    enc, tot = [], []
    with torch.inference_mode():
        for i in range(infer_reps + 2):
            _sync(device)
            t0 = time.perf_counter()
            state = model.encode_request(req)
            _sync(device)
            t1 = time.perf_counter()
            model.score(state, req)
            _sync(device)
            t2 = time.perf_counter()
            if i >= 2:
                enc.append(t1 - t0)
                tot.append(t2 - t0)
    res = {"L": L, "impl": impl, "train_requests_per_batch": R,
           "train_samples_per_s": R * TRAIN_CANDS_PER_REQUEST / step_s, "train_requests_per_s": R / step_s,
           "train_step_ms": 1e3 * step_s, "infer_ms_per_request": 1e3 * statistics.median(tot),
           "infer_encode_ms": 1e3 * statistics.median(enc),
           "infer_min_ms_per_request": 1e3 * min(tot), "infer_min_encode_ms": 1e3 * min(enc)}
    if device.startswith("cuda"):
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
    else:
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        res["peak_mem_mb"] = (rss1 - rss0) * scale / 2**20
        res["peak_mem_kind"] = "peak RSS growth of a fresh process (resource.getrusage)"
    return res


def run_isolated(args, L: int, impl: str) -> dict:
    """CPU: a fresh process per configuration, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--worker", str(L), impl, "--device", args.device, "--dim", str(args.dim),
           "--layers", str(args.layers), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def growth(rows: list[dict], key: str) -> list[dict]:
    """Per-10x growth factor between consecutive lengths: (t2/t1) ** (1 / log10(L2/L1))."""
    out = []
    for a, b in zip(rows, rows[1:]):
        f = (b[key] / a[key]) ** (1 / math.log10(b["L"] / a["L"]))
        out.append({"from_L": a["L"], "to_L": b["L"], "per_10x": f})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/bench/diffusiongs.json")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is the most stable on shared cores)")
    p.add_argument("--worker", nargs=2, metavar=("L", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(int(args.worker[0]), args.worker[1], args.device, args.quick, args.dim,
                                 args.layers)))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    results, skipped = [], []
    for impl in ("linear", "quadratic"):
        for L in lengths:
            if impl == "quadratic" and L > QUADRATIC_MAX_L:
                skipped.append({"L": L, "impl": impl, "reason": f"quadratic scores [R, heads, L, L] per layer "
                                f"({L}x{L}) take too long/too much memory; skipped above L={QUADRATIC_MAX_L}"})
                print(f"{impl:9s} L={L:6d}  skipped (quadratic beyond L={QUADRATIC_MAX_L})", flush=True)
                continue
            r = (run_isolated(args, L, impl) if args.device == "cpu"
                 else measure(L, impl, args.device, args.quick, args.dim, args.layers))
            results.append(r)
            print(f"{impl:9s} L={L:6d}  train {r['train_samples_per_s']:9.0f} samples/s "
                  f"({r['train_step_ms']:8.1f} ms/step, R={r['train_requests_per_batch']})  "
                  f"infer {r['infer_ms_per_request']:8.2f} ms/request (encode {r['infer_encode_ms']:7.2f})  "
                  f"peak {r['peak_mem_mb']:8.1f} MB", flush=True)
    lin = [r for r in results if r["impl"] == "linear"]
    report = {
        "model": "diffusiongs", "device": args.device, "torch": torch.__version__, "threads": args.threads,
        "platform": platform.platform(), "quick": args.quick,
        "config": {"dim": args.dim, "layers": args.layers, "heads": 2, "denoise_steps": 1,
                   "inference_candidates": N_CANDIDATES, "train_candidates_per_request": TRAIN_CANDS_PER_REQUEST},
        "results": results, "skipped": skipped,
        "timing_note": "train: fastest of the timed steps; infer_*: median (and min) of the repeats",
        "linear_growth_per_10x": {"infer_min_encode_ms": growth(lin, "infer_min_encode_ms"),
                                  "infer_min_ms_per_request": growth(lin, "infer_min_ms_per_request"),
                                  "train_ms_per_request": growth(
                                      [dict(r, t=1 / r["train_requests_per_s"]) for r in lin], "t")},
    }
    for k, rows in report["linear_growth_per_10x"].items():
        print(f"linear growth per 10x history ({k}): " + ", ".join(
            f"{r['from_L']}->{r['to_L']}: {r['per_10x']:.2f}x" for r in rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
