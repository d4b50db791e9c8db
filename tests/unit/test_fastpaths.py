"""Differential tests of the plugin's hot-path shortcuts against the forms
they replace (issue 6): the endpoint index against the table scan, the
token-format regex against the character set, the worker's header loop
against the one that lower-cased every header, and the lean Redis client's
kernel timeouts."""

from __future__ import annotations

import random
import socket
import threading
import time
import urllib.parse

import pytest
import redis

from authz_plugin import endpoints, resp, worker
from authz_plugin.errors import StoreUnavailable
from authz_plugin.identity import _MAX_TOKEN, _TOKEN_CHARS, _TOKEN_RE

# -- endpoints: the index against the scan of the whole table ----------------------------------------

_SEGMENTS = ["_ping", "version", "info", "events", "system", "session", "grpc", "auth", "containers", "exec",
             "images", "distribution", "commit", "build", "networks", "volumes", "swarm", "nodes", "services",
             "tasks", "secrets", "configs", "plugins", "", "containersx", "Containers", "v1.41", "x"]
_TAILS = ["", "/json", "/create", "/prune", "/abc", "/abc/json", "/abc/top", "/abc/archive", "/abc/start",
          "/abc/update", "/abc/rename", "/abc/exec", "/abc/resize", "/abc/attach/ws", "/a/b/json",
          "/library/busybox/json", "/busybox/history", "/x/get", "/x/tag", "/search", "/load", "/get",
          "/df", "/cancel", "/abc/connect", "/abc/disconnect", "/abc/attach", "/abc/wait", "//", "/"]


def _paths():
    for seg in _SEGMENTS:
        for tail in _TAILS:
            yield "/" + seg + tail
    yield "/"
    yield ""
    yield "containers/json"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "get"])
def test_endpoint_index_answers_what_the_table_scan_answers(method):
    assert endpoints._INDEX is not None  # every row of today's table starts with a literal segment
    n = 0
    for path in _paths():
        ep, params = endpoints.match_params(method, path)
        want = endpoints._scan(method, path)
        assert ep is want, (method, path)
        assert endpoints.match(method, path) is want
        assert params == (endpoints.params(want, path) if want is not None else {})
        n += want is not None
    assert n > {"GET": 20, "POST": 10, "DELETE": 3, "HEAD": 1, "PUT": 1}.get(method, -1)  # rows reached, not only misses


def test_endpoint_index_gives_up_on_a_row_without_a_literal_first_segment():
    row = endpoints._row("GET", "/(?:a|b.*)/x", "any")
    assert endpoints._first_segments(row) is None
    assert endpoints._index(endpoints.TABLE + (row,)) is None
    assert endpoints._first_segments(endpoints._row("GET", "/(?:swarm|nodes)(?:/.*)?", "admin")) == ("swarm", "nodes")
    assert endpoints._first_segments(endpoints._row("GET", "/containers/{ref}/json", "own")) == ("containers",)


# -- identity: the token format --------------------------------------------------------------------

def _old_token_ok(t: str) -> bool:
    return not (len(t) > _MAX_TOKEN or not _TOKEN_CHARS.issuperset(t))


def test_token_regex_is_the_character_set_check():
    rnd = random.Random(6)
    alphabet = "".join(sorted(_TOKEN_CHARS)) + " \t\r\n\x00\x0b\x0c:;%é\u0660\uff10\u212a٣"
    for _ in range(20000):
        t = "".join(rnd.choice(alphabet) for _ in range(rnd.choice((1, 2, 3, 8, 40, 200))))
        assert (_TOKEN_RE.fullmatch(t) is not None) == _old_token_ok(t), repr(t)
    for t in ("a" * _MAX_TOKEN, "a" * (_MAX_TOKEN + 1), "a\n", "\na", "gAAAA-_=.+/09Zz"):
        assert (_TOKEN_RE.fullmatch(t) is not None) == _old_token_ok(t), (len(t), t[-3:])
    assert _TOKEN_RE.fullmatch("") is None  # the caller refuses an empty token before (MSG_MISSING)


# -- worker: the header loop -------------------------------------------------------------------------

class _Sock:
    def __init__(self, data: bytes):
        self.data = data

    def recv(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out


#: every header name's length: ``worker.read_head`` without its shortcut
_EVERY_LENGTH = frozenset(range(worker.MAX_HEAD + 1))


def _old_headers(lines: list[bytes]):
    """The header loop as it was before the length shortcut: ``read_head``
    lower-casing and reading every header."""
    head = b"\r\n".join([b"POST /AuthZPlugin.AuthZReq HTTP/1.1", *lines])
    _, length, chunked, keep = worker.read_head(head, _EVERY_LENGTH)
    return length, chunked, keep


_HEADER_LINES = [b"Host: plugin", b"User-Agent: Go-http-client/1.1", b"Content-Length: 2", b"content-length: 2",
                 b"CONTENT-LENGTH:2", b"Content-Length: x", b"Content-Length : 2", b" Content-Length: 2",
                 b"\tX: y", b"X : y", b"Transfer-Encoding: chunked", b"transfer-encoding: gzip",
                 b"Connection: close", b"connection: Keep-Alive", b"Connection: upgrade", b"Accept-Encoding: gzip",
                 b"no colon", b": empty name", b"X-Long-Header-Name-Of-Len: 1", b"abcdefghij: 1",
                 b"Content-Lengtx: 2", b"X\x0b: y", b"Xy:", b"Content-Type: application/json"]


def _read(lines: list[bytes]):
    head = b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\n" + b"".join(l + b"\r\n" for l in lines) + b"\r\n"
    conn = worker.Conn(_Sock(head + b"{}" + b"0\r\n\r\n" * 2))
    try:
        path, body, keep = conn.read()
        return ("ok", keep)
    except worker.BadRequest as e:
        return ("bad", e.status, str(e))


def _expected(lines: list[bytes]):
    try:
        length, chunked, keep = _old_headers(lines)
    except worker.BadRequest as e:
        return ("bad", e.status, str(e))
    if chunked:
        return ("bad", 400, "bad chunk size")  # the body "{}" is not a chunk: both loops get that far
    return ("ok", keep)


def test_worker_header_loop_answers_what_the_full_loop_answered():
    rnd = random.Random(6)
    for _ in range(3000):
        lines = rnd.sample(_HEADER_LINES, rnd.randint(0, 5))
        got, want = _read(lines), _expected(lines)
        assert got[:2] == want[:2], (lines, got, want)


# -- resp: kernel timeouts ---------------------------------------------------------------------------

def test_lean_client_timeout_without_python_socket_timeout():
    """The lean client's socket is blocking (no poll per call) and a silent
    server still ends in redis.TimeoutError, within about the timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    held = []
    t = threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True)
    t.start()
    try:
        lean = resp.LeanRedis(port=port, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            lean.execute("PING")
        assert 0.25 <= time.monotonic() - t0 < 3
        conn = lean._connect()
        try:
            assert conn.sock.gettimeout() is None  # blocking: no poll before recv/send
        finally:
            conn.sock.close()
    finally:
        for c in held:
            c.close()
        srv.close()


def test_packed_prefix_and_bulk_are_the_whole_command_packed():
    for args, last in [(("XADD", "fdcs:audit", "MAXLEN", "~", 100000, "*", "line"), '{"n":1,"s":"\u00e9"}'),
                       (("XADD", "s", "MAXLEN", "~", 1, "*", "line"), ""), ((), "PING"), (("GET",), b"k\r\n")]:
        assert resp.prefix(args, 1) + resp.bulk(last) == resp.pack([*args, last])
    assert resp.prefix(("A",), 2) + resp.bulk("b") + resp.bulk(3) == resp.pack(["A", "b", 3])
    from authz_plugin import audit_stream
    w = audit_stream.Writer(None, maxlen=123)
    assert w._xadd + resp.bulk("x") == resp.pack(("XADD", audit_stream.STREAM, "MAXLEN", "~", 123, "*",
                                                  audit_stream.FIELD, "x"))


# -- identity: the token cache's TLRU against cachetools.TLRUCache ------------------------------------

def test_tlru_answers_what_cachetools_tlru_answers():
    import cachetools

    from authz_plugin.identity._cache import TLRU

    rnd = random.Random(6)
    for maxsize in (1, 2, 3, 5, 8):
        now = [1000.0]
        clock = lambda: now[0]  # noqa: E731
        ttu = lambda _k, v, t: t + min(10.0, v - t)  # noqa: E731 -- TokenCache's: min(ttl, expires_at - now)
        ours, theirs = TLRU(maxsize, ttu, clock), cachetools.TLRUCache(maxsize, ttu, timer=clock)
        keys = [f"k{i}" for i in range(maxsize * 2 + 2)]
        for step in range(4000):
            op, key = rnd.random(), rnd.choice(keys)
            if op < 0.35:
                value = now[0] + rnd.choice((-1.0, 0.0, 0.5, 3.0, 8.0, 30.0))  # an expires_at, some already past
                ours[key] = theirs[key] = value
            elif op < 0.75:
                assert ours.get(key) == theirs.get(key), (maxsize, step, key)
            elif op < 0.8:
                assert ours.pop(key, None) == theirs.pop(key, None), (maxsize, step, key)
            else:
                now[0] += rnd.choice((0.1, 0.5, 1.0, 2.0, 4.0))
            assert len(ours) == len(theirs), (maxsize, step)
        live = sorted(k for k in keys if theirs.get(k) is not None)
        assert sorted(k for k in keys if ours.get(k) is not None) == live
        assert len(ours) <= maxsize


def test_tlru_refuses_a_zero_size():
    from authz_plugin.identity._cache import TLRU

    with pytest.raises(ValueError):
        TLRU(0, lambda k, v, t: t + 1, time.time)
    one = TLRU(1, lambda k, v, t: t + 1, time.time)
    one["a"] = 1
    one["b"] = 2
    assert (one.get("a"), one.get("b"), len(one)) == (None, 2, 1)


# -- rules: a list's canonical tenant filter against the full checks --------------------------------

def _filter_outcome(fn, *args):
    try:
        fn(*args)
        return ("ok",)
    except Exception as e:  # the type and the words the tenant reads
        return (type(e).__name__, str(e))


def _filter_values(tenant: str, rnd: random.Random) -> list[str]:
    from authz_plugin.scoping import TENANT_LABEL

    w = f"{TENANT_LABEL}={tenant}"
    base = ['{"label":{"%s":true}}' % w, '{"label":["%s"]}' % w]
    out = list(base) + [
        '{"label":{"%s":false}}' % w, '{"label":{"%s":true,"%s":true}}' % (w, w), '{"label":["%s","%s"]}' % (w, w),
        '{"label": ["%s"]}' % w, ' {"label":["%s"]}' % w, '{"label":["%s"]} ' % w, '{"Label":["%s"]}' % w,
        '{"label":["%s"],"label":["%s"]}' % (w, w), '{"label":["%s"],"status":["running"]}' % w,
        '{"status":["running"],"label":{"%s":true}}' % w, '{"label":["%sx"]}' % w, '{"label":["%s=x"]}' % TENANT_LABEL,
        '{"label":["%s","%s=other"]}' % (w, TENANT_LABEL), '{"label":["\\u006frg.fiware.fdcs.tenant=%s"]}' % tenant,
        '{"label":{"%s":true}}x' % w, '{"label":["%s"]' % w, '[]', '', 'null', '{}', '{"label":"%s"}' % w,
        '{"label":[1]}', '{"label":{"%s":1}}' % w,
    ]
    for _ in range(200):  # single-character edits of the canonical texts
        s = rnd.choice(base)
        i = rnd.randrange(len(s) + 1)
        c = rnd.choice('{}[]",:\\ tu0aA=.x\u00e9')
        op = rnd.random()
        out.append(s[:i] + c + s[i:] if op < 0.4 else s[:i] + c + s[i + 1:] if op < 0.8 else s[:i] + s[i + 1:])
    return out


@pytest.mark.parametrize("tenant", ["a2de3bc8ae174fefae17366be82a39d3", "T1", "t-1", "t_1", 't"1', "t\\1",
                                    "t\u00e91", "t 1", ""])
def test_canonical_tenant_filter_answers_what_the_full_checks_answer(tenant):
    from authz_plugin import rules
    from authz_plugin.request import parse

    rnd = random.Random(7)
    fast = 0
    for value in _filter_values(tenant, rnd):
        for values in ([value], [value, value], [value, "{}"], []):
            query = "&".join("filters=" + urllib.parse.quote(v) for v in values)
            req = parse("GET", "/v1.41/containers/json" + ("?" + query if query else ""), {}, None)
            assert req.qall("filters") == values
            got = _filter_outcome(rules.tenant_filter, req, tenant)
            assert got == _filter_outcome(rules._tenant_filter, values, tenant), (tenant, values)
            fast += len(values) == 1 and rules._canonical_filter(value, tenant)
    if tenant.isascii() and tenant.isalnum():
        assert fast >= 2  # both canonical texts took the shortcut (and were allowed, above)
    else:
        assert fast == 0


# -- request: the remembered query parse against the loop it runs ------------------------------------

def _old_query(raw_query: str):
    """The query loop of request.parse before the memo."""
    from authz_plugin.errors import BadRequest
    from authz_plugin.request import _unescape

    if ";" in raw_query:
        raise BadRequest("the query holds ';', which the engine refuses")
    query = []
    for part in raw_query.split("&") if raw_query else ():
        if not part:
            continue
        k, _, v = part.partition("=")
        query.append((_unescape(k, query=True), _unescape(v, query=True)))
    return tuple(query)


def test_remembered_query_parse_answers_what_the_loop_answers():
    from authz_plugin import request

    rnd = random.Random(8)
    alphabet = ["a", "=", "&", "+", "%", "%2", "%2B", "%25", "%7B", "%22", "%c3%a9", "%C3", "%ff", ";", "%3B",
                "x", "filters", "%zz", "\u00e9", "%E2%82%AC", "%3D"]
    queries = [rnd.choice(alphabet) for _ in range(50)]
    queries += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12))) for _ in range(3000)]
    queries += ["x=" + "%41" * 600, "x=" + "a" * 2000]  # longer than the memo takes
    for q in queries + queries[:500]:  # twice: the memo's answers too
        want = _filter_outcome(_old_query, q)
        try:
            got = ("ok", request.parse("GET", "/v1.41/containers/json?" + q, {}, None).query)
            want = ("ok", _old_query(q))
        except Exception as e:
            got = (type(e).__name__, str(e))
        assert got == want, q
    assert request._query_memo.cache_info().hits > 0 and request._query_memo.cache_info().maxsize == 256


# -- ownership: the lean resolve's packing and the reply's one-step read ----------------------------

class _Capture:
    def __init__(self, replies):
        self.replies, self.sent = replies, []

    def evalsha_packed(self, script, n, payload, retry=True):
        self.sent.append((script, n, payload))
        return self.replies[:n]


def test_lean_resolve_packs_what_evalsha_many_packs():
    from authz_plugin import ownership

    lean = _Capture([["none", 1]] * 3)
    store = ownership.Store(redis.Redis(), host="h\u00e9-1", lean=lean)
    for refs in ([("container", "abc", True)], [("network", "n1", False)], [("volume", "v\r\n1", False)],
                 [("exec", "e" * 64, False), ("container", "c" * 64, 1), ("container", "x", 0)],
                 [("other", "o", True)]):
        assert store.resolve(refs) == [ownership.Resolution("none", (), True)] * len(refs)
        script, n, payload = lean.sent[-1]
        argvs = [(k, r, ownership.PREFIX_LIMIT, "1" if p else "0", store.host) for k, r, p in refs]
        assert script is ownership._RESOLVE_SCRIPT and n == len(refs)
        assert payload == b"".join(resp.pack(["EVALSHA", script.sha, 0, *a]) for a in argvs)


class _Str(str):
    pass


def test_resolution_answers_what_the_general_read_answers():
    from authz_plugin.ownership import _resolution as _old_resolution, resolution

    rnd = random.Random(9)
    atoms = ["id", "name", "prefix", "none", "what", "", "abc", "t1", _Str("id"), _Str("t1"), b"id", b"t1", 0, 1,
             "1", None, ["t"], 1.0, True]
    raws = [None, 1, "id", (), ("id", "a", "t"), [], ["id", "a", "t"], ["name", "", ""], ["prefix", "a", "t"]]
    raws += [[rnd.choice(atoms) for _ in range(rnd.randint(1, 5))] for _ in range(5000)]
    ok = 0
    for raw in raws:
        got = _filter_outcome(resolution, raw)
        assert got == _filter_outcome(_old_resolution, raw), raw  # the same refusal (or fault) ...
        if got == ("ok",):
            assert resolution(raw) == _old_resolution(raw), raw  # ... or the same Resolution
            ok += 1
    assert ok > 100  # well-formed replies were among them, not only refusals
    with pytest.raises(StoreUnavailable):
        resolution(["id", "a", b"t"])
