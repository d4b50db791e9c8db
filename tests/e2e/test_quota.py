"""Quotas on the real two-host stack, through the hosts' name scopers with
the stock CLI, set with ``fdcs-manage`` (issue 5's acceptance).

Each test makes its own Keystone project with ``fdcs-devstack tenant add``,
so usage starts at zero whatever other tests left behind; tenant-a is the
bystander that must stay unaffected.  Every container made is removed in
``finally``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import Cli, Raw, client_env, wait_for

T = "org.fiware.fdcs.tenant"
MiB = 1024**2


def manage(stack, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "authz_plugin.manage", "--config", stack.env["FDCS_CONF"], *args],
                       capture_output=True, text=True, timeout=120, env=client_env())
    if check and p.returncode != 0:
        raise AssertionError(f"fdcs-manage {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


class Tenant:
    def __init__(self, stack, scoper):
        self.name = f"q-{uuid.uuid4().hex[:8]}"
        out = stack.cmd("tenant", "add", self.name, "--users", "1").stdout.split()
        self.id, self.config = out[0], out[1]
        hosts = stack.env["FDCS_DOCKER_HOSTS"].split()
        self.cli = [stack.scoper_cli(self.config, host=h) for h in hosts]
        self.admin = [Cli(stack.env["FDCS_CONFIG_ADMIN"], h, env=client_env())
                      for h in stack.env["FDCS_ENGINE_HOSTS"].split()]

    def engine_ids(self) -> set[str]:
        """The tenant's containers as the engines see them (administrator, both hosts)."""
        ids = set()
        for a in self.admin:
            ids |= set(a("ps", "-aq", "--no-trunc", "--filter", f"label={T}={self.id}").stdout.split())
        return ids

    def usage(self, stack) -> dict:
        return json.loads(manage(stack, "usage", self.id, "--json").stdout)["usage"]

    def cleanup(self) -> None:
        for a in self.admin:
            ids = a("ps", "-aq", "--filter", f"label={T}={self.id}").stdout.split()
            if ids:
                a("rm", "-f", *ids, check=False)


@pytest.fixture
def tenant(stack, scoper):
    t = Tenant(stack, scoper)
    try:
        yield t
    finally:
        t.cleanup()


def test_container_quota_is_shared_by_the_hosts(stack, tenant):
    manage(stack, "quota", "set", tenant.name, "--containers", "2")
    h1, h2 = tenant.cli
    c1 = h1("create", "busybox", "true").stdout.strip()
    c2 = h2("create", "busybox", "true").stdout.strip()
    for cli in (h1, h2):
        err = cli.fails("create", "busybox", "true", match="containers quota exceeded")
        assert "limit 2, in use 2, this request needs 1" in err
    # the bystander is unaffected
    alice = stack.scoper_cli("FDCS_CONFIG_A1")
    other = alice("create", "busybox", "true").stdout.strip()
    alice("rm", other)
    # removing one frees a unit, on either host
    h1("rm", c1)
    c3 = h2("create", "busybox", "true").stdout.strip()
    assert tenant.engine_ids() == {c2, c3}
    wait_for(lambda: tenant.usage(stack)["containers"] == 2, what="usage 2")


def test_concurrent_creates_admit_exactly_the_quota(stack, tenant):
    manage(stack, "quota", "set", tenant.name, "--containers", "10")

    def one(i):
        return tenant.cli[i % 2]("create", "busybox", "true", check=False)

    with cf.ThreadPoolExecutor(25) as pool:
        results = list(pool.map(one, range(50)))
    ok = [r for r in results if r.returncode == 0]
    refused = [r for r in results if r.returncode != 0]
    assert len(ok) == 10, [r.stderr for r in refused][:3]
    assert all("containers quota exceeded" in r.stderr for r in refused), {r.stderr for r in refused}
    assert tenant.engine_ids() == {r.stdout.strip() for r in ok}
    assert tenant.usage(stack)["containers"] == 10


def test_memory_quota_on_create_and_update(stack, tenant):
    manage(stack, "quota", "set", tenant.name, "--memory", "512m")
    h1, h2 = tenant.cli
    c1 = h1("create", "-m", "256m", "busybox", "true").stdout.strip()
    # no -m: the scoper gives the stack's default (256m), which is charged
    c2 = h2("create", "busybox", "true").stdout.strip()
    assert h2("inspect", "-f", "{{.HostConfig.Memory}}", c2).stdout.strip() == str(256 * MiB)
    err = h1.fails("create", "-m", "64m", "busybox", "true", match="memory quota exceeded")
    assert "limit 512 MiB, in use 512 MiB, this request needs 64 MiB" in err
    # an update that would exceed the sum is refused, and changes nothing
    h1.fails("update", "--memory", "384m", c1, match="memory quota exceeded")
    assert h1("inspect", "-f", "{{.HostConfig.Memory}}", c1).stdout.strip() == str(256 * MiB)
    # one that shrinks is allowed and frees the difference
    h1("update", "--memory", "128m", c1)
    assert h1("inspect", "-f", "{{.HostConfig.Memory}}", c1).stdout.strip() == str(128 * MiB)
    h1("create", "-m", "128m", "busybox", "true")
    assert tenant.usage(stack)["memory"] == 512 * MiB


def test_a_finite_memory_quota_needs_a_limit_in_plugin_only_mode(stack, tenant):
    """Straight on the engine nobody adds a default: the plugin refuses a
    container without a memory limit, and admits the same with one."""
    manage(stack, "quota", "set", tenant.name, "--memory", "1g")
    headers = json.loads((Path(tenant.config) / "config.json").read_text())["HttpHeaders"]
    raw = Raw(stack.env["FDCS_ENGINE_HOSTS"].split()[0].removeprefix("unix://"), headers)
    body = {"Image": "busybox", "Cmd": ["true"], "Labels": {T: tenant.id},
            "HostConfig": {"NetworkMode": "none", "PidsLimit": 10, "CgroupnsMode": "private"}}
    status, out = raw.request("POST", "/v1.41/containers/create", body)
    assert status == 403 and b"HostConfig.Memory (--memory) must be set" in out, out
    body["HostConfig"]["Memory"] = 64 * MiB
    status, out = raw.request("POST", "/v1.41/containers/create", body)
    assert status == 201, out


def test_the_reconciler_corrects_usage_from_the_engines(stack, tenant):
    """An administrator's container for the tenant (never charged by the
    plugin) is counted once the reconciler has seen it."""
    h1 = tenant.cli[0]
    h1("create", "busybox", "true")
    wait_for(lambda: tenant.usage(stack)["containers"] == 1, what="usage 1")
    tenant.admin[1]("create", "--label", f"{T}={tenant.id}", "--network", "none", "-m", "100m",
                    "busybox", "true")
    wait_for(lambda: tenant.usage(stack)["containers"] == 2, what="the reconciler's correction")
    assert tenant.usage(stack)["memory"] == 256 * MiB + 100 * MiB
