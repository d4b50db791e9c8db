"""The reconciler's event path: counts coalesced per tenant, records from the
events' own attributes (fakes: an engine API that counts its calls, fakeredis)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import fakeredis
import pytest

from authz_plugin import metrics
from authz_plugin.ownership import Store
from authz_plugin.scoping import TENANT_LABEL
from name_scoper.reconciler import Reconciler, primary_name

TA, TB = "a" * 32, "b" * 32
C1, C2, C3, C4 = "1" * 64, "2" * 64, "3" * 64, "4" * 64
PLAIN, LABELLED = "sha256:" + "e" * 64, "sha256:" + "f" * 64  # image ids


class _API:
    """The engine as docker-py's APIClient shows it, counting every call."""

    def __init__(self):
        self.c: dict[str, dict] = {}
        self.calls: list[str] = []

    def put(self, cid, name, tenant=None, image=PLAIN, running=False, links=()):
        labels = {TENANT_LABEL: tenant} if tenant else {}
        if image == LABELLED:  # the container inherits its image's label
            labels = {TENANT_LABEL: TA, **labels}
        self.c[cid] = {"Name": name, "Labels": labels, "Image": image, "Running": running, "Links": list(links)}

    def containers(self, all=True, quiet=False, filters=None):
        want = (filters or {}).get("label")
        self.calls.append(f"list {want}")
        out = []
        for i, c in self.c.items():
            if want and f"{TENANT_LABEL}={c['Labels'].get(TENANT_LABEL)}" != want:
                continue
            # the engine lists link names too, in no defined order
            out.append({"Id": i, "Names": [*c["Links"], "/" + c["Name"]], "Labels": c["Labels"],
                        "ImageID": c["Image"], "State": "running" if c["Running"] else "exited"})
        return out

    def inspect_container(self, cid):
        import docker.errors
        self.calls.append(f"inspect {cid[:4]}")
        if cid not in self.c:
            raise docker.errors.NotFound("no such container")
        c = self.c[cid]
        return {"Id": cid, "Name": "/" + c["Name"], "Image": c["Image"], "Config": {"Labels": c["Labels"]},
                "State": {"Running": c["Running"]}, "ExecIDs": None, "Mounts": [], "HostConfig": {}}

    def inspect_image(self, image):
        self.calls.append(f"image {image[7:11]}")
        return {"Config": {"Labels": {TENANT_LABEL: TA} if image == LABELLED else None}}


def ev(action, cid, api=None, **attrs):
    """The engine's event for ``cid`` (moby LogContainerEventWithAttributes:
    the container's labels, then its name)."""
    if api is not None and cid in api.c:
        attrs = {**attrs, **api.c[cid]["Labels"], "name": api.c[cid]["Name"]}
    return {"Type": "container", "Action": action, "Actor": {"ID": cid, "Attributes": attrs}}


@pytest.fixture
def rec():
    r = fakeredis.FakeRedis(decode_responses=True)
    yield Reconciler(SimpleNamespace(api=_API()), Store(r, host="h1"))
    metrics.reset()


def _lists(api):
    return [c for c in api.calls if c.startswith("list")]


def test_a_containers_life_costs_one_listing_per_tenant_not_one_per_event(rec):
    api, r = rec.docker.api, rec.store.r
    api.put(C2, f"{TB}_web", TB, running=True)
    # create, start, die, destroy of one container, and a start of another tenant's
    api.put(C1, f"{TA}_job", TA)
    rec.on_event(ev("create", C1, api))
    api.c[C1]["Running"] = True
    rec.on_event(ev("start", C1, api))
    rec.on_event(ev("start", C2, api))
    api.c[C1]["Running"] = False
    rec.on_event(ev("die", C1, api))
    # nothing read from the engine per event (and no inspect for the create)
    assert api.calls == []
    assert rec.flush() == 2
    assert sorted(_lists(api)) == [f"list {TENANT_LABEL}={TA}", f"list {TENANT_LABEL}={TB}"]
    assert r.hgetall("fdcs:running:h1") == {TB: "1"}
    assert rec.store.owner("container", C1) == TA  # the create's record, confirmed by the listing
    # the next events: one more listing, and none once nothing is marked
    api.calls.clear()
    ev_destroy = ev("destroy", C1, api)
    del api.c[C1]
    rec.on_event(ev_destroy)
    assert rec.store.owner("container", C1) is None  # removed at once
    assert rec.flush() == 1 and _lists(api) == [f"list {TENANT_LABEL}={TA}"]
    assert rec.flush() == 0 and len(_lists(api)) == 1


def test_running_counts_and_gauges_follow_after_the_flush(rec):
    from prometheus_client import CollectorRegistry
    m = metrics.activate("reconciler", CollectorRegistry())
    api, r = rec.docker.api, rec.store.r
    api.put(C1, f"{TA}_a", TA, running=True)
    api.put(C2, f"{TA}_b", TA)
    api.put(C3, "inherited", image=LABELLED, running=True)  # its label is its image's: not counted
    rec.on_event(ev("start", C1, api))
    rec.flush()
    assert r.hget("fdcs:running:h1", TA) == "1"
    assert m.host_tenants.snapshot()[TA] == (2, 1)
    api.c[C2]["Running"] = True
    rec.on_event(ev("start", C2, api))
    assert r.hget("fdcs:running:h1", TA) == "1"  # not yet: coalesced
    rec.flush()
    assert r.hget("fdcs:running:h1", TA) == "2" and m.host_tenants.snapshot()[TA] == (2, 2)


def test_created_containers_are_recorded_by_the_rules_without_reading_each(rec):
    api, store = rec.docker.api, rec.store
    # unlabelled: no image can give it an owner; recorded at once, no engine call
    api.put(C1, "admin_tool")
    rec.on_event(ev("create", C1, api))
    assert api.calls == []
    assert store.owner("container", C1) is None
    assert store.r.sismember("fdcs:unowned:container:h1", "admin_tool")
    # unlabelled but adopted: the adopter's
    api.put(C4, "adopted_one")
    store.r.hset("fdcs:adopted:container", C4, f"{TB} h1")
    rec.on_event(ev("create", C4, api))
    assert store.owner("container", C4) == TB
    # labelled, plain image: the tenant's (the plugin recorded it; the flush confirms)
    api.put(C2, f"{TA}_web", TA, links=[f"/{TA}_app/db"])
    rec.on_event(ev("create", C2, api))
    # labelled only through its image: unowned, the plugin's record removed
    api.put(C3, "copycat", TA, image=LABELLED)
    store.add("container", C3, TA, "copycat")
    rec.on_event(ev("create", C3, api))
    assert api.calls == [] and store.owner("container", C3) == TA  # until the flush
    rec.flush()
    assert store.owner("container", C2) == TA
    assert store.records("container")[C2] == (TA, f"{TA}_web")  # its own name, not its link name
    assert store.owner("container", C3) is None
    assert store.r.sismember("fdcs:unowned:container:h1", "copycat")
    assert not any(c.startswith("inspect") for c in api.calls)
    # renamed: the new name, after the flush
    api.c[C2]["Name"] = f"{TA}_web2"
    rec.on_event(ev("rename", C2, api, oldName=f"/{TA}_web"))
    rec.flush()
    assert store.records("container")[C2] == (TA, f"{TA}_web2")


def test_a_labelled_container_with_an_id_like_name_is_read_at_once(rec):
    """Were it unowned, its name must join the unowned set before any
    tenant's reference could be taken for an id prefix."""
    api, store = rec.docker.api, rec.store
    api.put(C3, "abc123", TA, image=LABELLED)
    rec.on_event(ev("create", C3, api))
    assert store.r.sismember("fdcs:unowned:container:h1", "abc123")
    assert store.owner("container", C3) is None
    # positive control: the same with a plain image is the tenant's, at once too
    api.put(C2, "abc124", TA)
    rec.on_event(ev("create", C2, api))
    assert store.owner("container", C2) == TA


def test_a_container_gone_before_the_flush_is_not_recorded(rec):
    api, store = rec.docker.api, rec.store
    api.put(C1, f"{TA}_short", TA)
    rec.on_event(ev("create", C1, api))
    gone = ev("destroy", C1, api)
    del api.c[C1]
    rec.on_event(gone)
    rec.flush()
    assert store.owner("container", C1) is None
    # positive control: one that stays is recorded
    api.put(C2, f"{TA}_long", TA)
    rec.on_event(ev("create", C2, api))
    rec.flush()
    assert store.owner("container", C2) == TA


def test_an_exec_of_a_container_awaiting_its_record_is_recorded(rec):
    api, store = rec.docker.api, rec.store
    api.put(C1, f"{TA}_sh", TA)
    rec.on_event(ev("create", C1, api))
    rec.on_event(ev("exec_create: sh", C1, api, execID="e" * 64))
    assert store.owner("exec", "e" * 64) == TA


def test_a_label_named_execID_cannot_take_another_tenants_exec(rec):
    """moby copies the container's labels over the event's attributes: a
    tenant's label ``execID`` replaces the engine's exec id."""
    api, store = rec.docker.api, rec.store
    store.add_exec("b" * 64, TB, C2)  # tenant B's exec
    api.put(C1, f"{TA}_sly", TA)
    api.c[C1]["Labels"]["execID"] = "b" * 64
    store.add("container", C1, TA, f"{TA}_sly")
    rec.on_event(ev("exec_create: sh", C1, api, execID="a" * 64))  # the label wins, as in the engine
    assert store.owner("exec", "b" * 64) == TB
    # positive control: without the label, its own exec is recorded
    del api.c[C1]["Labels"]["execID"]
    rec.on_event(ev("exec_create: sh", C1, api, execID="a" * 64))
    assert store.owner("exec", "a" * 64) == TA


def test_the_flush_thread_lists_a_busy_tenant_once_per_period(rec):
    api, r = rec.docker.api, rec.store.r
    rec.recount_period = 0.3
    stop = threading.Event()
    t = threading.Thread(target=rec.flush_loop, args=(stop,), daemon=True)
    t.start()
    try:
        api.put(C1, f"{TA}_a", TA, running=True)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 0.5:  # events as fast as the engine could send them
            rec.on_event(ev("start", C1, api))
            n += 1
            time.sleep(0.01)
        burst = time.monotonic() - t0

        def settled():
            with rec.lock:
                return not rec._marked and not rec._wake.is_set()
        deadline = time.monotonic() + 5
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert settled() and r.hget("fdcs:running:h1", TA) == "1"
        # one listing per period of events (and one for the last), not one per event
        assert n >= 10 and 1 <= len(_lists(api)) <= burst / rec.recount_period + 2
        # idle: no listing at all
        before = len(_lists(api))
        time.sleep(3 * rec.recount_period)
        assert len(_lists(api)) == before
    finally:
        stop.set()
        rec._wake.set()
        t.join(timeout=5)
    assert not t.is_alive()


def test_the_primary_name_is_the_one_without_a_parent():
    assert primary_name(["/x/db", "/web"]) == "web"
    assert primary_name(["/web"]) == "web"
    assert primary_name(["/x/db"]) is None and primary_name(None) is None
