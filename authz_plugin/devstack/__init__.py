"""``fdcs-devstack``: the whole service on one machine (contract: DEVSTACK.md).

Importable API (the end-to-end tests use it)::

    from authz_plugin.devstack import Stack
    stack = Stack("/tmp/fdcs-e2e")     # state dir; default /tmp/fdcs-devstack
    stack.up(hosts=2)                  # idempotent; returns the seconds it took
    stack.env()["FDCS_CONFIG_A1"]      # DIR/env as a dict
    [str(s) for s in stack.status()]   # "NAME up|down pid=PID addr=ADDRESS"
    stack.kill("redis")                # kill -9, as a crash would
    stack.up()                         # starts just what is down
    stack.tenant_add("tenant-c", users=2)
    stack.down()                       # stops everything, removes DIR

Modules: ``_stack`` (the orchestration), ``_procs`` (commands, pid files,
readiness), ``_state`` (paths and state.json), ``_redis``, ``_keystone`` (+
``_keystone_manage``, run under Debian's python), ``_engine`` (netns,
dockerd, busybox, clean-up), ``_scoper`` (the hosts' name scopers),
``_tls``, ``_clients`` (docker config dirs).
"""

from ._errors import ComponentFailed, DevstackError
from ._stack import ComponentStatus, Stack, Tenant
from ._state import DEFAULT_STATE_DIR

__all__ = ["Stack", "ComponentStatus", "Tenant", "DevstackError", "ComponentFailed", "DEFAULT_STATE_DIR"]
