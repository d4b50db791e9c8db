"""The engine side of the proxy: unix-socket connections in HTTP/1.1 (``http1``).

:class:`Upstream` is one request/response exchange on a connection to the
engine; :class:`EnginePool` keeps the connections of exchanges that ended
cleanly (both messages complete, kept alive, nothing unread) for the next
request, one request at a time.  Reuse cannot carry a tenant's bytes to the
engine: every request is re-serialized here with this proxy's own framing,
and a connection whose exchange ended any other way (an error, a body the
engine did not read, a hijack, a stream the client left) is closed, never
reused.  The engine decides on every request by its own headers (the
authorization plugin is asked per request, not per connection).
:class:`EngineClient` is the ``Engine`` callable of
``exchange.py``: a whole sub-request, made with the caller's own
authentication headers so that the authorization plugin decides on it as on
the caller's own request.
"""

from __future__ import annotations

import asyncio
from typing import Iterable

from authz_plugin.errors import Unavailable

from . import http1
from ._streams import RawStream, StreamClosed, http_next, open_unix
from .exchange import MAX_RESPONSE_JSON, Headers

#: the largest request or response head accepted (headers included)
MAX_HEAD = 64 * 1024

MSG_ENGINE_UNAVAILABLE = "the Docker engine is unavailable, retry"

#: headers that belong to one connection and are never passed on (RFC 9110
#: 7.6.1), plus the framing and expectation headers the proxy sets itself
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"content-length", b"expect",
})

#: the caller's headers an engine sub-request carries
SUBREQUEST_HEADERS = (b"x-auth-token", b"x-auth-tenantid", b"x-request-id")


async def read_capped(next_event, limit: int, broken) -> bytes | None:
    """Collect one message body (``http1`` events): the bytes, or None when it is over
    ``limit``; any other event raises ``broken()``."""
    parts: list[bytes] = []
    size = 0
    while True:
        ev = await next_event()
        kind = type(ev)
        if kind is http1.Data:
            size += len(ev.data)
            if size > limit:
                return None
            parts.append(ev.data)
        elif kind is http1.EndOfMessage:
            return b"".join(parts)
        else:
            raise broken()


class EngineUnavailable(Unavailable):
    """The engine's socket is missing, refuses, or the engine broke off."""

    status = 502
    reason = "engine-unavailable"

    def __init__(self, message: str = MSG_ENGINE_UNAVAILABLE):
        super().__init__(message)


def end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> Headers:
    """``headers`` (lower-case names) without hop-by-hop headers, without the
    headers the ``Connection`` header names, and without the names in ``drop``."""
    headers = list(headers)
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named and n not in drop]


class Upstream:
    """One exchange with the engine on its own connection."""

    __slots__ = ("stream", "http", "reused")

    def __init__(self, stream: RawStream):
        self.stream = stream
        self.http = http1.Connection(http1.CLIENT, max_incomplete_event_size=MAX_HEAD)
        #: kept alive from an earlier exchange (the engine may have closed it since)
        self.reused = False

    @classmethod
    async def connect(cls, path: str, timeout: float) -> "Upstream":
        try:
            return cls(await open_unix(path, timeout))
        except (OSError, TimeoutError) as e:
            raise EngineUnavailable() from e

    def send(self, event) -> None:
        data = self.http.send(event)
        if data:
            self.stream.write(data)

    async def next_event(self):
        """The next ``http1`` event from the engine; :class:`EngineUnavailable`
        when the engine breaks the protocol or the connection."""
        try:
            return await http_next(self.http, self.stream)
        except (http1.RemoteProtocolError, StreamClosed) as e:
            raise EngineUnavailable() from e

    def buffered_event(self):
        """The next ``http1`` event from what was already read (no I/O), or
        ``http1.NEED_DATA``; :class:`EngineUnavailable` as :meth:`next_event`."""
        try:
            return self.http.next_event()
        except http1.RemoteProtocolError as e:
            raise EngineUnavailable() from e

    async def response_head(self):
        """The engine's :class:`http1.Response`, or its ``101``
        :class:`http1.InformationalResponse`; other 1xx answers are dropped."""
        while True:
            ev = await self.next_event()
            kind = type(ev)
            if kind is http1.Response:
                return ev
            if kind is http1.InformationalResponse:
                if ev.status_code == 101:
                    return ev
                continue
            raise EngineUnavailable()

    async def read_body(self, limit: int) -> bytes | None:
        """The whole response body, or None when it is over ``limit`` bytes."""
        return await read_capped(self.next_event, limit, EngineUnavailable)

    def buffered_body(self) -> bytes:
        """Body bytes already read after a close-delimited response head
        (the engine's old ``200`` raw stream), for the raw copy to send first."""
        parts = []
        while True:
            ev = self.http.next_event()
            if type(ev) is http1.Data:
                parts.append(ev.data)
            else:
                return b"".join(parts)

    def close(self) -> None:
        self.stream.close()

    def abort(self) -> None:
        self.stream.abort()

    def reusable(self) -> bool:
        """Both messages complete and kept alive, nothing unread."""
        h = self.http
        return (h.our_state is http1.DONE and h.their_state is http1.DONE and not h.trailing_data[0]
                and self.stream.idle_and_open)


class EnginePool:
    """The engine connections of cleanly ended exchanges, for reuse.

    :meth:`get` gives the most recently released live connection (not idle
    for more than ``idle_seconds``; one the engine closed meanwhile is
    dropped), else a new one; :meth:`release` keeps a connection whose
    exchange ended cleanly (:meth:`Upstream.reusable`), up to ``max_idle``,
    and aborts any other.  A connection is never shared: it is in the pool
    or in one exchange."""

    def __init__(self, path: str, connect_timeout: float, max_idle: int = 64, idle_seconds: float = 10.0):
        self.path = path
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        #: (connection, loop time it was released), oldest first
        self._idle: list[tuple[Upstream, float]] = []

    async def get(self, reuse: bool = True) -> Upstream:
        """A connection for one exchange (a kept-alive one only when
        ``reuse``); :class:`EngineUnavailable` when none can be made."""
        idle = self._idle
        if idle and reuse:
            loop = asyncio.get_running_loop()
            now = loop.time()
            while idle:
                up, since = idle.pop()
                if now - since <= self.idle_seconds and up.stream.idle_and_open:
                    up.http.start_next_cycle()
                    up.reused = True
                    return up
                up.abort()
        return await Upstream.connect(self.path, self.connect_timeout)

    def release(self, up: Upstream) -> None:
        """Keep ``up`` for a next exchange if it may carry one, else abort it."""
        idle = self._idle
        now = asyncio.get_running_loop().time()
        while idle and now - idle[0][1] > self.idle_seconds:  # the oldest first
            idle.pop(0)[0].abort()
        if len(idle) < self.max_idle and up.reusable():
            idle.append((up, now))
        else:
            up.abort()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for up, _ in idle:
            up.abort()


class EngineClient:
    """The ``Engine`` of ``exchange.py`` for one caller: each call is one
    sub-request on its own connection, with the caller's ``X-Auth-Token``,
    ``X-Auth-TenantId`` and ``X-Request-Id``.

    Returns ``(status, headers, body)`` (header names lower case); raises
    :class:`EngineUnavailable` when the engine cannot be reached or does not
    answer within ``timeout`` seconds, or answers more than
    ``MAX_RESPONSE_JSON`` bytes.
    """

    def __init__(self, path: str, caller_headers: Headers, connect_timeout: float,
                 timeout: float = 120.0):
        self._path = path
        self._auth = [(n, v) for n, v in caller_headers if n in SUBREQUEST_HEADERS]
        self._connect_timeout = connect_timeout
        self._timeout = timeout

    async def __call__(self, method: str, target: str, body: bytes | None = None
                       ) -> tuple[int, Headers, bytes]:
        headers = [(b"host", b"docker"), (b"user-agent", b"fdcs-name-scoper"), *self._auth,
                   (b"connection", b"close")]
        if body is not None:
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body))]
        try:
            async with asyncio.timeout(self._timeout):
                up = await Upstream.connect(self._path, self._connect_timeout)
                try:
                    up.send(http1.Request(method=method, target=target, headers=headers))
                    if body:
                        up.send(http1.Data(data=body))
                    up.send(http1.EndOfMessage())
                    head = await up.response_head()
                    if head.status_code == 101:
                        raise EngineUnavailable()
                    data = await up.read_body(MAX_RESPONSE_JSON)
                    if data is None:
                        raise EngineUnavailable("the Docker engine's answer is too large")
                    return head.status_code, list(head.headers), data
                finally:
                    up.close()
        except TimeoutError as e:
            raise EngineUnavailable() from e
        except StreamClosed as e:
            raise EngineUnavailable() from e
