"""``qdrank serve``, ``qdrank store load`` and ``qdrank export`` (registered by :mod:`qdrank.cli`)."""

from __future__ import annotations

import sys
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _serving_overrides(pairs: list[str]) -> dict:
    from qdrank.config import parse_key_values

    return parse_key_values(pairs, "--set (a serving option)")


def cmd_serve(a) -> None:
    from qdrank.serving.http import serve
    from qdrank.serving.ranker import Ranker
    from qdrank.training.checkpoint import verify_run

    verify_run(Path(a.run))  # a damaged run (checksum, format) never starts serving
    over = _serving_overrides(a.set)
    if a.threads is not None:
        over["num_threads"] = a.threads
    if a.backend is not None:
        over["backend"] = a.backend
    if a.workers < 1:
        raise SystemExit("error: --workers must be >= 1")
    if a.workers > 1 and not a.store:
        raise SystemExit("error: --workers > 1 needs --store FILE: each worker is a process, and an in-memory "
                         "store would give each its own history")
    # loaded here once even with workers: a bad run or option fails before any worker starts,
    # and the ONNX backend exports once for all of them
    ranker = Ranker.load(Path(a.run), store=a.store, **over)
    if ranker.onnx is not None:
        over["onnx_path"] = str(ranker.onnx.path)
    where = f"store {a.store}" if a.store else "in-memory store (events are lost on exit)"
    _log(f"serving {ranker.cfg.model_name} from {a.run} on http://{a.host}:{a.port} ({where}; backend "
         f"{ranker.serving.backend}; {a.workers} worker(s) x {ranker.serving.num_threads} thread(s)); "
         f"OpenAPI at /docs and /openapi.json")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        _log(f"warning: binding to {a.host}: the API has no authentication")
    if a.workers == 1:
        serve(ranker, a.host, a.port, log_level=a.log_level)
    else:
        cfg = {"run": str(Path(a.run).resolve()), "store": str(Path(a.store).resolve()), "overrides": over}
        serve(None, a.host, a.port, log_level=a.log_level, workers=a.workers, worker_config=cfg)


def cmd_store_load(a) -> None:
    import time

    from qdrank.serving.store import HistoryStore
    from qdrank.utils.io import ensure_writable_dir, remove_stale_temps

    store = Path(a.store)
    ensure_writable_dir(store.resolve().parent)  # before reading the dataset
    remove_stale_temps(store.resolve().parent, names=(store.name,))
    t0 = time.perf_counter()
    with HistoryStore(Path(a.store)) as st:
        n = st.load_dataset(Path(a.data), replace=not a.append)
    print(f"loaded {n['behaviors']:,} behaviours and {n['users']:,} user profiles from {a.data} into {a.store} "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_export(a) -> None:
    from qdrank.serving.export import export_run

    out = export_run(Path(a.run), a.format, a.out, denoise_steps=a.denoise_steps)
    print(f"wrote {out} (+ {out.name}.json describing the inputs)")


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a trained run over HTTP (rank, events, model, healthz)")
    s.add_argument("run", help="run directory (from `qdrank train`)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--store", help="SQLite history store (`qdrank store load`); default: in memory")
    s.add_argument("--threads", type=int, help="torch / ONNX Runtime threads per worker (default 1)")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes on one port (one per core; needs --store). Default 1")
    s.add_argument("--backend", choices=["torch", "onnx"], help="scoring backend (default torch)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="serving option: formula, alpha, denoise_steps, max_candidates, max_history_inline, ...")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("store", help="manage the serving history store").add_subparsers(dest="store_cmd",
                                                                                       required=True)
    ld = st.add_parser("load", help="load a dataset's behaviours and user profiles into a SQLite store")
    ld.add_argument("--data", required=True, help="canonical dataset directory")
    ld.add_argument("--store", required=True, help="SQLite file (created if missing)")
    ld.add_argument("--append", action="store_true", help="keep what the store holds (default: replace)")
    ld.set_defaults(func=cmd_store_load)

    e = sub.add_parser("export", help="export the scoring function to ONNX or TorchScript")
    e.add_argument("run")
    e.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    e.add_argument("--out", help="output file (default: RUN/model.onnx or RUN/model.torchscript.pt)")
    e.add_argument("--denoise-steps", type=int, default=1, help="diffusion models: denoising steps to export")
    e.set_defaults(func=cmd_export)
