"""``fdcs-manage audit``: the plugin's decisions, from the Redis stream.

The plugins copy their audit lines to the stream ``fdcs:audit``
(``authz_plugin/audit_stream.py``).  This reads the last ``-n`` lines
(``XREVRANGE``, paging back past other tenants' lines when ``--tenant``
filters), oldest first, then with ``--follow`` waits for new ones
(``XREAD BLOCK``) until interrupted.  People get one line per decision;
``--json`` prints JSON lines (the audit line plus the stream ``id``).
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Callable, Iterator

from ..audit_stream import FIELD, STREAM
from ._output import Out

PAGE = 500


def parse_entry(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One stream entry -> the audit line (a line that is not JSON is kept as ``msg``)."""
    try:
        line = json.loads(fields.get(FIELD, ""))
        if not isinstance(line, dict):
            raise ValueError
    except ValueError:
        line = {"msg": fields.get(FIELD, "")}
    return {"id": entry_id, **line}


def format_line(e: dict[str, Any]) -> str:
    """``2026-05-01 10:00:00.123 request  tenant user POST /containers/create ALLOW ok``."""
    ts = e.get("ts")
    stamp = (datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
             if isinstance(ts, (int, float)) else "-")
    parts = [stamp, f"{e.get('hook', '-'):<8}", e.get("tenant") or "(admin)", e.get("user") or "-",
             e.get("method") or "-", e.get("path") or "-", "ALLOW" if e.get("allow") else "DENY",
             e.get("reason") or "-"]
    if e.get("resource"):
        parts.insert(6, e["resource"])
    line = " ".join(str(p) for p in parts)
    if e.get("msg") and not e.get("allow"):
        line += f": {e['msg']}"
    return line


def last(redis, n: int, tenant: str | None) -> list[dict[str, Any]]:
    """The last ``n`` entries (of ``tenant`` only, if given), oldest first."""
    out: list[dict[str, Any]] = []
    top = "+"
    while len(out) < n:
        page = redis.xrevrange(STREAM, max=top, min="-", count=PAGE)
        for eid, fields in page:
            e = parse_entry(eid, fields)
            if tenant is None or e.get("tenant") == tenant:
                out.append(e)
                if len(out) == n:
                    break
        if len(page) < PAGE:
            break
        top = "(" + page[-1][0]
    return list(reversed(out))


def follow(redis, after: str, tenant: str | None, block_ms: int) -> Iterator[dict[str, Any]]:
    """New entries after id ``after``, forever (the caller stops it)."""
    while True:
        got = redis.xread({STREAM: after}, block=block_ms, count=PAGE)
        for _, entries in got or []:
            for eid, fields in entries:
                after = eid
                e = parse_entry(eid, fields)
                if tenant is None or e.get("tenant") == tenant:
                    yield e


def cmd_audit(site, args) -> Out:
    tenant = site.tenant(args.tenant).id if args.tenant else None
    emit: Callable[[str], None] = site.emit
    render = (lambda e: json.dumps(e, separators=(",", ":"))) if args.json else format_line
    entries = site.call(last, site.redis, args.n, tenant)
    for e in entries:
        emit(render(e))
    warnings = []
    if not entries and not args.follow:
        if not site.call(site.redis.exists, STREAM):
            warnings.append("the audit stream fdcs:audit is empty: the plugins write it when "
                            "plugin.audit_stream_maxlen is above 0")
    if args.follow:
        after = site.call(lambda: (site.redis.xrevrange(STREAM, count=1) or [("0-0", {})])[0][0])
        # block less than the socket timeout, or the client takes the wait for a dead server
        block = max(100, int(site.cfg["redis.timeout"] * 500))
        it = follow(site.redis, after, tenant, block)
        while True:
            emit(render(site.call(next, it)))
    return Out(None, "", warnings, streamed=True)
