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

import logging
import time

from . import resp
from .lingering import Lingering

log = logging.getLogger(__name__)

STREAM = "fdcs:audit"
FIELD = "line"
QUEUE_SIZE = 10000
BATCH = 500
#: seconds a batch waits for more lines after its first (the stream lags the log by at most this)
LINGER = 0.2
WARN_EVERY = 60.0


class Writer(Lingering):
    """The queue and its thread for one Redis client (see module doc; the
    queue, the thread and fork: :class:`~authz_plugin.lingering.Lingering`)."""

    thread_name = "audit-stream"
    batch_max = BATCH

    def __init__(self, client, maxlen: int, queue_size: int = QUEUE_SIZE, linger: float = LINGER,
                 lean=None):
        super().__init__(linger, maxsize=queue_size)
        self.client = client
        #: ``resp.LeanRedis`` for the same Redis, when the plugin has one: a
        #: batch packed by hand, several times cheaper than redis-py's pipeline
        self.lean = lean
        self.maxlen = maxlen
        self.written = 0
        self.dropped = 0
        self._last_warning = 0.0
        #: every line's XADD but the line itself, packed once (the lean
        #: client's batch: a tenth of packing each command whole, and the
        #: thread holds the GIL -- which the serving threads wait for --
        #: that much less per batch)
        self._xadd = resp.prefix(("XADD", STREAM, "MAXLEN", "~", maxlen, "*", FIELD), 1)

    def submit(self, line: str) -> None:
        """Queue one line; never blocks, never raises."""
        if not self.put(line):
            self._drop(1, "the audit stream queue is full (Redis slow or down)")

    def _drop(self, n: int, why: str) -> None:
        with self._lock:
            self.dropped += n
            now = time.monotonic()
            if now - self._last_warning < WARN_EVERY:
                return
            self._last_warning = now
            total = self.dropped
        log.warning("audit stream: %s; %d line(s) dropped so far (the log keeps every line)", why, total)

    def flush_once(self) -> int:
        """Write one batch (blocks until a line is queued); returns the
        number written.  The thread's loop body, callable from tests."""
        batch = self.take()
        return self.process(batch) if batch else 0  # []: stopping

    def process(self, batch: list[str]) -> int:
        """Append ``batch`` in one pipelined round trip; the number written
        (0: dropped and counted, Redis refused)."""
        try:
            if self.lean is not None:
                # never resent (retry=False): an XADD twice is a line twice
                head, bulk = self._xadd, resp.bulk
                replies = self.lean.pipeline_packed(len(batch), b"".join([head + bulk(line) for line in batch]))
                refused = next((r for r in replies if isinstance(r, Exception)), None)
                if refused is not None:
                    raise refused
            else:
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


_writer: Writer | None = None


def install(client, maxlen: int, lean=None) -> None:
    """Copy this process's audit lines to Redis through ``client`` (or
    ``lean``, a ``resp.LeanRedis`` for the same Redis, when given;
    ``maxlen`` 0: no copy).  Called once where the plugin builds its store."""
    global _writer
    if maxlen > 0 and _writer is None:
        _writer = Writer(client, maxlen, lean=lean)


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
