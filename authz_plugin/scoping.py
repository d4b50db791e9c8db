"""The name-scoping scheme: one tenant's ``web`` is the engine's ``<tenant>_web``.

Contract (also in ARCHITECTURE.md, "Name scoping"):

* ``scope(tenant, name) = tenant + "_" + name``.  A tenant id is a Keystone
  project id: ``[A-Za-z0-9][A-Za-z0-9-]{0,63}`` (Keystone's are 32 hex
  digits); it never contains ``_``.  An original name follows Docker's name
  rule ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (at most 200 characters).
* Unambiguous and reversible: the first ``_`` of a scoped name ends the
  tenant id, so ``unscope`` recovers both parts and a scoped name identifies
  its tenant.
* No collision, no prefix: if ``scope(a, x)`` were a prefix of (or equal to)
  ``scope(b, y)``, their first ``_`` would stand at the same place, so
  ``a == b``.  The engine matches names exactly, but matches *ids* by prefix;
  a scoped name contains ``_``, which is not a hex digit, so it can never be
  read as an id prefix either.
* The original name is also kept in the label ``org.fiware.fdcs.name``, and
  the owner in ``org.fiware.fdcs.tenant``; a rename changes the name but not
  the labels, so code that needs the current original name unscopes the
  current name rather than trusting the name label.

This module is pure and is the only place that knows the scheme; the plugin
and the name scoper both call it.
"""

from __future__ import annotations

import re

TENANT_LABEL = "org.fiware.fdcs.tenant"
NAME_LABEL = "org.fiware.fdcs.name"
LABEL_PREFIX = "org.fiware.fdcs."

SEPARATOR = "_"
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_HEX_RE = re.compile(r"[0-9a-f]{1,64}")


def valid_tenant(tenant: str) -> bool:
    return bool(_TENANT_RE.fullmatch(tenant))


def valid_name(name: str) -> bool:
    """Whether ``name`` is acceptable as an original (unscoped) name."""
    return bool(_NAME_RE.fullmatch(name))


def scope(tenant: str, name: str) -> str:
    """The engine-side name of ``name`` for ``tenant``; ValueError when either
    part is not acceptable."""
    if not valid_tenant(tenant):
        raise ValueError(f"not a tenant id: {tenant!r}")
    if not valid_name(name):
        raise ValueError(f"not a valid name: {name!r}")
    return f"{tenant}{SEPARATOR}{name}"


def unscope(scoped: str) -> tuple[str, str] | None:
    """``(tenant, name)`` for a scoped name, None for anything else."""
    tenant, sep, name = scoped.partition(SEPARATOR)
    if not sep or not valid_tenant(tenant) or not valid_name(name):
        return None
    return tenant, name


def unscope_for(tenant: str, scoped: str) -> str | None:
    """The name of ``scoped`` when it is ``tenant``'s scoped name, else None:
    what ``unscope`` answers when its tenant is ``tenant``, without the split
    (a tenant id holds no separator, so only a name starting with the
    tenant's prefix can be the tenant's)."""
    prefix = tenant + SEPARATOR
    if not scoped.startswith(prefix) or not valid_tenant(tenant):
        return None
    name = scoped[len(prefix):]
    return name if valid_name(name) else None


def is_scoped_for(tenant: str, ref: str) -> bool:
    """Whether ``ref`` is a name in ``tenant``'s scoped form."""
    parts = unscope(ref)
    return parts is not None and parts[0] == tenant


def looks_like_id(ref: str) -> bool:
    """Whether the engine may read ``ref`` as a full id or an id prefix."""
    return bool(_HEX_RE.fullmatch(ref))
