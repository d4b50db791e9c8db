"""Security corpus, part 1 (issue 7): paths, queries, bodies, host escapes
and endpoints, on the real stack.

Every case is one bypass attempt, run twice:

``test_<case>[plugin]``
    straight on host 1's engine socket (plugin-only mode): the tenant's
    headers from its client config dir, scoped names (``<tenant>_<name>``),
    the tenant label, a pids limit and a cgroup namespace written by hand;
``test_<case>[scoper]``
    through host 1's name scoper over TLS (a raw HTTPS client with the same
    headers and the stack's CA and client certificate): plain names, no
    labels.

Each run:

1. ``prep``: fresh resources the case needs (a stopped container to start,
   an exec to start...), made as the tenant;
2. a snapshot of the engine as the administrator sees it;
3. the attack, which must be refused -- status and a message naming the
   problem (``Refused``) -- or, where the engine itself redirects an unclean
   path before any plugin call, answered with that redirect whose target is
   refused in turn (``Redirected``);
4. the snapshot again: nothing changed (no container, exec, network, volume
   or image made or altered; the canary file in tenant-b's container absent);
5. the positive control: the same request without the forbidden part
   succeeds.

Everything a run made is removed afterwards, even when it fails (the
module's ``world`` fixture remembers what existed before).

A few attacks cannot be written through the scoper: it scopes every name a
tenant writes, so "rename to tenant-b's scoped name" becomes a name in the
caller's own scope.  Those runs assert exactly that (``Contained``): the
request did nothing outside the caller's scope.

Holes known to be open whose fix lies outside this module's files are
marked per mode (``open_in``) as strict expected failures that name the
fix: the day the fix lands, the run passes and the mark must go.

The cast: tenant-a is alice (the attacker unless a case says otherwise),
tenant-b is bob (the victim), plus the site administrator.  Bob owns a
running container (with an anonymous volume, on his own network), a stopped
one, an unstarted exec and the network; the administrator owns an image that
carries bob's tenant label and a container started from it.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import http.client
import io
import json
import re
import ssl
import tarfile
import time
import urllib.parse
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import redis

from authz_plugin.scoping import TENANT_LABEL as T
from tests.e2e.conftest import _UnixConnection

V = "/v1.41"
A1, B1, ADMIN = "FDCS_CONFIG_A1", "FDCS_CONFIG_B1", "FDCS_CONFIG_ADMIN"
MODES = ("plugin", "scoper")
CANARY = "/tmp/corpus-pwned"  # no refused request may make this file in bob's container
NO_SUCH = "No such container"


def uniq(prefix: str = "c") -> str:
    return f"corpus-{prefix}{uuid.uuid4().hex[:8]}"


def q(value: str | dict | list) -> str:
    return urllib.parse.quote(value if isinstance(value, str) else json.dumps(value), safe="")


_POOL = ThreadPoolExecutor(8)  # the administrator's inspections run side by side


# -- HTTP, exactly as written ----------------------------------------------------------


@dataclasses.dataclass
class Req:
    method: str
    target: str
    body: bytes | str | dict | list | None = None
    #: sent in this order; a name may repeat
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    chunked: bool = False


@dataclasses.dataclass
class Resp:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def message(self) -> str:
        try:
            doc = json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")
        return doc.get("message", "") if isinstance(doc, dict) else ""

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


class Http:
    """One user's raw HTTP client: the engine's unix socket or a scoper's
    TLS port, with the user's ``HttpHeaders``."""

    def __init__(self, user_headers: dict[str, str], unix: str | None = None,
                 tls: tuple[str, int, ssl.SSLContext] | None = None):
        self.user_headers = user_headers
        self.unix = unix
        self.tls = tls

    def _connect(self) -> http.client.HTTPConnection:
        if self.unix:
            return _UnixConnection(self.unix, timeout=120)
        host, port, ctx = self.tls
        return http.client.HTTPSConnection(host, port, context=ctx, timeout=120)

    def send(self, req: Req) -> Resp:
        headers = list(self.user_headers.items())
        body = req.body
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.append(("Content-Type", "application/json"))
        if isinstance(body, str):
            body = body.encode()
        headers += req.headers
        conn = self._connect()
        try:
            conn.putrequest(req.method, req.target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", "docker")
            for k, v in headers:
                conn.putheader(k, v)
            data = body or b""
            try:
                if req.chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                    conn.endheaders()
                    for i in range(0, len(data), 4096):
                        piece = data[i:i + 4096]
                        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                    conn.send(b"0\r\n\r\n")
                else:
                    if body is not None or req.method in ("POST", "PUT"):
                        if not any(k.lower() == "content-length" for k, _ in headers):
                            conn.putheader("Content-Length", str(len(data)))
                    conn.endheaders(data or None)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                pass  # answered (and closed) before the whole body was read
            r = conn.getresponse()
            return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def __call__(self, method: str, target: str, body=None, headers=None, chunked=False) -> Resp:
        return self.send(Req(method, target, body, list((headers or {}).items()), chunked))


def _user_headers(stack, user: str) -> dict[str, str]:
    return dict(json.loads((Path(stack.env[user]) / "config.json").read_text()).get("HttpHeaders", {}))


def _tls(stack) -> tuple[str, int, ssl.SSLContext]:
    host, _, port = stack.env["FDCS_DOCKER_HOST"].removeprefix("tcp://").rpartition(":")
    ctx = ssl.create_default_context(cafile=str(stack.certs / "ca.pem"))
    ctx.load_cert_chain(str(stack.certs / "cert.pem"), str(stack.certs / "key.pem"))
    return host, int(port), ctx


def _ok(resp: Resp, *status: int) -> Resp:
    assert resp.status in status, resp
    return resp


def tar_of(name: str, data: bytes = b"pwned\n") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


WS_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
              ("Sec-WebSocket-Key", base64.b64encode(b"corpus-corpus-16").decode()),
              ("Origin", "http://localhost")]
HIJACK_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "tcp")]


# -- the world: what the attacks aim at --------------------------------------------------------


@dataclasses.dataclass
class World:
    stack: Any
    ta: str
    tb: str
    admin: Http  # on host 1's engine
    clients: dict[tuple[str, str], Http]  # (user, mode) -> client
    # bob's
    fid: str = ""  # running container (anonymous volume, on bob's network)
    fstopped: str = ""
    fexec: str = ""  # created, never started: it would make CANARY
    fnet: str = ""
    fvol: str = ""  # the anonymous volume's 64-hex name
    # alice's (engine names)
    own: str = ""
    own_id: str = ""
    net: str = ""
    net2: str = ""
    vol: str = ""
    # the administrator's
    image: str = ""  # carries bob's tenant label
    admin_cid: str = ""  # started from that image, without labels of its own
    #: what existed before the module (removed again at its end: everything else)
    start: dict = dataclasses.field(default_factory=dict)
    #: what existed once the world was made (each run removes everything else)
    baseline: dict = dataclasses.field(default_factory=dict)


def _create(client: Http, tenant: str, name: str, body_extra: dict | None = None, start: bool = False,
            network: str = "none") -> str:
    """A container made plugin-style (scoped name, label, limits by hand)."""
    body = {"Image": "busybox", "Cmd": ["sleep", "3600"], "Labels": {T: tenant},
            "HostConfig": {"NetworkMode": network, "PidsLimit": 20, "CgroupnsMode": "private"}}
    for k, v in (body_extra or {}).items():
        if k == "HostConfig":
            body["HostConfig"].update(v)
        else:
            body[k] = v
    cid = _ok(client("POST", f"{V}/containers/create?name={name}", body), 201).json()["Id"]
    if start:
        _ok(client("POST", f"{V}/containers/{cid}/start"), 204)
    return cid


def _network(client: Http, tenant: str, name: str) -> str:
    return _ok(client("POST", f"{V}/networks/create", {"Name": name, "Labels": {T: tenant}}), 201).json()["Id"]


def _inventory(admin: Http) -> dict[str, set[str]]:
    containers, networks, volumes, images = _POOL.map(
        lambda path: _ok(admin("GET", f"{V}/{path}"), 200).json(),
        ["containers/json?all=1", "networks", "volumes", "images/json?all=1"])
    return {"containers": {c["Id"] for c in containers}, "networks": {n["Id"] for n in networks},
            "volumes": {v["Name"] for v in volumes["Volumes"] or []}, "images": {i["Id"] for i in images}}


def _restore(admin: Http, keep: dict[str, set[str]]) -> None:
    """Remove, as the administrator, whatever is not in ``keep`` (tenants'
    default networks, made by the scoper on a tenant's first create and
    remembered by it, are kept)."""
    now = _inventory(admin)
    for cid in now["containers"] - keep["containers"]:
        admin("DELETE", f"{V}/containers/{cid}?force=1&v=1")
    if now["containers"] - keep["containers"]:
        now = _inventory(admin)  # anonymous volumes went with their containers
    for name in now["volumes"] - keep["volumes"]:
        admin("DELETE", f"{V}/volumes/{name}?force=1")
    for nid in now["networks"] - keep["networks"]:
        info = admin("GET", f"{V}/networks/{nid}")
        if info.status == 200 and not info.json()["Name"].endswith("_bridge"):
            admin("DELETE", f"{V}/networks/{nid}")
    for iid in now["images"] - keep["images"]:
        admin("DELETE", f"{V}/images/{iid}?force=1")


@pytest.fixture(scope="module")
def world(stack, scoper):
    ta, tb = stack.env["FDCS_TENANT_A"], stack.env["FDCS_TENANT_B"]
    engine = stack.env["FDCS_ENGINE_HOSTS"].split()[0].removeprefix("unix://")
    tls = _tls(stack)
    clients = {}
    for user in (A1, B1, ADMIN):
        h = _user_headers(stack, user)
        clients[(user, "plugin")] = Http(h, unix=engine)
        clients[(user, "scoper")] = Http(h, tls=tls)
    admin = clients[(ADMIN, "plugin")]
    alice, bob = clients[(A1, "plugin")], clients[(B1, "plugin")]
    w = World(stack, ta, tb, admin, clients)
    w.start = _inventory(admin)
    try:
        # bob's
        w.fnet = _network(bob, tb, f"{tb}_corpus-net")
        w.fid = _create(bob, tb, f"{tb}_corpus-web", {"Volumes": {"/data": {}}}, start=True, network=w.fnet)
        w.fvol = next(m["Name"] for m in admin("GET", f"{V}/containers/{w.fid}/json").json()["Mounts"]
                      if m["Destination"] == "/data")
        w.fstopped = _create(bob, tb, f"{tb}_corpus-stopped")
        w.fexec = _ok(bob("POST", f"{V}/containers/{w.fid}/exec", {"Cmd": ["touch", CANARY]}), 201).json()["Id"]
        # alice's
        w.net, w.net2, w.vol = f"{ta}_corpus-net", f"{ta}_corpus-net2", f"{ta}_corpus-vol"
        _network(alice, ta, w.net)
        _network(alice, ta, w.net2)
        _ok(alice("POST", f"{V}/volumes/create", {"Name": w.vol, "Labels": {T: ta}}), 201)
        w.own = f"{ta}_corpus-own"
        w.own_id = _create(alice, ta, w.own, start=True, network=w.net)
        # alice's default network through the scoper, made now rather than by an attack
        sa = clients[(A1, "scoper")]
        cid = _ok(sa("POST", f"{V}/containers/create", {"Image": "busybox", "Cmd": ["true"]}), 201).json()["Id"]
        _ok(sa("DELETE", f"{V}/containers/{cid}"), 204)
        # the administrator's image labelled for bob, and a container from it
        tmp = _ok(admin("POST", f"{V}/containers/create",
                        {"Image": "busybox", "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}), 201).json()["Id"]
        rootfs = _ok(admin("GET", f"{V}/containers/{tmp}/export"), 200).body
        admin("DELETE", f"{V}/containers/{tmp}")
        w.image = f"corpus-labelled:{uuid.uuid4().hex[:8]}"
        change = q(f"LABEL {T}={tb}")
        _ok(admin("POST", f"{V}/images/create?fromSrc=-&repo={w.image.split(':')[0]}&tag={w.image.split(':')[1]}"
                  f"&changes={change}", rootfs, {"Content-Type": "application/x-tar"}), 200)
        w.admin_cid = _ok(admin("POST", f"{V}/containers/create?name={uniq('admin')}",
                                {"Image": w.image, "Cmd": ["sleep", "3600"], "HostConfig": {"NetworkMode": "none"}}),
                          201).json()["Id"]
        _ok(admin("POST", f"{V}/containers/{w.admin_cid}/start"), 204)
        labels = admin("GET", f"{V}/containers/{w.admin_cid}/json").json()["Config"]["Labels"]
        assert labels.get(T) == tb, labels  # the container did inherit bob's label from its image
        w.baseline = _inventory(admin)
        yield w
    finally:
        _restore(admin, w.start)


# -- one run -------------------------------------------------------------------------


class Ctx:
    """One case in one mode: names as the attacker writes them there."""

    def __init__(self, w: World, mode: str):
        self.w = w
        self.mode = mode
        self.plugin = mode == "plugin"
        self.ta, self.tb = w.ta, w.tb
        self.me = w.clients[(A1, mode)]
        self.bob = w.clients[(B1, mode)]
        self.admin_here = w.clients[(ADMIN, mode)]
        self.alice_engine = w.clients[(A1, "plugin")]
        self.x: dict[str, Any] = {}  # what prep made
        #: a name in bob's scoped form, fresh for each run
        self.stolen = f"{w.tb}_{uniq('stolen')}"
        # bob's and the administrator's, by id (the scoper passes ids it cannot resolve as written)
        self.fid, self.fstopped, self.fexec, self.fnet, self.fvol = w.fid, w.fstopped, w.fexec, w.fnet, w.fvol
        self.own = self.n_of(w.own)
        self.net, self.net2, self.vol = self.n_of(w.net), self.n_of(w.net2), self.n_of(w.vol)

    # names --------------------------------------------------------------------------------
    def n(self, name: str) -> str:
        """``name`` as alice writes it in this mode."""
        return f"{self.ta}_{name}" if self.plugin else name

    def n_of(self, engine_name: str) -> str:
        return engine_name if self.plugin else engine_name.split("_", 1)[1]

    # bodies -------------------------------------------------------------------------------
    def body(self, **hc) -> dict:
        """A container-create body that is allowed as it stands."""
        base_hc = {"NetworkMode": "none", "PidsLimit": 20}
        if self.plugin:
            base_hc["CgroupnsMode"] = "private"
        body = {"Image": "busybox", "Cmd": ["true"], "HostConfig": {**base_hc, **hc}}
        if self.plugin:
            body["Labels"] = {T: self.ta}
        return body

    def raw_body(self, fragment: str, top: bool = False, **hc) -> str:
        """``body(**hc)`` as JSON text with ``fragment`` (raw JSON members)
        spliced into HostConfig (or the top-level object)."""
        doc = self.body(**hc)
        (doc if top else doc["HostConfig"])["__corpus__"] = 0
        return json.dumps(doc).replace('"__corpus__": 0', fragment)

    def labels(self, **extra: str) -> dict:
        return ({T: self.ta} if self.plugin else {}) | extra

    def create(self, name: str | None = None) -> str:
        return f"{V}/containers/create" + (f"?name={self.n(name)}" if name else "")

    def flt(self, shape: str = "list", *labels: str, **more) -> str:
        """A ``filters`` value the caller may send: its own tenant label in
        plugin mode (the scoper adds it), ``labels``, ``more`` filters."""
        values = ([f"{T}={self.ta}"] if self.plugin else []) + list(labels)
        doc: dict = dict(more)
        if values:
            doc["label"] = {v: True for v in values} if shape == "map" else values
        return q(doc)

    def volume_body(self, name: str, **extra) -> dict:
        return {"Name": self.n(name), "Labels": self.labels(), **extra}

    def network_body(self, name: str, **extra) -> dict:
        return {"Name": self.n(name), "Labels": self.labels(), **extra}

    # made fresh for a case -----------------------------------------------------------------
    def make_container(self, running: bool = False, network: str = "none") -> None:
        name = uniq("p")
        net = self.w.net if network == "net" else network
        self.x["cid"] = _create(self.alice_engine, self.ta, f"{self.ta}_{name}", start=running, network=net)
        self.x["c"] = self.n(name)

    def make_exec(self) -> None:
        self.x["eid"] = _ok(self.alice_engine("POST", f"{V}/containers/{self.w.own_id}/exec", {"Cmd": ["true"]}),
                            201).json()["Id"]

    def make_volume(self) -> None:
        name = uniq("v")
        _ok(self.alice_engine("POST", f"{V}/volumes/create", {"Name": f"{self.ta}_{name}", "Labels": {T: self.ta}}),
            201)
        self.x["v"] = self.n(name)


@dataclasses.dataclass(frozen=True)
class Refused:
    status: int | tuple[int, ...]
    #: searched in the answer's message; None for HEAD, which has no body
    match: str | None

    def statuses(self) -> tuple[int, ...]:
        return self.status if isinstance(self.status, tuple) else (self.status,)


@dataclasses.dataclass(frozen=True)
class Redirected:
    """The engine's router redirects an unclean path itself (no plugin is
    asked); the client that follows the redirect is refused there."""

    then: Refused


@dataclasses.dataclass(frozen=True)
class Contained:
    """The request cannot be written in this mode: it turns into one inside
    the caller's own scope.  ``check`` proves that."""

    check: Callable[[Ctx, Resp], None]


Expect = Refused | Redirected | Contained


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    attack: Callable[[Ctx], Req]
    control: Callable[[Ctx], Req]
    plugin: Expect
    scoper: Expect
    ok: tuple[int, ...] = (200,)
    prep: Callable[[Ctx], None] | None = None
    #: a check beyond the snapshot, after the attack
    probe: Callable[[Ctx], None] | None = None
    #: who attacks: "alice", or "bob" (the administrator's labelled container)
    user: str = "alice"
    #: who sends the control, when not the attacker: "admin" for admin-only endpoints
    control_user: str | None = None
    #: mode -> reason: the hole is known and its fix is outside this change
    open_in: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the engine refuses it without reading its (non-JSON) body: see _lost_refusal
    unread_body: bool = False


def snapshot(w: World) -> dict:
    """What the administrator sees of everything a refused request could
    have changed (the inspections run side by side)."""
    a = w.admin
    listed = _POOL.map(lambda path: _ok(a("GET", f"{V}/{path}"), 200).json(),
                       ["containers/json?all=1", "networks", "volumes", "images/json"])
    containers, networks, volumes, images = listed
    inspected = list(_POOL.map(lambda path: a("GET", f"{V}/{path}"),
                               [f"containers/{c['Id']}/json" for c in containers]
                               + [f"networks/{n['Id']}" for n in networks] + [f"exec/{w.fexec}/json"]))
    canary = a("HEAD", f"{V}/containers/{w.fid}/archive?path={CANARY}").status
    cs = {}
    for c, i in zip(containers, inspected):
        if i.status != 200:
            continue  # removed meanwhile
        d = i.json()
        hc = d["HostConfig"]
        labels = d["Config"]["Labels"] or {}
        cs[c["Id"]] = {
            "name": d["Name"], "state": d["State"]["Status"], "started": d["State"]["StartedAt"],
            "restarts": d["RestartCount"], "labels": labels, "networks": sorted(d["NetworkSettings"]["Networks"]),
            # alice's finished execs may be collected by the engine at any time
            "execs": sorted(d.get("ExecIDs") or []) if labels.get(T) != w.ta else None,
            "host": {k: hc.get(k) for k in ("Privileged", "CpuShares", "Memory", "PidsLimit", "NetworkMode",
                                            "CgroupnsMode", "Binds", "RestartPolicy", "SecurityOpt")},
        }
    nets = {}
    for n, i in zip(networks, inspected[len(containers):]):
        if i.status == 200:
            d = i.json()
            nets[n["Id"]] = {"name": d["Name"], "containers": sorted(d.get("Containers") or {}),
                             "options": d.get("Options"), "ipam": d.get("IPAM"), "labels": d.get("Labels")}
    fexec = _ok(inspected[-1], 200).json()
    return {
        "containers": cs,
        "networks": nets,
        "volumes": sorted(v["Name"] for v in volumes["Volumes"] or []),
        "images": sorted((i["Id"], tuple(i.get("RepoTags") or ())) for i in images),
        "bob's exec": (fexec["Running"], fexec["ExitCode"], fexec["Pid"]),
        "canary": canary,
    }


def foreign_view(w: World, snap: dict) -> dict:
    """The part of a snapshot that belongs to bob and the administrator."""
    return {"containers": {k: v for k, v in snap["containers"].items() if v["labels"].get(T) != w.ta},
            "networks": {k: v for k, v in snap["networks"].items() if (v["labels"] or {}).get(T) != w.ta},
            "bob's exec": snap["bob's exec"], "canary": snap["canary"], "images": snap["images"]}


def _changes(before: Any, after: Any, where: str = "") -> list[str]:
    """Where two snapshots differ, one line a difference."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = [f"{where}/{k}: gone" for k in before.keys() - after.keys()]
        out += [f"{where}/{k}: new {after[k]!r:.300}" for k in after.keys() - before.keys()]
        for k in before.keys() & after.keys():
            out += _changes(before[k], after[k], f"{where}/{k}")
        return out
    return [] if before == after else [f"{where}: {before!r:.300} -> {after!r:.300}"]


def _refused(expect: Refused, resp: Resp, what: str) -> None:
    assert resp.status in expect.statuses(), f"{what}: expected {expect.statuses()}, got {resp!r}"
    if expect.match is not None:
        assert re.search(expect.match, resp.message), f"{what}: expected /{expect.match}/ in {resp.message!r}"
    assert "x-docker-container-path-stat" not in resp.headers, f"{what}: a path stat leaked"


def _lost_refusal(c: Ctx, case: Case, resp: Resp) -> bool:
    """The scoper streams a request body to the engine; the engine refuses
    such a request without reading a non-JSON body and closes at once, and
    the scoper, still writing, may lose the engine's answer and say 502
    (a proxy defect, reported with the corpus; refused all the same: the
    snapshot below proves that nothing happened)."""
    return (case.unread_body and not c.plugin and resp.status == 502
            and "engine is unavailable" in resp.message)


def run(w: World, case: Case, mode: str) -> None:
    c = Ctx(w, mode)
    who = c.me if case.user == "alice" else c.bob
    try:
        if case.prep:
            case.prep(c)
        before = snapshot(w)
        attack = case.attack(c)
        resp = who.send(attack)
        expect = case.plugin if c.plugin else case.scoper
        for _ in range(3):
            if not _lost_refusal(c, case, resp):
                break
            resp = who.send(attack)
        if _lost_refusal(c, case, resp):
            warnings.warn(f"{case.name}[scoper]: the scoper answered 502 for a request the engine refused "
                          "without reading its body (the proxy's race, see the corpus report)")
        elif isinstance(expect, Refused):
            _refused(expect, resp, "attack")
        elif isinstance(expect, Redirected):
            assert resp.status == 301, f"expected the engine's own redirect, got {resp!r}"
            location = resp.headers["location"]
            assert location.startswith("/v1.41/"), location
            _refused(expect.then, who.send(dataclasses.replace(attack, target=location)), "the redirect's target")
        else:
            expect.check(c, resp)
        after = snapshot(w)
        if isinstance(expect, Contained):
            changed = _changes(foreign_view(w, before), foreign_view(w, after))
            assert not changed, f"the attack changed bob's or the admin's things: {changed}"
        else:
            changed = _changes(before, after)
            assert not changed, f"a refused request changed the engine's state: {changed}"
        assert after["canary"] == 404, "bob's exec ran"
        if case.probe:
            case.probe(c)
        # positive control: the same request without the forbidden part
        sender = {"alice": c.me, "bob": c.bob, "admin": c.admin_here}[case.control_user or case.user]
        control = sender.send(case.control(c))
        assert control.status in case.ok, f"positive control refused: {control!r}"
    finally:
        _restore(w.admin, w.baseline)


# -- probes and checks ------------------------------------------------------------------------


def _still_stopped(c: Ctx) -> None:
    d = c.w.admin("GET", f"{V}/containers/{c.x['cid']}/json").json()
    assert d["State"]["Status"] == "created" and d["HostConfig"]["Privileged"] is False, d["State"]


def _no_file_in_bob(c: Ctx) -> None:
    assert c.w.admin("HEAD", f"{V}/containers/{c.fid}/archive?path=/tmp/corpus-archive").status == 404


def _not_owned_by_bob(c: Ctx) -> None:
    r = redis.Redis.from_url(c.w.stack.env["FDCS_REDIS_URL"], decode_responses=True)
    assert r.hget("fdcs:own:container", c.w.admin_cid) in (None, ""), "the reconciler gave bob the admin's container"


def _contained_name(c: Ctx, resp: Resp) -> None:
    """The request made or renamed a container to ``<alice>_<what she
    wrote>``; nothing carries the name scoped for bob."""
    assert resp.status in (201, 204), resp
    assert c.w.admin("GET", f"{V}/containers/{c.stolen}/json").status == 404
    d = c.w.admin("GET", f"{V}/containers/{c.ta}_{c.stolen}/json")
    assert d.status == 200 and d.json()["Config"]["Labels"].get(T) == c.ta, d


def _only_own_networks(c: Ctx, resp: Resp) -> None:
    """The scoper added the tenant filter: only alice's networks are listed."""
    assert resp.status == 200, resp
    listed = {n["Id"] for n in resp.json()}
    alices = {n["Id"] for n in c.w.admin("GET", f"{V}/networks?filters={q({'label': [f'{T}={c.ta}']})}").json()}
    assert listed and listed <= alices, (listed, alices)


def _private_cgroupns(c: Ctx, resp: Resp) -> None:
    assert resp.status == 201, resp
    d = c.w.admin("GET", f"{V}/containers/{resp.json()['Id']}/json").json()
    assert d["HostConfig"]["CgroupnsMode"] == "private", d["HostConfig"]["CgroupnsMode"]


def _bobs_list(c: Ctx) -> Req:
    flt = f"&filters={q({'label': [f'{T}={c.tb}']})}" if c.plugin else ""
    return Req("GET", f"{V}/containers/json?all=1{flt}")


def _admin_container_not_listed(c: Ctx, resp: Resp) -> None:
    assert resp.status == 200, resp
    ids = {x["Id"] for x in resp.json()}
    assert c.fid in ids, "bob's own container is missing from his list"
    assert c.w.admin_cid not in ids, "the administrator's container is listed as bob's"


def P(match: str, status: int | tuple[int, ...] = 403) -> Refused:
    """Refused by the plugin, straight on the engine."""
    return Refused(status, match)


# Through the scoper: its own refusals are 400 (413 for size), the plugin's
# 403, and a plugin refusal of a foreign reference becomes the engine's own
# 404 (400 inside a create body).
S = Refused
MISSING_C = P(NO_SUCH)
S_MISSING_C = S(404, NO_SUCH)
S_MISSING_C_BODY = S(400, NO_SUCH)
PRIV = "HostConfig.Privileged is not allowed"


def get_own_json(c: Ctx) -> Req:
    return Req("GET", f"{V}/containers/{c.own}/json")


def create_req(c: Ctx, body, name: str | None = None, **kw) -> Req:
    headers = kw.pop("headers", [])
    if isinstance(body, str):
        headers = [("Content-Type", "application/json")] + headers
    return Req("POST", c.create(name or uniq()), body, headers, **kw)


def _fill(c: Ctx, value: Any) -> Any:
    """Placeholders in a case's body: VOL (alice's volume), NEWVOL (a volume
    name of hers that does not exist yet), FVOL (bob's anonymous volume), TB."""
    if isinstance(value, dict):
        return {k: _fill(c, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(c, v) for v in value]
    if isinstance(value, str):
        return (value.replace("NEWVOL", c.n(uniq("v"))).replace("FVOL", c.fvol).replace("VOL", c.vol)
                .replace("TB", c.tb))
    return value


def create_case(name: str, attack_hc: dict, match: str, scoper: Expect | None = None, ok_hc: dict | None = None,
                **kw) -> Case:
    """A container create whose HostConfig holds the forbidden part; the
    control is the same create without it (or with ``ok_hc``)."""
    return Case(name, lambda c: create_req(c, c.body(**_fill(c, attack_hc))),
                lambda c: create_req(c, c.body(**_fill(c, ok_hc or {}))),
                P(match), scoper or S(403, match), ok=(201,), **kw)


def raw_case(name: str, attack: str, control: str, match: str, scoper: Expect | None = None, top: bool = False,
             **kw) -> Case:
    """A create body written as JSON text (keys Python's dict would merge)."""
    return Case(name, lambda c: create_req(c, c.raw_body(attack, top)),
                lambda c: create_req(c, c.raw_body(control, top)),
                P(match), scoper or S(403, match), ok=(201,), **kw)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _big_env() -> list[str]:
    return ["PAD=" + "x" * (1100 * 1024)]


LIST_OPEN = {
    "plugin": "known limit of plugin-only mode: the engine's label filter matches a label inherited from the image, "
              "and the plugin cannot edit a response (it could only refuse the whole list)",
}


CASES: list[Case] = [
    # ---- paths ----------------------------------------------------------------------------
    Case("path_percent_encoded_segment",
         lambda c: Req("GET", f"{V}/%63ontainers/{c.fid}/json"),
         lambda c: Req("GET", f"{V}/%63ontainers/{c.own}/json"),
         MISSING_C, S_MISSING_C),
    Case("path_every_reference_byte_percent_encoded",
         lambda c: Req("GET", f"{V}/containers/{''.join('%%%02x' % b for b in c.fid.encode())}/json"),
         lambda c: Req("GET", f"{V}/containers/{''.join('%%%02X' % b for b in c.own.encode())}/json"),
         MISSING_C, S_MISSING_C),
    Case("path_encoded_slash_lower_and_upper_case",
         lambda c: Req("GET", f"{V}/containers/{c.own}%2f..%2F{c.fid}/json"),
         get_own_json, Redirected(MISSING_C), Redirected(S_MISSING_C)),
    Case("path_double_encoded_slash",
         lambda c: Req("GET", f"{V}/containers/{c.own}%252F..%252F{c.fid}/json"),
         get_own_json, P(NO_SUCH), S(400, "invalid name")),
    Case("path_dot_dot",
         lambda c: Req("GET", f"{V}/containers/{c.own}/../{c.fid}/json"),
         get_own_json, Redirected(MISSING_C), Redirected(S_MISSING_C)),
    Case("path_double_slash",
         lambda c: Req("GET", f"{V}//containers/{c.fid}/json"),
         get_own_json, Redirected(MISSING_C), Redirected(S_MISSING_C)),
    Case("path_trailing_slash_delete",
         lambda c: Req("DELETE", f"{V}/containers/{c.fstopped}/"),
         lambda c: Req("DELETE", f"{V}/containers/{c.x['c']}"),
         P("not clean"), S(403, "not clean"), ok=(204,), prep=lambda c: c.make_container()),
    Case("version_missing",
         lambda c: Req("GET", f"/containers/{c.own}/json"),
         get_own_json, P("API version is missing"), S(403, "API version is missing")),
    Case("version_leading_zero_v1_041",
         lambda c: Req("GET", f"/v1.041/containers/{c.own}/json"),
         get_own_json, P("not written canonically"), S(403, "not written canonically")),
    Case("version_three_parts_v1_44_0",
         lambda c: Req("GET", f"/v1.44.0/containers/{c.own}/json"),
         get_own_json, P("not written canonically"), S(403, "not written canonically")),
    # API < 1.24 starts a container with the HostConfig in the start body
    Case("version_old_v1_23_start_with_host_config",
         lambda c: Req("POST", f"/v1.23/containers/{c.x['c']}/start", {"Privileged": True, "Binds": ["/:/host"]}),
         lambda c: Req("POST", f"{V}/containers/{c.x['c']}/start"),
         P("too old"), S(403, "too old"), ok=(204,), prep=lambda c: c.make_container(), probe=_still_stopped),
    Case("version_padded_v1_023_start_with_host_config",
         lambda c: Req("POST", f"/v1.023/containers/{c.x['c']}/start", {"Privileged": True}),
         lambda c: Req("POST", f"{V}/containers/{c.x['c']}/start"),
         P("not written canonically"), S(403, "not written canonically"), ok=(204,),
         prep=lambda c: c.make_container(), probe=_still_stopped),
    # API < 1.41 on a cgroup v1 host: an empty CgroupnsMode becomes "host"
    Case("version_v1_40_create_without_cgroupns",
         lambda c: Req("POST", f"/v1.40/containers/create?name={c.n(uniq())}", {
             **c.body(), "HostConfig": {k: v for k, v in c.body()["HostConfig"].items() if k != "CgroupnsMode"}}),
         lambda c: Req("POST", f"/v1.40/containers/create?name={c.n(uniq())}", c.body(CgroupnsMode="private")),
         P("CgroupnsMode"), Contained(_private_cgroupns), ok=(201,)),
    Case("head_archive_of_foreign_container",
         lambda c: Req("HEAD", f"{V}/containers/{c.fid}/archive?path=/etc/hostname"),
         lambda c: Req("HEAD", f"{V}/containers/{c.own}/archive?path=/etc/hostname"),
         P(None), S((403, 404), None)),
    Case("head_archive_of_foreign_container_by_id_prefix",
         lambda c: Req("HEAD", f"{V}/containers/{c.fid[:12]}/archive?path=/etc/hostname"),
         lambda c: Req("HEAD", f"{V}/containers/{c.w.own_id[:12]}/archive?path=/etc/hostname"),
         P(None), S((403, 404), None)),
    # ---- queries --------------------------------------------------------------------------
    Case("filters_given_twice",
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt()}&filters={q({})}"),
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt()}"),
         P("more than once"), S(400, "more than once")),
    Case("filters_key_percent_encoded_twice",
         lambda c: Req("GET", f"{V}/containers/json?all=1&%66ilters={q({'label': [f'{T}={c.tb}']})}"
                              f"&filters={c.flt()}"),
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt()}"),
         P("more than once"), S(400, "more than once")),
    Case("filters_forged_tenant_label_list_shape",
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={q({'label': [f'{T}={c.tb}']})}"),
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt()}"),
         P("must be filtered by your tenant label"), S(400, "set by the service")),
    Case("filters_forged_tenant_label_map_shape",
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={q({'label': {f'{T}={c.tb}': True}})}"),
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt('map', 'corpus=1')}"),
         P("must be filtered by your tenant label"), S(400, "set by the service")),
    Case("filters_both_tenant_labels",
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters="
                              f"{q({'label': [f'{T}={c.ta}', f'{T}={c.tb}']})}"),
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt()}"),
         P("another tenant's label"), S(400, "set by the service")),
    Case("filters_duplicate_json_key",  # Go's map decoding keeps the last "label"
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters=" + q(
             '{"label":["%s=%s"],"label":["%s=%s"]}' % (T, c.ta, T, c.tb))),
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt()}"),
         P("more than once"), S(400, "more than once")),
    Case("filters_semicolon_separator",
         lambda c: Req("GET", f"{V}/containers/json?all=1;filters={q({'label': [f'{T}={c.tb}']})}"),
         lambda c: Req("GET", f"{V}/containers/json?all=1&filters={c.flt()}"),
         P("';'"), S(403, "';'")),
    Case("prune_with_forged_tenant_filter",
         lambda c: Req("POST", f"{V}/containers/prune?filters={q({'label': [f'{T}={c.tb}']})}"),
         lambda c: Req("POST", f"{V}/containers/prune?filters={c.flt('list', 'corpus.none=1')}"),
         P("must be filtered by your tenant label"), S(400, "set by the service")),
    Case("events_with_forged_tenant_filter",
         lambda c: Req("GET", f"{V}/events?since=1&until={int(time.time())}"
                              f"&filters={q({'label': [f'{T}={c.tb}']})}"),
         lambda c: Req("GET", f"{V}/events?since={int(time.time()) - 1}&until={int(time.time())}"
                              f"&filters={c.flt()}"),
         P("must be filtered by your tenant label"), S(400, "set by the service")),
    Case("volumes_with_forged_tenant_filter_map_shape",
         lambda c: Req("GET", f"{V}/volumes?filters={q({'label': {f'{T}={c.tb}': True}})}"),
         lambda c: Req("GET", f"{V}/volumes?filters={c.flt('map', 'corpus=1')}"),
         P("must be filtered by your tenant label"), S(400, "set by the service")),
    Case("networks_without_tenant_filter",
         lambda c: Req("GET", f"{V}/networks?filters={q({'driver': ['bridge']})}"),
         lambda c: Req("GET", f"{V}/networks?filters={c.flt('list', driver=['bridge'])}"),
         # through the scoper the tenant filter is added: it cannot be left out
         P("must be filtered by your tenant label"), Contained(_only_own_networks)),
    # the engine reads the first name: it must be the one the plugin judges
    Case("create_name_given_twice_foreign_first",
         lambda c: Req("POST", f"{V}/containers/create?name={c.stolen}&name={c.n(uniq())}", c.body()),
         lambda c: Req("POST", f"{V}/containers/create?name={c.n(uniq())}", c.body()),
         P("scoped form"), Contained(_contained_name), ok=(201,)),
    # ---- bodies ---------------------------------------------------------------------------
    Case("body_key_in_another_case",
         lambda c: create_req(c, json.dumps(c.body(Privileged=True)).replace('"HostConfig"', '"hostconfig"')),
         lambda c: create_req(c, json.dumps(c.body(Privileged=False)).replace('"HostConfig"', '"hostconfig"')),
         P(PRIV), S(403, PRIV), ok=(201,)),
    raw_case("body_duplicate_key",
             '"Privileged": false, "Privileged": true', '"Privileged": false',
             "Privileged is given more than once", S(400, "given more than once")),
    Case("body_duplicate_object_case_variant",
         lambda c: create_req(c, json.dumps(c.body())[:-1] + ', "hostConfig": {"Privileged": true}}'),
         lambda c: create_req(c, json.dumps(c.body())),
         P("given more than once"), S(400, "given more than once"), ok=(201,)),
    Case("body_nested_key_upper_case_binds",
         lambda c: create_req(c, c.raw_body('"BINDS": ["/:/host"]')),
         lambda c: create_req(c, c.raw_body(f'"BINDS": ["{c.vol}:/v"]')),
         P("host path"), S(403, "host path"), ok=(201,)),
    raw_case("body_kelvin_sign_key",  # "OomKillDisable" with U+212A KELVIN SIGN, raw UTF-8
             '"Oom\u212aillDisable": true', '"Oom\u212aillDisable": false', "OomKillDisable is not allowed"),
    Case("body_long_s_key_escaped",  # "Binds" with U+017F LATIN SMALL LETTER LONG S, as \u017f
         lambda c: create_req(c, c.raw_body('"Bind\\u017f": ["/:/host"]')),
         lambda c: create_req(c, c.raw_body(f'"Bind\\u017f": ["{c.vol}:/v"]')),
         P("host path"), S(403, "host path"), ok=(201,)),
    raw_case("body_unicode_escaped_key",
             '"Privil\\u0065ged": true', '"Privil\\u0065ged": false', PRIV),
    Case("body_deprecated_top_level_host_config",
         lambda c: create_req(c, {k: v for k, v in c.body().items() if k != "HostConfig"}
                              | c.body()["HostConfig"] | {"Privileged": True}),
         lambda c: create_req(c, c.body()),
         P("deprecated top-level"), S(400, "deprecated top-level"), ok=(201,)),
    Case("body_deprecated_top_level_beside_host_config",  # the engine copies VolumeDriver from there
         lambda c: create_req(c, c.body() | {"VolumeDriver": "corpus-driver"}),
         lambda c: create_req(c, c.body()),
         P("deprecated top-level"), S(400, "deprecated top-level"), ok=(201,)),
    raw_case("body_string_where_bool_expected",
             '"Privileged": "true"', '"Privileged": false', "expected true or false", S(400, "expected true or false")),
    raw_case("body_float_where_integer_expected",
             '"OomScoreAdj": -1000.0', '"OomScoreAdj": 500', "expected an integer", S(400, "expected an integer")),
    create_case("body_null_element_in_list", {"SecurityOpt": [None]}, "SecurityOpt '' is not allowed",
                ok_hc={"SecurityOpt": ["no-new-privileges"]}),
    # an empty list unmasks /proc and /sys; null (or absent) keeps the engine's masks
    create_case("body_empty_not_null_masked_paths", {"MaskedPaths": []}, "MaskedPaths is not allowed",
                ok_hc={"MaskedPaths": None}),
    create_case("body_string_for_string_list", {"CapAdd": "SYS_ADMIN"}, "CapAdd 'SYS_ADMIN' is not allowed",
                ok_hc={"CapAdd": []}),
    create_case("body_field_the_engine_does_not_have", {"Capabilities": ["CAP_SYS_ADMIN"]},
                "not a field the engine knows", S(400, "not a field the engine knows")),
    Case("body_nested_too_deeply",
         lambda c: create_req(c, c.raw_body(f'"Binds": {_deep(100000)}')),
         lambda c: create_req(c, c.raw_body('"ReadonlyRootfs": false')),
         P("not valid JSON"), S(400, "not valid JSON"), ok=(201,)),
    Case("body_two_json_values",  # Go decodes the first value and ignores the rest
         lambda c: create_req(c, json.dumps(c.body(Privileged=True)) + json.dumps(c.body())),
         lambda c: create_req(c, json.dumps(c.body())),
         P("not valid JSON"), S(400, "not valid JSON"), ok=(201,)),
    Case("body_chunked",
         lambda c: create_req(c, c.body(Privileged=True), chunked=True),
         lambda c: create_req(c, c.body(), chunked=True),
         P(PRIV), S(403, PRIV), ok=(201,)),
    Case("body_over_the_engines_limit",  # the engine drops it and would still create
         lambda c: create_req(c, c.body(Privileged=True) | {"Env": _big_env()}),
         lambda c: create_req(c, c.body()),
         P("1 MiB"), S(413, "over 1024 KiB"), ok=(201,)),
    Case("body_over_the_engines_limit_chunked",
         lambda c: create_req(c, c.body(Privileged=True) | {"Env": _big_env()}, chunked=True),
         lambda c: create_req(c, c.body(), chunked=True),
         P("1 MiB"), S(413, "over 1024 KiB"), ok=(201,)),
    Case("body_gzip_encoded",
         lambda c: Req("POST", c.create(uniq()), gzip.compress(json.dumps(c.body(Privileged=True)).encode()),
                       [("Content-Type", "application/json"), ("Content-Encoding", "gzip")]),
         lambda c: create_req(c, c.body()),
         P("UTF-8"), S(400, "UTF-8"), ok=(201,)),
    Case("body_wrong_content_type",  # the engine forwards only JSON bodies to the plugin
         lambda c: Req("POST", c.create(uniq()), json.dumps(c.body(Privileged=True)), [("Content-Type", "text/plain")]),
         lambda c: create_req(c, c.body()),
         P("needs a JSON body"), S(403, "needs a JSON body"), ok=(201,)),
    Case("body_form_encoded_create",
         lambda c: Req("POST", c.create(uniq()), f"name={c.stolen}&Image=busybox",
                       [("Content-Type", "application/x-www-form-urlencoded")]),
         lambda c: create_req(c, c.body()),
         P("form bodies"), S(403, "form bodies"), ok=(201,), unread_body=True),
    # Go's form parsing reads the FIRST Content-Type, the plugin is shown the
    # last; a form body's filters would replace the query's
    Case("body_form_behind_a_second_content_type_on_prune",
         lambda c: Req("POST", f"{V}/containers/prune?filters={c.flt('list', 'corpus.none=1')}",
                       "filters=" + q({"label": [f"{T}={c.tb}"]}),
                       [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Type", "application/json")]),
         lambda c: Req("POST", f"{V}/containers/prune?filters={c.flt('list', 'corpus.none=1')}"),
         P("takes no request body"), S(403, "takes no request body"), unread_body=True),
    Case("body_form_behind_a_second_content_type_on_rename",
         lambda c: Req("POST", f"{V}/containers/{c.x['c']}/rename?name={c.n(uniq())}",
                       f"name={c.stolen}",
                       [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Type", "application/json")]),
         lambda c: Req("POST", f"{V}/containers/{c.x['c']}/rename?name={c.n(uniq())}"),
         P("takes no request body"), S(403, "takes no request body"), ok=(204,), prep=lambda c: c.make_container(),
         unread_body=True),
    Case("body_on_an_endpoint_that_takes_none",
         lambda c: Req("POST", f"{V}/containers/{c.x['c']}/start", {"Privileged": True}),
         lambda c: Req("POST", f"{V}/containers/{c.x['c']}/start"),
         P("takes no request body"), S(403, "takes no request body"), ok=(204,),
         prep=lambda c: c.make_container(), probe=_still_stopped),
    Case("body_chunked_with_content_length_zero",  # Go drops Content-Length when chunked
         lambda c: Req("POST", f"{V}/containers/prune?filters={c.flt('list', 'corpus.none=1')}",
                       "filters=" + q({"label": [f"{T}={c.tb}"]}),
                       [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Type", "application/json"),
                        ("Content-Length", "0")], chunked=True),
         lambda c: Req("POST", f"{V}/containers/prune?filters={c.flt('list', 'corpus.none=1')}"),
         P("takes no request body"), S(400, "Content-Length together with Transfer-Encoding")),
    # ---- host escapes through allowed-looking fields ----------------------------------------
    create_case("escape_inline_seccomp_profile",
                {"SecurityOpt": ['seccomp={"defaultAction":"SCMP_ACT_ALLOW"}']}, "SecurityOpt 'seccomp'",
                ok_hc={"SecurityOpt": ["no-new-privileges"]}),
    create_case("escape_log_driver_to_a_host_address",
                {"LogConfig": {"Type": "syslog", "Config": {"syslog-address": "tcp://127.0.0.1:1"}}},
                "LogConfig.Type 'syslog'", ok_hc={"LogConfig": {"Type": "json-file", "Config": {"max-size": "1m"}}}),
    create_case("escape_log_option_outside_the_allow_list",
                {"LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "fluentd-address": "127.0.0.1:1"}}},
                "LogConfig.Config 'fluentd-address'",
                ok_hc={"LogConfig": {"Type": "json-file", "Config": {"max-size": "1m"}}}),
    # the local driver's own default is 20 MiB a file, over the configured cap
    create_case("escape_log_local_driver_default_size", {"LogConfig": {"Type": "local"}}, "max-size",
                ok_hc={"LogConfig": {"Type": "local", "Config": {"max-size": "1m"}}}),
    create_case("escape_oom_score_adj_negative", {"OomScoreAdj": -1000}, "OomScoreAdj", ok_hc={"OomScoreAdj": 500}),
    create_case("escape_cgroupns_host", {"CgroupnsMode": "host"}, "CgroupnsMode 'host'",
                ok_hc={"CgroupnsMode": "private"}),
    Case("escape_cgroupns_left_to_the_engine_default",
         lambda c: create_req(c, {**c.body(), "HostConfig": {k: v for k, v in c.body()["HostConfig"].items()
                                                            if k != "CgroupnsMode"}}),
         lambda c: create_req(c, c.body(CgroupnsMode="private")),
         P("CgroupnsMode"), Contained(_private_cgroupns), ok=(201,)),
    create_case("escape_volume_mount_with_driver_options",
                {"Mounts": [{"Type": "volume", "Source": "NEWVOL", "Target": "/v", "VolumeOptions": {"DriverConfig": {
                    "Name": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}}}]},
                "VolumeOptions", ok_hc={"Mounts": [{"Type": "volume", "Source": "NEWVOL", "Target": "/v"}]}),
    create_case("escape_volume_mount_with_forged_labels",
                {"Mounts": [{"Type": "volume", "Source": "NEWVOL", "Target": "/v",
                             "VolumeOptions": {"Labels": {T: "TB"}}}]}, "VolumeOptions",
                ok_hc={"Mounts": [{"Type": "volume", "Source": "NEWVOL", "Target": "/v",
                                   "VolumeOptions": {"NoCopy": True}}]}),
    create_case("escape_bind_of_foreign_anonymous_volume", {"Binds": ["FVOL:/steal"]}, "not one of yours",
                ok_hc={"Binds": ["VOL:/v"]}),
    Case("escape_volume_create_with_driver_options",
         lambda c: Req("POST", f"{V}/volumes/create", c.volume_body(uniq("v"), DriverOpts={
             "type": "none", "o": "bind", "device": "/"})),
         lambda c: Req("POST", f"{V}/volumes/create", c.volume_body(uniq("v"))),
         P("DriverOpts is not allowed"), S(403, "DriverOpts is not allowed"), ok=(201,)),
    Case("escape_volume_create_with_forged_tenant_label",
         lambda c: Req("POST", f"{V}/volumes/create", {"Name": c.n(uniq("v")), "Labels": {T: c.tb}}),
         lambda c: Req("POST", f"{V}/volumes/create", c.volume_body(uniq("v"))),
         P("label .* is required"), S(400, "reserved for FDCS"), ok=(201,)),
    Case("escape_network_with_a_subnet",
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"), IPAM={
             "Config": [{"Subnet": "10.199.0.0/24"}]})),
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"))),
         P("IPAM configuration is not allowed"), S(403, "IPAM configuration is not allowed"), ok=(201,)),
    Case("escape_network_with_ipv6",
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"), EnableIPv6=True)),
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"), EnableIPv6=False)),
         P("EnableIPv6 is not allowed"), S(403, "EnableIPv6 is not allowed"), ok=(201,)),
    Case("escape_network_with_bridge_options",
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"), Options={
             "com.docker.network.bridge.name": "docker0", "com.docker.network.bridge.enable_icc": "true"})),
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"), Options={})),
         P("Options is not allowed"), S(403, "Options is not allowed"), ok=(201,)),
    Case("escape_network_with_a_host_driver",
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"), Driver="macvlan",
                                                                      Options={"parent": "lo"})),
         lambda c: Req("POST", f"{V}/networks/create", c.network_body(uniq("n"), Driver="bridge")),
         P("Driver 'macvlan' is not allowed"), S(403, "Driver 'macvlan' is not allowed"), ok=(201,)),
    Case("escape_static_address_at_create",
         lambda c: create_req(c, c.body(NetworkMode=c.net) | {"NetworkingConfig": {"EndpointsConfig": {
             c.net: {"IPAMConfig": {"IPv4Address": "172.31.250.10"}}}}}),
         lambda c: create_req(c, c.body(NetworkMode=c.net) | {"NetworkingConfig": {"EndpointsConfig": {c.net: {}}}}),
         P("IPAMConfig is not allowed"), S(403, "IPAMConfig is not allowed"), ok=(201,)),
    Case("escape_static_address_at_connect",
         lambda c: Req("POST", f"{V}/networks/{c.net2}/connect", {"Container": c.x["c"], "EndpointConfig": {
             "IPAddress": "172.31.250.11", "MacAddress": "02:42:ac:1f:fa:0b"}}),
         lambda c: Req("POST", f"{V}/networks/{c.net2}/connect", {"Container": c.x["c"]}),
         P("EndpointConfig.IPAddress is not allowed"), S(403, "EndpointConfig.IPAddress is not allowed"),
         prep=lambda c: c.make_container(network="net")),
    Case("escape_network_namespace_of_foreign_container",
         lambda c: create_req(c, c.body(NetworkMode=f"container:{c.fid}")),
         lambda c: create_req(c, c.body(NetworkMode=f"container:{c.own}")),
         MISSING_C, S_MISSING_C_BODY, ok=(201,)),
    Case("escape_pid_namespace_of_foreign_container",
         lambda c: create_req(c, c.body(PidMode=f"container:{c.fid}")),
         lambda c: create_req(c, c.body(PidMode=f"container:{c.own}")),
         MISSING_C, S_MISSING_C_BODY, ok=(201,)),
    Case("escape_volumes_from_foreign_container",
         lambda c: create_req(c, c.body(VolumesFrom=[f"{c.fid}:ro"])),
         lambda c: create_req(c, c.body(VolumesFrom=[f"{c.own}:ro"])),
         MISSING_C, S_MISSING_C_BODY, ok=(201,)),
    Case("escape_endpoint_on_foreign_network",
         lambda c: create_req(c, c.body(NetworkMode=c.fnet) | {"NetworkingConfig": {"EndpointsConfig": {c.fnet: {}}}}),
         lambda c: create_req(c, c.body(NetworkMode=c.net) | {"NetworkingConfig": {"EndpointsConfig": {c.net: {}}}}),
         P("not found"), S(400, "not found"), ok=(201,)),
    # ---- endpoints --------------------------------------------------------------------------
    Case("exec_create_in_foreign_container",
         lambda c: Req("POST", f"{V}/containers/{c.fid}/exec", {"Cmd": ["touch", CANARY]}),
         lambda c: Req("POST", f"{V}/containers/{c.own}/exec", {"Cmd": ["true"]}),
         MISSING_C, S_MISSING_C, ok=(201,)),
    Case("exec_create_privileged",
         lambda c: Req("POST", f"{V}/containers/{c.own}/exec", {"Cmd": ["true"], "privileged": True}),
         lambda c: Req("POST", f"{V}/containers/{c.own}/exec", {"Cmd": ["true"], "privileged": False}),
         P("Privileged exec is not allowed"), S(403, "Privileged exec is not allowed"), ok=(201,)),
    Case("exec_start_of_foreign_exec",
         lambda c: Req("POST", f"{V}/exec/{c.fexec}/start", {"Detach": True}),
         lambda c: Req("POST", f"{V}/exec/{c.x['eid']}/start", {"Detach": True}),
         P("No such exec instance"), S(404, "No such exec instance"), prep=lambda c: c.make_exec()),
    Case("exec_inspect_of_foreign_exec",
         lambda c: Req("GET", f"{V}/exec/{c.fexec}/json"),
         lambda c: Req("GET", f"{V}/exec/{c.x['eid']}/json"),
         P("No such exec instance"), S(404, "No such exec instance"), prep=lambda c: c.make_exec()),
    Case("archive_put_into_foreign_container",
         lambda c: Req("PUT", f"{V}/containers/{c.fid}/archive?path=/tmp", tar_of("corpus-archive"),
                       [("Content-Type", "application/x-tar")]),
         lambda c: Req("PUT", f"{V}/containers/{c.own}/archive?path=/tmp", tar_of(f"corpus-archive-{c.mode}"),
                       [("Content-Type", "application/x-tar")]),
         MISSING_C, S_MISSING_C, probe=_no_file_in_bob, unread_body=True),
    Case("archive_get_from_foreign_container",
         lambda c: Req("GET", f"{V}/containers/{c.fid}/archive?path=/etc/hostname"),
         lambda c: Req("GET", f"{V}/containers/{c.own}/archive?path=/etc/hostname"),
         MISSING_C, S_MISSING_C),
    Case("update_of_foreign_container",
         lambda c: Req("POST", f"{V}/containers/{c.fid}/update", {"CpuShares": 512, "PidsLimit": 1000}),
         lambda c: Req("POST", f"{V}/containers/{c.own}/update", {"CpuShares": 512, "PidsLimit": 1000}),
         MISSING_C, S_MISSING_C),
    Case("update_to_unlimited_pids",  # the engine reads 0 and below as "unlimited"
         lambda c: Req("POST", f"{V}/containers/{c.own}/update", {"PidsLimit": -1}),
         lambda c: Req("POST", f"{V}/containers/{c.own}/update", {"PidsLimit": 50}),
         P("PidsLimit -1 is not allowed"), S(403, "PidsLimit -1 is not allowed")),
    Case("rename_to_a_name_scoped_for_another_tenant",
         lambda c: Req("POST", f"{V}/containers/{c.x['c']}/rename?name={c.stolen}"),
         # by id: through the scoper the attack did rename it (within alice's scope)
         lambda c: Req("POST", f"{V}/containers/{c.x['cid']}/rename?name={c.n(uniq())}"),
         P("scoped form"), Contained(_contained_name), ok=(204,),
         prep=lambda c: c.make_container()),
    Case("network_connect_of_foreign_container",
         lambda c: Req("POST", f"{V}/networks/{c.net2}/connect", {"Container": c.fid}),
         lambda c: Req("POST", f"{V}/networks/{c.net2}/connect", {"Container": c.x["c"]}),
         MISSING_C, S_MISSING_C, prep=lambda c: c.make_container(network="net")),
    Case("network_connect_to_foreign_network",
         lambda c: Req("POST", f"{V}/networks/{c.fnet}/connect", {"Container": c.x["c"]}),
         lambda c: Req("POST", f"{V}/networks/{c.net2}/connect", {"Container": c.x["c"]}),
         P("not found"), S(404, "not found"), prep=lambda c: c.make_container(network="net")),
    Case("network_disconnect_of_foreign_container",
         lambda c: Req("POST", f"{V}/networks/{c.fnet}/disconnect", {"Container": c.fid, "Force": True}),
         lambda c: Req("POST", f"{V}/networks/{c.net}/disconnect", {"Container": c.x["c"], "Force": True}),
         P("not found"), S(404, "not found"), prep=lambda c: c.make_container(network="net")),
    Case("commit_of_foreign_container",  # control: the same request by the administrator
         lambda c: Req("POST", f"{V}/commit?container={c.fid}&repo=corpus-stolen&tag={c.mode}"),
         lambda c: Req("POST", f"{V}/commit?container={c.fid}&repo=corpus-committed&tag={c.mode}"),
         P("administrators only"), S(403, "administrators only"), ok=(201,), control_user="admin"),
    Case("attach_websocket_to_foreign_container",
         lambda c: Req("GET", f"{V}/containers/{c.fid}/attach/ws?stream=1&stdout=1", headers=WS_HEADERS),
         lambda c: Req("GET", f"{V}/containers/{c.own}/attach/ws?stream=1&stdout=1", headers=WS_HEADERS),
         MISSING_C, S_MISSING_C, ok=(101,)),
    Case("attach_hijack_to_foreign_container",
         lambda c: Req("POST", f"{V}/containers/{c.fid}/attach?stream=1&stdout=1", headers=HIJACK_HEADERS),
         lambda c: Req("POST", f"{V}/containers/{c.own}/attach?stream=1&stdout=1", headers=HIJACK_HEADERS),
         MISSING_C, S_MISSING_C, ok=(101,)),
    Case("delete_foreign_anonymous_volume",
         lambda c: Req("DELETE", f"{V}/volumes/{c.fvol}"),
         lambda c: Req("DELETE", f"{V}/volumes/{c.x['v']}"),
         P("no such volume"), S(404, "no such volume"), ok=(204,), prep=lambda c: c.make_volume()),
    # last, so that the reconciler has had its passes over the admin's container
    Case("image_label_makes_a_container_look_owned",
         lambda c: Req("POST", f"{V}/containers/{c.w.admin_cid}/exec", {"Cmd": ["touch", "/tmp/pwned"]}),
         lambda c: Req("POST", f"{V}/containers/{c.fid}/exec", {"Cmd": ["true"]}),
         MISSING_C, S_MISSING_C, ok=(201,), user="bob", probe=_not_owned_by_bob),
    Case("image_label_puts_a_container_in_the_tenants_list", _bobs_list, _bobs_list,
         Contained(_admin_container_not_listed), Contained(_admin_container_not_listed), user="bob",
         open_in={"plugin": LIST_OPEN["plugin"]}),
]

def _make_test(case: Case):
    params = [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=case.open_in[m]))
              if m in case.open_in else m for m in MODES]

    @pytest.mark.parametrize("mode", params)
    def test(world, mode):
        run(world, case, mode)

    test.__name__ = test.__qualname__ = f"test_{case.name}"
    test.__doc__ = f"corpus case {case.name}"
    return test


for _case in CASES:
    globals()[f"test_{_case.name}"] = _make_test(_case)

