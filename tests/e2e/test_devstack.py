"""``fdcs-devstack`` itself on the real machine: up, status, idempotent up,
repair of one killed component, failure reporting, tenant add, down.

With ``fdcs-name-scoper`` installed every host has a name scoper
(``scoper-hK``) and ``DIR/env`` points tenants at the scopers (TLS);
without it the stack runs in plugin-only mode and the scoper checks skip.

These tests use a stack of their own (two hosts, its own state dir), not the
session's: they kill its components and finally take it down.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from authz_plugin.devstack import ComponentFailed, Stack
from authz_plugin.devstack import _scoper
from authz_plugin.devstack._procs import proc_alive

ENV_KEYS = [
    "FDCS_DOCKER_HOST", "FDCS_DOCKER_HOSTS", "FDCS_ENGINE_HOSTS", "DOCKER_CERT_PATH",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "DOCKER_TLS_VERIFY",
    "FDCS_CONFIG_A1", "FDCS_CONFIG_A2", "FDCS_CONFIG_B1", "FDCS_CONFIG_A_READER", "FDCS_CONFIG_ADMIN",
    "FDCS_TENANT_A", "FDCS_TENANT_B", "FDCS_KEYSTONE_URL", "FDCS_REDIS_URL", "FDCS_PASSWORD",
    "FDCS_ADMIN_KEY_FILE", "FDCS_CONF",
]
SCOPER = _scoper.command() is not None
HOST_PARTS = ["engine", "authz", "reconciler"] + (["scoper"] if SCOPER else [])
NAMES = ["redis", "keystone"] + [f"{part}-h{k}" for k in (1, 2) for part in HOST_PARTS]
needs_scoper = pytest.mark.skipif(not SCOPER, reason="fdcs-name-scoper is not installed")
LINE = re.compile(r"^(\S+) (up|down) pid=(\d+|-) addr=(\S+)(?: metrics=(http://127\.0\.0\.1:\d+/metrics))?$")
METRICS_PARTS = {"authz": "PLUGIN", "scoper": "SCOPER", "reconciler": "RECONCILER"}


@pytest.fixture(scope="module")
def ds():
    """A two-host stack, taken down at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("the real stack needs root")
    stack = Stack(tempfile.mkdtemp(prefix="fdcs-ds-", dir="/tmp"))
    try:
        took = stack.up(hosts=2)
        print(f"fdcs-devstack up (2 hosts) took {took:.1f} s")
        yield stack
    finally:
        stack.down()


def _pids(stack: Stack) -> dict[str, int | None]:
    return {s.name: s.pid for s in stack.status()}


def _validate(env: dict[str, str], config_dir: str) -> dict:
    """Keystone's view of the token stored in a config dir (self-validation)."""
    headers = json.loads((Path(config_dir) / "config.json").read_text())["HttpHeaders"]
    token = headers["X-Auth-Token"]
    r = requests.get(env["FDCS_KEYSTONE_URL"] + "/auth/tokens",
                     headers={"X-Auth-Token": token, "X-Subject-Token": token}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["token"]["project"]["id"] == headers["X-Auth-TenantId"]
    return r.json()["token"]


def _admin_docker(stack: Stack, host: str, *args: str) -> str:
    p = subprocess.run(["/usr/bin/docker", "--config", str(stack.dir / "admin-key"), "-H", host, *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _tenant_docker(env: dict[str, str], user: str, host: str, *args: str) -> subprocess.CompletedProcess:
    """The stock CLI as a tenant through a scoper, configured only by the
    stack's env (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH), as DEVSTACK.md says."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "FDCS_"))}
    clean.update(DOCKER_TLS_VERIFY=env["DOCKER_TLS_VERIFY"], DOCKER_CERT_PATH=env["DOCKER_CERT_PATH"])
    return subprocess.run(["/usr/bin/docker", "--config", env[user], "-H", host, *args],
                          capture_output=True, text=True, timeout=60, env=clean)


def test_status_lists_every_component_up(ds):
    out = subprocess.run(["fdcs-devstack", "status", "--state-dir", str(ds.dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [LINE.match(l).group(1) for l in lines] == NAMES, lines
    assert all(LINE.match(l).group(2) == "up" for l in lines), lines
    assert all(proc_alive(int(LINE.match(l).group(3))) for l in lines)
    if SCOPER:
        addrs = [LINE.match(l).group(4) for l in lines if l.startswith("scoper-")]
        assert addrs == ds.env()["FDCS_DOCKER_HOSTS"].split(), (addrs, ds.env()["FDCS_DOCKER_HOSTS"])
    metrics = {LINE.match(l).group(1): LINE.match(l).group(5) for l in lines}
    env = ds.env()
    for name, url in metrics.items():
        part, _, host = name.rpartition("-")
        if part in METRICS_PARTS:
            assert url == env[f"FDCS_METRICS_{host.upper()}_{METRICS_PARTS[part]}"], (name, url)
        else:
            assert url is None, (name, url)


def test_env_has_the_contract_keys_and_working_identities(ds):
    text = (ds.dir / "env").read_text()
    metrics = [f"FDCS_METRICS_H{k}_{role}" for k in (1, 2)
               for role in ["PLUGIN"] + (["SCOPER"] if SCOPER else []) + ["RECONCILER"]]
    assert [l.split("=", 1)[0] for l in text.splitlines()] == ENV_KEYS + metrics
    env = ds.env()
    engines = env["FDCS_ENGINE_HOSTS"].split()
    assert len(engines) == 2 and len(set(engines)) == 2
    assert all(Path(p.removeprefix("unix://")).is_socket() for p in engines)
    assert {p.name for p in Path(env["DOCKER_CERT_PATH"]).iterdir()} >= {"ca.pem", "cert.pem", "key.pem"}
    assert oct(Path(env["FDCS_ADMIN_KEY_FILE"]).stat().st_mode & 0o777) == "0o600"
    roles = {k: {r["name"] for r in _validate(env, env[k])["roles"]}
             for k in ("FDCS_CONFIG_A1", "FDCS_CONFIG_A2", "FDCS_CONFIG_B1", "FDCS_CONFIG_A_READER",
                       "FDCS_CONFIG_ADMIN")}
    assert "member" in roles["FDCS_CONFIG_A1"] and "member" in roles["FDCS_CONFIG_B1"]
    assert roles["FDCS_CONFIG_A_READER"] == {"reader"}
    assert "admin" in roles["FDCS_CONFIG_ADMIN"]
    assert _validate(env, env["FDCS_CONFIG_A2"])["project"]["id"] == env["FDCS_TENANT_A"]
    assert _validate(env, env["FDCS_CONFIG_B1"])["project"]["id"] == env["FDCS_TENANT_B"]
    # every engine has busybox, and its plugin admits the break-glass key
    for host in engines:
        assert "busybox" in _admin_docker(ds, host, "images", "--format", "{{.Repository}}:{{.Tag}}")
    certs = Path(env["DOCKER_CERT_PATH"])
    assert env["REQUESTS_CA_BUNDLE"] == env["CURL_CA_BUNDLE"] == str(certs / "ca.pem")
    hosts = env["FDCS_DOCKER_HOSTS"].split()
    assert env["FDCS_DOCKER_HOST"] == hosts[0] and len(hosts) == 2
    if not SCOPER:  # plugin-only mode: tenants use the engines
        assert hosts == engines and env["DOCKER_TLS_VERIFY"] == ""
        return
    assert env["DOCKER_TLS_VERIFY"] == "1"
    assert all(re.fullmatch(r"tcp://127\.0\.0\.1:\d+", h) for h in hosts) and len(set(hosts)) == 2, hosts
    # each scoper answers the stock CLI over verified TLS, as a tenant, on its own engine
    for host, engine in zip(hosts, engines):
        p = _tenant_docker(env, "FDCS_CONFIG_A1", host, "info", "--format", "{{.Name}} {{.DockerRootDir}}")
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[1] == _admin_docker(ds, engine, "info", "--format", "{{.DockerRootDir}}").strip()
    # negative control: without the stack's CA the scoper's certificate is not trusted
    bad = dict(env, DOCKER_CERT_PATH=str(ds.dir / "no-such-certs"))
    p = _tenant_docker(bad, "FDCS_CONFIG_A1", hosts[0], "version")
    assert p.returncode != 0


def test_second_up_changes_nothing(ds):
    before = _pids(ds)
    files = {p: p.stat().st_mtime_ns for p in (ds.dir / "env", ds.dir / "fdcs.toml", ds.dir / "state.json")}
    log = (ds.dir / "logs" / "commands.log").read_text()
    took = ds.up()
    assert _pids(ds) == before
    assert {p: p.stat().st_mtime_ns for p in files} == files
    new = (ds.dir / "logs" / "commands.log").read_text()[len(log):].splitlines()
    assert [l.split("] ", 1)[1] for l in new][1:-1] == [], new  # only "up ..." and "done ..."
    assert took < 5


@pytest.mark.parametrize("victim", ["redis", "keystone", "authz-h2", "engine-h1", "reconciler-h2",
                                    pytest.param("scoper-h1", marks=needs_scoper)])
def test_up_restarts_just_the_killed_component(ds, victim):
    env = ds.env()
    before = _pids(ds)
    ds.kill(victim)
    if victim.startswith("scoper-"):
        # down, and its port closed, before the repair
        status = {s.name: s for s in ds.status()}
        assert not status[victim].up and status[victim].pid is None
        p = _tenant_docker(env, "FDCS_CONFIG_A1", env["FDCS_DOCKER_HOST"], "version")
        assert p.returncode != 0
    ds.up()
    after = _pids(ds)
    assert after[victim] != before[victim]
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before.items() if k != victim}
    assert all(s.up for s in ds.status())
    assert ds.env() == env  # state kept: same ports, projects, password
    _validate(env, env["FDCS_CONFIG_A1"])  # tokens made before still work
    if SCOPER:  # tenants get through again, at the same address
        for host in env["FDCS_DOCKER_HOSTS"].split():
            p = _tenant_docker(env, "FDCS_CONFIG_A1", host, "info")
            assert p.returncode == 0, (victim, host, p.stderr)


def test_failed_up_names_the_component_and_its_log(ds):
    env = ds.env()
    port = int(env["FDCS_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    ds.kill("redis")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        deadline = time.monotonic() + 10
        while True:  # the killed Redis may hold the port for a moment
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        squatter.listen()
        p = subprocess.run(["fdcs-devstack", "up", "--state-dir", str(ds.dir)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1
        assert f"redis did not come up" in p.stderr and str(ds.dir / "logs" / "redis.log") in p.stderr, p.stderr
        with pytest.raises(ComponentFailed) as e:
            ds.up()
        assert e.value.component == "redis"
    finally:
        squatter.close()
    ds.up()
    assert all(s.up for s in ds.status())


def test_tenant_add(ds):
    env = ds.env()
    p = subprocess.run(["fdcs-devstack", "tenant", "add", "tenant-x", "--users", "2", "--state-dir", str(ds.dir)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    project, *dirs = p.stdout.split()
    assert len(dirs) == 2
    for d in dirs:
        assert _validate(env, d)["project"]["id"] == project
    assert ds.tenant_add("tenant-x", users=2).project_id == project  # idempotent


def test_down_leaves_nothing(ds):
    pids = [s.pid for s in ds.status() if s.pid]
    hosts = [ds.layout.host(k) for k in (1, 2)]
    host = ds.env()["FDCS_ENGINE_HOSTS"].split()[0]
    # a container that ignores TERM, as PID 1 does: down must not wait for it
    _admin_docker(ds, host, "run", "-d", "--restart=always", "busybox", "httpd", "-f")
    t0 = time.monotonic()
    ds.down()
    print(f"fdcs-devstack down took {time.monotonic() - t0:.1f} s")
    assert not ds.dir.exists()
    assert not any(proc_alive(p) for p in pids)
    for h in hosts:
        assert not h.netns_path.exists()
        assert not h.plugin_socket.exists()
    assert str(ds.dir) not in Path("/proc/self/mountinfo").read_text()
    ds.down()  # a second down is a no-op
