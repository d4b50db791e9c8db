"""The audit trail: one JSON line per decision on the ``fdcs.audit`` logger
(in ``fdcs-authz``, written straight to stderr in the log format:
``logfmt.DirectLines``).

Fields: ``ts`` (epoch seconds), ``hook`` (request or response), ``rid``
(request id: the client's ``X-Request-Id`` when sane, else generated),
``tenant``, ``user``, ``method``, ``path`` (canonical when the request could
be read, else the raw target cut to 300 characters), ``resource``,
``allow``, ``reason`` (a short code: ok, admin, policy, not-owned,
authentication, role, unsupported, bad-request, redis-unavailable, ...),
``msg`` (the refusal as the tenant sees it) and ``us`` (microseconds spent).

Never a token, a password or a body: the line is built only from the fields
above.  Each decision also counts in the metrics (``metrics.decision``:
``fdcs_authz_decisions_total{hook,result,reason}`` and the hook latency),
and each line is copied to the Redis stream ``fdcs:audit`` when the plugin
installed one (``audit_stream.py``; never blocks the decision).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import orjson

from . import audit_stream, logfmt, metrics

#: the audit lines; ``fdcs-authz`` sends them straight to stderr (``lines.to_fd``)
lines = logfmt.DirectLines("fdcs.audit")


def audit(hook: str, rid: str, payload: Mapping[str, Any], req, who: Mapping[str, str], resource: str,
          result: Mapping[str, Any], reason: str, t0: float) -> None:
    """One decision of the general path: :func:`record` with the method and
    path of the canonical request ``req`` (None: it could not be read, the
    payload's raw fields, cut)."""
    if req is not None:
        record(hook, rid, req.method, req.path, who.get("tenant", ""), who.get("user", ""), resource,
               result, reason, t0)
    else:
        record(hook, rid, str(payload.get("RequestMethod", ""))[:10], str(payload.get("RequestUri", ""))[:300],
               who.get("tenant", ""), who.get("user", ""), resource, result, reason, t0)


def record(hook: str, rid: str, method: str, path: str, tenant: str, user: str, resource: str,
           result: Mapping[str, Any], reason: str, t0: float) -> None:
    """Count one decision and write its line (the module doc's fields)."""
    allowed = bool(result.get("Allow"))
    # the metrics count every decision, whatever the log level
    metrics.decision(hook, allowed, reason, time.perf_counter() - t0)
    logged = lines.enabled()
    if not logged and not audit_stream.active():
        return
    line = {
        "ts": round(time.time(), 3),
        "hook": hook,
        "rid": rid,
        "tenant": tenant,
        "user": user,
        "method": method,
        "path": path,
        "resource": resource,
        "allow": allowed,
        "reason": reason,
        "us": int((time.perf_counter() - t0) * 1e6),
    }
    if not allowed:
        line["msg"] = result.get("Msg", "")
    text = orjson.dumps(line).decode()
    audit_stream.submit(text)
    if logged:
        lines.write(text)
