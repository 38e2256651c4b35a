"""HTTP API (FastAPI): ``POST /v1/rank``, ``POST /v1/events``, ``GET /v1/model``, ``GET /healthz``.

Error contract: every error body is ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (or a
string detail). Schema errors -> 422 naming the field; too many candidates / inline behaviours /
events, or a body over ``max_body_bytes`` -> 413; anything the input causes while it is encoded ->
422. Inputs are never echoed back (no NaN or megabyte strings in error bodies). Unexpected server
faults -> 500 with a generic message; the server stays up.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qdrank.serving.ranker import Ranker, RequestError
from qdrank.serving.schemas import ErrorResponse, EventsRequest, EventsResponse, RankRequest, RankResponse

log = logging.getLogger("qdrank.serving")
MAX_ERRORS = 20


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parser lets it through as is."""

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
                    return await _too_large(scope, receive, send, self.limit)
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


async def _too_large(scope, receive, send, limit: int) -> None:
    resp = JSONResponse({"detail": [{"loc": ["body"], "msg": f"request body larger than {limit} bytes",
                                     "type": "too_large"}]}, status_code=413)
    await resp(scope, receive, send)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _errors(errs: list[dict]) -> list[dict]:
    out = []
    for e in errs[:MAX_ERRORS]:
        loc = [x if isinstance(x, int) else str(x)[:200] for x in e.get("loc", ())]
        out.append({"loc": loc, "msg": str(e.get("msg", ""))[:500], "type": str(e.get("type", "value_error"))})
    return out


def create_app(ranker: Ranker) -> FastAPI:
    app = FastAPI(title="qdrank", version="1",
                  description="Personalized search ranking: rank candidates for a user, query and context.")
    app.state.ranker = ranker
    app.add_middleware(BodyLimit, limit=int(ranker.serving.max_body_bytes))
    errors = {422: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _errors(list(exc.errors()))}, status_code=422)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse({"detail": [{"loc": list(exc.loc), "msg": exc.msg[:500], "type": exc.kind}]},
                            status_code=exc.status)

    @app.exception_handler(BodyTooLarge)
    async def _body(_: Request, exc: BodyTooLarge):
        return JSONResponse({"detail": [{"loc": ["body"], "msg": "request body larger than "
                                         f"{ranker.serving.max_body_bytes} bytes", "type": "too_large"}]},
                            status_code=413)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.post("/v1/rank", response_model=RankResponse, responses=errors)
    def rank(req: RankRequest) -> RankResponse:
        """Rank all candidates for the user, query and context; best score first."""
        ranker.check_limits(req)
        try:
            enc = ranker.encoder.encode(req, ranker.store)
        except RequestError:
            raise
        except (ValueError, TypeError, KeyError, OverflowError, IndexError) as e:
            # the input reached a case the encoder did not anticipate: still the input's fault
            raise RequestError(("body",), f"could not encode the request: {type(e).__name__}: {str(e)[:200]}"
                               ) from e
        return ranker.respond(req, enc)

    @app.post("/v1/events", response_model=EventsResponse, responses=errors)
    def events(req: EventsRequest) -> EventsResponse:
        """Append behaviours to the history store; later requests of the user see them."""
        return EventsResponse(appended=ranker.append_events(req.events))

    @app.get("/v1/model")
    def model() -> dict:
        """Model name, run config, serving config, training metrics, feature schema."""
        return _json_safe(ranker.info())

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": ranker.cfg.model_name}

    return app


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return _clean(v)


def serve(ranker: Ranker, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(create_app(ranker), host=host, port=port, log_level=log_level, access_log=False)
