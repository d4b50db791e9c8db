"""The name scoper's proxy over real sockets.

A fake engine (threads, blocking sockets) listens on a unix socket in a tmp
dir and records every connection it gets; the proxy runs in an asyncio loop
of its own thread with TLS from a throwaway CA (openssl); clients are
blocking TLS sockets.  Each refusal has a positive control beside it, and
conditions are polled, never slept on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import types
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from authz_plugin.errors import AuthenticationError, Forbidden, IdentityUnavailable
from name_scoper._streams import server_context
from name_scoper.exchange import MAX_JSON, Exchange, PassThrough
from name_scoper.proxy import serve

TIMEOUT = 20


def wait_until(cond, timeout=TIMEOUT, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


# -- TLS material --------------------------------------------------------------------


@dataclass
class TLSFiles:
    dir: Path

    def __getattr__(self, name):
        return str(self.dir / f"{name.replace('_', '-')}.pem")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> TLSFiles:
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
             "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
                 "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{who}-cert.pem", cwd=d)
    return TLSFiles(d)


# -- identity ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ident:
    user_name: str
    project_id: str


class FakeIdentity:
    """Token -> identity; records what each call saw (headers, source)."""

    TOKENS = {"tok-a": Ident("alice", "a" * 32), "tok-b": Ident("bob", "b" * 32)}

    def __init__(self):
        self.calls: list[tuple[dict, str]] = []

    def authenticate(self, headers, source=""):
        self.calls.append((dict(headers), source))
        token = next((v for k, v in headers.items() if k.lower() == "x-auth-token"), None)
        if token == "tok-down":
            raise IdentityUnavailable("identity service unavailable, retry later")
        if token == "tok-noroles":
            raise Forbidden("user eve has no role on project e that allows using this service")
        if token not in self.TOKENS:
            raise AuthenticationError(
                "authentication required: X-Auth-Token is missing or invalid; run fdcs-login")
        return self.TOKENS[token]

    def tokens(self):
        return [next((v for k, v in h.items() if k.lower() == "x-auth-token"), None) for h, _ in self.calls]


# -- the fake engine ------------------------------------------------------------------


class EngineConn:
    """One connection the engine accepted: the request as it arrived."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.head = b""
        self.method = self.target = ""
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.raw = b""  # raw bytes after the head (hijacked streams)
        self.eof = False
        self.done = threading.Event()

    def header(self, name):
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return vals[0] if vals else None

    def _more(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            self._more()
        self.head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = self.head.decode("latin-1").split("\r\n")
        self.method, self.target, _ = lines[0].split(" ", 2)
        self.headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines[1:]]

    def body_chunks(self):
        """Yield the request body piece by piece (Content-Length or chunked)."""
        if (self.header("transfer-encoding") or "").lower() == "chunked":
            while True:
                while b"\r\n" not in self.buf:
                    self._more()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                if size == 0:  # no trailers from the proxy: the final CRLF
                    while len(self.buf) < 2:
                        self._more()
                    assert self.buf.startswith(b"\r\n"), self.buf
                    self.buf = self.buf[2:]
                    return
                while len(self.buf) < size + 2:
                    self._more()
                piece, self.buf = self.buf[:size], self.buf[size + 2:]
                yield piece
        else:
            left = int(self.header("content-length") or 0)
            while left:
                if not self.buf:
                    self._more()
                piece, self.buf = self.buf[:left], self.buf[left:]
                left -= len(piece)
                yield piece

    def read_body(self):
        self.body = b"".join(self.body_chunks())
        return self.body

    def read_raw_until_eof(self):
        self.raw += self.buf
        self.buf = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                return self.raw
            self.raw += data

    def send(self, data):
        self.sock.sendall(data)

    def respond(self, status=200, body=b"", headers=(), reason="OK"):
        h = "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.send(f"HTTP/1.1 {status} {reason}\r\n{h}Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def respond_json(self, obj, status=200):
        self.respond(status, json.dumps(obj).encode(), [("Content-Type", "application/json")])


def echo(c: EngineConn):
    """Default engine: answer what it got."""
    c.read_body()
    c.respond_json({"method": c.method, "target": c.target, "body": len(c.body)})


class FakeEngine:
    def __init__(self, path: str, behave=echo):
        self.path = path
        self.behave = behave
        self.conns: list[EngineConn] = []
        self.errors: list[BaseException] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(64)
        self._srv.settimeout(0.1)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def count(self):
        return len(self.conns)

    def _accept(self):
        while not self._stop:
            try:
                sock, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(TIMEOUT)
            c = EngineConn(sock)
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.read_head()
            self.behave(c)
        except EOFError:
            pass
        except BaseException as e:  # pragma: no cover - shown by the tests that need it
            self.errors.append(e)
        finally:
            c.done.set()
            try:
                c.sock.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        self._thread.join()
        self._srv.close()


@pytest.fixture
def engine(tmp_path):
    e = FakeEngine(str(tmp_path / "engine.sock"))
    yield e
    e.close()


# -- the proxy in its own loop --------------------------------------------------------


class LoopThread:
    def __init__(self):
        self.loop = uvloop.new_event_loop()  # the loop fdcs-name-scoper runs on
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def identity():
    return FakeIdentity()


@pytest.fixture
def make_proxy(loop_thread, tls, engine, identity):
    servers = []

    def make(prepare=None, engine_socket=None, client_ca="", **kw):
        ctx = server_context(tls.server_cert, tls.server_key, client_ca)
        srv = loop_thread.run(serve(identity, engine_socket=engine_socket or engine.path,
                                    ssl_context=ctx, prepare=prepare, **kw))
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        loop_thread.run(srv.close(1.0))


@pytest.fixture
def proxy(make_proxy):
    return make_proxy()


# -- clients ------------------------------------------------------------------------------


def client_context(tls, cert=False):
    ctx = ssl.create_default_context(cafile=tls.ca)
    if cert:
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    return ctx


class Client:
    """A blocking TLS client that speaks HTTP/1.1 by hand (keep-alive,
    pipelining, malformed requests)."""

    def __init__(self, port, tls, cert=False):
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock = client_context(tls, cert).wrap_socket(raw, server_hostname="localhost")
        self.f = self.sock.makefile("rb")

    def send(self, data: bytes):
        self.sock.sendall(data)

    def request(self, method, target, headers=None, body=None, token="tok-a"):
        self.send(build(method, target, headers, body, token))
        return self.response()

    def response(self, sink=None, head_only=False):
        status_line = self.f.readline()
        if not status_line:
            raise EOFError("connection closed")
        status = int(status_line.split()[1])
        headers = {}
        while True:
            line = self.f.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, v = line.decode("latin-1").split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if head_only or 100 <= status < 200:
            return status, headers, b""
        parts = []
        put = sink or parts.append
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int(self.f.readline().split(b";")[0], 16)
                if size == 0:
                    self.f.readline()
                    break
                put(self.f.read(size))
                self.f.readline()
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                piece = self.f.read(min(left, 65536))
                left -= len(piece)
                put(piece)
        return status, headers, b"".join(parts)

    def closed_by_peer(self):
        try:
            return self.f.read(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self):
        self.f.close()
        self.sock.close()


def build(method, target, headers=None, body=None, token="tok-a") -> bytes:
    h = {"Host": "docker"}
    if token:
        h["X-Auth-Token"] = token
    if body is not None:
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    return (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
            + "\r\n").encode() + (body or b"")


@pytest.fixture
def client(proxy, tls):
    clients = []

    def make(cert=False, port=None):
        c = Client(port or proxy.port, tls, cert)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


class RawTLS:
    """TLS by hand over a blocking socket (ssl.SSLObject), to half-close the
    TCP write side without close_notify (what the docker CLI does) and to keep
    writing after the server's close_notify (what Go clients may do)."""

    def __init__(self, port, tls):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = client_context(tls).wrap_bio(self.inc, self.out, server_hostname="localhost")
        self.buf = b""
        self.eof = False
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()

    def _flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _feed(self):
        data = self.sock.recv(65536)
        if data:
            self.inc.write(data)
        else:
            self.inc.write_eof()

    def send(self, data):
        self.obj.write(data)
        self._flush()

    def half_close(self):
        self.sock.shutdown(socket.SHUT_WR)

    def _read(self):
        while True:
            try:
                data = self.obj.read(65536)
                if not data:
                    self.eof = True
                return data
            except ssl.SSLWantReadError:
                self._feed()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True
                return b""

    def recv_until(self, needle: bytes) -> bytes:
        while needle not in self.buf:
            data = self._read()
            if not data:
                raise EOFError(f"EOF before {needle!r}; got {self.buf!r}")
            self.buf += data
        i = self.buf.index(needle) + len(needle)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def recv_to_eof(self) -> bytes:
        while not self.eof:
            self.buf += self._read()
        out, self.buf = self.buf, b""
        return out

    def close(self):
        self.sock.close()


# =========================================================================================
# pass-through, keep-alive, identity
# =========================================================================================


def test_pass_through_get(engine, client, identity):
    c = client()
    status, headers, body = c.request("GET", "/v1.41/version?x=1", {"X-Auth-TenantId": "a" * 32})
    assert status == 200
    assert json.loads(body) == {"method": "GET", "target": "/v1.41/version?x=1", "body": 0}
    (e,) = engine.conns
    assert e.header("X-Auth-Token") == "tok-a" and e.header("X-Auth-TenantId") == "a" * 32
    assert e.header("Connection") is None  # HTTP/1.1: kept alive, see the engine connection tests
    rid = e.header("X-Request-Id")
    assert rid and headers["x-request-id"] == rid
    assert identity.calls[0][1] == "127.0.0.1"


def test_keep_alive_gets_one_upstream_connection_per_request(engine, client, identity):
    c = client()
    assert c.request("GET", "/v1.41/containers/json", token="tok-a")[0] == 200
    assert c.request("GET", "/v1.41/info", token="tok-b")[0] == 200
    assert engine.count == 2
    assert [e.target for e in engine.conns] == ["/v1.41/containers/json", "/v1.41/info"]
    # the second request, with ANOTHER token, was authenticated on its own
    assert identity.tokens() == ["tok-a", "tok-b"]
    assert [e.header("X-Auth-Token") for e in engine.conns] == ["tok-a", "tok-b"]


def test_pipelined_requests_each_get_their_own_identity_and_upstream(engine, client, identity):
    c = client()
    c.send(build("GET", "/v1.41/info", token="tok-a") + build("GET", "/v1.41/version", token="tok-b"))
    assert c.response()[0] == 200 and c.response()[0] == 200
    assert engine.count == 2 and identity.tokens() == ["tok-a", "tok-b"]


def test_401_without_token_never_touches_the_engine(engine, client):
    c = client()
    status, headers, body = c.request("GET", "/v1.41/containers/json", token=None)
    assert status == 401
    assert "run fdcs-login" in json.loads(body)["message"]
    assert headers["content-type"] == "application/json"
    assert engine.count == 0
    # positive control, on the same (kept) connection
    assert c.request("GET", "/v1.41/containers/json")[0] == 200
    assert engine.count == 1


def test_anyone_may_ping_so_that_clients_negotiate_the_version(engine, client, identity):
    c = client()
    for target in ("/_ping", "/v1.41/_ping"):
        assert c.request("GET", target, token=None)[0] == 200
    assert engine.count == 2 and identity.tokens() == []
    # anything else about the ping still needs an identity
    assert c.request("GET", "/_ping?x=1", token=None)[0] == 401
    assert c.request("POST", "/_ping", token=None)[0] == 401
    assert engine.count == 2


def test_401_drains_a_small_body_and_keeps_the_connection(engine, client):
    c = client()
    status, _, _ = c.request("POST", "/v1.41/containers/create", {"Content-Type": "application/json"},
                             body=b"{}" * 1000, token="bad")
    assert status == 401 and engine.count == 0
    assert c.request("GET", "/v1.41/version")[0] == 200


@pytest.mark.parametrize("token,status", [("tok-down", 503), ("tok-noroles", 403), ("tok-zzz", 401)])
def test_identity_failures_map_to_status(engine, client, token, status):
    c = client()
    st, _, body = c.request("GET", "/v1.41/version", token=token)
    assert st == status and json.loads(body)["message"]
    assert engine.count == 0
    assert c.request("GET", "/v1.41/version")[0] == 200 and engine.count == 1


def test_admin_key_header_is_always_stripped(engine, client, identity):
    c = client()
    status, _, _ = c.request("GET", "/v1.41/version",
                             {"x-fdcs-ADMIN-key": "s3cret", "X-Other": "kept"})
    assert status == 200
    (e,) = engine.conns
    assert e.header("X-FDCS-Admin-Key") is None and b"s3cret" not in e.head
    assert e.header("X-Other") == "kept"  # positive control: other headers pass
    seen, _ = identity.calls[0]
    assert not any(k.lower() == "x-fdcs-admin-key" for k in seen)


def test_admin_key_alone_is_no_identity(engine, client):
    c = client()
    status, _, _ = c.request("GET", "/v1.41/version", {"X-FDCS-Admin-Key": "s3cret"}, token=None)
    assert status == 401 and engine.count == 0


def test_hop_by_hop_and_connection_named_headers_are_not_forwarded(engine, client):
    c = client()
    c.request("GET", "/v1.41/version", {"Connection": "keep-alive, X-Drop", "X-Drop": "1",
                                        "Keep-Alive": "timeout=5", "TE": "trailers"})
    (e,) = engine.conns
    assert e.header("X-Drop") is None and e.header("Keep-Alive") is None and e.header("TE") is None
    assert e.header("Connection") is None


def test_request_id_sane_kept_insane_replaced(engine, client):
    c = client()
    _, h1, _ = c.request("GET", "/v1.41/version", {"X-Request-Id": "abc-123"})
    _, h2, _ = c.request("GET", "/v1.41/version", {"X-Request-Id": "bad id <x>"})
    assert engine.conns[0].header("X-Request-Id") == "abc-123" == h1["x-request-id"]
    rid = engine.conns[1].header("X-Request-Id")
    assert rid != "bad id <x>" and len(rid) == 16 and h2["x-request-id"] == rid
    assert [k for k, _ in engine.conns[1].headers if k.lower() == "x-request-id"] == ["x-request-id"]


@pytest.mark.parametrize("ctl", ["\x01", "\x7f", "\x1b"])
def test_a_control_character_in_a_header_value_is_refused(engine, client, ctl):
    """As Go's server (the engine) would: only visible characters, spaces
    and tabs; nothing of the request reaches the engine."""
    c = client()
    status, _, body = c.request("GET", "/v1.41/version", {"X-Request-Id": f"id{ctl}x"})
    assert status == 400 and "bad request" in json.loads(body)["message"]
    assert engine.count == 0
    # positive control: the same header without the control character
    assert client().request("GET", "/v1.41/version", {"X-Request-Id": "idx"})[0] == 200
    assert engine.count == 1


# =========================================================================================
# engine connections: kept alive for reads, new for everything else
# =========================================================================================


def keep_alive(c: EngineConn):
    """An engine that keeps its connections (as dockerd does): every request
    on the connection answered with its method, target and the connection's
    count of requests so far."""
    n = 0
    while True:
        c.read_body()
        n += 1
        c.respond_json({"method": c.method, "target": c.target, "nth": n})
        try:
            c.read_head()
        except EOFError:
            return


def test_reads_reuse_an_engine_connection_writes_get_their_own(engine, client):
    engine.behave = keep_alive
    c = client()
    answers = [json.loads(c.request("GET", f"/v1.41/containers/{i}/json")[2]) for i in range(3)]
    assert [a["nth"] for a in answers] == [1, 2, 3] and engine.count == 1
    # a request with a body (or one that changes something): a new connection
    status, _, body = c.request("POST", "/v1.41/containers/x/start", body=b"")
    assert status == 200 and json.loads(body)["nth"] == 1 and engine.count == 2
    # ... which, ended cleanly, a next read may use
    assert json.loads(c.request("GET", "/v1.41/version")[2])["nth"] in (2, 4)
    assert engine.count == 2


def test_a_kept_alive_connection_the_engine_closed_is_retried_once_on_a_new_one(engine, client):
    """The engine answers one request per connection and closes the
    connection when a second one comes, unanswered (as a server closing an
    idle connection just then would): the read is sent once more, on a new
    connection, and answered -- never a 502."""
    def one_per_connection(c: EngineConn):
        c.read_body()
        c.respond_json({"target": c.target})
        c.read_head()  # the next request: dropped with the connection
        c.read_body()
    engine.behave = one_per_connection
    c = client()
    for i in range(5):
        status, _, body = c.request("GET", f"/v1.41/containers/{i}/json")
        assert status == 200 and json.loads(body) == {"target": f"/v1.41/containers/{i}/json"}, body
    # each later request: dropped by the kept-alive connection (its last
    # request read), answered on a new one, which is then kept in turn
    wait_until(lambda: engine.count == 5 and all(e.target.endswith("4/json") or e.done.is_set()
                                                 for e in engine.conns))
    assert [e.target for e in engine.conns] == [f"/v1.41/containers/{i}/json" for i in (1, 2, 3, 4, 4)]


def test_a_connection_with_bytes_after_the_answer_is_not_reused(engine, client):
    """The engine sent more than its answer (nothing a sound engine does):
    those bytes must never be read as the answer to a next request."""
    def and_junk(c: EngineConn):
        c.read_body()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
               b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n\"smuggled\"")
        keep_alive(c)  # and keeps the connection
    engine.behave = and_junk
    c = client()
    assert c.request("GET", "/v1.41/version")[2] == b"{}"
    status, _, body = c.request("GET", "/v1.41/version")
    assert status == 200 and body == b"{}" and engine.count == 2
    # control: the same engine without the junk keeps one connection (see above)


# =========================================================================================
# rewriting hooks (prepare, bodies)
# =========================================================================================


def test_json_request_body_rewritten_with_fresh_content_length(engine, make_proxy, tls):
    seen = {}

    async def prepare(ctx, ident, method, target, headers, eng):
        seen.update(ctx=ctx, ident=ident, method=method, target=target)
        return Exchange(method, target.replace("web", "a_web"), headers, request_body="json",
                        rewrite_body=lambda b: json.dumps({"Wrapped": json.loads(b)}).encode())

    px = make_proxy(prepare=prepare, context="the-ctx")
    c = Client(px.port, tls)
    # chunked from the client: the engine gets a Content-Length
    body = b'{"Image":"busybox"}'
    c.send(build("POST", "/v1.41/containers/create?name=web",
                 {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}, None)
           + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    status, _, resp = c.response()
    assert status == 200
    (e,) = engine.conns
    assert e.target == "/v1.41/containers/create?name=a_web"
    assert json.loads(e.body) == {"Wrapped": {"Image": "busybox"}}
    assert e.header("Content-Length") == str(len(e.body)) and e.header("Transfer-Encoding") is None
    assert seen["ctx"] == "the-ctx" and seen["ident"].user_name == "alice"


def _json_prepare(async_ok=True):
    async def prepare(ctx, ident, method, target, headers, eng):
        return Exchange(method, target, headers, request_body="json")
    return prepare


def test_json_body_over_1_mib_is_413_and_never_forwarded(engine, make_proxy, tls):
    px = make_proxy(prepare=_json_prepare())
    c = Client(px.port, tls)
    status, _, body = c.request("POST", "/v1.41/containers/create", body=b"x" * (MAX_JSON + 1))
    assert status == 413 and "1024 KiB" in json.loads(body)["message"]
    assert engine.count == 0
    # positive control: exactly the cap goes through
    c2 = Client(px.port, tls)
    assert c2.request("POST", "/v1.41/containers/create", body=b"x" * MAX_JSON)[0] == 200
    assert engine.count == 1 and len(engine.conns[0].body) == MAX_JSON


def test_chunked_json_body_over_1_mib_is_413(engine, make_proxy, tls):
    px = make_proxy(prepare=_json_prepare())
    c = Client(px.port, tls)
    piece = b"y" * 65536
    c.send(build("POST", "/v1.41/containers/create", {"Transfer-Encoding": "chunked"})
           + (b"%x\r\n%s\r\n" % (len(piece), piece)) * 17 + b"0\r\n\r\n")
    assert c.response()[0] == 413 and engine.count == 0


def test_prepare_reject_is_answered_directly(engine, make_proxy, tls):
    async def prepare(ctx, ident, method, target, headers, eng):
        if "other" in target:
            return Exchange(method, target, headers, reject=(404, "No such container: other"))
        return Exchange(method, target, headers)

    px = make_proxy(prepare=prepare)
    c = Client(px.port, tls)
    st, _, body = c.request("GET", "/v1.41/containers/other/json")
    assert (st, json.loads(body)) == (404, {"message": "No such container: other"})
    assert engine.count == 0
    assert c.request("GET", "/v1.41/containers/mine/json")[0] == 200 and engine.count == 1


def test_engine_subrequest_carries_only_the_callers_auth(engine, make_proxy, tls):
    got = {}

    async def prepare(ctx, ident, method, target, headers, eng):
        got["sub"] = await eng("POST", "/v1.41/networks/create", b'{"Name":"n"}')
        return Exchange(method, target, headers)

    px = make_proxy(prepare=prepare)
    c = Client(px.port, tls)
    assert c.request("GET", "/v1.41/containers/json",
                     {"X-Auth-TenantId": "t1", "X-Registry-Auth": "zzz", "X-Request-Id": "r-1"})[0] == 200
    sub, main = engine.conns
    assert (sub.method, sub.target, sub.body) == ("POST", "/v1.41/networks/create", b'{"Name":"n"}')
    assert sub.header("X-Auth-Token") == "tok-a" and sub.header("X-Auth-TenantId") == "t1"
    assert sub.header("X-Request-Id") == "r-1" and sub.header("X-Registry-Auth") is None
    status, headers, body = got["sub"]
    assert status == 200 and json.loads(body)["target"] == "/v1.41/networks/create"
    assert (b"content-type", b"application/json") in headers


class Rewriter(PassThrough):
    def __init__(self, mode):
        self.mode = mode

    def head(self, status, headers):
        return self.mode, headers + [(b"x-rewritten", self.mode.encode())]

    def json(self, status, body):
        if status == 403:  # a refusal of a foreign name becomes the engine's own 404
            return 404, json.dumps({"message": "No such container: web"}).encode()
        names = [n.replace("a_", "") for n in json.loads(body)]
        return json.dumps({"status": status, "names": names}).encode()

    def line(self, line):
        ev = json.loads(line)
        if ev.get("tenant") != "a":
            return None
        return json.dumps({"name": ev["name"].replace("a_", "")}).encode()


def _mode_proxy(make_proxy, mode):
    async def prepare(ctx, ident, method, target, headers, eng):
        return Exchange(method, target, headers, response=Rewriter(mode))
    return make_proxy(prepare=prepare)


def _chunked_head(c: EngineConn, ctype="application/json"):
    c.send(f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())


def _chunk(c: EngineConn, data: bytes):
    c.send(b"%x\r\n%s\r\n" % (len(data), data))


def test_response_json_mode(engine, make_proxy, tls):
    def behave(c):
        _chunked_head(c)
        _chunk(c, b'["a_web", ')
        _chunk(c, b'"a_db"]')
        c.send(b"0\r\n\r\n")
    engine.behave = behave
    px = _mode_proxy(make_proxy, "json")
    c = Client(px.port, tls)
    status, headers, body = c.request("GET", "/v1.41/containers/json")
    assert json.loads(body) == {"status": 200, "names": ["web", "db"]}
    assert headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers
    assert headers["x-rewritten"] == "json"
    assert c.request("GET", "/v1.41/containers/json")[0] == 200  # kept alive


def test_response_json_mode_may_change_the_status(engine, make_proxy, tls):
    def behave(c):
        c.respond_json({"message": "authorization denied by plugin: No such container: web"}, 403)
    engine.behave = behave
    c = Client(_mode_proxy(make_proxy, "json").port, tls)
    c.send(build("GET", "/v1.41/containers/web/json"))
    status_line = c.f.peek(64)[:64]
    status, headers, body = c.response()
    assert status == 404 and status_line.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert json.loads(body) == {"message": "No such container: web"}
    assert headers["content-length"] == str(len(body))


def test_response_lines_mode_rewrites_drops_and_flushes_each_line(engine, make_proxy, tls):
    step = threading.Event()

    def behave(c):
        _chunked_head(c)
        # a kept line split over two chunks, a foreign line, then wait until
        # the client has seen the first line before sending the last
        _chunk(c, b'{"tenant":"a","na')
        _chunk(c, b'me":"a_web"}\n{"tenant":"b","name":"b_x"}\n')
        assert step.wait(TIMEOUT)
        _chunk(c, b'{"tenant":"a","name":"a_db"}\n')
        c.send(b"0\r\n\r\n")
    engine.behave = behave
    px = _mode_proxy(make_proxy, "lines")
    c = Client(px.port, tls)
    c.send(build("GET", "/v1.41/events"))
    status, headers, _ = c.response(head_only=True)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    size = int(c.f.readline(), 16)
    first = c.f.read(size)
    assert first == b'{"name": "web"}\n'  # arrived while the engine still holds the rest
    c.f.readline()
    step.set()
    rest = b""
    while True:
        size = int(c.f.readline(), 16)
        if size == 0:
            c.f.readline()
            break
        rest += c.f.read(size)
        c.f.readline()
    assert rest == b'{"name": "db"}\n'
    assert b"b_x" not in first + rest


def test_streaming_response_headers_are_forwarded_before_any_body(engine, client):
    go = threading.Event()

    def behave(c):
        _chunked_head(c, "application/vnd.docker.raw-stream")  # logs -f, framed
        assert go.wait(TIMEOUT)
        _chunk(c, b"line 1\n")
        c.send(b"0\r\n\r\n")
    engine.behave = behave
    c = client()
    c.send(build("GET", "/v1.41/containers/x/logs?follow=1&stdout=1"))
    status, headers, _ = c.response(head_only=True)  # before the engine sent a body byte
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    go.set()
    assert int(c.f.readline(), 16) == 7 and c.f.read(7) == b"line 1\n"


def test_a_stream_of_small_chunks_is_relayed_whole_and_in_order_and_merged(engine, client):
    """logs -f: the engine writes a chunk per line; what arrived together
    goes on as one chunk (one TLS record), and a later line still flows."""
    go = threading.Event()
    lines = [b"line %d\n" % i for i in range(500)]

    def behave(c):
        _chunked_head(c, "application/vnd.docker.raw-stream")
        c.send(b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in lines))  # one write, 500 chunks
        assert go.wait(TIMEOUT)
        _chunk(c, b"late\n")
        c.send(b"0\r\n\r\n")
    engine.behave = behave
    c = client()
    c.send(build("GET", "/v1.41/containers/x/logs?follow=1&stdout=1"))
    status, _, _ = c.response(head_only=True)
    assert status == 200
    got, chunks = b"", 0
    while len(got) < len(b"".join(lines)):
        size = int(c.f.readline(), 16)
        got += c.f.read(size)
        c.f.readline()
        chunks += 1
    assert got == b"".join(lines)
    assert chunks < len(lines) / 2, chunks  # merged (one chunk per engine read, not per line)
    go.set()
    size = int(c.f.readline(), 16)
    assert c.f.read(size) == b"late\n"
    c.f.readline()
    assert int(c.f.readline(), 16) == 0


def test_client_going_away_ends_the_engine_stream(engine, client):
    def behave(c):
        _chunked_head(c)
        while True:  # events: until the other side goes away
            _chunk(c, b'{"status":"tick"}\n')
            time.sleep(0.01)
    engine.behave = behave
    c = client()
    c.send(build("GET", "/v1.41/events"))
    assert c.response(head_only=True)[0] == 200
    wait_until(lambda: engine.count == 1)
    assert not engine.conns[0].done.is_set()  # positive control: it streams
    c.close()
    wait_until(lambda: engine.conns[0].done.is_set(), what="the engine connection to end")


# =========================================================================================
# large bodies: streamed with backpressure
# =========================================================================================


def test_large_bodies_stream_with_bounded_memory(engine, client):
    size = 64 * 1024 * 1024
    block = os.urandom(65536)
    want = hashlib.sha256(block * (size // len(block))).hexdigest()
    got = {}

    def behave(c):
        if c.method == "PUT":
            h = hashlib.sha256()
            n = 0
            for piece in c.body_chunks():
                h.update(piece)
                n += len(piece)
            got["up"] = (n, h.hexdigest())
            c.respond(200)
        else:
            _chunked_head(c, "application/x-tar")
            for _ in range(size // len(block)):
                _chunk(c, block)
            c.send(b"0\r\n\r\n")
    engine.behave = behave
    c = client()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        c.send(build("PUT", "/v1.41/containers/x/archive?path=/", {"Content-Length": str(size),
                                                                  "Content-Type": "application/x-tar"}))
        for _ in range(size // len(block)):
            c.send(block)
        assert c.response()[0] == 200
        h = hashlib.sha256()
        n = [0]

        def sink(piece):
            h.update(piece)
            n[0] += len(piece)
        c.send(build("GET", "/v1.41/containers/x/archive?path=/"))
        assert c.response(sink=sink)[0] == 200
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got["up"] == (size, want)
    assert (n[0], h.hexdigest()) == (size, want)
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for {size / 2**20:.0f} MiB bodies"


def test_memory_probe_sees_a_buffered_body(engine, make_proxy, tls):
    """Positive control for the test above: the same measurement does see
    the proxy buffering a body (json mode buffers by design)."""
    size = 12 * 1024 * 1024

    def behave(c):
        c.respond(200, b'"' + b"x" * (size - 2) + b'"', [("Content-Type", "application/json")])
    engine.behave = behave

    class Keep(PassThrough):
        def head(self, status, headers):
            return "json", headers

    async def prepare(ctx, ident, method, target, headers, eng):
        return Exchange(method, target, headers, response=Keep())

    c = Client(make_proxy(prepare=prepare).port, tls)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        status, _, body = c.request("GET", "/v1.41/containers/json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 200 and len(body) == size
    assert peak > size


def test_expect_100_continue_gets_100_before_the_body_is_read(engine, client):
    c = client()
    c.send(build("PUT", "/v1.41/containers/x/archive?path=/", {"Content-Length": "5",
                                                              "Expect": "100-continue"}))
    assert c.response()[0] == 100
    c.send(b"hello")
    status, _, body = c.response()
    assert status == 200 and json.loads(body)["body"] == 5
    assert engine.conns[0].header("Expect") is None  # ours to answer, not the engine's


def test_head_request_keeps_the_connection(engine, client):
    def behave(c):
        c.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n")
    engine.behave = behave
    c = client()
    c.send(build("HEAD", "/v1.41/_ping"))
    status, headers, _ = c.response(head_only=True)  # a HEAD answer has no body
    assert status == 200 and headers["content-length"] == "2"
    engine.behave = echo
    assert c.request("GET", "/v1.41/_ping")[0] == 200


# =========================================================================================
# hijacked streams
# =========================================================================================

UPGRADE = {"Connection": "Upgrade", "Upgrade": "tcp", "Content-Type": "text/plain"}
ENGINE_101 = (b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
              b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n")


def test_upgrade_copies_raw_both_ways_and_passes_the_client_half_close(engine, proxy, tls):
    def behave(c):
        c.send(ENGINE_101 + b"hello from engine\n")
        c.read_raw_until_eof()          # the client's stdin, up to its EOF
        c.send(b"output after your EOF\n")  # still delivered
        c.sock.shutdown(socket.SHUT_WR)
    engine.behave = behave
    t = RawTLS(proxy.port, tls)
    pipelined = build("GET", "/v1.41/version")  # after the upgrade: stream data, not HTTP
    t.send(build("POST", "/v1.41/containers/x/attach?stream=1&stdin=1&stdout=1", UPGRADE) + pipelined)
    head = t.recv_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 UPGRADED\r\n") and b"upgrade: tcp" in head.lower()
    assert t.recv_until(b"engine\n") == b"hello from engine\n"
    t.send(b"stdin data")
    t.half_close()  # TCP FIN without close_notify, like the docker CLI
    assert t.recv_to_eof() == b"output after your EOF\n"
    wait_until(lambda: engine.conns[0].done.is_set())
    e = engine.conns[0]
    assert e.raw == pipelined + b"stdin data" and e.eof
    assert engine.count == 1  # the pipelined GET never became a request


def test_upgrade_passes_the_engine_half_close_to_the_client(engine, proxy, tls):
    def behave(c):
        c.read_body()
        c.send(ENGINE_101 + b"all my output\n")
        c.sock.shutdown(socket.SHUT_WR)  # the engine's EOF first
        c.read_raw_until_eof()
    engine.behave = behave
    t = RawTLS(proxy.port, tls)
    t.send(build("POST", "/v1.41/exec/abc/start", UPGRADE, body=b'{"Detach":false,"Tty":false}'))
    t.recv_until(b"\r\n\r\n")
    assert t.recv_to_eof() == b"all my output\n"  # close_notify / EOF reached us
    t.send(b"late input")  # our side is still open
    t.half_close()
    wait_until(lambda: engine.conns[0].done.is_set())
    assert engine.conns[0].raw == b"late input" and engine.conns[0].eof
    assert engine.conns[0].body == b'{"Detach":false,"Tty":false}'  # the request's, not raw


def test_upgrade_refused_by_the_engine_stays_http(engine, client):
    def behave(c):
        c.respond_json({"message": "No such container: x"}, status=404)
    engine.behave = behave
    c = client()
    status, _, body = c.request("POST", "/v1.41/containers/x/attach?stream=1", UPGRADE)
    assert status == 404 and json.loads(body)["message"] == "No such container: x"
    engine.behave = echo
    assert c.request("GET", "/v1.41/version")[0] == 200  # the connection still speaks HTTP


def test_old_200_raw_stream_hijack(engine, proxy, tls):
    def behave(c):
        c.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.multiplexed-stream\r\n\r\n"
               + b"\x01\x00\x00\x00\x00\x00\x00\x03hi\n")
        c.read_raw_until_eof()
        c.send(b"\x01\x00\x00\x00\x00\x00\x00\x04bye\n")
    engine.behave = behave
    t = RawTLS(proxy.port, tls)
    t.send(build("POST", "/v1.41/containers/x/attach?stream=1&stdin=1&stdout=1"))
    head = t.recv_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"chunked" not in head.lower()
    assert t.recv_until(b"hi\n") == b"\x01\x00\x00\x00\x00\x00\x00\x03hi\n"  # unframed
    t.send(b"stdin")
    t.half_close()
    assert t.recv_to_eof() == b"\x01\x00\x00\x00\x00\x00\x00\x04bye\n"
    wait_until(lambda: engine.conns[0].done.is_set())
    assert engine.conns[0].raw == b"stdin"


# =========================================================================================
# request smuggling
# =========================================================================================

SMUGGLING = {
    "content-length and transfer-encoding": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
        b"X-Auth-Token: tok-a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two content-lengths": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
        b"X-Auth-Token: tok-a\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
    "two equal content-lengths": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
        b"X-Auth-Token: tok-a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "content-length list": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
        b"X-Auth-Token: tok-a\r\nContent-Length: 2, 2\r\n\r\n{}",
    "obsolete line folding": b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\n"
        b"X-Auth-Token: tok-a\r\nX-Foo: a\r\n b\r\n\r\n",
    "space before colon": b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\nX-Auth-Token : tok-a\r\n\r\n",
    "transfer-encoding other than chunked": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
        b"X-Auth-Token: tok-a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
        b"X-Auth-Token: tok-a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_smuggling_attempts_get_400_and_never_reach_the_engine(engine, client, case):
    c = client()
    c.send(SMUGGLING[case])
    status, _, body = c.response()
    assert status in (400, 501) and json.loads(body)["message"]
    assert c.closed_by_peer()
    if case != "bad chunk size":
        assert engine.count == 0
    else:  # the head was sound and went out; the body broke off before any of it
        wait_until(lambda: engine.count == 1 and engine.conns[0].done.is_set())
        assert engine.conns[0].body == b""
    # positive control: a sound request on a new connection gets through
    before = engine.count
    assert client().request("GET", "/v1.41/version")[0] == 200 and engine.count == before + 1


# =========================================================================================
# the engine away, client certificates, shutdown
# =========================================================================================


def test_502_when_the_engine_socket_is_missing(engine, make_proxy, tls, tmp_path):
    px = make_proxy(engine_socket=str(tmp_path / "nope.sock"))
    c = Client(px.port, tls)
    status, _, body = c.request("GET", "/v1.41/version")
    assert (status, json.loads(body)) == (502, {"message": "the Docker engine is unavailable, retry"})
    # a socket file nobody listens on: connection refused, same answer
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    px2 = make_proxy(engine_socket=str(tmp_path / "dead.sock"))
    assert Client(px2.port, tls).request("GET", "/v1.41/version")[0] == 502
    # positive control: the real (fake) engine
    assert Client(make_proxy().port, tls).request("GET", "/v1.41/version")[0] == 200


def test_client_certificate_required_when_a_client_ca_is_set(engine, make_proxy, tls):
    px = make_proxy(client_ca=tls.ca)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        c = Client(px.port, tls)
        c.request("GET", "/v1.41/version")
    assert engine.count == 0
    assert Client(px.port, tls, cert=True).request("GET", "/v1.41/version")[0] == 200


def test_plain_http_to_the_tls_port_is_told_to_use_tls(engine, proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as s:
        s.sendall(build("GET", "/v1.41/version"))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ") and b"--tlsverify" in data
    assert engine.count == 0


def test_graceful_shutdown_finishes_requests_in_flight(engine, make_proxy, tls, loop_thread):
    release = threading.Event()

    def behave(c):
        assert release.wait(TIMEOUT)
        c.respond_json({"slow": True})
    engine.behave = behave
    px = make_proxy()
    busy = Client(px.port, tls)
    idle = Client(px.port, tls)
    busy.send(build("GET", "/v1.41/containers/x/wait"))
    wait_until(lambda: engine.count == 1)
    wait_until(lambda: px.connections == 2)
    done = asyncio.run_coroutine_threadsafe(px.close(10.0), loop_thread.loop)
    assert idle.closed_by_peer()  # idle connections go at once
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", px.port), timeout=2)
    release.set()
    status, headers, body = busy.response()
    assert status == 200 and json.loads(body) == {"slow": True}
    assert headers.get("connection") == "close"
    done.result(TIMEOUT)


def test_chunked_request_body_streams_through_chunked(engine, client):
    got = {}

    def behave(c):
        got["te"] = c.header("Transfer-Encoding")
        got["cl"] = c.header("Content-Length")
        got["body"] = c.read_body()
        c.respond(200)
    engine.behave = behave
    c = client()
    c.send(build("POST", "/v1.41/images/load", {"Transfer-Encoding": "chunked",
                                                "Content-Type": "application/x-tar"}))
    for piece in (b"abc", b"d" * 70000, b"e"):
        c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    c.send(b"0\r\n\r\n")
    assert c.response()[0] == 200
    assert got == {"te": "chunked", "cl": None, "body": b"abc" + b"d" * 70000 + b"e"}


def test_max_connections_makes_new_connections_wait(engine, make_proxy, tls):
    px = make_proxy(max_connections=1)
    first = Client(px.port, tls)
    assert first.request("GET", "/v1.41/version")[0] == 200  # kept open
    raw = socket.create_connection(("127.0.0.1", px.port), timeout=TIMEOUT)
    raw.settimeout(0.5)
    second = client_context(tls).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                          server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        second.do_handshake()
    raw.sendall(out.read())
    with pytest.raises(socket.timeout):  # no ServerHello while the only slot is taken
        raw.recv(1)
    raw.close()
    first.close()  # the slot frees: a new connection is served (positive control)
    assert Client(px.port, tls).request("GET", "/v1.41/version")[0] == 200


# -- fdcs-name-scoper (server.py) ---------------------------------------------------------


def _conf(tmp_path, tls, **scoper):
    values = {"listen": "127.0.0.1:2376", "tls_cert": tls.server_cert, "tls_key": tls.server_key,
              "engine_socket": str(tmp_path / "engine.sock"), **scoper}
    text = ('[keystone]\nurl = "http://127.0.0.1:1/v3"\nadmin_project_id = "x"\n'
            '[redis]\nurl = "redis://127.0.0.1:1/0"\n[scoper]\n'
            + "".join(f'{k} = "{v}"\n' for k, v in values.items()))
    path = tmp_path / "fdcs.toml"
    path.write_text(text)
    return str(path)


def test_server_check_accepts_a_valid_configuration(tmp_path, tls, capsys):
    from name_scoper.server import main
    assert main(["--config", _conf(tmp_path, tls), "--check"]) == 0
    assert "is valid" in capsys.readouterr().out


@pytest.mark.parametrize("key,value,says", [
    ("tls_key", "/nonexistent/key.pem", "scoper.tls_key"),
    ("tls_cert", "", "scoper.tls_cert"),
    ("listen", "2376", "scoper.listen"),
    ("log_level", "loud", "scoper.log_level"),
])
def test_server_check_names_the_bad_option(tmp_path, tls, capsys, key, value, says):
    from name_scoper.server import main
    assert main(["--config", _conf(tmp_path, tls, **{key: value}), "--check"]) == 2
    assert says in capsys.readouterr().err


def test_server_check_refuses_a_key_that_does_not_match(tmp_path, tls, capsys):
    from name_scoper.server import main
    assert main(["--config", _conf(tmp_path, tls, tls_key=tls.client_key), "--check"]) == 2
    assert "tls_cert" in capsys.readouterr().err


def test_sd_notify_reaches_the_notify_socket(tmp_path, monkeypatch):
    from name_scoper.server import _sd_notify
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        _sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    _sd_notify("READY=1")  # no systemd: nothing happens


# =========================================================================================
# security corpus (issue 7): a repeated identity header
# =========================================================================================


class _StrictIdentity(FakeIdentity):
    """Records the (name, value) pairs it is shown and, as IdentityService
    does, refuses two different X-Auth-Token values."""

    def __init__(self):
        super().__init__()
        self.pairs: list[list[tuple[str, str]]] = []

    def authenticate(self, headers, source=""):
        pairs = [(k.lower(), v) for k, v in headers.items()]
        self.pairs.append(pairs)
        if len({v for k, v in pairs if k == "x-auth-token"}) > 1:
            raise AuthenticationError("authentication required: more than one X-Auth-Token header")
        return super().authenticate(headers, source)


def test_a_repeated_token_header_reaches_the_identity_as_two_values(engine, loop_thread, tls):
    ident = _StrictIdentity()
    srv = loop_thread.run(serve(ident, engine_socket=engine.path,
                                ssl_context=server_context(tls.server_cert, tls.server_key)))
    c = Client(srv.port, tls)
    try:
        c.send(b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\nX-Auth-Token: tok-a\r\nx-auth-token: tok-b\r\n\r\n")
        status, _, body = c.response()
        assert status == 401 and "more than one X-Auth-Token header" in json.loads(body)["message"]
        assert ident.pairs[-1].count(("x-auth-token", "tok-a")) == 1 and ("x-auth-token", "tok-b") in ident.pairs[-1]
        assert engine.count == 0
        # control: the same value twice is one identity, and the request goes through
        c.send(b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\nX-Auth-Token: tok-a\r\nx-auth-token: tok-a\r\n\r\n")
        assert c.response()[0] == 200 and engine.count == 1
        assert ident.calls[-1][0]["x-auth-token"] == "tok-a, tok-a"  # a lookup joins, as HTTP does
    finally:
        c.close()
        loop_thread.run(srv.close(1.0))


class _CachingIdentity(FakeIdentity):
    """Answers tok-a (and refuses tok-bad) from a 'cache' on the calling
    thread, as IdentityService.authenticate_cached does; anything else needs
    authenticate (in the proxy's worker thread)."""

    def __init__(self):
        super().__init__()
        self.cached_threads: list[str] = []
        self.threads: list[str] = []

    def authenticate_cached(self, headers, source=""):
        self.cached_threads.append(threading.current_thread().name)
        token = next((v for k, v in headers.items() if k.lower() == "x-auth-token"), None)
        if token == "tok-bad":
            raise AuthenticationError("authentication required: X-Auth-Token is invalid (cached); run fdcs-login")
        return self.TOKENS["tok-a"] if token == "tok-a" else None

    def authenticate(self, headers, source=""):
        self.threads.append(threading.current_thread().name)
        return super().authenticate(headers, source)


def test_a_cached_identity_is_answered_on_the_loop_and_a_miss_in_a_thread(engine, loop_thread, tls):
    ident = _CachingIdentity()
    srv = loop_thread.run(serve(ident, engine_socket=engine.path,
                                ssl_context=server_context(tls.server_cert, tls.server_key)))
    c = Client(srv.port, tls)
    try:
        # warm: answered by the cache on the loop's thread, authenticate never called
        c.send(build("GET", "/v1.41/version"))
        assert c.response()[0] == 200 and engine.count == 1
        assert ident.threads == [] and ident.cached_threads == [loop_thread.thread.name]
        # a cached refusal is the refusal, the engine untouched
        c.send(build("GET", "/v1.41/version", token="tok-bad"))
        status, _, body = c.response()
        assert status == 401 and "(cached)" in json.loads(body)["message"] and engine.count == 1
        assert ident.threads == []
        # a miss (the cache says None): authenticate decides, in a worker thread
        c.send(build("GET", "/v1.41/version", token="tok-b"))
        assert c.response()[0] == 200 and engine.count == 2
        assert len(ident.threads) == 1 and ident.threads[0].startswith("fdcs-identity")
        c.send(build("GET", "/v1.41/version", token="nope"))
        assert c.response()[0] == 401 and engine.count == 2 and len(ident.threads) == 2
    finally:
        c.close()
        loop_thread.run(srv.close(1.0))


class _RecheckingIdentity(_CachingIdentity):
    """A token cache whose answers say whether they still hold
    (IdentityService.still_cached): tok-a's and tok-b's do while ``holds``."""

    header_names = frozenset({b"x-auth-token", b"x-auth-tenantid", b"x-fdcs-admin-key"})

    def __init__(self):
        super().__init__()
        self.holds = True
        self.rechecked = 0
        self.answers = {t: types.SimpleNamespace(user_name=i.user_name, project_id=i.project_id,
                                                 cache_key=f"key-{t}") for t, i in self.TOKENS.items()}

    def authenticate_cached(self, headers, source=""):
        got = super().authenticate_cached(headers, source)
        return got and self.answers["tok-a"]

    def authenticate(self, headers, source=""):
        got = super().authenticate(headers, source)
        return self.answers["tok-b"] if got is self.TOKENS["tok-b"] else got

    def still_cached(self, ident):
        self.rechecked += 1
        return self.holds


def test_a_connection_repeating_its_credentials_is_only_asked_whether_its_identity_holds(engine, loop_thread, tls):
    ident = _RecheckingIdentity()
    srv = loop_thread.run(serve(ident, engine_socket=engine.path,
                                ssl_context=server_context(tls.server_cert, tls.server_key)))
    c, other = Client(srv.port, tls), Client(srv.port, tls)
    tenant = {"X-Auth-TenantId": "a" * 32}
    try:
        c.send(build("GET", "/v1.41/version", tenant))
        assert c.response()[0] == 200 and len(ident.cached_threads) == 1 and ident.rechecked == 0
        # the same credentials again: the identity is only asked whether its answer holds
        for n in (1, 2):
            c.send(build("GET", "/v1.41/version", tenant))
            assert c.response()[0] == 200 and len(ident.cached_threads) == 1 and ident.rechecked == n
        # control: it no longer holds -> the identity decides afresh, and that answer is kept
        ident.holds = False
        c.send(build("GET", "/v1.41/version", tenant))
        assert c.response()[0] == 200 and len(ident.cached_threads) == 2 and ident.rechecked == 3
        ident.holds = True
        # other credentials on the same connection, or the same value twice: decided afresh
        c.send(build("GET", "/v1.41/version"))  # no tenant header
        assert c.response()[0] == 200 and len(ident.cached_threads) == 3 and ident.rechecked == 3
        c.send(build("GET", "/v1.41/version", tenant, token="tok-bad"))
        assert c.response()[0] == 401 and len(ident.cached_threads) == 4
        c.send(build("GET", "/v1.41/version", tenant, token="tok-bad"))  # a refusal is never kept
        assert c.response()[0] == 401 and len(ident.cached_threads) == 5 and ident.rechecked == 3
        c.send(b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\nX-Auth-Token: tok-a\r\nx-auth-token: tok-a\r\n\r\n")
        assert c.response()[0] == 200 and len(ident.cached_threads) == 6 and ident.rechecked == 3
        # a miss decided in a thread (tok-b) is kept too
        c.send(build("GET", "/v1.41/version", token="tok-b"))
        assert c.response()[0] == 200 and len(ident.threads) == 1 and len(ident.cached_threads) == 7
        c.send(build("GET", "/v1.41/version", token="tok-b"))
        assert c.response()[0] == 200 and len(ident.threads) == 1 and len(ident.cached_threads) == 7
        assert ident.rechecked == 4
        # another connection keeps its own
        other.send(build("GET", "/v1.41/version", token="tok-b"))
        assert other.response()[0] == 200 and len(ident.cached_threads) == 8 and len(ident.threads) == 2
        assert engine.count == 9  # all but the two refusals
    finally:
        c.close()
        other.close()
        loop_thread.run(srv.close(1.0))


def test_the_idle_timeout_ends_a_silent_or_unfinished_head_never_a_request_being_served(make_proxy, engine, tls):
    idle = 0.5
    px = make_proxy(idle_timeout=idle)

    def slow(c):  # the engine takes three idle timeouts to answer
        c.read_body()
        time.sleep(3 * idle)
        echo(c)
    engine.behave = slow
    served, unfinished = Client(px.port, tls), Client(px.port, tls)
    try:
        t0 = time.monotonic()
        unfinished.send(b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\n")  # a head that never ends
        assert served.request("GET", "/v1.41/version")[0] == 200  # served though slower than the timeout
        engine.behave = echo
        assert served.request("GET", "/v1.41/version")[0] == 200  # and the connection carries on
        t1 = time.monotonic()
        assert unfinished.closed_by_peer() and engine.count == 2  # ended; nothing of it reached the engine
        assert served.closed_by_peer()  # idle after its answer: ended too...
        assert time.monotonic() - t1 >= 0.9 * idle  # ...but not before the timeout
        assert 3 * idle <= t1 - t0 and time.monotonic() - t0 < 3 * idle + TIMEOUT / 2
    finally:
        served.close()
        unfinished.close()


def test_in_flight_counts_the_requests_being_served(engine, make_proxy, tls):
    """What the container list's Redis read is chosen by: a request counts
    from its head until its answer is out (a stream until it ends); idle
    kept-alive connections do not count."""
    seen = []
    release = threading.Event()

    def behave(c):
        if c.target.endswith("/hold"):
            release.wait(TIMEOUT)
        c.respond_json({"ok": True})
    engine.behave = behave

    async def prepare(ctx, ident, method, target, headers, eng):
        seen.append(px.in_flight)
        return Exchange(method, target, headers)

    px = make_proxy(prepare=prepare)
    idle = Client(px.port, tls)
    assert idle.request("GET", "/v1.41/_nothing")[0] == 200  # then kept alive, idle
    c = Client(px.port, tls)
    assert c.request("GET", "/v1.41/containers/json")[0] == 200
    held = Client(px.port, tls)
    held.send(build("GET", "/v1.41/hold"))
    wait_until(lambda: engine.count == 3, what="the held request at the engine")
    try:
        assert c.request("GET", "/v1.41/containers/json")[0] == 200
    finally:
        release.set()
    assert held.response()[0] == 200
    wait_until(lambda: px.in_flight == 0, what="nothing in flight")
    assert seen == [1, 1, 1, 2]


# -- the access lines (proxy.AccessLines) ---------------------------------------------------------

def _pipe_text(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 20).decode()
    except BlockingIOError:
        return ""


@pytest.fixture
def access_pipe():
    import logging

    from name_scoper import proxy
    r, w = os.pipe()
    log = logging.getLogger("name_scoper.access")
    level = log.level
    log.setLevel(logging.INFO)
    proxy.ACCESS.to_fd(w)
    try:
        yield r, w
    finally:
        proxy.ACCESS.to_fd(None)
        log.setLevel(level)
        os.close(r)
        os.close(w)


def _ended(i: int):
    from name_scoper import proxy
    rec = proxy._Record("GET", f"/v1.41/containers/c{i}/json?x=1", "127.0.0.1")
    rec.rid, rec.tenant, rec.user = f"r{i}", "t1", "alice"
    rec.status, rec.sent = 200, 5
    return rec


def test_access_lines_are_written_after_their_requests_within_the_flush_delay(access_pipe):
    from name_scoper import proxy
    r, _ = access_pipe

    async def main():
        lines = proxy.AccessLines()
        _ended(1).log(lines)
        _ended(2).log(lines)
        queued = _pipe_text(r)  # not yet: the request's path does not write
        t0 = time.monotonic()
        text = ""
        while text.count("\n") < 2 and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.005)  # (the loop must run for the timer to fire)
            text += _pipe_text(r)
        took = time.monotonic() - t0
        lines.close()
        return queued, text, took

    queued, text, took = asyncio.run(main())
    assert queued == ""
    got = [json.loads(line.split("] ", 1)[1]) for line in text.splitlines()]
    assert [(g["rid"], g["path"], g["status"], g["bytes"], g["tenant"]) for g in got] == [
        ("r1", "/v1.41/containers/c1/json", 200, 5, "t1"), ("r2", "/v1.41/containers/c2/json", 200, 5, "t1")]
    assert "in" not in got[0] and isinstance(got[0]["ms"], float)
    assert took < 1.0  # FLUSH_DELAY is 50 ms: well within


def test_access_lines_are_written_at_once_when_many_wait_or_at_close(access_pipe):
    from name_scoper import proxy
    r, _ = access_pipe

    async def main():
        lines = proxy.AccessLines()
        for i in range(proxy.AccessLines.MAX_PENDING - 1):
            _ended(i).log(lines)
        before = _pipe_text(r)
        _ended(999).log(lines)  # the MAX_PENDING-th: written now, no timer waited for
        full = _pipe_text(r)
        _ended(1000).log(lines)
        lines.close()  # the server's close: written now
        last = _pipe_text(r)
        proxy.ACCESS.to_fd(r)  # a write that fails (a pipe's read end): said, never raised
        _ended(1001).log(lines)
        lines.close()
        return before, full, last

    before, full, last = asyncio.run(main())
    assert before == ""
    assert full.count("\n") == proxy.AccessLines.MAX_PENDING and '"rid":"r999"' in full
    assert last.count("\n") == 1 and '"rid":"r1000"' in last
