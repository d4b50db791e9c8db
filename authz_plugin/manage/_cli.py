"""fdcs-manage's command line: arguments, output, exit statuses.

Exit statuses: 0 done; 1 the operation failed (one line on stderr starting
``fdcs-manage: ``, after whatever part of the output was done); 2 a usage
or configuration error (argparse's own, a bad size, an unusable config
file or key file); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, TextIO

from ..config import DEFAULT_PATH, load
from ..errors import ConfigError, FdcsError, StoreUnavailable
from ..quota import METRICS
from . import _audit, _tenant_cmds
from ._output import Out, dumps
from ._site import Site, redis_where
from ._tenant_cmds import UsageError

PROG = "fdcs-manage"

_LIMIT_HELP = {"containers": "N", "memory": "SIZE", "cpus": "N", "volumes": "N", "networks": "N"}


class _Later:
    """A command of ``_host_cmds``, imported when it runs (it loads docker-py
    and the reconciler, which the other commands do without)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, site, args):
        from . import _host_cmds
        return getattr(_host_cmds, self.name)(site, args)


def _common() -> argparse.ArgumentParser:
    # also accepted after the command (``fdcs-manage tenants --json``)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="the daemons' TOML configuration (default $FDCS_CONFIG or " + DEFAULT_PATH + ")")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON for scripts")
    return p


def parser() -> argparse.ArgumentParser:
    common = _common()
    ap = argparse.ArgumentParser(prog=PROG, parents=[common],
                                 description="FDCS site administration: tenants, quotas, audit, ownership, hosts")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name, fn, help_, parent=sub):
        p = parent.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    cmd("tenants", _tenant_cmds.cmd_tenants, "every tenant with its usage")
    p = cmd("usage", _tenant_cmds.cmd_usage, "a tenant's usage, quota and live CPU and memory use")
    p.add_argument("tenant", metavar="TENANT", help="project id or name")

    q = sub.add_parser("quota", help="a tenant's quota: show, set, clear").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = cmd("show", _tenant_cmds.cmd_quota_show, "limits (own or default), usage, percentage", q)
    p.add_argument("tenant", metavar="TENANT")
    p = cmd("set", _tenant_cmds.cmd_quota_set, "set the tenant's own limits ('unlimited' accepted)", q)
    p.add_argument("tenant", metavar="TENANT")
    for m in METRICS:
        p.add_argument(f"--{m}", metavar=_LIMIT_HELP[m])
    p = cmd("clear", _tenant_cmds.cmd_quota_clear,
            "drop the tenant's own limits (the named ones, or all): the defaults apply again", q)
    p.add_argument("tenant", metavar="TENANT")
    for m in METRICS:
        p.add_argument(f"--{m}", action="store_true", help=f"clear the {m} limit only")

    cmd("flavors", _tenant_cmds.cmd_flavors, "the configured container sizes")
    p = cmd("audit", _audit.cmd_audit, "the plugins' decisions (from the Redis stream fdcs:audit)")
    p.add_argument("--tenant", metavar="TENANT", help="only this project's requests")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until interrupted")
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many past lines (default 20)")
    p = cmd("reconcile", _Later("cmd_reconcile"), "one full reconcile pass of each configured host")
    p.add_argument("--host", metavar="HOST", help="only this host")
    p = cmd("orphans", _Later("cmd_orphans"),
            "resources without an owner, records without a resource")
    p.add_argument("--host", metavar="HOST", help="only this host")
    p = cmd("adopt", _Later("cmd_adopt"),
            "give an unowned resource to a tenant (the create rules must allow it)")
    p.add_argument("resource", metavar="RESOURCE", help="container, network or volume: id, id prefix or name")
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--host", metavar="HOST", help="the host that holds it (default: search all)")
    p.add_argument("--kind", choices=("container", "network", "volume"))

    h = sub.add_parser("host", help="hosts: list, retire").add_subparsers(dest="action", required=True,
                                                                          metavar="ACTION")
    cmd("list", _Later("cmd_host_list"), "hosts, their records, engines and last reconcile", h)
    p = cmd("retire", _Later("cmd_host_retire"), "remove every record of a host that is gone for good", h)
    p.add_argument("host", metavar="HOST")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p.add_argument("--force", action="store_true", help="even when its engine still answers")

    t = sub.add_parser("tenant", help="a tenant: suspend, resume, purge").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = cmd("suspend", _tenant_cmds.cmd_suspend,
            "refuse every request of the tenant and stop its running containers", t)
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--reason", default="", help="shown to the tenant's users")
    p = cmd("resume", _tenant_cmds.cmd_resume, "accept the tenant's requests again", t)
    p.add_argument("tenant", metavar="TENANT")
    p = cmd("purge", _tenant_cmds.cmd_purge,
            "remove everything of a project deleted from Keystone (after a confirmation)", t)
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p.add_argument("--force", action="store_true", help="even when the project still exists in Keystone")
    return ap


def tty_confirm(stdin: TextIO, out: TextIO) -> Callable[[str, bool], bool]:
    """``confirm(prompt, yes)``: True with ``yes``; else asks on a terminal,
    and refuses without one (a script must say --yes)."""
    def confirm(prompt: str, yes: bool) -> bool:
        if yes:
            return True
        if not stdin.isatty():
            raise UsageError("this needs a confirmation: run it on a terminal, or pass --yes")
        out.write(prompt)
        out.flush()
        return stdin.readline().strip().lower() in ("y", "yes")
    return confirm


def render(out: Out, as_json: bool, stdout: TextIO, stderr: TextIO) -> None:
    for w in out.warnings:
        print(f"{PROG}: warning: {w}", file=stderr)
    if out.streamed:
        return
    print(dumps(out.data) if as_json else out.text, file=stdout)


def run(argv: list[str] | None = None, *, env: Mapping[str, str] | None = None, site: Site | None = None,
        stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The whole command; ``site`` and the streams are injectable (tests)."""
    env = os.environ if env is None else env
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    path = getattr(args, "config", None) or env.get("FDCS_CONFIG") or DEFAULT_PATH
    cfg = None
    try:
        if site is None:
            cfg = load(path, env=env)
            site = Site(cfg, env=env)
        site.emit = lambda line: (print(line, file=stdout), stdout.flush())
        site.confirm = tty_confirm(stdin, stderr if args.json else stdout)
        out = args.fn(site, args)
    except (ConfigError, UsageError) as e:
        print(f"{PROG}: {e}", file=stderr)
        return 2
    except StoreUnavailable as e:
        msg = str(e)
        if "Redis at" not in msg:
            msg = f"the ownership store (Redis at {redis_where(site.cfg)}) is unavailable: check that it runs " \
                  "and the redis.* options"
        print(f"{PROG}: {msg}", file=stderr)
        return 1
    except FdcsError as e:
        print(f"{PROG}: {e}", file=stderr)
        return 1
    except KeyboardInterrupt:
        print(file=stderr)
        return 130
    render(out, args.json, stdout, stderr)
    if out.failed:
        print(f"{PROG}: the operation did not complete (see above)", file=stderr)
        return 1
    return 0
