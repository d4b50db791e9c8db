"""The plugin worker's request reader with its remembered heads
(``worker._HEADS``) and its one-copy body reads the same requests, and
refuses the same ones with the same status and reason, as the reader it
replaces (below: the same head rules, ``worker.read_head``, every time,
and the body copied as before), whatever the heads seen before and however
the bytes arrive."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from authz_plugin import worker
from authz_plugin.worker import MAX_BODY, BadRequest, Conn


class _Reference(Conn):
    """``Conn.read`` without the remembered heads and with the body copied
    out of the buffer as before: every head through :func:`worker.read_head`
    (the head rules, moved there unchanged)."""

    def read(self):
        end = self.head_end()
        if end is None:
            return None
        head, self.buf = self.buf[:end], self.buf[end + 4:]
        path, length, chunked, keep = worker.read_head(head)
        body = self._chunked() if chunked else self._exactly(length or 0)
        return path, body, keep


class _Pieces:
    """A socket that hands out ``data`` in the given pieces, then EOF."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def recv(self, n):
        return self.pieces.pop(0) if self.pieces else b""


def _all(conn_cls, pieces):
    conn = conn_cls(_Pieces(pieces))
    out = []
    while True:
        try:
            r = conn.read()
        except BadRequest as e:
            out.append(("refused", e.status, str(e)))
            return out
        out.append(r)
        if r is None:
            return out


_ENGINE = [b"Host: plugin", b"User-Agent: Go-http-client/1.1", b"Accept: application/vnd.docker.plugins.v1.2+json",
           b"Accept-Encoding: gzip"]
_LINES = st.sampled_from([
    b"Connection: close", b"Connection: keep-alive", b"connection: Keep-Alive, x", b"Transfer-Encoding: chunked",
    b"transfer-encoding: gzip", b"Content-Length: 5", b"content-length:  3 ", b"Content-Length: -1",
    b"Content-Length: x", b" folded", b"NoColon", b": empty", b"X-A : b", b"Content-Type: application/json",
])


@st.composite
def _requests(draw):
    body = draw(st.binary(max_size=40))
    method = draw(st.sampled_from([b"POST", b"POST", b"POST", b"GET"]))
    path = draw(st.sampled_from([b"/AuthZPlugin.AuthZReq", b"/AuthZPlugin.AuthZRes", b"/Plugin.Activate", b"x"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2"]))
    lines = [method + b" " + path + b" " + version, *_ENGINE]
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "odd"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
    lines += draw(st.lists(_LINES, max_size=2))
    if framing == "chunked":
        payload = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    elif framing == "none":
        payload = b""
    else:
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


@settings(max_examples=600, deadline=None)
@given(reqs=st.lists(_requests(), min_size=1, max_size=4), cuts=st.lists(st.integers(0, 400), max_size=4),
       warm=st.booleans())
def test_the_reader_reads_and_refuses_what_the_reference_did(reqs, cuts, warm):
    data = b"".join(reqs)
    bounds = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    if not warm:
        worker._HEADS.clear()
    want = _all(_Reference, pieces)
    assert _all(Conn, pieces) == want
    assert _all(Conn, pieces) == want  # with every head of these now remembered


def test_remembered_heads_are_bounded_and_refusals_never_remembered(monkeypatch):
    monkeypatch.setattr(worker, "_HEADS", {})
    monkeypatch.setattr(worker, "_HEADS_MAX", 4)
    for n in range(10):
        body = b"x" * n
        req = b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % n + body
        assert Conn(_Pieces([req])).read() == (b"/AuthZPlugin.AuthZReq", body, True)
        assert 1 <= len(worker._HEADS) <= 4
    bad = b"GET /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    for _ in range(2):
        with pytest.raises(BadRequest) as e:
            Conn(_Pieces([bad])).read()
        assert e.value.status == 405
    assert bad[:-4] not in worker._HEADS
    big = b"POST /x HTTP/1.1\r\nX-Pad: " + b"p" * 2000 + b"\r\nContent-Length: 1\r\n\r\nz"
    assert Conn(_Pieces([big])).read() == (b"/x", b"z", True)
    assert all(len(h) <= worker._HEAD_MEMO_MAX for h in worker._HEADS)


def test_a_body_beyond_the_limit_is_refused_whatever_is_buffered():
    head = b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    for body in (b"x" * 10, b"x" * (MAX_BODY + 1)):  # more to come; all of it already buffered
        for _ in range(2):  # the second time with the head remembered
            with pytest.raises(BadRequest) as e:
                Conn(_Pieces([head + body])).read()
            assert e.value.status == 413
    ok = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    assert Conn(_Pieces([ok])).read() == (b"/x", b"abc", True)  # positive control
