"""``fdcs-manage``: the site administrators' tool.

    fdcs-manage [--config FILE] [--json] COMMAND ...

It reads the daemons' configuration (``--config``, else ``FDCS_CONFIG``,
else ``/etc/fdcs/fdcs.toml``) and works on the shared Redis, on every
host's engine listed in ``manage.engines`` (as administrator, with the
break-glass key) and on Keystone (project names, with the credentials of
``manage.keystone_*``).  Commands: ``tenants``, ``usage``, ``quota
show|set|clear``, ``flavors``, ``audit``, ``reconcile``, ``orphans``,
``adopt``, ``host list|retire``, ``tenant suspend|resume|purge``; README
("Operating FDCS: fdcs-manage") shows each with an example.

Modules: ``_cli`` (arguments, output, exit statuses), ``_site`` (the
configuration, Redis, engines and Keystone, opened on first use),
``_tenants`` (TENANT by id or name), ``_engines`` (admin docker clients),
``_tenant_cmds`` and ``_host_cmds`` (the commands), ``_adopt`` (the create
rules on an existing resource), ``_audit`` (the audit stream),
``_output`` (tables and JSON).
"""

from __future__ import annotations

from ._cli import run


def main(argv: list[str] | None = None) -> int:
    """Console script ``fdcs-manage``: 0 ok, 1 the operation failed, 2 a
    usage or configuration error."""
    return run(argv)


__all__ = ["main", "run"]
