"""What fdcs-manage prints: plain tables for people, JSON for scripts.  Pure.

Every command returns an :class:`Out`: ``data`` (what ``--json`` prints,
one JSON document), ``text`` (the table or lines people read) and
``warnings`` (printed on stderr in both modes, each prefixed with
``fdcs-manage: warning:``).  ``failed`` makes the exit status 1 after the
output was printed (an operation that partly failed says what it did);
``streamed``: the command printed its lines itself (``audit``).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..quota import UNLIMITED, human


@dataclass
class Out:
    data: Any
    text: str
    warnings: list[str] = field(default_factory=list)
    failed: bool = False
    streamed: bool = False


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "(none)") -> str:
    """Left-aligned columns two spaces apart; ``empty`` when there are no rows."""
    rows = [["-" if v is None or v == "" else str(v) for v in r] for r in rows]
    if not rows:
        return empty
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def when(ts: float | None, now: float) -> str:
    """``2026-05-01 10:00:00 UTC (3m ago)``; ``-`` for None."""
    if not ts:
        return "-"
    stamp = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({ago(now - ts)})"


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def amount(metric: str, value: int | None) -> str:
    """A usage or limit as people write it (``-`` when unknown)."""
    if value is None:
        return "-"
    return human(metric, value)


def percent(used: int, limit: int) -> float | None:
    """``used`` of ``limit`` in percent; None for an unlimited metric."""
    if limit == UNLIMITED:
        return None
    if limit == 0:
        return 100.0 if used else 0.0
    return round(100.0 * used / limit, 1)


def short(id_: str) -> str:
    return id_[:12]
