"""The real local stack for end-to-end tests: dockerd, Redis and Keystone.

One stack per test session, brought up with the product's own
``fdcs-devstack up`` in a fresh state dir and always taken down with
``fdcs-devstack down`` (which stops every process it started, by pid, and
removes namespaces, mounts and plugin sockets), even when tests fail.

Tests drive the engines with Debian's stock docker CLI (``/usr/bin/docker``)
and the demo users' config dirs, exactly as a tenant would.
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

    def up(self) -> None:
        self.cmd("up")
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
        return Cli(self.env[user], host or self.env["FDCS_ENGINE_HOSTS"].split()[0])

    def raw(self, user: str | None, host: str | None = None) -> "Raw":
        headers = {}
        if user:
            cfg = json.loads((Path(self.env[user]) / "config.json").read_text())
            headers = dict(cfg.get("HttpHeaders", {}))
        return Raw((host or self.env["FDCS_ENGINE_HOSTS"].split()[0]).removeprefix("unix://"), headers)


class Cli:
    """The stock docker CLI as one user."""

    def __init__(self, config_dir: str, host: str):
        self.config_dir = config_dir
        self.host = host

    def __call__(self, *args: str, check: bool = True, input: str | bytes | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [DOCKER, "--config", self.config_dir, "-H", self.host, *args]
        p = subprocess.run(argv, capture_output=True, input=input, timeout=timeout,
                           text=not isinstance(input, bytes))
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def fails(self, *args: str, match: str = "") -> str:
        p = self(*args, check=False)
        assert p.returncode != 0, f"{' '.join(args)} should have been refused; it printed {p.stdout!r}"
        assert match in p.stderr, f"{' '.join(args)}: expected {match!r} in {p.stderr!r}"
        return p.stderr


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
