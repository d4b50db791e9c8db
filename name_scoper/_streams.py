"""Byte streams over asyncio transports, with TLS done here rather than by asyncio.

The proxy needs one thing asyncio's streams and SSL transport cannot give:
half-close.  The docker CLI ends a hijacked stream's input (``echo x |
docker run -i ...``) with a TCP ``shutdown(SHUT_WR)`` under its TLS layer and
keeps reading the output; asyncio's SSL transport closes the whole
connection on that EOF and cannot ``write_eof()``.  So TLS is an
:class:`ssl.SSLObject` over memory BIOs (what asyncio does inside, too), on
top of a plain transport that can half-close.

Both stream kinds offer the same small interface, which is all the proxy
uses:

``await recv()``      the next bytes, ``b""`` at EOF (sticky), at most a few
                      hundred KiB; raises :class:`ConnectionError` when the
                      connection was reset;
``write(data)``       queue bytes (raises :class:`ConnectionError` once the
                      connection is lost); ``await drain()`` waits while the
                      transport's buffer is over its high-water mark;
``write_eof()``       half-close (TLS: ``close_notify``, then TCP FIN);
``close()``, ``abort()``;
``on_eof(callback)``  call ``callback()`` once when the peer's FIN or a
                      connection loss is seen at the transport (now, if it
                      already was); ``on_eof(None)`` disarms.  Buffered,
                      unread data does not delay it: it is a hint that the
                      peer went away, used while no one reads.

Backpressure: a stream stops reading from its socket while more than
:data:`READ_LIMIT` bytes are buffered and unread, and ``drain()`` waits while
more than :data:`WRITE_HIGH` bytes are queued for sending, so memory per
connection stays bounded whatever the body sizes.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from typing import Callable

from . import http1

#: largest piece ``TLSStream.recv`` assembles before returning
RECV_SIZE = 64 * 1024
#: unread bytes buffered before the transport stops reading the socket
READ_LIMIT = 256 * 1024
#: queued bytes over which ``drain()`` waits
WRITE_HIGH = 256 * 1024
#: seconds a closed connection may take to deliver what is queued
LINGER = 30.0


class StreamClosed(ConnectionError):
    """The connection is gone; nothing more can be written."""


class RawStream(asyncio.Protocol):
    """A plain (TCP or unix) byte stream; an asyncio protocol.

    Created by a transport factory (``loop.create_unix_connection(RawStream,
    ...)``, ``loop.connect_accepted_socket(RawStream, sock)``).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._exc: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._eof_callback: Callable[[], None] | None = None
        self._eof_seen = False

    # -- protocol callbacks -------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # long-lived streams (events, logs -f, attach) of a client that
                # vanished without a FIN are found by the kernel, not by us
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
            except OSError:  # pragma: no cover - depends on the platform
                pass

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        self._saw_eof()
        return True  # keep the transport open: the peer only half-closed

    def connection_lost(self, exc: BaseException | None) -> None:
        self._eof = True
        self._lost = True
        self._exc = exc
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(StreamClosed("connection lost"))
        self._saw_eof()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _saw_eof(self) -> None:
        self._eof_seen = True
        cb, self._eof_callback = self._eof_callback, None
        if cb is not None:
            cb()

    # -- stream interface -----------------------------------------------------

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def idle_and_open(self) -> bool:
        """Nothing unread, no EOF seen, not lost, not closing: a kept-alive
        connection that may carry another request."""
        return not (self._chunks or self._eof or self._lost or self.transport is None
                    or self.transport.is_closing())

    def on_eof(self, callback: Callable[[], None] | None) -> None:
        if callback is not None and self._eof_seen:
            callback()
            return
        self._eof_callback = callback

    async def recv(self) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._exc is not None:
                    raise StreamClosed(str(self._exc)) from self._exc
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._reading_paused and self._buffered <= READ_LIMIT // 2 and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of what ``recv`` returns next."""
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)

    def write(self, data) -> None:
        if self._lost or self.transport.is_closing():
            raise StreamClosed("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise StreamClosed("connection lost")
        if self._writing_paused:
            if self._drain_waiter is None:
                self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def write_eof(self) -> None:
        if not self._lost and not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self, linger: float = LINGER) -> None:
        """Close after what is queued has been sent; a peer that does not
        read it within ``linger`` seconds gets the connection aborted."""
        if self.transport is not None:
            self.transport.close()
            if not self._lost and self.transport.get_write_buffer_size():
                self._loop.call_later(linger, self.transport.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TLSStream:
    """TLS over a :class:`RawStream`, with the same interface.

    Half-close both ways: a TCP FIN without ``close_notify`` (what the docker
    CLI sends to end stdin, see ``docker/client/hijack.go``) reads as EOF
    when the context has ``OP_IGNORE_UNEXPECTED_EOF`` (:func:`server_context`
    sets it), and writing goes on; ``write_eof()`` sends ``close_notify`` and
    a FIN, and reading goes on (OpenSSL allows it, Go clients keep writing).
    """

    def __init__(self, raw: RawStream, context: ssl.SSLContext, *, server_side: bool = True,
                 server_hostname: str | None = None):
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        self._eof = False
        self._shut = False

    @property
    def lost(self) -> bool:
        return self.raw.lost

    def on_eof(self, callback: Callable[[], None] | None) -> None:
        self.raw.on_eof(callback)

    def _flush(self) -> None:
        if self._out.pending:
            self.raw.write(self._out.read())

    async def handshake(self) -> None:
        """Complete the handshake; raises :class:`ssl.SSLError` or
        :class:`ConnectionError` when it fails."""
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                data = await self.raw.recv()
                if not data:
                    raise StreamClosed("EOF during the TLS handshake")
                self._in.write(data)
            else:
                self._flush()
                return

    def peer_certificate(self):
        return self._obj.getpeercert()

    async def recv(self) -> bytes:
        if self._eof:
            return b""
        parts: list[bytes] = []
        total = 0
        obj = self._obj
        inbio = self._in
        while True:
            # Nothing buffered to decrypt: what read() would say with an
            # exception (one per request), known from the buffers.
            want = not (inbio.pending or inbio.eof or obj.pending())
            if not want:
                try:
                    data = obj.read(RECV_SIZE)
                except ssl.SSLWantReadError:  # a partial record
                    want = True
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                except ssl.SSLError as e:
                    raise StreamClosed(f"TLS error: {e.reason or e}") from e
            if want:
                if parts:
                    break
                self._flush()  # post-handshake messages (key updates) to answer
                chunk = await self.raw.recv()
                if chunk:
                    inbio.write(chunk)
                else:
                    inbio.write_eof()
                continue
            if not data:
                self._eof = True
                break
            parts.append(data)
            total += len(data)
            if total >= RECV_SIZE:
                break
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, data) -> None:
        if self._shut:
            raise StreamClosed("write after write_eof")
        try:
            n = self._obj.write(data)
            while n < len(data):  # pragma: no cover - memory BIOs take all
                data = memoryview(data)[n:]
                n = self._obj.write(data)
        except ssl.SSLError as e:
            raise StreamClosed(f"TLS error: {e.reason or e}") from e
        self._flush()

    async def drain(self) -> None:
        await self.raw.drain()

    def _close_notify(self) -> None:
        if self._shut:
            return
        self._shut = True
        try:
            self._obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, ValueError):
            pass
        try:
            self._flush()
        except StreamClosed:
            pass

    def write_eof(self) -> None:
        self._close_notify()
        self.raw.write_eof()

    def close(self) -> None:
        if not self.raw.lost:
            self._close_notify()
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()


Stream = RawStream | TLSStream


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """The tenant-side TLS context: TLS 1.2+, HTTP/1.1 by ALPN, client
    certificates required when ``client_ca`` is given.  Raises
    :class:`OSError` / :class:`ssl.SSLError` when a file cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    # The docker CLI half-closes hijacked streams below TLS (no close_notify):
    # that must read as the end of stdin, not as an error.
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def open_unix(path: str, timeout: float) -> RawStream:
    """Connect to a unix socket; :class:`OSError` / :class:`TimeoutError` on failure.

    A unix-socket connect is made or refused at once, unless the listener's
    backlog is full (``EAGAIN``): only then is there anything to wait for
    and a timer worth arming.  (One new connection per request: the timer
    and the loop round the common case saves are a few per cent of one.)"""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except BlockingIOError:
        sock.close()
        async with asyncio.timeout(timeout):
            _, proto = await loop.create_unix_connection(RawStream, path)
        return proto
    except BaseException:
        sock.close()
        raise
    try:
        _, proto = await loop.create_unix_connection(RawStream, sock=sock)
    except BaseException:
        sock.close()
        raise
    return proto


async def http_next(conn, stream):
    """The next ``http1`` event of ``conn``, reading ``stream`` as it needs more."""
    while True:
        ev = conn.next_event()
        if ev is http1.NEED_DATA:
            conn.receive_data(await stream.recv())
            continue
        return ev
