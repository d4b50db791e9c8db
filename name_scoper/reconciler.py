"""``fdcs-reconciler``: keep this host's ownership records equal to its labels.

    fdcs-reconciler [--config FILE] [--once] [--check] [--retire-host ID]

One per Docker host, in its own process and unit: it holds the break-glass
administrator key (it must see every resource on its engine), which the
process that parses tenants' traffic never holds.

* It follows the engine's event stream and updates the records as
  containers, execs, networks and volumes come and go (each event re-reads
  the one resource it names and applies the rules of ``reconcile.py``).
* Every ``reconciler.interval`` seconds, and at start, it reconciles fully:
  reads every container, network and volume, computes the records their
  labels imply, writes the difference, and marks this host complete in
  Redis (``fdcs:reconciled``), which is what lets the plugin answer
  "no such" rather than "retry" for a reference it does not know.  A full
  pass also repairs what events cannot: a Redis that came back empty, events
  missed while the reconciler was down.
* Each pass logs one line with its counts: added, removed, execs added and
  removed, conflicts, unowned.
* It keeps ``fdcs:running:<host>`` (tenant -> running containers of this
  host) in Redis, replaced on every full pass and recomputed for one tenant
  after its containers' create, start, die and destroy events, for the
  plugin's per-tenant gauges; and serves its own metrics (the
  ``reconciler`` set of ``authz_plugin.metrics``, with this host's
  per-tenant container gauges) on ``reconciler.metrics_listen``.
* Events never read the engine themselves where they can avoid it: they
  only mark their tenant, and a second thread recounts each marked tenant
  once per :data:`RECOUNT_PERIOD` (one filtered list for however many
  events; these are gauges, not decisions).  A created or renamed
  container's record is decided from the event's own attributes (the
  engine copies the container's labels and its name into them) when it has
  no tenant label; with one, whether its image carries the same label
  decides, and the image is known only from the engine: the same list
  confirms the record.  Until then the plugin's own record (written by its
  response hook) stands, as it did until the event was read before.

``--once`` runs one full pass, prints its counts as JSON and exits (an
operator's drift check; the tests use it).  ``--retire-host ID`` removes
every record of a host that is gone for good and exits (run it anywhere
with the shared configuration; it does not touch any engine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

from authz_plugin import logfmt, metrics
from authz_plugin.config import DEFAULT_PATH, load
from authz_plugin.errors import ConfigError, FdcsError, StoreUnavailable
from authz_plugin.identity import read_admin_key
from authz_plugin.ownership import Store
from authz_plugin.scoping import TENANT_LABEL, looks_like_id
from authz_plugin.quota import QuotaPolicy, QuotaStore, nano_cpus, wanted_charges

from . import reconcile

log = logging.getLogger(__name__)

#: hash: tenant -> running containers of the host (written only by its reconciler)
#: container events that change a tenant's counts on the host
_COUNTED = frozenset({"create", "start", "die", "destroy"})
_EVENT_TYPES = frozenset({"container", "network", "volume", "image", "plugin", "daemon"})
#: seconds between two recounts of a tenant: a cycle of create, start, wait
#: and rm emits four counted events; recounting on each cost four listings
#: (and eight plugin decisions) on the cores the cycle itself runs on
RECOUNT_PERIOD = 1.0
#: engine states in which ``docker ps`` (without -a) lists a container
_RUNNING_STATES = frozenset({"running", "paused", "restarting"})


def host_counts(containers: list[dict]) -> dict[str, tuple[int, int]]:
    """tenant -> (containers, running containers) of one engine's snapshot
    (``Snapshot.containers``, with ``Running``); owners as
    :func:`reconcile.container_owner` decides them."""
    out: dict[str, list[int]] = {}
    for c in containers:
        owner, _ = reconcile.container_owner(c)
        if owner:
            n = out.setdefault(owner, [0, 0])
            n[0] += 1
            n[1] += bool(c.get("Running"))
    return {t: (total, running) for t, (total, running) in out.items()}


def primary_name(names: list[str] | None) -> str | None:
    """A listed container's own name (without "/") among its ``Names``,
    which also hold the names it has as a legacy link target
    (``/<parent>/<alias>``), in no defined order."""
    own = [n[1:] for n in names or () if n.startswith("/") and n.count("/") == 1]
    return own[0] if len(own) == 1 else None


def _admin_client(cfg):
    import docker

    key = read_admin_key(cfg)
    client = docker.DockerClient(base_url=f"unix://{cfg['reconciler.engine_socket']}", version="1.41", timeout=60)
    client.api.headers[cfg["keystone.admin_key_header"]] = key
    return client


class Reconciler:
    def __init__(self, client, store: Store, quota: QuotaStore | None = None,
                 recount_period: float = RECOUNT_PERIOD):
        self.docker = client
        self.store = store
        self.quota = quota  # None: quotas off, no charges to correct
        self.lock = threading.Lock()  # one writer at a time: events, recounts, full passes
        self._images: dict[str, dict] = {}  # image id -> labels (an image's labels never change)
        # tenant -> ids of its containers whose record the next flush confirms;
        # a tenant present here (even with no id) is recounted by that flush
        self._marked: dict[str, set[str]] = {}
        self._wake = threading.Event()  # something is marked
        self.recount_period = recount_period

    # -- reading the engine ---------------------------------------------------

    def _container(self, cid: str, image_labels: dict | None = None) -> dict | None:
        """One container as :class:`reconcile.Snapshot` holds it; None if
        gone.  Its image's labels come from the reconciler's cache (by image
        id: they never change); ``image_labels`` is accepted for callers of
        the former signature (``fdcs-manage``) and unused."""
        import docker.errors
        try:
            c = self.docker.api.inspect_container(cid)
        except docker.errors.NotFound:
            return None
        hc = c.get("HostConfig") or {}
        return {"Id": c["Id"], "Name": (c.get("Name") or "").lstrip("/"),
                "Labels": (c.get("Config") or {}).get("Labels") or {},
                "ImageLabels": self._image_labels(c.get("Image") or ""),
                "ExecIDs": c.get("ExecIDs") or [], "Running": bool((c.get("State") or {}).get("Running")),
                "Size": (1, hc.get("Memory") or 0, nano_cpus(hc), 0, 0),
                "Volumes": [m["Name"] for m in c.get("Mounts") or [] if m.get("Type") == "volume" and m.get("Name")]}

    def snapshot(self) -> reconcile.Snapshot:
        snap = reconcile.Snapshot()
        for c in self.docker.api.containers(all=True, quiet=True):
            found = self._container(c["Id"])
            if found:
                snap.containers.append(found)
        snap.networks = [{"Id": n["Id"], "Name": n["Name"], "Labels": n.get("Labels") or {}}
                         for n in self.docker.api.networks()]
        snap.volumes = [{"Name": v["Name"], "Labels": v.get("Labels") or {}}
                        for v in (self.docker.api.volumes().get("Volumes") or [])]
        snap.adopted = self.store.adopted()  # fdcs-manage adopt: owners no label gives
        return snap

    # -- writing ------------------------------------------------------------------

    def apply(self, act: reconcile.Actions) -> None:
        for kind, id_, tenant, name in act.add:
            self.store.add(kind, id_, tenant, name)
        for kind, id_ in act.remove:
            self.store.remove(kind, id_)
        for eid, tenant, cid in act.add_execs:
            self.store.add_exec(eid, tenant, cid)
        for eid in act.remove_execs:
            self.store.remove("exec", eid)

    def _store_running(self, running: dict[str, int]) -> None:
        self.store.set_running(running)

    def _store_running_tenant(self, tenant: str, running: int) -> None:
        self.store.set_running_tenant(tenant, running)

    def _image_labels(self, image: str) -> dict:
        import docker.errors
        if image not in self._images:
            if len(self._images) > 4096:
                self._images.clear()  # bounded; an image's labels never change
            try:
                self._images[image] = (self.docker.api.inspect_image(image).get("Config") or {}).get("Labels") or {}
            except docker.errors.NotFound:
                return {}
        return self._images[image]

    def recount(self, tenant: str, confirm: frozenset[str] | set[str] = frozenset()) -> tuple[int, int]:
        """Count ``tenant``'s containers on the engine now, and publish the
        running count (Redis) and both (metrics); record those of
        ``confirm`` (ids of containers labelled for ``tenant``) that the
        listing shows as the full pass would.  Caller holds the lock."""
        total = running = 0
        for c in self.docker.api.containers(all=True, filters={"label": f"{TENANT_LABEL}={tenant}"}):
            name = primary_name(c.get("Names"))
            owner, _ = reconcile.container_owner({
                "Labels": c.get("Labels") or {}, "ImageLabels": self._image_labels(c.get("ImageID") or ""),
                "Name": name or ""})
            if c.get("Id") in confirm:
                if name is None:  # not listed under its own name (a rename under way): read it
                    self._record_inspected(c["Id"])
                else:
                    self._record(c["Id"], name, owner)
            if owner == tenant:
                total += 1
                running += c.get("State") in _RUNNING_STATES
        # an id of ``confirm`` not listed is gone: its destroy event removes its record
        self._store_running_tenant(tenant, running)
        m = metrics.active()
        if isinstance(m, metrics.ReconcilerMetrics):
            m.host_tenants.update(tenant, total, running)
        return total, running

    def full(self) -> dict:
        """One full pass; returns its counts."""
        t0 = time.monotonic()
        m = metrics.active()
        m = m if isinstance(m, metrics.ReconcilerMetrics) else None
        try:
            with self.lock:
                # Records first, engine second: a resource created while the pass
                # runs is then on the engine side (added, as the plugin did) and
                # never read as a record the engine lacks (which would remove it).
                # Quota charges likewise (compare-and-set against this read).
                have = {kind: self.store.records(kind) for kind in ("container", "network", "volume")}
                have_execs = self.store.execs()
                charged = self.quota.charges(self.store.host) if self.quota else {}
                snap = self.snapshot()
                want = reconcile.desired(snap)
                act = reconcile.diff(want, have, have_execs)
                # before the records, so that no prefix is ever resolved without them
                self.store.set_unowned_names(reconcile.unowned_names(snap, want))
                self.apply(act)
                quota_counts = {}
                if self.quota:
                    sizes = {c["Id"]: c["Size"] for c in snap.containers}
                    quota_counts = self.quota.sync(charged, wanted_charges(want.records, sizes))
                by_tenant = host_counts(snap.containers)
                self._store_running({t: r for t, (_, r) in by_tenant.items() if r})
                self.store.mark_complete(time.time())
        except Exception:
            if m is not None:
                m.passes.labels("error").inc()
            raise
        if m is not None:
            m.passes.labels("ok").inc()
            m.last_pass.set(time.time())
            m.last_duration.set(time.monotonic() - t0)
            for (change, kind), n in metrics.drift(act.add, act.remove, act.add_execs, act.remove_execs,
                                                   have, len(want.conflicts)).items():
                m.drift.labels(change, kind).inc(n)
            m.unowned.set(len(want.unowned))
            m.host_tenants.replace(by_tenant)
        counts = {"host": self.store.host, "added": len(act.add), "removed": len(act.remove),
                  "execs_added": len(act.add_execs), "execs_removed": len(act.remove_execs),
                  "conflicts": len(want.conflicts), "unowned": len(want.unowned),
                  **{f"charges_{k}": v for k, v in quota_counts.items()},
                  "ms": int((time.monotonic() - t0) * 1000)}
        for c in want.conflicts:
            log.warning("conflict: %s", c)
        if want.unowned:
            log.info("unowned (administrators only): %s", ", ".join(sorted(want.unowned)[:20]))
        log.info("reconcile %s", json.dumps(counts, separators=(",", ":")))
        return counts

    # -- container records ------------------------------------------------------------

    def _record(self, cid: str, name: str, owner: str | None) -> None:
        """Write one container's record: ``owner`` (by its labels), else
        the tenant that adopted it, else its name is unowned."""
        owner = owner or self.store.adopted()["container"].get(cid)
        if owner:
            self.store.add("container", cid, owner, name)
        else:
            self.store.add_unowned_name("container", name)
            self.store.remove("container", cid)

    def _record_inspected(self, cid: str) -> None:
        c = self._container(cid)
        if c:
            self._record(c["Id"], c["Name"], reconcile.container_owner(c)[0])

    def _container_named(self, cid: str, attrs: dict) -> None:
        """A container was created or renamed.  ``attrs`` (the event's)
        hold its labels and its name as the engine had them (moby
        ``LogContainerEventWithAttributes``: the labels, then ``name``).
        Without a tenant label no image can give it an owner: recorded now.
        With one, its image's labels decide: the next flush confirms it --
        unless its name looks like an id: were it unowned, its name must be
        in the unowned set at once (the engine resolves that name before a
        tenant's id prefix), so it is read now."""
        name = attrs.get("name")
        if name is None:  # not an engine of the 20.10 line: read the container
            self._record_inspected(cid)
            return
        owner, _ = reconcile.container_owner({"Labels": attrs, "Name": name})
        if owner is None:
            self._record(cid, name, None)
        elif looks_like_id(name):
            self._record_inspected(cid)
        else:
            self._mark(owner, cid)

    # -- coalesced recounts ------------------------------------------------------------

    def _mark(self, tenant: str, cid: str | None = None) -> None:
        """Have the next flush recount ``tenant`` (and confirm ``cid``'s
        record).  Caller holds the lock."""
        ids = self._marked.setdefault(tenant, set())
        if cid:
            ids.add(cid)
        self._wake.set()

    def _flush_locked(self) -> int:
        marked, self._marked = self._marked, {}
        for tenant, ids in marked.items():
            try:
                self.recount(tenant, ids)
            except Exception as e:  # the engine or Redis: the next full pass repairs it
                log.warning("cannot recount %s's containers (%s); the next full pass repairs it",
                            tenant, e.__class__.__name__)
        return len(marked)

    def flush(self) -> int:
        """Recount every marked tenant once (one listing each) and confirm
        the marked containers' records; returns how many tenants."""
        with self.lock:
            return self._flush_locked()

    def flush_loop(self, stop: threading.Event) -> None:
        """Flush until ``stop``: once something is marked, wait
        ``recount_period`` (the events of that time join the same flush),
        then flush; so each tenant is listed at most once per period, and
        never while nothing happens."""
        while not stop.is_set():
            if not self._wake.wait(timeout=1.0):
                continue
            stop.wait(self.recount_period)
            self._wake.clear()  # before the flush: a mark made during it wakes the next one
            try:
                self.flush()
            except Exception:  # noqa: BLE001 -- keep flushing; the full pass repairs
                log.exception("recount failed")

    # -- events ---------------------------------------------------------------------

    def on_event(self, ev: dict) -> None:
        """Apply one engine event.  Container events do not read the engine
        (unless a create or rename lacks its name attribute, or an exec's
        container awaits its record): counts and labelled containers'
        records are left to :meth:`flush`."""
        kind, action = ev.get("Type"), (ev.get("Action") or "").split(":")[0]
        actor = ev.get("Actor") or {}
        rid = actor.get("ID") or ""
        with self.lock:
            if kind == "container":
                attrs = actor.get("Attributes") or {}
                if action in _COUNTED and attrs.get(TENANT_LABEL):
                    self._mark(attrs[TENANT_LABEL])
                if action == "destroy":
                    self.store.remove("container", rid)
                elif action in ("create", "rename"):
                    self._container_named(rid, attrs)
                elif action == "exec_create":
                    if any(rid in ids for ids in self._marked.values()):
                        self._flush_locked()  # its container's record first
                    owner = self.store.owner("container", rid)
                    eid = attrs.get("execID")
                    # the container's labels overwrite the engine's attributes
                    # (moby copyAttributes): a label "execID" names any id it
                    # likes, so never re-own an exec another tenant holds
                    if owner and eid and self.store.owner("exec", eid) in (None, owner):
                        self.store.add_exec(eid, owner, rid)
            elif kind == "network" and action in ("create", "destroy"):
                if action == "destroy":
                    self.store.remove("network", rid)
                else:
                    import docker.errors
                    try:
                        n = self.docker.api.inspect_network(rid)
                    except docker.errors.NotFound:
                        return
                    owner = reconcile._tenant(n.get("Labels"))
                    if owner:
                        self.store.add("network", n["Id"], owner, n["Name"])
                    else:
                        self.store.add_unowned_name("network", n["Name"])
            elif kind == "volume" and action in ("create", "destroy"):
                if action == "destroy":
                    self.store.remove("volume", rid)
                # a created volume's owner may depend on the container that
                # mounts it: the next full pass (or the plugin) records it

    def follow(self, stop: threading.Event) -> None:
        """Follow the event stream until ``stop``; reconnects after errors."""
        while not stop.is_set():
            try:
                since = int(time.time()) - 1
                for ev in self.docker.api.events(decode=True, since=since):
                    if stop.is_set():
                        return
                    kind = ev.get("Type") if ev.get("Type") in _EVENT_TYPES else "other"
                    try:
                        self.on_event(ev)
                        _count_event(kind, "applied")
                    except FdcsError as e:
                        _count_event(kind, "failed")
                        log.warning("event not applied (%s); the next full pass repairs it", e)
            except Exception as e:  # the engine restarted, the stream broke
                log.warning("event stream interrupted (%s); reconnecting", e.__class__.__name__)
                stop.wait(1.0)


def _count_event(kind: str, result: str) -> None:
    m = metrics.active()
    if isinstance(m, metrics.ReconcilerMetrics):
        m.events.labels(kind, result).inc()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fdcs-reconciler", description="keep FDCS ownership equal to the labels")
    ap.add_argument("--config", default=os.environ.get("FDCS_CONFIG", DEFAULT_PATH))
    ap.add_argument("--once", action="store_true", help="one full pass, print its counts as JSON, exit")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--retire-host", metavar="ID", help="remove every record of host ID (gone for good) and exit")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
        if args.check:
            print(f"fdcs-reconciler: configuration {args.config} is valid")
            return 0
        if args.retire_host:
            cfg = load(args.config, overrides={"host.id": args.retire_host})
            try:
                n = Store.from_config(cfg).retire_host()
            except FdcsError as e:
                print(f"fdcs-reconciler: {e}", file=sys.stderr)
                return 1
            print(json.dumps({"host": args.retire_host, "records_removed": n}))
            return 0
        client = _admin_client(cfg)
    except ConfigError as e:
        print(f"fdcs-reconciler: {e}", file=sys.stderr)
        return 2
    logfmt.configure(cfg["plugin.log_level"])
    metrics.single_process()
    m = metrics.activate("reconciler")
    store = Store.from_config(cfg)
    qpolicy = QuotaPolicy.from_config(cfg)
    rec = Reconciler(client, store, QuotaStore(store.r, qpolicy, store.host) if qpolicy.enabled else None)
    if args.once:
        try:
            print(json.dumps(rec.full()))
            return 0
        except (FdcsError, OSError) as e:
            print(f"fdcs-reconciler: {e}", file=sys.stderr)
            return 1
    try:
        metrics.serve(metrics.parse_listen(cfg["reconciler.metrics_listen"]), m.registry)
    except OSError as e:
        print(f"fdcs-reconciler: cannot serve metrics on {cfg['reconciler.metrics_listen']} "
              f"(reconciler.metrics_listen): {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=rec.follow, args=(stop,), daemon=True, name="events").start()
    threading.Thread(target=rec.flush_loop, args=(stop,), daemon=True, name="recount").start()
    interval = cfg["reconciler.interval"]
    while not stop.is_set():
        try:
            rec.full()
            wait = interval
        except StoreUnavailable:
            log.warning("ownership store unavailable; retrying the full pass in 2 s")
            wait = 2
        except Exception:
            log.exception("full reconcile failed; retrying in 5 s")
            wait = 5
        stop.wait(wait)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
