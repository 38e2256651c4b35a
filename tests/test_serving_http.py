"""The HTTP API against a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
from test_serving import build_run, build_store, request_body

from qdrank.serving.http import create_app
from qdrank.serving.ranker import Ranker
from qdrank.serving.store import HistoryStore

MAX_BODY = 4 * 2**20
BODY_TIMEOUT = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_server(ranker: Ranker):
    """A real uvicorn server for ``ranker`` on 127.0.0.1 in a thread -> its base URL; stopped on exit."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(ranker), host="127.0.0.1", port=port, log_level="critical"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert th.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(timeout=30)
    assert not th.is_alive()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_data):

    base = tmp_path_factory.getbasetemp()
    run = build_run(base, tiny_data)
    store = tmp_path_factory.mktemp("http") / "store.sqlite"  # its own copy: the tests append events
    store.write_bytes(build_store(base, tiny_data).read_bytes())
    ranker = Ranker.load(run, store=store, max_body_bytes=MAX_BODY, body_timeout_s=BODY_TIMEOUT)
    with loopback_server(ranker) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, ranker


def assert_alive(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_health_model_openapi(server):
    client, ranker = server
    assert_alive(client)
    m = client.get("/v1/model").json()
    assert m["model"] == "din" and m["config"]["model_name"] == "din"
    assert m["metrics"]["test"]["serving_ctr_auc"] > 0
    assert {f["name"] for f in m["features"]["context"]} == {"device", "hour"}
    api = client.get("/openapi.json").json()
    assert {"/v1/rank", "/v1/events", "/v1/model", "/healthz"} <= set(api["paths"])
    assert "RankRequest" in api["components"]["schemas"]


def test_rank_matches_python_api(server, tiny_data):
    client, ranker = server
    body = request_body(tiny_data, 700, extra_items=("nope",))
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert len(d["candidates"]) == len(body["candidates"]) and d["unknown_items"] == 1
    s = [c["score"] for c in d["candidates"]]
    assert s == sorted(s, reverse=True)
    local = ranker.rank(body)
    assert [(c["item_id"], c["score"]) for c in d["candidates"]] == [(c.item_id, c.score) for c in local.candidates]
    body["user_id"] = "stranger"
    d = client.post("/v1/rank", json=body).json()
    assert d["unknown_user"] is True and d["unknown_users"] == 1


def test_events_then_rank_sees_them(server, tiny_data):
    client, ranker = server
    body = request_body(tiny_data, 900)
    ts = body["timestamp"]
    before = client.post("/v1/rank", json=body).json()
    same_second = {"user_id": body["user_id"], "item_id": body["candidates"][0]["item_id"], "timestamp": ts,
                   "action": "purchase", "query": body["query"]}
    r = client.post("/v1/events", json={"events": [same_second]})
    assert r.status_code == 200 and r.json() == {"appended": 1}
    unchanged = client.post("/v1/rank", json=body).json()
    assert unchanged["candidates"] == before["candidates"]  # same-second behaviour: excluded
    r = client.post("/v1/events", json={"events": [{**same_second, "timestamp": ts - 5}]})
    assert r.status_code == 200
    after = client.post("/v1/rank", json=body).json()
    assert after["history_used"] == min(before["history_used"] + 1, ranker.encoder.L)
    assert {c["item_id"]: c["score"] for c in after["candidates"]} != \
        {c["item_id"]: c["score"] for c in before["candidates"]}
    with HistoryStore(ranker.store.path) as st:  # persisted in the SQLite file
        assert st.history(body["user_id"], ts, 1)[0]["timestamp"] == ts - 5


def test_events_and_inline_histories_take_a_session(server, tiny_data):
    client, ranker = server
    ev = {"user_id": "session-user", "item_id": 1, "timestamp": 1000, "action": "click"}
    r = client.post("/v1/events", json={"events": [{**ev, "session": "s1"}, {**ev, "timestamp": 1001, "session": 9},
                                                   {**ev, "timestamp": 1002, "session": None}]})
    assert r.status_code == 200 and r.json() == {"appended": 3}
    assert [h["session"] for h in ranker.store.history("session-user", 2000, 10)] == ["s1", "9", None]
    r = client.post("/v1/events", json={"events": [{**ev, "session": 1.5}]})
    assert r.status_code == 422 and _detail_locs(r) == [("body", "events", 0, "session")]
    body = request_body(tiny_data, 700)
    hist = [{"item_id": 1, "timestamp": body["timestamp"] - 10, "action": "click", "session": s} for s in ("a", {})]
    r = client.post("/v1/rank", json={**body, "history": hist})
    assert r.status_code == 422 and _detail_locs(r) == [("body", "history", 1, "session")]
    r = client.post("/v1/rank", json={**body, "history": hist[:1]})
    assert r.status_code == 200 and r.json()["history_used"] == 1
    api = client.get("/openapi.json").json()["components"]["schemas"]
    assert "session" in api["Behavior"]["properties"] and "session" in api["Event"]["properties"]


def _detail_locs(r) -> list:
    return [tuple(e["loc"]) for e in r.json()["detail"]]


@pytest.mark.parametrize("patch,field", [
    ({"candidates": None}, "candidates"),
    ({"candidates": []}, "candidates"),
    ({"user_id": {"x": 1}}, "user_id"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"query": 123}, "query"),
    ({"context": [1, 2]}, "context"),
    ({"history": [{"item_id": 1, "timestamp": 5}]}, "action"),
    ({"unexpected_key": 1}, "unexpected_key"),
    ({"query": "x" * 100_000}, "query"),
    ({"candidates": [{"item_id": "y" * 10_000}]}, "item_id"),
])
def test_schema_errors_are_422_naming_the_field(server, tiny_data, patch, field):
    client, _ = server
    body = {**request_body(tiny_data, 700), **patch}
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 422, r.text
    assert any(field in map(str, loc) for loc in _detail_locs(r)), r.text
    assert len(r.content) < 10_000  # the input is not echoed back


def test_custom_validation_is_422_naming_the_field(server, tiny_data):
    client, _ = server
    body = request_body(tiny_data, 700)
    body["candidates"][3]["price"] = "cheap"
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 422 and _detail_locs(r) == [("body", "candidates", 3, "price")]
    body = request_body(tiny_data, 700)
    body["context"]["hour"] = {"h": 3}
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 422 and "context" in map(str, _detail_locs(r)[0])


@pytest.mark.parametrize("where", ["context", "candidate", "timestamp", "history"])
def test_nan_and_inf_are_422(server, tiny_data, where):
    client, _ = server
    body = request_body(tiny_data, 700)
    if where == "context":
        body["context"]["hour"] = float("nan")
    elif where == "candidate":
        body["candidates"][0]["price"] = float("inf")
    elif where == "timestamp":
        body["timestamp"] = float("-inf")
    else:
        body["history"] = [{"item_id": 1, "timestamp": float("nan"), "action": "click"}]
    raw = json.dumps(body)  # Python writes NaN / Infinity literals, which its parser accepts
    r = client.post("/v1/rank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_limits_are_413(server, tiny_data):
    client, _ = server
    body = request_body(tiny_data, 700)
    r = client.post("/v1/rank", json={**body, "candidates": [{"item_id": i} for i in range(2001)]})
    assert r.status_code == 413 and _detail_locs(r) == [("body", "candidates")]
    ok = client.post("/v1/rank", json={**body, "candidates": [{"item_id": i} for i in range(2000)]})
    assert ok.status_code == 200 and len(ok.json()["candidates"]) == 2000
    hist = [{"item_id": 1, "timestamp": 1, "action": "click"}] * 10_001
    r = client.post("/v1/rank", json={**body, "history": hist})
    assert r.status_code == 413 and _detail_locs(r) == [("body", "history")]
    r = client.post("/v1/rank", json={**body, "query": "q" * (MAX_BODY + 10)})
    assert r.status_code == 413

    def chunks():  # no Content-Length: the streamed size is counted
        for _ in range(MAX_BODY // 2**16 + 2):
            yield b" " * 2**16

    r = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert_alive(client)


GARBAGE = [
    b"", b"not json", b"{", b"[]", b"null", b"42", b'"str"', b"\xff\xfe\x00garbage", b"[" * 100_000,
    b'{"user_id": 1, "candidates": "everything"}', b'{"user_id": 1, "candidates": [null]}',
    b'{"user_id": 1, "candidates": [{"item_id": 1e400}]}', b'{"user_id": 1e400, "candidates": [{"item_id": 1}]}',
    b'{"user_id": 1, "timestamp": 1e30, "candidates": [{"item_id": 1}]}',
    b'{"user_id": 1, "timestamp": 99999999999999999999999, "candidates": [{"item_id": 1}]}',
    b'{"user_id": 1, "candidates": [{"item_id": 1, "price": [1, [2]]}]}',
    b'{"user_id": 1, "candidates": [{"item_id": 1, "price": 1e308}]}',
    b'{"user_id": 1, "profile": {"age_group": {"deep": {"deeper": 1}}}, "candidates": [{"item_id": 1}]}',
    b'{"user_id": true, "candidates": [{"item_id": false}]}',
]


def test_garbage_never_500_and_server_survives(server):
    client, _ = server
    for body in GARBAGE:
        for path in ("/v1/rank", "/v1/events"):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code < 500, (path, body[:60], r.status_code, r.text[:300])
    r = client.post("/v1/rank", content=b'{"user_id": 1}', headers={"content-type": "text/plain"})
    assert r.status_code < 500
    r = client.post("/v1/events", json={"events": [{"user_id": 1, "item_id": 2, "timestamp": "x", "action": "a"}]})
    assert r.status_code == 422 and "timestamp" in map(str, _detail_locs(r)[0])
    assert client.get("/nowhere").status_code == 404
    assert client.get("/v1/rank").status_code == 405
    assert_alive(client)


def test_lying_content_length_is_408_and_the_connection_closes(server):
    client, _ = server
    port = client.base_url.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sk:
        sk.sendall(b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 1000\r\n\r\n{\"user_id\": 1")
        t0 = time.time()
        data = b""
        while True:  # the server answers, then closes: recv returns b"" (a timeout here fails the test)
            chunk = sk.recv(65536)
            if not chunk:
                break
            data += chunk
        waited = time.time() - t0
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert BODY_TIMEOUT * 0.9 <= waited < BODY_TIMEOUT + 8
    assert b'"loc":["body"]' in data
    assert_alive(client)


def test_model_info_over_http_has_no_absolute_paths(server):
    client, _ = server
    text = client.get("/v1/model").text
    assert "/tmp" not in text and '"/' not in text


def test_undocumented_statuses_never_appear(server, tiny_data):
    """Every status the POST endpoints answer is in the published schema (no stray 400)."""
    client, _ = server
    api = client.get("/openapi.json").json()
    documented = {int(c) for c in api["paths"]["/v1/rank"]["post"]["responses"]}
    seen = set()
    for body in [*GARBAGE, json.dumps(request_body(tiny_data, 700)).encode()]:
        for ctype in ("application/json", "text/plain", "multipart/form-data; boundary=x"):
            seen.add(client.post("/v1/rank", content=body, headers={"content-type": ctype}).status_code)
    assert seen <= documented, seen - documented
    assert 200 in seen and 422 in seen


def test_concurrent_requests_are_micro_batched_with_the_same_scores(server, tiny_data, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    client, ranker = server
    bodies = [request_body(tiny_data, 600 + 7 * i) for i in range(24)]
    expected = [{c.item_id: c.score for c in ranker.rank(b).candidates} for b in bodies]
    url = str(client.base_url)
    rank_many = ranker.rank_many

    def slow_rank_many(requests):  # a slow forward, as under load: the next requests queue behind it
        time.sleep(0.03)           # (on a fast many-core machine they might otherwise never overlap)
        return rank_many(requests)

    monkeypatch.setattr(ranker, "rank_many", slow_rank_many)

    def post(b):
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/v1/rank", json=b)

    with ThreadPoolExecutor(12) as ex:
        got = list(ex.map(post, bodies))
    assert all(r.status_code == 200 for r in got), [r.text[:200] for r in got if r.status_code != 200]
    for r, exp in zip(got, expected):
        s = {c["item_id"]: c["score"] for c in r.json()["candidates"]}
        assert s.keys() == exp.keys() and max(abs(s[k] - exp[k]) for k in s) < 1e-5
    stats = client.get("/healthz").json()
    assert stats["status"] == "ok" and stats["largest_batch"] > 1  # some requests shared a forward


def test_concurrent_event_writes_are_all_stored(server, tiny_data):
    from concurrent.futures import ThreadPoolExecutor

    client, ranker = server
    before = ranker.store.counts()["behaviors"]
    url = str(client.base_url)

    def post(k):
        ev = [{"user_id": f"writer-{k}", "item_id": i, "timestamp": 1000 + i, "action": "click"} for i in range(5)]
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/v1/events", json={"events": ev})

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(post, range(40)))
    assert all(r.status_code == 200 and r.json() == {"appended": 5} for r in got)
    assert ranker.store.counts()["behaviors"] == before + 200
    assert len(ranker.store.history("writer-3", 10**6, 100)) == 5


def test_serve_workers_share_one_store(tmp_path, tiny_data, tmp_path_factory):
    """`qdrank serve --workers 2`: two processes, one torch thread each, every event stored exactly once."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    base = tmp_path_factory.getbasetemp()
    run = build_run(base, tiny_data)
    store = tmp_path / "store.sqlite"
    store.write_bytes(build_store(base, tiny_data).read_bytes())
    with HistoryStore(store) as st:
        before = st.counts()["behaviors"]
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "qdrank.cli", "serve", str(run), "--store", str(store),
                            "--port", str(port), "--workers", "2", "--log-level", "warning"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert srv.poll() is None, srv.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "server did not start"
            time.sleep(0.3)
        children = Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()
        assert len(children) >= 2  # the two workers (a resource tracker may be a third child)

        def post(k):
            ev = [{"user_id": f"w-{k}", "item_id": i, "timestamp": 1000 + i, "action": "click"} for i in range(3)]
            with httpx.Client(base_url=url, timeout=60) as c:
                h = c.get("/healthz").json()
                r = c.post("/v1/events", json={"events": ev})
                rank = c.post("/v1/rank", json=request_body(tiny_data, 700))
                return h, r.status_code, rank.status_code

        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(post, range(48)))
        assert all(code == 200 and rc == 200 for _, code, rc in got)
        assert {h["threads"] for h, _, _ in got} == {1}
        with HistoryStore(store) as st:
            assert st.counts()["behaviors"] == before + 48 * 3
    finally:
        srv.terminate()
        srv.wait(timeout=30)


def test_connections_disable_nagle_even_on_uvicorns_multiworker_socket(monkeypatch):
    """uvicorn binds the ``--workers`` socket with protocol number 0, so asyncio leaves Nagle on; with
    the client's delayed ACK that added ~46 ms to every request. The server's protocol turns it off."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from qdrank.serving import http as http_mod

    monkeypatch.setattr(H11Protocol, "connection_made", lambda self, transport: None)

    class Transport:
        def __init__(self, sock):
            self.sock = sock

        def get_extra_info(self, name):
            return self.sock if name == "socket" else None

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    monkeypatch.setattr(HttpToolsProtocol, "connection_made", lambda self, transport: None)
    for proto in (http_mod.NoDelayH11Protocol, http_mod.NoDelayHttpToolsProtocol):
        with socket.socket(socket.AF_INET) as srv:  # as uvicorn.Config.bind_socket does
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            with socket.create_connection(srv.getsockname()) as _client:
                conn, _ = srv.accept()
                with conn:
                    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
                    proto.__new__(proto).connection_made(Transport(conn))
                    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    seen = {}
    for k in ("QDRANK_SERVE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(k, "")  # serve() sets them for its workers; restored after the test
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, single=True))
    monkeypatch.setattr(http_mod, "_serve_reuseport", lambda workers, kw: seen.update(kw, workers=workers))
    http_mod.serve(None, workers=2, worker_config={"run": "r", "overrides": {}})
    assert seen["http"] == http_mod.HTTP_PROTOCOL == "qdrank.serving.http:NoDelayHttpToolsProtocol"
    assert seen["workers"] == 2 and "single" not in seen and seen["loop"] == "uvloop"


def test_reuseport_sockets_spread_connections_over_workers():
    """Each worker listens on its own SO_REUSEPORT socket: new connections are spread over them
    (uvicorn's one shared socket let the first worker to wake accept them all)."""
    from qdrank.serving.http import reuseport_socket

    port = free_port()
    socks = [reuseport_socket("127.0.0.1", port) for _ in range(2)]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    try:
        time.sleep(0.2)
        counts = []
        for s in socks:
            s.setblocking(False)
            n = 0
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            counts.append(n)
        assert sum(counts) == 16 and min(counts) >= 1, counts
    finally:
        for c in clients:
            c.close()
        for s in socks:
            s.close()
