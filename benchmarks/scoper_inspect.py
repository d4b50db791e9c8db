#!/usr/bin/env python3
"""What the name scoper costs a tenant, next to HAProxy: container inspect
and container list latency and throughput.

    python3 benchmarks/scoper_inspect.py [--rounds N] [--requests M] [--warmup W]
                                         [--concurrency 1,8] [--list-containers K]
                                         [--profile SECONDS] [--keep-stack DIR]
                                         [--json FILE] [--quick]

One local stack (``fdcs-devstack``, one host) and HAProxy beside it
(``_haproxy.py``) and ``py_relay.py`` beside that: four paths to the SAME
engine, which runs the FDCS plugin on every one of them -- ``scoper`` (TLS,
the names a tenant writes), ``haproxy`` (TLS, HTTP mode, the engine-side
names), ``py-relay`` (TLS, uvloop, bytes relayed to one engine connection per
client connection: the cheapest front door Python can be, a floor for any
Python proxy; the engine-side names) and ``direct`` (the engine's unix
socket).  All four carry alice's ``HttpHeaders``.  The tenant
gets ``--list-containers`` running containers (``bench``, ``bench-2``, ...,
``busybox sleep 3600``, made through the scoper as alice).

Two calls, each over persistent keep-alive connections (Python ``ssl`` and the
minimal HTTP/1.1 reader of ``_common.py``) at each ``--concurrency``, the
paths' series in rotating order, round after round, after an uncounted
warm-up:

* ``inspect`` -- ``GET /v1.41/containers/<ref>/json``;
* ``list`` -- ``GET /v1.41/containers/json``: through the scoper as a tenant
  writes it (the scoper adds the tenant label filter, then checks each entry
  against Redis); on ``haproxy``, ``py-relay`` and ``direct`` the same
  request with the filter the scoper adds, ``filters={"label":["org.fiware.fdcs.tenant=<id>"]}``,
  so that the engine does the same work on every path.  The answers are
  checked to list the same containers.

It prints p50, p99, mean, req/s, CPU per request of the proxy, dockerd and
the plugin, and the ratios scoper/haproxy and scoper/direct (pooled, and
``rnd``: the median of the per-round p50 ratios), the floor's ratios
py-relay/haproxy and scoper/py-relay; then whether the target is met:
scoper/haproxy p50 <= 1.3.  When it is missed, the scoper is sampled with
``py-spy record --gil`` for ``--profile`` seconds during that call's loop and
the heaviest phases, functions and modules are listed in microseconds per
request.  ``docker cp`` and the other streams are in ``streams.py``, the
memory in ``memory.py``.

Everything started is stopped in a ``finally`` (also on Ctrl-C or SIGTERM):
HAProxy and py-relay (by pid), the containers, the temporary files, the stack
(``fdcs-devstack down``).  ``--keep-stack DIR`` uses (or brings up) the stack
in DIR and leaves it running, without the benchmark's containers.  Root only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from authz_plugin.devstack._procs import free_ports, live_pid, terminate, unix_http, wait_until

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# benchmark code beside this file
from _common import (Client, Reader, Row, cpu_ns, machine, pct, progress, ratio, round_ratio,  # noqa: E402
                     run_bench, spy_function, spy_path, spy_record, spy_stacks, spy_tally, tls_connector,
                     write_rows)
from _haproxy import ThreePaths  # noqa: E402

#: the paths, in the table's order; py-relay is the Python floor (py_relay.py)
PATHS = ("scoper", "haproxy", "py-relay", "direct")
RELAY = "py-relay"

TARGET_P50 = 1.3  # scoper/haproxy, at most
CONTAINER = "bench"
TENANT_LABEL = "org.fiware.fdcs.tenant"
CALLS = ("inspect", "list")

say = progress("scoper_inspect")


def urls(b: ThreePaths, call: str) -> dict[str, str]:
    """The request of ``call`` on each path."""
    if call == "inspect":
        return {p: f"/v1.41/containers/{b.ref(p, CONTAINER)}/json" for p in PATHS}
    flt = urllib.parse.quote(json.dumps({"label": [f"{TENANT_LABEL}={b.tenant}"]}, separators=(",", ":")))
    return {"scoper": "/v1.41/containers/json", "haproxy": f"/v1.41/containers/json?filters={flt}",
            RELAY: f"/v1.41/containers/json?filters={flt}", "direct": f"/v1.41/containers/json?filters={flt}"}


class FourPaths(ThreePaths):
    """:class:`ThreePaths` plus ``py-relay``: ``py_relay.py`` as its own
    process (started here, ended by pid in :meth:`cleanup`), TLS with the
    scoper's certificate and key (the stack's ``tls/server-*.pem``, which
    HAProxy serves too; the scoper asks no client certificate in the stack,
    nor does HAProxy, so neither does the relay), to the same engine socket."""

    def start(self) -> None:
        self.relay_pid: int | None = None
        self.relay_pidfile = self.tmp / "run" / "py-relay.pid"
        super().start()
        tls = Path(self.stack.dir) / "tls"
        self.relay_port = free_ports(1)[0]
        argv = [sys.executable, str(HERE / "py_relay.py"), "--listen", f"127.0.0.1:{self.relay_port}",
                "--cert", str(tls / "server-cert.pem"), "--key", str(tls / "server-key.pem"),
                "--engine", self.engine_socket, "--parent", str(os.getpid())]
        self.relay_pid = self.cmds.spawn(RELAY, argv, self.relay_pidfile)
        connect = tls_connector("127.0.0.1", self.relay_port, self.ctx)
        wait_until(lambda: self.answers_ping(connect), component=RELAY, log=self.cmds.log_path(RELAY), timeout=20,
                   pid=self.relay_pid)
        self.connect[RELAY] = connect
        self.proxy_pids[RELAY] = [self.relay_pid]
        self.say(f"py-relay: pid {self.relay_pid} on 127.0.0.1:{self.relay_port}")

    def cleanup(self) -> list[str]:
        problems = []
        # before ThreePaths.cleanup, which removes the pid file with self.tmp;
        # signalled only while the pid file's process is alive and ours
        pidfile = getattr(self, "relay_pidfile", None)
        pid = live_pid(pidfile) if pidfile is not None else None
        if pid is not None:
            try:
                terminate(pid, group=False)
            except BaseException as e:  # noqa: BLE001 -- keep cleaning up
                problems.append(f"stop py-relay (pid {pid}): {e}")
        return problems + super().cleanup()


def check_lists(b: ThreePaths) -> int:
    """The paths list the same containers (by id); their number."""
    u = urls(b, "list")
    seen = {}
    for p in PATHS:
        sock = b.connect[p]()
        try:
            sock.sendall(f"GET {u[p]} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n".encode()
                         + "".join(f"{k}: {v}\r\n" for k, v in b.headers.items()).encode() + b"\r\n")
            r = Reader(sock)
            status, headers = r.head()
            body = r.body(headers)
        finally:
            sock.close()
        if status[9:12] != b"200":
            raise RuntimeError(f"list through {p}: {status.decode()} {body[:300]!r}")
        seen[p] = sorted(c["Id"] for c in json.loads(body))
    if any(seen[p] != seen["scoper"] for p in PATHS):
        raise RuntimeError(f"the paths list different containers: { {p: len(v) for p, v in seen.items()} }")
    return len(seen["scoper"])


# -- measure -----------------------------------------------------------------------------


class Series:
    """One (call, concurrency, path): latencies per round, batch wall times, CPU."""

    def __init__(self, call: str, conc: int, path: str):
        self.call, self.conc, self.path = call, conc, path
        self.rounds: list[list[int]] = []  # ns
        self.wall_ns = 0
        self.proxy_cpu_ns = 0.0
        self.engine_cpu_ns = 0.0
        self.plugin_cpu_ns = 0.0

    @property
    def all(self) -> list[int]:
        return sorted(x for r in self.rounds for x in r)


def measure(b: ThreePaths, call: str, conc: int, rounds: int, requests: int, warmup: int) -> list[Series]:
    """The paths' series of ``call`` round-robin, in rotating order.  Each
    series opens its ``conc`` connections afresh, with two uncounted requests
    each, just before its timed batch: a connection kept across the other
    paths' series would sit idle past HAProxy's ``timeout http-keep-alive``
    (10 s) when a series takes long (list at concurrency 1), and be closed."""
    u = urls(b, call)
    series = [Series(call, conc, p) for p in PATHS]
    for s in series:  # warm-up: token caches, engine caches
        c = Client(b.connect[s.path], conc, b.headers)
        try:
            c.batch(u[s.path], warmup)
        finally:
            c.close()
    gc.collect()
    gc.disable()
    try:
        for rnd in range(rounds):
            k = rnd % len(series)
            for s in series[k:] + series[:k]:
                c = Client(b.connect[s.path], conc, b.headers)
                try:
                    c.batch(u[s.path], 2 * conc)
                    prox = b.proxy_pids[s.path]
                    x0, e0, p0 = cpu_ns(prox), cpu_ns(b.engine_pids), cpu_ns(b.plugin_pids)
                    lat, wall = c.batch(u[s.path], requests)
                    s.proxy_cpu_ns += cpu_ns(prox) - x0
                    s.engine_cpu_ns += cpu_ns(b.engine_pids) - e0
                    s.plugin_cpu_ns += cpu_ns(b.plugin_pids) - p0
                finally:
                    c.close()
                s.rounds.append(lat)
                s.wall_ns += wall
    finally:
        gc.enable()
    return series


# -- report ------------------------------------------------------------------------


def stats(s: Series) -> dict[str, float]:
    xs = s.all
    return {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "mean": statistics.fmean(xs) / 1000,
            "tput": len(xs) / (s.wall_ns / 1e9), "xcpu": s.proxy_cpu_ns / len(xs) / 1000,
            "ecpu": s.engine_cpu_ns / len(xs) / 1000, "pcpu": s.plugin_cpu_ns / len(xs) / 1000}


def report(b: ThreePaths, results: list[list[Series]], n_listed: int, args, load: tuple) -> tuple[str, list[Row]]:
    """The text report and the Rows (a missed target's note is added by main)."""
    ver = unix_http(b.engine_socket, "GET", "/v1.41/version", headers=b.headers, timeout=5)
    dockerd = json.loads(ver[1]).get("Version", "?") if ver and ver[0] == 200 else "?"
    lu = urls(b, "list")
    lines = machine() + [
        f"command  {shlex.join(['python3', *sys.argv])}",
        f"engine   dockerd {dockerd} (Debian docker.io) in its own netns, --authorization-plugin fdcs-authz (the "
        "stack's); all four paths reach this one engine and pay its plugin alike",
        f"paths    scoper: fdcs-name-scoper pid {b.scoper_pid} ({b.scoper_host}, TLS; ref '{CONTAINER}'); "
        f"haproxy: HAProxy {b.haproxy_version} pid {b.haproxy_pid} (127.0.0.1:{b.haproxy_port}, mode http, TLS "
        "termination, option http-server-close = new engine connection per request, keep-alive to the client, "
        f"nbthread default = {len(os.sched_getaffinity(0))}, httplog to a file; ref '{b.ref('haproxy', CONTAINER)}'); "
        f"py-relay: benchmarks/py_relay.py pid {b.relay_pid} (127.0.0.1:{b.relay_port}, uvloop native TLS, the "
        "scoper's certificate, bytes relayed by asyncio Protocols to one engine connection per client connection, "
        f"no parsing: the Python floor; ref '{b.ref(RELAY, CONTAINER)}'); "
        f"direct: unix://{b.engine_socket}, plain, keep-alive (ref '{b.ref('direct', CONTAINER)}')",
        f"calls    inspect: GET /v1.41/containers/<ref>/json; list: GET {lu['scoper']} through the scoper (it adds "
        f"the tenant label filter and checks each entry in Redis), GET {lu['haproxy']} on haproxy, py-relay and "
        f"direct (the same filter, so the engine does the same work); the tenant has {args.list_containers} running "
        f"containers of ours, the lists hold {n_listed} (checked equal on the four paths)",
        f"load     alice's HttpHeaders over keep-alive connections (TLS: Python ssl, verified, client pair; direct: "
        f"plain unix), {args.rounds} rounds x {args.requests} requests per series, warm-up {args.warmup} per series "
        f"not counted, series interleaved round-robin, each on fresh connections (2 uncounted requests each "
        f"first); load average {load[0]:.2f} before, {load[1]:.2f} after",
        "columns  latency per request (us) and throughput; CPU per request (us) of the proxy (scoper, HAProxy or "
        "py-relay), dockerd and the plugin (gunicorn master + workers + Redis); ratios of scoper to haproxy and to "
        "direct at p50 and p99 pooled over all rounds, rnd = median over rounds of the per-round p50 ratio; under "
        "each case the floor: py-relay/haproxy (what Python itself costs over HAProxy) and scoper/py-relay (what "
        "the scoper's own work costs over the floor)",
        "",
    ]
    head = (f"{'call':<7} {'conc':>4} {'path':<8} {'n':>6} {'p50':>7} {'p99':>7} {'mean':>7} {'req/s':>6} "
            f"{'cpu:proxy':>9} {'dockerd':>7} {'plugin':>6} | {'scoper/haproxy p50':>18} {'p99':>5} {'rnd':>5} | "
            f"{'scoper/direct p50':>17} {'p99':>5} {'rnd':>5}")
    lines += [head, "-" * len(head)]
    rows: list[Row] = []
    for series in results:
        by = {s.path: s for s in series}
        st = {p: stats(by[p]) for p in PATHS}
        call, conc = series[0].call, series[0].conc
        for p in PATHS:
            x = st[p]
            xcpu = f"{x['xcpu']:>9.0f}" if p != "direct" else f"{'-':>9}"
            line = (f"{call:<7} {conc:>4} {p:<8} {x['n']:>6} {x['p50']:>7.0f} {x['p99']:>7.0f} {x['mean']:>7.0f} "
                    f"{x['tput']:>6.0f} {xcpu} {x['ecpu']:>7.0f} {x['pcpu']:>6.0f}")
            if p == "scoper":
                cols = []
                for other, w in (("haproxy", 18), ("direct", 17)):
                    o = st[other]
                    rnd = round_ratio(by["scoper"].rounds, by[other].rounds)
                    cols.append(f"{ratio(x['p50'], o['p50']):>{w}} {ratio(x['p99'], o['p99']):>5} {rnd:>5.2f}")
                line += f" | {cols[0]} | {cols[1]}"
            lines.append(line)
        s, h, f = st["scoper"], st["haproxy"], st[RELAY]
        fh_rnd = round_ratio(by[RELAY].rounds, by["haproxy"].rounds)
        sf_rnd = round_ratio(by["scoper"].rounds, by[RELAY].rounds)
        floor = (f"py-relay/haproxy p50 {ratio(f['p50'], h['p50'])} (rnd {fh_rnd:.2f}); scoper/py-relay p50 "
                 f"{ratio(s['p50'], f['p50'])} (rnd {sf_rnd:.2f}); proxy CPU per request: scoper {s['xcpu']:.0f} us, "
                 f"py-relay {f['xcpu']:.0f} us, HAProxy {h['xcpu']:.0f} us")
        lines += [f"  floor: {floor}", ""]
        case = f"{call}, c={conc}"
        refs = {k: {p: round(st[p][k], 1) for p in ("haproxy", RELAY, "direct")} for k in ("p50", "p99", "tput")}
        r50 = s["p50"] / h["p50"]
        rnd = round_ratio(by["scoper"].rounds, by["haproxy"].rounds)
        rows += [
            Row("scoper", case, "p50 us", round(s["p50"], 1), refs["p50"], "haproxy", round(r50, 3),
                f"<= {TARGET_P50}", r50 <= TARGET_P50,
                f"median of per-round ratios {rnd:.2f}; {floor}"),
            Row("scoper", case, "p99 us", round(s["p99"], 1), refs["p99"], "haproxy", round(s["p99"] / h["p99"], 3)),
            Row("scoper", case, "req/s", round(s["tput"], 1), refs["tput"], "haproxy",
                round(s["tput"] / h["tput"], 3)),
        ]
    for r in rows:
        if r.met is not None:
            lines.append(f"target scoper/haproxy {r.case} p50 {r.target}: {r.ratio:.2f} -- "
                         f"{'meets' if r.met else 'MISSES'} the target")
    return "\n".join(lines), rows


# -- profile -------------------------------------------------------------------------

#: frames every sample of the event loop or a worker thread goes through
_TRIVIAL = ("threading.py", "concurrent/futures/thread.py", "fdcs-name-scoper", "name_scoper/server.py",
            "asyncio/runners.py", "run_forever (asyncio/base_events.py", "run_until_complete (asyncio/",
            "_run_once (asyncio/base_events.py", "_run (asyncio/events.py", "<module>")


#: what a sample of the scoper was doing: the first phase (in this order)
#: one of whose patterns is in any frame of its stack; else by its top frame
_PHASES = (
    ("access log line and metrics (_Record.log)", ("_Record.log (",)),
    ("identity: authenticate + hop to its thread pool", ("IdentityService.", "run_in_executor (",
                                                          "concurrent/futures/", "(threading.py",
                                                          "_call_set_state (", "_copy_future_state (")),
    ("response rewriting (Response.json/head: json loads + dumps)", ("Response.json (", "Response.head (")),
    ("request rewriting (handlers.prepare: parse, endpoint, scope)", ("prepare (name_scoper/handlers.py",)),
    ("engine connection: open (unix socket) / close", ("Upstream.connect (", "open_unix (", "Upstream.abort (",
                                                       "RawStream.abort (", "RawStream.close (",
                                                       "RawStream.connection_made (", "_call_connection_lost (")),
    ("TLS record layer (TLSStream over ssl.MemoryBIO)", ("TLSStream.", "(ssl.py")),
    ("HTTP/1.1: parse and serialize, both sides (name_scoper/http1.py)", ("(name_scoper/http1.py",)),
)


def _phase(frames: list[str]) -> str:
    for name, patterns in _PHASES:
        if any(p in f for f in frames for p in patterns):
            return name
    top = frames[-1] if frames else ""
    if "(asyncio/" in top or "(selectors.py" in top or "(uvloop/" in top:
        return "event loop: callbacks, tasks, futures (asyncio, uvloop)"
    if "(name_scoper/" in top:
        return "the proxy's own code (name_scoper/proxy.py, _streams.py, ...)"
    return f"other (top frame in {_module(spy_function(top))})"


def _module(fn: str) -> str:
    """``name (pkg/mod.py)`` -> ``pkg/mod.py`` for our code, ``pkg`` for a library."""
    path = fn.rsplit("(", 1)[-1].rstrip(")") if fn.endswith(")") else fn
    if path.startswith(("name_scoper/", "authz_plugin/")):
        return path
    return path.split("/", 1)[0] if "/" in path else path


def profile(b: ThreePaths, seconds: float, rate: int, call: str) -> tuple[str, str]:
    """Sample the scoper with ``py-spy record --gil`` (the thread holding the
    GIL: running Python, a C call made without releasing it, or descheduled
    while holding it) while one connection inspects ``bench`` through it;
    the samples by phase, the heaviest functions (inclusive and self) and
    modules (self), each as a share of the samples and as that share of the
    scoper's CPU time per request (utime + stime over the same window).
    Returns the text and a one-line summary (the three heaviest phases) for
    the missed target's Row."""
    spy = spy_path()
    if spy is None:
        return "profile: py-spy is not installed (pip install py-spy)", "no profile: py-spy is not installed"
    client = Client(b.connect["scoper"], 1, b.headers)
    f = b.tmp / "spy-scoper.txt"
    u = urls(b, call)["scoper"]
    lat: list[int] = []

    def load(deadline: float) -> int:
        n = 0
        while time.monotonic() < deadline:
            lat.extend(client.batch(u, 50)[0])
            n += 50
        return n

    c0 = cpu_ns([b.scoper_pid])
    try:
        n = spy_record(b.cmds, spy, [b.scoper_pid], [f], rate, seconds, load)
    finally:
        client.close()
    cpu = (cpu_ns([b.scoper_pid]) - c0) / max(n, 1) / 1000
    total, incl, own = spy_tally([f], _TRIVIAL)
    phases: dict[str, int] = {}
    for frames, k in spy_stacks([f]):
        ph = _phase(frames)
        phases[ph] = phases.get(ph, 0) + k
    mods: dict[str, int] = {}
    for fn, k in own.items():
        mods[_module(fn)] = mods.get(_module(fn), 0) + k

    def row(k: int, what: str, tag: str = " ") -> str:
        share = k / max(total, 1)
        return f"    {100 * share:5.1f}% {share * cpu:6.0f} us {tag} {what}"

    def tag(fn: str) -> str:
        return "*" if "name_scoper/" in fn or "authz_plugin/" in fn else " "

    out = [f"profile  py-spy record --gil at {rate} Hz on the scoper (pid {b.scoper_pid}, all threads) for "
           f"{seconds:.0f} s while one TLS keep-alive connection makes {call} calls ({u}) through it: {n} requests, "
           f"p50 {pct(sorted(lat), 50):.0f} us with py-spy attached; the scoper's CPU (utime + stime, /proc) "
           f"{cpu:.0f} us per request; {total} samples ({total * 1e6 / rate / max(n, 1):.0f} us of GIL time per "
           "request, which also counts time descheduled while holding the GIL). Each line: share of the samples, "
           "that share of the CPU per request, what; * = FDCS code",
           "  by phase (a sample goes to the first phase, in this order, that any frame of its stack matches; "
           "else by its top frame):"]
    phases_all = dict(phases)
    for name, _ in _PHASES:
        out.append(row(phases.pop(name, 0), name))
    for name, k in sorted(phases.items(), key=lambda kv: -kv[1]):
        out.append(row(k, name))
    out.append("  inclusive (on the stack; event-loop and thread frames left out):")
    for fn, k in sorted(incl.items(), key=lambda kv: -kv[1])[:30]:
        out.append(row(k, fn, tag(fn)))
    out.append("  self (top of the stack):")
    for fn, k in sorted(own.items(), key=lambda kv: -kv[1])[:20]:
        out.append(row(k, fn, tag(fn)))
    out.append("  self by module:")
    for m, k in sorted(mods.items(), key=lambda kv: -kv[1])[:15]:
        out.append(row(k, m))
    top = sorted(((k, name) for name, k in phases_all.items()), reverse=True)[:3]
    note = f"py-spy: scoper CPU {cpu:.0f} us/req; " + "; ".join(
        f"{name.split(' (')[0]} {k * cpu / max(total, 1):.0f} us" for k, name in top)
    return "\n".join(out), note




# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, metavar="N", help="rounds per call and concurrency (default 20; quick 4)")
    ap.add_argument("--requests", type=int, metavar="M",
                    help="requests per series and round (default 200; quick 50)")
    ap.add_argument("--warmup", type=int, metavar="W",
                    help="uncounted requests per series before the rounds (default 100; quick 20)")
    ap.add_argument("--concurrency", default="1,8", metavar="C,...",
                    help="client connections per path, one pass each (default 1,8)")
    ap.add_argument("--list-containers", type=int, default=5, metavar="K",
                    help="running containers the tenant has for the list call (default 5)")
    ap.add_argument("--profile", type=float, metavar="SECONDS",
                    help="when a target is missed, sample the scoper with py-spy for SECONDS during that call's "
                         "loop (default 10; quick 0; 0: never)")
    ap.add_argument("--profile-rate", type=int, default=250, metavar="HZ", help="py-spy sampling rate (default 250)")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    ap.add_argument("--json", metavar="FILE", help="write the summary Rows to FILE (for run.py)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of well under 2 minutes")
    args = ap.parse_args(argv)
    for name, full, quick in (("rounds", 20, 4), ("requests", 200, 50), ("warmup", 100, 20), ("profile", 10.0, 0.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.rounds < 1 or args.requests < 1 or not concs or min(concs) < 1 or args.list_containers < 1:
        ap.error("--rounds, --requests, --list-containers and every --concurrency must be at least 1")
    if os.geteuid() != 0:
        ap.error("must run as root (the stack starts dockerd in a network namespace)")

    b = FourPaths(args.keep_stack, "fdcsb-scoper", say)

    def work() -> None:
        b.start()
        names = [CONTAINER] + [f"{CONTAINER}-{i}" for i in range(2, args.list_containers + 1)]
        for n in names:
            cid = b.run_container(n, "sleep", "3600")
            say(f"container {n} ({b.ref('direct', n)} on the engine) {cid[:12]}, made through the scoper")
        n_listed = check_lists(b)
        load0 = os.getloadavg()[0]
        results = []
        for conc in concs:
            for call in CALLS:
                say(f"{call}: concurrency {conc}")
                results.append(measure(b, call, conc, args.rounds, args.requests, args.warmup))
        load1 = os.getloadavg()[0]
        text, rows = report(b, results, n_listed, args, (load0, load1))
        print(text, flush=True)
        missed = {r.case.split(",")[0] for r in rows if r.met is False}
        if missed and args.profile > 0:
            for call in CALLS:
                if call not in missed:
                    continue
                say(f"profiling the scoper for {max(args.profile, 3.0):.0f} s ({call})")
                ptext, note = profile(b, max(args.profile, 3.0), args.profile_rate, call)
                print("\n" + ptext, flush=True)
                for r in rows:
                    if r.met is False and r.case.startswith(call + ","):
                        r.note = f"{r.note}; {note}"
        if args.json:
            write_rows(args.json, rows)

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
