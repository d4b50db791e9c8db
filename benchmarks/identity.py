#!/usr/bin/env python3
"""What a new token costs, and that a known one costs Keystone nothing.

    python3 benchmarks/identity.py [--tokens N] [--warm W] [--hot R] [--connections C]
                                   [--keep-stack DIR] [--json FILE] [--quick]

The real plugin (``fdcs-authz`` with the stack's ``fdcs.toml``; host id,
plugin name, socket and metrics port by the devstack's environment
overrides, as ``scale.py`` starts it) is given ``FDCS_KEYSTONE_URL`` =
a counting relay started here in front of the stack's Keystone: every HTTP
request the plugin sends to Keystone passes the relay, which parses the
request heads (and skips their bodies by ``Content-Length``) and counts them.
Why a relay: it counts this plugin's calls and nothing else (Keystone's own
log mixes the stack's plugins, scoper and reconciler), at the wire, without
trusting the plugin's code; its positive control is the cold phase, where
each new token must show exactly one call (``GET /v3/auth/tokens``, a
project-scoped token).  The plugin's ``fdcs_identity_events_total``
(``miss``, ``hit``) is read before and after each phase as a second,
in-process count.

1. ``--tokens`` fresh project-scoped tokens of alice are issued in advance
   (``authz_plugin.login.password_token``, straight to Keystone).
2. cold: each token's first request (``GET /containers/json`` with alice's
   tenant label filter: decided without Redis, so the time is the token's),
   then ``--warm`` repeats of it (warm), all on one keep-alive connection
   to the plugin's socket: p50/p99 of cold and of warm, relay calls.
3. hot path: on ``--connections`` keep-alive connections (gunicorn's
   workers each keep their own cache: every connection first warms every
   token, until a whole pass makes no call, at most 5 passes), ``--hot``
   requests round-robin over tokens and connections: relay calls (target 0).

Rows: cold validation p50 (ref: warm p50), Keystone calls per 1000 warm
requests (target == 0; ref: per 1000 cold).  Everything started (plugin,
relay) is stopped in a ``finally``; the stack is left running with
``--keep-stack DIR``, else brought down.  Root only.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from authz_plugin.login import password_token

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (Conn, Row, authz_payload, machine, pct, progress, run_bench,  # noqa: E402
                     start_fdcs_plugin, write_rows)
from plugin_inspect import TENANT_LABEL, Bench  # noqa: E402

API = "/v1.41"

say = progress("identity")


# -- the counting relay ----------------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 to ``upstream`` (host, port) that counts the
    HTTP/1.1 requests passing it (heads parsed, bodies skipped by
    ``Content-Length``; Keystone clients send no chunked bodies)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.requests: list[str] = []  # request lines, in order
        self.conns: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            threading.Thread(target=self._up, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    def _up(self, c: socket.socket, u: socket.socket) -> None:
        """Client to Keystone, counting each request head."""
        buf, skip = b"", 0
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                u.sendall(data)
                buf += data
                while True:
                    if skip:
                        k = min(skip, len(buf))
                        buf, skip = buf[k:], skip - k
                        if skip:
                            break
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        break
                    head, buf = buf[:i].decode("latin-1"), buf[i + 4:]
                    m = re.search(r"(?im)^content-length:\s*(\d+)", head)
                    skip = int(m.group(1)) if m else 0
                    line = head.split("\r\n", 1)[0]
                    with self.lock:
                        self.requests.append(" ".join(line.split(" ")[:2]))
        except OSError:
            pass
        finally:
            self._close(c, u)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            self._close(a, b)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.lsock.close()
        with self.lock:
            for s in self.conns:
                try:
                    s.close()
                except OSError:
                    pass


# -- the benchmark ---------------------------------------------------------------------


class IdentityBench(Bench):
    """``plugin_inspect.Bench``'s first host runs the real FDCS plugin (no
    engine: the hooks are called directly); the second is unused."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.host = self.hosts["allow-all"]
        self.relay: Relay | None = None

    def start(self) -> None:
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="devstack") as pool:
            self.stack_started = True
            up = pool.submit(self.stack.up, None if self.keep else 1)
            say(f"stack: waiting for fdcs-devstack up in {self.stack.dir}")
            say(f"stack: up ({up.result():.0f} s)")
        env = self.stack.env()
        self.env = env
        self.tenant = env["FDCS_TENANT_A"]
        self.keystone = env["FDCS_KEYSTONE_URL"]
        u = urllib.parse.urlsplit(self.keystone)
        self.relay = Relay((u.hostname, u.port))
        relayed = urllib.parse.urlunsplit((u.scheme, f"127.0.0.1:{self.relay.port}", u.path, "", ""))
        self.plugin_pid, self.metrics_url = start_fdcs_plugin(
            self.cmds, self.host, env["FDCS_CONF"], self.tmp / "run" / f"plugin-{self.host.suffix}.pid",
            env={"FDCS_KEYSTONE_URL": relayed})
        say(f"plugin: fdcs-authz pid {self.plugin_pid} on {self.host.plugin_socket}, Keystone through the relay "
            f"{relayed} -> {self.keystone}")
        filters = json.dumps({"label": {f"{TENANT_LABEL}={self.tenant}": True}}, separators=(",", ":"))
        self.url = f"{API}/containers/json?all=1&filters={urllib.parse.quote(filters)}"

    def cleanup(self) -> list[str]:
        if self.relay is not None:
            self.relay.close()
        return super().cleanup()

    def tokens(self, n: int) -> list[str]:
        return [password_token(self.keystone, "alice", self.env["FDCS_PASSWORD"], project_id=self.tenant)[0]
                for _ in range(n)]

    def payload(self, token: str) -> bytes:
        return authz_payload("GET", self.url, {"User-Agent": "Docker-Client/20.10.24+dfsg1 (linux)",
                                               "X-Auth-Token": token, "X-Auth-TenantId": self.tenant})

    def identity_events(self) -> dict[str, float]:
        """The plugin's ``fdcs_identity_events_total`` by event (its metrics),
        once settled: the workers apply their counts from a background thread
        at most ``metrics.FLUSH_LINGER`` late, so read until two reads that
        far apart agree (at most about 5 s)."""
        from authz_plugin.metrics import FLUSH_LINGER
        last = self._read_events()
        for _ in range(int(5 / (FLUSH_LINGER + 0.05)) + 1):
            time.sleep(FLUSH_LINGER + 0.05)
            now = self._read_events()
            if now == last:
                return now
            last = now
        return last

    def _read_events(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        except OSError:
            return out
        for line in text.splitlines():
            m = re.match(r'fdcs_identity_events_total\{[^}]*event="(\w+)"[^}]*\}\s+(\S+)', line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(2))
        return out


def hook(c: Conn, payload: bytes) -> int:
    t0 = time.perf_counter_ns()
    st, body = c.request("POST", "/AuthZPlugin.AuthZReq", payload)
    t1 = time.perf_counter_ns()
    ans = json.loads(body) if st == 200 else {}
    if not ans.get("Allow"):
        raise RuntimeError(f"AuthZReq: {st} {ans.get('Msg') or body[:200]!r}")
    return t1 - t0


def delta(a: dict[str, float], b: dict[str, float], k: str) -> int:
    return int(b.get(k, 0) - a.get(k, 0))


def measure(b: IdentityBench, args) -> dict:
    t = time.monotonic()
    tokens = b.tokens(args.tokens)
    say(f"{len(tokens)} fresh tokens in {time.monotonic() - t:.1f} s")
    payloads = [b.payload(tok) for tok in tokens]
    assert b.relay is not None
    out: dict = {}
    c = Conn(str(b.host.plugin_socket))
    try:
        hook(c, authz_payload("GET", f"{API}/_ping", {}))  # the connection, the worker's first request
        # cold: each token's first use, then its warm repeats, on one connection (one worker)
        m0, k0 = b.identity_events(), b.relay.count
        cold, warm, calls_per_token = [], [], []
        for p in payloads:
            k = b.relay.count
            cold.append(hook(c, p))
            calls_per_token.append(b.relay.count - k)
            warm += [hook(c, p) for _ in range(args.warm)]
        m1, k1 = b.identity_events(), b.relay.count
        out.update(cold=sorted(cold), warm=sorted(warm), cold_calls=k1 - k0, calls_per_token=calls_per_token,
                   cold_misses=delta(m0, m1, "miss"), cold_hits=delta(m0, m1, "hit"),
                   cold_requests=b.relay.requests[k0:k1])
        say(f"cold: p50 {pct(sorted(cold), 50):.0f} us, warm p50 {pct(sorted(warm), 50):.0f} us, "
            f"{k1 - k0} Keystone calls for {len(tokens)} new tokens")
    finally:
        c.close()
    # hot path: several connections, every token warmed on every one, then counted
    conns = [Conn(str(b.host.plugin_socket)) for _ in range(args.connections)]
    try:
        passes = []
        for _ in range(5):
            k = b.relay.count
            for cc in conns:
                for p in payloads:
                    hook(cc, p)
            passes.append(b.relay.count - k)
            if passes[-1] == 0:
                break
        m2, k2 = b.identity_events(), b.relay.count
        hot = []
        for i in range(args.hot):
            hot.append(hook(conns[i % len(conns)], payloads[(i // len(conns)) % len(payloads)]))
        m3, k3 = b.identity_events(), b.relay.count
        out.update(warm_passes=passes, hot=sorted(hot), hot_calls=k3 - k2, hot_n=args.hot,
                   hot_misses=delta(m2, m3, "miss"), hot_hits=delta(m2, m3, "hit"))
        say(f"hot: {args.hot} requests, {k3 - k2} Keystone calls (warm-up passes made {passes})")
    finally:
        for cc in conns:
            cc.close()
    return out


def report(b: IdentityBench, r: dict, args, load: tuple[float, float]) -> tuple[str, list[Row]]:
    n = len(r["cold"])
    cold50, warm50 = pct(r["cold"], 50), pct(r["warm"], 50)
    per_k_cold = r["cold_calls"] * 1000 / n
    per_k_hot = r["hot_calls"] * 1000 / r["hot_n"]
    kinds = sorted(set(r["cold_requests"]))
    lines = machine() + [
        f"command  {shlex.join([sys.executable, *sys.argv])}",
        f"plugin   fdcs-authz (the stack's fdcs.toml; host id {b.host.name}), its unix socket, AuthZReq for GET "
        "/containers/json with alice's label filter (no Redis); Keystone through a counting relay "
        f"(127.0.0.1:{b.relay.port if b.relay else '?'} -> {b.keystone})",
        f"run      {n} fresh tokens of alice (project-scoped, issued in advance); cold = each token's first request, "
        f"warm = its next {args.warm} on the same connection; hot path: {args.hot} requests over "
        f"{args.connections} connections after every token was warmed on every connection; load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after",
        "",
        f"cold  p50 {cold50 / 1000:.2f} ms  p99 {pct(r['cold'], 99) / 1000:.2f} ms  (n={n})",
        f"warm  p50 {warm50 / 1000:.2f} ms  p99 {pct(r['warm'], 99) / 1000:.2f} ms  (n={len(r['warm'])})",
        f"hot   p50 {pct(r['hot'], 50) / 1000:.2f} ms  p99 {pct(r['hot'], 99) / 1000:.2f} ms  (n={len(r['hot'])})",
        f"Keystone calls (relay): cold phase {r['cold_calls']} for {n} new tokens (per token: "
        f"min {min(r['calls_per_token'])}, max {max(r['calls_per_token'])}; requests seen: {', '.join(kinds)}); "
        f"warm-up passes {r['warm_passes']}; hot path {r['hot_calls']} in {r['hot_n']} requests",
        f"plugin's own count (fdcs_identity_events_total): cold phase misses {r['cold_misses']}, hits "
        f"{r['cold_hits']}; hot path misses {r['hot_misses']}, hits {r['hot_hits']}",
        "",
    ]
    control = r["cold_calls"] == n and all(x == 1 for x in r["calls_per_token"])
    lines.append(f"positive control: every new token made exactly one Keystone call -- "
                 f"{'yes' if control else 'NO: the counter or the cache is not what this benchmark assumes'}")
    met = r["hot_calls"] == 0 and control
    lines.append(f"target Keystone calls on the hot path == 0: {r['hot_calls']} -- "
                 f"{'meets' if met else 'MISSES'} the target")
    rows = [
        Row(bench="identity", case="cold token validation (request hook)", metric="p50 ms",
            value=round(cold50 / 1000, 3), refs={"warm": round(warm50 / 1000, 3)}, ratio_of="warm",
            ratio=round(cold50 / warm50, 2),
            note=f"{n} fresh Keystone tokens, first use each, direct to the plugin socket; p99 "
                 f"{pct(r['cold'], 99) / 1000:.1f} ms; {r['cold_calls']} Keystone calls counted"),
        Row(bench="identity", case="Keystone calls per 1000 warm requests", metric="calls",
            value=round(per_k_hot, 2), refs={"cold (per 1000 new tokens)": round(per_k_cold, 1)},
            target="== 0", met=met,
            note=f"counted by a relay between plugin and Keystone; {r['hot_calls']} in {r['hot_n']} requests over "
                 f"{args.connections} connections, {n} tokens; positive control (1 call per new token) "
                 f"{'passed' if control else 'FAILED'}"),
    ]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=50, metavar="N", help="fresh tokens (default 50)")
    ap.add_argument("--warm", type=int, default=20, metavar="W", help="warm repeats per token (default 20)")
    ap.add_argument("--hot", type=int, default=1000, metavar="R", help="hot-path requests counted (default 1000)")
    ap.add_argument("--connections", type=int, default=4, metavar="C",
                    help="keep-alive connections on the hot path (default 4)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 10 tokens, 200 hot requests")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    ap.add_argument("--json", metavar="FILE", help="write the summary rows (run.py's table) to FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.warm, args.hot = 10, 10, 200
    if min(args.tokens, args.warm, args.hot, args.connections) < 1:
        ap.error("--tokens, --warm, --hot and --connections must be at least 1")
    if os.geteuid() != 0:
        ap.error("must run as root (the plugin's socket is under /run/docker/plugins)")

    b = IdentityBench(args)

    def work() -> None:
        b.start()
        load0 = os.getloadavg()[0]
        r = measure(b, args)
        text, rows = report(b, r, args, (load0, os.getloadavg()[0]))
        print(text, flush=True)
        if args.json:
            write_rows(args.json, rows)

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
