"""The real local stack for end-to-end tests: dockerd, Redis and Keystone.

One stack per test session, brought up with the product's own
``fdcs-devstack up`` in a fresh state dir and always taken down with
``fdcs-devstack down`` (which stops every process it started, by pid, and
removes namespaces, mounts and plugin sockets), even when tests fail.

Tests drive the engines with Debian's stock docker CLI (``/usr/bin/docker``)
and the demo users' config dirs, exactly as a tenant would: the plugin's
tests straight on the engine sockets (``FDCS_ENGINE_HOSTS``, plugin-only
mode, ``Stack.cli``), the name scoper's through host 1's scoper
(``FDCS_DOCKER_HOST``, TLS, ``Stack.scoper_cli`` and the ``scoper`` fixture).
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from authz_plugin.devstack._scoper import command as scoper_command

DOCKER = os.environ.get("FDCS_DOCKER_CLI", "/usr/bin/docker")
DEVSTACK = ["fdcs-devstack"]


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = shlex.split(v)[0] if v else ""
    return env


class Stack:
    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.env: dict[str, str] = {}

    def cmd(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run(DEVSTACK + list(args) + ["--state-dir", str(self.dir)], capture_output=True,
                           text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"fdcs-devstack {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def up(self, hosts: int = 2) -> None:
        self.cmd("up", "--hosts", str(hosts))
        self.env = read_env(self.dir / "env")

    def status(self) -> dict[str, dict[str, str]]:
        out = {}
        for line in self.cmd("status", check=False).stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = {"state": parts[1], **dict(p.split("=", 1) for p in parts[2:] if "=" in p)}
        return out

    def pid(self, component: str) -> int:
        return int(self.status()[component]["pid"])

    def cli(self, user: str, host: str | None = None) -> "Cli":
        """The CLI as ``user`` (a FDCS_CONFIG_* key) straight on an engine (host 1's by default)."""
        return Cli(self.env[user], host or self.env["FDCS_ENGINE_HOSTS"].split()[0], env=client_env())

    @property
    def certs(self) -> Path:
        return Path(self.env["DOCKER_CERT_PATH"])

    def scoper_cli(self, user: str, host: str | None = None, cert_path: str | os.PathLike | None = None) -> "Cli":
        """The CLI as ``user`` (a FDCS_CONFIG_* key or a config dir) through
        a name scoper (host 1's by default), verifying its certificate with
        ``--tlsverify`` and the files of ``cert_path`` (default the stack's
        DOCKER_CERT_PATH)."""
        certs = Path(cert_path or self.certs)
        tls = ["--tlsverify", "--tlscacert", str(certs / "ca.pem"),
               "--tlscert", str(certs / "cert.pem"), "--tlskey", str(certs / "key.pem")]
        return Cli(self.env.get(user, user), host or self.env["FDCS_DOCKER_HOST"], tls=tls, env=client_env())

    def client_env(self, user: str, cert_path: str | os.PathLike | None = None, host: str | None = None,
                   ca_bundle: bool = True) -> dict[str, str]:
        """The environment under which docker-py and docker-compose talk to a
        scoper as ``user``: DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH,
        DOCKER_CONFIG (whose HttpHeaders they send) and, with ``ca_bundle``,
        REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE pointing at the same CA (else
        unset, so that nothing overrides the CA of DOCKER_CERT_PATH)."""
        certs = Path(cert_path or self.certs)
        env = client_env(DOCKER_HOST=host or self.env["FDCS_DOCKER_HOST"], DOCKER_TLS_VERIFY="1",
                         DOCKER_CERT_PATH=str(certs), DOCKER_CONFIG=self.env.get(user, user))
        if ca_bundle:
            env["REQUESTS_CA_BUNDLE"] = env["CURL_CA_BUNDLE"] = str(certs / "ca.pem")
        return env

    def raw(self, user: str | None, host: str | None = None) -> "Raw":
        headers = {}
        if user:
            cfg = json.loads((Path(self.env[user]) / "config.json").read_text())
            headers = dict(cfg.get("HttpHeaders", {}))
        return Raw((host or self.env["FDCS_ENGINE_HOSTS"].split()[0]).removeprefix("unix://"), headers)


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment without DOCKER_*, COMPOSE_* and the CA
    bundle overrides (this machine points REQUESTS_CA_BUNDLE at the system
    bundle), plus ``extra``."""
    drop = ("DOCKER_", "COMPOSE_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
    env.update(extra)
    return env


class Cli:
    """The stock docker CLI as one user (``tls``: extra global flags, e.g.
    ``--tlsverify ...``; ``env``: its environment, default this process's).
    ``Stack.cli`` and ``Stack.scoper_cli`` pass ``client_env()``, so that a
    shell that sourced a stack's env file (DOCKER_TLS_VERIFY...) changes
    nothing."""

    def __init__(self, config_dir: str, host: str, tls: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.config_dir = config_dir
        self.host = host
        self.tls = list(tls or [])
        self.env = env

    def argv(self, *args: str) -> list[str]:
        return [DOCKER, "--config", self.config_dir, "-H", self.host, *self.tls, *args]

    def __call__(self, *args: str, check: bool = True, input: str | bytes | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        argv = self.argv(*args)
        p = subprocess.run(argv, capture_output=True, input=input, timeout=timeout,
                           text=not isinstance(input, bytes), env=self.env)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def fails(self, *args: str, match: str = "", input: str | bytes | None = None) -> str:
        p = self(*args, check=False, input=input)
        assert p.returncode != 0, f"{' '.join(args)} should have been refused; it printed {p.stdout!r}"
        assert match in p.stderr, f"{' '.join(args)}: expected {match!r} in {p.stderr!r}"
        return p.stderr

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env=self.env, **kw)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Raw:
    """Hand-made HTTP requests to an engine socket, with a user's headers."""

    def __init__(self, path: str, headers: dict[str, str]):
        self.path = path
        self.headers = headers

    def request(self, method: str, target: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, bytes]:
        h = dict(self.headers)
        if isinstance(body, dict):
            body = json.dumps(body)
            h["Content-Type"] = "application/json"
        if isinstance(body, str):
            body = body.encode()
        h.update(headers or {})
        conn = _UnixConnection(self.path)
        try:
            if chunked:
                conn.putrequest(method, target, skip_accept_encoding=True)
                for k, v in h.items():
                    conn.putheader(k, v)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                data = body or b""
                for i in range(0, len(data), 7):
                    piece = data[i:i + 7]
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                conn.send(b"0\r\n\r\n")
            else:
                if body is None and method in ("POST", "PUT"):
                    body = b""
                try:
                    conn.request(method, target, body=body, headers=h)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the engine answered (and closed) before reading all of a large body
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="session")
def stack():
    if os.geteuid() != 0:
        pytest.skip("the real stack needs root")
    state_dir = Path(tempfile.mkdtemp(prefix="fdcs-e2e-", dir="/tmp"))
    s = Stack(state_dir)
    try:
        s.up()
        yield s
    finally:
        s.cmd("down", check=False)


@pytest.fixture(scope="session")
def scoper(stack) -> str:
    """Host 1's name scoper (``tcp://127.0.0.1:PORT``); the tests that need
    it skip while ``fdcs-name-scoper`` is not installed (the stack then runs
    in plugin-only mode), and fail if it is installed but not in use."""
    host = stack.env["FDCS_DOCKER_HOST"]
    if not host.startswith("tcp://"):
        if scoper_command() is not None:
            pytest.fail(f"fdcs-name-scoper is installed but FDCS_DOCKER_HOST is {host}: the stack "
                        "was brought up without it (fdcs-devstack up)")
        pytest.skip("fdcs-name-scoper is not installed: the stack runs in plugin-only mode")
    return host


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # keep polling through transient failures
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
