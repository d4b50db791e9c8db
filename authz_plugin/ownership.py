"""Ownership records in Redis: which tenant owns which container, exec,
network and volume, on which host.

The Redis model (also in ARCHITECTURE.md, "The Redis model").  ``<host>`` is
the host id (``host.id``); ids are unique across hosts, names only per
engine:

================================  ======  =======================================
key                               type    content
================================  ======  =======================================
``fdcs:own:<kind>``               hash    id -> tenant (kind: container, network,
                                          volume; a volume's id is its name)
``fdcs:host:<kind>``              hash    id -> host that holds the resource
``fdcs:ids:<kind>:<host>``        zset    the host's ids, score 0, for id-prefix
                                          search (container, network)
``fdcs:names:<kind>:<host>``      hash    engine name -> id, per host
``fdcs:nameof:<kind>``            hash    id -> engine name
``fdcs:cname``                    hash    scoped container name -> ``<host> <id>``:
                                          cluster-wide container names
``fdcs:resv:<scoped name>``       string  ``<host>``: a container name being
                                          created or renamed to, expires in 120 s
``fdcs:resvn:<scoped name>``      string  how many of that host's requests are
                                          in flight for the name
``fdcs:exec:<id>``                string  ``<tenant> <container id>``, expires
                                          after ``redis.exec_ttl`` seconds
``fdcs:unowned:<kind>:<host>``    set     engine names of the host's unowned
                                          containers and networks (reconciler):
                                          nobody's, though the engine matches
                                          them before an id prefix
``fdcs:admitted:<key>``           string  ``<tenant> <user>`` a request was
                                          admitted for (key: hashed token and
                                          tenant claim, method, URI, body),
                                          120 s: the response hook's identity
                                          when Keystone cannot answer
``fdcs:reconciled``               hash    host -> ``<time> <run id>``: its last
                                          complete reconcile (written only by
                                          the reconciler, after a full pass) and
                                          the Redis run (``run_id``) it was on
``fdcs:epoch``                    string  ``<run id> <time>``: the first complete
                                          reconcile of any host on this Redis
                                          run since it last lost its data
``fdcs:running:<host>``           hash    tenant -> running containers of the
                                          host (written only by its reconciler)
``fdcs:suspended``                hash    tenant -> JSON ``{"at", "by", "reason"}``:
                                          every request of the tenant is refused
``fdcs:adopted:<kind>``           hash    id -> ``<tenant> <host>``: an unlabelled
                                          resource ``fdcs-manage adopt`` gave to
                                          a tenant (the reconciler's rules read
                                          it like a label)
================================  ======  =======================================

Quota charges and usage (``fdcs:charge``, ``fdcs:usage:<tenant>``...) belong
to :mod:`quota`; removing a record here also frees its charge.

:meth:`Store.resolve` answers, in one round trip for any number of
references, what the engine would resolve each to -- full id first, then an
exact name, then a unique id prefix (moby's ``GetContainer`` and
``FindNetwork`` order) -- and who owns it.  A full id counts as one only on
the host that holds it: ids are unique across hosts, but to another host's
engine the string is just a name or a prefix to look up.  For a reference
it cannot find it also says whether this host's records are complete (a reconcile has run
since Redis last lost its data), so that an unknown reference is answered
"retry" rather than "no such" while ownership is being rebuilt.

A loss of data is a Redis run without the records: emptied (``FLUSHALL``,
a restart without persistence), restarted from an older snapshot, or a
replica promoted by Sentinel that had not received everything.  A marker
counts only on the Redis run it was written on (INFO's ``run_id``), so each
of these makes every host "being rebuilt" until its reconciler's next pass.
Cluster-wide container names are known again only when every host has
passed: a name is reserved only once ``settle`` seconds (two reconcile
intervals) have gone by since the first host's pass on this run.  Writes
happen after the engine answered (``AuthZRes``) or from the reconciler, each
as one Lua script so that a record is never half-written.

Every Redis failure is raised as :class:`StoreUnavailable`; the caller denies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
import redis.sentinel

from . import metrics, resp
from .config import Config
from .errors import Retry, StoreUnavailable
from .known import KnownRefs

log = logging.getLogger(__name__)

KINDS = ("container", "network", "volume")
KINDS_WITH_IDS = ("container", "network")
PREFIX_LIMIT = 64
RESERVATION_TTL = 120

# this Redis run's id (INFO's run_id; '' where INFO is missing, as in fakeredis)
_RUN = """
local function run_id()
  local info = redis.pcall('INFO', 'server')
  if type(info) ~= 'string' then return '' end
  return string.match(info, 'run_id:(%x+)') or ''
end
"""

# 1 when ``host`` completed a reconcile on this Redis run, else 0
_READY = _RUN + """
local function complete(host)
  local m = redis.call('HGET', 'fdcs:reconciled', host)
  if m and (string.match(m, ' (%x*)$') or '') == run_id() then return 1 end
  return 0
end
"""

# true when the record of full id ``id`` is on ``host`` (a volume: anywhere).
# A full id counts only on its own host: to another host's engine it is a
# string to find as a name, then as an id prefix (moby's GetContainer order)
_HERE = """
local function here(kind, id, host)
  return kind == 'volume' or redis.call('HGET', 'fdcs:host:' .. kind, id) == host
end
"""

#: Lua: ``complete(host)`` (above) and ``settled(settle)``: true when
#: ``settle`` < 0 or ``settle`` seconds have gone by since the first complete
#: reconcile on this Redis run (what cross-host state -- names, quota usage --
#: needs after a loss of data).  Shared with :mod:`authz_plugin.quota`.
REBUILT_LUA = _READY + """
local function settled(settle)
  if settle < 0 then return true end
  local e = redis.call('GET', 'fdcs:epoch')
  if not e or string.match(e, '^(%x*) ') ~= run_id() then return false end
  return tonumber(redis.call('TIME')[1]) - tonumber(string.match(e, ' (%d+)$')) >= settle
end
"""

_RESOLVE = _READY + _HERE + """
local kind, ref, limit, host = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[5]
if kind == 'exec' then
  local v = redis.call('GET', 'fdcs:exec:' .. ref)
  if v then return {'id', ref, string.match(v, '^(%S+)')} end
  return {'none', complete(host)}
end
-- a container's id is 64 hex digits (moby's stringid): a shorter or longer
-- reference is never one to its engine, so its record is not read
if kind ~= 'container' or #ref == 64 then
  local owner = redis.call('HGET', 'fdcs:own:' .. kind, ref)
  if owner and here(kind, ref, host) then return {'id', ref, owner} end
end
if kind == 'volume' then return {'none', complete(host)} end
local id = redis.call('HGET', 'fdcs:names:' .. kind .. ':' .. host, ref)
if id then return {'name', id, redis.call('HGET', 'fdcs:own:' .. kind, id) or ''} end
if redis.call('SISMEMBER', 'fdcs:unowned:' .. kind .. ':' .. host, ref) == 1 then return {'name', '', ''} end
if ARGV[4] ~= '1' then return {'none', complete(host)} end
local ids = redis.call('ZRANGEBYLEX', 'fdcs:ids:' .. kind .. ':' .. host, '[' .. ref, '[' .. ref .. '\\255', 'LIMIT', 0, limit)
if #ids == 0 then return {'none', complete(host)} end
local out = {'prefix'}
for _, i in ipairs(ids) do
  out[#out + 1] = i
  out[#out + 1] = redis.call('HGET', 'fdcs:own:' .. kind, i) or ''
end
return out
"""


def resolve_reads(host: str) -> tuple[str, ...]:
    """Every key ``_RESOLVE`` reads for a container reference it answers
    ``id``, ``name`` or ``prefix`` on ``host`` (``none`` also reads
    ``complete()``): what :class:`~authz_plugin.known.KnownRefs` tracks.
    Keep it equal to the script (``tests/unit/test_known.py`` checks it
    against the keys the script touches)."""
    return ("fdcs:own:container", "fdcs:host:container", f"fdcs:names:container:{host}",
            f"fdcs:unowned:container:{host}", f"fdcs:ids:container:{host}")


_TENANT_REF = _HERE + """
local kind, tenant, ref, scoped, limit, host = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
if redis.call('HGET', 'fdcs:own:' .. kind, ref) == tenant and here(kind, ref, host) then return {'id', ref} end
if kind == 'volume' then return {'name', scoped} end
if redis.call('HEXISTS', 'fdcs:names:' .. kind .. ':' .. host, scoped) == 1 then return {'name', scoped} end
local ids = redis.call('ZRANGEBYLEX', 'fdcs:ids:' .. kind .. ':' .. host, '[' .. ref, '[' .. ref .. '\\255', 'LIMIT', 0, limit)
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

# add (or re-own) a record; drops the name the id had before on its host
_ADD = """
local kind, id, tenant, name, host = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
redis.call('HSET', 'fdcs:own:' .. kind, id, tenant)
redis.call('HSET', 'fdcs:host:' .. kind, id, host)
if kind ~= 'volume' then
  redis.call('ZADD', 'fdcs:ids:' .. kind .. ':' .. host, 0, id)
  local names = 'fdcs:names:' .. kind .. ':' .. host
  local old = redis.call('HGET', 'fdcs:nameof:' .. kind, id)
  if old and old ~= name and redis.call('HGET', names, old) == id then redis.call('HDEL', names, old) end
  if name ~= '' then
    redis.call('HSET', names, name, id)
    redis.call('HSET', 'fdcs:nameof:' .. kind, id, name)
    if kind == 'container' then
      redis.call('HSET', 'fdcs:cname', name, host .. ' ' .. id)
      redis.call('DEL', 'fdcs:resv:' .. name, 'fdcs:resvn:' .. name)
    end
  end
end
return 1
"""

# A removed resource no longer holds its quota charge (quota.py): whoever
# removes the record (plugin, prune, reconciler) frees the tenant's units.
_DISCHARGE = """
local function discharge(kind, id)
  local f = kind .. '/' .. id
  if kind == '' then f = id end
  local raw = redis.call('HGET', 'fdcs:charge', f)
  if not raw then return end
  local t, _, a, b, c, d, e = string.match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)')
  local v = {a, b, c, d, e}
  local M = {'containers', 'memory', 'cpus', 'volumes', 'networks'}
  for i = 1, 5 do
    local x = tonumber(v[i])
    if x and x ~= 0 then redis.call('HINCRBY', 'fdcs:usage:' .. t, M[i], -x) end
  end
  redis.call('HDEL', 'fdcs:charge', f)
end
"""

_DROP_CHARGE = _DISCHARGE + "discharge('', ARGV[1])\nreturn 1\n"

_REMOVE = _DISCHARGE + """
local kind, id = ARGV[1], ARGV[2]
local host = redis.call('HGET', 'fdcs:host:' .. kind, id) or ARGV[3]
discharge(kind, id)
local n = redis.call('HDEL', 'fdcs:own:' .. kind, id)
redis.call('HDEL', 'fdcs:host:' .. kind, id)
if kind ~= 'volume' then
  redis.call('ZREM', 'fdcs:ids:' .. kind .. ':' .. host, id)
  local name = redis.call('HGET', 'fdcs:nameof:' .. kind, id)
  if name then
    local names = 'fdcs:names:' .. kind .. ':' .. host
    if redis.call('HGET', names, name) == id then redis.call('HDEL', names, name) end
    if kind == 'container' and redis.call('HGET', 'fdcs:cname', name) == host .. ' ' .. id then
      redis.call('HDEL', 'fdcs:cname', name)
    end
    redis.call('HDEL', 'fdcs:nameof:' .. kind, id)
  end
end
return n
"""

_RENAME = """
local kind, id, new, host = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local names = 'fdcs:names:' .. kind .. ':' .. host
local old = redis.call('HGET', 'fdcs:nameof:' .. kind, id)
if old and redis.call('HGET', names, old) == id then redis.call('HDEL', names, old) end
if old and kind == 'container' and redis.call('HGET', 'fdcs:cname', old) == host .. ' ' .. id then
  redis.call('HDEL', 'fdcs:cname', old)
end
redis.call('HSET', names, new, id)
redis.call('HSET', 'fdcs:nameof:' .. kind, id, new)
if kind == 'container' then
  redis.call('HSET', 'fdcs:cname', new, host .. ' ' .. id)
  redis.call('DEL', 'fdcs:resv:' .. new, 'fdcs:resvn:' .. new)
end
return 1
"""

# Reserve a cluster-wide container name for a create or rename on ``host``:
# refused when another host holds the name or is creating it right now.
# Several requests of one host may be in flight for one name (the engine
# lets one win and answers the others 409): ``fdcs:resvn:`` counts them, and
# the reservation ends when the last one fails or one of them succeeds.
_RESERVE = REBUILT_LUA + """
local name, host, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- every host's names are known only once every reconciler has passed
if not settled(tonumber(ARGV[4])) then return {'rebuilding', ''} end
local held = redis.call('HGET', 'fdcs:cname', name)
if held then
  local h = string.match(held, '^(%S+)')
  if h ~= host then return {'held', h} end
  return {'ok', host}
end
local by = redis.call('GET', 'fdcs:resv:' .. name)
if by and by ~= host then return {'reserved', by} end
redis.call('SET', 'fdcs:resv:' .. name, host, 'EX', ttl)
redis.call('INCR', 'fdcs:resvn:' .. name)
redis.call('EXPIRE', 'fdcs:resvn:' .. name, ttl)
return {'ok', host}
"""

# a host's complete reconcile, on this Redis run; the run's epoch if it has none
_MARK = _RUN + """
local run, now = run_id(), redis.call('TIME')[1]
redis.call('HSET', 'fdcs:reconciled', ARGV[1], ARGV[2] .. ' ' .. run)
local e = redis.call('GET', 'fdcs:epoch')
if not e or string.match(e, '^(%x*) ') ~= run then redis.call('SET', 'fdcs:epoch', run .. ' ' .. now) end
return 1
"""

_COMPLETE = _READY + """
return complete(ARGV[1])
"""

_SETTLED = REBUILT_LUA + """
if settled(tonumber(ARGV[1])) then return 1 end
return 0
"""

_RELEASE = """
local name, host = ARGV[1], ARGV[2]
if redis.call('GET', 'fdcs:resv:' .. name) ~= host then return 0 end
if redis.call('DECR', 'fdcs:resvn:' .. name) <= 0 then
  redis.call('DEL', 'fdcs:resv:' .. name, 'fdcs:resvn:' .. name)
end
return 1
"""


@dataclass(frozen=True)
class Resolution:
    """What the engine would resolve a reference to, and its owners.

    ``how`` is ``id``, ``name``, ``prefix`` or ``none``; ``matches`` lists
    ``(id, owner)`` (one entry for ``id`` and ``name``; every candidate for
    ``prefix``; owner ``""`` when an id is indexed without an owner).  For
    ``none``, ``complete`` says whether this host's records are complete
    (False while ownership is being rebuilt after a loss of Redis data).
    """

    how: str
    matches: tuple[tuple[str, str], ...] = ()
    complete: bool = True

    def owned_by(self, tenant: str) -> bool:
        """True when the engine's target is certainly ``tenant``'s: every
        resource the reference could reach belongs to it."""
        matches = self.matches
        if self.how == "none" or not matches:
            return False
        if len(matches) == 1:  # an id, a name, a unique prefix
            return matches[0][1] == tenant
        if self.how == "prefix" and len(matches) >= PREFIX_LIMIT:
            return False
        return all(owner == tenant for _, owner in matches)

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


_RESOLVE_SCRIPT = resp.Script(_RESOLVE)
_HOWS = frozenset({"id", "name", "prefix"})


def _resolve_head(kind: str) -> bytes:
    """The packed start of a resolve: ``EVALSHA <sha> 0 <kind>`` of five arguments."""
    return _RESOLVE_SCRIPT.head(5) + resp.bulk(kind)


def _malformed(what: str) -> StoreUnavailable:
    metrics.redis_error()
    log.error("redis answered %s with a reply of an unexpected shape (another FDCS version's scripts? "
              "a proxy in front of Redis?)", what)
    return StoreUnavailable("ownership store answered unexpectedly; retry, and tell the site "
                            "administrators if it persists")


def resolution(raw) -> Resolution:
    """One ``_RESOLVE`` reply as a :class:`Resolution`; a reply of any other
    shape raises :class:`StoreUnavailable` (the caller denies)."""
    if type(raw) is list and len(raw) == 3:
        # the common reply, one match (id, name, a unique prefix), in one
        # step; what the general checks below would accept, and nothing else
        how, id_, owner = raw
        if how in _HOWS and type(id_) is str and type(owner) is str:
            return Resolution(how, ((id_, owner),))
    return _resolution(raw)


def _resolution(raw) -> Resolution:
    """:func:`resolution` of any reply, every shape checked."""
    if isinstance(raw, list) and raw:
        how, rest = raw[0], raw[1:]
        if how == "none" and len(rest) <= 1:
            flag = rest[0] if rest else 0  # a Lua number arrives as an integer
            if flag in (0, 1, "0", "1"):
                return Resolution("none", (), flag in (1, "1"))
        elif (how in _HOWS and rest and len(rest) % 2 == 0 and (how == "prefix" or len(rest) == 2)
              and all(isinstance(x, str) for x in rest)):
            return Resolution(how, tuple(zip(rest[0::2], rest[1::2])))
    raise _malformed("resolve")


def call_redis(fn, *args, **kw):
    """Run one Redis operation; every failure becomes :class:`StoreUnavailable`."""
    try:
        return fn(*args, **kw)
    except redis.RedisError as e:
        raise store_error(e) from e


def store_error(e: redis.RedisError) -> StoreUnavailable:
    """What a Redis failure is to the caller (counted and logged here; the
    caller raises it ``from e``)."""
    metrics.redis_error()
    if isinstance(e, redis.ResponseError):
        # a refused command (out of memory, read-only replica, a script bug)
        log.error("redis refused a command: %s", e)
    else:
        log.warning("redis error: %s", e.__class__.__name__, exc_info=log.isEnabledFor(logging.DEBUG))
    return StoreUnavailable("ownership store unavailable, retry")


def owners_command(kind: str, ids: list[str]) -> tuple[str, ...]:
    """The command of :meth:`Store.owners` (for a client of another kind)."""
    return ("HMGET", f"fdcs:own:{kind}", *ids)


def owners_reply(raw, n: int) -> list[str | None]:
    """:meth:`Store.owners`'s answer from the reply to :func:`owners_command`
    of ``n`` ids; :class:`StoreUnavailable` when it has another shape."""
    if not isinstance(raw, list) or len(raw) != n or not all(o is None or isinstance(o, str) for o in raw):
        raise _malformed("owners")
    return raw


class Store:
    """Ownership records of one host's view; every method raises
    :class:`StoreUnavailable` on a Redis failure."""

    def __init__(self, client: redis.Redis, exec_ttl: int = 7 * 86400, host: str = "local",
                 settle: float | None = None, lean: resp.LeanRedis | None = None,
                 known: KnownRefs | None = None):
        """``settle``: seconds after the first host's reconcile on a Redis run
        before container names are reserved (see the module docstring);
        None: no wait (one host, tests).  ``lean``: the same Redis through
        :mod:`authz_plugin.resp`, for the hot read (:meth:`resolve`); None:
        redis-py for everything.  ``known``: container references' answers
        kept while Redis reports no change to what they read
        (:mod:`authz_plugin.known`, tracking :func:`resolve_reads` of
        ``host``); None: Redis is asked about every reference."""
        self.r = client
        self.lean = lean
        self.known = known
        self.exec_ttl = exec_ttl
        self.host = host
        self.settle = settle
        #: what the Lua ``settled()`` takes: -1 for no wait
        self.settle_arg = -1 if settle is None else settle
        self._resolve = client.register_script(_RESOLVE)
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)
        self._rename = client.register_script(_RENAME)
        self._tenant_ref = client.register_script(_TENANT_REF)
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._mark = client.register_script(_MARK)
        self._complete = client.register_script(_COMPLETE)
        self._settled = client.register_script(_SETTLED)
        self._drop_charge = client.register_script(_DROP_CHARGE)
        # the lean resolve's packed constants: EVALSHA's head and the kind
        # before the reference; PREFIX_LIMIT, the prefix flag and the host after
        self._resolve_heads = {kind: _resolve_head(kind) for kind in (*KINDS, "exec")}
        self._resolve_tails = {pfx: resp.bulk(PREFIX_LIMIT) + resp.bulk("1" if pfx else "0") + resp.bulk(host)
                               for pfx in (False, True)}

    @classmethod
    def from_config(cls, cfg: Config) -> "Store":
        # two intervals: every live reconciler has passed since the first one did
        # the lean client where it speaks the configuration exactly (no
        # Sentinel, no TLS): an inspect by id pays ~100 us less per EVALSHA
        lean = resp.from_config(cfg)
        known = (KnownRefs.for_lean(lean, resolve_reads(cfg["host.id"]))
                 if lean is not None and cfg["redis.track_refs"] else None)
        return cls(connect(cfg), cfg["redis.exec_ttl"], cfg["host.id"], settle=2 * cfg["reconciler.interval"],
                   lean=lean, known=known)

    def _call(self, fn, *args, **kw):
        return call_redis(fn, *args, **kw)

    # -- reads ------------------------------------------------------------------

    def resolve(self, refs: list[tuple[str, str, bool]]) -> list[Resolution]:
        """Resolve ``(kind, ref, may_be_prefix)`` triples in one round trip
        (none for one container reference whose answer :attr:`known` holds)."""
        if not refs:
            return []
        if self.known is not None and len(refs) == 1 and refs[0][0] == "container":
            return [self._resolve_kept(refs[0][1], refs[0][2])]
        return self._resolve_many(refs)

    def _resolve_kept(self, ref: str, pfx: bool) -> Resolution:
        """One container reference: the kept answer, or Redis's (kept unless
        ``none``: see :mod:`authz_plugin.known` for why it is the answer
        Redis would give for as long as none of the keys it read changed)."""
        known, key = self.known, (ref, pfx)
        gen, res = known.begin(key)
        if res is None:
            res = self._resolve_many([("container", ref, pfx)])[0]
            if res.how != "none":
                known.keep(gen, key, res)
        return res

    def _resolve_many(self, refs: list[tuple[str, str, bool]]) -> list[Resolution]:
        if self.lean is not None:
            # packed as evalsha_many packs (kind, ref, PREFIX_LIMIT, "1"|"0",
            # host), the constant parts once per store: ~15 us less per hook
            heads, tails = self._resolve_heads, self._resolve_tails
            payload = b"".join([(heads.get(kind) or _resolve_head(kind)) + resp.bulk(ref) + tails[bool(pfx)]
                                for kind, ref, pfx in refs])
            raws = self._call(self.lean.evalsha_packed, _RESOLVE_SCRIPT, len(refs), payload)
        else:
            host = self.host
            argvs = [(kind, ref, PREFIX_LIMIT, "1" if pfx else "0", host) for kind, ref, pfx in refs]

            def run():
                if len(argvs) == 1:
                    return [self._resolve(keys=[], args=list(argvs[0]))]
                pipe = self.r.pipeline(transaction=False)
                for argv in argvs:
                    self._resolve(keys=[], args=list(argv), client=pipe)
                return pipe.execute()

            raws = self._call(run)
        if not isinstance(raws, list) or len(raws) != len(refs):
            raise _malformed("resolve")
        return [resolution(raw) for raw in raws]

    def owners(self, kind: str, ids: list[str]) -> list[str | None]:
        """The owning tenant of each full id in ``ids`` (None: no record), in
        one ``HMGET`` of the ownership hash (what :meth:`resolve` reads first
        for a reference).  For ids the engine gave, where no name or prefix
        may stand in for one."""
        if not ids:
            return []
        command = owners_command(kind, ids)
        if self.lean is not None:
            raw = self._call(self.lean.execute, *command, retry=True)
        else:
            raw = self._call(self.r.hmget, command[1], ids)
        return owners_reply(raw, len(ids))

    def tenant_ref(self, kind: str, tenant: str, ref: str, scoped: str | None) -> tuple[str, str]:
        """What a tenant's hex-looking reference means to that tenant, in the
        engine's order: its own full id, its own name (``scoped``), a unique
        prefix of its own ids.  Returns ``(how, value)`` with ``how`` one of
        ``id``, ``name``, ``ambiguous``, ``none``."""
        how, value = self._call(self._tenant_ref, keys=[],
                                args=[kind, tenant, ref, scoped or "", PREFIX_LIMIT, self.host])
        return how, value

    def owner(self, kind: str, id_: str) -> str | None:
        if kind == "exec":
            v = self._call(self.r.get, f"fdcs:exec:{id_}")
            return v.split()[0] if v else None
        return self._call(self.r.hget, f"fdcs:own:{kind}", id_)

    def name_target(self, kind: str, name: str) -> str | None:
        """The id this host's ``name`` is recorded for."""
        return self._call(self.r.hget, f"fdcs:names:{kind}:{self.host}", name)

    def records(self, kind: str) -> dict[str, tuple[str, str]]:
        """This host's records of ``kind``: id -> (tenant, name)."""
        def run():
            if kind in KINDS_WITH_IDS:
                # this host's own index (written with the record by the same
                # scripts): O(this host's records), not every host's; the
                # host field still decides (an id the index kept by mistake
                # must not make this host remove another host's record)
                ids = self.r.zrange(f"fdcs:ids:{kind}:{self.host}", 0, -1)
            else:
                hosts = self.r.hgetall(f"fdcs:host:{kind}")
                ids = [i for i, h in hosts.items() if h == self.host]
            if not ids:
                return {}
            pipe = self.r.pipeline(transaction=False)
            pipe.hmget(f"fdcs:host:{kind}", ids)
            pipe.hmget(f"fdcs:own:{kind}", ids)
            pipe.hmget(f"fdcs:nameof:{kind}", ids)
            hosts, owners, names = pipe.execute()
            return {i: (o or "", n or "") for i, h, o, n in zip(ids, hosts, owners, names) if h == self.host}
        return self._call(run)

    def all_records(self, kind: str) -> dict[str, tuple[str, str, str]]:
        """Every host's records of ``kind``: id -> (tenant, host, name)."""
        def run():
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(f"fdcs:own:{kind}")
            pipe.hgetall(f"fdcs:host:{kind}")
            pipe.hgetall(f"fdcs:nameof:{kind}")
            owners, hosts, names = pipe.execute()
            ids = set(owners) | set(hosts)
            return {i: (owners.get(i, ""), hosts.get(i, ""), names.get(i, i if kind == "volume" else ""))
                    for i in ids}
        return self._call(run)

    def hosts(self) -> dict[str, float]:
        """Hosts that completed a reconcile since Redis last lost its data:
        host -> time of the last complete pass."""
        return {h: float(t.split()[0]) for h, t in self._call(self.r.hgetall, "fdcs:reconciled").items()}

    # -- tenants' state ---------------------------------------------------------------

    def suspended(self) -> dict[str, dict]:
        """Suspended tenants: tenant -> {"at", "by", "reason"}."""
        import json
        out = {}
        for t, v in self._call(self.r.hgetall, "fdcs:suspended").items():
            try:
                out[t] = json.loads(v)
            except ValueError:
                out[t] = {"reason": v}
        return out

    def suspend(self, tenant: str, by: str, reason: str) -> None:
        import json
        self._call(self.r.hset, "fdcs:suspended", tenant,
                   json.dumps({"at": int(time.time()), "by": by, "reason": reason}))

    def resume(self, tenant: str) -> bool:
        return bool(self._call(self.r.hdel, "fdcs:suspended", tenant))

    def adopted(self) -> dict[str, dict[str, str]]:
        """This host's adoptions (``fdcs-manage adopt``): kind -> id -> tenant."""
        def run():
            pipe = self.r.pipeline(transaction=False)
            for kind in KINDS:
                pipe.hgetall(f"fdcs:adopted:{kind}")
            return pipe.execute()
        out: dict[str, dict[str, str]] = {}
        for kind, raw in zip(KINDS, self._call(run)):
            out[kind] = {}
            for id_, v in raw.items():
                tenant, _, host = v.partition(" ")
                if host == self.host:
                    out[kind][id_] = tenant
        return out

    def execs(self) -> dict[str, tuple[str, str]]:
        """Every exec record: id -> (tenant, container id)."""
        def run():
            keys = list(self.r.scan_iter("fdcs:exec:*", count=1000))
            if not keys:
                return {}
            vals = self.r.mget(keys)
            return {k.split(":", 2)[2]: tuple((v or " ").split(" ", 1)) for k, v in zip(keys, vals) if v}
        return self._call(run)

    def is_complete(self) -> bool:
        """This host has completed a reconcile since Redis last lost its data."""
        return bool(self._call(self._complete, keys=[], args=[self.host]))

    def settled(self) -> bool:
        """Container names may be reserved (``settle`` has passed; see the module docstring)."""
        return bool(self._call(self._settled, keys=[], args=[self.settle_arg]))

    def ping(self) -> None:
        self._call(self.r.ping)

    # -- writes -----------------------------------------------------------------

    def add(self, kind: str, id_: str, tenant: str, name: str = "") -> None:
        self._call(self._add, keys=[], args=[kind, id_, tenant, name, self.host])

    def add_volume_if_new(self, name: str, tenant: str) -> bool:
        """Record a volume unless a record exists (a create answered for an
        existing volume must not change its owner)."""
        def run():
            if not self.r.hsetnx("fdcs:own:volume", name, tenant):
                return False
            self.r.hset("fdcs:host:volume", name, self.host)
            return True
        return bool(self._call(run))

    def remove(self, kind: str, id_: str) -> None:
        if kind == "exec":
            self._call(self.r.delete, f"fdcs:exec:{id_}")
        else:
            self._call(self._remove, keys=[], args=[kind, id_, self.host])

    def rename(self, kind: str, id_: str, new_name: str) -> None:
        self._call(self._rename, keys=[], args=[kind, id_, new_name, self.host])

    def add_exec(self, exec_id: str, tenant: str, container_id: str) -> None:
        self._call(self.r.set, f"fdcs:exec:{exec_id}", f"{tenant} {container_id}", ex=self.exec_ttl)

    def set_running(self, running: dict[str, int]) -> None:
        """Replace this host's ``fdcs:running:<host>`` (tenant -> running
        containers; the reconciler, after a full pass) in one transaction."""
        key = f"fdcs:running:{self.host}"

        def run():
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(key)
            if running:
                pipe.hset(key, mapping=running)
            pipe.execute()
        self._call(run)

    def set_running_tenant(self, tenant: str, running: int) -> None:
        """One tenant's running containers on this host (the reconciler, events)."""
        if running:
            self._call(self.r.hset, f"fdcs:running:{self.host}", tenant, running)
        else:
            self._call(self.r.hdel, f"fdcs:running:{self.host}", tenant)

    def remember_admission(self, key: str, tenant: str, user: str) -> None:
        """The request hook admitted request ``key`` for ``tenant``
        (``fdcs:admitted:<key>``, 120 s): the response hook's fallback when
        Keystone cannot answer."""
        self._call(self.r.set, f"fdcs:admitted:{key}", f"{tenant} {user}", ex=RESERVATION_TTL)

    def admission(self, key: str) -> tuple[str, str] | None:
        v = self._call(self.r.get, f"fdcs:admitted:{key}")
        if not v:
            return None
        tenant, _, user = v.partition(" ")
        return tenant, user

    def reserve_name(self, scoped: str) -> tuple[bool, str]:
        """Reserve a cluster-wide container name for this host; returns
        ``(ok, other_host)``."""
        how, who = self._call(self._reserve, keys=[], args=[scoped, self.host, RESERVATION_TTL, self.settle_arg])
        if how == "rebuilding":
            raise Retry("container names are being checked across hosts after a restart of the ownership "
                        "store; retry in a moment")
        return how == "ok", who

    def release_name(self, scoped: str) -> None:
        self._call(self._release, keys=[], args=[scoped, self.host])

    def set_unowned_names(self, names: dict[str, set[str]]) -> None:
        """Replace this host's names of unowned containers and networks
        (reconciler, full pass).  The engine resolves an exact name before an
        id prefix, so a hex-looking reference equal to such a name must never
        be taken for a prefix of the caller's ids."""
        def run():
            pipe = self.r.pipeline(transaction=True)
            for kind in KINDS_WITH_IDS:
                key = f"fdcs:unowned:{kind}:{self.host}"
                pipe.delete(key)
                if names.get(kind):
                    pipe.sadd(key, *sorted(names[kind]))
            pipe.execute()
        self._call(run)

    def add_unowned_name(self, kind: str, name: str) -> None:
        """One more unowned name (reconciler, events).  Names are removed only
        by the next full pass: a stale one refuses, never allows."""
        self._call(self.r.sadd, f"fdcs:unowned:{kind}:{self.host}", name)

    def mark_complete(self, when: float) -> None:
        """Called by the reconciler after a full pass over this host."""
        self._call(self._mark, keys=[], args=[self.host, str(when)])

    def retire_host(self) -> int:
        """Remove every record of this host (the host is gone for good)."""
        n = 0
        for kind in KINDS:
            for id_ in self.records(kind):
                self.remove(kind, id_)
                n += 1
        for f, v in self._call(self.r.hgetall, "fdcs:charge").items():
            if v.split(" ", 2)[1:2] == [self.host]:  # pending charges of the host
                self._call(self._drop_charge, keys=[], args=[f])
        def run():
            self.r.delete(f"fdcs:ids:container:{self.host}", f"fdcs:ids:network:{self.host}",
                          f"fdcs:names:container:{self.host}", f"fdcs:names:network:{self.host}",
                          f"fdcs:unowned:container:{self.host}", f"fdcs:unowned:network:{self.host}")
            self.r.hdel("fdcs:reconciled", self.host)
            self.r.delete(f"fdcs:running:{self.host}")
        self._call(run)
        return n
