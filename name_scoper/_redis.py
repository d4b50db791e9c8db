"""Redis on the scoper's event loop: a read that does not stop the loop.

A container list's answer is filtered by the ownership records (one
``HMGET``, :func:`authz_plugin.ownership.owners_command`).  Made with the
plugin's blocking client (``authz_plugin.resp.LeanRedis``) that round trip
stopped the whole event loop -- every other tenant connection waited for
it -- for a quarter of the scoper's time under a load of lists.  This
client makes the same commands on the loop: one connection per process,
commands pipelined, replies taken in order by ``hiredis``.

Contract (the lean client's, :mod:`authz_plugin.resp`):

* built from a ``LeanRedis`` (:meth:`AsyncRedis.of`): the same server, db,
  credentials (its ``handshake``: ``AUTH``, ``SELECT``, each answered
  ``OK``, or :class:`redis.ConnectionError`) and timeout;
* every failure raises one of redis-py's exceptions, which the caller maps
  as ``ownership.store_error`` does: a connection refused or lost
  (:class:`redis.ConnectionError`), no reply within the timeout
  (:class:`redis.TimeoutError`), bytes that are not RESP or not UTF-8
  (:class:`redis.exceptions.InvalidResponse`); an error reply is raised as
  :func:`authz_plugin.resp.error_of` gives it;
* after a timeout or any failure but an error reply the connection is
  closed and every command waiting on it fails (a late reply must never be
  read as the next command's); the next command connects again;
* ``retry=True`` (read-only commands): a command whose *reused* connection
  turned out closed (Redis restarted, dropped an idle client) is sent once
  more on a new one; a new connection's failure is raised at once;
* the password is only ever sent in ``AUTH``, never logged or shown.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import socket
from typing import Any

import hiredis
import redis
from redis.exceptions import InvalidResponse

from authz_plugin import resp


class _Conn(asyncio.Protocol):
    """One connection: replies handed to the waiting commands in order.

    Each command's reply is due ``timeout`` seconds after it was sent: ONE
    timer per connection watches the oldest command still waiting (a timer
    armed and cancelled per command cost more than the rest of it), and
    fails the connection when that one is late -- the later ones, behind it
    on the same connection, are then late too."""

    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8")
        #: (the command's future, loop time its reply is due by), oldest first;
        #: a cancelled command keeps its place until its reply comes
        self.waiting: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self.closed = False
        #: it has carried a command already (a failure may be a stale connection's)
        self.used = False
        self.timeout = timeout
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        reader.feed(data)
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if not waiting:
                    raise InvalidResponse("Redis sent a reply no command waits for")
                fut = waiting.popleft()[0]
                if not fut.done():
                    fut.set_result(reply)
        except hiredis.ProtocolError as e:
            self.fail(InvalidResponse(f"Protocol error: {e}"))
        except UnicodeDecodeError:
            self.fail(InvalidResponse("Redis answered bytes that are not UTF-8"))
        except InvalidResponse as e:
            self.fail(e)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.fail(redis.ConnectionError("Connection closed by server."))

    def fail(self, error: redis.RedisError) -> None:
        """Close, and fail every command waiting here with ``error``."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
        waiting, self.waiting = self.waiting, collections.deque()
        for fut, _ in waiting:
            if not fut.done():
                fut.set_exception(error)

    def send(self, payload: bytes) -> asyncio.Future:
        """Send one packed command; its future gets the reply, or the
        connection's failure (:class:`redis.TimeoutError` when late)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        due = loop.time() + self.timeout
        self.waiting.append((fut, due))
        self.transport.write(payload)
        if self._timer is None:
            self._timer = loop.call_at(due, self._watch)
        return fut

    def _watch(self) -> None:
        """The timer: fail a late connection, else watch its oldest command."""
        self._timer = None
        if not self.waiting or self.closed:
            return
        due = self.waiting[0][1]
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self.fail(redis.TimeoutError("Timeout reading from socket"))
        else:
            self._timer = loop.call_at(due, self._watch)


class AsyncRedis:
    """Commands to one Redis on the running event loop (see the module doc)."""

    def __init__(self, lean: resp.LeanRedis):
        self._lean = lean
        self.timeout = lean.timeout
        self._conn: _Conn | None = None
        self._connecting: asyncio.Future | None = None

    @classmethod
    def of(cls, lean: resp.LeanRedis | None) -> "AsyncRedis | None":
        return None if lean is None else cls(lean)

    def __repr__(self) -> str:
        return f"AsyncRedis({self._lean!r})"

    async def _connect(self) -> _Conn:
        lean = self._lean
        loop = asyncio.get_running_loop()
        where = lean.path or f"{lean.host}:{lean.port}"
        try:
            async with asyncio.timeout(lean.connect_timeout):
                make = functools.partial(_Conn, self.timeout)
                if lean.path:
                    _, conn = await loop.create_unix_connection(make, lean.path)
                else:
                    _, conn = await loop.create_connection(make, lean.host, lean.port)
        except TimeoutError as e:
            raise redis.TimeoutError(f"Timeout connecting to {where}") from e
        except OSError as e:
            raise redis.ConnectionError(f"Error {e.errno} connecting to {where}. {e.strerror}.") from e
        hello = lean.handshake()
        if hello:
            futs = [conn.send(resp.pack(c)) for c in hello]
            try:
                for fut in futs:
                    reply = await fut
                    if isinstance(reply, hiredis.ReplyError):
                        # a wrong password or db: the server's words, never ours (no secret in them)
                        raise redis.ConnectionError(f"Redis refused the connection set-up: {reply}")
            except BaseException:
                conn.fail(redis.ConnectionError("connection set-up failed"))
                raise
        return conn

    async def _get(self) -> _Conn:
        """The live connection; while one is being opened, every caller
        waits for that one (a caller that gives up does not stop it)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._conn = fut.result()

    async def execute(self, *args: Any, retry: bool = False) -> Any:
        """One command's reply; an error reply is raised (see the module doc)."""
        payload = resp.pack(args)
        for attempt in (1, 2):
            conn = await self._get()
            reused, conn.used = conn.used, True
            try:
                reply = await conn.send(payload)
            except redis.ConnectionError:
                if attempt == 1 and retry and reused:
                    continue
                raise
            if isinstance(reply, hiredis.ReplyError):
                raise resp.error_of(reply)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(redis.ConnectionError("client closed"))
