"""Tenant commands: tenants, usage, quota, flavors, tenant suspend|resume|purge.

Each ``cmd_*`` takes the :class:`~._site.Site` and the parsed arguments and
returns an :class:`~._output.Out`; the I/O is the site's (Redis, engines,
Keystone), the tables are built by the pure helpers below them.
"""

from __future__ import annotations

import concurrent.futures as cf
import getpass
import time
from typing import Any

from ..config import parse_size
from ..errors import FdcsError
from ..quota import METRICS, UNLIMITED, parse_cpus
from ..scoping import TENANT_LABEL
from ._engines import EngineUnavailable, stats_usage
from ._output import Out, amount, percent, short, table, when


class UsageError(FdcsError):
    """A command line fdcs-manage cannot act on (exit status 2)."""

    reason = "usage"


def _label(p) -> str:
    return f"{p.name} ({p.id})" if p.name and p.name != p.id else p.id


def describe_suspension(s: dict, now: float) -> str:
    return f"since {when(s.get('at'), now)} by {s.get('by') or '?'}: {s.get('reason') or 'no reason given'}"


def _quota_off(site) -> list[str]:
    if site.policy.enabled:
        return []
    return [f"quotas are not enforced: quota.enabled is false in {getattr(site.cfg, 'source', None) or 'the configuration'}"]


# -- tenants ---------------------------------------------------------------------------


def tenant_rows(records: dict, usage: dict[str, dict[str, int]] | None, suspended: dict,
                names: dict[str, str], tenants: set[str]) -> list[dict[str, Any]]:
    """One row per tenant (pure): counts from ``usage`` when quotas account
    them, else from the records (memory and CPUs then unknown)."""
    rows = []
    for t in sorted(tenants):
        if usage is not None:
            u = usage.get(t, {m: 0 for m in METRICS})
        else:
            count = {kind: sum(1 for owner, _, _ in recs.values() if owner == t) for kind, recs in records.items()}
            u = {"containers": count.get("container", 0), "memory": None, "cpus": None,
                 "volumes": count.get("volume", 0), "networks": count.get("network", 0)}
        rows.append({"id": t, "name": names.get(t, ""), **u, "suspended": t in suspended})
    return rows


def cmd_tenants(site, args) -> Out:
    records = site.records()
    tenants = site.known_tenants()
    suspended = site.store().suspended()
    usage = {t: site.quota().usage(t) for t in tenants} if site.policy.enabled else None
    names, why = site.names(tenants)
    rows = tenant_rows(records, usage, suspended, names, tenants)
    text = table(["ID", "NAME", "CONTAINERS", "MEMORY", "CPUS", "VOLUMES", "NETWORKS", "SUSPENDED"],
                 [[r["id"], r["name"], r["containers"], amount("memory", r["memory"]), amount("cpus", r["cpus"]),
                   r["volumes"], r["networks"], "yes" if r["suspended"] else "no"] for r in rows],
                 empty="no tenant holds anything")
    warnings = [f"project names unavailable: {why}"] if why else []
    if usage is None:
        warnings.append("quotas are off: counts come from the ownership records; memory and CPUs are not accounted")
    return Out(rows, text, warnings)


# -- quota -----------------------------------------------------------------------------


def quota_view(limits: dict[str, int], overrides: dict[str, int], usage: dict[str, int]) -> dict[str, dict]:
    """metric -> {limit, source (own or default), used, percent} (pure)."""
    return {m: {"limit": limits[m], "source": "own" if m in overrides else "default", "used": usage.get(m, 0),
                "percent": percent(usage.get(m, 0), limits[m])} for m in METRICS}


def quota_text(title: str, view: dict[str, dict]) -> str:
    rows = [[m, amount(m, v["limit"]), v["source"], amount(m, v["used"]),
             "-" if v["percent"] is None else f"{v['percent']:g}%"] for m, v in view.items()]
    return title + "\n" + table(["METRIC", "LIMIT", "SOURCE", "IN USE", "USED"], rows)


def _quota_out(site, p, warnings: list[str] | None = None) -> Out:
    q = site.quota()
    view = quota_view(q.limits(p.id), q.overrides(p.id), q.usage(p.id))
    data = {"tenant": p.id, "name": p.name, "enforced": site.policy.enabled, "metrics": view}
    return Out(data, quota_text(f"Quota of project {_label(p)}:", view), (warnings or []) + _quota_off(site))


def cmd_quota_show(site, args) -> Out:
    return _quota_out(site, site.tenant(args.tenant))


def parse_limit(metric: str, value: str) -> int:
    """A limit from the command line: 'unlimited' (or -1), a size for
    memory, a number of CPUs, a count; UsageError otherwise."""
    v = str(value).strip()
    if v.lower() in ("unlimited", "-1"):
        return UNLIMITED
    try:
        if metric == "memory":
            return parse_size(v)
        if metric == "cpus":
            return parse_cpus(v)
        if not v.isdigit():
            raise ValueError(f"expected a count such as 10, got {value!r}")
        return int(v)
    except ValueError as e:
        raise UsageError(f"bad value for --{metric}: {e} (or 'unlimited')") from None


def cmd_quota_set(site, args) -> Out:
    limits = {m: parse_limit(m, getattr(args, m)) for m in METRICS if getattr(args, m) is not None}
    if not limits:
        raise UsageError("quota set needs at least one of --containers, --memory, --cpus, --volumes, --networks")
    p = site.tenant(args.tenant)
    site.quota().set_limits(p.id, limits)
    return _quota_out(site, p)


def cmd_quota_clear(site, args) -> Out:
    metrics = tuple(m for m in METRICS if getattr(args, m))
    p = site.tenant(args.tenant)
    site.quota().clear_limits(p.id, metrics)
    return _quota_out(site, p)


def cmd_flavors(site, args) -> Out:
    pol = site.policy
    data = {"enforced": pol.enabled, "required": pol.flavor_required, "default": pol.default_flavor or None,
            "flavors": [{"name": f.name, "memory": f.memory, "cpus": f.nano_cpus} for f in pol.flavors]}
    rows = [[f.name, amount("memory", f.memory), amount("cpus", f.nano_cpus),
             "yes" if f.name == pol.default_flavor else ""] for f in pol.flavors]
    text = table(["FLAVOR", "MEMORY", "CPUS", "DEFAULT"], rows, empty="no flavors configured (quota.flavors)")
    text += f"\nflavor required: {'yes' if pol.flavor_required else 'no'}"
    if not pol.flavor_required and (pol.default_memory or pol.default_nano_cpus):
        text += (f"; a container that sets no size gets {amount('memory', pol.default_memory)} "
                 f"and {amount('cpus', pol.default_nano_cpus)} CPUs")
    return Out(data, text, _quota_off(site))


# -- the tenant's resources on the engines ------------------------------------------------


def tenant_holdings(site, tenant: str, kinds=("container", "volume", "network")) -> dict[str, dict[str, dict[str, str]]]:
    """host -> kind -> id -> name: the tenant's records on every host, plus
    what the configured engines label as the tenant's (a record may lag)."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for kind, recs in site.records().items():
        if kind not in kinds:
            continue
        for id_, (owner, host, name) in recs.items():
            if owner == tenant:
                out.setdefault(host, {}).setdefault(kind, {})[id_] = name
    flt = {"label": [f"{TENANT_LABEL}={tenant}"]}
    for host in site.engines.hosts():
        try:
            listed = site.engines.call(host, lambda api: (
                api.containers(all=True, filters=flt) if "container" in kinds else [],
                api.volumes(filters=flt).get("Volumes") or [] if "volume" in kinds else [],
                api.networks(filters=flt) if "network" in kinds else []))
        except EngineUnavailable:
            continue  # reported by the caller, which needs the engine anyway
        mine = out.setdefault(host, {})
        for c in listed[0]:
            mine.setdefault("container", {}).setdefault(c["Id"], (c.get("Names") or ["/"])[0].lstrip("/"))
        for v in listed[1]:
            mine.setdefault("volume", {}).setdefault(v["Name"], v["Name"])
        for n in listed[2]:
            mine.setdefault("network", {}).setdefault(n["Id"], n["Name"])
    return {h: k for h, k in out.items() if any(k.values())}


# -- usage -----------------------------------------------------------------------------


def _live(site, host: str, ids: dict[str, str]) -> tuple[list[dict], str | None]:
    """Live use of the tenant's containers on one host (stats of the running ones)."""
    try:
        listed = site.engines.call(host, lambda api: api.containers(all=True))
    except FdcsError as e:
        return [], str(e)
    state = {c["Id"]: c.get("State", "") for c in listed}
    rows = [{"host": host, "id": cid, "name": name, "state": state.get(cid, "gone"), "cpu_percent": None,
             "memory": None, "memory_limit": None} for cid, name in sorted(ids.items(), key=lambda x: x[1])]
    running = [r for r in rows if r["state"] == "running"]

    def sample(r):
        try:
            return r, stats_usage(site.engines.call(host, lambda api: api.stats(r["id"], stream=False)))
        except Exception:  # gone meanwhile: no sample
            return r, None

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        for r, s in pool.map(sample, running):
            if s:
                r.update(s)
    return rows, None


def cmd_usage(site, args) -> Out:
    p = site.tenant(args.tenant)
    q = site.quota()
    warnings = []
    if site.policy.enabled:
        view = quota_view(q.limits(p.id), q.overrides(p.id), q.usage(p.id))
    else:
        view = None
        warnings.append("quotas are off: memory and CPUs are not accounted; see the live use below")
    holdings = tenant_holdings(site, p.id)
    live: list[dict] = []
    for host in sorted(holdings):
        ids = holdings[host].get("container", {})
        if not ids:
            continue
        if not site.engines.has(host):
            warnings.append(f"host {host} has no engine in manage.engines: run fdcs-manage on that host "
                            f"for the live use of {len(ids)} container(s)")
            continue
        rows, err = _live(site, host, ids)
        if err:
            warnings.append(err)
        live.extend(rows)
    running = [r for r in live if r["cpu_percent"] is not None]
    total = {"cpu_percent": round(sum(r["cpu_percent"] for r in running), 2),
             "memory": sum(r["memory"] for r in running)}
    counts = {kind: sum(len(k.get(kind, {})) for k in holdings.values()) for kind in ("container", "volume", "network")}
    suspended = site.store().suspended().get(p.id)
    usage = {m: v["used"] for m, v in view.items()} if view else \
        {"containers": counts["container"], "memory": None, "cpus": None, "volumes": counts["volume"],
         "networks": counts["network"]}
    data = {"tenant": p.id, "name": p.name, "suspended": suspended, "usage": usage,
            "limits": {m: v["limit"] for m, v in view.items()} if view else None, "quota": view,
            "resources": counts, "live": live, "live_total": total}
    lines = [f"Project {_label(p)}" + (f": SUSPENDED {describe_suspension(suspended, time.time())}" if suspended else "")]
    if view:
        lines.append(quota_text("Quota:", view))
    lines.append(f"Resources: {counts['container']} container(s), {counts['volume']} volume(s), "
                 f"{counts['network']} network(s)")
    lines.append("Live use (engines' stats; CPU % of one CPU):")
    lines.append(table(["HOST", "CONTAINER", "NAME", "STATE", "CPU %", "MEMORY", "MEMORY LIMIT"],
                       [[r["host"], short(r["id"]), r["name"], r["state"],
                         "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.2f}",
                         amount("memory", r["memory"]), amount("memory", r["memory_limit"])] for r in live]
                       + ([["TOTAL", "", "", f"{len(running)} running", f"{total['cpu_percent']:.2f}",
                            amount("memory", total["memory"]), ""]] if live else []),
                       empty="(no containers)"))
    return Out(data, "\n".join(lines), warnings + _quota_off(site) if view else warnings)


# -- suspend / resume ---------------------------------------------------------------------


def stop_running(site, tenant: str, sweeps: int = 3) -> tuple[list[dict], list[str]]:
    """Stop every running container of ``tenant`` on every configured host;
    returns (stopped [{host, id, name}], problems).  Sweeps again while a
    sweep stopped something: a start the plugins admitted just before the
    suspension reached them may still have been running through the engine."""
    stopped, problems = [], []
    for _ in range(sweeps):
        got, problems = _stop_sweep(site, tenant)
        stopped += got
        if not got:
            break
    return stopped, problems


def _stop_sweep(site, tenant: str) -> tuple[list[dict], list[str]]:
    stopped, problems = [], []
    for host, kinds in sorted(tenant_holdings(site, tenant, ("container",)).items()):
        ids = kinds.get("container", {})
        if not site.engines.has(host):
            problems.append(f"host {host} has no engine in manage.engines: run fdcs-manage on that host "
                            f"to stop the tenant's {len(ids)} container(s) there")
            continue
        try:
            listed = site.engines.call(host, lambda api: api.containers(all=False))
        except FdcsError as e:
            problems.append(str(e))
            continue
        running = {c["Id"] for c in listed}
        for cid, name in sorted(ids.items()):
            if cid not in running:
                continue
            try:
                site.engines.call(host, lambda api: api.stop(cid, timeout=10))
                stopped.append({"host": host, "id": cid, "name": name})
            except FdcsError as e:
                problems.append(f"container {name or short(cid)} on {host}: {e}")
            except Exception as e:
                if not _gone(e):  # removed meanwhile: nothing to stop
                    raise
    return stopped, problems


def _gone(e: Exception) -> bool:
    """The engine answered 404 (docker's NotFound; imported late: docker-py is slow to load)."""
    from docker.errors import NotFound
    return isinstance(e, NotFound)


def cmd_suspend(site, args) -> Out:
    from ..policy import SUSPENSION_TTL
    p = site.tenant(args.tenant)
    site.store().suspend(p.id, by=_operator(), reason=args.reason or "")
    # every plugin worker re-reads the suspended set within SUSPENSION_TTL:
    # after that no request of the tenant can start what we stop
    site.sleep(SUSPENSION_TTL + 0.5)
    stopped, problems = stop_running(site, p.id)
    data = {"tenant": p.id, "name": p.name, "suspended": True, "stopped": stopped, "problems": problems}
    text = (f"Project {_label(p)} is suspended: every request of its users is refused.\n"
            + (f"Stopped {len(stopped)} running container(s):\n" + table(["HOST", "CONTAINER", "NAME"],
               [[s["host"], short(s["id"]), s["name"]] for s in stopped]) if stopped else "No running container to stop."))
    return Out(data, text, problems, failed=bool(problems))


def cmd_resume(site, args) -> Out:
    p = site.tenant(args.tenant)
    was = site.store().resume(p.id)
    text = (f"Project {_label(p)} is resumed" if was else f"Project {_label(p)} was not suspended") + \
        "; its stopped containers stay stopped (its users start them with docker start)."
    return Out({"tenant": p.id, "name": p.name, "was_suspended": was}, text)


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# -- purge -----------------------------------------------------------------------------


def purge_plan(site, tenant: str) -> dict[str, Any]:
    """Everything FDCS and the engines hold of ``tenant``."""
    holdings = tenant_holdings(site, tenant)
    execs = sorted(e for e, (t, _) in site.store().execs().items() if t == tenant)
    return {"hosts": holdings, "execs": execs, "quota": site.quota().overrides(tenant),
            "suspended": tenant in site.store().suspended(),
            "adopted": {k: sorted(i for i, t in ids.items() if t == tenant) for k, ids in site.adopted().items()}}


def purge_text(plan: dict[str, Any]) -> str:
    rows = [[host, kind, short(i) if kind != "volume" else i, name if kind != "volume" else ""]
            for host, kinds in sorted(plan["hosts"].items()) for kind in ("container", "volume", "network")
            for i, name in sorted(kinds.get(kind, {}).items())]
    lines = [table(["HOST", "KIND", "ID", "NAME"], rows, empty="no containers, volumes or networks")]
    lines.append(f"exec records: {len(plan['execs'])}; quota overrides: "
                 f"{', '.join(f'{m}={v}' for m, v in plan['quota'].items()) or 'none'}; "
                 f"suspended: {'yes' if plan['suspended'] else 'no'}")
    return "\n".join(lines)


def cmd_purge(site, args) -> Out:
    p = site.tenant(args.tenant)
    if not args.force:
        try:
            exists = site.directory.get(p.id) is not None
        except FdcsError as e:
            raise FdcsError(f"cannot check that project {p.id} is deleted from Keystone ({e}); "
                            "--force purges it anyway") from e
        if exists:
            raise FdcsError(f"project {_label(p)} still exists in Keystone: delete it there first, or pass --force")
    down = {h: why for h in site.engines.hosts() if (why := site.engines.ping(h)) != "yes"}
    if down:
        raise FdcsError("a purge must see every engine, or it misses what they hold: "
                        + "; ".join(f"{h}: {why.removeprefix('no: ')}" for h, why in sorted(down.items())))
    plan = purge_plan(site, p.id)
    missing = sorted(h for h in plan["hosts"] if not site.engines.has(h))
    if missing:
        raise FdcsError(f"the tenant has resources on host(s) {', '.join(missing)}, which have no engine in "
                        "manage.engines: run fdcs-manage on those hosts (or add them to manage.engines)")
    print_plan = f"Purge of project {_label(p)} removes:\n{purge_text(plan)}"
    if not site.confirm(print_plan + "\nRemove all of this? [y/N] ", args.yes):
        return Out({"tenant": p.id, "purged": False}, "Nothing removed.", failed=True)
    # Nothing new of the tenant while we remove: its users' tokens may still
    # be in the plugins' caches (keystone.cache_ttl) after the project's deletion.
    from ..policy import SUSPENSION_TTL
    site.store().suspend(p.id, by=_operator(), reason="purge in progress")
    site.sleep(SUSPENSION_TTL + 0.5)
    plan = purge_plan(site, p.id)  # what exists now
    removed: list[dict] = []
    problems: list[str] = []
    for host, kinds in sorted(plan["hosts"].items()):
        store = site.store(host)
        for kind, remove in (("container", lambda api, i: api.remove_container(i, force=True, v=True)),
                             ("volume", lambda api, i: api.remove_volume(i, force=True)),
                             ("network", lambda api, i: api.remove_network(i))):
            for id_, name in sorted(kinds.get(kind, {}).items()):
                try:
                    site.engines.call(host, lambda api: remove(api, id_))
                except FdcsError as e:
                    problems.append(f"{kind} {name or id_} on {host}: {e}")
                    continue
                except Exception as e:
                    if not _gone(e):  # gone already: only the record is left
                        raise
                store.remove(kind, id_)
                removed.append({"host": host, "kind": kind, "id": id_, "name": name})
    store = site.store()
    for e in plan["execs"]:
        store.remove("exec", e)
    site.quota().clear_limits(p.id)
    for kind, ids in plan["adopted"].items():
        if ids:
            site.call(site.redis.hdel, f"fdcs:adopted:{kind}", *ids)
    if problems:
        problems.append(f"project {p.id} stays suspended until a purge completes")
    else:
        store.resume(p.id)
        usage = site.quota().usage(p.id)
        if not any(usage.values()):
            site.call(site.redis.delete, f"fdcs:usage:{p.id}")
    data = {"tenant": p.id, "name": p.name, "purged": not problems, "removed": removed,
            "execs_removed": len(plan["execs"]), "problems": problems}
    text = (f"Removed {len(removed)} resource(s), {len(plan['execs'])} exec record(s), the quota overrides "
            f"and any suspension of project {_label(p)}.")
    return Out(data, text, problems, failed=bool(problems))


__all__ = ["UsageError", "cmd_tenants", "cmd_usage", "cmd_quota_show", "cmd_quota_set", "cmd_quota_clear",
           "cmd_flavors", "cmd_suspend", "cmd_resume", "cmd_purge"]
