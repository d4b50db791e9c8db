"""Name scoper defects found by the end-to-end tests (tests/e2e/test_scoper.py),
kept as fast regression tests.

* the proxy with the real response rewriter, on an engine error: the
  rewriter may change the status (``exchange.ResponseRewriter.json`` returns
  ``(status, body)``: a plugin refusal of a foreign reference becomes the
  engine's 404) and the proxy must send that status and body;
* handler-level: stats names, create refusals, the CLI's empty
  X-Registry-Auth, the tenant's default network after a prune.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading

import pytest

from name_scoper.exchange import Exchange
from name_scoper.handlers import Response
from name_scoper.proxy import serve
from name_scoper.rewrite import Scope

TENANT = "a" * 32


class _Ident:
    user_name = "alice"
    project_id = TENANT
    is_admin = False


class _Identity:
    def authenticate(self, headers, source=""):
        return _Ident()


def _engine(path: str, status: int, message: str, stop: threading.Event) -> threading.Thread:
    """A one-answer-per-connection engine: ``status`` with ``{"message": ...}``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    srv.settimeout(0.2)
    body = json.dumps({"message": message}).encode() + b"\n"
    reason = {403: "Forbidden", 404: "Not Found", 400: "Bad Request"}[status]

    def run():
        with srv:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.settimeout(5)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(b"HTTP/1.1 %d %s\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _get(port: int, target: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", target, headers={"X-Auth-Token": "t", "X-Auth-TenantId": TENANT})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("status,message,want_status,want_message", [
    # a plugin refusal of a foreign reference: the engine's own 404
    (403, "authorization denied by plugin fdcs-x-h1: No such container: 4b2ad6819fe6", 404,
     "No such container: 4b2ad6819fe6"),
    # any other refusal keeps its status and its words
    (403, "authorization denied by plugin fdcs-x-h1: HostConfig.Privileged is not allowed", 403,
     "authorization denied by plugin fdcs-x-h1: HostConfig.Privileged is not allowed"),
    # the engine's own errors: scoped names unscoped
    (404, f"No such container: {TENANT}_web", 404, "No such container: web"),
])
def test_error_answers_reach_the_client_rewritten(tmp_path, status, message, want_status, want_message):
    path = str(tmp_path / "engine.sock")
    stop = threading.Event()
    _engine(path, status, message, stop)

    async def prepare(ctx, ident, method, target, headers, engine):
        return Exchange(method, target, headers, response=Response(Scope(ident.project_id), "1.41"))

    async def main():
        srv = await serve(_Identity(), engine_socket=path, ssl_context=None, prepare=prepare)
        try:
            return await asyncio.to_thread(_get, srv.port, "/v1.41/containers/4b2ad6819fe6/json")
        finally:
            await srv.close(1.0)

    try:
        got_status, body = asyncio.run(main())
    finally:
        stop.set()
    assert got_status == want_status, body
    assert json.loads(body)["message"] == want_message


# -- handler-level findings of the end-to-end tests (tests/e2e/test_scoper.py) -------------


class _Ctx:
    """What handlers.prepare needs from its context for these requests (no
    id-prefix lookups: every reference here is a name)."""

    def __init__(self):
        from name_scoper.handlers import Context

        self.inner = Context({"scoper.api_version": "1.41", "scoper.default_pids_limit": 512}, store=None)


def _prepare(method: str, target: str, headers: dict | None = None, engine=None):
    from name_scoper.handlers import prepare

    async def no_engine(method, target, body=None):
        raise AssertionError(f"unexpected engine sub-request {method} {target}")

    # as the proxy hands them over: http1's (lower-case name, value) byte pairs
    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    ctx = _Ctx().inner
    ctx.default_networks[TENANT] = float("inf")  # the default network is known to exist
    return asyncio.run(prepare(ctx, _Ident(), method, target, hdrs, engine or no_engine))


def _rewrite(ex, status: int, body: bytes, ctype: bytes = b"application/json") -> tuple[int, bytes]:
    """The client's view of an engine answer through ``ex.response``."""
    mode, _ = ex.response.head(status, [(b"content-type", ctype)])
    if mode == "json":
        out = ex.response.json(status, body)
        return out if isinstance(out, tuple) else (status, out)
    if mode == "lines":
        return status, b"".join(ex.response.line(l) or b"" for l in body.splitlines(keepends=True))
    return status, body


def test_stats_show_the_original_name():
    """docker stats --no-stream printed ``<tenant>_web`` (the stats document's
    ``name``), for stream=0 and for the stream of documents."""
    doc = {"name": f"/{TENANT}_web", "id": "f" * 64, "read": "2026-01-01T00:00:00Z"}
    for query in ("?stream=0", "?stream=1", ""):
        ex = _prepare("GET", f"/v1.41/containers/web/stats{query}")
        body = (json.dumps(doc) + "\n").encode() * (1 if query == "?stream=0" else 2)
        status, out = _rewrite(ex, 200, body)
        names = [json.loads(l)["name"] for l in out.splitlines() if l.strip()]
        assert names and all(n == "/web" for n in names), (query, out)


def test_a_create_refused_for_a_foreign_reference_is_not_answered_404():
    """``docker run`` (and docker-py, compose) take a 404 from
    POST /containers/create for "no such image" and pull the image: bob's
    ``run --link <alice's id>:w busybox`` printed "Unable to find image
    'busybox:latest' locally" and a pull error instead of "No such container".
    The engine itself answers 400 for a missing link or volumes-from target."""
    ex = _prepare("POST", "/v1.41/containers/create")
    refusal = json.dumps({"message": "authorization denied by plugin fdcs-x-h1: No such container: "
                                     + "4b2ad6819fe6" * 5 + "4b2a"}).encode()
    status, body = _rewrite(ex, 403, refusal)
    assert status != 404, body
    assert "No such container" in json.loads(body)["message"]


def test_the_clis_empty_registry_auth_is_not_refused():
    """The stock CLI sends ``X-Registry-Auth: e30=`` (base64 of ``{}``, no
    credentials) on every pull, so ``docker pull busybox`` was refused:
    "X-Registry-Auth is not accepted".  Credentials must still be refused."""
    ex = _prepare("POST", "/v1.41/images/create?fromImage=busybox&tag=latest", {"X-Registry-Auth": "e30="})
    assert ex.reject is None, ex.reject
    creds = "eyJ1c2VybmFtZSI6ImEiLCJwYXNzd29yZCI6ImIifQ=="  # {"username":"a","password":"b"}
    ex = _prepare("POST", "/v1.41/images/create?fromImage=busybox&tag=latest", {"X-Registry-Auth": creds})
    assert ex.reject is not None and ex.reject[0] == 403
    # credentials in any of several such headers are refused, the empty ones passed on as none
    from name_scoper.handlers import prepare
    ctx = _Ctx().inner
    for values, refused in (([b"e30=", b"e30="], False), ([b"e30=", creds.encode()], True),
                            ([creds.encode(), b"e30="], True)):
        hdrs = [(b"x-registry-auth", v) for v in values]
        ex = asyncio.run(prepare(ctx, _Ident(), "POST", "/v1.41/images/create?fromImage=busybox", hdrs, None))
        assert (ex.reject is not None and ex.reject[0] == 403) is refused, (values, ex.reject)
        assert refused or not [n for n, _ in ex.headers if n == b"x-registry-auth"]


def test_the_default_network_is_made_again_after_the_tenant_prunes_it():
    """``docker network prune -f`` removes the tenant's unused default network
    (``<tenant>_bridge``); the scoper remembered it as existing for 60 s, so
    every ``docker run`` meanwhile failed at start: "network bridge not
    found".  After a prune has gone through, the next create must make sure
    the network exists again."""
    from name_scoper.handlers import Context, prepare

    ctx = Context({"scoper.api_version": "1.41", "scoper.default_pids_limit": 512}, store=None)
    networks: set[str] = set()
    calls: list[str] = []

    async def engine(method, target, body=None):
        calls.append(f"{method} {target}")
        name = target.rsplit("/", 1)[1]
        if method == "GET":
            return (200 if name in networks else 404), [], b"{}"
        if target.endswith("/networks/create"):
            networks.add(json.loads(body)["Name"])
            return 201, [], b'{"Id":"n1"}'
        raise AssertionError(target)

    def run(method, target):
        return asyncio.run(prepare(ctx, _Ident(), method, target, [], engine))

    run("POST", "/v1.41/containers/create")
    assert networks == {f"{TENANT}_bridge"}
    # the prune goes through the scoper, and the engine removes the network
    ex = run("POST", "/v1.41/networks/prune")
    assert ex.reject is None
    networks.clear()
    calls.clear()
    run("POST", "/v1.41/containers/create")
    assert networks == {f"{TENANT}_bridge"}, calls


def test_a_burst_of_first_creates_makes_one_default_network():
    """The engine's CheckDuplicate is not atomic: concurrent first creates of
    a new tenant each made the default network, and every later use of the
    name was "ambiguous".  One check per tenant at a time."""
    from authz_plugin import config
    from name_scoper import handlers

    made = []
    state = {"exists": False}

    async def engine(method, target, body=None):
        await asyncio.sleep(0.01)  # the engine takes its time: the requests overlap
        if method == "GET":
            return (200 if state["exists"] else 404), [], b"{}"
        made.append(target)
        state["exists"] = True
        return 201, [], b'{"Id": "n"}'

    cfg = config.load(None, env={}, overrides={"keystone.url": "http://127.0.0.1:1/v3",
                                               "keystone.admin_project_id": "x", "redis.url": "redis://127.0.0.1:1"})
    ctx = handlers.Context(cfg, store=None)
    scope = Scope(TENANT)

    async def burst():
        await asyncio.gather(*(handlers._ensure_default_network(ctx, scope, engine) for _ in range(20)))

    asyncio.run(burst())
    assert made == [f"{handlers.V}/networks/create"], made
