"""Security corpus, part 2: the name scoper's transport (issue 7).

What a tenant can do with the bytes of HTTP/1.1 itself, on raw TLS sockets
to host 1's scoper (the stack's CA and client pair from DOCKER_CERT_PATH):
request smuggling (``Content-Length`` with ``Transfer-Encoding``, two
``Content-Length``s, obsolete line folding), a request pipelined behind an
attach that hijacks the connection, keep-alive across tenants, and CR/LF
header injection.

These cases are about the scoper's parser, so they are scoper-only -- with
one exception: keep-alive across tenants also runs on the engine socket
(plugin alone), where it is just as much a question of "whose request is
this".  Every refusal has a positive control beside it: the same bytes
without the forbidden part are served.

The raw-wire helpers here (:class:`Wire`, :func:`http`, :func:`user_headers`)
are also used by ``test_identity.py`` and ``test_control_plane.py``.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

TIMEOUT = 30
T = "org.fiware.fdcs.tenant"
A1, A2, B1, READER, ADMIN = ("FDCS_CONFIG_A1", "FDCS_CONFIG_A2", "FDCS_CONFIG_B1",
                             "FDCS_CONFIG_A_READER", "FDCS_CONFIG_ADMIN")
V = "/v1.41"
MODES = ("plugin", "scoper")


def uniq(prefix: str = "s") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


# -- the wire -------------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    head: bytes  # the raw head, status line included

    def json(self):
        return json.loads(self.body)

    @property
    def message(self) -> str:
        try:
            return str(self.json().get("message", ""))
        except ValueError:
            return self.body.decode("latin-1")


def user_headers(stack, user: str) -> list[tuple[str, str]]:
    """The ``HttpHeaders`` of a demo user's docker config dir (what the CLI sends)."""
    cfg = json.loads((Path(stack.env[user]) / "config.json").read_text())
    return list(cfg["HttpHeaders"].items())


def http(method: str, target: str, headers=(), body: bytes | str | dict = b"", *,
         length: bool = True) -> bytes:
    """One request by hand.  ``headers``: pairs (a name may repeat) or a dict;
    ``length``: add ``Content-Length`` for a body (and for POST/PUT)."""
    if isinstance(body, dict):
        body = json.dumps(body)
        headers = [*(headers.items() if isinstance(headers, dict) else headers),
                   ("Content-Type", "application/json")]
    if isinstance(body, str):
        body = body.encode()
    pairs = list(headers.items() if isinstance(headers, dict) else headers)
    if length and (body or method in ("POST", "PUT")):
        pairs.append(("Content-Length", str(len(body))))
    head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs)
    return (head + "\r\n").encode("latin-1") + body


class Wire:
    """One raw connection to the scoper (TLS) or to the engine (unix socket):
    bytes out, HTTP/1.1 replies (or raw stream bytes) in."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.eof = False

    @classmethod
    def scoper(cls, stack, host: str | None = None) -> "Wire":
        certs = stack.certs
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.load_cert_chain(str(certs / "cert.pem"), str(certs / "key.pem"))
        addr, port = (host or stack.env["FDCS_DOCKER_HOST"]).removeprefix("tcp://").rsplit(":", 1)
        raw = socket.create_connection((addr, int(port)), timeout=TIMEOUT)
        return cls(ctx.wrap_socket(raw, server_hostname=addr))

    @classmethod
    def engine(cls, stack, host: str | None = None) -> "Wire":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect((host or stack.env["FDCS_ENGINE_HOSTS"].split()[0]).removeprefix("unix://"))
        return cls(s)

    @classmethod
    def to(cls, stack, mode: str) -> "Wire":
        return cls.scoper(stack) if mode == "scoper" else cls.engine(stack)

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed {n - len(self.buf)} bytes short")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed in a line: {self.buf!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        """The next response (a 1xx/101 head has no body)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before a response head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        body = b""
        if status >= 200 and not (status == 200 and "docker.raw-stream" in headers.get("content-type", "")
                                  and "content-length" not in headers):
            if headers.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self._line().split(b";")[0], 16)
                    if size == 0:
                        while self._line():
                            pass
                        break
                    parts.append(self._take(size))
                    self._line()
                body = b"".join(parts)
            elif "content-length" in headers:
                body = self._take(int(headers["content-length"]))
            elif status not in (204, 304):
                while self._fill():
                    pass
                body, self.buf = self.buf, b""
        return Reply(status, headers, body, head + b"\r\n\r\n")

    def request(self, *args, **kw) -> Reply:
        self.send(http(*args, **kw))
        return self.reply()

    def stdout_until(self, needle: bytes, timeout: float = TIMEOUT) -> bytes:
        """A hijacked stream without a tty is multiplexed (8-byte frame
        heads: stream 1 or 2, three zero bytes, a big-endian length): the
        payloads up to one that completes ``needle``.  Anything that is not a
        frame (an HTTP answer, say) fails."""
        deadline = time.monotonic() + timeout
        out = b""
        while needle not in out:
            while len(self.buf) < 8 or len(self.buf) < 8 + int.from_bytes(self.buf[4:8], "big"):
                self.sock.settimeout(max(0.1, deadline - time.monotonic()))
                if time.monotonic() > deadline or not self._fill():
                    raise AssertionError(f"no {needle!r} in the stream; got {out!r} + {self.buf!r}")
            assert self.buf[0] in (1, 2) and self.buf[1:4] == b"\0\0\0", f"not a stream frame: {self.buf[:64]!r}"
            size = int.from_bytes(self.buf[4:8], "big")
            out += self.buf[8:8 + size]
            self.buf = self.buf[8 + size:]
        self.sock.settimeout(TIMEOUT)
        return out

    def closed_by_peer(self, timeout: float = 10) -> bool:
        """True once the peer has closed (what it still sent is kept in ``buf``)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except (socket.timeout, TimeoutError):
            return False
        finally:
            self.sock.settimeout(TIMEOUT)
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- fixtures -------------------------------------------------------------------------------


def admin_names(stack, fragment: str) -> list[str]:
    """Names of every container on host 1 whose name holds ``fragment``
    (the admin's view, straight on the engine)."""
    out = stack.cli(ADMIN)("ps", "-a", "--format", "{{.Names}}", "--filter", f"name={fragment}").stdout
    return out.split()


@pytest.fixture(scope="module")
def markers(stack, scoper):
    """One container per tenant, named after it, made through the scoper:
    which of them a container list shows says whose list it is."""
    made = {"a": uniq("mark-a-"), "b": uniq("mark-b-")}
    clis = {"a": stack.scoper_cli(A1), "b": stack.scoper_cli(B1)}
    try:
        for k, name in made.items():
            clis[k]("create", "--name", name, "busybox", "true")
        yield made
    finally:
        for k, name in made.items():
            clis[k]("rm", "-f", name, check=False)
        tenants = {"a": stack.env["FDCS_TENANT_A"], "b": stack.env["FDCS_TENANT_B"]}
        stack.cli(ADMIN)("rm", "-f", *(f"{tenants[k]}_{n}" for k, n in made.items()), check=False)


@pytest.fixture(scope="module")
def catter(stack, scoper):
    """alice's ``cat`` with stdin open: what reaches its stdin comes back on its stdout."""
    name = uniq("cat-")
    alice = stack.scoper_cli(A1)
    try:
        alice("run", "-d", "-i", "--name", name, "busybox", "cat")
        yield name
    finally:
        alice("rm", "-f", name, check=False)
        stack.cli(ADMIN)("rm", "-f", f"{stack.env['FDCS_TENANT_A']}_{name}", check=False)


def _create(name: str) -> tuple[str, bytes]:
    return f"{V}/containers/create?name={name}", json.dumps({"Image": "busybox", "Cmd": ["true"]}).encode()


def _cleanup(stack, *fragments: str) -> None:
    for f in fragments:
        names = admin_names(stack, f)
        if names:
            stack.cli(ADMIN)("rm", "-f", *names, check=False)


# -- smuggling ------------------------------------------------------------------------------


def _smuggling_cases(body: bytes) -> dict[str, bytes]:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return {
        # each framing header alone is fine (the controls below); together they are a desync
        "cl-then-te": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        "te-then-cl": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + chunked,
        "two-content-lengths": b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n%s" % (len(body), body),
        "content-length-list": b"Content-Length: %d, 5\r\n\r\n%s" % (len(body), body),
        # a folded line (obs-fold) that some parsers join and others split
        "folded-transfer-encoding": b"Content-Length: %d\r\nX-Pad: a\r\n Transfer-Encoding: chunked\r\n\r\n%s"
                                    % (len(body), body),
    }


@pytest.mark.parametrize("case", sorted(_smuggling_cases(b"")))
def test_smuggling_is_refused_and_nothing_reaches_the_engine(stack, scoper, case):
    auth = user_headers(stack, A1)
    name = uniq("smug-")
    target, body = _create(name)
    head = http("POST", target, [*auth, ("Content-Type", "application/json")], length=False)[:-2]
    try:
        with Wire.scoper(stack) as w:
            w.send(head + _smuggling_cases(body)[case])
            r = w.reply()
            assert r.status == 400, (r.status, r.body)
            assert "not accepted" in r.message or "Content-Length" in r.message, r.message
            assert w.closed_by_peer(), "the connection must end after a framing error"
        assert admin_names(stack, name) == [], "a refused request created a container"
        # positive controls: the same body framed one way, then the other, is served
        for framing in (b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
                        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)):
            with Wire.scoper(stack) as w:
                w.send(head + framing)
                r = w.reply()
                assert r.status == 201, (r.status, r.body)
            assert admin_names(stack, name) == [f"{stack.env['FDCS_TENANT_A']}_{name}"]
            stack.scoper_cli(A1)("rm", name)
    finally:
        _cleanup(stack, name)


def test_obsolete_line_folding_is_refused(stack, scoper):
    auth = user_headers(stack, A1)
    token = dict(auth)["X-Auth-Token"]
    target = f"{V}/containers/json"
    lines = "".join(f"{k}: {v}\r\n" for k, v in auth).encode()
    for folded in (
        # the token itself on a continuation line
        b"X-Auth-Token:\r\n " + token.encode() + b"\r\n",
        # a harmless header folded onto a second line
        lines + b"X-Pad: a\r\n\tb\r\n",
    ):
        with Wire.scoper(stack) as w:
            w.send(f"GET {target} HTTP/1.1\r\nHost: docker\r\n".encode() + folded + b"\r\n")
            r = w.reply()
            assert r.status == 400 and "line folding" in r.message, (r.status, r.body)
    with Wire.scoper(stack) as w:  # positive control: the same headers unfolded
        assert w.request("GET", target, [*auth, ("X-Pad", "a b")]).status == 200


# -- a request behind a hijack -----------------------------------------------------------------


@pytest.mark.parametrize("upgrade", [True, False], ids=["101-upgrade", "200-raw-stream"])
def test_a_request_pipelined_behind_an_attach_is_stdin_not_http(stack, scoper, catter, upgrade):
    """bob's create request, sent on alice's attach connection (in the same
    write as the attach, and again once the stream is up), is bytes for
    alice's container's stdin: ``cat`` echoes it back, no HTTP answer comes,
    and no container is made.  Control: the same bytes on their own
    connection are a request the scoper serves as bob."""
    alice, bob = user_headers(stack, A1), user_headers(stack, B1)
    name = uniq("behind-")
    target, body = _create(name)
    smuggled = http("POST", target, [*bob, ("Content-Type", "application/json")], body)
    extra = [("Connection", "Upgrade"), ("Upgrade", "tcp")] if upgrade else []
    attach = http("POST", f"{V}/containers/{catter}/attach?stream=1&stdin=1&stdout=1&stderr=1",
                  [*alice, *extra])
    try:
        with Wire.scoper(stack) as w:
            w.send(attach + smuggled)
            r = w.reply()
            assert r.status == (101 if upgrade else 200), (r.status, r.head)
            assert "docker.raw-stream" in r.headers.get("content-type", "")
            # echoed by cat: it went to stdin (and nothing but frames came back)
            assert w.stdout_until(smuggled) == smuggled
            w.send(smuggled)  # once more, now that the stream is up
            assert w.stdout_until(smuggled) == smuggled
        assert admin_names(stack, name) == [], "a request behind a hijack was served"
        with Wire.scoper(stack) as w:  # control: on its own, it is bob's request
            assert w.request("POST", target, [*bob, ("Content-Type", "application/json")], body).status == 201
        assert admin_names(stack, name) == [f"{stack.env['FDCS_TENANT_B']}_{name}"]
    finally:
        _cleanup(stack, name)


# -- keep-alive across tenants -----------------------------------------------------------------


def _list_target(stack, mode: str, tenant_key: str | None) -> str:
    if mode == "scoper" or tenant_key is None:
        return f"{V}/containers/json?all=1"
    flt = json.dumps({"label": [f"{T}={stack.env[tenant_key]}"]})
    return f"{V}/containers/json?all=1&filters={urllib.parse.quote(flt)}"


def _names(reply: Reply) -> set[str]:
    return {n.lstrip("/").split("_", 1)[-1] for c in reply.json() for n in c["Names"]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
def test_each_request_on_a_kept_alive_connection_is_its_own_identity(stack, scoper, markers, mode, pipelined):
    """alice, then bob, then nobody, then alice again on ONE connection:
    each request acts as its own headers say (the engine's plugin-only
    clients must name their tenant's label in the filter, so there bob also
    asks for tenant-a's list once: refused)."""
    alice, bob = user_headers(stack, A1), user_headers(stack, B1)
    steps = [(alice, "FDCS_TENANT_A"), (bob, "FDCS_TENANT_B"), (bob, "FDCS_TENANT_A"), ([], "FDCS_TENANT_A"),
             (alice, "FDCS_TENANT_A")]
    reqs = [http("GET", _list_target(stack, mode, t), h) for h, t in steps]
    with Wire.to(stack, mode) as w:
        if pipelined:
            w.send(b"".join(reqs))
            replies = [w.reply() for _ in reqs]
        else:
            replies = []
            for r in reqs:
                w.send(r)
                replies.append(w.reply())
    a, b, b_on_a, nobody, a_again = replies
    assert a.status == 200 and markers["a"] in _names(a) and markers["b"] not in _names(a), a.body
    assert b.status == 200 and markers["b"] in _names(b) and markers["a"] not in _names(b), b.body
    assert a_again.status == 200 and _names(a_again) == _names(a)
    assert nobody.status in (401, 403) and "X-Auth-Token is missing" in nobody.message, nobody.body
    if mode == "scoper":
        # the scoper filters by the caller's tenant, whatever the query says
        assert b_on_a.status == 200 and markers["a"] not in _names(b_on_a), b_on_a.body
    else:
        assert b_on_a.status == 403 and "tenant label" in b_on_a.message, b_on_a.body


# -- CR/LF injection ------------------------------------------------------------------------------


def test_a_bare_cr_in_a_header_value_is_refused(stack, scoper):
    """``X-Auth-TenantId: <a>\\rX-Auth-TenantId: <b>`` -- a parser that took
    the bare CR for a line end would see a second tenant header."""
    auth = dict(user_headers(stack, A1))
    ta, tb = stack.env["FDCS_TENANT_A"], stack.env["FDCS_TENANT_B"]
    for value in (f"{ta}\rX-Auth-TenantId: {tb}", f"{ta}\rX-Request-Id: injected", f"{ta}\x00"):
        with Wire.scoper(stack) as w:
            r = w.request("GET", f"{V}/containers/json", {"X-Auth-Token": auth["X-Auth-Token"],
                                                          "X-Auth-TenantId": value})
            assert r.status == 400 and "bad request" in r.message, (value, r.status, r.body)
            assert r.headers.get("x-request-id") != "injected"
    with Wire.scoper(stack) as w:  # positive control
        assert w.request("GET", f"{V}/containers/json", auth).status == 200


def test_encoded_crlf_in_the_target_never_becomes_a_header(stack, scoper):
    """A percent-encoded CR LF never becomes a line of the request the engine
    gets: in a name the scoper rewrites it is refused as an invalid name
    (nothing created, nothing injected into the answer); in a parameter the
    scoper passes on it is re-encoded -- an injected ``X-Auth-TenantId`` of
    tenant-b would have made the plugin refuse alice (the calibration: a
    real second header does), and the request is served as alice's."""
    auth = user_headers(stack, A1)
    tb = stack.env["FDCS_TENANT_B"]
    name = uniq("crlf-")
    body = json.dumps({"Image": "busybox", "Cmd": ["true"]}).encode()
    try:
        for evil in (f"{name}%0d%0aX-Auth-TenantId:%20{tb}", f"{name}%0d%0a%0d%0aGET%20/_ping%20HTTP/1.1",
                     f"{name}%0aX-Injected:%201"):
            with Wire.scoper(stack) as w:
                r = w.request("POST", f"{V}/containers/create?name={evil}",
                              [*auth, ("Content-Type", "application/json")], body)
                assert r.status == 400 and "invalid name" in r.message.lower(), (evil, r.status, r.body)
                assert "x-injected" not in r.headers and "x-auth-tenantid" not in r.headers
        assert admin_names(stack, name) == []
        with Wire.scoper(stack) as w:
            r = w.request("GET", f"{V}/containers/json?all=1&x=1%0d%0aX-Auth-TenantId:%20{tb}", auth)
            assert r.status == 200, r.body
            r = w.request("GET", f"{V}/containers/json?all=1", [*auth, ("X-Auth-TenantId", tb)])
            assert r.status == 401 and "X-Auth-TenantId" in r.message, r.body
        with Wire.scoper(stack) as w:  # positive control: the plain name
            r = w.request("POST", f"{V}/containers/create?name={name}",
                          [*auth, ("Content-Type", "application/json")], body)
            assert r.status == 201, r.body
    finally:
        _cleanup(stack, name)


def test_a_request_id_is_echoed_only_when_it_is_sane(stack, scoper):
    """X-Request-Id is the one client header the scoper writes back: a value
    that could carry anything else is replaced, never reflected."""
    auth = user_headers(stack, A1)
    for rid in ("abc%0d%0aSet-Cookie:%20x=1", "abc def", "a" * 65, "abc\tSet-Cookie: x"):
        with Wire.scoper(stack) as w:
            r = w.request("GET", f"{V}/_ping", [*auth, ("X-Request-Id", rid)])
            assert r.status == 200 and r.headers["x-request-id"] != rid and "set-cookie" not in r.headers, r.head
    with Wire.scoper(stack) as w:  # positive control: a sane id comes back as sent
        r = w.request("GET", f"{V}/_ping", [*auth, ("X-Request-Id", "trace-42.a:b")])
        assert r.status == 200 and r.headers["x-request-id"] == "trace-42.a:b"
