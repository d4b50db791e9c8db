"""The scoper's Redis on its event loop (name_scoper/_redis.py) and the
container list's ownership filter through it (``handlers._list_response``).

A real ``redis-server`` for what Redis does, the scripted server of
``test_resp`` for what it never does on purpose; every failure ends in one
of redis-py's exceptions (``StoreUnavailable`` for the list) and has its
positive control.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis

from authz_plugin import resp
from authz_plugin.errors import StoreUnavailable
from authz_plugin.ownership import Store, owners_command
from name_scoper import handlers
from name_scoper._redis import AsyncRedis
from name_scoper.rewrite import Scope
from tests.unit.test_resp import (C1, C2, C3, F1, ID_REPLY, Cut, RedisServer, _free_port, needs_redis,  # noqa: F401
                                  scripted, server)


def _client(url: str, timeout: float = 1.0) -> AsyncRedis:
    return AsyncRedis(resp.LeanRedis.from_url(url, timeout))


def run(coro):
    return asyncio.run(coro)


@needs_redis
def test_owners_answer_what_the_blocking_client_answers_and_replies_keep_their_order(server):
    r = server.client()
    st = Store(r, host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")
    st.add("container", C2, "t2", "t2_db")
    ids = [C1, C2, C3]

    async def main():
        a = _client(server.url)
        try:
            got = await a.execute(*owners_command("container", ids), retry=True)
            # many commands at once on the one connection: each gets its own reply
            many = await asyncio.gather(*(a.execute("ECHO", f"m{i}") for i in range(200)))
            return got, many, a._conn
        finally:
            a.close()

    got, many, conn = run(main())
    assert got == st.owners("container", ids) == ["t1", "t2", None]
    assert many == [f"m{i}" for i in range(200)]
    assert conn is not None  # one connection carried them all


@needs_redis
def test_an_error_reply_is_raised_and_the_connection_stays_usable(server):
    async def main():
        a = _client(server.url)
        try:
            with pytest.raises(redis.ResponseError):
                await a.execute("HGET", "only-one-argument")
            conn = a._conn
            assert await a.execute("PING") == "PONG"
            return conn is a._conn
        finally:
            a.close()
    assert run(main())


@needs_redis
def test_redis_restarted_a_read_is_sent_once_more_a_write_is_not(server):
    async def main():
        a = _client(server.url)
        try:
            assert await a.execute("PING") == "PONG"
            server.stop()
            server.start()
            assert await a.execute("PING", retry=True) == "PONG"  # the old connection was closed: sent again
            server.stop()
            server.start()
            with pytest.raises(redis.ConnectionError):
                await a.execute("PING")  # not a read marked safe to repeat: the failure is raised
            assert await a.execute("PING") == "PONG"  # and the next command connects again
        finally:
            a.close()
    run(main())


def test_password_and_db(tmp_path):
    s = RedisServer(tmp_path, password="s3cret-pw")
    s.start()
    try:
        redis.Redis(port=s.port, password="s3cret-pw", db=3).set("k", "in-db-3")

        async def main():
            good = _client(f"redis://:s3cret-pw@127.0.0.1:{s.port}/3")
            db0 = _client(f"redis://:s3cret-pw@127.0.0.1:{s.port}/0")
            bad = _client(f"redis://:wrong-pw@127.0.0.1:{s.port}/3")
            none = _client(f"redis://127.0.0.1:{s.port}/3")
            try:
                assert await good.execute("GET", "k") == "in-db-3"
                assert await db0.execute("GET", "k") is None
                with pytest.raises(redis.ConnectionError) as e:
                    await bad.execute("GET", "k")
                assert "pw" not in str(e.value) and "pw" not in repr(bad)
                with pytest.raises(redis.RedisError):  # no password at all: NOAUTH
                    await none.execute("GET", "k")
            finally:
                for c in (good, db0, bad, none):
                    c.close()
        run(main())
    finally:
        s.stop()


def test_a_timeout_fails_the_connection_and_a_late_reply_is_never_read(scripted):
    late = b"$4\r\nlate\r\n"
    srv = scripted([(0.8, late)], [b"$4\r\nnext\r\n"])

    async def main():
        a = _client(f"redis://127.0.0.1:{srv.port}/0", timeout=0.3)
        try:
            with pytest.raises(redis.TimeoutError):
                await a.execute("GET", "k")
            await asyncio.sleep(0.6)  # the late reply reaches the first connection by now
            assert await a.execute("GET", "k") == "next"
        finally:
            a.close()
    run(main())
    assert srv.conns == 2


@pytest.mark.parametrize("reply", [b"!!nonsense\r\n", b"$2\r\n\xff\xfe\r\n"])
def test_bytes_that_are_not_resp_or_utf8_fail_and_drop_the_connection(scripted, reply):
    srv = scripted([reply], [b"+OK\r\n"])

    async def main():
        a = _client(f"redis://127.0.0.1:{srv.port}/0")
        try:
            with pytest.raises(redis.exceptions.InvalidResponse):
                await a.execute("GET", "k")
            assert await a.execute("GET", "k") == "OK"  # control: a new connection, a good reply
        finally:
            a.close()
    run(main())
    assert srv.conns == 2


def test_a_connection_cut_mid_reply_is_retried_once_for_a_read(scripted):
    srv = scripted([b"+OK\r\n", Cut(b"$10\r\npart")], [b"+AGAIN\r\n"])

    async def main():
        a = _client(f"redis://127.0.0.1:{srv.port}/0")
        try:
            assert await a.execute("GET", "k", retry=True) == "OK"
            assert await a.execute("GET", "k", retry=True) == "AGAIN"
        finally:
            a.close()
    run(main())
    assert srv.conns == 2
    srv2 = scripted([None], [b"+OK\r\n"])  # a new connection's failure: raised at once

    async def fresh():
        a = _client(f"redis://127.0.0.1:{srv2.port}/0")
        try:
            with pytest.raises(redis.ConnectionError):
                await a.execute("GET", "k", retry=True)
        finally:
            a.close()
    run(fresh())
    assert srv2.conns == 1


def test_refused_connection():
    async def main():
        a = _client(f"redis://127.0.0.1:{_free_port()}/0")
        with pytest.raises(redis.ConnectionError):
            await a.execute("PING")
    run(main())


# -- the container list through it ------------------------------------------------------------

LIST = json.dumps([
    {"Id": C1, "Names": ["/t1_web"], "Labels": {"org.fiware.fdcs.tenant": "t1"}},
    {"Id": C2, "Names": ["/t2_db"], "Labels": {"org.fiware.fdcs.tenant": "t2"}},
    # labelled t1 (inherited from an image), but the records give it to t2
    {"Id": C3, "Names": ["/adm"], "Labels": {"org.fiware.fdcs.tenant": "t1"}},
]).encode()


def _lists(store: Store | None, url: str | None, in_flight: int = 2):
    ctx = handlers.Context({"scoper.api_version": "1.41"}, store=store,
                           redis=_client(url) if url else None, in_flight=lambda: in_flight)
    return ctx, handlers._list_response(ctx, Scope("t1"))


async def _rewritten(response, status, body):
    out = response.json(status, body)
    return await out if asyncio.iscoroutine(out) else out


@needs_redis
def test_the_list_is_filtered_by_the_records_on_the_loop_as_with_the_blocking_client(server):
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")
    st.add("container", C2, "t2", "t2_db")
    st.add("container", C3, "t2", "t2_x")

    async def main():
        ctx, on_loop = _lists(st, server.url)
        try:
            got = await _rewritten(on_loop, 200, LIST)
        finally:
            ctx.redis.close()
        _, blocking = _lists(st, None)
        return got, blocking.json(200, LIST)

    got, want = run(main())
    assert got == want
    assert [c["Names"] for c in json.loads(got)] == [["/web"]]


def test_the_list_fails_closed_when_redis_fails(scripted):
    """Redis down, or a reply of another shape: the list is refused
    (StoreUnavailable), never answered unfiltered."""
    down = f"redis://127.0.0.1:{_free_port()}/0"
    odd = scripted([b"*1\r\n$2\r\nt1\r\n"])  # one owner for the two ids labelled t1
    good = scripted([b"*2\r\n$2\r\nt1\r\n$2\r\nt2\r\n"])

    async def main(url):
        ctx, on_loop = _lists(None, url)
        try:
            return await _rewritten(on_loop, 200, LIST)
        finally:
            ctx.redis.close()

    for url in (down, f"redis://127.0.0.1:{odd.port}/0"):
        with pytest.raises(StoreUnavailable):
            run(main(url))
    # control: the same list, a well-formed reply
    assert [c["Names"] for c in json.loads(run(main(f"redis://127.0.0.1:{good.port}/0")))] == [["/web"]]


@needs_redis
def test_the_list_reads_on_the_loop_only_while_other_requests_are_served(server):
    """Alone, the list reads the records with the store's blocking client
    (the cheaper way); with other requests in flight, on the loop.  Told
    apart by pointing the two at different servers."""
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")
    st.add("container", C3, "t2", "t2_x")
    down = f"redis://127.0.0.1:{_free_port()}/0"

    async def main(in_flight):
        ctx, lists = _lists(st, down, in_flight)  # the loop's client cannot connect
        try:
            return await _rewritten(lists, 200, LIST)
        finally:
            ctx.redis.close()

    assert [c["Names"] for c in json.loads(run(main(1)))] == [["/web"]]  # the store's client: served
    with pytest.raises(StoreUnavailable):
        run(main(2))  # the loop's client: refused, nothing unfiltered


# -- the owners a list saw (handlers.OwnersSeen) ------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _counting(st: Store) -> list[list[str]]:
    """Every ``owners`` call of ``st`` from now on, by the ids it asked about."""
    asked: list[list[str]] = []
    real = st.owners

    def owners(kind, ids):
        asked.append(list(ids))
        return real(kind, ids)
    st.owners = owners
    return asked


def _seen_lists(st: Store, clock: _Clock, url: str | None = None, in_flight: int = 1):
    ctx, lists = _lists(st, url, in_flight)
    ctx.owners_seen = handlers.OwnersSeen(handlers.OWNERS_TTL, clock=clock)
    return ctx, lists


@needs_redis
def test_a_list_asks_the_records_only_about_ids_it_has_not_seen_within_the_ttl(server):
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")
    st.add("container", C3, "t2", "t2_x")
    asked = _counting(st)
    clock = _Clock()
    _, lists = _seen_lists(st, clock)
    names = lambda: [c["Names"] for c in json.loads(lists.json(200, LIST))]  # noqa: E731

    assert names() == [["/web"]]
    assert asked == [[C1, C3]]  # the two labelled t1
    clock.now += handlers.OWNERS_TTL - 0.01
    assert names() == [["/web"]]  # C3 is still t2's by its kept record: still hidden
    assert asked == [[C1, C3]]  # nothing asked
    clock.now += 0.02
    assert names() == [["/web"]]
    assert asked == [[C1, C3], [C1, C3]]  # expired: asked again


@needs_redis
def test_no_record_and_failed_reads_are_never_kept(server):
    """An id without a record (an orphan, a conflict of labels) is asked
    about on every list, and so fails closed when Redis cannot answer,
    where an id whose record was seen is answered from what was kept."""
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")  # C3: no record
    asked = _counting(st)
    clock = _Clock()
    ctx, lists = _seen_lists(st, clock)
    assert [c["Names"] for c in json.loads(lists.json(200, LIST))] == [["/web"]]
    assert [c["Names"] for c in json.loads(lists.json(200, LIST))] == [["/web"]]
    assert asked == [[C1, C3], [C3]]

    st.add("container", C3, "t1", "t1_x")  # now it has one: seen at once
    assert len(json.loads(lists.json(200, LIST))) == 2
    assert asked[-1] == [C3]

    def down(kind, ids):
        raise StoreUnavailable("ownership store unavailable, retry")
    st.owners = down
    only_c1 = json.dumps([json.loads(LIST)[0]]).encode()
    assert [c["Names"] for c in json.loads(lists.json(200, only_c1))] == [["/web"]]  # kept: no read
    new = json.dumps([{"Id": C2, "Names": ["/t1_new"], "Labels": {"org.fiware.fdcs.tenant": "t1"}}]).encode()
    with pytest.raises(StoreUnavailable):
        lists.json(200, new)  # not seen: asked, refused


@needs_redis
def test_the_loop_client_keeps_and_uses_the_same_owners(server):
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")
    st.add("container", C3, "t2", "t2_x")
    clock = _Clock()

    async def main(url):
        ctx, lists = _seen_lists(st, clock, url, in_flight=2)
        try:
            first = await _rewritten(lists, 200, LIST)
            ctx.redis.close()
            ctx.redis = _client(f"redis://127.0.0.1:{_free_port()}/0")  # cannot connect from now on
            second = await _rewritten(lists, 200, LIST)  # every id kept: Redis not asked
            clock.now += handlers.OWNERS_TTL + 1
            with pytest.raises(StoreUnavailable):
                await _rewritten(lists, 200, LIST)  # expired: asked, and it cannot answer
            return first, second
        finally:
            ctx.redis.close()

    first, second = run(main(server.url))
    assert first == second
    assert [c["Names"] for c in json.loads(first)] == [["/web"]]


def test_owners_seen_is_bounded_and_keeps_only_owners():
    clock = _Clock()
    seen = handlers.OwnersSeen(2.0, size=3, clock=clock)
    seen.keep(["a", "b", "c"], ["t1", None, "t2"])
    assert seen.split(["a", "b", "c"]) == ({"a": "t1", "c": "t2"}, ["b"])
    seen.keep(["d", "e"], ["t1", "t1"])  # 2 kept + 2 > 3: cleared first
    assert seen.split(["a", "c", "d", "e"]) == ({"d": "t1", "e": "t1"}, ["a", "c"])
    clock.now += 2.0
    assert seen.split(["d"]) == ({}, ["d"])


# -- the last rewritten lists (handlers.ListsKept) ---------------------------------------------------

@needs_redis
def test_a_kept_list_is_answered_while_its_owners_are_still_the_ones_seen(server, monkeypatch):
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")
    st.add("container", C3, "t2", "t2_x")
    clock = _Clock()
    ctx, lists = _seen_lists(st, clock)
    rewrites = []
    real = handlers.rewrite.container_list

    def counting(body, scope, owned=None):
        rewrites.append(scope.tenant)
        return real(body, scope, owned)
    monkeypatch.setattr(handlers.rewrite, "container_list", counting)

    first = lists.json(200, LIST)
    assert lists.json(200, bytearray(LIST)) == first and len(rewrites) == 1  # kept
    other = json.dumps(json.loads(LIST)[:1]).encode()  # other bytes: rewritten
    assert [c["Names"] for c in json.loads(lists.json(200, other))] == [["/web"]] and len(rewrites) == 2
    # the owners seen change (a record answered anew otherwise): rewritten with them
    ctx.owners_seen.keep([C3], ["t1"])
    assert len(json.loads(lists.json(200, LIST))) == 2 and len(rewrites) == 3
    # expired owners: asked again, rewritten
    clock.now += handlers.OWNERS_TTL + 1
    assert lists.json(200, LIST) == first and len(rewrites) == 4
    # another tenant's list of the same bytes: its own
    ctx2 = handlers.Context({"scoper.api_version": "1.41"}, store=st)
    ctx2.lists, ctx2.owners_seen = ctx.lists, ctx.owners_seen
    assert json.loads(handlers._list_response(ctx2, Scope("t2")).json(200, LIST)) == []  # (C2, labelled t2, has no record)
    assert len(rewrites) == 5


@needs_redis
def test_a_list_with_an_id_without_a_record_is_never_answered_from_what_was_kept(server, monkeypatch):
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")  # C3 labelled t1, no record
    asked = _counting(st)
    _, lists = _seen_lists(st, _Clock())
    a = lists.json(200, LIST)
    b = lists.json(200, LIST)
    assert a == b and [c["Names"] for c in json.loads(a)] == [["/web"]]
    assert asked == [[C1, C3], [C3]]  # asked about C3 each time


@needs_redis
def test_the_loop_path_keeps_its_lists_too(server):
    st = Store(server.client(), host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0))
    st.add("container", C1, "t1", "t1_web")
    st.add("container", C3, "t2", "t2_x")

    async def main():
        ctx, lists = _seen_lists(st, _Clock(), server.url, in_flight=2)
        try:
            first = await _rewritten(lists, 200, LIST)
            ctx.owners_seen = handlers.OwnersSeen(handlers.OWNERS_TTL)  # nothing seen: a kept list cannot hold
            ctx.redis.close()
            ctx.redis = _client(f"redis://127.0.0.1:{_free_port()}/0")
            with pytest.raises(StoreUnavailable):
                await _rewritten(lists, 200, LIST)
            return first
        finally:
            ctx.redis.close()

    assert [c["Names"] for c in json.loads(run(main()))] == [["/web"]]
