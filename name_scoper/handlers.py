"""From one tenant request to an :class:`~name_scoper.exchange.Exchange`.

``prepare`` reads the request the way the plugin does (``authz_plugin``'s
canonicalisation and endpoint table, so both sides agree on what a path
means), then applies the rewriting of ``rewrite.py`` field by field.  The
I/O it needs is small and explicit: id-prefix resolution against the
ownership store (one Redis round trip, in a thread), and sub-requests to the
engine through the caller's own identity (the tenant's default network, the
tenant's counts for ``/info``).

The plugin stays the enforcement point: whatever the rewriting lets through
is still decided by the plugin, and whatever the rewriting cannot make sense
of is passed on unchanged for the plugin to refuse (with its own message),
except where a refusal here is clearer (reserved labels, forged tenant
filters, private registry credentials).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Callable

import redis

from authz_plugin import endpoints, shapes
from authz_plugin.config import Config
from authz_plugin.errors import BadRequest, FdcsError
from authz_plugin.ownership import owners_command, owners_reply, store_error
from authz_plugin.policy import SUSPENSION_TTL
from authz_plugin.quota import QuotaPolicy
from authz_plugin.request import check_version, parse as parse_request
from authz_plugin.scoping import NAME_LABEL, TENANT_LABEL, looks_like_id

from . import rewrite
from ._redis import AsyncRedis
from .exchange import Engine, Exchange, Headers
from .rewrite import Scope

log = logging.getLogger(__name__)

V = "/v1.41"
_ADMIN_INSPECT = re.compile(
    r"^(?:/v[0-9.]+)?/(?:plugins/[^/?]+/json|nodes/[^/?]+|services/[^/?]+|tasks/[^/?]+|secrets/[^/?]+|configs/[^/?]+)(?:\?.*)?$")


@dataclass
class Context:
    """Per-process state of the scoper's rewriting."""

    cfg: Config
    store: object  # authz_plugin.ownership.Store
    #: the store's Redis on the event loop (None: only the store's blocking client)
    redis: AsyncRedis | None = None
    #: how many requests the proxy is serving (set by the server; 1: only the caller)
    in_flight: Callable[[], int] = lambda: 1
    #: tenants whose default network was seen recently: tenant -> monotonic time
    default_networks: dict[str, float] = field(default_factory=dict)
    default_network_ttl: float = 60.0
    #: one default-network check per tenant at a time (one small lock per tenant seen)
    default_network_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    #: the owners the records gave to listed containers (see :class:`OwnersSeen`)
    owners_seen: "OwnersSeen" = field(default_factory=lambda: OwnersSeen(OWNERS_TTL))
    #: the last rewritten container inspects (see :class:`Rewritten`)
    inspects: "Rewritten" = field(default_factory=lambda: Rewritten(rewrite.container_inspect))
    #: the last rewritten container lists (see :class:`ListsKept`)
    lists: "ListsKept" = field(default_factory=lambda: ListsKept())

    @functools.cached_property
    def quota(self) -> QuotaPolicy:
        return QuotaPolicy.from_config(self.cfg)

    @property
    def api_version(self) -> str:
        return self.cfg["scoper.api_version"]


def _hdict(headers: Headers) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


#: what ``_target`` leaves unescaped in a path: quote()'s always-safe characters and its ``safe``
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_PATH_UNCHANGED = re.compile(r"[A-Za-z0-9" + re.escape(_PATH_SAFE) + r"]*")


def _target(version: str | None, path: str, query: list[tuple[str, str]]) -> str:
    # a path of safe characters only (every scoped name) is its own quoting
    t = (f"/v{version}" if version else "") + (
        path if _PATH_UNCHANGED.fullmatch(path) else urllib.parse.quote(path, safe=_PATH_SAFE))
    if query:
        t += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return t


@functools.lru_cache(maxsize=32)  # the engine's one version, the configured cap
def _capped(version: bytes, cap: str) -> bytes:
    """The ``Api-Version`` header value the client sees: the engine's, at most ``cap``."""
    return rewrite.version_cap(version.decode(), cap).encode()


class Response:
    """The response rewriter for one request (see exchange.ResponseRewriter)."""

    def __init__(self, scope: Scope, api_cap: str, body_rewrite=None, mode: str = "json",
                 ok_statuses=(200, 201), line=rewrite.event_line, not_owned_status: int = 404):
        self.scope = scope
        self.api_cap = api_cap
        self.body_rewrite = body_rewrite  # bytes -> bytes, on success
        self.mode = mode
        self.ok = ok_statuses
        self._line = line
        self.not_owned_status = not_owned_status

    def head(self, status: int, headers: Headers) -> tuple[str, Headers]:
        """(how to treat the body, the headers to pass on) of the engine's
        answer; ``headers``: (lower-case name, value) pairs, as ``http1``
        parses them."""
        out = []
        is_json = False
        for k, v in headers:
            if k == b"api-version":
                v = _capped(v, self.api_cap)
            elif k == b"content-type" and v.split(b";")[0].strip() == b"application/json":
                is_json = True
            out.append((k, v))
        if status >= 400:
            return ("json" if is_json else "stream"), out
        if self.body_rewrite is None or status not in self.ok:
            return "stream", out
        if self.mode == "json" and not is_json:
            return "stream", out
        return self.mode, out

    def json(self, status: int, body: bytes):
        """The rewritten body (or ``(status, body)``); a coroutine giving it
        when the rewriting reads Redis (an ``async`` ``body_rewrite``)."""
        if status >= 400:
            return rewrite.error(status, body, self.scope, self.not_owned_status)
        try:
            out = self.body_rewrite(body)
        except ValueError:
            return _unreadable()
        return self._awaited(out) if type(out) is CoroutineType else out

    @staticmethod
    async def _awaited(out):
        try:
            return await out
        except ValueError:
            return _unreadable()

    def line(self, line: bytes) -> bytes | None:
        return self._line(line, self.scope)


def _unreadable() -> tuple[int, bytes]:
    log.warning("response body could not be rewritten; answered 502")
    return 502, b'{"message":"the engine sent a response the name scoper cannot read"}'


def _resolve(ctx: Context, scope: Scope, kind: str, ref: str) -> str:
    """What the engine should see for a tenant's reference: its scoped name,
    or, for a hex-looking reference, the tenant's own full id, own name or
    unique id prefix (one blocking Redis round trip).  A reference that
    resolves to nothing of the caller's is passed on as written, for the
    plugin to refuse as missing."""
    ref = ref.lstrip("/")
    if kind == "exec":
        return ref
    if kind == "network" and ref in ("bridge", "default"):
        return scope.default_network
    if not looks_like_id(ref):
        return scope.name(ref)
    scoped = scope.name(ref) if rewrite.valid_original(ref) else None
    how, value = ctx.store.tenant_ref(kind, scope.tenant, ref, scoped)
    return value if how in ("id", "name") else ref


#: seconds a listed container's owner is kept (:class:`OwnersSeen`): the
#: plugin's bound for its copy of the suspended projects
OWNERS_TTL = SUSPENSION_TTL


class OwnersSeen:
    """The owners the ownership records gave to containers a list showed,
    each kept ``ttl`` seconds (:data:`OWNERS_TTL`) on the monotonic
    ``clock``, at most ``size`` of them: a tenant's ``docker ps`` asks Redis
    only about the ids it has not seen lately.  A list is no reference:
    the plugin decides it by its tenant filter, and this only narrows what
    the engine listed.

    Why a kept owner is still the record's: a container's owner does not
    change during its life (the label is set at create and the engine cannot
    change it; the records follow the label; ``fdcs-manage adopt`` gives an
    owner only to an orphan, which has no record, so nothing was kept for
    it; ``fdcs-manage host retire --force`` of a live host, or a loss of
    Redis's data, drops records of containers that still run: a list may
    show them to their tenant for ``ttl`` more seconds).  Container ids are
    64 random hex digits, never reused, and a list only holds containers
    the engine has now: a kept owner of a removed container is never asked
    for.  Only a record's owner is kept: no record (an orphan, a conflict
    of labels) and a failed read are asked again every time.

    One event loop uses it (no locks)."""

    __slots__ = ("ttl", "size", "clock", "_owners")

    def __init__(self, ttl: float, size: int = 65536, clock=time.monotonic):
        self.ttl = ttl
        self.size = size
        self.clock = clock
        #: full id -> (expiry on ``clock``, owner)
        self._owners: dict[str, tuple[float, str]] = {}

    def split(self, ids: list[str]) -> tuple[dict[str, str | None], list[str]]:
        """(id -> owner for the ids kept and fresh, the others in order)."""
        now = self.clock()
        known: dict[str, str | None] = {}
        ask: list[str] = []
        get = self._owners.get
        for i in ids:
            e = get(i)
            if e is not None and now < e[0]:
                known[i] = e[1]
            else:
                ask.append(i)
        return known, ask

    def keep(self, ids: list[str], owners: list[str | None]) -> None:
        """Keep the owners the records gave ``ids`` (``owners``, in the same order; None: no record)."""
        kept = self._owners
        if len(kept) + len(ids) > self.size:
            kept.clear()  # simplest bound: the listed ids come back at their next miss
        expiry = self.clock() + self.ttl
        for i, owner in zip(ids, owners):
            if owner is not None:
                kept[i] = (expiry, owner)

    def learn(self, known: dict[str, str | None], ids: list[str], owners: list[str | None]) -> None:
        """:meth:`keep` the records' answer ``owners`` for ``ids``, and add it to ``known``."""
        self.keep(ids, owners)
        known.update(zip(ids, owners))


class _Answers:
    """At most ``size`` rewritten answers, by tenant and the engine's
    answer's exact bytes, of answers of at most ``max_body`` bytes (the
    whole is emptied when full): at most ``size * max_body * 2`` bytes of
    memory.  One event loop uses it."""

    __slots__ = ("size", "max_body", "_out")

    def __init__(self, size: int = 64, max_body: int = 32 * 1024):
        self.size = size
        self.max_body = max_body
        self._out: dict[tuple[str, bytes], object] = {}

    def _put(self, key: tuple[str, bytes], value) -> None:
        kept = self._out
        if len(kept) >= self.size:
            kept.clear()
        kept[key] = value


class Rewritten(_Answers):
    """The last answers of a pure rewriting ``fn(body, scope)`` -- one that
    reads nothing but the engine's answer and the caller's tenant, such as
    ``rewrite.container_inspect`` -- by tenant and the answer's exact bytes:
    the same engine answer for the same tenant is the same rewritten answer,
    without decoding and encoding it again (a tenant's tools poll the same
    containers; their answers change only when the containers do).

    Bounded as :class:`_Answers` says.  A rewriting that raises keeps
    nothing."""

    __slots__ = ("fn",)

    def __init__(self, fn, size: int = 64, max_body: int = 32 * 1024):
        super().__init__(size, max_body)
        self.fn = fn

    def __call__(self, body: bytes, scope: Scope) -> bytes:
        if len(body) > self.max_body:
            return self.fn(body, scope)
        key = (scope.tenant, bytes(body))
        out = self._out.get(key)
        if out is None:
            out = self.fn(body, scope)
            self._put(key, out)
        return out


class ListsKept(_Answers):
    """The last rewritten container lists (``rewrite.container_list``), by
    tenant and the engine's exact bytes, each with the owners the records
    gave its containers then: the same answer is the same rewritten answer
    while :class:`OwnersSeen` still holds exactly those owners for those
    ids (then nothing would be asked, and the same owners would be used).
    A list with an id the records gave no owner is never answered from here
    (such an id is asked about every time).  Bounded as :class:`_Answers`
    says; each value is (the rewritten body, id -> owner the rewriting used)."""

    __slots__ = ()

    def get(self, tenant: str, body: bytes, seen: OwnersSeen) -> bytes | None:
        """The kept answer to ``body`` for ``tenant`` while ``seen`` holds its owners, else None."""
        e = self._out.get((tenant, bytes(body)))
        if e is None:
            return None
        out, owners = e
        # equal only if every id is still seen, with the same owner (an id
        # without a record is never seen: such a list never holds)
        known, _ = seen.split(list(owners))
        return out if known == owners else None

    def keep(self, tenant: str, body: bytes, out: bytes, owners: dict[str, str | None]) -> None:
        if len(body) <= self.max_body:
            self._put((tenant, bytes(body)), (out, owners))


def _owners(ctx: Context, ids: list[str]) -> dict[str, str | None]:
    """id -> owner the ownership records give each of ``ids`` (None: no
    record): one blocking Redis round trip, like ``_resolve``, for the ids
    not seen lately (see :class:`OwnersSeen`)."""
    known, ask = ctx.owners_seen.split(ids)
    if ask:
        ctx.owners_seen.learn(known, ask, ctx.store.owners("container", ask))
    return known


def _kept(scope: Scope, owners: dict[str, str | None]) -> set[str]:
    """Of the ids of ``owners`` (id -> owner), those whose owner is the caller."""
    return {i for i, owner in owners.items() if owner == scope.tenant}


async def _ensure_default_network(ctx: Context, scope: Scope, engine: Engine) -> None:
    if time.monotonic() - ctx.default_networks.get(scope.tenant, -1e9) < ctx.default_network_ttl:
        return
    # One check (and create) per tenant at a time: the engine's CheckDuplicate
    # is not atomic, so a burst of a new tenant's first creates made several
    # networks of the one name, and every later use of it was "ambiguous".
    lock = ctx.default_network_locks.setdefault(scope.tenant, asyncio.Lock())
    async with lock:
        if time.monotonic() - ctx.default_networks.get(scope.tenant, -1e9) < ctx.default_network_ttl:
            return  # made or checked while this request waited
        await _check_default_network(ctx, scope, engine)


async def _check_default_network(ctx: Context, scope: Scope, engine: Engine) -> None:
    now = time.monotonic()
    name = scope.default_network
    status, _, out = await engine("GET", f"{V}/networks/{name}")
    if status == 404:
        body = json.dumps({"Name": name, "CheckDuplicate": True, "Driver": "bridge",
                           "Labels": {TENANT_LABEL: scope.tenant, NAME_LABEL: rewrite.DEFAULT_NETWORK}}).encode()
        status, _, out = await engine("POST", f"{V}/networks/create", body)
        if status not in (201, 409):
            raise BadRequest(f"your default network could not be created: {rewrite.error(status, out, scope)[1].decode()}")
    elif status != 200:
        try:
            reason = rewrite.load(rewrite.error(status, out, scope)[1])["message"]
        except (ValueError, KeyError, TypeError):
            reason = f"the engine answered {status}"
        raise BadRequest(f"your default network could not be checked ({reason}); retry")
    ctx.default_networks[scope.tenant] = now


async def _tenant_counts(scope: Scope, engine: Engine) -> dict[str, int]:
    flt = urllib.parse.quote(json.dumps({"label": [f"{TENANT_LABEL}={scope.tenant}"]}))
    status, _, body = await engine("GET", f"{V}/containers/json?all=1&filters={flt}")
    items = rewrite.load(body) if status == 200 else []
    states = [c.get("State") for c in items]
    return {"Containers": len(items), "ContainersRunning": states.count("running"),
            "ContainersPaused": states.count("paused"),
            "ContainersStopped": len(items) - states.count("running") - states.count("paused")}


#: the API versions a tenant may name (parse_request's bounds)
_MIN_API, _MAX_API = "1.12", "9.99"
#: the commonest tenant reads, exactly: ``GET /vX.Y/containers/<name>/json``
#: (docker inspect, compose's polling) and ``GET /vX.Y/containers/json``
#: (docker ps; ``?all=1``: ps -a) -- a plain name, no other query; the
#: version is then checked as parse_request checks it
_FAST_INSPECT = re.compile(r"/v([0-9.]+)/containers/([A-Za-z0-9][A-Za-z0-9_.-]{0,199})/json")
_FAST_LIST = re.compile(r"/v([0-9.]+)/containers/json(\?all=1)?")


def _fast_read(ctx: Context, scope: Scope, target: str, headers: Headers) -> Exchange | None:
    """The exchange of one of the commonest reads (``_FAST_INSPECT``,
    ``_FAST_LIST``) without the general parse, or None for anything else
    (then :func:`_prepare_general` decides).  The same exchange as the
    general path gives: a differential test holds the two equal.

    Only for a request without a ``Content-Type`` (the general path would
    check it) and with a name that cannot be read as an id (those are
    resolved in Redis)."""
    for k, _ in headers:
        if k == b"content-type":
            return None
    inspect = _FAST_INSPECT.fullmatch(target)
    listing = None if inspect else _FAST_LIST.fullmatch(target)
    m = inspect or listing
    if m is None:
        return None
    try:
        check_version(m.group(1), _MIN_API, _MAX_API)
    except BadRequest:
        return None
    if inspect:
        name = m.group(2)
        if looks_like_id(name):
            return None
        return Exchange("GET", f"/v{m.group(1)}/containers/{scope.name(name)}/json", headers,
                        request_body="stream", response=_inspect_response(ctx, scope))
    return Exchange("GET", _list_target(scope.tenant, m.group(1), bool(m.group(2))), headers,
                    request_body="stream", response=_list_response(ctx, scope))


def _inspect_response(ctx: Context, scope: Scope) -> Response:
    """The rewriter of a container inspect's answer (both paths)."""
    inspects = ctx.inspects
    return Response(scope, ctx.api_version, lambda b: inspects(b, scope))


def _list_response(ctx: Context, scope: Scope) -> Response:
    """The rewriter of a container list's answer (both paths): the caller's
    containers, by label and by the ownership records.

    The records are read with the store's blocking client when this is the
    only request being served (the cheapest way: no round of the event
    loop, and no one else waits for it), else on the event loop
    (``Context.redis``, where the store has a lean client): a blocking read
    would hold up every other tenant connection for the round trip -- a
    quarter of the scoper's time under a load of lists."""
    lists = ctx.lists

    def listed(body: bytes):
        out = lists.get(scope.tenant, body, ctx.owners_seen)
        if out is not None:
            return out
        if ctx.redis is None or ctx.in_flight() <= 1:
            used: dict[str, str | None] = {}

            def owned(ids: list[str]) -> set[str]:
                used.update(_owners(ctx, ids))
                return _kept(scope, used)
            out = rewrite.container_list(body, scope, owned)
            lists.keep(scope.tenant, body, out, used)
            return out
        return _listed_on_loop(ctx, scope, body)
    return Response(scope, ctx.api_version, listed)


async def _listed_on_loop(ctx: Context, scope: Scope, body: bytes) -> bytes:
    """:func:`rewrite.container_list` of ``body`` with the records read on the event loop."""
    mine, ids = rewrite.containers_labelled(body, scope)
    keep = None
    known: dict[str, str | None] = {}
    if mine:
        known, ask = ctx.owners_seen.split(ids)
        if ask:
            try:
                raw = await ctx.redis.execute(*owners_command("container", ask), retry=True)
            except redis.RedisError as e:
                raise store_error(e) from e
            ctx.owners_seen.learn(known, ask, owners_reply(raw, len(ask)))
        keep = _kept(scope, known)
    out = rewrite.containers_out(mine, scope, keep)
    ctx.lists.keep(scope.tenant, body, out, known)
    return out


@functools.lru_cache(maxsize=1024)  # a tenant's list target: the same text on every docker ps
def _list_target(tenant: str, version: str, all_: bool) -> str:
    """The target of ``GET /v<version>/containers/json[?all=1]`` for ``tenant``:
    the tenant label filter added, as the general path writes it."""
    query = [("all", "1")] if all_ else []
    query.append(("filters", rewrite.filters([], Scope(tenant), "containers")))
    return _target(version, "/containers/json", query)


async def prepare(ctx: Context, ident, method: str, target: str, headers: Headers, engine: Engine) -> Exchange:
    """The exchange for one authenticated tenant request (see module doc);
    ``headers``: (lower-case name, value) byte pairs, as ``http1`` parses them."""
    if ident.is_admin:
        return Exchange(method, target, headers, request_body="stream")
    try:
        return await _prepare(ctx, Scope(ident.project_id), method, target, headers, engine)
    except FdcsError as e:
        return Exchange(method, target, headers, reject=(e.status if e.status < 500 else 400, str(e)))


async def _prepare(ctx: Context, scope: Scope, method: str, target: str, headers: Headers,
                   engine: Engine) -> Exchange:
    auth = [v for k, v in headers if k == b"x-registry-auth"]  # lower-case names (http1)
    if auth:
        if any(rewrite.registry_auth_has_credentials(v.decode("latin-1")) for v in auth):
            return Exchange(method, target, headers, reject=(
                403, "registry credentials (X-Registry-Auth) are not accepted: images are shared by all "
                     "tenants, so only public images from the allowed registries can be pulled"))
        headers = [(hk, hv) for hk, hv in headers if hk != b"x-registry-auth"]
    if method == "GET":
        fast = _fast_read(ctx, scope, target, headers)
        if fast is not None:
            return fast
    return await _prepare_general(ctx, scope, method, target, headers, engine)


async def _prepare_general(ctx: Context, scope: Scope, method: str, target: str, headers: Headers,
                           engine: Engine) -> Exchange:
    """:func:`_prepare` for any request (headers already cleared of registry auth)."""
    hd = _hdict(headers)
    if method == "GET" and _ADMIN_INSPECT.match(target):
        # untyped `docker inspect` tries every object type in turn and moves
        # on only after a 404: answer these as missing, not as refused.
        return Exchange(method, target, headers, reject=(404, "No such object"))
    try:
        req = parse_request(method, target, hd, None, _MIN_API, _MAX_API)
    except BadRequest:
        # let the plugin refuse with its own message
        return Exchange(method, target, headers, request_body="stream",
                        response=Response(scope, ctx.api_version))
    ep, params = endpoints.match_params(req.method, req.path)  # one regex match for both
    cap = ctx.api_version
    if ep is None:
        return Exchange(method, target, headers, request_body="stream", response=Response(scope, cap))
    query = list(req.query)
    path = req.path
    ex = Exchange(method, target, headers, request_body="stream", response=Response(scope, cap))

    def set_query(key: str, value: str) -> None:
        for i, (k, _) in enumerate(query):
            if k == key:
                query[i] = (k, value)
                return

    # path reference
    if "ref" in params and ep.kind:
        ref = params["ref"]
        if ep.kind == "network" and ref in ("bridge", "default") and method == "DELETE":
            return Exchange(method, target, headers, reject=(403, "bridge is a pre-defined network and cannot be removed"))
        if looks_like_id(ref):
            resolved = await asyncio.to_thread(_resolve, ctx, scope, ep.kind, ref)
        else:
            resolved = _resolve(ctx, scope, ep.kind, ref)
        m = ep.pattern.match(path)
        path = path[:m.start("ref")] + resolved + path[m.end("ref"):]

    action = ep.action
    if action == "scoped":
        resource = {"/containers/json": "containers", "/containers/prune": "containers", "/networks": "networks",
                    "/networks/prune": "networks", "/volumes": "volumes", "/volumes/prune": "volumes",
                    "/events": "events"}[req.path]
        value = rewrite.filters(req.qall("filters"), scope, resource)
        if req.qall("filters"):
            set_query("filters", value)
        else:
            query.append(("filters", value))
        if req.path == "/networks/prune":
            # the prune may remove the tenant's default network: forget that
            # it exists, now and again once the prune has answered
            ctx.default_networks.pop(scope.tenant, None)

            def pruned(b: bytes) -> bytes:
                ctx.default_networks.pop(scope.tenant, None)
                return rewrite.prune_result(b, scope)
            ex.response = Response(scope, cap, pruned)
        elif req.path.endswith("/prune"):
            ex.response = Response(scope, cap, lambda b: rewrite.prune_result(b, scope))
        elif resource == "events":
            ex.response = Response(scope, cap, lambda b: b, mode="lines")
        else:
            fn = {"containers": rewrite.container_list, "networks": rewrite.network_list,
                  "volumes": rewrite.volume_list}[resource]
            if resource == "containers":
                ex.response = _list_response(ctx, scope)
            else:
                ex.response = Response(scope, cap, lambda b: fn(b, scope))
    elif action == "container_create":
        name = req.q("name")
        original = None
        if name:
            original = name.lstrip("/")
            set_query("name", scope.name(original))
        ex.request_body = "json"
        # The proxy hands the buffered body to rewrite_body synchronously;
        # hex references (rare) are resolved there with one blocking Redis
        # round trip each.
        def rewrite_body(body: bytes) -> bytes:
            resolver = lambda kind, ref: _resolve(ctx, scope, kind, ref)  # noqa: E731
            return rewrite.container_create(body, scope, original, ctx.cfg["scoper.default_pids_limit"], resolver,
                                            ctx.quota.create_defaults if ctx.quota.enabled else None)[0]

        ex.rewrite_body = rewrite_body
        # The tenant's default network must exist before the engine reads the
        # body; create it now (cheap when cached) rather than after the body.
        await _ensure_default_network(ctx, scope, engine)
        ex.response = Response(scope, cap, not_owned_status=400)
    elif action == "container_rename":
        new = req.q("name")
        if new:
            set_query("name", scope.name(new.lstrip("/")))
    elif action in ("network_connect", "network_disconnect"):
        ex.request_body = "json"
        disconnect = action == "network_disconnect"

        def rewrite_body(body: bytes) -> bytes:
            resolver = lambda kind, ref: _resolve(ctx, scope, kind, ref)  # noqa: E731
            return rewrite.network_connect(body, scope, resolver, disconnect)
        ex.rewrite_body = rewrite_body
    elif action == "network_create":
        ex.request_body = "json"
        ex.rewrite_body = lambda b: rewrite.network_create(b, scope)
    elif action == "volume_create":
        ex.request_body = "json"
        generated = secrets.token_hex(32)
        ex.rewrite_body = lambda b: rewrite.volume_create(b, scope, generated)
        ex.response = Response(scope, cap, lambda b: rewrite.volume_inspect(b, scope), ok_statuses=(201,))
    elif action in ("exec_create", "container_update", "exec_start"):
        shape = {"exec_create": shapes.EXEC_CONFIG, "container_update": shapes.UPDATE_CONFIG,
                 "exec_start": shapes.EXEC_START}[action]
        ex.request_body = "json"
        ex.rewrite_body = lambda b: rewrite.canonical(b, shape)
    elif action == "own" and method == "GET":
        if req.path.endswith("/stats") and ep.kind == "container":
            ex.response = Response(scope, cap, lambda b: b, mode="lines", line=rewrite.stats_line)
        elif req.path.endswith("/json") and ep.kind == "container":
            ex.response = _inspect_response(ctx, scope)
        elif ep.kind == "network":
            ex.response = Response(scope, cap, lambda b: rewrite.network_inspect(b, scope))
        elif ep.kind == "volume":
            ex.response = Response(scope, cap, lambda b: rewrite.volume_inspect(b, scope))
    elif req.path == "/info":
        counts = await _tenant_counts(scope, engine)

        def info(b: bytes) -> bytes:
            doc = rewrite.load(b)
            doc.update(counts)
            return json.dumps(doc).encode()
        ex.response = Response(scope, cap, info)
    elif req.path == "/version":
        def version(b: bytes) -> bytes:
            doc = rewrite.load(b)
            if isinstance(doc.get("ApiVersion"), str):
                doc["ApiVersion"] = rewrite.version_cap(doc["ApiVersion"], cap)
            return json.dumps(doc).encode()
        ex.response = Response(scope, cap, version)

    ex.target = _target(req.version, path, query)
    return ex
