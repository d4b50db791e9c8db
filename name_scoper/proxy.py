"""The tenants' front door: an asyncio HTTP/1.1 proxy to the engine's unix socket.

One client connection (TLS on the tenant side) may carry many requests
(keep-alive, pipelining); each request gets:

1. strict framing: ``http1`` parses the head; a request it refuses
   (among others: obsolete line folding, more than one ``Content-Length``,
   ``Content-Length`` together with ``Transfer-Encoding``) is answered 400
   (501, 431) and the connection closed -- nothing of it reaches the engine;
2. the break-glass admin-key header (``keystone.admin_key_header``) removed,
   always, before anything else sees the headers;
3. an identity: ``identity.authenticate(headers, source=peer_ip)`` in a
   worker thread -- or on the loop when ``identity.authenticate_cached``
   can answer from the cache -- before the engine is touched (401 / 403 /
   503 with the identity's own message);
4. ``prepare(ctx, identity, method, target, headers, engine)`` (the
   rewriting, ``handlers.py``; see ``exchange.py``), whose
   :class:`~name_scoper.exchange.Exchange` says what to send and how to
   treat the bodies, or rejects;
5. a connection to the engine of its own for the exchange (a new one, or
   one a cleanly ended exchange left, see ``_upstream.EnginePool``): the
   request re-serialized by ``http1`` (never the client's bytes),
   ``X-Request-Id`` set, the body streamed (or
   buffered and rewritten), the response streamed back (or buffered,
   rewritten line by line), or -- on ``101`` or the engine's old ``200`` raw
   stream -- raw bidirectional copying until both sides have ended;
6. one access-log line (``name_scoper.access``, JSON): request id, tenant,
   user, method, path (no query), status, body bytes, milliseconds, peer.
   Never a header value.

Public API: :func:`serve` (start a :class:`ScoperServer`), :func:`pass_through`
(the identity rewriting) and :func:`default_prepare`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import http
import json
import logging
import re
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from types import CoroutineType
from typing import Any, Awaitable, Callable, Mapping

import orjson

from authz_plugin import logfmt, metrics
from authz_plugin.errors import FdcsError

from . import http1
from ._raw import splice
from ._streams import RawStream, StreamClosed, TLSStream, http_next
from ._upstream import (MAX_HEAD, MSG_ENGINE_UNAVAILABLE, EngineClient, EnginePool, EngineUnavailable,
                        read_capped, Upstream, end_to_end)
from .exchange import MAX_JSON, MAX_RESPONSE_JSON, Engine, Exchange, Headers

__all__ = ["ScoperServer", "serve", "pass_through", "default_prepare", "Prepare"]

LOG = logging.getLogger(__name__)
#: the access lines (``fdcs-name-scoper`` writes them straight to stderr)
ACCESS = logfmt.DirectLines("name_scoper.access")

#: the version check, with or without a version prefix, nothing after it
_PING = re.compile(r"(?:/v1\.\d+)?/_ping")

Prepare = Callable[[Any, Any, str, str, Headers, Engine], Awaitable[Exchange]]

#: request body bytes read and dropped after an early answer (401, 413, ...)
#: so that the connection can be kept; beyond it the connection is closed
DRAIN_LIMIT = 4 * 1024 * 1024
DRAIN_TIMEOUT = 5.0
#: request bodies up to this size (with a Content-Length) are read whole and
#: sent with the head (see _serve)
SMALL_BODY = 64 * 1024
#: longest line of a "lines" response (an event); a longer one ends the stream
MAX_LINE = MAX_JSON

MSG_413 = f"the request body is over {MAX_JSON // 1024} KiB, the most this service rewrites"
MSG_RESPONSE_TOO_LARGE = "the Docker engine's answer is too large for this service to rewrite"

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_HIJACK_PATH = re.compile(r"/(?:containers/[^/]+/attach|exec/[^/]+/start)$")
_RAW_TYPES = (b"application/vnd.docker.raw-stream", b"application/vnd.docker.multiplexed-stream")
_JSON = (b"content-type", b"application/json")
_PLAIN_HTTP_MESSAGE = (b'{"message": "this service speaks TLS only: use --tlsverify (or DOCKER_TLS_VERIFY=1) '
                       b'and a tcp:// host"}')
_PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(_PLAIN_HTTP_MESSAGE), _PLAIN_HTTP_MESSAGE))


async def pass_through(ctx, ident, method: str, target: str, headers: Headers,
                       engine: Engine) -> Exchange:
    """The rewriting that changes nothing (plugin-only behaviour)."""
    return Exchange(method, target, headers)


def default_prepare() -> Prepare:
    """``name_scoper.handlers.prepare``, or :func:`pass_through` (with a
    warning) while that module does not exist."""
    try:
        from . import handlers
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.handlers":
            raise
        LOG.warning("name_scoper.handlers is not installed: names pass through unchanged "
                    "(tenants must write scoped names themselves, as in plugin-only mode)")
        return pass_through
    return handlers.prepare


def _bad_request(e: http1.RemoteProtocolError) -> str:
    """The parser's complaint, for the client (it quotes no bytes: they may
    hold a token)."""
    return str(e) if e.plain else "bad request: " + str(e)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _is_raw_stream(resp: http1.Response) -> bool:
    """The engine's old hijack answer: 200, a raw-stream content type, and
    no framing (the body runs until the connection closes)."""
    if resp.status_code != 200:
        return False
    ctype = None
    for name, value in resp.headers:
        if name in (b"content-length", b"transfer-encoding"):
            return False
        if name == b"content-type":
            ctype = value.split(b";", 1)[0].strip().lower()
    return ctype in _RAW_TYPES


class _AuthHeaders(Mapping[str, str]):
    """A request's headers as the identity reads them.

    Lookups join a repeated header with ", " (as HTTP does), but ``items()``
    yields every (name, value) pair as sent, repeats included: two
    ``X-Auth-Token`` headers must reach the identity as two values, which it
    refuses as such ("more than one X-Auth-Token header"), not as one joined
    value it would call an invalid token ("run fdcs-login").
    """

    __slots__ = ("_pairs", "_map")

    def __init__(self, headers: Headers):
        self._pairs = tuple([(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers])
        self._map: dict[str, str] | None = None  # made at the first lookup (the identity only scans)

    @property
    def _joined(self) -> dict[str, str]:
        if self._map is None:
            joined: dict[str, str] = {}
            for k, v in self._pairs:
                joined[k] = f"{joined[k]}, {v}" if k in joined else v
            self._map = joined
        return self._map

    def __getitem__(self, key: str) -> str:
        return self._joined[key]

    def __iter__(self):
        return iter(self._joined)

    def __len__(self) -> int:
        return len(self._joined)

    def items(self):  # type: ignore[override]
        return self._pairs  # a tuple: read-only


class _Record:
    """What the access-log line (and the metrics) say about one request.

    Setting ``status`` the first time stamps the answer's head (``t_head``):
    the latency the metrics observe."""

    __slots__ = ("t0", "rid", "method", "path", "peer", "tenant", "user", "_status", "t_head", "sent",
                 "received")

    def __init__(self, method: str, target: str, peer: str):
        self.t0 = time.perf_counter()
        self.rid = ""
        self.method = method
        self.path = target.split("?", 1)[0][:300]
        self.peer = peer
        self.tenant = self.user = ""
        self._status = 0
        self.t_head: float | None = None
        self.sent = 0
        self.received = 0

    @property
    def status(self) -> int:
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        if value and self.t_head is None:
            self.t_head = time.perf_counter()
        self._status = value

    def log(self, access: "AccessLines") -> None:
        """The request has ended: counted now, its access line queued in ``access``."""
        # 499: the client went away, no answer's head to time
        head = self.t_head - self.t0 if self.t_head is not None and self._status != 499 else None
        metrics.scoper_request(self.method, self.path, self._status, head, self.received, self.sent)
        if ACCESS.enabled():
            access.add(self, time.perf_counter() - self.t0)

    def line(self, seconds: float) -> bytes:
        """The access line's JSON, the request having taken ``seconds``."""
        line = {"rid": self.rid, "tenant": self.tenant, "user": self.user, "method": self.method,
                "path": self.path, "status": self._status, "bytes": self.sent,
                "ms": round(seconds * 1000, 1), "peer": self.peer}
        if self.received:
            line["in"] = self.received
        return orjson.dumps(line)


class AccessLines:
    """The access lines of one server, written off the requests' path.

    A request that ends is queued; its line is written (``ACCESS``, one
    ``write`` per batch) at most :data:`FLUSH_DELAY` seconds later, at once
    when :data:`MAX_PENDING` wait, and at the server's close.  Written at
    the request's end, a line held up the next request on the connection:
    the client, woken by the answer, took the core, and the line's work
    waited behind it for the core (5% of an inspect's latency at one
    request at a time).  Each line keeps the time its request ended.  What
    a crash loses: at most :data:`FLUSH_DELAY` seconds of lines.  One event
    loop uses it."""

    FLUSH_DELAY = 0.05
    MAX_PENDING = 256

    __slots__ = ("_pending", "_timer")

    def __init__(self):
        #: (time.time() at the end, seconds taken, the record)
        self._pending: list[tuple[float, float, _Record]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, rec: _Record, seconds: float) -> None:
        pending = self._pending
        pending.append((time.time(), seconds, rec))
        if len(pending) >= self.MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_DELAY, self._fired)

    def _fired(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every queued line now (a failed write loses them, said once, never raised)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        try:
            ACCESS.write_many([(when, rec.line(seconds).decode()) for when, seconds, rec in pending])
        except OSError as e:
            LOG.warning("%d access line(s) lost: %s", len(pending), e)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


class _Client:
    """One tenant connection: the request loop."""

    def __init__(self, server: "ScoperServer", stream, peer: str):
        self.s = server
        self.stream = stream
        self.peer = peer
        self.http = http1.Connection(http1.SERVER, max_incomplete_event_size=MAX_HEAD)
        #: the engine connection of the request being served
        self.up: Upstream | None = None
        self.idle = True
        self.task = asyncio.current_task()
        self._gone = False
        #: loop time by which the next request's head must be in; None while serving one
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_expired = False
        #: (the identity's headers, as sent; the identity they got): asked
        #: again only whether it still holds (ScoperServer.still_cached)
        self._auth: tuple[tuple, Any] | None = None

    # -- client side I/O ----------------------------------------------------------

    def send(self, event) -> None:
        data = self.http.send(event)
        if data:
            self.stream.write(data)

    def send_message(self, response: http1.Response, body: bytes) -> None:
        """A whole response (head, ``body``, end) in ONE write: one TLS
        record and one segment rather than one per part."""
        conn = self.http
        data = conn.send(response)
        if body:
            data += conn.send(http1.Data(data=body))
        data += conn.send(http1.EndOfMessage())
        self.stream.write(data)

    async def next_event(self):
        return await http_next(self.http, self.stream)

    def _went_away(self) -> None:
        # the client's FIN while nobody reads: it gave up on this request
        self._gone = True
        self.task.cancel()

    # -- the loop ---------------------------------------------------------------

    def _head_timer_fired(self) -> None:
        """The idle timeout (a request's head must be in within
        ``idle_timeout`` of the previous answer), kept by ONE timer per
        connection that moves on when it fires rather than one armed and
        cancelled per request.  It ends the connection at the deadline
        exactly, never earlier."""
        loop = self.task.get_loop()
        deadline = self._head_deadline
        if deadline is None:  # serving: a next head's deadline is at least a timeout away
            deadline = loop.time() + self.s.idle_timeout
        elif loop.time() >= deadline:
            self._head_timer = None
            self._head_expired = True
            self.task.cancel()
            return
        self._head_timer = loop.call_at(deadline, self._head_timer_fired)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._head_timer is not None:
                self._head_timer.cancel()

    async def _run(self) -> None:
        loop = self.task.get_loop()
        s = self.s
        while not self.s.closing:
            self.idle = True
            self._head_deadline = loop.time() + self.s.idle_timeout
            if self._head_timer is None:
                self._head_timer = loop.call_at(self._head_deadline, self._head_timer_fired)
            try:
                req = await self._read_head()
            except asyncio.CancelledError:
                if not self._head_expired:
                    raise
                self.task.uncancel()
                return
            except http1.RemoteProtocolError as e:
                self._head_deadline = None
                if not self.stream.lost and self.http.their_state is http1.ERROR and not self._eof_seen():
                    await self._protocol_error(e.error_status_hint, _bad_request(e))
                return
            except StreamClosed:
                return
            self._head_deadline = None
            if req is None:
                return
            self.idle = False
            s.in_flight += 1
            try:
                keep = await self._exchange(req)
            finally:
                s.in_flight -= 1
            if not keep:
                return
            self.http.start_next_cycle()

    def _eof_seen(self) -> bool:
        return self.http.trailing_data[1]

    async def _read_head(self) -> http1.Request | None:
        conn = self.http
        if conn.trailing_data[0]:  # a pipelined request
            self.idle = False
        while True:
            ev = conn.next_event()
            if ev is http1.NEED_DATA:
                data = await self.stream.recv()
                if data:
                    self.idle = False
                conn.receive_data(data)
                continue
            if type(ev) is http1.Request:
                return ev
            return None  # ConnectionClosed

    async def _protocol_error(self, status: int, message: str, req: http1.Request | None = None) -> None:
        rec = _Record(req.method.decode("ascii", "replace") if req else "-",
                      req.target.decode("ascii", "replace") if req else "-", self.peer)
        rec.rid = logfmt.new_request_id()
        body = json.dumps({"message": message}).encode()
        headers = [_JSON, (b"content-length", b"%d" % len(body)), (b"connection", b"close"),
                   (b"x-request-id", rec.rid.encode())]
        try:
            try:
                self.send(http1.Response(status_code=status, reason=_reason(status), headers=headers))
                self.send(http1.Data(data=body))
                self.send(http1.EndOfMessage())
            except http1.LocalProtocolError:
                reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large",
                          501: b"Not Implemented"}.get(status, b"Error")
                self.stream.write(b"HTTP/1.1 %d %s\r\n" % (status, reason)
                                  + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
                                  + b"\r\n" + body)
            await self.stream.drain()
        except StreamClosed:
            pass
        rec.status, rec.sent = status, len(body)
        rec.log(self.s.access)

    # -- one request -----------------------------------------------------------------

    async def _exchange(self, req: http1.Request) -> bool:
        """Serve one request; True when the connection may carry another."""
        rec = _Record(req.method.decode("ascii"), req.target.decode("ascii"), self.peer)
        try:
            return await self._serve(req, rec)
        except asyncio.CancelledError:
            if not self._gone:
                raise
            self.task.uncancel()
            rec.status = rec.status or 499
            return False
        except StreamClosed:
            rec.status = rec.status or 499  # the client went away
            return False
        except http1.RemoteProtocolError as e:
            # a request body http1 cannot read (bad chunked framing): whatever
            # reached the engine of it is cut off with the engine connection
            if self.http.our_state is http1.SEND_RESPONSE:
                body = json.dumps({"message": _bad_request(e)}).encode()
                self.send(http1.Response(status_code=e.error_status_hint,
                                       reason=_reason(e.error_status_hint), headers=[
                    _JSON, (b"content-length", b"%d" % len(body)), (b"connection", b"close"),
                    (b"x-request-id", rec.rid.encode())]))
                self.send(http1.Data(data=body))
                self.send(http1.EndOfMessage())
                rec.status, rec.sent = e.error_status_hint, len(body)
                await self.stream.drain()
            return False
        finally:
            self.stream.on_eof(None)
            rec.log(self.s.access)

    async def _serve(self, req: http1.Request, rec: _Record) -> bool:
        s = self.s
        method, target = rec.method, req.target.decode("ascii")

        # -- headers: hop-by-hop and the admin key out, request id in ---------------
        upgrade = None
        cl = None
        chunked = False
        rid = None
        for name, value in req.headers:
            if name == b"upgrade":
                upgrade = value
            elif name == b"content-length":
                cl = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"x-request-id":
                v = value.decode("latin-1")
                if _SANE_REQUEST_ID.fullmatch(v):
                    rid = v
        wants_upgrade = upgrade is not None and any(
            t.strip().lower() == b"upgrade"
            for n, v in req.headers if n == b"connection" for t in v.split(b","))
        headers = end_to_end(req.headers, s.drop_request_headers)
        rid = rid or logfmt.new_request_id()
        rec.rid = rid
        headers.append((b"x-request-id", rid.encode()))

        # -- who is asking --------------------------------------------------------------
        # Anyone may ping (the plugin allows it too): clients negotiate the API
        # version with it, and a refused ping makes the docker CLI fall back
        # to API 1.24 and show "version too old" instead of the real refusal.
        ping = method in ("GET", "HEAD") and not chunked and not cl and _PING.fullmatch(target)
        ident = None
        if not ping:
            # A kept-alive connection repeats its credentials: the same
            # headers get the same identity while the identity's cache holds it.
            creds = tuple([p for p in headers if p[0] in s.credential_headers])
            try:
                if self._auth is not None and self._auth[0] == creds and s.still_cached(self._auth[1]):
                    ident = self._auth[1]
                else:
                    self._auth = None
                    ident = await s.authenticate(_AuthHeaders(headers), self.peer)
                    if s.reusable_identity(ident):
                        self._auth = (creds, ident)
            except FdcsError as e:
                return await self._answer(req, rec, e.status, str(e))
            except Exception:
                LOG.exception("identity check failed (request %s)", rid)
                return await self._answer(req, rec, 500, f"internal error (request id {rid})")
            rec.tenant = getattr(ident, "project_id", "") or ""
            rec.user = getattr(ident, "user_name", "") or ""

        # -- what to send ------------------------------------------------------------------
        engine = EngineClient(s.engine_socket, headers, s.connect_timeout)
        try:
            ex = Exchange(method, target, headers) if ping else \
                await s.prepare(s.context, ident, method, target, headers, engine)
        except FdcsError as e:
            if isinstance(e, EngineUnavailable):
                LOG.warning("engine sub-request failed (request %s): %s", rid, e.__cause__ or e)
            return await self._answer(req, rec, e.status, str(e))
        except Exception:
            LOG.exception("rewriting failed (request %s %s %s)", rid, method, rec.path)
            return await self._answer(req, rec, 500, f"internal error (request id {rid})")
        if ex.reject is not None:
            return await self._answer(req, rec, ex.reject[0], ex.reject[1])

        has_body = chunked or bool(cl)
        body = None
        if ex.request_body == "json":
            if cl is not None and cl > MAX_JSON:
                return await self._answer(req, rec, 413, MSG_413)
            self._continue()
            body = await self._read_capped(MAX_JSON)
            if body is None:
                return await self._answer(req, rec, 413, MSG_413)
            rec.received += len(body)
            if ex.rewrite_body is not None:
                try:
                    body = ex.rewrite_body(body)
                except FdcsError as e:
                    return await self._answer(req, rec, e.status, str(e))
                except Exception:
                    LOG.exception("body rewriting failed (request %s %s %s)", rid, method, rec.path)
                    return await self._answer(req, rec, 500, f"internal error (request id {rid})")
            framing = [(b"content-length", b"%d" % len(body))]
        elif cl is not None and 0 < cl <= SMALL_BODY and not wants_upgrade:
            # A small body goes out with the head.  The engine refuses a
            # request without reading a body it does not forward to the plugin
            # and closes at once; a body written after that close loses the
            # engine's answer (the client would get a 502 for a refusal).
            self._continue()
            body = await self._read_capped(SMALL_BODY)
            if body is None:  # cannot be: the body reader stops at its Content-Length
                return await self._answer(req, rec, 400, "the request body is longer than its Content-Length")
            rec.received += len(body)
            framing = [(b"content-length", b"%d" % len(body))]
        elif chunked:
            framing = [(b"transfer-encoding", b"chunked")]
        elif cl is not None:
            framing = [(b"content-length", b"%d" % cl)]
        else:
            framing = []

        out = end_to_end(ex.headers, s.drop_headers)
        if not any(n == b"host" for n, _ in out):
            out.append((b"host", b"docker"))
        out += framing
        if wants_upgrade:
            out += [(b"connection", b"Upgrade"), (b"upgrade", upgrade)]

        # -- the engine ------------------------------------------------------------------
        # A request that changes nothing, has no body and is not a stream
        # to hijack may go on a kept-alive connection; should the engine have
        # closed that one before any answer came, it is sent once more on a
        # new one.  Any other request gets a new connection and is never
        # sent twice.
        hijackable = wants_upgrade or bool(_HIJACK_PATH.search(rec.path))
        retry = method in ("GET", "HEAD") and not has_body and not hijackable
        try:
            self.up = await s.engine_pool.get(reuse=retry)
        except EngineUnavailable as e:
            LOG.warning("cannot reach the engine at %s (request %s): %s", s.engine_socket, rid,
                        e.__cause__)
            return await self._answer(req, rec, 502, MSG_ENGINE_UNAVAILABLE)
        try:
            return await self._forward(req, rec, ex, out, body, has_body, hijackable, retry)
        finally:
            up, self.up = self.up, None
            s.engine_pool.release(up)  # kept only when the exchange ended cleanly

    async def _renewed(self) -> bool:
        """A new engine connection (``self.up``) in place of a kept-alive
        one the engine closed; False when none can be made."""
        self.up.abort()
        try:
            self.up = await Upstream.connect(self.s.engine_socket, self.s.connect_timeout)
        except EngineUnavailable as e:
            LOG.warning("cannot reach the engine at %s: %s", self.s.engine_socket, e.__cause__)
            return False
        return True

    async def _forward(self, req, rec, ex: Exchange, out: Headers, body: bytes | None,
                       has_body: bool, hijackable: bool, retry: bool) -> bool:
        up = self.up
        if body is None and not has_body:
            # no body: the client's end of message is at hand; the request
            # goes out whole (and can go out again, see _serve)
            if type(await self.next_event()) is not http1.EndOfMessage:
                raise StreamClosed("the client closed during the request")
            body = b""
        pump = None
        for attempt in (1, 2):
            again = attempt == 1 and retry and up.reused
            try:
                up.send(http1.Request(method=ex.method, target=ex.target, headers=out))
                if body is not None:
                    if body:
                        up.send(http1.Data(data=body))
                    up.send(http1.EndOfMessage())
            except http1.LocalProtocolError:
                LOG.exception("the rewriting produced an invalid request (request %s)", rec.rid)
                return await self._answer(req, rec, 500, f"internal error (request id {rec.rid})")
            except StreamClosed:
                if again and await self._renewed():
                    up = self.up
                    continue
                return await self._answer(req, rec, 502, MSG_ENGINE_UNAVAILABLE)
            if body is None:  # has_body: streamed as it comes
                self._continue()
                pump = asyncio.ensure_future(self._pump(up, rec))
            try:
                if pump is None:
                    if not hijackable:
                        self.stream.on_eof(self._went_away)
                    head = await up.response_head()
                else:
                    head = await self._head_while_pumping(up, pump, hijackable)
            except EngineUnavailable as e:
                if again and await self._renewed():
                    up = self.up
                    continue
                LOG.warning("the engine broke off (request %s): %s", rec.rid, e.__cause__ or e)
                if pump is not None and not pump.done():
                    pump.cancel()
                return await self._answer(req, rec, 502, MSG_ENGINE_UNAVAILABLE)
            except BaseException:
                if pump is not None and not pump.done():
                    pump.cancel()
                raise
            break

        if type(head) is http1.InformationalResponse:  # 101
            self.stream.on_eof(None)
            if pump is not None:
                await pump
            return await self._hijack(rec, up, head, upgrade=True)
        if _is_raw_stream(head):
            self.stream.on_eof(None)
            if pump is not None:
                await pump
            return await self._hijack(rec, up, head, upgrade=False)

        keep = await self._respond(req, rec, ex, up, head, pump)
        if pump is not None and not pump.done():
            # the engine answered before taking the whole body: the rest of it
            # can never be read as a next request
            pump.cancel()
            return False
        return keep

    async def _head_while_pumping(self, up: Upstream, pump: asyncio.Future, hijackable: bool):
        head_task = asyncio.ensure_future(up.response_head())
        try:
            done, _ = await asyncio.wait((pump, head_task), return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                exc = pump.exception()
                if exc is not None:
                    raise exc
                if not hijackable:
                    self.stream.on_eof(self._went_away)
            return await head_task
        finally:
            if not head_task.done():
                head_task.cancel()

    async def _pump(self, up: Upstream, rec: _Record) -> bool:
        """Stream the client's request body to the engine as it comes; False
        when the engine stopped taking it (its answer, or a 502, follows)."""
        while True:
            ev = await self.next_event()
            kind = type(ev)
            if kind is http1.Data:
                rec.received += len(ev.data)
                try:
                    up.send(ev)
                    await up.stream.drain()
                except StreamClosed:
                    return False
            elif kind is http1.EndOfMessage:
                try:
                    up.send(http1.EndOfMessage())
                except StreamClosed:
                    return False
                return True
            else:
                raise StreamClosed("the client closed during the request body")

    def _continue(self) -> None:
        if self.http.they_are_waiting_for_100_continue:
            self.send(http1.InformationalResponse(status_code=100, headers=[]))

    async def _read_capped(self, limit: int) -> bytes | None:
        return await read_capped(self.next_event, limit,
                                 lambda: StreamClosed("the client closed during the request body"))

    # -- answers --------------------------------------------------------------------------

    async def _answer(self, req: http1.Request, rec: _Record, status: int, message: str) -> bool:
        """Answer ``{"message": ...}`` without the engine; True when the
        connection may carry another request."""
        close = self.s.closing
        if self.http.their_state is http1.SEND_BODY:
            if self.http.they_are_waiting_for_100_continue:
                close = True  # do not invite the body we will not use
            else:
                close = close or not await self._discard_body()
        body = json.dumps({"message": message}).encode()
        headers = [_JSON, (b"content-length", b"%d" % len(body)),
                   (b"x-request-id", rec.rid.encode())]
        if close:
            headers.append((b"connection", b"close"))
        if req.method == b"HEAD":
            body = b""
        self.send_message(http1.Response(status_code=status, reason=_reason(status), headers=headers), body)
        rec.sent = len(body)
        rec.status = status
        await self.stream.drain()
        return not close and self._reusable()

    async def _discard_body(self) -> bool:
        dropped = 0
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while True:
                    ev = await self.next_event()
                    kind = type(ev)
                    if kind is http1.Data:
                        dropped += len(ev.data)
                        if dropped > DRAIN_LIMIT:
                            return False
                    elif kind is http1.EndOfMessage:
                        return True
                    else:
                        return False
        except (TimeoutError, http1.RemoteProtocolError):
            return False

    def _reusable(self) -> bool:
        return self.http.our_state is http1.DONE and self.http.their_state is http1.DONE \
            and not self.s.closing

    def _response_headers(self, rec: _Record, headers: Headers, extra: Headers = ()) -> Headers:
        out = end_to_end(headers, frozenset({b"x-request-id"}))
        out += extra
        out.append((b"x-request-id", rec.rid.encode()))
        if self.s.closing:
            out.append((b"connection", b"close"))
        return out

    async def _respond(self, req, rec: _Record, ex: Exchange, up: Upstream,
                       head: http1.Response, pump) -> bool:
        status = head.status_code
        try:
            mode, headers = ex.response.head(status, list(head.headers))
        except Exception:
            LOG.exception("response rewriting failed (request %s %s %s)", rec.rid, rec.method, rec.path)
            return await self._answer(req, rec, 500, f"internal error (request id {rec.rid})")
        if req.method == b"HEAD" or status in (204, 304):
            mode = "stream"
        closing = pump is not None and not pump.done()
        extra: Headers = [(b"connection", b"close")] if closing else []

        if mode == "json":
            try:
                body = await up.read_body(MAX_RESPONSE_JSON)
            except EngineUnavailable as e:
                LOG.warning("the engine broke off (request %s): %s", rec.rid, e.__cause__ or e)
                return await self._answer(req, rec, 502, MSG_ENGINE_UNAVAILABLE)
            if body is None:
                LOG.warning("engine answer over %d bytes to %s %s (request %s)",
                            MAX_RESPONSE_JSON, rec.method, rec.path, rec.rid)
                return await self._answer(req, rec, 502, MSG_RESPONSE_TOO_LARGE)
            reason = head.reason
            try:
                body = ex.response.json(status, body)
                if type(body) is CoroutineType:  # the rewriting reads Redis (on this loop)
                    body = await body
                if isinstance(body, tuple):  # the rewriting changed the status too
                    new_status, body = body
                    if new_status != status:
                        status, reason = new_status, _reason(new_status)
                if not isinstance(body, (bytes, bytearray)):
                    raise TypeError(f"response.json() gave {type(body).__name__}, not bytes")
            except FdcsError as e:
                return await self._answer(req, rec, e.status, str(e))
            except Exception:
                LOG.exception("response rewriting failed (request %s %s %s)",
                              rec.rid, rec.method, rec.path)
                return await self._answer(req, rec, 500, f"internal error (request id {rec.rid})")
            extra.append((b"content-length", b"%d" % len(body)))
            self.send_message(http1.Response(status_code=status, reason=reason,
                                           headers=self._response_headers(rec, headers, extra)), body)
            rec.status, rec.sent = status, len(body)
            await self.stream.drain()
            return self._reusable()

        if mode == "stream":
            for name, value in head.headers:
                if name == b"content-length":
                    extra.append((name, value))
        self.send(http1.Response(status_code=status, reason=head.reason,
                               headers=self._response_headers(rec, headers, extra)))
        rec.status = status
        await self.stream.drain()  # headers at once: wait, events and logs -f start here
        try:
            with metrics.scoper_stream("lines" if mode == "lines" else "stream"):
                if mode == "lines":
                    await self._relay_lines(rec, ex, up)
                else:
                    await self._relay(rec, up)
        except EngineUnavailable as e:
            # the head is out; all that is left is to break the connection off
            LOG.warning("the engine broke off a response (request %s): %s", rec.rid, e.__cause__ or e)
            self.stream.abort()
            return False
        except (StreamClosed, asyncio.CancelledError):
            raise
        except Exception:
            LOG.exception("response rewriting failed (request %s %s %s)", rec.rid, rec.method, rec.path)
            self.stream.abort()
            return False
        self.send(http1.EndOfMessage())
        await self.stream.drain()
        return self._reusable()

    async def _relay(self, rec: _Record, up: Upstream) -> None:
        conn, stream = self.http, self.stream
        while True:
            ev = await up.next_event()
            kind = type(ev)
            if kind is http1.EndOfMessage:
                return
            if kind is not http1.Data:
                raise EngineUnavailable()
            # Merge what the engine already sent with it (logs -f: a chunk
            # per line): one client chunk, one TLS record and one drain per
            # read, not per line.  Only buffered bytes: nothing waits.
            parts, end = [ev.data], False
            while True:
                nxt = up.buffered_event()
                if nxt is http1.NEED_DATA:
                    break
                if type(nxt) is http1.Data:
                    parts.append(nxt.data)
                elif type(nxt) is http1.EndOfMessage:
                    end = True
                    break
                else:
                    raise EngineUnavailable()
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            stream.write(conn.send(http1.Data(data=data)))
            rec.sent += len(data)
            await stream.drain()
            if end:
                return

    async def _relay_lines(self, rec: _Record, ex: Exchange, up: Upstream) -> None:
        rewrite = ex.response.line
        rest = b""
        while True:
            ev = await up.next_event()
            kind = type(ev)
            if kind is http1.Data:
                data = rest + ev.data if rest else bytes(ev.data)
                lines = data.split(b"\n")  # bytes in, bytes out
                rest = lines.pop()
                if len(rest) > MAX_LINE:
                    raise EngineUnavailable("a line of the engine's answer is too long")
                if not lines:
                    continue
                out = []
                for line in lines:
                    if line:
                        line = rewrite(line)
                        if line is None:
                            continue
                    out.append(line)
                    out.append(b"\n")
            elif kind is http1.EndOfMessage:
                if not rest:
                    return
                line = rewrite(rest)
                if line is None:
                    return
                out, rest = [line], b""
            else:
                raise EngineUnavailable()
            if out:
                data = b"".join(out)
                self.send(http1.Data(data=data))
                rec.sent += len(data)
                await self.stream.drain()
            if kind is http1.EndOfMessage:
                return

    async def _hijack(self, rec: _Record, up: Upstream, head, upgrade: bool) -> bool:
        """Switch to raw copying; the connection ends with it."""
        headers = head.headers.raw_items()
        if upgrade:
            self.send(http1.InformationalResponse(status_code=101, reason=head.reason,
                                                headers=headers))
        else:
            # written by hand: http1 would frame the body as chunked
            self.stream.write(b"HTTP/1.1 200 OK\r\n"
                              + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
                              + b"\r\n")
        rec.status = head.status_code
        client_first = self.http.trailing_data[0]
        engine_first = up.http.trailing_data[0] if upgrade else up.buffered_body()
        try:
            with metrics.scoper_stream("hijack"):
                rec.received, rec.sent = await splice(self.stream, up.stream, client_first, engine_first)
        except (StreamClosed, OSError) as e:
            LOG.info("hijacked stream broken off (request %s): %s", rec.rid, e)
            self.stream.abort()
        return False


class ScoperServer:
    """The proxy's listener(s) and connections; see :func:`serve`."""

    def __init__(self, identity, *, engine_socket: str, ssl_context: ssl.SSLContext | None = None,
                 prepare: Prepare | None = None, context: Any = None,
                 admin_key_header: str = "X-FDCS-Admin-Key", max_connections: int = 2000,
                 connect_timeout: float = 5.0, idle_timeout: float = 120.0,
                 handshake_timeout: float = 15.0, identity_threads: int = 16):
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.identity = identity
        self.engine_socket = engine_socket
        self.ssl_context = ssl_context
        self.prepare: Prepare = prepare or pass_through
        self.context = context
        admin = admin_key_header.lower().encode("latin-1")
        self.drop_headers = frozenset({admin} if admin else ())
        self.drop_request_headers = self.drop_headers | {b"x-request-id"}
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.engine_pool = EnginePool(engine_socket, connect_timeout)
        self.executor = ThreadPoolExecutor(identity_threads, thread_name_prefix="fdcs-identity")
        # An identity that can answer from its cache without blocking
        # (IdentityService.authenticate_cached) spares a warm token the hop to
        # a worker thread; any other identity is always asked in a thread.
        self._cached_identity = getattr(identity, "authenticate_cached", None)
        # An identity that can tell whether an answer it gave still holds
        # (IdentityService.still_cached) is asked only that when a connection
        # repeats the headers it read (header_names) with nothing changed.
        self.still_cached: Callable[[Any], bool] | None = getattr(identity, "still_cached", None)
        #: the request headers the identity's answer depends on
        self.credential_headers: frozenset[bytes] = (
            getattr(identity, "header_names", frozenset()) if self.still_cached is not None else frozenset())
        self.closing = False
        #: requests being served (a stream counts until it ends)
        self.in_flight = 0
        self._slots = asyncio.Semaphore(max_connections)
        self._sockets: list[socket.socket] = []
        self._accepters: list[asyncio.Task] = []
        self._clients: dict[asyncio.Task, _Client | None] = {}
        self.access = AccessLines()

    async def authenticate(self, headers: Mapping[str, str], peer: str):
        """``identity.authenticate(headers, source=peer)``, never blocking the
        loop: answered on the loop when the identity's cache can answer (a
        warm token, or a cached refusal), else in a worker thread (Keystone)."""
        if self._cached_identity is not None:
            ident = self._cached_identity(headers, source=peer)
            if ident is not None:
                return ident
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(self.identity.authenticate, headers, source=peer))

    def reusable_identity(self, ident) -> bool:
        """Whether ``ident`` may be given again for the same headers while
        the identity's ``still_cached`` says it holds (an identity from the
        token cache; never the admin key's)."""
        return self.still_cached is not None and bool(getattr(ident, "cache_key", ""))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._sockets]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def connections(self) -> int:
        return len(self._clients)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind ``host:port`` (every address it resolves to) and accept."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        addrs = list(dict.fromkeys((family, type_, proto, addr) for family, type_, proto, _, addr in infos))
        for family, type_, proto, addr in addrs:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and len(addrs) > 1:
                    # "" binds 0.0.0.0 and :: side by side; "[::]" alone stays dual-stack
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(1024)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self._sockets.append(sock)
        for sock in self._sockets:
            self._accepters.append(loop.create_task(self._accept(sock)))

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as e:
                self._slots.release()
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    LOG.error("cannot accept connections: %s", e.strerror)
                    await asyncio.sleep(0.5)
                continue
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._connection(conn, addr[0]))
            self._clients[task] = None

    async def _connection(self, sock: socket.socket, peer: str) -> None:
        metrics.scoper_connection()
        loop = asyncio.get_running_loop()
        stream = None
        task = asyncio.current_task()
        try:
            _, raw = await loop.connect_accepted_socket(RawStream, sock)
            stream = raw
            if self.ssl_context is not None:
                stream = TLSStream(raw, self.ssl_context)
                try:
                    async with asyncio.timeout(self.handshake_timeout):
                        first = await raw.recv()
                        if first[:1].isalpha():
                            # plain HTTP to the TLS port (DOCKER_TLS_VERIFY or
                            # --tlsverify forgotten): say so, as Go servers do
                            raw.write(_PLAIN_HTTP_ANSWER)
                            return
                        raw.unread(first)
                        await stream.handshake()
                except (ssl.SSLError, StreamClosed, TimeoutError, OSError) as e:
                    LOG.debug("TLS handshake with %s failed: %s", peer, e)
                    return
            client = _Client(self, stream, peer)
            self._clients[task] = client
            await client.run()
        except asyncio.CancelledError:
            pass
        except (StreamClosed, OSError) as e:
            LOG.debug("connection from %s ended: %s", peer, e)
        except Exception:
            LOG.exception("connection from %s failed", peer)
        finally:
            if stream is not None:
                stream.close()
            else:
                sock.close()
            self._clients.pop(task, None)
            self._slots.release()

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting; close idle connections; let requests in flight
        finish for up to ``grace`` seconds, then cut what is left."""
        self.closing = True
        for t in self._accepters:
            t.cancel()
        await asyncio.gather(*self._accepters, return_exceptions=True)
        for sock in self._sockets:
            sock.close()
        for task, client in list(self._clients.items()):
            if client is None or client.idle:
                task.cancel()
        if self._clients:
            _, pending = await asyncio.wait(list(self._clients), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                LOG.info("cut %d connection(s) still busy after %.0f s", len(pending), grace)
                await asyncio.wait(pending, timeout=2.0)
        self.engine_pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.access.close()


async def serve(identity, *, engine_socket: str, listen: tuple[str, int] = ("127.0.0.1", 0),
                **options) -> ScoperServer:
    """Start the proxy and return its :class:`ScoperServer` (``.port``,
    ``.addresses``, ``await .close(grace)``).

    ``identity`` has ``authenticate(headers, source=...)`` (an
    :class:`authz_plugin.identity.IdentityService` or a fake);
    ``engine_socket`` is the engine's unix socket.  ``options`` are
    :class:`ScoperServer`'s: ``ssl_context`` (None: plain TCP, for tests and
    benchmarks only), ``prepare`` (default :func:`pass_through`) and
    ``context`` (passed to it as ``ctx``), ``admin_key_header``,
    ``max_connections``, ``connect_timeout``, ``idle_timeout``,
    ``handshake_timeout``, ``identity_threads``.
    """
    server = ScoperServer(identity, engine_socket=engine_socket, **options)
    await server.start(*listen)
    return server
