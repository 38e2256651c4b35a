"""HTTP serving under bounded load on loopback: throughput, p50/p99, errors, server RSS, and a plot.

    .venv/bin/python benchmarks/bench_http.py [--run RUN_DIR | --model din] [--quick]
        [--workers 2] [--backend torch|onnx] [--concurrency 1,8,32] [--requests 1000]
        [--duration 20] [--soak 10000] [--history 100] [--candidates 500]
        [--out reports/bench/http.json]    # + http.png beside it

Starts ``qdrank serve --workers N`` as a subprocess on a free loopback port with a SQLite store
holding ``--history`` behaviours for the benchmark user (serving ``max_history`` = that many), then
for each concurrency level keeps that many requests in flight (``--requests`` in all, stopping after
``--duration`` seconds) and records latency per request. Then a ``--soak`` of more requests at
concurrency 8 with the RSS of the server processes read before and after. The load generator is
one asyncio process writing pre-built HTTP/1.1 requests over keep-alive connections, so little of
the shared CPU goes to the client. Writes JSON and a latency-vs-throughput plot (PNG). Exit 1 on
any error (non-200). Loopback only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import base_parser, fill_store, make_request, train_tiny  # noqa: E402

from qdrank.serving.ranker import Ranker  # noqa: E402
from qdrank.serving.schemas import encode_json  # noqa: E402
from qdrank.serving.store import HistoryStore  # noqa: E402
from qdrank.utils.io import atomic_write_json  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """RSS of a process and its children (the workers), MB."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def cpu_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and of each of its children (the workers)."""
    pids = [pid]
    try:
        pids += [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    out = {}
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return out


def http_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _load(port: int, raw: bytes, n: int, conc: int, duration: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    left = [n]
    t_end = time.perf_counter() + duration

    async def client():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while left[0] > 0 and time.perf_counter() < t_end:
                left[0] -= 1
                t0 = time.perf_counter()
                try:
                    writer.write(raw)
                    status = await asyncio.wait_for(_read_response(reader), 60)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                    errors.append(type(e).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                dt = (time.perf_counter() - t0) * 1e3
                (lat.append(dt) if status == 200 else errors.append(f"HTTP {status}"))
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(conc)))
    wall = time.perf_counter() - t0
    a = np.array(lat) if lat else np.array([np.nan])
    return {"concurrency": conc, "requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5], "seconds": wall, "throughput_rps": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def load(port: int, raw: bytes, n: int, conc: int, duration: float) -> dict:
    return asyncio.run(_load(port, raw, n, conc, duration))


def plot(levels: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [lv["throughput_rps"] for lv in levels]
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
        ax.plot(x, [lv[key] for lv in levels], style, label=key.replace("_ms", ""))
    for lv in levels:
        ax.annotate(f"c={lv['concurrency']}", (lv["throughput_rps"], lv["p99_ms"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=0, help="per level (default 1000, quick 200)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level at most")
    p.add_argument("--soak", type=int, default=0, help="requests for the RSS check (default 10000, quick 1000)")
    p.add_argument("--soak-duration", type=float, default=600.0, help="seconds for the soak at most")
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="server processes")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--out", default="reports/bench/http.json")
    a = p.parse_args(argv)
    n_req = a.requests or (200 if a.quick else 1000)
    soak = a.soak or (1000 if a.quick else 10_000)

    tmp = tempfile.TemporaryDirectory()
    run = Path(a.run) if a.run else train_tiny(a.model, a.set, Path(tmp.name))
    store_file = Path(tmp.name) / "store.sqlite"
    rng = np.random.default_rng(0)
    ranker = Ranker.load(run)
    with HistoryStore(store_file) as st:
        fill_store(st, ranker, "bench-user", a.history, rng)
    raw = http_request("/v1/rank", encode_json(make_request(ranker, "bench-user", a.candidates, rng)))
    port = free_port()
    cmd = [sys.executable, "-m", "qdrank.cli", "serve", str(run), "--port", str(port), "--store", str(store_file),
           "--threads", str(a.threads), "--workers", str(a.workers), "--backend", a.backend,
           "--set", f"max_history={a.history}", "--log-level", "warning"]
    srv = subprocess.Popen(cmd)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if srv.poll() is not None or time.time() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.3)
        time.sleep(2.0 if a.workers > 1 else 0)  # the other workers finish loading
        load(port, raw, 50, max(2, a.workers), 60)  # warm-up
        out = {"model": ranker.cfg.model_name, "run": Path(run).name, "model_config": dataclasses.asdict(ranker.cfg.model),
               "history": a.history, "candidates": a.candidates, "workers": a.workers, "backend": a.backend,
               "threads_per_worker": a.threads, "cpu_count": os.cpu_count(),
               "load_avg_before": os.getloadavg(), "levels": []}
        for conc in (int(x) for x in a.concurrency.split(",")):
            c0, k0 = cpu_by_process(srv.pid), time.process_time()
            res = load(port, raw, n_req, conc, a.duration)
            c1, k1 = cpu_by_process(srv.pid), time.process_time()
            # server CPU per request: on a shared machine, the capacity of idle cores is estimated
            # as (cores x 1000 / this) requests/s
            n = max(res["requests"], 1)
            res["server_cpu_ms_per_request"] = (sum(c1.values()) - sum(c0.values())) * 1e3 / n
            res["idle_capacity_rps_estimate"] = a.workers * 1000 / max(res["server_cpu_ms_per_request"], 1e-9)
            # the load generator's own CPU (it shares the cores), and how the work split over the workers
            res["client_cpu_ms_per_request"] = (k1 - k0) * 1e3 / n
            used = {p: c1[p] - c0.get(p, 0.0) for p in c1 if p != srv.pid}
            res["worker_cpu_share"] = sorted((round(v / max(sum(used.values()), 1e-9), 3) for v in used.values()),
                                             reverse=True)
            out["levels"].append(res)
            print(f"concurrency {conc:3d}: {res['ok']} ok, {res['errors']} errors, {res['throughput_rps']:.1f} req/s, "
                  f"p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms; server CPU "
                  f"{res['server_cpu_ms_per_request']:.2f} ms/request (workers {res['worker_cpu_share']}), "
                  f"client CPU {res['client_cpu_ms_per_request']:.2f} ms/request", flush=True)
        before = rss_mb(srv.pid)
        res = load(port, raw, soak, 8, a.soak_duration)
        after = rss_mb(srv.pid)
        out["soak"] = {**res, "rss_before_mb": before, "rss_after_mb": after}
        print(f"soak {res['ok']} requests ({res['errors']} errors, {res['throughput_rps']:.1f} req/s, p99 "
              f"{res['p99_ms']:.1f} ms): RSS {before:.0f} -> {after:.0f} MB", flush=True)
        out["total_errors"] = sum(x["errors"] for x in out["levels"]) + res["errors"]
        out["load_avg_after"] = os.getloadavg()
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    out_path = Path(a.out)
    atomic_write_json(out_path, out)
    png = out_path.with_suffix(".png")
    plot(out["levels"], png, f"{out['model']} H={a.history} N={a.candidates}, {a.workers} worker(s), "
                             f"{a.backend}, {os.cpu_count()} CPUs")
    print(f"wrote {out_path} and {png}")
    return 0 if out["total_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
