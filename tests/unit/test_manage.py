"""fdcs-manage on fakes: fakeredis, a fake Keystone over HTTP (with the
project directory an administrator reads) and fake engines.

Covers argument parsing, tables and JSON, the error cases (unknown tenant,
bad size, unreachable Redis or Keystone, no terminal for a confirmation),
the pure parts (adoption rules, orphans, stats, audit lines) and the audit
stream writer.  The real stack runs the same commands in
tests/e2e/test_manage.py.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import docker.errors
import fakeredis
import pytest

from authz_plugin import audit, audit_stream, rules
from authz_plugin.config import load
from authz_plugin.errors import ConfigError, Denied
from authz_plugin.manage import _adopt, _audit, _cli, _engines, _host_cmds
from authz_plugin.manage._site import Site
from authz_plugin.manage._tenants import Directory
from authz_plugin.ownership import Store
from authz_plugin.quota import NANO, QuotaPolicy, QuotaStore
from authz_plugin.scoping import TENANT_LABEL
from name_scoper import reconcile
from tests.fakes import FakeKeystone
from tests.fakes import keystone as fake_keystone

ADMIN_PW = "admin-secret"
GIB = 1024**3


# -- a fake Keystone that also lists projects (GET /v3/projects[/ID]) ----------------------


class _DirectoryHandler(fake_keystone._Handler):
    def _handle(self):
        ks = self.keystone
        u = urlsplit(self.path)
        path = u.path.rstrip("/")
        if self.command != "GET" or ks.fail is not None or not path.startswith("/v3/projects"):
            return super()._handle()
        with ks._lock:
            ks.calls.append((self.command, path))
        t = ks._live(self.headers.get("X-Auth-Token"))
        if t is None:
            return self._send(401, fake_keystone._error(401, "The request you have made requires authentication."))
        if t.project_id != ks.admin_project or "admin" not in ks._project_roles(t):
            return self._send(403, fake_keystone._error(403, "You are not authorized."))
        if path == "/v3/projects":
            name = parse_qs(u.query).get("name", [None])[0]
            return self._send(200, {"projects": [p for p in ks.projects.values() if name in (None, p["name"])]})
        pid = path.rsplit("/", 1)[1]
        if pid not in ks.projects:
            return self._send(404, fake_keystone._error(404, f"Could not find project: {pid}."))
        return self._send(200, {"project": ks.projects[pid]})

    do_GET = do_POST = do_HEAD = do_DELETE = _handle


class DirectoryKeystone(FakeKeystone):
    """FakeKeystone plus the project directory (what a site administrator reads)."""

    admin_project = ""

    def start(self):
        fake = self

        class Handler(_DirectoryHandler):
            keystone = fake

        self._stopping.clear()
        self._server = fake_keystone._Server(("127.0.0.1", self._port), Handler)
        self._port = self._server.server_address[1]
        self._server.daemon_threads = True
        import threading
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self


@pytest.fixture(scope="module")
def keystone():
    with DirectoryKeystone() as ks:
        admin = ks.add_project("admin")
        ks.admin_project = admin
        uid = ks.add_user("admin", ADMIN_PW)
        ks.assign(uid, admin, "admin")
        ks.ta = ks.add_project("tenant-a", "a" * 32)
        ks.tb = ks.add_project("tenant-b", "b" * 32)
        ks.add_project("twin", "c" * 32)
        ks.add_project("twin", "d" * 32, domain_id=ks.add_domain("other"))
        yield ks


TA, TB = "a" * 32, "b" * 32
GONE_T = "e" * 32  # a tenant Keystone no longer knows


# -- fake engines -----------------------------------------------------------------------------


class FakeEngine:
    """The docker-py calls fdcs-manage makes, on an in-memory engine."""

    def __init__(self, cgroup_version="1"):
        self.api = self
        self.containers_ = {}  # id -> inspect
        self.networks_ = {}
        self.volumes_ = {}
        self.stopped, self.removed = [], []
        self.down = False
        self.cgroup_version = cgroup_version

    def _up(self):
        if self.down:
            import requests
            raise requests.ConnectionError("refused")

    def add_container(self, cid, name, labels=None, running=True, **hc):
        host_config = {"NetworkMode": "none", "PidsLimit": 100, "MaskedPaths": list(_adopt.DEFAULT_MASKED_PATHS),
                       "ReadonlyPaths": list(_adopt.DEFAULT_READONLY_PATHS), "CgroupnsMode": "private",
                       "IpcMode": "private", "Runtime": "runc", "ShmSize": 67108864, "ConsoleSize": [0, 0],
                       "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m"}}, "Devices": [], "OomKillDisable": False}
        host_config.update(hc)
        self.containers_[cid] = {"Id": cid, "Name": "/" + name, "Image": "sha256:img",
                                 "Config": {"Image": "busybox", "Cmd": ["sleep", "1"], "Labels": labels or {}},
                                 "HostConfig": host_config, "State": {"Running": running},
                                 "NetworkSettings": {"Networks": {"none": {"IPAMConfig": None, "NetworkID": "x",
                                                                          "EndpointID": "y"}}},
                                 "Mounts": [], "ExecIDs": None}

    def ping(self):
        self._up()
        return True

    def info(self):
        return {"CgroupVersion": self.cgroup_version}

    @staticmethod
    def _match(labels, filters):
        want = (filters or {}).get("label") or []
        return all((labels or {}).get(k) == v for k, _, v in (w.partition("=") for w in want))

    def containers(self, all=False, filters=None, quiet=False):
        self._up()
        out = []
        for c in self.containers_.values():
            if not all and not c["State"]["Running"]:
                continue
            if not self._match(c["Config"]["Labels"], filters):
                continue
            if filters and "volume" in filters and filters["volume"] not in [m.get("Name") for m in c["Mounts"]]:
                continue
            out.append({"Id": c["Id"], "Names": [c["Name"]], "State": "running" if c["State"]["Running"] else "exited",
                        "Labels": c["Config"]["Labels"]})
        return out

    def inspect_container(self, ref):
        self._up()
        for c in self.containers_.values():
            if ref in (c["Id"], c["Name"][1:]):
                return copy.deepcopy(c)
        raise docker.errors.NotFound(f"No such container: {ref}")

    def inspect_image(self, ref):
        return {"Config": {"Labels": {}}}

    def inspect_network(self, ref):
        for n in self.networks_.values():
            if ref in (n["Id"], n["Name"]):
                return copy.deepcopy(n)
        raise docker.errors.NotFound(f"network {ref} not found")

    def inspect_volume(self, ref):
        if ref in self.volumes_:
            return copy.deepcopy(self.volumes_[ref])
        raise docker.errors.NotFound(f"get {ref}: no such volume")

    def networks(self, filters=None):
        self._up()
        return [n for n in self.networks_.values() if self._match(n.get("Labels"), filters)]

    def volumes(self, filters=None):
        self._up()
        return {"Volumes": [v for v in self.volumes_.values() if self._match(v.get("Labels"), filters)]}

    def stats(self, cid, stream=True):
        assert stream is False
        return {"cpu_stats": {"cpu_usage": {"total_usage": 3 * NANO}, "system_cpu_usage": 100 * NANO, "online_cpus": 2},
                "precpu_stats": {"cpu_usage": {"total_usage": 2 * NANO}, "system_cpu_usage": 90 * NANO},
                "memory_stats": {"usage": 50 * 2**20, "limit": 256 * 2**20, "stats": {"total_inactive_file": 2**20}}}

    def stop(self, cid, timeout=10):
        self._up()
        self.containers_[cid]["State"]["Running"] = False
        self.stopped.append(cid)

    def remove_container(self, cid, force=False, v=False):
        self._up()
        assert force
        self.removed.append(("container", cid))
        del self.containers_[cid]

    def remove_volume(self, name, force=False):
        self._up()
        self.removed.append(("volume", name))
        del self.volumes_[name]

    def remove_network(self, nid):
        self._up()
        self.removed.append(("network", nid))
        del self.networks_[nid]


# -- the world --------------------------------------------------------------------------------


class World:
    def __init__(self, keystone, quota=True, env=None, **overrides):
        self.server = fakeredis.FakeServer()
        self.r = fakeredis.FakeRedis(server=self.server, decode_responses=True)
        opts = {"keystone.url": keystone.url if keystone else "http://127.0.0.1:1/v3",
                "keystone.admin_project_id": keystone.admin_project if keystone else "admin",
                "keystone.timeout": 2.0,
                "redis.url": "redis://127.0.0.1:1/0", "host.id": "h1", "quota.enabled": quota,
                "manage.engines": {"h1": "unix:///nowhere/h1.sock", "h2": "unix:///nowhere/h2.sock"}}
        opts.update(overrides)
        self.cfg = load(None, env={}, overrides=opts)
        self.engines = {"h1": FakeEngine(), "h2": FakeEngine()}
        self.env = {"OS_PASSWORD": ADMIN_PW} if env is None else env
        self.sleeps = []

    def site(self):
        s = Site(self.cfg, redis_client=self.r, directory=Directory(self.cfg, self.env),
                 engine_factory=lambda h: self.engines[h], env=self.env)
        s.sleep = self.sleeps.append  # suspend waits for the plugins' cache bound: no time passes here
        return s

    def store(self, host="h1"):
        return Store(self.r, host=host)

    def run(self, *argv, stdin=None):
        """fdcs-manage ARGV on this world: (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        rc = _cli.run(list(argv), env={}, site=self.site(), stdin=stdin or io.StringIO(), stdout=out, stderr=err)
        return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def world(keystone):
    return World(keystone)


def own_container(w, host, cid, tenant, name, running=True, memory=0):
    w.engines[host].add_container(cid, name, {TENANT_LABEL: tenant}, running=running, Memory=memory)
    w.store(host).add("container", cid, tenant, name)
    QuotaStore(w.r, QuotaPolicy.from_config(w.cfg), host).sync({}, {f"container/{cid}": (tenant, (1, memory, 0, 0, 0))})


# -- parsing ---------------------------------------------------------------------------------


def test_parser_reads_every_command_and_json_anywhere():
    p = _cli.parser()
    a = p.parse_args(["quota", "set", "tenant-a", "--memory", "1g", "--cpus", "unlimited", "--json"])
    assert (a.tenant, a.memory, a.cpus, a.containers, a.json) == ("tenant-a", "1g", "unlimited", None, True)
    a = p.parse_args(["--json", "tenants"])
    assert a.json is True and a.fn is _cli._tenant_cmds.cmd_tenants
    a = p.parse_args(["quota", "clear", "t", "--memory"])
    assert a.memory is True and a.cpus is False
    a = p.parse_args(["audit", "--tenant", "t", "-n", "5", "--follow"])
    assert (a.tenant, a.n, a.follow) == ("t", 5, True)
    a = p.parse_args(["tenant", "purge", "t", "--yes", "--force"])
    assert a.yes and a.force
    a = p.parse_args(["adopt", "abc", "t", "--host", "h2", "--kind", "volume"])
    assert (a.resource, a.tenant, a.host, a.kind) == ("abc", "t", "h2", "volume")
    for bad in (["quota", "set"], ["usage"], ["host"], ["tenant", "explode", "t"], ["adopt", "x", "t", "--kind", "image"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2


def test_main_module_runs_as_a_script(tmp_path):
    p = subprocess.run([sys.executable, "-m", "authz_plugin.manage", "--config", str(tmp_path / "none.toml"),
                        "tenants"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.startswith("fdcs-manage: configuration file") and "does not exist" in p.stderr
    ok = subprocess.run([sys.executable, "-m", "authz_plugin.manage", "--help"], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "tenants" in ok.stdout  # positive control


# -- configuration --------------------------------------------------------------------------


def test_engines_option_table_env_and_default():
    base = {"keystone.url": "http://k/v3", "keystone.admin_project_id": "a", "redis.url": "redis://r"}
    cfg = load(None, env={"FDCS_MANAGE_ENGINES": "h1=unix:///run/a.sock, h2=tcp://10.0.0.2:2375"}, overrides=base)
    assert cfg["manage.engines"] == {"h1": "unix:///run/a.sock", "h2": "tcp://10.0.0.2:2375"}
    cfg = load(None, env={}, overrides={**base, "host.id": "hx", "reconciler.engine_socket": "/run/x.sock"})
    assert _engines.engine_urls(cfg) == {"hx": "unix:///run/x.sock"}
    for bad, why in (({"h1": "/run/a.sock"}, "expected unix:///PATH"), ({"bad host": "unix:///a"}, "host id"),
                     ("h1", "expected host=URL")):
        with pytest.raises(ConfigError, match=why):
            load(None, env={}, overrides={**base, "manage.engines": bad})
    with pytest.raises(ConfigError, match="audit_stream_maxlen"):
        load(None, env={}, overrides={**base, "plugin.audit_stream_maxlen": -1})


def test_a_host_without_engine_is_named(world):
    w = world
    w.store("h3").add("container", "c" * 64, TA, "x")
    rc, out, err = w.run("adopt", "whatever", TA, "--host", "h3")
    assert rc == 1 and "host h3 has no engine in manage.engines: run fdcs-manage on that host" in err
    rc, out, err = w.run("adopt", "whatever", TA, "--host", "h1")  # a configured host: searched
    assert rc == 1 and "no container, network or volume 'whatever' on host(s) h1" in err


# -- tenants, names, errors ----------------------------------------------------------------


def test_tenants_table_and_json(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web", memory=GIB)
    own_container(w, "h2", "2" * 64, TB, "b_db")
    w.store("h2").suspend(TB, "ops", "unpaid")
    QuotaStore(w.r, QuotaPolicy.from_config(w.cfg), "h1").set_limits(GONE_T, {"containers": 3})
    rc, out, err = w.run("tenants")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "CONTAINERS", "MEMORY", "CPUS", "VOLUMES", "NETWORKS", "SUSPENDED"]
    row = {l.split()[0]: l.split() for l in lines[1:]}
    assert row[TA][1:5] == ["tenant-a", "1", "1", "GiB"] and row[TA][-1] == "no"
    assert row[TB][1] == "tenant-b" and row[TB][-1] == "yes"
    assert GONE_T in row and "(not in Keystone)" in out
    rc, out, err = w.run("tenants", "--json")
    data = {r["id"]: r for r in json.loads(out)}
    assert data[TA]["memory"] == GIB and data[TA]["name"] == "tenant-a" and data[TB]["suspended"] is True


def test_tenant_by_name_by_id_unknown_and_ambiguous(world):
    w = world
    rc, out, err = w.run("quota", "show", "tenant-b")
    assert rc == 0 and f"tenant-b ({TB})" in out
    rc, out, err = w.run("quota", "show", TB)
    assert rc == 0 and f"tenant-b ({TB})" in out
    rc, out, err = w.run("quota", "show", "no-such-project")
    assert rc == 1 and err.startswith("fdcs-manage: unknown tenant 'no-such-project'") and out == ""
    rc, out, err = w.run("quota", "show", "twin")
    assert rc == 1 and "several projects are named 'twin'" in err and "use the project id" in err


def test_unreachable_keystone_ids_work_names_do_not(keystone, monkeypatch):
    w = World(keystone, **{"keystone.url": "http://127.0.0.1:9/v3"})  # nothing listens on port 9
    own_container(w, "h1", "1" * 64, TA, "a_web")
    rc, out, err = w.run("quota", "show", TA)  # an id: works without Keystone
    assert rc == 0 and TA in out, err
    rc, out, err = w.run("quota", "show", "tenant-a")
    assert rc == 1 and "identity service unavailable: use the project id" in err
    rc, out, err = w.run("tenants")  # names are best effort
    assert rc == 0 and TA in out and "warning: project names unavailable" in err


def test_missing_keystone_credentials_are_explained(keystone):
    w = World(keystone, env={})
    rc, out, err = w.run("quota", "show", "tenant-a")
    assert rc == 1 and "no Keystone credentials for fdcs-manage" in err and "use the project id" in err
    w2 = World(keystone, env={"OS_PASSWORD": "wrong"})
    rc, out, err = w2.run("quota", "show", "tenant-a")
    assert rc == 1 and "wrong user name or password" in err
    rc, out, err = World(keystone).run("quota", "show", "tenant-a")
    assert rc == 0  # positive control


def test_password_file_must_be_private(keystone, tmp_path):
    f = tmp_path / "pw"
    f.write_text(ADMIN_PW + "\n")
    f.chmod(0o644)
    w = World(keystone, env={}, **{"manage.keystone_password_file": str(f)})
    rc, out, err = w.run("quota", "show", "tenant-a")
    assert rc == 1 and "chmod 600" in err
    f.chmod(0o600)
    rc, out, err = w.run("quota", "show", "tenant-a")
    assert rc == 0, err


def test_unreachable_redis_is_a_clear_error(keystone):
    w = World(keystone, **{"redis.url": "redis://:secretpw@127.0.0.1:9/0", "redis.timeout": 0.5})
    rc, out, err = Site_run(w, "tenants")
    assert rc == 1
    assert "fdcs-manage: the ownership store (Redis at redis://127.0.0.1:9/0) is unavailable" in err
    assert "secretpw" not in err
    assert w.run("tenants")[0] == 0  # positive control: the same world on a Redis that answers


def Site_run(w, *argv):
    """Run with the site's own Redis client (from the configuration)."""
    out, err = io.StringIO(), io.StringIO()
    site = Site(w.cfg, directory=Directory(w.cfg, w.env), engine_factory=lambda h: w.engines[h], env=w.env)
    rc = _cli.run(list(argv), env={}, site=site, stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


# -- quota ------------------------------------------------------------------------------------


def test_quota_set_show_clear(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web", memory=GIB // 2)
    rc, out, err = w.run("quota", "set", "tenant-a", "--memory", "2g", "--containers", "4", "--cpus", "1.5")
    assert rc == 0, err
    row = {l.split()[0]: l.split() for l in out.splitlines()[2:]}
    assert row["memory"] == ["memory", "2", "GiB", "own", "512", "MiB", "25%"]
    assert row["containers"][1:] == ["4", "own", "1", "25%"]
    assert row["cpus"][1:3] == ["1.5", "own"] and row["volumes"][1:3] == ["unlimited", "default"]
    rc, out, err = w.run("--json", "quota", "show", TA)
    m = json.loads(out)["metrics"]
    assert m["memory"] == {"limit": 2 * GIB, "source": "own", "used": GIB // 2, "percent": 25.0}
    assert m["cpus"]["limit"] == 1_500_000_000
    rc, out, err = w.run("quota", "set", TA, "--memory", "unlimited")
    assert rc == 0 and json.loads(w.run("--json", "quota", "show", TA)[1])["metrics"]["memory"]["limit"] == -1
    rc, out, err = w.run("quota", "clear", TA, "--containers")
    m = json.loads(w.run("--json", "quota", "show", TA)[1])["metrics"]
    assert m["containers"]["source"] == "default" and m["cpus"]["source"] == "own"
    w.run("quota", "clear", TA)
    m = json.loads(w.run("--json", "quota", "show", TA)[1])["metrics"]
    assert all(v["source"] == "default" for v in m.values())


@pytest.mark.parametrize("flag,value,why", [("--memory", "12q", "bad value for --memory: expected a size"),
                                            ("--cpus", "lots", "bad value for --cpus: expected a number of CPUs"),
                                            ("--containers", "-3", "bad value for --containers"),
                                            ("--volumes", "1.5", "bad value for --volumes")])
def test_quota_set_refuses_bad_values(world, flag, value, why):
    rc, out, err = world.run("quota", "set", "tenant-a", flag, value)
    assert rc == 2 and err.startswith("fdcs-manage: " + why), err
    assert world.r.exists(f"fdcs:quota:{TA}") == 0
    rc, out, err = world.run("quota", "set", "tenant-a", flag, "7")  # positive control
    assert rc == 0 and world.r.exists(f"fdcs:quota:{TA}") == 1


def test_quota_set_needs_a_limit(world):
    rc, out, err = world.run("quota", "set", "tenant-a")
    assert rc == 2 and "needs at least one of" in err


def test_quota_commands_warn_when_quotas_are_off(keystone):
    w = World(keystone, quota=False)
    rc, out, err = w.run("quota", "set", "tenant-a", "--containers", "3")
    assert rc == 0 and "warning: quotas are not enforced: quota.enabled is false" in err
    rc, out, err = World(keystone).run("quota", "set", "tenant-a", "--containers", "3")
    assert rc == 0 and "not enforced" not in err  # positive control


def test_flavors(keystone):
    w = World(keystone, **{"quota.flavors": {"small": "256m,0.5", "large": "1g,2"}, "quota.flavor_required": True,
                           "quota.default_flavor": "small"})
    rc, out, err = w.run("flavors")
    assert rc == 0
    assert [l.split() for l in out.splitlines()[:3]] == [["FLAVOR", "MEMORY", "CPUS", "DEFAULT"],
                                                        ["small", "256", "MiB", "0.5", "yes"],
                                                        ["large", "1", "GiB", "2", "-"]]
    data = json.loads(w.run("flavors", "--json")[1])
    assert data["required"] is True and data["flavors"][1] == {"name": "large", "memory": GIB, "cpus": 2 * NANO}


# -- usage ------------------------------------------------------------------------------------


def test_stats_usage_is_the_docker_cli_measure():
    s = FakeEngine().stats("x", stream=False)
    assert _engines.stats_usage(s) == {"cpu_percent": 20.0, "memory": 49 * 2**20, "memory_limit": 256 * 2**20}
    v2 = {"cpu_stats": {}, "precpu_stats": {}, "memory_stats": {"usage": 100, "stats": {"inactive_file": 40}}}
    assert _engines.stats_usage(v2) == {"cpu_percent": 0.0, "memory": 60, "memory_limit": 0}


def test_usage_shows_quota_resources_and_live_use(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web", memory=GIB)
    own_container(w, "h2", "2" * 64, TA, "a_off", running=False)
    w.store("h3").add("container", "3" * 64, TA, "a_far")
    rc, out, err = w.run("usage", "tenant-a")
    assert rc == 0, err
    assert "Resources: 3 container(s)" in out
    live = [l.split() for l in out.splitlines() if l.startswith(("h1 ", "h2 ", "TOTAL"))]
    assert live[0][:5] == ["h1", "1" * 12, "a_web", "running", "20.00"]
    assert live[1][:5] == ["h2", "2" * 12, "a_off", "exited", "-"]
    assert live[2][:6] == ["TOTAL", "-", "-", "1", "running", "20.00"]
    assert "host h3 has no engine in manage.engines" in err
    data = json.loads(w.run("usage", TA, "--json")[1])
    assert data["live_total"] == {"cpu_percent": 20.0, "memory": 49 * 2**20}
    assert data["quota"]["memory"]["used"] == GIB


# -- suspend, resume, purge ----------------------------------------------------------------------


def test_suspend_stops_the_tenants_running_containers_only(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web")
    own_container(w, "h2", "2" * 64, TA, "a_db")
    own_container(w, "h1", "3" * 64, TB, "b_web")
    rc, out, err = w.run("tenant", "suspend", "tenant-a", "--reason", "unpaid bill")
    assert rc == 0, err
    assert w.store().suspended()[TA]["reason"] == "unpaid bill"
    from authz_plugin.policy import SUSPENSION_TTL
    assert w.sleeps and w.sleeps[0] >= SUSPENSION_TTL  # waited for the plugins' cache bound
    assert w.engines["h1"].stopped == ["1" * 64] and w.engines["h2"].stopped == ["2" * 64]
    assert "Stopped 2 running container(s)" in out and TB not in w.store().suspended()
    rc, out, err = w.run("tenant", "resume", TA)
    assert rc == 0 and TA not in w.store().suspended() and "stay stopped" in out
    rc, out, err = w.run("--json", "tenant", "resume", TA)
    assert json.loads(out)["was_suspended"] is False


def test_suspend_reports_hosts_it_cannot_reach(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web")
    own_container(w, "h2", "2" * 64, TA, "a_db")
    w.engines["h2"].down = True
    rc, out, err = w.run("tenant", "suspend", TA)
    assert rc == 1 and "engine of host h2" in err and "unreachable" in err
    assert TA in w.store().suspended() and w.engines["h1"].stopped == ["1" * 64]


def _tenant_everywhere(w, tenant):
    own_container(w, "h1", "1" * 64, tenant, "x_web")
    w.engines["h1"].volumes_["x_data"] = {"Name": "x_data", "Labels": {TENANT_LABEL: tenant}}
    w.store("h1").add("volume", "x_data", tenant)
    w.engines["h2"].networks_["n" * 64] = {"Id": "n" * 64, "Name": "x_net", "Labels": {TENANT_LABEL: tenant}}
    w.store("h2").add("network", "n" * 64, tenant, "x_net")
    w.store("h1").add_exec("e" * 64, tenant, "1" * 64)
    QuotaStore(w.r, QuotaPolicy.from_config(w.cfg), "h1").set_limits(tenant, {"containers": 9})


def test_purge_refuses_a_live_project_and_without_confirmation(world):
    w = world
    _tenant_everywhere(w, TA)
    rc, out, err = w.run("tenant", "purge", "tenant-a", "--yes")
    assert rc == 1 and "still exists in Keystone" in err and "--force" in err
    rc, out, err = w.run("tenant", "purge", "tenant-a", "--force")  # stdin is not a terminal
    assert rc == 2 and "needs a confirmation" in err and "--yes" in err
    assert w.store().owner("container", "1" * 64) == TA and not w.engines["h1"].removed


def test_purge_of_a_deleted_project_removes_everything(world):
    w = world
    _tenant_everywhere(w, GONE_T)
    own_container(w, "h1", "9" * 64, TB, "b_web")
    rc, out, err = w.run("--json", "tenant", "purge", GONE_T, "--yes")
    assert rc == 0, err
    data = json.loads(out)
    assert data["purged"] is True and data["execs_removed"] == 1
    assert sorted(w.engines["h1"].removed) == [("container", "1" * 64), ("volume", "x_data")]
    assert w.engines["h2"].removed == [("network", "n" * 64)]
    store = w.store()
    assert all(store.owner(k, i) is None for k, i in (("container", "1" * 64), ("volume", "x_data"),
                                                      ("network", "n" * 64), ("exec", "e" * 64)))
    assert not w.r.exists(f"fdcs:quota:{GONE_T}") and not w.r.exists(f"fdcs:usage:{GONE_T}")
    assert w.sleeps and GONE_T not in store.suspended()  # suspended while it ran, not after
    assert store.owner("container", "9" * 64) == TB and "9" * 64 in w.engines["h1"].containers_


def test_purge_needs_every_engine(world):
    w = world
    _tenant_everywhere(w, GONE_T)
    w.engines["h2"].down = True
    rc, out, err = w.run("tenant", "purge", GONE_T, "--yes")
    assert rc == 1 and "a purge must see every engine" in err and "h2: engine of host h2" in err
    assert not w.engines["h1"].removed and GONE_T not in w.store().suspended()


def test_a_failed_purge_leaves_the_tenant_suspended(world):
    w = world
    _tenant_everywhere(w, GONE_T)
    engine = w.engines["h2"]

    def refuse(nid):
        import requests
        raise requests.ConnectionError("engine went away")
    engine.remove_network = refuse
    rc, out, err = w.run("tenant", "purge", GONE_T, "--yes")
    assert rc == 1 and "network x_net on h2: engine of host h2" in err and "stays suspended" in err
    assert GONE_T in w.store().suspended() and ("volume", "x_data") in w.engines["h1"].removed


def test_suspend_sweeps_again_for_a_start_in_flight(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web")
    own_container(w, "h1", "2" * 64, TA, "a_late", running=False)
    engine = w.engines["h1"]
    stop = engine.stop

    def stop_and_late_start(cid, timeout=10):  # a start admitted before the suspension lands now
        stop(cid, timeout)
        if cid == "1" * 64:
            engine.containers_["2" * 64]["State"]["Running"] = True
    engine.stop = stop_and_late_start
    rc, out, err = w.run("tenant", "suspend", TA)
    assert rc == 0 and engine.stopped == ["1" * 64, "2" * 64] and "Stopped 2" in out


def test_purge_asks_on_a_terminal(world):
    w = world
    _tenant_everywhere(w, GONE_T)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    rc, out, err = w.run("tenant", "purge", GONE_T, stdin=Tty("n\n"))
    assert rc == 1 and "Remove all of this? [y/N]" in out and "x_data" in out and "Nothing removed." in out
    assert not w.engines["h1"].removed
    rc, out, err = w.run("tenant", "purge", GONE_T, stdin=Tty("y\n"))
    assert rc == 0 and ("volume", "x_data") in w.engines["h1"].removed


# -- hosts, reconcile, orphans ----------------------------------------------------------------


def test_host_list_and_retire(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web")
    w.store("h9").add("container", "9" * 64, TA, "a_old")
    w.store("h9").mark_complete(1000.0)
    w.engines["h2"].down = True
    rc, out, err = w.run("host", "list")
    rows = {l.split()[0]: l for l in out.splitlines()[1:]}
    assert "yes" in rows["h1"] and "no: engine of host h2" in rows["h2"] and "not configured" in rows["h9"]
    data = {r["host"]: r for r in json.loads(w.run("host", "list", "--json")[1])}
    assert data["h9"]["containers"] == 1 and data["h1"]["reachable"] == "yes"
    rc, out, err = w.run("host", "retire", "h1", "--yes")
    assert rc == 1 and "a live host is not retired" in err
    rc, out, err = w.run("host", "retire", "h9")
    assert rc == 2 and "needs a confirmation" in err
    rc, out, err = w.run("host", "retire", "h9", "--yes")
    assert rc == 0 and "1 record(s)" in out and w.store().owner("container", "9" * 64) is None
    assert w.store().owner("container", "1" * 64) == TA


def test_orphans_of_is_the_reconcile_rules():
    snap = reconcile.Snapshot(
        containers=[{"Id": "c1", "Name": "t_web", "Labels": {TENANT_LABEL: TA}},
                    {"Id": "c2", "Name": "stray", "Labels": {}},
                    {"Id": "c3", "Name": "kept", "Labels": {}}],
        networks=[{"Id": "n0", "Name": "bridge", "Labels": {}}, {"Id": "n1", "Name": "lonely", "Labels": {}}],
        volumes=[{"Name": f"{TA}_data", "Labels": {}}, {"Name": "anon", "Labels": {}}],
        adopted={"container": {"c3": TB, "gone": TA}})
    have = {"container": {"c1": (TA, "t_web"), "c9": (TB, "x")}, "network": {}, "volume": {}}
    o = _host_cmds.orphans_of(snap, have)
    assert [(u["kind"], u["id"]) for u in o["unowned"]] == [("container", "c2"), ("network", "n1"), ("volume", "anon")]
    assert o["stale_records"] == [{"kind": "container", "id": "c9", "tenant": TB, "name": "x"}]
    assert o["stale_adoptions"] == [{"kind": "container", "id": "gone", "tenant": TA}]


def test_desired_honours_adoptions_but_labels_win():
    snap = reconcile.Snapshot(containers=[{"Id": "c1", "Name": "x", "Labels": {}},
                                          {"Id": "c2", "Name": "y", "Labels": {TENANT_LABEL: TA}}],
                              networks=[{"Id": "n1", "Name": "net", "Labels": {}},
                                        {"Id": "n2", "Name": "bridge", "Labels": {}}],
                              volumes=[{"Name": "v1", "Labels": {}}])
    assert reconcile.desired(snap).unowned == ["container x", "network net", "volume v1"]
    adopted = {"container": {"c1": TB, "c2": TB}, "network": {"n1": TB, "n2": TB}, "volume": {"v1": TB}}
    want = reconcile.desired(snap, adopted)
    assert want.records["container"] == {"c1": (TB, "x"), "c2": (TA, "y")}
    assert want.records["network"] == {"n1": (TB, "net")} and want.records["volume"] == {"v1": (TB, "")}
    assert want.unowned == []
    snap.adopted = adopted  # the snapshot's own adoptions are the default
    assert reconcile.desired(snap).records == want.records


def test_orphans_and_reconcile_commands(world):
    w = world
    own_container(w, "h1", "1" * 64, TA, "a_web")
    w.engines["h1"].add_container("2" * 64, "stray")
    w.store("h2").add("container", "8" * 64, TB, "b_gone")
    rc, out, err = w.run("orphans")
    assert rc == 0, err
    rows = [l.split() for l in out.splitlines()[1:]]
    assert ["h1", "unowned", "container", "2" * 12, "stray", "-"] in rows
    assert ["h2", "record", "without", "resource", "container", "8" * 12, "b_gone", TB] in rows
    rc, out, err = w.run("--json", "reconcile", "--host", "h2")
    assert rc == 0 and json.loads(out)[0]["removed"] == 1 and w.store().owner("container", "8" * 64) is None
    rc, out, err = w.run("reconcile", "--host", "h7")
    assert rc == 1 and "host h7 has no engine" in err


# -- adopt ------------------------------------------------------------------------------------


def _inspect(**hc):
    e = FakeEngine()
    e.add_container("c" * 64, "orphan", **hc)
    return e.inspect_container("c" * 64)


@pytest.mark.parametrize("hc,why", [
    ({"Privileged": True}, "HostConfig.Privileged is not allowed"),
    ({"NetworkMode": "host"}, "HostConfig.NetworkMode 'host' is not allowed"),
    ({"NetworkMode": "default"}, "the engine's shared bridge"),
    ({"Binds": ["/etc:/host-etc"]}, "host path '/etc' is not allowed"),
    ({"CapAdd": ["SYS_ADMIN"]}, "CapAdd 'SYS_ADMIN' is not allowed"),
    ({"MaskedPaths": []}, "MaskedPaths is not allowed"),
    ({"PidMode": "host"}, "PidMode 'host' is not allowed"),
    ({"Devices": [{"PathOnHost": "/dev/kmsg", "PathInContainer": "/dev/kmsg", "CgroupPermissions": "rwm"}]},
     "Devices is not allowed"),
    ({"PidsLimit": None}, "has no PidsLimit"),
    ({"SomethingNew": 5}, "HostConfig.SomethingNew is set on the resource but the rules do not know it"),
])
def test_adoption_runs_the_create_rules(hc, why):
    with pytest.raises(Denied, match=why):
        _adopt.check_container(_inspect(**hc), TA, rules.Policy(), cgroup_v1=True)


def test_adoption_of_a_plain_container_and_the_engine_defaults():
    plan = _adopt.check_container(_inspect(SomethingNew=0), TA, rules.Policy(), cgroup_v1=True)
    assert plan.needs == [] and plan.record[0] == "container"
    with pytest.raises(Denied, match="CgroupnsMode 'host'"):  # the host's cgroup namespace: never a tenant's
        _adopt.check_container(_inspect(CgroupnsMode="host"), TA, rules.Policy(), cgroup_v1=True)
    c = _inspect(NetworkMode=f"{TA}_net")
    c["NetworkSettings"]["Networks"] = {f"{TA}_net": {"IPAMConfig": {"IPv4Address": ""}, "IPAddress": "172.18.0.2",
                                                       "MacAddress": "02:42:ac:12:00:02", "Aliases": ["orphan"]}}
    plan = _adopt.check_container(c, TA, rules.Policy(), cgroup_v1=True)
    assert [(n.kind, n.ref) for n in plan.needs] == [("network", f"{TA}_net"), ("network", f"{TA}_net")]


def test_adoption_refuses_other_tenants_names_and_labels():
    c = _inspect()
    c["Name"] = f"/{TB}_web"
    with pytest.raises(Denied, match=f"scoped for project {TB}"):
        _adopt.check_container(c, TA, rules.Policy(), True)
    c = _inspect()
    c["Config"]["Labels"] = {TENANT_LABEL: TB}
    with pytest.raises(Denied, match=f"carries the tenant label of project {TB}"):
        _adopt.check_container(c, TA, rules.Policy(), True)


def test_adoption_of_volumes_and_networks():
    pol = rules.Policy()
    _adopt.check_volume({"Name": "data", "Driver": "local", "Options": None, "Labels": None}, TA, pol)
    with pytest.raises(Denied, match="DriverOpts is not allowed"):
        _adopt.check_volume({"Name": "data", "Driver": "local", "Labels": {},
                             "Options": {"type": "none", "o": "bind", "device": "/etc"}}, TA, pol)
    net = {"Name": "net", "Driver": "bridge", "Scope": "local", "EnableIPv6": False, "Options": {},
           "IPAM": {"Driver": "default", "Options": None, "Config": [{"Subnet": "172.30.0.0/16"}]},
           "ConfigFrom": {"Network": ""}, "Labels": {}}
    _adopt.check_network(net, TA, pol)
    with pytest.raises(Denied, match="Driver 'macvlan'"):
        _adopt.check_network({**net, "Driver": "macvlan"}, TA, pol)
    with pytest.raises(Denied, match="Options is not allowed"):
        _adopt.check_network({**net, "Options": {"com.docker.network.bridge.name": "docker0"}}, TA, pol)


def test_adopt_command_records_and_remembers(world):
    w = world
    w.engines["h1"].add_container("c" * 64, "plain", Memory=GIB)
    w.engines["h1"].add_container("d" * 64, "priv", Privileged=True)
    rc, out, err = w.run("adopt", "priv", "tenant-a")
    assert rc == 1 and "container priv on h1 cannot be given to project tenant-a" in err
    assert "HostConfig.Privileged is not allowed" in err and w.store().owner("container", "d" * 64) is None
    rc, out, err = w.run("adopt", "plain", "tenant-a")
    assert rc == 0, err
    assert w.store().owner("container", "c" * 64) == TA
    assert w.r.hget("fdcs:adopted:container", "c" * 64) == f"{TA} h1"
    assert QuotaStore(w.r, QuotaPolicy.from_config(w.cfg), "h1").usage(TA)["memory"] == GIB
    rc, out, err = w.run("adopt", "plain", "tenant-b")
    assert rc == 1 and f"already belongs to project {TA}" in err
    # the reconcile pass keeps it (the adoption stands in for the label)
    rc, out, err = w.run("--json", "reconcile", "--host", "h1")
    assert json.loads(out)[0]["removed"] == 0 and w.store().owner("container", "c" * 64) == TA
    # once the resource is gone, a pass forgets the adoption (ids are never reused)
    del w.engines["h1"].containers_["c" * 64]
    rc, out, err = w.run("--json", "reconcile", "--host", "h1")
    assert json.loads(out)[0]["adoptions_dropped"] == 1 and not w.r.hexists("fdcs:adopted:container", "c" * 64)


def test_adopt_respects_quotas(world):
    w = world
    w.engines["h1"].add_container("c" * 64, "nomem")
    QuotaStore(w.r, QuotaPolicy.from_config(w.cfg), "h1").set_limits(TA, {"memory": GIB})
    rc, out, err = w.run("adopt", "nomem", TA)
    assert rc == 1 and "HostConfig.Memory (--memory) must be set" in err
    w.engines["h1"].add_container("e" * 64, "big", Memory=2 * GIB)
    rc, out, err = w.run("adopt", "big", TA)
    assert rc == 1 and "memory quota of project" in err and "would be exceeded" in err
    w.engines["h1"].add_container("f" * 64, "fits", Memory=GIB)
    assert w.run("adopt", "fits", TA)[0] == 0


def test_adopt_refuses_a_network_used_by_others(world):
    w = world
    w.engines["h1"].networks_["n" * 64] = {"Id": "n" * 64, "Name": "shared", "Driver": "bridge", "Scope": "local",
                                           "IPAM": {"Driver": "default"}, "Labels": {},
                                           "Containers": {"c" * 64: {}}}
    rc, out, err = w.run("adopt", "shared", TA)
    assert rc == 1 and "used by container(s) that are not project" in err
    own_container(w, "h1", "c" * 64, TA, "a_web")
    rc, out, err = w.run("adopt", "shared", TA)
    assert rc == 0, err


# -- audit ------------------------------------------------------------------------------------


def _line(i, tenant, allow=True):
    return json.dumps({"ts": 1700000000 + i, "hook": "request", "rid": str(i), "tenant": tenant, "user": "u",
                       "method": "GET", "path": f"/containers/{i}/json", "resource": "", "allow": allow,
                       "reason": "ok" if allow else "policy", "us": 5, **({} if allow else {"msg": "no"})})


def test_audit_stream_writer_batches_and_trims():
    r = fakeredis.FakeRedis(decode_responses=True)
    w = audit_stream.Writer(r, maxlen=10, linger=0)
    w._pid = __import__("os").getpid()  # no thread: this test drives the writer
    for i in range(30):
        w.submit(_line(i, TA))
    while w.written < 30:
        assert w.flush_once() > 0
    n = r.xlen(audit_stream.STREAM)
    assert 10 <= n < 30 and w.dropped == 0  # trimmed ("~": about 10)
    assert json.loads(r.xrevrange(audit_stream.STREAM, count=1)[0][1]["line"])["rid"] == "29"


def test_audit_stream_writer_drops_and_counts_when_redis_is_down_or_slow(caplog):
    import redis
    w = audit_stream.Writer(redis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.2), maxlen=10,
                            queue_size=3)
    w._pid = __import__("os").getpid()  # no thread: this test drives the writer
    for i in range(5):
        w.submit(_line(i, TA))  # never blocks, never raises
    assert w.dropped == 2
    assert w.flush_once() == 0 and w.dropped == 5 and w.written == 0
    assert "audit stream" in caplog.text and "dropped" in caplog.text


def test_audit_lines_reach_the_stream_when_installed(monkeypatch):
    r = fakeredis.FakeRedis(decode_responses=True)
    monkeypatch.setattr(audit_stream, "_writer", None)
    audit_stream.install(r, 0)
    assert not audit_stream.active()  # 0: no stream
    audit_stream.install(r, 100)
    import time as _t
    audit.audit("request", "rid1", {"RequestMethod": "GET", "RequestUri": "/v1.41/info"}, None,
                {"tenant": TA, "user": "alice"}, "", {"Allow": False, "Msg": "nope"}, "policy", _t.perf_counter())
    deadline = _t.monotonic() + 5
    while not r.xlen(audit_stream.STREAM) and _t.monotonic() < deadline:
        _t.sleep(0.01)
    line = json.loads(r.xrange(audit_stream.STREAM)[0][1]["line"])
    assert line["rid"] == "rid1" and line["tenant"] == TA and line["msg"] == "nope"
    assert audit_stream.stats()["written"] == 1


def test_audit_command_last_lines_filtered(world):
    w = world
    for i in range(700):
        w.r.xadd(audit_stream.STREAM, {"line": _line(i, TA if i % 100 == 0 else TB, allow=i != 600)})
    rc, out, err = w.run("audit", "--tenant", "tenant-a", "-n", "3")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and all(TA in l for l in lines)
    assert "/containers/400/json" in lines[0] and lines[2].endswith("DENY policy: no")
    rc, out, err = w.run("audit", "-n", "2", "--json")
    assert [json.loads(l)["rid"] for l in out.splitlines()] == ["698", "699"]


def test_audit_command_on_an_empty_stream_says_why(world):
    rc, out, err = world.run("audit")
    assert rc == 0 and out == "" and "audit stream fdcs:audit is empty" in err


def test_audit_format_line():
    e = _audit.parse_entry("1-0", {"line": _line(1, "", allow=False)})
    assert _audit.format_line(e) == "2023-11-14 22:13:21.000 request  (admin) u GET /containers/1/json DENY policy: no"
    assert _audit.parse_entry("2-0", {"line": "not json"}) == {"id": "2-0", "msg": "not json"}
