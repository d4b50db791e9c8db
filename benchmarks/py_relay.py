#!/usr/bin/env python3
"""The cheapest TLS front door Python can be: a byte relay from TLS clients
to the engine's unix socket.  A reference for ``scoper_inspect.py``, not a
product.

    python3 benchmarks/py_relay.py --listen 127.0.0.1:PORT --cert PEM --key PEM
                                   [--client-ca PEM] --engine SOCKET [--parent PID]

What it does, and nothing more:

* uvloop's event loop; ``loop.create_server(ssl=ctx)`` -- uvloop's own TLS
  (OpenSSL through a memory BIO, in C), with the context the name scoper's
  listener uses (``name_scoper._streams.server_context``, imported: the only
  piece of the product here): TLS 1.2+, ALPN ``http/1.1``, client
  certificates required when ``--client-ca`` is given, an unexpected EOF
  read as the end of the stream;
* per accepted client connection, ONE unix-socket connection to the engine,
  opened at accept and kept for the client connection's life (the engine's
  keep-alive; HAProxy opens one per request, the scoper reuses kept-alive
  ones for reads);
* bytes relayed both ways by :class:`asyncio.Protocol` callbacks:
  ``data_received`` writes to the other transport.  No streams, no tasks
  per message, no parsing, no policy, no rewriting, no logging per request;
* flow control: a transport whose write buffer passes its high-water mark
  pauses reading on the other side (``pause_writing`` ->
  ``pause_reading``), until it drains (``resume_writing`` ->
  ``resume_reading``);
* either side ending ends the other: the engine's EOF closes the client
  connection after what is buffered is sent; the client's EOF half-closes
  the engine connection; a lost connection closes the other.

Any HTTP proxy in Python that forwards these requests does at least this
work, so its latency and CPU per request are a floor for the scoper on this
machine.  SIGTERM or SIGINT: stop listening, close every connection, exit 0.
``--parent PID``: also exit when that process is gone (the benchmark that
started it was killed), checked once a second and by ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import ssl
import sys

import uvloop

# the scoper listener's own TLS context: the same protocol versions, options and ALPN
from name_scoper._streams import server_context


class _Side(asyncio.Protocol):
    """One end of a relayed pair: what it receives goes to ``peer``'s
    transport; its own transport's back-pressure pauses ``peer``'s reading."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.close()  # sends what is buffered, then closes


class _Engine(_Side):
    """The engine side: its EOF ends the client connection (a TLS transport
    cannot half-close), once what is buffered is sent."""

    def eof_received(self):
        self.peer.transport.close()
        return False


class _Tenant(_Side):
    """The client side (TLS): at accept, opens its engine connection and
    reads nothing until it is up; the client's EOF half-closes it."""

    def __init__(self, engine_socket: str, conns: set) -> None:
        super().__init__()
        self.engine_socket = engine_socket
        self.conns = conns

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conns.add(self)
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        engine = _Engine()
        engine.peer = self  # before it can receive anything
        try:
            await asyncio.get_running_loop().create_unix_connection(lambda: engine, self.engine_socket)
        except OSError:
            self.transport.abort()
            return
        if self.transport.is_closing():  # the client went while we connected
            engine.transport.close()
            return
        self.peer = engine
        self.transport.resume_reading()

    def eof_received(self):
        if self.peer is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return False  # a TLS transport closes itself after EOF either way

    def connection_lost(self, exc) -> None:
        self.conns.discard(self)
        super().connection_lost(exc)


def _exit_with_parent() -> None:
    """Ask the kernel for SIGTERM when the process that started us exits
    (a parent gone before this call is caught by ``serve``'s watcher)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def serve(host: str, port: int, ctx: ssl.SSLContext, engine_socket: str, parent: int | None) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    conns: set[_Tenant] = set()
    server = await loop.create_server(lambda: _Tenant(engine_socket, conns), host, port, ssl=ctx,
                                      reuse_address=True, backlog=1024)
    print(f"py-relay pid {os.getpid()}: TLS on {host}:{port} -> unix://{engine_socket}", flush=True)

    async def watch_parent() -> None:
        while parent is not None:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                stop.done() or stop.set_result(None)
                return
            await asyncio.sleep(1.0)

    watcher = loop.create_task(watch_parent())
    try:
        await stop
    finally:
        watcher.cancel()
        server.close()
        for c in list(conns):
            c.transport.abort()
            if c.peer is not None:
                c.peer.transport.abort()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--cert", required=True, help="server certificate (PEM)")
    ap.add_argument("--key", required=True, help="server key (PEM)")
    ap.add_argument("--client-ca", default="", help="require client certificates chaining to this CA")
    ap.add_argument("--engine", required=True, metavar="SOCKET", help="the engine's unix socket")
    ap.add_argument("--parent", type=int, metavar="PID", help="exit when this process is gone")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        ap.error(f"--listen: expected HOST:PORT, got {args.listen!r}")
    ctx = server_context(args.cert, args.key, args.client_ca)
    if args.parent is not None:
        _exit_with_parent()
    # a name resolved once here, not per accept
    host = socket.gethostbyname(host)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, int(port), ctx, args.engine, args.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
