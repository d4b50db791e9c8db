#!/usr/bin/env python3
"""Does the plugin's hook latency stay flat as Redis fills up?

    python3 benchmarks/scale.py [--sizes 10,10000,100000] [--tenants 1000] [--rounds N]
                                [--requests M] [--keep-stack DIR] [--json FILE] [--quick]

The plugin's request hook (``POST /AuthZPlugin.AuthZReq`` on its unix
socket, keep-alive, one connection, the payload dockerd 20.10 sends: moby
``pkg/authorization``'s JSON with the body base64) is timed with 10, 10,000
and 100,000 container ownership records spread over 1,000 tenants, then
again with 10 (drift).  Cases:

* ``inspect name`` -- ``GET /containers/<tenant>_scale/json`` (the scoped name);
* ``inspect id``   -- ``GET /containers/<12 hex>/json`` (a Redis id-prefix look-up);
* ``list``         -- ``GET /containers/json?all=1&filters=<the tenant label>``;
* ``create``       -- ``POST /containers/create?name=<tenant>_sN`` with the body
  the docker CLI sends (quota admission, name reservation); then, untimed
  in the row but reported, its ``AuthZRes`` (201: ownership record, charge
  settled) and the ``DELETE`` hooks that remove it again.

The records must stay put while measured, and every stack host's reconciler
removes records of its host that its engine lacks (every 5 s on the local
stack).  So the records live on a host of the benchmark's own: the real
plugin (``fdcs-authz`` with the stack's ``fdcs.toml``; host id, plugin name,
socket and metrics port by the devstack's own environment overrides),
beside it a dockerd using it (``plugin_inspect.py``'s ``Bench``), marked
complete by one ``fdcs-reconciler --once`` pass over it, with one real
container of alice's (``<tenant>_scale``).  Synthetic records are written
with the product's own Lua script (``ownership._ADD``, pipelined), 32-hex
tenant ids (alice's among them), 64-hex ids and scoped names; one synthetic
record of alice's is resolved through the plugin (allowed) and one of
another tenant (refused) before measuring.  As a cross-check, ``GET
/containers/<12 hex>/json`` through that dockerd is timed at the first and
the largest size.  Reported per size: p50/p99 of each case, the stack's
reconciler CPU and one ``Store.records()`` read (what a reconcile pass
reads: every host's records); the rows: p50 at the largest size over p50 at
10 (target <= 1.1).

Every synthetic record, the benchmark host's records and its reconcile mark
are removed at the end (and that nothing is left is checked), the plugin and
engine stopped, the stack left running with ``--keep-stack DIR`` (and
checked to still answer alice) or brought down.  Root only.
"""

from __future__ import annotations

import argparse
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
import time
import urllib.parse
from pathlib import Path

import redis

from authz_plugin import ownership
from authz_plugin.devstack import _engine
from authz_plugin.devstack._procs import clean_env
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
    real FDCS plugin instead, our records' host; the second is unused."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.host = self.hosts["allow-all"]
        self.synthetic: list[str] = []  # ids written, in order
        self.marked = False
        self.extra: set[str] = set()  # ids the create case recorded and has not removed yet
        self.r: redis.Redis | None = None

    def start(self) -> None:
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="devstack") as pool:
            self.stack_started = True
            up = pool.submit(self.stack.up, None if self.keep else 1)
            _engine.build_busybox_tar(self.layout.busybox_tar, self.cmds)
            say(f"stack: waiting for fdcs-devstack up in {self.stack.dir}")
            say(f"stack: up ({up.result():.0f} s)")
        env = self.stack.env()
        self.env = env
        self.conf = env["FDCS_CONF"]
        self.alice_config = env["FDCS_CONFIG_A1"]
        self.tenant = env["FDCS_TENANT_A"]
        cfg = json.loads((Path(self.alice_config) / "config.json").read_text())
        self.headers = {**cfg["HttpHeaders"], "User-Agent": "Docker-Client/20.10.24+dfsg1 (linux)"}
        self.r = redis.Redis.from_url(env["FDCS_REDIS_URL"], decode_responses=True)
        self.store = ownership.Store(self.r, host=self.host.name)
        # the engine imports busybox as administrator through our plugin: the stack's admin key
        self.layout.admin_key_dir.mkdir(exist_ok=True)
        shutil.copy(Path(self.stack.dir) / "admin-key" / "config.json", self.layout.admin_key_dir / "config.json")
        self.plugin_pid, self.metrics_url = start_fdcs_plugin(
            self.cmds, self.host, self.conf, self.tmp / "run" / f"plugin-{self.host.suffix}.pid")
        self.plugin_pid_fdcs = self.plugin_pid
        say(f"plugin: fdcs-authz pid {self.plugin_pid} on {self.host.plugin_socket}, host id {self.host.name}")
        self._start_engine("fdcs-bench", self.host, with_plugin=True)
        self.sockets["fdcs"] = str(self.host.engine_socket)
        # the host's first complete reconcile (creates are refused before it)
        self.marked = True
        out = subprocess.run([_console_script("fdcs-reconciler"), "--config", self.conf, "--once"],
                             env=clean_env({"FDCS_HOST_ID": self.host.name,
                                            "FDCS_RECONCILER_ENGINE_SOCKET": str(self.host.engine_socket),
                                            "FDCS_RECONCILER_METRICS_LISTEN": ""}),
                             capture_output=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"fdcs-reconciler --once: {out.stderr.decode(errors='replace')[-500:]}")
        self.name = f"{self.tenant}_scale"
        self.cid = self._docker("fdcs", "run", "-d", "--name", self.name, "--label", f"{TENANT_LABEL}={self.tenant}",
                                "--network", "none", "--pids-limit", "100", "--cgroupns", "private",
                                "busybox", "sleep", "3600").strip()
        say(f"container {self.name} {self.cid[:12]} on {self.host.name}")
        self.rec_pid = self.stack.pid("reconciler-h1")
        self.redis_pid = self.stack.pid("redis")

    # -- records ---------------------------------------------------------------------

    def populate(self, target: int, tenants: list[str]) -> float:
        """Add or remove synthetic records until there are ``target``;
        returns the seconds it took."""
        t0 = time.monotonic()
        add = self.store._add  # the product's script (ownership._ADD), as Store.add runs it
        while len(self.synthetic) < target:
            pipe = self.r.pipeline(transaction=False)
            n = min(BATCH, target - len(self.synthetic))
            new = []
            for _ in range(n):
                i = len(self.synthetic) + len(new)
                cid, t = secrets.token_hex(32), tenants[i % len(tenants)]
                add(keys=[], args=["container", cid, t, f"{t}_c{i}", self.host.name], client=pipe)
                new.append(cid)
            pipe.execute()
            self.synthetic += new
        if len(self.synthetic) > target:
            self.remove(self.synthetic[target:])
            del self.synthetic[target:]
        return time.monotonic() - t0

    def remove(self, ids: list[str]) -> None:
        rm = self.store._remove  # ownership._REMOVE, as Store.remove runs it
        for k in range(0, len(ids), BATCH):
            pipe = self.r.pipeline(transaction=False)
            for cid in ids[k:k + BATCH]:
                rm(keys=[], args=["container", cid, self.host.name], client=pipe)
            pipe.execute()

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        if self.r is not None:
            try:
                self.remove(self.synthetic + sorted(self.extra))
                self.synthetic.clear()
                if self.marked:
                    # the container, its charge, the reconcile mark, the host's keys
                    self.store.retire_host()
                left = self.leftovers()
                if left:
                    problems.append(f"left in Redis: {left[:10]}")
            except Exception as e:  # noqa: BLE001 -- keep cleaning up
                problems.append(f"remove the synthetic records: {e}")
        problems += super().cleanup()
        if self.r is not None and self.keep:
            try:
                self.check_stack()
            except Exception as e:  # noqa: BLE001
                problems.append(f"the stack after the benchmark: {e}")
        return problems

    def leftovers(self) -> list[str]:
        """Anything of our host's left in Redis (keys naming it, fields of
        the cluster-wide hashes pointing at it)."""
        h = self.host.name
        out = [k for k in self.r.scan_iter(match=f"*{h}*", count=1000)]
        for key in ("fdcs:host:container", "fdcs:reconciled"):
            out += [f"{key}[{f}]" for f, v in self.r.hscan_iter(key, count=1000) if h in (f, v.split(" ")[0])]
        out += [f"fdcs:cname[{f}]" for f, v in self.r.hscan_iter("fdcs:cname", count=1000) if v.startswith(h + " ")]
        out += [f"fdcs:charge[{f}]" for f, v in self.r.hscan_iter("fdcs:charge", count=1000)
                if v.split(" ", 2)[1:2] == [h]]
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
            self.b.extra.add(cid)
            out.setdefault("create: response 201", []).append(
                self.call("AuthZRes", authz_payload("POST", uri, self.b.headers, self.body, 201, res))[0])
            rm = f"{API}/containers/{cid}"
            out.setdefault("rm: request", []).append(self.call("AuthZReq", authz_payload("DELETE", rm, self.b.headers))[0])
            out.setdefault("rm: response 204", []).append(
                self.call("AuthZRes", authz_payload("DELETE", rm, self.b.headers, None, 204))[0])
            self.b.extra.discard(cid)

    def close(self) -> None:
        self.c.close()


def verify(b: ScaleBench, hooks: Hooks, tenants: list[str]) -> str:
    """One synthetic record of alice's resolves through the plugin (allowed
    by id prefix), one of another tenant's is refused; and Redis holds
    exactly what ``Store.add`` would have written."""
    mine = next(i for i, cid in enumerate(b.synthetic) if tenants[i % len(tenants)] == b.tenant)
    other = next(i for i, cid in enumerate(b.synthetic) if tenants[i % len(tenants)] != b.tenant)
    ok = hooks.call("AuthZReq", authz_payload("GET", f"{API}/containers/{b.synthetic[mine][:12]}/json", b.headers))
    _, msg = hooks.call("AuthZReq", authz_payload("GET", f"{API}/containers/{b.synthetic[other][:12]}/json",
                                                  b.headers), want=False)
    res = b.store.resolve([("container", b.synthetic[other][:12], True)])[0]
    if res.how != "prefix" or res.matches != ((b.synthetic[other], tenants[other % len(tenants)]),):
        raise RuntimeError(f"synthetic record not resolved as written: {res}")
    return (f"verified: alice's synthetic {b.synthetic[mine][:12]} allowed ({ok[0] / 1000:.0f} us); "
            f"tenant {tenants[other % len(tenants)][:8]}'s {b.synthetic[other][:12]} refused: {msg[:90]!r}")


# -- measuring -----------------------------------------------------------------------


def measure_level(b: ScaleBench, hooks: Hooks, rounds: int, requests: int, warmup: int) -> dict:
    for case in CASES:
        hooks.run(case, max(1, warmup // (4 if case == "create" else 1)), {})
    out: dict[str, list[int]] = {}
    per_round: dict[str, list[float]] = {}
    c0, r0, t0 = cpu_ns([b.rec_pid] if b.rec_pid else []), cpu_ns([b.redis_pid] if b.redis_pid else []), \
        time.monotonic()
    for rnd in range(rounds):
        k = rnd % len(CASES)
        for case in CASES[k:] + CASES[:k]:
            got: dict[str, list[int]] = {}
            hooks.run(case, requests // (4 if case == "create" else 1), got)
            for key, xs in got.items():
                out.setdefault(key, []).extend(xs)
            per_round.setdefault(case, []).append(pct(sorted(got[case]), 50))
    wall = time.monotonic() - t0
    t = time.perf_counter()
    n_records = len(b.store.records("container"))
    records_ms = (time.perf_counter() - t) * 1000
    return {"lat": {k: sorted(v) for k, v in out.items()}, "rounds": per_round,
            "rec_cpu": (cpu_ns([b.rec_pid] if b.rec_pid else []) - c0) / 1e9 / wall,
            "redis_cpu": (cpu_ns([b.redis_pid] if b.redis_pid else []) - r0) / 1e9 / wall,
            "records_ms": records_ms, "host_records": n_records}


def engine_inspect(b: ScaleBench, requests: int, rounds: int) -> list[int]:
    c = Client(b.sockets["fdcs"], 1, b.headers)
    try:
        url = f"{API}/containers/{b.cid[:12]}/json"
        c.batch(url, 50)
        return sorted(x for _ in range(rounds) for x in c.batch(url, requests)[0])
    finally:
        c.close()


# -- report --------------------------------------------------------------------------


def report(b: ScaleBench, levels: list[tuple[int, dict]], engine: dict[int, list[int]], args, verified: str,
           fill: dict[int, float], load: tuple[float, float]) -> tuple[str, list[Row]]:
    lines = machine() + [
        f"command  {shlex.join([sys.executable, *sys.argv])}",
        f"plugin   fdcs-authz (the stack's {b.conf}, host id {b.host.name}), its unix socket, one keep-alive "
        "connection, AuthZReq payloads as dockerd 20.10 sends them (alice's token and tenant)",
        f"records  container records written with ownership._ADD on host {b.host.name}, over {args.tenants} "
        "tenants (alice's among them); " + ", ".join(f"{n}: {fill[n]:.1f} s to fill" for n in fill),
        f"run      per size: {args.rounds} rounds x {args.requests} hook calls per case (create: /4, each with its "
        f"response and rm hooks), cases in rotating order, {args.warmup} warm-up calls per case; sizes in "
        f"order {', '.join(str(n) for n, _ in levels)}; load average {load[0]:.2f} before, {load[1]:.2f} after",
        f"         {verified}",
        "columns  hook latency in us (p50 / p99); rec cpu = the stack's reconciler's CPU share, redis cpu = Redis's, "
        "during the size's measurement; records() = ms of one Store.records('container') of the stack's host "
        "(what every reconcile pass reads: HGETALL of every host's records)",
        "",
    ]
    keys = list(CASES) + ["create: response 201", "rm: request", "rm: response 204"]
    head = f"{'records':>8} | " + " | ".join(f"{k[:20]:>20}" for k in keys) + \
        f" | {'rec cpu':>7} {'redis':>6} {'records()':>9}"
    lines += [head, "-" * len(head)]
    for n, lv in levels:
        cells = [f"{pct(lv['lat'][k], 50):>9.0f} / {pct(lv['lat'][k], 99):>8.0f}" for k in keys]
        lines.append(f"{n:>8} | " + " | ".join(cells) + f" | {lv['rec_cpu']:>6.0%} {lv['redis_cpu']:>6.0%} "
                     f"{lv['records_ms']:>8.1f}")
    lines.append("")
    first, big = levels[0][1], max(levels[:-1] or levels, key=lambda x: x[0])
    nbig = big[0]
    rows = []
    for case in CASES:
        a, z = pct(big[1]["lat"][case], 50), pct(first["lat"][case], 50)
        r = a / z
        rnd = statistics.median(x / y for x, y in zip(big[1]["rounds"][case], first["rounds"][case]))
        drift = pct(levels[-1][1]["lat"][case], 50) / z if len(levels) > 2 else float("nan")
        met = r <= TARGET
        note = (f"request hook, direct to the plugin socket; p99 {pct(big[1]['lat'][case], 99):.0f} vs "
                f"{pct(first['lat'][case], 99):.0f} us; per-round ratio median {rnd:.2f}; back at "
                f"{levels[-1][0]} afterwards: {drift:.2f} of the first")
        if not met:
            # what else ran: the stack's reconciler reads every host's records each pass
            note += (f"; during the sizes: stack reconciler CPU {first['rec_cpu']:.0%} -> {big[1]['rec_cpu']:.0%}, "
                     f"Redis CPU {first['redis_cpu']:.0%} -> {big[1]['redis_cpu']:.0%}, one Store.records() "
                     f"{first['records_ms']:.0f} -> {big[1]['records_ms']:.0f} ms")
        rows.append(Row(bench="scale", case=f"{case} hook, {nbig} records", metric="p50 us", value=round(a, 1),
                        refs={f"{levels[0][0]} records": round(z, 1)}, ratio_of=f"{levels[0][0]} records",
                        ratio=round(r, 3), target=f"<= {TARGET}", met=met, note=note))
        lines.append(f"target p50 at {nbig} / p50 at {levels[0][0]} <= {TARGET}: {case}: {r:.2f} (rounds' median "
                     f"{rnd:.2f}; {levels[-1][0]} again: {drift:.2f}) -- {'meets' if met else 'MISSES'} the target")
    if len(engine) == 2:
        (n0, e0), (n1, e1) = sorted(engine.items())
        r = pct(e1, 50) / pct(e0, 50)
        lines.append(f"cross-check through dockerd: GET /containers/<12 hex>/json, p50 {pct(e0, 50):.0f} us at {n0}, "
                     f"{pct(e1, 50):.0f} us at {n1}: {r:.2f}; p99 {pct(e0, 99):.0f} / {pct(e1, 99):.0f} us")
        rows.append(Row(bench="scale", case=f"inspect id through dockerd, {n1} records", metric="p50 us",
                        value=round(pct(e1, 50), 1), refs={f"{n0} records": round(pct(e0, 50), 1)},
                        ratio_of=f"{n0} records", ratio=round(r, 3),
                        note="cross-check: the whole engine path (two hooks) at the smallest and largest size"))
    return "\n".join(lines), rows


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", metavar="N,...",
                    help="record counts, in order; the first is measured again at the end (default 10,10000,100000; "
                         "--quick: 10,10000)")
    ap.add_argument("--tenants", type=int, default=1000, help="tenants the records are spread over (default 1000)")
    ap.add_argument("--rounds", type=int, default=10, metavar="N", help="rounds per size (default 10)")
    ap.add_argument("--requests", type=int, default=200, metavar="M",
                    help="hook calls per case and round (default 200; create: a quarter, each with 3 more hooks)")
    ap.add_argument("--warmup", type=int, default=100, metavar="W", help="uncounted calls per case and size")
    ap.add_argument("--quick", action="store_true", help="a smoke run: sizes 10,10000, 3 rounds x 40 calls")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    ap.add_argument("--json", metavar="FILE", help="write the summary rows (run.py's table) to FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.warmup = 3, 40, 20
    args.sizes = args.sizes or ("10,10000" if args.quick else "10,10000,100000")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if not sizes or min(sizes) < 2 or args.tenants < 2 or args.rounds < 1 or args.requests < 4:
        ap.error("--sizes at least 2 each, --tenants at least 2, --rounds 1, --requests 4")
    if os.geteuid() != 0:
        ap.error("must run as root (it starts dockerd in a network namespace)")

    b = ScaleBench(args)

    def work() -> None:
        b.start()
        tenants = tenant_ids(secrets.token_hex(4), args.tenants)
        tenants[0] = b.tenant  # alice's tenant holds its share of the records
        load0 = os.getloadavg()[0]
        hooks = Hooks(b)
        levels, engine, fill = [], {}, {}
        verified = ""
        try:
            order = sizes + ([sizes[0]] if len(sizes) > 1 else [])
            for i, n in enumerate(order):
                took = b.populate(n, tenants)
                fill.setdefault(n, took)
                say(f"{n} records ({took:.1f} s); measuring")
                if not verified:
                    verified = verify(b, hooks, tenants)
                    say(verified)
                if i == 0 or n == max(sizes) and n not in engine:
                    engine[n] = engine_inspect(b, args.requests, args.rounds)
                levels.append((n, measure_level(b, hooks, args.rounds, args.requests, args.warmup)))
                lv = levels[-1][1]
                say(f"{n} records: " + ", ".join(f"{c} {pct(lv['lat'][c], 50):.0f} us" for c in CASES))
        finally:
            hooks.close()
        text, rows = report(b, levels, engine, args, verified, fill, (load0, os.getloadavg()[0]))
        print(text, flush=True)
        if args.json:
            write_rows(args.json, rows)

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
