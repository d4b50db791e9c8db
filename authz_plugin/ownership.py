"""Ownership records in Redis: which tenant owns which container, exec,
network and volume.

The Redis model (also in ARCHITECTURE.md, "The Redis model"):

=============================  ======  =========================================
key                            type    content
=============================  ======  =========================================
``fdcs:own:<kind>``            hash    id -> tenant (kind: container, network,
                                       volume; a volume's id is its name)
``fdcs:ids:<kind>``            zset    every id, score 0, for id-prefix search
                                       (container, network)
``fdcs:names:<kind>``          hash    engine name -> id (container, network)
``fdcs:nameof:<kind>``         hash    id -> engine name (to drop a name on
                                       removal and rename)
``fdcs:exec:<id>``             string  ``<tenant> <container id>``, expires
                                       after ``redis.exec_ttl`` seconds
=============================  ======  =========================================

:meth:`Store.resolve` answers, in one round trip for any number of
references, what the engine would resolve each to -- full id first, then an
exact name, then a unique id prefix (moby's ``GetContainer`` and
``FindNetwork`` order) -- and who owns it.  Writes happen after the engine
answered a create or removal (``AuthZRes``), each as one Lua script so that a
record is never half-written.

Every Redis failure is raised as :class:`StoreUnavailable`; the caller denies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
import redis.sentinel

from .config import Config
from .errors import StoreUnavailable

log = logging.getLogger(__name__)

KINDS_WITH_IDS = ("container", "network")
PREFIX_LIMIT = 64

_RESOLVE = """
local kind, ref, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
if kind == 'exec' then
  local v = redis.call('GET', 'fdcs:exec:' .. ref)
  if v then return {'id', ref, string.match(v, '^(%S+)')} end
  return {'none'}
end
local owner = redis.call('HGET', 'fdcs:own:' .. kind, ref)
if owner then return {'id', ref, owner} end
if kind == 'volume' then return {'none'} end
local id = redis.call('HGET', 'fdcs:names:' .. kind, ref)
if id then return {'name', id, redis.call('HGET', 'fdcs:own:' .. kind, id) or ''} end
if ARGV[4] ~= '1' then return {'none'} end
local ids = redis.call('ZRANGEBYLEX', 'fdcs:ids:' .. kind, '[' .. ref, '[' .. ref .. '\\255', 'LIMIT', 0, limit)
local out = {'prefix'}
for _, i in ipairs(ids) do
  out[#out + 1] = i
  out[#out + 1] = redis.call('HGET', 'fdcs:own:' .. kind, i) or ''
end
return out
"""

_TENANT_REF = """
local kind, tenant, ref, scoped, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('HGET', 'fdcs:own:' .. kind, ref) == tenant then return {'id', ref} end
if kind == 'volume' then return {'name', scoped} end
if redis.call('HEXISTS', 'fdcs:names:' .. kind, scoped) == 1 then return {'name', scoped} end
local ids = redis.call('ZRANGEBYLEX', 'fdcs:ids:' .. kind, '[' .. ref, '[' .. ref .. '\\255', 'LIMIT', 0, limit)
local mine = nil
for _, i in ipairs(ids) do
  if redis.call('HGET', 'fdcs:own:' .. kind, i) == tenant then
    if mine then return {'ambiguous', ref} end
    mine = i
  end
end
if mine then return {'id', mine} end
return {'none', ref}
"""

_ADD = """
local kind, id, tenant, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('HSET', 'fdcs:own:' .. kind, id, tenant)
if kind ~= 'volume' then
  redis.call('ZADD', 'fdcs:ids:' .. kind, 0, id)
  if name ~= '' then
    redis.call('HSET', 'fdcs:names:' .. kind, name, id)
    redis.call('HSET', 'fdcs:nameof:' .. kind, id, name)
  end
end
return 1
"""

_REMOVE = """
local kind, id = ARGV[1], ARGV[2]
local n = redis.call('HDEL', 'fdcs:own:' .. kind, id)
if kind ~= 'volume' then
  redis.call('ZREM', 'fdcs:ids:' .. kind, id)
  local name = redis.call('HGET', 'fdcs:nameof:' .. kind, id)
  if name then
    if redis.call('HGET', 'fdcs:names:' .. kind, name) == id then
      redis.call('HDEL', 'fdcs:names:' .. kind, name)
    end
    redis.call('HDEL', 'fdcs:nameof:' .. kind, id)
  end
end
return n
"""

_RENAME = """
local kind, id, new = ARGV[1], ARGV[2], ARGV[3]
local old = redis.call('HGET', 'fdcs:nameof:' .. kind, id)
if old and redis.call('HGET', 'fdcs:names:' .. kind, old) == id then
  redis.call('HDEL', 'fdcs:names:' .. kind, old)
end
redis.call('HSET', 'fdcs:names:' .. kind, new, id)
redis.call('HSET', 'fdcs:nameof:' .. kind, id, new)
return 1
"""


@dataclass(frozen=True)
class Resolution:
    """What the engine would resolve a reference to, and its owners.

    ``how`` is ``id``, ``name``, ``prefix`` or ``none``; ``matches`` lists
    ``(id, owner)`` (one entry for ``id`` and ``name``; every candidate for
    ``prefix``; owner ``""`` when an id is indexed without an owner).
    """

    how: str
    matches: tuple[tuple[str, str], ...] = ()

    def owned_by(self, tenant: str) -> bool:
        """True when the engine's target is certainly ``tenant``'s: every
        resource the reference could reach belongs to it."""
        if self.how == "none" or not self.matches:
            return False
        if self.how == "prefix" and len(self.matches) >= PREFIX_LIMIT:
            return False
        return all(owner == tenant for _, owner in self.matches)

    @property
    def target(self) -> str | None:
        """The id the engine acts on, when it is unique."""
        return self.matches[0][0] if len(self.matches) == 1 else None


def connect(cfg: Config) -> redis.Redis:
    """A client for the configured Redis (or Sentinel-managed primary)."""
    timeout = cfg["redis.timeout"]
    if cfg["redis.sentinels"]:
        hosts = []
        for s in cfg["redis.sentinels"]:
            host, _, port = s.rpartition(":")
            hosts.append((host, int(port)))
        sentinel = redis.sentinel.Sentinel(hosts, socket_timeout=timeout)
        return sentinel.master_for(cfg["redis.service_name"], socket_timeout=timeout,
                                   decode_responses=True)
    return redis.Redis.from_url(cfg["redis.url"], socket_timeout=timeout, socket_connect_timeout=timeout,
                                decode_responses=True, health_check_interval=30)


class Store:
    """Ownership records; every method raises :class:`StoreUnavailable` on a
    Redis failure."""

    def __init__(self, client: redis.Redis, exec_ttl: int = 7 * 86400):
        self.r = client
        self.exec_ttl = exec_ttl
        self._resolve = client.register_script(_RESOLVE)
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)
        self._rename = client.register_script(_RENAME)
        self._tenant_ref = client.register_script(_TENANT_REF)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except redis.ResponseError as e:
            # a refused command (out of memory, read-only replica, a script bug)
            log.error("redis refused a command: %s", e)
            raise StoreUnavailable("ownership store unavailable, retry") from e
        except redis.RedisError as e:
            log.warning("redis error: %s", e.__class__.__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            raise StoreUnavailable("ownership store unavailable, retry") from e

    def resolve(self, refs: list[tuple[str, str, bool]]) -> list[Resolution]:
        """Resolve ``(kind, ref, may_be_prefix)`` triples in one round trip."""
        if not refs:
            return []

        def run():
            if len(refs) == 1:
                kind, ref, pfx = refs[0]
                return [self._resolve(keys=[], args=[kind, ref, PREFIX_LIMIT, "1" if pfx else "0"])]
            pipe = self.r.pipeline(transaction=False)
            for kind, ref, pfx in refs:
                self._resolve(keys=[], args=[kind, ref, PREFIX_LIMIT, "1" if pfx else "0"], client=pipe)
            return pipe.execute()

        out = []
        for raw in self._call(run):
            how, rest = raw[0], raw[1:]
            out.append(Resolution(how, tuple(zip(rest[0::2], rest[1::2]))))
        return out

    def tenant_ref(self, kind: str, tenant: str, ref: str, scoped: str | None) -> tuple[str, str]:
        """What a tenant's hex-looking reference means to that tenant, in the
        engine's order: its own full id, its own name (``scoped``), a unique
        prefix of its own ids.  Returns ``(how, value)`` with ``how`` one of
        ``id``, ``name``, ``ambiguous``, ``none``."""
        how, value = self._call(self._tenant_ref, keys=[],
                                args=[kind, tenant, ref, scoped or "", PREFIX_LIMIT])
        return how, value

    def add(self, kind: str, id_: str, tenant: str, name: str = "") -> None:
        self._call(self._add, keys=[], args=[kind, id_, tenant, name])

    def add_volume_if_new(self, name: str, tenant: str) -> bool:
        """Record a volume unless a record exists (a create answered for an
        existing volume must not change its owner)."""
        return bool(self._call(self.r.hsetnx, "fdcs:own:volume", name, tenant))

    def remove(self, kind: str, id_: str) -> None:
        if kind == "exec":
            self._call(self.r.delete, f"fdcs:exec:{id_}")
        else:
            self._call(self._remove, keys=[], args=[kind, id_])

    def rename(self, kind: str, id_: str, new_name: str) -> None:
        self._call(self._rename, keys=[], args=[kind, id_, new_name])

    def add_exec(self, exec_id: str, tenant: str, container_id: str) -> None:
        self._call(self.r.set, f"fdcs:exec:{exec_id}", f"{tenant} {container_id}", ex=self.exec_ttl)

    def owner(self, kind: str, id_: str) -> str | None:
        if kind == "exec":
            v = self._call(self.r.get, f"fdcs:exec:{id_}")
            return v.split()[0] if v else None
        return self._call(self.r.hget, f"fdcs:own:{kind}", id_)

    def ping(self) -> None:
        self._call(self.r.ping)
