"""The worker's memo of positive container ownership answers
(``ownership.OwnedMemo``, used by ``Authorizer._check_container`` and
``Authorizer._check_needs``): a hit gives exactly a miss's answer, audit line
and metrics without the round trip; only a tenant's own full id or 12+ digit
prefix is kept, for ``OWNED_TTL`` seconds of the injected clock, per tenant,
at most ``size``; a removal this worker records drops it; and it never
outlives the suspended set's copy when Redis is down, nor skips the
suspended or the role check."""

from __future__ import annotations

import json
import threading
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from authz_plugin import audit_stream, logfmt, metrics
from authz_plugin.errors import StoreUnavailable
from authz_plugin.ownership import MEMO_MIN_PREFIX, OwnedMemo, Resolution, Store, keepable
from authz_plugin.scoping import TENANT_LABEL
from authz_plugin.policy import OWNED_MEMO_SIZE, OWNED_TTL, SUSPENSION_TTL, Authorizer

from .conftest import TA, TB, FakeIdentityService, cfg, payload

CID = "c0ffee" + "0" * 58       # TA's, on h1
CID_B = "c0ffef" + "1" * 58     # TB's, on h1
CID_N = "d00d" + "3" * 60       # TA's, named with hex digits only (adopted, say)
HEXNAME = "cafe0000cafe"


def _inspect(ref, token="tok-alice"):
    return payload("GET", f"/v1.41/containers/{ref}/json", token=token)


def _stop(ref, token="tok-alice"):
    return payload("POST", f"/v1.41/containers/{ref}/stop", token=token)


class World:
    """One authorizer on fakeredis with an injected clock; every decision's
    answer, audit line (but its time), metric key, memo steps and store
    round trips captured."""

    def __init__(self, store, monkeypatch):
        store.add("container", CID, TA, f"{TA}_web")
        store.add("container", CID_B, TB, f"{TB}_db")
        store.add("container", CID_N, TA, HEXNAME)
        self.store = store
        self.now = 1000.0
        self.authz = Authorizer(cfg(), FakeIdentityService(), store)
        self.authz._clock = self.authz._owned.clock = lambda: self.now
        self.resolves: list = []
        self.fail = False  # the resolve fails as Redis down does
        real = store.resolve

        def resolve(refs):
            self.resolves.append([tuple(r) for r in refs])
            if self.fail:
                raise StoreUnavailable("ownership store unavailable, retry")
            return real(refs)

        store.resolve = resolve
        self.out: list = []
        self.memo: list[bool] = []
        monkeypatch.setattr(audit_stream, "active", lambda: True)
        monkeypatch.setattr(audit_stream, "submit", lambda text: self.out.append(("line", _untimed(text))))
        monkeypatch.setattr(metrics, "decision", lambda hook, allow, reason, s: self.out.append(("metric", hook, allow, reason)))
        monkeypatch.setattr(metrics, "resolve_memo", self.memo.append)
        monkeypatch.setattr(logfmt, "new_request_id", lambda: "rid")

    def decide(self, p):
        """(answer, audit and metric outputs, memo steps, store resolves) of one request hook."""
        self.out.clear()
        self.memo.clear()
        self.resolves.clear()
        answer = self.authz.authz_request(p)
        return answer, list(self.out), list(self.memo), list(self.resolves)

    def respond(self, p):
        return self.authz.authz_response(p)


def _untimed(text):
    line = json.loads(text)
    line.pop("ts"), line.pop("us")
    return line


@pytest.fixture
def w(store, monkeypatch):
    return World(store, monkeypatch)


# -- a hit is a miss's answer ---------------------------------------------------------------

@pytest.mark.parametrize("make", [_inspect, _stop])
@pytest.mark.parametrize("ref", [CID[:MEMO_MIN_PREFIX], CID[:20], CID])
def test_a_hit_answers_as_the_miss_did(w, make, ref):
    miss = w.decide(make(ref))
    hit = w.decide(make(ref))
    assert miss[0] == hit[0] == {"Allow": True}
    assert miss[1] == hit[1]                         # the audit line (but its time) and the metric key
    line = next(o[1] for o in miss[1] if o[0] == "line")
    assert line["allow"] and line["tenant"] == TA and line["reason"] == "ok"
    assert (miss[2], hit[2]) == ([False], [True])    # counted
    assert (len(miss[3]), hit[3]) == (1, [])         # the round trip spared
    w.now += OWNED_TTL - 0.01
    assert w.decide(make(ref))[2:] == ([True], [])   # still kept just before the TTL


def test_kept_for_the_ttl_of_the_clock_only(w):
    w.decide(_inspect(CID[:12]))
    w.now += OWNED_TTL  # exactly the TTL: gone
    again = w.decide(_inspect(CID[:12]))
    assert again[0]["Allow"] and again[2] == [False] and len(again[3]) == 1
    assert w.decide(_inspect(CID[:12]))[2:] == ([True], [])  # kept again from the new answer


def test_the_ttl_is_the_suspended_sets():
    assert OWNED_TTL == SUSPENSION_TTL == 2.0 and OWNED_MEMO_SIZE == 4096


# -- only positive, keepable answers; each tenant's own ---------------------------------------

def test_refusals_retries_and_failures_are_never_kept(w):
    # another tenant's id: refused each time, from Redis each time
    for _ in range(2):
        answer, _, memo, resolves = w.decide(_inspect(CID_B[:12]))
        assert not answer["Allow"] and "No such container" in answer["Msg"] and memo == [False] and len(resolves) == 1
    # no such id: the same
    for _ in range(2):
        answer, _, memo, resolves = w.decide(_inspect("abcdef123456"))
        assert not answer["Allow"] and "No such container" in answer["Msg"] and len(resolves) == 1
    # Redis failing for the resolve (the suspended copy fresh): refused, nothing kept
    w.decide(_inspect(f"{TA}_web"))  # loads the suspended copy
    w.fail = True
    for _ in range(2):
        answer, _, memo, resolves = w.decide(_inspect(CID[:12]))
        assert not answer["Allow"] and "ownership store unavailable" in answer["Msg"] and memo == [False]
        assert len(resolves) == 1
    w.fail = False
    assert len(w.authz._owned) == 0
    # positive control: the same id, Redis back: allowed and kept
    answer, _, memo, resolves = w.decide(_inspect(CID[:12]))
    assert answer["Allow"] and memo == [False] and len(resolves) == 1
    assert w.decide(_inspect(CID[:12]))[2:] == ([True], [])


def test_a_rebuilding_store_is_retried_never_kept(redis_server, monkeypatch):
    import fakeredis
    s = Store(fakeredis.FakeRedis(server=redis_server, decode_responses=True), host="h3")  # no reconcile yet
    w = World(s, monkeypatch)
    for _ in range(2):
        answer, _, memo, resolves = w.decide(_inspect("abcdef123456"))
        assert not answer["Allow"] and "retry in a moment" in answer["Msg"] and memo == [False] and len(resolves) == 1
    assert len(w.authz._owned) == 0
    # control: once reconciled, the host's own id is kept (CID is on h1: add one on h3)
    s.mark_complete(0)
    s.add("container", "abcdef123456" + "4" * 52, TA, f"{TA}_far")
    assert w.decide(_inspect("abcdef123456"))[0]["Allow"]
    assert w.decide(_inspect("abcdef123456"))[2:] == ([True], [])


def test_short_prefixes_and_hex_names_are_asked_each_time(w):
    for ref in (CID[:MEMO_MIN_PREFIX - 1], CID_N[:1], HEXNAME):
        for _ in range(2):
            answer, _, memo, resolves = w.decide(_inspect(ref))
            assert answer["Allow"] and memo == [False] and len(resolves) == 1, ref
    # control: one digit more is kept
    w.decide(_inspect(CID[:MEMO_MIN_PREFIX]))
    assert w.decide(_inspect(CID[:MEMO_MIN_PREFIX]))[2:] == ([True], [])


def test_keepable_is_one_owned_id_or_long_prefix():
    own = ((CID, TA),)
    assert keepable(Resolution("id", own), CID, TA)
    assert keepable(Resolution("prefix", own), CID[:12], TA)
    assert not keepable(Resolution("prefix", own), CID[:11], TA)
    assert not keepable(Resolution("name", own), HEXNAME, TA)
    assert not keepable(Resolution("id", own), CID, TB)
    assert not keepable(Resolution("id", ((CID, ""),)), CID, "")
    assert not keepable(Resolution("prefix", own * 2), CID[:12], TA)
    assert not keepable(Resolution("none", (), False), CID[:12], TA)
    assert not keepable(Resolution("none", (), True), CID[:12], TA)


def test_one_tenants_answer_is_never_anothers(w):
    w.decide(_inspect(CID[:12]))
    assert w.decide(_inspect(CID[:12]))[2] == [True]
    # bob asks for the same reference: his own question to Redis, refused
    answer, _, memo, resolves = w.decide(_inspect(CID[:12], token="tok-bob"))
    assert not answer["Allow"] and "No such container" in answer["Msg"] and memo == [False] and len(resolves) == 1
    # and the general path: a stop by bob
    answer, _, memo, resolves = w.decide(_stop(CID[:12], token="tok-bob"))
    assert not answer["Allow"] and memo == [False] and len(resolves) == 1
    # control: bob's own container, kept for him
    w.decide(_inspect(CID_B[:12], token="tok-bob"))
    assert w.decide(_inspect(CID_B[:12], token="tok-bob"))[0]["Allow"]
    assert w.memo[-1] is True


def test_the_general_path_keeps_only_when_every_need_is_owned(w):
    """A create linking two containers: one of them bob's refuses it, and
    nothing of it is kept; only the owned link: allowed, and it is kept."""
    def create(*links):
        host = {"NetworkMode": "none", "PidsLimit": 5, "CgroupnsMode": "private", "Links": [f"{r}:l{i}" for i, r in enumerate(links)]}
        return payload("POST", f"/v1.41/containers/create?name={TA}_x",
                       {"Image": "busybox", "Labels": {TENANT_LABEL: TA}, "HostConfig": host})

    answer, _, memo, resolves = w.decide(create(CID[:12], CID_B[:12]))
    assert not answer["Allow"] and CID_B[:12] in answer["Msg"], answer
    assert memo == [False, False] and len(resolves[0]) == 2 and len(w.authz._owned) == 0
    answer, _, memo, resolves = w.decide(create(CID[:12]))  # control
    assert answer["Allow"], answer
    assert w.decide(_inspect(CID[:12]))[2:] == ([True], [])
    answer, _, memo, resolves = w.decide(create(CID[:12], CID_B[:12]))  # one hit, one asked: still refused
    assert not answer["Allow"] and memo == [True, False] and resolves == [[("container", CID_B[:12], True)]]


# -- the suspended and role checks run on every request ----------------------------------------

def test_a_hit_still_meets_suspension_and_role(w, store):
    w.decide(_inspect(f"{TA}_web"))             # t: the suspended copy read, fresh until t + 2
    w.now += 1.0
    w.decide(_inspect(CID[:12]))                # t + 1: kept until t + 3
    assert w.decide(_inspect(CID[:12]))[2] == [True]
    # a reader's stop: forbidden, though the memo holds a "yes" for the reference
    answer, _, memo, _ = w.decide(_stop(CID[:12], token="tok-dave"))
    assert not answer["Allow"] and "reading only" in answer["Msg"] and memo == []
    assert w.decide(_inspect(CID[:12], token="tok-dave"))[0]["Allow"]  # control: a reader reads (a hit)
    store.suspend(TA, "op", "unpaid")
    w.now += 1.5                                # t + 2.5: the copy is read again; the memo still holds
    assert w.authz._owned.owned(TA, CID[:12])
    answer, _, memo, _ = w.decide(_inspect(CID[:12]))
    assert not answer["Allow"] and "suspended" in answer["Msg"] and memo == []
    store.resume(TA)
    w.now += SUSPENSION_TTL
    assert w.decide(_inspect(CID[:12]))[0]["Allow"]  # control: resumed


def test_redis_down_a_hit_denies_once_the_suspended_copy_expires(w, redis_server):
    w.decide(_inspect(CID[:12]))                 # t: suspended copy and the memo, both until t + 2
    redis_server.connected = False               # Redis stops
    try:
        w.now += 1.0
        answer, _, memo, resolves = w.decide(_inspect(CID[:12]))
        assert answer["Allow"] and memo == [True] and resolves == []   # within the copy's life: as by name
        assert w.decide(_inspect(f"{TA}_web"))[0]["Allow"]          # (a read by name does the same)
        w.now += 1.0                                                 # t + 2: the copy must be read again
        for ref in (CID[:12], f"{TA}_web"):
            answer, out, _, _ = w.decide(_inspect(ref))
            assert not answer["Allow"] and "ownership store unavailable" in answer["Msg"], ref
        # a fresher memo entry does not help either: the copy is read first
        w.authz._owned._kept[(TA, CID[:12])] = (w.now + 10, CID)
        assert not w.decide(_inspect(CID[:12]))[0]["Allow"]
    finally:
        redis_server.connected = True
    assert w.decide(_inspect(CID[:12]))[0]["Allow"]  # control: Redis back


# -- removal, bound, threads ---------------------------------------------------------------------

def test_a_removal_this_worker_records_drops_the_entry(w):
    for ref in (CID[:12], CID):
        w.decide(_inspect(ref))
    assert w.decide(_inspect(CID[:12]))[2] == [True]           # control: kept
    assert w.respond(payload("DELETE", f"/v1.41/containers/{TA}_web", status=204))["Allow"]
    assert len(w.authz._owned) == 0                             # both references of the id, by another one
    answer, _, memo, resolves = w.decide(_inspect(CID[:12]))
    assert not answer["Allow"] and memo == [False] and len(resolves) == 1  # the record is gone: refused


def test_pruned_containers_are_dropped(w):
    w.decide(_inspect(CID[:12]))
    w.decide(_inspect(CID_B[:12], token="tok-bob"))
    assert len(w.authz._owned) == 2
    uri = "/v1.41/containers/prune?filters=" + urllib.parse.quote(json.dumps({"label": [f"{TENANT_LABEL}={TA}"]}))
    prune = payload("POST", uri, status=200, response={"ContainersDeleted": [CID]})
    assert w.respond(prune)["Allow"]
    assert not w.authz._owned.owned(TA, CID[:12]) and w.authz._owned.owned(TB, CID_B[:12])


def test_the_memo_is_bounded():
    t = [0.0]
    m = OwnedMemo(2.0, size=3, clock=lambda: t[0])
    res = Resolution("id", ((CID, TA),))
    for i in range(10):
        m.keep(TA, f"{i:012x}", Resolution("prefix", ((f"{i:012x}" + "0" * 52, TA),)))
        assert len(m) <= 3
    assert m.owned(TA, f"{9:012x}")
    m.keep(TA, CID, res)
    assert m.owned(TA, CID) and len(m) <= 3
    m.drop(TA, "nothing", None)  # dropping what is not there is fine
    assert m.owned(TA, CID)


def test_threads_share_it_safely():
    """Many threads keeping, asking, dropping and overflowing at once: no
    error, and never a "yes" that was not kept for that very tenant."""
    m = OwnedMemo(60.0, size=64)
    errors: list = []

    def work(n):
        try:
            for i in range(3000):
                ref = f"{(n * 7 + i) % 200:012x}"
                cid = ref + "0" * 52
                m.keep(TA, ref, Resolution("prefix", ((cid, TA),)))
                if m.owned(TB, ref):
                    errors.append(("TB", ref))
                m.owned(TA, ref)
                if i % 50 == 0:
                    m.drop(TA, ref, cid)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(m) <= 64


# -- the counter ------------------------------------------------------------------------------------

@pytest.mark.parametrize("buffered", [False, True])
def test_the_counter(buffered):
    from prometheus_client import CollectorRegistry

    metrics.reset()
    try:
        m = metrics.activate("plugin", CollectorRegistry(), buffered=buffered)
        for hit in (True, False, True):
            metrics.resolve_memo(hit)
        metrics.identity_event("hits")
        metrics.flush()
        reg = m.registry
        assert reg.get_sample_value("fdcs_plugin_resolve_memo_total", {"result": "hit"}) == 2
        assert reg.get_sample_value("fdcs_plugin_resolve_memo_total", {"result": "miss"}) == 1
        assert reg.get_sample_value("fdcs_identity_events_total", {"event": "hit"}) == 1
    finally:
        metrics.reset()


# -- memo on against memo off, with the real suspended copy ---------------------------------------

_REF = st.sampled_from([CID[:12], CID[:12], CID, CID[:20], CID_B[:12], CID_B, CID[:11], CID_N[:12], HEXNAME,
                        f"{TA}_web", f"{TB}_db", "abcdef123456"])
_STEP = st.one_of(
    st.tuples(st.sampled_from(["tok-alice", "tok-alice", "tok-bob", "tok-dave"]), st.sampled_from([_inspect, _stop]),
              _REF),
    st.sampled_from(["tick", "tock", "expire", "suspend", "resume", "down", "up"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_STEP, min_size=1, max_size=12))
def test_memo_on_and_off_agree_but_for_redis_down_within_the_suspended_copy(redis_server, monkeypatch, steps):
    """Two authorizers on the same records, one keeping nothing (a memo of
    TTL 0), the real ``SUSPENSION_TTL``, one clock: every decision gives the
    same answer, audit line and metric key -- except, with Redis down, a
    memo hit allowed where the miss is "ownership store unavailable", which
    happens only while the worker's suspended copy is still fresh (as any
    read by name is allowed then)."""
    import fakeredis
    redis_server.connected = True
    fr = fakeredis.FakeRedis(server=redis_server, decode_responses=True)
    fr.flushall()
    s = Store(fr, host="h1")
    s.mark_complete(0)
    on = World(s, monkeypatch)
    off = Authorizer(cfg(), FakeIdentityService(), s)
    off._owned = OwnedMemo(0.0)
    off._clock = off._owned.clock = on.authz._owned.clock
    down = False
    try:
        for step in steps:
            if step in ("tick", "tock", "expire"):
                on.now += {"tick": 0.5, "tock": 1.5, "expire": OWNED_TTL}[step]
            elif step in ("suspend", "resume"):
                redis_server.connected = True
                s.suspend(TA, "op", "x") if step == "suspend" else s.resume(TA)
                redis_server.connected = not down
            elif step in ("down", "up"):
                down = step == "down"
                redis_server.connected = not down
            else:
                token, make, ref = step
                copy_fresh = on.now < on.authz._suspended[0]
                a = on.decide(make(ref, token))
                b_out = len(on.out)
                answer_off = off.authz_request(make(ref, token))
                out_off = on.out[b_out:]
                if a[0] == answer_off:
                    assert a[1] == out_off, step
                else:
                    assert down and copy_fresh and a[2] == [True] and a[0] == {"Allow": True}, (step, a, answer_off)
                    assert "ownership store unavailable" in answer_off["Msg"]
                    assert off._suspended[0] > on.now  # off's copy fresh as well: the same suspended answer
    finally:
        redis_server.connected = True
