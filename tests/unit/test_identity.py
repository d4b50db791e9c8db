"""IdentityService against a fake Keystone over real HTTP (tests/fakes/keystone.py).

Every refusal is paired with a positive control, and Keystone calls are
counted at the fake, so "served from the cache" means zero requests seen.
Time is a FakeClock shared by the service and the fake, never a sleep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import threading
import types

import pytest

from authz_plugin import config
from authz_plugin.errors import AuthenticationError, ConfigError, FdcsError, Forbidden, IdentityUnavailable
from authz_plugin.identity import (MSG_EXPIRED, MSG_INVALID, MSG_MISSING, MSG_SLOW_DOWN,
                                   MSG_UNAVAILABLE, Identity, IdentityService)
from tests.fakes import FakeClock, FakeKeystone

TOKENS_PATH = "/v3/auth/tokens"


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ks(clock):
    with FakeKeystone(clock=clock) as fake:
        yield fake


@pytest.fixture
def w(ks):
    """The directory every test starts from."""
    n = types.SimpleNamespace()
    n.demo = ks.add_project("demo")
    n.other = ks.add_project("other")
    n.admin_project = ks.add_project("admin")
    n.decoy = ks.add_project("admin", domain_id=ks.add_domain("Other"))  # same name, other id
    n.alice = ks.add_user("alice")          # member on demo, reader on other
    ks.assign(n.alice, n.demo, "member")
    ks.assign(n.alice, n.other, "reader")
    n.rita = ks.add_user("rita")            # reader only
    ks.assign(n.rita, n.demo, "reader")
    n.odd = ks.add_user("odd")              # a role FDCS knows nothing of
    ks.assign(n.odd, n.demo, "load-balancer_observer")
    n.op = ks.add_user("operator")          # site administrator
    ks.assign(n.op, n.admin_project, "admin")
    n.eve = ks.add_user("eve")              # admin role, on the wrong projects
    ks.assign(n.eve, n.demo, "admin")
    ks.assign(n.eve, n.decoy, "admin")
    ks.assign(n.eve, n.admin_project, "member")
    n.dom = ks.add_user("dom")
    ks.assign(n.dom, "domain:default", "admin")
    return n


def make(ks, clock, w=None, **overrides):
    opts = {"keystone.url": ks.url,
            "keystone.admin_project_id": w.admin_project if w else "none",
            "keystone.admin_key_file": "",
            "keystone.timeout": 2.0}
    opts.update({f"keystone.{k}": v for k, v in overrides.items()})
    cfg = config.load(path=None, env={}, overrides=opts, require=("keystone",))
    return IdentityService(cfg, clock=clock)


@pytest.fixture
def svc(ks, clock, w):
    return make(ks, clock, w)


def auth(svc, token=None, tenant=None, source="", **extra):
    headers = dict(extra)
    if token is not None:
        headers["X-Auth-Token"] = token
    if tenant is not None:
        headers["X-Auth-Tenantid"] = tenant  # the engine's canonical spelling
    return svc.authenticate(headers, source)


# -- Identity.may: a pure table ---------------------------------------------------

@pytest.mark.parametrize("roles, admin, method, allowed", [
    ({"member"}, False, "POST", True),
    ({"member"}, False, "GET", True),
    ({"admin"}, False, "DELETE", True),      # admin is a member role by default
    ({"reader"}, False, "GET", True),
    ({"reader"}, False, "HEAD", True),
    ({"reader"}, False, "head", True),
    ({"reader"}, False, "POST", False),
    ({"reader"}, False, "DELETE", False),
    ({"reader"}, False, "PUT", False),
    (set(), False, "GET", False),
    ({"other"}, False, "GET", False),
    (set(), True, "POST", True),             # administrators always
])
def test_may_table(roles, admin, method, allowed):
    ident = Identity("u", "user", "p", frozenset(roles), 0.0, admin, "token")
    assert ident.may(method) is allowed


def test_may_uses_the_configured_role_sets():
    ident = Identity("u", "user", "p", frozenset({"operator"}), 0.0, False, "token",
                     member_roles=frozenset({"operator"}), reader_roles=frozenset({"viewer"}))
    assert ident.may("POST")
    viewer = Identity("u", "user", "p", frozenset({"viewer"}), 0.0, False, "token",
                      member_roles=frozenset({"operator"}), reader_roles=frozenset({"viewer"}))
    assert viewer.may("GET") and not viewer.may("POST")


# -- project-scoped tokens and the tenant header --------------------------------------

def test_project_scoped_token_without_tenant_header_acts_for_its_project(ks, svc, w, clock):
    token = ks.issue(w.alice, w.demo)
    ident = auth(svc, token)
    assert ident.project_id == w.demo
    assert ident.user_id == w.alice and ident.user_name == "alice"
    assert ident.roles == {"member"}
    assert ident.via == "token" and not ident.is_admin
    assert ident.expires_at == pytest.approx(clock() + ks.token_ttl, abs=1e-3)
    assert ks.count("GET", TOKENS_PATH) == 1


def test_headers_are_read_case_insensitively(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    for tok_name, tenant_name in [("X-Auth-Token", "X-Auth-TenantId"),
                                  ("x-auth-token", "x-auth-tenantid"),
                                  ("X-AUTH-TOKEN", "X-Auth-Tenantid")]:
        assert svc.authenticate({tok_name: token, tenant_name: w.demo}).project_id == w.demo


def test_tenant_header_equal_to_the_token_project_is_accepted(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    assert auth(svc, token, w.demo).project_id == w.demo


@pytest.mark.parametrize("claim", ["other", " {demo}", "{demo} ", "\t{demo}", "{demo}\n", "{DEMO}",
                                   "{demo}x", "{demo}\x00"])
def test_tenant_header_must_equal_the_token_project_exactly(ks, svc, w, claim):
    token = ks.issue(w.alice, w.demo)
    claimed = claim.replace("other", w.other).format(demo=w.demo, DEMO=w.demo.upper())
    with pytest.raises(AuthenticationError) as e:
        auth(svc, token, claimed)
    assert repr(claimed) in str(e.value)           # names the tenant given
    assert w.demo in str(e.value) and "demo" in str(e.value)  # and the token's project
    assert auth(svc, token, w.demo).project_id == w.demo      # control


@pytest.mark.parametrize("headers", [{}, {"X-Auth-Token": ""}, {"X-Auth-TenantId": "x"}])
def test_missing_token_is_refused_with_the_login_hint(ks, svc, w, headers):
    with pytest.raises(AuthenticationError) as e:
        svc.authenticate(headers)
    assert str(e.value) == MSG_MISSING and "fdcs-login" in str(e.value)
    assert ks.count() == 0
    assert auth(svc, ks.issue(w.alice, w.demo)).project_id == w.demo  # control


def test_conflicting_case_variants_of_a_header_are_refused(ks, svc, w):
    a, b = ks.issue(w.alice, w.demo), ks.issue(w.alice, w.demo)
    with pytest.raises(AuthenticationError, match="more than one X-Auth-Token"):
        svc.authenticate({"X-Auth-Token": a, "x-auth-token": b})
    assert svc.authenticate({"X-Auth-Token": a, "x-auth-token": a}).project_id == w.demo


# -- invalid, malformed, expired ------------------------------------------------------

def test_invalid_token_is_refused_and_remembered_for_negative_ttl(ks, clock, w):
    svc = make(ks, clock, w, negative_ttl=10)
    with pytest.raises(AuthenticationError) as e:
        auth(svc, "not-a-real-token")
    assert str(e.value) == MSG_INVALID and "fdcs-login" in str(e.value)
    assert ks.count() == 1
    with pytest.raises(AuthenticationError, match="invalid"):
        auth(svc, "not-a-real-token")
    assert ks.count() == 1                     # remembered: Keystone not asked again
    assert svc.stats()["negative_hits"] == 1
    clock.advance(10)
    with pytest.raises(AuthenticationError):
        auth(svc, "not-a-real-token")
    assert ks.count() == 2                     # forgotten after negative_ttl
    assert auth(svc, ks.issue(w.alice, w.demo)).project_id == w.demo  # control


@pytest.mark.parametrize("token", ["abc def", "abc\ndef", "abc\x00", "é" * 10, "a" * 9000])
def test_malformed_token_is_refused_without_asking_keystone(ks, svc, w, token):
    with pytest.raises(AuthenticationError) as e:
        auth(svc, token)
    assert str(e.value) == MSG_INVALID
    assert ks.count() == 0
    assert auth(svc, ks.issue(w.alice, w.demo)).project_id == w.demo


def test_overlong_tenant_header_is_refused_without_asking_keystone(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    with pytest.raises(AuthenticationError, match="not a project id"):
        auth(svc, token, w.demo * 10)
    assert ks.count() == 0
    assert auth(svc, token, w.demo).project_id == w.demo


def test_control_characters_in_the_tenant_header_are_quoted_not_echoed(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    with pytest.raises(AuthenticationError) as e:
        auth(svc, token, w.demo + "\nforged log line")
    assert "\n" not in str(e.value) and "\\n" in str(e.value)
    assert auth(svc, token, w.demo).project_id == w.demo


def test_token_expired_at_keystone_is_refused(ks, svc, w, clock):
    token = ks.issue(w.alice, w.demo, expires_in=60)
    clock.advance(61)
    with pytest.raises(AuthenticationError, match="invalid or expired"):
        auth(svc, token)
    fresh = ks.issue(w.alice, w.demo, expires_in=60)
    assert auth(svc, fresh).project_id == w.demo


def test_cache_ttl_is_capped_by_the_token_expiry(ks, clock, w):
    svc = make(ks, clock, w, cache_ttl=300)
    token = ks.issue(w.alice, w.demo, expires_in=60)
    auth(svc, token)
    clock.advance(59)
    assert auth(svc, token).project_id == w.demo
    assert ks.count() == 1
    clock.advance(1)                             # now == expires_at
    with pytest.raises(AuthenticationError):
        auth(svc, token)


def test_expired_cached_token_is_refused_even_during_an_outage(ks, svc, w, clock):
    token = ks.issue(w.alice, w.demo, expires_in=60)
    auth(svc, token)
    ks.fail = 503
    clock.advance(30)
    assert auth(svc, token).project_id == w.demo   # control: cached, outage or not
    clock.advance(31)
    with pytest.raises((AuthenticationError, IdentityUnavailable)):
        auth(svc, token)


def test_expiry_is_checked_on_every_hit_whatever_the_cache_backend_does(ks, svc, w, clock):
    # A cache backend that never expires anything (as a shared store might
    # not): the service itself must still refuse the expired identity.
    svc._cache._ok = {}
    token = ks.issue(w.alice, w.demo, expires_in=60)
    auth(svc, token)
    clock.advance(59)
    assert auth(svc, token).project_id == w.demo
    clock.advance(1)
    with pytest.raises(AuthenticationError) as e:
        auth(svc, token)
    assert str(e.value) == MSG_EXPIRED
    assert ks.count() == 1                          # decided from the entry alone
    assert svc.stats()["expired"] == 1


# -- the cache ---------------------------------------------------------------------------

def test_warm_cache_makes_zero_keystone_calls(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    first = auth(svc, token, w.demo)
    assert ks.count() == 1
    for _ in range(50):
        assert auth(svc, token, w.demo) == first
    assert ks.count() == 1
    s = svc.stats()
    assert (s["hits"], s["misses"], s["keystone_calls"]) == (50, 1, 1)


def test_cache_entries_last_cache_ttl_which_bounds_revocation(ks, clock, w):
    svc = make(ks, clock, w, cache_ttl=300)
    token = ks.issue(w.alice, w.demo)
    auth(svc, token)
    ks.revoke(token)
    clock.advance(299)
    assert auth(svc, token).project_id == w.demo   # documented revocation delay
    assert ks.count() == 1
    clock.advance(1)
    with pytest.raises(AuthenticationError):
        auth(svc, token)
    assert ks.count() == 2


def test_cache_key_is_a_sha256_digest_never_the_token(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    auth(svc, token, w.demo)
    with pytest.raises(AuthenticationError):
        auth(svc, "bogus-token")
    keys = list(svc._cache._ok.keys()) + list(svc._cache._refused.keys())
    assert hashlib.sha256(f"{token}\0{w.demo}".encode()).hexdigest() in keys
    assert hashlib.sha256(b"bogus-token\0").hexdigest() in keys
    assert not any(token in k or "bogus" in k for k in keys)


def test_still_cached_holds_exactly_while_the_cache_would_answer_the_same(ks, clock, w):
    svc = make(ks, clock, w, cache_ttl=300)
    token = ks.issue(w.alice, w.demo, expires_in=1000)
    ident = auth(svc, token, w.demo)
    assert ident.cache_key and svc.still_cached(ident)
    hits = svc.stats()["hits"]
    assert svc.still_cached(ident) and svc.stats()["hits"] == hits + 1  # counted as the hit it is
    assert auth(svc, token, w.demo) is ident                           # what authenticate answers
    # not an answer of the cache: no
    assert not svc.still_cached(dataclasses.replace(ident, cache_key=""))
    assert not svc.still_cached(dataclasses.replace(ident))          # an equal object, not the entry
    # the entry's time is up (cache TTL): no, and authenticate asks Keystone again
    clock.advance(300)
    assert not svc.still_cached(ident)
    again = auth(svc, token, w.demo)
    assert again is not ident and again == ident and ks.count() == 2
    assert not svc.still_cached(ident) and svc.still_cached(again)     # the new entry, not the old one
    # the token's own expiry: no, and authenticate refuses it
    clock.advance(701)
    assert not svc.still_cached(again)
    with pytest.raises(AuthenticationError):
        auth(svc, token, w.demo)


def test_the_headers_an_answer_depends_on_are_named(ks, clock, w):
    assert make(ks, clock, w).header_names == frozenset({b"x-auth-token", b"x-auth-tenantid", b"x-fdcs-admin-key"})
    assert make(ks, clock, w, admin_key_header="X-Break-Glass").header_names == frozenset(
        {b"x-auth-token", b"x-auth-tenantid", b"x-break-glass"})


def test_cache_is_bounded(ks, clock, w):
    svc = make(ks, clock, w, cache_size=3)
    for _ in range(5):
        auth(svc, ks.issue(w.alice, w.demo))
    assert svc.stats()["cached"] == 3


def test_concurrent_requests_share_the_cache_safely(ks, svc, w):
    tokens = [ks.issue(w.alice, w.demo) for _ in range(4)]
    for t in tokens:
        auth(svc, t)
    errors = []

    def worker():
        try:
            for i in range(100):
                assert auth(svc, tokens[i % 4]).project_id == w.demo
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ks.count() == 4
    assert svc.stats()["hits"] == 1600


# -- outages ------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [500, 502, 503, 403, "close", "garbage"])
def test_keystone_failure_is_unavailable_and_never_cached(ks, svc, w, failure):
    token = ks.issue(w.alice, w.demo)
    ks.fail = failure
    with pytest.raises(IdentityUnavailable) as e:
        auth(svc, token)
    assert str(e.value) == MSG_UNAVAILABLE
    with pytest.raises(IdentityUnavailable):
        auth(svc, token)
    assert ks.count() == 2                       # asked again: nothing was cached
    ks.fail = None
    assert auth(svc, token).project_id == w.demo  # not remembered as invalid
    assert svc.stats()["negative_hits"] == 0


def test_keystone_timeout_is_unavailable(ks, clock, w):
    svc = make(ks, clock, w, timeout=0.2)
    token = ks.issue(w.alice, w.demo)
    ks.delay = 5.0
    with pytest.raises(IdentityUnavailable):
        auth(svc, token)
    ks.delay = 0
    assert auth(svc, token).project_id == w.demo


def test_keystone_port_closed_is_unavailable(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    ks.stop()
    with pytest.raises(IdentityUnavailable):
        auth(svc, token)
    ks.start()                                     # same port again
    assert auth(svc, token).project_id == w.demo


def test_cached_tokens_keep_working_through_an_outage_uncached_ones_do_not(ks, svc, w):
    cached, uncached = ks.issue(w.alice, w.demo), ks.issue(w.alice, w.demo)
    auth(svc, cached)
    ks.fail = 503
    assert auth(svc, cached).project_id == w.demo
    with pytest.raises(IdentityUnavailable):
        auth(svc, uncached)


# -- unscoped tokens ------------------------------------------------------------------------

def test_unscoped_token_is_rescoped_to_the_tenant_header(ks, svc, w):
    token = ks.issue(w.alice)                      # unscoped
    on_demo = auth(svc, token, w.demo)
    assert (on_demo.project_id, on_demo.roles) == (w.demo, {"member"})
    assert [c for c in ks.calls] == [("GET", TOKENS_PATH), ("GET", "/v3/auth/projects"),
                                     ("POST", TOKENS_PATH)]
    on_other = auth(svc, token, w.other)           # roles are those on *that* project
    assert (on_other.project_id, on_other.roles) == (w.other, {"reader"})
    assert on_other.may("GET") and not on_other.may("POST")
    ks.reset_calls()
    assert auth(svc, token, w.demo) == on_demo
    assert auth(svc, token, w.other) == on_other
    assert ks.count() == 0                          # both cached


def test_unscoped_token_needs_a_tenant_header(ks, svc, w):
    token = ks.issue(w.alice)
    with pytest.raises(AuthenticationError, match="X-Auth-TenantId must name one"):
        auth(svc, token)
    assert auth(svc, token, w.demo).project_id == w.demo


def test_unscoped_token_tenant_must_be_one_of_its_projects(ks, svc, w):
    token = ks.issue(w.alice)
    with pytest.raises(AuthenticationError) as e:
        auth(svc, token, w.admin_project)
    msg = str(e.value)
    assert repr(w.admin_project) in msg
    assert w.demo in msg and w.other in msg        # the projects it may act for
    assert ks.count("POST", TOKENS_PATH) == 0       # never rescoped to a foreign project
    assert auth(svc, token, w.demo).project_id == w.demo


@pytest.mark.parametrize("scope", ["domain", "system"])
def test_domain_and_system_scoped_tokens_are_refused(ks, svc, w, scope):
    token = (ks.issue(w.dom, domain_id="default") if scope == "domain"
             else ks.issue(w.dom, system=True))
    with pytest.raises(AuthenticationError, match=f"{scope}-scoped tokens are not accepted"):
        auth(svc, token)
    with pytest.raises(AuthenticationError):
        auth(svc, token, w.demo)
    assert auth(svc, ks.issue(w.alice, w.demo)).project_id == w.demo


# -- roles and administrators ---------------------------------------------------------------

def test_reader_may_read_only(ks, svc, w):
    ident = auth(svc, ks.issue(w.rita, w.demo))
    assert ident.may("GET") and ident.may("HEAD")
    assert not ident.may("POST") and not ident.may("DELETE")


def test_user_without_member_or_reader_role_is_forbidden(ks, svc, w):
    token = ks.issue(w.odd, w.demo)
    with pytest.raises(Forbidden) as e:
        auth(svc, token)
    assert "odd" in str(e.value) and w.demo in str(e.value)
    with pytest.raises(Forbidden):                 # also when served from the cache
        auth(svc, token)
    assert ks.count() == 1
    assert auth(svc, ks.issue(w.alice, w.demo)).may("POST")  # control


def test_admin_is_the_admin_role_on_the_admin_project_pinned_by_id(ks, svc, w):
    admin = auth(svc, ks.issue(w.op, w.admin_project))
    assert admin.is_admin and admin.may("DELETE")
    # the admin role on another project, even one *named* admin, is not admin
    on_demo = auth(svc, ks.issue(w.eve, w.demo))
    assert not on_demo.is_admin and on_demo.may("POST")  # still a member there
    on_decoy = auth(svc, ks.issue(w.eve, w.decoy))
    assert ks.projects[w.decoy]["name"] == "admin" and not on_decoy.is_admin
    # a member role on the admin project is not admin either
    assert not auth(svc, ks.issue(w.eve, w.admin_project)).is_admin


def test_admin_roles_are_configurable(ks, clock, w):
    svc = make(ks, clock, w, admin_roles=["cloud-admin"])
    assert not auth(svc, ks.issue(w.op, w.admin_project)).is_admin
    ks.assign(w.op, w.admin_project, "cloud-admin")
    assert auth(svc, ks.issue(w.op, w.admin_project)).is_admin


# -- rate limit on unknown tokens -----------------------------------------------------------

def test_invalid_tokens_are_rate_limited_per_source(ks, clock, w):
    svc = make(ks, clock, w, reject_rate=1.0)         # burst 4 per source
    good = ks.issue(w.alice, w.demo)
    auth(svc, good, source="10.0.0.1")
    for i in range(4):
        with pytest.raises(AuthenticationError, match="invalid"):
            auth(svc, f"garbage{i}", source="10.0.0.1")
    assert ks.count() == 5
    with pytest.raises(AuthenticationError) as e:
        auth(svc, "garbage-more", source="10.0.0.1")
    assert str(e.value) == MSG_SLOW_DOWN
    assert ks.count() == 5                            # Keystone not asked
    assert auth(svc, good, source="10.0.0.1").project_id == w.demo  # cached: unaffected
    with pytest.raises(AuthenticationError, match="invalid"):       # other sources: unaffected
        auth(svc, "garbage-elsewhere", source="10.0.0.2")
    assert ks.count() == 6
    clock.advance(1.0)                                # one look-up per second comes back
    with pytest.raises(AuthenticationError, match="invalid"):
        auth(svc, "garbage-later", source="10.0.0.1")
    with pytest.raises(AuthenticationError, match="slow down"):
        auth(svc, "garbage-later2", source="10.0.0.1")
    assert svc.stats()["rate_limited"] == 2


def test_invalid_tokens_are_rate_limited_globally(ks, clock, w):
    svc = make(ks, clock, w, reject_rate=1.0)         # global burst 40
    for source in range(10):
        for i in range(4):
            with pytest.raises(AuthenticationError, match="invalid"):
                auth(svc, f"garbage-{source}-{i}", source=f"10.0.0.{source}")
    with pytest.raises(AuthenticationError, match="slow down"):
        auth(svc, "garbage-new", source="10.0.1.1")   # a fresh source, but the pool is dry
    assert ks.count() == 40


def test_valid_tokens_and_outages_do_not_drain_the_limiter(ks, clock, w):
    svc = make(ks, clock, w, reject_rate=1.0)
    for _ in range(20):                                # 20 fresh valid tokens > burst 4
        assert auth(svc, ks.issue(w.alice, w.demo), source="s").project_id == w.demo
    ks.fail = 503
    for _ in range(20):
        with pytest.raises(IdentityUnavailable):
            auth(svc, ks.issue(w.alice, w.demo), source="s")
    ks.fail = None
    with pytest.raises(AuthenticationError, match="invalid"):  # the bucket is still full
        auth(svc, "garbage", source="s")


def test_a_small_reject_rate_still_allows_one_look_up(ks, clock, w):
    svc = make(ks, clock, w, reject_rate=0.1)         # burst would be 0.4 < 1
    with pytest.raises(AuthenticationError, match="invalid"):
        auth(svc, "garbage", source="s")
    with pytest.raises(AuthenticationError, match="slow down"):
        auth(svc, "garbage2", source="s")
    clock.advance(10)
    assert auth(svc, ks.issue(w.alice, w.demo), source="s").project_id == w.demo


# -- break-glass admin key ---------------------------------------------------------------------

ADMIN_KEY = "k3y-" + "0123456789abcdef" * 2
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the admin key file must be owned by root")


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "admin.key"
    path.write_text(ADMIN_KEY + "\n")
    path.chmod(0o600)
    return path


def admin_svc(ks, clock, w, key_file):
    return make(ks, clock, w, admin_key_file=str(key_file))


@needs_root
def test_admin_key_gives_an_admin_identity_without_keystone(ks, clock, w, key_file):
    svc = admin_svc(ks, clock, w, key_file)
    ks.fail = 503                                      # Keystone down: irrelevant
    ident = svc.authenticate({"x-fdcs-admin-key": ADMIN_KEY})
    assert ident.is_admin and ident.via == "admin-key"
    assert ident.user_name == "break-glass" and ident.project_id == ""
    assert ident.expires_at == math.inf and ident.may("DELETE")
    assert ks.count() == 0


@needs_root
def test_wrong_admin_key_is_refused(ks, clock, w, key_file):
    svc = admin_svc(ks, clock, w, key_file)
    for wrong in ["", ADMIN_KEY[:-1], ADMIN_KEY + "x", ADMIN_KEY.upper(), " " + ADMIN_KEY]:
        with pytest.raises(AuthenticationError, match="wrong X-FDCS-Admin-Key"):
            svc.authenticate({"X-FDCS-Admin-Key": wrong})
    # a token beside a wrong key does not rescue it: the key decides
    with pytest.raises(AuthenticationError):
        svc.authenticate({"X-FDCS-Admin-Key": "nope", "X-Auth-Token": ks.issue(w.alice, w.demo)})
    assert ks.count() == 0
    assert svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY}).is_admin


@needs_root
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_admin_key_file_readable_by_others_is_not_used(ks, clock, w, key_file, caplog, mode):
    key_file.chmod(mode)
    svc = admin_svc(ks, clock, w, key_file)
    with pytest.raises(AuthenticationError, match="not usable"):
        svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY})
    assert f"mode {mode:04o}" in caplog.text and str(key_file) in caplog.text
    key_file.chmod(0o600)                              # checked on every use
    assert svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY}).is_admin


@needs_root
def test_admin_key_file_not_owned_by_root_is_not_used(ks, clock, w, key_file, caplog):
    os.chown(key_file, 65534, 65534)
    svc = admin_svc(ks, clock, w, key_file)
    with pytest.raises(AuthenticationError, match="not usable"):
        svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY})
    assert "owned by uid 65534" in caplog.text
    os.chown(key_file, 0, 0)
    assert svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY}).is_admin


@needs_root
def test_admin_key_is_reread_when_the_file_changes(ks, clock, w, key_file):
    svc = admin_svc(ks, clock, w, key_file)
    assert svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY}).is_admin
    new = "rotated-" + "f" * 24
    key_file.write_text(new)
    st = key_file.stat()
    os.utime(key_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert svc.authenticate({"X-FDCS-Admin-Key": new}).is_admin
    with pytest.raises(AuthenticationError):
        svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY})


@needs_root
def test_short_or_missing_admin_key_file_is_not_used(ks, clock, w, key_file, caplog):
    key_file.write_text("short\n")
    svc = admin_svc(ks, clock, w, key_file)
    with pytest.raises(AuthenticationError, match="not usable"):
        svc.authenticate({"X-FDCS-Admin-Key": "short"})
    assert "shorter than 16" in caplog.text
    key_file.unlink()
    with pytest.raises(AuthenticationError, match="not usable"):
        svc.authenticate({"X-FDCS-Admin-Key": "short"})


def test_admin_key_header_is_refused_when_the_feature_is_off(ks, svc, w):
    with pytest.raises(AuthenticationError, match="not enabled"):
        svc.authenticate({"X-FDCS-Admin-Key": ADMIN_KEY})
    assert svc.authenticate({"X-Auth-Token": ks.issue(w.alice, w.demo)}).project_id == w.demo


# -- secrets never leak -------------------------------------------------------------------------

@needs_root
def test_no_token_or_admin_key_in_logs_or_messages(ks, clock, w, key_file, caplog):
    caplog.set_level(logging.DEBUG)                    # every logger, keystoneauth1 and urllib3 too
    svc = make(ks, clock, w, admin_key_file=str(key_file), reject_rate=0.25)
    scoped, unscoped = ks.issue(w.alice, w.demo), ks.issue(w.alice)
    expired = ks.issue(w.alice, w.demo, expires_in=1)
    secrets_seen = [scoped, unscoped, expired, ADMIN_KEY, "garbage-token-1"]
    messages = []

    def attempt(headers, source=""):
        try:
            svc.authenticate(headers, source)
        except FdcsError as e:
            messages.append(str(e))

    attempt({"X-Auth-Token": scoped})
    attempt({"X-Auth-Token": scoped, "X-Auth-TenantId": w.other})
    attempt({"X-Auth-Token": unscoped, "X-Auth-TenantId": w.demo})
    attempt({"X-Auth-Token": unscoped, "X-Auth-TenantId": w.admin_project})
    attempt({"X-Auth-Token": unscoped})
    clock.advance(2)
    attempt({"X-Auth-Token": expired})
    attempt({"X-Auth-Token": "garbage-token-1"})        # rejected, then rate limited
    attempt({"X-Auth-Token": "garbage-token-1x"})
    ks.fail = "close"
    attempt({"X-Auth-Token": ks.issue(w.alice, w.demo)}, source="other")
    ks.fail = None
    attempt({"X-FDCS-Admin-Key": ADMIN_KEY})
    attempt({"X-FDCS-Admin-Key": ADMIN_KEY[::-1]})
    key_file.chmod(0o644)
    attempt({"X-FDCS-Admin-Key": ADMIN_KEY})

    assert len(messages) >= 8 and caplog.records       # the flows did run and log
    assert any("slow down" in m for m in messages)
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for secret in secrets_seen:
        assert secret not in logged
        assert not any(secret in m for m in messages)
        assert secret[:20] not in logged


# -- misc ------------------------------------------------------------------------------------------

def test_stats_reports_counters(ks, svc, w):
    token = ks.issue(w.alice, w.demo)
    auth(svc, token)
    auth(svc, token)
    with pytest.raises(AuthenticationError):
        auth(svc, "bad-token")
    s = svc.stats()
    assert s["hits"] == 1 and s["misses"] == 2 and s["keystone_calls"] == 2
    assert s["rejected"] == 1 and s["cached"] == 1 and s["unavailable"] == 0


def test_keystone_url_is_required():
    cfg = config.load(path=None, env={}, overrides={"keystone.admin_key_file": ""}, require=())
    with pytest.raises(ConfigError, match="keystone.url"):
        IdentityService(cfg)


# -- security corpus (issue 7): what the scoper shows, and a GET that writes ---------------------

class _Pairs(dict):
    """A proxy's view of a request's headers: lookups join a repeated name,
    items() shows every value (name_scoper.proxy._AuthHeaders)."""

    def __init__(self, pairs):
        super().__init__()
        self._pairs = list(pairs)
        for k, v in self._pairs:
            self[k] = f"{self[k]}, {v}" if k in self else v

    def items(self):
        return list(self._pairs)


def test_a_header_repeated_under_one_name_is_refused_as_such(ks, svc, w):
    a, b = ks.issue(w.alice, w.demo), ks.issue(w.alice, w.other)
    with pytest.raises(AuthenticationError, match="more than one X-Auth-Token header"):
        svc.authenticate(_Pairs([("x-auth-token", a), ("x-auth-token", b)]))
    with pytest.raises(AuthenticationError, match="more than one X-Auth-TenantId header"):
        svc.authenticate(_Pairs([("x-auth-token", a), ("x-auth-tenantid", w.demo),
                                 ("x-auth-tenantid", w.other)]))
    # controls: one value, and the same value twice
    assert svc.authenticate(_Pairs([("x-auth-token", a)])).project_id == w.demo
    assert svc.authenticate(_Pairs([("x-auth-token", a), ("x-auth-token", a),
                                    ("x-auth-tenantid", w.demo)])).project_id == w.demo


@pytest.mark.parametrize("path, reader_may", [
    ("/containers/web/attach/ws", False),
    ("/containers/0123abcd/attach/ws", False),
    ("/containers/a/b/attach/ws", False),  # the engine routes /containers/{name:.*}/attach/ws
    ("/containers/web/json", True),
    ("/containers/web/logs", True),
    ("/containers/web/attach/wsx", True),
    ("", True),
])
def test_the_websocket_attach_is_a_write_although_a_get(path, reader_may):
    reader = Identity("u", "dave", "p", frozenset({"reader"}), 0.0, False, "token")
    member = Identity("u", "alice", "p", frozenset({"member"}), 0.0, False, "token")
    admin = Identity("u", "root", "", frozenset(), 0.0, True, "admin-key")
    assert reader.may("GET", path) is reader_may
    assert reader.may("HEAD", path) is reader_may
    assert member.may("GET", path) and admin.may("GET", path)
    assert reader.may("GET")  # the method alone: as before


def test_a_burst_of_one_new_token_asks_keystone_once(ks, clock, w):
    """Concurrent requests with the same new token wait for one validation:
    one Keystone call, and none of them spends the invalid-token budget
    (burst 2 here, far below the 30 requests)."""
    import threading
    svc = make(ks, clock, w, reject_rate=0.5)
    token = ks.issue(w.alice, w.demo)
    ks.delay = 0.3  # the requests overlap while the first one is being answered
    results, errors = [], []

    def one():
        try:
            results.append(auth(svc, token, w.demo))
        except Exception as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 30
    assert len({(r.user_id, r.project_id) for r in results}) == 1
    assert ks.count() == 1
    assert svc.stats()["coalesced"] >= 1


def test_waiters_share_the_leaders_refusal_and_outage(ks, clock, w):
    import threading
    from authz_plugin.errors import AuthenticationError, IdentityUnavailable
    svc = make(ks, clock, w)
    for token, expected in (("not-a-real-token", AuthenticationError), (None, IdentityUnavailable)):
        if token is None:
            token = ks.issue(w.alice, w.demo)
            ks.fail = 503  # every call fails: an outage
        ks.delay = 0.3
        errors = []

        def one():
            try:
                auth(svc, token, w.demo)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 5 and all(isinstance(e, expected) for e in errors), errors
