"""Tenant rules: from a canonical request to a :class:`Plan`, or a refusal.

Pure: a rule reads the request, the caller's tenant and the :class:`Policy`
(limits from the configuration) and returns what must still be true for the
request to be allowed -- the resources it references, each of which must
resolve to the caller (:class:`Need`) -- and what to record when the engine
answers (``Plan.record``).  Anything refused raises a :class:`Denied`
subclass whose message names the field, e.g.
``HostConfig.Privileged is not allowed``.

Every rule reads bodies through :func:`gojson.decode` with the shapes the
engine decodes into, so each field is checked wherever the engine would
read it from (see ``shapes.CONTAINER_CREATE`` for the deprecated top-level
host-config fields).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from . import gojson, shapes
from .config import Config
from .endpoints import Endpoint
from .errors import BadRequest, Denied, NotFound
from .quota import QuotaPolicy
from .request import Request
from .scoping import LABEL_PREFIX, NAME_LABEL, TENANT_LABEL, is_scoped_for, looks_like_id, unscope, valid_name


@dataclass(frozen=True)
class Policy:
    """The limits rules apply, read once from the configuration."""

    cap_add_allowed: frozenset[str] = frozenset()
    log_drivers: frozenset[str] = frozenset({"json-file", "local"})
    log_max_size: int = 10 * 1024**2
    log_max_file: int = 5
    pids_limit_max: int = 1024
    cpu_shares_max: int = 1024
    ulimits_max: dict[str, int] = field(default_factory=lambda: {"nofile": 65536, "nproc": 4096, "core": 0})
    host_port_range: tuple[int, int] = (30000, 32767)
    default_runtime: str = "runc"
    registries: frozenset[str] = frozenset({"docker.io"})
    quota: QuotaPolicy = field(default_factory=QuotaPolicy)

    @classmethod
    def from_config(cls, cfg: Config) -> "Policy":
        return cls(
            cap_add_allowed=frozenset(_norm_cap(c) for c in cfg["policy.cap_add_allowed"]),
            log_drivers=frozenset(cfg["policy.log_drivers"]),
            log_max_size=cfg["policy.log_max_size"],
            log_max_file=cfg["policy.log_max_file"],
            pids_limit_max=cfg["policy.pids_limit_max"],
            cpu_shares_max=cfg["policy.cpu_shares_max"],
            ulimits_max=dict(cfg["policy.ulimits_max"]),
            host_port_range=cfg["policy.host_port_range"],
            default_runtime=cfg["policy.default_runtime"],
            registries=frozenset(_norm_registry(r) for r in cfg["policy.registries"]),
            quota=QuotaPolicy.from_config(cfg),
        )


@dataclass(frozen=True)
class Need:
    """``ref`` (a name, id or id prefix of ``kind``) must be the caller's.

    ``where`` names the request field it came from, for the audit line.
    """

    kind: str
    ref: str
    where: str = "path"


@dataclass
class Plan:
    """What a rule decided: the references still to check and what to record."""

    needs: list[Need] = field(default_factory=list)
    #: what AuthZRes records on success: ("container", {...}), ("exec", ...), ...
    record: tuple[str, dict[str, Any]] | None = None
    #: the resource the audit line names
    resource: str = ""
    #: quota charge (quotas on): ("create", vector, named volumes) or ("update", vector)
    charge: tuple | None = None


# -- helpers -------------------------------------------------------------------


def _norm_cap(cap: str) -> str:
    cap = cap.strip().upper()
    return cap[4:] if cap.startswith("CAP_") else cap


def _norm_registry(host: str) -> str:
    host = host.strip().lower()
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com") else host


def registry_of(image: str) -> str:
    """The registry an image reference is pulled from (Docker's rule: the
    first path component is a registry when it holds ``.`` or ``:`` or is
    ``localhost``)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return _norm_registry(first)
    return "docker.io"


def _registry_allowed(policy: Policy, registry: str, what: str) -> None:
    if registry not in policy.registries:
        raise Denied(f"{what}: registry {registry} is not on this service's allow-list "
                     f"({', '.join(sorted(policy.registries)) or 'none'})")


def _labels(labels: dict[str, str] | None, tenant: str, where: str, name: str | None) -> None:
    """The tenant label must be the caller's; other FDCS labels consistent."""
    labels = labels or {}
    if labels.get(TENANT_LABEL) != tenant:
        raise Denied(f"{where}: the label {TENANT_LABEL}={tenant} is required "
                     "(the name scoper adds it; without it, add it yourself)")
    for key, value in labels.items():
        if key == TENANT_LABEL or not key.startswith(LABEL_PREFIX):
            continue
        if key == NAME_LABEL:
            if name is None or value != name:
                raise Denied(f"{where}: the label {NAME_LABEL} must equal the unscoped name")
            continue
        raise Denied(f"{where}: the label {key} is reserved for FDCS")


def _scoped_name(tenant: str, name: str, what: str) -> str:
    """Check that ``name`` is the caller's scoped form; return the original name."""
    if not is_scoped_for(tenant, name):
        raise Denied(f"{what} {name!r} must be in your scoped form {tenant}_<name> "
                     "(the name scoper does this for you)")
    return unscope(name)[1]


def _ref_need(kind: str, ref: str, where: str) -> Need:
    if not ref or "/" in ref:
        raise NotFound(f"No such {kind}: {ref}")
    return Need(kind, ref, where)


def _link_need(link: str, where: str) -> Need:
    """A link ``name[:alias]``: the name must be the caller's, the alias a
    plain name.  For a container not on a user-defined network the engine
    reserves the container name ``path.Join(<its name>, alias)`` for the
    link's target (``opts.ParseLink``, ``daemon.registerLink``): an alias such
    as ``../<tenant>_web`` would give another tenant's scoped name to one of
    the caller's containers."""
    name, sep, alias = link.partition(":")
    if sep:
        if name.startswith("/"):
            alias = alias.rpartition("/")[2]  # ParseLink keeps the last element only
        if not valid_name(alias):
            raise Denied(f"{where}: the link alias {alias!r} is not allowed "
                         "(letters, digits, '_', '.' and '-', starting with a letter or digit)")
    return _ref_need("container", name.lstrip("/"), where)


def _nonempty(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {})


# -- container create / update ------------------------------------------------

# only ever switched on: "=false" would override the engine-wide "no-new-privileges": true
_SECURITY_OPT_OK = re.compile(r"no-new-privileges(?:[=:]true)?")
_LOG_OPTS_OK = frozenset({"max-size", "max-file", "compress", "labels", "labels-regex", "env", "env-regex", "tag"})
_ALWAYS_REFUSED_RESOURCES = (
    "BlkioWeightDevice", "BlkioDeviceReadBps", "BlkioDeviceWriteBps", "BlkioDeviceReadIOps",
    "BlkioDeviceWriteIOps", "Devices", "DeviceCgroupRules", "DeviceRequests", "CgroupParent",
    "CpuRealtimePeriod", "CpuRealtimeRuntime",
)


def _size(value: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*", value, re.I)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** "_kmgtp".index(m.group(2).lower() or "_"))


def _resources(hc: dict[str, Any], policy: Policy, prefix: str, update: bool) -> None:
    for key in _ALWAYS_REFUSED_RESOURCES:
        if _nonempty(hc.get(key)):
            raise Denied(f"{prefix}{key} is not allowed")
    if hc.get("OomKillDisable"):
        raise Denied(f"{prefix}OomKillDisable is not allowed")
    shares = hc.get("CpuShares") or 0
    if shares > policy.cpu_shares_max:
        raise Denied(f"{prefix}CpuShares {shares} is above the limit {policy.cpu_shares_max}")
    pids = hc.get("PidsLimit")
    if pids is None and not update:
        raise Denied(f"{prefix}PidsLimit must be set (1 to {policy.pids_limit_max}); "
                     "the name scoper sets a default for you")
    if pids is not None and not 0 < pids <= policy.pids_limit_max:
        raise Denied(f"{prefix}PidsLimit {pids} is not allowed (1 to {policy.pids_limit_max})")
    for i, ul in enumerate(hc.get("Ulimits") or []):
        ul = ul or {}
        name = ul.get("Name") or ""
        if name not in policy.ulimits_max:
            raise Denied(f"{prefix}Ulimits[{i}] {name!r} is not allowed "
                         f"(allowed: {', '.join(sorted(policy.ulimits_max)) or 'none'})")
        cap = policy.ulimits_max[name]
        for part in ("Soft", "Hard"):
            v = ul.get(part) or 0
            if not 0 <= v <= cap:
                raise Denied(f"{prefix}Ulimits[{i}] {name} {part.lower()} limit {v} is not allowed (0 to {cap})")


def _log_config(lc: dict[str, Any] | None, policy: Policy) -> None:
    lc = lc or {}
    driver = lc.get("Type") or ""
    if driver and driver not in policy.log_drivers:
        raise Denied(f"HostConfig.LogConfig.Type {driver!r} is not allowed "
                     f"(allowed: {', '.join(sorted(policy.log_drivers))})")
    for key, value in (lc.get("Config") or {}).items():
        if key not in _LOG_OPTS_OK:
            raise Denied(f"HostConfig.LogConfig.Config {key!r} is not allowed")
        if key == "max-size":
            size = _size(value)
            if size is None or size <= 0 or size > policy.log_max_size:
                raise Denied(f"HostConfig.LogConfig.Config max-size {value!r} is not allowed "
                             f"(at most {policy.log_max_size} bytes)")
        if key == "max-file":
            if not value.isdigit() or not 0 < int(value) <= policy.log_max_file:
                raise Denied(f"HostConfig.LogConfig.Config max-file {value!r} is not allowed "
                             f"(1 to {policy.log_max_file})")
    if driver and "max-size" not in (lc.get("Config") or {}):
        # a driver's own default may be over the cap (local: 20 MiB a file);
        # only an empty Type gets the engine's default driver and options
        raise Denied(f"HostConfig.LogConfig.Config max-size is required with the {driver!r} log driver "
                     f"(at most {policy.log_max_size} bytes)")


def _namespace_mode(value: str | None, field_name: str, allowed: tuple[str, ...], needs: list[Need],
                    container_ok: bool) -> None:
    value = value or ""
    if value in allowed:
        return
    if value == "host":
        raise Denied(f"HostConfig.{field_name} 'host' is not allowed")
    if container_ok and value.startswith("container:"):
        needs.append(_ref_need("container", value[len("container:"):], f"HostConfig.{field_name}"))
        return
    raise Denied(f"HostConfig.{field_name} {value!r} is not allowed")


def _port_bindings(pb: dict[str, Any] | None, policy: Policy) -> None:
    lo, hi = policy.host_port_range
    for port, bindings in (pb or {}).items():
        for b in bindings or []:
            hp = ((b or {}).get("HostPort") or "").strip()
            if hp in ("", "0"):
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", hp)
            first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
            if not m or not lo <= first <= last <= hi:
                raise Denied(f"HostConfig.PortBindings {port}: host port {hp} is outside the allowed range "
                             f"{lo}-{hi} (omit it for an ephemeral port)")


def _volume_source(tenant: str, source: str, where: str, volumes: list[str]) -> None:
    if not source:
        return  # anonymous volume
    if source.startswith("/"):
        raise Denied(f"{where}: host path {source!r} is not allowed (only volumes)")
    if not is_scoped_for(tenant, source):
        raise Denied(f"{where}: volume {source!r} is not one of yours (use your scoped name {tenant}_<name>)")
    volumes.append(source)


def _binds(binds: list[str] | None, tenant: str, volumes: list[str]) -> None:
    for i, spec in enumerate(binds or []):
        parts = spec.split(":")
        where = f"HostConfig.Binds[{i}]"
        if len(parts) > 3 or not spec:
            raise BadRequest(f"{where}: {spec!r} is not a valid volume specification")
        source = parts[0] if len(parts) >= 2 else ""
        _volume_source(tenant, source, where, volumes)


def _mounts(mounts: list[dict] | None, tenant: str, volumes: list[str]) -> None:
    for i, m in enumerate(mounts or []):
        m = m or {}
        where = f"HostConfig.Mounts[{i}]"
        mtype = m.get("Type") or ""
        if mtype == "tmpfs":
            if _nonempty(m.get("Source")):
                raise Denied(f"{where}: a tmpfs mount takes no Source")
        elif mtype == "volume":
            _volume_source(tenant, m.get("Source") or "", where, volumes)
            vo = m.get("VolumeOptions") or {}
            if _nonempty(vo.get("Labels")) or _nonempty(vo.get("DriverConfig")):
                raise Denied(f"{where}.VolumeOptions: volume driver, options and labels are not allowed")
        else:
            raise Denied(f"{where}: mount type {mtype!r} is not allowed (volume and tmpfs only)")
        if m.get("BindOptions") is not None:
            raise Denied(f"{where}.BindOptions is not allowed")


def _endpoint(ep: dict[str, Any] | None, where: str, needs: list[Need]) -> None:
    ep = ep or {}
    for key in ("IPAMConfig", "IPAddress", "GlobalIPv6Address", "MacAddress", "NetworkID",
                "EndpointID", "DriverOpts", "Gateway", "IPv6Gateway", "IPPrefixLen", "GlobalIPv6PrefixLen"):
        if _nonempty(ep.get(key)):
            raise Denied(f"{where}.{key} is not allowed (addresses come from the network's pool)")
    for j, link in enumerate(ep.get("Links") or []):
        needs.append(_link_need(link, f"{where}.Links[{j}]"))


def container_create(req: Request, tenant: str, policy: Policy) -> Plan:
    body = gojson.decode(req.body, shapes.CONTAINER_CREATE)
    needs: list[Need] = []
    volumes: list[str] = []

    name = req.q("name")
    original = None
    if name:
        name = name[1:] if name.startswith("/") else name
        original = _scoped_name(tenant, name, "the container name")
    _labels(body.get("Labels"), tenant, "Labels", original)
    if _nonempty(body.get("MacAddress")):
        raise Denied("MacAddress is not allowed (addresses come from the network's pool)")

    hc = body.get("HostConfig") or {}
    p = "HostConfig."
    if hc.get("Privileged"):
        raise Denied("HostConfig.Privileged is not allowed")
    for cap in hc.get("CapAdd") or []:
        if _norm_cap(cap) not in policy.cap_add_allowed:
            raise Denied(f"HostConfig.CapAdd {cap!r} is not allowed")
    for opt in hc.get("SecurityOpt") or []:
        if not _SECURITY_OPT_OK.fullmatch(opt):
            if opt.startswith("no-new-privileges"):
                raise Denied(f"HostConfig.SecurityOpt {opt!r} is not allowed (no-new-privileges can only be switched on)")
            raise Denied(f"HostConfig.SecurityOpt {opt.split('=')[0].split(':')[0]!r} is not allowed "
                         "(only no-new-privileges)")
    for key in ("MaskedPaths", "ReadonlyPaths"):
        if hc.get(key) is not None:
            raise Denied(f"HostConfig.{key} is not allowed")
    for key in ("Sysctls", "StorageOpt", "Cgroup"):
        if _nonempty(hc.get(key)):
            raise Denied(f"HostConfig.{key} is not allowed")
    if (hc.get("Runtime") or "") not in ("", policy.default_runtime):
        raise Denied(f"HostConfig.Runtime {hc['Runtime']!r} is not allowed")
    if (hc.get("OomScoreAdj") or 0) < 0:
        raise Denied("HostConfig.OomScoreAdj below 0 is not allowed")
    if (hc.get("Isolation") or "") not in ("", "default"):
        raise Denied(f"HostConfig.Isolation {hc['Isolation']!r} is not allowed")
    if (hc.get("VolumeDriver") or "") not in ("", "local"):
        raise Denied(f"HostConfig.VolumeDriver {hc['VolumeDriver']!r} is not allowed")
    _resources(hc, policy, p, update=False)
    _log_config(hc.get("LogConfig"), policy)
    _port_bindings(hc.get("PortBindings"), policy)
    _binds(hc.get("Binds"), tenant, volumes)
    _mounts(hc.get("Mounts"), tenant, volumes)

    _namespace_mode(hc.get("PidMode"), "PidMode", ("",), needs, container_ok=True)
    _namespace_mode(hc.get("IpcMode"), "IpcMode", ("", "none", "private", "shareable"), needs, container_ok=True)
    _namespace_mode(hc.get("UTSMode"), "UTSMode", ("",), needs, container_ok=False)
    _namespace_mode(hc.get("UsernsMode"), "UsernsMode", ("",), needs, container_ok=False)
    if not hc.get("CgroupnsMode"):
        # left empty, the engine uses the host's cgroup namespace on a cgroup
        # v1 host (its default there, and always for API < 1.41)
        raise Denied("HostConfig.CgroupnsMode must be 'private' (add --cgroupns private; "
                     "the name scoper sets it for you)")
    _namespace_mode(hc.get("CgroupnsMode"), "CgroupnsMode", ("private",), needs, container_ok=False)

    mode = hc.get("NetworkMode") or ""
    if mode in ("", "default", "bridge"):
        raise Denied(f"HostConfig.NetworkMode {mode or 'default'!r} (the engine's shared bridge) is not allowed; "
                     "use one of your networks or 'none' (the name scoper gives you a default network)")
    if mode == "host":
        raise Denied("HostConfig.NetworkMode 'host' is not allowed")
    if mode.startswith("container:"):
        needs.append(_ref_need("container", mode[len("container:"):], "HostConfig.NetworkMode"))
    elif mode != "none":
        needs.append(_ref_need("network", mode, "HostConfig.NetworkMode"))

    for i, vf in enumerate(hc.get("VolumesFrom") or []):
        needs.append(_ref_need("container", vf.split(":", 1)[0], f"HostConfig.VolumesFrom[{i}]"))
    for i, link in enumerate(hc.get("Links") or []):
        needs.append(_link_need(link, f"HostConfig.Links[{i}]"))

    endpoints = ((body.get("NetworkingConfig") or {}).get("EndpointsConfig")) or {}
    for net, ep in endpoints.items():
        where = f"NetworkingConfig.EndpointsConfig[{net!r}]"
        if net in ("host", "bridge", "default"):
            raise Denied(f"{where}: network {net!r} is not allowed")
        if net != "none":
            needs.append(_ref_need("network", net, where))
        _endpoint(ep, where, needs)

    plan = Plan(needs, ("container", {"name": name, "volumes": volumes}), resource=name or "")
    if policy.quota.enabled:
        plan.charge = ("create", policy.quota.check_create(hc), tuple(volumes))
    return plan


def container_update(req: Request, tenant: str, policy: Policy, ref: str) -> Plan:
    body = gojson.decode(req.body, shapes.UPDATE_CONFIG)
    _resources(body, policy, "", update=True)
    plan = Plan([_ref_need("container", ref, "path")], resource=ref)
    if policy.quota.enabled:
        plan.charge = ("update", policy.quota.check_update(body))
    return plan


def container_rename(req: Request, tenant: str, policy: Policy, ref: str) -> Plan:
    new = req.q("name") or ""
    if not new:
        raise BadRequest("rename needs a new name (?name=)")
    new = new[1:] if new.startswith("/") else new
    _scoped_name(tenant, new, "the new container name")
    return Plan([_ref_need("container", ref, "path")], ("rename", {"ref": ref, "name": new}), resource=ref)


def exec_create(req: Request, tenant: str, policy: Policy, ref: str) -> Plan:
    body = gojson.decode(req.body, shapes.EXEC_CONFIG)
    if body.get("Privileged"):
        raise Denied("Privileged exec is not allowed")
    return Plan([_ref_need("container", ref, "path")], ("exec", {"container": ref}), resource=ref)


def exec_start(req: Request, tenant: str, policy: Policy, ref: str) -> Plan:
    gojson.decode(req.body, shapes.EXEC_START)
    return Plan([_ref_need("exec", ref, "path")], resource=ref)


# -- networks and volumes -----------------------------------------------------


def network_create(req: Request, tenant: str, policy: Policy) -> Plan:
    body = gojson.decode(req.body, shapes.NETWORK_CREATE)
    name = body.get("Name") or ""
    if not name:
        raise BadRequest("a network needs a Name")
    original = _scoped_name(tenant, name, "the network name")
    _labels(body.get("Labels"), tenant, "Labels", original)
    if (body.get("Driver") or "bridge") != "bridge":
        raise Denied(f"Driver {body['Driver']!r} is not allowed (bridge only)")
    if (body.get("Scope") or "local") != "local":
        raise Denied(f"Scope {body['Scope']!r} is not allowed")
    for key in ("EnableIPv6", "Ingress", "ConfigOnly", "ConfigFrom", "Options"):
        if _nonempty(body.get(key)):
            raise Denied(f"{key} is not allowed")
    ipam = body.get("IPAM") or {}
    if (ipam.get("Driver") or "default") != "default" or _nonempty(ipam.get("Config")) or _nonempty(ipam.get("Options")):
        raise Denied("IPAM configuration is not allowed (subnets come from the engine's address pools)")
    plan = Plan([], ("network", {"name": name}), resource=name)
    if policy.quota.enabled:
        plan.charge = ("create", (0, 0, 0, 0, 1), ())
    return plan


def network_connect(req: Request, tenant: str, policy: Policy, ref: str) -> Plan:
    body = gojson.decode(req.body, shapes.NETWORK_CONNECT)
    needs = [_ref_need("network", ref, "path"), _ref_need("container", body.get("Container") or "", "Container")]
    _endpoint(body.get("EndpointConfig"), "EndpointConfig", needs)
    return Plan(needs, resource=ref)


def network_disconnect(req: Request, tenant: str, policy: Policy, ref: str) -> Plan:
    body = gojson.decode(req.body, shapes.NETWORK_DISCONNECT)
    return Plan([_ref_need("network", ref, "path"), _ref_need("container", body.get("Container") or "", "Container")],
                resource=ref)


def volume_create(req: Request, tenant: str, policy: Policy) -> Plan:
    body = gojson.decode(req.body, shapes.VOLUME_CREATE)
    name = body.get("Name") or ""
    if not name:
        raise BadRequest("a volume needs a Name in your scoped form (the name scoper generates one for you)")
    original = _scoped_name(tenant, name, "the volume name")
    _labels(body.get("Labels"), tenant, "Labels", original)
    if (body.get("Driver") or "local") != "local":
        raise Denied(f"Driver {body['Driver']!r} is not allowed (local only)")
    if _nonempty(body.get("DriverOpts")):
        raise Denied("DriverOpts is not allowed (they mount host paths and devices)")
    plan = Plan([], ("volume", {"name": name}), resource=name)
    if policy.quota.enabled:
        plan.charge = ("create", (0, 0, 0, 0, 0), (name,))  # one volume, unless it exists already
    return plan


# -- lists, prunes, events ---------------------------------------------------


def tenant_filter(req: Request, tenant: str) -> None:
    """The ``filters`` query must hold the caller's tenant label, no other.

    Both shapes the engine accepts are read: ``{"label": {"k=v": true}}`` and
    the legacy ``{"label": ["k=v"]}``.  A second ``filters`` parameter is
    refused (the engine reads the first, a proxy might read the last).
    """
    tenant_filter_values(req.qall("filters"), tenant)


def tenant_filter_values(values: list[str], tenant: str) -> None:
    """:func:`tenant_filter` on the ``filters`` values of a query, in order."""
    if len(values) == 1 and _canonical_filter(values[0], tenant):
        return  # what the checks below accept for this exact value (tests/unit/test_fastpaths.py)
    _tenant_filter(values, tenant)


def _canonical_filter(value: str, tenant: str) -> bool:
    """True when ``value`` is exactly the compact JSON text of a filter on
    ``tenant``'s label alone, as the name scoper (``rewrite.filters``) and the
    docker CLI (Go's ``filters.ToJSON``) write it -- ``{"label":{"<label>=<tenant>":true}}``
    -- or in the legacy list form ``{"label":["<label>=<tenant>"]}``: the
    common list, allowed without parsing the JSON.  Only for a tenant of
    ASCII letters and digits (written into JSON as it is).  False says
    nothing: the full checks decide."""
    if value.startswith('{"label":{"'):
        ok = value == f'{{"label":{{"{TENANT_LABEL}={tenant}":true}}}}'
    elif value.startswith('{"label":["'):
        ok = value == f'{{"label":["{TENANT_LABEL}={tenant}"]}}'
    else:
        return False
    return ok and tenant.isascii() and tenant.isalnum()


def _tenant_filter(values: list[str], tenant: str) -> None:
    """:func:`tenant_filter`'s checks on the ``filters`` values, in full."""
    if len(values) > 1:
        raise BadRequest("the filters parameter is given more than once")
    wanted = f"{TENANT_LABEL}={tenant}"
    if not values or not values[0]:
        raise Denied(f"this list must be filtered by your tenant label: filters={{\"label\":[\"{wanted}\"]}} "
                     "(the name scoper adds it for you)")
    parsed = gojson.parse(values[0], "the filters parameter")
    if not isinstance(parsed, gojson._Pairs):
        raise BadRequest("the filters parameter must be a JSON object")
    seen: set[str] = set()
    labels: list[str] = []
    for key, value in parsed:
        if key in seen:
            raise BadRequest(f"the filter {key!r} is given more than once")
        seen.add(key)
        if isinstance(value, gojson._Pairs):
            items = [k for k, _ in value]
            if len(set(items)) != len(items):
                raise BadRequest(f"the filter {key!r} repeats a value")
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise BadRequest(f"the filter {key!r} must be a list of strings or an object")
        if key == "label":
            labels = items
    if wanted not in labels:
        raise Denied(f"this list must be filtered by your tenant label {wanted} (the name scoper adds it for you)")
    for value in labels:
        if value.startswith(TENANT_LABEL) and value != wanted:
            raise Denied("the filter names another tenant's label")


# -- images and registries ----------------------------------------------------


def image_create(req: Request, tenant: str, policy: Policy) -> Plan:
    image = req.q("fromImage") or ""
    if not image:
        raise Denied("importing images is for administrators (images are a shared catalogue)")
    if req.declared_body():
        raise BadRequest("a pull takes no request body")
    _registry_allowed(policy, registry_of(image), f"pull of {image}")
    return Plan(resource=image)


def registry_search(req: Request, tenant: str, policy: Policy) -> Plan:
    term = req.q("term") or ""
    _registry_allowed(policy, registry_of(term), "search")
    return Plan(resource=term)


def registry_distribution(req: Request, tenant: str, policy: Policy, image: str) -> Plan:
    _registry_allowed(policy, registry_of(image), f"distribution of {image}")
    return Plan(resource=image)


def registry_login(req: Request, tenant: str, policy: Policy) -> Plan:
    body = gojson.decode(req.body, shapes.AUTH_CONFIG)
    server = body.get("ServerAddress") or "docker.io"
    host = re.sub(r"^[a-z]+://", "", server).split("/", 1)[0]
    _registry_allowed(policy, _norm_registry(host), "login")
    return Plan(resource=host)


RULES: dict[str, Callable[..., Plan]] = {
    "container_create": container_create,
    "container_update": container_update,
    "container_rename": container_rename,
    "exec_create": exec_create,
    "exec_start": exec_start,
    "network_create": network_create,
    "network_connect": network_connect,
    "network_disconnect": network_disconnect,
    "volume_create": volume_create,
    "image_create": image_create,
    "registry_search": registry_search,
    "registry_distribution": registry_distribution,
    "registry_login": registry_login,
}


def plan(req: Request, ep: Endpoint, params: dict[str, str], tenant: str, policy: Policy) -> Plan:
    """The tenant decision for a request already matched to ``ep``.

    Raises a :class:`Denied` subclass, or returns the :class:`Plan` whose
    ``needs`` the caller must still verify against the ownership store.
    """
    if ep.body == "none" and req.declared_body():
        raise BadRequest(f"{req.method} {req.path} takes no request body")
    action = ep.action
    if action == "admin":
        raise Denied(f"{req.method} {req.path} is for administrators only")
    if action == "any":
        return Plan(resource=params.get("image", ""))
    if action == "scoped":
        tenant_filter(req, tenant)
        return Plan()
    ref = params.get("ref")
    if action == "own":
        plan_ = Plan([_ref_need(ep.kind, ref, "path")], resource=ref)
        if req.method == "DELETE":
            plan_.record = ("remove", {"kind": ep.kind, "ref": ref})
        return plan_
    rule = RULES[action]
    if "image" in params:
        return rule(req, tenant, policy, params["image"])
    if ref is not None:
        return rule(req, tenant, policy, ref)
    return rule(req, tenant, policy)


def cheap_need(tenant: str, need: Need) -> bool | None:
    """Decide a need without the store when the reference alone settles it.

    A name in the caller's scoped form is the caller's or does not exist (the
    engine then answers its own 404): True.  A reference that is neither the
    caller's scoped form nor something the engine could read as an id is
    never the caller's: False.  Otherwise None: ask the store.
    """
    return cheap_ref(tenant, need.ref)


def cheap_ref(tenant: str, ref: str) -> bool | None:
    """:func:`cheap_need` of a reference ``ref`` of any kind (volumes are
    found by exact name only, anonymous ones have hex names; the rule is
    the same for every kind)."""
    if is_scoped_for(tenant, ref):
        return True
    return None if looks_like_id(ref) else False
