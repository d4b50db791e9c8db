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
4. the role: reader-only users may GET and HEAD only;
5. the endpoint table (unmatched: "not supported");
6. the endpoint's rule (bodies, names, labels, limits);
7. ownership of every reference, in one Redis round trip.

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
import time
import uuid
from typing import Any, Mapping

from . import endpoints, rules
from .audit import audit
from .config import Config
from .errors import BadRequest, Denied, FdcsError, Forbidden, NotFound, Retry, StoreUnavailable, Unsupported
from .ownership import Store
from .request import Request, parse
from .scoping import TENANT_LABEL

log = logging.getLogger(__name__)

_RECORDING = frozenset({"container_create", "container_rename", "exec_create", "network_create",
                        "volume_create", "own", "scoped"})


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

    # -- protocol entry points ------------------------------------------------

    def authz_request(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        rid = _request_id(payload)
        who: dict[str, str] = {}
        req = None
        plan = None
        try:
            req = self._parse(payload)
            ident = self.identity.authenticate(req.headers)
            who = {"tenant": ident.project_id, "user": ident.user_name}
            if ident.is_admin:
                result, reason = allow(), "admin"
            else:
                plan = self._decide(req, ident)
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
        if payload.get("RequestMethod") not in ("POST", "DELETE"):
            return allow()  # nothing was created or removed
        who: dict[str, str] = {}
        req = None
        try:
            req = self._parse(payload)
            ep = endpoints.match(req.method, req.path)
            if ep is None or ep.action not in _RECORDING:
                return allow()
            ident = self.identity.authenticate(req.headers)
            who = {"tenant": ident.project_id, "user": ident.user_name}
            if ident.is_admin:
                return allow()  # administrators' resources are adopted by the reconciler
            plan = rules.plan(req, ep, endpoints.params(ep, req.path), ident.project_id, self.policy)
            if status not in (200, 201, 204):
                self._release(plan)  # the create or rename failed: free its name
                return allow()
            if ep.action == "scoped":
                if req.path.endswith("/prune"):
                    self._record_prune(req.path, payload)
                return allow()
            if plan.record is None:
                return allow()
            self._record(plan.record, ident.project_id, payload, status)
            result, reason = allow(), "recorded"
        except FdcsError as e:
            msg = f"the request succeeded but its ownership could not be recorded ({e}); it will be adopted from its labels"
            result, reason = deny(msg), e.reason
        except Exception:
            log.exception("internal error recording response %s", rid)
            result, reason = deny(f"the request succeeded but the authorization plugin failed to record it (request {rid})"), "internal"
        audit("response", rid, payload, req, who, "", result, reason, t0)
        return result

    # -- the decision -----------------------------------------------------------

    def _parse(self, payload: Mapping[str, Any]) -> Request:
        return parse(str(payload.get("RequestMethod") or ""), str(payload.get("RequestUri") or ""),
                     payload.get("RequestHeaders") or {}, payload.get("RequestBody"),
                     self.min_version, self.max_version)

    def _decide(self, req: Request, ident) -> rules.Plan:
        if not ident.may(req.method):
            raise Forbidden(f"your role on project {ident.project_id} allows reading only "
                            f"({req.method} needs the member role)")
        ep = endpoints.match(req.method, req.path)
        if ep is None:
            raise Unsupported(f"{req.method} {req.path} is not supported by this service")
        plan = rules.plan(req, ep, endpoints.params(ep, req.path), ident.project_id, self.policy)
        self._check_needs(plan.needs, ident.project_id)
        self._reserve(plan)
        return plan

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
            if res.how == "none" and not res.complete:
                raise Retry("ownership records are being rebuilt after a restart of the ownership store; "
                            "retry in a moment")
            if not res.owned_by(tenant):
                raise NotFound(endpoints.MISSING[need.kind].format(ref=need.ref))

    # -- recording ------------------------------------------------------------

    def _target(self, kind: str, ref: str) -> str | None:
        res = self.store.resolve([(kind, ref, kind in ("container", "network"))])[0]
        return res.target

    def _record(self, record: tuple[str, dict[str, Any]], tenant: str, payload: Mapping[str, Any], status: int) -> None:
        what, spec = record
        body = _response_json(payload) if status == 201 else {}
        if what == "container" and status == 201:
            self.store.add("container", _id(body), tenant, spec["name"] or "")
            for volume in spec["volumes"]:
                self.store.add_volume_if_new(volume, tenant)
        elif what == "network" and status == 201:
            self.store.add("network", _id(body), tenant, spec["name"])
        elif what == "volume" and status == 201:
            labels = body.get("Labels") or {}
            if body.get("Name") == spec["name"] and labels.get(TENANT_LABEL) == tenant:
                self.store.add_volume_if_new(spec["name"], tenant)
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


def _request_id(payload: Mapping[str, Any]) -> str:
    for k, v in (payload.get("RequestHeaders") or {}).items():
        if k.lower() == "x-request-id" and isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable():
            return v
    return uuid.uuid4().hex[:16]


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
