"""HTTP API: ``POST /v1/rank``, ``POST /v1/events``, ``GET /v1/model``, ``GET /healthz``.

The request path avoids per-request framework work: bodies are read raw (with a deadline),
decoded with msgspec and checked by :mod:`qdrank.serving.schemas`; responses are msgspec-encoded
bytes. Rank requests go through a :class:`MicroBatcher`: requests arriving together (gathered for
at most ``batch_wait_ms``, and only while more are on their way) are scored in one forward (on the
event loop's thread), then split. ``qdrank serve --workers N`` runs N such processes on one port, each
with one torch / ONNX Runtime thread (one process per core, no oversubscription).

Error contract: every error body is ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (or a
string detail for 404/405). Schema errors and malformed JSON -> 422 naming the field; too many
candidates / inline behaviours / events, or a body over ``max_body_bytes`` -> 413; a body not
received within ``body_timeout_s`` (e.g. a Content-Length larger than what is sent) -> 408 and the
connection is closed. Inputs are never echoed back. Unexpected server faults -> 500 with a generic
message; the server stays up. The OpenAPI schema (``/openapi.json``) is generated from the same
rules, with the run's own feature names and types.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from qdrank.serving.ranker import Ranker
from qdrank.serving.schemas import (
    RequestError,
    check_events,
    decode_json,
    encode_json,
    request_openapi,
    response_openapi,
)

log = logging.getLogger("qdrank.serving")
ENV_CONFIG = "QDRANK_SERVE_CONFIG"  # worker processes of `qdrank serve --workers N` read their config here


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``; an HTTPException so the framework lets it through as is."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await _error(413, ("body",), f"request body larger than {self.limit} bytes",
                                        "too_large", close=True)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return msg

        return await self.app(scope, limited, send)


def _error(status: int, loc: tuple, msg: str, kind: str, close: bool = False) -> Response:
    body = encode_json({"detail": [{"loc": list(loc), "msg": msg[:500], "type": kind}]})
    return Response(body, status_code=status, media_type="application/json",
                    headers={"connection": "close"} if close else None)


def _request_error(e: RequestError) -> Response:
    return Response(encode_json({"detail": [e.detail()]}), status_code=e.status, media_type="application/json")


class MicroBatcher:
    """Gathers concurrent rank requests into one forward on the event loop's thread.

    A request that finds no other request on its way (none reading its body, none queued) is scored
    at once: waiting only pays when there is someone to wait for. Otherwise the batch closes after
    ``wait_s`` or at ``max_batch`` requests. Decoding, checking, encoding, the forward and response
    building run on the event loop's thread (one process per core: a second thread would only add
    hand-offs); requests that arrive meanwhile are read afterwards and form the next batch. Store
    writes (``/v1/events``) run on one helper thread, serialised by the store's lock."""

    def __init__(self, ranker: Ranker, wait_s: float, max_batch: int):
        self.ranker, self.wait_s, self.max_batch = ranker, wait_s, max_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="qdrank-store")
        self.queue: asyncio.Queue | None = None
        self.arriving = 0  # requests reading their body: they will be queued soon
        self.largest = 0  # the largest batch so far (``/healthz`` shows it)
        self._task: asyncio.Task | None = None

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self.queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, body: bytes) -> bytes | RequestError:
        self._start()
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((body, fut))
        return await fut

    async def run_blocking(self, fn, *args):
        """Blocking store writes, off the event loop, one at a time."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        q = self.queue
        while True:
            items = [await q.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch:
                if not q.empty():
                    items.append(q.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0 or self.arriving == 0:
                    break
                try:
                    items.append(await asyncio.wait_for(q.get(), left))
                except TimeoutError:
                    break
            self.largest = max(self.largest, len(items))
            try:  # on the event loop's own thread: no hand-off per batch; bodies arriving meanwhile
                #     wait in the socket buffers and form the next batch
                results = self._score([b for b, _ in items])
            except Exception as e:  # noqa: BLE001 - a server fault: every waiting request gets it
                results = [e] * len(items)
            for (_, fut), res in zip(items, results):
                if not fut.done():
                    fut.set_result(res)

    def _score(self, bodies: list[bytes]) -> list[bytes | RequestError]:
        parsed: list[Any] = []
        for b in bodies:
            try:
                parsed.append(self.ranker.check(decode_json(b)))
            except RequestError as e:
                parsed.append(e)
        todo = [p for p in parsed if not isinstance(p, RequestError)]
        done = iter(self.ranker.rank_many(todo)) if todo else iter(())
        out: list[bytes | RequestError] = []
        for p in parsed:
            if isinstance(p, RequestError):
                out.append(p)
            else:
                r = next(done)
                out.append(r if isinstance(r, RequestError) else encode_json(r))
        return out


async def _read_body(request: Request, timeout: float) -> bytes | Response:
    try:
        return await asyncio.wait_for(request.body(), timeout)
    except TimeoutError:
        return _error(408, ("body",), f"request body not received within {timeout:g} s", "timeout", close=True)
    except BodyTooLarge:
        return _error(413, ("body",), "request body larger than the server's max_body_bytes", "too_large",
                      close=True)


def create_app(ranker: Ranker) -> FastAPI:
    s = ranker.serving
    app = FastAPI(title="qdrank", version="1", redoc_url=None,
                  description="Personalized search ranking: rank candidates for a user, query and context.")
    app.state.ranker = ranker
    batcher = MicroBatcher(ranker, float(s.batch_wait_ms) / 1000, int(s.max_batch))
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=int(s.max_body_bytes))
    timeout = float(s.body_timeout_s)

    @app.exception_handler(RequestError)
    async def _request_err(_: Request, exc: RequestError):
        return _request_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.error("unexpected error: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.post("/v1/rank")
    async def rank(request: Request) -> Response:
        batcher.arriving += 1
        try:
            body = await _read_body(request, timeout)
        finally:
            batcher.arriving -= 1
        if isinstance(body, Response):
            return body
        res = await batcher.submit(body)
        if isinstance(res, RequestError):
            return _request_error(res)
        if isinstance(res, BaseException):
            raise res
        return Response(res, media_type="application/json")

    @app.post("/v1/events")
    async def events(request: Request) -> Response:
        body = await _read_body(request, timeout)
        if isinstance(body, Response):
            return body
        def append() -> int:
            evs = check_events(decode_json(body), s.max_events, ranker.known["behavior"])
            return ranker.store.append(evs)

        try:
            n = await batcher.run_blocking(append)
        except RequestError as e:
            return _request_error(e)
        return Response(encode_json({"appended": n}), media_type="application/json")

    @app.get("/v1/model")
    def model() -> dict:
        return _json_safe(ranker.info())

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": ranker.cfg.model_name, "pid": os.getpid(), "largest_batch": batcher.largest,
                "threads": torch.get_num_threads()}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(ranker)
        return app.openapi_schema

    app.openapi = openapi
    return app


def openapi_document(ranker: Ranker) -> dict[str, Any]:
    """The OpenAPI 3.1 document: request schemas from the checking rules and the run's features."""
    s = ranker.serving
    comps = {**response_openapi(), **request_openapi(ranker.known, s.max_candidates, s.max_history_inline,
                                                     s.max_events)}
    comps["ModelInfo"] = {"type": "object", "description": "model name, run config (no absolute paths), serving "
                          "config, training metrics, feature schema"}
    comps["Health"] = {"type": "object", "required": ["status", "model"],
                       "properties": {"status": {"type": "string"}, "model": {"type": "string"},
                                      "pid": {"type": "integer", "description": "the worker process answering"},
                                      "threads": {"type": "integer", "description": "torch threads of that worker"},
                                      "largest_batch": {"type": "integer",
                                                        "description": "most requests scored in one forward"}}}
    err = {"description": "error naming the field",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}

    def ok(name: str) -> dict:
        return {"description": "OK", "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    def post(name: str, out: str, summary: str) -> dict:
        return {"post": {
            "summary": summary, "operationId": name.lower(),
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}},
            "responses": {"200": ok(out),
                          "408": {**err, "description": "request body not received within body_timeout_s"},
                          "413": {**err, "description": "too many candidates / behaviours / events, or body too large"},
                          "422": {**err, "description": "invalid request (malformed JSON, schema, feature type)"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "qdrank", "version": "1",
                 "description": f"Personalized search ranking with model {ranker.cfg.model_name!r}."},
        "paths": {
            "/v1/rank": post("RankRequest", "RankResponse", "Rank all candidates for the user, query and context; "
                             "best score first"),
            "/v1/events": post("EventsRequest", "EventsResponse", "Append behaviours to the history store; later "
                               "requests of the user see them"),
            "/v1/model": {"get": {"summary": "Model name, run config, serving config, training metrics, features",
                                  "operationId": "model", "responses": {"200": ok("ModelInfo")}}},
            "/healthz": {"get": {"summary": "Liveness", "operationId": "healthz",
                                 "responses": {"200": ok("Health")}}},
        },
        "components": {"schemas": comps},
    }


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# ---- serving processes ------------------------------------------------------------------------------------
def _nodelay(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with TCP_NODELAY on every connection.

    With ``workers > 1`` uvicorn binds the shared socket as ``socket.socket(family)`` (protocol number
    0), and asyncio disables Nagle's algorithm only on sockets whose protocol is IPPROTO_TCP. Responses
    written as headers + body then wait for the client's delayed ACK: measured ~46 ms added to every
    request at concurrency 1 (56 ms instead of 10 ms, DiffusionGS, 500 candidates)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        _nodelay(transport)
        super().connection_made(transport)


try:  # the C HTTP parser (uvicorn[standard]): a 30 KB rank body parses in microseconds, not ~1 ms
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class NoDelayHttpToolsProtocol(HttpToolsProtocol):
        """:class:`NoDelayH11Protocol` for uvicorn's httptools protocol."""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            _nodelay(transport)
            super().connection_made(transport)

    HTTP_PROTOCOL = "qdrank.serving.http:NoDelayHttpToolsProtocol"
except ImportError:  # pragma: no cover - httptools missing: the pure-Python parser
    HTTP_PROTOCOL = "qdrank.serving.http:NoDelayH11Protocol"


def _event_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return "asyncio"
    return "uvloop"


def app_from_env() -> FastAPI:
    """App factory of a worker process (``qdrank serve --workers N``): config from $QDRANK_SERVE_CONFIG."""
    cfg = json.loads(os.environ[ENV_CONFIG])
    ranker = Ranker.load(cfg["run"], store=cfg.get("store"), **cfg.get("overrides", {}))
    return create_app(ranker)


def uvicorn_options(host: str, port: int, log_level: str) -> dict[str, Any]:
    return dict(host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=30,
                http=HTTP_PROTOCOL, loop=_event_loop())


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket of its own for one worker, in the port's SO_REUSEPORT group.

    Why: with one shared socket (uvicorn's ``--workers``) the worker that wakes first accepts every
    pending connection, and keep-alive connections stay where they were accepted, so 8 client
    connections could all land on one of 2 workers. With a socket per worker the kernel spreads new
    connections over the workers' sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def worker_main() -> None:
    """One worker process of ``serve(workers=N)`` with SO_REUSEPORT (options in $QDRANK_SERVE_WORKER)."""
    import uvicorn

    opts = json.loads(os.environ[ENV_WORKER])
    sock = reuseport_socket(opts["host"], opts["port"])
    config = uvicorn.Config("qdrank.serving.http:app_from_env", factory=True, **opts)
    uvicorn.Server(config).run(sockets=[sock])


ENV_WORKER = "QDRANK_SERVE_WORKER"


def _serve_reuseport(workers: int, opts: dict[str, Any]) -> None:
    """Start ``workers`` processes, each listening on its own SO_REUSEPORT socket; stop them together."""
    import signal
    import subprocess
    import time

    probe = reuseport_socket(opts["host"], opts["port"])  # the port is free (and ours): fail here, not N times
    env = {**os.environ, ENV_WORKER: json.dumps(opts)}
    procs = [subprocess.Popen([sys.executable, "-c", "from qdrank.serving.http import worker_main; worker_main()"],
                              env=env) for _ in range(workers)]
    probe.close()
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for sig, h in old.items():
            signal.signal(sig, h)
    codes = [p.returncode for p in procs]
    if not stopping and any(codes):
        raise SystemExit(f"a worker process exited with status {next(c for c in codes if c)}")


def serve(ranker: Ranker | None = None, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          workers: int = 1, worker_config: dict | None = None) -> None:
    """One process (``ranker``), or ``workers`` processes each loading ``worker_config`` (run, store,
    overrides), each on its own SO_REUSEPORT socket on Linux (uvicorn's shared socket elsewhere)."""
    import uvicorn

    kw = uvicorn_options(host, port, log_level)
    if workers <= 1:
        uvicorn.run(create_app(ranker), **kw)
        return
    os.environ[ENV_CONFIG] = json.dumps(worker_config)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one thread per worker
        os.environ[k] = str(worker_config.get("overrides", {}).get("num_threads", 1) or 1)
    if sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"):
        _serve_reuseport(workers, kw)
    else:  # pragma: no cover - elsewhere SO_REUSEPORT does not balance (BSD: the last socket takes all)
        uvicorn.run("qdrank.serving.http:app_from_env", factory=True, workers=workers, **kw)
