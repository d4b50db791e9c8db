"""A queue drained in batches by one background thread per process.

What the plugin's buffered metrics (``metrics._Buffer``) and the audit
stream's writer (``audit_stream.Writer``) share: the request threads
:meth:`Lingering.put` an item (a deque append, plus setting an event for
the first item after a batch: never blocks, never takes a lock once the
thread runs); a daemon thread waits for the first item, lingers
``linger`` seconds so that a burst makes one batch, takes at most
:attr:`Lingering.batch_max` items and hands them to
:meth:`Lingering.process` (the subclass's: apply, write).

Contract:

* :meth:`put` starts the thread at its first call in each process; with
  ``maxsize`` it refuses (returns False, queues nothing) while that many
  items wait;
* fork-safe: a forked child starts with a fresh lock, event and an empty
  queue (the parent's items are the parent's; a lock or event a parent
  thread held at the fork would never open), and its own thread at its
  first :meth:`put`.  Both an at-fork handler and the pid check in
  :meth:`put` see to it (a fork that skipped Python's handlers included);
* :meth:`flush` processes what is queued now, in the calling thread;
  :meth:`stop` ends this process's thread (after the batch in hand) and
  then flushes the rest; with ``flush_at_exit`` the process's exit flushes
  too (the thread is a daemon: it does not hold the exit up);
* a :meth:`process` that raises never ends the thread (logged at debug:
  the subclasses catch and count what they care about).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref

log = logging.getLogger(__name__)

_instances: "weakref.WeakSet[Lingering]" = weakref.WeakSet()


class Lingering:
    """The queue and its thread (see the module doc).  Subclasses define
    :meth:`process`; the class attributes tune them."""

    #: the thread's name (in py-spy dumps and logs)
    thread_name = "lingering"
    #: at most this many items per batch (None: everything queued)
    batch_max: int | None = None
    #: process what is left when the process exits
    flush_at_exit = False

    def __init__(self, linger: float, maxsize: int | None = None):
        self.linger = linger
        self.maxsize = maxsize
        # a deque and an event rather than queue.Queue: put() is on every
        # request's path, and a Queue put takes a lock and wakes the thread
        self.q: collections.deque = collections.deque()
        self._ready = threading.Event()
        self._lock = threading.Lock()  # the thread's start (subclasses may share it)
        self._pid = -1  # the process whose thread drains q (-1: none yet)
        self._thread: threading.Thread | None = None
        self._stopping = False
        _instances.add(self)

    def process(self, batch: list):
        """Apply or write one non-empty batch (the subclass's)."""
        raise NotImplementedError

    # -- the request threads' side -------------------------------------------------------

    def put(self, item) -> bool:
        """Queue ``item``; False (nothing queued) when ``maxsize`` items wait.
        Never blocks, never raises."""
        if self._pid != os.getpid():
            self._start()
        if self.maxsize is not None and len(self.q) >= self.maxsize:
            return False
        self.q.append(item)  # atomic
        if not self._ready.is_set():
            self._ready.set()
        return True

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # a fresh queue: a parent's items are the parent's, and an event
            # a parent thread held at the fork would never open
            self.q = collections.deque()
            self._ready = threading.Event()
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
            self._pid = os.getpid()
            if self.flush_at_exit:
                atexit.register(self._at_exit, self._pid)

    def after_fork_in_child(self) -> None:
        """A forked child: fresh lock, event and queue, no thread yet."""
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.q = collections.deque()
        self._thread = None
        self._pid = -1

    # -- the thread's side ---------------------------------------------------------------

    def take(self) -> list:
        """Wait for an item, then ``linger`` seconds for more (without waking
        per item), and take at most :attr:`batch_max`; [] once stopping."""
        batch: list = []
        while not batch:  # another taker (flush, a test) may have emptied the deque meanwhile
            while not self.q:
                if self._stopping:
                    return batch
                self._ready.wait()
                # items queued from here on set the event again (none is lost:
                # the loop looks at the deque before it waits)
                self._ready.clear()
            if self.linger > 0:
                time.sleep(self.linger)
            try:
                while self.batch_max is None or len(batch) < self.batch_max:
                    batch.append(self.q.popleft())
            except IndexError:
                pass
        return batch

    def drain(self) -> list:
        """Everything queued now, without waiting."""
        batch = []
        q = self.q
        while True:
            try:
                batch.append(q.popleft())
            except IndexError:
                return batch

    def _run(self) -> None:
        while not self._stopping:
            batch = self.take()
            if batch:
                self._guarded(batch)

    def _guarded(self, batch: list) -> None:
        try:
            self.process(batch)
        except Exception:  # the thread must outlive any fault of a batch
            log.debug("%s: processing a batch failed", self.thread_name, exc_info=True)

    # -- ending --------------------------------------------------------------------------

    def flush(self) -> None:
        """Process everything queued now, in the calling thread; never raises."""
        batch = self.drain()
        if batch:
            self._guarded(batch)

    def stop(self, timeout: float = 5.0) -> bool:
        """End this process's thread (it finishes the batch in hand), then
        flush what is left.  True when no thread of this process still runs.
        Items put afterwards wait for :meth:`flush`."""
        self._stopping = True
        self._ready.set()
        t = self._thread
        ended = True
        if t is not None and self._pid == os.getpid() and t is not threading.current_thread():
            t.join(timeout)
            ended = not t.is_alive()
        self.flush()
        return ended

    def _at_exit(self, pid: int) -> None:
        if pid == os.getpid():
            self.flush()


def _after_fork_in_child() -> None:
    for x in list(_instances):
        x.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
