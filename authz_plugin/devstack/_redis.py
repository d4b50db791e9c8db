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


def reconciled(port: int, host_id: str, settle: float | None = None, timeout: float = 1.0) -> bool:
    """True when host ``host_id`` has finished a full reconcile on this Redis
    run (the marker only the reconciler writes) and, with ``settle``, the
    cluster's container names are known again: what tenants' requests need
    (see ``authz_plugin.ownership``)."""
    import redis

    from ..ownership import Store

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                         decode_responses=True)
    try:
        store = Store(client, host=host_id, settle=settle)
        return store.is_complete() and store.settled()
    except Exception:  # StoreUnavailable, or a Redis still loading its data
        return False
    finally:
        client.close()
