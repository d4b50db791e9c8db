"""An allow-all Docker AuthZ plugin, written to cost as little as possible.

    python3 benchmarks/allow_all_plugin.py --socket /run/docker/plugins/NAME.sock [--redis URL]

It is the floor of ``plugin_inspect.py``: an engine started with
``--authorization-plugin=NAME`` and this plugin pays for the engine's plugin
machinery (two HTTP round trips per API call: ``AuthZReq`` before,
``AuthZRes`` after, each with the request -- and for the second the
response body -- JSON-encoded and base64'd by the engine) and for nothing
else.

HTTP/1.1 on a unix socket, one thread per connection, keep-alive: each
request is read just far enough to find its length (``Content-Length`` or
chunked) and answered with a constant: ``/Plugin.Activate`` with
``{"Implements":["authz"]}``, everything else with ``{"Allow":true}``.  The
body is never parsed.  Runs until SIGTERM/SIGINT; removes its socket then.

The floor of a decision that needs one Redis round trip (``--redis URL``,
``redis://[:password@]host[:port][/db]`` or ``unix://path[?db=N]``): a
request hook (``/AuthZPlugin.AuthZReq``) whose body holds the marker
``"X-Bench-Redis":"1"`` -- the client sent the header ``X-Bench-Redis: 1``,
which the engine passes on in ``RequestHeaders`` -- is answered only after
one ``EVALSHA`` of the script ``return 1`` (no keys, no arguments) came
back ``:1`` on a Redis connection of its own for the hook's duration (taken
from a list of idle ones, opened when none is idle, put back after the
reply; blocking, ``TCP_NODELAY``, 5 s ``SO_RCVTIMEO``/``SO_SNDTIMEO``).
That is the round trip an FDCS inspect by id makes (one ``EVALSHA`` of its
resolve script on its thread's connection, ``authz_plugin.resp``, the
threads pooled so that their connections outlive the engine's connections,
which dockerd closes and reopens beyond two at a time) without the work FDCS
does around it: the command is a constant, the reply is read as bytes and
compared with a constant.  ``EVALSHA`` rather than ``GET``:
FDCS's look-up is conditional and multi-key (id, name, prefix, owner) and
must be one atomic round trip, which takes a script; the floor pays
Redis's script dispatch as FDCS does, not FDCS's script body.  A ``NOSCRIPT``
reply loads the script (``SCRIPT LOAD``) and sends it again; any other
failure answers ``{"Allow":false}`` with the reason, so the benchmark's
client sees the error instead of a figure.  Unmarked hooks (and every
response hook) pay one bytes search of the request hook's body, nothing
else.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import struct
import sys
import threading
import urllib.parse

MEDIA_TYPE = b"application/vnd.docker.plugins.v1.2+json"


def _reply(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + MEDIA_TYPE
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


ACTIVATE = _reply(b'{"Implements":["authz"]}')
ALLOW = _reply(b'{"Allow":true}')
REQUEST_HOOK = b"/AuthZPlugin.AuthZReq"
#: what ``X-Bench-Redis: 1`` becomes in the hook's JSON (Go's canonical header
#: name, ``encoding/json`` of ``RequestHeaders``: no spaces)
MARKER = b'"X-Bench-Redis":"1"'


def _command(*args: bytes) -> bytes:
    """One RESP2 command: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


SCRIPT = b"return 1"
EVALSHA = _command(b"EVALSHA", hashlib.sha1(SCRIPT).hexdigest().encode(), b"0")
SCRIPT_LOAD = _command(b"SCRIPT", b"LOAD", SCRIPT)
TIMEOUT = struct.pack("ll", 5, 0)  # struct timeval: 5 s


def _redis_reply(sock: socket.socket) -> bytes:
    """One reply of a simple kind (status, error, integer: one line; a bulk
    string: two), as bytes with its CRLFs."""
    data = sock.recv(4096)
    while True:
        if not data:
            raise OSError("Redis closed the connection")
        lines = 2 if data[:1] == b"$" and not data.startswith(b"$-1") else 1
        if data.count(b"\r\n") >= lines and data.endswith(b"\r\n"):
            return data
        more = sock.recv(4096)
        if not more:
            raise OSError("Redis closed the connection")
        data += more


class RedisPool:
    """Idle connections to one Redis, shared by the serving threads: a hook
    takes one (or opens one) and gives it back after a good reply; a broken
    one is closed instead.  ``list.pop``/``append`` are atomic under the GIL."""

    __slots__ = ("connect", "idle")

    def __init__(self, url: str):
        self.connect = redis_connector(url)
        self.idle: list[socket.socket] = []

    def take(self) -> socket.socket:
        try:
            return self.idle.pop()
        except IndexError:
            return self.connect()

    def give(self, sock: socket.socket) -> None:
        self.idle.append(sock)


def redis_connector(url: str):
    """A function opening a new connection to the Redis at ``url``
    (``redis://`` or ``unix://``; password and db as redis-py reads them),
    authenticated and on its db."""
    u = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(u.query)
    if u.scheme == "redis":
        db = int(u.path.strip("/") or query.get("db", ["0"])[0])
    elif u.scheme == "unix":
        db = int(query.get("db", ["0"])[0])
    else:
        raise ValueError(f"unsupported Redis URL scheme {u.scheme!r} (redis:// or unix://)")
    hello = []
    if u.password is not None:
        pw = urllib.parse.unquote(u.password).encode()
        hello.append(_command(b"AUTH", urllib.parse.unquote(u.username).encode(), pw) if u.username
                     else _command(b"AUTH", pw))
    if db:
        hello.append(_command(b"SELECT", b"%d" % db))

    def connect() -> socket.socket:
        if u.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = u.path
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in (u.hostname or "") else socket.AF_INET,
                                 socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            addr = (u.hostname or "localhost", u.port or 6379)
        try:
            # a blocking socket with kernel timeouts: no poll before each call
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEOUT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, TIMEOUT)
            sock.connect(addr)
            for cmd in hello:
                sock.sendall(cmd)
                reply = _redis_reply(sock)
                if not reply.startswith(b"+OK"):
                    raise OSError(f"Redis refused the connection set-up: {reply[:80]!r}")
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def round_trip(sock: socket.socket) -> None:
    """One ``EVALSHA`` of ``return 1``; raises unless it answers ``:1``."""
    sock.sendall(EVALSHA)
    reply = _redis_reply(sock)
    if reply == b":1\r\n":
        return
    if reply.startswith(b"-NOSCRIPT"):  # a new or flushed Redis: load it once, then as before
        sock.sendall(SCRIPT_LOAD)
        _redis_reply(sock)
        sock.sendall(EVALSHA)
        reply = _redis_reply(sock)
        if reply == b":1\r\n":
            return
    raise OSError(f"Redis answered {reply[:80]!r}")


def _deny(why: str) -> bytes:
    msg = why.replace("\\", "/").replace('"', "'")
    return _reply(b'{"Allow":false,"Msg":"allow-all: %b"}' % msg.encode("ascii", "replace"))


class Reader:
    """HTTP/1.1 messages read off a stream socket, just far enough to find
    where each ends (also used by ``plugin_inspect.py``'s client)."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def _until(self, sep: bytes) -> bytes:
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            start = max(0, len(self.buf) - len(sep) + 1)
            self._fill()

    def _take(self, n: int, keep: bool) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n]) if keep else b""
        del self.buf[:n]
        return out

    def head(self) -> tuple[bytes, dict[bytes, bytes]]:
        """The start line and the headers (names lower-cased); EOFError at
        the end of the stream."""
        lines = self._until(b"\r\n\r\n").split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        return lines[0], headers

    def body(self, headers: dict[bytes, bytes], keep: bool = True) -> bytes:
        """The body (``Content-Length`` or chunked; none otherwise)."""
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            parts = []
            while True:
                size = int(self._until(b"\r\n").split(b";", 1)[0], 16)
                if size == 0:
                    while self._until(b"\r\n"):  # trailers, then the empty line
                        pass
                    return b"".join(parts)
                parts.append(self._take(size, keep))
                self._take(2, False)
        n = int(headers.get(b"content-length", b"0") or 0)
        return self._take(n, keep) if n else b""


def _serve(sock: socket.socket, pool: RedisPool | None) -> None:
    r = Reader(sock)
    try:
        while True:
            start, headers = r.head()
            target = start.split(b" ", 2)[1] if start.count(b" ") >= 2 else b""
            if target == REQUEST_HOOK and MARKER in r.body(headers, keep=True):
                answer = ALLOW
                rds = None
                try:
                    if pool is None:
                        raise OSError("a marked request, but this plugin was started without --redis")
                    rds = pool.take()
                    round_trip(rds)
                    pool.give(rds)
                except (OSError, ValueError) as e:
                    answer = _deny(f"the Redis round trip failed: {e}")
                    if rds is not None:
                        rds.close()
                sock.sendall(answer)
            else:
                if target != REQUEST_HOOK:
                    r.body(headers, keep=False)
                sock.sendall(ACTIVATE if target == b"/Plugin.Activate" else ALLOW)
            if b"close" in headers.get(b"connection", b"").lower():
                return
    except (EOFError, OSError, ValueError):
        return
    finally:
        sock.close()


def serve(path: str, redis_url: str | None = None) -> None:
    pool = RedisPool(redis_url) if redis_url else None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = os.umask(0o077)
    try:
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
    finally:
        os.umask(old)
    lsock.listen(128)

    def stop(_sig, _frm):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=_serve, args=(conn, pool), daemon=True).start()
    finally:
        lsock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="unix socket to listen on (/run/docker/plugins/NAME.sock)")
    ap.add_argument("--redis", metavar="URL",
                    help="Redis for the request hooks marked X-Bench-Redis: 1 (one EVALSHA each)")
    args = ap.parse_args(argv)
    serve(args.socket, args.redis)
    return 0


if __name__ == "__main__":
    sys.exit(main())
