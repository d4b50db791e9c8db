"""Resource and host commands: orphans, adopt, reconcile, host list|retire.

The ownership rules are ``name_scoper.reconcile``'s, applied to snapshots
read by ``name_scoper.reconciler.Reconciler`` (with the adoptions in Redis):
nothing here decides ownership on its own.
"""

from __future__ import annotations

import time

from docker.errors import NotFound as EngineNotFound

from name_scoper import reconcile
from name_scoper.reconciler import Reconciler

from ..errors import Denied, FdcsError
from ..ownership import KINDS
from ..quota import METRICS, human, refusal
from ..rules import Policy, cheap_need
from ._adopt import check_container, check_network, check_volume
from ._output import Out, short, table, when
from ._site import ADOPTED
from ._tenant_cmds import UsageError, _label


class SiteReconciler(Reconciler):
    """The reconciler as fdcs-manage runs it: its snapshots carry the
    adoptions of its host (``reconcile.desired`` reads ``snap.adopted``)."""

    def __init__(self, site, host: str):
        q = site.quota(host) if site.policy.enabled else None
        super().__init__(site.engines.client(host), site.store(host), q)
        self.site = site

    def snapshot(self) -> reconcile.Snapshot:
        snap = self.site.engines.guard(self.store.host, super().snapshot)
        snap.adopted = self.site.adopted(self.store.host)
        self.last = snap
        return snap

    def drop_stale_adoptions(self, before: dict[str, dict[str, str]]) -> int:
        """Forget adoptions (read in ``before``, ahead of the last snapshot)
        whose resource the last snapshot no longer has: ids are never reused."""
        snap = self.last
        present = {"container": {c["Id"] for c in snap.containers}, "network": {n["Id"] for n in snap.networks},
                   "volume": {v["Name"] for v in snap.volumes}}
        n = 0
        for kind, ids in before.items():
            stale = [i for i in ids if i not in present[kind]]
            if stale:
                n += self.site.call(self.site.redis.hdel, ADOPTED + kind, *stale)
        return n


def _hosts(site, only: str | None) -> list[str]:
    if only:
        site.engines.require(only)
        return [only]
    return site.engines.hosts()


# -- reconcile ---------------------------------------------------------------------------


def cmd_reconcile(site, args) -> Out:
    results, problems = [], []
    for host in _hosts(site, args.host):
        try:
            rec = SiteReconciler(site, host)
            before = site.adopted(host)
            counts = rec.full()
            counts["adoptions_dropped"] = rec.drop_stale_adoptions(before)
            results.append(counts)
        except FdcsError as e:
            problems.append(f"host {host}: {e}")
    keys = ["host", "added", "removed", "execs_added", "execs_removed", "conflicts", "unowned"]
    extra = sorted({k for r in results for k in r if k.startswith("charges_")}) + ["adoptions_dropped"]
    text = table([k.upper() for k in keys + extra + ["ms"]], [[r.get(k, 0) for k in keys + extra + ["ms"]] for r in results],
                 empty="no host reconciled")
    return Out(results, text, problems, failed=bool(problems))


# -- orphans -----------------------------------------------------------------------------


def orphans_of(snap: reconcile.Snapshot, have: dict[str, dict[str, tuple[str, str]]]) -> dict[str, list]:
    """What one host's snapshot and records disagree on (pure): resources
    without an owner, records without a resource, adoptions without one."""
    want = reconcile.desired(snap)
    owned = {kind: set(ids) for kind, ids in want.records.items()}
    unowned = []
    for c in snap.containers:
        if c["Id"] not in owned["container"]:
            unowned.append({"kind": "container", "id": c["Id"], "name": c.get("Name") or ""})
    for n in snap.networks:
        if n["Id"] not in owned["network"] and n.get("Name") not in reconcile.PREDEFINED_NETWORKS:
            unowned.append({"kind": "network", "id": n["Id"], "name": n.get("Name") or ""})
    for v in snap.volumes:
        if v["Name"] not in owned["volume"]:
            unowned.append({"kind": "volume", "id": v["Name"], "name": v["Name"]})
    present = {"container": {c["Id"] for c in snap.containers}, "network": {n["Id"] for n in snap.networks},
               "volume": {v["Name"] for v in snap.volumes}}
    stale = [{"kind": kind, "id": id_, "tenant": tenant, "name": name}
             for kind, recs in have.items() for id_, (tenant, name) in sorted(recs.items())
             if id_ not in present[kind]]
    stale_adoptions = [{"kind": kind, "id": id_, "tenant": t}
                       for kind, ids in snap.adopted.items() for id_, t in sorted(ids.items())
                       if id_ not in present[kind]]
    return {"unowned": unowned, "stale_records": stale, "stale_adoptions": stale_adoptions,
            "conflicts": want.conflicts}


def cmd_orphans(site, args) -> Out:
    data, rows, problems = {}, [], []
    for host in _hosts(site, getattr(args, "host", None)):
        rec = SiteReconciler(site, host)
        try:
            # records first, engine second (the reconciler's order): a
            # resource made meanwhile is never reported as a record without one
            have = {kind: rec.store.records(kind) for kind in KINDS}
            snap = rec.snapshot()
        except FdcsError as e:
            problems.append(f"host {host}: {e}")
            continue
        o = orphans_of(snap, have)
        data[host] = o
        rows += [[host, "unowned", u["kind"], short(u["id"]) if u["kind"] != "volume" else u["id"], u["name"], ""]
                 for u in o["unowned"]]
        rows += [[host, "record without resource", s["kind"], short(s["id"]) if s["kind"] != "volume" else s["id"],
                  s["name"], s["tenant"]] for s in o["stale_records"]]
        rows += [[host, "adoption without resource", s["kind"], short(s["id"]) if s["kind"] != "volume" else s["id"],
                  "", s["tenant"]] for s in o["stale_adoptions"]]
        rows += [[host, "conflict", "container", "", c, ""] for c in o["conflicts"]]
    for kind, recs in site.records().items():
        for id_, (tenant, host, name) in recs.items():
            if host and not site.engines.has(host):
                data.setdefault("unchecked", []).append({"kind": kind, "id": id_, "tenant": tenant, "host": host})
    unchecked = {r["host"] for r in data.get("unchecked", [])}
    if unchecked:
        problems.append(f"records of host(s) {', '.join(sorted(unchecked))} not checked: no engine in "
                        "manage.engines (run fdcs-manage on those hosts)")
    text = table(["HOST", "WHAT", "KIND", "ID", "NAME", "TENANT"], rows, empty="no orphans")
    return Out(data, text, problems, failed=any(p.startswith("host ") for p in problems))


# -- adopt -------------------------------------------------------------------------------


def _find(site, ref: str, kind: str | None, host: str | None) -> tuple[str, str, dict]:
    """(kind, host, inspect) of the one resource ``ref`` names (id, id
    prefix or name) on the configured hosts; refused when none or several."""
    found = []
    for h in _hosts(site, host):
        for k in (kind,) if kind else ("container", "network", "volume"):
            inspect = {"container": lambda api: api.inspect_container(ref),
                       "network": lambda api: api.inspect_network(ref),
                       "volume": lambda api: api.inspect_volume(ref)}[k]
            try:
                found.append((k, h, site.engines.call(h, inspect)))
            except EngineNotFound:
                continue
    if not found:
        raise FdcsError(f"no container, network or volume {ref!r} on host(s) {', '.join(_hosts(site, host))}")
    if len(found) > 1:
        where = ", ".join(f"{k} on {h}" for k, h, _ in found)
        raise UsageError(f"{ref!r} names several resources ({where}): use --kind and --host, or the full id")
    return found[0]


def _check_needs(site, host: str, tenant: str, plan) -> None:
    """Every resource the plan references must be the tenant's (as the
    plugin's ``_check_needs``, against the records of ``host``)."""
    store = site.store(host)
    pending = []
    for need in plan.needs:
        cheap = cheap_need(tenant, need)
        if cheap is False:
            raise Denied(f"{need.where}: {need.kind} {need.ref} is not one of project {tenant}'s")
        if cheap is None:
            pending.append(need)
    for need, res in zip(pending, store.resolve([(n.kind, n.ref, n.kind in ("container", "network")) for n in pending])):
        if not res.owned_by(tenant):
            raise Denied(f"{need.where}: {need.kind} {need.ref} is not one of project {tenant}'s")


def _check_users(site, host: str, tenant: str, what: str, container_ids) -> None:
    """A network or volume used by another owner's (or nobody's) containers
    cannot be handed to ``tenant``: it would reach them."""
    store = site.store(host)
    others = [short(c) for c in container_ids if store.owner("container", c) != tenant]
    if others:
        raise Denied(f"{what} is used by container(s) that are not project {tenant}'s: {', '.join(others)}")


def _charge(kind: str, inspect: dict, policy) -> tuple[int, int, int, int, int]:
    if kind == "container":
        hc = inspect.get("HostConfig") or {}
        return policy.check_create(hc)
    return (0, 0, 0, 1, 0) if kind == "volume" else (0, 0, 0, 0, 1)


def _check_quota(site, tenant: str, vec) -> None:
    q = site.quota()
    usage, limits = q.usage(tenant), q.limits(tenant)
    for i, m in enumerate(METRICS):
        if limits[m] < 0:
            continue
        if m in ("memory", "cpus") and vec[0] and vec[i] == 0:
            raise refusal(tenant, m, limits[m], usage[m], 0)
        if vec[i] and usage[m] + vec[i] > limits[m]:
            raise Denied(f"{m} quota of project {tenant} would be exceeded: limit {human(m, limits[m])}, "
                         f"in use {human(m, usage[m])}, the resource holds {human(m, vec[i])}")


def cmd_adopt(site, args) -> Out:
    p = site.tenant(args.tenant)
    tenant = p.id
    kind, host, inspect = _find(site, args.resource, args.kind, args.host)
    id_ = inspect["Name"] if kind == "volume" else inspect["Id"]
    name = (inspect.get("Name") or "").lstrip("/")
    what = f"{kind} {name or short(id_)} on {host}"
    # the owner the reconciler's rules give it, adoptions included
    rec = SiteReconciler(site, host)
    snap = reconcile.Snapshot(adopted=site.adopted(host))
    if kind == "container":
        c = site.engines.guard(host, lambda: rec._container(id_, {}))
        snap.containers = [c]
    elif kind == "network":
        snap.networks = [{"Id": id_, "Name": name, "Labels": inspect.get("Labels") or {}}]
    else:
        snap.volumes = [{"Name": id_, "Labels": inspect.get("Labels") or {}}]
    if kind == "network" and name in reconcile.PREDEFINED_NETWORKS:
        raise Denied(f"{what} is one of the engine's own networks")
    owner = reconcile.desired(snap).records[kind].get(id_, (None,))[0] or site.store(host).owner(kind, id_)
    if owner:
        raise Denied(f"{what} already belongs to project {owner}")
    policy = Policy.from_config(site.cfg)
    vec = None
    try:
        if kind == "container":
            info = site.engines.call(host, lambda api: api.info())
            plan = check_container(inspect, tenant, policy, str(info.get("CgroupVersion", "1")) == "1")
            _check_needs(site, host, tenant, plan)
        elif kind == "network":
            check_network(inspect, tenant, policy)
            _check_users(site, host, tenant, what, (inspect.get("Containers") or {}).keys())
        else:
            check_volume(inspect, tenant, policy)
            users = site.engines.call(host, lambda api: api.containers(all=True, filters={"volume": id_}))
            _check_users(site, host, tenant, what, [c["Id"] for c in users])
        if site.policy.enabled:
            vec = _charge(kind, inspect, site.policy)
            _check_quota(site, tenant, vec)
    except Denied as e:
        raise Denied(f"{what} cannot be given to project {_label(p)}: {e}") from e
    # the adoption first: a reconcile pass between the two writes keeps the record
    site.call(site.redis.hset, ADOPTED + kind, id_, f"{tenant} {host}")
    store = site.store(host)
    store.add(kind, id_, tenant, "" if kind == "volume" else name)
    if kind == "container":
        for eid in inspect.get("ExecIDs") or []:
            store.add_exec(eid, tenant, id_)
    if vec is not None:
        field = f"{kind}/{id_}"
        site.quota(host).sync({}, {field: (tenant, vec)})
    data = {"kind": kind, "id": id_, "name": name, "host": host, "tenant": tenant, "tenant_name": p.name}
    text = (f"Adopted {what} for project {_label(p)}.\n"
            f"The adoption lives in Redis only (fdcs:adopted:{kind}): the resource has no tenant label, "
            "so the project's lists do not show it; its users reach it by id.")
    return Out(data, text)


# -- hosts --------------------------------------------------------------------------------


def cmd_host_list(site, args) -> Out:
    now = time.time()
    passes = site.store().hosts()
    records = site.records()
    hosts = set(passes) | set(site.engines.hosts()) | {h for recs in records.values() for _, h, _ in recs.values() if h}
    rows = []
    for h in sorted(hosts):
        counts = {kind: sum(1 for _, hh, _ in recs.values() if hh == h) for kind, recs in records.items()}
        rows.append({"host": h, "last_reconcile": passes.get(h), **{f"{k}s": v for k, v in counts.items()},
                     "engine": site.engines.urls.get(h), "reachable": site.engines.ping(h) if site.engines.has(h) else None})
    text = table(["HOST", "LAST COMPLETE RECONCILE", "CONTAINERS", "NETWORKS", "VOLUMES", "ENGINE", "REACHABLE"],
                 [[r["host"], when(r["last_reconcile"], now) if r["last_reconcile"] else "never (records incomplete)",
                   r["containers"], r["networks"], r["volumes"], r["engine"] or "not configured",
                   r["reachable"] or "-"] for r in rows], empty="no hosts")
    return Out(rows, text)


def cmd_host_retire(site, args) -> Out:
    host = args.host
    if site.engines.has(host) and site.engines.ping(host) == "yes" and not args.force:
        raise FdcsError(f"the engine of host {host} answers: a live host is not retired (--force to retire it anyway)")
    records = site.records()
    n = sum(1 for recs in records.values() for _, h, _ in recs.values() if h == host)
    prompt = f"Retire host {host}: remove its {n} record(s), its charges and adoptions? [y/N] "
    if not site.confirm(prompt, args.yes):
        return Out({"host": host, "retired": False}, "Nothing removed.", failed=True)
    removed = site.store(host).retire_host()
    adoptions = 0
    for kind in KINDS:
        ids = [i for i, h in site.adoption_hosts(kind).items() if h == host]
        if ids:
            adoptions += site.call(site.redis.hdel, ADOPTED + kind, *ids)
    return Out({"host": host, "retired": True, "records_removed": removed, "adoptions_removed": adoptions},
               f"Host {host} retired: {removed} record(s) and {adoptions} adoption(s) removed.")


__all__ = ["cmd_reconcile", "cmd_orphans", "cmd_adopt", "cmd_host_list", "cmd_host_retire", "orphans_of",
           "SiteReconciler"]
