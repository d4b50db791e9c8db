"""fdcs-manage on the real two-host stack, with the stack's own FDCS_CONF.

Tenants act through host 1's name scoper with the stock CLI; administrators'
resources (the orphans) are made with the Keystone admin's CLI straight on
the engines.  tenant-a is only read, and suspended and resumed (always
resumed, in ``finally``); the purge and quota tests make their own Keystone
projects with ``fdcs-devstack tenant add``.  Every container, volume and
network made here is removed in ``finally``, and every Keystone project
made here is deleted.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import uuid

import pytest
import redis
import requests

from .conftest import Cli, client_env, wait_for

T = "org.fiware.fdcs.tenant"
A1, B1, ADMIN = "FDCS_CONFIG_A1", "FDCS_CONFIG_B1", "FDCS_CONFIG_ADMIN"


def _env(**extra: str) -> dict[str, str]:
    """No FDCS_* of this process (they would override the file), plus ``extra``."""
    env = {k: v for k, v in client_env().items() if not k.startswith(("FDCS_", "OS_"))}
    env.update(extra)
    return env


def manage(stack, *args: str, rc: int | None = 0, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """``fdcs-manage --config FDCS_CONF ARGS``; asserts the exit status ``rc`` (None: any)."""
    p = subprocess.run([sys.executable, "-m", "authz_plugin.manage", "--config", stack.env["FDCS_CONF"], *args],
                       capture_output=True, text=True, timeout=timeout, env=env or _env(), stdin=subprocess.DEVNULL)
    if rc is not None:
        assert p.returncode == rc, f"fdcs-manage {' '.join(args)}: {p.returncode} != {rc}\n{p.stdout}\n{p.stderr}"
    return p


def js(stack, *args: str):
    return json.loads(manage(stack, *args, "--json").stdout)


@pytest.fixture(scope="module")
def r(stack):
    client = redis.Redis.from_url(stack.env["FDCS_REDIS_URL"], decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
def admins(stack):
    """The Keystone admin's CLI on each engine (host 1, host 2)."""
    return [Cli(stack.env[ADMIN], h, env=client_env()) for h in stack.env["FDCS_ENGINE_HOSTS"].split()]


@pytest.fixture(scope="module")
def hosts(stack):
    """The stack's host ids, in order (host 1, host 2)."""
    return [h["host"] for h in js(stack, "host", "list")]


class Keystone:
    """The stack's Keystone as its admin (to delete the projects tests make)."""

    def __init__(self, stack):
        self.url = stack.env["FDCS_KEYSTONE_URL"]
        self.http = requests.Session()
        self.http.trust_env = False
        r = self.http.post(self.url + "/auth/tokens", json={"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"}, "password": stack.env["FDCS_PASSWORD"]}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}}, timeout=30)
        r.raise_for_status()
        self.http.headers["X-Auth-Token"] = r.headers["X-Subject-Token"]

    def delete_project(self, name: str) -> None:
        for p in self.http.get(self.url + "/projects", params={"name": name}, timeout=30).json()["projects"]:
            self.http.delete(f"{self.url}/projects/{p['id']}", timeout=30)
        for u in self.http.get(self.url + "/users", timeout=30).json()["users"]:
            if u["name"].startswith(name + "-user"):
                self.http.delete(f"{self.url}/users/{u['id']}", timeout=30)


def new_tenant(stack, scoper):
    name = f"m-{uuid.uuid4().hex[:8]}"
    out = stack.cmd("tenant", "add", name, "--users", "1").stdout.split()
    return name, out[0], stack.scoper_cli(out[1])


def remove_labelled(admins, tenant: str) -> None:
    for a in admins:
        flt = ["--filter", f"label={T}={tenant}"]
        ids = a("ps", "-aq", *flt).stdout.split()
        if ids:
            a("rm", "-f", *ids, check=False)
        vols = a("volume", "ls", "-q", *flt).stdout.split()
        if vols:
            a("volume", "rm", "-f", *vols, check=False)
        nets = a("network", "ls", "-q", *flt).stdout.split()
        if nets:
            a("network", "rm", *nets, check=False)


# -- reading ---------------------------------------------------------------------------------


def test_tenants_usage_quota_and_flavors(stack, scoper, admins):
    alice = stack.scoper_cli(A1)
    ta = stack.env["FDCS_TENANT_A"]
    name = f"mu-{uuid.uuid4().hex[:6]}"
    try:
        alice("run", "-d", "--name", name, "--memory", "64m", "busybox", "sh", "-c", "while :; do :; done")
        rows = {t["id"]: t for t in js(stack, "tenants")}
        assert rows[ta]["name"] == "tenant-a" and rows[ta]["containers"] >= 1 and rows[ta]["suspended"] is False
        text = manage(stack, "tenants").stdout
        assert text.splitlines()[0].split()[:3] == ["ID", "NAME", "CONTAINERS"] and "tenant-a" in text

        # usage by name: the engines' stats of the busy container
        def busy():
            u = js(stack, "usage", "tenant-a")
            row = next(x for x in u["live"] if x["name"] == f"{ta}_{name}")
            return u if row["state"] == "running" and row["cpu_percent"] > 5 and row["memory"] > 0 else None
        u = wait_for(busy, timeout=60, what="live stats of the busy container")
        assert u["tenant"] == ta and u["usage"]["containers"] >= 1
        row = next(x for x in u["live"] if x["name"] == f"{ta}_{name}")
        assert row["memory_limit"] == 64 * 1024**2
        text = manage(stack, "usage", ta).stdout
        assert "Live use" in text and f"{ta}_{name}" in text and "running" in text

        q = js(stack, "quota", "show", "tenant-a")
        assert q["enforced"] is True and q["metrics"]["containers"]["used"] >= 1

        f = js(stack, "flavors")
        assert [x["name"] for x in f["flavors"]] == ["small", "medium", "large"]
        assert "small" in manage(stack, "flavors").stdout
    finally:
        alice("rm", "-f", name, check=False)


def test_quota_set_takes_effect_and_clear_lifts_it(stack, scoper):
    tname, tid, cli = new_tenant(stack, scoper)
    ks = Keystone(stack)
    try:
        out = manage(stack, "quota", "set", tname, "--containers", "1", "--memory", "unlimited").stdout
        assert f"Quota of project {tname} ({tid})" in out and "own" in out
        cli("create", "--name", "one", "busybox", "true")
        err = cli.fails("create", "--name", "two", "busybox", "true", match="containers quota exceeded")
        assert f"project {tid}" in err
        q = js(stack, "quota", "show", tid)["metrics"]["containers"]
        assert q == {"limit": 1, "source": "own", "used": 1, "percent": 100.0}
        manage(stack, "quota", "clear", tname)
        cli("create", "--name", "two", "busybox", "true")  # the default (unlimited) applies again
        bad = manage(stack, "quota", "set", tname, "--memory", "12q", rc=2)
        assert bad.stderr.startswith("fdcs-manage: bad value for --memory")
    finally:
        cli("rm", "-f", "one", "two", check=False)
        manage(stack, "quota", "clear", tid, rc=None)
        ks.delete_project(tname)


def test_error_cases(stack):
    p = manage(stack, "usage", "no-such-project", rc=1)
    assert p.stderr.startswith("fdcs-manage: unknown tenant 'no-such-project'")
    # an unreachable Redis (FDCS_REDIS_URL overrides the file, as for the daemons)
    p = manage(stack, "tenants", rc=1, env=_env(FDCS_REDIS_URL="redis://127.0.0.1:9/0", FDCS_REDIS_TIMEOUT="1"))
    assert "the ownership store (Redis at redis://127.0.0.1:9/0) is unavailable" in p.stderr
    # an unreachable Keystone: ids work, names do not
    down = _env(FDCS_KEYSTONE_URL="http://127.0.0.1:9/v3", FDCS_KEYSTONE_TIMEOUT="2")
    p = manage(stack, "quota", "show", "tenant-a", rc=1, env=down)
    assert "identity service unavailable: use the project id" in p.stderr
    p = manage(stack, "quota", "show", stack.env["FDCS_TENANT_A"], env=down)
    assert stack.env["FDCS_TENANT_A"] in p.stdout
    p = manage(stack, "--config", "/nonexistent.toml", "tenants", rc=2)
    assert "configuration file /nonexistent.toml does not exist" in p.stderr
    manage(stack, "tenants")  # positive control: the same command on the stack as it is


def test_audit_lines_and_follow(stack, scoper):
    alice = stack.scoper_cli(A1)
    ta = stack.env["FDCS_TENANT_A"]
    alice.fails("run", "--rm", "--privileged", "busybox", "true", match="HostConfig.Privileged is not allowed")
    lines = [json.loads(x) for x in manage(stack, "audit", "--tenant", "tenant-a", "-n", "50", "--json").stdout.splitlines()]
    assert lines and all(x["tenant"] == ta for x in lines)
    denied = [x for x in lines if not x["allow"]]
    assert denied and denied[-1]["msg"] == "HostConfig.Privileged is not allowed" and denied[-1]["user"] == "alice"
    text = manage(stack, "audit", "--tenant", ta, "-n", "5").stdout
    assert len(text.splitlines()) == 5 and "alice" in text
    # --follow prints what happens after it started
    proc = subprocess.Popen([sys.executable, "-m", "authz_plugin.manage", "--config", stack.env["FDCS_CONF"],
                             "audit", "--follow", "-n", "0", "--tenant", ta, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines_q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines_q.put(x) for x in proc.stdout], daemon=True).start()
    try:
        marker = f"follow-{uuid.uuid4().hex[:6]}"
        seen = []

        def saw():
            # the follower starts at the stream's end once it runs: repeat the
            # request until it shows one
            alice("inspect", marker, check=False)
            try:
                while True:
                    seen.append(json.loads(lines_q.get(timeout=0.5)))
                    if marker in seen[-1].get("path", ""):
                        return True
            except queue.Empty:
                return False
        wait_for(saw, timeout=60, interval=0.1, what="the follower to print the new request")
        assert all(x["tenant"] == ta for x in seen)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_hosts_reconcile_and_orphans(stack, admins, hosts):
    rows = js(stack, "host", "list")
    assert [h["reachable"] for h in rows] == ["yes", "yes"] and all(h["last_reconcile"] for h in rows)
    assert "LAST COMPLETE RECONCILE" in manage(stack, "host", "list").stdout
    counts = js(stack, "reconcile")
    assert [c["host"] for c in counts] == hosts and all("added" in c for c in counts)
    assert js(stack, "reconcile", "--host", hosts[1])[0]["host"] == hosts[1]
    p = manage(stack, "reconcile", "--host", "no-such-host", rc=1)
    assert "host no-such-host has no engine in manage.engines: run fdcs-manage on that host" in p.stderr
    name = f"orphan-{uuid.uuid4().hex[:6]}"
    try:
        admins[1]("create", "--name", name, "--network", "none", "busybox", "true")
        o = js(stack, "orphans")
        assert name in [u["name"] for u in o[hosts[1]]["unowned"]]
        assert name not in [u["name"] for u in o[hosts[0]]["unowned"]]
        assert name in manage(stack, "orphans").stdout
    finally:
        admins[1]("rm", "-f", name, check=False)
    assert name not in [u["name"] for u in js(stack, "orphans")[hosts[1]]["unowned"]]  # control


def test_retire_refuses_a_live_host(stack, hosts):
    p = manage(stack, "host", "retire", hosts[1], "--yes", rc=1)
    assert "a live host is not retired" in p.stderr
    p = manage(stack, "host", "retire", "gone-host", rc=2)  # no terminal, no --yes
    assert "needs a confirmation" in p.stderr
    out = js(stack, "host", "retire", "gone-host", "--yes")  # a host with nothing: harmless
    assert out == {"host": "gone-host", "retired": True, "records_removed": 0, "adoptions_removed": 0}


# -- adopt -------------------------------------------------------------------------------------


def test_adopt_refuses_a_privileged_orphan_and_hands_over_a_plain_one(stack, scoper, admins, hosts, r):
    admin = admins[0]
    alice = stack.scoper_cli(A1)
    ta = stack.env["FDCS_TENANT_A"]
    priv, plain = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("priv", "plain"))
    pid = None
    try:
        admin("create", "--name", priv, "--privileged", "--network", "none", "--pids-limit", "50", "busybox", "true")
        pid = admin("create", "--name", plain, "--network", "none", "--pids-limit", "50", "--memory", "64m",
                    "--cgroupns", "private", "busybox", "sleep", "600").stdout.strip()
        p = manage(stack, "adopt", priv, "tenant-a", rc=1)
        assert f"container {priv} on {hosts[0]} cannot be given to project tenant-a" in p.stderr
        assert "HostConfig.Privileged is not allowed" in p.stderr
        assert r.hget("fdcs:own:container", admin("inspect", "-f", "{{.Id}}", priv).stdout.strip()) is None
        alice.fails("inspect", pid, match="No such")  # not hers before the adoption

        out = js(stack, "adopt", plain, "tenant-a")
        assert out == {"kind": "container", "id": pid, "name": plain, "host": hosts[0], "tenant": ta,
                       "tenant_name": "tenant-a"}
        assert r.hget("fdcs:adopted:container", pid) == f"{ta} {hosts[0]}"
        # the daemons' reconciler must keep it through its next full pass
        t0 = float(r.hget("fdcs:reconciled", hosts[0]).split()[0])
        wait_for(lambda: float(r.hget("fdcs:reconciled", hosts[0]).split()[0]) > t0 + 0.001, timeout=60,
                 what="a full pass of host 1's reconciler")
        assert r.hget("fdcs:own:container", pid) == ta
        # usable by the tenant, by id
        alice("start", pid)
        assert alice("inspect", "-f", "{{.State.Running}}", pid).stdout.strip() == "true"
        assert plain not in [u["name"] for u in js(stack, "orphans")[hosts[0]]["unowned"]]
        p = manage(stack, "adopt", plain, "tenant-b", rc=1)
        assert f"already belongs to project {ta}" in p.stderr
        alice("rm", "-f", pid)
        wait_for(lambda: r.hget("fdcs:own:container", pid) is None, what="the record to go with the container")
    finally:
        admin("rm", "-f", priv, plain, check=False)
        if pid:
            r.hdel("fdcs:adopted:container", pid)


# -- suspend / resume ---------------------------------------------------------------------------


def test_suspend_refuses_and_stops_resume_restores(stack, scoper, admins):
    alice = stack.scoper_cli(A1)
    alice.env = {**alice.env, "DOCKER_API_VERSION": "1.41"}  # no version probe: the refusal itself is shown
    bob = stack.scoper_cli(B1)
    ta = stack.env["FDCS_TENANT_A"]
    name = f"susp-{uuid.uuid4().hex[:6]}"
    try:
        # stops at once on SIGTERM (a bare sleep as pid 1 would take the 10 s stop timeout)
        cid = alice("run", "-d", "--name", name, "busybox", "sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"
                    ).stdout.strip()
        out = js(stack, "tenant", "suspend", "tenant-a", "--reason", "e2e test")
        assert out["suspended"] is True and [s["id"] for s in out["stopped"]] == [cid], out
        assert admins[0]("inspect", "-f", "{{.State.Running}}", cid).stdout.strip() == "false"
        err = alice.fails("ps", match=f"project {ta} is suspended by the site administrators (e2e test)")
        assert "contact them" in err
        alice.fails("start", name, match="is suspended")
        bob("ps")  # another tenant is unaffected
        assert js(stack, "usage", ta)["suspended"]["reason"] == "e2e test"
        assert "SUSPENDED" in manage(stack, "usage", ta).stdout
        assert {t["id"]: t for t in js(stack, "tenants")}[ta]["suspended"] is True

        out = manage(stack, "tenant", "resume", "tenant-a").stdout
        assert "resumed" in out and "stay stopped" in out
        # the plugins' cache of suspended tenants lasts SUSPENSION_TTL seconds
        wait_for(lambda: alice("start", name, check=False).returncode == 0, timeout=30, what="alice's start")
        assert alice("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"
    finally:
        manage(stack, "tenant", "resume", ta, rc=None)
        alice("rm", "-f", name, check=False)


# -- purge --------------------------------------------------------------------------------------


def test_purge_of_a_tenant_made_for_the_test(stack, scoper, admins, r):
    tname, tid, cli = new_tenant(stack, scoper)
    ks = Keystone(stack)
    try:
        cid = cli("run", "-d", "--name", "web", "-v", "data:/data", "busybox", "sleep", "600").stdout.strip()
        cli("network", "create", "extra")
        manage(stack, "quota", "set", tname, "--containers", "5")
        assert r.hget("fdcs:own:container", cid) == tid and r.hget("fdcs:own:volume", f"{tid}_data") == tid

        p = manage(stack, "tenant", "purge", tname, "--force", rc=2)  # no terminal and no --yes
        assert "needs a confirmation" in p.stderr
        p = manage(stack, "tenant", "purge", tname, "--yes", rc=1)  # the project still exists
        assert "still exists in Keystone" in p.stderr and r.hget("fdcs:own:container", cid) == tid

        out = js(stack, "tenant", "purge", tname, "--yes", "--force")
        assert out["purged"] is True and out["problems"] == []
        kinds = sorted({x["kind"] for x in out["removed"]})
        assert kinds == ["container", "network", "volume"]
        for a in admins:
            flt = ["--filter", f"label={T}={tid}"]
            assert a("ps", "-aq", *flt).stdout.split() == []
            assert a("volume", "ls", "-q", *flt).stdout.split() == []
            assert a("network", "ls", "-q", *flt).stdout.split() == []
        assert r.hget("fdcs:own:container", cid) is None and r.hget("fdcs:own:volume", f"{tid}_data") is None
        assert not r.exists(f"fdcs:quota:{tid}")
        assert tid not in {t["id"] for t in js(stack, "tenants")}
        bystander = stack.scoper_cli(A1)
        bystander("ps")  # tenant-a untouched
    finally:
        remove_labelled(admins, tid)
        manage(stack, "quota", "clear", tid, rc=None)
        ks.delete_project(tname)
