"""The metrics (authz_plugin/metrics.py) and their hooks in the three daemons.

Pure helpers are checked directly; the hooks through the real code paths
(the authorizer with fakes, the identity service against the fake
Keystone, the proxy over real sockets, the reconciler with a fake engine
and fakeredis); the plugin's multiprocess mode through a real
``fdcs-authz`` (gunicorn, two workers) whose metrics listener is scraped
over HTTP.  Every "not counted" / "omitted" has its positive control.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import logging
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import fakeredis
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authz_plugin import config, metrics
from authz_plugin.errors import ConfigError, StoreUnavailable
from authz_plugin.ownership import Store
from authz_plugin.scoping import TENANT_LABEL
from tests.unit.conftest import TA, TB, FakeIdentityService, cfg, payload

from tests.unit.test_proxy import TIMEOUT, wait_until

ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Text exposition -> {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(registry, name, **labels) -> float | None:
    return samples(generate_latest(registry).decode()).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def active():
    """A fresh metric set per test (activate it with ``active(kind)``)."""
    made = []

    def make(kind):
        m = metrics.activate(kind, CollectorRegistry())
        made.append(m)
        return m

    yield make
    metrics.reset()


# -- pure helpers ---------------------------------------------------------------------------

def test_parse_listen():
    assert metrics.parse_listen("") is None and metrics.parse_listen("  ") is None
    assert metrics.parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in (":9464", "9464", "h:0", "h:65536", "h:x", "[]:1", "a b:1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            metrics.parse_listen(bad)


def test_metrics_listen_options_default_validate_and_come_from_the_environment():
    c = cfg()
    assert (c["plugin.metrics_listen"], c["scoper.metrics_listen"], c["reconciler.metrics_listen"]) == \
        ("127.0.0.1:9464", "127.0.0.1:9465", "127.0.0.1:9466")
    with pytest.raises(ConfigError, match="scoper.metrics_listen"):
        cfg(**{"scoper.metrics_listen": "9465"})
    # positive controls: empty disables, the environment overrides
    assert cfg(**{"plugin.metrics_listen": ""})["plugin.metrics_listen"] == ""
    c = config.load(None, env={"FDCS_RECONCILER_METRICS_LISTEN": "127.0.0.1:1"},
                    overrides={"keystone.url": "http://k/v3", "keystone.admin_project_id": "a",
                               "redis.url": "redis://r/0"})
    assert c["reconciler.metrics_listen"] == "127.0.0.1:1"
    # every option the parser accepts, the listener accepts too
    for opt in ("plugin", "scoper", "reconciler"):
        metrics.parse_listen(cfg()[f"{opt}.metrics_listen"])


def test_reference_names_each_section_once():
    headers = [line for line in config.reference().splitlines() if line.startswith("[")]
    assert len(headers) == len(set(headers)) and "[plugin]" in headers
    text = config.reference()
    assert text.index("metrics_listen") > text.index("[plugin]")


def test_labels_are_bounded():
    assert metrics.endpoint_kind("/v1.41/containers/abc/json") == "containers"
    assert metrics.endpoint_kind("/_ping") == "_ping"
    assert metrics.endpoint_kind("/v1.41/images/create?fromImage=x") == "images"
    assert metrics.endpoint_kind("/v1.41/whatever/x") == "other"
    assert metrics.endpoint_kind("-") == "other"
    assert [metrics.method_class(m) for m in ("GET", "head", "POST", "DELETE", "BREW")] == \
        ["read", "read", "write", "write", "other"]
    assert [metrics.status_class(s) for s in (101, 200, 404, 499, 503, 0)] == \
        ["1xx", "2xx", "4xx", "4xx", "5xx", "none"]
    assert metrics.reason_label("not-owned") == "not-owned"
    assert metrics.reason_label("Bad Reason!") == "other" and metrics.reason_label(None) == "other"


def test_drift_classifies_what_a_pass_changed():
    have = {"container": {"c1": (TA, "a_web"), "c2": (TA, "a_db")}, "network": {}, "volume": {}}
    add = [("container", "c1", TB, "a_web"),      # recorded for TA, label says TB
           ("container", "c2", TA, "a_db2"),      # same tenant, another name
           ("container", "c3", TA, "a_new"),
           ("volume", "v1", TA, "")]
    out = metrics.drift(add, [("network", "n9")], [("e1", TA, "c1")], ["e2", "e3"], have, conflicts=1)
    assert out == {("reowned", "container"): 1, ("renamed", "container"): 1, ("added", "container"): 1,
                   ("added", "volume"): 1, ("removed", "network"): 1, ("added", "exec"): 1,
                   ("removed", "exec"): 2, ("conflict", "container"): 1}
    assert metrics.drift([], [], [], [], have, 0) == {}


def test_tenant_gauges_from_the_records():
    g = metrics.tenant_gauges(
        {"container": [TA, TA, TB], "volume": [TA], "network": [TB, TB]},
        {TA: {"memory": "1073741824", "cpus": "1500000000", "containers": "2"}, TB: {"memory": "x"}},
        [{TA: "1"}, {TA: "1", TB: "0", "c" * 32: "2"}])
    assert g["fdcs_tenant_containers"] == {TA: 2, TB: 1}
    assert g["fdcs_tenant_volumes"] == {TA: 1} and g["fdcs_tenant_networks"] == {TB: 2}
    assert g["fdcs_tenant_containers_running"] == {TA: 2, TB: 0, "c" * 32: 2}
    assert g["fdcs_tenant_memory_reserved_bytes"] == {TA: 1073741824}  # TB's is not a number
    assert g["fdcs_tenant_cpus_reserved"] == {TA: 1.5}


def test_host_counts_follow_the_ownership_rule():
    from name_scoper.reconciler import host_counts
    cs = [{"Labels": {TENANT_LABEL: TA}, "ImageLabels": {}, "Running": True, "Name": "x"},
          {"Labels": {TENANT_LABEL: TA}, "ImageLabels": {}, "Running": False, "Name": "y"},
          # inherited from its image: nobody's
          {"Labels": {TENANT_LABEL: TB}, "ImageLabels": {TENANT_LABEL: TB}, "Running": True, "Name": "z"},
          {"Labels": {}, "ImageLabels": {}, "Running": True, "Name": "admin"}]
    assert host_counts(cs) == {TA: (2, 1)}


# -- the plugin's hooks --------------------------------------------------------------------

def test_decisions_are_counted_whatever_the_log_level(active, store):
    from authz_plugin.policy import Authorizer
    m = active("plugin")
    authz = Authorizer(cfg(), FakeIdentityService(), store)
    audit_log = logging.getLogger("fdcs.audit")
    old = audit_log.level
    audit_log.setLevel(logging.WARNING)  # no audit lines: the metrics must not depend on them
    try:
        assert authz.authz_request(payload("GET", "/v1.41/info"))["Allow"] is True
        assert authz.authz_request(payload("GET", "/v1.41/containers/json", token="tok-admin"))["Allow"]
        assert authz.authz_request(payload("GET", "/v1.41/info", token=None))["Allow"] is False
        # the same list the administrator got, unfiltered for a tenant
        assert authz.authz_request(payload("GET", "/v1.41/containers/json"))["Allow"] is False
    finally:
        audit_log.setLevel(old)
    r = m.registry
    name = "fdcs_authz_decisions_total"
    assert value(r, name, hook="request", result="allow", reason="ok") == 1
    assert value(r, name, hook="request", result="allow", reason="admin") == 1
    assert value(r, name, hook="request", result="deny", reason="authentication") == 1
    assert value(r, name, hook="request", result="deny", reason="policy") == 1
    assert value(r, "fdcs_authz_hook_duration_seconds_count", hook="request") == 4
    assert value(r, "fdcs_authz_hook_duration_seconds_bucket", hook="request", le="1.0") == 4


def test_unreadable_payloads_are_counted_by_the_app(active, store):
    from authz_plugin.app import create_app
    from authz_plugin.policy import Authorizer
    m = active("plugin")
    app = create_app(cfg(), Authorizer(cfg(), FakeIdentityService(), store))
    assert metrics.active() is m  # create_app keeps the set it finds
    client = app.test_client()
    assert client.post("/AuthZPlugin.AuthZReq", data=b"[1,2]").get_json()["Allow"] is False
    assert client.post("/AuthZPlugin.AuthZRes", data=b"junk").get_json()["Allow"] is False
    # positive control: a readable one goes to the authorizer (and is counted there)
    ok = client.post("/AuthZPlugin.AuthZReq", data=json.dumps(payload("GET", "/v1.41/info")))
    assert ok.get_json()["Allow"] is True
    r = m.registry
    assert value(r, "fdcs_authz_decisions_total", hook="request", result="deny", reason="bad-request") == 1
    assert value(r, "fdcs_authz_decisions_total", hook="response", result="deny", reason="bad-request") == 1
    assert value(r, "fdcs_authz_decisions_total", hook="request", result="allow", reason="ok") == 1


def test_identity_events_count_cache_hits_and_misses(active):
    from tests.fakes import FakeClock, FakeKeystone
    from tests.unit.test_identity import make
    m = active("plugin")
    clock = FakeClock()
    with FakeKeystone(clock=clock) as ks:
        demo = ks.add_project("demo")
        alice = ks.add_user("alice")
        ks.assign(alice, demo, "member")
        svc = make(ks, clock)
        token = ks.issue(alice, demo)
        for _ in range(3):
            svc.authenticate({"X-Auth-Token": token})
        with pytest.raises(Exception):
            svc.authenticate({"X-Auth-Token": "not-a-token-" + "x" * 20})
        with pytest.raises(Exception):
            svc.authenticate({"X-Auth-Token": "bad token"})
    r = m.registry
    assert value(r, "fdcs_identity_events_total", event="miss") == 2
    assert value(r, "fdcs_identity_events_total", event="hit") == 2
    assert value(r, "fdcs_identity_events_total", event="rejected") == 1
    assert value(r, "fdcs_identity_events_total", event="malformed") == 1
    assert svc.stats()["hits"] == 2  # the same counts as the service's own


def test_redis_error_hook_and_hooks_never_raise(active, monkeypatch):
    m = active("plugin")
    metrics.redis_error()
    metrics.redis_error()
    assert value(m.registry, "fdcs_redis_errors_total") == 2

    def broken():
        raise RuntimeError("metrics are broken")
    monkeypatch.setattr(metrics, "active", broken)
    metrics.redis_error()  # swallowed: a metrics fault never changes a decision
    metrics.decision("request", True, "ok", 0.001)
    metrics.identity_event("hits")


# -- the per-tenant gauges (the plugin master's collector) -----------------------------------

def _fill(r):
    r.hset("fdcs:own:container", mapping={"c1": TA, "c2": TA, "c3": TB})
    r.hset("fdcs:own:volume", mapping={"v1": TA})
    r.hset("fdcs:own:network", mapping={"n1": TB})
    r.hset(f"fdcs:usage:{TA}", mapping={"memory": 512 * 1024 * 1024, "cpus": 250_000_000, "containers": 2})
    r.hset("fdcs:running:h1", mapping={TA: 1})
    r.hset("fdcs:running:h2", mapping={TA: 1, TB: 1})
    r.set("fdcs:usage:not-a-hash", "x")  # another type under the prefix: skipped, not fatal


def _scrape(collector) -> dict:
    reg = CollectorRegistry()
    reg.register(collector)
    return samples(generate_latest(reg).decode())


def test_tenant_collector_reads_the_store():
    r = fakeredis.FakeRedis(decode_responses=True)
    _fill(r)
    s = _scrape(metrics.TenantCollector(lambda: r, max_age=0))
    t = lambda name, tenant: s.get((name, (("tenant", tenant),)))  # noqa: E731
    assert s[("fdcs_store_up", ())] == 1
    assert (t("fdcs_tenant_containers", TA), t("fdcs_tenant_containers", TB)) == (2, 1)
    assert (t("fdcs_tenant_containers_running", TA), t("fdcs_tenant_containers_running", TB)) == (2, 1)
    assert t("fdcs_tenant_volumes", TA) == 1 and t("fdcs_tenant_networks", TB) == 1
    assert t("fdcs_tenant_memory_reserved_bytes", TA) == 512 * 1024 * 1024
    assert t("fdcs_tenant_cpus_reserved", TA) == 0.25
    assert t("fdcs_tenant_memory_reserved_bytes", TB) is None  # no usage hash: no reserved gauge


class _Down:
    def pipeline(self, **kw):
        import redis
        raise redis.ConnectionError("refused")


def test_tenant_gauges_are_omitted_when_the_store_fails_and_come_back():
    r = fakeredis.FakeRedis(decode_responses=True)
    _fill(r)
    clients = iter([_Down(), r])
    c = metrics.TenantCollector(lambda: next(clients), max_age=0)
    s = _scrape(c)
    assert s[("fdcs_store_up", ())] == 0
    assert not any(name.startswith("fdcs_tenant_") for name, _ in s)
    s = _scrape(c)  # reconnects
    assert s[("fdcs_store_up", ())] == 1 and s[("fdcs_tenant_containers", (("tenant", TA),))] == 2


def test_tenant_gauges_are_bounded_in_time():
    r = fakeredis.FakeRedis(decode_responses=True)
    _fill(r)
    s = _scrape(metrics.TenantCollector(lambda: r, budget=-1, max_age=0))
    assert s[("fdcs_store_up", ())] == 0 and not any(n.startswith("fdcs_tenant_") for n, _ in s)
    s = _scrape(metrics.TenantCollector(lambda: r, budget=2, max_age=0))
    assert s[("fdcs_store_up", ())] == 1


def test_exporter_serves_the_registry_over_http():
    reg = CollectorRegistry()
    from prometheus_client import Counter
    Counter("fdcs_probe", "probe", registry=reg).inc(3)
    exp = metrics.serve(("127.0.0.1", 0), reg)
    try:
        host, port = exp.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=TIMEOUT) as resp:
            assert resp.status == 200
            assert samples(resp.read().decode())[("fdcs_probe_total", ())] == 3
    finally:
        exp.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2)
    assert metrics.serve(None, reg) is None


def test_exporter_refuses_a_taken_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            metrics.Exporter(s.getsockname(), CollectorRegistry())


# -- the plugin's multiprocess mode, through a real fdcs-authz -------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unix_post(path: str, target: str, body: bytes) -> tuple[int, bytes]:
    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(path)
    c = Conn("localhost", timeout=TIMEOUT)
    try:
        c.request("POST", target, body=body)
        resp = c.getresponse()
        return resp.status, resp.read()
    finally:
        c.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the break-glass key file must be owned by root")
def test_fdcs_authz_counts_across_its_workers_and_serves_from_the_master(tmp_path):
    name = f"fdcs-unit-{uuid.uuid4().hex[:8]}"
    key = tmp_path / "admin.key"
    key.write_text(uuid.uuid4().hex * 2)
    key.chmod(0o600)
    port = _free_port()
    sock = tmp_path / "p.sock"
    (tmp_path / "fdcs.toml").write_text(
        '[keystone]\nurl = "http://127.0.0.1:1/v3"\nadmin_project_id = "adm"\n'
        f'admin_key_file = "{key}"\n[redis]\nurl = "redis://127.0.0.1:1/0"\ntimeout = 0.5\n'
        f'[plugin]\nname = "{name}"\nsocket = "{sock}"\nworkers = 2\nmetrics_listen = "127.0.0.1:{port}"\n')
    mdir = Path(metrics.default_multiproc_dir(name, env={}))
    mdir.mkdir(parents=True, mode=0o700)
    (mdir / "counter_1.db").write_bytes(b"stale")  # an earlier run's: removed at start
    env = {k: v for k, v in os.environ.items() if k.upper() != metrics.MULTIPROC_ENV and k != "RUNTIME_DIRECTORY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "authz_plugin.server", "--config", str(tmp_path / "fdcs.toml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> dict:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return samples(resp.read().decode())
    try:
        from authz_plugin.devstack._procs import unix_http
        # the socket file exists from bind(), before listen(): ask, as the engine would
        wait_until(lambda: (unix_http(sock, "POST", "/Plugin.Activate", body=b"") or (0,))[0] == 200,
                   what="the plugin to answer")
        admin = {"X-FDCS-Admin-Key": key.read_text()}
        n = 20
        for _ in range(n):  # spread over both workers by gunicorn
            status, res = _unix_post(str(sock), "/AuthZPlugin.AuthZReq", json.dumps(
                {"RequestMethod": "GET", "RequestUri": "/v1.41/info", "RequestHeaders": admin}).encode())
            assert json.loads(res)["Allow"] is True
        status, res = _unix_post(str(sock), "/AuthZPlugin.AuthZReq", json.dumps(
            {"RequestMethod": "GET", "RequestUri": "/v1.41/info", "RequestHeaders": {}}).encode())
        assert json.loads(res)["Allow"] is False
        # each worker applies its counts from a background thread (metrics.FLUSH_LINGER): poll
        want = {("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "admin"), ("result", "allow"))): n,
                ("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "authentication"),
                                                ("result", "deny"))): 1,
                ("fdcs_identity_events_total", (("event", "admin_key"),)): n}
        wait_until(lambda: (lambda s: all(s.get(k) == v for k, v in want.items()))(scrape()),
                   what="every worker's counts in a scrape")
        s = scrape()
        d = lambda **lab: s.get(("fdcs_authz_decisions_total", tuple(sorted(lab.items()))))  # noqa: E731
        assert d(hook="request", result="allow", reason="admin") == n
        assert d(hook="request", result="deny", reason="authentication") == 1
        assert s[("fdcs_identity_events_total", (("event", "admin_key"),))] == n
        assert s[("fdcs_store_up", ())] == 0  # no Redis at 127.0.0.1:1: the tenant gauges are omitted
        assert not any(k.startswith("fdcs_tenant_") for k, _ in s)
        assert not (mdir / "counter_1.db").exists()
        assert oct(mdir.stat().st_mode & 0o777) == "0o700"
        # the metrics are never on the plugin's socket
        status, res = _unix_post(str(sock), "/metrics", b"")
        assert status == 405 or status == 404, status
        assert b"fdcs_authz" not in res
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(TIMEOUT)
    assert proc.returncode == 0, (tmp_path / "log").read_text()[-2000:]
    assert not mdir.exists()  # removed at exit
    with pytest.raises(OSError):
        scrape()


def test_fdcs_authz_refuses_to_start_when_its_metrics_address_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "fdcs.toml").write_text(
            '[keystone]\nurl = "http://127.0.0.1:1/v3"\nadmin_project_id = "adm"\nadmin_key_file = ""\n'
            '[redis]\nurl = "redis://127.0.0.1:1/0"\n'
            f'[plugin]\nname = "fdcs-unit-{uuid.uuid4().hex[:8]}"\nsocket = "{tmp_path}/p.sock"\n'
            f'metrics_listen = "127.0.0.1:{port}"\n')
        env = {k: v for k, v in os.environ.items() if k.upper() != metrics.MULTIPROC_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        p = subprocess.run([sys.executable, "-m", "authz_plugin.server", "--config", str(tmp_path / "fdcs.toml")],
                           env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "plugin.metrics_listen" in p.stderr
    assert not (tmp_path / "p.sock").exists()  # it never served the engine half-configured


def test_prepare_multiproc_dir(tmp_path):
    given = tmp_path / "given"
    given.mkdir(mode=0o700)
    (given / "gauge_livesum_1.db").write_bytes(b"x")
    env = {metrics.MULTIPROC_ENV: str(given)}
    assert metrics.prepare_multiproc_dir("p", env) == (str(given), False)
    assert not list(given.iterdir())  # cleaned at start
    # a directory others may write to is refused
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError, match="private"):
        metrics.prepare_multiproc_dir("p", {metrics.MULTIPROC_ENV: str(shared)})
    # the default: under systemd's RuntimeDirectory, owned (removed at exit)
    env = {"RUNTIME_DIRECTORY": str(tmp_path / "rt")}
    (tmp_path / "rt").mkdir(mode=0o755)
    path, owned = metrics.prepare_multiproc_dir("fdcs/../x", env)
    assert owned and path == str(tmp_path / "rt" / "metrics" / "fdcs_.._x") and env[metrics.MULTIPROC_ENV] == path
    metrics.remove_multiproc_dir(path, owned)
    assert not os.path.exists(path)
    # a default that cannot be made private falls back to a fresh temporary directory
    (tmp_path / "rt2").mkdir()
    (tmp_path / "rt2").chmod(0o777)
    env = {"RUNTIME_DIRECTORY": str(tmp_path / "rt2")}
    path, owned = metrics.prepare_multiproc_dir("p", env)
    try:
        assert owned and not path.startswith(str(tmp_path / "rt2"))
        assert os.stat(path).st_mode & 0o077 == 0
    finally:
        metrics.remove_multiproc_dir(path, owned)


# -- the scoper ---------------------------------------------------------------------------

class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _engine_handler(release: threading.Event):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status, body=b"{}"):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.startswith("/v1.41/events"):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                line = b'{"status":"start"}\n'
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                release.wait(TIMEOUT)
                self.wfile.write(b"0\r\n\r\n")
            elif self.path.startswith("/v1.41/images/"):
                self._send(404, b'{"message":"no such image"}')
            else:
                self._send(200, b'[{"Id":"x"}]')

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            self._send(201, b'{"Id":"c1"}')
    return H


class _Ident:
    def authenticate(self, headers, source=""):
        from authz_plugin.errors import AuthenticationError
        if {k.lower(): v for k, v in headers.items()}.get("x-auth-token") != "tok":
            raise AuthenticationError("authentication required")
        return SimpleNamespace(project_id=TA, user_name="alice")


def test_scoper_requests_streams_and_bytes(active, tmp_path):
    from name_scoper.proxy import serve
    m = active("scoper")
    release = threading.Event()
    eng = _Engine(str(tmp_path / "engine.sock"), _engine_handler(release))
    threading.Thread(target=eng.serve_forever, daemon=True).start()
    loop = asyncio.new_event_loop()
    lt = threading.Thread(target=loop.run_forever, daemon=True)
    lt.start()
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(TIMEOUT)  # noqa: E731
    srv = run(serve(_Ident(), engine_socket=str(tmp_path / "engine.sock"), ssl_context=None))
    r = m.registry

    def req(method, target, body=None, token="tok"):
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
        try:
            c.request(method, target, body=body, headers={"X-Auth-Token": token} if token else {})
            resp = c.getresponse()
            return resp.status, resp.read()
        finally:
            c.close()
    try:
        assert req("GET", "/v1.41/containers/json")[0] == 200
        assert req("GET", "/v1.41/images/nope/json")[0] == 404
        assert req("GET", "/v1.41/containers/json", token=None)[0] == 401  # answered by the proxy
        body = json.dumps({"Image": "busybox"}).encode()
        assert req("POST", "/v1.41/containers/create", body=body)[0] == 201
        rq = "fdcs_scoper_requests_total"
        # each is counted when it ends (its access-log line), just after its answer
        wait_until(lambda: sum(v for (n, _), v in samples(generate_latest(r).decode()).items() if n == rq) == 4,
                   what="the four requests counted")
        assert value(r, rq, method="write", endpoint="containers", status="2xx") == 1
        assert value(r, rq, method="read", endpoint="containers", status="2xx") == 1
        assert value(r, rq, method="read", endpoint="images", status="4xx") == 1
        assert value(r, rq, method="read", endpoint="containers", status="4xx") == 1
        assert value(r, "fdcs_scoper_request_duration_seconds_count", endpoint="containers") == 3
        assert value(r, "fdcs_scoper_received_bytes_total") == len(body)
        assert value(r, "fdcs_scoper_sent_bytes_total") > 0
        assert value(r, "fdcs_scoper_connections_total") == 4
        # a streamed answer is an open stream while it lasts
        assert value(r, "fdcs_scoper_open_streams", kind="stream") == 0
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
        c.request("GET", "/v1.41/events", headers={"X-Auth-Token": "tok"})
        resp = c.getresponse()
        assert resp.readline() == b'{"status":"start"}\n'
        assert value(r, "fdcs_scoper_open_streams", kind="stream") == 1
        release.set()
        resp.read()
        c.close()
        wait_until(lambda: value(r, "fdcs_scoper_open_streams", kind="stream") == 0, what="the stream closed")
        # counted when the request ends (its access-log line), just after the stream
        wait_until(lambda: value(r, "fdcs_scoper_requests_total", method="read", endpoint="events",
                                 status="2xx") == 1, what="the stream counted")
    finally:
        release.set()
        run(srv.close(1.0))
        loop.call_soon_threadsafe(loop.stop)
        lt.join(TIMEOUT)
        loop.close()
        eng.shutdown()
        eng.server_close()


def test_scoper_refuses_metrics_on_the_tenants_port(tmp_path):
    from name_scoper.server import check
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
                    "-keyout", "key.pem", "-out", "cert.pem"], cwd=tmp_path, check=True, capture_output=True)
    tls = {"scoper.tls_cert": str(tmp_path / "cert.pem"), "scoper.tls_key": str(tmp_path / "key.pem"),
           "scoper.listen": "0.0.0.0:2376"}
    with pytest.raises(ConfigError, match="scoper.metrics_listen"):
        check(cfg(**tls, **{"scoper.metrics_listen": "127.0.0.1:2376"}))
    # positive controls: another port, or none
    assert check(cfg(**tls, **{"scoper.metrics_listen": "127.0.0.1:9465"}))[0] == ("0.0.0.0", 2376)
    assert check(cfg(**tls, **{"scoper.metrics_listen": ""}))[0] == ("0.0.0.0", 2376)


# -- the reconciler -----------------------------------------------------------------------

C1, C2, C3, C4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)


class _API:
    """Enough of docker-py's APIClient for Reconciler.full() and its recount."""

    def __init__(self):
        self.c = {
            C1: {"Name": f"{TA}_web", "Labels": {TENANT_LABEL: TA}, "Image": "img", "Running": True},
            C2: {"Name": f"{TA}_db", "Labels": {TENANT_LABEL: TA}, "Image": "img", "Running": False},
            C3: {"Name": f"{TB}_web", "Labels": {TENANT_LABEL: TB}, "Image": "img", "Running": True},
            # the tenant label came from its image: unowned
            C4: {"Name": "inherited", "Labels": {TENANT_LABEL: TA}, "Image": "labelled", "Running": True},
        }

    def containers(self, all=True, quiet=False, filters=None):
        want = (filters or {}).get("label")
        out = []
        for i, c in self.c.items():
            if want and f"{TENANT_LABEL}={c['Labels'].get(TENANT_LABEL)}" != want:
                continue
            out.append({"Id": i, "Names": ["/" + c["Name"]], "Labels": c["Labels"], "ImageID": c["Image"],
                        "State": "running" if c["Running"] else "exited"})
        return out

    def inspect_container(self, cid):
        c = self.c[cid]
        return {"Id": cid, "Name": "/" + c["Name"], "Image": c["Image"], "Config": {"Labels": c["Labels"]},
                "State": {"Running": c["Running"]}, "ExecIDs": None, "Mounts": []}

    def inspect_image(self, image):
        return {"Config": {"Labels": {TENANT_LABEL: TA} if image == "labelled" else None}}

    def networks(self):
        return []

    def volumes(self):
        return {"Volumes": []}


def test_reconciler_publishes_running_counts_and_drift(active):
    from name_scoper.reconciler import Reconciler
    m = active("reconciler")
    r = fakeredis.FakeRedis(decode_responses=True)
    store = Store(r, host="h1")
    r.hset("fdcs:running:h1", mapping={"c" * 32: 5})  # a stale tenant: the full pass drops it
    api = _API()
    rec = Reconciler(SimpleNamespace(api=api), store)
    counts = rec.full()
    assert counts["added"] == 3
    assert r.hgetall("fdcs:running:h1") == {TA: "1", TB: "1"}
    assert m.host_tenants.snapshot() == {TA: (2, 1), TB: (1, 1)}
    reg = m.registry
    assert value(reg, "fdcs_reconciler_drift_total", change="added", kind="container") == 3
    assert value(reg, "fdcs_reconciler_passes_total", result="ok") == 1
    assert value(reg, "fdcs_reconciler_unowned") == 1
    assert value(reg, "fdcs_reconciler_last_pass_timestamp_seconds") > 0
    assert value(reg, "fdcs_host_tenant_containers", tenant=TA) == 2
    assert value(reg, "fdcs_host_tenant_containers_running", tenant=TA) == 1

    # drift: C3's record is re-owned behind the reconciler's back
    store.add("container", C3, TA, f"{TB}_web")
    rec.full()
    assert value(reg, "fdcs_reconciler_drift_total", change="reowned", kind="container") == 1
    assert value(reg, "fdcs_reconciler_drift_total", change="added", kind="container") == 3

    # events: C2 starts, then C1 and C2 die
    api.c[C2]["Running"] = True
    rec.on_event({"Type": "container", "Action": "start", "Actor": {"ID": C2, "Attributes": {TENANT_LABEL: TA}}})
    rec.flush()  # events mark their tenant; one recount per tenant and period
    assert r.hget("fdcs:running:h1", TA) == "2"
    assert value(reg, "fdcs_host_tenant_containers_running", tenant=TA) == 2
    api.c[C1]["Running"] = api.c[C2]["Running"] = False
    for cid in (C1, C2):
        rec.on_event({"Type": "container", "Action": "die", "Actor": {"ID": cid, "Attributes": {TENANT_LABEL: TA}}})
    rec.flush()
    assert r.hget("fdcs:running:h1", TA) is None and r.hget("fdcs:running:h1", TB) == "1"
    assert value(reg, "fdcs_host_tenant_containers_running", tenant=TA) == 0
    assert value(reg, "fdcs_host_tenant_containers", tenant=TA) == 2
    # destroy: the tenant's gauges go when its last container does
    for cid in (C1, C2):
        del api.c[cid]
        rec.on_event({"Type": "container", "Action": "destroy", "Actor": {"ID": cid, "Attributes": {TENANT_LABEL: TA}}})
    rec.flush()
    assert value(reg, "fdcs_host_tenant_containers", tenant=TA) is None
    assert value(reg, "fdcs_host_tenant_containers", tenant=TB) == 1


def test_a_failed_pass_is_counted(active):
    from name_scoper.reconciler import Reconciler

    class Broken(Store):
        def records(self, kind):
            raise StoreUnavailable("ownership store unavailable, retry")
    m = active("reconciler")
    rec = Reconciler(SimpleNamespace(api=_API()), Broken(fakeredis.FakeRedis(decode_responses=True), host="h1"))
    with pytest.raises(StoreUnavailable):
        rec.full()
    assert value(m.registry, "fdcs_reconciler_passes_total", result="error") == 1
    assert value(m.registry, "fdcs_reconciler_passes_total", result="ok") == 0


def test_retire_host_drops_its_running_counts(tmp_path, monkeypatch, capsys):
    from name_scoper import reconciler
    r = fakeredis.FakeRedis(decode_responses=True)
    r.hset("fdcs:running:h9", mapping={TA: 3})
    r.hset("fdcs:running:h1", mapping={TA: 1})
    monkeypatch.setattr(reconciler.Store, "from_config", classmethod(lambda cls, c: cls(r, host=c["host.id"])))
    conf = tmp_path / "fdcs.toml"
    conf.write_text('[keystone]\nurl = "http://127.0.0.1:1/v3"\nadmin_project_id = "a"\n'
                    '[redis]\nurl = "redis://127.0.0.1:1/0"\n')
    assert reconciler.main(["--config", str(conf), "--retire-host", "h9"]) == 0
    assert not r.exists("fdcs:running:h9") and r.hget("fdcs:running:h1", TA) == "1"


# -- the local stack's wiring --------------------------------------------------------------

def test_devstack_status_line_shows_the_metrics_url():
    from authz_plugin.devstack._stack import ComponentStatus
    line = str(ComponentStatus("authz-h1", True, 12, "unix:///x.sock", "http://127.0.0.1:5/metrics"))
    assert line == "authz-h1 up pid=12 addr=unix:///x.sock metrics=http://127.0.0.1:5/metrics"
    assert str(ComponentStatus("redis", True, 3, "redis://127.0.0.1:6/0")) == "redis up pid=3 addr=redis://127.0.0.1:6/0"


def test_devstack_gives_each_host_its_own_metrics_ports(tmp_path):
    from authz_plugin.devstack._stack import Stack, _metrics_listen
    from authz_plugin.devstack._state import State
    stack = Stack(tmp_path / "st")
    stack.layout.root.mkdir()
    state = State(stack.layout.state_file)
    state["ports"] = {"redis": 1, "keystone": 2}
    stack._metrics_ports(state, 2)
    ports = state["ports"]
    mine = {k: v for k, v in ports.items() if k.startswith("metrics-")}
    assert {"metrics-authz-h1", "metrics-reconciler-h2"} <= set(mine)
    assert len(set(ports.values())) == len(ports)  # all distinct
    before = dict(ports)
    stack._metrics_ports(state, 2)  # kept
    assert state["ports"] == before
    h1 = stack.layout.host(1)
    assert _metrics_listen(ports, "authz", h1) == f"127.0.0.1:{ports['metrics-authz-h1']}"
    assert _metrics_listen({}, "authz", h1) == ""  # never the fixed defaults


def test_scoper_request_steps_are_applied_by_a_scrape_or_when_many_wait(active, monkeypatch):
    m = active("scoper")
    r = m.registry
    rq = "fdcs_scoper_requests_total"
    metrics.scoper_request("GET", "/v1.41/containers/web/json", 200, 0.002, 0, 10)
    metrics.scoper_request("GET", "/v1.41/containers/web/json", 200, 0.004, 0, 5)
    metrics.scoper_request("POST", "/v1.41/containers/create", 404, None, 7, 0)
    metrics.identity_event("hits")
    assert len(m.pending) == 4  # queued, not applied on the request path
    # a scrape applies what waits before it collects: nothing is missed
    assert value(r, rq, method="read", endpoint="containers", status="2xx") == 2
    assert value(r, rq, method="write", endpoint="containers", status="4xx") == 1
    assert value(r, "fdcs_scoper_request_duration_seconds_count", endpoint="containers") == 2
    assert value(r, "fdcs_scoper_request_duration_seconds_sum", endpoint="containers") == pytest.approx(0.006)
    assert value(r, "fdcs_scoper_request_duration_seconds_bucket", endpoint="containers", le="0.0025") == 1
    assert value(r, "fdcs_scoper_received_bytes_total") == 7
    assert value(r, "fdcs_scoper_sent_bytes_total") == 15
    assert value(r, "fdcs_identity_events_total", event="hit") == 1
    assert not m.pending
    # without a scrape, the request path applies them once SCOPER_PENDING_MAX wait
    monkeypatch.setattr(metrics, "SCOPER_PENDING_MAX", 4)
    child = m.request_children[("read", "containers", "2xx")]
    for _ in range(3):
        metrics.scoper_request("GET", "/v1.41/containers/json", 200, 0.001, 0, 0)
    assert child._value.get() == 2 and len(m.pending) == 3
    metrics.scoper_request("GET", "/v1.41/containers/json", 200, 0.001, 0, 0)
    assert child._value.get() == 6 and not m.pending
