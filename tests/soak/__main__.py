"""The soak: many tenants, mixed operations, for a long time, on the real stack.

    python3 -m tests.soak --minutes 30 [--tenants 8] [--hosts 2] [--seed N] [--state-dir DIR]

It brings up its own stack (``fdcs-devstack``, in a fresh state dir), adds
tenants with ``fdcs-devstack tenant add`` until there are ``--tenants``
(tenant-a's alice and tenant-b's bob are the first two), and runs one
worker per tenant for ``--minutes``: the stock docker CLI through the
hosts' name scopers, as tenants use it -- run, create, start, stop, rm,
exec, logs, inspect by name, id and id prefix, ps, volumes, networks --
and attempts on other tenants' containers, volumes and networks, each of
which must be refused.

At the end it prints one summary table and exits 1 when a criterion fails:

* cross-tenant: every attempt on another tenant's resource was refused, and
  no list (ps, volume ls, network ls) ever showed another tenant's resource;
* drift: Redis's records equal the labels on every engine (containers,
  networks, volumes by owner and host; container names), compared directly;
* memory: RSS of the plugin workers, scopers and reconcilers grew by less
  than 10 % between the sample after warm-up and the end;
* file descriptors of the same processes: no growth beyond noise;
* failed operations (other than the refused cross-tenant attempts): at most
  1 %; transient refusals that say "retry" (a slow Keystone, a busy store):
  at most 5 %.

The stack is always taken down (``fdcs-devstack down``), also on Ctrl-C or
SIGTERM.  Samples are taken while the workers are parked, so that open
client connections do not count as growth.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from authz_plugin.devstack import Stack as Devstack
from authz_plugin.devstack._state import Layout
from authz_plugin.scoping import unscope
from tests.e2e.conftest import DOCKER, Cli, client_env

TENANT_LABEL = "org.fiware.fdcs.tenant"
#: the soak's resource names: s<tenant index><c|v|n><op number>
SOAK_NAME = re.compile(r"s(\d+)[cvn]\d+")
#: criteria (see the module docstring)
MAX_RSS_GROWTH = 0.10
FD_NOISE = 16  # open sockets come and go: a growth within max(this, 25 %) is noise
FD_NOISE_RATIO = 0.25
MAX_FAILED_RATIO = 0.01
MAX_RETRIED_RATIO = 0.05
#: per tenant, at most this many of each (beyond it, workers remove)
MAX_CONTAINERS, MAX_VOLUMES, MAX_NETWORKS = 6, 3, 3

# -- pure parts ----------------------------------------------------------------------


def transient(message: str) -> bool:
    """A refusal that tells the tenant to retry (a slow Keystone, a busy
    store), or the CLI's fallback to API 1.24 after such a refusal of its
    version check (finding F4 of the fault tests)."""
    return "retry" in message or "API version 1.24 is too old" in message


@dataclasses.dataclass
class Tally:
    """Operations done and failed by kind, failures split into transient
    ones (:func:`transient`) and others, with a few samples of each; thread-safe."""

    done: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    retried: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    samples: dict = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            if ok:
                self.done[kind] += 1
                return
            soft = transient(detail)
            (self.retried if soft else self.failed)[kind] += 1
            key = f"{kind} ({'transient' if soft else 'failed'})"
            self.samples.setdefault(key, []).append(detail.strip()[:300])
            del self.samples[key][:-3]

    def total(self) -> int:
        return sum(self.done.values()) + sum(self.failed.values()) + sum(self.retried.values())


def drift(engine: dict, records: dict) -> list[str]:
    """Differences between one host's engine view and Redis's records of
    that host.  ``engine`` and ``records``: ``{kind: {id: tenant}}`` for
    container, network, volume, plus ``{"names": {name: id}}`` (container
    names).  Returns one line per difference (empty: no drift)."""
    out = []
    for kind in ("container", "network", "volume", "names"):
        want, have = engine.get(kind, {}), records.get(kind, {})
        for key in sorted(set(want) | set(have)):
            if want.get(key) != have.get(key):
                out.append(f"{kind} {key}: engine {want.get(key)!r}, redis {have.get(key)!r}")
    return out


def growth(start: float, end: float) -> float:
    return (end - start) / start if start else 0.0


def fd_noise(start: int) -> int:
    return max(FD_NOISE, int(start * FD_NOISE_RATIO))


def verdict(tally: Tally, cross: collections.Counter, leaks: list[str], drifts: list[str],
            procs: dict[str, tuple[dict, dict]]) -> list[tuple[str, bool, str]]:
    """The criteria of the module docstring: ``(name, ok, detail)``."""
    total = tally.total()
    failed, retried = sum(tally.failed.values()), sum(tally.retried.values())
    rows = [
        ("cross-tenant attempts refused", cross["allowed"] == 0,
         f"{cross['refused']} refused, {cross['allowed']} allowed"),
        ("lists show only the tenant's own", not leaks, f"{len(leaks)} leaks"),
        ("zero drift (Redis == labels)", not drifts, f"{len(drifts)} differences"),
        ("failed operations <= 1 %", total > 0 and failed <= MAX_FAILED_RATIO * total, f"{failed} of {total}"),
        ("transient refusals ('retry') <= 5 %", total > 0 and retried <= MAX_RETRIED_RATIO * total,
         f"{retried} of {total}"),
    ]
    for name, (a, b) in procs.items():
        if a.get("pids") != b.get("pids"):
            rows.append((f"{name}: same processes", False, f"{a.get('pids')} -> {b.get('pids')}"))
            continue
        g = growth(a["rss"], b["rss"])
        rows.append((f"{name}: RSS growth < 10 %", g < MAX_RSS_GROWTH, f"{g:+.1%}"))
        rows.append((f"{name}: fds within noise", b["fds"] - a["fds"] <= fd_noise(a["fds"]),
                     f"{a['fds']} -> {b['fds']}"))
    return rows


def table(minutes: float, tenants: int, hosts: int, tally: Tally, cross: collections.Counter,
          leaks: list[str], drifts: list[str], procs: dict[str, tuple[dict, dict]],
          rows: list[tuple[str, bool, str]], repairs: dict[str, int]) -> str:
    """The one summary table."""
    out = [f"FDCS soak: {minutes:g} min, {tenants} tenants, {hosts} hosts", "",
           f"{'operation':<22}{'done':>8}{'failed':>8}{'retry':>8}"]
    for kind in sorted(set(tally.done) | set(tally.failed) | set(tally.retried)):
        out.append(f"{kind:<22}{tally.done[kind]:>8}{tally.failed[kind]:>8}{tally.retried[kind]:>8}")
    out.append(f"{'total':<22}{sum(tally.done.values()):>8}{sum(tally.failed.values()):>8}"
               f"{sum(tally.retried.values()):>8}")
    out.append(f"{'cross-tenant attempts':<22}{cross['refused'] + cross['allowed']:>8}"
               f"   refused {cross['refused']}, allowed {cross['allowed']}")
    out += ["", f"{'process':<26}{'RSS start':>11}{'RSS end':>11}{'growth':>9}{'fds start':>11}{'fds end':>9}"]
    for name, (a, b) in procs.items():
        out.append(f"{name:<26}{a['rss'] / 1024:>9.1f}Mi{b['rss'] / 1024:>9.1f}Mi{growth(a['rss'], b['rss']):>+9.1%}"
                   f"{a['fds']:>11}{b['fds']:>9}")
    out += ["", f"reconciler full-pass repairs during the soak: {repairs}", ""]
    for name, ok, detail in rows:
        out.append(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    for what, items in (("leak", leaks), ("drift", drifts)):
        for line in items[:20]:
            out.append(f"  {what}: {line}")
    for kind, samples in sorted(tally.samples.items()):
        for s in samples:
            out.append(f"  {kind}: {s}")
    return "\n".join(out)


# -- the machine ----------------------------------------------------------------------


def proc_sample(pids: list[int]) -> dict:
    """Summed RSS (KiB) and open fds of ``pids``."""
    rss = fds = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return {"pids": sorted(pids), "rss": rss, "fds": fds}


def children(pid: int | None) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                data = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = data[data.rindex(")") + 2:].split()
            if pid and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return sorted(out)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dir = Path(args.state_dir or tempfile.mkdtemp(prefix="fdcs-soak-", dir="/tmp"))
        self.ds = Devstack(self.dir)
        self.tally = Tally()
        self.cross: collections.Counter = collections.Counter()
        self.leaks: list[str] = []
        self.stop = threading.Event()
        self.park = threading.Event()
        self.parked = threading.Semaphore(0)
        #: every resource a tenant made: id or scoped name -> tenant index
        self.registry: dict[str, int] = {}
        self.lock = threading.Lock()

    # -- set-up --------------------------------------------------------------------------
    def up(self) -> None:
        took = self.ds.up(hosts=self.args.hosts)
        print(f"soak: stack up in {took:.1f} s at {self.dir}", flush=True)
        self.env = self.ds.env()
        self.scopers = self.env["FDCS_DOCKER_HOSTS"].split()
        self.engines = self.env["FDCS_ENGINE_HOSTS"].split()
        if not self.scopers[0].startswith("tcp://"):
            raise SystemExit("soak: fdcs-name-scoper is not installed; the soak goes through the scopers")
        self.tenants = [(self.env["FDCS_CONFIG_A1"], self.env["FDCS_TENANT_A"]),
                        (self.env["FDCS_CONFIG_B1"], self.env["FDCS_TENANT_B"])]
        for i in range(len(self.tenants), self.args.tenants):
            t = self.ds.tenant_add(f"soak-{i}", users=1)
            self.tenants.append((str(next(iter(t.config_dirs.values()))), t.project_id))
        self.tenants = self.tenants[: self.args.tenants]
        self.host_ids = [Layout.at(self.dir).host(k).name for k in range(1, self.args.hosts + 1)]
        self.r = redis.Redis.from_url(self.env["FDCS_REDIS_URL"], decode_responses=True)

    def cli(self, t: int, h: int) -> Cli:
        certs = Path(self.env["DOCKER_CERT_PATH"])
        tls = ["--tlsverify", "--tlscacert", str(certs / "ca.pem"), "--tlscert", str(certs / "cert.pem"),
               "--tlskey", str(certs / "key.pem")]
        return Cli(self.tenants[t][0], self.scopers[h], tls=tls, env=client_env())

    def admin(self, h: int) -> Cli:
        return Cli(str(self.dir / "admin-key"), self.engines[h], env=client_env())

    # -- measuring -------------------------------------------------------------------------
    def processes(self) -> dict[str, list[int]]:
        out = {}
        for k in range(1, self.args.hosts + 1):
            out[f"authz-h{k} workers"] = children(self.ds.pid(f"authz-h{k}"))
            for comp in (f"scoper-h{k}", f"reconciler-h{k}"):
                pid = self.ds.pid(comp)
                out[comp] = [pid] if pid else []
        return out

    def sample(self) -> dict[str, dict]:
        return {name: proc_sample(pids) for name, pids in self.processes().items()}

    def reconciler_repairs(self) -> dict[str, int]:
        """Sum of what the reconcilers' full passes added and removed (from their logs)."""
        import json
        total = collections.Counter()
        for k in range(1, self.args.hosts + 1):
            log = self.dir / "logs" / f"reconciler-h{k}.log"
            for line in log.read_text(errors="replace").splitlines():
                if " reconcile {" in line:
                    try:
                        c = json.loads(line.split(" reconcile ", 1)[1])
                    except ValueError:
                        continue
                    for key in ("added", "removed", "execs_added", "execs_removed"):
                        total[key] += c.get(key, 0)
        return dict(total)

    def engine_view(self, h: int) -> dict:
        adm = self.admin(h)
        view: dict[str, dict[str, str]] = {"container": {}, "network": {}, "volume": {}, "names": {}}
        fmt = '{{.ID}}\t{{.Names}}\t{{.Label "%s"}}' % TENANT_LABEL
        for line in adm("ps", "-a", "--no-trunc", "--format", fmt).stdout.splitlines():
            cid, name, tenant = (line.split("\t") + ["", ""])[:3]
            if tenant:
                view["container"][cid] = tenant
                view["names"][name] = cid
        for line in adm("network", "ls", "--no-trunc", "--format", '{{.ID}}\t{{.Label "%s"}}' % TENANT_LABEL
                        ).stdout.splitlines():
            nid, tenant = (line.split("\t") + [""])[:2]
            if tenant:
                view["network"][nid] = tenant
        for line in adm("volume", "ls", "--format", '{{.Name}}\t{{.Label "%s"}}' % TENANT_LABEL).stdout.splitlines():
            name, tenant = (line.split("\t") + [""])[:2]
            # a volume the engine made for a container's `-v NAME:/path` has
            # no label: its scoped name says whose it is (ARCHITECTURE.md)
            tenant = tenant or (unscope(name) or ("",))[0]
            if tenant:
                view["volume"][name] = tenant
        return view

    def records(self, h: int) -> dict:
        host = self.host_ids[h]
        view: dict[str, dict[str, str]] = {}
        for kind in ("container", "network", "volume"):
            owners = self.r.hgetall(f"fdcs:own:{kind}")
            hosts = self.r.hgetall(f"fdcs:host:{kind}")
            view[kind] = {i: t for i, t in owners.items() if hosts.get(i) == host}
        view["names"] = self.r.hgetall(f"fdcs:names:container:{host}")
        return view

    def drifts(self) -> list[str]:
        out = []
        for h in range(self.args.hosts):
            out += [f"h{h + 1} {d}" for d in drift(self.engine_view(h), self.records(h))]
        return out

    # -- the workers -------------------------------------------------------------------------
    def run_op(self, kind: str, cli: Cli, *args: str) -> subprocess.CompletedProcess | None:
        try:
            p = cli(*args, check=False)
        except subprocess.TimeoutExpired:
            self.tally.add(kind, False, f"{' '.join(args)}: timed out")
            return None
        self.tally.add(kind, p.returncode == 0, f"{' '.join(args)}: {p.stderr}")
        return p if p.returncode == 0 else None

    def worker(self, t: int) -> None:
        rng = random.Random(self.args.seed * 1000 + t)
        tenant = self.tenants[t][1]
        hosts = range(self.args.hosts)
        clis = [self.cli(t, h) for h in hosts]
        containers: dict[str, list] = {}  # name -> [host, id, running]
        volumes: dict[str, int] = {}  # name -> host
        networks: dict[str, list] = {}  # name -> [host, id]
        mounts: dict[str, tuple[str | None, str | None]] = {}  # container -> (volume, network)
        n = 0
        ops = ["run", "create", "stop", "start", "rm", "exec", "logs", "inspect", "ps", "volume", "network",
               "lists", "cross"]
        weights = [8, 4, 5, 5, 6, 8, 6, 10, 5, 5, 4, 4, 10]
        while not self.stop.is_set():
            if self.park.is_set():
                self.parked.release()
                while self.park.is_set() and not self.stop.is_set():
                    time.sleep(0.05)
                continue
            op = rng.choices(ops, weights)[0]
            n += 1
            h = rng.choice(hosts)
            cli = clis[h]
            try:
                if op in ("run", "create"):
                    if len(containers) >= MAX_CONTAINERS:
                        op = "rm"
                    else:
                        name = f"s{t}c{n}"
                        extra: list[str] = []
                        vol = rng.choice([v for v, vh in volumes.items() if vh == h] or [None])
                        net = rng.choice([k for k, (nh, _) in networks.items() if nh == h] or [None])
                        if vol and rng.random() < 0.5:
                            extra += ["-v", f"{vol}:/data"]
                        else:
                            vol = None
                        if net and rng.random() < 0.5:
                            extra += ["--network", net]
                        else:
                            net = None
                        cmd = ["sh", "-c", "echo started; exec sleep 100000"]
                        if op == "run":
                            p = self.run_op("run", cli, "run", "-d", "--name", name, *extra, "busybox", *cmd)
                        else:
                            p = self.run_op("create", cli, "create", "--name", name, *extra, "busybox", *cmd)
                            if p is not None:
                                self.run_op("start", cli, "start", name)
                        if p is None:  # refused, yet perhaps made (a refused response): then it is ours
                            p = self.adopted(cli, "container", name)
                        if p is not None:
                            cid = p.stdout.strip().splitlines()[-1]
                            containers[name] = [h, cid, op == "run" or self.running(cli, name)]
                            mounts[name] = (vol, net)
                            with self.lock:
                                self.registry[cid] = t
                        continue
                if op in ("stop", "start", "rm", "exec", "logs", "inspect"):
                    if not containers:
                        continue
                    name = rng.choice(sorted(containers))
                    ch, cid, running = containers[name]
                    c = clis[ch]
                    if op == "stop" and running:
                        if self.run_op("stop", c, "stop", "-t", "0", name):
                            containers[name][2] = False
                        else:
                            self.resync(c, name, containers, mounts)
                    elif op in ("start", "stop"):
                        if self.run_op("start", c, "start", name):
                            containers[name][2] = True
                        else:
                            self.resync(c, name, containers, mounts)
                    elif op == "rm":
                        if self.run_op("rm", c, "rm", "-f", name):
                            del containers[name]
                            mounts.pop(name, None)
                        else:
                            self.resync(c, name, containers, mounts)
                    elif op == "exec" and running:
                        self.run_op("exec", c, "exec", name, "true")
                    elif op == "logs":
                        p = self.run_op("logs", c, "logs", "--tail", "5", name)
                        if p is not None and "started" not in p.stdout:
                            self.tally.add("logs", False, f"logs of {name} lack its output")
                    elif op == "inspect":
                        ref = rng.choice([name, cid, cid[:12]])
                        p = self.run_op("inspect", c, "inspect", "--type", "container", "-f", "{{.Id}}", ref)
                        if p is not None and p.stdout.strip() != cid:
                            self.tally.add("inspect", False, f"{ref} resolved to {p.stdout.strip()}, not {cid}")
                elif op == "ps":
                    p = self.run_op("ps", cli, "ps", "-aq", "--no-trunc")
                    if p is not None:
                        listed = set(p.stdout.split())
                        self.check_listed(t, "container", listed)
                        mine = {cid for ch, cid, _ in containers.values() if ch == h}
                        if listed != mine:
                            self.tally.add("ps", False, f"host {h + 1}: listed {len(listed)} != own {len(mine)}")
                elif op == "volume":
                    used = {v for v, _ in mounts.values() if v}
                    free = [v for v, vh in volumes.items() if vh == h and v not in used]
                    if len(volumes) >= MAX_VOLUMES and free:
                        v = rng.choice(free)
                        if self.run_op("volume_rm", cli, "volume", "rm", v) or self.exists(cli, "volume", v) is False:
                            del volumes[v]
                    elif len(volumes) < MAX_VOLUMES:
                        v = f"s{t}v{n}"
                        if self.run_op("volume_create", cli, "volume", "create", v) or self.adopted(cli, "volume", v):
                            volumes[v] = h
                            with self.lock:
                                self.registry[f"{tenant}_{v}"] = t
                elif op == "network":
                    used = {x for _, x in mounts.values() if x}
                    free = [x for x, (nh, _) in networks.items() if nh == h and x not in used]
                    if len(networks) >= MAX_NETWORKS and free:
                        x = rng.choice(free)
                        if self.run_op("network_rm", cli, "network", "rm", x) or self.exists(cli, "network", x) is False:
                            del networks[x]
                    elif len(networks) < MAX_NETWORKS:
                        x = f"s{t}n{n}"
                        p = self.run_op("network_create", cli, "network", "create", x) or self.adopted(cli, "network", x)
                        if p is not None:
                            nid = p.stdout.strip()
                            networks[x] = [h, nid]
                            with self.lock:
                                self.registry[nid] = t
                elif op == "lists":
                    p = self.run_op("volume_ls", cli, "volume", "ls", "-q")
                    if p is not None:
                        self.check_names(t, "volume", p.stdout.split(), {v for v, vh in volumes.items() if vh == h})
                    p = self.run_op("network_ls", cli, "network", "ls", "--format", "{{.Name}}")
                    if p is not None:
                        own = {x for x, (nh, _) in networks.items() if nh == h} | {"bridge"}
                        self.check_names(t, "network", p.stdout.split(), own)
                elif op == "cross":
                    self.cross_attempt(t, rng)
            except Exception as e:  # a bug of the soak itself must not hide as a hang
                self.tally.add(f"{op} (soak error)", False, repr(e))

    def adopted(self, cli: Cli, kind: str, name: str) -> subprocess.CompletedProcess | None:
        """After a refused create: the resource if the engine made it anyway
        (its response was refused); its id on stdout, like the create's."""
        fmt = "{{.Name}}" if kind == "volume" else "{{.Id}}"
        try:
            p = cli("inspect", "--type", kind, "-f", fmt, name, check=False)
        except subprocess.TimeoutExpired:
            return None
        if p.returncode == 0:
            self.tally.add(f"{kind} made though refused", True)
            return p
        return None

    @staticmethod
    def exists(cli: Cli, kind: str, name: str) -> bool | None:
        """Whether the tenant's ``kind`` ``name`` exists; None when it cannot be told now."""
        try:
            p = cli("inspect", "--type", kind, "-f", "{{.Name}}", name, check=False)
        except subprocess.TimeoutExpired:
            return None
        if p.returncode == 0:
            return True
        return False if f"No such {kind}" in p.stderr else None

    def resync(self, cli: Cli, name: str, containers: dict, mounts: dict) -> None:
        """After a refused change to container ``name``: its real state (gone,
        running or not), so that a refused response to an executed request
        does not make the worker's next steps fail."""
        try:
            p = cli("inspect", "-f", "{{.State.Running}}", name, check=False)
        except subprocess.TimeoutExpired:
            return
        if p.returncode == 0:
            containers[name][2] = p.stdout.strip() == "true"
        elif "No such container" in p.stderr:
            containers.pop(name, None)
            mounts.pop(name, None)

    @staticmethod
    def running(cli: Cli, name: str) -> bool:
        try:
            return cli("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip() == "true"
        except subprocess.TimeoutExpired:
            return False

    def check_listed(self, t: int, kind: str, ids: set[str]) -> None:
        with self.lock:
            foreign = [(i, self.registry[i]) for i in ids if self.registry.get(i, t) != t]
        for i, other in foreign:
            self.leaks.append(f"tenant {t} listed {kind} {i[:12]} of tenant {other}")

    def check_names(self, t: int, kind: str, listed: list[str], own: set[str]) -> None:
        """Names a tenant lists are shown unscoped; the soak's names carry
        the tenant index (``s<t>...``), so another tenant's would show."""
        for name in listed:
            m = SOAK_NAME.fullmatch(name)
            if name not in own and m and int(m.group(1)) != t:
                self.leaks.append(f"tenant {t} listed {kind} {name}")

    def cross_attempt(self, t: int, rng: random.Random) -> None:
        with self.lock:
            theirs = [(ref, o) for ref, o in self.registry.items() if o != t]
        if not theirs:
            return
        ref, other = rng.choice(theirs)
        h = rng.randrange(self.args.hosts)
        cli = self.cli(t, h)
        if len(ref) == 64:  # a container or network id
            kind = "network" if ref in self.network_ids() else "container"
            short = rng.choice([ref, ref[:12]])
            args = rng.choice([("inspect", "--type", kind, short)] + (
                [("stop", "-t", "0", short), ("rm", "-f", short), ("exec", short, "true")] if kind == "container"
                else [("network", "rm", short)]))
        else:  # a volume's scoped name, as written by its owner's engine
            args = rng.choice([("volume", "inspect", ref), ("volume", "rm", ref)])
        try:
            p = cli(*args, check=False)
        except subprocess.TimeoutExpired:
            self.tally.add("cross_tenant", False, f"{' '.join(args)}: timed out")
            return
        # refused: "No such ..." (or "retry" during a hiccup); allowed is a
        # violation.  `rm -f` exits 0 on a missing container (the CLI only
        # prints the engine's "No such container"), so a success is an exit 0
        # that names no missing resource.
        if p.returncode == 0 and "No such" not in p.stderr:
            self.cross["allowed"] += 1
            self.leaks.append(f"tenant {t} did {' '.join(args)} on tenant {other}'s resource: {p.stdout[:100]}")
        else:
            self.cross["refused"] += 1

    def network_ids(self) -> set[str]:
        return set(self.r.hkeys("fdcs:own:network"))

    # -- the run ---------------------------------------------------------------------------------
    def pause(self, n_workers: int) -> None:
        self.park.set()
        for _ in range(n_workers):
            self.parked.acquire(timeout=180)

    def warm_identities(self) -> None:
        """Every tenant's token validated by every scoper and plugin worker,
        one tenant at a time: tenants do not all arrive in the same second,
        and the local stack's Keystone serves one request at a time."""
        for t in range(len(self.tenants)):
            for h in range(self.args.hosts):
                cli = self.cli(t, h)
                deadline = time.monotonic() + 120
                ok = 0
                while ok < 4 and time.monotonic() < deadline:  # a few: the engine spreads them over workers
                    ok += cli("ps", "-q", check=False).returncode == 0

    def run(self) -> int:
        self.up()
        t_warm = time.monotonic()
        self.warm_identities()
        print(f"soak: identities warmed in {time.monotonic() - t_warm:.0f} s", flush=True)
        threads = [threading.Thread(target=self.worker, args=(t,), daemon=True, name=f"tenant{t}")
                   for t in range(len(self.tenants))]
        t0 = time.monotonic()
        seconds = self.args.minutes * 60
        for th in threads:
            th.start()
        warm = min(60.0, 0.2 * seconds)
        self.stop.wait(warm)
        self.pause(len(threads))
        start = self.sample()
        self.park.clear()
        print(f"soak: warmed up after {warm:.0f} s; sampled; running until {seconds:.0f} s", flush=True)
        last = time.monotonic()
        while time.monotonic() - t0 < seconds and not self.stop.is_set():
            self.stop.wait(min(30.0, max(0.0, seconds - (time.monotonic() - t0))))
            if time.monotonic() - last >= 60:
                last = time.monotonic()
                done, failed = sum(self.tally.done.values()), sum(self.tally.failed.values())
                retried = sum(self.tally.retried.values())
                print(f"soak: {int(time.monotonic() - t0)} s: {done} done, {failed} failed, {retried} retry, "
                      f"cross-tenant {dict(self.cross)}, leaks {len(self.leaks)}", flush=True)
        self.stop.set()
        for th in threads:
            th.join(timeout=180)
        end = self.sample()
        # in-flight events reach the records within a reconcile pass
        drifts = self.drifts()
        deadline = time.monotonic() + 30
        while drifts and time.monotonic() < deadline:
            time.sleep(1)
            drifts = self.drifts()
        # every tenant's lists, one last time, on every host
        for t in range(len(self.tenants)):
            for h in range(self.args.hosts):
                p = self.run_op("ps", self.cli(t, h), "ps", "-aq", "--no-trunc")
                if p is not None:
                    self.check_listed(t, "container", set(p.stdout.split()))
        procs = {name: (start[name], end.get(name, {"pids": [], "rss": 0, "fds": 0})) for name in start}
        rows = verdict(self.tally, self.cross, self.leaks, drifts, procs)
        print(table(self.args.minutes, len(self.tenants), self.args.hosts, self.tally, self.cross, self.leaks,
                    drifts, procs, rows, self.reconciler_repairs()), flush=True)
        if all(ok for _, ok, _ in rows):
            return 0
        self.keep_logs()
        return 1

    def keep_logs(self) -> None:
        """Copy the stack's logs beside its state dir (``down`` removes it)."""
        import shutil
        dest = Path(f"{self.dir}.logs")
        try:
            shutil.copytree(self.dir / "logs", dest, dirs_exist_ok=True)
            print(f"soak: the stack's logs are kept in {dest}", flush=True)
        except OSError as e:
            print(f"soak: cannot keep the logs: {e}", file=sys.stderr, flush=True)

    def down(self) -> None:
        try:
            self.ds.down()
            print(f"soak: stack at {self.dir} taken down", flush=True)
        except Exception as e:
            print(f"soak: fdcs-devstack down failed: {e}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--state-dir", help="state dir of the soak's stack (default: a new one under /tmp)")
    args = ap.parse_args(argv)
    if args.tenants < 2 or args.hosts < 1 or args.minutes <= 0:
        ap.error("--tenants must be at least 2, --hosts at least 1, --minutes positive")
    if os.geteuid() != 0:
        print("soak: the real stack needs root", file=sys.stderr)
        return 2
    if not Path(DOCKER).exists():
        print(f"soak: {DOCKER} is missing", file=sys.stderr)
        return 2
    soak = Soak(args)

    def terminated(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        return soak.run()
    except KeyboardInterrupt:
        soak.stop.set()
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        soak.stop.set()
        soak.down()


if __name__ == "__main__":
    sys.exit(main())
