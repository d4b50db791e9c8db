"""Container references' answers kept while Redis reports no change to
what they read (authz_plugin/known.py, through ``Store.resolve``).

A real ``redis-server`` (client tracking is what is tested; fakeredis has
none).  Every test that shows a kept answer is not used has its positive
control: the same sequence without the change answers from the memory.
Nothing waits for an invalidation: Redis writes it before the writer's own
reply (see the module's docstring), so the very next read must see it.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from authz_plugin import resp
from authz_plugin.errors import StoreUnavailable
import re

from authz_plugin import ownership
from authz_plugin.known import KnownRefs
from authz_plugin.ownership import Resolution, Store, resolve_reads
from tests.unit.conftest import cfg
from tests.unit.test_resp import RedisServer, needs_redis, server  # noqa: F401 -- (server: a fixture)

pytestmark = needs_redis

C1, C2, C3 = "a1" * 32, "b2" * 32, "c3" * 32


def _evalshas(server) -> int:
    return int(server.client().info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def _store(server, size: int = 4096, timeout: float = 1.0, clock=time.monotonic) -> Store:
    """Host h1's plugin store with the memory (as ``KnownRefs.for_lean``
    makes it, with ``clock``), records complete."""
    lean = resp.LeanRedis.from_url(server.url, timeout)
    known = KnownRefs(lean.connect_socket, resolve_reads("h1"), lean.handshake(), size=size, timeout=timeout,
                      clock=clock)
    s = Store(server.client(), host="h1", lean=lean, known=known)
    s.mark_complete(0)
    s.resolve([("container", "warm-up", False)])  # the script loaded: one EVALSHA per read from here on
    return s


def _other(server) -> Store:
    """Another writer of the same records (another worker, the reconciler)."""
    return Store(server.client(), host="h1")


def _resolve(store: Store, ref: str) -> Resolution:
    return store.resolve([("container", ref, True)])[0]


def _asks(server, store: Store, ref: str) -> tuple[Resolution, int]:
    """The resolution of ``ref`` and how many EVALSHA it sent."""
    before = _evalshas(server)
    res = _resolve(store, ref)
    return res, _evalshas(server) - before


def test_a_kept_owner_answers_without_asking_redis_the_same_answer(server):
    s = _store(server)
    s.add("container", C1, "t1", "t1_web")
    plain = _other(server)  # no memory: what Redis answers
    first, n1 = _asks(server, s, C1)
    second, n2 = _asks(server, s, C1)
    assert n1 >= 1 and n2 == 0  # (n1: a NOSCRIPT load may double it)
    assert first == second == _resolve(plain, C1) == Resolution("id", ((C1, "t1"),))
    assert second.owned_by("t1") and not second.owned_by("t2")


def test_a_removal_by_another_writer_is_seen_by_the_very_next_read(server):
    s, other = _store(server), _other(server)
    s.add("container", C1, "t1", "t1_web")
    s.add("container", C2, "t1", "t1_db")
    for ref in (C1, C2):
        _resolve(s, ref)
    assert _asks(server, s, C2)[1] == 0  # positive control: kept
    other.remove("container", C1)
    res, n = _asks(server, s, C1)
    assert n == 1 and res.how == "none"
    # every kept id was forgotten (the invalidation names keys, not fields)
    assert _asks(server, s, C2) == (Resolution("id", ((C2, "t1"),)), 1)


def test_a_new_owner_or_another_host_is_seen_by_the_very_next_read(server):
    s, other = _store(server), _other(server)
    s.add("container", C1, "t1", "t1_web")
    _resolve(s, C1)
    other.add("container", C1, "t2", "t2_web")  # re-owned (an adoption, a label's reconcile)
    assert _asks(server, s, C1) == (Resolution("id", ((C1, "t2"),)), 1)
    _resolve(s, C1)
    other.r.hset("fdcs:host:container", C1, "h2")  # now another host's: a name or prefix to this one
    res, n = _asks(server, s, C1)
    assert n == 1 and res.how == "prefix"  # (h1's prefix index still lists it)


def test_a_flush_forgets_and_the_read_says_retry(server):
    s = _store(server)
    s.add("container", C1, "t1", "t1_web")
    _resolve(s, C1)
    assert _asks(server, s, C1)[1] == 0
    server.client().flushall()  # the records are lost, Redis stays up
    res, n = _asks(server, s, C1)
    assert n == 1 and res == Resolution("none", (), False)  # "retry": being rebuilt


def test_a_redis_restart_forgets_and_keeps_nothing_until_tracking_is_back(server):
    now = [1000.0]
    s = _store(server, clock=lambda: now[0])
    known = s.known
    s.add("container", C1, "t1", "t1_web")
    _resolve(s, C1)
    assert len(known) == 1
    server.stop()
    server.start()  # a new run without the records (no persistence): as a restored older snapshot
    res, n = _asks(server, s, C1)
    assert n >= 1 and res == Resolution("none", (), False)  # (a new run: NOSCRIPT, loaded, sent again)
    _other(server).add("container", C1, "t1", "t1_web")
    _other(server).mark_complete(0)
    # within the reconnect delay nothing is kept (no tracking connection yet)
    assert _asks(server, s, C1) == (Resolution("id", ((C1, "t1"),)), 1)
    assert len(known) == 0 and _asks(server, s, C1)[1] == 1
    now[0] += 1.5  # then a new tracking connection: kept again
    _resolve(s, C1)
    assert len(known) == 1 and _asks(server, s, C1)[1] == 0


def test_a_change_while_the_read_is_in_flight_is_not_kept(server):
    s, other = _store(server), _other(server)
    s.add("container", C1, "t1", "t1_web")
    known = s.known
    gen, kept = known.begin("k1")
    assert kept is None and gen is not None
    known.keep(gen, "k1", "answer 1")
    assert known.begin("k1")[1] == "answer 1"  # positive control: nothing changed, kept
    gen, _ = known.begin("k2")
    other.add("container", C2, "t2", "t2_x")  # written after the read began
    known.keep(gen, "k2", "answer 2")
    assert known.begin("k2")[1] is None and known.begin("k1")[1] is None


def test_id_name_and_prefix_answers_are_kept_none_and_the_rest_never(server):
    s = _store(server)
    s.add("container", C1, "t1", "t1_web")
    s.add("container", C2, "t2", "t2_db")
    s.add_volume_if_new("v1", "t1")
    plain = _other(server)
    for ref, pfx in ((C1, True), ("t1_web", False), ("a1a1", True), ("t2_db", True)):
        redis_says = plain.resolve([("container", ref, pfx)])
        before = _evalshas(server)
        assert s.resolve([("container", ref, pfx)]) == redis_says  # asked
        assert _evalshas(server) == before + 1
        assert s.resolve([("container", ref, pfx)]) == redis_says
        assert _evalshas(server) == before + 1, ref  # kept
        assert redis_says[0].how in ("id", "name", "prefix")
    kept = len(s.known)
    for refs in ([("container", "f" * 64, True)], [("container", "zz", True)], [("container", "t1_x", False)],
                 [("volume", "v1", False)], [("network", C1, True)], [("exec", "e1", False)],
                 [("container", C1, True), ("container", C2, True)]):
        for _ in range(2):
            before = _evalshas(server)
            s.resolve(refs)
            assert _evalshas(server) - before == len(refs), refs
    assert len(s.known) == kept


def test_a_new_container_sharing_a_kept_prefix_is_seen_by_the_very_next_read(server):
    s, other = _store(server), _other(server)
    s.add("container", C1, "t1", "t1_web")
    assert _resolve(s, "a1a1") == Resolution("prefix", ((C1, "t1"),))
    assert _asks(server, s, "a1a1")[1] == 0  # positive control: kept
    twin = "a1a1" + "e" * 60  # another tenant's container with the same first digits
    other.add("container", twin, "t2", "t2_twin")
    res, n = _asks(server, s, "a1a1")
    assert n == 1 and res.how == "prefix" and set(res.matches) == {(C1, "t1"), (twin, "t2")}
    assert not res.owned_by("t1")


def test_a_rename_or_an_unowned_name_is_seen_by_the_very_next_read(server):
    s, other = _store(server), _other(server)
    s.add("container", C1, "t1", "t1_web")
    s.add("container", C2, "t2", "t2_db")
    assert _resolve(s, "t1_web").matches == ((C1, "t1"),)
    _asks(server, s, "t1_web")
    other.rename("container", C1, "t1_new")
    other.rename("container", C2, "t1_web")  # the name now names t2's container
    assert _asks(server, s, "t1_web") == (Resolution("name", ((C2, "t2"),)), 1)
    assert _resolve(s, "nobody").how == "none"
    other.add_unowned_name("container", "nobody")  # the reconciler found an unlabelled one
    assert _asks(server, s, "nobody") == (Resolution("name", (("", ""),)), 1)


def test_resolve_reads_lists_every_key_the_script_reads_but_completeness():
    """What the script builds key names from, for a container on h1: only
    ``fdcs:reconciled`` (``complete()``, for ``none``, never kept) and the
    exec keys are left out."""
    keys = set()
    for base, by_kind, by_host in re.findall(r"'(fdcs:[a-z]+(?::)?)'( \.\. kind)?(?: \.\. ':')?( \.\. host)?",
                                             ownership._RESOLVE):
        keys.add(base + ("container" if by_kind else "") + (":h1" if by_host else ""))
    assert keys - set(resolve_reads("h1")) == {"fdcs:exec:", "fdcs:reconciled"}
    assert set(resolve_reads("h1")) <= keys


def test_the_memory_is_bounded_oldest_first(server):
    s = _store(server, size=2)
    for c in (C1, C2, C3):
        s.add("container", c, "t1", "")
    for c in (C1, C2, C3):
        _resolve(s, c)
    assert len(s.known) == 2
    assert _asks(server, s, C3)[1] == 0 and _asks(server, s, C2)[1] == 0
    assert _asks(server, s, C1)[1] == 1


def test_an_idle_process_drains_what_redis_pushes(server):
    s, other = _store(server), _other(server)
    s.add("container", C1, "t1", "t1_web")
    _resolve(s, C1)
    sock = s.known._sock
    other.add("container", C2, "t1", "t1_db")
    # no read of this process: its watcher thread empties the memory
    deadline = time.monotonic() + 10
    while len(s.known) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(s.known) == 0 and s.known._sock is sock  # drained, still connected
    _resolve(s, C1)
    assert len(s.known) == 1


def test_refused_tracking_turns_the_memory_off_and_every_read_asks(tmp_path, caplog):
    server = RedisServer(tmp_path, extra=("--rename-command", "CLIENT", '""'))
    server.start()
    try:
        s = _store(server)
        s.add("container", C1, "t1", "t1_web")
        with caplog.at_level(logging.WARNING, logger="authz_plugin.known"):
            for _ in range(3):
                assert _asks(server, s, C1) == (Resolution("id", ((C1, "t1"),)), 1)
        assert s.known.off and len(s.known) == 0
        assert sum("refused client tracking" in r.getMessage() for r in caplog.records) == 1
    finally:
        server.stop()


def test_a_redis_not_heard_within_the_timeout_answers_nothing_until_it_is(server):
    """A stopped Redis (as one hung, or cut off by a partition without a
    close): kept answers end as a read would, after ``timeout``."""
    s = _store(server, timeout=0.4)
    s.add("container", C1, "t1", "t1_web")
    _resolve(s, C1)
    assert s.known.begin((C1, True))[1] is not None  # positive control: kept, and Redis heard
    time.sleep(3 * s.known.heartbeat)
    assert s.known.begin((C1, True))[1] is not None  # heard by its heartbeat alone (no read in between)
    server.proc.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while s.known.begin((C1, True))[1] is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.known.begin((C1, True)) == (None, None)
        with pytest.raises(StoreUnavailable):  # asked, as without the memory: "unavailable"
            _resolve(s, C1)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    # heard again: asked once, then kept again (on the same connection)
    sock = s.known._sock
    deadline = time.monotonic() + 10
    while s.known.begin((C1, True))[0] is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _asks(server, s, C1) == (Resolution("id", ((C1, "t1"),)), 1)
    assert _asks(server, s, C1)[1] == 0 and s.known._sock is sock


def test_a_kept_answer_is_not_used_once_redis_is_gone(server):
    s = _store(server)
    s.add("container", C1, "t1", "t1_web")
    _resolve(s, C1)
    assert _asks(server, s, C1)[1] == 0  # positive control: kept
    server.stop()
    with pytest.raises(StoreUnavailable):  # the plugin denies "ownership store unavailable"
        _resolve(s, C1)


def test_a_forked_child_starts_empty_and_unconnected(server):
    s = _store(server)
    s.add("container", C1, "t1", "t1_web")
    _resolve(s, C1)
    assert len(s.known) == 1
    pid = os.fork()
    if pid == 0:
        ok = len(s.known) == 0 and s.known._sock is None
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(s.known) == 1  # the parent keeps its own


def test_from_config_makes_the_memory_unless_turned_off():
    assert Store.from_config(cfg()).known is not None
    assert Store.from_config(cfg(**{"redis.track_refs": False})).known is None
    assert Store.from_config(cfg(**{"redis.url": "rediss://127.0.0.1:1/0"})).known is None  # no lean client
