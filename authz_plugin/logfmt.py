"""The daemons' one log format, and the hot lines written without ``logging``.

``fdcs-authz``, ``fdcs-name-scoper`` and ``fdcs-reconciler`` log to stderr
(journald, or the devstack's files) in :data:`LOG_FORMAT`.  Two kinds of
line come once per request -- the plugin's audit line per decision, the
scoper's access line per request -- and there ``logging`` (a record, the
formatter, the handler's lock and flush) cost as much as the work the line
describes.  :class:`DirectLines` writes such a line itself, byte for byte
as the formatter would, with one ``write``, and only while its logger is
enabled for INFO: the operator's log level and format still rule.
"""

from __future__ import annotations

import logging
import os
import random
import select
import sys
import time

#: ``logging``'s format of every FDCS daemon
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure(level: str) -> None:
    """Log to stderr in :data:`LOG_FORMAT` at ``level`` (a level name; an
    unknown one means INFO), without the per-record lookups the format does
    not show (the logging HOWTO's "Optimization")."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format=LOG_FORMAT)


def new_request_id() -> str:
    """16 hex digits naming a request in logs and messages.  Not a secret (a
    client may name its requests itself, ``X-Request-Id``): Python's
    generator, reseeded in each forked child, not a system call per request."""
    return f"{random.getrandbits(64):016x}"


class DirectLines:
    """INFO lines of the logger ``name``, in :data:`LOG_FORMAT`.

    Until :meth:`to_fd` they go through ``logging`` (tests, library use);
    after it, straight to that file descriptor.  Either way only while the
    logger is enabled for INFO."""

    __slots__ = ("log", "_fd", "_level_name")

    def __init__(self, name: str):
        self.log = logging.getLogger(name)
        self._fd: int | None = None
        self._level_name = f"INFO {name}"

    def to_fd(self, fd: int | None) -> None:
        """Write to ``fd`` from now on (None: through ``logging`` again).
        Set before a fork holds in the children (the pid is each line's)."""
        self._fd = fd

    def enabled(self) -> bool:
        return self.log.isEnabledFor(logging.INFO)

    def write(self, text: str) -> None:
        """One line (``text`` holds no newline); the caller checked :meth:`enabled`."""
        if self._fd is None:
            self.log.info(text)
            return
        os.write(self._fd, self._line(time.time(), text))

    def _line(self, when: float, text: str) -> bytes:
        """The formatter's line of ``text`` stamped ``when`` (``time.time()``)."""
        return f"{_stamp(int(when))},{int(when % 1 * 1000):03d} {self._level_name} [{_pid}] {text}\n".encode()

    def write_many(self, lines: list[tuple[float, str]]) -> None:
        """Lines written at once, each ``(time.time() it is stamped with,
        text)``, in order; the caller checked :meth:`enabled`.  To a file
        descriptor in as few ``write`` calls as hold whole lines of at most
        ``PIPE_BUF`` bytes each: a pipe's reader (journald, a log shipper)
        never sees a line of these cut by another writer's bytes."""
        if self._fd is None:
            for _, text in lines:
                self.log.info(text)
            return
        chunk: list[bytes] = []
        size = 0
        for when, text in lines:
            line = self._line(when, text)
            if chunk and size + len(line) > _PIPE_BUF:
                os.write(self._fd, b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            os.write(self._fd, b"".join(chunk))


#: the longest write a pipe takes whole, never interleaved with another's (POSIX's minimum)
_PIPE_BUF = getattr(select, "PIPE_BUF", 512)


# what each line repeats, not recomputed per line: the second's time stamp
# (strftime/localtime) and this process's id (a system call; kept by an
# at-fork handler)
_pid = os.getpid()
_last: tuple[int, str] = (-1, "")


def _stamp(second: int) -> str:
    global _last
    last = _last
    if last[0] != second:
        last = _last = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
    return last[1]


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)
