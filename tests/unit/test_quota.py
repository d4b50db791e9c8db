"""Quotas: the pure sizing rules, the Redis scripts (fakeredis runs the same
Lua) and the authorizer's admission and settling, on fakes."""

from __future__ import annotations

import threading

import fakeredis
import pytest

from authz_plugin import quota as q
from authz_plugin.errors import ConfigError, Denied
from authz_plugin.ownership import Store
from authz_plugin.policy import Authorizer
from authz_plugin.quota import KEEP, QuotaPolicy
from authz_plugin.scoping import TENANT_LABEL

from .conftest import TA, TB, FakeIdentityService, cfg, payload

V = "/v1.41"
GiB, MiB = 1024**3, 1024**2


def qcfg(**kw):
    base = {"quota.enabled": True}
    base.update({f"quota.{k}": v for k, v in kw.items()})
    return cfg(**base)


def body(tenant=TA, **hc):
    b = {"Image": "busybox", "Labels": {TENANT_LABEL: tenant},
         "HostConfig": {"NetworkMode": "none", "PidsLimit": 100, "CgroupnsMode": "private"}}
    b["HostConfig"].update(hc)
    return b


def cid(n: int) -> str:
    return f"{n:064x}"


class World:
    """One authorizer per host over one fake Redis, and helpers to drive
    both hooks as the engine does."""

    def __init__(self, redis_server, **quota):
        self.stores = {}
        self.authz = {}
        for host in ("h1", "h2"):
            st = Store(fakeredis.FakeRedis(server=redis_server, decode_responses=True), host=host)
            st.mark_complete(0)
            self.stores[host] = st
            c = cfg(**{"quota.enabled": True, "host.id": host, **{f"quota.{k}": v for k, v in quota.items()}})
            self.authz[host] = Authorizer(c, FakeIdentityService(), st)
        self.q = self.authz["h1"].quota
        self.n = 0

    def request(self, host, method, uri, b=None, token="tok-alice"):
        return self.authz[host].authz_request(payload(method, uri, b, token=token))

    def respond(self, host, method, uri, b, status, response, token="tok-alice"):
        r = self.authz[host].authz_response(payload(method, uri, b, token=token, status=status, response=response))
        assert r["Allow"], r

    def create(self, host="h1", b=None, token="tok-alice", ok=True, name=None):
        """AuthZReq, then AuthZRes (201 with a new id, or 500): returns (decision, id)."""
        b = b or body()
        uri = f"{V}/containers/create" + (f"?name={name}" if name else "")
        r = self.request(host, "POST", uri, b, token)
        if not r["Allow"]:
            return r, None
        self.n += 1
        id_ = cid(self.n)
        if ok:
            self.respond(host, "POST", uri, b, 201, {"Id": id_, "Warnings": []}, token)
        else:
            self.respond(host, "POST", uri, b, 500, {"message": "boom"}, token)
        return r, id_ if ok else None

    def remove(self, host, id_, token="tok-alice"):
        uri = f"{V}/containers/{id_}?force=1"
        assert self.request(host, "DELETE", uri, token=token)["Allow"]
        self.respond(host, "DELETE", uri, None, 204, None, token)


def assert_invariant(st: Store):
    """usage of every tenant == the sum of its charges."""
    sums: dict[str, list[int]] = {}
    for raw in st.r.hgetall("fdcs:charge").values():
        t, _, vec, _ = q.parse_charge(raw)
        acc = sums.setdefault(t, [0] * 5)
        for i, v in enumerate(vec):
            acc[i] += v
    for key in st.r.keys("fdcs:usage:*"):
        t = key.split(":", 2)[2]
        usage = st.r.hgetall(key)
        assert [int(usage.get(m, 0)) for m in q.METRICS] == sums.get(t, [0] * 5), t


# -- pure ------------------------------------------------------------------------


def test_nano_cpus_reads_both_spellings_and_rounds_up():
    assert q.nano_cpus({"NanoCpus": 1_500_000_000}) == 1_500_000_000
    assert q.nano_cpus({"CpuQuota": 50_000}) == 500_000_000  # default period 100 ms
    assert q.nano_cpus({"CpuQuota": 50_000, "CpuPeriod": 200_000}) == 250_000_000
    assert q.nano_cpus({"CpuQuota": 1, "CpuPeriod": 3}) == 333_333_334
    assert q.nano_cpus({"CpuQuota": -1}) == 0 and q.nano_cpus({}) == 0


def test_config_limits_sizes_and_flavors():
    c = qcfg(containers="unlimited", memory="2g", cpus="1.5", flavors={"small": "256m,0.5"}, default_flavor="small")
    p = QuotaPolicy.from_config(c)
    assert p.defaults == {"containers": -1, "memory": 2 * GiB, "cpus": 1_500_000_000, "volumes": -1, "networks": -1}
    assert p.flavor("small") == q.Flavor("small", 256 * MiB, 500_000_000)
    for bad in ({"quota.memory": "lots"}, {"quota.containers": -2}, {"quota.flavors": {"x": "1g"}},
                {"quota.default_flavor": "huge", "quota.flavors": {"small": "256m,0.5"}},
                {"quota.flavor_required": True}):
        with pytest.raises(ConfigError):
            cfg(**{"quota.enabled": True, **bad})
    with pytest.raises(ConfigError, match="quota.enabled"):
        cfg(**{"quota.flavors": {"small": "256m,0.5"}})


def test_create_defaults_fill_only_what_is_missing():
    p = QuotaPolicy(enabled=True, default_memory=256 * MiB, default_nano_cpus=10**9)
    assert p.create_defaults({}) == {"Memory": 256 * MiB, "NanoCpus": 10**9}
    assert p.create_defaults({"Memory": GiB}) == {"NanoCpus": 10**9}
    assert p.create_defaults({"CpuQuota": 50000}) == {"Memory": 256 * MiB}
    assert QuotaPolicy(enabled=False, default_memory=1).create_defaults({}) == {}
    f = QuotaPolicy(enabled=True, flavors=(q.Flavor("s", 256 * MiB, 5 * 10**8),), flavor_required=True,
                    default_flavor="s")
    assert f.create_defaults({}) == {"Memory": 256 * MiB, "NanoCpus": 5 * 10**8}
    assert f.create_defaults({"Memory": GiB}) == {}  # a size given: the plugin decides whether it is a flavor


def test_flavor_required_refuses_other_sizes_with_the_list():
    f = QuotaPolicy(enabled=True, flavors=(q.Flavor("s", 256 * MiB, 5 * 10**8), q.Flavor("l", GiB, 10**9)),
                    flavor_required=True)
    assert f.check_create({"Memory": GiB, "NanoCpus": 10**9}) == (1, GiB, 10**9, 0, 0)
    with pytest.raises(Denied, match=r"not one of this service's flavors: s \(256 MiB, 0.5 CPUs\), l \(1 GiB, 1 CPUs\)"):
        f.check_create({"Memory": GiB, "NanoCpus": 5 * 10**8})
    with pytest.raises(Denied, match="flavors"):
        f.check_create({})


def test_update_vector_keeps_what_the_engine_keeps():
    p = QuotaPolicy(enabled=True)
    assert p.check_update({"Memory": GiB}) == (KEEP, GiB, KEEP, KEEP, KEEP)
    assert p.check_update({"NanoCpus": 10**9, "CpuShares": 2}) == (KEEP, KEEP, 10**9, KEEP, KEEP)
    with pytest.raises(Denied, match="--cpus"):
        p.check_update({"CpuQuota": 1000})
    with pytest.raises(Denied, match="negative"):
        p.check_update({"Memory": -1})


# -- the scripts, through the authorizer --------------------------------------------


def test_count_quota_is_shared_by_hosts_and_freed_by_removal(redis_server):
    w = World(redis_server)
    w.q.set_limits(TB, {"containers": 2})
    _, b1 = w.create("h1", body(TB), token="tok-bob")
    _, b2 = w.create("h2", body(TB), token="tok-bob")
    for host in ("h1", "h2"):
        r, _ = w.create(host, body(TB), token="tok-bob")
        assert not r["Allow"]
        assert "containers quota exceeded for project " + TB in r["Msg"]
        assert "limit 2, in use 2, this request needs 1" in r["Msg"]
    assert w.create("h1", body(TA))[0]["Allow"]  # the other tenant is unaffected
    w.remove("h2", b2, token="tok-bob")
    assert w.q.usage(TB)["containers"] == 1
    assert w.create("h1", body(TB), token="tok-bob")[0]["Allow"]
    assert_invariant(w.stores["h1"])


def test_failed_create_gives_its_units_back(redis_server):
    w = World(redis_server, containers=1)
    r, _ = w.create(ok=False)
    assert r["Allow"]
    assert w.q.usage(TA)["containers"] == 0
    assert w.create()[0]["Allow"]
    assert not w.create()[0]["Allow"]
    assert_invariant(w.stores["h1"])


def test_name_conflict_after_admission_gives_units_back(redis_server):
    w = World(redis_server, containers=5)
    name = f"{TA}_web"
    w.create("h1", name=name)
    r, _ = w.create("h2", name=name)  # the name is held by h1: refused after the quota admitted it
    assert not r["Allow"] and "already in use" in r["Msg"]
    assert w.q.usage(TA)["containers"] == 1
    assert_invariant(w.stores["h1"])


def test_memory_and_cpu_sums(redis_server):
    w = World(redis_server, memory="1g", cpus="1")
    assert w.create(b=body(Memory=512 * MiB, NanoCpus=5 * 10**8))[0]["Allow"]
    r, _ = w.create(b=body(Memory=768 * MiB, NanoCpus=10**8))
    assert not r["Allow"]
    assert "memory quota exceeded" in r["Msg"] and "limit 1 GiB, in use 512 MiB, this request needs 768 MiB" in r["Msg"]
    r, _ = w.create(b=body(Memory=256 * MiB, CpuQuota=60_000))
    assert not r["Allow"] and "cpus quota exceeded" in r["Msg"] and "in use 0.5" in r["Msg"]
    assert w.create(b=body(Memory=512 * MiB, CpuQuota=50_000))[0]["Allow"]
    assert w.q.usage(TA) == {"containers": 2, "memory": GiB, "cpus": 10**9, "volumes": 0, "networks": 0}


def test_finite_memory_quota_needs_a_memory_limit(redis_server):
    w = World(redis_server, memory="1g")
    r, _ = w.create(b=body())
    assert not r["Allow"] and "HostConfig.Memory (--memory) must be set" in r["Msg"]
    assert w.create(b=body(Memory=64 * MiB))[0]["Allow"]
    w2 = World(fakeredis.FakeServer())  # unlimited: no limit needed
    assert w2.create(b=body())[0]["Allow"]


def test_update_holds_the_larger_size_and_settles_to_the_new(redis_server):
    w = World(redis_server, memory="1g")
    _, c1 = w.create(b=body(Memory=256 * MiB))
    _, c2 = w.create(b=body(Memory=256 * MiB))
    uri = f"{V}/containers/{c1}/update"
    up = {"Memory": 800 * MiB}
    r = w.request("h1", "POST", uri, up)
    assert not r["Allow"] and "in use 512 MiB, this request needs 544 MiB" in r["Msg"]
    up = {"Memory": 512 * MiB}
    assert w.request("h1", "POST", uri, up)["Allow"]
    assert w.q.usage(TA)["memory"] == 768 * MiB  # held while in flight
    w.respond("h1", "POST", uri, up, 200, {"Warnings": []})
    assert w.q.usage(TA)["memory"] == 768 * MiB
    # a failed update restores the old size; a smaller one frees the difference
    up = {"Memory": 128 * MiB}
    assert w.request("h1", "POST", uri, up)["Allow"]
    w.respond("h1", "POST", uri, up, 500, {"message": "no"})
    assert w.q.usage(TA)["memory"] == 768 * MiB
    assert w.request("h1", "POST", uri, up)["Allow"]
    w.respond("h1", "POST", uri, up, 200, {"Warnings": []})
    assert w.q.usage(TA)["memory"] == 384 * MiB
    w.remove("h1", c2)
    assert w.q.usage(TA) == {"containers": 1, "memory": 128 * MiB, "cpus": 0, "volumes": 0, "networks": 0}
    assert_invariant(w.stores["h1"])


def test_update_of_another_tenants_container_is_not_found(redis_server):
    w = World(redis_server, memory="1g")
    _, c1 = w.create(b=body(Memory=256 * MiB))
    r = w.request("h1", "POST", f"{V}/containers/{c1}/update", {"Memory": 512 * MiB}, token="tok-bob")
    assert not r["Allow"] and "No such container" in r["Msg"]
    assert w.q.usage(TB)["memory"] == 0 and w.q.usage(TA)["memory"] == 256 * MiB


def test_named_volumes_count_once(redis_server):
    w = World(redis_server, volumes=2)
    vol = f"{TA}_data"
    b = body(Binds=[f"{vol}:/data"])
    _, c1 = w.create(b=b)
    assert w.q.usage(TA)["volumes"] == 1
    assert w.q.charge(f"volume/{vol}")[2] == (0, 0, 0, 1, 0)
    w.create(b=b)  # the same volume again: no new unit
    assert w.q.usage(TA)["volumes"] == 1
    vb = {"Name": f"{TA}_v2", "Labels": {TENANT_LABEL: TA}}
    assert w.request("h1", "POST", f"{V}/volumes/create", vb)["Allow"]
    w.respond("h1", "POST", f"{V}/volumes/create", vb, 201, {"Name": f"{TA}_v2", "Labels": {TENANT_LABEL: TA}})
    assert w.q.usage(TA)["volumes"] == 2
    vb3 = {"Name": f"{TA}_v3", "Labels": {TENANT_LABEL: TA}}
    r = w.request("h1", "POST", f"{V}/volumes/create", vb3)
    assert not r["Allow"] and "volumes quota exceeded" in r["Msg"]
    uri = f"{V}/volumes/{TA}_v2"
    assert w.request("h1", "DELETE", uri)["Allow"]
    w.respond("h1", "DELETE", uri, None, 204, None)
    assert w.q.usage(TA)["volumes"] == 1
    assert_invariant(w.stores["h1"])


def test_networks_count(redis_server):
    w = World(redis_server, networks=1)
    nb = {"Name": f"{TA}_net", "Labels": {TENANT_LABEL: TA}}
    assert w.request("h1", "POST", f"{V}/networks/create", nb)["Allow"]
    w.respond("h1", "POST", f"{V}/networks/create", nb, 201, {"Id": "n" * 64})
    nb2 = {"Name": f"{TA}_net2", "Labels": {TENANT_LABEL: TA}}
    r = w.request("h2", "POST", f"{V}/networks/create", nb2)
    assert not r["Allow"] and "networks quota exceeded" in r["Msg"]
    assert w.q.usage(TA)["networks"] == 1


def test_concurrent_admissions_never_pass_the_limit(redis_server):
    w = World(redis_server)
    w.q.set_limits(TB, {"containers": 10})
    results = []
    lock = threading.Lock()

    def one(i):
        r = w.request("h1" if i % 2 else "h2", "POST", f"{V}/containers/create", body(TB), token="tok-bob")
        with lock:
            results.append(r["Allow"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 10
    assert w.q.usage(TB)["containers"] == 10


def test_admin_is_not_charged_and_quotas_off_cost_nothing(redis_server):
    w = World(redis_server, containers=0)
    r, _ = w.create(b=body(), token="tok-admin")
    assert r["Allow"]
    assert not w.create()[0]["Allow"]
    st = Store(fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True), host="h1")
    st.mark_complete(0)
    off = Authorizer(cfg(), FakeIdentityService(), st)
    assert off.quota is None
    assert off.authz_request(payload("POST", f"{V}/containers/create", body()))["Allow"]
    assert not st.r.exists("fdcs:charge")


def test_overrides_beat_defaults_and_clear(redis_server):
    w = World(redis_server, containers=5)
    assert w.q.limits(TA)["containers"] == 5
    w.q.set_limits(TA, {"containers": -1, "memory": GiB})
    assert w.q.limits(TA)["containers"] == -1 and w.q.limits(TA)["memory"] == GiB
    w.q.clear_limits(TA, ("memory",))
    assert w.q.limits(TA)["memory"] == -1 and w.q.overrides(TA) == {"containers": -1}
    w.q.clear_limits(TA)
    assert w.q.overrides(TA) == {}


# -- the reconciler's correction ----------------------------------------------------------


def test_sync_adds_removes_corrects_and_expires(redis_server):
    w = World(redis_server)
    qs = w.q
    _, c1 = w.create(b=body(Memory=GiB))
    _, c2 = w.create()
    # a pending create whose response never came, past its deadline
    w.request("h1", "POST", f"{V}/containers/create", body(Memory=5))
    before = qs.charges("h1")
    assert any(f.startswith("pending/h1/") for f in before)
    want = {f"container/{c1}": (TA, (1, 2 * GiB, 0, 0, 0)),  # resized behind our back
            f"container/{cid(99)}": (TB, (1, 0, 0, 0, 0))}  # made by an administrator for tenant-b
    counts = qs.sync(before, want, now=10**12)
    assert counts == {"added": 1, "removed": 1, "corrected": 1, "expired": 1}
    assert qs.usage(TA) == {"containers": 1, "memory": 2 * GiB, "cpus": 0, "volumes": 0, "networks": 0}
    assert qs.usage(TB)["containers"] == 1
    assert_invariant(w.stores["h1"])


def test_sync_leaves_charges_written_meanwhile(redis_server):
    w = World(redis_server)
    qs = w.q
    _, c1 = w.create(b=body(Memory=GiB))
    before = qs.charges("h1")
    # while the engine is read, the tenant resizes c1 and creates c3
    uri = f"{V}/containers/{c1}/update"
    w.request("h1", "POST", uri, {"Memory": 2 * GiB})
    w.respond("h1", "POST", uri, {"Memory": 2 * GiB}, 200, {})
    counts = qs.sync(before, {f"container/{c1}": (TA, (1, GiB, 0, 0, 0))})
    assert counts["corrected"] == 0
    assert qs.usage(TA)["memory"] == 2 * GiB
    assert_invariant(w.stores["h1"])


def test_removing_a_record_discharges_and_retire_host_drops_pending(redis_server):
    w = World(redis_server)
    _, c1 = w.create("h2", b=body(Memory=GiB))
    w.request("h2", "POST", f"{V}/containers/create", body(Memory=5))  # in flight on h2
    assert w.q.usage(TA)["containers"] == 2
    assert w.stores["h2"].retire_host() >= 1
    assert w.q.usage(TA) == {m: 0 for m in q.METRICS}
    assert w.stores["h1"].r.hlen("fdcs:charge") == 0


def test_suspended_tenant_is_refused_everything(redis_server, monkeypatch):
    w = World(redis_server)
    st = w.stores["h1"]
    st.suspend(TA, "admin", "unpaid invoice")
    monkeypatch.setattr(w.authz["h1"], "_suspended", (0.0, {}))
    r = w.request("h1", "GET", f"{V}/containers/json?filters=" + '{"label":["%s=%s"]}' % (TENANT_LABEL, TA))
    assert not r["Allow"] and "suspended" in r["Msg"] and "unpaid invoice" in r["Msg"]
    assert w.request("h1", "GET", f"{V}/info", token="tok-bob")["Allow"]
    assert st.resume(TA)
    monkeypatch.setattr(w.authz["h1"], "_suspended", (0.0, {}))
    assert w.request("h1", "GET", f"{V}/info")["Allow"]


def test_admission_waits_for_the_rebuild_after_a_redis_loss(redis_server):
    w = World(redis_server)
    w.stores["h1"].r.hdel("fdcs:reconciled", "h1")  # as after a loss of Redis data
    r, _ = w.create("h1")
    assert not r["Allow"] and "being rebuilt" in r["Msg"]
    assert w.create("h2")[0]["Allow"]  # host 2 has reconciled
    w.stores["h1"].mark_complete(1)
    assert w.create("h1")[0]["Allow"]


def test_admission_waits_until_every_host_can_have_reconciled(redis_server):
    """Other hosts' usage is known only once they have passed too: with a
    ``settle`` time, admission waits for it after a loss of data (finding F2)."""
    st = Store(fakeredis.FakeRedis(server=redis_server, decode_responses=True), host="h1", settle=60)
    st.mark_complete(1)
    c = cfg(**{"quota.enabled": True, "host.id": "h1"})
    authz = Authorizer(c, FakeIdentityService(), st)
    uri = f"{V}/containers/create"
    r = authz.authz_request(payload("POST", uri, body()))
    assert not r["Allow"] and "being rebuilt" in r["Msg"], r
    st.r.set("fdcs:epoch", f" {int(st.r.time()[0]) - 61}")
    assert authz.authz_request(payload("POST", uri, body()))["Allow"]


def test_the_same_request_on_two_hosts_settles_each_hosts_own_charge(redis_server):
    """Identical creates on both hosts share one fingerprint; a host's
    response must settle its own pending charge, or the other host's
    reconciler would take the container for one of its own, find it missing
    and free its unit while it exists (over-admission)."""
    w = World(redis_server)
    w.q.set_limits(TA, {"containers": 2})
    b = body()
    uri = f"{V}/containers/create"
    assert w.request("h2", "POST", uri, b)["Allow"]  # h2's charge is pending first
    assert w.request("h1", "POST", uri, b)["Allow"]
    w.respond("h1", "POST", uri, b, 201, {"Id": cid(1), "Warnings": []})
    assert w.q.charge(f"container/{cid(1)}")[1] == "h1"
    # h2's reconciler, which has not seen the container, keeps its unit
    h2 = w.authz["h2"].quota
    h2.sync(h2.charges("h2"), {})
    assert w.q.usage(TA)["containers"] == 2
    assert not w.create("h1")[0]["Allow"]
    w.respond("h2", "POST", uri, b, 201, {"Id": cid(2), "Warnings": []})
    assert w.q.charge(f"container/{cid(2)}")[1] == "h2"
    assert_invariant(w.stores["h1"])
