#!/usr/bin/env python3
"""What the FDCS plugin costs a container's life: create, start, wait, rm.

    python3 benchmarks/lifecycle.py [--rounds N] [--cycles M] [--modes cli,raw]
                                    [--keep-stack DIR] [--json FILE] [--quick]

Two engines (Debian's dockerd 20.10, each in its own network namespace):

* ``fdcs``      -- host 1 of a local stack (``fdcs-devstack``), plugin-only
  (its unix socket, alice's ``HttpHeaders``): every call passes the real
  plugin's two hooks; the create carries the quota admission (a Lua script,
  a pending charge) and the response hook's ownership record and charge
  settlement; the rm removes the record.  The name scoper is not in the path.
* ``no-plugin`` -- an engine started here without authorization plugin
  (``plugin_inspect.py``'s ``Bench``).

A cycle is ``create`` (what plugin-only creates need: the tenant label,
``--pids-limit 100``, ``--network none``, ``--cgroupns private``; no name),
``start``, ``wait``, ``rm`` of ``busybox true``, done two ways:

* ``cli`` -- Debian's ``/usr/bin/docker`` (20.10), four processes per cycle:
  the user's view, in which the CLI's own start-up (and its ``/_ping``) is
  much of the time;
* ``raw`` -- the same four API calls (the body the CLI sends, captured) over
  one keep-alive connection: the engine and the plugin without the CLI.

Series (mode x engine) run ``--cycles`` cycles per round in rotating order
for ``--rounds`` rounds (after one uncounted cycle each).  Reported: the
median and p90 cycle time, the median of each step, the ratio fdcs/no-plugin
of the median cycle (target <= 1.05) and the median of the per-round ratios,
the plugin's own decision time per hook from its audit log, and the CPU time
per cycle of each engine-side process (dockerd, its containerd; on fdcs also
the plugin, the reconciler, Redis), measured around each series' batch of
cycles: on a shared 2-core machine CPU time says where the difference goes
far more steadily than wall time does.

Everything started is stopped in a ``finally`` (also on Ctrl-C/SIGTERM): the
extra engine, any container left in the stack's engine, the stack
(``fdcs-devstack down``) unless ``--keep-stack DIR``.  Root only.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from authz_plugin.devstack import _engine
from authz_plugin.devstack._procs import clean_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (Conn, Row, children, cli_create_body, cpu_ns, log_size, machine, pct,  # noqa: E402
                     progress, run_bench, write_rows)
from plugin_inspect import TENANT_LABEL, Bench  # noqa: E402

TARGET = 1.05
ENGINES = ("fdcs", "no-plugin")
MODES = ("cli", "raw")
STEPS = ("create", "start", "wait", "rm")
#: processes whose CPU time a cycle is charged with, per engine
COMPONENTS = ("dockerd", "containerd", "plugin", "reconciler", "redis")
API = "/v1.41"

say = progress("lifecycle")


class LifecycleBench(Bench):
    """``plugin_inspect.Bench`` with only its ``no-plugin`` engine started
    (its ``allow-all`` host stays unused; ``cleanup`` skips what never ran)."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.leftover: set[str] = set()  # containers made in the stack's engine, not yet removed

    def start(self) -> None:
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="devstack") as pool:
            self.stack_started = True
            up = pool.submit(self.stack.up, None if self.keep else 1)
            _engine.build_busybox_tar(self.layout.busybox_tar, self.cmds)
            self._start_engine("no-plugin", self.hosts["no-plugin"], with_plugin=False)
            say(f"stack: waiting for fdcs-devstack up in {self.stack.dir}")
            say(f"stack: up ({up.result():.0f} s)")
        env = self.stack.env()
        self.alice_config = env["FDCS_CONFIG_A1"]
        self.tenant = env["FDCS_TENANT_A"]
        self.fdcs_log = Path(self.stack.dir) / "logs" / "authz-h1.log"
        self.sockets["fdcs"] = env["FDCS_ENGINE_HOSTS"].split()[0].removeprefix("unix://")
        self.sockets["no-plugin"] = str(self.hosts["no-plugin"].engine_socket)
        cfg = json.loads((Path(self.alice_config) / "config.json").read_text())
        # what the CLI sends besides alice's HttpHeaders
        self.headers = {**cfg["HttpHeaders"], "User-Agent": "Docker-Client/20.10.24+dfsg1 (linux)"}
        self.body = cli_create_body(self.tenant)
        self.flags = ["--cgroupns", "private", "--label", f"{TENANT_LABEL}={self.tenant}",
                      "--pids-limit", "100", "--network", "none"]
        self.cli_env = clean_env()
        self.interval = _reconcile_interval(Path(self.stack.dir) / "fdcs.toml")
        eng = self.stack.pid("engine-h1")
        authz = self.stack.pid("authz-h1")
        npe = self.engine_pids["no-plugin"]
        # containerd is dockerd's child; the plugin's gunicorn workers the master's
        self.pids = {
            "fdcs": {"dockerd": [eng], "containerd": children(eng) if eng else [],
                     "plugin": [authz, *children(authz)] if authz else [],
                     "reconciler": [self.stack.pid("reconciler-h1")], "redis": [self.stack.pid("redis")]},
            "no-plugin": {"dockerd": [npe], "containerd": children(npe)},
        }
        self.pids = {e: {k: [p for p in v if p] for k, v in d.items()} for e, d in self.pids.items()}

    def cleanup(self) -> list[str]:
        problems = []
        if self.stack_started and self.leftover and self.sockets.get("fdcs"):
            try:
                c = Conn(self.sockets["fdcs"], self.headers)
                try:
                    for cid in sorted(self.leftover):
                        st, body = c.request("DELETE", f"{API}/containers/{cid}?force=1")
                        if st not in (204, 404):
                            problems.append(f"remove container {cid[:12]}: {st} {body[:200]!r}")
                finally:
                    c.close()
            except Exception as e:  # noqa: BLE001 -- keep cleaning up
                problems.append(f"remove containers {sorted(self.leftover)}: {e}")
        return problems + super().cleanup()

    # -- one cycle -----------------------------------------------------------------------

    def cli_cycle(self, engine: str) -> list[int]:
        """The four CLI commands; ns per step."""
        base = ["/usr/bin/docker", "--config", self.alice_config, "--host", f"unix://{self.sockets[engine]}"]
        out, cid = [], ""
        pc = time.perf_counter_ns
        for step in STEPS:
            argv = base + ({"create": ["create", *self.flags, "busybox", "true"], "start": ["start", cid],
                            "wait": ["wait", cid], "rm": ["rm", cid]}[step])
            t0 = pc()
            res = subprocess.run(argv, capture_output=True, env=self.cli_env, timeout=120)
            out.append(pc() - t0)
            if res.returncode != 0:
                raise RuntimeError(f"{engine}: {shlex.join(argv[4:])}: {res.stderr.decode(errors='replace').strip()}")
            if step == "create":
                cid = res.stdout.decode().strip()
                self._made(engine, cid)
            elif step == "wait" and res.stdout.strip() != b"0":
                raise RuntimeError(f"{engine}: busybox true exited {res.stdout.decode().strip()}")
        self._gone(engine, cid)
        return out

    def raw_cycle(self, engine: str, conn: Conn) -> list[int]:
        """The same four API calls on a keep-alive connection; ns per step."""
        pc = time.perf_counter_ns
        t0 = pc()
        st, body = conn.request("POST", f"{API}/containers/create", self.body)
        t1 = pc()
        if st != 201:
            raise RuntimeError(f"{engine}: create: {st} {body[:300]!r}")
        cid = json.loads(body)["Id"]
        self._made(engine, cid)
        calls = [("POST", f"{API}/containers/{cid}/start", b"", 204),
                 ("POST", f"{API}/containers/{cid}/wait?condition=not-running", b"", 200),
                 ("DELETE", f"{API}/containers/{cid}", None, 204)]
        out = [t1 - t0]
        for method, url, data, want in calls:
            t0 = pc()
            # the CLI's start and wait send no body, and no Content-Type
            st, body = conn.request(method, url, data, content_type="text/plain")
            out.append(pc() - t0)
            if st != want:
                raise RuntimeError(f"{engine}: {method} {url}: {st} {body[:300]!r}")
            if "/wait" in url and json.loads(body).get("StatusCode") != 0:
                raise RuntimeError(f"{engine}: busybox true exited {body!r}")
        self._gone(engine, cid)
        return out

    def _made(self, engine: str, cid: str) -> None:
        if engine == "fdcs":
            self.leftover.add(cid)

    def _gone(self, engine: str, cid: str) -> None:
        self.leftover.discard(cid)


# -- measuring -----------------------------------------------------------------------


def _reconcile_interval(conf: Path) -> float | None:
    """The stack's ``reconciler.interval`` (s), None if unreadable."""
    import tomllib
    try:
        return float(tomllib.loads(conf.read_text()).get("reconciler", {}).get("interval", 60.0))
    except (OSError, ValueError):
        return None


class Series:
    def __init__(self, mode: str, engine: str):
        self.mode, self.engine = mode, engine
        self.rounds: list[list[list[int]]] = []  # round -> cycles -> ns per step
        self.cpu: dict[str, float] = {}  # component -> CPU ns over all counted cycles

    @property
    def cycles(self) -> list[list[int]]:
        return [c for r in self.rounds for c in r]

    def totals(self) -> list[int]:
        return sorted(sum(c) for c in self.cycles)


def measure(b: LifecycleBench, modes: list[str], rounds: int, cycles: int) -> tuple[list[Series], int]:
    """The series, and the plugin log's size when the counted cycles began."""
    series = [Series(m, e) for m in modes for e in ENGINES]
    conns = {e: Conn(b.sockets[e], b.headers) for e in ENGINES} if "raw" in modes else {}

    def cycle(s: Series) -> list[int]:
        return b.cli_cycle(s.engine) if s.mode == "cli" else b.raw_cycle(s.engine, conns[s.engine])

    try:
        for s in series:  # warm-up: token caches, the engine's image and layer caches, connections
            cycle(s)
        start = log_size(b.fdcs_log)
        for rnd in range(rounds):
            k = rnd % len(series)
            for s in series[k:] + series[:k]:
                pids = b.pids[s.engine]
                c0 = {comp: cpu_ns(p) for comp, p in pids.items()}
                s.rounds.append([cycle(s) for _ in range(cycles)])
                for comp, p in pids.items():
                    s.cpu[comp] = s.cpu.get(comp, 0.0) + cpu_ns(p) - c0[comp]
            say(f"round {rnd + 1}/{rounds}: " + ", ".join(
                f"{s.mode}/{s.engine} {statistics.median(sum(c) for c in s.rounds[-1]) / 1e6:.0f} ms" for s in series))
    finally:
        for c in conns.values():
            c.close()
    return series, start


def audit_hooks(log: Path, start: int, end: int, tenant: str) -> dict[str, list[int]]:
    """The plugin's decision times (audit ``us``) for ``tenant`` between two
    offsets of its log, by ``<hook> <step>`` (``request create``, ``response
    rm``, ...); other callers (the reconciler, the CLI's anonymous
    ``/_ping``) are left out."""
    out: dict[str, list[int]] = {}
    try:
        with open(log, "rb") as f:
            f.seek(start)
            data = f.read(max(0, end - start)).decode(errors="replace")
    except OSError:
        return out
    for line in data.splitlines():
        if "fdcs.audit" not in line:
            continue
        try:
            rec = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if rec.get("tenant") != tenant:
            continue
        path, method = rec.get("path", ""), rec.get("method", "")
        if path == "/containers/create":
            step = "create"
        elif path.endswith("/start"):
            step = "start"
        elif path.endswith("/wait"):
            step = "wait"
        elif method == "DELETE" and path.startswith("/containers/"):
            step = "rm"
        else:
            step = "other"
        out.setdefault(f"{rec.get('hook')} {step}", []).append(int(rec.get("us", 0)))
    return out


# -- report --------------------------------------------------------------------------


def report(b: LifecycleBench, series: list[Series], hooks: dict[str, list[int]], args,
           load: tuple[float, float]) -> tuple[str, list[Row]]:
    lines = machine() + [
        f"command  {shlex.join([sys.executable, *sys.argv])}",
        f"engines  fdcs: host 1 of the local stack in {b.stack.dir} (plugin-only: the engine's unix socket, "
        "alice's HttpHeaders; the real plugin, quota admission on); no-plugin: dockerd started here in its own "
        "netns without --authorization-plugin",
        f"run      {args.rounds} rounds x {args.cycles} cycles per series (create --cgroupns private --label tenant "
        "--pids-limit 100 --network none busybox true; start; wait; rm), series interleaved round-robin in "
        f"rotating order, one uncounted cycle each first; load average {load[0]:.2f} before, {load[1]:.2f} after",
        "beside   both engines: the same dockerd flags (authz_plugin.devstack._engine.dockerd_argv) but "
        "--authorization-plugin; beside fdcs's run what the product runs: its reconciler (full pass every "
        f"{b.interval if b.interval is not None else '?'} s in this stack; 60 s by default), name scoper (idle "
        "here), Redis, Keystone (idle: cached tokens)",
        "columns  cycle time (ms): median, p90; median of each step (ms); fdcs/none: ratio of the median cycles, "
        "rnd = median over rounds of the per-round ratio of medians",
        "",
    ]
    head = (f"{'mode':<4} {'engine':<9} {'n':>4} {'median':>7} {'p90':>7} | "
            + " ".join(f"{s:>7}" for s in STEPS) + f" | {'fdcs/none':>9} {'rnd':>5}")
    lines += [head, "-" * len(head)]
    rows: list[Row] = []
    by = {(s.mode, s.engine): s for s in series}
    for mode in dict.fromkeys(s.mode for s in series):
        f, n = by[mode, "fdcs"], by[mode, "no-plugin"]
        med = {e: statistics.median(by[mode, e].totals()) / 1e6 for e in ENGINES}
        r = med["fdcs"] / med["no-plugin"]
        rnd = statistics.median(statistics.median(sum(c) for c in a) / statistics.median(sum(c) for c in z)
                                for a, z in zip(f.rounds, n.rounds))
        steps = {e: [statistics.median(c[i] for c in by[mode, e].cycles) / 1e6 for i in range(len(STEPS))]
                 for e in ENGINES}
        for e in ENGINES:
            s = by[mode, e]
            tot = s.totals()
            row = (f"{mode:<4} {e:<9} {len(tot):>4} {med[e]:>7.1f} {pct(tot, 90) / 1000:>7.1f} | "
                   + " ".join(f"{x:>7.1f}" for x in steps[e]))
            if e == "fdcs":
                row += f" | {r:>9.3f} {rnd:>5.3f}"
            lines.append(row)
        delta = ", ".join(f"{st} {a - z:+.1f}" for st, a, z in zip(STEPS, steps["fdcs"], steps["no-plugin"]))
        what = ("the docker CLI (4 processes, each with its /_ping)" if mode == "cli"
                else "raw API calls on one keep-alive connection")
        note = f"{what}; per-step median fdcs - no-plugin (ms): {delta}; rnd {rnd:.3f}"
        cpu = {e: {c: v / max(1, len(by[mode, e].cycles)) / 1e6 for c, v in by[mode, e].cpu.items()} for e in ENGINES}
        if cpu["fdcs"]:
            note += ("; CPU per cycle fdcs - no-plugin (ms): "
                     + ", ".join(f"{c} {cpu['fdcs'].get(c, 0) - cpu['no-plugin'].get(c, 0):+.1f}"
                                 for c in COMPONENTS if c in cpu["fdcs"] or c in cpu["no-plugin"]))
        met = r <= TARGET
        if not met:
            hk = {k: statistics.median(v) / 1000 for k, v in hooks.items() if k.split()[1] in STEPS}
            note += ("; plugin decision p50 per hook (ms, audit): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in sorted(hk.items())))
        rows.append(Row(bench="lifecycle", case=f"create+start+wait+rm busybox true, {mode}",
                        metric="median cycle ms", value=round(med["fdcs"], 2),
                        refs={"no-plugin": round(med["no-plugin"], 2)}, ratio_of="no-plugin",
                        ratio=round(r, 3), target=f"<= {TARGET}", met=met, note=note))
    lines.append("")
    lines.append("CPU per cycle (ms, all counted cycles; a process's time while its engine's series ran): "
                 + ", ".join(COMPONENTS))
    for s in series:
        n = len(s.cycles) or 1
        lines.append(f"  {s.mode:<4} {s.engine:<9} "
                     + "  ".join(f"{c} {s.cpu[c] / n / 1e6:5.1f}" if c in s.cpu else f"{c}   -  " for c in COMPONENTS)
                     + f"  | total {sum(s.cpu.values()) / n / 1e6:5.1f}")
    lines.append("")
    if hooks:
        lines.append("plugin's own decision time per hook (audit log 'us', all counted cycles, both modes): "
                     "p50 / p99 ms, n")
        for k in sorted(hooks):
            xs = sorted(hooks[k])
            lines.append(f"  {k:<18} {pct(xs, 50):6.2f} / {pct(xs, 99):6.2f}  n={len(xs)}")  # pct: us -> ms
        per_cycle = sum(statistics.median(v) for k, v in hooks.items() if k.split()[1] in STEPS) / 1000
        lines.append(f"  sum of the per-hook p50s of one cycle: {per_cycle:.1f} ms")
        lines.append("")
    for row in rows:
        lines.append(f"target fdcs/no-plugin median cycle <= {TARGET}: {row.case}: {row.ratio:.3f} -- "
                     f"{'meets' if row.met else 'MISSES'} the target")
    return "\n".join(lines), rows


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, metavar="N", help="rounds (default 20)")
    ap.add_argument("--cycles", type=int, default=10, metavar="M", help="cycles per series and round (default 10)")
    ap.add_argument("--modes", default="cli,raw", metavar="cli,raw", help="which clients (default both)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds x 2 cycles")
    ap.add_argument("--keep-stack", metavar="DIR",
                    help="use (or bring up) the devstack in DIR and leave it running afterwards")
    ap.add_argument("--json", metavar="FILE", help="write the summary rows (run.py's table) to FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.cycles = 3, 2
    modes = [m for m in args.modes.split(",") if m.strip()]
    if args.rounds < 1 or args.cycles < 1 or not modes or set(modes) - set(MODES):
        ap.error("--rounds and --cycles must be at least 1, --modes a list of cli, raw")
    if os.geteuid() != 0:
        ap.error("must run as root (it starts dockerd in a network namespace)")

    b = LifecycleBench(args)

    def work() -> None:
        b.start()
        load0 = os.getloadavg()[0]
        say(f"measuring: {args.rounds} rounds x {args.cycles} cycles x {len(modes) * 2} series")
        series, start = measure(b, modes, args.rounds, args.cycles)
        time.sleep(0.3)  # the plugin's last audit lines
        hooks = audit_hooks(b.fdcs_log, start, log_size(b.fdcs_log), b.tenant)
        text, rows = report(b, series, hooks, args, (load0, os.getloadavg()[0]))
        print(text, flush=True)
        if args.json:
            write_rows(args.json, rows)

    return run_bench(b, work, say)


if __name__ == "__main__":
    sys.exit(main())
