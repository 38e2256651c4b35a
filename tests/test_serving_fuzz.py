"""Schemathesis against a real uvicorn server on loopback: the published OpenAPI schema and the server agree.

Bounded: a fixed number of examples per operation and mode (``QDRANK_FUZZ_EXAMPLES``, default 25),
no example database, loopback only. Positive mode: every schema-valid request must be answered 200
with a body matching the response schema (so the server refuses nothing the schema allows);
negative mode: every schema-invalid request must be refused with a documented 4xx (so the schema
promises nothing the server refuses to check). Never a 500.
"""

from __future__ import annotations

import os
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from test_serving import build_run, build_store
from test_serving_http import loopback_server

EXAMPLES = int(os.environ.get("QDRANK_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_data):

    from qdrank.serving.http import openapi_document
    from qdrank.serving.ranker import Ranker

    base = tmp_path_factory.getbasetemp()
    run = build_run(base, tiny_data)
    store = tmp_path_factory.mktemp("fuzz") / "store.sqlite"
    store.write_bytes(build_store(base, tiny_data).read_bytes())
    # small limits keep generated bodies small; the schema publishes them
    ranker = Ranker.load(run, store=store, max_candidates=50, max_history_inline=50, max_events=50)
    with loopback_server(ranker) as url:
        yield url, openapi_document(ranker)


def _operations(doc):
    schema = schemathesis.openapi.from_dict(doc)
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_nothing(fuzz_server, mode):
    from schemathesis import GenerationMode

    base_url, doc = fuzz_server
    import httpx

    served = httpx.get(base_url + "/openapi.json", timeout=30).json()
    assert served == doc  # the fuzzed schema is the one the server publishes
    ops = _operations(doc)
    assert {"POST /v1/rank", "POST /v1/events", "GET /v1/model", "GET /healthz"} <= set(ops)
    gen = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    t0 = time.time()
    for name, op in ops.items():
        if mode == "negative" and op.method.upper() == "GET":
            continue  # no parameters: nothing to make invalid
        check = _checker(name, op, gen, base_url, positive=mode == "positive")
        check()
    assert time.time() - t0 < 60


def _checker(name, op, gen, base_url, positive: bool):
    """A hypothesis test of one operation: bounded, derandomised, no example database."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=gen))
    def check(case):
        resp = case.call(base_url=base_url, timeout=30)
        assert resp.status_code < 500, (name, resp.status_code, resp.text[:300])
        if positive:
            assert resp.status_code == 200, (name, case.body, resp.status_code, resp.text[:500])
        case.validate_response(resp)

    return check
