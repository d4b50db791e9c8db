"""Issue 4 acceptance: ownership and names consistent across two hosts.

The session stack runs two hosts (each an engine in its own network
namespace with its plugin, reconciler and name scoper) sharing one Redis and
one Keystone.  Tenants use the stock CLI through the scopers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import uuid

import pytest
import redis

from .conftest import wait_for

A1, A2, B1, ADMIN = "FDCS_CONFIG_A1", "FDCS_CONFIG_A2", "FDCS_CONFIG_B1", "FDCS_CONFIG_ADMIN"


@pytest.fixture(scope="module")
def hosts(stack, scoper):
    h = stack.env["FDCS_DOCKER_HOSTS"].split()
    assert len(h) == 2, h
    return h


@pytest.fixture(scope="module")
def engines(stack):
    return stack.env["FDCS_ENGINE_HOSTS"].split()


def uniq(p="c"):
    return f"{p}{uuid.uuid4().hex[:6]}"


def reconcile_once(stack, k: int) -> dict:
    """A full reconcile of host k now, as an operator would run it; its counts."""
    env = dict(os.environ)
    env.update(FDCS_HOST_ID=_host_id(stack, k),
               FDCS_RECONCILER_ENGINE_SOCKET=stack.env["FDCS_ENGINE_HOSTS"].split()[k - 1].removeprefix("unix://"))
    p = subprocess.run(["fdcs-reconciler", "--once", "--config", stack.env["FDCS_CONF"]], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _host_id(stack, k: int) -> str:
    # the plugin name is the host id in the local stack (fdcs-<stack>-hK)
    return stack.status()[f"authz-h{k}"]["addr"].rsplit("/", 1)[1].removesuffix(".sock")


def test_a_container_is_its_tenants_on_every_host_and_its_name_unique(stack, hosts, engines):
    h1, h2 = hosts
    alice1, alice2 = stack.scoper_cli(A1, h1), stack.scoper_cli(A1, h2)
    carol1 = stack.scoper_cli(A2, h1)
    bob1, bob2 = stack.scoper_cli(B1, h1), stack.scoper_cli(B1, h2)
    name = uniq("web")
    cid = alice1("run", "-d", "--name", name, "busybox", "sleep", "600").stdout.strip()
    try:
        assert carol1("inspect", "-f", "{{.Id}}", name).stdout.strip() == cid
        for bob in (bob1, bob2):
            for ref in (cid, cid[:12]):
                bob.fails("inspect", "--type", "container", ref, match="No such container")
                bob.fails("stop", ref, match="No such container")
        # straight on the engines too
        for engine in engines:
            stack.cli(B1, engine).fails("inspect", "--type", "container", cid, match="No such container")
        # the same name on host 2 is a conflict, with a clear message ...
        err = alice2.fails("run", "-d", "--name", name, "busybox", "sleep", "600")
        assert "already in use on host" in err and name in err and stack.env["FDCS_TENANT_A"] not in err, err
        # ... while another name works there (positive control)
        other = alice2("run", "-d", "--name", uniq("ok"), "busybox", "true").stdout.strip()
        alice2("rm", "-f", other)
    finally:
        alice1("rm", "-f", name)
    # once removed on host 1, the name is free on host 2
    cid2 = alice2("run", "-d", "--name", name, "busybox", "sleep", "600").stdout.strip()
    alice2("rm", "-f", cid2)


def test_two_hosts_racing_for_a_name_exactly_one_wins(stack, hosts):
    name = uniq("race")
    results = {}

    def create(i, host):
        results[i] = stack.scoper_cli(A1, host)("create", "--name", name, "busybox", "true", check=False)

    threads = [threading.Thread(target=create, args=(i, h)) for i, h in enumerate(hosts * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [i for i, p in results.items() if p.returncode == 0]
    try:
        assert len(wins) == 1, {i: p.stderr for i, p in results.items()}
        for i, p in results.items():
            if i not in wins:
                assert "in use" in p.stderr or "Conflict" in p.stderr, p.stderr
    finally:
        for h in hosts:
            stack.scoper_cli(A1, h)("rm", "-f", name, check=False)


def test_redis_loss_is_repaired_from_the_labels(stack, hosts):
    h1, h2 = hosts
    alice, bob = stack.scoper_cli(A1, h1), stack.scoper_cli(B1, h1)
    name = uniq("keep")
    cid = alice("run", "-d", "--name", name, "busybox", "sleep", "600").stdout.strip()
    vol = uniq("vol")
    alice("volume", "create", vol)
    try:
        os.kill(stack.pid("redis"), signal.SIGKILL)
        wait_for(lambda: stack.status()["redis"]["state"] == "down", what="redis down")
        alice.fails("inspect", cid[:12], match="unavailable")
        stack.cmd("up")  # an empty Redis comes back; each reconciler rebuilds its host
        assert alice("inspect", "-f", "{{.Id}}", cid[:12]).stdout.strip() == cid
        assert alice("inspect", "-f", "{{.Id}}", name).stdout.strip() == cid
        assert vol in alice("volume", "ls", "-q").stdout.split()
        bob.fails("inspect", "--type", "container", cid, match="No such container")
        r = redis.Redis.from_url(stack.env["FDCS_REDIS_URL"], decode_responses=True)
        assert r.hget("fdcs:own:container", cid) == stack.env["FDCS_TENANT_A"]  # nothing changed tenant
        # the name is still held cluster-wide
        stack.scoper_cli(A1, h2).fails("create", "--name", name, "busybox", "true", match="in use")
    finally:
        alice("rm", "-f", cid, check=False)
        alice("volume", "rm", vol, check=False)


def test_an_engine_restart_keeps_records_consistent(stack, hosts):
    alice = stack.scoper_cli(A1, hosts[1])
    name = uniq("rs")
    cid = alice("run", "-d", "--restart", "always", "--name", name, "busybox", "sleep", "600").stdout.strip()
    try:
        os.kill(stack.pid("engine-h2"), signal.SIGKILL)
        wait_for(lambda: stack.status()["engine-h2"]["state"] == "down", what="engine down")
        stack.cmd("up")
        wait_for(lambda: alice("inspect", "-f", "{{.Id}}", name, check=False).stdout.strip() == cid,
                 what="the container back")
        counts = reconcile_once(stack, 2)
        assert counts["added"] == counts["removed"] == 0, counts
    finally:
        alice("rm", "-f", name, check=False)


def test_concurrent_mixed_operations_leave_no_drift(stack, hosts):
    """2 hosts x 4 tenants x 100 mixed operations, concurrently; then a full
    reconcile of each host finds zero drift and every tenant's lists equal
    its records."""
    tenants = [("FDCS_CONFIG_A1", stack.env["FDCS_TENANT_A"]), ("FDCS_CONFIG_B1", stack.env["FDCS_TENANT_B"])]
    for i in range(2):
        lines = stack.cmd("tenant", "add", uniq("t"), "--users", "1").stdout.split()
        tenants.append((lines[1], lines[0]))  # the project id, then the users' config dirs
    errors = []

    def work(cfg, host, k):
        cli = stack.scoper_cli(cfg, host)
        try:
            for j in range(14):  # 14 rounds x 7-8 operations: over 100 per tenant and host
                n = f"w{k}x{j}"
                cli("volume", "create", f"v{k}x{j}")
                cli("network", "create", f"n{k}x{j}")
                cli("create", "--name", n, "-v", f"v{k}x{j}:/d", "--network", f"n{k}x{j}", "busybox", "sleep", "30")
                cli("start", n)
                cli("rename", n, n + "r")
                if j % 2:
                    cli("rm", "-f", n + "r")
                    cli("network", "rm", f"n{k}x{j}")
                    cli("volume", "rm", f"v{k}x{j}")
                else:
                    cli("stop", "-t", "0", n + "r")
        except AssertionError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=work, args=(cfg, host, f"{t}{h}"))
               for t, (cfg, _) in enumerate(tenants) for h, host in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[:3]
        for k in (1, 2):
            counts = reconcile_once(stack, k)
            assert counts["added"] == counts["removed"] == counts["execs_added"] == 0, counts
        r = redis.Redis.from_url(stack.env["FDCS_REDIS_URL"], decode_responses=True)
        owners = r.hgetall("fdcs:own:container")
        for cfg, tid in tenants:
            for host in hosts:
                listed = set(stack.scoper_cli(cfg, host)("ps", "-aq", "--no-trunc").stdout.split())
                recorded = {c for c, t in owners.items() if t == tid
                            and r.hget("fdcs:host:container", c) == _host_id(stack, hosts.index(host) + 1)}
                assert listed == recorded, (tid, host, listed ^ recorded)
    finally:
        for cfg, _ in tenants:
            for host in hosts:
                cli = stack.scoper_cli(cfg, host)
                ids = cli("ps", "-aq").stdout.split()
                if ids:
                    cli("rm", "-f", *ids, check=False)
                cli("network", "prune", "-f", check=False)
                cli("volume", "prune", "-f", check=False)


def test_retiring_a_host_removes_its_records_only(stack, hosts):
    alice1, alice2 = stack.scoper_cli(A1, hosts[0]), stack.scoper_cli(A1, hosts[1])
    c1 = alice1("run", "-d", "--name", uniq("one"), "busybox", "sleep", "600").stdout.strip()
    c2 = alice2("run", "-d", "--name", uniq("two"), "busybox", "sleep", "600").stdout.strip()
    r = redis.Redis.from_url(stack.env["FDCS_REDIS_URL"], decode_responses=True)
    h2 = _host_id(stack, 2)
    rec = stack.pid("reconciler-h2")
    os.kill(rec, signal.SIGSTOP)  # a retired host has no reconciler re-adding its records
    try:
        p = subprocess.run(["fdcs-reconciler", "--config", stack.env["FDCS_CONF"], "--retire-host", h2],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and json.loads(p.stdout)["records_removed"] >= 1, p.stderr
        assert r.hget("fdcs:own:container", c2) is None and h2 not in r.hkeys("fdcs:reconciled")
        assert r.hget("fdcs:own:container", c1) == stack.env["FDCS_TENANT_A"]  # host 1 untouched
    finally:
        os.kill(rec, signal.SIGCONT)
    # (the host was not really gone: its reconciler restores its records)
    wait_for(lambda: r.hget("fdcs:own:container", c2) == stack.env["FDCS_TENANT_A"], timeout=30,
             what="host 2's records restored")
    alice1("rm", "-f", c1)
    alice2("rm", "-f", c2)
