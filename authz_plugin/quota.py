"""Tenant quotas: what each tenant holds, checked atomically across hosts.

Five metrics (:data:`METRICS`): ``containers`` (count), ``memory`` (bytes,
the sum of ``HostConfig.Memory``), ``cpus`` (nano-CPUs, the sum of
``NanoCpus`` or ``CpuQuota * 1e9 / CpuPeriod``), ``volumes`` and
``networks`` (counts).  A limit of :data:`UNLIMITED` (-1) means no limit.

The Redis model (also in ARCHITECTURE.md, "The Redis model"):

==========================  ======  ==========================================
key                         type    content
==========================  ======  ==========================================
``fdcs:charge``             hash    ``<kind>/<id>`` -> ``<tenant> <host> c m n
                                    v w``: what one resource holds (kind
                                    container, volume, network); a create in
                                    flight is ``pending/<host>/<seq>`` with a
                                    deadline appended
``fdcs:usage:<tenant>``     hash    metric -> sum of the tenant's charges
``fdcs:quota:<tenant>``     hash    metric -> the tenant's own limit (set by
                                    ``fdcs-manage quota set``); a metric
                                    absent here takes the configured default
``fdcs:pend:<host>:<fp>``   list    charges of the host's requests awaiting
                                    their response: ``<field> <old vector
                                    or ->`` (fp: a fingerprint of the request)
``fdcs:seq``                string  counter naming pending charges
==========================  ======  ==========================================

Invariant: ``fdcs:usage:<tenant>`` is the sum of the tenant's entries in
``fdcs:charge``.  Every script that writes a charge adjusts the usage in the
same script, so the invariant holds whatever runs concurrently.

The life of a charge:

* ``AuthZReq`` of a create: :meth:`QuotaStore.admit` checks the tenant's
  usage plus the request against the limits and, in the same script, adds a
  pending charge -- so two hosts can never both admit the last unit.  An
  update holds the larger of the old and new sizes while in flight.
* ``AuthZRes``: :meth:`QuotaStore.settle` turns the pending charge into the
  resource's (``container/<id>``) on success, or takes it back on failure.
  Requests are matched to their pending charges by a fingerprint of the
  request (tenant, method, URI, body): identical requests charge identically,
  so which of them settles which charge does not matter.
* Removal: the ownership store's remove script discharges the resource (see
  ``ownership._DISCHARGE``), whoever removes it (plugin, prune, reconciler).
* The reconciler corrects each host's charges from the engine's truth
  (:meth:`QuotaStore.sync`), compare-and-set against what it read before the
  engine, and drops pending charges whose response never came.

Everything Redis refuses is :class:`StoreUnavailable` (the caller denies).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import redis

from .errors import Denied, QuotaExceeded, Retry
from .ownership import REBUILT_LUA

METRICS = ("containers", "memory", "cpus", "volumes", "networks")
UNLIMITED = -1
PENDING_TTL = 120
NANO = 10**9
DEFAULT_CPU_PERIOD = 100_000

#: a charge vector, in METRICS order
Vector = tuple[int, int, int, int, int]
ZERO: Vector = (0, 0, 0, 0, 0)
KEEP = -1  # in an update's vector: "unchanged" (the engine's 0)


# -- the pure part ---------------------------------------------------------------


@dataclass(frozen=True)
class Flavor:
    name: str
    memory: int
    nano_cpus: int

    def __str__(self) -> str:
        return f"{self.name} ({human('memory', self.memory)}, {human('cpus', self.nano_cpus)} CPUs)"


def parse_flavor(name: str, spec: str) -> Flavor:
    """``"512m,0.5"`` -> Flavor(name, 512 MiB, 0.5 CPUs)."""
    from .config import parse_size

    mem, sep, cpus = str(spec).partition(",")
    if not sep:
        raise ValueError(f"flavor {name}: expected 'MEMORY,CPUS' such as '512m,0.5', got {spec!r}")
    memory = parse_size(mem.strip())
    nano = parse_cpus(cpus.strip())
    if memory <= 0 or nano <= 0:
        raise ValueError(f"flavor {name}: memory and CPUs must be above 0")
    return Flavor(name, memory, nano)


def parse_cpus(value: Any) -> int:
    """``"1.5"`` -> 1_500_000_000 nano-CPUs (Docker's ``--cpus``)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of CPUs such as 1.5, got {value!r}") from None
    if f < 0 or f != f:
        raise ValueError(f"expected a number of CPUs such as 1.5, got {value!r}")
    return round(f * NANO)


def human(metric: str, value: int) -> str:
    """A limit or usage as people write it."""
    if value == UNLIMITED:
        return "unlimited"
    if metric == "memory":
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value >= size:
                v = value / size
                return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
        return f"{value} B"
    if metric == "cpus":
        return f"{value / NANO:g}"
    return str(value)


def nano_cpus(hc: Mapping[str, Any]) -> int:
    """The CPUs a host config limits a container to, in nano-CPUs (0: no limit).

    The engine takes ``NanoCpus`` or ``CpuQuota``/``CpuPeriod`` (never both:
    it refuses the pair); a quota at or below 0 is no limit.
    """
    n = hc.get("NanoCpus") or 0
    if n > 0:
        return n
    q = hc.get("CpuQuota") or 0
    if q <= 0:
        return 0
    period = hc.get("CpuPeriod") or DEFAULT_CPU_PERIOD
    return -(-q * NANO // period)  # round up: never charge less than the engine grants


@dataclass(frozen=True)
class QuotaPolicy:
    """The configured quota rules (``[quota]``), read once."""

    enabled: bool = False
    defaults: dict[str, int] = field(default_factory=lambda: {m: UNLIMITED for m in METRICS})
    default_memory: int = 0
    default_nano_cpus: int = 0
    flavors: tuple[Flavor, ...] = ()
    flavor_required: bool = False
    default_flavor: str = ""

    @classmethod
    def from_config(cls, cfg) -> "QuotaPolicy":
        return cls(
            enabled=cfg["quota.enabled"],
            defaults={m: cfg[f"quota.{m}"] for m in METRICS},
            default_memory=cfg["quota.default_memory"],
            default_nano_cpus=cfg["quota.default_cpus"],
            flavors=tuple(cfg["quota.flavors"]),
            flavor_required=cfg["quota.flavor_required"],
            default_flavor=cfg["quota.default_flavor"],
        )

    def flavor(self, name: str) -> Flavor | None:
        return next((f for f in self.flavors if f.name == name), None)

    def flavor_list(self) -> str:
        return ", ".join(str(f) for f in self.flavors)

    def create_defaults(self, hc: Mapping[str, Any]) -> dict[str, int]:
        """What the name scoper adds to a create's HostConfig that sets no
        size: the default flavor when flavors are required, else the default
        memory and CPUs (each only when it is not set)."""
        if not self.enabled:
            return {}
        memory = hc.get("Memory") or 0
        cpus = nano_cpus(hc)
        if self.flavor_required:
            f = self.flavor(self.default_flavor)
            if f is None or memory or cpus or (hc.get("CpuQuota") or 0) > 0:
                return {}
            return {"Memory": f.memory, "NanoCpus": f.nano_cpus}
        out = {}
        if not memory and self.default_memory:
            out["Memory"] = self.default_memory
        if not cpus and self.default_nano_cpus and not (hc.get("CpuQuota") or hc.get("CpuPeriod")):
            out["NanoCpus"] = self.default_nano_cpus
        return out

    def check_create(self, hc: Mapping[str, Any]) -> Vector:
        """The charge of a container create; refuses a size that is not a
        flavor (when flavors are required) or a negative one."""
        memory = hc.get("Memory") or 0
        if memory < 0 or (hc.get("NanoCpus") or 0) < 0:
            raise Denied("HostConfig.Memory and HostConfig.NanoCpus cannot be negative")
        cpus = nano_cpus(hc)
        if self.flavor_required:
            self._check_flavor(memory, cpus)
        return (1, memory, cpus, 0, 0)

    def check_update(self, body: Mapping[str, Any]) -> Vector:
        """The new charge an update asks for, :data:`KEEP` where it changes
        nothing (the engine ignores zero fields of an update)."""
        if (body.get("CpuQuota") or 0) != 0 or (body.get("CpuPeriod") or 0) != 0:
            raise Denied("CpuQuota and CpuPeriod cannot be updated while quotas are on; "
                         "use --cpus (NanoCpus)")
        memory = body.get("Memory") or 0
        cpus = body.get("NanoCpus") or 0
        if memory < 0 or cpus < 0:
            raise Denied("Memory and NanoCpus cannot be negative")
        return (KEEP, memory or KEEP, cpus or KEEP, KEEP, KEEP)

    def check_update_flavor(self, memory: int, cpus: int) -> None:
        if self.flavor_required:
            self._check_flavor(memory, cpus)

    def _check_flavor(self, memory: int, cpus: int) -> None:
        if not any(f.memory == memory and f.nano_cpus == cpus for f in self.flavors):
            got = f"{human('memory', memory) if memory else 'no memory limit'}, " \
                  f"{human('cpus', cpus) + ' CPUs' if cpus else 'no CPU limit'}"
            raise Denied(f"the size ({got}) is not one of this service's flavors: {self.flavor_list()}")


def refusal(tenant: str, metric: str, limit: int, used: int, need: int,
            scoper_sets: bool = False) -> QuotaExceeded:
    """The tenant-facing message for a refused admission (``need`` 0: the
    container sets no limit of a metric whose quota is finite)."""
    if need == 0:
        what = "HostConfig.Memory (--memory)" if metric == "memory" else "HostConfig.NanoCpus (--cpus)"
        flag = "--memory" if metric == "memory" else "--cpus"
        hint = "the name scoper sets a default for you" if scoper_sets else f"set {flag}"
        return QuotaExceeded(f"{what} must be set: project {tenant} has a {metric} quota of "
                             f"{human(metric, limit)} ({hint})")
    return QuotaExceeded(f"{metric} quota exceeded for project {tenant}: limit {human(metric, limit)}, "
                         f"in use {human(metric, used)}, this request needs {human(metric, need)}; "
                         "remove something or ask your site administrators to raise the quota")


def fingerprint(tenant: str, method: str, uri: str, body: bytes | None) -> str:
    """The key that matches an ``AuthZRes`` to its ``AuthZReq``'s charge."""
    h = hashlib.sha256()
    for part in (tenant.encode(), method.encode(), uri.encode()):
        h.update(part)
        h.update(b"\0")
    h.update(body or b"")
    return h.hexdigest()[:32]


def parse_charge(raw: str) -> tuple[str, str, Vector, float | None]:
    """``"<tenant> <host> c m n v w [deadline]"`` -> (tenant, host, vector, deadline)."""
    parts = raw.split()
    vec = tuple(int(x) for x in parts[2:7])
    deadline = float(parts[7]) if len(parts) > 7 else None
    return parts[0], parts[1], vec, deadline  # type: ignore[return-value]


def format_charge(tenant: str, host: str, vec: Vector) -> str:
    return f"{tenant} {host} " + " ".join(str(x) for x in vec)


_LIMIT_RE = re.compile(r"-?\d+")


# -- Redis -------------------------------------------------------------------------

# helpers shared by the scripts (prefixed to each)
_LUA_LIB = """
local M = {'containers', 'memory', 'cpus', 'volumes', 'networks'}
local function parse(raw)
  local t, h, a, b, c, d, e, dl = string.match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) ?(%S*)$')
  return t, h, {tonumber(a), tonumber(b), tonumber(c), tonumber(d), tonumber(e)}, dl
end
local function fmt(t, h, v)
  return t .. ' ' .. h .. ' ' .. table.concat(v, ' ')
end
local function add_usage(t, v, sign)
  for i = 1, 5 do
    if v[i] ~= 0 then redis.call('HINCRBY', 'fdcs:usage:' .. t, M[i], sign * v[i]) end
  end
end
-- replace a charge field (nil value: delete it), keeping usage equal to the charges
local function put(f, t, h, v)
  local old = redis.call('HGET', 'fdcs:charge', f)
  if old then
    local ot, _, ov = parse(old)
    add_usage(ot, ov, -1)
  end
  if v then
    redis.call('HSET', 'fdcs:charge', f, fmt(t, h, v))
    add_usage(t, v, 1)
  else
    redis.call('HDEL', 'fdcs:charge', f)
  end
end
"""

_ADMIT = _LUA_LIB + REBUILT_LUA + """
local tenant, host, fp, mode, field, ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
-- after a loss of Redis data the usage is rebuilt by the reconcilers' passes:
-- until this host's has run its charges are unknown, and the other hosts'
-- until they have run too (settled, see authz_plugin.ownership)
if complete(host) == 0 or not settled(tonumber(ARGV[18])) then return {'rebuilding'} end
local new, def = {}, {}
for i = 1, 5 do new[i] = tonumber(ARGV[7 + i]); def[i] = tonumber(ARGV[12 + i]) end
for j = 19, #ARGV do  -- named volumes the create makes if they do not exist
  if redis.call('HEXISTS', 'fdcs:own:volume', ARGV[j]) == 0 then new[4] = new[4] + 1 end
end
local old = {0, 0, 0, 0, 0}
local oldspec = '-'
if mode == 'update' then
  local raw = redis.call('HGET', 'fdcs:charge', field)
  if raw then
    local _
    _, _, old = parse(raw)
    oldspec = table.concat(old, ',')
  end
  for i = 1, 5 do if new[i] < 0 then new[i] = old[i] end end
end
local held = {}
for i = 1, 5 do held[i] = math.max(old[i], new[i]) end
local usage = redis.call('HMGET', 'fdcs:usage:' .. tenant, unpack(M))
local own = redis.call('HMGET', 'fdcs:quota:' .. tenant, unpack(M))
for i = 1, 5 do
  local limit = tonumber(own[i]) or def[i]
  local used = tonumber(usage[i]) or 0
  if limit >= 0 then
    if mode == 'create' and (i == 2 or i == 3) and held[1] > 0 and new[i] == 0 then
      return {'refused', M[i], tostring(limit), tostring(used), '0'}
    end
    local delta = held[i] - old[i]
    if delta > 0 and used + delta > limit then
      return {'refused', M[i], tostring(limit), tostring(used), tostring(delta)}
    end
  end
end
if mode == 'create' then
  field = 'pending/' .. host .. '/' .. redis.call('INCR', 'fdcs:seq')
  redis.call('HSET', 'fdcs:charge', field, fmt(tenant, host, held) .. ' ' .. (now + ttl))
  add_usage(tenant, held, 1)
else
  put(field, tenant, host, held)
end
redis.call('RPUSH', 'fdcs:pend:' .. fp, field .. ' ' .. oldspec)
redis.call('EXPIRE', 'fdcs:pend:' .. fp, ttl)
return {'ok', field}
"""

_SETTLE = _LUA_LIB + """
local fp, ok, final = ARGV[1], ARGV[2] == '1', ARGV[3]
local item = redis.call('LPOP', 'fdcs:pend:' .. fp)
if not item then return 0 end
local f, oldspec = string.match(item, '^(%S+) (%S+)$')
local cur = redis.call('HGET', 'fdcs:charge', f)
if not cur then return 0 end
local tenant, host, held = parse(cur)
if not ok then
  if oldspec == '-' then
    put(f, tenant, host, nil)
  else
    local o = {}
    for x in string.gmatch(oldspec, '[^,]+') do o[#o + 1] = tonumber(x) end
    put(f, tenant, host, o)
  end
  return 1
end
local fin = {}
for i = 1, 5 do
  local v = tonumber(ARGV[3 + i])
  if v < 0 then fin[i] = held[i] else fin[i] = v end
end
if final == '' then final = f end
if final ~= f then put(f, tenant, host, nil) end
put(final, tenant, host, fin)
for j = 9, #ARGV do  -- volumes the create made: each holds one unit of its own
  local vf = 'volume/' .. ARGV[j]
  if redis.call('HGET', 'fdcs:own:volume', ARGV[j]) == tenant and redis.call('HEXISTS', 'fdcs:charge', vf) == 0 then
    put(vf, tenant, host, {0, 0, 0, 1, 0})
  end
end
return 1
"""

# compare-and-set one charge (the reconciler): ARGV field, expected raw value
# ('' = absent), then tenant, host and vector, or nothing to delete
_CAS = _LUA_LIB + """
local f, expect = ARGV[1], ARGV[2]
local cur = redis.call('HGET', 'fdcs:charge', f) or ''
if cur ~= expect then return 0 end
if #ARGV < 4 then
  put(f, nil, nil, nil)
else
  put(f, ARGV[3], ARGV[4], {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])})
end
return 1
"""


class QuotaStore:
    """Quota admission and accounting in the shared Redis; every method
    raises :class:`StoreUnavailable` on a Redis failure."""

    def __init__(self, client: redis.Redis, policy: QuotaPolicy, host: str, settle: float | None = None):
        """``settle``: as :class:`authz_plugin.ownership.Store`'s (None: no wait)."""
        self.r = client
        self.policy = policy
        self.host = host
        self.settle_arg = -1 if settle is None else settle
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._cas = client.register_script(_CAS)

    def _call(self, fn, *args, **kw):
        from .ownership import call_redis
        return call_redis(fn, *args, **kw)

    # -- the plugin's side ---------------------------------------------------------

    def admit(self, tenant: str, fp: str, vec: Vector, *, update_of: str | None = None,
              volumes: tuple[str, ...] = ()) -> None:
        """Admit a create (``update_of`` None) or an update of container
        ``update_of``, or raise :class:`QuotaExceeded`."""
        mode, f = ("update", f"container/{update_of}") if update_of else ("create", "")
        defaults = [self.policy.defaults[m] for m in METRICS]
        # The pending list is this host's: the same request sent to two hosts
        # has one fingerprint, and each host must settle its own charge.
        fp = f"{self.host}:{fp}"
        out = self._call(self._admit, keys=[], args=[tenant, self.host, fp, mode, f, PENDING_TTL, int(time.time()),
                                                     *vec, *defaults, self.settle_arg, *volumes])
        if out[0] == "rebuilding":
            raise Retry("quota usage is being rebuilt after a restart of the ownership store; retry in a moment")
        if out[0] != "ok":
            _, metric, limit, used, need = out
            default = self.policy.default_memory if metric == "memory" else self.policy.default_nano_cpus
            raise refusal(tenant, metric, int(limit), int(used), int(need), bool(default or self.policy.default_flavor))

    def settle(self, fp: str, ok: bool, final: str = "", vec: Vector = (KEEP,) * 5,
               volumes: tuple[str, ...] = ()) -> bool:
        """Settle the oldest pending charge of ``fp``: on success it becomes
        ``final``'s (e.g. ``container/<id>``) with ``vec`` (KEEP: as held);
        on failure it is taken back."""
        return bool(self._call(self._settle, keys=[], args=[f"{self.host}:{fp}", "1" if ok else "0", final, *vec,
                                                            *volumes]))

    def charge(self, field_: str) -> tuple[str, str, Vector, float | None] | None:
        raw = self._call(self.r.hget, "fdcs:charge", field_)
        return parse_charge(raw) if raw else None

    # -- reading -----------------------------------------------------------------------

    def usage(self, tenant: str) -> dict[str, int]:
        vals = self._call(self.r.hmget, f"fdcs:usage:{tenant}", list(METRICS))
        return {m: int(v or 0) for m, v in zip(METRICS, vals)}

    def overrides(self, tenant: str) -> dict[str, int]:
        return {k: int(v) for k, v in self._call(self.r.hgetall, f"fdcs:quota:{tenant}").items() if k in METRICS}

    def limits(self, tenant: str) -> dict[str, int]:
        own = self.overrides(tenant)
        return {m: own.get(m, self.policy.defaults[m]) for m in METRICS}

    def tenants(self) -> set[str]:
        """Every tenant with a usage or an override."""
        keys = self._call(lambda: list(self.r.scan_iter("fdcs:usage:*", count=1000))
                          + list(self.r.scan_iter("fdcs:quota:*", count=1000)))
        return {k.split(":", 2)[2] for k in keys}

    def charges(self, host: str | None = None) -> dict[str, str]:
        """Raw charges (field -> value), of one host or all."""
        raw = self._call(self.r.hgetall, "fdcs:charge")
        if host is None:
            return raw
        return {f: v for f, v in raw.items() if v.split(" ", 2)[1:2] == [host]}

    # -- the administrators' side ---------------------------------------------------

    def set_limits(self, tenant: str, limits: Mapping[str, int]) -> None:
        for m, v in limits.items():
            if m not in METRICS or v < UNLIMITED:
                raise ValueError(f"bad quota {m}={v}")
        if limits:
            self._call(self.r.hset, f"fdcs:quota:{tenant}", mapping={m: str(v) for m, v in limits.items()})

    def clear_limits(self, tenant: str, metrics: tuple[str, ...] = ()) -> None:
        if metrics:
            self._call(self.r.hdel, f"fdcs:quota:{tenant}", *metrics)
        else:
            self._call(self.r.delete, f"fdcs:quota:{tenant}")

    # -- the reconciler's side ---------------------------------------------------------

    def sync(self, before: Mapping[str, str], want: Mapping[str, tuple[str, Vector]], now: float | None = None) -> dict[str, int]:
        """Make this host's charges equal ``want`` (field -> (tenant, vector)).

        ``before`` is this host's charges as read *before* the engine was
        read: a charge that is in ``before`` but not wanted is removed, one
        that is wanted but absent is added, one that differs is corrected --
        each only if the charge still holds what was read (compare and set),
        so a charge the plugin wrote meanwhile is left for the next pass.
        Pending charges past their deadline are dropped.  Returns counts.
        """
        now = time.time() if now is None else now
        counts = {"added": 0, "removed": 0, "corrected": 0, "expired": 0}
        for f, raw in before.items():
            if f.startswith("pending/"):
                _, _, _, deadline = parse_charge(raw)
                if deadline is not None and deadline < now and self._cas_set(f, raw, None):
                    counts["expired"] += 1
            elif f not in want and self._cas_set(f, raw, None):
                counts["removed"] += 1
        for f, (tenant, vec) in want.items():
            raw = before.get(f)
            target = format_charge(tenant, self.host, vec)
            if raw == target:
                continue
            if self._cas_set(f, raw or "", (tenant, vec)):
                counts["corrected" if raw else "added"] += 1
        return counts

    def _cas_set(self, f: str, expect: str, value: tuple[str, Vector] | None) -> bool:
        args = [f, expect] + ([value[0], self.host, *value[1]] if value else [])
        return bool(self._call(self._cas, keys=[], args=args))


def wanted_charges(records: Mapping[str, Mapping[str, tuple[str, str]]],
                   sizes: Mapping[str, Vector]) -> dict[str, tuple[str, Vector]]:
    """The charges a host's ownership records imply (pure): each owned
    container holds (1, its memory, its CPUs), each volume and network one
    unit.  ``sizes``: container id -> its vector from the engine."""
    out: dict[str, tuple[str, Vector]] = {}
    for cid, (tenant, _) in records.get("container", {}).items():
        out[f"container/{cid}"] = (tenant, sizes.get(cid, (1, 0, 0, 0, 0)))
    for name, (tenant, _) in records.get("volume", {}).items():
        out[f"volume/{name}"] = (tenant, (0, 0, 0, 1, 0))
    for nid, (tenant, _) in records.get("network", {}).items():
        out[f"network/{nid}"] = (tenant, (0, 0, 0, 0, 1))
    return out


__all__ = ["METRICS", "UNLIMITED", "Flavor", "QuotaPolicy", "QuotaStore", "QuotaExceeded", "fingerprint",
           "human", "nano_cpus", "parse_cpus", "parse_flavor", "refusal", "wanted_charges"]
