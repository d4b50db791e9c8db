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


def test_many_lines_are_written_whole_in_writes_no_longer_than_a_pipe_takes_at_once(monkeypatch):
    r, w = os.pipe()
    writes: list[bytes] = []
    real = os.write

    def recording(fd, data):
        writes.append(bytes(data))
        return real(fd, data)
    try:
        lines = logfmt.DirectLines("fdcs.test-many")
        lines.to_fd(w)
        monkeypatch.setattr(os, "write", recording)
        when = 1700000000.25
        texts = [f'{{"n":{i},"pad":"{"x" * 150}"}}' for i in range(60)]  # about 11 KB
        lines.write_many([(when + i, t) for i, t in enumerate(texts)])
        monkeypatch.setattr(os, "write", real)
        got = _read_all(r).splitlines()
        assert [STAMP.sub("", line) for line in got] == [f"INFO fdcs.test-many [{os.getpid()}] {t}" for t in texts]
        # each line stamped with its own time, not the write's
        assert got[0][STAMP.match(got[0]).end() - 4:STAMP.match(got[0]).end() - 1] == "250"
        assert len(writes) >= 3 and all(len(b) <= 4096 and b.endswith(b"\n") for b in writes)
        # control: a few short lines are one write
        writes.clear()
        monkeypatch.setattr(os, "write", recording)
        lines.write_many([(when, "a"), (when, "b")])
        monkeypatch.setattr(os, "write", real)
        assert len(writes) == 1 and _read_all(r).count("\n") == 2
    finally:
        os.close(r)
        os.close(w)
