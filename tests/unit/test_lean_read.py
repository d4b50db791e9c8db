"""The plugin's lean lane for its commonest reads (``Authorizer._lean_read``:
a container inspect by name or id, a container list) gives exactly what the
general path gives -- the answer, the audit line but its time fields, the
decision's metric key, the identity's counted events, the store's calls --
for every payload, around the lane's edges; it takes the reads it is for;
and the serving thread's remembered identity (``Authorizer._identity``) is
used only while the identity service says it still holds."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import math
import urllib.parse

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from authz_plugin import audit_stream, logfmt, metrics, policy
from authz_plugin.errors import AuthenticationError, Forbidden, IdentityUnavailable, StoreUnavailable
from authz_plugin.identity import Identity
from authz_plugin.policy import Authorizer
from authz_plugin.scoping import TENANT_LABEL

from .conftest import TA, TB, cfg

CID = "c0ffee" + "0" * 58      # TA's, on h1
CID_B = "c0ffef" + "1" * 58    # TB's, on h1
CID_X = "c0ff00" + "2" * 58    # TA's, on h2 only (a full id counts only on its own host)
ADMIN_KEY_HEADER = "X-Fdcs-Admin-Key"


class _Keystone:
    """What an IdentityService answers, with its cache, its counted events
    and ``still_cached``, on fakes: a token -> (project, user, roles)."""

    TOKENS = {
        "tok-alice": (TA, "alice", frozenset({"member"})),
        "tok-bob": (TB, "bob", frozenset({"member"})),
        "tok-dave": (TA, "dave", frozenset({"reader"})),
        "tok-admin": ("admin-project", "admin", frozenset({"admin"})),
        "tok-norole": (TA, "odd", frozenset({"observer"})),
    }
    header_names = frozenset({b"x-auth-token", b"x-auth-tenantid", ADMIN_KEY_HEADER.lower().encode()})

    def __init__(self):
        self.cache: dict[tuple[str, str], Identity] = {}
        self.events: list[str] = []
        self.down = False

    def authenticate(self, headers, source=""):
        if headers.get(ADMIN_KEY_HEADER) is not None:
            if headers.get(ADMIN_KEY_HEADER) != "k" * 16:
                self.events.append("admin_key_refused")
                raise AuthenticationError(f"authentication required: wrong {ADMIN_KEY_HEADER}")
            self.events.append("admin_key")
            return Identity("break-glass", "break-glass", "", frozenset({"admin"}), math.inf, True, "admin-key")
        token = headers.get("X-Auth-Token")
        claim = headers.get("X-Auth-TenantId") or ""
        if not token:
            raise AuthenticationError("authentication required: X-Auth-Token is missing; run fdcs-login")
        key = (token, claim)
        hit = self.cache.get(key)
        if hit is not None:
            self.events.append("hits")
        else:
            if self.down:
                self.events.append("unavailable")
                raise IdentityUnavailable("the identity service cannot be reached; retry")
            if token not in self.TOKENS or claim not in ("", self.TOKENS[token][0]):
                self.events.append("rejected")
                raise AuthenticationError("authentication required: X-Auth-Token is invalid; run fdcs-login")
            project, user, roles = self.TOKENS[token]
            self.events.append("misses")
            hit = self.cache[key] = Identity(user, user, project, roles, 4e9, project == "admin-project", "token",
                                             cache_key=repr(key))
        if not hit.is_admin and not hit.roles & {"member", "reader"}:
            raise Forbidden(f"user {hit.user_name} has no role on project {hit.project_id} that allows "
                            "using this service (needs one of: member, reader)")
        return hit

    def still_cached(self, ident):
        if not ident.cache_key or self.cache.get(eval(ident.cache_key)) is not ident:  # noqa: S307 - our own repr
            return False
        self.events.append("hits")
        return True

    def evict(self):
        self.cache.clear()


class _Store:
    """The store, shared by both authorizers, that can fail on demand."""

    def __init__(self, store):
        self._s = store
        self.fail: str | None = None   # None, "down" (StoreUnavailable) or "boom" (an internal fault)
        self.calls: list = []

    def __getattr__(self, name):
        return getattr(self._s, name)

    def _maybe_fail(self):
        if self.fail == "down":
            raise StoreUnavailable("ownership store unavailable, retry")
        if self.fail == "boom":
            raise RuntimeError("a fault of ours")

    def resolve(self, refs):
        self.calls.append(("resolve", [tuple(r) for r in refs]))
        self._maybe_fail()
        return self._s.resolve(refs)

    def suspended(self):
        self.calls.append(("suspended",))
        self._maybe_fail()
        return self._s.suspended()


@pytest.fixture
def world(store, store_h2, monkeypatch):
    """Two authorizers on the same records, one with the lean lane and the
    identity memo, one with neither; every decision's outputs captured."""
    store.add("container", CID, TA, f"{TA}_web")
    store.add("container", CID_B, TB, f"{TB}_db")
    store_h2.add("container", CID_X, TA, f"{TA}_far")
    shared = _Store(store)
    lean = Authorizer(cfg(), _Keystone(), shared)
    general = Authorizer(cfg(), _Keystone(), shared)
    general._lean_read = lambda payload, t0: None
    general._ident_names = None
    assert lean._ident_names == tuple(sorted(n.decode() for n in _Keystone.header_names))

    out: list = []
    monkeypatch.setattr(policy, "SUSPENSION_TTL", 0.0)  # both read the suspended set on every decision
    monkeypatch.setattr(audit_stream, "active", lambda: True)
    monkeypatch.setattr(audit_stream, "submit", lambda text: out.append(("line", _untimed(text))))
    monkeypatch.setattr(metrics, "decision", lambda hook, allow, reason, seconds: out.append(("metric", hook, allow, reason)))
    rids = [itertools.count()]  # restarted per decision: both paths generate the same ids
    monkeypatch.setattr(logfmt, "new_request_id", lambda: f"generated-{next(rids[0])}")

    class W:
        pass

    w = W()
    w.lean, w.general, w.store, w.out = lean, general, shared, out

    def decide(authz, payload):
        out.clear()
        shared.calls.clear()
        rids[0] = itertools.count()
        ks = authz.identity
        n = len(ks.events)
        try:
            answer = authz.authz_request(copy.deepcopy(payload))
        except Exception as e:  # noqa: BLE001 - the same escape on both paths, then
            answer = ("raised", type(e).__name__, str(e))
        return answer, list(out), list(shared.calls), ks.events[n:]

    def both(payload):
        """Both paths on ``payload``; their outputs, asserted equal."""
        a = decide(lean, payload)
        b = decide(general, payload)
        assert a == b, payload
        return a

    w.both = both
    return w


def _untimed(text: str) -> dict:
    line = json.loads(text)
    assert isinstance(line.pop("ts"), float) and isinstance(line.pop("us"), int)
    return line


def _p(uri, token="tok-alice", headers=None, method="GET", body=None, tenant=None):
    h = {"X-Auth-Token": token} if token else {}
    if tenant is not None:
        h["X-Auth-Tenantid"] = tenant
    h["User-Agent"] = "Docker-Client/20.10.24+dfsg1 (linux)"
    h.update(headers or {})
    p = {"RequestMethod": method, "RequestUri": uri, "RequestHeaders": h}
    if body is not None:
        p["RequestBody"] = body
    return p


def _list_uri(value: str, quote=True, version="1.41", before="", after="") -> str:
    v = urllib.parse.quote(value) if quote else value
    return f"/v{version}/containers/json?{before}filters={v}{after}"


def _filter(tenant: str, legacy: bool) -> str:
    label = f"{TENANT_LABEL}={tenant}"
    return json.dumps({"label": [label]} if legacy else {"label": {label: True}}, separators=(",", ":"))


def test_the_lane_takes_the_reads_it_is_for(world, monkeypatch):
    taken = []
    real = Authorizer._lean_read

    def spy(self, payload, t0):
        r = real(self, payload, t0)
        taken.append(r is not None)
        return r

    monkeypatch.setattr(Authorizer, "_lean_read", spy)
    for uri in (f"/v1.41/containers/{TA}_web/json", f"/v1.41/containers/{CID[:12]}/json",
                f"/v1.40/containers/{CID}/json", _list_uri(_filter(TA, True)), _list_uri(_filter(TA, False)),
                _list_uri(_filter(TA, False), before="all=1&")):
        taken.clear()
        answer, out, calls, events = world.both(_p(uri))
        assert answer == {"Allow": True}, (uri, answer)
        assert taken == [True], uri
        line = out[1][1]
        assert (line["method"], line["reason"], line["tenant"], line["user"]) == ("GET", "ok", TA, "alice")
    # and not the others: the general path decides them
    for p in (_p(f"/v1.41/containers/{TA}_web/json", headers={"Content-Type": "application/json"}),
              _p(f"/v1.41/containers/{TA}_web/json", headers={"Content-Length": "0"}),
              _p(f"/v1.41/containers/{TA}_web/json", body="e30="),
              _p(f"/v1.41/containers/{TA}_web/top"),
              _p(f"/v1.041/containers/{TA}_web/json"),
              _p(f"/v1.41/containers/{TA}%5fweb/json"),
              _p(_list_uri(_filter(TA, True), after=";x=1")),
              _p(f"/v1.41/containers/{TA}_web/json", headers={"x-auth-token": "tok-bob"})):
        taken.clear()
        world.both(p)
        assert taken == [False], p


def test_the_request_id_is_the_general_paths(world):
    for name in ("X-Request-Id", "x-request-id"):
        for rid, kept in (("r" * 64, True), ("r" * 65, False), ("", False), ("a\nb", False), ("rid-1", True)):
            for uri in (f"/v1.41/containers/{TA}_web/json", f"/v1.41/containers/{TB}_db/json"):
                line = world.both(_p(uri, headers={name: rid}))[1][1][1]
                assert line["rid"] == (rid if kept else "generated-0"), (name, rid)


def test_refusals_in_the_lane_are_the_general_paths(world):
    cases = [
        (_p(f"/v1.41/containers/{TB}_db/json"), "No such container"),               # another tenant's name
        (_p(f"/v1.41/containers/{CID_B[:12]}/json"), "No such container"),           # another tenant's id
        (_p(f"/v1.41/containers/{CID_X}/json"), "No such container"),                # a full id of another host
        (_p(f"/v1.41/containers/web/json"), "No such container"),                    # not scoped, not hex
        (_p(_list_uri(_filter(TB, True))), "tenant label"),                          # another tenant's filter
        (_p(_list_uri(_filter(TA, True), after="&filters=x")), "more than once"),
        (_p("/v1.41/containers/json?all=1"), "must be filtered"),
        (_p(f"/v1.41/containers/{TA}_web/json", token=None), "fdcs-login"),
        (_p(f"/v1.41/containers/{TA}_web/json", token="tok-forged"), "invalid"),
        (_p(f"/v1.41/containers/{TA}_web/json", token="tok-norole"), "no role"),
        (_p(f"/v1.41/containers/{TA}_web/json", tenant=TB), "invalid"),
        (_p(f"/v1.41/containers/{TA}_web/json", headers={ADMIN_KEY_HEADER: "wrong"}), "wrong"),
        (_p(f"/v1.42/containers/{TA}_web/json"), "too new"),
    ]
    for p, match in cases:
        answer, out, _, _ = world.both(p)
        assert not answer["Allow"] and match in answer["Msg"], (p["RequestUri"], answer)
        assert out[1][1]["msg"] == answer["Msg"] and out[1][1]["resource"] == ""
    # positive controls: the same calls without the forbidden part
    for p in (_p(f"/v1.41/containers/{TA}_web/json"), _p(f"/v1.41/containers/{CID[:12]}/json"),
              _p(_list_uri(_filter(TA, True))), _p(f"/v1.41/containers/{TA}_web/json", tenant=TA),
              _p(f"/v1.41/containers/{TB}_db/json", token="tok-bob"),
              _p(f"/v1.41/containers/{TB}_db/json", headers={ADMIN_KEY_HEADER: "k" * 16})):
        assert world.both(p)[0]["Allow"], p


def test_suspension_role_and_store_failures_in_the_lane(world):
    store = world.store
    store.suspend(TA, "op", "unpaid")
    answer = world.both(_p(f"/v1.41/containers/{TA}_web/json"))[0]
    assert not answer["Allow"] and "suspended" in answer["Msg"] and "unpaid" in answer["Msg"]
    assert world.both(_p(f"/v1.41/containers/{TB}_db/json", token="tok-bob"))[0]["Allow"]   # control
    store.resume(TA)
    assert world.both(_p(f"/v1.41/containers/{CID[:12]}/json", token="tok-dave"))[0]["Allow"]  # a reader reads
    for fail, match in (("down", "ownership store unavailable"), ("boom", "internal error")):
        store.fail = fail
        for uri in (f"/v1.41/containers/{CID[:12]}/json", f"/v1.41/containers/{TA}_web/json", _list_uri(_filter(TA, True))):
            answer, out, _, _ = world.both(_p(uri, headers={"X-Request-Id": "rid-7"}))
            assert not answer["Allow"] and match in answer["Msg"], (fail, uri, answer)
        assert world.both(_p(uri, token="tok-admin"))[0]["Allow"]  # administrators need no Redis
        store.fail = None


def test_the_remembered_identity_holds_only_while_the_service_says_so(world):
    lean = world.lean
    ks = lean.identity
    calls = []
    real = ks.authenticate
    ks.authenticate = lambda headers, source="": calls.append(1) or real(headers, source)
    p = _p(f"/v1.41/containers/{TA}_web/json")
    for _ in range(3):
        assert lean.authz_request(copy.deepcopy(p))["Allow"]
    assert len(calls) == 1 and ks.events == ["misses", "hits", "hits"]      # remembered, each use counted
    ks.evict()                                                             # the entry is gone: asked again
    assert lean.authz_request(copy.deepcopy(p))["Allow"] and len(calls) == 2
    other = _p(f"/v1.41/containers/{TB}_db/json", token="tok-bob")         # other credentials: asked
    assert lean.authz_request(other)["Allow"] and len(calls) == 3
    claim = _p(f"/v1.41/containers/{TA}_web/json", tenant=TB)              # the same token, another claim
    assert not lean.authz_request(claim)["Allow"] and len(calls) == 4
    assert not lean.authz_request(copy.deepcopy(claim))["Allow"] and len(calls) == 5  # a refusal: never kept
    key = _p(f"/v1.41/containers/{TA}_web/json", headers={ADMIN_KEY_HEADER: "k" * 16})
    for _ in range(2):
        assert lean.authz_request(copy.deepcopy(key))["Allow"]
    assert len(calls) == 7                                                 # break-glass: never cached, never kept
    # the general path's decisions use it too (a create with the same token)
    lean.authz_request(copy.deepcopy(p))
    n = len(calls)
    lean.authz_request(_p(f"/v1.41/containers/{TA}_web/stop", method="POST", headers={"Content-Length": "0"}))
    assert len(calls) == n


# -- the differential property ---------------------------------------------------------------

_VERSIONS = st.sampled_from(["1.41"] * 8 + ["1.40"] * 2 + ["1.39", "1.42", "1.041", "1.4", "2.0", "1..41", "1.41.0", "1", ""])
_REFS = st.one_of(
    st.sampled_from([f"{TA}_web", CID[:12], CID, f"{TB}_db", CID_B[:12]]),
    st.sampled_from([f"{TA}_web", f"{TA}_nothing", f"{TB}_db", "web", "json", ".", "..", "-x", "a.b-c_d",
                     CID, CID_B, CID_X, CID.upper()[:12], f"{TA}_web%2F..", f"{TA}%5Fweb", "%zz", "", "é",
                     f"{TA}_web/..", "a b", "a#b", "a\tb"]),
    st.builds(lambda c, n: c[:n], st.sampled_from([CID, CID_B, CID_X, "c0ff"]), st.integers(1, 64)),
    st.text(st.sampled_from("abcdef0123456789_.-/%Z"), max_size=12),
)
_FILTERS = st.one_of(
    st.builds(_filter, st.sampled_from([TA, TB, "", TA + " "]), st.booleans()),
    st.sampled_from(['{"label":[]}', '{"label":{"x=y":true}}', "[]", "{", "", '{"label":["%s=%s"],"name":["a"]}' % (TENANT_LABEL, TA),
                     '{"label":["%s=%s","%s=%s"]}' % (TENANT_LABEL, TA, TENANT_LABEL, TB)]),
)


@st.composite
def _uris(draw):
    version = draw(_VERSIONS)
    kind = draw(st.sampled_from(["inspect", "inspect", "list", "list", "other"]))
    if kind == "inspect":
        suffix = draw(st.sampled_from(["json"] * 6 + ["json/", "top", "json?size=1"]))
        return f"/v{version}/containers/{draw(_REFS)}/{suffix}"
    if kind == "list":
        value = draw(st.one_of(st.builds(_filter, st.just(TA), st.booleans()), _FILTERS))
        quote = draw(st.booleans())
        before = draw(st.sampled_from([""] * 6 + ["all=1&", "filters=x&", "&", "a=%zz&", "size=1&", "x;y&"]))
        after = draw(st.sampled_from([""] * 6 + ["&all=1", "&filters=" + urllib.parse.quote(_filter(TA, True)), "#f",
                                                 " ", "&a=+"]))
        if draw(st.integers(0, 9)) == 0:
            return f"/v{version}/containers/json" + draw(st.sampled_from(["", "?", "?all=1"]))
        return _list_uri(value, quote, version, before, after)
    return draw(st.sampled_from([f"/v{version}/containers/json/json", f"/v{version}/images/json", "/_ping",
                                 f"/v{version}/containers//json", f"//v{version}/containers/json",
                                 f"/v{version}/containers/{TA}_web/json/../json", "/containers/json"]))


_HEADERS = st.dictionaries(
    st.sampled_from(["X-Request-Id", "x-request-id", "Content-Type", "content-length", "Content-Length",
                     "X-Auth-Tenantid", "X-AUTH-TOKEN", ADMIN_KEY_HEADER, "Accept"]),
    st.one_of(st.sampled_from(["rid-1", "", "r" * 64, "r" * 65, "a\nb", "0", "application/json", TA, TB,
                               "tok-bob", "k" * 16]), st.integers(0, 3)),
    max_size=3)


@st.composite
def _payloads(draw):
    p = _p(draw(_uris()), token=draw(st.sampled_from(["tok-alice", "tok-alice", "tok-bob", "tok-dave", "tok-admin",
                                                       "tok-norole", "tok-forged", None])),
           method=draw(st.sampled_from(["GET", "GET", "GET", "GET", "HEAD", "POST"])))
    if draw(st.integers(0, 5)) == 0:
        p["RequestHeaders"].update(draw(_HEADERS))
    if draw(st.integers(0, 9)) == 0:
        p["RequestBody"] = draw(st.sampled_from(["", "e30=", None, "!!"]))
    if draw(st.integers(0, 19)) == 0:
        p["RequestHeaders"] = draw(st.sampled_from([None, [], {}, "x"]))
    return p


_STEPS = st.lists(st.one_of(_payloads(), _payloads(), _payloads(),
                            st.sampled_from(["evict", "suspend", "resume", "down", "boom", "up", "ks-down", "ks-up"])),
                  min_size=1, max_size=8)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_STEPS)
def test_the_lane_and_the_general_path_agree(world, steps):
    store = world.store
    store.fail = None
    store.resume(TA)
    for ks in (world.lean.identity, world.general.identity):
        ks.down = False
    for step in steps:
        if isinstance(step, dict):
            world.both(step)
        elif step == "evict":
            world.lean.identity.evict()
            world.general.identity.evict()
        elif step == "suspend":
            store.fail, was = None, store.fail
            store.suspend(TA, "op", "why")
            store.fail = was
        elif step == "resume":
            store.fail, was = None, store.fail
            store.resume(TA)
            store.fail = was
        elif step in ("down", "boom"):
            store.fail = step
        elif step == "up":
            store.fail = None
        else:
            for ks in (world.lean.identity, world.general.identity):
                ks.down = step == "ks-down"
    store.fail = None


def test_audit_record_writes_the_line_audit_wrote(monkeypatch):
    """``audit.audit`` (the general path) now goes through ``audit.record``
    (the lane): the line of a decision with and without a readable request."""
    from authz_plugin import audit
    from authz_plugin.request import parse

    lines = []
    monkeypatch.setattr(audit_stream, "active", lambda: True)
    monkeypatch.setattr(audit_stream, "submit", lines.append)
    payload = {"RequestMethod": "GET" * 5, "RequestUri": "/x" * 200}
    audit.audit("request", "r1", payload, None, {"tenant": TA, "user": "u"}, "res", {"Allow": False, "Msg": "no"},
                "policy", 0.0)
    req = parse("GET", f"/v1.41/containers/{TA}_web/json", {}, None)
    audit.audit("request", "r2", payload, req, {}, "", {"Allow": True}, "ok", 0.0)
    got = [orjson.loads(t) for t in lines]
    for g in got:
        assert isinstance(g.pop("ts"), float) and isinstance(g.pop("us"), int)
    assert got == [
        {"hook": "request", "rid": "r1", "tenant": TA, "user": "u", "method": ("GET" * 5)[:10],
         "path": ("/x" * 200)[:300], "resource": "res", "allow": False, "reason": "policy", "msg": "no"},
        {"hook": "request", "rid": "r2", "tenant": "", "user": "", "method": "GET",
         "path": f"/containers/{TA}_web/json", "resource": "", "allow": True, "reason": "ok"},
    ]
