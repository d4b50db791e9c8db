"""The authorizer: one decision per engine request, one record per success.

:class:`Authorizer` joins the pure parts (``request``, ``endpoints``,
``rules``) to the two I/O edges (identity, ownership store).  It speaks the
engine's AuthZ plugin protocol in plain dicts:

``authz_request(payload)``  -> ``{"Allow": bool, "Msg": str}``
``authz_response(payload)`` -> ``{"Allow": bool, "Msg": str}``

Order of a request decision, cheapest refusal first:

1. canonicalise the request (bad paths, versions, content types: refused);
2. authenticate (no valid identity: refused with the ``fdcs-login`` hint);
3. administrators are allowed everything, without Redis;
4. a suspended tenant is refused everything (the suspended set is cached
   for :data:`SUSPENSION_TTL` seconds per worker);
5. the role: reader-only users may GET and HEAD only;
6. the endpoint table (unmatched: "not supported");
7. the endpoint's rule (bodies, names, labels, limits);
8. ownership of every reference, in one Redis round trip;
9. with quotas on, the quota admission of a create or update (one atomic
   script: the charge is held from here until the response hook settles
   it), then the cluster-wide name reservation.

A container inspect or list (``GET``, no body) takes a lean lane
(:meth:`Authorizer._lean_read`): the same steps in the same order, from the
payload's fields without the canonical request, the endpoint table and the
plan; anything unusual about it goes the general way.  A serving thread
keeps its last identity while the identity service says it still holds
(:meth:`Authorizer._identity`); no ownership answer is ever kept.

Any exception that is not an :class:`FdcsError` is an internal fault: it is
logged with its cause and the request is denied ("internal error").  The
response hook records ownership after a successful create, rename or
removal; if that fails the response is refused, so that the tenant learns
that the new resource is not usable yet (the reconciler adopts it later from
its labels).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from . import endpoints, logfmt, rules
from . import audit as _audit
from .audit import audit
from .config import Config
from .errors import (BadRequest, Denied, FdcsError, Forbidden, IdentityUnavailable, NotFound, Retry,
                     StoreUnavailable, Suspended, Unsupported)
from .ownership import Store
from .quota import KEEP, QuotaStore, fingerprint
from .request import Headers, Request, check_version, parse, parse_query
from .scoping import TENANT_LABEL

log = logging.getLogger(__name__)

_RECORDING = frozenset({"container_create", "container_rename", "exec_create", "network_create",
                        "volume_create", "own", "scoped", "container_update"})

#: the request methods whose answers the response hook records (creates,
#: renames, removals); any other answer is allowed as it is
RECORDING_METHODS = frozenset({"POST", "DELETE"})

#: seconds a worker trusts its copy of the suspended tenants (``fdcs-manage
#: tenant suspend`` waits this long before it stops the tenant's containers)
SUSPENSION_TTL = 2.0

#: the reads the lean lane takes (:meth:`Authorizer._lean_read`), by their
#: target as the engine forwards it: ``GET /v<version>/containers/<ref>/json``
#: with a reference of name or id characters (no escape, no dot segment), and
#: ``GET /v<version>/containers/json?<query>`` with a query of printable
#: ASCII but ``#`` and space (what :func:`request.parse` takes as it is)
_LEAN_TARGET = re.compile(r"/v([0-9.]+)/containers/(?:([A-Za-z0-9][A-Za-z0-9_.-]*)/json|json\?([!\"$-~]*))")
_LIST_PATH = "/containers/json"


def allow(msg: str = "") -> dict[str, Any]:
    return {"Allow": True, "Msg": msg} if msg else {"Allow": True}


def deny(msg: str) -> dict[str, Any]:
    return {"Allow": False, "Msg": msg}


class Authorizer:
    def __init__(self, cfg: Config, identity, store: Store):
        self.cfg = cfg
        self.identity = identity
        self.store = store
        self.policy = rules.Policy.from_config(cfg)
        self.min_version = cfg["policy.min_api_version"]
        self.max_version = cfg["policy.max_api_version"]
        self.cluster_names = cfg["policy.container_names"] == "cluster"
        self.quota = QuotaStore(store.r, self.policy.quota, store.host, store.settle) if self.policy.quota.enabled else None
        self._suspended: tuple[float, dict[str, dict]] = (0.0, {})
        #: the headers an identity depends on (lower case), when the identity
        #: service can tell whether an identity it gave still holds
        #: (``still_cached``); None: ask it every time
        names = getattr(identity, "header_names", None) if hasattr(identity, "still_cached") else None
        self._ident_names: tuple[str, ...] | None = (
            tuple(sorted(n.decode("latin-1") for n in names)) if names else None)
        #: per serving thread (one engine connection each): the last identity
        #: and the values of ``_ident_names`` it was given for
        self._ident_memo = threading.local()
        #: the API versions ``check_version`` accepted within this authorizer's bounds
        self._versions_ok: set[str] = set()

    # -- protocol entry points ------------------------------------------------

    def authz_request(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        if payload.get("RequestMethod") == "GET":
            out = self._lean_read(payload, t0)
            if out is not None:
                return out
        rid = _request_id(payload)
        who: dict[str, str] = {}
        req = None
        plan = None
        try:
            req = self._parse(payload)
            if req.method in ("GET", "HEAD") and req.path == "/_ping":
                # Anyone may ping: the answer is "OK" and the API version.
                # Clients negotiate the version with it; a refused ping makes
                # the docker CLI fall back to API 1.24 and show "version too
                # old" instead of the real refusal of the next request.
                result, reason = allow(), "ping"
            else:
                ident = self._identity(req.headers.lowered(), req.headers)
                who = {"tenant": ident.project_id, "user": ident.user_name}
                if ident.is_admin:
                    result, reason = allow(), "admin"
                else:
                    plan = self._decide(req, ident, payload)
                    self._remember_admission(plan, ident, payload)
                    result, reason = allow(), "ok"
        except FdcsError as e:
            result, reason = deny(str(e)), e.reason
        except Exception:  # an internal fault must never become an allow
            log.exception("internal error deciding request %s", rid)
            result, reason = deny(f"internal error in the authorization plugin (request {rid})"), "internal"
        audit("request", rid, payload, req, who, plan.resource if plan else "", result, reason, t0)
        return result

    def authz_response(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        rid = _request_id(payload)
        status = payload.get("ResponseStatusCode") or 0
        if payload.get("RequestMethod") not in RECORDING_METHODS:
            return allow()  # nothing was created or removed
        who: dict[str, str] = {}
        req = None
        try:
            req = self._parse(payload)
            ep, params = endpoints.match_params(req.method, req.path)
            if ep is None or ep.action not in _RECORDING:
                return allow()
            ident = self._response_identity(req, payload)
            who = {"tenant": ident.project_id, "user": ident.user_name}
            if ident.is_admin:
                return allow()  # administrators' resources are adopted by the reconciler
            plan = rules.plan(req, ep, params, ident.project_id, self.policy)
            fp = self._fingerprint(ident.project_id, payload) if self.quota and plan.charge else None
            if status not in (200, 201, 204):
                self._release(plan)  # the create or rename failed: free its name
                if fp:
                    self.quota.settle(fp, ok=False)  # and its quota units
                return allow()
            if ep.action == "scoped":
                if req.path.endswith("/prune"):
                    self._record_prune(req.path, payload)
                return allow()
            if plan.record is None:
                if fp:  # an update: its new size becomes the charge
                    self.quota.settle(fp, ok=True, vec=plan.charge[1])
                return allow()
            created = self._record(plan.record, ident.project_id, payload, status)
            if fp:
                self._settle_create(fp, plan, created)
            result, reason = allow(), "recorded"
        except FdcsError as e:
            msg = f"the request succeeded but its ownership could not be recorded ({e}); it will be adopted from its labels"
            result, reason = deny(msg), e.reason
        except Exception:
            log.exception("internal error recording response %s", rid)
            result, reason = deny(f"the request succeeded but the authorization plugin failed to record it (request {rid})"), "internal"
        audit("response", rid, payload, req, who, "", result, reason, t0)
        return result

    # -- the lean lane of the commonest reads -------------------------------------------

    def _lean_read(self, payload: Mapping[str, Any], t0: float) -> dict[str, Any] | None:
        """:meth:`authz_request` of a ``GET`` that is a container inspect or
        list (``_LEAN_TARGET``), decided from the payload without the
        canonical :class:`Request`, the endpoint table, the :class:`Plan`:
        the same answer, audit line and metrics as the general path (a
        differential test holds them equal, ``tests/unit/test_lean_read.py``).

        None -- before anything is counted or asked -- for any payload it
        does not take: a body, another target, a header map that is not
        plain strings or repeats a name in another case, a ``Content-Type``
        or ``Content-Length`` (the general path checks them), a version or
        query the general path refuses.  Then the general path decides."""
        if payload.get("RequestBody"):
            return None
        uri = payload.get("RequestUri")
        if type(uri) is not str:
            return None
        m = _LEAN_TARGET.fullmatch(uri)
        if m is None:
            return None
        raw = payload.get("RequestHeaders")
        if type(raw) is not dict:
            return None
        lowered = {}
        for k, v in raw.items():
            if type(k) is not str or type(v) is not str:
                return None
            lowered[k.lower()] = v
        if len(lowered) != len(raw) or "content-type" in lowered or "content-length" in lowered:
            return None
        version, ref, raw_query = m.groups()
        try:
            if version not in self._versions_ok:
                check_version(version, self.min_version, self.max_version)
                self._versions_ok.add(version)  # (pure, for this authorizer's bounds)
            query = parse_query(raw_query or "")
        except BadRequest:
            return None
        # what _request_id reads (one value per lower-case name: checked above)
        rid = lowered.get("x-request-id")
        if not _sane_request_id(rid):
            rid = logfmt.new_request_id()
        path = _LIST_PATH if ref is None else uri[m.end(1):]
        tenant = user = resource = ""
        try:
            ident = self._identity(lowered)
            tenant, user = ident.project_id, ident.user_name
            if ident.is_admin:
                result, reason = allow(), "admin"
            else:
                self._check_suspended(tenant)
                _check_role(ident, "GET", path)
                if ref is None:
                    rules.tenant_filter_values([v for k, v in query if k == "filters"], tenant)
                else:
                    cheap = rules.cheap_ref(tenant, ref)
                    if cheap is None:
                        _check_owned(self.store.resolve([("container", ref, True)])[0], "container", ref, tenant)
                    elif cheap is False:
                        raise NotFound(endpoints.MISSING["container"].format(ref=ref))
                    resource = ref
                result, reason = allow(), "ok"
        except FdcsError as e:  # (``resource`` is set only once the read is allowed, as the plan's)
            result, reason = deny(str(e)), e.reason
        except Exception:  # an internal fault must never become an allow
            log.exception("internal error deciding request %s", rid)
            result, reason = deny(f"internal error in the authorization plugin (request {rid})"), "internal"
        _audit.record("request", rid, "GET", path, tenant, user, resource, result, reason, t0)
        return result

    def _identity(self, lowered: dict[str, str], headers: Headers | None = None):
        """``identity.authenticate(headers)`` of the request headers by
        lower-case name ``lowered`` (``headers``: the same as a
        :class:`Headers`, when the caller has one); the serving thread's last
        identity again, without reading and hashing the token, while the
        identity service says it still holds (``still_cached``: the same
        cache entry, its token unexpired, counted as the hit it is) for the
        very same values of the headers it depends on.  Nothing else is
        remembered: a refusal, a break-glass identity (never cached) and
        every change of those headers go to ``authenticate``."""
        names = self._ident_names
        if names is not None:
            key = tuple(map(lowered.get, names))
            last = getattr(self._ident_memo, "last", None)
            if last is not None and last[0] == key and self.identity.still_cached(last[1]):
                return last[1]
        ident = self.identity.authenticate(headers if headers is not None else Headers.of_lowered(lowered))
        if names is not None:
            self._ident_memo.last = (key, ident)
        return ident

    # -- the decision -----------------------------------------------------------

    def _parse(self, payload: Mapping[str, Any]) -> Request:
        return parse(str(payload.get("RequestMethod") or ""), str(payload.get("RequestUri") or ""),
                     payload.get("RequestHeaders") or {}, payload.get("RequestBody"),
                     self.min_version, self.max_version)

    def _check_suspended(self, tenant: str) -> None:
        expires, suspended = self._suspended
        now = time.monotonic()
        if now >= expires:
            suspended = self.store.suspended()
            self._suspended = (now + SUSPENSION_TTL, suspended)
        if tenant in suspended:
            reason = suspended[tenant].get("reason") or "no reason given"
            raise Suspended(f"project {tenant} is suspended by the site administrators ({reason}); "
                            "contact them to have it resumed")

    def _decide(self, req: Request, ident, fp_source: Mapping[str, Any]) -> rules.Plan:
        self._check_suspended(ident.project_id)
        _check_role(ident, req.method, req.path)
        ep, params = endpoints.match_params(req.method, req.path)
        if ep is None:
            raise Unsupported(f"{req.method} {req.path} is not supported by this service")
        plan = rules.plan(req, ep, params, ident.project_id, self.policy)
        self._check_needs(plan.needs, ident.project_id)
        fp = self._admit(plan, ident.project_id, fp_source)
        try:
            self._reserve(plan)
        except Exception:
            if fp:
                self.quota.settle(fp, ok=False)  # the request will not run: give the units back
            raise
        return plan

    # -- the response hook's identity ---------------------------------------------------

    def _remember_admission(self, plan: rules.Plan, ident, payload: Mapping[str, Any]) -> None:
        """A request whose response will be recorded: remember who it was
        admitted for, so that the response hook can record it even when
        Keystone cannot answer then (another worker, a token not in its cache)."""
        if plan.record is None and plan.charge is None:
            return
        key = _admission_key(payload)
        if key:
            self.store.remember_admission(key, ident.project_id, ident.user_name)

    def _response_identity(self, req: Request, payload: Mapping[str, Any]):
        """The caller of a request being answered: the identity service, or,
        when it is unavailable, what the request hook admitted this very
        request for (same token, method, URI and body, within 120 s)."""
        try:
            return self.identity.authenticate(req.headers)
        except IdentityUnavailable:
            key = _admission_key(payload)
            admitted = self.store.admission(key) if key else None
            if admitted is None:
                raise
            return _Admitted(*admitted)

    # -- quotas ------------------------------------------------------------------------

    def _fingerprint(self, tenant: str, payload: Mapping[str, Any]) -> str:
        return _payload_fingerprint(tenant, payload)

    def _update_target(self, plan: rules.Plan) -> str:
        ref = plan.needs[0].ref
        res = self.store.resolve([("container", ref, True)])[0]
        if res.target is None:
            if res.how == "none" and not res.complete:
                raise Retry("ownership records are being rebuilt after a restart of the ownership store; "
                            "retry in a moment")
            raise NotFound(endpoints.MISSING["container"].format(ref=ref))
        return res.target

    def _admit(self, plan: rules.Plan, tenant: str, payload: Mapping[str, Any]) -> str | None:
        """Hold the plan's quota charge (or raise QuotaExceeded); returns the
        request's fingerprint when a charge is held."""
        if self.quota is None or plan.charge is None:
            return None
        fp = self._fingerprint(tenant, payload)
        if plan.charge[0] == "update":
            target = self._update_target(plan)
            vec = plan.charge[1]
            if self.policy.quota.flavor_required and (vec[1] != KEEP or vec[2] != KEEP):
                held = self.quota.charge(f"container/{target}")
                old = held[2] if held else (1, 0, 0, 0, 0)
                self.policy.quota.check_update_flavor(vec[1] if vec[1] != KEEP else old[1],
                                                      vec[2] if vec[2] != KEEP else old[2])
            self.quota.admit(tenant, fp, vec, update_of=target)
        else:
            _, vec, volumes = plan.charge
            self.quota.admit(tenant, fp, vec, volumes=volumes)
        return fp

    def _reserved_name(self, plan: rules.Plan) -> str | None:
        if not self.cluster_names or plan.record is None:
            return None
        what, spec = plan.record
        return spec.get("name") if what in ("container", "rename") else None

    def _reserve(self, plan: rules.Plan) -> None:
        """Container names are unique across hosts: reserve the name now,
        atomically, so that two hosts racing for it cannot both win."""
        name = self._reserved_name(plan)
        if name:
            ok, other = self.store.reserve_name(name)
            if not ok:
                raise Denied(f'Conflict. The container name "/{name}" is already in use on host {other}; '
                             "remove it there first (container names are unique across hosts)")

    def _release(self, plan: rules.Plan) -> None:
        name = self._reserved_name(plan)
        if name:
            self.store.release_name(name)

    def _check_needs(self, needs: list[rules.Need], tenant: str) -> None:
        pending = []
        for need in needs:
            cheap = rules.cheap_need(tenant, need)
            if cheap is False:
                raise NotFound(endpoints.MISSING[need.kind].format(ref=need.ref))
            if cheap is None:
                pending.append(need)
        if not pending:
            return
        results = self.store.resolve([(n.kind, n.ref, n.kind in ("container", "network")) for n in pending])
        for need, res in zip(pending, results):
            _check_owned(res, need.kind, need.ref, tenant)

    # -- recording ------------------------------------------------------------

    def _target(self, kind: str, ref: str) -> str | None:
        res = self.store.resolve([(kind, ref, kind in ("container", "network"))])[0]
        return res.target

    def _settle_create(self, fp: str, plan: rules.Plan, created: str | None) -> None:
        """A create succeeded: its pending charge becomes the resource's."""
        what = plan.record[0]
        if created is None:  # nothing of the tenant's was made (e.g. an existing volume of the same name)
            self.quota.settle(fp, ok=False)
        elif what == "container":
            _, vec, volumes = plan.charge
            self.quota.settle(fp, ok=True, final=f"container/{created}", vec=(1, vec[1], vec[2], 0, 0),
                              volumes=volumes)
        elif what == "volume":
            self.quota.settle(fp, ok=True, final=f"volume/{created}", vec=(0, 0, 0, 1, 0))
        elif what == "network":
            self.quota.settle(fp, ok=True, final=f"network/{created}", vec=(0, 0, 0, 0, 1))

    def _record(self, record: tuple[str, dict[str, Any]], tenant: str, payload: Mapping[str, Any],
                status: int) -> str | None:
        """Record what a successful request made or changed; returns the id
        (volume: name) of a resource it created for the tenant."""
        what, spec = record
        body = _response_json(payload) if status == 201 else {}
        if what == "container" and status == 201:
            cid = _id(body)
            self.store.add("container", cid, tenant, spec["name"] or "")
            for volume in spec["volumes"]:
                self.store.add_volume_if_new(volume, tenant)
            return cid
        elif what == "network" and status == 201:
            nid = _id(body)
            self.store.add("network", nid, tenant, spec["name"])
            return nid
        elif what == "volume" and status == 201:
            labels = body.get("Labels") or {}
            if body.get("Name") == spec["name"] and labels.get(TENANT_LABEL) == tenant:
                self.store.add_volume_if_new(spec["name"], tenant)
                return spec["name"]
        elif what == "exec" and status == 201:
            container = self._target("container", spec["container"]) or spec["container"]
            self.store.add_exec(_id(body), tenant, container)
        elif what == "rename" and status == 204:
            target = self._target("container", spec["ref"])
            if target:
                self.store.rename("container", target, spec["name"])
        elif what == "remove" and status == 204:
            kind = spec["kind"]
            target = spec["ref"] if kind == "volume" else self._target(kind, spec["ref"])
            if target:
                self.store.remove(kind, target)
        return None

    def _record_prune(self, path: str, payload: Mapping[str, Any]) -> None:
        body = _response_json(payload)
        if path == "/containers/prune":
            for cid in body.get("ContainersDeleted") or []:
                self.store.remove("container", cid)
        elif path == "/volumes/prune":
            for name in body.get("VolumesDeleted") or []:
                self.store.remove("volume", name)
        elif path == "/networks/prune":
            for name in body.get("NetworksDeleted") or []:
                target = self._target("network", name)
                if target:
                    self.store.remove("network", target)


def _check_role(ident, method: str, path: str) -> None:
    """Forbidden unless ``ident``'s role allows ``method`` on ``path``."""
    if not ident.may(method, path):
        # a GET can write too (the websocket attach types into the container)
        what = method if method not in ("GET", "HEAD") else f"{method} {path}, which writes to the container,"
        raise Forbidden(f"your role on project {ident.project_id} allows reading only "
                        f"({what} needs the member role)")


def _check_owned(res, kind: str, ref: str, tenant: str) -> None:
    """A reference the store resolved to ``res`` must be ``tenant``'s."""
    if res.how == "none" and not res.complete:
        raise Retry("ownership records are being rebuilt after a restart of the ownership store; "
                    "retry in a moment")
    if not res.owned_by(tenant):
        raise NotFound(endpoints.MISSING[kind].format(ref=ref))


@dataclass(frozen=True)
class _Admitted:
    """The identity the request hook admitted a request for (tenant only)."""

    project_id: str
    user_name: str
    is_admin: bool = False


def _admission_key(payload: Mapping[str, Any]) -> str | None:
    """Who sent this exact request: the token and tenant claim (hashed,
    never stored), method, URI and body."""
    import hashlib

    token = claim = ""
    for k, v in (payload.get("RequestHeaders") or {}).items():
        if k.lower() == "x-auth-token":
            token = str(v)
        elif k.lower() == "x-auth-tenantid":
            claim = str(v)
    if not token:
        return None
    return _payload_fingerprint(hashlib.sha256(f"{token}\0{claim}".encode()).hexdigest(), payload)


def _payload_fingerprint(who: str, payload: Mapping[str, Any]) -> str:
    """:func:`quota.fingerprint` of ``who`` and the payload's method, URI and body."""
    import base64

    body = payload.get("RequestBody")
    raw = base64.b64decode(body) if isinstance(body, str) and body else b""
    return fingerprint(who, str(payload.get("RequestMethod") or ""), str(payload.get("RequestUri") or ""), raw)


def _sane_request_id(v) -> bool:
    """A client's ``X-Request-Id`` is used as it is: printable, 1 -- 64 characters."""
    return isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable()


def _request_id(payload: Mapping[str, Any]) -> str:
    headers = payload.get("RequestHeaders")
    if isinstance(headers, Mapping):  # else refused by the parse, with this id (never raised here)
        for k, v in headers.items():
            if isinstance(k, str) and k.lower() == "x-request-id" and _sane_request_id(v):
                return v
    return logfmt.new_request_id()


def _response_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    import base64
    raw = payload.get("ResponseBody")
    if not raw:
        raise BadRequest("the engine sent no response body to record")
    try:
        body = json.loads(base64.b64decode(raw))
    except ValueError as e:
        raise BadRequest("the engine's response body is not JSON") from e
    if not isinstance(body, dict):
        raise BadRequest("the engine's response body is not an object")
    return body


def _id(body: dict[str, Any]) -> str:
    id_ = body.get("Id") or body.get("ID")
    if not isinstance(id_, str) or not id_:
        raise BadRequest("the engine's response names no Id")
    return id_


__all__ = ["Authorizer", "allow", "deny", "StoreUnavailable"]
