"""Keystone for the local stack: Debian's keystone on sqlite, and its demo data.

* :func:`write_config` writes ``DIR/keystone/keystone.conf`` (sqlite, key
  repositories under DIR, day-long tokens, cheap password hashing).
* :func:`setup` runs keystone-manage's set-up (see ``_keystone_manage.py``)
  and calls back as soon as the key repositories have keys, so that the
  server can start while the database is being made.
* :func:`serve_argv` / :func:`ready` start and probe ``keystone-wsgi-public``.
* :class:`Api` is the little v3 client that creates the demo projects,
  users and role assignments, idempotently (get-or-create by name).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Callable

import requests

from ._errors import ComponentFailed
from ._procs import Commands, write_if_changed
from ._state import Layout

PYTHON = "/usr/bin/python3"  # Debian's: python3-keystone is installed for it
WSGI_PUBLIC = "/usr/bin/keystone-wsgi-public"
COMPONENT = "keystone"
SETUP = "keystone-manage"  # its own log: DIR/logs/keystone-manage.log
DOMAIN = "default"

#: the demo data of DEVSTACK.md: project -> {user: role}
DEMO = {
    "tenant-a": {"alice": "member", "carol": "member", "dave": "reader"},
    "tenant-b": {"bob": "member"},
}

_CONF = """\
# Written by fdcs-devstack; a local stack only.
[DEFAULT]
debug = false

[database]
connection = sqlite:///{db}
# no fsync per commit: a lost demo database is made again by down + up
sqlite_synchronous = false

[token]
provider = fernet
# demo tokens in the docker config dirs last a day
expiration = 86400

[fernet_tokens]
key_repository = {dir}/fernet-keys

[fernet_receipts]
key_repository = {dir}/fernet-receipts

[credential]
key_repository = {dir}/credential-keys

[identity]
# bcrypt's minimum cost: the default (12) costs ~0.25 s per password hash
# or check on every user creation and password login; these passwords are
# random demo passwords, not worth the time.
password_hash_rounds = 4
"""


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v3"


def config_file(layout: Layout) -> Path:
    return layout.keystone / "keystone.conf"


def db_file(layout: Layout) -> Path:
    return layout.keystone / "keystone.db"


def bootstrapped_marker(layout: Layout) -> Path:
    return layout.keystone / "bootstrapped"


def write_config(layout: Layout) -> Path:
    layout.keystone.mkdir(mode=0o700, exist_ok=True)
    path = config_file(layout)
    write_if_changed(path, _CONF.format(db=db_file(layout), dir=layout.keystone), 0o600)
    return path


def setup(layout: Layout, port: int, password: str, cmds: Commands, on_keys_ready: Callable[[], None]) -> None:
    """Run keystone-manage's set-up (``_keystone_manage.py``) unless an
    earlier run finished it (a marker file remembers that).

    ``on_keys_ready`` is called (in this thread) as soon as the key
    repositories have keys, while the database is still being made: then,
    and not before, keystone-wsgi-public can start (it checks for keys at
    start-up).  It is called at once when the set-up was done before.
    """
    done = bootstrapped_marker(layout)
    if done.exists():
        on_keys_ready()
        return
    keys_ready = layout.keystone / "keys-ready"
    keys_ready.unlink(missing_ok=True)
    log = cmds.log_path(SETUP)
    proc = cmds.popen(
        SETUP,
        [PYTHON, Path(__file__).with_name("_keystone_manage.py"), config_file(layout), keys_ready, url(port)],
        env={"OS_BOOTSTRAP_PASSWORD": password},
        log=log,
    )
    # a pid file, so that ``down`` stops it if this ``up`` dies half-way
    pidfile = layout.pidfile(SETUP)
    write_if_changed(pidfile, f"{proc.pid}\n")
    called = False
    deadline = time.monotonic() + 120
    while True:
        rc = proc.poll()
        if not called and keys_ready.exists():
            called = True
            on_keys_ready()
        if rc is not None:
            break
        if cmds.abort.is_set() or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ComponentFailed(SETUP, log, "set-up aborted" if cmds.abort.is_set() else "set-up took over 120 s")
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    if rc != 0 or not called:
        raise ComponentFailed(SETUP, log, f"keystone set-up exited with {rc}")
    done.touch()


def admin_project_id(layout: Layout, cmds: Commands) -> str:
    """The id of the admin project made by bootstrap, read from the database.

    Read straight from sqlite (read-only) rather than through the API so that
    the plugins and engines, which need it in their configuration, can start
    while keystone-wsgi-public is still importing.
    """
    con = sqlite3.connect(f"file:{db_file(layout)}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT id FROM project WHERE name = 'admin' AND domain_id = ?", (DOMAIN,)
        ).fetchone()
    finally:
        con.close()
    if not row:
        raise ComponentFailed(SETUP, cmds.log_path(SETUP), "bootstrap made no admin project")
    return row[0]


#: Keystone's public WSGI application served by a threading server.
#: ``keystone-wsgi-public`` serves one request at a time (wsgiref), so a
#: burst of new tokens (every plugin worker and scoper validating a fresh
#: tenant's token) queued behind each other past the plugins' timeout.
_SERVE = """
import socketserver, sys, wsgiref.simple_server as wss
from keystone.server.wsgi import initialize_public_application
class Server(socketserver.ThreadingMixIn, wss.WSGIServer):
    daemon_threads = True
    request_queue_size = 128
class Quiet(wss.WSGIRequestHandler):
    def log_request(self, *a):  # one line per request would flood the log
        pass
host, port = sys.argv[1], int(sys.argv[2])
sys.argv[1:] = []  # keystone's own option parser reads them
server = wss.make_server(host, port, initialize_public_application(), server_class=Server, handler_class=Quiet)
print("keystone public API at http://%s:%d/ (threaded wsgiref, for the local stack only)" % server.server_address,
      flush=True)
server.serve_forever()
"""


def serve_argv(port: int) -> list[str]:
    return [PYTHON, "-c", _SERVE, "127.0.0.1", str(port)]


def serve_env(layout: Layout) -> dict[str, str]:
    return {"OS_KEYSTONE_CONFIG_FILES": str(config_file(layout))}


def ready(port: int, timeout: float = 2.0) -> bool:
    try:
        r = requests.get(url(port), timeout=timeout, proxies={"http": None})
        return r.status_code == 200
    except requests.RequestException:
        return False


class Api:
    """A small Keystone v3 admin client (plain HTTP: every call is visible).

    Errors raise :class:`ComponentFailed` for ``keystone``, naming its log.
    Calls are noted in ``commands.log`` (method and path; never a secret).
    """

    def __init__(self, base: str, cmds: Commands, log: Path):
        self.base = base
        self.cmds = cmds
        self.log = log
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy for 127.0.0.1, whatever the environment says

    def _call(self, method: str, path: str, *, body: dict | None = None, ok=()) -> requests.Response:
        self.cmds.note(COMPONENT, f"API {method} {path}")
        try:
            r = self.http.request(method, self.base + path, json=body, timeout=30)
        except requests.RequestException as e:
            raise ComponentFailed(COMPONENT, self.log, f"{method} {path}: {e}") from e
        if r.status_code >= 400 and r.status_code not in ok:
            raise ComponentFailed(COMPONENT, self.log, f"{method} {path} answered {r.status_code}: {r.text[:200]}")
        return r

    def login(self, user: str, password: str, project: str = "admin") -> None:
        """Take a token of ``user`` scoped to ``project`` for the next calls."""
        r = self._call("POST", "/auth/tokens", body={"auth": {
            "identity": {"methods": ["password"], "password": {
                "user": {"name": user, "domain": {"id": DOMAIN}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": DOMAIN}}},
        }})
        self.http.headers["X-Auth-Token"] = r.headers["X-Subject-Token"]

    def role_ids(self) -> dict[str, str]:
        return {r["name"]: r["id"] for r in self._call("GET", "/roles").json()["roles"]}

    def _create(self, kind: str, body: dict) -> str:
        """POST, or look the name up when it exists (409): create first, as
        each Keystone call costs ~0.1 s and the usual case is "missing"."""
        name = body["name"]
        r = self._call("POST", f"/{kind}s", body={kind: body}, ok=(201, 409))
        if r.status_code == 201:
            return r.json()[kind]["id"]
        items = self._call("GET", f"/{kind}s?name={name}&domain_id={DOMAIN}").json()[f"{kind}s"]
        if not items:
            raise ComponentFailed(COMPONENT, self.log, f"{kind} {name} exists (409) but cannot be found")
        return items[0]["id"]

    def ensure_project(self, name: str) -> str:
        return self._create("project", {"name": name, "domain_id": DOMAIN, "description": "fdcs-devstack tenant"})

    def ensure_user(self, name: str, password: str, project_id: str) -> str:
        """The user ``name`` (an existing one keeps its password)."""
        return self._create("user", {"name": name, "domain_id": DOMAIN, "password": password,
                                     "default_project_id": project_id})

    def grant(self, project_id: str, user_id: str, role_id: str) -> None:
        """Idempotent in Keystone itself (PUT)."""
        self._call("PUT", f"/projects/{project_id}/users/{user_id}/roles/{role_id}")
