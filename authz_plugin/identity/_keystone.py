"""Keystone v3 over HTTP: the only module of the plugin that talks to Keystone.

Three calls, all made with the *caller's* token (no service account):

* :meth:`KeystoneClient.validate` -- ``GET /auth/tokens`` with ``X-Auth-Token``
  and ``X-Subject-Token`` both set to the token (a token may validate itself);
* :meth:`KeystoneClient.projects` -- ``GET /auth/projects``, the projects an
  unscoped token may be rescoped to;
* :meth:`KeystoneClient.rescope` -- ``POST /auth/tokens`` (method ``token``)
  to learn the roles an unscoped token's user holds on one project.

Outcomes are translated here, once:

* Keystone answers that the token is not valid (401/404) ->
  :class:`~authz_plugin.errors.AuthenticationError` (the caller may cache it
  briefly);
* Keystone cannot answer (connection refused, timeout, TLS error, 5xx, any
  answer we cannot read) -> :class:`~authz_plugin.errors.IdentityUnavailable`,
  which the caller must never cache and never turn into "invalid".

Requests are sent with ``log=False``: keystoneauth1 would otherwise log the
rescope body, which carries the token.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
from typing import Any

from keystoneauth1 import exceptions as ksa_exc
from keystoneauth1 import session as ksa_session

from ..errors import AuthenticationError, IdentityUnavailable

LOG = logging.getLogger(__name__)

#: what every tenant-facing refusal of a token says (never the token itself)
MSG_MISSING = "authentication required: X-Auth-Token is missing; run fdcs-login"
MSG_INVALID = "authentication required: X-Auth-Token is invalid or expired; run fdcs-login"
MSG_EXPIRED = "authentication required: X-Auth-Token is expired; run fdcs-login"
MSG_UNAVAILABLE = "identity service unavailable, retry later"


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What a Keystone v3 token body says, reduced to what FDCS decides on.

    Exactly one of ``project_id`` / ``domain_id`` / ``system`` is set for a
    scoped token; none of them for an unscoped one.
    """

    user_id: str
    user_name: str
    project_id: str
    project_name: str
    domain_id: str
    system: bool
    roles: frozenset[str]
    expires_at: float

    @property
    def unscoped(self) -> bool:
        return not (self.project_id or self.domain_id or self.system)


def parse_time(value: str) -> float:
    """Keystone's ISO 8601 UTC time (``2026-01-01T10:00:00.000000Z``) -> epoch seconds."""
    dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:  # Keystone always means UTC
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def parse_token(body: Any) -> TokenInfo:
    """Parse a ``{"token": {...}}`` body; :class:`ValueError` if it is not one."""
    try:
        tok = body["token"]
        user = tok["user"]
        project = tok.get("project") or {}
        domain = tok.get("domain") or {}
        return TokenInfo(
            user_id=str(user["id"]),
            user_name=str(user.get("name", "")),
            project_id=str(project.get("id", "")),
            project_name=str(project.get("name", "")),
            domain_id=str(domain.get("id", "")),
            system=bool(tok.get("system")),
            roles=frozenset(str(r["name"]) for r in tok.get("roles") or ()),
            expires_at=parse_time(tok["expires_at"]),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"not a Keystone v3 token body: {e!r}") from e


def default_session(ca_file: str = "", timeout: float | None = None) -> ksa_session.Session:
    """An unauthenticated keystoneauth1 session (no retries: a retry would only
    lengthen the wait of a tenant whose request is already held by dockerd)."""
    return ksa_session.Session(verify=ca_file or True, timeout=timeout, app_name="fdcs")


class KeystoneClient:
    """Keystone v3 at ``url`` (``http://host:5000/v3``), through ``session``.

    Thread-safe (the session's connection pool is).  ``calls`` counts the
    HTTP requests sent, whatever their outcome.
    """

    def __init__(self, url: str, session: ksa_session.Session | None = None, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or default_session(timeout=timeout)
        self._lock = threading.Lock()
        self.calls = 0

    # -- the three calls -------------------------------------------------

    def validate(self, token: str) -> TokenInfo:
        """The token's scope, user, roles and expiry.

        :raises AuthenticationError: Keystone says the token is not valid.
        :raises IdentityUnavailable: Keystone cannot say.
        """
        body = self._call("GET", "/auth/tokens?nocatalog", token,
                          headers={"X-Subject-Token": token}, ok=(200,))
        return self._parse(body, "validate")

    def projects(self, token: str) -> list[dict[str, str]]:
        """``[{"id", "name"}, ...]``: the projects the token's user may scope to."""
        body = self._call("GET", "/auth/projects", token, ok=(200,))
        try:
            return [{"id": str(p["id"]), "name": str(p.get("name", ""))}
                    for p in body["projects"] if p.get("enabled", True)]
        except (KeyError, TypeError, AttributeError) as e:
            LOG.error("Keystone answered GET /auth/projects with an unreadable body: %r", e)
            raise IdentityUnavailable(MSG_UNAVAILABLE) from e

    def rescope(self, token: str, project_id: str) -> TokenInfo:
        """Exchange ``token`` for one scoped to ``project_id``; returns what the
        new token says (the new token itself is dropped: we only need its roles).

        :raises AuthenticationError: Keystone refuses the exchange.
        """
        auth = {"auth": {"identity": {"methods": ["token"], "token": {"id": token}},
                         "scope": {"project": {"id": project_id}}}}
        body = self._call("POST", "/auth/tokens?nocatalog", token, json=auth, ok=(200, 201))
        return self._parse(body, "rescope")

    # -- plumbing --------------------------------------------------------

    def _call(self, method: str, path: str, token: str, *, ok: tuple[int, ...],
              headers: dict[str, str] | None = None, json: Any = None) -> Any:
        with self._lock:
            self.calls += 1
        hdrs = {"X-Auth-Token": token, "Accept": "application/json", **(headers or {})}
        try:
            resp = self.session.request(
                self.url + path, method, headers=hdrs, json=json, authenticated=False,
                raise_exc=False, log=False, redirect=False, timeout=self.timeout)
        except ksa_exc.ClientException as e:
            # ConnectFailure, ConnectTimeout, SSLError, ...: the URL is in the
            # message, the token never is.
            LOG.warning("Keystone unreachable (%s %s): %s", method, path, e)
            raise IdentityUnavailable(MSG_UNAVAILABLE) from e
        status = resp.status_code
        if status in ok:
            try:
                return resp.json()
            except ValueError as e:
                LOG.error("Keystone answered %s %s with a body that is not JSON", method, path)
                raise IdentityUnavailable(MSG_UNAVAILABLE) from e
        if status in (401, 404):
            raise AuthenticationError(MSG_INVALID)
        # 403 (a policy that forbids self-validation), 5xx, 3xx...: Keystone
        # or the way to it is broken, which says nothing about the token.
        LOG.error("Keystone answered %s %s with HTTP %s", method, path, status)
        raise IdentityUnavailable(MSG_UNAVAILABLE)

    @staticmethod
    def _parse(body: Any, what: str) -> TokenInfo:
        try:
            return parse_token(body)
        except ValueError as e:
            LOG.error("Keystone %s answer is not a token body: %s", what, e)
            raise IdentityUnavailable(MSG_UNAVAILABLE) from e
