"""Who owns what on one engine, decided from the engine's own state: pure.

The labels on the resources are the truth that survives a loss of Redis;
this module turns an engine snapshot into the ownership records it implies
and compares them with the records Redis holds for that host.

Rules (ARCHITECTURE.md, "Tenancy model"):

* a container belongs to the tenant of its ``org.fiware.fdcs.tenant`` label,
  unless its image carries the same label (the container may have inherited
  it: ignored);
* an exec belongs to the owner of its container (``ExecIDs``);
* a network belongs to the tenant of its label;
* a volume belongs to the tenant of its label; an unlabelled volume with a
  name in a tenant's scoped form belongs to that tenant (only that tenant's
  requests can create the name); any other unlabelled volume (anonymous, an
  image ``VOLUME``) belongs to the tenant whose containers mount it, when
  that is exactly one tenant;
* a resource without an owner by these rules that a site administrator
  adopted (``fdcs-manage adopt``: Redis ``fdcs:adopted:<kind>``, id ->
  tenant, since labels cannot be added to an existing resource) belongs to
  that tenant; a label always wins over an adoption;
* everything else is unowned: for administrators only, and reported.

A container whose scoped name names another tenant than its label is a
conflict: reported, and the label wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from authz_plugin.scoping import TENANT_LABEL, unscope, valid_tenant

PREDEFINED_NETWORKS = frozenset({"bridge", "host", "none"})


@dataclass
class Snapshot:
    """One engine's resources, as the reconciler reads them.

    containers: ``{"Id", "Name" (without "/"), "Labels", "ImageLabels",
    "ExecIDs", "Volumes" (names of mounted volumes)}``; networks:
    ``{"Id", "Name", "Labels"}``; volumes: ``{"Name", "Labels"}``;
    adopted: kind -> id (volume: name) -> tenant, the adoptions in Redis.
    """

    containers: list[dict] = field(default_factory=list)
    networks: list[dict] = field(default_factory=list)
    volumes: list[dict] = field(default_factory=list)
    adopted: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Desired:
    records: dict[str, dict[str, tuple[str, str]]]  # kind -> id -> (tenant, name)
    execs: dict[str, tuple[str, str]]  # exec id -> (tenant, container id)
    unowned: list[str] = field(default_factory=list)  # "kind name"
    conflicts: list[str] = field(default_factory=list)


@dataclass
class Actions:
    add: list[tuple[str, str, str, str]] = field(default_factory=list)  # kind, id, tenant, name
    remove: list[tuple[str, str]] = field(default_factory=list)  # kind, id
    add_execs: list[tuple[str, str, str]] = field(default_factory=list)  # exec id, tenant, container id
    remove_execs: list[str] = field(default_factory=list)

    @property
    def drift(self) -> int:
        return len(self.add) + len(self.remove) + len(self.add_execs) + len(self.remove_execs)


def _tenant(labels: dict | None) -> str | None:
    t = (labels or {}).get(TENANT_LABEL)
    return t if t and valid_tenant(t) else None


def container_owner(c: dict) -> tuple[str | None, str | None]:
    """(owner, conflict message) of one container."""
    t = _tenant(c.get("Labels"))
    if t is None or (c.get("ImageLabels") or {}).get(TENANT_LABEL) == t:
        return None, None
    name = c.get("Name") or ""
    parts = unscope(name)
    # The engine's own names ("musing_fermat") unscope too; only a prefix
    # shaped like the deployment's project ids can be another tenant's.
    if parts and parts[0] != t and len(parts[0]) == len(t):
        return t, f"container {name}: its name is scoped for {parts[0]} but its label says {t}"
    return t, None


def _adopter(adopted: dict[str, dict[str, str]], kind: str, id_: str) -> str | None:
    t = adopted.get(kind, {}).get(id_)
    return t if t and valid_tenant(t) else None


def desired(snap: Snapshot, adopted: dict[str, dict[str, str]] | None = None) -> Desired:
    """The records ``snap`` implies; ``adopted`` (default ``snap.adopted``):
    kind -> id -> tenant, owners of resources no label gives one."""
    adopted = snap.adopted if adopted is None else adopted
    out = Desired({"container": {}, "network": {}, "volume": {}}, {})
    mounts: dict[str, set[str]] = {}
    for c in snap.containers:
        owner, conflict = container_owner(c)
        if conflict:
            out.conflicts.append(conflict)
        if owner is None:
            owner = _adopter(adopted, "container", c["Id"])
        if owner is None:
            out.unowned.append(f"container {c.get('Name') or c['Id'][:12]}")
            continue
        out.records["container"][c["Id"]] = (owner, c.get("Name") or "")
        for e in c.get("ExecIDs") or []:
            out.execs[e] = (owner, c["Id"])
        for v in c.get("Volumes") or []:
            mounts.setdefault(v, set()).add(owner)
    for n in snap.networks:
        owner = _tenant(n.get("Labels"))
        if owner is None and n.get("Name") not in PREDEFINED_NETWORKS:
            owner = _adopter(adopted, "network", n["Id"])
        if owner is None:
            if n.get("Name") not in PREDEFINED_NETWORKS:
                out.unowned.append(f"network {n.get('Name')}")
            continue
        out.records["network"][n["Id"]] = (owner, n.get("Name") or "")
    for v in snap.volumes:
        name = v["Name"]
        owner = _tenant(v.get("Labels")) or _adopter(adopted, "volume", name)
        if owner is None:
            parts = unscope(name)
            if parts:
                owner = parts[0]
            elif len(mounts.get(name, ())) == 1:
                owner = next(iter(mounts[name]))
        if owner is None:
            out.unowned.append(f"volume {name}")
            continue
        out.records["volume"][name] = (owner, "")
    return out


def unowned_names(snap: Snapshot, want: Desired) -> dict[str, set[str]]:
    """The engine names of the containers and networks ``want`` gives no
    owner (the predefined networks among them)."""
    return {kind: {r["Name"] for r in getattr(snap, kind + "s") if r["Id"] not in want.records[kind] and r.get("Name")}
            for kind in ("container", "network")}


def diff(want: Desired, have: dict[str, dict[str, tuple[str, str]]],
         have_execs: dict[str, tuple[str, str]]) -> Actions:
    """What to write so that this host's records equal ``want``.

    ``have`` is this host's records per kind (id -> (tenant, name));
    ``have_execs`` every exec record (id -> (tenant, container id)): only
    those whose container is one of this host's are touched.
    """
    act = Actions()
    for kind, records in want.records.items():
        current = have.get(kind, {})
        for id_, (tenant, name) in records.items():
            cur = current.get(id_)
            if cur is None or cur[0] != tenant or (kind != "volume" and cur[1] != name):
                act.add.append((kind, id_, tenant, name))
        for id_ in current:
            if id_ not in records:
                act.remove.append((kind, id_))
    host_containers = set(have.get("container", {})) | set(want.records["container"])
    for eid, (tenant, cid) in want.execs.items():
        if have_execs.get(eid) != (tenant, cid):
            act.add_execs.append((eid, tenant, cid))
    for eid, (_, cid) in have_execs.items():
        if cid in host_containers and eid not in want.execs:
            act.remove_execs.append(eid)
    return act
