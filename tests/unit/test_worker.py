"""The plugin's gunicorn worker: its strict HTTP/1.1 reader (over a socket
pair) and the whole worker under gunicorn on a unix socket, as the engine
talks to it (keep-alive, several connections, a malformed request)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from authz_plugin.worker import MAX_BODY, BadRequest, Conn, idle_timeout, response

ROOT = Path(__file__).resolve().parents[2]


def reader(raw: bytes) -> Conn:
    a, b = socket.socketpair()
    threading.Thread(target=lambda: (a.sendall(raw), a.close()), daemon=True).start()
    return Conn(b)


def post(path=b"/AuthZPlugin.AuthZReq", body=b"{}", extra=b""):
    return b"POST %s HTTP/1.1\r\nHost: plugin\r\nContent-Length: %d\r\n%s\r\n%s" % (path, len(body), extra, body)


def test_reads_kept_alive_requests_one_after_the_other():
    c = reader(post(body=b'{"a":1}') + post(b"/Plugin.Activate", b""))
    assert c.read() == (b"/AuthZPlugin.AuthZReq", b'{"a":1}', True)
    assert c.read() == (b"/Plugin.Activate", b"", True)
    assert c.read() is None  # the peer closed between requests


def test_chunked_body_and_connection_close():
    raw = (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert reader(raw).read() == (b"/x", b"abcde", False)
    assert reader(b"POST /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n").read() == (b"/x", b"", False)


@pytest.mark.parametrize("raw, status", [
    (b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"POST /x HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", 400),
    (b"POST /x HTTP/1.1\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\n{}", 400),  # obs-fold
    (b"POST /x HTTP/1.1\r\nContent-Length : 2\r\n\r\n{}", 400),  # space before the colon
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400),
    (b"POST /x HTTP/2.0\r\nContent-Length: 0\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\n\r\n", 405),
    (b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
    (b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}", 400),  # cut short
    (b"POST /x HTTP/1.1\r\nContent-Le", 400),  # cut inside the head
])
def test_malformed_requests_are_refused(raw, status):
    with pytest.raises(BadRequest) as e:
        reader(raw).read()
    assert e.value.status == status


def test_response_framing():
    assert response(200, b"{}", True) == (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                          b"Content-Type: application/vnd.docker.plugins.v1.2+json\r\n\r\n{}")
    assert response(400, b"no", False).endswith(b"Connection: close\r\n\r\nno")


# -- the worker under gunicorn -------------------------------------------------------------


def test_an_idle_connection_gives_up_after_its_timeout_without_a_python_timeout():
    a, b = socket.socketpair()
    try:
        idle_timeout(b, 0.2)
        assert b.gettimeout() is None  # blocking: no poll before each call
        a.sendall(b"x")
        assert b.recv(1) == b"x"  # control: data within the timeout is read
        t0 = time.monotonic()
        with pytest.raises(OSError):  # what _serve closes the connection on
            b.recv(1)
        assert 0.15 <= time.monotonic() - t0 < 5
    finally:
        a.close()
        b.close()


def _exchange(sock: socket.socket, raw: bytes) -> tuple[int, dict, bytes]:
    sock.sendall(raw)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    n = int(headers[b"content-length"])
    while len(rest) < n:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


@pytest.fixture
def plugin(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the break-glass key file must be owned by root")
    """fdcs-authz (two workers of this worker class) on a unix socket; no
    Redis, no Keystone: decisions that need them deny, which is all these
    tests need (and the break-glass admin key allows without either)."""
    key = tmp_path / "admin.key"
    key.write_text(uuid.uuid4().hex * 2)
    key.chmod(0o600)
    sock = tmp_path / "p.sock"
    (tmp_path / "fdcs.toml").write_text(f"""
[keystone]
url = "http://127.0.0.1:1/v3"
admin_project_id = "adm"
admin_key_file = "{key}"
[redis]
url = "redis://127.0.0.1:1/0"
timeout = 0.5
[plugin]
socket = "{sock}"
workers = 2
threads = 4
metrics_listen = ""
""")
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "authz_plugin.server", "--config", str(tmp_path / "fdcs.toml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"),
                            start_new_session=True)
    try:
        from authz_plugin.devstack._procs import unix_http
        from tests.unit.test_proxy import wait_until
        wait_until(lambda: (unix_http(str(sock), "POST", "/Plugin.Activate", body=b"") or (0,))[0] == 200,
                   what="the plugin to answer")
        yield sock, key.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_worker_answers_kept_alive_connections_and_refuses_malformed_requests(plugin):
    sock_path, admin_key = plugin
    admin = json.dumps({"RequestMethod": "GET", "RequestUri": "/v1.41/info",
                        "RequestHeaders": {"X-FDCS-Admin-Key": admin_key}}).encode()
    anon = json.dumps({"RequestMethod": "GET", "RequestUri": "/v1.41/info", "RequestHeaders": {}}).encode()
    conns = [socket.socket(socket.AF_UNIX) for _ in range(6)]  # more than one worker's threads
    try:
        for c in conns:
            c.connect(str(sock_path))
        for _ in range(3):  # each connection kept alive over several requests
            for c in conns:
                status, headers, body = _exchange(c, post(body=admin))
                assert status == 200 and headers[b"content-type"] == b"application/vnd.docker.plugins.v1.2+json"
                assert json.loads(body) == {"Allow": True}
                status, _, body = _exchange(c, post(body=anon))
                assert status == 200 and json.loads(body)["Allow"] is False
        c = conns[0]
        status, _, body = _exchange(c, post(body=b""))  # the engine's retry with a drained body
        assert status == 200 and "restarted" in json.loads(body)["Msg"]
        status, _, _ = _exchange(c, post(b"/metrics", b""))
        assert status == 404
        status, headers, _ = _exchange(c, post(body=admin, extra=b"Content-Length: 1\r\n"))
        assert status == 400 and headers[b"connection"] == b"close"
        assert c.recv(1) == b""  # and the connection is closed
    finally:
        for c in conns:
            c.close()


# -- the response hook's read-only short cut (authz_plugin.app.reads_only) -------------------


def _go_payload(method: str, uri: str = "/v1.41/containers/json", user: str = "", **rest) -> bytes:
    """A payload as moby marshals it: fields in declaration order, empty ones omitted."""
    fields = {"User": user, "UserAuthNMethod": "TLS" if user else "", "RequestMethod": method, "RequestUri": uri,
              **rest}
    return json.dumps({k: v for k, v in fields.items() if v}, separators=(",", ":")).encode()


@pytest.mark.parametrize("method, expected", [("GET", True), ("HEAD", True), ("POST", False), ("DELETE", False),
                                              ("PUT", True), ("get", True)])
def test_reads_only_follows_the_response_hooks_rule(method, expected):
    from authz_plugin.app import reads_only
    body = _go_payload(method, ResponseStatusCode=200, ResponseBody="eyJhIjoxfQ==")
    assert reads_only(body) is expected
    assert reads_only(_go_payload(method, user='cn="x\\"y"')) is expected  # a client certificate's user


def test_reads_only_never_guesses():
    from authz_plugin.app import reads_only
    # a POST whose URI or body quotes a GET is still a POST
    assert not reads_only(_go_payload("POST", uri='/v1.41/containers/create?x="RequestMethod":"GET"'))
    assert not reads_only(b"")  # the engine's retry: decoded, and denied as such
    assert not reads_only(b'{"RequestUri":"/x","RequestMethod":"GET"}')  # not the engine's order: decode it
    assert not reads_only(b' {"RequestMethod":"GET"}')
    assert not reads_only(b'{"RequestMethod":"GE\\"T"}')


def test_the_short_cut_answers_what_the_authorizer_answers(store):
    from authz_plugin.app import Hooks
    from authz_plugin.policy import Authorizer
    from .conftest import FakeIdentityService, cfg
    hooks = Hooks(cfg(), Authorizer(cfg(), FakeIdentityService(), store))
    for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
        body = _go_payload(method, ResponseStatusCode=200, ResponseBody="eyJhIjoxfQ==",
                           RequestHeaders={"X-Auth-Token": "tok-alice"})
        fast = json.loads(hooks.call("/AuthZPlugin.AuthZRes", body))
        slow = hooks.authorizer().authz_response(json.loads(body))
        assert fast == slow, method
