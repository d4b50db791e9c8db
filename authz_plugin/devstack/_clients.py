"""Docker client configuration dirs of the local stack.

* one per Keystone user, ``DIR/clients/USER/config.json``, written by the
  same code as ``fdcs-login`` (:func:`authz_plugin.login.write_docker_config`)
  with a token obtained by password;
* ``DIR/admin-key/config.json`` sending the break-glass admin key header, used
  by the stack's own engine calls (``docker --config DIR/admin-key``).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from ..errors import FdcsError
from ..login import password_token, write_docker_config
from ._errors import ComponentFailed
from ._procs import Commands, write_if_changed
from ._state import Layout, State

#: a token with less time left than this is replaced by ``up``
RENEW_BEFORE = 3600


def ensure_admin_key(layout: Layout) -> str:
    """The break-glass admin key (64 hex digits, file owned by root, 0600),
    made on first use."""
    path = layout.admin_key
    if not path.exists():
        write_if_changed(path, secrets.token_hex(32) + "\n", 0o600)
    return path.read_text().strip()


def ensure_admin_key_config(layout: Layout, header: str, key: str) -> Path:
    layout.admin_key_dir.mkdir(mode=0o700, exist_ok=True)
    path = layout.admin_key_dir / "config.json"
    write_if_changed(path, json.dumps({"HttpHeaders": {header: key}}, indent="\t") + "\n", 0o600)
    return layout.admin_key_dir


def ensure_user_config(
    layout: Layout, state: State, cmds: Commands, auth_url: str, user: str, project: str
) -> Path:
    """``DIR/clients/USER`` with a token of ``user`` on ``project`` (by name);
    kept as it is while its token has over an hour left (so a second ``up``
    changes nothing), renewed otherwise."""
    cdir = layout.client_dir(user)
    expires = state.get("tokens", {}).get(user, 0)
    if (cdir / "config.json").exists() and expires > time.time() + RENEW_BEFORE:
        return cdir
    layout.clients.mkdir(mode=0o755, exist_ok=True)
    cmds.note("keystone", f"token for {user} on {project} -> {cdir}")
    try:
        token, project_id, expires_at = password_token(auth_url, user, state["password"], project)
    except FdcsError as e:
        raise ComponentFailed("keystone", cmds.log_path("keystone"), f"no token for {user}: {e}") from e
    write_docker_config(str(cdir), token, project_id)
    state.update("tokens", user, expires_at)
    return cdir
