"""The lingering queue (authz_plugin/lingering.py) that the buffered metrics
and the audit stream's writer share: batches after a linger, at most
``batch_max``, a bounded queue refuses, a faulty batch never ends the
thread, ``stop`` ends it and flushes the rest, a forked child starts empty
with its own thread, exit flushes when asked."""

from __future__ import annotations

import os
import threading
import time

import pytest

from authz_plugin.lingering import Lingering


class Recorder(Lingering):
    thread_name = "test-lingering"

    def __init__(self, linger: float = 0.05, maxsize: int | None = None, batch_max: int | None = None):
        super().__init__(linger, maxsize)
        if batch_max is not None:
            self.batch_max = batch_max
        self.batches: list[list] = []
        self.fail = False

    def process(self, batch: list) -> None:
        if self.fail:
            raise RuntimeError("broken sink")
        self.batches.append(batch)


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture
def rec():
    r = Recorder()
    yield r
    r.stop()


def test_a_burst_becomes_one_batch_after_the_linger(rec):
    for i in range(100):
        assert rec.put(i)
    wait_for(lambda: sum(map(len, rec.batches)) == 100)
    assert [x for b in rec.batches for x in b] == list(range(100))  # in order, none lost
    assert len(rec.batches) <= 2  # lingered: not a batch per item
    rec.put("again")  # the next burst after a batch wakes the thread again
    wait_for(lambda: rec.batches[-1] == ["again"])


def test_batches_hold_at_most_batch_max_and_a_full_queue_refuses():
    r = Recorder(linger=0, maxsize=5, batch_max=2)
    r._pid = os.getpid()  # no thread: this test takes the batches itself
    assert all(r.put(i) for i in range(5))
    assert r.put(5) is False and len(r.q) == 5  # refused, nothing queued
    assert r.take() == [0, 1] and r.take() == [2, 3] and r.take() == [4]
    assert r.put(6)  # positive control: room again
    assert r.drain() == [6] and r.drain() == []


def test_a_faulty_batch_never_ends_the_thread(rec):
    rec.fail = True
    rec.put("lost")
    wait_for(lambda: not rec.q)  # taken, and its processing failed
    rec.fail = False
    rec.put("kept")
    wait_for(lambda: rec.batches == [["kept"]])
    assert rec._thread.is_alive()


def test_stop_ends_the_thread_and_flushes_the_rest():
    r = Recorder(linger=0.3)
    r.put(1)
    assert r._thread.is_alive() and len(threads_named("test-lingering")) >= 1
    r.put(2)
    t0 = time.monotonic()
    assert r.stop() is True
    assert time.monotonic() - t0 < 2
    assert not r._thread.is_alive()
    assert [x for b in r.batches for x in b] == [1, 2]  # nothing left behind
    r.put(3)  # after stop: queued, not drained by a thread
    time.sleep(0.4)  # longer than the linger: a live thread would have taken it
    assert list(r.q) == [3]
    r.flush()
    assert r.batches[-1] == [3] and not r.q


def test_stop_before_any_put_is_harmless():
    r = Recorder()
    assert r.stop() is True and r.batches == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_empty_with_its_own_thread():
    r = Recorder(linger=10)  # the parent's thread lingers: its item is still queued at the fork
    r.put("parent")
    wait_for(lambda: r._ready.is_set() is False)  # the parent's thread is lingering
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once (os._exit: no pytest teardown)
        code = 1
        try:
            fresh = list(r.q) == [] and r._pid == -1 and r._thread is None
            r.linger = 0
            r.put("child")
            wait_for(lambda: r.batches[-1:] == [["child"]], 5)
            own = r._thread is not None and r._thread.is_alive() and r._pid == os.getpid()
            os.write(wr, b"ok" if fresh and own and ["parent"] not in r.batches else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(wr)
    try:
        got = os.read(rd, 16)
    finally:
        os.close(rd)
        _, status = os.waitpid(pid, 0)
    assert got == b"ok" and os.waitstatus_to_exitcode(status) == 0
    assert list(r.q) == ["parent"]  # the parent's item stays the parent's
    r.flush()
    assert r.batches == [["parent"]]
    assert r.stop(timeout=0.1) is False  # its thread still lingers: stop says so, without waiting 10 s


_EXIT = r"""
import sys
from authz_plugin.lingering import Lingering
class Out(Lingering):
    flush_at_exit = {flag}
    def process(self, batch):
        sys.stdout.write(",".join(batch) + "\n")
        sys.stdout.flush()
o = Out(linger=30)
o.put("a"); o.put("b")
"""


@pytest.mark.parametrize("flag", [True, False])
def test_exit_flushes_only_when_asked(flag):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _EXIT.format(flag=flag)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out == ("a,b\n" if flag else "")
