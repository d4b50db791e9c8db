#!/usr/bin/env python3
"""What the name scoper costs a tenant, next to HAProxy: inspect latency,
``docker cp`` throughput, and the scoper's memory.

    python3 benchmarks/scoper_inspect.py [--rounds N] [--requests M] [--warmup W]
                                         [--concurrency 1,8] [--cp-reps K] [--cp-mib S]
                                         [--rss-mib S] [--profile SECONDS] [--keep-stack DIR]

One local stack (``fdcs-devstack``, one host): Debian's dockerd 20.10 in its
own network namespace with the FDCS plugin, and the host's name scoper.  Beside
it this starts HAProxy (Debian's package) in HTTP mode, terminating TLS on
127.0.0.1 with the stack's server certificate and forwarding to the same
engine socket with ``option http-server-close`` (a new engine connection per
request, keep-alive towards the client: the configuration of Tecnativa's
docker-socket-proxy, and what the scoper does too).  Three paths to the SAME
engine, which runs the FDCS plugin on every one of them:

* ``scoper``  -- ``FDCS_DOCKER_HOST`` (TLS): the tenant's names, as a tenant
  writes them (``bench``);
* ``haproxy`` -- TLS to HAProxy: the engine-side scoped name (``<tenant>_bench``);
* ``direct``  -- the engine's unix socket, plain: the scoped name.

All three carry alice's ``HttpHeaders``.  The container is made through the
scoper as alice (``docker run -d --name bench busybox sleep 3600``).

1. ``GET /v1.41/containers/<ref>/json`` over persistent keep-alive
   connections (Python ``ssl`` and the minimal HTTP/1.1 reader of
   ``_common.py``), at each ``--concurrency``; the paths' series in rotating
   order, round after round, after an uncounted warm-up: p50, p99, mean,
   throughput, CPU per request of the proxy, dockerd and the plugin, and the
   ratios scoper/haproxy and scoper/direct (pooled, and ``rnd``: the median
   of the per-round p50 ratios).
2. ``docker cp`` of a ``--cp-mib`` file of random bytes into the container and
   back out with Debian's CLI (``/usr/bin/docker --config $FDCS_CONFIG_A1 -H
   ... [--tlsverify --tlscacert ... --tlscert ... --tlskey ...] cp``), each
   path ``--cp-reps`` times, interleaved; the median MB/s (10^6 bytes per
   second of the file's size over the command's wall time), and the copy
   brought back out is compared by sha256 with the original in the first
   repetition.  Over ``tcp://`` the CLI accepts gzip and the engine then
   compresses what ``cp`` takes out (over ``unix://`` it does not): so,
   also, the same archive fetched by ``GET .../archive`` without gzip.
3. The scoper's ``VmRSS`` (``/proc/PID/status`` of the ``scoper-h1`` pid of
   ``fdcs-devstack status``) at rest, and its peak while a ``--rss-mib`` file
   goes in through it with ``docker cp`` (sampled every 100 ms).

Then whether the targets are met: scoper/haproxy inspect p50 <= 1.3, and
``docker cp`` through the scoper at least 0.8 of HAProxy's throughput.  When
one is missed, the scoper is sampled with ``py-spy record --gil`` for
``--profile`` seconds during the inspect loop, and the heaviest functions and
modules are listed in microseconds per request.

Everything started is stopped in a ``finally`` (also on Ctrl-C or SIGTERM):
HAProxy (by pid), the temporary files, the stack (``fdcs-devstack down``).
``--keep-stack DIR`` uses (or brings up) the stack in DIR and leaves it
running, without the benchmark's container.  Root only.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from authz_plugin.devstack import Stack
from authz_plugin.devstack._engine import DOCKER
from authz_plugin.devstack._procs import Commands, free_ports, live_pid, terminate, unix_http, wait_until

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# benchmark code beside this file
from _common import (Client, Reader, children, cpu_ns, machine, pct, run_bench,  # noqa: E402
                     progress, ratio, round_ratio, rss_kib, spy_function, spy_path, spy_record, spy_stacks,
                     spy_tally, tls_connector, unix_connector)

HAPROXY = "/usr/sbin/haproxy"
PATHS = ("scoper", "haproxy", "direct")
TARGET_INSPECT_P50 = 1.3  # scoper/haproxy, at most
TARGET_CP = 0.8  # scoper/haproxy throughput, at least
CONTAINER = "bench"
MIB = 1024 * 1024

say = progress("scoper_inspect")

HAPROXY_CFG = """\
# written by benchmarks/scoper_inspect.py: a TLS-terminating HTTP proxy in
# front of the engine socket, set up as Tecnativa's docker-socket-proxy is
# (mode http, option http-server-close, its timeouts, one log line per request)
global
    maxconn 4000
    log stdout format raw daemon info

defaults
    mode http
    log global
    option httplog
    option dontlognull
    option http-server-close
    timeout http-request 10s
    timeout queue 1m
    timeout connect 10s
    timeout client 10m
    timeout server 10m
    timeout http-keep-alive 10s

frontend docker
    bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1
    default_backend engine

backend engine
    server engine unix@{socket}
"""


# -- the run's resources, each released in the finally ------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="fdcss-", dir="/tmp"))
        for d in ("logs", "run", "cp"):
            (self.tmp / d).mkdir()
        self.cmds = Commands(self.tmp / "logs")
        self.keep = args.keep_stack is not None
        self.stack = Stack(args.keep_stack if self.keep else self.tmp / "stack")
        self.stack_started = False
        self.container_made = False
        self.haproxy_pidfile = self.tmp / "run" / "haproxy.pid"

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        self.stack_started = True
        say(f"stack: fdcs-devstack up in {self.stack.dir}")
        took = self.stack.up(None if self.keep else 1)
        say(f"stack: up ({took:.0f} s)")
        env = self.stack.env()
        self.tenant = env["FDCS_TENANT_A"]
        self.alice_config = env["FDCS_CONFIG_A1"]
        self.engine_socket = env["FDCS_ENGINE_HOSTS"].split()[0].removeprefix("unix://")
        self.scoper_host = env["FDCS_DOCKER_HOST"]
        certs = Path(self.stack.dir) / "certs"
        self.ca, self.cert, self.key = (str(certs / n) for n in ("ca.pem", "cert.pem", "key.pem"))
        cfg = json.loads((Path(self.alice_config) / "config.json").read_text())
        self.headers = {**cfg["HttpHeaders"], "User-Agent": "fdcs-bench"}
        status = {s.name: s for s in self.stack.status()}
        scoper = status.get("scoper-h1")
        if scoper is None or not scoper.up or not scoper.pid:
            raise RuntimeError(f"the stack's scoper is not up: {scoper}")
        self.scoper_pid = scoper.pid
        self.scoper_port = int(self.scoper_host.rsplit(":", 1)[1])
        self.ctx = ssl.create_default_context(cafile=self.ca)
        self.ctx.load_cert_chain(self.cert, self.key)
        self._start_haproxy()
        self.refs = {"scoper": CONTAINER, "haproxy": f"{self.tenant}_{CONTAINER}",
                     "direct": f"{self.tenant}_{CONTAINER}"}
        self.connect: dict[str, Callable[[], socket.socket]] = {
            "scoper": tls_connector("127.0.0.1", self.scoper_port, self.ctx),
            "haproxy": tls_connector("127.0.0.1", self.haproxy_port, self.ctx),
            "direct": unix_connector(self.engine_socket),
        }
        tls = ["--tlsverify", "--tlscacert", self.ca, "--tlscert", self.cert, "--tlskey", self.key]
        self.cli = {"scoper": ["-H", self.scoper_host, *tls],
                    "haproxy": ["-H", f"tcp://127.0.0.1:{self.haproxy_port}", *tls],
                    "direct": ["-H", f"unix://{self.engine_socket}"]}
        # a kept stack may still hold the container of an interrupted run
        self.docker("scoper", "rm", "-f", CONTAINER, check=False)
        self.container_made = True
        cid = self.docker("scoper", "run", "-d", "--name", CONTAINER, "busybox", "sleep", "3600").strip()
        say(f"container {CONTAINER} ({self.refs['direct']} on the engine) {cid[:12]}, made through the scoper")
        authz = self.stack.pid("authz-h1")
        self.engine_pids = [p for p in [self.stack.pid("engine-h1")] if p]
        self.plugin_pids = [p for p in [authz, *(children(authz) if authz else []), self.stack.pid("redis")] if p]
        self.proxy_pids = {"scoper": [self.scoper_pid], "haproxy": [self.haproxy_pid], "direct": []}

    def _start_haproxy(self) -> None:
        tls = Path(self.stack.dir) / "tls"
        pem = self.tmp / "haproxy-server.pem"
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write((tls / "server-cert.pem").read_bytes() + (tls / "server-key.pem").read_bytes())
        self.haproxy_port = free_ports(1)[0]
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=self.haproxy_port, pem=pem, socket=self.engine_socket))
        self.cmds.run("haproxy", [HAPROXY, "-c", "-q", "-f", cfg])
        # -db: foreground, so the pid we record is HAProxy's own
        self.haproxy_pid = self.cmds.spawn("haproxy", [HAPROXY, "-db", "-f", cfg], self.haproxy_pidfile)
        wait_until(self._haproxy_ready, component="haproxy", log=self.cmds.log_path("haproxy"), timeout=20,
                   pid=self.haproxy_pid)
        self.haproxy_version = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True).stdout.split()[2]
        say(f"haproxy {self.haproxy_version}: pid {self.haproxy_pid} on 127.0.0.1:{self.haproxy_port}")

    def _haproxy_ready(self) -> bool:
        try:
            c = Client(tls_connector("127.0.0.1", self.haproxy_port, self.ctx), 1, self.headers)
        except OSError:
            return False
        try:
            c.batch("/_ping", 1)
            return True
        except RuntimeError:
            return False
        finally:
            c.close()

    def docker(self, path: str, *args: str, check: bool = True, timeout: float = 600) -> str:
        argv = [DOCKER, "--config", self.alice_config, *self.cli[path], *args]
        try:
            return self.cmds.run("docker", argv, capture=True, timeout=timeout)
        except Exception:
            if check:
                raise
            return ""

    # -- stop ------------------------------------------------------------------------

    def keep_logs(self) -> Path:
        """Copy the logs (ours and the stack's) out of what clean-up removes."""
        dest = Path(tempfile.mkdtemp(prefix="fdcss-failed-logs-", dir="/tmp"))
        for src, name in ((self.tmp / "logs", "bench"), (Path(self.stack.dir) / "logs", "stack")):
            if src.is_dir():
                shutil.copytree(src, dest / name)
        return dest

    def cleanup(self) -> list[str]:
        """Release everything, continuing past failures; returns the problems."""
        problems: list[str] = []

        def attempt(what: str, fn, *a, **kw) -> None:
            try:
                fn(*a, **kw)
            except BaseException as e:  # noqa: BLE001 -- keep cleaning up
                problems.append(f"{what}: {e}")

        # signalled only while the pid file's process is alive and ours (live_pid)
        pid = live_pid(self.haproxy_pidfile)
        if pid is not None:
            attempt(f"stop haproxy (pid {pid})", terminate, pid, group=False)
        if self.stack_started:
            if self.keep:
                if self.container_made:
                    attempt("remove the benchmark container", self.docker, "direct", "rm", "-f",
                            f"{self.tenant}_{CONTAINER}")
            else:
                attempt("fdcs-devstack down", self.stack.down)
        attempt(f"remove {self.tmp}", shutil.rmtree, self.tmp)
        return problems


# -- 1. inspect ------------------------------------------------------------------------


class Series:
    """One (concurrency, path): latencies per round, batch wall times, CPU."""

    def __init__(self, conc: int, path: str):
        self.conc, self.path = conc, path
        self.rounds: list[list[int]] = []  # ns
        self.wall_ns = 0
        self.proxy_cpu_ns = 0.0
        self.engine_cpu_ns = 0.0
        self.plugin_cpu_ns = 0.0

    @property
    def all(self) -> list[int]:
        return sorted(x for r in self.rounds for x in r)


def url(b: Bench, path: str) -> str:
    return f"/v1.41/containers/{b.refs[path]}/json"


def measure_inspect(b: Bench, conc: int, rounds: int, requests: int, warmup: int) -> list[Series]:
    clients: dict[str, Client] = {}
    try:
        for p in PATHS:
            clients[p] = Client(b.connect[p], conc, b.headers)
        series = [Series(conc, p) for p in PATHS]
        for s in series:  # warm-up: connections, token caches, engine caches
            clients[s.path].batch(url(b, s.path), warmup)
        gc.collect()
        gc.disable()
        try:
            for rnd in range(rounds):
                k = rnd % len(series)
                for s in series[k:] + series[:k]:
                    prox = b.proxy_pids[s.path]
                    x0, e0, p0 = cpu_ns(prox), cpu_ns(b.engine_pids), cpu_ns(b.plugin_pids)
                    lat, wall = clients[s.path].batch(url(b, s.path), requests)
                    s.proxy_cpu_ns += cpu_ns(prox) - x0
                    s.engine_cpu_ns += cpu_ns(b.engine_pids) - e0
                    s.plugin_cpu_ns += cpu_ns(b.plugin_pids) - p0
                    s.rounds.append(lat)
                    s.wall_ns += wall
        finally:
            gc.enable()
        return series
    finally:
        for c in clients.values():
            c.close()


# -- 2. docker cp ------------------------------------------------------------------------


def random_file(path: Path, size: int) -> str:
    """``size`` random bytes into ``path``; returns their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MIB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(b: Bench, path: str, src: str) -> tuple[int, int]:
    """``GET /containers/<ref>/archive?path=SRC`` without gzip on a new
    connection, the body read and dropped; (body bytes, ns)."""
    sock = b.connect[path]()
    try:
        req = (f"GET /v1.41/containers/{b.refs[path]}/archive?path={src} HTTP/1.1\r\nHost: docker\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in b.headers.items()) + "Connection: close\r\n\r\n").encode()
        r = Reader(sock)
        t0 = time.perf_counter_ns()
        sock.sendall(req)
        status, headers = r.head()
        if status[9:12] != b"200":
            raise RuntimeError(f"GET archive through {path}: {status.decode()} {r.body(headers)[:300]!r}")
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            n = int(headers.get(b"content-length", b"0") or 0)
            left = n - len(r.buf)
            r.buf.clear()
            while left > 0:
                data = sock.recv(min(left, 1 << 20))
                if not data:
                    raise RuntimeError(f"GET archive through {path}: the body ended early")
                left -= len(data)
        else:
            n = 0
            while True:
                size = int(r._until(b"\r\n").split(b";", 1)[0], 16)
                if size == 0:
                    while r._until(b"\r\n"):
                        pass
                    break
                r._take(size, False)
                r._take(2, False)
                n += size
        return n, time.perf_counter_ns() - t0
    finally:
        sock.close()


class CpResult:
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.proxy_cpu: list[float] = []  # seconds


def measure_cp(b: Bench, reps: int, size: int) -> tuple[dict[tuple[str, str], CpResult], list[str]]:
    """``docker cp`` in and out (and the archive without gzip) per path,
    interleaved; returns the results and the sha256 checks."""
    blob = b.tmp / "cp" / "blob"
    say(f"cp: writing {size // MIB} MiB of random bytes")
    digest = random_file(blob, size)
    out_dir = b.tmp / "cp" / "out"
    out_dir.mkdir()
    ops = ("in", "out", "get")
    res = {(op, p): CpResult() for op in ops for p in PATHS}
    checks = []
    for rnd in range(reps):
        k = rnd % len(PATHS)
        for p in PATHS[k:] + PATHS[:k]:
            inside = f"/tmp/blob-{p}"
            for op in ops:
                prox = b.proxy_pids[p]
                c0 = cpu_ns(prox)
                if op == "get":
                    n, ns = fetch_archive(b, p, inside)
                    if n < size:
                        raise RuntimeError(f"GET archive through {p}: {n} bytes, expected at least {size}")
                    secs = ns / 1e9
                else:
                    argv = (["cp", str(blob), f"{b.refs[p]}:{inside}"] if op == "in"
                            else ["cp", f"{b.refs[p]}:{inside}", str(out_dir)])
                    t0 = time.perf_counter()
                    b.docker(p, *argv)
                    secs = time.perf_counter() - t0
                r = res[op, p]
                r.seconds.append(secs)
                r.proxy_cpu.append((cpu_ns(prox) - c0) / 1e9)
            got = out_dir / f"blob-{p}"
            if rnd == 0:
                h = sha256(got)
                checks.append(f"{p}: {'identical' if h == digest else 'DIFFERENT'} ({h[:16]}...)")
                if h != digest:
                    raise RuntimeError(f"cp through {p}: the copy brought back differs from the original")
            got.unlink()
            say(f"cp: round {rnd + 1}/{reps}, {p}: in {size / res['in', p].seconds[-1] / 1e6:.0f} MB/s, "
                f"out {size / res['out', p].seconds[-1] / 1e6:.0f} MB/s, "
                f"archive {size / res['get', p].seconds[-1] / 1e6:.0f} MB/s")
    blob.unlink()
    return res, [f"sha256 of the original {digest[:16]}...; brought back out (cp in, then cp out, round 1): "
                 + "; ".join(checks)]


# -- 3. memory ---------------------------------------------------------------------------


def measure_rss(b: Bench, size: int) -> dict:
    """The scoper's VmRSS at rest, then sampled every 100 ms during a
    ``docker cp`` of ``size`` bytes in through it."""
    pid = b.scoper_pid
    out = {"rest": rss_kib(pid), "hwm_before": rss_kib(pid, "VmHWM"),
           "haproxy_rest": rss_kib(b.haproxy_pid)}
    src = b.tmp / "cp" / "big"
    say(f"rss: writing {size // MIB} MiB of random bytes")
    random_file(src, size)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            v = rss_kib(pid)
            if v is not None:
                samples.append(v)
            if stop.wait(0.1):
                return

    t = threading.Thread(target=sample, daemon=True)
    say(f"rss: docker cp of {size // MIB} MiB in through the scoper")
    t.start()
    t0 = time.perf_counter()
    try:
        b.docker("scoper", "cp", str(src), f"{CONTAINER}:/tmp/big")
    finally:
        secs = time.perf_counter() - t0
        stop.set()
        t.join()
    src.unlink()
    b.docker("direct", "exec", b.refs["direct"], "rm", "-f", "/tmp/big", check=False)
    time.sleep(1.0)
    out.update(peak=max(samples) if samples else None, samples=len(samples), seconds=secs,
               mbps=size / secs / 1e6, after=rss_kib(pid), hwm_after=rss_kib(pid, "VmHWM"))
    return out


# -- report ------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return f"{kib / 1024:.1f} MiB" if kib is not None else "?"


def report(b: Bench, inspect: list[list[Series]], cp: dict, checks: list[str], rss: dict, args,
           load: tuple) -> tuple[str, bool]:
    ver = unix_http(b.engine_socket, "GET", "/v1.41/version", headers=b.headers, timeout=5)
    dockerd = json.loads(ver[1]).get("Version", "?") if ver and ver[0] == 200 else "?"
    lines = machine() + [
        f"command  {shlex.join(['python3', *sys.argv])}",
        f"engine   dockerd {dockerd} (Debian docker.io) in its own netns, --authorization-plugin fdcs-authz (the "
        "stack's); all three paths reach this one engine and pay its plugin alike",
        f"paths    scoper: fdcs-name-scoper pid {b.scoper_pid} ({b.scoper_host}, TLS; ref '{b.refs['scoper']}'); "
        f"haproxy: HAProxy {b.haproxy_version} pid {b.haproxy_pid} (127.0.0.1:{b.haproxy_port}, mode http, TLS "
        "termination, option http-server-close = new engine connection per request, keep-alive to the client, "
        f"nbthread default = {len(os.sched_getaffinity(0))}, httplog to a file; ref '{b.refs['haproxy']}'); "
        f"direct: unix://{b.engine_socket}, plain, keep-alive (ref '{b.refs['direct']}')",
        f"inspect  GET /v1.41/containers/<ref>/json with alice's HttpHeaders over keep-alive connections (TLS: "
        f"Python ssl, verified, client pair; direct: plain unix), {args.rounds} rounds x {args.requests} requests "
        f"per series, warm-up {args.warmup} per series not counted, series interleaved round-robin; load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after",
        "columns  latency per request (us) and throughput; CPU per request (us) of the proxy (scoper or HAProxy), "
        "dockerd and the plugin (gunicorn master + workers + Redis); ratios of scoper to haproxy and to direct at "
        "p50 and p99 pooled over all rounds, rnd = median over rounds of the per-round p50 ratio",
        "",
    ]
    head = (f"{'conc':>4} {'path':<8} {'n':>6} {'p50':>7} {'p99':>7} {'mean':>7} {'req/s':>6} "
            f"{'cpu:proxy':>9} {'dockerd':>7} {'plugin':>6} | {'scoper/haproxy p50':>18} {'p99':>5} {'rnd':>5} | "
            f"{'scoper/direct p50':>17} {'p99':>5} {'rnd':>5}")
    lines += [head, "-" * len(head)]
    verdicts = []
    for series in inspect:
        by = {s.path: s for s in series}
        st = {}
        for p in PATHS:
            s = by[p]
            xs = s.all
            st[p] = {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "mean": statistics.fmean(xs) / 1000,
                     "tput": len(xs) / (s.wall_ns / 1e9), "xcpu": s.proxy_cpu_ns / len(xs) / 1000,
                     "ecpu": s.engine_cpu_ns / len(xs) / 1000, "pcpu": s.plugin_cpu_ns / len(xs) / 1000}
        for p in PATHS:
            x = st[p]
            xcpu = f"{x['xcpu']:>9.0f}" if p != "direct" else f"{'-':>9}"
            row = (f"{series[0].conc:>4} {p:<8} {x['n']:>6} {x['p50']:>7.0f} {x['p99']:>7.0f} {x['mean']:>7.0f} "
                   f"{x['tput']:>6.0f} {xcpu} {x['ecpu']:>7.0f} {x['pcpu']:>6.0f}")
            if p == "scoper":
                cols = []
                for other, w in (("haproxy", 18), ("direct", 17)):
                    o = st[other]
                    rnd = round_ratio(by["scoper"].rounds, by[other].rounds)
                    cols.append(f"{ratio(x['p50'], o['p50']):>{w}} {ratio(x['p99'], o['p99']):>5} {rnd:>5.2f}")
                row += f" | {cols[0]} | {cols[1]}"
                verdicts.append(("inspect", f"scoper/haproxy inspect p50 <= {TARGET_INSPECT_P50}: concurrency "
                                 f"{series[0].conc}", x["p50"] / st["haproxy"]["p50"], TARGET_INSPECT_P50, "le"))
            lines.append(row)
        lines.append("")

    size = args.cp_mib * MIB
    lines += [
        f"cp       {args.cp_mib} MiB of random bytes, {args.cp_reps} repetitions per path and operation, paths in "
        f"rotating order; in / out: {DOCKER} --config $FDCS_CONFIG_A1 -H <path> [--tlsverify --tlscacert "
        "--tlscert --tlskey] cp, MB/s = 10^6 bytes of the file per second of the command's wall time (CLI start "
        "and the HEAD stat included); archive: GET /containers/<ref>/archive by this script without gzip on a "
        "new connection (not a target: over tcp:// the CLI accepts gzip, and the engine then gzips what cp takes "
        "out, at a speed the same for both proxies; over unix:// it does not); proxy cpu: CPU seconds of the "
        "proxy per copy (median)",
        "",
    ]
    head = (f"{'op':<8} {'path':<8} {'n':>2} {'MB/s med':>8} {'min':>6} {'max':>6} {'s med':>6} {'proxy cpu':>9} | "
            f"{'scoper/haproxy':>14} {'rnd':>5} | {'scoper/direct':>13} {'rnd':>5}")
    lines += [head, "-" * len(head)]
    names = {"in": "cp in", "out": "cp out", "get": "archive"}
    for op in ("in", "out", "get"):
        mbps = {p: [size / s / 1e6 for s in cp[op, p].seconds] for p in PATHS}
        med = {p: statistics.median(mbps[p]) for p in PATHS}
        for p in PATHS:
            r = cp[op, p]
            cpu = f"{statistics.median(r.proxy_cpu):>9.2f}" if p != "direct" else f"{'-':>9}"
            row = (f"{names[op]:<8} {p:<8} {len(r.seconds):>2} {med[p]:>8.0f} {min(mbps[p]):>6.0f} "
                   f"{max(mbps[p]):>6.0f} {statistics.median(r.seconds):>6.2f} {cpu}")
            if p == "scoper":
                cols = []
                for other, w in (("haproxy", 14), ("direct", 13)):
                    rnd = statistics.median(a / o for a, o in zip(mbps["scoper"], mbps[other]))
                    cols.append(f"{ratio(med['scoper'], med[other]):>{w}} {rnd:>5.2f}")
                row += f" | {cols[0]} | {cols[1]}"
                if op != "get":
                    verdicts.append(("cp", f"docker cp {op} throughput scoper/haproxy >= {TARGET_CP}",
                                     med["scoper"] / med["haproxy"], TARGET_CP, "ge"))
            lines.append(row)
    lines += checks + [""]

    peak = rss["peak"]
    lines.append(
        f"memory   scoper-h1 pid {b.scoper_pid} VmRSS: at rest {mib(rss['rest'])} (after the runs above); peak "
        f"{mib(peak)} during a {args.rss_mib} MiB docker cp in through it ({rss['samples']} samples every "
        f"100 ms over {rss['seconds']:.1f} s, {rss['mbps']:.0f} MB/s), peak - rest "
        f"{mib(peak - rss['rest']) if peak is not None and rss['rest'] is not None else '?'}; at rest after "
        f"{mib(rss['after'])}; VmHWM {mib(rss['hwm_before'])} before, {mib(rss['hwm_after'])} after")
    lines.append(f"         (HAProxy pid {b.haproxy_pid} VmRSS at rest: {mib(rss['haproxy_rest'])}; "
                 f"scoper at start, before any load: {mib(b.rss_start)})")
    lines.append("")
    missed = False
    for _kind, what, r, target, how in verdicts:
        ok = r <= target if how == "le" else r >= target
        missed |= not ok
        lines.append(f"target {what}: {r:.2f} -- {'meets' if ok else 'MISSES'} the target")
    return "\n".join(lines), missed


# -- profile -------------------------------------------------------------------------

#: frames every sample of the event loop or a worker thread goes through
_TRIVIAL = ("threading.py", "concurrent/futures/thread.py", "fdcs-name-scoper", "name_scoper/server.py",
            "asyncio/runners.py", "run_forever (asyncio/base_events.py", "run_until_complete (asyncio/",
            "_run_once (asyncio/base_events.py", "_run (asyncio/events.py", "<module>")


#: what a sample of the scoper was doing: the first phase (in this order)
#: one of whose patterns is in any frame of its stack; else by its top frame
_PHASES = (
    ("access log line (_Record.log: json.dumps, logging)", ("_Record.log (",)),
    ("identity: authenticate + hop to its thread pool", ("IdentityService.", "run_in_executor (",
                                                          "concurrent/futures/", "(threading.py",
                                                          "_call_set_state (", "_copy_future_state (")),
    ("response rewriting (Response.json/head: json loads + dumps)", ("Response.json (", "Response.head (")),
    ("request rewriting (handlers.prepare: parse, endpoint, scope)", ("prepare (name_scoper/handlers.py",)),
    ("engine connection: open (unix socket) / close", ("Upstream.connect (", "open_unix (", "Upstream.abort (",
                                                       "RawStream.abort (", "RawStream.close (",
                                                       "RawStream.connection_made (", "_call_connection_lost (")),
    ("TLS record layer (TLSStream over ssl.MemoryBIO)", ("TLSStream.", "(ssl.py")),
    ("h11: parse and serialize (client and engine sides)", ("(h11/",)),
)


def _phase(frames: list[str]) -> str:
    for name, patterns in _PHASES:
        if any(p in f for f in frames for p in patterns):
            return name
    top = frames[-1] if frames else ""
    if "(asyncio/" in top or "(selectors.py" in top:
        return "event loop: callbacks, tasks, futures, epoll (asyncio, selectors)"
    if "(name_scoper/" in top:
        return "the proxy's own code (name_scoper/proxy.py, _streams.py, ...)"
    return f"other (top frame in {_module(spy_function(top))})"


def _module(fn: str) -> str:
    """``name (pkg/mod.py)`` -> ``pkg/mod.py`` for our code, ``pkg`` for a library."""
    path = fn.rsplit("(", 1)[-1].rstrip(")") if fn.endswith(")") else fn
    if path.startswith(("name_scoper/", "authz_plugin/")):
        return path
    return path.split("/", 1)[0] if "/" in path else path


def profile(b: Bench, seconds: float, rate: int) -> str:
    """Sample the scoper with ``py-spy record --gil`` (the thread holding the
    GIL: running Python, a C call made without releasing it, or descheduled
    while holding it) while one connection inspects ``bench`` through it;
    the samples by phase, the heaviest functions (inclusive and self) and
    modules (self), each as a share of the samples and as that share of the
    scoper's CPU time per request (utime + stime over the same window)."""
    spy = spy_path()
    if spy is None:
        return "profile: py-spy is not installed (pip install py-spy)"
    client = Client(b.connect["scoper"], 1, b.headers)
    f = b.tmp / "spy-scoper.txt"
    u = url(b, "scoper")
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
           f"{seconds:.0f} s while one TLS keep-alive connection inspects '{CONTAINER}' through it: {n} requests, "
           f"p50 {pct(sorted(lat), 50):.0f} us with py-spy attached; the scoper's CPU (utime + stime, /proc) "
           f"{cpu:.0f} us per request; {total} samples ({total * 1e6 / rate / max(n, 1):.0f} us of GIL time per "
           "request, which also counts time descheduled while holding the GIL). Each line: share of the samples, "
           "that share of the CPU per request, what; * = FDCS code",
           "  by phase (a sample goes to the first phase, in this order, that any frame of its stack matches; "
           "else by its top frame):"]
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
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, metavar="N", help="inspect rounds per concurrency (default 20)")
    ap.add_argument("--requests", type=int, default=200, metavar="M",
                    help="inspect requests per series and round (default 200)")
    ap.add_argument("--warmup", type=int, default=100, metavar="W",
                    help="uncounted requests per series before the rounds (default 100)")
    ap.add_argument("--concurrency", default="1,8", metavar="C,...",
                    help="client connections per path, one pass each (default 1,8)")
    ap.add_argument("--cp-reps", type=int, default=3, metavar="K",
                    help="docker cp repetitions per path and direction (default 3)")
    ap.add_argument("--cp-mib", type=int, default=256, metavar="S", help="docker cp file size in MiB (default 256)")
    ap.add_argument("--rss-mib", type=int, default=1024, metavar="S",
                    help="size in MiB of the docker cp during which the scoper's RSS is sampled (default 1024)")
    ap.add_argument("--profile", type=float, metavar="SECONDS", default=10,
                    help="when a target is missed, sample the scoper with py-spy for SECONDS during the inspect "
                         "loop (default 10; 0: never)")
    ap.add_argument("--profile-rate", type=int, default=250, metavar="HZ", help="py-spy sampling rate (default 250)")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.rounds < 1 or args.requests < 1 or not concs or min(concs) < 1 or args.cp_reps < 1 \
            or args.cp_mib < 1 or args.rss_mib < 1:
        ap.error("--rounds, --requests, --cp-reps, --cp-mib, --rss-mib and every --concurrency must be at least 1")
    if os.geteuid() != 0:
        ap.error("must run as root (the stack starts dockerd in a network namespace)")

    b = Bench(args)

    def work() -> None:
        b.start()
        b.rss_start = rss_kib(b.scoper_pid)
        load0 = os.getloadavg()[0]
        inspect = []
        for conc in concs:
            say(f"inspect: concurrency {conc}")
            inspect.append(measure_inspect(b, conc, args.rounds, args.requests, args.warmup))
        say(f"cp: {args.cp_reps} x {args.cp_mib} MiB in and out per path")
        cp, checks = measure_cp(b, args.cp_reps, args.cp_mib * MIB)
        load1 = os.getloadavg()[0]
        time.sleep(1.0)
        rss = measure_rss(b, args.rss_mib * MIB)
        text, missed = report(b, inspect, cp, checks, rss, args, (load0, load1))
        print(text, flush=True)
        if missed and args.profile > 0:
            say(f"profiling the scoper for {max(args.profile, 3.0):.0f} s")
            print("\n" + profile(b, max(args.profile, 3.0), args.profile_rate), flush=True)

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
