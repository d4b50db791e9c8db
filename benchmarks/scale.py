#!/usr/bin/env python3
"""Does the plugin's hook latency stay flat as Redis fills up?

    python3 benchmarks/scale.py [--sizes 10,10000,100000] [--tenants 1000] [--rounds N]
                                [--requests M] [--keep-stack DIR] [--json FILE] [--quick]

The plugin's request hook (``POST /AuthZPlugin.AuthZReq`` on its unix
socket, keep-alive, one connection, the payload dockerd 20.10 sends: moby
``pkg/authorization``'s JSON with the body base64) is timed with 10, 10,000
and 100,000 container ownership records spread over 1,000 tenants.  Cases:

* ``inspect name`` -- ``GET /containers/<tenant>_scale/json`` (the scoped name);
* ``inspect id``   -- ``GET /containers/<12 hex>/json`` (a Redis id-prefix look-up);
* ``list``         -- ``GET /containers/json?all=1&filters=<the tenant label>``;
* ``create``       -- ``POST /containers/create?name=<tenant>_sN`` with the body
  the docker CLI sends (quota admission, name reservation); then, untimed
  in the row but reported, its ``AuthZRes`` (201: ownership record, charge
  settled) and the ``DELETE`` hooks that remove it again.

The sizes are interleaved, so that slow drift of the machine lands on every
size alike and cancels in the ratio: each size has its own database of a
private Redis, and each round visits every size in turn (the order rotating
by round, the cases rotating too), making the size's database the plugin's
db 0 for its slice with ``SWAPDB 0 <db>`` (O(1), atomic: every client on
db 0 sees the swapped data at once) and swapping it back after.  The plugin
keeps no Redis data in process that a swap could make stale: its memory of
container references' answers (``redis.track_refs``) is turned off here --
Redis does not report a ``SWAPDB`` to client tracking, and the case is the
Redis read that every answer not kept costs; its ``resolve`` and quota
scripts read Redis on every call; the one cache, of suspended tenants,
holds the same empty set in every database.

The records must stay put while measured, so they live on a host of the
benchmark's own with a Redis of its own: Debian's ``redis-server`` started
here on a free loopback port (the devstack's arguments: no ``save``, no
AOF), the real plugin (``fdcs-authz`` with the stack's ``fdcs.toml``; host
id, plugin name, socket, metrics port and ``FDCS_REDIS_URL`` by environment
overrides; Keystone stays the stack's), beside it a dockerd using it
(``plugin_inspect.py``'s ``Bench``), marked complete by one
``fdcs-reconciler --once`` pass over it (pointed at the private Redis too),
with one real container of alice's (``<tenant>_scale``).  Each size's
database is a copy (``COPY ... DB n``) of that state -- reconcile mark and
epoch, the container's record and charge -- plus the synthetic records,
written with the product's own Lua script (``ownership._ADD``, pipelined):
32-hex tenant ids (alice's among them), 64-hex ids and scoped names.  In
every database one synthetic record of alice's is resolved through the
plugin (allowed) and one of another tenant (refused) before measuring.  As
a cross-check, ``GET /containers/<12 hex>/json`` through that dockerd is
timed at the first and the largest size, in the same slices.  Reported per
size: p50/p99 of each case and hook, the private Redis's CPU share during
the size's slices, and one ``Store.records('container')`` read (what the
host's reconcile pass reads: its own ids' index and their records; median
of 3, read after the rounds, garbage collection off inside the timed
slices); the rows: p50 over every sample at the largest size over p50 at
10 (target <= 1.1), with the median of the per-round ratios beside.

The create case must leave each database as it found it (keys and their
sizes, the charges, alice's usage; checked after the run, a failure
otherwise).  At the end the plugin, engine and private Redis are stopped
(and checked gone), the stack's Redis checked to hold nothing of a
benchmark host (it is never written), the stack left running with
``--keep-stack DIR`` (and checked to still answer alice) or brought down.
Root only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import concurrent.futures as cf
import hashlib
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import redis

from authz_plugin import config as fdcs_config
from authz_plugin import ownership
from authz_plugin.devstack import _engine, _redis
from authz_plugin.devstack._procs import clean_env, free_ports, live_pid, proc_alive, terminate, wait_until
from authz_plugin.devstack._stack import _console_script

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (Client, Conn, Row, authz_payload, cli_create_body, cpu_ns, machine, pct,  # noqa: E402
                     progress, run_bench, start_fdcs_plugin, write_rows)
from plugin_inspect import TENANT_LABEL, Bench  # noqa: E402

TARGET = 1.1
CASES = ("inspect name", "inspect id", "list", "create")
API = "/v1.41"
BATCH = 2000  # records per pipeline

say = progress("scale")


def tenant_ids(seed: str, n: int) -> list[str]:
    """``n`` synthetic Keystone-like project ids (32 hex), reproducible from ``seed``."""
    return [hashlib.sha256(f"fdcsbench-{seed}-{i}".encode()).hexdigest()[:32] for i in range(n)]


class ScaleBench(Bench):
    """``plugin_inspect.Bench``'s first host (``allow-all`` there) runs the
    real FDCS plugin instead, on a private Redis; the second is unused."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.host = self.hosts["allow-all"]
        # the private Redis lives outside self.tmp: it is stopped after the
        # plugin and engine (Bench.cleanup), which remove self.tmp
        self.rdir = Path(tempfile.mkdtemp(prefix="fdcsb-redis-", dir="/tmp"))
        self.redis_pid: int | None = None
        self.redis_port = 0
        self.r: redis.Redis | None = None  # the private Redis, db 0 (what the plugin uses)
        self.dbs: dict[int, redis.Redis] = {}  # size's db -> a client on it
        self.r_stack: redis.Redis | None = None  # the stack's Redis: read only (the end check)

    def start(self) -> None:
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="devstack") as pool:
            self.stack_started = True
            up = pool.submit(self.stack.up, None if self.keep else 1)
            _engine.build_busybox_tar(self.layout.busybox_tar, self.cmds)
            say(f"stack: waiting for fdcs-devstack up in {self.stack.dir}")
            say(f"stack: up ({up.result():.0f} s)")
        # after the stack: its free ports are taken by then (free_ports only
        # finds a port unbound at that moment)
        self._start_redis()
        env = self.stack.env()
        self.env = env
        self.conf = env["FDCS_CONF"]
        self.alice_config = env["FDCS_CONFIG_A1"]
        self.tenant = env["FDCS_TENANT_A"]
        cfg = json.loads((Path(self.alice_config) / "config.json").read_text())
        self.headers = {**cfg["HttpHeaders"], "User-Agent": "Docker-Client/20.10.24+dfsg1 (linux)"}
        self.r_stack = redis.Redis.from_url(env["FDCS_REDIS_URL"], decode_responses=True)
        # names may be reserved (creates admitted) 2 reconcile intervals after
        # the first complete reconcile on a Redis run: as the plugin's Store
        settle = 2 * fdcs_config.load(self.conf, env={})["reconciler.interval"]
        self.store = ownership.Store(self.r, host=self.host.name, settle=settle)
        # the engine imports busybox as administrator through our plugin: the stack's admin key
        self.layout.admin_key_dir.mkdir(exist_ok=True)
        shutil.copy(Path(self.stack.dir) / "admin-key" / "config.json", self.layout.admin_key_dir / "config.json")
        over = {"FDCS_REDIS_URL": self.redis_url}
        # the plugin's memory of answers (authz_plugin/known.py) off: SWAPDB is
        # not reported to client tracking (Redis 7.0), and what scales with the
        # records is the read that every answer not kept costs
        self.plugin_pid, self.metrics_url = start_fdcs_plugin(
            self.cmds, self.host, self.conf, self.tmp / "run" / f"plugin-{self.host.suffix}.pid",
            env={**over, "FDCS_REDIS_TRACK_REFS": "false"})
        self.plugin_pid_fdcs = self.plugin_pid
        say(f"plugin: fdcs-authz pid {self.plugin_pid} on {self.host.plugin_socket}, host id {self.host.name}, "
            f"Redis {self.redis_url}")
        self._start_engine("fdcs-bench", self.host, with_plugin=True)
        self.sockets["fdcs"] = str(self.host.engine_socket)
        # the host's first complete reconcile (creates are refused before it)
        out = subprocess.run([_console_script("fdcs-reconciler"), "--config", self.conf, "--once"],
                             env=clean_env({"FDCS_HOST_ID": self.host.name, **over,
                                            "FDCS_RECONCILER_ENGINE_SOCKET": str(self.host.engine_socket),
                                            "FDCS_RECONCILER_METRICS_LISTEN": ""}),
                             capture_output=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"fdcs-reconciler --once: {out.stderr.decode(errors='replace')[-500:]}")
        deadline = time.monotonic() + settle + 60
        while not (self.store.is_complete() and self.store.settled()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.host.name} not complete and settled {settle + 60:.0f} s after its reconcile")
            time.sleep(0.2)  # polling the condition the plugin itself checks
        self.name = f"{self.tenant}_scale"
        self.cid = self._docker("fdcs", "run", "-d", "--name", self.name, "--label", f"{TENANT_LABEL}={self.tenant}",
                                "--network", "none", "--pids-limit", "100", "--cgroupns", "private",
                                "busybox", "sleep", "3600").strip()
        say(f"container {self.name} {self.cid[:12]} on {self.host.name}")

    def _start_redis(self) -> None:
        """Debian's redis-server on a free loopback port, no persistence
        (the devstack's own arguments), its files in ``self.rdir``."""
        self.redis_port = free_ports(1)[0]
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        pidfile = self.rdir / "redis.pid"
        self.redis_pid = self.cmds.spawn("bench-redis", _redis.argv(self.redis_port, self.rdir), pidfile)
        wait_until(lambda: _redis.ping(self.redis_port), component="bench-redis",
                   log=self.cmds.log_path("bench-redis"), timeout=20, pid=self.redis_pid)
        self.r = self.db(0)
        say(f"redis: private redis-server pid {self.redis_pid} on 127.0.0.1:{self.redis_port}")

    def db(self, k: int) -> redis.Redis:
        if k not in self.dbs:
            self.dbs[k] = redis.Redis(host="127.0.0.1", port=self.redis_port, db=k, decode_responses=True)
        return self.dbs[k]

    # -- the sizes' databases ----------------------------------------------------------

    def fill(self, k: int, n: int, tenants: list[str]) -> tuple[list[str], float]:
        """Database ``k``: a copy of db 0 as ``start`` left it (the reconcile
        mark and epoch, alice's real container and its charge, the audit
        stream) plus ``n`` synthetic container records of our host, written
        with the product's script (``ownership._ADD``, as ``Store.add`` runs
        it); returns their ids (record ``i`` belongs to ``tenants[i % len]``)
        and the seconds it took."""
        t0 = time.monotonic()
        dst = self.db(k)
        dst.flushdb()
        for key in self.r.scan_iter(count=1000):
            self.r.copy(key, key, destination_db=k, replace=True)
        add = ownership.Store(dst, host=self.host.name)._add
        ids: list[str] = []
        while len(ids) < n:
            pipe = dst.pipeline(transaction=False)
            for _ in range(min(BATCH, n - len(ids))):
                i = len(ids)
                cid, t = secrets.token_hex(32), tenants[i % len(tenants)]
                add(keys=[], args=["container", cid, t, f"{t}_c{i}", self.host.name], client=pipe)
                ids.append(cid)
            pipe.execute()
        return ids, time.monotonic() - t0

    @contextlib.contextmanager
    def current(self, k: int):
        """Database ``k`` is db 0 -- the plugin's -- inside (``SWAPDB``: O(1),
        atomic; every client on db 0 sees it at once); swapped back after."""
        self.r.swapdb(0, k)
        try:
            yield
        finally:
            self.r.swapdb(0, k)

    def fingerprint(self, k: int) -> dict:
        """What the create case must leave as it found it in database ``k``:
        every key with its size, and the charges and alice's usage in full --
        but the audit stream (which every hook appends to), the counter naming
        pending charges (``fdcs:seq``, only ever incremented) and keys with a
        TTL (``fdcs:admitted:<key>``: what a request was admitted for, 120 s,
        the response hook's fallback: they expire on their own)."""
        r = self.db(k)
        out: dict = {}
        for key in r.scan_iter(count=1000):
            if key in ("fdcs:audit", "fdcs:seq"):
                continue
            t = r.type(key)
            if t == "string" and r.ttl(key) >= 0:
                continue
            out[key] = (r.hlen(key) if t == "hash" else r.zcard(key) if t == "zset" else
                        r.scard(key) if t == "set" else r.get(key) if t == "string" else t)
        out["fdcs:charge="] = r.hgetall("fdcs:charge")
        out[f"fdcs:usage:{self.tenant}="] = r.hgetall(f"fdcs:usage:{self.tenant}")
        return out

    # -- the end -----------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        if self.r_stack is not None:  # before Bench.cleanup may bring the stack down
            try:
                left = self.leftovers()
                if left:
                    problems.append(f"the stack's Redis holds benchmark keys: {left[:10]}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"check the stack's Redis: {e}")
            self.r_stack.close()
        problems += super().cleanup()  # the engine and the plugin first: they use the private Redis
        for c in self.dbs.values():
            c.close()
        if self.redis_pid is not None:
            try:
                if live_pid(self.rdir / "redis.pid") is not None:
                    terminate(self.redis_pid)
                if proc_alive(self.redis_pid) or _redis.ping(self.redis_port):
                    problems.append(f"the private redis-server (pid {self.redis_pid}) still runs")
            except Exception as e:  # noqa: BLE001 -- keep cleaning up
                problems.append(f"stop the private redis-server: {e}")
        shutil.rmtree(self.rdir, ignore_errors=True)
        if self.keep and hasattr(self, "env"):
            try:
                self.check_stack()
            except Exception as e:  # noqa: BLE001
                problems.append(f"the stack after the benchmark: {e}")
        return problems

    def leftovers(self) -> list[str]:
        """Anything of a benchmark host (``fdcsbench-*``) in the stack's Redis:
        keys naming one, fields of the cluster-wide hashes pointing at one.
        There must be none: the benchmark writes only to its private Redis."""
        r, h = self.r_stack, "fdcsbench-"
        out = [k for k in r.scan_iter(match=f"*{h}*", count=1000)]
        for key in ("fdcs:host:container", "fdcs:reconciled"):
            out += [f"{key}[{f}]" for f, v in r.hscan_iter(key, count=1000) if h in f or v.startswith(h)]
        out += [f"fdcs:cname[{f}]" for f, v in r.hscan_iter("fdcs:cname", count=1000) if v.startswith(h)]
        out += [f"fdcs:charge[{f}]" for f, v in r.hscan_iter("fdcs:charge", count=1000)
                if v.split(" ", 2)[1:2] and v.split(" ", 2)[1].startswith(h)]
        return out

    def check_stack(self) -> None:
        """Alice can still list her containers on the stack's own engine."""
        sock = self.env["FDCS_ENGINE_HOSTS"].split()[0].removeprefix("unix://")
        c = Conn(sock, self.headers)
        try:
            st, body = c.request("GET", list_url(self.tenant))
        finally:
            c.close()
        if st != 200:
            raise RuntimeError(f"alice's list on {sock}: {st} {body[:200]!r}")


def list_url(tenant: str) -> str:
    filters = json.dumps({"label": {f"{TENANT_LABEL}={tenant}": True}}, separators=(",", ":"))
    return f"{API}/containers/json?all=1&filters={urllib.parse.quote(filters)}"


# -- the hook client ------------------------------------------------------------------


class Hooks:
    """Hook calls on one keep-alive connection to the plugin; each checks Allow."""

    def __init__(self, b: ScaleBench):
        self.b = b
        self.c = Conn(str(b.host.plugin_socket))
        self.body = cli_create_body(b.tenant)
        self.n = 0
        self.pre = {
            "inspect name": authz_payload("GET", f"{API}/containers/{b.name}/json", b.headers),
            "inspect id": authz_payload("GET", f"{API}/containers/{b.cid[:12]}/json", b.headers),
            "list": authz_payload("GET", list_url(b.tenant), b.headers),
        }

    def call(self, hook: str, payload: bytes, want: bool = True) -> tuple[int, str]:
        t0 = time.perf_counter_ns()
        st, body = self.c.request("POST", f"/AuthZPlugin.{hook}", payload)
        t1 = time.perf_counter_ns()
        ans = json.loads(body) if st == 200 else {}
        if st != 200 or bool(ans.get("Allow")) != want:
            raise RuntimeError(f"{hook} {json.loads(payload)['RequestUri']}: {st} {ans.get('Msg') or body[:200]!r}")
        return t1 - t0, ans.get("Msg", "")

    def run(self, case: str, n: int, out: dict[str, list[int]]) -> None:
        if case != "create":
            p = self.pre[case]
            out.setdefault(case, []).extend(self.call("AuthZReq", p)[0] for _ in range(n))
            return
        for _ in range(n):
            self.n += 1
            uri = f"{API}/containers/create?name={self.b.tenant}_s{os.getpid()}x{self.n}"
            cid = secrets.token_hex(32)
            out.setdefault("create", []).append(self.call("AuthZReq", authz_payload("POST", uri, self.b.headers,
                                                                                     self.body))[0])
            res = json.dumps({"Id": cid, "Warnings": []}).encode()
            out.setdefault("create: response 201", []).append(
                self.call("AuthZRes", authz_payload("POST", uri, self.b.headers, self.body, 201, res))[0])
            rm = f"{API}/containers/{cid}"
            out.setdefault("rm: request", []).append(self.call("AuthZReq", authz_payload("DELETE", rm, self.b.headers))[0])
            out.setdefault("rm: response 204", []).append(
                self.call("AuthZRes", authz_payload("DELETE", rm, self.b.headers, None, 204))[0])

    def close(self) -> None:
        self.c.close()


def verify(b: ScaleBench, hooks: Hooks, ids: list[str], tenants: list[str]) -> str:
    """With the size's database current: one synthetic record of alice's
    resolves through the plugin (allowed by id prefix), one of another
    tenant's is refused (the positive and negative control); and Redis holds
    what ``Store.add`` would have written."""
    mine = next(i for i in range(len(ids)) if tenants[i % len(tenants)] == b.tenant)
    other = next(i for i in range(len(ids)) if tenants[i % len(tenants)] != b.tenant)
    ok = hooks.call("AuthZReq", authz_payload("GET", f"{API}/containers/{ids[mine][:12]}/json", b.headers))
    _, msg = hooks.call("AuthZReq", authz_payload("GET", f"{API}/containers/{ids[other][:12]}/json",
                                                  b.headers), want=False)
    res = b.store.resolve([("container", ids[other][:12], True)])[0]
    if res.how != "prefix" or res.matches != ((ids[other], tenants[other % len(tenants)]),):
        raise RuntimeError(f"synthetic record not resolved as written: {res}")
    return (f"alice's {ids[mine][:12]} allowed ({ok[0] / 1000:.0f} us), tenant "
            f"{tenants[other % len(tenants)][:8]}'s {ids[other][:12]} refused: {msg[:60]!r}")


# -- measuring -----------------------------------------------------------------------


class Size:
    """One size's figures, gathered over the rounds."""

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k  # records, database
        self.lat: dict[str, list[int]] = {}  # ns, every case and hook
        self.rounds: dict[str, list[float]] = {}  # case -> p50 us per round
        self.engine: list[int] = []  # ns, inspect by id through dockerd
        self.redis_ns = 0.0
        self.wall_ns = 0
        self.records_ms: list[float] = []
        self.host_records = 0

    def p(self, key: str, q: float) -> float:
        return pct(sorted(self.lat[key]), q)


def measure(b: ScaleBench, hooks: Hooks, sizes: list[Size], engine_at: set[int], args) -> None:
    """Rounds; in each, every size in turn (the order rotating by round), its
    database made current for its slice: at ``engine_at`` sizes the
    cross-check through dockerd, then the cases (their order rotating too).
    Then, as a phase of its own (100,000 records take a second of Redis's
    and our CPU and leave garbage: inside the rounds that would slow the
    next size's slice), ``Store.records()`` per size."""
    eng = Client(b.sockets["fdcs"], 1, b.headers)
    url = f"{API}/containers/{b.cid[:12]}/json"
    pids = [b.redis_pid] if b.redis_pid else []
    try:
        for sz in sizes:  # warm-up, uncounted
            with b.current(sz.k):
                for case in CASES:
                    hooks.run(case, max(1, args.warmup // (4 if case == "create" else 1)), {})
                if sz.n in engine_at:
                    eng.batch(url, 50)
        for rnd in range(args.rounds):
            k = rnd % len(sizes)
            for j, sz in enumerate(sizes[k:] + sizes[:k]):
                c = (rnd + j) % len(CASES)
                with b.current(sz.k):
                    gc.collect()
                    gc.disable()  # no collection of ours inside a timed slice
                    try:
                        # first: what dockerd leaves running after its batch then
                        # lands on this size's own cases, the first and largest alike
                        if sz.n in engine_at:
                            sz.engine += eng.batch(url, args.requests)[0]
                        r0, t0 = cpu_ns(pids), time.perf_counter_ns()
                        for case in CASES[c:] + CASES[:c]:
                            got: dict[str, list[int]] = {}
                            hooks.run(case, args.requests // (4 if case == "create" else 1), got)
                            for key, xs in got.items():
                                sz.lat.setdefault(key, []).extend(xs)
                            sz.rounds.setdefault(case, []).append(pct(sorted(got[case]), 50))
                        sz.wall_ns += time.perf_counter_ns() - t0
                        sz.redis_ns += cpu_ns(pids) - r0
                    finally:
                        gc.enable()
            say(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{sz.n}: {' '.join(f'{sz.rounds[c][-1]:.0f}' for c in CASES)} us" for sz in sizes))
    finally:
        eng.close()
    for _ in range(min(3, args.rounds)):
        for sz in sizes:
            with b.current(sz.k):
                t = time.perf_counter()
                sz.host_records = len(b.store.records("container"))
                sz.records_ms.append((time.perf_counter() - t) * 1000)


# -- report --------------------------------------------------------------------------


def report(b: ScaleBench, sizes: list[Size], args, verified: list[str], fill: dict[int, float],
           load: tuple[float, float], as_found: str) -> tuple[str, list[Row]]:
    lines = machine() + [
        f"command  {shlex.join([sys.executable, *sys.argv])}",
        f"plugin   fdcs-authz (the stack's {b.conf}, host id {b.host.name}, FDCS_REDIS_URL {b.redis_url}: a private "
        "redis-server of the benchmark's, no persistence; Keystone the stack's), its unix socket, one keep-alive "
        "connection, AuthZReq payloads as dockerd 20.10 sends them (alice's token and tenant)",
        f"records  one Redis database per size: a copy of the host's state after its reconcile and alice's container, "
        f"plus container records written with ownership._ADD on host {b.host.name}, over {args.tenants} tenants "
        "(alice's among them); " + ", ".join(f"{sz.n} in db {sz.k}: {fill[sz.n]:.1f} s to fill" for sz in sizes),
        f"run      {args.rounds} rounds; in each, every size in turn (order rotating by round), made current with "
        f"SWAPDB 0 <db> for its slice: {args.requests} hook calls per case (create: /4, each with its response and rm "
        f"hooks), cases in rotating order; {args.warmup} warm-up calls per case and size; "
        f"load average {load[0]:.2f} before, {load[1]:.2f} after",
    ] + [f"         verified at {sz.n}: {v}" for sz, v in zip(sizes, verified)] + [
        f"         {as_found}",
        "columns  hook latency in us (p50 / p99); redis = the private Redis's CPU share during the size's slices; "
        "records() = ms of one Store.records('container') of the host (what its reconcile pass reads: "
        "its own ids' index and their records), median of 3 after the rounds",
        "",
    ]
    keys = list(CASES) + ["create: response 201", "rm: request", "rm: response 204"]
    head = f"{'records':>8} | " + " | ".join(f"{k[:20]:>20}" for k in keys) + f" | {'redis':>6} {'records()':>9}"
    lines += [head, "-" * len(head)]
    for sz in sizes:
        cells = [f"{sz.p(k, 50):>9.0f} / {sz.p(k, 99):>8.0f}" for k in keys]
        lines.append(f"{sz.n:>8} | " + " | ".join(cells) + f" | {sz.redis_ns / max(1, sz.wall_ns):>6.0%} "
                     f"{statistics.median(sz.records_ms):>9.1f}")
    lines.append("")
    first, big = sizes[0], max(sizes, key=lambda s: s.n)
    rows = []
    for case in CASES:
        a, z = big.p(case, 50), first.p(case, 50)
        r = a / z
        rnd = statistics.median(x / y for x, y in zip(big.rounds[case], first.rounds[case]))
        met = r <= TARGET
        note = (f"request hook, direct to the plugin socket, sizes interleaved by round (SWAPDB); p99 "
                f"{big.p(case, 99):.0f} vs {first.p(case, 99):.0f} us; per-round ratio median {rnd:.2f}")
        if not met:
            note += (f"; Redis CPU {first.redis_ns / max(1, first.wall_ns):.0%} -> "
                     f"{big.redis_ns / max(1, big.wall_ns):.0%}, one Store.records() "
                     f"{statistics.median(first.records_ms):.0f} -> {statistics.median(big.records_ms):.0f} ms")
        rows.append(Row(bench="scale", case=f"{case} hook, {big.n} records", metric="p50 us", value=round(a, 1),
                        refs={f"{first.n} records": round(z, 1)}, ratio_of=f"{first.n} records",
                        ratio=round(r, 3), target=f"<= {TARGET}", met=met, note=note))
        lines.append(f"target p50 at {big.n} / p50 at {first.n} <= {TARGET}: {case}: {r:.2f} (rounds' median "
                     f"{rnd:.2f}) -- {'meets' if met else 'MISSES'} the target")
    if first is not big and first.engine and big.engine:
        e0, e1 = sorted(first.engine), sorted(big.engine)
        r = pct(e1, 50) / pct(e0, 50)
        lines.append(f"cross-check through dockerd (interleaved): GET /containers/<12 hex>/json, p50 {pct(e0, 50):.0f} "
                     f"us at {first.n}, {pct(e1, 50):.0f} us at {big.n}: {r:.2f}; p99 {pct(e0, 99):.0f} / "
                     f"{pct(e1, 99):.0f} us")
        rows.append(Row(bench="scale", case=f"inspect id through dockerd, {big.n} records", metric="p50 us",
                        value=round(pct(e1, 50), 1), refs={f"{first.n} records": round(pct(e0, 50), 1)},
                        ratio_of=f"{first.n} records", ratio=round(r, 3),
                        note="cross-check: the whole engine path (two hooks) at the smallest and largest size, "
                             "interleaved by round"))
    return "\n".join(lines), rows


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", metavar="N,...",
                    help="record counts, one Redis database each; ratios are of the largest over the first "
                         "(default 10,10000,100000; --quick: 10,10000)")
    ap.add_argument("--tenants", type=int, default=1000, help="tenants the records are spread over (default 1000)")
    ap.add_argument("--rounds", type=int, default=10, metavar="N",
                    help="rounds, each over every size (default 10)")
    ap.add_argument("--requests", type=int, default=200, metavar="M",
                    help="hook calls per case, size and round (default 200; create: a quarter, each with 3 more hooks)")
    ap.add_argument("--warmup", type=int, default=100, metavar="W", help="uncounted calls per case and size")
    ap.add_argument("--quick", action="store_true", help="a smoke run: sizes 10,10000, 3 rounds x 40 calls")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    ap.add_argument("--json", metavar="FILE", help="write the summary rows (run.py's table) to FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.warmup = 3, 40, 20
    args.sizes = args.sizes or ("10,10000" if args.quick else "10,10000,100000")
    ns = [int(x) for x in args.sizes.split(",") if x.strip()]
    if (not ns or min(ns) < 2 or len(set(ns)) != len(ns) or len(ns) > 15 or args.tenants < 2 or args.rounds < 1
            or args.requests < 4):
        ap.error("--sizes: 1 to 15 distinct counts, each at least 2; --tenants at least 2, --rounds 1, --requests 4")
    if os.geteuid() != 0:
        ap.error("must run as root (it starts dockerd in a network namespace)")

    b = ScaleBench(args)

    def work() -> None:
        b.start()
        tenants = tenant_ids(secrets.token_hex(4), args.tenants)
        tenants[0] = b.tenant  # alice's tenant holds its share of the records
        sizes = [Size(n, k) for k, n in enumerate(ns, start=1)]
        fill: dict[int, float] = {}
        ids: dict[int, list[str]] = {}
        for sz in sizes:
            ids[sz.n], fill[sz.n] = b.fill(sz.k, sz.n, tenants)
            say(f"db {sz.k}: {sz.n} records ({fill[sz.n]:.1f} s)")
        hooks = Hooks(b)
        try:
            verified = []
            for sz in sizes:  # a positive and a negative control in every database
                with b.current(sz.k):
                    verified.append(verify(b, hooks, ids[sz.n], tenants))
                say(f"verified at {sz.n}: {verified[-1]}")
            before = {sz.k: b.fingerprint(sz.k) for sz in sizes}
            load0 = os.getloadavg()[0]
            measure(b, hooks, sizes, {sizes[0].n, max(ns)}, args)
            load1 = os.getloadavg()[0]
        finally:
            hooks.close()
        changed = [f"db {sz.k} ({sz.n}): " + ", ".join(
            f"{key} {before[sz.k].get(key)!r} -> {after.get(key)!r}"
            for key in sorted(set(before[sz.k]) | set(after)) if before[sz.k].get(key) != after.get(key))[:400]
            for sz in sizes for after in [b.fingerprint(sz.k)] if after != before[sz.k]]
        as_found = ("each database as found after the run (keys and their sizes, the charges, alice's usage): "
                    + ("yes" if not changed else "NO: " + "; ".join(changed)))
        text, rows = report(b, sizes, args, verified, fill, (load0, load1), as_found)
        print(text, flush=True)
        if args.json:
            write_rows(args.json, rows)
        if changed:
            raise RuntimeError("the create case changed a database: " + "; ".join(changed))

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
