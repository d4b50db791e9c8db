"""The endpoint table of API-POLICY.md, as data.

Each row names the method, the path pattern (after the version prefix, on the
decoded path), the tenant decision, the kind of resource the path names, and
what body the endpoint takes.  :func:`match` returns the first row that
matches, in the engine's own registration order where two patterns overlap
(``/containers/json`` before ``/containers/{name}/json``).  A request no row
matches is denied: "<METHOD> <path> is not supported by this service".

Path parameters match one segment (``[^/]+``) even where the engine's route
says ``{name:.*}``: a reference holding ``/`` resolves to nothing a tenant
may own (link names ``/parent/alias``), so such paths fall through to the
deny.  Image names, which hold ``/``, are matched with ``.+`` and decided
without a lookup.

Decisions (the ``action`` column):

``any``       any authenticated tenant
``scoped``    the ``filters`` query must carry the caller's tenant label
``own``       the path reference must resolve to the caller's resource
``admin``     administrators only
other names   a rule function in :mod:`rules` (create, update, exec, ...)

Bodies (the ``body`` column): ``none`` (the request must carry none),
``json`` (a JSON body is required and decoded by the rule), ``raw`` (a
stream the engine does not decode as JSON: archive upload, image load),
``any`` (admin-only endpoints; not read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    methods: frozenset[str]
    pattern: re.Pattern
    action: str
    kind: str | None = None  # container, exec, network, volume
    body: str = "none"
    #: the engine's wording for a missing resource of this kind
    name: str = ""

    def __str__(self) -> str:  # for audit lines
        return f"{'|'.join(sorted(self.methods))} {self.pattern.pattern}"


_REF = r"(?P<ref>[^/]+)"
_IMG = r"(?P<image>.+)"


def _row(methods: str, path: str, action: str, kind: str | None = None, body: str = "none") -> Endpoint:
    pattern = re.compile("^" + path.replace("{ref}", _REF).replace("{image}", _IMG) + "$")
    return Endpoint(frozenset(methods.split("|")), pattern, action, kind, body)


C, X, N, V = "container", "exec", "network", "volume"

TABLE: tuple[Endpoint, ...] = (
    # system
    _row("GET|HEAD", "/_ping", "any"),
    _row("GET", "/version", "any"),
    _row("GET", "/info", "any"),
    _row("GET", "/events", "scoped"),
    _row("GET", "/system/df", "admin"),
    _row("POST", "/session", "admin", body="any"),
    _row("POST", "/grpc", "admin", body="any"),
    _row("POST", "/auth", "registry_login", body="json"),
    # containers (engine order: fixed paths before {name} paths)
    _row("GET", "/containers/json", "scoped"),
    _row("POST", "/containers/create", "container_create", body="json"),
    _row("POST", "/containers/prune", "scoped"),
    _row("GET", "/containers/{ref}/(?:json|top|logs|changes|export|stats|attach/ws)", "own", C),
    _row("GET|HEAD", "/containers/{ref}/archive", "own", C),
    _row("PUT", "/containers/{ref}/archive", "own", C, body="raw"),
    _row("POST", "/containers/{ref}/(?:start|stop|restart|kill|pause|unpause|wait|resize|attach)", "own", C),
    _row("DELETE", "/containers/{ref}", "own", C),
    _row("POST", "/containers/{ref}/update", "container_update", C, body="json"),
    _row("POST", "/containers/{ref}/rename", "container_rename", C),
    _row("POST", "/containers/{ref}/exec", "exec_create", C, body="json"),
    # execs
    _row("POST", "/exec/{ref}/start", "exec_start", X, body="json"),
    _row("POST", "/exec/{ref}/resize", "own", X),
    _row("GET", "/exec/{ref}/json", "own", X),
    # images: a shared read-only catalogue
    _row("GET", "/images/json", "any"),
    _row("GET", "/images/search", "registry_search"),
    _row("POST", "/images/create", "image_create", body="any"),
    _row("GET", "/images/get", "admin"),
    _row("POST", "/images/load", "admin", body="any"),
    _row("POST", "/images/prune", "admin"),
    _row("GET", "/images/{image}/(?:json|history)", "any"),
    _row("GET", "/images/{image}/get", "admin"),
    _row("POST", "/images/{image}/(?:tag|push)", "admin"),
    _row("DELETE", "/images/{image}", "admin"),
    _row("GET", "/distribution/{image}/json", "registry_distribution"),
    _row("POST", "/commit", "admin", body="any"),
    _row("POST", "/build", "admin", body="any"),
    _row("POST", "/build/(?:prune|cancel)", "admin"),
    # networks
    _row("GET", "/networks", "scoped"),
    _row("POST", "/networks/create", "network_create", body="json"),
    _row("POST", "/networks/prune", "scoped"),
    _row("GET|DELETE", "/networks/{ref}", "own", N),
    _row("POST", "/networks/{ref}/connect", "network_connect", N, body="json"),
    _row("POST", "/networks/{ref}/disconnect", "network_disconnect", N, body="json"),
    # volumes
    _row("GET", "/volumes", "scoped"),
    _row("POST", "/volumes/create", "volume_create", body="json"),
    _row("POST", "/volumes/prune", "scoped"),
    _row("GET|DELETE", "/volumes/{ref}", "own", V),
    _row("PUT", "/volumes/{ref}", "admin", body="any"),
    # cluster and plugins: administrators only until they are scoped
    _row("GET|POST|DELETE", "/(?:swarm|nodes|services|tasks|secrets|configs|plugins)(?:/.*)?", "admin", body="any"),
)

MISSING = {C: "No such container: {ref}", X: "No such exec instance: {ref}",
           N: "network {ref} not found", V: "get {ref}: no such volume"}


_FIRST = re.compile(r"\^/(?:([A-Za-z0-9_]+)|\(\?:([A-Za-z0-9_|]+)\))(?:/|\(\?:/|\$)")


def _first_segments(ep: Endpoint) -> tuple[str, ...] | None:
    """The literal first path segments a row's pattern can match (one, or
    the words of a leading ``(?:a|b)``); None when the pattern starts any
    other way (then the row is tried for every path)."""
    m = _FIRST.match(ep.pattern.pattern)
    if m is None:
        return None
    return (m.group(1),) if m.group(1) else tuple(m.group(2).split("|"))


def _index(table: tuple[Endpoint, ...]) -> dict[tuple[str, str], tuple[Endpoint, ...]] | None:
    """(method, first path segment) -> the rows that may match, in table
    order; None when a row's first segment is not a literal (then
    :func:`match` scans the whole table)."""
    firsts = [_first_segments(ep) for ep in table]
    if any(f is None for f in firsts):
        return None
    index: dict[tuple[str, str], list[Endpoint]] = {}
    for ep, segs in zip(table, firsts):
        for method in ep.methods:
            for seg in segs:
                index.setdefault((method, seg), []).append(ep)
    return {k: tuple(v) for k, v in index.items()}


#: every path a row matches starts with one of the row's first segments, so
#: only those rows can match it: a request tries one or a few rows, not the
#: dozen before its own (a test holds :func:`match` equal to the scan)
_INDEX = _index(TABLE)


def _scan(method: str, path: str) -> Endpoint | None:
    for ep in TABLE:
        if method in ep.methods and ep.pattern.match(path):
            return ep
    return None


def match(method: str, path: str) -> Endpoint | None:
    """The first row for ``method`` and the canonical ``path``, or None."""
    return match_params(method, path)[0]


def match_params(method: str, path: str) -> tuple[Endpoint | None, dict[str, str]]:
    """:func:`match` and :func:`params` of its row with one regex match:
    ``(row, params)``, ``(None, {})`` when no row matches."""
    if _INDEX is None:
        ep = _scan(method, path)
        return (ep, params(ep, path)) if ep is not None else (None, {})
    for ep in _INDEX.get((method, path[1:].partition("/")[0]), ()):
        m = ep.pattern.match(path)
        if m:
            return ep, m.groupdict()
    return None, {}


def params(ep: Endpoint, path: str) -> dict[str, str]:
    m = ep.pattern.match(path)
    return m.groupdict() if m else {}
