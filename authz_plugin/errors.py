"""The one exception root of the FDCS packages.

Every error FDCS raises on purpose derives from :class:`FdcsError`.  An error
carries the message a *tenant* may read (``str(err)``): it never contains a
token, a password or another tenant's data.  Library errors (redis,
keystoneauth1, OS errors) are translated at the module that calls the library,
with ``raise ... from e`` so that the cause reaches the log but not the tenant.

``status`` is the HTTP status the error implies when it is answered directly
(by ``fdcs-name-scoper`` or a CLI); the authorization plugin always answers a
deny, whatever the status.
"""


class FdcsError(Exception):
    """Root of all FDCS errors.  ``str(e)`` is safe to show to a tenant."""

    status = 500
    #: short machine-readable reason for audit lines and metrics
    reason = "error"


class ConfigError(FdcsError):
    """The configuration is invalid; the message names the key."""

    reason = "config"


class Denied(FdcsError):
    """The request is refused by policy."""

    status = 403
    reason = "policy"


class NotFound(Denied):
    """The request names a resource the caller does not own.

    Answered with the engine's own wording for a missing resource, so that a
    tenant cannot tell "exists but is someone else's" from "does not exist".
    """

    status = 404
    reason = "not-owned"


class BadRequest(Denied):
    """The request is malformed or cannot be read the way the engine reads it."""

    status = 400
    reason = "bad-request"


class Unsupported(Denied):
    """The endpoint is not in the policy table."""

    status = 403
    reason = "unsupported"


class AuthenticationError(FdcsError):
    """No valid identity: missing, invalid or expired token, or a tenant the
    token may not act for."""

    status = 401
    reason = "authentication"


class Forbidden(FdcsError):
    """A valid identity without the role the request needs."""

    status = 403
    reason = "role"


class Unavailable(FdcsError):
    """A backing service (Keystone, Redis, the engine) cannot be reached.

    Never turned into an allow, never cached as a negative answer.
    """

    status = 503
    reason = "unavailable"


class IdentityUnavailable(Unavailable):
    reason = "keystone-unavailable"


class StoreUnavailable(Unavailable):
    reason = "redis-unavailable"


class Retry(Unavailable):
    """Ownership is being rebuilt; the reference is not known yet."""

    reason = "rebuilding"


class QuotaExceeded(Denied):
    """A create or update would take the tenant over a quota (or sets no
    limit of a metric whose quota is finite)."""

    reason = "quota"


class Suspended(Forbidden):
    """The tenant is suspended by the site administrators."""

    reason = "suspended"
