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
    # the metrics count every decision, whatever the log level
    metrics.decision(hook, bool(result.get("Allow")), reason, time.perf_counter() - t0)
    logged = lines.enabled()
    if not logged and not audit_stream.active():
        return
    line = {
        "ts": round(time.time(), 3),
        "hook": hook,
        "rid": rid,
        "tenant": who.get("tenant", ""),
        "user": who.get("user", ""),
        "method": req.method if req else str(payload.get("RequestMethod", ""))[:10],
        "path": req.path if req else str(payload.get("RequestUri", ""))[:300],
        "resource": resource,
        "allow": bool(result.get("Allow")),
        "reason": reason,
        "us": int((time.perf_counter() - t0) * 1e6),
    }
    if not result.get("Allow"):
        line["msg"] = result.get("Msg", "")
    text = orjson.dumps(line).decode()
    audit_stream.submit(text)
    if logged:
        lines.write(text)
