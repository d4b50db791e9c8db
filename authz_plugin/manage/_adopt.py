"""Adoption: may an unowned resource be handed to a tenant?  Pure.

``fdcs-manage adopt`` gives an orphan (a resource no label, name or mount
gives an owner, e.g. one an administrator made) to a tenant.  The resource
must be one the tenant could have made itself, so the create rules of
``authz_plugin.rules`` run on a create request rebuilt from its inspect
output -- a privileged container, one on the host network or with host
binds, a volume with driver options (a bind of a host path) or a network
with IPv6 or driver options is refused with the rules' own message.

Rebuilding the request (:func:`container_create_request`):

* the top level is the inspect ``Config``, with the tenant's label added;
  ``HostConfig`` and ``NetworkingConfig`` (``NetworkSettings.Networks``,
  requested settings only: ``IPAMConfig``, ``Links``, ``Aliases``) follow;
* values the engine filled in at create are put back to "unset", per
  moby 20.10: ``MaskedPaths`` and ``ReadonlyPaths`` equal to the defaults
  (daemon/create_unix.go).  ``CgroupnsMode`` is kept as it is: a container
  in the host's cgroup namespace (what a cgroup v1 engine gives every
  container created without ``--cgroupns private``) is never a tenant's;
* a key the request shapes do not know is dropped when it holds a zero
  value and refused otherwise (fail closed: a setting the rules cannot
  read is never waved through);
* the name is passed only when it is in the tenant's scoped form (the
  rules' name checks then apply); a name scoped for another tenant is
  refused; a ``PidsLimit`` must be set (the rules require one).

Networks and volumes run ``network_create`` / ``volume_create`` on their
inspect output, under a scoped placeholder name when theirs is not the
tenant's (the name rule is about making names, not about owning them).  The
IPAM pools of a network are the engine's allocation and are not checked.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .. import gojson, rules, shapes
from ..errors import Denied
from ..request import Headers, Request
from ..scoping import NAME_LABEL, TENANT_LABEL, is_scoped_for, scope, unscope

# moby 20.10 oci/defaults.go DefaultSpec().Linux.MaskedPaths / ReadonlyPaths
DEFAULT_MASKED_PATHS = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                        "/sys/firmware"]
DEFAULT_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
PLACEHOLDER = "adopted"


def _zero(v: Any) -> bool:
    return v in (None, False, 0, "", [], {})


def project(value: Any, shape: gojson.Shape, where: str) -> Any:
    """``value`` (engine output) reduced to what ``shape`` decodes: unknown
    keys with zero values dropped, unknown keys with values refused."""
    if isinstance(shape, gojson.Struct) and isinstance(value, dict):
        out = {}
        for k, v in value.items():
            f = shape.fields.get(gojson.gofold(k) or "")
            if f is None:
                if not _zero(v):
                    raise Denied(f"{where}{k} is set on the resource but the rules do not know it; refused")
                continue
            out[f.name] = project(v, f.shape, f"{where}{f.name}.")
        return out
    if isinstance(shape, gojson.Map) and isinstance(value, dict):
        return {k: project(v, shape.elem, f"{where}{k}.") for k, v in value.items()}
    if isinstance(shape, gojson.List) and isinstance(value, list):
        return [project(v, shape.elem, where) for v in value]
    return value


def _other_tenant(tenant: str, name: str) -> str | None:
    """The tenant another scoped name belongs to (the reconciler's
    heuristic: a prefix shaped like the deployment's project ids)."""
    parts = unscope(name)
    if parts and parts[0] != tenant and len(parts[0]) == len(tenant):
        return parts[0]
    return None


def _labels(labels: Mapping[str, str] | None, tenant: str, what: str) -> dict[str, str]:
    labels = dict(labels or {})
    other = labels.get(TENANT_LABEL)
    if other and other != tenant:
        raise Denied(f"{what} carries the tenant label of project {other} (inherited from its image?); "
                     "it cannot be given to another project")
    labels[TENANT_LABEL] = tenant
    return labels


def container_create_request(c: Mapping[str, Any], tenant: str, cgroup_v1: bool) -> Request:
    """The create request the tenant would have sent for inspected container ``c``."""
    name = (c.get("Name") or "").lstrip("/")
    other = _other_tenant(tenant, name)
    if other:
        raise Denied(f"container {name}: its name is scoped for project {other}")
    cfg = project(dict(c.get("Config") or {}), shapes.CONTAINER_CREATE, "Config.")
    cfg["Labels"] = _labels(cfg.get("Labels"), tenant, f"container {name}")
    hc = dict(c.get("HostConfig") or {})
    if hc.get("MaskedPaths") == DEFAULT_MASKED_PATHS:
        hc["MaskedPaths"] = None
    if hc.get("ReadonlyPaths") == DEFAULT_READONLY_PATHS:
        hc["ReadonlyPaths"] = None
    if not hc.get("PidsLimit"):
        raise Denied(f"container {name} has no PidsLimit, which the rules require: set one as administrator "
                     f"(docker update --pids-limit N {name}) and adopt it again")
    cfg["HostConfig"] = project(hc, shapes.HOST_CONFIG, "HostConfig.")
    eps = {}
    for net, ep in ((c.get("NetworkSettings") or {}).get("Networks") or {}).items():
        ep = ep or {}
        ipam = ep.get("IPAMConfig")
        eps[net] = {"IPAMConfig": ipam if ipam and any(not _zero(v) for v in ipam.values()) else None,
                    "Links": ep.get("Links"), "Aliases": ep.get("Aliases")}
    cfg["NetworkingConfig"] = {"EndpointsConfig": eps}
    query = (("name", name),) if is_scoped_for(tenant, name) else ()
    return _request("/containers/create", query, cfg)


def _request(path: str, query: tuple, body: dict) -> Request:
    raw = json.dumps(body).encode()
    return Request(method="POST", path=path, version="1.41", query=query,
                   headers=Headers({"Content-Type": "application/json", "Content-Length": str(len(raw))}),
                   body=raw, raw_uri="/v1.41" + path, media_type="application/json")


def check_container(c: Mapping[str, Any], tenant: str, policy: rules.Policy, cgroup_v1: bool) -> rules.Plan:
    """The create rules' plan for adopting ``c``, or :class:`Denied`."""
    return rules.container_create(container_create_request(c, tenant, cgroup_v1), tenant, policy)


def _name_for_rules(tenant: str, name: str, labels: dict[str, str]) -> str:
    if is_scoped_for(tenant, name):
        return name
    labels.pop(NAME_LABEL, None)  # it described the real name, not the placeholder
    return scope(tenant, PLACEHOLDER)


def check_volume(v: Mapping[str, Any], tenant: str, policy: rules.Policy) -> rules.Plan:
    name = v.get("Name") or ""
    labels = _labels(v.get("Labels"), tenant, f"volume {name}")
    body = {"Name": _name_for_rules(tenant, name, labels), "Driver": v.get("Driver") or "",
            "DriverOpts": v.get("Options") or None, "Labels": labels}
    return rules.volume_create(_request("/volumes/create", (), body), tenant, policy)


def check_network(n: Mapping[str, Any], tenant: str, policy: rules.Policy) -> rules.Plan:
    name = n.get("Name") or ""
    other = _other_tenant(tenant, name)
    if other:
        raise Denied(f"network {name}: its name is scoped for project {other}")
    labels = _labels(n.get("Labels"), tenant, f"network {name}")
    ipam = n.get("IPAM") or {}
    body = {"Name": _name_for_rules(tenant, name, labels), "Driver": n.get("Driver") or "",
            "Scope": n.get("Scope") or "", "EnableIPv6": bool(n.get("EnableIPv6")),
            "IPAM": {"Driver": ipam.get("Driver") or "", "Options": ipam.get("Options") or None},
            "Internal": bool(n.get("Internal")), "Attachable": bool(n.get("Attachable")),
            "Ingress": bool(n.get("Ingress")), "ConfigOnly": bool(n.get("ConfigOnly")),
            "ConfigFrom": n.get("ConfigFrom") if (n.get("ConfigFrom") or {}).get("Network") else None,
            "Options": n.get("Options") or None, "Labels": labels}
    return rules.network_create(_request("/networks/create", (), body), tenant, policy)

