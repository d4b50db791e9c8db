"""authz_plugin.logfmt: a line written directly reads as logging's own."""

from __future__ import annotations

import logging
import os
import re

from authz_plugin import logfmt

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536).decode()
    except BlockingIOError:
        return ""


def test_a_direct_line_is_the_formatter_s_line_and_obeys_the_level():
    r, w = os.pipe()
    try:
        name = "fdcs.test-direct"
        log = logging.getLogger(name)
        handler = logging.StreamHandler(os.fdopen(os.dup(w), "w", buffering=1))
        handler.setFormatter(logging.Formatter(logfmt.LOG_FORMAT))
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
        lines = logfmt.DirectLines(name)
        # through logging (not yet sent to a descriptor): the reference line
        assert lines.enabled()
        lines.write('{"a":1}')
        lines.to_fd(w)
        lines.write('{"a":1}')
        reference, direct = _read_all(r).splitlines()
        assert STAMP.match(reference) and STAMP.match(direct)
        assert STAMP.sub("", reference) == STAMP.sub("", direct) == f'INFO {name} [{os.getpid()}] {{"a":1}}'
        # a WARNING level turns the lines off (the caller asks enabled() first)
        log.setLevel(logging.WARNING)
        assert not lines.enabled()
        handler.close()
        log.removeHandler(handler)
    finally:
        os.close(r)
        os.close(w)
