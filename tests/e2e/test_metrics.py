"""Monitoring on the real stack: the three daemons' /metrics endpoints.

Scraped with curl, parsed with prometheus_client's parser.  The decision
counters must move after a known allowed and a known denied request; the
per-tenant gauges must equal what the administrator's stock docker CLI lists
with label filters on the engines (a fresh tenant, so that nothing else
counts), polled until the reconciler has caught up; and the endpoints are
never the tenants' TLS port.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from authz_plugin import metrics
from authz_plugin.scoping import TENANT_LABEL

from .conftest import Cli, client_env, wait_for

DOCKER = "/usr/bin/docker"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one endpoint, fetched with curl."""
    p = subprocess.run(["curl", "-sS", "--fail", "--noproxy", "*", "--max-time", "10", url],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"curl {url}: {p.stderr}"
    out = {}
    for fam in text_string_to_metric_families(p.stdout):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def urls(stack, host: int) -> dict[str, str]:
    env = stack.env
    out = {"plugin": env[f"FDCS_METRICS_H{host}_PLUGIN"], "reconciler": env[f"FDCS_METRICS_H{host}_RECONCILER"]}
    if f"FDCS_METRICS_H{host}_SCOPER" in env:
        out["scoper"] = env[f"FDCS_METRICS_H{host}_SCOPER"]
    return out


def test_every_daemon_serves_metrics_on_its_own_port(stack):
    status = stack.status()
    for h in (1, 2):
        u = urls(stack, h)
        assert status[f"authz-h{h}"]["metrics"] == u["plugin"]
        assert status[f"reconciler-h{h}"]["metrics"] == u["reconciler"]
        assert get(scrape(u["plugin"]), "fdcs_store_up") == 1
        rec = scrape(u["reconciler"])
        assert get(rec, "fdcs_reconciler_passes_total", result="ok") >= 1
        assert get(rec, "fdcs_reconciler_last_pass_timestamp_seconds") > 0
        if "scoper" in u:
            assert status[f"scoper-h{h}"]["metrics"] == u["scoper"]
            assert ("fdcs_scoper_open_connections", ()) in scrape(u["scoper"])
    ports = {u.rsplit(":", 1)[1] for h in (1, 2) for u in urls(stack, h).values()}
    assert len(ports) == len(urls(stack, 1)) * 2  # one port each


def test_metrics_are_not_on_the_tenants_port(stack, scoper):
    # the TLS port answers plain HTTP with a refusal, never the metrics ...
    port = scoper.rsplit(":", 1)[1]
    p = subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"],
                       capture_output=True, text=True, timeout=30)
    assert "fdcs_" not in p.stdout and "TLS" in p.stdout
    # ... which its own listener serves (positive control)
    assert ("fdcs_scoper_open_connections", ()) in scrape(stack.env["FDCS_METRICS_H1_SCOPER"])


def _settled(url: str, name: str, **labels) -> dict:
    """A scrape once the plugin's workers have applied what they had queued
    (they apply decisions from a background thread, at most
    ``metrics.FLUSH_LINGER`` seconds late): two scrapes that far apart agree."""
    last = []

    def same():
        s = scrape(url)
        last.append(get(s, name, **labels))
        return s if len(last) > 1 and last[-1] == last[-2] else None
    return wait_for(same, timeout=30, interval=metrics.FLUSH_LINGER + 0.1, what=f"{name} to settle")


def _scrape_until(url: str, cond, what: str) -> dict:
    """The first scrape for which ``cond(samples)`` holds (polled)."""
    def check():
        s = scrape(url)
        return s if cond(s) else None
    return wait_for(check, timeout=30, what=what)


def test_decision_counters_move(stack):
    url = stack.env["FDCS_METRICS_H1_PLUGIN"]
    alice = stack.cli("FDCS_CONFIG_A1")  # straight on engine 1: every call is one plugin decision
    tenant = stack.env["FDCS_TENANT_A"]
    deny = ("fdcs_authz_decisions_total", {"hook": "request", "result": "deny", "reason": "policy"})
    before = _settled(url, deny[0], **deny[1])
    # denied: a container list that is not filtered by the tenant's label
    alice.fails("ps", match="filtered by your tenant label")
    after_deny = _scrape_until(url, lambda s: get(s, deny[0], **deny[1]) > get(before, deny[0], **deny[1]),
                               "the denied list to be counted")
    assert get(after_deny, deny[0], **deny[1]) == get(before, deny[0], **deny[1]) + 1
    # allowed: the same list, filtered (positive control)
    alice("ps", "--filter", f"label={TENANT_LABEL}={tenant}")
    ok = {"hook": "request", "result": "allow", "reason": "ok"}
    after_allow = _scrape_until(url, lambda s: get(s, "fdcs_authz_decisions_total", **ok) >=
                                get(after_deny, "fdcs_authz_decisions_total", **ok) + 1,
                                "the allowed list to be counted")
    assert get(after_allow, deny[0], **deny[1]) == get(after_deny, deny[0], **deny[1])
    assert get(after_allow, "fdcs_authz_hook_duration_seconds_count", hook="request") > \
        get(before, "fdcs_authz_hook_duration_seconds_count", hook="request")
    assert get(after_allow, "fdcs_identity_events_total", event="hit") >= 1


def test_scoper_counts_requests(stack, scoper):
    url = stack.env["FDCS_METRICS_H1_SCOPER"]
    before = scrape(url)
    stack.scoper_cli("FDCS_CONFIG_A1")("ps")
    after = scrape(url)
    key = {"method": "read", "endpoint": "containers", "status": "2xx"}
    assert get(after, "fdcs_scoper_requests_total", **key) >= get(before, "fdcs_scoper_requests_total", **key) + 1
    assert get(after, "fdcs_scoper_connections_total") > get(before, "fdcs_scoper_connections_total")
    assert get(after, "fdcs_scoper_sent_bytes_total") > get(before, "fdcs_scoper_sent_bytes_total")


# -- per-tenant gauges against the engines' truth -----------------------------------------

def _admin(stack, engine: str) -> Cli:
    return Cli(stack.env["FDCS_CONFIG_ADMIN"], engine, env=client_env())


def _listed(stack, tenant: str) -> dict[str, float]:
    """What the administrator's CLI lists for ``tenant`` on all engines (label filters)."""
    flt = f"label={TENANT_LABEL}={tenant}"
    n = {"containers": 0, "running": 0, "volumes": 0, "networks": 0}
    for engine in stack.env["FDCS_ENGINE_HOSTS"].split():
        admin = _admin(stack, engine)
        count = lambda *args: len(admin(*args, "-q", "--filter", flt).stdout.split())  # noqa: E731
        n["containers"] += count("ps", "-a")
        n["running"] += count("ps")
        n["volumes"] += count("volume", "ls")
        n["networks"] += count("network", "ls")
    return n


def _gauges(stack, tenant: str) -> dict[str, float]:
    s = scrape(stack.env["FDCS_METRICS_H1_PLUGIN"])
    assert get(s, "fdcs_store_up") == 1
    return {k: get(s, f"fdcs_tenant_{m}", tenant=tenant) for k, m in
            (("containers", "containers"), ("running", "containers_running"), ("volumes", "volumes"),
             ("networks", "networks"))}


def _host_gauges(stack, host: int, tenant: str) -> tuple[float, float]:
    s = scrape(stack.env[f"FDCS_METRICS_H{host}_RECONCILER"])
    return (get(s, "fdcs_host_tenant_containers", tenant=tenant),
            get(s, "fdcs_host_tenant_containers_running", tenant=tenant))


def _matches(stack, tenant: str, expect: dict[str, float] | None = None):
    listed = _listed(stack, tenant)
    gauges = _gauges(stack, tenant)
    if expect is not None and listed != expect:
        return False
    return gauges == listed and (listed, gauges)


def _clean(stack, tenant: str) -> None:
    flt = f"label={TENANT_LABEL}={tenant}"
    for engine in stack.env["FDCS_ENGINE_HOSTS"].split():
        admin = _admin(stack, engine)
        ids = admin("ps", "-aq", "--filter", flt, check=False).stdout.split()
        if ids:
            admin("rm", "-f", *ids, check=False)
        vols = admin("volume", "ls", "-q", "--filter", flt, check=False).stdout.split()
        if vols:
            admin("volume", "rm", "-f", *vols, check=False)
        nets = admin("network", "ls", "-q", "--filter", flt, check=False).stdout.split()
        if nets:
            admin("network", "rm", *nets, check=False)


def test_tenant_gauges_equal_the_engines(stack, scoper):
    name = f"metrics-{uuid.uuid4().hex[:6]}"
    p = stack.cmd("tenant", "add", name, "--users", "1")
    tenant, config_dir = p.stdout.split()[0], p.stdout.split()[1]
    assert Path(config_dir).is_dir()
    h1, h2 = stack.env["FDCS_DOCKER_HOSTS"].split()[:2]
    c1, c2 = stack.scoper_cli(config_dir, host=h1), stack.scoper_cli(config_dir, host=h2)
    try:
        c1("run", "-d", "--name", "m1", "busybox", "sleep", "600")
        c1("create", "--name", "m2", "busybox", "true")
        c1("volume", "create", "mv1")
        c1("network", "create", "mn1")
        c2("run", "-d", "--name", "m3", "busybox", "sleep", "600")
        expect = {"containers": 3, "running": 2, "volumes": 1}
        listed, gauges = wait_for(lambda: _matches(stack, tenant, {**_listed(stack, tenant), **expect}),
                                  timeout=60, what="the tenant gauges to equal the engines")
        assert listed["networks"] >= 1  # mn1 (and the tenant's default networks)
        # this host's view, from each reconciler
        wait_for(lambda: _host_gauges(stack, 1, tenant) == (2, 1) and _host_gauges(stack, 2, tenant) == (1, 1),
                 timeout=60, what="the reconcilers' host gauges")

        # a container stops: the running gauge follows (the reconciler's die event)
        c1("stop", "-t", "0", "m1")
        wait_for(lambda: _matches(stack, tenant, {**_listed(stack, tenant), "containers": 3, "running": 1}),
                 timeout=60, what="the running gauge after a stop")
        wait_for(lambda: _host_gauges(stack, 1, tenant) == (2, 0), timeout=60, what="host 1's running gauge")

        # reserved memory and CPUs exist only with quotas (fdcs:usage:<tenant>)
        import redis
        r = redis.Redis.from_url(stack.env["FDCS_REDIS_URL"], decode_responses=True)
        usage = r.hgetall(f"fdcs:usage:{tenant}")
        s = scrape(stack.env["FDCS_METRICS_H1_PLUGIN"])
        mem = s.get(("fdcs_tenant_memory_reserved_bytes", (("tenant", tenant),)))
        if usage:
            assert mem == float(usage.get("memory", 0))
            assert s.get(("fdcs_tenant_cpus_reserved", (("tenant", tenant),))) == float(usage.get("cpus", 0)) / 1e9
        else:
            assert mem is None
    finally:
        _clean(stack, tenant)
    # everything gone: so are the tenant's gauges
    wait_for(lambda: _gauges(stack, tenant) == {"containers": 0, "running": 0, "volumes": 0, "networks": 0},
             timeout=60, what="the tenant's gauges to go")
    assert _listed(stack, tenant) == {"containers": 0, "running": 0, "volumes": 0, "networks": 0}
