"""The lean RESP2 client (authz_plugin/resp.py) and the ownership store's
hot read through it (``Store.resolve`` with ``lean``).

A real ``redis-server`` on a free loopback port (fakeredis does not speak
the socket protocol) for what Redis does; a scripted socket server for what
a real Redis never does on purpose (replies of the wrong shape, bytes that
are not RESP, an answer later than the timeout).  Every failure mode ends in
``StoreUnavailable`` (the plugin denies) and has its positive control.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import redis

from authz_plugin import ownership, resp
from authz_plugin.errors import StoreUnavailable
from authz_plugin.ownership import Resolution, Store, resolution
from tests.unit.conftest import cfg

RESOLVE_SHA = resp.Script(ownership._RESOLVE).sha
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

#: container ids are 64 hex digits (the resolve script reads no record for a reference of
#: another length as a full id); C1 and C2 share the prefix "abcdef"
C1, C2, C3, F1 = "abcdef0123" + "0" * 54, "abcdef9999" + "9" * 54, "0123456789" + "a" * 54, "feed01" + "1" * 58

#: what resolve() is asked in the comparisons below: id, name, prefix, unknown, volume, exec
REFS = [("container", C1, True), ("container", "t1_web", False), ("container", "abcd", True),
        ("container", "zzz", True), ("volume", "v1", False), ("exec", "e1", False)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server on 127.0.0.1 (no persistence); stop/start keep the port."""

    def __init__(self, tmp, password: str | None = None, extra: tuple[str, ...] = ()):
        self.dir = tmp
        self.port = _free_port()
        self.password = password
        self.extra = list(extra)  # more redis-server arguments
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _stores(server, **lean_kw) -> tuple[Store, Store]:
    """(redis-py only, with the lean client) on the same server."""
    r = server.client()
    return Store(r, host="h1"), Store(r, host="h1", lean=resp.LeanRedis.from_url(server.url, 1.0, **lean_kw))


def _fill(store: Store) -> None:
    store.add("container", C1, "t1", "t1_web")
    store.add("container", C2, "t2", "t2_db")
    store.add("container", C3, "t1", "t1_x")
    store.add_volume_if_new("v1", "t1")
    store.add_exec("e1", "t1", C1)


# -- pure parts ---------------------------------------------------------------------------

def test_pack_is_resp2_bulk_strings():
    assert resp.pack(["EVALSHA", "ab", 0, "x y", b"\xff", 1.5]) == (
        b"*6\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n$3\r\nx y\r\n$1\r\n\xff\r\n$3\r\n1.5\r\n")
    assert resp.pack(["é"]) == b"*1\r\n$2\r\n\xc3\xa9\r\n"  # the length is in bytes
    with pytest.raises(TypeError):
        resp.pack(["SET", None])
    with pytest.raises(TypeError):
        resp.pack(["SET", True])



def test_pack_sends_subclasses_as_their_base_type():
    class S(str):
        pass

    class B(bytes):
        pass

    class N(int):
        pass

    class F(float):
        pass
    assert resp.pack([S("ab"), B(b"\xff"), N(7), F(1.5)]) == resp.pack(["ab", b"\xff", 7, 1.5])
    for bad in (bytearray(b"x"), memoryview(b"x"), False, [1], {"a": 1}):
        with pytest.raises(TypeError, match="cannot send a"):
            resp.pack(["SET", bad])

def test_script_sha_is_redis_sha():
    import hashlib
    s = resp.Script("return 1")
    assert s.sha == hashlib.sha1(b"return 1").hexdigest()


@pytest.mark.parametrize("url,lean", [
    ("redis://127.0.0.1:6379/0", True),
    ("redis://:secret@10.0.0.1:6380/3", True),
    ("redis://user:secret@10.0.0.1/3", True),
    ("unix:///run/redis/redis.sock?db=2", True),
    ("rediss://127.0.0.1:6379/0", False),  # TLS: redis-py as before
    ("redis://127.0.0.1:6379/0?socket_keepalive=true", False),  # an option it does not speak
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", False),
    ("http://127.0.0.1/", False),
])
def test_from_url_only_what_it_speaks_exactly(url, lean):
    c = resp.LeanRedis.from_url(url, 1.0)
    assert (c is not None) is lean
    if c is not None:
        assert "secret" not in repr(c)


def test_from_config_not_for_sentinel():
    assert resp.from_config(cfg()) is not None  # positive control: a plain URL
    assert resp.from_config(cfg(**{"redis.sentinels": ["127.0.0.1:26379"]})) is None
    assert resp.from_config(cfg(**{"redis.url": "rediss://127.0.0.1:6379/0"})) is None
    s = Store.from_config(cfg(**{"redis.url": "redis://127.0.0.1:1/0"}))
    assert isinstance(s.lean, resp.LeanRedis)
    assert Store.from_config(cfg(**{"redis.url": "rediss://127.0.0.1:1/0"})).lean is None


@pytest.mark.parametrize("raw,expect", [
    (["id", "abc", "t1"], Resolution("id", (("abc", "t1"),))),
    (["name", "", ""], Resolution("name", (("", ""),))),
    (["prefix", "a1", "t1", "a2", ""], Resolution("prefix", (("a1", "t1"), ("a2", "")))),
    (["none", 1], Resolution("none", (), True)),
    (["none", 0], Resolution("none", (), False)),
])
def test_resolution_of_a_well_formed_reply(raw, expect):
    assert resolution(raw) == expect


@pytest.mark.parametrize("raw", [
    None, 1, "id", [], ["id"], ["id", "abc"], ["id", "a", "t", "b", "t"], ["name", "a"], ["prefix"],
    ["prefix", "a"], ["none", 2], ["none", 1, 1], ["what", "a", "t"], ["id", 1, "t"], [b"id", "a", "t"],
    ["prefix", "a", ["t"]],
])
def test_resolution_of_any_other_reply_is_store_unavailable(raw):
    with pytest.raises(StoreUnavailable, match="retry"):
        resolution(raw)


# -- against a real Redis -----------------------------------------------------------------

@needs_redis
def test_lean_resolve_answers_what_redis_py_answers(server):
    slow, lean = _stores(server)
    _fill(slow)
    slow.mark_complete(time.time())
    assert lean.resolve(REFS) == slow.resolve(REFS)  # the whole batch in one round trip
    for ref in REFS:  # and one at a time (the hook's usual call)
        assert lean.resolve([ref]) == slow.resolve([ref])
    assert lean.resolve([("container", C1, True)])[0].owned_by("t1")
    assert not lean.resolve([("container", "abcd", True)])[0].owned_by("t1")  # t2's matches too
    assert lean.resolve([]) == []


@needs_redis
def test_a_container_reference_that_is_not_64_characters_is_never_read_as_a_full_id(server):
    """moby's container ids are 64 hex digits: the engine never finds a
    shorter (or longer) reference as an id, so the resolve script does not
    read a record for it as one (an HGET less per short-id inspect).  A
    record under such a key (no engine made it: stale, hand-written) is not
    trusted; networks (swarm ids are 25 characters) and volumes are read as
    before."""
    slow, lean = _stores(server)
    r = server.client()
    short, long_ = "c0ffee", "c0ffee" * 11  # 6 and 66 characters
    for key in (short, long_, C1):
        r.hset("fdcs:own:container", key, "t1")
        r.hset("fdcs:host:container", key, "h1")
    r.hset("fdcs:own:network", "n25" + "x" * 22, "t1")
    r.hset("fdcs:host:network", "n25" + "x" * 22, "h1")
    for store in (slow, lean):
        # positive control: the 64-character id is read as an id
        assert store.resolve([("container", C1, True)])[0] == Resolution("id", ((C1, "t1"),))
        for ref in (short, long_):
            res = store.resolve([("container", ref, True)])[0]
            assert res.how == "none" and not res.owned_by("t1"), ref
        # a name or prefix of that form is still looked up as the engine would
        store.add("container", "c0ffee" + "1" * 58, "t1", "t1_c")
        assert store.resolve([("container", short, True)])[0] == Resolution(
            "prefix", (("c0ffee" + "1" * 58, "t1"),))
        assert store.resolve([("network", "n25" + "x" * 22, True)])[0] == Resolution(
            "id", (("n25" + "x" * 22, "t1"),))
        store.remove("container", "c0ffee" + "1" * 58)


@needs_redis
def test_owners_reads_the_records_of_full_ids_in_one_hmget(server):
    slow, lean = _stores(server)
    _fill(slow)
    ids = [C1, C2, C3, "feedfeed00"]
    want = ["t1", "t2", "t1", None]  # no record: None, never a guess
    assert slow.owners("container", ids) == want
    assert lean.owners("container", ids) == want
    # a name or a prefix is no id here (resolve would read them as such)
    assert lean.owners("container", ["t1_web", "abcdef"]) == [None, None]
    assert lean.owners("container", []) == slow.owners("container", []) == []


@needs_redis
def test_noscript_loads_the_script_and_retries_once(server):
    slow, lean = _stores(server)
    _fill(slow)
    r = server.client()
    r.script_flush()
    assert r.script_exists(RESOLVE_SHA) == [False]
    assert lean.resolve([REFS[0]])[0] == Resolution("id", ((C1, "t1"),))
    assert r.script_exists(RESOLVE_SHA) == [True]
    r.script_flush()
    assert lean.resolve(REFS) == slow.resolve(REFS)  # a batch too


@needs_redis
def test_an_error_reply_is_store_unavailable_and_the_connection_stays_usable(server):
    slow, lean = _stores(server)
    r = server.client()
    r.set("fdcs:own:container", "not a hash")  # HGET on a string: WRONGTYPE inside the script
    with pytest.raises(StoreUnavailable, match="retry"):
        lean.resolve([REFS[0]])
    first = lean.lean.execute("CLIENT", "ID")
    r.delete("fdcs:own:container")
    assert lean.resolve([REFS[0]])[0].how == "none"  # positive control
    assert lean.lean.execute("CLIENT", "ID") == first  # on the same connection


@needs_redis
def test_a_connection_the_server_closed_is_reopened_transparently(server):
    _, lean = _stores(server)
    c = lean.lean
    first = c.execute("CLIENT", "ID")
    assert c.execute("CLIENT", "ID") == first  # kept: one connection per thread
    server.client().client_kill_filter(_id=first)
    # the next read-only call finds the connection broken and sends again on a new one
    assert lean.resolve([REFS[3]])[0].how == "none"
    assert c.execute("CLIENT", "ID") != first
    # a command not marked safe to repeat is not sent twice: it fails, then the next one reconnects
    second = c.execute("CLIENT", "ID")
    server.client().client_kill_filter(_id=second)
    with pytest.raises(redis.ConnectionError):
        c.execute("PING")
    assert c.execute("PING") == "PONG"


@needs_redis
def test_redis_down_is_store_unavailable_and_up_again_works(server):
    slow, lean = _stores(server)
    assert lean.resolve([REFS[3]])[0].how == "none"
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="retry"):
        lean.resolve([REFS[3]])
    with pytest.raises(StoreUnavailable):  # a fresh connection is refused too
        lean.resolve([REFS[3]])
    assert time.monotonic() - t0 < 5
    server.start()  # same port, empty, no scripts loaded: NOSCRIPT handled too
    assert lean.resolve([REFS[3]])[0].how == "none"


@needs_redis
def test_each_thread_has_its_own_connection(server):
    _, lean = _stores(server)
    c = lean.lean
    ids = {}

    def run(n):
        ids[n] = c.execute("CLIENT", "ID")
        assert lean.resolve([REFS[3]])[0].how == "none"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids.values())) == 3
    assert c.execute("CLIENT", "ID") not in ids.values()


@needs_redis
def test_a_forked_child_opens_its_own_connection(server):
    _, lean = _stores(server)
    c = lean.lean
    parent = c.execute("CLIENT", "ID")
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its connection's id, never touch the parent's
        try:
            os.write(wr, str(c.execute("CLIENT", "ID")).encode())
        finally:
            os._exit(0)
    os.close(wr)
    child = int(os.read(rd, 100) or b"0")
    os.close(rd)
    os.waitpid(pid, 0)
    assert child and child != parent
    assert c.execute("CLIENT", "ID") == parent  # the parent's connection is intact


@needs_redis
def test_password_and_db(tmp_path):
    s = RedisServer(tmp_path, password="s3cret-pw")
    s.start()
    try:
        s.client().execute_command("SELECT", 0)
        r3 = redis.Redis(port=s.port, password="s3cret-pw", db=3, decode_responses=True)
        Store(r3, host="h1").add("container", F1, "t1", "t1_a")
        url3 = f"redis://:s3cret-pw@127.0.0.1:{s.port}/3"
        lean = Store(r3, host="h1", lean=resp.LeanRedis.from_url(url3, 1.0))
        assert lean.resolve([("container", F1, True)])[0] == Resolution("id", ((F1, "t1"),))
        # db 0 does not have it: the lean client selected db 3
        lean0 = Store(r3, host="h1", lean=resp.LeanRedis.from_url(f"redis://:s3cret-pw@127.0.0.1:{s.port}/0", 1.0))
        assert lean0.resolve([("container", F1, True)])[0].how == "none"
        bad = Store(r3, host="h1", lean=resp.LeanRedis.from_url(f"redis://:wrong-pw@127.0.0.1:{s.port}/3", 1.0))
        with pytest.raises(StoreUnavailable) as e:
            bad.resolve([("container", F1, True)])
        assert "pw" not in str(e.value) and "pw" not in repr(e.value.__cause__)
        none = Store(r3, host="h1", lean=resp.LeanRedis.from_url(f"redis://127.0.0.1:{s.port}/3", 1.0))
        with pytest.raises(StoreUnavailable):  # no password at all: NOAUTH
            none.resolve([("container", F1, True)])
    finally:
        s.stop()


# -- what a real Redis does not do on purpose: a scripted server ------------------------------

class Cut(bytes):
    """An answer after which the server closes the connection."""


class Scripted:
    """A TCP server on 127.0.0.1 answering each connection's n-th read with
    ``answers[n]`` (bytes; ``(seconds, bytes)``: sleep first; None: close
    instead; :class:`Cut`: send, then close)."""

    def __init__(self, answers_per_conn: list[list]):
        self.plans = list(answers_per_conn)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.conns = 0
        self.received: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            plan = self.plans[self.conns] if self.conns < len(self.plans) else []
            self.conns += 1
            threading.Thread(target=self._serve, args=(c, plan), daemon=True).start()

    def _serve(self, c, plan):
        with c:
            for step in plan:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                self.received.append(data)
                if isinstance(step, tuple):
                    time.sleep(step[0])
                    step = step[1]
                if step is None:
                    return
                try:
                    c.sendall(step)
                except OSError:
                    return
                if isinstance(step, Cut):
                    return
            while c.recv(65536):  # then silent until the client goes away
                pass

    def store(self, timeout: float = 0.5) -> Store:
        r = redis.Redis(port=self.port, socket_timeout=timeout, decode_responses=True)
        return Store(r, host="h1", lean=resp.LeanRedis.from_url(f"redis://127.0.0.1:{self.port}/0", timeout))

    def close(self):
        self._stop = True
        self.sock.close()


@pytest.fixture
def scripted():
    made = []

    def make(*plans):
        s = Scripted(list(plans))
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


ID_REPLY = b"*3\r\n$2\r\nid\r\n$3\r\nabc\r\n$2\r\nt1\r\n"


@pytest.mark.parametrize("reply", [b"*1\r\n$2\r\nt1\r\n", b":1\r\n", b"*2\r\n$2\r\nt1\r\n:7\r\n"])
def test_owners_of_another_shape_is_store_unavailable(scripted, reply):
    """Fewer owners than ids, not an array, a number for an owner: refused."""
    assert scripted([b"*2\r\n$2\r\nt1\r\n$-1\r\n"]).store().owners("container", ["a", "b"]) == ["t1", None]
    with pytest.raises(StoreUnavailable):
        scripted([reply]).store().owners("container", ["a", "b"])


def test_scripted_positive_control(scripted):
    srv = scripted([ID_REPLY])
    assert srv.store().resolve([("container", "abc", True)])[0] == Resolution("id", (("abc", "t1"),))
    assert srv.received[0].startswith(b"*8\r\n$7\r\nEVALSHA\r\n$40\r\n")


@pytest.mark.parametrize("reply", [
    b":1\r\n",                                    # an integer
    b"*1\r\n$5\r\nweird\r\n",                      # an array of another shape
    b"*3\r\n$2\r\nid\r\n:1\r\n$2\r\nt1\r\n",      # a number where an id belongs
    b"$-1\r\n",                                   # nil
    b"*2\r\n$4\r\nnone\r\n:7\r\n",                # a flag that is not 0/1
])
def test_a_reply_of_the_wrong_shape_is_store_unavailable(scripted, reply):
    srv = scripted([reply])
    with pytest.raises(StoreUnavailable, match="unexpectedly"):
        srv.store().resolve([("container", "abc", True)])


@pytest.mark.parametrize("reply", [b"!garbage\r\n", b"$2\r\n\xff\xfe\r\n"])
def test_bytes_that_are_not_resp_or_utf8_fail_closed_and_drop_the_connection(scripted, reply):
    srv = scripted([reply], [ID_REPLY])
    st = srv.store()
    with pytest.raises(StoreUnavailable, match="retry"):
        st.resolve([("container", "abc", True)])
    # the next call is on a new connection (nothing of the bad stream is read again)
    assert st.resolve([("container", "abc", True)])[0].how == "id"
    assert srv.conns == 2


def test_an_error_reply_is_store_unavailable(scripted):
    srv = scripted([b"-READONLY You can't write against a read only replica.\r\n", ID_REPLY])
    st = srv.store()
    with pytest.raises(StoreUnavailable, match="retry"):
        st.resolve([("container", "abc", True)])
    assert st.resolve([("container", "abc", True)])[0].how == "id"
    assert srv.conns == 1  # an error reply leaves the connection usable


def test_noscript_twice_is_store_unavailable(scripted):
    noscript = b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
    sha = RESOLVE_SHA.encode()
    srv = scripted([noscript, b"$40\r\n" + sha + b"\r\n", noscript])
    with pytest.raises(StoreUnavailable, match="retry"):
        srv.store().resolve([("container", "abc", True)])
    assert srv.received[1].startswith(b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n")
    # positive control: NOSCRIPT, load, then the answer
    ok = scripted([noscript, b"$40\r\n" + sha + b"\r\n", ID_REPLY])
    assert ok.store().resolve([("container", "abc", True)])[0].how == "id"


def test_script_load_answering_another_sha_is_store_unavailable(scripted):
    noscript = b"-NOSCRIPT No matching script.\r\n"
    srv = scripted([noscript, b"$40\r\n" + b"0" * 40 + b"\r\n", ID_REPLY])
    with pytest.raises(StoreUnavailable):
        srv.store().resolve([("container", "abc", True)])


def test_a_timeout_is_store_unavailable_and_a_late_reply_is_never_read(scripted):
    late = b"*3\r\n$2\r\nid\r\n$3\r\nold\r\n$2\r\nt9\r\n"
    srv = scripted([(0.8, late)], [ID_REPLY])
    st = srv.store(timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="retry"):
        st.resolve([("container", "abc", True)])
    assert time.monotonic() - t0 < 0.75
    time.sleep(0.6)  # the late answer has arrived on the first connection by now
    assert st.resolve([("container", "abc", True)])[0] == Resolution("id", (("abc", "t1"),))
    assert srv.conns == 2


def test_a_connection_closed_mid_reply_is_retried_once_for_a_read(scripted):
    # first connection: one good answer, then closed half-way through the second
    srv = scripted([ID_REPLY, Cut(b"*3\r\n$2\r\nid")], [ID_REPLY])
    st = srv.store()
    assert st.resolve([("container", "abc", True)])[0].how == "id"
    assert st.resolve([("container", "abc", True)])[0].how == "id"  # sent again on a new connection
    assert srv.conns == 2
    # but a fresh connection's failure is not retried (Redis is down, not an idle close)
    srv2 = scripted([None], [ID_REPLY])
    with pytest.raises(StoreUnavailable):
        srv2.store().resolve([("container", "abc", True)])
    assert srv2.conns == 1


def test_refused_connection_is_store_unavailable():
    port = _free_port()  # nothing listens there
    st = Store(redis.Redis(port=port, decode_responses=True), host="h1",
               lean=resp.LeanRedis.from_url(f"redis://127.0.0.1:{port}/0", 0.5))
    with pytest.raises(StoreUnavailable, match="retry"):
        st.resolve([("container", "abc", True)])


@needs_redis
def test_audit_stream_batch_through_the_lean_client(server):
    from authz_plugin import audit_stream
    r = server.client()
    w = audit_stream.Writer(r, maxlen=100, lean=resp.LeanRedis.from_url(server.url, 1.0))
    assert w.process(['{"n":1}', '{"n":2,"s":"\u00e9"}']) == 2
    assert [f[audit_stream.FIELD] for _, f in r.xrange(audit_stream.STREAM)] == ['{"n":1}', '{"n":2,"s":"\u00e9"}']
    assert (w.written, w.dropped) == (2, 0)
    # an error reply (the key is not a stream) drops the batch and counts it, never raises
    r.delete(audit_stream.STREAM)
    r.set(audit_stream.STREAM, "not a stream")
    assert w.process(['{"n":3}']) == 0
    assert (w.written, w.dropped) == (2, 1)
    r.delete(audit_stream.STREAM)  # control: the same writer writes again
    assert w.process(['{"n":4}']) == 1 and r.xlen(audit_stream.STREAM) == 1
