"""Fault injection on a real local stack of its own.

The fault tests kill and restart the stack's components (plugin workers,
name scoper, engine, Redis, Keystone), so they never share the e2e session
stack: ``fstack`` is a two-host stack brought up with ``fdcs-devstack up``
in a fresh state dir and always taken down with ``fdcs-devstack down``
(``FDCS_FAULTS_KEEP_LOGS=DIR`` keeps a copy of its logs in DIR).
Every test leaves it whole again (``up`` in a ``finally``), so that the
next one starts from a working stack even after a failure.

:class:`Holdings` is what tenant A owns before a fault (containers on both
hosts, a volume, a network); :meth:`Holdings.check` is the "no ownership
lost" verdict every test ends with: each resource is still usable by its
owner (by name, id and id prefix; exec into the running container) and
still invisible to tenant B (refused as missing, absent from B's lists),
and Redis still names A as its owner.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from authz_plugin.devstack import Stack as Devstack
from authz_plugin.devstack._state import Layout
from tests.e2e.conftest import Cli, Stack, client_env, wait_for

A1, A2, B1, ADMIN = "FDCS_CONFIG_A1", "FDCS_CONFIG_A2", "FDCS_CONFIG_B1", "FDCS_CONFIG_ADMIN"

#: the words an actionable refusal during a fault carries ("..., retry",
#: "retry later", "check, then retry")
RETRY = "retry"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def uniq(prefix: str = "f") -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


class FaultStack(Stack):
    """The e2e :class:`Stack` plus the fault controls: the product's own
    devstack API (``ds``: pids, ``kill``), the admin CLIs, Redis, the
    reconcilers and the plugins' workers."""

    def __init__(self, state_dir: Path):
        super().__init__(state_dir)
        self.ds = Devstack(state_dir)

    # -- addresses ----------------------------------------------------------------
    def scoper_host(self, k: int) -> str:
        return self.env["FDCS_DOCKER_HOSTS"].split()[k - 1]

    def engine_host(self, k: int) -> str:
        return self.env["FDCS_ENGINE_HOSTS"].split()[k - 1]

    def tenant(self, k: int, user: str = A1) -> Cli:
        """``user`` through host ``k``'s name scoper."""
        return self.scoper_cli(user, self.scoper_host(k))

    def admin(self, k: int) -> Cli:
        """The break-glass admin key straight on engine ``k`` (never needs Redis or Keystone)."""
        return Cli(str(self.dir / "admin-key"), self.engine_host(k), env=client_env())

    def admin_token(self, k: int) -> Cli:
        """The Keystone administrator straight on engine ``k``."""
        return Cli(self.env[ADMIN], self.engine_host(k), env=client_env())

    def host_id(self, k: int) -> str:
        return Layout.at(self.dir).host(k).name

    # -- Redis ----------------------------------------------------------------------
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["FDCS_REDIS_URL"], decode_responses=True, socket_timeout=5)

    def redis_up(self) -> bool:
        try:
            return bool(self.redis().ping())
        except redis.RedisError:
            return False

    def owner(self, kind: str, id_: str) -> str | None:
        return self.redis().hget(f"fdcs:own:{kind}", id_)

    # -- processes ------------------------------------------------------------------
    def workers(self, k: int) -> set[int]:
        """The live gunicorn workers of host ``k``'s plugin (children of its master)."""
        return children(self.ds.pid(f"authz-h{k}"))

    def kill_workers(self, k: int) -> set[int]:
        """kill -9 every worker of host ``k``'s plugin, as a crash would; the
        gunicorn master (alive) forks new ones.  Returns the killed pids."""
        pids = self.workers(k)
        assert pids, f"host {k}'s plugin has no workers"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def pause(self, component: str) -> int:
        pid = self.ds.pid(component)
        assert pid, f"{component} is not running"
        os.kill(pid, signal.SIGSTOP)
        return pid

    @staticmethod
    def resume(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def reconcile_once(self, k: int) -> dict:
        """One full reconcile of host ``k`` now, as an operator would run it; its counts."""
        env = dict(os.environ)
        env.update(FDCS_HOST_ID=self.host_id(k),
                   FDCS_RECONCILER_ENGINE_SOCKET=self.engine_host(k).removeprefix("unix://"))
        p = subprocess.run(["fdcs-reconciler", "--once", "--config", self.env["FDCS_CONF"]],
                           capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def repair(self) -> None:
        """What the supervisor does (systemd in production): start what is down."""
        self.cmd("up")


def children(pid: int | None) -> set[int]:
    """Live, non-zombie children of ``pid``."""
    out: set[int] = set()
    if not pid:
        return out
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            data = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X") and int(fields[1]) == pid:
            out.add(int(entry.name))
    return out


@pytest.fixture(scope="session")
def fstack():
    if os.geteuid() != 0:
        pytest.skip("the real stack needs root")
    s = FaultStack(Path(tempfile.mkdtemp(prefix="fdcs-faults-", dir="/tmp")))
    try:
        s.up(hosts=2)
        if not s.env["FDCS_DOCKER_HOST"].startswith("tcp://"):
            pytest.skip("fdcs-name-scoper is not installed: the fault tests go through the scopers")
        yield s
    finally:
        keep = os.environ.get("FDCS_FAULTS_KEEP_LOGS")
        if keep and (s.dir / "logs").is_dir():  # for a post-mortem: `down` removes the state dir
            shutil.copytree(s.dir / "logs", Path(keep) / s.dir.name, dirs_exist_ok=True)
        s.cmd("down", check=False)


@dataclass
class Holdings:
    """Tenant A's resources made before a fault (see the module docstring)."""

    stack: FaultStack
    #: name -> (host index, id); the first runs on host 1 with ``--restart always``
    containers: dict[str, tuple[int, str]] = field(default_factory=dict)
    volume: str = ""
    network: tuple[str, str] = ("", "")

    @classmethod
    def make(cls, stack: FaultStack) -> "Holdings":
        h = cls(stack)
        a1, a2 = stack.tenant(1), stack.tenant(2)
        h.volume = uniq("hv")
        a1("volume", "create", h.volume)
        net = uniq("hn")
        h.network = (net, a1("network", "create", net).stdout.strip())
        name1, name2 = uniq("hc"), uniq("hc")
        cid1 = a1("run", "-d", "--restart", "always", "--name", name1, "-v", f"{h.volume}:/data",
                  "--network", net, "busybox", "sleep", "3600").stdout.strip()
        h.containers[name1] = (1, cid1)
        h.containers[name2] = (2, a2("run", "-d", "--name", name2, "busybox", "sleep", "3600").stdout.strip())
        return h

    @property
    def first(self) -> tuple[str, str]:
        """(name, id) of the container on host 1."""
        name, (_, cid) = next(iter(self.containers.items()))
        return name, cid

    def check(self) -> None:
        s = self.stack
        tenant_a = s.env["FDCS_TENANT_A"]
        for name, (k, cid) in self.containers.items():
            alice = s.tenant(k)
            out = alice("inspect", "--type", "container", "-f", "{{.Id}}", name, cid, cid[:12]).stdout.split()
            assert out == [cid] * 3, (name, out)
            assert s.owner("container", cid) == tenant_a, (name, s.owner("container", cid))
            for other in (1, 2):
                refused(s.tenant(other, B1), "container", cid, cid[:12])
            assert cid not in s.tenant(k, B1)("ps", "-aq", "--no-trunc").stdout.split()
        name1, _ = self.first
        alice1, bob1 = s.tenant(1), s.tenant(1, B1)
        # usable, not just visible: the running container takes an exec and
        # writes to its volume
        alice1("exec", name1, "sh", "-c", "touch /data/ok && test -f /data/ok")
        assert self.volume in alice1("volume", "ls", "-q").stdout.split()
        assert s.owner("volume", f"{tenant_a}_{self.volume}") == tenant_a
        net, nid = self.network
        assert alice1("network", "inspect", "-f", "{{.Id}}", net).stdout.strip() == nid
        assert s.owner("network", nid) == tenant_a
        assert self.volume not in bob1("volume", "ls", "-q").stdout.split()
        refused(bob1, "volume", self.volume)
        assert net not in bob1("network", "ls", "--format", "{{.Name}}").stdout.split()
        refused(bob1, "network", nid)

    def remove(self) -> None:
        for name, (k, _) in self.containers.items():
            self.stack.tenant(k)("rm", "-f", name, check=False)
        self.stack.tenant(1)("network", "rm", self.network[0], check=False)
        self.stack.tenant(1)("volume", "rm", self.volume, check=False)


def refused(cli: Cli, kind: str, *refs: str) -> None:
    """``cli`` inspecting ``refs`` (of ``kind``) is refused as missing, each
    one, and shows nothing of them."""
    fmt = "{{.Name}}" if kind == "volume" else "{{.Id}}"  # a field each kind has: a leak would print it
    p = cli("inspect", "--type", kind, "-f", fmt, *refs, check=False)
    assert p.returncode != 0 and not p.stdout.strip(), (refs, p.stdout)
    assert p.stderr.count(f"No such {kind}") == len(refs), (refs, p.stderr)


@pytest.fixture(scope="module")
def holdings(fstack):
    """Tenant A's resources, made once, checked intact at once (the positive
    control of every test's final check), removed at the end."""
    h = Holdings.make(fstack)
    try:
        h.check()
        yield h
    finally:
        fstack.repair()
        h.remove()


AUDIT = re.compile(r"fdcs\.audit \[(\d+)\] (\{.*\})$")


def audited_allows(log: Path, user: str) -> set[int]:
    """Pids of the plugin workers whose audit lines show an allowed request of ``user``."""
    pids = set()
    for line in log.read_text(errors="replace").splitlines():
        m = AUDIT.search(line)
        if m and f'"user":"{user}"' in m.group(2):
            try:
                rec = json.loads(m.group(2))
            except ValueError:
                continue
            if rec.get("allow") and rec.get("user") == user:
                pids.add(int(m.group(1)))
    return pids


__all__ = ["A1", "A2", "B1", "ADMIN", "RETRY", "FaultStack", "Holdings", "audited_allows", "children",
           "refused", "uniq", "wait_for"]
