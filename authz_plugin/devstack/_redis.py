"""Redis for the local stack: one server on 127.0.0.1, no persistence.

Losing its content on a restart is intended: the stack must recover from a
Redis loss (the reconciler rebuilds ownership from the engines' labels), and
tests provoke exactly that by killing it and running ``up`` again.
"""

from __future__ import annotations

import socket
from pathlib import Path

REDIS_SERVER = "/usr/bin/redis-server"


def url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def argv(port: int, workdir: Path) -> list[str]:
    return [
        REDIS_SERVER,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--logfile", "",  # stdout, i.e. DIR/logs/redis.log
    ]


def ping(port: int, timeout: float = 1.0) -> bool:
    """True when the server answers PING (not just accepts connections)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def reconciled(port: int, host_id: str, timeout: float = 1.0) -> bool:
    """True when host ``host_id`` has finished a full reconcile (the marker
    only the reconciler writes, see ``authz_plugin.ownership``)."""
    field = host_id.encode()
    cmd = b"*3\r\n$7\r\nHEXISTS\r\n$15\r\nfdcs:reconciled\r\n$%d\r\n%s\r\n" % (len(field), field)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(cmd)
            return s.recv(64).startswith(b":1")
    except OSError:
        return False
