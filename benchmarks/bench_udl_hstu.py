"""DiffusionGS's UDL stack alone against an HSTU encoder: forward + backward time per history length.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_udl_hstu.py [--lengths 100,1000] [--threads 2]
        [--out reports/bench/udl_hstu.json]

Issue #9 item 1: the User-aware Denoising Layers (``qdrank.models.diffusiongs.UserAwareDenoisingLayer``,
user gate, linear attention, as DiffusionGS trains them) against a plain-PyTorch HSTU encoder in
the style of generative-recommenders: ``qdrank.models.hstu_layers.HSTUStack.encode``, the encoder
the ``hstu`` and ``mtgr`` models run (per layer ``U, V, Q, K = SiLU(f1(LayerNorm(X)))``, pointwise
``SiLU(Q K^T / sqrt(d_head) + rab) / n`` over the causal mask, relative position and time-bucket
bias, ``X + f2(U * LayerNorm(A V))``; generative-recommenders' PyTorch reference attention is the
same ``silu(q k^T) / n`` masked form, dense over the padded ``[B, H, N, N]`` scores).

Both get the same width, layers, heads, dropout and tokens; full-length histories; training mode;
one process; fp32 unless ``--autocast`` (bf16 autocast for both, as ``train.autocast``). A step is forward + backward of ``sum(output)`` through every parameter (no optimizer:
the parameters are the same size for both, the attention is what differs). The two contenders run
interleaved in blocks of ``--block`` steps, ``--rounds`` times after a warm-up block, and each
figure is the median block. The batch holds ``--tokens`` history tokens (requests = tokens //
length), so both lengths do comparable work per step; the issue's goal is UDL >= 2x faster than
HSTU at history 100 and >= 30x at 1,000.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from qdrank.models.diffusiongs import UserAwareDenoisingLayer
from qdrank.models.hstu_layers import HSTUStack
from qdrank.training.trainer import autocast_dtype
from qdrank.utils.io import atomic_write_json

GOALS = {100: 2.0, 1000: 30.0}
TIME_BUCKETS = 32


class UDLStack(torch.nn.Module):
    """``layers`` UDLs as DiffusionGS stacks them (user gate from ``gate_dim`` profile features)."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, gate_dim: int, ffn_mult: int = 2):
        super().__init__()
        self.layers = torch.nn.ModuleList(UserAwareDenoisingLayer(dim, heads, "user", gate_dim, "linear", ffn_mult,
                                                                  dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, gate_in: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, gate_in)
        return x


def contenders(a, length: int) -> dict:
    """name -> (module, zero-argument step closure) for one history length."""
    R = max(a.tokens // length, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, length, a.dim, generator=g)
    mask = torch.ones(R, length, dtype=torch.bool)
    gate_in = torch.randn(R, 5 * a.dim, generator=g)
    udl = UDLStack(a.dim, a.layers, a.heads, a.dropout, gate_in.shape[1]).train()
    hstu = HSTUStack(a.dim, a.layers, a.heads, a.dim // a.heads, TIME_BUCKETS, dropout=a.dropout).train()
    pos = torch.arange(length).expand(R, length)
    time_b = torch.randint(1, TIME_BUCKETS + 1, (R, length), generator=g)
    static = torch.zeros(R, length, dtype=torch.bool)
    n = torch.full((R,), length + 1)  # + the candidate token, as the models count it

    dtype = autocast_dtype(a.autocast, torch.device("cpu"))

    def udl_step() -> None:
        udl.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = udl(x, mask, gate_in)
        out.float().sum().backward()

    def hstu_step() -> None:
        hstu.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = hstu.encode(x, pos, time_b, static, mask, 0, n)["out"]
        out.float().sum().backward()

    return {"requests": R, "udl": udl_step, "hstu": hstu_step}


def bench_length(a, length: int) -> dict:
    c = contenders(a, length)
    times: dict[str, list[float]] = {"udl": [], "hstu": []}
    for r in range(a.rounds + 1):
        for name in times:
            t0 = time.perf_counter()
            for _ in range(a.block):
                c[name]()
            if r:
                times[name].append((time.perf_counter() - t0) / a.block)
    udl, hstu = statistics.median(times["udl"]), statistics.median(times["hstu"])
    tokens = c["requests"] * length
    out = {"requests": c["requests"], "tokens": tokens, "udl_ms": udl * 1e3, "hstu_ms": hstu * 1e3,
           "udl_tokens_per_s": tokens / udl, "hstu_tokens_per_s": tokens / hstu, "speedup": hstu / udl,
           "goal": GOALS.get(length), "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}
    print(f"history {length:5d}: {c['requests']} requests  UDL {udl * 1e3:8.1f} ms  HSTU {hstu * 1e3:8.1f} ms  "
          f"x{hstu / udl:.1f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="100,1000")
    ap.add_argument("--tokens", type=int, default=16384, help="history tokens per step (requests = tokens // length)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", default="none", help="none | bf16 | auto (train.autocast's values), for both")
    ap.add_argument("--block", type=int, default=3, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=5, help="timed blocks per contender (after a warm-up block)")
    ap.add_argument("--out", default="reports/bench/udl_hstu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    report = {"setting": {k: getattr(a, k) for k in ("tokens", "dim", "layers", "heads", "dropout", "threads",
                                                      "block", "rounds", "autocast")},
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "lengths": {}}
    for length in (int(v) for v in a.lengths.split(",")):
        report["lengths"][str(length)] = bench_length(a, length)
    print("\n| history | requests | UDL ms | HSTU ms | UDL speed-up | goal |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length, r in report["lengths"].items():
        goal = f">= {r['goal']:g}x" if r["goal"] else ""
        print(f"| {int(length):,} | {r['requests']} | {r['udl_ms']:.1f} | {r['hstu_ms']:.1f} | x{r['speedup']:.1f} | {goal} |")
    atomic_write_json(Path(a.out), report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
