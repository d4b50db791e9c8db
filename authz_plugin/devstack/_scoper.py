"""The simulated hosts' name scopers: ``fdcs-name-scoper`` per host.

Each scoper listens with TLS on ``127.0.0.1:PORT`` (a port chosen at the
first ``up`` and kept in ``state.json``, so that a restarted scoper comes
back where clients expect it), with the stack's server certificate
(``DIR/tls/server-*.pem``, SAN ``IP:127.0.0.1``, ``DNS:localhost``), and
talks to its host's engine socket.  Its per-host settings come from the
environment (``FDCS_SCOPER_*``); the rest from ``DIR/fdcs.toml``.

The scoper authenticates every request, ``/_ping`` included, so readiness is
a TLS ``GET /_ping`` with alice's headers answering 200: that exercises the
listener, the certificate, the scoper's identity check, and the way through
the engine and its plugin.

Until ``fdcs-name-scoper`` is installed the stack runs without scopers
(plugin-only mode, ``DIR/env`` pointing at the engines); once it is
installed the scopers are part of the stack like any other daemon.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import sys
from pathlib import Path

from ._state import Host, Layout

COMMAND = "fdcs-name-scoper"
#: the demo user whose headers the readiness probe sends (a tenant member:
#: the scoper has no anonymous requests)
PROBE_USER = "alice"


def command() -> str | None:
    """The installed console script (beside this Python first, as for
    ``fdcs-authz``: pyenv and virtualenvs put it there, possibly not on
    PATH), or None when the scoper is not installed."""
    beside = Path(sys.executable).with_name(COMMAND)
    if beside.exists():
        return str(beside)
    return shutil.which(COMMAND)


def component(host: Host) -> str:
    return f"scoper-{host.suffix}"


def port_key(host: Host) -> str:
    """Key of the host's scoper port in ``state["ports"]``."""
    return component(host)


def addr(port: int | None) -> str:
    return f"tcp://127.0.0.1:{port if port else '-'}"


def argv(exe: str, layout: Layout) -> list[str]:
    return [exe, "--config", str(layout.conf)]


def env(host: Host, port: int, layout: Layout) -> dict[str, str]:
    tls = layout.tls
    return {
        "FDCS_SCOPER_LISTEN": f"127.0.0.1:{port}",
        "FDCS_SCOPER_TLS_CERT": str(tls / "server-cert.pem"),
        "FDCS_SCOPER_TLS_KEY": str(tls / "server-key.pem"),
        "FDCS_SCOPER_ENGINE_SOCKET": str(host.engine_socket),
        # the same per-host values the host's plugin gets
        "FDCS_HOST_ID": host.name,
        "FDCS_PLUGIN_NAME": host.plugin_name,
        "FDCS_PLUGIN_SOCKET": str(host.plugin_socket),
    }


def _probe_headers(layout: Layout) -> dict[str, str] | None:
    try:
        cfg = json.loads((layout.client_dir(PROBE_USER) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    headers = cfg.get("HttpHeaders")
    return dict(headers) if isinstance(headers, dict) else None


def tls_context(layout: Layout) -> ssl.SSLContext:
    """What a careful client does: verify the server against the stack's CA
    (and present the stack's client pair, as the docker CLI does)."""
    ctx = ssl.create_default_context(cafile=str(layout.certs / "ca.pem"))
    ctx.load_cert_chain(str(layout.certs / "cert.pem"), str(layout.certs / "key.pem"))
    return ctx


def ping(port: int | None, layout: Layout, timeout: float = 3.0) -> bool:
    """The scoper answers ``GET /_ping`` with 200 over verified TLS as alice."""
    if not port:
        return False
    headers = _probe_headers(layout)
    if headers is None:
        return False
    try:
        ctx = tls_context(layout)
    except (OSError, ssl.SSLError):
        return False
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", "/_ping", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException, ssl.SSLError):
        return False
    finally:
        conn.close()
