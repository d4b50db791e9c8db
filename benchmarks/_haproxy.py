"""Three paths to one stack's engine, for the benchmarks that compare the
name scoper with HAProxy (``scoper_inspect.py``, ``streams.py``,
``memory.py``): not a benchmark itself.

:class:`ThreePaths` brings up (or reuses, ``--keep-stack DIR``) a one-host
local stack (``fdcs-devstack``: dockerd 20.10 in its own netns with the FDCS
plugin, and the host's name scoper), starts HAProxy (Debian's package) beside
it, and offers the same engine three ways:

* ``scoper``  -- the stack's ``FDCS_DOCKER_HOST`` (TLS), with the names a
  tenant writes (``bench``);
* ``haproxy`` -- TLS to HAProxy in HTTP mode, configured as Tecnativa's
  docker-socket-proxy is (``option http-server-close``: keep-alive towards the
  client, a new engine connection per request, as the scoper does), with the
  engine-side scoped name (``<tenant>_bench``);
* ``direct``  -- the engine's unix socket, plain, with the scoped name.

Each as a socket factory (:attr:`ThreePaths.connect`), as Debian docker CLI
arguments (:meth:`ThreePaths.docker`, alice's config dir, so her
``HttpHeaders``), and with alice's headers for raw requests
(:attr:`ThreePaths.headers`).  :meth:`ThreePaths.cleanup` releases all of it
(HAProxy by pid, the benchmark's containers, temporary files, the stack
unless kept) and returns the problems instead of raising.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from authz_plugin.devstack import Stack
from authz_plugin.devstack._engine import DOCKER
from authz_plugin.devstack._procs import Commands, free_ports, live_pid, terminate, wait_until

from _common import Client, children, spy_path, tls_connector, unix_connector

HAPROXY = "/usr/sbin/haproxy"
PATHS = ("scoper", "haproxy", "direct")

HAPROXY_CFG = """\
# written by benchmarks/_haproxy.py: a TLS-terminating HTTP proxy in front of
# the engine socket, set up as Tecnativa's docker-socket-proxy is (mode http,
# option http-server-close, its timeouts, one log line per request)
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

# The same HTTP-mode backend, behind a TCP-mode frontend that sends a
# connection whose FIRST request asks for an upgrade (``Upgrade: tcp``: the
# CLI's exec start and attach, always dialled on a new connection) to a raw
# TCP tunnel instead.  Why: HAProxy >= 2.4 in HTTP mode drops the upgrade of a
# request that has a body (exec start has one: {"Detach":false,...}), so the
# engine answers 200 and the stream never flows (haproxy issue #2684; the
# docker-socket-proxy image stays on HAProxy 2.2 for it).  HAProxy <= 2.3
# tunnelled the connection after the engine's 101: the same byte path as
# this.  Every other request still goes through the HTTP-mode backend (the
# stream is upgraded to HTTP implicitly; one log line per request, in tcplog
# format since the frontend is TCP).
HAPROXY_CFG_TUNNEL = """\
# written by benchmarks/_haproxy.py: as HAPROXY_CFG (mode http,
# http-server-close), except that hijacked streams (Upgrade: tcp) are
# tunnelled in TCP mode, which HAProxy >= 2.4 in HTTP mode cannot carry
global
    maxconn 4000
    log stdout format raw daemon info

defaults
    log global
    option dontlognull
    timeout connect 10s
    timeout client 10m
    timeout server 10m

frontend docker
    mode tcp
    option tcplog
    bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1
    tcp-request inspect-delay 10s
    tcp-request content accept if HTTP
    use_backend engine_tunnel if {{ req.hdr(upgrade) -m found }}
    default_backend engine

backend engine
    mode http
    option http-server-close
    timeout http-request 10s
    timeout queue 1m
    timeout http-keep-alive 10s
    server engine unix@{socket}

backend engine_tunnel
    mode tcp
    server engine unix@{socket}
"""


def haproxy_config(port: int, pem: Path | str, engine_socket: str, tunnel_upgrades: bool = False) -> str:
    """HAProxy's configuration: TLS on ``127.0.0.1:port`` with ``pem``
    (certificate + key), HTTP mode, to the unix socket ``engine_socket``;
    with ``tunnel_upgrades``, hijacked streams (exec, attach) tunnelled in
    TCP mode (see HAPROXY_CFG_TUNNEL)."""
    return (HAPROXY_CFG_TUNNEL if tunnel_upgrades else HAPROXY_CFG).format(port=port, pem=pem,
                                                                           socket=engine_socket)


class ThreePaths:
    """A stack, HAProxy beside it, and the three paths to its engine.

    ``keep_stack``: the stack's state dir to use (or bring up) and leave
    running; None: a fresh one-host stack in a temporary dir, brought down
    by :meth:`cleanup`.  ``prog`` names the temporary dir and the logs.
    ``tunnel_upgrades``: HAProxy tunnels hijacked streams (exec, attach) in
    TCP mode, which HTTP mode cannot carry (:data:`HAPROXY_CFG_TUNNEL`).
    """

    def __init__(self, keep_stack: str | None, prog: str, say: Callable[[str], None],
                 tunnel_upgrades: bool = False):
        self.say = say
        self.tunnel_upgrades = tunnel_upgrades
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{prog}-", dir="/tmp"))
        for d in ("logs", "run", "data"):
            (self.tmp / d).mkdir()
        self.cmds = Commands(self.tmp / "logs")
        self.keep = keep_stack is not None
        self.stack = Stack(keep_stack if self.keep else self.tmp / "stack")
        self.stack_started = False
        self.containers: list[str] = []  # tenant-side names, removed by cleanup
        self.haproxy_pidfile = self.tmp / "run" / "haproxy.pid"
        self.haproxy_pid: int | None = None

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        self.stack_started = True
        self.say(f"stack: fdcs-devstack up in {self.stack.dir}")
        took = self.stack.up(None if self.keep else 1)
        self.say(f"stack: up ({took:.0f} s)")
        env = self.stack.env()
        self.tenant = env["FDCS_TENANT_A"]
        self.alice_config = env["FDCS_CONFIG_A1"]
        self.engine_socket = env["FDCS_ENGINE_HOSTS"].split()[0].removeprefix("unix://")
        self.scoper_host = env["FDCS_DOCKER_HOST"]
        certs = Path(self.stack.dir) / "certs"
        self.ca, self.cert, self.key = (str(certs / n) for n in ("ca.pem", "cert.pem", "key.pem"))
        cfg = json.loads((Path(self.alice_config) / "config.json").read_text())
        self.headers: dict[str, str] = {**cfg["HttpHeaders"], "User-Agent": "fdcs-bench"}
        status = {s.name: s for s in self.stack.status()}
        scoper = status.get("scoper-h1")
        if scoper is None or not scoper.up or not scoper.pid:
            raise RuntimeError(f"the stack's scoper is not up: {scoper}")
        self.scoper_pid: int = scoper.pid
        self.scoper_port = int(self.scoper_host.rsplit(":", 1)[1])
        self.ctx = ssl.create_default_context(cafile=self.ca)
        self.ctx.load_cert_chain(self.cert, self.key)
        self._start_haproxy()
        self.connect: dict[str, Callable[[], socket.socket]] = {
            "scoper": tls_connector("127.0.0.1", self.scoper_port, self.ctx),
            "haproxy": tls_connector("127.0.0.1", self.haproxy_port, self.ctx),
            "direct": unix_connector(self.engine_socket),
        }
        tls = ["--tlsverify", "--tlscacert", self.ca, "--tlscert", self.cert, "--tlskey", self.key]
        self.cli = {"scoper": ["-H", self.scoper_host, *tls],
                    "haproxy": ["-H", f"tcp://127.0.0.1:{self.haproxy_port}", *tls],
                    "direct": ["-H", f"unix://{self.engine_socket}"]}
        self.authz_pid = self.stack.pid("authz-h1")
        self.engine_pids = [p for p in [self.stack.pid("engine-h1")] if p]
        self.plugin_pids = [p for p in [self.authz_pid, *(children(self.authz_pid) if self.authz_pid else []),
                                        self.stack.pid("redis")] if p]
        self.proxy_pids = {"scoper": [self.scoper_pid], "haproxy": [self.haproxy_pid], "direct": []}

    def _start_haproxy(self) -> None:
        tls = Path(self.stack.dir) / "tls"
        pem = self.tmp / "haproxy-server.pem"
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write((tls / "server-cert.pem").read_bytes() + (tls / "server-key.pem").read_bytes())
        self.haproxy_port = free_ports(1)[0]
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.haproxy_port, pem, self.engine_socket, self.tunnel_upgrades))
        self.cmds.run("haproxy", [HAPROXY, "-c", "-q", "-f", cfg])
        self._spawn_haproxy()
        self.haproxy_version = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True).stdout.split()[2]
        self.say(f"haproxy {self.haproxy_version}: pid {self.haproxy_pid} on 127.0.0.1:{self.haproxy_port}")

    def _spawn_haproxy(self) -> None:
        # -db: foreground, so the pid we record is HAProxy's own
        self.haproxy_pid = self.cmds.spawn("haproxy", [HAPROXY, "-db", "-f", self.tmp / "haproxy.cfg"],
                                           self.haproxy_pidfile)
        wait_until(self._haproxy_ready, component="haproxy", log=self.cmds.log_path("haproxy"), timeout=20,
                   pid=self.haproxy_pid)

    def restart_haproxy(self) -> str:
        """Replace a stalled HAProxy by a fresh one: KILL (it is being
        replaced, and a stopped process would sit on a TERM), then the same
        configuration on the same port, so the CLI arguments and connectors
        stay valid; :attr:`proxy_pids` follows.  Returns what was done."""
        old = live_pid(self.haproxy_pidfile)
        if old is not None:
            terminate(old, group=False, sig=signal.SIGKILL, timeout=5)
        self._spawn_haproxy()
        self.proxy_pids["haproxy"] = [self.haproxy_pid]
        done = f"a fresh HAProxy (pid {old} killed, pid {self.haproxy_pid} on the same port)"
        self.say(f"haproxy restarted: {done}")
        return done

    def _haproxy_ready(self) -> bool:
        return self.answers_ping(tls_connector("127.0.0.1", self.haproxy_port, self.ctx))

    def answers_ping(self, connect) -> bool:
        """Whether a ``/_ping`` through ``connect`` is answered (a proxy is up)."""
        try:
            c = Client(connect, 1, self.headers)
        except OSError:
            return False
        try:
            c.batch("/_ping", 1)
            return True
        except RuntimeError:
            return False
        finally:
            c.close()

    # -- use -----------------------------------------------------------------------

    def ref(self, path: str, name: str) -> str:
        """How ``path`` names the tenant's container ``name``."""
        return name if path == "scoper" else f"{self.tenant}_{name}"

    def docker_argv(self, path: str, *args: str) -> list[str]:
        """Debian's CLI as alice (her ``HttpHeaders``) on ``path``."""
        return [DOCKER, "--config", self.alice_config, *self.cli[path], *args]

    def docker(self, path: str, *args: str, check: bool = True, timeout: float = 600) -> str:
        try:
            return self.cmds.run("docker", self.docker_argv(path, *args), capture=True, timeout=timeout)
        except Exception:
            if check:
                raise
            return ""

    def run_container(self, name: str, *cmd: str, image: str = "busybox") -> str:
        """``docker run -d --name NAME IMAGE CMD...`` through the scoper as
        alice (a kept stack's leftover of the same name is removed first);
        the id.  :meth:`cleanup` removes it."""
        self.docker("scoper", "rm", "-f", name, check=False)
        self.containers.append(name)
        return self.docker("scoper", "run", "-d", "--name", name, image, *cmd).strip()

    def snapshot_hang(self, what: str) -> list[str]:
        """Where everything stands while ``what`` hangs, into the logs folder
        (which :meth:`keep_logs` copies): the engine's goroutines (dockerd
        writes them on SIGUSR1 into its exec root and logs the file), the
        scoper's Python stacks (``py-spy dump``) and HAProxy's log as it is.
        Returns the files written (or why not); never raises."""
        logs = self.tmp / "logs"
        out: list[str] = []
        engine = self.stack.pid("engine-h1") if self.stack_started else None
        if engine:
            exec_root = Path(self.stack.dir) / "h1" / "exec"
            before = set(exec_root.glob("goroutine-stacks-*.log"))
            try:
                os.kill(engine, signal.SIGUSR1)
                deadline = time.monotonic() + 10
                new: set[Path] = set()
                while not new and time.monotonic() < deadline:
                    time.sleep(0.2)
                    new = set(exec_root.glob("goroutine-stacks-*.log")) - before
                for f in new:
                    dest = logs / f"dockerd-{f.name}"
                    shutil.move(str(f), dest)  # out of the stack's exec root
                    out.append(str(dest))
                if not new:
                    out.append(f"dockerd pid {engine}: no goroutine dump in {exec_root} after SIGUSR1")
            except OSError as e:
                out.append(f"dockerd pid {engine}: {e}")
        spy = spy_path()
        if spy and getattr(self, "scoper_pid", None):
            dest = logs / "scoper-py-spy-dump.txt"
            try:
                with open(dest, "wb") as f:
                    subprocess.run([spy, "dump", "--pid", str(self.scoper_pid)], stdout=f, stderr=f, timeout=30,
                                   check=False)
                out.append(str(dest))
            except (OSError, subprocess.TimeoutExpired) as e:
                out.append(f"py-spy dump of the scoper: {e}")
        self.say(f"snapshot while {what} hangs: {', '.join(out) or 'nothing'}")
        return out

    # -- stop ----------------------------------------------------------------------

    def keep_logs(self) -> Path:
        """Copy the logs (ours and the stack's) out of what clean-up removes."""
        dest = Path(tempfile.mkdtemp(prefix=f"{self.tmp.name}-failed-logs-", dir="/tmp"))
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
                if self.containers:
                    attempt("remove the benchmark's containers", self.docker, "direct", "rm", "-f",
                            *(self.ref("direct", n) for n in self.containers))
            else:
                attempt("fdcs-devstack down", self.stack.down)
        attempt(f"remove {self.tmp}", shutil.rmtree, self.tmp)
        return problems
