r"""The local stack as one object: :class:`Stack` (DEVSTACK.md is the contract).

``up`` brings every component to "alive and ready", touching only what is
not: each daemon is checked by pid (see ``_procs.live_pid``) and by a
readiness probe that exercises it (Redis PING, Keystone ``GET /v3``, the
plugin's ``Plugin.Activate``, the engine's ``GET /_ping`` through its
plugin).  Independent steps run in threads::

    redis;  tls;  busybox.tar;  netns hK           (independent)
    keystone-manage: keys --> db_sync, bootstrap --> admin project id --> fdcs.toml
                          \--> keystone-wsgi-public --> demo projects, users --> client config dirs
    fdcs.toml --> per host K: authz-hK --> engine-hK (netns hK) --> busybox:latest (busybox.tar)
                                 --> scoper-hK (tls, and the client config dirs: it is probed as alice)

Keystone's admin project id is needed by the plugins' configuration, so it
is read from Keystone's database as soon as bootstrap has made it, and the
plugins and engines start while keystone-wsgi-public is still importing.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import secrets
import shlex
import shutil
import signal
import string
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .. import config as fdcs_config
from .. import metrics as fdcs_metrics
from . import _clients, _engine, _keystone, _redis, _scoper, _tls
from ._errors import Aborted, ComponentFailed, DevstackError
from ._procs import Commands, free_ports, live_pid, terminate, unix_http, wait_until, write_if_changed
from ._state import Host, Layout, State

log = logging.getLogger(__name__)

#: the demo users' docker config dirs: env key -> (user, project)
CLIENTS = {
    "FDCS_CONFIG_A1": ("alice", "tenant-a"),
    "FDCS_CONFIG_A2": ("carol", "tenant-a"),
    "FDCS_CONFIG_B1": ("bob", "tenant-b"),
    "FDCS_CONFIG_A_READER": ("dave", "tenant-a"),
    "FDCS_CONFIG_ADMIN": ("admin", "admin"),
}

#: readiness deadlines (seconds) of a component just started
#: seconds between the reconcilers' full passes in the local stack
RECONCILE_INTERVAL = 5

TIMEOUTS = {"redis": 20, "keystone": 90, "authz": 60, "engine": 90, "scoper": 60, "reconciler": 60}
#: how long an already running component may take to answer before ``up``
#: declares it hung and restarts it.  An engine gets longer: while its plugin
#: was down it may be in its ~30 s plugin retry, and restarting an engine
#: kills the tenants' containers.
GRACE = {"redis": 5, "keystone": 10, "authz": 10, "engine": 45, "scoper": 10,
         # a reconciler is ready once the names have settled (2 intervals after a pass)
         "reconciler": 10 + 2 * RECONCILE_INTERVAL}

REQUIRED = (
    _redis.REDIS_SERVER, _keystone.PYTHON, _keystone.WSGI_PUBLIC, _engine.DOCKERD, _engine.DOCKER,
    _engine.NSENTER, _engine.IP, _engine.UMOUNT, _engine.BUSYBOX, _tls.OPENSSL,
)


@dataclasses.dataclass(frozen=True)
class ComponentStatus:
    """One line of ``fdcs-devstack status``."""

    name: str
    up: bool
    pid: int | None
    addr: str
    metrics: str = ""  # the component's metrics URL, if it serves any

    def __str__(self) -> str:
        line = f"{self.name} {'up' if self.up else 'down'} pid={self.pid or '-'} addr={self.addr}"
        return f"{line} metrics={self.metrics}" if self.metrics else line


@dataclasses.dataclass(frozen=True)
class Tenant:
    """What ``tenant add`` made: the project and a docker config dir per user."""

    name: str
    project_id: str
    config_dirs: dict[str, Path]


@dataclasses.dataclass(frozen=True)
class _Daemon:
    name: str
    pidfile: Path
    log: Path
    addr: str
    argv: Callable[[], list[str]]
    env: Callable[[], dict[str, str]]
    ready: Callable[[], bool]
    kind: str  # key of TIMEOUTS / GRACE
    metrics: str = ""  # metrics URL (http://127.0.0.1:PORT/metrics), "" when none


def _console_script(name: str) -> str:
    """An installed console script of this package (beside this Python
    first: pyenv and virtualenvs put it there, possibly not on PATH)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise DevstackError(f"{name} is not installed; run: pip install -e .")
    return found


def _authz_command() -> str:
    return _console_script("fdcs-authz")


def plugin_ready(host: Host) -> bool:
    res = unix_http(host.plugin_socket, "POST", "/Plugin.Activate", body=b"", timeout=2.0)
    return res is not None and res[0] == 200 and b"authz" in res[1]


class Stack:
    """The local stack whose state lives in ``state_dir`` (default
    ``/tmp/fdcs-devstack``).

    ``up(hosts)``, ``down()``, ``status()``, ``env()``, ``tenant_add()`` are
    the commands of DEVSTACK.md; ``pid()``, ``kill()`` and ``restart()``
    let tests break one component and watch ``up`` repair it.  All methods
    raise :class:`DevstackError` (or its :class:`ComponentFailed`) on failure.
    """

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self.layout = Layout.at(state_dir)
        self.dir = self.layout.root

    # -- the commands ----------------------------------------------------------------

    def up(self, hosts: int | None = None) -> float:
        """Start whatever is not up (everything the first time); return the
        seconds it took.  ``hosts``: number of simulated hosts (default: as
        before, else 1); hosts can be added to a running stack, not removed."""
        t0 = time.monotonic()
        L = self.layout
        L.check_paths()
        self._preflight()
        self._refuse_foreign_dir()
        L.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            for d in (L.logs, L.run, L.redis):
                d.mkdir(exist_ok=True)
            state = State(L.state_file)
            n = self._host_count(state, hosts)
            self._first_values(state)
            self._scoper_ports(state, n)
            self._metrics_ports(state, n)
            cmds = Commands(L.logs)
            cmds.note("up", f"up --hosts {n} (state dir {L.root})")
            _Up(self, state, cmds, n).run()
        took = time.monotonic() - t0
        cmds.note("up", f"done in {took:.1f} s")
        return took

    def down(self) -> None:
        """Stop everything this stack started (by pid), delete its network
        namespaces and plugin sockets, unmount what is mounted under DIR and
        remove DIR.  Works on a half-started stack; a no-op on none."""
        L = self.layout
        if not L.root.exists():
            self._down_outside(Commands(None))  # netns / sockets left by a removed DIR
            return
        self._refuse_foreign_dir()
        with self._locked():
            L.logs.mkdir(exist_ok=True)
            cmds = Commands(L.logs)
            cmds.note("down", f"down (state dir {L.root})")
            hosts = L.known_hosts()
            # Engines first, while their plugins still answer (a container's
            # last events); all hosts in parallel.
            with cf.ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
                for f in [pool.submit(self._stop_engine, h, cmds) for h in hosts]:
                    f.result()
            daemons = sorted(L.run.glob("*.pid")) if L.run.is_dir() else []
            with cf.ThreadPoolExecutor(max_workers=max(1, len(daemons))) as pool:
                for f in [pool.submit(self._stop_pidfile, p, cmds) for p in daemons]:
                    f.result()
            left = _engine.unmount_under(L.root, cmds)
            self._down_outside(cmds, hosts)
            if left:
                raise DevstackError(f"cannot unmount {', '.join(left)}; {L.root} was left in place")
            shutil.rmtree(L.root)

    def status(self) -> list[ComponentStatus]:
        """Every component with its pid and address; ``up`` means alive and
        answering its readiness probe.  Empty when there is no stack."""
        if not self.layout.state_file.exists():
            return []
        state = State(self.layout.state_file)
        out = []
        for d in self._daemons(state, self._hosts_seen(state)):
            pid = live_pid(d.pidfile)
            out.append(ComponentStatus(d.name, bool(pid) and d.ready(), pid, d.addr, d.metrics))
        return out

    def env(self) -> dict[str, str]:
        """``DIR/env`` as a dict (values unquoted)."""
        try:
            text = self.layout.env_file.read_text()
        except FileNotFoundError:
            raise DevstackError(f"no stack at {self.dir} (no env file); run fdcs-devstack up") from None
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = shlex.split(v)[0] if v else ""
        return out

    def tenant_add(self, name: str, users: int = 1) -> Tenant:
        """One more Keystone project ``name`` with ``users`` member users
        (``NAME-user1``...), password ``FDCS_PASSWORD``, each with a docker
        config dir.  Idempotent: an existing project or user is reused."""
        if users < 0:
            raise DevstackError("--users must not be negative")
        L = self.layout
        if not L.state_file.exists():
            raise DevstackError(f"no stack at {self.dir}; run fdcs-devstack up")
        with self._locked():
            state = State(L.state_file)
            cmds = Commands(L.logs)
            cmds.note("tenant", f"tenant add {name} --users {users}")
            port = state["ports"]["keystone"]
            api = _keystone.Api(_keystone.url(port), cmds, L.log("keystone"))
            api.login("admin", state["password"])
            member = api.role_ids()["member"]
            pid = api.ensure_project(name)
            state.update("projects", name, pid)
            dirs = {}
            for i in range(1, users + 1):
                user = f"{name}-user{i}"
                uid = api.ensure_user(user, state["password"], pid)
                api.grant(pid, uid, member)
                state.update("users", user, {"id": uid, "project": name})
                dirs[user] = _clients.ensure_user_config(L, state, cmds, _keystone.url(port), user, name)
            return Tenant(name, pid, dirs)

    # -- helpers for tests -------------------------------------------------------------

    def components(self) -> list[str]:
        state = State(self.layout.state_file)
        return [d.name for d in self._daemons(state, self._hosts_seen(state))]

    def pid(self, name: str) -> int | None:
        """The live pid of component ``name`` (as in ``status``), or None."""
        return live_pid(self.layout.pidfile(name))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (default KILL) to component ``name`` as a crash would:
        to the daemon's whole process group (gunicorn's workers too), except
        for an engine, where only dockerd gets it (its containerd and
        containers survive, as after a real dockerd crash).  Returns the pid;
        the component must be running."""
        pid = self.pid(name)
        if pid is None:
            raise DevstackError(f"{name} is not running")
        if name.startswith("engine-"):
            os.kill(pid, sig)
        else:
            os.killpg(pid, sig)
        return pid

    def restart(self, name: str) -> None:
        """Stop component ``name`` cleanly (if running) and run ``up``."""
        pid = self.pid(name)
        if pid is not None:
            cmds = Commands(self.layout.logs)
            if name.startswith("engine-"):
                host = self.layout.host(int(name.rsplit("-h", 1)[1]))
                _engine.stop(host, pid, cmds)
            else:
                terminate(pid)
        self.up()

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _preflight() -> None:
        if os.geteuid() != 0:
            raise DevstackError("fdcs-devstack must run as root (it starts dockerd and network namespaces)")
        missing = [p for p in REQUIRED if not os.path.exists(p)]
        if missing:
            raise DevstackError(
                f"missing {', '.join(missing)}; install the Debian packages docker.io, redis-server, "
                "python3-keystone, busybox-static, openssl, iproute2"
            )

    def _refuse_foreign_dir(self) -> None:
        """``down`` removes DIR: never let a typo in --state-dir point it
        (or ``up``, which would fill it) at a directory of someone else's.
        A state dir is empty or holds one of the stack's own entries."""
        try:
            entries = set(os.listdir(self.dir))
        except FileNotFoundError:
            return
        if entries and not entries & {"state.json", "logs", "run", "env", LOCAL_CONF}:
            raise DevstackError(f"{self.dir} exists and is not an fdcs-devstack state dir; "
                                "choose another --state-dir")

    @contextlib.contextmanager
    def _locked(self, timeout: float = 300) -> Iterator[None]:
        """One fdcs-devstack at a time per state dir (an flock on DIR itself,
        so nothing is left behind when ``down`` removes DIR)."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise DevstackError(f"another fdcs-devstack is busy with {self.dir}") from e
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _host_count(state: State, hosts: int | None) -> int:
        had = state.get("hosts", 0)
        n = hosts or had or 1
        if n < 1:
            raise DevstackError("--hosts must be at least 1")
        if n < had:
            raise DevstackError(f"the stack has {had} hosts; hosts cannot be removed (run down first)")
        return n

    @staticmethod
    def _first_values(state: State) -> None:
        """Ports and the demo password, chosen once and kept: restarted
        components come back where clients expect them."""
        with state.lock:
            if "ports" not in state.data:
                redis_port, keystone_port = free_ports(2)
                state["ports"] = {"redis": redis_port, "keystone": keystone_port}
            if "password" not in state.data:
                # letters and digits only: safe in any shell, URL or CLI flag
                alphabet = string.ascii_letters + string.digits
                state["password"] = "".join(secrets.choice(alphabet) for _ in range(24))

    def _scoper_ports(self, state: State, hosts: int) -> None:
        """A port per host's scoper, chosen once and kept (like the others);
        none while the scoper is not installed."""
        if _scoper.command() is None:
            return
        with state.lock:
            ports = dict(state.get("ports", {}))
            missing = [k for k in range(1, hosts + 1) if not ports.get(_scoper.port_key(self.layout.host(k)))]
            if not missing:
                return
            taken = set(ports.values())
            fresh = [p for p in free_ports(len(missing) + len(taken)) if p not in taken][: len(missing)]
            for k, port in zip(missing, fresh):
                ports[_scoper.port_key(self.layout.host(k))] = port
            state["ports"] = ports

    def _metrics_ports(self, state: State, hosts: int) -> None:
        """Ports of each host's metrics listeners (plugin, reconciler, and
        scoper when installed), chosen once and kept like the others."""
        with state.lock:
            ports = dict(state.get("ports", {}))
            daemons = ["authz", "reconciler"] + (["scoper"] if _scoper.command() is not None else [])
            missing = [_metrics_key(d, self.layout.host(k)) for k in range(1, hosts + 1) for d in daemons]
            missing = [key for key in missing if not ports.get(key)]
            if not missing:
                return
            taken = set(ports.values())
            fresh = [p for p in free_ports(len(missing) + len(taken)) if p not in taken][: len(missing)]
            ports.update(zip(missing, fresh))
            state["ports"] = ports

    def _hosts_seen(self, state: State) -> int:
        """Hosts of a finished ``up`` or of a half-started one."""
        return max([state.get("hosts", 0)] + [h.index for h in self.layout.known_hosts()])

    def _daemons(self, state: State, hosts: int) -> list[_Daemon]:
        """Every daemon, in status order: redis, keystone, then per host
        engine-hK, authz-hK, reconciler-hK, scoper-hK (the scopers only once
        ``fdcs-name-scoper`` is installed)."""
        L = self.layout
        ports = state.get("ports", {})
        rport, kport = ports.get("redis", 0), ports.get("keystone", 0)
        out = [
            _Daemon("redis", L.pidfile("redis"), L.log("redis"), _redis.url(rport),
                    lambda: _redis.argv(rport, L.redis), dict, lambda: _redis.ping(rport), "redis"),
            _Daemon("keystone", L.pidfile("keystone"), L.log("keystone"), _keystone.url(kport),
                    lambda: _keystone.serve_argv(kport), lambda: _keystone.serve_env(L),
                    lambda: _keystone.ready(kport), "keystone"),
        ]
        for k in range(1, hosts + 1):
            out.extend(self._host_daemons(L.host(k), ports))
        return out

    def _host_daemons(self, host: Host, ports: dict[str, int]) -> list[_Daemon]:
        L = self.layout
        engine = _engine.component(host)
        authz = f"authz-{host.suffix}"
        out = [
            _Daemon(engine, L.pidfile(engine), L.log(engine), f"unix://{host.engine_socket}",
                    lambda: _engine.dockerd_argv(host), dict,
                    # every request passes the plugin: while it is down the
                    # engine can only be seen listening (up starts the plugin
                    # first, so its own checks are always full pings)
                    lambda: _engine.ping(host, self._admin_headers()) if plugin_ready(host)
                    else _engine.accepts(host), "engine"),
            _Daemon(authz, L.pidfile(authz), L.log(authz), f"unix://{host.plugin_socket}",
                    lambda: [_authz_command(), "--config", str(L.conf)],
                    lambda: {
                        "FDCS_HOST_ID": host.name,
                        "FDCS_PLUGIN_NAME": host.plugin_name,
                        "FDCS_PLUGIN_SOCKET": str(host.plugin_socket),
                        "FDCS_PLUGIN_METRICS_LISTEN": _metrics_listen(ports, "authz", host),
                    },
                    lambda: plugin_ready(host), "authz", _metrics_url(ports, "authz", host)),
        ]
        rport = ports.get("redis", 0)
        reconciler = f"reconciler-{host.suffix}"
        out.append(
            # ready once its first full pass has marked the host complete
            _Daemon(reconciler, L.pidfile(reconciler), L.log(reconciler), f"unix://{host.engine_socket}",
                    lambda: [_console_script("fdcs-reconciler"), "--config", str(L.conf)],
                    lambda: {"FDCS_HOST_ID": host.name, "FDCS_RECONCILER_ENGINE_SOCKET": str(host.engine_socket),
                             "FDCS_RECONCILER_METRICS_LISTEN": _metrics_listen(ports, "reconciler", host)},
                    lambda: _redis.reconciled(rport, host.name, settle=2 * RECONCILE_INTERVAL), "reconciler",
                    _metrics_url(ports, "reconciler", host)))
        exe = _scoper.command()
        if exe is not None:
            scoper = _scoper.component(host)
            port = ports.get(_scoper.port_key(host))
            out.append(
                _Daemon(scoper, L.pidfile(scoper), L.log(scoper), _scoper.addr(port),
                        lambda: _scoper.argv(exe, L),
                        lambda: {**_scoper.env(host, port, L),
                                 "FDCS_SCOPER_METRICS_LISTEN": _metrics_listen(ports, "scoper", host)},
                        lambda: _scoper.ping(port, L), "scoper", _metrics_url(ports, "scoper", host)))
        return out

    def _admin_headers(self) -> dict[str, str]:
        try:
            key = self.layout.admin_key.read_text().strip()
        except FileNotFoundError:
            return {}
        return {_admin_header(): key}

    def _stop_engine(self, host: Host, cmds: Commands) -> None:
        pid = live_pid(self.layout.pidfile(_engine.component(host)))
        _engine.stop(host, pid, cmds)

    @staticmethod
    def _stop_pidfile(pidfile: Path, cmds: Commands) -> None:
        pid = live_pid(pidfile)
        if pid is not None:
            cmds.note("down", f"stop {pidfile.stem} pid {pid}")
            terminate(pid, group=True, timeout=15)

    def _down_outside(self, cmds: Commands, hosts: list[Host] | None = None) -> None:
        """What lives outside DIR: network namespaces and plugin sockets."""
        for h in hosts if hosts is not None else self.layout.known_hosts():
            _engine.delete_netns(h, cmds)
            h.plugin_socket.unlink(missing_ok=True)
            # the plugin's metric files (removed by the plugin itself unless it was killed)
            shutil.rmtree(fdcs_metrics.default_multiproc_dir(h.plugin_name), ignore_errors=True)


def _metrics_key(daemon: str, host: Host) -> str:
    """Key of a host's metrics port in ``state["ports"]`` (daemon: authz,
    scoper, reconciler)."""
    return f"metrics-{daemon}-{host.suffix}"


def _metrics_listen(ports: dict[str, int], daemon: str, host: Host) -> str:
    """The daemon's ``*.metrics_listen``: its kept loopback port, or "" (no
    listener; never the fixed defaults, which the hosts would share)."""
    port = ports.get(_metrics_key(daemon, host))
    return f"127.0.0.1:{port}" if port else ""


def _metrics_url(ports: dict[str, int], daemon: str, host: Host) -> str:
    listen = _metrics_listen(ports, daemon, host)
    return f"http://{listen}/metrics" if listen else ""


def _admin_header() -> str:
    """The break-glass header name, as the plugin will read it (the stack's
    fdcs.toml does not change it)."""
    return next(o.default for o in fdcs_config.OPTIONS if o.dotted == "keystone.admin_key_header")


class _Up:
    """One run of ``up`` (see the module docstring for its steps)."""

    def __init__(self, stack: Stack, state: State, cmds: Commands, hosts: int):
        self.stack = stack
        self.L = stack.layout
        self.state = state
        self.cmds = cmds
        self.n = hosts
        self.kport = state["ports"]["keystone"]
        self.rport = state["ports"]["redis"]
        self.daemons = {d.name: d for d in stack._daemons(state, hosts)}
        self.admin_id: cf.Future[str] = cf.Future()
        #: done when the demo users' config dirs exist (the scopers' probe is alice)
        self.clients: cf.Future[None] = cf.Future()
        self.conf_lock = threading.Lock()
        self.conf_changed: bool | None = None

    # -- orchestration ------------------------------------------------------------------

    def run(self) -> None:
        L, cmds = self.L, self.cmds
        if _scoper.command() is None:
            log.warning("%s is not installed: no name scopers are started, and FDCS_DOCKER_HOST(S) "
                        "point at the engines (plugin-only mode)", _scoper.COMMAND)
        key = _clients.ensure_admin_key(L)
        _clients.ensure_admin_key_config(L, _admin_header(), key)
        with cf.ThreadPoolExecutor(max_workers=5 + 2 * self.n, thread_name_prefix="up") as pool:
            self.busybox = pool.submit(self._step, "busybox", _engine.build_busybox_tar, L.busybox_tar, cmds)
            self.netns = {
                k: pool.submit(self._step, f"netns-h{k}", _engine.ensure_netns, L.host(k), cmds)
                for k in range(1, self.n + 1)
            }
            steps = [
                pool.submit(self._step, "redis", self._daemon, self.daemons["redis"]),
                pool.submit(self._step, "tls", _tls.ensure, L, cmds),
                pool.submit(self._step, "keystone", self._keystone),
                self.busybox,
                *self.netns.values(),
                *(pool.submit(self._step, f"h{k}", self._host, L.host(k)) for k in range(1, self.n + 1)),
            ]
            errors = [f.exception() for f in cf.as_completed(steps) if f.exception() is not None]
        if errors:
            # the first real failure, not the "gave up" of the others
            real = [e for e in errors if not isinstance(e, Aborted)]
            raise (real or errors)[0]
        self.state["hosts"] = self.n
        write_if_changed(L.env_file, self._env_text(), 0o600)

    def _step(self, name: str, fn: Callable, *args):
        t0 = time.monotonic()
        try:
            result = fn(*args)
        except BaseException as e:
            self.cmds.abort.set()
            for fut in (self.admin_id, self.clients):
                if not fut.done():
                    fut.set_exception(Aborted(f"{name} failed"))
            if not isinstance(e, Aborted):
                log.error("%s: %s", name, e)
            raise
        log.info("%s ready (%.1f s)", name, time.monotonic() - t0)
        return result

    # -- daemons -----------------------------------------------------------------------

    def _daemon(self, d: _Daemon, *, wait: bool = True, restart: bool = False) -> int:
        """Make ``d`` alive and ready: keep it if it is, else (re)start it.
        Returns its pid.  ``restart``: restart it even if it is fine (its
        configuration changed)."""
        pid = live_pid(d.pidfile)
        if pid is not None and not restart:
            if d.ready():
                return pid
            try:
                wait_until(d.ready, component=d.name, log=d.log, timeout=GRACE[d.kind], pid=pid,
                           abort=self.cmds.abort, what="not answering")
                return pid
            except ComponentFailed:
                self.cmds.note(d.name, f"pid {pid} alive but not answering: restart")
        if pid is not None:
            self._stop(d, live_pid(d.pidfile))  # re-read: it may have died meanwhile
        pid = self._start(d)
        if wait:
            self._wait(d, pid)
        return pid

    def _start(self, d: _Daemon) -> int:
        if d.kind == "engine":
            _engine.before_start(self._host_of(d), self.cmds)
        return self.cmds.spawn(d.name, d.argv(), d.pidfile, env=d.env(), log=d.log)

    def _wait(self, d: _Daemon, pid: int) -> None:
        wait_until(d.ready, component=d.name, log=d.log, timeout=TIMEOUTS[d.kind], pid=pid,
                   abort=self.cmds.abort)

    def _stop(self, d: _Daemon, pid: int | None) -> None:
        if d.kind == "engine":
            _engine.stop(self._host_of(d), pid, self.cmds)  # cleans up even when dead
        elif pid is not None:
            terminate(pid)

    def _host_of(self, d: _Daemon) -> Host:
        return self.L.host(int(d.name.rsplit("-h", 1)[1]))

    # -- keystone ------------------------------------------------------------------------

    def _keystone(self) -> None:
        d = self.daemons["keystone"]
        started: list[int] = []

        def start_server() -> None:
            # once the key repositories have keys: see _keystone.setup()
            started.append(self._daemon(d, wait=False))

        try:
            _keystone.write_config(self.L)
            _keystone.setup(self.L, self.kport, self.state["password"], self.cmds, start_server)
            admin_id = self.state.get("admin_project_id") or _keystone.admin_project_id(self.L, self.cmds)
            self.state["admin_project_id"] = admin_id
            self.admin_id.set_result(admin_id)
        except BaseException as e:
            if not self.admin_id.done():
                self.admin_id.set_exception(e)
            raise
        self._wait(d, started[0])
        self._provision()
        url = _keystone.url(self.kport)
        for user, project in CLIENTS.values():
            _clients.ensure_user_config(self.L, self.state, self.cmds, url, user, project)
        self.clients.set_result(None)

    def _provision(self) -> None:
        """The demo projects and users of DEVSTACK.md (skipped when state.json
        already has them all: a second ``up`` makes no API call)."""
        have_p, have_u = self.state.get("projects", {}), self.state.get("users", {})
        if all(p in have_p for p in _keystone.DEMO) and all(
            u in have_u for members in _keystone.DEMO.values() for u in members
        ):
            return
        api = _keystone.Api(_keystone.url(self.kport), self.cmds, self.L.log("keystone"))
        api.login("admin", self.state["password"])
        roles = api.role_ids()
        for project, members in _keystone.DEMO.items():
            pid = api.ensure_project(project)
            self.state.update("projects", project, pid)
            for user, role in members.items():
                uid = api.ensure_user(user, self.state["password"], pid)
                api.grant(pid, uid, roles[role])
                self.state.update("users", user, {"id": uid, "project": project, "role": role})

    # -- hosts ---------------------------------------------------------------------------

    def _conf(self) -> bool:
        """Write fdcs.toml (once per run, any host thread); True if it changed."""
        with self.conf_lock:
            if self.conf_changed is None:
                admin_id = self.admin_id.result()
                text = (
                    "# FDCS configuration of the local stack (written by fdcs-devstack).\n"
                    "# Per-host values come from the environment of each host's processes:\n"
                    "# FDCS_HOST_ID, FDCS_PLUGIN_NAME, FDCS_PLUGIN_SOCKET, FDCS_SCOPER_*, FDCS_RECONCILER_*.\n"
                    "[keystone]\n"
                    f'url = "{_keystone.url(self.kport)}"\n'
                    f'admin_project_id = "{admin_id}"\n'
                    f'admin_key_file = "{self.L.admin_key}"\n'
                    "# the local stack shares this machine's cores with everything else: a busy\n"
                    "# machine makes Keystone slow, never unavailable\n"
                    "timeout = 15.0\n"
                    "\n[redis]\n"
                    f'url = "{_redis.url(self.rport)}"\n'
                    "\n[reconciler]\n"
                    "# short, so that a Redis loss is repaired within seconds in trials and tests\n"
                    f"interval = {RECONCILE_INTERVAL}\n"
                    "\n[policy]\n"
                    "# the engines run with --log-opt max-size=" + _engine.LOG_MAX_SIZE + "\n"
                    f'log_max_size = "{_engine.LOG_MAX_SIZE}"\n'
                    "\n[quota]\n"
                    "# accounted and enforced; no default limits (fdcs-manage quota set adds them per tenant)\n"
                    "enabled = true\n"
                    'default_memory = "256m"\n'
                    'default_cpus = "1"\n'
                    'flavors = { small = "256m,0.5", medium = "512m,1", large = "1g,2" }\n'
                    "\n[manage]\n"
                    "# fdcs-manage reaches every host's engine, and Keystone as admin\n"
                    "engines = { " + ", ".join(f'"{self.L.host(k).name}" = "unix://{self.L.host(k).engine_socket}"'
                                               for k in range(1, self.n + 1)) + " }\n"
                    f'keystone_password_file = "{self.L.root / "admin.password"}"\n'
                )
                write_if_changed(self.L.root / "admin.password", self.state["password"] + "\n", 0o600)
                text = merge_local_conf(text, self.L.root / LOCAL_CONF)
                self.conf_changed = write_if_changed(self.L.conf, text, 0o600)
                try:
                    fdcs_config.load(str(self.L.conf), env={})
                except fdcs_config.ConfigError as e:
                    raise DevstackError(f"the stack's configuration is invalid: {e}") from e
            return self.conf_changed

    def _host(self, host: Host) -> None:
        """Plugin, then engine (dockerd asks for its plugin at start), then
        image, then the name scoper (in front of the engine)."""
        changed = self._conf()
        authz = self.daemons[f"authz-{host.suffix}"]
        engine = self.daemons[_engine.component(host)]
        restart_plugin = changed and live_pid(authz.pidfile) is not None
        self._daemon(authz, restart=restart_plugin)
        new_netns = self.netns[host.index].result()
        host.dir.mkdir(exist_ok=True)
        pid = live_pid(engine.pidfile)
        # an engine running in a namespace that was deleted and made anew
        # cannot be reached as this host: restart it in the new one
        self._daemon(engine, restart=bool(new_netns and pid))
        self.busybox.result()
        headers = self.stack._admin_headers()
        if not _engine.has_image(host, headers):
            _engine.import_busybox(host, self.L, self.cmds)
        # the reconciler reads the engine as an administrator and marks the
        # host's records complete: until then tenants get "retry" for
        # references the records do not know
        rec = self.daemons[f"reconciler-{host.suffix}"]
        self._daemon(rec, restart=changed and live_pid(rec.pidfile) is not None)
        scoper = self.daemons.get(_scoper.component(host))
        if scoper is None:
            return  # not installed (run() said so)
        # Its probe authenticates as alice through Keystone: wait for her
        # config dir, and for Keystone itself, so that a Keystone being
        # restarted by this same run is not taken for a hung scoper.
        self.clients.result()
        self._daemon(scoper, restart=changed and live_pid(scoper.pidfile) is not None)

    # -- env -----------------------------------------------------------------------------

    def _env_text(self) -> str:
        L, st = self.L, self.state
        engines = [f"unix://{L.host(k).engine_socket}" for k in range(1, self.n + 1)]
        # Tenants use the hosts' name scopers (tcp://127.0.0.1:PORT, TLS);
        # without an installed scoper they talk to the engines directly
        # (plugin-only mode).
        scopers = [self.daemons.get(_scoper.component(L.host(k))) for k in range(1, self.n + 1)]
        docker_hosts = [d.addr for d in scopers] if all(scopers) else engines
        ca = str(L.certs / "ca.pem")
        values = {
            "FDCS_DOCKER_HOST": docker_hosts[0],
            "FDCS_DOCKER_HOSTS": " ".join(docker_hosts),
            "FDCS_ENGINE_HOSTS": " ".join(engines),
            "DOCKER_CERT_PATH": str(L.certs),
            "REQUESTS_CA_BUNDLE": ca,
            "CURL_CA_BUNDLE": ca,
            # "1" for the TLS scopers.  Empty (unset for the docker CLI and
            # docker-py) in plugin-only mode: with it set, the CLI speaks TLS
            # even over a unix socket and every command fails.
            "DOCKER_TLS_VERIFY": "1" if docker_hosts[0].startswith("tcp://") else "",
            **{k: str(L.client_dir(user)) for k, (user, _) in CLIENTS.items()},
            "FDCS_TENANT_A": st["projects"]["tenant-a"],
            "FDCS_TENANT_B": st["projects"]["tenant-b"],
            "FDCS_KEYSTONE_URL": _keystone.url(self.kport),
            "FDCS_REDIS_URL": _redis.url(self.rport),
            "FDCS_PASSWORD": st["password"],
            "FDCS_ADMIN_KEY_FILE": str(L.admin_key),
            "FDCS_CONF": str(L.conf),
            # the metrics endpoints: FDCS_METRICS_H1_PLUGIN, FDCS_METRICS_H1_SCOPER...
            **{f"FDCS_METRICS_{L.host(k).suffix.upper()}_{role}": self.daemons[name].metrics
               for k in range(1, self.n + 1)
               for role, name in (("PLUGIN", f"authz-{L.host(k).suffix}"),
                                  ("SCOPER", _scoper.component(L.host(k))),
                                  ("RECONCILER", f"reconciler-{L.host(k).suffix}"))
               if name in self.daemons and self.daemons[name].metrics},
        }
        return "".join(f"{k}={_quote(v)}\n" for k, v in values.items())


#: site options merged over the generated fdcs.toml (trials and tests)
LOCAL_CONF = "fdcs.local.toml"


def merge_local_conf(text: str, local: Path) -> str:
    """``text`` with the options of ``local`` (a TOML file, if it exists)
    merged over it, option by option."""
    import tomllib

    if not local.exists():
        return text
    try:
        extra = tomllib.loads(local.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DevstackError(f"{local} cannot be read: {e}") from e
    doc = tomllib.loads(text)
    for section, table in extra.items():
        if not isinstance(table, dict):
            raise DevstackError(f"{local}: top-level key {section!r} must be a [section]")
        doc.setdefault(section, {}).update(table)
    lines = [f"# FDCS configuration of the local stack (written by fdcs-devstack, with {local.name})."]
    for section, table in doc.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string for our values
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise DevstackError(f"cannot write {v!r} in fdcs.toml")


def _quote(value: str) -> str:
    """Shell-sourceable: bare when safe, else in double quotes."""
    if value and all(c.isalnum() or c in "_-./:@%+=,~" for c in value):
        return value
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in value)
    return f'"{escaped}"'
