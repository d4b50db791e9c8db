"""Security corpus, part 2: identity (issue 7).

Who a request acts for, decided from ``X-Auth-Token`` and ``X-Auth-TenantId``
against the stack's real Keystone: header names in any case, the headers
repeated with two values, a tenant id with white space or in another case, an
unscoped token naming a project its user is not in, domain- and
system-scoped tokens, an expired token that had been cached, a revoked token,
and a reader-only user writing.

Every case runs on host 1's engine socket (plugin alone; the client writes
the tenant label filter itself) and through host 1's name scoper (TLS), each
with a positive control: the same request without the forbidden part is
served, as the identity it should be.

Two facts of the transports shape the expectations:

* the engine hands its plugin one value per header (Go's ``http.Header``
  canonicalises names, and moby's ``authorization.headers()`` keeps the
  *last* value of a repeated header), so on the engine socket a repeated
  header acts as its last value -- and as nothing else;
* the scoper sees every value and refuses two different ones.

Expiry uses Keystone itself: a token is capped at its application
credential's expiry, so one that lives ~30 s is made and served on both
paths when the module starts (an autouse fixture) and is refused by the
module's last test, its lifetime having run out while the others ran.

Revocation inside the cache TTL (300 s on the stack) is checked in-process:
``authz_plugin.identity.IdentityService`` with a 3 s TTL, talking to the
stack's real Keystone -- the same code the plugin and the scoper run.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from authz_plugin import config
from authz_plugin.errors import AuthenticationError
from authz_plugin.identity import IdentityService
from authz_plugin.identity._keystone import parse_time

from .conftest import wait_for
from .test_transport import A1, ADMIN, B1, MODES, READER, T, V, Reply, Wire, uniq, user_headers

TA, TB = "FDCS_TENANT_A", "FDCS_TENANT_B"


# -- Keystone, by hand ---------------------------------------------------------------------


class Keystone:
    """The stack's Keystone v3, as a user or an administrator would call it."""

    def __init__(self, stack):
        self.url = stack.env["FDCS_KEYSTONE_URL"]
        self.password = stack.env["FDCS_PASSWORD"]
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy for 127.0.0.1
        self._admin: str | None = None

    def token(self, user: str, scope=None, password: str | None = None) -> tuple[str, dict]:
        """(token, token body) of a password login; ``scope`` as Keystone
        takes it (``"unscoped"``, ``{"project": ...}``, ``{"domain": ...}``,
        ``{"system": {"all": True}}``), None for the user's default."""
        auth = {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": password or self.password}}}}
        if scope is not None:
            auth["scope"] = scope
        r = self.http.post(self.url + "/auth/tokens", json={"auth": auth}, timeout=10)
        assert r.status_code == 201, (user, scope, r.status_code, r.text)
        return r.headers["X-Subject-Token"], r.json()["token"]

    def admin(self, method: str, path: str, **kw) -> requests.Response:
        if self._admin is None:
            self._admin = self.token("admin", {"project": {"name": "admin", "domain": {"id": "default"}}})[0]
        return self.http.request(method, self.url + path, headers={"X-Auth-Token": self._admin},
                                 timeout=10, **kw)

    def revoke(self, token: str) -> None:
        r = self.http.delete(self.url + "/auth/tokens", timeout=10,
                             headers={"X-Auth-Token": token, "X-Subject-Token": token})
        assert r.status_code == 204, r.text


@pytest.fixture(scope="module")
def ks(stack) -> Keystone:
    return Keystone(stack)


@pytest.fixture(scope="module")
def multi_scope_user(stack, ks):
    """A user of its own (deleted afterwards) with the member role on
    tenant-a, the member role on the default domain and the reader role on
    the system: one user, three kinds of scoped token."""
    name = uniq("sec-")
    r = ks.admin("POST", "/users", json={"user": {"name": name, "domain_id": "default",
                                                  "password": ks.password}})
    assert r.status_code == 201, r.text
    uid = r.json()["user"]["id"]
    try:
        roles = {x["name"]: x["id"] for x in ks.admin("GET", "/roles").json()["roles"]}
        for path in (f"/projects/{stack.env[TA]}/users/{uid}/roles/{roles['member']}",
                     f"/domains/default/users/{uid}/roles/{roles['member']}",
                     f"/system/users/{uid}/roles/{roles['reader']}"):
            assert ks.admin("PUT", path).status_code == 204, path
        yield name
    finally:
        ks.admin("DELETE", f"/users/{uid}")


# -- one request as someone ------------------------------------------------------------------


def as_tenant(stack, mode: str, headers, tenant: str = TA) -> Reply:
    """List containers acting for ``tenant`` (a FDCS_TENANT_* key): through
    the scoper a plain list (it adds the tenant filter); on the engine the
    list filtered by that tenant's label, which the plugin allows only to
    someone acting for that tenant -- so a 200 says who the request was."""
    target = f"{V}/containers/json?all=1"
    if mode == "plugin":
        flt = json.dumps({"label": [f"{T}={stack.env[tenant]}"]})
        target += "&filters=" + urllib.parse.quote(flt)
    with Wire.to(stack, mode) as w:
        return w.request("GET", target, headers)


def refused(reply: Reply, *says: str) -> str:
    """A refusal of the identity (401 from the scoper, 403 from the engine's
    plugin) whose message holds every one of ``says``."""
    assert reply.status in (401, 403), (reply.status, reply.body)
    for s in says:
        assert s in reply.message, (s, reply.message)
    return reply.message


def ok(reply: Reply) -> Reply:
    assert reply.status == 200, (reply.status, reply.body)
    return reply


# -- header names and repeated headers ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_header_names_match_in_any_case_and_the_admin_key_only_on_the_engine(stack, scoper, mode):
    h = dict(user_headers(stack, A1))
    token, tenant = h["X-Auth-Token"], h["X-Auth-TenantId"]
    for tname, nname in (("x-auth-token", "x-auth-tenantid"), ("X-AUTH-TOKEN", "X-AUTH-TENANTID"),
                         ("X-Auth-Token", "X-Auth-Tenantid")):
        ok(as_tenant(stack, mode, [(tname, token), (nname, tenant)]))
    # The break-glass key, in any case of its header name: honoured by the
    # plugin on the engine's own socket (root's way in), stripped by the
    # scoper from every tenant request.
    key = Path(stack.env["FDCS_ADMIN_KEY_FILE"]).read_text().strip()
    for kname in ("X-FDCS-Admin-Key", "x-fdcs-admin-key", "X-FDCS-ADMIN-KEY"):
        r = as_tenant(stack, mode, [(kname, key)], TB)
        if mode == "plugin":
            ok(r)
        else:
            refused(r, "X-Auth-Token is missing")
    refused(as_tenant(stack, mode, [("X-FDCS-Admin-Key", key[:-1] + "x")], TB))


@pytest.mark.parametrize("mode", MODES)
def test_a_repeated_token_header_is_refused_or_acts_as_its_last_value_only(stack, scoper, mode):
    a = dict(user_headers(stack, A1))["X-Auth-Token"]
    b = dict(user_headers(stack, B1))["X-Auth-Token"]
    tenant = stack.env[TA]
    for first, second in ((b, a), (a, b)):
        for n1, n2 in (("X-Auth-Token", "X-Auth-Token"), ("x-auth-token", "X-AUTH-TOKEN")):
            r = as_tenant(stack, mode, [(n1, first), (n2, second), ("X-Auth-TenantId", tenant)])
            if mode == "scoper":
                refused(r, "more than one X-Auth-Token header")
            elif second == a:
                ok(r)  # alice's token, acting for her tenant
            else:
                # bob's token was the one judged: alice's, before it, counts for nothing
                refused(r, "is not a project this token may act for", "tenant-b")
    # positive controls: each token alone, and the same token twice
    ok(as_tenant(stack, mode, [("X-Auth-Token", a), ("X-Auth-TenantId", tenant)]))
    ok(as_tenant(stack, mode, [("X-Auth-Token", b)], TB))
    ok(as_tenant(stack, mode, [("X-Auth-Token", a), ("x-auth-token", a)]))


@pytest.mark.parametrize("mode", MODES)
def test_a_repeated_tenant_header_is_refused_or_acts_as_its_last_value_only(stack, scoper, mode):
    a = dict(user_headers(stack, A1))["X-Auth-Token"]
    ta, tb = stack.env[TA], stack.env[TB]
    for first, second in ((tb, ta), (ta, tb), ("", ta)):
        r = as_tenant(stack, mode, [("X-Auth-Token", a), ("X-Auth-TenantId", first),
                                    ("x-auth-tenantid", second)])
        if mode == "scoper":
            refused(r, "more than one X-Auth-TenantId header")
        elif second == ta:
            ok(r)
        else:
            refused(r, f"X-Auth-TenantId {tb!r} is not a project this token may act for")
    ok(as_tenant(stack, mode, [("X-Auth-Token", a), ("X-Auth-TenantId", ta)]))  # control


@pytest.mark.parametrize("mode", MODES)
def test_the_tenant_id_is_compared_exactly(stack, scoper, mode):
    """Surrounding white space is not part of a header value (both HTTP
    parsers drop it); anything else that is not the project's id -- its
    id in capitals, its name, its id with a space inside or a character
    short -- is refused, naming the projects the token may act for."""
    a = dict(user_headers(stack, A1))["X-Auth-Token"]
    ta = stack.env[TA]
    for spaced in (f"  {ta}", f"{ta} \t", f"\t{ta}  "):
        ok(as_tenant(stack, mode, [("X-Auth-Token", a), ("X-Auth-TenantId", spaced)]))
    for wrong in (ta.upper(), "tenant-a", f"{ta[:16]} {ta[16:]}", ta[:-1]):
        refused(as_tenant(stack, mode, [("X-Auth-Token", a), ("X-Auth-TenantId", wrong)]),
                "is not a project this token may act for", f"{ta} (tenant-a)", "fdcs-login")
    ok(as_tenant(stack, mode, [("X-Auth-Token", a), ("X-Auth-TenantId", ta)]))  # control


# -- token scopes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_an_unscoped_token_acts_only_for_a_project_of_its_user(stack, scoper, ks, mode):
    token, body = ks.token("bob", "unscoped")
    assert not (body.get("project") or body.get("domain") or body.get("system")), body
    ta, tb = stack.env[TA], stack.env[TB]
    refused(as_tenant(stack, mode, [("X-Auth-Token", token), ("X-Auth-TenantId", ta)]),
            f"X-Auth-TenantId {ta!r} is not a project this token may act for", f"{tb} (tenant-b)")
    refused(as_tenant(stack, mode, [("X-Auth-Token", token)], TB), "X-Auth-TenantId must name one")
    # control: the same token naming bob's own project acts for it
    ok(as_tenant(stack, mode, [("X-Auth-Token", token), ("X-Auth-TenantId", tb)], TB))
    if mode == "plugin":  # ...and for it only (the scoper filters by the caller's tenant itself)
        assert as_tenant(stack, mode, [("X-Auth-Token", token), ("X-Auth-TenantId", tb)], TA).status == 403


@pytest.fixture(scope="module")
def scoped_tokens(stack, ks, multi_scope_user) -> dict[str, tuple[str, dict]]:
    """kind -> (token, body), issued once for both modes."""
    return {
        "domain": ks.token(multi_scope_user, {"domain": {"id": "default"}}),
        "system": ks.token(multi_scope_user, {"system": {"all": True}}),
        # the site administrator's system token is no way round the admin project either
        "admin system": ks.token("admin", {"system": {"all": True}}),
        # the controls
        "project": ks.token(multi_scope_user, {"project": {"id": stack.env[TA]}}),
        "admin project": ks.token("admin", {"project": {"name": "admin", "domain": {"id": "default"}}}),
    }


@pytest.mark.parametrize("mode", MODES)
def test_domain_and_system_scoped_tokens_are_refused(stack, scoper, scoped_tokens, mode):
    ta = stack.env[TA]
    for kind, extra in (("domain", []), ("domain", [("X-Auth-TenantId", ta)]), ("system", []),
                        ("admin system", [("X-Auth-TenantId", ta)])):
        token, body = scoped_tokens[kind]
        scope = kind.split()[-1]
        assert body.get(scope), body  # Keystone did scope it so
        refused(as_tenant(stack, mode, [("X-Auth-Token", token), *extra]),
                f"{scope}-scoped tokens are not accepted", "fdcs-login")
    # controls: the same users' project-scoped tokens
    ok(as_tenant(stack, mode, [("X-Auth-Token", scoped_tokens["project"][0])]))
    ok(as_tenant(stack, mode, [("X-Auth-Token", scoped_tokens["admin project"][0])], TB))


# -- expiry and revocation --------------------------------------------------------------------------


#: the short-lived token's lifetime: long enough to be used on both paths on
#: a loaded machine, short enough to run out while the module's other tests run
SHORT_LIFETIME = 30


@pytest.fixture(scope="module", autouse=True)
def short_lived(stack, scoper, ks):
    """A token of alice's that lives ~30 s (Keystone caps a token at its
    application credential's expiry), made and served on both paths -- so
    cached there, for up to the 300 s cache TTL -- when the module starts,
    so that its expiry passes while the other tests run; the module's last
    test sees it refused.  Yields (headers, expiry and time of the first
    use, in epoch seconds)."""
    ta = stack.env[TA]
    token, body = ks.token("alice", {"project": {"id": ta}})
    until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=SHORT_LIFETIME)
    r = ks.http.post(f"{ks.url}/users/{body['user']['id']}/application_credentials", timeout=10,
                     headers={"X-Auth-Token": token},
                     json={"application_credential": {"name": uniq("short-"),
                                                      "expires_at": until.strftime("%Y-%m-%dT%H:%M:%S")}})
    assert r.status_code == 201, r.text
    cred = r.json()["application_credential"]
    try:
        r = ks.http.post(f"{ks.url}/auth/tokens", timeout=10, json={"auth": {"identity": {
            "methods": ["application_credential"],
            "application_credential": {"id": cred["id"], "secret": cred["secret"]}}}})
        assert r.status_code == 201, r.text
        expires = parse_time(r.json()["token"]["expires_at"])
        assert expires - time.time() <= SHORT_LIFETIME + 1  # Keystone did cap it
        short = [("X-Auth-Token", r.headers["X-Subject-Token"]), ("X-Auth-TenantId", ta)]
        used = time.time()
        for mode in MODES:
            ok(as_tenant(stack, mode, short))  # valid now, and cached
        yield short, expires, used
    finally:
        ks.http.delete(f"{ks.url}/users/{body['user']['id']}/application_credentials/{cred['id']}",
                       headers={"X-Auth-Token": token}, timeout=10)


@pytest.mark.parametrize("mode", MODES)
def test_a_revoked_token_not_yet_cached_is_refused_at_once(stack, scoper, ks, mode):
    ta = stack.env[TA]
    revoked, _ = ks.token("alice", {"project": {"id": ta}})
    ks.revoke(revoked)
    refused(as_tenant(stack, mode, [("X-Auth-Token", revoked)]), "invalid or expired", "fdcs-login")
    fresh, _ = ks.token("alice", {"project": {"id": ta}})
    ok(as_tenant(stack, mode, [("X-Auth-Token", fresh)]))  # control


def test_a_revoked_token_in_the_cache_is_refused_once_the_cache_ttl_has_passed(stack, ks):
    """In-process: the plugin's and the scoper's IdentityService with a 3 s
    cache TTL, against the stack's real Keystone.  A cached token keeps
    working after its revocation without asking Keystone (the documented
    delay), and is refused once the TTL has passed."""
    ttl = 3
    cfg = config.load(path=None, env={}, require=("keystone",), overrides={
        "keystone.url": ks.url, "keystone.admin_project_id": "none",
        "keystone.admin_key_file": "", "keystone.cache_ttl": ttl})
    svc = IdentityService(cfg)
    ta = stack.env[TA]
    token, _ = ks.token("alice", {"project": {"id": ta}})
    headers = {"X-Auth-Token": token, "X-Auth-TenantId": ta}
    assert svc.authenticate(headers).project_id == ta
    t_cached = time.monotonic()
    ks.revoke(token)
    calls = svc.stats()["keystone_calls"]
    assert svc.authenticate(headers).project_id == ta  # still cached...
    assert svc.stats()["keystone_calls"] == calls  # ...and Keystone was not asked

    def refused_now():
        try:
            svc.authenticate(headers)
            return False
        except AuthenticationError as e:
            return str(e)
    message = wait_for(refused_now, timeout=ttl + 15, interval=0.2, what="the revoked token to be refused")
    assert time.monotonic() - t_cached >= ttl * 0.9  # not before the TTL...
    assert "invalid or expired" in message and "fdcs-login" in message
    fresh, _ = ks.token("alice", {"project": {"id": ta}})
    assert svc.authenticate({"X-Auth-Token": fresh}).project_id == ta  # control


# -- a reader writing --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alices_cat(stack, scoper):
    """alice's ``cat`` with stdin open (made through the scoper): its name
    and full id."""
    name = uniq("rd-")
    alice = stack.scoper_cli(A1)
    try:
        cid = alice("run", "-d", "-i", "--name", name, "busybox", "cat").stdout.strip()
        yield name, cid
    finally:
        alice("rm", "-f", name, check=False)
        stack.cli(ADMIN)("rm", "-f", f"{stack.env[TA]}_{name}", check=False)


def _ws_attach(stack, mode: str, user: str, ref: str, text: bytes, arrived=None) -> Reply:
    """Open the engine's websocket attach (a GET) as ``user`` and, if it is
    upgraded, send ``text`` as one binary frame (masked, as from a client),
    keeping the stream open until ``arrived()`` says it got through."""
    headers = [*user_headers(stack, user), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
               ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
               ("Origin", "http://localhost")]
    with Wire.to(stack, mode) as w:
        r = w.request("GET", f"{V}/containers/{ref}/attach/ws?stream=1&stdin=1&stdout=1", headers)
        if r.status == 101:
            assert len(text) < 126
            mask = os.urandom(4)
            w.send(bytes([0x82, 0x80 | len(text)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(text)))
            if arrived is not None:
                wait_for(arrived, timeout=20, what=f"{text!r} to reach the container")
        return r


def _logs(stack, cid: str) -> str:
    return stack.cli(ADMIN)("logs", cid).stdout


@pytest.mark.parametrize("mode", MODES)
def test_a_reader_reads_but_never_writes(stack, scoper, alices_cat, mode):
    name, cid = alices_cat
    ref = cid if mode == "plugin" else name
    ta = stack.env[TA]
    new = uniq("rdnew-")
    # plugin-only clients write what the scoper would add (scoped names, label, network, pids limit)
    create = {"Image": "busybox", "Cmd": ["true"]}
    volume = {"Name": new}
    if mode == "plugin":
        create.update(Labels={T: ta}, HostConfig={"NetworkMode": "none", "PidsLimit": 100, "CgroupnsMode": "private"})
        volume = {"Name": f"{ta}_{new}", "Labels": {T: ta}}
    writes = [
        ("POST", f"{V}/containers/create?name={ta + '_' + new if mode == 'plugin' else new}", create),
        ("POST", f"{V}/volumes/create", volume),
        ("POST", f"{V}/containers/{ref}/exec", {"Cmd": ["true"]}),
        ("POST", f"{V}/containers/{ref}/kill", b""),
        ("DELETE", f"{V}/containers/{ref}?force=1", b""),
    ]
    try:
        for method, target, body in writes:
            with Wire.to(stack, mode) as w:
                r = w.request(method, target, user_headers(stack, READER), body)
            assert r.status in (400, 403) and "reading only" in r.message, (method, target, r.status, r.body)
        # the websocket attach is a GET that writes to the container's stdin
        mark = uniq("dave-typed-").encode()
        r = _ws_attach(stack, mode, READER, ref, mark + b"\n")
        assert r.status == 403 and "reading only" in r.message, (r.status, r.body)
        # reads are served
        with Wire.to(stack, mode) as w:
            assert w.request("GET", f"{V}/containers/{ref}/json", user_headers(stack, READER)).json()["Id"] == cid
            assert w.request("GET", f"{V}/containers/{ref}/logs?stdout=1", user_headers(stack, READER)).status == 200
        assert ok(as_tenant(stack, mode, user_headers(stack, READER))).json()
        # controls: the member's attach is served and what she types arrives;
        # nothing of the reader's did, and the container still runs
        typed = uniq("alice-typed-").encode()
        assert _ws_attach(stack, mode, A1, ref, typed + b"\n",
                          arrived=lambda: typed.decode() in _logs(stack, cid)).status == 101
        assert mark.decode() not in _logs(stack, cid)
        assert stack.cli(ADMIN)("inspect", "-f", "{{.State.Running}}", cid).stdout.strip() == "true"
        with Wire.to(stack, mode) as w:
            r = w.request("POST", f"{V}/containers/{ref}/exec", user_headers(stack, A1), {"Cmd": ["true"]})
            assert r.status == 201, r.body
    finally:
        stack.cli(ADMIN)("rm", "-f", f"{ta}_{new}", check=False)
        stack.cli(ADMIN)("volume", "rm", f"{ta}_{new}", check=False)


# -- last: the short-lived token of the module's start has expired by now ---------------------------


def test_an_expired_token_is_refused_although_it_was_cached(stack, scoper, short_lived):
    """The token ``short_lived`` served (and cached) on both paths at the
    module's start is refused on both once it has expired -- its expiry, not
    the 300 s cache TTL, ends it."""
    short, expires, used = short_lived
    for mode in MODES:
        wait_for(lambda: as_tenant(stack, mode, short).status in (401, 403), timeout=SHORT_LIFETIME + 30,
                 interval=0.5, what=f"the expired token to be refused ({mode})")
        assert time.time() >= expires - 2, "refused before its expiry"
        refused(as_tenant(stack, mode, short), "expired", "fdcs-login")
        ok(as_tenant(stack, mode, user_headers(stack, A1)))  # control: alice's own token still works
    # were it not for the expiry, the cache would still hold the token
    assert time.time() < used + 300, "the module ran past the 300 s cache TTL: this proves nothing"
