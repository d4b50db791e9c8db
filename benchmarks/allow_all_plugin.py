"""An allow-all Docker AuthZ plugin, written to cost as little as possible.

    python3 benchmarks/allow_all_plugin.py --socket /run/docker/plugins/NAME.sock

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
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

MEDIA_TYPE = b"application/vnd.docker.plugins.v1.2+json"


def _reply(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + MEDIA_TYPE
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


ACTIVATE = _reply(b'{"Implements":["authz"]}')
ALLOW = _reply(b'{"Allow":true}')


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


def _serve(sock: socket.socket) -> None:
    r = Reader(sock)
    try:
        while True:
            start, headers = r.head()
            r.body(headers, keep=False)
            target = start.split(b" ", 2)[1] if start.count(b" ") >= 2 else b""
            sock.sendall(ACTIVATE if target == b"/Plugin.Activate" else ALLOW)
            if b"close" in headers.get(b"connection", b"").lower():
                return
    except (EOFError, OSError, ValueError):
        return
    finally:
        sock.close()


def serve(path: str) -> None:
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
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()
    finally:
        lsock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="unix socket to listen on (/run/docker/plugins/NAME.sock)")
    serve(ap.parse_args(argv).socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
