"""``fdcs-name-scoper``: run the tenants' TLS front door.

    fdcs-name-scoper [--config FILE] [--check]

The configuration (``[scoper]``, ``[keystone]``, ``[redis]``) is validated
first, TLS files included; ``--check`` stops there.  Then the proxy listens
on ``scoper.listen`` until SIGTERM or SIGINT, after which it stops
accepting, lets requests in flight finish for up to 10 seconds and exits.
Under systemd (``Type=notify``) it reports ``READY=1`` once listening and
``STOPPING=1`` when it begins to shut down.

The process never holds the break-glass admin key: its identity service is
built with ``keystone.admin_key_file`` emptied, and the proxy strips the
``keystone.admin_key_header`` header from every request.

Its metrics (``authz_plugin.metrics``, the ``scoper`` set) are served on
``scoper.metrics_listen`` by a listener of their own (plain HTTP, a thread),
never on the tenants' TLS port; a taken address fails the start.

Under glibc the process's malloc keeps the memory of the large blocks a
stream moves through (:func:`tune_malloc`).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import Any, Mapping

import uvloop

from authz_plugin import logfmt, metrics
from authz_plugin.config import DEFAULT_PATH, Config, load
from authz_plugin.errors import ConfigError

from ._streams import server_context
from . import proxy
from .proxy import Prepare, ScoperServer, default_prepare

LOG = logging.getLogger(__name__)

GRACE_SECONDS = 10.0
_LEVELS = ("debug", "info", "warning", "error")

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap, not from an mmap of their own
MALLOC_MMAP_THRESHOLD = 1024 * 1024
#: free memory at the top of the heap kept for the next blocks, up to this much
MALLOC_TRIM_THRESHOLD = 8 * 1024 * 1024
#: what a deployment sets to choose these itself (then left as it chose)
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def parse_listen(value: str) -> tuple[str, int]:
    """``"0.0.0.0:2376"``, ``"[::]:2376"``, ``":2376"`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"option scoper.listen: expected ADDRESS:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check(cfg: Config):
    """Validate the ``[scoper]`` options; returns (listen, ssl context)."""
    listen = parse_listen(cfg["scoper.listen"])
    for key in ("scoper.tls_cert", "scoper.tls_key"):
        if not cfg[key]:
            raise ConfigError(f"option {key} is required: the tenants' listener speaks TLS only")
    for key in ("scoper.tls_cert", "scoper.tls_key", "scoper.tls_client_ca"):
        if cfg[key] and not os.access(cfg[key], os.R_OK):
            raise ConfigError(f"option {key}: cannot read {cfg[key]}")
    try:
        ctx = server_context(cfg["scoper.tls_cert"], cfg["scoper.tls_key"], cfg["scoper.tls_client_ca"])
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ConfigError(f"options scoper.tls_cert / tls_key / tls_client_ca cannot be used: {e}") from e
    if not cfg["scoper.engine_socket"]:
        raise ConfigError("option scoper.engine_socket is required")
    if cfg["scoper.max_connections"] < 1:
        raise ConfigError("option scoper.max_connections: must be at least 1")
    if cfg["scoper.log_level"].lower() not in _LEVELS:
        raise ConfigError(f"option scoper.log_level: expected one of {', '.join(_LEVELS)}")
    mlisten = metrics.parse_listen(cfg["scoper.metrics_listen"])
    if mlisten is not None and mlisten[1] == listen[1]:
        raise ConfigError("option scoper.metrics_listen: the metrics never share the tenants' port "
                          f"({listen[1]}, scoper.listen)")
    return listen, ctx


def identity_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The identity service's view of ``cfg``: no break-glass key file."""
    return {**cfg, "keystone.admin_key_file": ""}


def handlers_context(cfg: Config):
    """``(prepare, ctx)``: the rewriting and its context.  With
    ``name_scoper.handlers``: its ``prepare`` and a ``handlers.Context`` over
    the configuration and the ownership store (Redis); without it: the
    pass-through and the configuration."""
    prepare = default_prepare()
    try:
        from . import handlers
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.handlers":
            raise
        return prepare, cfg
    from authz_plugin.ownership import Store

    from ._redis import AsyncRedis

    store = Store.from_config(cfg)
    return prepare, handlers.Context(cfg, store, redis=AsyncRedis.of(store.lean))


def _sd_notify(state: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        LOG.warning("sd_notify(%s) failed: %s", state, e)


async def run(cfg: Config, identity, prepare: Prepare, ctx, listen, ssl_context) -> None:
    server = ScoperServer(
        identity, engine_socket=cfg["scoper.engine_socket"], ssl_context=ssl_context,
        prepare=prepare, context=ctx, admin_key_header=cfg["keystone.admin_key_header"],
        max_connections=cfg["scoper.max_connections"])
    await server.start(*listen)
    if hasattr(ctx, "in_flight"):  # handlers.Context: its list reads Redis on the loop when others wait
        ctx.in_flight = lambda: server.in_flight
    m = metrics.active()
    if isinstance(m, metrics.ScoperMetrics):
        m.open_connections.set_function(lambda: server.connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    LOG.info("listening on %s (TLS%s), engine %s, max %d connections",
             ", ".join(f"{h}:{p}" for h, p in server.addresses),
             ", client certificates required" if cfg["scoper.tls_client_ca"] else "",
             cfg["scoper.engine_socket"], cfg["scoper.max_connections"])
    _sd_notify("READY=1")
    await stop.wait()
    _sd_notify("STOPPING=1")
    LOG.info("stopping: %d connection(s) open", server.connections)
    await server.close(GRACE_SECONDS)
    redis = getattr(ctx, "redis", None)
    if redis is not None:
        redis.close()
    LOG.info("stopped")


def tune_malloc() -> bool:
    """Under glibc, set malloc's mmap threshold to
    :data:`MALLOC_MMAP_THRESHOLD` and its trim threshold to
    :data:`MALLOC_TRIM_THRESHOLD`, for the whole process; True when both
    were set.  False, and nothing changed, elsewhere than glibc or when the
    environment already chooses either (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, or the same in ``GLIBC_TUNABLES``).

    Why: a stream goes through the proxy in blocks of 16 KiB to 256 KiB
    (uvloop reads 256,000 bytes at a time, TLS records are joined into
    pieces of up to ``_streams.RECV_SIZE``, bodies re-framed), each
    allocated and freed within microseconds.  glibc's defaults give a block
    from 128 KiB up an mmap of its own and move that threshold by what is
    freed, which did not keep up with such blocks: 50,000 to 70,000 page
    faults (fresh, zeroed pages) in some 256 MiB uploads through the
    scoper, about 300 in others; with these settings under a hundred.  The
    cost: the heap keeps up to :data:`MALLOC_TRIM_THRESHOLD` free bytes
    rather than returning them."""
    if any(k in os.environ for k in _MALLOC_ENV) or any(
            t in os.environ.get("GLIBC_TUNABLES", "") for t in _MALLOC_TUNABLES):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (ValueError, OSError, AttributeError):  # not glibc, or not found
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # setting either ends glibc's own moving of both: so both, always
    return (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fdcs-name-scoper",
                                 description="FDCS name scoper (the tenants' TLS front door)")
    ap.add_argument("--config", default=os.environ.get("FDCS_CONFIG", DEFAULT_PATH),
                    help="TOML configuration file")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
        listen, ssl_context = check(cfg)
    except ConfigError as e:
        print(f"fdcs-name-scoper: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"fdcs-name-scoper: configuration {args.config} is valid")
        return 0
    logfmt.configure(cfg["scoper.log_level"])
    proxy.ACCESS.to_fd(sys.stderr.fileno())

    from authz_plugin.identity import IdentityService

    metrics.single_process()
    m = metrics.activate("scoper")
    try:
        exporter = metrics.serve(metrics.parse_listen(cfg["scoper.metrics_listen"]), m.registry)
    except OSError as e:
        print(f"fdcs-name-scoper: cannot serve metrics on {cfg['scoper.metrics_listen']} "
              f"(scoper.metrics_listen): {e}", file=sys.stderr)
        return 2
    try:
        identity = IdentityService(identity_config(cfg))
        prepare, ctx = handlers_context(cfg)
    except ConfigError as e:
        print(f"fdcs-name-scoper: {e}", file=sys.stderr)
        return 2
    if not tune_malloc():
        LOG.debug("malloc left with its defaults")
    try:
        # uvloop: libuv's event loop, in C; asyncio's own loop machinery
        # (selectors, handles, transports in Python) was a tenth of the
        # proxy's CPU per request
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(cfg, identity, prepare, ctx, listen, ssl_context))
    except OSError as e:
        LOG.error("cannot serve on %s: %s", cfg["scoper.listen"], e)
        return 1
    finally:
        if exporter is not None:
            exporter.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
