"""A lean RESP2 client for the plugin's hot Redis calls.

Why: an inspect by id costs one ``EVALSHA`` (``ownership._RESOLVE``).  The
round trip itself is ~25-90 us on these machines; redis-py adds ~100 us of
Python per command on top (connection pool, retry object, command packer,
response callbacks).  This client does only what those calls need: one
blocking socket per thread (the plugin's worker runs a thread per kept-alive
engine connection, so a connection is never shared), the command packed by
hand, the replies parsed by ``hiredis.Reader``.

Contract:

* :func:`from_config` returns a client only for what it can speak exactly as
  redis-py would: a ``redis://`` or ``unix://`` URL whose options are host,
  port, path, db, username and password (redis-py's own ``parse_url`` reads
  it).  Sentinel, TLS (``rediss://``) or any other URL option: None, and the
  caller keeps using redis-py;
* every failure raises one of redis-py's exceptions, so that the callers'
  ``except redis.RedisError`` (``ownership.call_redis``) keeps mapping it to
  :class:`~authz_plugin.errors.StoreUnavailable`: a refused connection or a
  broken one (:class:`redis.ConnectionError`), a timeout
  (:class:`redis.TimeoutError`), an error reply (:class:`redis.ResponseError`;
  ``NOSCRIPT`` as :class:`redis.exceptions.NoScriptError`), bytes that are
  not RESP or not UTF-8 (:class:`redis.exceptions.InvalidResponse`);
* after a timeout or any failure but an error reply the thread's connection
  is closed (a late reply must never be read as the next command's);
  the next call connects again;
* a command that is safe to repeat (``retry=True``: the read-only scripts)
  is sent once more on a fresh connection when a *reused* connection turned
  out broken (the server closed an idle connection, Redis restarted); a
  fresh connection's failure is raised at once;
* after ``fork`` a child never uses its parent's connection;
* a password is sent only in ``AUTH`` and never appears in an exception or
  a ``repr``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from typing import Any, Iterable, Mapping, Sequence

import hiredis
import redis
from redis.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import InvalidResponse, NoScriptError

#: the URL options this client honours (what ``redis.connection.parse_url`` returns for them)
_SUPPORTED = frozenset({"host", "port", "db", "username", "password", "path", "connection_class"})
_RECV = 65536


def _bulk(a: Any) -> bytes:
    """One bulk string: ``str`` (and subclasses) as UTF-8, ``bytes`` as they
    are, ``int``/``float`` their ``repr`` (as redis-py sends them); a bool
    or anything else: TypeError."""
    if isinstance(a, str):
        b = a.encode()
    elif isinstance(a, bytes):
        b = a
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        b = repr(a).encode()
    else:
        raise TypeError(f"cannot send a {type(a).__name__} to Redis")
    return b"$%d\r\n%b\r\n" % (len(b), b)


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP2: an array of bulk strings.  ``str`` is UTF-8,
    ``int``/``float`` their decimal text (as redis-py sends them), ``bytes``
    as they are."""
    return b"*%d\r\n" % len(args) + b"".join([_bulk(a) for a in args])


def prefix(args: Sequence[Any], more: int) -> bytes:
    """The packed start of a command of ``len(args) + more`` arguments:
    ``args``, with ``more`` bulk strings (:func:`bulk`) still to follow.
    ``prefix(a, 1) + bulk(x) == pack([*a, x])``: a batch of commands that
    differ only in their last argument is packed once, not per command."""
    return b"*%d\r\n" % (len(args) + more) + b"".join([_bulk(a) for a in args])


#: one argument packed as :func:`pack` packs it (see :func:`prefix`)
bulk = _bulk


def error_of(reply: hiredis.ReplyError) -> redis.ResponseError:
    """An error reply as redis-py raises it (``NOSCRIPT`` -> NoScriptError)."""
    msg = str(reply)
    if msg.startswith("NOSCRIPT"):
        return NoScriptError(msg)
    return redis.ResponseError(msg)


class Script:
    """A Lua script known by its SHA1 (what ``EVALSHA`` names)."""

    __slots__ = ("text", "sha", "_heads")

    def __init__(self, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self._heads: dict[tuple[int, int], bytes] = {}

    def head(self, nargs: int, nkeys: int = 0) -> bytes:
        """The packed start of ``EVALSHA <sha> <nkeys>`` followed by ``nargs``
        arguments (the keys among them)."""
        h = self._heads.get((nargs, nkeys))
        if h is None:
            h = self._heads[(nargs, nkeys)] = prefix(("EVALSHA", self.sha, nkeys), nargs)
        return h


class _Conn:
    __slots__ = ("sock", "reader", "pid")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = hiredis.Reader(encoding="utf-8")
        self.pid = os.getpid()


class LeanRedis:
    """Per-thread RESP2 connections to one Redis server (see the module doc)."""

    def __init__(self, *, host: str = "localhost", port: int = 6379, path: str | None = None, db: int = 0,
                 username: str | None = None, password: str | None = None, timeout: float = 1.0,
                 connect_timeout: float | None = None):
        self.host, self.port, self.path, self.db = host, port, path, int(db)
        self.username = username
        self._password = password
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._local = threading.local()

    def __repr__(self) -> str:  # never the password
        where = self.path if self.path else f"{self.host}:{self.port}"
        return f"LeanRedis({where}, db={self.db})"

    @classmethod
    def from_url(cls, url: str, timeout: float) -> "LeanRedis | None":
        """A client for ``url``, or None when the URL asks for anything but
        host, port, path, db, username and password (TLS, socket options...)."""
        try:
            kw = parse_url(url)
        except ValueError:
            return None
        if set(kw) - _SUPPORTED:
            return None
        cc = kw.pop("connection_class", None)
        if cc is not None and cc is not UnixDomainSocketConnection:
            return None  # rediss:// (SSLConnection) and anything else redis-py would wrap
        if cc is UnixDomainSocketConnection and not kw.get("path"):
            return None
        return cls(timeout=timeout, **kw)

    # -- connections --------------------------------------------------------------------

    def connect_socket(self) -> socket.socket:
        """A new blocking socket to this server, before any command (the
        kernel's timeouts set); redis-py's exceptions on failure."""
        where = self.path or f"{self.host}:{self.port}"
        try:
            if self.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.connect_timeout)
                    sock.connect(self.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (socket.timeout, TimeoutError) as e:
            raise redis.TimeoutError(f"Timeout connecting to {where}") from e
        except OSError as e:
            raise redis.ConnectionError(f"Error {e.errno} connecting to {where}. {e.strerror}.") from e
        # the kernel's timeouts on a blocking socket rather than settimeout():
        # Python polls before every call on a socket with a timeout, two
        # system calls more per round trip (a timeout then raises
        # BlockingIOError, read as redis.TimeoutError in _roundtrip)
        sock.setblocking(True)
        secs, usecs = int(self.timeout), int((self.timeout % 1) * 1e6)
        # (0, 0) would mean "no timeout" to the kernel: the least it takes instead
        tv = struct.pack("ll", secs, usecs if secs or usecs else 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        return sock

    def _connect(self) -> _Conn:
        conn = _Conn(self.connect_socket())
        hello = self.handshake()
        if hello:
            try:
                for reply in self._roundtrip(conn, b"".join(pack(c) for c in hello), len(hello)):
                    if isinstance(reply, hiredis.ReplyError):
                        # a wrong password or db: the server's words, never ours (no secret in them)
                        raise redis.ConnectionError(f"Redis refused the connection set-up: {reply}")
            except BaseException:
                self._close(conn)
                raise
        return conn

    def handshake(self) -> list[tuple[Any, ...]]:
        """The commands a new connection sends before any other (``AUTH``,
        ``SELECT``), in order; every reply must be ``OK``.  For a client of
        the same Redis on an event loop (``name_scoper._redis``)."""
        hello: list[tuple[Any, ...]] = []
        if self._password is not None:
            hello.append(("AUTH", self.username, self._password) if self.username else ("AUTH", self._password))
        if self.db:
            hello.append(("SELECT", self.db))
        return hello

    def _get(self) -> tuple[_Conn, bool]:
        """This thread's connection and whether it was just opened."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.pid == os.getpid():
            return conn, False
        # none yet, or the parent's (after fork: leave its socket to the parent)
        self._local.conn = None
        conn = self._connect()
        self._local.conn = conn
        return conn, True

    def _close(self, conn: _Conn) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        if conn.pid == os.getpid():
            try:
                conn.sock.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close this thread's connection (if any)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._close(conn)

    # -- the wire -----------------------------------------------------------------------

    def _roundtrip(self, conn: _Conn, payload: bytes, n: int) -> list[Any]:
        """Send ``payload`` and read ``n`` replies (error replies returned as
        ``hiredis.ReplyError``).  Raises redis-py's exceptions; the caller
        closes the connection on any of them."""
        sock, reader = conn.sock, conn.reader
        try:
            sock.sendall(payload)
            out: list[Any] = []
            while len(out) < n:
                reply = reader.gets()
                if reply is False:
                    data = sock.recv(_RECV)
                    if not data:
                        raise redis.ConnectionError("Connection closed by server.")
                    reader.feed(data)
                    continue
                out.append(reply)
            return out
        except (socket.timeout, TimeoutError, BlockingIOError) as e:  # BlockingIOError: SO_RCVTIMEO/SO_SNDTIMEO
            raise redis.TimeoutError("Timeout reading from socket") from e
        except hiredis.ProtocolError as e:
            raise InvalidResponse(f"Protocol error: {e}") from e
        except UnicodeDecodeError as e:
            raise InvalidResponse("Redis answered bytes that are not UTF-8") from e
        except OSError as e:
            raise redis.ConnectionError(f"Error while talking to Redis: {e.__class__.__name__}") from e

    def pipeline(self, commands: Sequence[Sequence[Any]], retry: bool = False) -> list[Any]:
        """Send ``commands`` in one write and return their replies in order;
        an error reply is returned in its place as a ``redis.ResponseError``
        instance (not raised).  ``retry``: the commands are safe to run
        twice (see the module doc)."""
        if not commands:
            return []
        return self._send(len(commands), b"".join([pack(c) for c in commands]), retry)

    def pipeline_packed(self, n: int, payload: bytes, retry: bool = False) -> list[Any]:
        """:meth:`pipeline` of ``n`` commands already packed into ``payload``
        (:func:`pack`, or :func:`prefix` and :func:`bulk`)."""
        if not n:
            return []
        return self._send(n, payload, retry)

    def _send(self, n: int, payload: bytes, retry: bool) -> list[Any]:
        """Send ``payload`` (``n`` packed commands) and return their replies."""
        conn, fresh = self._get()
        try:
            raw = self._roundtrip(conn, payload, n)
        except redis.ConnectionError:
            self._close(conn)
            if fresh or not retry:
                raise
            conn, _ = self._get()
            try:
                raw = self._roundtrip(conn, payload, n)
            except BaseException:
                self._close(conn)
                raise
        except BaseException:
            self._close(conn)
            raise
        for r in raw:
            if isinstance(r, hiredis.ReplyError):
                return [error_of(r) if isinstance(r, hiredis.ReplyError) else r for r in raw]
        return raw  # no error reply: the list as it came (one object less per call)

    def execute(self, *args: Any, retry: bool = False) -> Any:
        """One command; an error reply is raised."""
        reply = self.pipeline([args], retry=retry)[0]
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def evalsha_many(self, script: Script, argvs: Iterable[Sequence[Any]], keys: Sequence[str] = (),
                     retry: bool = True) -> list[Any]:
        """Run ``script`` once per ``argv`` (``EVALSHA sha numkeys keys... argv...``)
        in one round trip; returns the replies.  A script the server does not
        know (``NOSCRIPT``: Redis restarted, ``SCRIPT FLUSH``) is loaded and
        the batch sent once more; any other error reply is raised.  ``retry``
        defaults to True: only read-only scripts belong here."""
        # packed once (each command's head by the script) and, after a
        # NOSCRIPT, sent again as it is
        packed_keys = [_bulk(k) for k in keys]
        payload = [script.head(len(keys) + len(argv), len(keys)) + b"".join(packed_keys + [_bulk(a) for a in argv])
                   for argv in argvs]
        return self.evalsha_packed(script, len(payload), b"".join(payload), retry)

    def evalsha_packed(self, script: Script, n: int, payload: bytes, retry: bool = True) -> list[Any]:
        """:meth:`evalsha_many` of ``n`` ``EVALSHA`` commands of ``script``
        already packed into ``payload`` (each :meth:`Script.head` then its
        bulk strings, :func:`bulk`): for a caller that packs its constant
        arguments once.  The same ``NOSCRIPT`` load and resend, the same
        errors."""
        replies = self._send(n, payload, retry)
        for r in replies:
            if isinstance(r, redis.ResponseError):
                break
        else:
            return replies
        if any(isinstance(r, NoScriptError) for r in replies):
            sha = self.execute("SCRIPT", "LOAD", script.text, retry=True)
            if sha != script.sha:
                raise InvalidResponse("SCRIPT LOAD answered another SHA1 than the script's")
            replies = self._send(n, payload, retry)
        for r in replies:
            if isinstance(r, redis.ResponseError):
                raise r
        return replies


def from_config(cfg: Mapping[str, Any]) -> LeanRedis | None:
    """The lean client for the configured Redis, or None (Sentinel, TLS,
    URL options it does not speak: redis-py is used as before)."""
    if cfg["redis.sentinels"] or not cfg["redis.url"]:
        return None
    return LeanRedis.from_url(cfg["redis.url"], timeout=float(cfg["redis.timeout"]))
