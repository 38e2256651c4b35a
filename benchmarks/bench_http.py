"""HTTP serving under bounded load on loopback: throughput, p50/p99, errors, server RSS.

    .venv/bin/python benchmarks/bench_http.py [--run RUN_DIR | --model din] [--quick]
        [--concurrency 1,8,32] [--requests 500] [--duration 30] [--soak 10000]
        [--history 100] [--candidates 500] [--out reports/bench/http.json]

Starts ``qdrank serve`` as a subprocess on a free loopback port with a SQLite store holding
``--history`` behaviours for the benchmark user (serving ``max_history`` = that many), then for
each concurrency level sends ``--requests`` rank requests of ``--candidates`` candidates from that
many threads (stopping early after ``--duration`` seconds). Then ``--soak`` more requests at
concurrency 8 with the server's RSS read before and after. Errors (non-200) must be 0.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import base_parser, fill_store, make_request, train_tiny  # noqa: E402

from qdrank.serving.ranker import Ranker  # noqa: E402
from qdrank.serving.store import HistoryStore  # noqa: E402
from qdrank.utils.io import atomic_write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, body: dict, n: int, conc: int, duration: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n))
    t_end = time.perf_counter() + duration

    def worker():
        with httpx.Client(timeout=60) as c:
            while time.perf_counter() < t_end:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    r = c.post(url, json=body)
                    ok = r.status_code == 200
                    msg = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, msg = False, type(e).__name__
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    (lat.append(dt) if ok else errors.append(msg))

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(conc)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat) if lat else np.array([np.nan])
    return {"concurrency": conc, "requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5], "seconds": wall, "throughput_rps": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=0, help="per level (default 500, quick 100)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level at most")
    p.add_argument("--soak", type=int, default=0, help="requests for the RSS check (default 10000, quick 1000)")
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--out", default="reports/bench/http.json")
    a = p.parse_args(argv)
    n_req = a.requests or (100 if a.quick else 500)
    soak = a.soak or (1000 if a.quick else 10_000)

    tmp = tempfile.TemporaryDirectory()
    run = Path(a.run) if a.run else train_tiny(a.model, a.set, Path(tmp.name))
    store_file = Path(tmp.name) / "store.sqlite"
    rng = np.random.default_rng(0)
    ranker = Ranker.load(run)
    with HistoryStore(store_file) as st:
        fill_store(st, ranker, "bench-user", a.history, rng)
    body = make_request(ranker, "bench-user", a.candidates, rng)
    port = free_port()
    cmd = [sys.executable, "-m", "qdrank.cli", "serve", str(run), "--port", str(port), "--store", str(store_file),
           "--threads", str(a.threads), "--set", f"max_history={a.history}", "--log-level", "warning"]
    srv = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if srv.poll() is not None or time.time() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        url = base + "/v1/rank"
        load(url, body, 20, 1, 60)  # warm-up
        out = {"model": ranker.cfg.model_name, "run": str(run), "history": a.history, "candidates": a.candidates,
               "server_threads": a.threads, "cpu_count": os.cpu_count(), "levels": []}
        for conc in (int(x) for x in a.concurrency.split(",")):
            res = load(url, body, n_req, conc, a.duration)
            out["levels"].append(res)
            print(f"concurrency {conc:3d}: {res['ok']} ok, {res['errors']} errors, {res['throughput_rps']:.1f} req/s, "
                  f"p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms")
        before = rss_mb(srv.pid)
        res = load(url, body, soak, 8, 3600)
        after = rss_mb(srv.pid)
        out["soak"] = {**res, "rss_before_mb": before, "rss_after_mb": after}
        print(f"soak {res['ok']} requests ({res['errors']} errors): RSS {before:.0f} -> {after:.0f} MB")
        out["total_errors"] = sum(x["errors"] for x in out["levels"]) + res["errors"]
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    atomic_write_json(Path(a.out), out)
    print(f"wrote {a.out}")
    return 0 if out["total_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
