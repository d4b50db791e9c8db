"""keystone-manage's set-up commands, run in one interpreter.

NOT imported by FDCS: ``fdcs-devstack`` runs this file with Debian's
``/usr/bin/python3``, where ``python3-keystone`` lives::

    OS_BOOTSTRAP_PASSWORD=... /usr/bin/python3 _keystone_manage.py CONFIG KEYS_READY PUBLIC_URL

It runs, in this order, exactly what these would run::

    keystone-manage --config-file CONFIG fernet_setup     --keystone-user root --keystone-group root
    keystone-manage --config-file CONFIG credential_setup --keystone-user root --keystone-group root
    (creates the file KEYS_READY; puts the sqlite database in WAL mode: see wal())
    keystone-manage --config-file CONFIG db_sync
    keystone-manage --config-file CONFIG bootstrap --bootstrap-public-url PUBLIC_URL ...

Why one interpreter: every ``keystone-manage`` spends about 3 s importing
keystone before doing 0.1 s of work; four of them were most of ``up``.
Why KEYS_READY: ``keystone-wsgi-public`` refuses to start without keys in
its key repositories, but not without its database, so the caller starts it
as soon as the keys exist and its own 3 s import overlaps db_sync and
bootstrap.  (``fernet_setup`` also sets up the ``[fernet_receipts]``
repository.)
All steps are idempotent, so a run interrupted half-way can be repeated.
"""

import os
import sys

from keystone.cmd import cli


def manage(config, *args):
    print("+ keystone-manage --config-file", config, *args, file=sys.stderr, flush=True)
    # cli.main registers and parses the command line once per process; clear
    # oslo.config's parsed state so that the next command can be parsed.
    cli.CONF.clear()
    cli.main(argv=["keystone-manage", "--config-file", config, *args])


def wal(config):
    """Put the sqlite database in WAL mode (a property of the file, kept).

    In sqlite's default rollback-journal mode a reader blocks a writer's
    commit, and keystone-wsgi-public, although single-threaded, holds reads
    open on pooled connections while it writes on another: role grants then
    fail after 5 s with "database is locked".  In WAL mode readers never
    block the writer.
    """
    import configparser
    import sqlite3

    cp = configparser.ConfigParser(interpolation=None)
    cp.read(config)
    path = cp["database"]["connection"].removeprefix("sqlite:///")
    con = sqlite3.connect(path, timeout=30)
    try:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        con.close()
    print("+ sqlite3", path, "PRAGMA journal_mode=WAL ->", mode, file=sys.stderr, flush=True)
    if mode != "wal":
        sys.exit(f"cannot put {path} in WAL mode (journal_mode is {mode})")


def main():
    config, keys_ready, public_url = sys.argv[1:4]
    owner = ("--keystone-user", "root", "--keystone-group", "root")
    manage(config, "fernet_setup", *owner)
    manage(config, "credential_setup", *owner)
    open(keys_ready, "w").close()
    wal(config)
    manage(config, "db_sync")
    # the password comes from OS_BOOTSTRAP_PASSWORD (never on a command line)
    manage(
        config, "bootstrap",
        "--bootstrap-admin-url", public_url,
        "--bootstrap-internal-url", public_url,
        "--bootstrap-public-url", public_url,
        "--bootstrap-region-id", "RegionOne",
    )
    print("+ done", file=sys.stderr, flush=True)
    # Skip the interpreter's teardown: eventlet's threads make it take about
    # a second (and print a traceback); everything is committed and flushed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
