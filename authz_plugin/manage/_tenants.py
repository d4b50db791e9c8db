"""Tenants by id or name: Keystone's project directory, as a site administrator.

fdcs-manage takes TENANT as a Keystone project id or a project name.  Names
are looked up in Keystone with the credentials of ``manage.keystone_user``
(password from ``manage.keystone_password_file``, else ``OS_PASSWORD``),
scoped to ``manage.keystone_project`` (default: ``keystone.admin_project_id``),
which may list projects.

:func:`resolve` is the one rule (pure apart from the directory it is given):

1. Keystone knows a project with id TENANT: that project;
2. else exactly one project is named TENANT: that one (several: refused,
   "use the id");
3. else FDCS holds something of a tenant TENANT (records, usage, quota, a
   suspension) -- a project deleted from Keystone, the case of ``tenant
   purge``: that id, named ``(not in Keystone)``;
4. else :class:`UnknownTenant`.

When Keystone cannot be asked (unreachable, no credentials), an id still
works -- a known tenant, or anything shaped like a Keystone id (32 hex
digits) -- and a name is refused with "identity service unavailable: use
the project id".
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Iterable, Mapping
from urllib.parse import quote

from ..errors import ConfigError, FdcsError, IdentityUnavailable
from ..scoping import valid_tenant

_KEYSTONE_ID = re.compile(r"[0-9a-f]{32}")
GONE = "(not in Keystone)"


class UnknownTenant(FdcsError):
    reason = "unknown-tenant"


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    enabled: bool = True


class Directory:
    """Keystone's projects, read with an administrator's token (taken on
    first use, kept for the process).  Every failure to ask Keystone is
    :class:`IdentityUnavailable`; missing credentials are :class:`ConfigError`."""

    def __init__(self, cfg: Mapping, env: Mapping[str, str] | None = None, session=None):
        self.url = cfg["keystone.url"].rstrip("/")
        self.user = cfg["manage.keystone_user"]
        self.user_domain = cfg["manage.keystone_user_domain"]
        self.project = cfg["manage.keystone_project"] or cfg["keystone.admin_project_id"]
        self.password_file = cfg["manage.keystone_password_file"]
        self.ca_file = cfg["keystone.ca_file"]
        self.timeout = cfg["keystone.timeout"]
        self.env = os.environ if env is None else env
        self._session = session
        self._token: str | None = None

    # -- credentials -------------------------------------------------------------

    def _password(self) -> str:
        if self.password_file:
            try:
                st = os.stat(self.password_file)
                if st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
                    raise ConfigError(f"{self.password_file}: the Keystone password file must be a regular "
                                      "file readable by its owner only (chmod 600)")
                with open(self.password_file) as f:
                    pw = f.read().strip()
            except OSError as e:
                raise ConfigError(f"the Keystone password file cannot be read: {e.strerror} "
                                  f"({self.password_file})") from e
            if pw:
                return pw
        pw = self.env.get("OS_PASSWORD", "")
        if not pw:
            raise ConfigError("no Keystone credentials for fdcs-manage: set manage.keystone_password_file "
                              "or OS_PASSWORD (or use the project id)")
        return pw

    def token(self) -> str:
        if self._token is None:
            from ..login import password_login
            try:
                got = password_login(self.url, self._password(), username=self.user, project_id=self.project,
                                     user_domain=self.user_domain, ca_file=self.ca_file or None,
                                     timeout=self.timeout)
            except IdentityUnavailable as e:
                raise IdentityUnavailable(f"identity service unavailable ({e})") from e
            self._token = got.token
        return self._token

    # -- reads ---------------------------------------------------------------------------

    def _get(self, path: str) -> tuple[int, dict]:
        from keystoneauth1 import exceptions as ksa_exc

        from ..identity._keystone import default_session
        if self._session is None:
            self._session = default_session(self.ca_file, self.timeout)
        try:
            r = self._session.request(self.url + path, "GET", authenticated=False, raise_exc=False, log=False,
                                      headers={"X-Auth-Token": self.token(), "Accept": "application/json"},
                                      timeout=self.timeout)
        except ksa_exc.ClientException as e:
            raise IdentityUnavailable(f"identity service unavailable (cannot reach {self.url})") from e
        if r.status_code == 404:
            return 404, {}
        if r.status_code != 200:
            raise IdentityUnavailable(f"identity service unavailable (Keystone answered GET {path.split('?')[0]} "
                                      f"with HTTP {r.status_code})")
        try:
            return 200, r.json()
        except ValueError as e:
            raise IdentityUnavailable("identity service unavailable (an answer that is not JSON)") from e

    @staticmethod
    def _project(p: Mapping) -> Project:
        return Project(str(p["id"]), str(p.get("name", "")), bool(p.get("enabled", True)))

    def get(self, project_id: str) -> Project | None:
        """The project with this id, None when Keystone has none."""
        status, body = self._get(f"/projects/{quote(project_id, safe='')}")
        return self._project(body["project"]) if status == 200 else None

    def named(self, name: str) -> list[Project]:
        _, body = self._get(f"/projects?name={quote(name, safe='')}")
        return [self._project(p) for p in body.get("projects", [])]

    def all(self) -> dict[str, Project]:
        _, body = self._get("/projects")
        return {p["id"]: self._project(p) for p in body.get("projects", [])}


def resolve(ref: str, directory: Directory | None, known: Iterable[str]) -> Project:
    """TENANT (an id or a name) -> the project, by the rules of the module doc.

    ``directory`` None: Keystone is not asked.  ``known``: the tenants FDCS
    holds something of.
    """
    known = set(known)
    why = "no Keystone credentials"
    if directory is not None:
        try:
            if valid_tenant(ref):
                p = directory.get(ref)
                if p is not None:
                    return p
            matches = directory.named(ref)
        except FdcsError as e:  # unreachable, no or refused credentials
            why = str(e)
        else:
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                ids = ", ".join(p.id for p in matches)
                raise UnknownTenant(f"several projects are named {ref!r} ({ids}): use the project id")
            if ref in known:
                return Project(ref, GONE, False)
            raise UnknownTenant(f"unknown tenant {ref!r}: Keystone has no project with this id or name, "
                                "and FDCS holds nothing of it")
    if ref in known or _KEYSTONE_ID.fullmatch(ref):
        return Project(ref, "", True)
    raise UnknownTenant(f"identity service unavailable: use the project id ({why}; {ref!r} is not a "
                        "project id FDCS knows)")


def names(ids: Iterable[str], directory: Directory | None) -> tuple[dict[str, str], str | None]:
    """Best-effort names of ``ids``: (id -> name, the reason names are
    missing or None).  Ids Keystone does not know get :data:`GONE`."""
    ids = list(ids)
    if directory is None or not ids:
        return {}, None if not ids else "no Keystone directory"
    try:
        projects = directory.all()
    except FdcsError as e:
        return {}, str(e)
    return {i: projects[i].name if i in projects else GONE for i in ids}, None
