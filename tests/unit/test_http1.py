"""name_scoper.http1: the proxy's HTTP/1.1 parser and serializer.

Its refusals (request smuggling and malformed heads), its framing, and --
with h11 as the oracle -- that it reads what a mature parser reads."""

from __future__ import annotations

import h11
import pytest

from name_scoper import http1


def server() -> http1.Connection:
    return http1.Connection(http1.SERVER, max_incomplete_event_size=64 * 1024)


def events(conn: http1.Connection, data: bytes, eof: bool = False) -> list:
    """Every event ``data`` gives (fed in one piece), up to NEED_DATA/PAUSED."""
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out = []
    while True:
        ev = conn.next_event()
        if ev is http1.NEED_DATA or ev is http1.PAUSED:
            return out
        out.append(ev)
        if type(ev) is http1.ConnectionClosed:
            return out


def body_of(evs) -> bytes:
    return b"".join(e.data for e in evs if type(e) is http1.Data)


GET = b"GET /v1.41/containers/json HTTP/1.1\r\nHost: docker\r\nX-Auth-Token: tok\r\n\r\n"


def test_a_request_and_its_end():
    c = server()
    req, end = events(c, GET)
    assert (req.method, req.target, req.http_version) == (b"GET", b"/v1.41/containers/json", b"1.1")
    assert list(req.headers) == [(b"host", b"docker"), (b"x-auth-token", b"tok")]
    assert req.headers.raw_items() == [(b"Host", b"docker"), (b"X-Auth-Token", b"tok")]
    assert type(end) is http1.EndOfMessage
    assert c.their_state is http1.DONE and c.our_state is http1.SEND_RESPONSE


def test_pipelined_requests_wait_for_the_next_cycle():
    c = server()
    evs = events(c, GET + GET.replace(b"json", b"xyz"))
    assert len(evs) == 2 and c.next_event() is http1.PAUSED
    assert c.trailing_data[0].startswith(b"GET /v1.41/containers/xyz")
    c.send(http1.Response(status_code=200, headers=[(b"content-length", b"0")]))
    c.send(http1.EndOfMessage())
    c.start_next_cycle()
    req, _ = events(c, b"")
    assert req.target == b"/v1.41/containers/xyz"


REFUSED = {
    "obs-fold": (GET[:-2] + b"X-Pad: a\r\n b\r\n\r\n", 400, "line folding"),
    "two equal content-lengths": (b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
                                  400, "more than one Content-Length"),
    "content-length list": (b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: 2, 2\r\n\r\n{}", 400,
                            "more than one Content-Length"),
    "cl and te": (b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                  400, "together with Transfer-Encoding"),
    "te and cl": (b"POST / HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
                  400, "together with Transfer-Encoding"),
    "te gzip": (b"POST / HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "chunked"),
    "two te headers": (b"POST / HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n", 501, "chunked"),
    "space before colon": (b"GET / HTTP/1.1\r\nHost: d\r\nX-Auth-Token : t\r\n\r\n", 400, "illegal header"),
    "bare cr in a value": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\rX-B: b\r\n\r\n", 400, "illegal header"),
    "nul in a value": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\x00b\r\n\r\n", 400, "illegal header"),
    "ctl in a value": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\x01b\r\n\r\n", 400, "illegal header"),
    "no host": (b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n", 400, "Host"),
    "negative length": (b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    "plus length": (b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: +1\r\n\r\nx", 400, "Content-Length"),
    "http/2": (b"GET / HTTP/2.0\r\nHost: d\r\n\r\n", 400, "request line"),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: d\r\n\r\n", 400, "request line"),
    "no version": (b"GET /\r\nHost: d\r\n\r\n", 400, "request line"),
    # as h11 and Go's server: no empty line before the request line
    "empty line first": (b"\r\nGET / HTTP/1.1\r\nHost: d\r\n\r\n", 400, "request line"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_heads(case):
    data, status, words = REFUSED[case]
    c = server()
    with pytest.raises(http1.RemoteProtocolError) as e:
        events(c, data)
    assert e.value.error_status_hint == status and words in str(e.value)
    assert c.their_state is http1.ERROR
    assert b"a\x00b" not in str(e.value).encode() and b"tok" not in str(e.value).encode()


def test_the_refused_heads_controls_are_served():
    """Positive controls of the refusals: the same requests, well formed."""
    for data in (GET[:-2] + b"X-Pad: a b\r\n\r\n",
                 b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\n\r\n{}",
                 b"POST / HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                 b"POST / HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: Chunked \r\n\r\n0\r\n\r\n",
                 b"GET / HTTP/1.0\r\nX-A: a\tb\x80\r\n\r\n"):
        evs = events(server(), data)
        assert type(evs[0]) is http1.Request and type(evs[-1]) is http1.EndOfMessage


def test_a_head_trickled_byte_by_byte_reads_as_a_whole_one():
    """The end of a head is found whichever byte completes it (the search
    resumes where the last one stopped, less what could begin the end)."""
    for data in (GET, GET.replace(b"\r\n", b"\n"), b"GET / HTTP/1.1\r\nHost: d\r\nX: " + b"a" * 3000 + b"\r\n\r\n"):
        c = server()
        evs = []
        for i in range(len(data)):
            evs += events(c, data[i:i + 1])
            if i < len(data) - 1:
                assert not evs, i
        assert type(evs[0]) is http1.Request and type(evs[-1]) is http1.EndOfMessage
        assert list(evs[0].headers) == list(events(server(), data)[0].headers)


def test_a_head_over_the_limit_is_431():
    c = http1.Connection(http1.SERVER, max_incomplete_event_size=1024)
    with pytest.raises(http1.RemoteProtocolError) as e:
        events(c, b"GET / HTTP/1.1\r\nHost: d\r\nX-Pad: " + b"a" * 2000)
    assert e.value.error_status_hint == 431
    assert type(events(http1.Connection(http1.SERVER, max_incomplete_event_size=1024),
                       b"GET / HTTP/1.1\r\nHost: d\r\nX-Pad: " + b"a" * 900 + b"\r\n\r\n")[0]) is http1.Request


CHUNKED_HEAD = b"POST /x HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("body", [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"A\r\n0123456789\r\n1\r\n!\r\n0\r\n\r\n",
])
def test_chunked_bodies_read_the_same_fed_whole_or_byte_by_byte(body):
    whole = events(server(), CHUNKED_HEAD + body)
    c = server()
    pieces = events(c, CHUNKED_HEAD)
    for i in range(len(body)):
        pieces += events(c, body[i:i + 1])
    expected = h11.Connection(h11.SERVER)
    expected.receive_data(CHUNKED_HEAD + body)
    want = b""
    while type(ev := expected.next_event()) is not h11.EndOfMessage:
        if type(ev) is h11.Data:
            want += ev.data
    assert body_of(whole) == body_of(pieces) == want
    assert type(whole[-1]) is http1.EndOfMessage and type(pieces[-1]) is http1.EndOfMessage


@pytest.mark.parametrize("bad", [b"zz\r\nab\r\n0\r\n\r\n", b"2\r\nabXX0\r\n\r\n", b"2\nab\r\n0\r\n\r\n",
                                 b"-2\r\nab\r\n0\r\n\r\n", b"2 \r\nab\r\n0\r\n\r\n",
                                 b"11111111111111111\r\n"])
def test_malformed_chunks_are_refused(bad):
    c = server()
    with pytest.raises(http1.RemoteProtocolError):
        events(c, CHUNKED_HEAD + bad)


def test_a_body_cut_short_by_eof_is_an_error_not_an_end():
    c = server()
    with pytest.raises(http1.RemoteProtocolError):
        events(c, b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    c = server()
    with pytest.raises(http1.RemoteProtocolError):
        events(c, CHUNKED_HEAD + b"5\r\nhel", eof=True)
    assert type(events(server(), b"", eof=True)[0]) is http1.ConnectionClosed


def test_expect_100_continue_is_tracked_until_answered():
    c = server()
    events(c, b"POST / HTTP/1.1\r\nHost: d\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert c.they_are_waiting_for_100_continue
    assert c.send(http1.InformationalResponse(status_code=100, headers=[])).startswith(b"HTTP/1.1 100 ")
    assert not c.they_are_waiting_for_100_continue
    assert body_of(events(c, b"abc")) == b"abc" and c.their_state is http1.DONE


def respond(request: bytes, headers, body: bytes = b"", status: int = 200) -> tuple[bytes, http1.Connection]:
    c = server()
    events(c, request)
    out = c.send(http1.Response(status_code=status, reason=b"OK", headers=headers))
    if body:
        out += c.send(http1.Data(data=body))
    out += c.send(http1.EndOfMessage())
    return out, c


def test_response_framing_chosen_as_h11_does():
    out, c = respond(GET, [(b"content-type", b"text/plain")], b"abc")
    assert out == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\n\r\n")
    assert c.our_state is http1.DONE and c.their_state is http1.DONE
    out, c = respond(GET, [(b"content-length", b"3")], b"abc")
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc" and c.our_state is http1.DONE
    # HTTP/1.0 client: no chunked; the end is the connection's
    out, c = respond(b"GET / HTTP/1.0\r\n\r\n", [], b"abc")
    assert out == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc" and c.our_state is http1.MUST_CLOSE
    # the client said close: so do we, once
    out, c = respond(GET[:-2] + b"Connection: close\r\n\r\n", [(b"content-length", b"0"),
                                                              (b"connection", b"close")])
    assert out.count(b"connection: close") == 1 and c.our_state is http1.MUST_CLOSE
    # HEAD: the GET's headers, no body
    out, c = respond(GET.replace(b"GET", b"HEAD"), [(b"content-length", b"42")])
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n" and c.our_state is http1.DONE


def test_what_this_side_may_not_send():
    c = server()
    events(c, GET)
    with pytest.raises(http1.LocalProtocolError):
        c.send(http1.Response(status_code=200, headers=[(b"x-a", b"a\r\nx-b: b")]))
    c = server()
    events(c, GET)
    c.send(http1.Response(status_code=200, headers=[(b"content-length", b"2")]))
    with pytest.raises(http1.LocalProtocolError):
        c.send(http1.Data(data=b"abc"))
    c = http1.Connection(http1.CLIENT)
    with pytest.raises(http1.LocalProtocolError):
        c.send(http1.Request(method="GET", target="/a b", headers=[(b"host", b"d")]))


def client(request_headers=((b"host", b"docker"),), method="GET") -> http1.Connection:
    c = http1.Connection(http1.CLIENT, max_incomplete_event_size=64 * 1024)
    assert c.send(http1.Request(method=method, target="/x", headers=list(request_headers))).startswith(
        method.encode() + b" /x HTTP/1.1\r\nhost: docker\r\n")
    c.send(http1.EndOfMessage())
    return c


def test_engine_responses_in_each_framing():
    c = client()
    evs = events(c, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert evs[0].status_code == 200 and body_of(evs) == b"abc" and type(evs[-1]) is http1.EndOfMessage
    c = client()
    evs = events(c, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n2\r\nbc\r\n0\r\n\r\n")
    assert body_of(evs) == b"abc" and type(evs[-1]) is http1.EndOfMessage
    c = client()
    evs = events(c, b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\nab")
    assert body_of(evs) == b"ab" and type(evs[-1]) is not http1.EndOfMessage  # until the engine closes
    assert [type(e) for e in events(c, b"", eof=True)] == [http1.EndOfMessage, http1.ConnectionClosed]
    c = client(method="HEAD")
    evs = events(c, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    assert type(evs[-1]) is http1.EndOfMessage and body_of(evs) == b""


def test_engine_101_and_100():
    c = client()
    evs = events(c, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\n"
                    b"Upgrade: tcp\r\n\r\n\x01\x00\x00\x00")
    assert [e.status_code for e in evs] == [100, 101] and evs[1].reason == b"UPGRADED"
    assert c.their_state is http1.SWITCHED_PROTOCOL and c.trailing_data[0] == b"\x01\x00\x00\x00"
    assert evs[1].headers.raw_items()[0] == (b"Connection", b"Upgrade")


VALID_REQUESTS = [
    GET,
    b"GET /v1.41/containers/json?all=1&filters=%7B%7D HTTP/1.1\nHost: d\nUser-Agent: Docker-Client/20.10\n\n",
    b"POST /v1.41/containers/create?name=web HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
    b"Content-Length: 13\r\n\r\n{\"Image\":\"b\"}",
    b"PUT /v1.41/containers/x/archive?path=%2F HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n4;a=b\r\ndefg\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nX-Empty:\r\nX-Spaces:   a  b   \r\nX-Obs: \xe9t\xe9\r\n\r\n",
]


@pytest.mark.parametrize("data", VALID_REQUESTS)
def test_reads_what_h11_reads(data):
    ours = events(server(), data)
    oracle = h11.Connection(h11.SERVER)
    oracle.receive_data(data)
    theirs = []
    while (ev := oracle.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        theirs.append(ev)
    assert (ours[0].method, ours[0].target) == (theirs[0].method, theirs[0].target)
    assert list(ours[0].headers) == list(theirs[0].headers)
    assert body_of(ours) == b"".join(e.data for e in theirs if type(e) is h11.Data)
    assert type(ours[-1]) is http1.EndOfMessage and type(theirs[-1]) is h11.EndOfMessage


# -- the head checks at C speed are the grammar, line by line -------------------------------
#
# _parse_head checks a head's header lines as a whole with bytes methods and
# _header_block what is to be sent the same way; both must accept and refuse
# exactly what the grammar (``_HEADER`` on each line, ``_TOKEN_RE`` /
# ``_VALUE_RE`` on each header to send) does, with the same message.

MORE_REFUSED = {
    # the grammar's refusals the block checks make (each with a control below)
    "cr cr lf": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\r\r\n\r\n", "illegal header line"),
    "del in a value": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\x7fb\r\n\r\n", "illegal header line"),
    "vt in a value": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\x0bb\r\n\r\n", "illegal header line"),
    "no colon": (b"GET / HTTP/1.1\r\nHost d\r\n\r\n", "illegal header line"),
    "empty name": (b"GET / HTTP/1.1\r\nHost: d\r\n: v\r\n\r\n", "illegal header line"),
    "non-token name": (b"GET / HTTP/1.1\r\nHost: d\r\nX@A: v\r\n\r\n", "illegal header line"),
    "ctl in a name": (b"GET / HTTP/1.1\r\nHost: d\r\nX\x01A: v\r\n\r\n", "illegal header line"),
    "tab folding": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\r\n\tb\r\n\r\n", "line folding"),
    # the first bad line names the refusal, wherever the block check failed
    "folding before a ctl": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\r\n b\r\nX-B: \x01\r\n\r\n", "line folding"),
    "bad line before folding": (b"GET / HTTP/1.1\r\nHost: d\r\nX-A a\r\n b\r\n\r\n", "illegal header line"),
}
MORE_SERVED = [  # the controls: the same heads, in grammar
    b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a~b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\tb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:d\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nX-A:\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nX_A: v\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a b\r\nX-B: c:d \t\r\n\r\n",
    b"GET / HTTP/1.1\nHost: d\r\nX-A: \xe9\n\r\n",
]


@pytest.mark.parametrize("case", sorted(MORE_REFUSED))
def test_more_refused_header_lines(case):
    data, words = MORE_REFUSED[case]
    with pytest.raises(http1.RemoteProtocolError) as e:
        events(server(), data)
    assert e.value.error_status_hint == 400 and words in str(e.value)


@pytest.mark.parametrize("data", MORE_SERVED)
def test_more_served_header_lines(data):
    req, end = events(server(), data)
    assert type(req) is http1.Request and type(end) is http1.EndOfMessage
    assert req.headers[0] == (b"host", b"d")


def reference_head(data: bytes):
    """What the grammar makes of a request head's header lines, line by line
    (the per-line parser http1 had): ("ok", raw pairs) or ("refused", message)."""
    lines = data[:data.index(b"\n\r\n")].split(b"\n")  # the head ends at its first LF CRLF
    raw = []
    for line in lines[1:]:
        line = line[:-1] if line[-1:] == b"\r" else line
        h = http1._HEADER.fullmatch(line)
        if h is None:
            return "refused", (http1.MSG_FOLDING if line[:1] in (b" ", b"\t") else "illegal header line")
        raw.append((h.group(1), h.group(2) or b""))
    return "ok", raw


def mutations(seed: int, n: int):
    """``n`` heads: a docker CLI request head with one to three bytes that
    matter to the grammar inserted, replaced or deleted after its Host line."""
    import random
    rng = random.Random(seed)
    alphabet = [b" ", b"\t", b"\r", b"\n", b":", b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\x0b", b"\x0c",
                b"a", b"A", b"@", b",", b"(", b'"']
    base = (b"GET /v1.41/containers/web/json HTTP/1.1\r\nHost: docker\r\nUser-Agent: Docker-Client/20.10 (linux)"
            b"\r\nX-Auth-Token: gAAAAAB-tok_en\r\nX-A:\t a  b\t\r\nAccept-Encoding: gzip\r\n\r\n")
    start, end = base.index(b"User-Agent"), base.index(b"\r\n\r\n")  # Host stays
    for _ in range(n):
        head = bytearray(base[:end])
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(start, len(head) + 1)
            op = rng.random()
            if op < 0.5:
                head[i:i] = rng.choice(alphabet)
            elif op < 0.75:
                del head[i:i + 1]
            else:
                head[i:i + 1] = rng.choice(alphabet)
        data = bytes(head) + b"\r\n\r\n"
        if data.index(b"\r\n\r\n") == len(head) and b"\n\n" not in data and b"\n\r\n" not in data[:-3]:
            yield data  # still one head, ending where it did


def test_head_checks_are_the_grammar_line_by_line():
    seen = {"ok": 0, "refused": 0}
    for data in mutations(seed=6, n=4000):
        kind, want = reference_head(data)
        seen[kind] += 1
        c = server()
        if kind == "ok":
            req = events(c, data)[0]
            assert req.headers.raw_items() == want, data
            assert list(req.headers) == [(n.lower(), v) for n, v in want], data
        else:
            with pytest.raises(http1.RemoteProtocolError) as e:
                events(c, data)
            assert str(e.value) == want, data
    assert seen["ok"] > 500 and seen["refused"] > 500, seen  # both sides of the line exercised


SEND_REFUSED = [
    (b"x-a", b"a\r\nx-b: b"),      # a header injected through a value
    (b"x-a", b"a\nx-b: b"),
    (b"x-a", b"a\rb"),
    (b"x-a: b", b"c"),             # through a name
    (b"x-a\r\nx-b", b"c"),
    (b"x-a\n", b"c"),
    (b"", b"c"),
    (b"x a", b"c"),
    (b"x-a", b" a"),               # white space a parser would trim
    (b"x-a", b"a\t"),
    (b"x-a", b"a\x00b"),
    (b"x-a", b"a\x7fb"),
    (b"x-a", b"a\x1fb"),
]
SEND_SERVED = [(b"x-a", b"a b"), (b"X-A", b"c"), (b"x-a", b""), (b"x-a", b"a\tb\x80\xff"), (b"x-a", b"a:b"),
               (b"x-a!#$%&'*+.^_`|~", b"c")]


@pytest.mark.parametrize("header", SEND_REFUSED)
def test_what_this_side_never_serializes(header):
    """Every kind of head this side sends refuses a header out of grammar
    (with its name, lower-cased, in the message), whichever slot it is in."""
    for pos in (0, 1, 2):
        headers = [(b"host", b"d"), (b"x-ok", b"v")]
        headers.insert(pos, header)
        for make in (lambda: (http1.Connection(http1.CLIENT), http1.Request(method="GET", target="/",
                                                                              headers=headers)),
                     lambda: (answering(), http1.Response(status_code=200, headers=headers)),
                     lambda: (answering(), http1.InformationalResponse(status_code=100, headers=headers))):
            c, ev = make()
            with pytest.raises(http1.LocalProtocolError) as e:
                c.send(ev)
            assert repr(header[0].lower()[:40]) in str(e.value)
            assert c.our_state is http1.ERROR


@pytest.mark.parametrize("header", SEND_SERVED)
def test_what_this_side_serializes_as_given(header):
    """The controls: headers in grammar go out as given, one line each."""
    c = http1.Connection(http1.CLIENT)
    out = c.send(http1.Request(method="GET", target="/", headers=[(b"host", b"d"), header]))
    assert out == b"GET / HTTP/1.1\r\nhost: d\r\n" + header[0] + b": " + header[1] + b"\r\n\r\n"
    out = answering().send(http1.Response(status_code=200, headers=[header, (b"content-length", b"0")]))
    assert out == b"HTTP/1.1 200 \r\n" + header[0] + b": " + header[1] + b"\r\ncontent-length: 0\r\n\r\n"


def answering(request: bytes = GET) -> http1.Connection:
    c = server()
    events(c, request)
    return c


def test_closing_drops_exactly_the_connection_headers():
    """When the response closes the connection, the client's Connection
    header(s) go (any case) and one ``connection: close`` comes last; headers
    whose names only look alike stay."""
    headers = [(b"Connection", b"keep-alive"), (b"x-connection", b"a"), (b"connection-x", b"b"),
               (b"CONNECTION", b"Upgrade"), (b"content-type", b"text/plain")]
    out = answering(b"GET / HTTP/1.0\r\n\r\n").send(http1.Response(status_code=200, headers=headers))
    assert out == (b"HTTP/1.1 200 \r\nx-connection: a\r\nconnection-x: b\r\ncontent-type: text/plain\r\n"
                   b"connection: close\r\n\r\n")
    # chunked framing, closed by a header of ours: the framing line stays, the order too
    out = answering().send(http1.Response(status_code=200, headers=[(b"x-a", b"1"), (b"connection", b"close")]))
    assert out == b"HTTP/1.1 200 \r\nx-a: 1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    # kept alive: the headers go out as they are (the control)
    out = answering().send(http1.Response(status_code=200, headers=[(b"connection", b"keep-alive"),
                                                                    (b"content-length", b"0")]))
    assert out == b"HTTP/1.1 200 \r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"


def test_a_client_that_says_close_is_answered_with_close():
    c = answering(GET[:-2] + b"CONNECTION: Keep-Alive, Close\r\n\r\n")
    out = c.send(http1.Response(status_code=200, headers=[(b"content-length", b"0")]))
    assert out == b"HTTP/1.1 200 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    c.send(http1.EndOfMessage())
    assert c.our_state is http1.MUST_CLOSE
    # the control: without it, the connection stays
    c = answering(GET[:-2] + b"Connection: keep-alive\r\n\r\n")
    assert c.send(http1.Response(status_code=200, headers=[(b"content-length", b"0")])) == \
        b"HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n"
    c.send(http1.EndOfMessage())
    assert c.our_state is http1.DONE


# -- a connection's last head remembered (_parse_head's memo) ------------------------------------

def _cycle(c: http1.Connection) -> None:
    """Answer the request read on server connection ``c`` and start the next cycle."""
    c.send(http1.Response(status_code=200, headers=[(b"content-length", b"0")]))
    c.send(http1.EndOfMessage())
    c.start_next_cycle()


def _seen(evs) -> tuple:
    r = evs[0]
    return (r.method, r.target, r.http_version, list(r.headers), r.headers.raw_items(),
            [(type(e), getattr(e, "data", None)) for e in evs[1:]])


@pytest.mark.parametrize("data", VALID_REQUESTS)
def test_a_repeated_head_reads_as_it_did_the_first_time(data):
    """The same request twice on one connection: the second read (from the
    memo) equals the first and a fresh connection's, framing included."""
    c = server()
    first = events(c, data)
    _cycle(c)
    second = events(c, data)
    assert c._head_memo[0] is not None  # it was a hit, not a second parse
    assert _seen(second) == _seen(first) == _seen(events(server(), data))


def test_the_memo_answers_only_the_very_same_header_lines():
    c = server()
    a = b"GET /a HTTP/1.1\r\nHost: d\r\nX-Auth-Token: t1\r\n\r\n"
    evs = events(c, a)
    evs[0].headers.append((b"x-added", b"by a caller"))  # a caller's change stays its own
    _cycle(c)
    # another request line, the same header lines: the first line is parsed anew
    req = events(c, a.replace(b"/a HTTP/1.1", b"/b HTTP/1.0"))[0]
    assert (req.target, req.http_version) == (b"/b", b"1.0")
    assert list(req.headers) == [(b"host", b"d"), (b"x-auth-token", b"t1")]
    c = server()
    events(c, a)
    _cycle(c)
    req = events(c, a.replace(b"t1", b"t2"))[0]  # another token: parsed anew
    assert list(req.headers) == [(b"host", b"d"), (b"x-auth-token", b"t2")]
    # framing comes with the lines: a body's length is the one of its own head
    c = server()
    post = b"POST / HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\n\r\n"
    assert body_of(events(c, post + b"{}")) == b"{}"
    _cycle(c)
    assert body_of(events(c, post.replace(b": 2", b": 3") + b"abc")) == b"abc"


def test_a_refused_head_is_never_remembered():
    """A head refused after one that parsed is refused, whatever came
    before; the memo holds only what parsed (control: the good head again
    on a connection whose last head it was is served)."""
    good = b"GET / HTTP/1.1\r\nHost: d\r\nX-A: a\r\n\r\n"
    for bad in (good.replace(b"X-A: a", b"X-A: a\x00"), good.replace(b"X-A: a", b"X-A : a"),
                good.replace(b"X-A: a", b"Content-Length: 1\r\nContent-Length: 2")):
        c = server()
        events(c, good)
        _cycle(c)
        with pytest.raises(http1.RemoteProtocolError):
            events(c, bad)
        assert c._head_memo[0] == good[good.index(b"\n") + 1:-2]  # still the good one's lines
    c = server()
    events(c, good)
    _cycle(c)
    assert type(events(c, good)[0]) is http1.Request


def test_the_engine_side_remembers_its_last_response_head():
    c = client()
    head = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nTransfer-Encoding: chunked\r\n\r\n"
    evs = events(c, head + b"1\r\na\r\n0\r\n\r\n")
    assert body_of(evs) == b"a"
    c.send(http1.EndOfMessage()) if c.our_state is http1.SEND_BODY else None
    c.start_next_cycle()
    c.send(http1.Request(method=b"GET", target=b"/x", headers=[(b"host", b"d")]))
    c.send(http1.EndOfMessage())
    again = events(c, head + b"2\r\nbc\r\n0\r\n\r\n")
    assert (again[0].status_code, list(again[0].headers)) == (evs[0].status_code, list(evs[0].headers))
    assert body_of(again) == b"bc" and type(again[-1]) is http1.EndOfMessage
