#!/usr/bin/env python3
"""The memory FDCS costs: VmRSS of the plugin's gunicorn workers and of the
name scoper, at rest and under 200 concurrent streams, with HAProxy's under
the same streams for scale.

    python3 benchmarks/memory.py [--streams N] [--hold SECONDS]
                                 [--keep-stack DIR] [--json FILE] [--quick]

One local stack (``fdcs-devstack``, one host) and HAProxy beside it
(``_haproxy.py``, TLS, HTTP mode).  One container made through the scoper as
alice, ``bench-tick``, prints a line every 100 ms.  The load: ``--streams``
raw clients made by this script (asyncio, Python ``ssl``, verified, alice's
``HttpHeaders`` and the stack's client pair) each holding one
``GET /v1.41/containers/<ref>/logs?follow=1&stdout=1&stderr=1&tail=10``
open and reading it (every stream receives a line every 100 ms), opened 20
at a time, held ``--hold`` seconds, then closed.  ``logs -f`` rather than
``attach``: HAProxy >= 2.4 in HTTP mode does not pass the engine's hijacked
streams (haproxy issue #2684), so it could not carry the reference load.
The streams go first through the scoper, then through HAProxy.

``VmRSS`` (``/proc/PID/status``) is sampled every 100 ms of: each gunicorn
worker of the plugin (children of the ``authz-h1`` master; reported as the
largest worker and the sum), the gunicorn master, the scoper (``scoper-h1``)
and HAProxy.  "At rest" is one sample after an idle second before the load;
"under load" is the peak while the streams are opened and held.  MB = 10^6
bytes.  Targets: plugin worker <= 60 MB, scoper <= 80 MB under load.

Everything started is stopped in a ``finally`` (also on Ctrl-C or SIGTERM):
the streams, HAProxy (by pid), the container, the temporary files, the stack
(``fdcs-devstack down``).  ``--keep-stack DIR`` uses (or brings up) the stack
in DIR and leaves it running, without the benchmark's container.  Root only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# benchmark code beside this file
from _common import Row, children, machine, progress, rss_kib, run_bench, write_rows  # noqa: E402
from _haproxy import ThreePaths  # noqa: E402

TARGET_WORKER_MB = 60
TARGET_SCOPER_MB = 80
CONTAINER = "bench-tick"
OPEN_AT_ONCE = 20

say = progress("memory")


def mb(kib: int | None) -> float | None:
    return None if kib is None else kib * 1024 / 1e6


# -- the load -------------------------------------------------------------------------------


class Streams:
    """``n`` log-follow streams through ``path``, each read until ``stop``."""

    def __init__(self, b: ThreePaths, path: str, n: int):
        self.b, self.path, self.n = b, path, n
        self.opened = 0
        self.received = 0
        self.errors: list[str] = []

    async def _one(self, gate: asyncio.Semaphore, stop: asyncio.Event) -> None:
        b = self.b
        port = b.scoper_port if self.path == "scoper" else b.haproxy_port
        ref = b.ref(self.path, CONTAINER)
        req = (f"GET /v1.41/containers/{ref}/logs?follow=1&stdout=1&stderr=1&tail=10 HTTP/1.1\r\nHost: docker\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in b.headers.items()) + "\r\n").encode()
        writer = None
        try:
            async with gate:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=b.ctx, server_hostname="127.0.0.1"), 30)
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                if head[9:12] != b"200":
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                self.opened += 1
            while not stop.is_set():
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError("the stream ended")
                self.received += len(data)
        except Exception as e:  # noqa: BLE001 -- counted and reported
            if not stop.is_set():
                self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            if writer is not None:
                writer.close()

    async def run(self, hold: float, sample) -> None:
        gate = asyncio.Semaphore(OPEN_AT_ONCE)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self._one(gate, stop)) for _ in range(self.n)]
        t0 = time.monotonic()
        while self.opened + len(self.errors) < self.n and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.1)
        self.open_seconds = time.monotonic() - t0
        say(f"{self.path}: {self.opened} streams open in {self.open_seconds:.1f} s, holding {hold:.0f} s")
        await asyncio.sleep(hold)
        sample.mark()
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Sampler:
    """VmRSS of the processes every 100 ms in a thread; ``peak`` per name."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids
        self.peak: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _take(self) -> dict[str, int]:
        out = {}
        for name, pids in self.pids.items():
            vals = [v for v in (rss_kib(p) for p in pids) if v is not None]
            if vals:
                out[name] = max(vals)
                if name == "worker":
                    out["workers"] = sum(vals)
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            for k, v in self._take().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self._stop.wait(0.1)

    def mark(self) -> None:
        self.end = self._take()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def snapshot(pids: dict[str, list[int]]) -> dict[str, int]:
    s = Sampler.__new__(Sampler)
    s.pids = pids
    return s._take()


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=200, metavar="N", help="concurrent streams (default 200)")
    ap.add_argument("--hold", type=float, metavar="SECONDS",
                    help="seconds the streams are held open (default 20; quick 5)")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    ap.add_argument("--json", metavar="FILE", help="write the summary Rows to FILE (for run.py)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of well under 2 minutes")
    args = ap.parse_args(argv)
    if args.hold is None:
        args.hold = 5.0 if args.quick else 20.0
    if args.streams < 1 or args.hold <= 0:
        ap.error("--streams must be at least 1 and --hold positive")
    if os.geteuid() != 0:
        ap.error("must run as root (the stack starts dockerd in a network namespace)")

    b = ThreePaths(args.keep_stack, "fdcsb-memory", say)

    def work() -> None:
        b.start()
        cid = b.run_container(CONTAINER, "sh", "-c", "while :; do echo tick; sleep 0.1; done")
        say(f"container {CONTAINER} {cid[:12]}, made through the scoper")
        master = b.authz_pid
        workers = children(master) if master else []
        if not workers:
            raise RuntimeError("no gunicorn workers under the authz-h1 master")
        pids = {"worker": workers, "master": [master], "scoper": [b.scoper_pid], "haproxy": [b.haproxy_pid]}
        time.sleep(1.0)
        rest = snapshot(pids)
        load0 = os.getloadavg()[0]
        under: dict[str, dict] = {}
        for path in ("scoper", "haproxy"):
            sampler = Sampler(pids)
            st = Streams(b, path, args.streams)
            try:
                asyncio.run(st.run(args.hold, sampler))
            finally:
                sampler.stop()
            if st.errors:
                raise RuntimeError(f"{len(st.errors)} of {args.streams} streams through {path} failed: "
                                   f"{st.errors[0]}")
            under[path] = {"peak": sampler.peak, "end": sampler.end, "opened": st.opened,
                           "received": st.received, "open_s": st.open_seconds}
            time.sleep(1.0)
        after = snapshot(pids)
        load1 = os.getloadavg()[0]
        sp, hp = under["scoper"]["peak"], under["haproxy"]["peak"]

        def f(kib) -> str:
            v = mb(kib)
            return f"{v:7.1f}" if v is not None else f"{'?':>7}"

        lines = machine() + [
            f"command  {shlex.join(['python3', *sys.argv])}",
            f"procs    plugin: gunicorn master pid {master}, {len(workers)} workers {workers}; scoper pid "
            f"{b.scoper_pid}; HAProxy {b.haproxy_version} pid {b.haproxy_pid} (TLS, mode http)",
            f"load     {args.streams} raw TLS clients (asyncio, alice's HttpHeaders) each holding GET "
            f"/containers/{CONTAINER}/logs?follow=1 open and reading it ({CONTAINER} prints a line every 100 ms), "
            f"opened {OPEN_AT_ONCE} at a time, held {args.hold:.0f} s; first through the scoper "
            f"({under['scoper']['opened']} opened in {under['scoper']['open_s']:.1f} s, "
            f"{under['scoper']['received']} bytes read), then through HAProxy ({under['haproxy']['opened']} "
            f"opened in {under['haproxy']['open_s']:.1f} s, {under['haproxy']['received']} bytes read); load "
            f"average {load0:.2f} before, {load1:.2f} after",
            "columns  VmRSS in MB (10^6 bytes): at rest before; peak (sampled every 100 ms) while the streams "
            "through the scoper, then through HAProxy, were opened and held; at rest after",
            "",
            f"{'process':<22} {'rest':>7} {'scoper load':>11} {'haproxy load':>12} {'after':>7}",
        ]
        for key, what in (("worker", "plugin worker (max)"), ("workers", f"plugin workers (sum {len(workers)})"),
                          ("master", "plugin master"), ("scoper", "scoper"), ("haproxy", "HAProxy")):
            lines.append(f"{what:<22} {f(rest.get(key))} {f(sp.get(key)):>11} {f(hp.get(key)):>12} "
                         f"{f(after.get(key))}")
        rows: list[Row] = []
        wn = f"{len(workers)} workers"
        for case, kib in (("plugin worker (max), rest", rest.get("worker")),
                          (f"plugin worker (max), {args.streams} streams", sp.get("worker"))):
            v = mb(kib)
            rows.append(Row("memory", case, "MB RSS", round(v, 1), {}, "", None, f"<= {TARGET_WORKER_MB} MB",
                            v <= TARGET_WORKER_MB, f"largest of {wn}"))
        rows.append(Row("memory", f"plugin workers (sum), {args.streams} streams", "MB RSS",
                        round(mb(sp.get("workers")), 1), {}, "", None, "", None, wn))
        rows.append(Row("memory", f"plugin master, {args.streams} streams", "MB RSS",
                        round(mb(sp.get("master")), 1), {}, "", None, "", None, "gunicorn master"))
        rows.append(Row("memory", "scoper, rest", "MB RSS", round(mb(rest["scoper"]), 1),
                        {"haproxy": round(mb(rest["haproxy"]), 1)}, "", None, "", None, "at rest"))
        v = mb(sp["scoper"])
        rows.append(Row("memory", f"scoper, {args.streams} streams", "MB RSS", round(v, 1),
                        {"haproxy": round(mb(hp["haproxy"]), 1)}, "", None, f"<= {TARGET_SCOPER_MB} MB",
                        v <= TARGET_SCOPER_MB, f"peak over {args.streams} logs -f streams held {args.hold:.0f} s; "
                        "ref: HAProxy's peak under the same streams"))
        lines.append("")
        for r in rows:
            if r.met is not None:
                lines.append(f"target {r.case} {r.target}: {r.value:.1f} MB -- "
                             f"{'meets' if r.met else 'MISSES'} the target")
        print("\n".join(lines), flush=True)
        if args.json:
            write_rows(args.json, rows)

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
