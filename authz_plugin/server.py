"""``fdcs-authz``: serve the plugin with gunicorn on the engine's plugin socket.

    fdcs-authz [--config FILE] [--check] [--help-config]

The configuration is validated before anything starts (``--check`` stops
there).  gunicorn runs the plugin's own worker (:mod:`authz_plugin.worker`:
a thread per kept-alive engine connection, up to ``plugin.threads``, calling
the protocol without a WSGI round) on ``unix:<plugin.socket>`` with a
root-only socket (umask 077).  Under systemd socket activation
(``fdcs-authz.socket``) gunicorn takes the listening socket from
``LISTEN_FDS`` instead of binding.

Metrics (``plugin.metrics_listen``, see ``metrics.py``): the workers count
in prometheus_client's multiprocess mode, in a private directory made fresh
here before anything imports prometheus_client; the master binds the
metrics listener before gunicorn starts (a taken address fails the start),
serves it from ``when_ready`` on, drops dead workers' gauges in
``child_exit`` and removes the directory in ``on_exit``.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import logfmt
from .config import DEFAULT_PATH, load, reference
from .errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fdcs-authz", description="FDCS Docker authorization plugin")
    ap.add_argument("--config", default=os.environ.get("FDCS_CONFIG", DEFAULT_PATH), help="TOML configuration file")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--help-config", action="store_true", help="print every option and exit")
    args = ap.parse_args(argv)
    if args.help_config:
        print(reference())
        return 0
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"fdcs-authz: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"fdcs-authz: configuration {args.config} is valid")
        return 0
    logfmt.configure(cfg["plugin.log_level"])
    from . import audit
    audit.lines.to_fd(sys.stderr.fileno())

    from . import metrics

    hooks = {}
    listen = metrics.parse_listen(cfg["plugin.metrics_listen"])
    if listen is not None:
        mdir, owned = None, False
        try:
            mdir, owned = metrics.prepare_multiproc_dir(cfg["plugin.name"])
            exporter = metrics.Exporter(listen, metrics.plugin_registry(cfg, mdir))
        except OSError as e:
            if mdir:
                metrics.remove_multiproc_dir(mdir, owned)
            print(f"fdcs-authz: cannot serve metrics on {cfg['plugin.metrics_listen']} "
                  f"(plugin.metrics_listen): {e}", file=sys.stderr)
            return 2

        def on_exit(_arbiter):
            exporter.close()
            metrics.remove_multiproc_dir(mdir, owned)

        hooks = {
            "when_ready": lambda _arbiter: exporter.start(),
            "child_exit": lambda _arbiter, worker: metrics.mark_process_dead(worker.pid),
            "on_exit": on_exit,
        }

    from gunicorn.app.base import BaseApplication

    from .app import create_app

    socket = cfg.plugin_socket
    os.makedirs(os.path.dirname(socket), exist_ok=True)

    class _App(BaseApplication):
        def load_config(self):
            opts = {
                "bind": [f"unix:{socket}"],
                "workers": cfg["plugin.workers"],
                "worker_class": "authz_plugin.worker.HookWorker",
                "threads": cfg["plugin.threads"],
                "keepalive": 300,
                "timeout": 60,
                "graceful_timeout": 10,
                "umask": 0o077,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": cfg["plugin.log_level"],
                "proc_name": f"fdcs-authz:{cfg['plugin.name']}",
                **hooks,
            }
            for k, v in opts.items():
                self.cfg.set(k, v)

        def load(self):
            return create_app(cfg)

    _App().run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
