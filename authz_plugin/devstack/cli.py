"""``fdcs-devstack``: command line of the local stack (DEVSTACK.md).

    fdcs-devstack up      [--state-dir DIR] [--hosts N]
    fdcs-devstack down    [--state-dir DIR]
    fdcs-devstack status  [--state-dir DIR]
    fdcs-devstack env     [--state-dir DIR]
    fdcs-devstack tenant add NAME [--users N] [--state-dir DIR]

Exit status: 0 on success; 1 on failure (one line on stderr naming the
component and its log); ``status`` exits 3 when a component is down or
there is no stack (as LSB ``status`` does); 2 on a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import FdcsError
from ._errors import DevstackError
from ._stack import Stack
from ._state import DEFAULT_STATE_DIR


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR),
                        help="where the stack keeps its state and logs (default %(default)s)")
    p = argparse.ArgumentParser(prog="fdcs-devstack",
                                description="Run FDCS on this machine: Redis, Keystone, and N Docker "
                                            "hosts with their authorization plugins and name scopers.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start whatever is not running (idempotent)")
    up.add_argument("--hosts", type=int, metavar="N",
                    help="number of simulated hosts (default: as before, else 1)")
    up.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    sub.add_parser("down", parents=[common], help="stop everything and remove the state dir")
    sub.add_parser("status", parents=[common], help="one line per component: NAME up|down pid=PID addr=ADDRESS")
    sub.add_parser("env", parents=[common], help="print DIR/env")
    tenant = sub.add_parser("tenant", help="manage demo tenants")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True)
    add = tsub.add_parser("add", parents=[common],
                          help="create a Keystone project with N member users and their docker config dirs")
    add.add_argument("name")
    add.add_argument("--users", type=int, default=1, metavar="N", help="users to create (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.ERROR if getattr(args, "quiet", False) else logging.INFO,
        format="fdcs-devstack: %(message)s",
    )
    stack = Stack(args.state_dir)
    try:
        if args.command == "up":
            took = stack.up(args.hosts)
            if not args.quiet:
                print(f"fdcs-devstack: stack up in {took:.1f} s; use it with: . {stack.layout.env_file}",
                      file=sys.stderr)
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            lines = stack.status()
            if not lines:
                print(f"fdcs-devstack: no stack at {stack.dir}", file=sys.stderr)
                return 3
            for s in lines:
                print(s)
            return 0 if all(s.up for s in lines) else 3
        elif args.command == "env":
            try:
                sys.stdout.write(stack.layout.env_file.read_text())
            except FileNotFoundError:
                raise DevstackError(f"no stack at {stack.dir}; run fdcs-devstack up") from None
        elif args.command == "tenant":
            t = stack.tenant_add(args.name, args.users)
            print(t.project_id)
            for d in t.config_dirs.values():
                print(d)
    except FdcsError as e:  # DevstackError, or one from the shared FDCS code
        print(f"fdcs-devstack: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
