"""Where everything of one stack lives, and what it remembers between runs.

Layout of a state dir ``DIR`` (default ``/tmp/fdcs-devstack``)::

    DIR/env                 the contract's KEY=VALUE file (DEVSTACK.md)
    DIR/fdcs.toml           configuration of the stack's FDCS daemons
    DIR/state.json          ports, ids and the demo password (mode 0600)
    DIR/admin.key           break-glass admin key (0600)
    DIR/admin-key/          docker config dir sending the admin key header
    DIR/logs/               one log per component, commands.log
    DIR/run/NAME.pid        pid file per daemon
    DIR/redis/  DIR/keystone/
    DIR/tls/                CA key and cert, scoper server cert and key
    DIR/certs/              DOCKER_CERT_PATH: ca.pem, cert.pem, key.pem
    DIR/clients/USER/       docker config dir per Keystone user
    DIR/hK/                 host K: data/ exec/ docker.sock dockerd.pid

Names outside DIR are derived from a short hash of DIR's absolute path, so
two stacks never collide: network namespace and plugin name ``fdcs-HASH-hK``,
plugin socket ``/run/docker/plugins/fdcs-HASH-hK.sock``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/tmp/fdcs-devstack")
PLUGIN_DIR = Path("/run/docker/plugins")
NETNS_DIR = Path("/run/netns")

# sun_path is 108 bytes; containerd's socket is the longest one under DIR.
_UNIX_PATH_MAX = 107


@dataclasses.dataclass(frozen=True)
class Host:
    """Paths and names of simulated host ``index`` (1-based)."""

    index: int
    dir: Path
    stack_id: str

    @property
    def suffix(self) -> str:
        return f"h{self.index}"

    @property
    def name(self) -> str:
        """netns name and plugin name: unique per stack and host."""
        return f"fdcs-{self.stack_id}-{self.suffix}"

    @property
    def data_root(self) -> Path:
        return self.dir / "data"

    @property
    def exec_root(self) -> Path:
        return self.dir / "exec"

    @property
    def engine_socket(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def dockerd_pidfile(self) -> Path:
        """dockerd's own --pidfile (ours is in DIR/run)."""
        return self.dir / "dockerd.pid"

    @property
    def containerd_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    @property
    def containerd_pidfile(self) -> Path:
        return self.exec_root / "containerd" / "containerd.pid"

    @property
    def task_dir(self) -> Path:
        """containerd's runtime v2 bundles of the engine's containers."""
        return self.exec_root / "containerd" / "daemon" / "io.containerd.runtime.v2.task" / "moby"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def plugin_name(self) -> str:
        return self.name

    @property
    def plugin_socket(self) -> Path:
        return PLUGIN_DIR / f"{self.name}.sock"


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, state_dir: str | os.PathLike | None) -> "Layout":
        return cls(Path(os.path.abspath(state_dir or DEFAULT_STATE_DIR)))

    @property
    def stack_id(self) -> str:
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:8]

    # -- files -------------------------------------------------------------
    env_file = property(lambda self: self.root / "env")
    conf = property(lambda self: self.root / "fdcs.toml")
    state_file = property(lambda self: self.root / "state.json")
    admin_key = property(lambda self: self.root / "admin.key")
    admin_key_dir = property(lambda self: self.root / "admin-key")
    logs = property(lambda self: self.root / "logs")
    run = property(lambda self: self.root / "run")
    redis = property(lambda self: self.root / "redis")
    keystone = property(lambda self: self.root / "keystone")
    tls = property(lambda self: self.root / "tls")
    certs = property(lambda self: self.root / "certs")
    clients = property(lambda self: self.root / "clients")
    busybox_tar = property(lambda self: self.root / "busybox.tar")

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def host(self, index: int) -> Host:
        return Host(index, self.root / f"h{index}", self.stack_id)

    def client_dir(self, user: str) -> Path:
        return self.clients / user

    def known_hosts(self) -> list[Host]:
        """Hosts that have left a trace (a dir, a netns or a plugin socket),
        whatever state.json says: ``down`` must find half-started ones."""
        found = set()
        for p in self.root.glob("h[0-9]*"):
            if p.name[1:].isdigit():
                found.add(int(p.name[1:]))
        prefix = f"fdcs-{self.stack_id}-h"
        for d, suffix in ((NETNS_DIR, ""), (PLUGIN_DIR, ".sock")):
            for p in d.glob(f"{prefix}*{suffix}") if d.is_dir() else ():
                tail = p.name[len(prefix) : len(p.name) - len(suffix) or None]
                if tail.isdigit():
                    found.add(int(tail))
        return [self.host(i) for i in sorted(found)]

    def check_paths(self) -> None:
        """Refuse a state dir whose unix socket paths would be too long."""
        longest = self.host(99).containerd_socket.with_name("containerd.sock.ttrpc")
        if len(str(longest)) > _UNIX_PATH_MAX:
            from ._errors import DevstackError

            raise DevstackError(
                f"state dir {self.root} is too long: unix socket paths under it would exceed "
                f"{_UNIX_PATH_MAX} bytes; choose a shorter --state-dir"
            )


class State:
    """``state.json``: what a later ``up`` (or ``tenant add``) must reuse.

    Keys: ``hosts`` (int), ``ports`` {redis, keystone}, ``password``,
    ``admin_project_id``, ``projects`` {name: id}, ``users`` {name: {id,
    project}}, ``tokens`` {user: expires_at (epoch seconds)}.
    """

    def __init__(self, path: Path):
        self.path = path
        # up's steps run in threads; each update + save is one critical section
        self.lock = threading.RLock()
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            self.data = {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.save()

    def update(self, key: str, sub: str, value: Any) -> None:
        """``state[key][sub] = value``, saved."""
        with self.lock:
            self.data.setdefault(key, {})[sub] = value
            self.save()

    def save(self) -> None:
        from ._procs import write_if_changed

        with self.lock:
            write_if_changed(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n", 0o600)
