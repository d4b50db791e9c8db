#!/usr/bin/env python3
"""What the name scoper costs a tenant's streams, next to HAProxy: ``docker
cp`` in and out, ``docker exec -i`` echoing, ``docker logs -f``.

    python3 benchmarks/streams.py [--reps K] [--cp-mib S] [--exec-mib S] [--log-lines N]
                                  [--keep-stack DIR] [--json FILE] [--quick]

One local stack (``fdcs-devstack``, one host) and HAProxy beside it
(``_haproxy.py``): three paths to the SAME engine with the FDCS plugin --
``scoper`` (TLS, the tenant's names), ``haproxy`` (TLS, HTTP mode, the
engine-side names), ``direct`` (the engine's unix socket).  Every operation
is Debian's CLI as alice: ``/usr/bin/docker --config $FDCS_CONFIG_A1 -H
<path> [--tlsverify --tlscacert --tlscert --tlskey] ...``.  Two containers
made through the scoper: ``bench`` (``busybox sleep 3600``) and
``bench-logs`` (``seq 1 N`` then ``sleep 3600``: its log is complete before
the first measurement).

* ``cp in`` / ``cp out`` -- ``docker cp`` of ``--cp-mib`` MiB of random
  bytes into ``bench`` and back out; MB/s = 10^6 bytes of the file per
  second of the command's wall time; the copy brought back is compared by
  sha256 with the original (first repetition).  Over ``tcp://`` the CLI
  accepts gzip and dockerd then gzips what ``cp`` takes out (over
  ``unix://`` it does not), so ``cp out`` through a proxy measures dockerd's
  gzip; ``archive`` is the same ``GET .../archive`` made by this script
  without gzip, on a new connection: the proxies' own cost on the way out.
* ``exec -i`` -- ``docker exec -i bench cat`` with ``--exec-mib`` MiB of
  random bytes on stdin; the bytes on its stdout are counted and checked by
  sha256; MB/s = bytes echoed per second of wall time.  HAProxy in HTTP
  mode cannot carry this hijacked stream (>= 2.4 drops the upgrade of a
  request with a body: haproxy issue #2684), so its connections are
  tunnelled in TCP mode (``ThreePaths(tunnel_upgrades=True)``), probed with
  1 KiB first.
* ``logs -f`` -- ``docker logs -f bench-logs``: the seconds until the CLI has
  printed all N lines (the last one checked), then the CLI is stopped (the
  container still runs, so the stream is a real follow); lines/s.

Each operation runs ``--reps`` times per path, the paths in rotating order;
medians, the ratios scoper/haproxy and scoper/direct (of the medians, and
``rnd``: the median of the per-repetition ratios), the proxies' CPU seconds
per operation.  Target: scoper/haproxy throughput >= 0.8 (``cp in``, ``cp
out``, ``exec -i``, ``logs -f``; ``archive`` is shown without a target); a
missed target is followed by a py-spy profile of the scoper running that
operation (its summary in the Row's note).

Every operation has a deadline (:func:`op_timeout`; shorter through a
reference): a CLI command still running then is killed, the engine's
goroutines and the scoper's stacks are saved, and the run fails naming the
command -- a hang never stalls it.  Except once per reference: a
reference's own stall (HAProxy stalled a chunked ``cp`` upload about once
per full run, dockerd waiting for its next chunk) must not fail FDCS's
benchmark, nor be hidden -- the snapshot is taken and kept, HAProxy is
restarted (a fresh process on the same port), the measurement is retried
once, and the report and the Row's note say so (:func:`measure_one`).  A
second stall of the same reference, or any stall through the scoper, fails
the run as before.

Everything started is stopped in a ``finally`` (also on Ctrl-C or SIGTERM):
CLI processes, HAProxy (by pid), the containers, the temporary files, the
stack (``fdcs-devstack down``).  ``--keep-stack DIR`` uses (or brings up) the
stack in DIR and leaves it running, without the benchmark's containers.
Root only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from authz_plugin.devstack import ComponentFailed
from authz_plugin.devstack._procs import clean_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# benchmark code beside this file
from _common import (Reader, Row, cpu_ns, machine, progress, ratio, run_bench, spy_path, spy_record,  # noqa: E402
                     spy_tally, write_rows)
from _haproxy import PATHS, ThreePaths  # noqa: E402

TARGET = 0.8  # scoper/haproxy throughput, at least
CONTAINER = "bench"
LOGS = "bench-logs"
MIB = 1024 * 1024
OPS = ("in", "out", "get", "exec", "logs")
NAMES = {"in": "cp in", "out": "cp out", "get": "archive", "exec": "exec -i", "logs": "logs -f"}

say = progress("streams")


# -- files --------------------------------------------------------------------------------


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


# -- the operations: each returns (units moved, seconds) -----------------------------


def fetch_archive(b: ThreePaths, path: str, src: str) -> tuple[int, float]:
    """``GET /containers/<ref>/archive?path=SRC`` without gzip on a new
    connection, the body read and dropped; (body bytes, seconds)."""
    sock = b.connect[path]()
    try:
        req = (f"GET /v1.41/containers/{b.ref(path, CONTAINER)}/archive?path={src} HTTP/1.1\r\nHost: docker\r\n"
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
        return n, (time.perf_counter_ns() - t0) / 1e9
    finally:
        sock.close()


def op_timeout(op: str, args, reference: bool = False) -> float:
    """Seconds one operation may take before it counts as hung: a minute,
    plus one second per MiB moved (1 MB/s, a tenth of the slowest rate seen
    on this 2-core machine under load), or per 1,000 log lines.  Through a
    reference (HAProxy, direct) half a minute plus a quarter of that (4
    MB/s, still 2.5 times below the slowest seen): a stalled reference is
    retried once (:func:`measure_one`), and five minutes of waiting for it
    (256 MiB) bought nothing.  A docker CLI command must never hang a
    benchmark: past this it is killed, the engine's goroutines and the
    scoper's stacks are saved (see :meth:`ThreePaths.snapshot_hang`)."""
    per = {"in": args.cp_mib, "out": args.cp_mib, "get": args.cp_mib, "exec": args.exec_mib,
           "logs": args.log_lines / 1000}[op]
    return 30.0 + per / 4 if reference else 60.0 + per


class Hung(RuntimeError):
    """An operation did not finish within its timeout (the message names it,
    the path, and the snapshot files)."""


def hung(b: ThreePaths, what: str, path: str, timeout: float) -> Hung:
    snap = b.snapshot_hang(f"{what} through {path}")
    return Hung(f"{what} through {path} did not finish in {timeout:.0f} s (killed); engine goroutines, "
                f"scoper stacks and the CLI's log: {', '.join(snap) or '-'}; {b.cmds.log_path('docker')}")


def cli(b: ThreePaths, path: str, what: str, *args: str, timeout: float) -> str:
    """A docker CLI command on ``path`` that must finish within ``timeout``
    seconds; a hang raises :class:`Hung` (after a snapshot), a failure
    RuntimeError naming the command and its log."""
    try:
        return b.cmds.run("docker", b.docker_argv(path, *args), capture=True, timeout=timeout)
    except ComponentFailed as e:
        if "did not finish" in e.detail:
            raise hung(b, what, path, timeout) from None
        raise RuntimeError(f"{what} through {path}: {e.detail} (log {e.log})") from None


class Procs:
    """The CLI processes this run started and has not reaped yet: stopped by
    pid in clean-up (a Ctrl-C in the middle of a stream)."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen] = set()

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, env=clean_env(None), start_new_session=True, **kw)
        self.live.add(p)
        return p

    def done(self, p: subprocess.Popen) -> None:
        self.live.discard(p)

    def stop_all(self) -> None:
        for p in list(self.live):
            if p.poll() is None:
                p.kill()
            p.wait()
            self.live.discard(p)


def exec_echo(b: ThreePaths, procs: Procs, path: str, src: Path, digest: str,
              timeout: float = 300, snapshot: bool = True) -> tuple[int, float]:
    """``docker exec -i <ref> cat`` with ``src`` on stdin; its stdout is
    counted and hashed, and must be ``src`` again, within ``timeout``
    seconds (else :class:`Hung`, after a snapshot unless not ``snapshot``;
    a wrong echo: RuntimeError)."""
    argv = b.docker_argv(path, "exec", "-i", b.ref(path, CONTAINER), "cat")
    h = hashlib.sha256()
    n = 0
    with open(src, "rb") as stdin, open(b.cmds.log_path("docker-exec"), "ab") as err:
        t0 = time.perf_counter()
        p = procs.popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=err)
        fired = threading.Event()

        def stalled() -> None:  # a stalled stream ends as a failure, not a hang
            fired.set()
            p.kill()

        watchdog = threading.Timer(timeout, stalled)
        watchdog.start()
        try:
            while chunk := p.stdout.read1(1 << 20):
                h.update(chunk)
                n += len(chunk)
            rc = p.wait(timeout=timeout)
        finally:
            watchdog.cancel()
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            procs.done(p)
        secs = time.perf_counter() - t0
    if fired.is_set() and snapshot:
        raise hung(b, f"exec -i cat ({n} bytes echoed of {src.stat().st_size})", path, timeout)
    if rc != 0 or h.hexdigest() != digest:
        raise RuntimeError(f"exec -i cat through {path}: exit {rc}, {n} bytes echoed of {src.stat().st_size}, "
                           f"{'identical' if h.hexdigest() == digest else 'DIFFERENT'} (log "
                           f"{b.cmds.log_path('docker-exec')})")
    return n, secs


def logs_follow(b: ThreePaths, procs: Procs, path: str, lines: int, timeout: float = 300) -> tuple[int, float]:
    """``docker logs -f <ref>`` until its stdout holds ``lines`` lines (the
    last being the number itself); then the CLI is killed."""
    argv = b.docker_argv(path, "logs", "-f", b.ref(path, LOGS))
    n = 0
    tail = b""
    with open(b.cmds.log_path("docker-logs"), "ab") as err:
        t0 = time.perf_counter()
        p = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        fired = threading.Event()

        def stalled() -> None:
            fired.set()
            p.kill()

        watchdog = threading.Timer(timeout, stalled)
        watchdog.start()
        try:
            while n < lines:
                chunk = p.stdout.read1(1 << 20)
                if not chunk:
                    break
                n += chunk.count(b"\n")
                tail = (tail + chunk)[-64:]
            secs = time.perf_counter() - t0
        finally:
            watchdog.cancel()
            p.kill()
            p.wait()
            p.stdout.close()
            procs.done(p)
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if fired.is_set():
        raise hung(b, f"logs -f ({n} lines of {lines})", path, timeout)
    if n != lines or last != str(lines).encode():
        raise RuntimeError(f"logs -f through {path}: {n} lines of {lines}, the last {last[:40]!r} (log "
                           f"{b.cmds.log_path('docker-logs')})")
    return n, secs


# -- measure -------------------------------------------------------------------------------


class Result:
    def __init__(self) -> None:
        self.rates: list[float] = []  # MB/s or lines/s
        self.seconds: list[float] = []
        self.proxy_cpu: list[float] = []  # seconds


def wait_logs_complete(b: ThreePaths, lines: int, timeout: float = 300) -> None:
    """Poll until the last line of ``bench-logs``'s log is ``lines``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            last = cli(b, "direct", "logs --tail 1", "logs", "--tail", "1", b.ref("direct", LOGS), timeout=30)
        except Hung:
            raise
        except RuntimeError:
            last = ""
        if last.strip() == str(lines):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{LOGS} did not print its {lines} lines in {timeout:.0f} s")


def run_op(b: ThreePaths, procs: Procs, op: str, p: str, args, files: dict[str, Path],
           digests: dict[str, str]) -> tuple[float, float]:
    """One operation through path ``p``, checked; (rate, seconds): MB/s (10^6
    bytes per second) or, for logs -f, lines/s."""
    cp_size = args.cp_mib * MIB
    inside = f"/tmp/blob-{p}"
    timeout = op_timeout(op, args, reference=p != "scoper")
    if op == "get":
        try:
            n, secs = fetch_archive(b, p, inside)
        except TimeoutError:  # no byte for 60 s (the connector's socket timeout)
            raise hung(b, "GET archive", p, 60) from None
        if n < cp_size:
            raise RuntimeError(f"GET archive through {p}: {n} bytes, expected at least {cp_size}")
        return cp_size / secs / 1e6, secs
    if op == "exec":
        n, secs = exec_echo(b, procs, p, files["echo"], digests["echo"], timeout=timeout)
        return n / secs / 1e6, secs
    if op == "logs":
        n, secs = logs_follow(b, procs, p, args.log_lines, timeout=timeout)
        return n / secs, secs
    argv = (["cp", str(files["blob"]), f"{b.ref(p, CONTAINER)}:{inside}"] if op == "in"
            else ["cp", f"{b.ref(p, CONTAINER)}:{inside}", str(files["out"])])
    t0 = time.perf_counter()
    cli(b, p, f"cp {op}", *argv, timeout=timeout)
    secs = time.perf_counter() - t0
    return cp_size / secs / 1e6, secs


@dataclasses.dataclass
class Stall:
    """A reference's deadline missed once and retried (see :func:`measure_one`)."""
    op: str
    path: str
    round: int
    error: str  # the Hung's message: the command, its deadline, the snapshot files
    kept: str  # where the snapshot and the logs were copied (they outlive the clean-up)
    restart: str  # what was done about the reference before the retry

    def note(self) -> str:
        who = "HAProxy" if self.path == "haproxy" else "direct (the engine's socket)"
        return (f"{who} stalled once (round {self.round}), retried after {self.restart}; snapshot and logs in "
                f"{self.kept}")


def measure_one(b: ThreePaths, procs: Procs, op: str, p: str, rnd: int, args, files: dict[str, Path],
                digests: dict[str, str], stalls: dict[str, Stall]) -> tuple[float, float, float]:
    """:func:`run_op` and the proxy's CPU seconds: (rate, seconds, cpu).

    A reference (``p`` not ``scoper``) that misses its deadline for the
    first time in this run is not FDCS's failure: the snapshot taken by
    :func:`hung` is kept (:meth:`ThreePaths.keep_logs`: clean-up would
    remove it), HAProxy is restarted, the stall recorded in ``stalls`` (for
    the report and the Row's note), and the measurement made once more.  A
    stall through the scoper, or a reference's second, raises :class:`Hung`."""
    for _ in range(2):
        prox = b.proxy_pids[p]
        c0 = cpu_ns(prox)
        try:
            rate, secs = run_op(b, procs, op, p, args, files, digests)
        except Hung as e:
            if p == "scoper":
                raise
            if p in stalls:
                raise Hung(f"{e}; the second stall of reference {p} in this run (the first: {NAMES[stalls[p].op]}, "
                           f"round {stalls[p].round}, retried)") from None
            say(f"{NAMES[op]} through reference {p} stalled: {e}; retrying once")
            kept = b.keep_logs()  # named "-failed-logs-": this run goes on, so renamed
            kept = str(kept.rename(kept.with_name(kept.name.replace("-failed-logs-", "-stall-logs-"))))
            restart = b.restart_haproxy() if p == "haproxy" else "nothing to restart (the CLI killed)"
            stalls[p] = Stall(op, p, rnd + 1, str(e), kept, restart)
            continue
        return rate, secs, (cpu_ns(prox) - c0) / 1e9
    raise AssertionError("unreachable: the second attempt returns or raises")


def measure(b: ThreePaths, procs: Procs, args, files: dict[str, Path], digests: dict[str, str]
            ) -> tuple[dict[tuple[str, str], Result], list[str], dict[str, Stall]]:
    """Every operation ``args.reps`` times per path, the paths in rotating
    order (a round: each path in turn does cp in, cp out, archive, exec -i,
    logs -f); the results, the integrity checks and the references' stalls
    (retried, see :func:`measure_one`)."""
    wait_logs_complete(b, args.log_lines)
    res = {(op, p): Result() for op in OPS for p in PATHS}
    # HAProxy >= 2.4 in HTTP mode does not carry the engine's hijacked streams
    # (Upgrade: tcp on a request with a body, as exec start is: haproxy issue
    # #2684); _haproxy.py tunnels them (tunnel_upgrades).  Probed with 1 KiB
    # first, so that a HAProxy that cannot is reported, not waited for.
    exec_paths = list(PATHS)
    try:
        exec_echo(b, procs, "haproxy", files["probe"], digests["probe"], timeout=15, snapshot=False)
        b.exec_haproxy = "works"
    except RuntimeError as e:
        say(f"exec -i through HAProxy fails ({e}); exec -i is compared with direct only")
        exec_paths.remove("haproxy")
        b.exec_haproxy = "broken"
    checks = []
    stalls: dict[str, Stall] = {}
    for rnd in range(args.reps):
        k = rnd % len(PATHS)
        for p in PATHS[k:] + PATHS[:k]:
            for op in OPS:
                if op == "exec" and p not in exec_paths:
                    continue
                rate, secs, cpu = measure_one(b, procs, op, p, rnd, args, files, digests, stalls)
                r = res[op, p]
                r.rates.append(rate)
                r.seconds.append(secs)
                r.proxy_cpu.append(cpu)
            got = files["out"] / f"blob-{p}"
            if rnd == 0:
                h = sha256(got)
                checks.append(f"{p}: {'identical' if h == digests['blob'] else 'DIFFERENT'}")
                if h != digests["blob"]:
                    raise RuntimeError(f"cp through {p}: the copy brought back differs from the original")
            got.unlink()
            cli(b, "direct", "rm the copy", "exec", b.ref("direct", CONTAINER), "rm", "-f", f"/tmp/blob-{p}",
                timeout=60)
            say(f"round {rnd + 1}/{args.reps}, {p}: " + ", ".join(
                f"{NAMES[op]} {res[op, p].rates[-1]:.0f} {'lines/s' if op == 'logs' else 'MB/s'}" for op in OPS
                if res[op, p].rates))
    return res, [f"exec -i through HAProxy: {b.exec_haproxy} (probed with 1 KiB first; hijacked streams "
                 "tunnelled in TCP mode)",
                 "cp: sha256 of the copy brought back out (cp in, then cp out, round 1) vs the original: "
                 + "; ".join(checks), "exec -i: every echo checked (byte count and sha256) against what went in",
                 f"logs -f: every run checked ({args.log_lines} lines, the last one '{args.log_lines}')"], stalls


# -- profile ------------------------------------------------------------------------------

# frames that every sample of an asyncio proxy holds: left out of the inclusive tally
_TRIVIAL = ("<module>", "run (asyncio/runners.py)", "run_until_complete", "run_forever", "_run_once",
            "_run (asyncio/events.py)", "main (name_scoper", "serve (name_scoper", "asyncio.run")


def profile(b: ThreePaths, procs: Procs, op: str, args, files: dict[str, Path], digests: dict[str, str],
            seconds: float, rate: int = 250) -> tuple[str, str]:
    """``py-spy record --gil`` on the scoper while ``op`` runs through it
    again and again; the heaviest functions (inclusive and self) as shares
    of the samples.  Returns the text and a one-line summary for the Row."""
    spy = spy_path()
    if spy is None:
        return "profile: py-spy is not installed (pip install py-spy)", "no profile: py-spy is not installed"
    f = b.tmp / f"spy-scoper-{op}.txt"
    runs: list[float] = []

    def load(deadline: float) -> int:
        n = 0
        while time.monotonic() < deadline or n == 0:
            runs.append(run_op(b, procs, op, "scoper", args, files, digests)[0])
            n += 1
            if op == "in":
                cli(b, "direct", "rm the copy", "exec", b.ref("direct", CONTAINER), "rm", "-f", "/tmp/blob-scoper",
                    timeout=60)
        return n

    if op in ("out", "get"):  # something to take out
        run_op(b, procs, "in", "scoper", args, files, digests)
    c0 = cpu_ns([b.scoper_pid])
    t0 = time.monotonic()
    n = spy_record(b.cmds, spy, [b.scoper_pid], [f], rate, seconds, load)
    wall = time.monotonic() - t0
    cpu = (cpu_ns([b.scoper_pid]) - c0) / 1e9
    total, incl, own = spy_tally([f], _TRIVIAL)
    unit = "lines/s" if op == "logs" else "MB/s"
    out = [f"profile  {NAMES[op]} through the scoper, py-spy record --gil at {rate} Hz (pid {b.scoper_pid}) for "
           f"{seconds:.0f} s: {n} runs at {statistics.median(runs):.0f} {unit} (median, py-spy attached); the "
           f"scoper's CPU {cpu:.1f} s of {wall:.1f} s wall; {total} samples with the GIL held "
           f"({total / rate:.1f} s). Share of the samples, function (* = FDCS code):"]

    def top(d: dict[str, int], k: int) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])[:k]

    def star(fn: str) -> str:
        return "*" if "name_scoper/" in fn or "authz_plugin/" in fn else " "

    out.append("  inclusive:")
    out += [f"    {100 * k / max(total, 1):5.1f}% {star(fn)} {fn}" for fn, k in top(incl, 12)]
    out.append("  self:")
    out += [f"    {100 * k / max(total, 1):5.1f}% {star(fn)} {fn}" for fn, k in top(own, 12)]
    summary = (f"scoper CPU {cpu:.1f} s / {wall:.1f} s wall under py-spy; self time: "
               + ", ".join(f"{fn.split(' (')[0]} {100 * k / max(total, 1):.0f}%" for fn, k in top(own, 4)))
    return "\n".join(out), summary


# -- report -------------------------------------------------------------------------------


def report(b: ThreePaths, res: dict, checks: list[str], args, load: tuple,
           stalls: dict[str, Stall] | None = None) -> tuple[str, list[Row]]:
    stalls = stalls or {}
    lines = machine() + [
        f"command  {shlex.join(['python3', *sys.argv])}",
        f"paths    scoper: fdcs-name-scoper pid {b.scoper_pid} ({b.scoper_host}, TLS); haproxy: HAProxy "
        f"{b.haproxy_version} pid {b.haproxy_pid} (127.0.0.1:{b.haproxy_port}, TLS, mode http with "
        f"http-server-close; hijacked streams, i.e. exec -i, tunnelled in mode tcp); direct: "
        f"unix://{b.engine_socket}; one engine with the FDCS plugin behind all three",
        f"client   /usr/bin/docker --config $FDCS_CONFIG_A1 -H <path> [--tlsverify --tlscacert --tlscert --tlskey] "
        f"(Debian's CLI, alice's HttpHeaders); {args.reps} repetitions per path and operation, paths in rotating "
        f"order; load average {load[0]:.2f} before, {load[1]:.2f} after",
        f"ops      cp in / cp out: {args.cp_mib} MiB of random bytes (MB/s = 10^6 bytes of the file per second of "
        "the command's wall time, CLI start and its HEAD stat included); archive: GET /containers/<ref>/archive "
        "by this script without gzip (not a target: over tcp:// the CLI accepts gzip and dockerd then gzips what "
        "cp takes out, at a speed the same for both proxies; over unix:// it does not); "
        f"exec -i: docker exec -i bench cat with {args.exec_mib} MiB on stdin (MB/s of bytes echoed); "
        f"logs -f: docker logs -f of a running container whose log holds {args.log_lines} lines (seq), until "
        "the CLI has printed them all (lines/s); proxy cpu: CPU seconds of the proxy per operation (median)",
        "",
    ]
    head = (f"{'op':<8} {'path':<8} {'n':>2} {'median':>9} {'min':>9} {'max':>9} {'unit':<7} {'s med':>6} "
            f"{'proxy cpu':>9} | {'scoper/haproxy':>14} {'rnd':>5} | {'scoper/direct':>13} {'rnd':>5}")
    lines += [head, "-" * len(head)]
    rows: list[Row] = []
    for op in OPS:
        unit = "lines/s" if op == "logs" else "MB/s"
        paths = [p for p in PATHS if res[op, p].rates]
        med = {p: statistics.median(res[op, p].rates) for p in paths}
        ref = "haproxy" if "haproxy" in paths else "direct"
        for p in PATHS:
            r = res[op, p]
            if not r.rates:
                lines.append(f"{NAMES[op]:<8} {p:<8}  - (the stream does not pass: HAProxy issue #2684)")
                continue
            cpu = f"{statistics.median(r.proxy_cpu):>9.2f}" if p != "direct" else f"{'-':>9}"
            line = (f"{NAMES[op]:<8} {p:<8} {len(r.rates):>2} {med[p]:>9.0f} {min(r.rates):>9.0f} "
                    f"{max(r.rates):>9.0f} {unit:<7} {statistics.median(r.seconds):>6.2f} {cpu}")
            if p == "scoper":
                cols = []
                for other, w in (("haproxy", 14), ("direct", 13)):
                    if other not in med:
                        cols.append(f"{'-':>{w}} {'-':>5}")
                        continue
                    rnd = statistics.median(a / o for a, o in zip(res[op, "scoper"].rates, res[op, other].rates))
                    cols.append(f"{ratio(med['scoper'], med[other]):>{w}} {rnd:>5.2f}")
                line += f" | {cols[0]} | {cols[1]}"
            lines.append(line)
        rt = med["scoper"] / med[ref]
        size = {"in": f"{args.cp_mib} MiB", "out": f"{args.cp_mib} MiB", "get": f"{args.cp_mib} MiB",
                "exec": f"{args.exec_mib} MiB", "logs": f"{args.log_lines} lines"}[op]
        cpu_s = statistics.median(res[op, "scoper"].proxy_cpu)
        if ref == "haproxy":
            cpu_h = statistics.median(res[op, "haproxy"].proxy_cpu)
            note = f"proxy CPU per op: scoper {cpu_s:.2f} s, HAProxy {cpu_h:.2f} s"
        else:
            note = (f"HAProxy {b.haproxy_version} did not carry exec -i (its 1 KiB probe failed; in HTTP mode it "
                    f"drops the upgrade of a request with a body: haproxy issue #2684): ratio against direct; "
                    f"scoper CPU per op {cpu_s:.2f} s")
        if op == "exec" and ref == "haproxy":
            note += "; HAProxy tunnels the hijacked stream in mode tcp (HTTP mode cannot: haproxy issue #2684)"
        if op == "out":
            note += "; over tcp:// dockerd gzips cp out (both proxies alike), see archive"
        if op == "get":
            note += "; GET archive without gzip: the proxies' own cost on the way out"
        note += "".join(f"; {s.note()}" for s in stalls.values() if s.op == op)
        target = op != "get"
        rows.append(Row("streams", f"{NAMES[op]}, {size}", unit, round(med["scoper"], 1),
                        {p: round(med[p], 1) for p in ("haproxy", "direct") if p in med}, ref, round(rt, 3),
                        f">= {TARGET}" if target else "", (rt >= TARGET) if target else None, note))
    lines += [""] + checks
    lines += [f"deadlines: {NAMES['in']} {op_timeout('in', args):.0f} s through the scoper, "
              f"{op_timeout('in', args, reference=True):.0f} s through a reference (see op_timeout); "
              + ("no reference stalled" if not stalls else "REFERENCE STALLS (each retried once, the retry's "
                 "figure is the one above): " + "; ".join(
                     f"{NAMES[s.op]} through {s.path}, round {s.round}: {s.error} -- {s.restart}; kept in {s.kept}"
                     for s in stalls.values())), ""]
    for r in rows:
        if r.met is not None:
            lines.append(f"target {r.case} throughput scoper/{r.ratio_of} {r.target}: {r.ratio:.2f} -- "
                         f"{'meets' if r.met else 'MISSES'} the target")
    return "\n".join(lines), rows


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, metavar="K", help="repetitions per path and operation (default 3; quick 2)")
    ap.add_argument("--cp-mib", type=int, metavar="S", help="docker cp file size in MiB (default 256; quick 32)")
    ap.add_argument("--exec-mib", type=int, metavar="S", help="bytes echoed by exec -i, MiB (default 64; quick 8)")
    ap.add_argument("--log-lines", type=int, metavar="N",
                    help="lines read by logs -f (default 100000; quick 50000); the engine keeps at most "
                         "max-size x max-file of json-file log (devstack: 3 x 10 MiB, about 400,000 such lines): "
                         "more would be rotated away before they are read")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    ap.add_argument("--json", metavar="FILE", help="write the summary Rows to FILE (for run.py)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of well under 2 minutes")
    args = ap.parse_args(argv)
    for name, full, quick in (("reps", 3, 2), ("cp_mib", 256, 32), ("exec_mib", 64, 8),
                              ("log_lines", 100_000, 50_000)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.reps, args.cp_mib, args.exec_mib, args.log_lines) < 1:
        ap.error("--reps, --cp-mib, --exec-mib and --log-lines must be at least 1")
    if os.geteuid() != 0:
        ap.error("must run as root (the stack starts dockerd in a network namespace)")

    # tunnel_upgrades: HAProxy carries exec -i (see _haproxy.HAPROXY_CFG_TUNNEL)
    b = ThreePaths(args.keep_stack, "fdcsb-streams", say, tunnel_upgrades=True)
    procs = Procs()
    cleanup = b.cleanup

    def cleanup_all() -> list[str]:
        procs.stop_all()  # before the stack goes: CLI streams still attached
        return cleanup()

    b.cleanup = cleanup_all  # type: ignore[method-assign]

    def work() -> None:
        b.start()
        cid = b.run_container(CONTAINER, "sleep", "3600")
        say(f"container {CONTAINER} {cid[:12]}, made through the scoper")
        cid = b.run_container(LOGS, "sh", "-c", f"seq 1 {args.log_lines}; exec sleep 3600")
        say(f"container {LOGS} {cid[:12]}, made through the scoper")
        data = b.tmp / "data"
        files = {"blob": data / "blob", "echo": data / "echo", "probe": data / "probe", "out": data / "out"}
        files["out"].mkdir()
        say(f"writing {args.cp_mib} + {args.exec_mib} MiB of random bytes")
        digests = {"blob": random_file(files["blob"], args.cp_mib * MIB),
                   "echo": random_file(files["echo"], args.exec_mib * MIB),
                   "probe": random_file(files["probe"], 1024)}
        load0 = os.getloadavg()[0]
        res, checks, stalls = measure(b, procs, args, files, digests)
        load1 = os.getloadavg()[0]
        text, rows = report(b, res, checks, args, (load0, load1), stalls)
        profiles = []
        for op, row in zip(OPS, rows):  # one Row per operation, in OPS order
            if row.met is False:
                say(f"{NAMES[op]}: scoper/{row.ratio_of} {row.ratio:.2f} misses {row.target}: profiling the scoper")
                ptext, summary = profile(b, procs, op, args, files, digests, seconds=8 if args.quick else 20)
                profiles.append(ptext)
                row.note += f"; profile: {summary}"
        print("\n\n".join([text, *profiles]), flush=True)
        if args.json:
            write_rows(args.json, rows)

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
