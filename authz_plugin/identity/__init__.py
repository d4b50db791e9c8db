"""Who is asking, and for which tenant: the one owner of identity in FDCS.

:class:`IdentityService` turns the headers of a Docker API request into an
:class:`Identity` or raises an :class:`~authz_plugin.errors.FdcsError`:

* ``X-Auth-Token`` is validated with Keystone (``_keystone``), the result is
  cached by a SHA-256 digest of token and tenant header (``_cache``);
* ``X-Auth-TenantId`` is a claim checked against the token: it must equal the
  project of a project-scoped token (absent means that project), or be one of
  the projects of an unscoped token, which is then rescoped to learn its roles
  there; domain- and system-scoped tokens are refused;
* a site administrator is a token holding one of ``keystone.admin_roles`` on
  the project whose id is ``keystone.admin_project_id``, or whoever presents
  the break-glass admin key (header ``keystone.admin_key_header``, secret in
  the root-only ``keystone.admin_key_file``), which never involves Keystone.

Failure semantics (what callers rely on):

* :class:`AuthenticationError` -- no usable identity (missing, invalid,
  expired token; tenant not allowed; wrong admin key; too many invalid
  tokens).  The message tells the tenant what to do and never holds a token.
* :class:`Forbidden` -- a valid identity holding neither a member nor a reader
  role on the project.
* :class:`IdentityUnavailable` -- Keystone could not answer for a token that
  is not cached.  Never cached, never reported as "invalid"; tokens already
  cached keep working through the outage.

Revocation takes effect when the cache entry ends (``keystone.cache_ttl``).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import math
import os
import re
import stat
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

from .. import config as _config
from .. import metrics
from ..errors import AuthenticationError, ConfigError, Forbidden, IdentityUnavailable
from ..request import Headers
from ._cache import RejectLimiter, TokenCache, cache_key, token_handle
from ._keystone import (MSG_EXPIRED, MSG_INVALID, MSG_MISSING, MSG_UNAVAILABLE,
                        KeystoneClient, TokenInfo, default_session)

__all__ = ["Identity", "IdentityService", "read_admin_key", "MSG_MISSING", "MSG_INVALID", "MSG_EXPIRED",
           "MSG_UNAVAILABLE", "MSG_SLOW_DOWN"]

LOG = logging.getLogger(__name__)

MSG_SLOW_DOWN = "too many invalid tokens, slow down"

TOKEN_HEADER = "X-Auth-Token"
TENANT_HEADER = "X-Auth-TenantId"
_TOKEN_LOWER = TOKEN_HEADER.lower()
_TENANT_LOWER = TENANT_HEADER.lower()
READ_METHODS = frozenset({"GET", "HEAD"})
#: reads by method that write all the same: the engine's websocket attach
#: (``GET /containers/{name:.*}/attach/ws``) always attaches the container's
#: stdin (moby 20.10 ``wsContainersAttach``: ``UseStdin: true``), so whoever
#: opens one can type into the container
_WRITING_READS = re.compile(r"/containers/.+/attach/ws")

# Fernet, JWS and UUID tokens are all drawn from this alphabet; anything else
# (spaces, control characters, a megabyte of junk) is refused before it can
# reach a log line, a header to Keystone or the cache.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.+/")
_MAX_TOKEN = 8192
#: a token of at most _MAX_TOKEN characters, all of _TOKEN_CHARS: the same
#: test as ``len(t) <= _MAX_TOKEN and _TOKEN_CHARS.issuperset(t)`` for a
#: non-empty ``t`` (a test holds them equal), at a fraction of the set's cost
#: per character (every request checks its token)
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-_=.+/]{1,%d}" % _MAX_TOKEN)
_MAX_TENANT = 255


def _default_roles(key: str) -> frozenset[str]:
    return frozenset(next(o.default for o in _config.OPTIONS if o.dotted == key))


@dataclasses.dataclass(frozen=True)
class Identity:
    """An authenticated caller acting for one tenant.

    ``project_id`` is the tenant the request acts for ("" for the break-glass
    admin).  ``expires_at`` is epoch seconds (``inf`` for the admin key).
    ``via`` is ``"token"`` or ``"admin-key"``.  ``member_roles`` and
    ``reader_roles`` are the configured role sets :meth:`may` decides with;
    :class:`IdentityService` fills them in from the configuration (the
    defaults are the configuration's defaults).
    """

    user_id: str
    user_name: str
    project_id: str
    roles: frozenset[str]
    expires_at: float
    is_admin: bool
    via: str
    member_roles: frozenset[str] = dataclasses.field(
        default=_default_roles("keystone.member_roles"), compare=False, repr=False)
    reader_roles: frozenset[str] = dataclasses.field(
        default=_default_roles("keystone.reader_roles"), compare=False, repr=False)
    #: the token cache's key this identity is kept under ("": not cached, e.g.
    #: the admin key's); see :meth:`IdentityService.still_cached`
    cache_key: str = dataclasses.field(default="", compare=False, repr=False)

    def may(self, method: str, path: str = "") -> bool:
        """May this identity send an HTTP ``method`` to ``path`` (the decoded
        path without its ``/v1.xx`` prefix, as ``authz_plugin.request`` gives
        it)?  Admins always; GET and HEAD need a reader or a member role,
        except a GET that writes (the websocket attach); every other method
        a member role."""
        if self.is_admin or self.roles & self.member_roles:
            return True
        return (method.upper() in READ_METHODS and not _WRITING_READS.fullmatch(path)
                and bool(self.roles & self.reader_roles))


def _scan(headers: Any, names: Iterable[str]) -> dict[str, list]:
    """Every value of each header in ``names`` (lower-case), one pass over
    ``headers`` (names matched case-insensitively; repeats kept)."""
    found: dict[str, list] = {n: [] for n in names}
    if isinstance(headers, Headers):
        # already one string value per lower-case name (the engine's map
        # flattened); ``names`` are lower case
        lowered = headers.lowered()
        for n, values in found.items():
            v = lowered.get(n)
            if v is not None:
                values.append(v)
        return found
    for k, v in headers.items():
        if isinstance(k, str):
            values = found.get(k.lower())
            if values is not None:
                values.append(v)
    return found


def _one(values: list, name: str) -> str | None:
    """The value of header ``name`` among ``values`` (what :func:`_scan`
    found for it).

    Two differing values under case variants of the name are refused: which
    one the engine or a proxy would honour is not ours to guess.
    """
    if len(values) == 1 and isinstance(values[0], str):
        return values[0]  # the usual case, without the checks below
    if not all(isinstance(v, str) for v in values):
        raise AuthenticationError(f"authentication required: {name} is not a string")
    if len(set(values)) > 1:
        raise AuthenticationError(f"authentication required: more than one {name} header")
    return values[0] if values else None


def _describe(projects: Iterable[Mapping[str, str]], limit: int = 10) -> str:
    shown = [f"{p['id']} ({p['name']})" if p.get("name") else p["id"] for p in projects]
    if not shown:
        return "no project"
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


class _AdminKey:
    """The break-glass admin key in a root-only file.

    The file is used only while it is a regular file owned by root with no
    permission bits for group or others, and holds at least
    :attr:`MIN_LENGTH` characters (surrounding whitespace stripped).  It is
    read at start and re-read when it changes (inode, mtime or size); its
    owner and mode are checked on every use, since ``chmod`` does not change
    the mtime.  Each distinct problem is logged once.
    """

    MIN_LENGTH = 16

    def __init__(self, path: str):
        self.path = path
        self._key: bytes | None = None
        self._stamp: tuple[int, ...] | None = None
        self._problem: str | None = None
        self._lock = threading.Lock()
        if path:
            self.current()

    @staticmethod
    def _unsafe(st: os.stat_result) -> str | None:
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        if st.st_uid != 0:
            return f"it is owned by uid {st.st_uid}, not root"
        if st.st_mode & 0o077:
            return f"its mode {stat.S_IMODE(st.st_mode):04o} gives access to group or others (chmod 600)"
        return None

    def _refuse(self, problem: str) -> None:
        self._key = self._stamp = None
        if problem != self._problem:
            LOG.error("break-glass admin key file %s is not used: %s", self.path, problem)
            self._problem = problem

    def current(self) -> bytes | None:
        """The key, or None when the file is missing or unsafe (logged)."""
        with self._lock:
            try:
                st = os.stat(self.path)
                problem = self._unsafe(st)
                stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                if problem is None and stamp != self._stamp:
                    with open(self.path, "rb") as f:
                        # what was opened is what must be safe, not what was stat'ed
                        problem = self._unsafe(os.fstat(f.fileno()))
                        key = f.read(4096).strip()
                    if problem is None and len(key) < self.MIN_LENGTH:
                        problem = f"the key is shorter than {self.MIN_LENGTH} characters"
                    if problem is None:
                        self._key, self._stamp, self._problem = key, stamp, None
                        LOG.info("break-glass admin key loaded from %s", self.path)
            except OSError as e:
                problem = f"cannot read it: {e.strerror}"
            if problem is not None:
                self._refuse(problem)
            return self._key


class _Flight:
    """One Keystone validation in progress, which other requests with the
    same token wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.result: Identity | None = None
        self.error: BaseException | None = None

    def wait(self, timeout: float) -> Identity:
        if not self.done.wait(timeout):
            raise IdentityUnavailable(MSG_UNAVAILABLE)
        if self.result is not None:
            return self.result
        e = self.error
        # a fresh exception per waiter (the leader's carries its traceback)
        if isinstance(e, (AuthenticationError, Forbidden, IdentityUnavailable)):
            raise type(e)(str(e))
        raise IdentityUnavailable(MSG_UNAVAILABLE)


class IdentityService:
    """Authenticates Docker API requests against Keystone; thread-safe.

    ``cfg`` is a :class:`~authz_plugin.config.Config` (the ``keystone.*``
    options).  ``session`` is a ``keystoneauth1.session.Session`` (default: a
    new unauthenticated one honouring ``keystone.ca_file`` and
    ``keystone.timeout``).  ``clock`` returns epoch seconds; it drives cache
    expiry, token expiry and the rate limiter, so tests can move time.
    """

    def __init__(self, cfg: Mapping[str, Any], *, session=None,
                 clock: Callable[[], float] = time.time):
        if not cfg["keystone.url"]:
            raise ConfigError("option keystone.url is required")
        self._clock = clock
        timeout = cfg["keystone.timeout"]
        self._keystone = KeystoneClient(
            cfg["keystone.url"], session or default_session(cfg["keystone.ca_file"], timeout), timeout)
        self._cache = TokenCache(cfg["keystone.cache_size"], cfg["keystone.cache_ttl"],
                                 cfg["keystone.negative_ttl"], clock)
        self._limiter = RejectLimiter(cfg["keystone.reject_rate"], clock,
                                      max_sources=cfg["keystone.cache_size"])
        self._admin_project = cfg["keystone.admin_project_id"]
        self._admin_roles = frozenset(cfg["keystone.admin_roles"])
        self._member_roles = frozenset(cfg["keystone.member_roles"])
        self._reader_roles = frozenset(cfg["keystone.reader_roles"])
        self._usable_roles = self._member_roles | self._reader_roles
        self._admin_key_header = cfg["keystone.admin_key_header"]
        self._admin_key_lower = self._admin_key_header.lower()
        self._wanted_headers = tuple({h.lower() for h in (self._admin_key_header, TOKEN_HEADER, TENANT_HEADER) if h})
        self._admin_key = _AdminKey(cfg["keystone.admin_key_file"])
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._flight_timeout = timeout + 2.0

    # -- public ------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str], source: str = "") -> Identity:
        """The identity behind a request's ``headers`` (names matched
        case-insensitively).  ``source`` is the client address when known; it
        keys the per-source limit on invalid tokens.

        :raises AuthenticationError: no usable identity (see module doc).
        :raises Forbidden: valid identity without member or reader role.
        :raises IdentityUnavailable: Keystone cannot answer for an uncached token.
        """
        ident = self._authenticate(headers, source, cached_only=False)
        assert ident is not None
        return ident

    def authenticate_cached(self, headers: Mapping[str, str], source: str = "") -> Identity | None:
        """:meth:`authenticate` when the cache alone can answer: the same
        identity, or the same exception (a cached refusal, an expired token, a
        malformed header, no role); None when only :meth:`authenticate` can
        (a token not cached: Keystone; the break-glass key: its file).  Never
        waits on I/O, only on the cache's lock: an event loop may call it.
        Counts what it answers as :meth:`authenticate` does; a None counts
        nothing (the :meth:`authenticate` that follows does)."""
        return self._authenticate(headers, source, cached_only=True)

    def _authenticate(self, headers: Mapping[str, str], source: str, cached_only: bool) -> Identity | None:
        found = _scan(headers, self._wanted_headers)  # one pass for the three headers
        if self._admin_key_header:
            presented = _one(found[self._admin_key_lower], self._admin_key_header)
            if presented is not None:
                return None if cached_only else self._break_glass(presented, source)
        token = _one(found[_TOKEN_LOWER], TOKEN_HEADER)
        if not token:
            raise AuthenticationError(MSG_MISSING)
        if _TOKEN_RE.fullmatch(token) is None:
            self._count("malformed")
            raise AuthenticationError(MSG_INVALID)
        # The tenant claim is only ever compared, exactly, with ids Keystone
        # gave; it is quoted with repr() wherever it is shown.
        tenant = _one(found[_TENANT_LOWER], TENANT_HEADER) or ""
        if len(tenant) > _MAX_TENANT:
            raise AuthenticationError(
                f"authentication required: {TENANT_HEADER} {tenant[:40]!r}... is not a project id")
        ident = self._lookup(token, tenant, source, cached_only)
        if ident is None:
            return None
        if not ident.is_admin and ident.roles.isdisjoint(self._usable_roles):
            raise Forbidden(
                f"user {ident.user_name or ident.user_id} has no role on project {ident.project_id} "
                f"that allows using this service (needs one of: "
                f"{', '.join(sorted(self._usable_roles))})")
        return ident

    @property
    def header_names(self) -> frozenset[bytes]:
        """The request headers an answer depends on (lower case, latin-1)."""
        return frozenset(h.encode("latin-1") for h in self._wanted_headers)

    def still_cached(self, ident: Identity) -> bool:
        """Whether ``ident``, answered by this service for some request
        headers, is still the cache's answer for them: the same entry, kept,
        its token unexpired.  Then :meth:`authenticate` would answer ``ident``
        for the very same headers again, and it is counted as the cache hit
        it is.  False: ask :meth:`authenticate` (or
        :meth:`authenticate_cached`).  Never waits on I/O, only on the
        cache's lock.

        For a caller that sees the same headers again and again (the name
        scoper, on one kept-alive connection): the same answer without
        reading and checking them, and hashing the token, every time."""
        key = ident.cache_key
        if not key or self._cache.get(key) is not ident or ident.expires_at <= self._clock():
            return False
        self._count("hits")
        return True

    def stats(self) -> dict[str, int]:
        """Counters since start: ``hits``, ``misses``, ``negative_hits``,
        ``keystone_calls``, ``rejected``, ``unavailable``, ``rate_limited``,
        ``expired``, ``malformed``, ``admin_key``, ``admin_key_refused``, and
        ``cached`` (identities in the cache now)."""
        with self._stats_lock:
            out = {k: 0 for k in ("hits", "misses", "negative_hits", "rejected", "unavailable",
                                  "rate_limited", "expired", "malformed", "admin_key",
                                  "admin_key_refused")}
            out.update(self._stats)
        out["keystone_calls"] = self._keystone.calls
        out["cached"] = len(self._cache)
        return out

    # -- token path ------------------------------------------------------------

    def _count(self, what: str) -> None:
        with self._stats_lock:
            self._stats[what] += 1
        metrics.identity_event(what)  # fdcs_identity_events_total{event}

    def _lookup(self, token: str, tenant: str, source: str, cached_only: bool = False) -> Identity | None:
        key = cache_key(token, tenant)
        hit = self._cache.get(key)
        if isinstance(hit, str):
            self._count("negative_hits")
            raise AuthenticationError(hit)
        if hit is not None:
            # Whatever the cache's TTL did, an expired token is never honoured.
            if hit.expires_at <= self._clock():
                self._cache.evict(key)
                self._count("expired")
                raise AuthenticationError(MSG_EXPIRED)
            self._count("hits")
            return hit
        if cached_only:
            return None
        self._count("misses")
        # One Keystone call per token at a time: concurrent requests with the
        # same new token (a client's burst, a compose up) wait for the first
        # one's answer instead of each asking Keystone -- and instead of each
        # spending the invalid-token budget, which a burst of a valid new
        # token would otherwise exhaust.
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            self._count("coalesced")
            return flight.wait(self._flight_timeout)
        try:
            ident = self._validate(key, token, tenant, source)
            flight.result = ident
            return ident
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
            flight.done.set()

    def _validate(self, key: str, token: str, tenant: str, source: str) -> Identity:
        if not self._limiter.try_acquire(source):
            self._count("rate_limited")
            LOG.info("too many invalid tokens from %r: token %s refused without asking Keystone",
                     source, token_handle(token))
            raise AuthenticationError(MSG_SLOW_DOWN)
        try:
            ident = self._resolve(token, tenant)
        except AuthenticationError as e:
            # Keystone (or our rules on its answer) refused: remember it briefly
            # and keep the limiter charged.
            self._cache.put_refusal(key, str(e))
            self._count("rejected")
            LOG.info("token %s refused: %s", token_handle(token), e)
            raise
        except BaseException as e:
            # An outage is not the client's fault and is never remembered.
            self._limiter.refund(source)
            if isinstance(e, IdentityUnavailable):
                self._count("unavailable")
            raise
        self._limiter.refund(source)
        ident = dataclasses.replace(ident, cache_key=key)
        self._cache.put(key, ident)
        LOG.debug("token %s validated: user %s project %s", token_handle(token),
                  ident.user_id, ident.project_id)
        return ident

    def _resolve(self, token: str, tenant: str) -> Identity:
        info = self._keystone.validate(token)
        if info.domain_id or info.system:
            kind = "domain" if info.domain_id else "system"
            raise AuthenticationError(
                f"authentication required: {kind}-scoped tokens are not accepted, "
                "use a project-scoped token; run fdcs-login")
        if info.unscoped:
            if not tenant:
                raise AuthenticationError(
                    f"authentication required: the token is not scoped to a project, so "
                    f"{TENANT_HEADER} must name one; run fdcs-login")
            projects = self._keystone.projects(token)
            if tenant not in {p["id"] for p in projects}:
                raise AuthenticationError(self._not_allowed(tenant, projects))
            scoped = self._keystone.rescope(token, tenant)
            if scoped.project_id != tenant or scoped.user_id != info.user_id:
                LOG.error("Keystone rescoped a token of user %s to project %r for %r",
                          info.user_id, scoped.project_id, tenant)
                raise IdentityUnavailable(MSG_UNAVAILABLE)
            info = dataclasses.replace(scoped, expires_at=min(info.expires_at, scoped.expires_at))
        elif tenant and tenant != info.project_id:
            raise AuthenticationError(self._not_allowed(
                tenant, [{"id": info.project_id, "name": info.project_name}]))
        if info.expires_at <= self._clock():
            # Keystone still honours it but our clock says otherwise: trust the
            # stricter one (and see to the clocks).
            LOG.warning("Keystone validated a token that expired %.0f s ago by our clock",
                        self._clock() - info.expires_at)
            raise AuthenticationError(MSG_EXPIRED)
        return self._identity(info)

    @staticmethod
    def _not_allowed(tenant: str, projects: list[dict[str, str]]) -> str:
        return (f"authentication required: {TENANT_HEADER} {tenant!r} is not a project this token "
                f"may act for (it may act for {_describe(projects)}); run fdcs-login for that project")

    def _identity(self, info: TokenInfo) -> Identity:
        # The admin project is pinned by id: a project *named* admin elsewhere,
        # or the admin role on any other project, makes no administrator.
        is_admin = bool(self._admin_project) and info.project_id == self._admin_project \
            and bool(info.roles & self._admin_roles)
        return Identity(user_id=info.user_id, user_name=info.user_name,
                        project_id=info.project_id, roles=info.roles,
                        expires_at=info.expires_at, is_admin=is_admin, via="token",
                        member_roles=self._member_roles, reader_roles=self._reader_roles)

    # -- break-glass path ---------------------------------------------------

    def _break_glass(self, presented: str, source: str) -> Identity:
        # Never touches Keystone or the limiter: this is how an administrator
        # repairs the service while Keystone is down or under a flood.
        if not self._admin_key.path:
            self._count("admin_key_refused")
            raise AuthenticationError("authentication required: the break-glass admin key is "
                                      "not enabled on this host")
        key = self._admin_key.current()
        if key is None:
            self._count("admin_key_refused")
            raise AuthenticationError("authentication required: the break-glass admin key is "
                                      "not usable on this host (see the plugin log)")
        if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), key):
            self._count("admin_key_refused")
            LOG.warning("wrong break-glass admin key from %r", source)
            raise AuthenticationError(f"authentication required: wrong {self._admin_key_header}")
        self._count("admin_key")
        return Identity(user_id="break-glass", user_name="break-glass", project_id="",
                        roles=self._admin_roles, expires_at=math.inf, is_admin=True,
                        via="admin-key", member_roles=self._member_roles,
                        reader_roles=self._reader_roles)


def read_admin_key(cfg: Mapping) -> str:
    """The break-glass key for this site's own tools (the reconciler,
    fdcs-manage), which reach the engines as administrators: only from a
    root-owned file of mode 0600 (``reconciler.admin_key_file``, else
    ``keystone.admin_key_file``)."""
    path = cfg["reconciler.admin_key_file"] or cfg["keystone.admin_key_file"]
    if not path:
        raise ConfigError("no admin key file (keystone.admin_key_file): the engines are reached "
                          "with the break-glass admin key")
    try:
        st = os.stat(path)
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise ConfigError(f"{path}: the admin key file must be owned by root with mode 0600")
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise ConfigError(f"the admin key file cannot be read: {e.strerror} ({path})") from e
    if not key:
        raise ConfigError(f"{path}: the admin key file is empty")
    return key
