"""A fake Keystone v3 over real HTTP on 127.0.0.1, for unit tests.

Just enough of the identity API for FDCS: password, application-credential
and token (rescope) authentication (``POST /v3/auth/tokens``), token
validation (``GET /v3/auth/tokens``), ``GET /v3/auth/projects``, and the
version document.  It answers the way Keystone does where FDCS depends on it
(401 for a bad X-Auth-Token or bad credentials, 404 for an unknown or expired
subject token, 201 + ``X-Subject-Token`` for a new token, ``?nocatalog``).

Test controls:

* ``add_domain`` / ``add_project`` / ``add_user`` / ``assign`` / ``add_app_credential`` set
  up the directory; ``issue`` mints a token directly (no HTTP, not counted);
  ``revoke`` drops one;
* ``clock`` (epoch seconds, injectable) decides token expiry;
* ``fail``: ``None`` (healthy), an HTTP status such as 503, ``"close"``
  (the connection is dropped without an answer) or ``"garbage"`` (200 with a
  body that is not JSON); ``delay``: seconds to wait before answering (to
  exceed a client's timeout); ``stop()`` then ``start()`` closes the port and
  reopens the same one (connection refused in between);
* ``calls``: ``(method, path)`` of every request received;
  ``count(method, path)`` filters them.

Use as a context manager, or ``start()`` / ``stop()``.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.server
import json
import secrets
import threading
import time
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass
class _Token:
    user_id: str
    project_id: str | None
    domain_id: str | None
    system: bool
    expires_at: float
    methods: list[str]
    app_cred_roles: frozenset[str] | None = None


class FakeKeystone:
    def __init__(self, clock: Callable[[], float] = time.time, token_ttl: float = 3600.0):
        self.clock = clock
        self.token_ttl = token_ttl
        self.fail: int | str | None = None
        self.delay = 0.0
        self.calls: list[tuple[str, str]] = []
        self.domains = {"default": "Default"}
        self.projects: dict[str, dict[str, Any]] = {}
        self.users: dict[str, dict[str, Any]] = {}
        self.roles: dict[tuple[str, str], set[str]] = {}  # (user_id, project or "domain:"/"system") -> roles
        self.app_creds: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- life cycle ----------------------------------------------------------

    def start(self) -> "FakeKeystone":
        fake = self

        class Handler(_Handler):
            keystone = fake

        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self._port), Handler)
        self._port = self._server.server_address[1]
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wake handlers held by ``delay``
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "FakeKeystone":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The v3 endpoint, as ``keystone.url`` / ``OS_AUTH_URL`` take it."""
        return f"http://127.0.0.1:{self.port}/v3"

    # -- directory -----------------------------------------------------------

    def add_domain(self, name: str, domain_id: str | None = None) -> str:
        did = domain_id or uuid.uuid4().hex
        self.domains[did] = name
        return did

    def add_project(self, name: str, project_id: str | None = None, domain_id: str = "default",
                    enabled: bool = True) -> str:
        pid = project_id or uuid.uuid4().hex
        self.projects[pid] = {"id": pid, "name": name, "domain_id": domain_id, "enabled": enabled}
        return pid

    def add_user(self, name: str, password: str = "secret", domain_id: str = "default",
                 user_id: str | None = None) -> str:
        uid = user_id or uuid.uuid4().hex
        self.users[uid] = {"id": uid, "name": name, "domain_id": domain_id, "password": password}
        return uid

    def assign(self, user_id: str, target: str, *roles: str) -> None:
        """Roles on a project id, on ``"domain:<id>"`` or on ``"system"``."""
        self.roles.setdefault((user_id, target), set()).update(roles)

    def add_app_credential(self, user_id: str, project_id: str, name: str = "fdcs",
                           secret: str = "app-secret", roles: tuple[str, ...] | None = None) -> str:
        cid = uuid.uuid4().hex
        self.app_creds[cid] = {"id": cid, "name": name, "user_id": user_id, "project_id": project_id,
                               "secret": secret,
                               "roles": frozenset(roles) if roles is not None else None}
        return cid

    def issue(self, user_id: str, project_id: str | None = None, *, domain_id: str | None = None,
              system: bool = False, expires_in: float | None = None) -> str:
        """A new token (``project_id`` None and no domain/system: unscoped)."""
        tok = secrets.token_urlsafe(48)
        ttl = self.token_ttl if expires_in is None else expires_in
        with self._lock:
            self.tokens[tok] = _Token(user_id, project_id, domain_id, system,
                                      self.clock() + ttl, ["password"])
        return tok

    def revoke(self, token: str) -> None:
        with self._lock:
            self.tokens.pop(token, None)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for m, p in self.calls
                       if (method is None or m == method) and (path is None or p == path))

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    # -- model ---------------------------------------------------------------

    def _live(self, token: str | None) -> _Token | None:
        with self._lock:
            t = self.tokens.get(token or "")
        if t is None or t.expires_at <= self.clock():
            return None
        if t.project_id and not self._project_roles(t):
            return None  # role removed or project disabled: Keystone stops honouring it
        return t

    def _project_roles(self, t: _Token) -> set[str]:
        if t.project_id not in self.projects or not self.projects[t.project_id]["enabled"]:
            return set()
        roles = set(self.roles.get((t.user_id, t.project_id), ()))
        if t.app_cred_roles is not None:
            roles &= t.app_cred_roles
        return roles

    def token_body(self, tok: str) -> dict[str, Any]:
        t = self.tokens[tok]
        user = self.users[t.user_id]
        body: dict[str, Any] = {
            "methods": t.methods,
            "user": {"id": user["id"], "name": user["name"],
                     "domain": {"id": user["domain_id"], "name": self.domains[user["domain_id"]]}},
            "expires_at": _iso(t.expires_at),
            "issued_at": _iso(self.clock()),
            "audit_ids": [secrets.token_urlsafe(16)],
        }
        if t.project_id:
            p = self.projects[t.project_id]
            body["project"] = {"id": p["id"], "name": p["name"],
                               "domain": {"id": p["domain_id"], "name": self.domains[p["domain_id"]]}}
            body["roles"] = [{"id": r, "name": r} for r in sorted(self._project_roles(t))]
        elif t.domain_id:
            body["domain"] = {"id": t.domain_id, "name": self.domains[t.domain_id]}
            body["roles"] = [{"id": r, "name": r}
                             for r in sorted(self.roles.get((t.user_id, f"domain:{t.domain_id}"), ()))]
        elif t.system:
            body["system"] = {"all": True}
            body["roles"] = [{"id": r, "name": r}
                             for r in sorted(self.roles.get((t.user_id, "system"), ()))]
        return {"token": body}

    def _find_user(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        if "id" in spec:
            return self.users.get(spec["id"])
        dom = spec.get("domain") or {}
        did = dom.get("id") or next((k for k, v in self.domains.items() if v == dom.get("name")), None)
        return next((u for u in self.users.values()
                     if u["name"] == spec.get("name") and u["domain_id"] == did), None)

    def _find_project(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        if "id" in spec:
            return self.projects.get(spec["id"])
        dom = spec.get("domain") or {}
        did = dom.get("id") or next((k for k, v in self.domains.items() if v == dom.get("name")), None)
        return next((p for p in self.projects.values()
                     if p["name"] == spec.get("name") and p["domain_id"] == did), None)

    def authenticate(self, auth: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        """``POST /v3/auth/tokens``: (status, body, new token or None)."""
        ident = auth.get("identity") or {}
        methods = ident.get("methods") or []
        scope = auth.get("scope")
        app_cred_roles = None
        expires_at = None
        if methods == ["password"]:
            spec = (ident.get("password") or {}).get("user") or {}
            user = self._find_user(spec)
            if user is None or user["password"] != spec.get("password"):
                return 401, _error(401, "The request you have made requires authentication."), None
            uid = user["id"]
        elif methods == ["token"]:
            old = self._live((ident.get("token") or {}).get("id"))
            if old is None:
                return 401, _error(401, "The request you have made requires authentication."), None
            uid, expires_at = old.user_id, old.expires_at  # a rescoped token keeps its expiry
        elif methods == ["application_credential"]:
            spec = ident.get("application_credential") or {}
            cred = self.app_creds.get(spec.get("id", ""))
            if cred is None and "name" in spec:
                user = self._find_user(spec.get("user") or {})
                cred = next((c for c in self.app_creds.values()
                             if user and c["user_id"] == user["id"] and c["name"] == spec["name"]), None)
            if cred is None or cred["secret"] != spec.get("secret") or scope:
                return 401, _error(401, "The request you have made requires authentication."), None
            uid, scope = cred["user_id"], {"project": {"id": cred["project_id"]}}
            app_cred_roles = cred["roles"]
        else:
            return 401, _error(401, "Unsupported authentication method."), None

        project_id = domain_id = None
        system = False
        if scope and "project" in scope:
            p = self._find_project(scope["project"])
            # Keystone says 401 for both "no such project" and "no role on it".
            if p is None or not p["enabled"] or not self.roles.get((uid, p["id"])):
                return 401, _error(401, "The request you have made requires authentication."), None
            project_id = p["id"]
        elif scope and "domain" in scope:
            domain_id = scope["domain"].get("id") or next(
                (k for k, v in self.domains.items() if v == scope["domain"].get("name")), None)
            if not self.roles.get((uid, f"domain:{domain_id}")):
                return 401, _error(401, "The request you have made requires authentication."), None
        elif scope and "system" in scope:
            if not self.roles.get((uid, "system")):
                return 401, _error(401, "The request you have made requires authentication."), None
            system = True

        tok = secrets.token_urlsafe(48)
        with self._lock:
            self.tokens[tok] = _Token(uid, project_id, domain_id, system,
                                      expires_at or self.clock() + self.token_ttl, methods,
                                      app_cred_roles)
        return 201, self.token_body(tok), tok

    def user_projects(self, user_id: str) -> list[dict[str, Any]]:
        return [p for p in self.projects.values() if self.roles.get((user_id, p["id"]))]


def _error(code: int, message: str) -> dict[str, Any]:
    titles = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
    return {"error": {"code": code, "title": titles.get(code, "Error"), "message": message}}


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # dropped connections ("close", stop()) are the point, not noise


class _Handler(http.server.BaseHTTPRequestHandler):
    keystone: FakeKeystone
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without this, Nagle plus
    # delayed ACK adds 40 ms to every call
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        ks = self.keystone
        path = urlsplit(self.path).path.rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        with ks._lock:
            ks.calls.append((self.command, path))
        if ks.delay and ks._stopping.wait(ks.delay):
            return
        if ks.fail == "close":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if isinstance(ks.fail, int):
            return self._send(ks.fail, _error(ks.fail, "simulated failure"))
        if ks.fail == "garbage":
            data = b"<html>proxy error</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return

        if path == "/v3" and self.command == "GET":
            return self._send(200, {"version": {"id": "v3.14", "status": "stable", "links": [
                {"rel": "self", "href": ks.url + "/"}]}})
        if path == "/v3/auth/tokens" and self.command == "POST":
            try:
                auth = json.loads(raw)["auth"]
            except (ValueError, KeyError, TypeError):
                return self._send(400, _error(400, "Expecting to find auth in request body."))
            status, body, tok = ks.authenticate(auth)
            return self._send(status, body, {"X-Subject-Token": tok} if tok else None)
        if path == "/v3/auth/tokens" and self.command in ("GET", "HEAD"):
            if ks._live(self.headers.get("X-Auth-Token")) is None:
                return self._send(401, _error(401, "The request you have made requires authentication."))
            subject = self.headers.get("X-Subject-Token")
            if ks._live(subject) is None:
                return self._send(404, _error(404, "Could not find token."))
            return self._send(200, ks.token_body(subject), {"X-Subject-Token": subject})
        if path == "/v3/auth/projects" and self.command == "GET":
            t = ks._live(self.headers.get("X-Auth-Token"))
            if t is None:
                return self._send(401, _error(401, "The request you have made requires authentication."))
            return self._send(200, {"projects": [
                {"id": p["id"], "name": p["name"], "domain_id": p["domain_id"],
                 "enabled": p["enabled"]} for p in ks.user_projects(t.user_id)]})
        return self._send(404, _error(404, f"no route for {self.command} {path}"))

    do_GET = do_POST = do_HEAD = do_DELETE = _handle
