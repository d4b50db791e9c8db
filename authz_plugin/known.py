"""Container references resolved by Redis, kept while Redis says none of the
records the answer read has changed.

Why: a container inspect by id (the CLI's short ids, the full ids that
docker-compose and docker-py send) costs the plugin one ``EVALSHA`` of
``ownership._RESOLVE`` per request: the round trip, the script, the
worker's wake-up.  A per-worker memory kept for a fixed time was tried and
reverted (docs/PERFORMANCE.rst, seventh round): a removal recorded by
another worker, a container removed by ``--rm``, a new Redis run without the
records must all be seen by the very next request.  Redis can say when a
record changed: *client tracking* in broadcasting mode (Redis >= 6) pushes an
``invalidate`` message on a connection whenever a key with one of its
prefixes is written, deleted, expired, evicted or flushed, by anyone.

What is kept: a container reference's answer ``id``, ``name`` or ``prefix``
(never ``none``: it also reads whether the records are complete on this
Redis run).  Those answers read only the keys ``ownership.resolve_reads``
lists (the ownership and host hashes, this host's names, unowned names and
id index), so while none of those keys changed, Redis would answer the same.

Why the next read sees every change: Redis queues a broadcast invalidation
while it runs the writing command and, before replying to anyone, writes the
invalidations first (``beforeSleep``: ``trackingBroadcastInvalidationMessages``
before ``handleClientsWithPendingWrites``; a client with output is put at the
head of the list of those to write).  So by the time the writer (another
worker's response hook, the reconciler) has its reply, the invalidation is in
this process's socket buffer, and the read that follows the writer's
request in time finds it.  With Redis's I/O threads on (``io-threads`` > 1;
off by default), the two writes may be made by two threads at once.

Contract (:class:`KnownRefs`):

* one connection per process to the same Redis as the lean client (same
  address, ``AUTH`` and ``SELECT``), in RESP3 with ``CLIENT TRACKING ON
  BCAST`` and one ``PREFIX`` per tracked key; it sends no other command
  but ``PING`` (below), so anything it receives but ``PONG`` is an
  invalidation;
* before every answer from the memory and before every answer is kept, the
  connection is read without blocking, under the memory's lock: anything
  but ``PONG`` (an invalidation, a flush, bytes that are not RESP) empties
  the memory; end of file or an error (Redis stopped, restarted,
  restored from a snapshot, failed over, killed the connection) empties it,
  closes the connection and stops all use of the memory until a new one is
  set up -- a new Redis run always starts empty;
* Redis must be heard: the watcher thread sends ``PING`` on the connection
  every ``timeout / 4`` seconds, and the memory answers only while the last
  ``PONG`` is less than ``timeout`` (``redis.timeout``, what a read waits
  before "ownership store unavailable") old.  A Redis that is stopped,
  hung or cut off by a partition without a close is therefore "unavailable"
  to kept answers as soon as to a read; when it is heard again, the memory
  starts empty;
* an answer is kept only if the same connection was open and silent from
  before the ``EVALSHA`` that gave it was sent until after its reply was
  read (:meth:`begin` returns a generation, :meth:`keep` checks it): a
  change made while the read was in flight is never missed;
* the watcher thread also waits (``select``, without reading) for the
  connection to become readable and then drains it under the lock, so
  that an idle worker neither lets Redis buffer invalidations without bound
  nor keeps a stale answer;
* when Redis refuses tracking (older than 6, a proxy, ``CLIENT`` renamed
  away) the memory is off for the process's life and a warning is logged
  once; when it cannot connect, it tries again at most once per second, and
  meanwhile every read asks Redis as before;
* at most ``size`` answers, the oldest forgotten first; after ``fork`` a
  child never uses its parent's connection or answers.

Not reported by Redis 7.0, so not to be used on an FDCS Redis while plugins
run: ``SWAPDB`` (the scale benchmark, which swaps databases under a running
plugin, turns the memory off).

Suspension, roles and everything but a container reference are decided as
before; only where Redis would be asked the same question again does the
memory answer in its place.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable, Hashable

import hiredis

from . import resp

log = logging.getLogger(__name__)

RECONNECT_DELAY = 1.0
_DRAIN = 65536
_PING = resp.pack(("PING",))


class KnownRefs:
    """Answers kept while Redis reports no write to ``prefixes`` (module doc).

    Thread-safe; one per process is enough (:class:`~authz_plugin.ownership.Store`
    makes one).  ``connect``: a function returning a connected, blocking
    socket to Redis; ``handshake``: the commands to send before ``HELLO``
    (``AUTH``, ``SELECT``), each answered ``OK``; ``prefixes``: the keys
    (prefixes of keys) whose writes end every kept answer, none a prefix of
    another (Redis refuses overlapping prefixes).
    """

    def __init__(self, connect: Callable[[], socket.socket], prefixes: tuple[str, ...],
                 handshake: list[tuple] | None = None, size: int = 4096, timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._connect = connect
        self.prefixes = tuple(prefixes)
        self._handshake = list(handshake or ())
        self.size = size
        self.timeout = timeout  # a PONG older than this: Redis is not heard, nothing answered
        self.heartbeat = timeout / 4
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: dict[Hashable, Any] = {}
        self._sock: socket.socket | None = None
        self._reader: hiredis.Reader | None = None
        self._pong = 0.0  # when Redis last answered (self._clock)
        self._gen = 0  # +1 whenever the memory is emptied or the connection changes
        self._retry_at = 0.0
        self.off = False  # Redis refused tracking: never again in this process
        self._watcher: threading.Thread | None = None
        # a child of fork starts with nothing of its parent's: no socket, no
        # answers, a lock no dead thread may hold
        after = weakref.WeakMethod(self._after_fork)
        os.register_at_fork(after_in_child=lambda: (m := after()) is not None and m())

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._sock, self._reader, self._kept, self._watcher = None, None, {}, None
        self._gen += 1

    @classmethod
    def for_lean(cls, lean: resp.LeanRedis, prefixes: tuple[str, ...], size: int = 4096) -> "KnownRefs":
        """A memory on the server ``lean`` speaks to, with its credentials
        and its timeout."""
        return cls(lean.connect_socket, prefixes, lean.handshake(), size=size, timeout=lean.timeout)

    # -- the two calls of a read --------------------------------------------------------

    def begin(self, key: Hashable) -> tuple[int | None, Any]:
        """``(generation, answer)``: the answer kept for ``key`` (None: ask
        Redis) and the generation to pass to :meth:`keep` after asking
        (None: nothing may be kept now)."""
        with self._lock:
            gen = self._sync()
            if gen is None:
                return None, None
            return gen, self._kept.get(key)

    def keep(self, gen: int | None, key: Hashable, answer: Any) -> None:
        """Keep ``answer`` (not None) for ``key``: Redis's answer to a read
        begun at generation ``gen``, unless anything changed since."""
        if gen is None:
            return
        with self._lock:
            if self._sync() != gen:
                return
            kept = self._kept
            if key not in kept and len(kept) >= self.size:
                del kept[next(iter(kept))]  # the oldest (dicts keep insertion order)
            kept[key] = answer

    def __len__(self) -> int:
        return len(self._kept)

    # -- the connection (always under the lock) -----------------------------------------

    def _forget(self) -> None:
        if self._kept:
            self._kept.clear()
        self._gen += 1

    def _drop(self, why: str) -> None:
        sock, self._sock, self._reader = self._sock, None, None
        self._forget()
        if sock is not None:
            log.info("the ownership memory's Redis connection %s; kept answers forgotten", why)
            try:
                sock.close()
            except OSError:
                pass

    def _sync(self) -> int | None:
        """Read what Redis pushed; the generation to answer and keep under,
        or None when there is no tracking connection or Redis is not heard."""
        sock = self._sock
        if sock is None:
            if self.off or self._clock() < self._retry_at:
                return None
            sock = self._open()
            if sock is None:
                return None
        reader = self._reader
        while True:
            try:
                data = sock.recv(_DRAIN, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self._drop("closed")
                return None
            reader.feed(data)
            try:
                while (reply := reader.gets()) is not False:
                    if reply == "PONG":
                        self._pong = self._clock()
                    else:  # an invalidation (or a flush): forget everything
                        self._forget()
            except (hiredis.ProtocolError, UnicodeDecodeError):
                self._drop("sent bytes that are not RESP")
                return None
        if self._clock() - self._pong > self.timeout:
            self._forget()  # not heard: answer nothing until it is (and start empty then)
            return None
        return self._gen

    def _open(self) -> socket.socket | None:
        """Set up the tracking connection; None when it cannot be (and why is logged)."""
        self._retry_at = self._clock() + RECONNECT_DELAY
        try:
            sock = self._connect()
        except Exception as e:  # Redis down: asked as before, tried again later
            log.debug("ownership memory: cannot connect to Redis (%s)", e.__class__.__name__)
            return None
        try:
            commands = [*self._handshake, ("HELLO", "3"),
                        ("CLIENT", "TRACKING", "ON", "BCAST", *[a for p in self.prefixes for a in ("PREFIX", p)])]
            replies = _exchange(sock, commands, self.timeout)
        except Exception as e:
            sock.close()
            log.debug("ownership memory: Redis connection failed during set-up (%s)", e.__class__.__name__)
            return None
        for cmd, reply in zip(commands, replies):
            if isinstance(reply, hiredis.ReplyError):
                sock.close()
                if cmd[0] in ("AUTH", "SELECT"):
                    return None  # the lean client's own calls report this
                self.off = True
                log.warning("Redis refused client tracking (%s: %s); the plugin asks Redis about every "
                            "container reference (with Redis 6 or newer and CLIENT allowed it keeps answers)",
                            cmd[0], reply)
                return None
        self._sock, self._reader = sock, hiredis.Reader(encoding="utf-8")
        self._pong = self._clock()  # (it just answered)
        self._forget()  # (nothing kept before this connection counts)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="fdcs-known-refs", daemon=True)
            self._watcher.start()
        return sock

    def _watch(self) -> None:
        """Every ``heartbeat``: ``PING``; in between, wait for pushed bytes
        without reading them, and drain them under the lock."""
        me = threading.current_thread()
        while self._watcher is me:
            with self._lock:
                sock = self._sock
                if sock is not None:
                    try:
                        sock.send(_PING, socket.MSG_DONTWAIT)  # (a few bytes: never more than the buffer)
                    except OSError:
                        self._drop("failed")
                        sock = None
            if sock is None:
                time.sleep(self.heartbeat)
                continue
            until = time.monotonic() + self.heartbeat
            while (left := until - time.monotonic()) > 0:
                try:
                    ready, _, _ = select.select([sock], [], [], left)
                except (OSError, ValueError):  # closed meanwhile by a request's drain
                    break
                if ready:
                    with self._lock:
                        if self._sock is not sock:
                            break
                        self._sync()


def _exchange(sock: socket.socket, commands: list[tuple], timeout: float) -> list:
    """Send ``commands`` and read as many replies (RESP3), within ``timeout`` each."""
    sock.settimeout(timeout)
    sock.sendall(b"".join(resp.pack(c) for c in commands))
    reader = hiredis.Reader(encoding="utf-8")
    out: list = []
    while len(out) < len(commands):
        reply = reader.gets()
        if reply is False:
            data = sock.recv(_DRAIN)
            if not data:
                raise ConnectionError("closed during set-up")
            reader.feed(data)
            continue
        out.append(reply)
    sock.setblocking(True)
    return out
