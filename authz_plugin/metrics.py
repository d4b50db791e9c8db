"""Prometheus metrics of the three FDCS daemons, defined in one place.

Each daemon serves its metrics over plain HTTP on its own TCP listener
(``plugin.metrics_listen``, ``scoper.metrics_listen``,
``reconciler.metrics_listen``; ``host:port``, empty = no listener), never on
the plugin's unix socket nor on the tenants' TLS port.  Any path answers
with the text exposition; ``/metrics`` is the documented one.

Metric sets (one per daemon; :func:`activate` makes one the process's):

* every daemon -- ``fdcs_identity_events_total{event}`` (the identity
  service's counters: ``hit``, ``miss``, ``negative_hit``, ``rejected``,
  ``unavailable``, ``rate_limited``, ``expired``, ``malformed``,
  ``admin_key``, ``admin_key_refused``) and ``fdcs_redis_errors_total``;
* ``plugin`` -- ``fdcs_authz_decisions_total{hook,result,reason}`` and
  ``fdcs_authz_hook_duration_seconds{hook}``; and, from the gunicorn master
  only (:class:`TenantCollector`, computed from Redis at scrape time):
  ``fdcs_store_up``, ``fdcs_store_scrape_duration_seconds``,
  ``fdcs_tenant_containers``, ``fdcs_tenant_containers_running``,
  ``fdcs_tenant_volumes``, ``fdcs_tenant_networks``,
  ``fdcs_tenant_memory_reserved_bytes``, ``fdcs_tenant_cpus_reserved``
  (all ``{tenant}``, the Keystone project id; cluster-wide);
* ``scoper`` -- ``fdcs_scoper_requests_total{method,endpoint,status}``,
  ``fdcs_scoper_request_duration_seconds{endpoint}`` (to the response
  head), ``fdcs_scoper_open_streams{kind}``, ``fdcs_scoper_connections_total``,
  ``fdcs_scoper_open_connections``, ``fdcs_scoper_received_bytes_total``,
  ``fdcs_scoper_sent_bytes_total``;
* ``reconciler`` -- ``fdcs_reconciler_passes_total{result}``,
  ``fdcs_reconciler_last_pass_timestamp_seconds``,
  ``fdcs_reconciler_last_pass_duration_seconds``,
  ``fdcs_reconciler_drift_total{change,kind}``, ``fdcs_reconciler_unowned``,
  ``fdcs_reconciler_events_total{type,result}``, and this host's
  ``fdcs_host_tenant_containers{tenant}`` and
  ``fdcs_host_tenant_containers_running{tenant}``.

The plugin runs under gunicorn with several worker processes: its metrics
use prometheus_client's multiprocess mode.  ``fdcs-authz`` calls
:func:`prepare_multiproc_dir` (which sets ``PROMETHEUS_MULTIPROC_DIR`` to a
fresh, private directory) before anything imports ``prometheus_client``,
which decides the mode once, at its import.  That is why importing *this*
module never imports ``prometheus_client``: every use of it is inside a
function.  The workers write their counters to files there; the master
serves them (:class:`MultiProcessCollector`) together with the per-tenant
gauges, which only the master computes, so each host exports them once.

Every hook called from the request paths (:func:`decision`,
:func:`identity_event`, :func:`redis_error`, :func:`scoper_request`...)
never raises: a metrics fault must not change a decision.

In multiprocess mode every counter step is a locked write to a memory-mapped
file, and a decision made three of them (the decision counter, the
histogram's sum and bucket) plus one for the identity cache hit: ~20 us of
every hook.  So there the plugin's :func:`decision` and
:func:`identity_event` only append to an in-process queue, and a daemon
thread per process (:class:`_Buffer`) applies what accumulated, summed, at
most :data:`FLUSH_LINGER` seconds after the first pending step -- and at
the process's exit.  A scrape therefore sees a decision within
:data:`FLUSH_LINGER` seconds (poll, do not expect it at once).  In
single-process mode (the reconciler, unit tests) a step is an in-memory
add, applied at once.  The scoper's per-request steps (:func:`scoper_request`
and its identity events: four locked updates per request, a twentieth of its
CPU on an inspect) are queued too, but with no thread: a collector
registered first applies the queue at every collection, so a scrape sees
every request that ended before it; between scrapes the request path
applies the queue once :data:`SCOPER_PENDING_MAX` steps wait.
"""

from __future__ import annotations

import bisect
import collections
import glob
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections import Counter as _Tally
from typing import Any, Callable, Iterable, Mapping

from .lingering import Lingering

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: the plugin's hooks take ~100 us (a cache hit) to ~1 s (Keystone, Redis timeouts)
HOOK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: the scoper's requests: a cached inspect (~1 ms) to a slow create or pull head
SCOPER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

IDENTITY_EVENTS = frozenset({"hit", "miss", "negative_hit", "rejected", "unavailable", "rate_limited",
                             "expired", "malformed", "admin_key", "admin_key_refused"})
#: the identity service's stats() names -> label values
_IDENTITY_NAMES = {"hits": "hit", "misses": "miss", "negative_hits": "negative_hit"}

#: first path segment (after /vX.Y) -> endpoint label; anything else is "other"
ENDPOINT_KINDS = frozenset({
    "containers", "images", "networks", "volumes", "exec", "build", "events", "info", "version",
    "_ping", "system", "auth", "plugins", "distribution", "swarm", "nodes", "services", "tasks",
    "secrets", "configs", "session", "commit", "grpc",
})
_VERSION_PREFIX = re.compile(r"^/v\d+(?:\.\d+)?(?=/)")
_REASON = re.compile(r"[a-z][a-z0-9_-]{0,31}")
#: seconds a buffered metric step waits at most before it is applied (see the module doc)
FLUSH_LINGER = 0.25
_READ_METHODS = frozenset({"GET", "HEAD"})
_WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})

#: Redis keys the per-tenant gauges are read from (ARCHITECTURE.md, "The Redis model")
OWN_KEY = "fdcs:own:{kind}"
USAGE_PREFIX = "fdcs:usage:"
RUNNING_PREFIX = "fdcs:running:"


# -- pure helpers -----------------------------------------------------------------------

def parse_listen(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9464"`` -> ``("127.0.0.1", 9464)``; ``"[::1]:9464"`` ->
    ``("::1", 9464)``; ``""`` -> None (disabled).  The host is required: a
    metrics listener on every address is a decision to write out
    (``0.0.0.0:9464``).  Raises ValueError naming the expected form."""
    s = (value or "").strip()
    if not s:
        return None
    host, sep, port = s.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "[]/ "):
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9464 (empty: no metrics listener), got {value!r}")
    return host, int(port)


def endpoint_kind(path: str) -> str:
    """The bounded ``endpoint`` label of a request path: its first segment
    after an optional ``/vX.Y`` (``containers``, ``images``, ``_ping``...),
    else ``other``."""
    p = _VERSION_PREFIX.sub("", path.split("?", 1)[0])
    seg = p[1:].split("/", 1)[0] if p.startswith("/") else ""
    return seg if seg in ENDPOINT_KINDS else "other"


def method_class(method: str) -> str:
    """``read`` (GET, HEAD), ``write`` (POST, PUT, DELETE, PATCH) or ``other``."""
    m = method.upper()
    return "read" if m in _READ_METHODS else "write" if m in _WRITE_METHODS else "other"


def status_class(status: int) -> str:
    """``2xx``... for an HTTP status; ``none`` when no answer was sent (0)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


def reason_label(reason: str) -> str:
    """An audit reason as a label value; anything unexpected is ``other``
    (labels must stay a small, known set)."""
    return reason if isinstance(reason, str) and _REASON.fullmatch(reason) else "other"


def drift(add: Iterable[tuple[str, str, str, str]], remove: Iterable[tuple[str, str]],
          add_execs: Iterable[Any], remove_execs: Iterable[Any],
          have: Mapping[str, Mapping[str, tuple[str, str]]], conflicts: int) -> dict[tuple[str, str], int]:
    """What one reconcile pass changed, as ``(change, kind) -> n``.

    ``add``/``remove``/``add_execs``/``remove_execs`` are the fields of a
    ``reconcile.Actions``; ``have`` the records read before the pass (kind
    -> id -> (tenant, name)).  An ``add`` of an id with no record is
    ``added``; of an id recorded for another tenant ``reowned``; of an id
    recorded for the same tenant under another name ``renamed``.  Conflicts
    (containers only) are ``("conflict", "container")``."""
    out: _Tally[tuple[str, str]] = _Tally()
    for kind, id_, tenant, _name in add:
        cur = (have.get(kind) or {}).get(id_)
        change = "added" if cur is None else "reowned" if cur[0] != tenant else "renamed"
        out[(change, kind)] += 1
    for kind, _id in remove:
        out[("removed", kind)] += 1
    out[("added", "exec")] += sum(1 for _ in add_execs)
    out[("removed", "exec")] += sum(1 for _ in remove_execs)
    out[("conflict", "container")] += conflicts
    return {k: v for k, v in out.items() if v}


def tenant_gauges(own: Mapping[str, Iterable[str]], usage: Mapping[str, Mapping[str, str]],
                  running: Iterable[Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """The per-tenant gauges from what Redis holds: metric name -> tenant ->
    value.

    ``own``: kind -> the values of ``fdcs:own:<kind>`` (one tenant per
    record); ``usage``: tenant -> the ``fdcs:usage:<tenant>`` hash (quotas;
    ``memory`` in bytes, ``cpus`` in nano-CPUs); ``running``: every host's
    ``fdcs:running:<host>`` hash (tenant -> count), summed.  A tenant with no
    usage hash has no reserved gauges; a value that is not a number is
    skipped."""
    out: dict[str, dict[str, float]] = {
        "fdcs_tenant_containers": {}, "fdcs_tenant_containers_running": {},
        "fdcs_tenant_volumes": {}, "fdcs_tenant_networks": {},
        "fdcs_tenant_memory_reserved_bytes": {}, "fdcs_tenant_cpus_reserved": {},
    }
    for kind, name in (("container", "fdcs_tenant_containers"), ("volume", "fdcs_tenant_volumes"),
                       ("network", "fdcs_tenant_networks")):
        for tenant, n in _Tally(own.get(kind) or ()).items():
            out[name][tenant] = float(n)
    # every tenant with a container somewhere has a running gauge (0 when none runs)
    runs = out["fdcs_tenant_containers_running"]
    for tenant in out["fdcs_tenant_containers"]:
        runs[tenant] = 0.0
    for host in running:
        for tenant, n in host.items():
            v = _number(n)
            if v is not None:
                runs[tenant] = runs.get(tenant, 0.0) + v
    for tenant, fields in usage.items():
        mem, cpus = _number(fields.get("memory")), _number(fields.get("cpus"))
        if mem is not None:
            out["fdcs_tenant_memory_reserved_bytes"][tenant] = mem
        if cpus is not None:
            out["fdcs_tenant_cpus_reserved"][tenant] = cpus / 1e9
    return out


def _number(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


# -- the metric sets -----------------------------------------------------------------------

class _Common:
    """The metrics every daemon has."""

    kind = "common"
    #: the plugin's :class:`_Buffer` in multiprocess mode, else None (steps applied at once)
    buffer: "_Buffer | None" = None

    def __init__(self, registry):
        from prometheus_client import Counter

        self.registry = registry
        self.identity = Counter("fdcs_identity_events", "Identity checks by outcome: cache hit, miss, "
                                "refusal, Keystone unavailable...", ["event"], registry=registry)
        # one child per event, made up front: labels() takes a lock and builds a key
        self.identity_children = {e: self.identity.labels(e) for e in IDENTITY_EVENTS}
        self.redis_errors = Counter("fdcs_redis_errors", "Redis operations that failed (the request was "
                                    "refused or retried)", registry=registry)


class PluginMetrics(_Common):
    kind = "plugin"

    def __init__(self, registry):
        from prometheus_client import Counter, Histogram

        super().__init__(registry)
        self.decisions = Counter("fdcs_authz_decisions", "Authorization decisions by hook, result and "
                                 "reason", ["hook", "result", "reason"], registry=registry)
        self.hook_seconds = Histogram("fdcs_authz_hook_duration_seconds", "Time the plugin took to decide "
                                      "one engine call", ["hook"], buckets=HOOK_BUCKETS, registry=registry)
        #: (is request hook, allow, reason) -> (decision counter, hook histogram) children
        self.children: dict[tuple[bool, bool, str], tuple] = {}


class ScoperMetrics(_Common):
    kind = "scoper"

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge, Histogram

        #: requests counted but not applied yet (see :func:`scoper_request`);
        #: the collector that applies them is registered first: a collection
        #: goes through the collectors in their order of registration
        self.pending: collections.deque = collections.deque()
        registry.register(_FlushFirst(self.apply_pending))
        super().__init__(registry)
        self.requests = Counter("fdcs_scoper_requests", "Requests by method class, endpoint and status class",
                                ["method", "endpoint", "status"], registry=registry)
        self.duration = Histogram("fdcs_scoper_request_duration_seconds", "Time from a request's head to "
                                  "the head of its answer", ["endpoint"], buckets=SCOPER_BUCKETS,
                                  registry=registry)
        self.streams = Gauge("fdcs_scoper_open_streams", "Answers being streamed now: hijack (attach, "
                             "exec), lines (events, logs, stats...), stream (other bodies)", ["kind"],
                             registry=registry)
        for kind in ("hijack", "lines", "stream"):
            self.streams.labels(kind)
        self.connections = Counter("fdcs_scoper_connections", "Client connections accepted",
                                   registry=registry)
        self.open_connections = Gauge("fdcs_scoper_open_connections", "Client connections open now",
                                      registry=registry)
        self.received = Counter("fdcs_scoper_received_bytes", "Request body bytes received from clients",
                                registry=registry)
        self.sent = Counter("fdcs_scoper_sent_bytes", "Response body bytes sent to clients",
                            registry=registry)
        #: label values -> child: ``labels()`` takes a lock and builds a key; the
        #: sets are small and bounded (method and status classes, ENDPOINT_KINDS)
        self.request_children: dict[tuple[str, ...], Any] = {}
        self.duration_children: dict[tuple[str, ...], Any] = {}

    def apply_pending(self) -> None:
        """Apply the pending request steps and identity events, summed per
        label set.  Safe from any thread at any time (each step is popped
        once; the metrics' own steps are thread-safe); never raises."""
        pending = self.pending
        if not pending:
            return
        requests: _Tally[tuple[str, str, str]] = _Tally()
        durations: dict[str, list[float]] = {}
        events: _Tally[str] = _Tally()
        received = sent = 0
        try:
            while True:
                item = pending.popleft()
                if type(item) is str:  # an identity event
                    events[item] += 1
                    continue
                method, path, status, head_seconds, rcv, snt = item
                endpoint = endpoint_kind(path)
                requests[(method_class(method), endpoint, status_class(status))] += 1
                if head_seconds is not None:
                    durations.setdefault(endpoint, []).append(max(0.0, head_seconds))
                received += rcv if rcv > 0 else 0
                sent += snt if snt > 0 else 0
        except IndexError:  # drained
            pass
        try:
            for key, n in requests.items():
                _child(self.request_children, self.requests, key).inc(n)
            for endpoint, seconds in durations.items():
                _observe_many(_child(self.duration_children, self.duration, (endpoint,)), seconds)
            for event, n in events.items():
                self.identity_children[event].inc(n)
            if received:
                self.received.inc(received)
            if sent:
                self.sent.inc(sent)
        except Exception:  # a metrics fault must not reach the request path
            log.debug("applying the scoper's request metrics failed", exc_info=True)


class _FlushFirst:
    """A collector with no metrics of its own, registered before the ones
    it feeds: every collection (a scrape, a test's read) first applies what
    is pending, so that a scrape never misses a request that ended before it."""

    def __init__(self, apply: Callable[[], None]):
        self._apply = apply

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self._apply()
        return []


class ReconcilerMetrics(_Common):
    kind = "reconciler"

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        super().__init__(registry)
        self.passes = Counter("fdcs_reconciler_passes", "Full reconcile passes by result", ["result"],
                              registry=registry)
        for result in ("ok", "error"):
            self.passes.labels(result)
        self.last_pass = Gauge("fdcs_reconciler_last_pass_timestamp_seconds", "End of the last complete "
                               "full pass (epoch seconds)", registry=registry)
        self.last_duration = Gauge("fdcs_reconciler_last_pass_duration_seconds", "Duration of the last "
                                   "complete full pass", registry=registry)
        self.drift = Counter("fdcs_reconciler_drift", "Records a full pass changed: change = added, "
                             "removed, reowned, renamed, conflict; kind = container, network, volume, exec",
                             ["change", "kind"], registry=registry)
        self.unowned = Gauge("fdcs_reconciler_unowned", "Resources without an owner at the last full pass "
                             "(administrators' only)", registry=registry)
        self.events = Counter("fdcs_reconciler_events", "Engine events handled, by type and result",
                              ["type", "result"], registry=registry)
        self.host_tenants = HostTenants()
        if registry is not None:
            registry.register(self.host_tenants)


_KINDS: dict[str, type[_Common]] = {"plugin": PluginMetrics, "scoper": ScoperMetrics,
                                    "reconciler": ReconcilerMetrics}
_lock = threading.Lock()
_active: _Common | None = None


def activate(kind: str, registry=None, buffered: bool | None = None) -> _Common:
    """Make the metric set of daemon ``kind`` (``plugin``, ``scoper``,
    ``reconciler``) this process's, registered in ``registry`` (default: a
    new private registry, the one to serve).  Idempotent for the same kind;
    activating another kind replaces the set (tests).  ``buffered``: the
    plugin's decisions and identity events go through a :class:`_Buffer`
    (default: in multiprocess mode only; see the module doc)."""
    global _active
    with _lock:
        if (_active is not None and _active.kind == kind and registry in (None, _active.registry)
                and (buffered is None or buffered == (_active.buffer is not None))):
            return _active
        if registry is None:
            from prometheus_client import CollectorRegistry
            registry = CollectorRegistry()
        m = _KINDS[kind](registry)
        if kind == "plugin" and (_multiprocess() if buffered is None else buffered):
            m.buffer = _Buffer(m)
        _active = m
        return _active


def _multiprocess() -> bool:
    """prometheus_client writes its values to files (it decided at its import)."""
    from prometheus_client import values
    return values.ValueClass is not values.MutexValue


def flush() -> None:
    """Apply the buffered metric steps of this process now (tests; exit)."""
    m = _active
    if m is not None and m.buffer is not None:
        m.buffer.flush()


def active() -> _Common:
    """The process's metric set; a plugin set when none was activated (the
    plugin's code used as a library, unit tests)."""
    m = _active
    return m if m is not None else activate("plugin")


def reset() -> None:
    """Forget the process's metric set (tests)."""
    global _active
    with _lock:
        _active = None


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """A hook that never raises into the request path."""
    def hook(*args, **kw) -> None:
        try:
            fn(*args, **kw)
        except Exception:  # a metrics fault must not change a decision
            log.debug("metrics hook %s failed", fn.__name__, exc_info=True)
    hook.__name__ = fn.__name__
    hook.__doc__ = fn.__doc__
    return hook


# -- hooks for the daemons' code -----------------------------------------------------------

@_guarded
def decision(hook: str, allow: bool, reason: str, seconds: float) -> None:
    """One plugin decision (``hook``: ``request`` or ``response``)."""
    m = active()
    if isinstance(m, PluginMetrics):
        key = (hook == "request", allow, reason)
        if m.buffer is not None:
            m.buffer.add((key, seconds))
        else:
            _apply_decisions(m, key, 1, (seconds,))


def _child(cache: dict, metric, values: tuple[str, ...]):
    """``metric.labels(*values)``, made once per label set and kept in
    ``cache`` (``labels()`` takes a lock and builds a key on every call)."""
    child = cache.get(values)
    if child is None:
        child = cache[values] = metric.labels(*values)
    return child


def _children(m: PluginMetrics, key: tuple[bool, bool, str]) -> tuple:
    children = m.children.get(key)
    if children is None:  # labels() takes a lock and builds a key: once per combination
        request, allow, reason = key
        h = "request" if request else "response"
        children = m.children[key] = (m.decisions.labels(h, "allow" if allow else "deny", reason_label(reason)),
                                      m.hook_seconds.labels(h))
    return children


def _apply_decisions(m: PluginMetrics, key: tuple[bool, bool, str], n: int, seconds: Iterable[float]) -> None:
    """``n`` decisions of ``key`` taking ``seconds`` each: one counter step
    and, where prometheus_client's histogram internals are as expected, one
    step for the sum and one per bucket hit (not three file writes per
    decision)."""
    counter, hist = _children(m, key)
    counter.inc(n)
    _observe_many(hist, seconds)


def _observe_many(hist, seconds: Iterable[float]) -> None:
    """``hist.observe(v)`` for each of ``seconds``: where prometheus_client's
    histogram internals are as expected, one step for the sum and one per
    bucket hit."""
    bounds = getattr(hist, "_upper_bounds", None)
    total, buckets = getattr(hist, "_sum", None), getattr(hist, "_buckets", None)
    if bounds is None or total is None or buckets is None or len(buckets) != len(bounds):
        for v in seconds:
            hist.observe(max(0.0, v))
        return
    hits = _Tally(bisect.bisect_left(bounds, max(0.0, v)) for v in seconds)
    total.inc(sum(max(0.0, v) for v in seconds))
    for i, c in hits.items():
        buckets[min(i, len(buckets) - 1)].inc(c)


@_guarded
def identity_event(what: str) -> None:
    """One identity-service counter step (its ``stats()`` names accepted)."""
    event = _IDENTITY_NAMES.get(what, what)
    if event in IDENTITY_EVENTS:
        m = active()
        if m.buffer is not None:
            m.buffer.add(event)
        elif isinstance(m, ScoperMetrics):  # one per request there: queued like the request's own step
            m.pending.append(event)
        else:
            m.identity_children[event].inc()


class _Buffer(Lingering):
    """The plugin's decisions and identity events of one process, queued by
    the request threads and applied, summed, by a daemon thread at most
    ``linger`` seconds after the first pending one (and at exit).

    :meth:`add` never blocks and costs a deque append (plus, for the first
    step after a flush, setting an event).  The thread is started by the
    first :meth:`add` in each process (a forked child drops what its parent
    had queued: the parent applies it).  The queue, the thread, fork and
    exit: :class:`~authz_plugin.lingering.Lingering`."""

    thread_name = "fdcs-metrics-flush"
    flush_at_exit = True

    def __init__(self, m: PluginMetrics, linger: float = FLUSH_LINGER):
        super().__init__(linger)  # q: (key, seconds) or an identity event
        self.m = m
        self.flushes = 0

    add = Lingering.put  # the request path: no extra call

    def process(self, batch: list) -> None:
        """Apply ``batch``, summed per label set, one flush at a time; never raises."""
        with self._lock:
            decisions: dict[tuple[bool, bool, str], list[float]] = {}
            events: _Tally[str] = _Tally()
            for item in batch:
                if isinstance(item, str):
                    events[item] += 1
                else:
                    decisions.setdefault(item[0], []).append(item[1])
            try:
                for key, seconds in decisions.items():
                    _apply_decisions(self.m, key, len(seconds), seconds)
                for event, n in events.items():
                    self.m.identity_children[event].inc(n)
            except Exception:  # a metrics fault must not stop the thread
                log.debug("applying buffered metrics failed", exc_info=True)
            self.flushes += 1


@_guarded
def redis_error() -> None:
    """One failed Redis operation (called from ``ownership.Store._call``)."""
    active().redis_errors.inc()


#: pending scoper request steps applied on the request path once this many wait
#: (between scrapes; a scrape applies them all first)
SCOPER_PENDING_MAX = 256


def scoper_request(method: str, path: str, status: int, head_seconds: float | None,
                   received: int, sent: int) -> None:
    """One request through the name scoper, counted when it ends.

    The step is queued (a deque append) and applied, summed per label set,
    by the next collection of the registry (a scrape sees every request
    that ended before it) or once :data:`SCOPER_PENDING_MAX` steps wait:
    four metric updates with their locks per request were a twentieth of
    the scoper's CPU on an inspect."""
    m = _active
    if isinstance(m, ScoperMetrics):
        m.pending.append((method, path, status, head_seconds, received, sent))
        if len(m.pending) >= SCOPER_PENDING_MAX:
            m.apply_pending()


@_guarded
def scoper_connection() -> None:
    m = active()
    if isinstance(m, ScoperMetrics):
        m.connections.inc()


class _NoTrack:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def scoper_stream(kind: str):
    """Context manager: an answer of ``kind`` (hijack, lines, stream) is
    being streamed while inside it."""
    m = _active
    if isinstance(m, ScoperMetrics) and kind in ("hijack", "lines", "stream"):
        return m.streams.labels(kind).track_inprogress()
    return _NoTrack()


# -- per-tenant gauges ------------------------------------------------------------------

class TenantCollector:
    """The cluster-wide per-tenant gauges, read from Redis at scrape time.

    ``connect()`` returns a redis client (``decode_responses=True``);
    ``budget`` bounds the seconds one collection may take (beyond it, or on
    any Redis error, the tenant gauges are omitted and ``fdcs_store_up`` is
    0).  Concurrent scrapes share one read: a read younger than
    ``max_age`` seconds is served again.
    """

    def __init__(self, connect: Callable[[], Any], budget: float = 2.0, max_age: float = 1.0):
        self._connect = connect
        self._client = None
        self.budget = budget
        self.max_age = max_age
        self._lock = threading.Lock()
        self._last: tuple[float, dict | None, float] | None = None  # (when, gauges, seconds)

    def describe(self):
        return []  # computed at scrape time: nothing to check at registration

    def read(self) -> dict[str, dict[str, float]]:
        """One bounded read of Redis (raises on any failure)."""
        if self._client is None:
            self._client = self._connect()
        r = self._client
        deadline = time.monotonic() + self.budget

        def check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the tenants' gauges took over {self.budget:.1f} s")

        pipe = r.pipeline(transaction=False)
        for kind in ("container", "volume", "network"):
            pipe.hvals(OWN_KEY.format(kind=kind))
        containers, volumes, networks = pipe.execute()
        check()
        usage_keys, running_keys = [], []
        for prefix, keys in ((USAGE_PREFIX, usage_keys), (RUNNING_PREFIX, running_keys)):
            for k in r.scan_iter(prefix + "*", count=1000):
                keys.append(k)
                if len(keys) % 1000 == 0:
                    check()
        check()
        pipe = r.pipeline(transaction=False)
        for k in usage_keys + running_keys:
            pipe.hgetall(k)
        # a key of another type under these prefixes is skipped, not fatal
        hashes = [h if isinstance(h, dict) else {} for h in pipe.execute(raise_on_error=False)]
        check()
        usage = {k[len(USAGE_PREFIX):]: h for k, h in zip(usage_keys, hashes) if h}
        running = hashes[len(usage_keys):]
        return tenant_gauges({"container": containers, "volume": volumes, "network": networks}, usage, running)

    def _cached_read(self) -> tuple[dict | None, float]:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.max_age:
                return self._last[1], self._last[2]
            t0 = time.perf_counter()
            try:
                gauges = self.read()
            except Exception as e:
                log.warning("tenant gauges omitted: the ownership store did not answer (%s)",
                            e.__class__.__name__)
                gauges = None
                self._client = None  # reconnect next time (Sentinel failover, restart)
            took = time.perf_counter() - t0
            self._last = (time.monotonic(), gauges, took)
            return gauges, took

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        gauges, took = self._cached_read()
        yield GaugeMetricFamily("fdcs_store_up", "1 when the last read of the ownership store (Redis) "
                                "for the tenant gauges succeeded", value=0 if gauges is None else 1)
        yield GaugeMetricFamily("fdcs_store_scrape_duration_seconds", "Time the tenant gauges' read of "
                                "Redis took", value=took)
        if gauges is None:
            return
        docs = {
            "fdcs_tenant_containers": "Containers of the tenant on all hosts (ownership records)",
            "fdcs_tenant_containers_running": "Running containers of the tenant on all hosts",
            "fdcs_tenant_volumes": "Volumes of the tenant on all hosts",
            "fdcs_tenant_networks": "Networks of the tenant on all hosts",
            "fdcs_tenant_memory_reserved_bytes": "Memory the tenant's containers reserve (quotas enabled)",
            "fdcs_tenant_cpus_reserved": "CPUs the tenant's containers reserve (quotas enabled)",
        }
        for name, doc in docs.items():
            fam = GaugeMetricFamily(name, doc, labels=["tenant"])
            for tenant, value in sorted(gauges[name].items()):
                fam.add_metric([tenant], value)
            yield fam


class HostTenants:
    """The reconciler's per-tenant gauges of its own host, set by the
    reconciler (:meth:`replace` after a full pass, :meth:`update` after an
    event) and served as they are."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def replace(self, counts: Mapping[str, tuple[int, int]]) -> None:
        """tenant -> (containers, running)."""
        with self._lock:
            self._counts = {t: c for t, c in counts.items() if c[0] or c[1]}

    def update(self, tenant: str, total: int, running: int) -> None:
        with self._lock:
            if total or running:
                self._counts[tenant] = (total, running)
            else:
                self._counts.pop(tenant, None)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return dict(self._counts)

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        counts = self.snapshot()
        total = GaugeMetricFamily("fdcs_host_tenant_containers", "Containers of the tenant on this host",
                                  labels=["tenant"])
        running = GaugeMetricFamily("fdcs_host_tenant_containers_running", "Running containers of the "
                                    "tenant on this host", labels=["tenant"])
        for tenant, (t, r) in sorted(counts.items()):
            total.add_metric([tenant], t)
            running.add_metric([tenant], r)
        yield total
        yield running


# -- the HTTP listener -----------------------------------------------------------------------

class Exporter:
    """The metrics listener: binds at construction (so that a bad or taken
    address fails the daemon's start, with :class:`OSError`), serves from a
    daemon thread after :meth:`start`."""

    def __init__(self, listen: tuple[str, int], registry):
        from http.server import ThreadingHTTPServer

        from prometheus_client.exposition import MetricsHandler

        host, port = listen
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]

        class _Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self._server = _Server(infos[0][4][:2], MetricsHandler.factory(registry))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="fdcs-metrics",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()


def serve(listen: tuple[str, int] | None, registry) -> Exporter | None:
    """Bind and start an :class:`Exporter` (None when ``listen`` is None)."""
    if listen is None:
        return None
    exp = Exporter(listen, registry)
    exp.start()
    return exp


# -- the plugin's multiprocess mode ----------------------------------------------------------

def default_multiproc_dir(name: str, env: Mapping[str, str] | None = None) -> str:
    """Where ``fdcs-authz`` named ``name`` keeps its workers' metric files
    by default: under systemd's ``RuntimeDirectory`` (``$RUNTIME_DIRECTORY``)
    when set, else ``/run/fdcs/metrics/<name>`` as root, else
    ``<tmp>/fdcs-<uid>/metrics/<name>``.  One directory per plugin name, so
    that plugins of different names (one per simulated host in the local
    stack) never share one."""
    env = os.environ if env is None else env
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "fdcs-authz"
    return os.path.join(_default_base(env), "metrics", safe)


def _default_base(env: Mapping[str, str]) -> str:
    runtime = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0]
    if runtime:
        return runtime
    if os.geteuid() == 0:
        return "/run/fdcs"
    return os.path.join(tempfile.gettempdir(), f"fdcs-{os.geteuid()}")


def _private_dir(path: str, base: str | None = None) -> None:
    """Create ``path`` (0700) if needed and make sure that it, and every
    directory from ``base`` down to it, is ours alone: a real directory
    (not a symlink), owned by this user, writable by nobody else -- so that
    nobody can swap what the workers' files are written through."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    uid = os.geteuid()
    d = os.path.abspath(path)
    stop = os.path.abspath(base) if base else d
    while True:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
            raise OSError(f"{d} is not a private directory of uid {uid} (a real directory, mode 0700)")
        if d == stop or os.path.dirname(d) == d:
            return
        d = os.path.dirname(d)


def prepare_multiproc_dir(name: str, env: dict | None = None) -> tuple[str, bool]:
    """Set up the plugin's multiprocess directory and ``PROMETHEUS_MULTIPROC_DIR``;
    returns ``(path, owned)``.

    ``PROMETHEUS_MULTIPROC_DIR`` already set (by the operator) is used as it
    is (``owned`` False: it is left in place at exit).  Else
    :func:`default_multiproc_dir`, or, when that cannot be made (a read-only
    ``/run`` under ``ProtectSystem=strict``), a fresh private temporary
    directory (``owned`` True: removed at exit).  Either way the metric
    files of an earlier run are removed, so that counters start at zero with
    the daemon.  Must run before ``prometheus_client`` is imported in this
    process (RuntimeError otherwise: the workers would silently count apart,
    each in its own memory).  Raises OSError when a directory given by the
    operator is not private.
    """
    env = os.environ if env is None else env
    if "prometheus_client" in sys.modules and env is os.environ:
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    given = env.get(MULTIPROC_ENV)
    if given:
        _private_dir(given)
        path = given
    else:
        path = default_multiproc_dir(name, env)
        try:
            _private_dir(path, _default_base(env))
        except OSError as e:
            log.warning("metrics directory %s cannot be used (%s); using a temporary one", path, e)
            path = tempfile.mkdtemp(prefix=f"fdcs-metrics-{os.path.basename(path)}-")
    _remove_files(path)
    env[MULTIPROC_ENV] = path
    return path, not given


def _remove_files(path: str) -> None:
    for f in glob.glob(os.path.join(path, "*.db")):
        try:
            os.remove(f)
        except FileNotFoundError:
            pass


def remove_multiproc_dir(path: str, owned: bool) -> None:
    """At the daemon's exit: remove its metric files, and the directory when
    it is its own (see :func:`prepare_multiproc_dir`)."""
    _remove_files(path)
    if owned:
        shutil.rmtree(path, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """gunicorn ``child_exit``: drop a dead worker's live gauges."""
    try:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)
    except Exception:
        log.debug("mark_process_dead(%s) failed", pid, exc_info=True)


def plugin_registry(cfg: Mapping[str, Any], path: str | None):
    """The registry the plugin's master serves: the workers' files (when
    ``path``: multiprocess mode) and the per-tenant gauges from Redis."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if path:
        MultiProcessCollector(registry, path=path)

    def connect():
        from .ownership import connect as store_connect
        # the scrape's own, tighter timeouts: a slow Redis must not hang the scraper
        timeout = min(float(cfg["redis.timeout"]), 1.0)
        return store_connect({**cfg, "redis.timeout": timeout})

    registry.register(TenantCollector(connect, budget=2.0))
    return registry


def single_process() -> None:
    """The scoper and the reconciler are single processes: an inherited
    ``PROMETHEUS_MULTIPROC_DIR`` (meant for the plugin) must not send their
    metrics to files nobody serves.  Call before prometheus_client is
    imported."""
    os.environ.pop(MULTIPROC_ENV, None)
    os.environ.pop(MULTIPROC_ENV.lower(), None)
