"""A copy of the audit trail in Redis, for ``fdcs-manage audit``.

Every audit line (``audit.py``) is also handed to :func:`submit`, which puts
it on a bounded in-process queue and returns at once; one daemon thread per
process takes the lines off in batches and appends them with one pipelined
round trip to the stream :data:`STREAM` (``XADD ... MAXLEN ~ N``, field
``line``: the JSON line, unchanged).  A batch waits up to :data:`LINGER`
seconds after its first line for more (or until it has :data:`BATCH`): a
round trip per decision would cost the plugin's workers more CPU than the
decision itself.

Contract:

* a decision never waits for Redis and never fails because of the stream:
  when the queue is full or Redis refuses, lines are dropped and counted
  (:func:`stats`), and a warning is logged at most once a minute;
* the stream keeps about ``plugin.audit_stream_maxlen`` lines (Redis trims
  whole nodes, hence "about"); 0 disables the copy (:func:`install` does
  nothing and :func:`submit` drops nothing: the lines are only logged);
* fork-safe: the thread is started by the first :func:`submit` in each
  process (gunicorn builds the authorizer after the fork, but a thread of
  a parent would not survive into a child anyway), and started again in a
  child that inherits an installed writer.

The stream is a convenience copy for administrators; the log stays the
record of authority.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

STREAM = "fdcs:audit"
FIELD = "line"
QUEUE_SIZE = 10000
BATCH = 500
#: seconds a batch waits for more lines after its first (the stream lags the log by at most this)
LINGER = 0.2
WARN_EVERY = 60.0


class Writer:
    """The queue and its thread for one Redis client (see module doc)."""

    def __init__(self, client, maxlen: int, queue_size: int = QUEUE_SIZE, linger: float = LINGER):
        self.client = client
        self.maxlen = maxlen
        self.linger = linger
        # a deque and an event rather than queue.Queue: submit() is on every
        # decision's path, and a Queue put takes a lock and wakes the writer
        self.q: collections.deque[str] = collections.deque()
        self.queue_size = queue_size
        self._ready = threading.Event()
        self.written = 0
        self.dropped = 0
        self._pid = -1
        self._lock = threading.Lock()
        self._last_warning = 0.0
        self._pending_warning = ""

    def submit(self, line: str) -> None:
        """Queue one line; never blocks, never raises."""
        if self._pid != os.getpid():
            self._start()
        if len(self.q) >= self.queue_size:
            self._drop(1, "the audit stream queue is full (Redis slow or down)")
            return
        self.q.append(line)  # atomic
        if not self._ready.is_set():
            self._ready.set()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # a fresh queue: a parent's lines are the parent's, and a queue
            # whose lock a parent thread held at the fork would never open
            self.q = collections.deque()
            self._ready = threading.Event()
            threading.Thread(target=self._run, name="audit-stream", daemon=True).start()
            self._pid = os.getpid()

    def _drop(self, n: int, why: str) -> None:
        with self._lock:
            self.dropped += n
            now = time.monotonic()
            if now - self._last_warning < WARN_EVERY:
                return
            self._last_warning = now
            total = self.dropped
        log.warning("audit stream: %s; %d line(s) dropped so far (the log keeps every line)", why, total)

    def _take(self) -> list[str]:
        """Wait for a line, then up to ``linger`` seconds for more (without
        waking per line), and take at most :data:`BATCH`."""
        batch: list[str] = []
        while not batch:  # another taker (a test's) may have emptied the deque meanwhile
            while not self.q:
                self._ready.wait()
                self._ready.clear()
            if self.linger > 0:
                time.sleep(self.linger)
            try:
                while len(batch) < BATCH:
                    batch.append(self.q.popleft())
            except IndexError:
                pass
        return batch

    def flush_once(self) -> int:
        """Write one batch (blocks until a line is queued); returns the
        number written.  The thread's loop body, callable from tests."""
        batch = self._take()
        try:
            pipe = self.client.pipeline(transaction=False)
            for line in batch:
                pipe.xadd(STREAM, {FIELD: line}, maxlen=self.maxlen, approximate=True)
            pipe.execute()
        except Exception as e:  # any Redis failure: drop, count, carry on
            self._drop(len(batch), f"Redis refused the lines ({e.__class__.__name__})")
            return 0
        with self._lock:
            self.written += len(batch)
        return len(batch)

    def _run(self) -> None:
        while True:
            self.flush_once()


_writer: Writer | None = None


def install(client, maxlen: int) -> None:
    """Copy this process's audit lines to Redis through ``client``
    (``maxlen`` 0: no copy).  Called once where the plugin builds its store."""
    global _writer
    if maxlen > 0 and _writer is None:
        _writer = Writer(client, maxlen)


def active() -> bool:
    return _writer is not None


def submit(line: str) -> None:
    w = _writer
    if w is not None:
        w.submit(line)


def stats() -> dict[str, int]:
    """``written`` and ``dropped`` lines of this process (for metrics)."""
    w = _writer
    return {"written": w.written if w else 0, "dropped": w.dropped if w else 0}
