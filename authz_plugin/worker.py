"""The gunicorn worker that serves the plugin protocol to the engine.

Why not gunicorn's ``gthread`` and Flask: every tenant call pays for two
hooks, and on these machines ``gthread`` (poller, thread-pool futures, a
hand-off per request) plus a WSGI round through Flask cost about 0.7 ms per
hook -- several times what the decision itself costs (see
``docs/PERFORMANCE.rst``).  The engine is the only client (a root-only unix
socket), it sends small ``POST``s with a ``Content-Length`` over a few
kept-alive connections (Go's ``http.Transport``: at most two idle per
plugin), and it waits for each answer before it sends the next request on a
connection.  So this worker gives each connection a thread of its own, reads
the request with a small strict HTTP/1.1 reader, and calls
:class:`authz_plugin.app.Hooks` directly.

Contract:

* a request is ``POST <path> HTTP/1.1`` with at most one ``Content-Length``
  (or ``Transfer-Encoding: chunked``, never both) and a body of at most
  :data:`MAX_BODY` bytes; anything else is answered ``400``/``405``/``413``
  and the connection closed: nothing malformed reaches a decision;
* a path that is not the protocol's is ``404``;
* an exception in a decision never escapes: ``Hooks`` denies on any error;
  a fault here (not there) answers ``500``, which the engine treats as a
  refusal;
* ``Connection: close`` and HTTP/1.0 are honoured; a connection idle for
  ``keepalive`` seconds is closed (Go reopens it);
* gunicorn's contract holds: the main thread accepts and heartbeats
  (``notify``), ``SIGTERM`` stops accepting and lets requests in flight
  finish (up to ``graceful_timeout``), ``SIGQUIT``/``SIGINT`` exit at once,
  and the worker exits when its master goes away;
* at most ``threads`` connections per worker (``plugin.threads``): beyond
  that the worker stops accepting, and the connection waits in the listen
  backlog for another worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import select
import socket
import struct
import threading
import time

from gunicorn.workers.base import Worker

#: the largest hook body read (the engine passes request and response bodies
#: of at most 1 MiB, base64 in JSON, plus headers)
MAX_BODY = 16 << 20
#: the largest request head
MAX_HEAD = 64 << 10

_STATUS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           413: b"Payload Too Large", 500: b"Internal Server Error"}
_MEDIA_TYPE = b"application/vnd.docker.plugins.v1.2+json"
#: the lengths of the header names :meth:`Conn.read` reads (content-length,
#: transfer-encoding, connection): any other header needs no lower-casing
_READ_LENGTHS = frozenset(len(n) for n in (b"content-length", b"transfer-encoding", b"connection"))


class BadRequest(Exception):
    """The request cannot be read; ``status`` is the answer."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


def read_head(head: bytes, read_lengths: frozenset[int] = _READ_LENGTHS) -> tuple[bytes, int | None, bool, bool]:
    """A request head (without its blank line) as ``(path, content_length,
    chunked, keep_alive)``, or :class:`BadRequest`: the module doc's rules.
    Pure: :class:`Conn` remembers its answers (``_HEADS``).
    ``read_lengths``: the lengths of the header names it lower-cases and
    reads (a test passes every length: the loop without its shortcut)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].startswith(b"/"):
        raise BadRequest(400, "bad request line")
    method, path, version = parts
    length: int | None = None
    chunked = False
    keep = version == b"HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.strip() != name:
            raise BadRequest(400, "bad header line")  # also obsolete line folding (leading white space)
        if len(name) not in read_lengths:
            continue  # validated, and none of the three read below: most of the engine's headers
        name, value = name.lower(), value.strip()
        if name == b"content-length":
            if length is not None or not value.isdigit():
                raise BadRequest(400, "bad or repeated Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                raise BadRequest(400, "unsupported Transfer-Encoding")
            chunked = True
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                keep = False
            elif b"keep-alive" in tokens:
                keep = True
    if chunked and length is not None:
        raise BadRequest(400, "both Content-Length and Transfer-Encoding")
    if method != b"POST":
        raise BadRequest(405, "only POST")
    return path, length, chunked, keep


#: :func:`read_head`'s answers for the last heads it read (a dict cleared
#: when it holds ``_HEADS_MAX``): the engine sends the same head again and
#: again -- its plugin client's fixed headers, the hook's path, the body's
#: length -- and each costs a split and a loop over its lines.  Pure: the
#: answer depends on the head's bytes alone and is immutable; a refusal is
#: raised afresh every time.  Heads of at most ``_HEAD_MEMO_MAX`` bytes.
_HEADS: dict[bytes, tuple[bytes, int | None, bool, bool]] = {}
_HEADS_MAX = 256
_HEAD_MEMO_MAX = 1024


class Conn:
    """One engine connection: a strict HTTP/1.1 request reader over a
    blocking socket (pure but for ``recv``)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(262144)
        if not data:
            return False
        self.buf += data
        return True

    def head_end(self) -> int | None:
        """Where the next request's head ends in ``buf`` (reading until it is
        in); None when the peer closed between requests.  Raises
        :class:`BadRequest`."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                return end
            if len(self.buf) > MAX_HEAD:
                raise BadRequest(400, "request head too large")
            if not self._fill():
                if self.buf:
                    raise BadRequest(400, "connection closed inside a request head")
                return None

    def read(self) -> tuple[bytes, bytes, bool] | None:
        """The next request as ``(path, body, keep_alive)``; None when the
        peer closed between requests.  Raises :class:`BadRequest`."""
        end = self.head_end()
        if end is None:
            return None
        buf = self.buf
        head = buf[:end]
        framing = _HEADS.get(head)
        if framing is None:
            framing = read_head(head)  # raises BadRequest: a refusal is never remembered
            if end <= _HEAD_MEMO_MAX:
                if len(_HEADS) >= _HEADS_MAX:
                    _HEADS.clear()
                _HEADS[head] = framing
        path, length, chunked, keep = framing
        start = end + 4
        n = length or 0
        if not chunked and len(buf) - start == n and n <= MAX_BODY:
            # the usual: this request and nothing after it (one copy of the body, not two)
            self.buf = b""
            return path, buf[start:], keep
        self.buf = buf[start:]
        body = self._chunked() if chunked else self._exactly(n)
        return path, body, keep

    def _exactly(self, n: int) -> bytes:
        if n > MAX_BODY:
            raise BadRequest(413, "body too large")
        while len(self.buf) < n:
            if not self._fill():
                raise BadRequest(400, "connection closed inside a body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return body

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            if len(self.buf) > MAX_HEAD or not self._fill():
                raise BadRequest(400, "bad chunked body")

    def _chunked(self) -> bytes:
        out = []
        total = 0
        while True:
            size = self._line().split(b";", 1)[0].strip()
            try:
                n = int(size, 16)
            except ValueError:
                raise BadRequest(400, "bad chunk size") from None
            if n == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return b"".join(out)
            total += n
            if total > MAX_BODY:
                raise BadRequest(413, "body too large")
            out.append(self._exactly(n))
            if self._exactly(2) != b"\r\n":
                raise BadRequest(400, "bad chunk end")


def response(status: int, body: bytes, keep: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n" % (status, _STATUS[status], len(body))
    if status == 200:
        head += b"Content-Type: " + _MEDIA_TYPE + b"\r\n"
    if not keep:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def idle_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking ``sock`` whose ``recv``/``send`` give up after ``seconds``
    (``OSError``: the connection is closed).  The kernel's ``SO_RCVTIMEO``/
    ``SO_SNDTIMEO`` rather than ``settimeout``: Python polls before every
    call on a socket with a timeout, two system calls more per hook."""
    sock.setblocking(True)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class HookWorker(Worker):
    """See the module docstring."""

    def init_process(self):
        self._lock = threading.Lock()
        #: notified (under _lock) whenever a connection ends: room for a new one
        self._room = threading.Condition(self._lock)
        self._conns: set[socket.socket] = set()
        self._busy = 0  # requests being answered
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, self.cfg.threads), thread_name_prefix="conn")
        super().init_process()

    def run(self):
        hooks = self.wsgi.fdcs_hooks  # the app of authz_plugin.app.create_app
        for s in self.sockets:
            s.setblocking(False)
        beat = max(0.2, min(1.0, self.timeout / 4))
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("parent changed, shutting down: %s", self)
                break
            if len(self._conns) >= self.cfg.threads:
                # full: leave new connections in the backlog for other workers
                self._wait_for_room(beat)
                continue
            try:
                ready, _, _ = select.select(self.wait_fds, [], [], beat)
            except InterruptedError:
                continue
            for s in ready:
                if s is self.PIPE[0]:
                    try:
                        os.read(s, 4096)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    conn, _ = s.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # another worker took it
                idle_timeout(conn, self.cfg.keepalive)
                with self._lock:
                    self._conns.add(conn)
                self._pool.submit(self._serve, conn, hooks)
        self._drain()

    def _wait_for_room(self, beat: float) -> None:
        """Until a connection ends, or ``beat`` seconds (the heartbeat)."""
        with self._room:
            self._room.wait_for(lambda: len(self._conns) < self.cfg.threads or not self.alive, beat)

    def _serve(self, sock: socket.socket, hooks) -> None:
        conn = Conn(sock)
        try:
            while self.alive:
                try:
                    req = conn.read()
                except BadRequest as e:
                    self.log.warning("bad request on the plugin socket: %s", e)
                    sock.sendall(response(e.status, str(e).encode(), False))
                    return
                if req is None:
                    return
                path, body, keep = req
                with self._lock:
                    self._busy += 1
                try:
                    try:
                        out = hooks.call(path.decode("latin-1"), body)
                        status, out = (404, b"") if out is None else (200, out)
                    except Exception:  # Hooks denies on any decision error: this is a fault of ours
                        self.log.exception("internal error answering %r", path)
                        status, out, keep = 500, b"internal error", False
                    keep = keep and self.alive
                    sock.sendall(response(status, out, keep))
                finally:
                    with self._lock:
                        self._busy -= 1
                if not keep:
                    return
        except (OSError, TimeoutError):
            pass  # the engine went away, or the connection idled out
        finally:
            with self._room:
                self._conns.discard(sock)
                self._room.notify()
            try:
                sock.close()
            except OSError:
                pass

    def _drain(self) -> None:
        """Stop: let requests in flight finish (up to graceful_timeout), then
        close every connection (idle ones are waiting in ``recv``)."""
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self._busy and time.monotonic() < deadline:
            self.notify()
            time.sleep(0.02)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
