"""Read an engine request the way the engine reads it, or refuse it.

The plugin receives the raw ``RequestUri``; the engine routes on Go's decoded
``URL.Path`` with gorilla/mux (which redirects, not serves, a path that is not
clean), strips an optional ``/v<version>`` prefix, and reads query parameters
with ``url.ParseQuery`` taking the *first* value of a key.  This module turns
the plugin's view into a :class:`Request` with exactly those semantics, and
refuses with :class:`BadRequest` whatever it cannot read with certainty:

* a request target that is not origin-form (``/...``), or holds ``#``,
  control characters or white space;
* an invalid percent escape (Go answers 400), a decoded path that is not
  clean (``//``, ``/./``, ``/../``, a trailing ``/``) or holds a NUL;
* an API version that is not written canonically (``1.041``, ``1.41.0``),
  below ``min_version`` or above ``max_version``; no version at all except for
  ``/_ping`` and ``/version`` (clients probe those before negotiating);
* a query with ``;`` (Go 1.17+ rejects it) or a bad escape;
* a ``Content-Type`` that does not parse, or is a form type
  (``application/x-www-form-urlencoded``, ``multipart/*``): Go's form parsing
  would let body fields override query parameters.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass
from email.message import Message
from typing import Mapping
from urllib.parse import unquote_to_bytes

from .errors import BadRequest

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})
UNVERSIONED_OK = frozenset({"/_ping", "/version"})

_VERSION_RE = re.compile(r"^/v([0-9.]+)(/.*)$")
_CANONICAL_VERSION = re.compile(r"1\.(0|[1-9][0-9]{0,2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _unescape(s: str, query: bool) -> str:
    """Go's url unescape: strict ``%XX``; ``+`` is a space only in a query."""
    if "%" not in s and not (query and "+" in s):
        return s
    # Go refuses a '%' not followed by two hex digits (400); then each escape
    # is one byte, and the bytes must be UTF-8.  Checked by a regex and
    # decoded by the standard library: a byte loop here cost ~40 us per list
    # request (its filters are escaped JSON).
    if _BAD_ESCAPE.search(s):
        raise BadRequest("the request target holds an invalid percent escape")
    if query:
        s = s.replace("+", " ")  # before unquoting: an escaped %2B stays a '+'
    try:
        return unquote_to_bytes(s).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request target does not decode to UTF-8") from None


@functools.lru_cache(maxsize=64)  # the configured bounds and the few versions clients send
def _version_tuple(v: str) -> tuple[int, int]:
    major, minor = v.split(".")
    return int(major), int(minor)


class Headers(Mapping[str, str]):
    """The engine's header map, read case-insensitively.

    The engine flattens each header to its *last* value and drops
    ``Authorization``, ``X-Registry-Auth`` and ``X-Registry-Config``.
    """

    def __init__(self, raw: Mapping[str, str] | None):
        self._d = {str(k).lower(): str(v) for k, v in (raw or {}).items()}

    @classmethod
    def of_lowered(cls, lowered: dict[str, str]) -> "Headers":
        """The map whose :meth:`lowered` is ``lowered`` (lower-case names,
        string values; taken as it is, not copied): for a caller that has
        lowered the engine's map already."""
        h = cls.__new__(cls)
        h._d = lowered
        return h

    def __getitem__(self, key: str) -> str:
        return self._d[key.lower()]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._d

    def get(self, key: str, default=None):  # type: ignore[override]
        # Mapping.get goes through __getitem__ and a KeyError
        return self._d.get(key.lower(), default)

    def lowered(self) -> Mapping[str, str]:
        """The map itself, by lower-case name (read it, never change it):
        for callers that look up names already in lower case, without a
        ``lower()`` and a call per name."""
        return self._d

    def items(self):  # type: ignore[override]
        # what Mapping.items() gives (lower-case names), without a lookup per
        # header: the identity scans the headers three times per decision
        return self._d.items()


@dataclass(frozen=True, slots=True)
class Request:
    """A canonical engine request.

    ``path`` is decoded and without its version prefix (``/containers/json``);
    ``query`` keeps every pair in order; ``body`` is the JSON body the engine
    forwarded (None when it forwarded none).
    """

    method: str
    path: str
    version: str | None
    query: tuple[tuple[str, str], ...]
    headers: Headers
    body: bytes | None
    raw_uri: str = ""
    media_type: str = ""

    def q(self, key: str) -> str | None:
        """The value the engine reads for ``key``: the first one."""
        for k, v in self.query:
            if k == key:
                return v
        return None

    def qall(self, key: str) -> list[str]:
        return [v for k, v in self.query if k == key]

    @property
    def is_write(self) -> bool:
        return self.method not in ("GET", "HEAD")

    def declared_body(self) -> bool:
        """Whether the request carries a body, as far as the plugin can see.

        A POST or PUT from every supported client carries ``Content-Length``
        (``0`` when there is no body).  Go deletes ``Content-Length`` and
        hides ``Transfer-Encoding`` for a chunked request, so a POST/PUT
        without ``Content-Length`` is taken as carrying a body.
        """
        if self.body:
            return True
        cl = self.headers.get("Content-Length")
        if cl is None:
            return self.method in ("POST", "PUT")
        return cl.strip() != "0"


def _query(raw_query: str) -> tuple[tuple[str, str], ...]:
    """Go's ``url.ParseQuery`` of a raw query, every pair in order (refuses
    ``;`` and bad escapes)."""
    if ";" in raw_query:
        raise BadRequest("the query holds ';', which the engine refuses")
    query = []
    for part in raw_query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        query.append((_unescape(k, query=True), _unescape(v, query=True)))
    return tuple(query)


#: :func:`_query`, remembered for the last queries of up to
#: :data:`_MEMO_QUERY_MAX` characters.  A list's ``filters`` (escaped JSON,
#: ~4 us hot and several times that with a cold cache to decode) come back
#: with every list of a tenant -- the name scoper writes the same text each
#: time.  Pure: the answer depends on the text alone and is immutable; a
#: refusal is not remembered (raised afresh, same message, every time).
_query_memo = functools.lru_cache(maxsize=256)(_query)
_MEMO_QUERY_MAX = 1024


def parse_query(raw_query: str) -> tuple:
    """The ``(name, value)`` pairs of a request's raw query, as Go's
    ``url.ParseQuery`` reads it (BadRequest where it refuses); remembered
    for queries up to :data:`_MEMO_QUERY_MAX` characters."""
    if not raw_query:
        return ()
    return _query_memo(raw_query) if len(raw_query) <= _MEMO_QUERY_MAX else _query(raw_query)


def check_version(version: str, min_version: str, max_version: str) -> None:
    """BadRequest unless ``version`` (of a ``/v<version>/`` path prefix) is
    written canonically (``1.41``) and lies within the bounds."""
    if not _CANONICAL_VERSION.fullmatch(version):
        raise BadRequest(f"API version {version!r} is not written canonically (e.g. v1.41)")
    if _version_tuple(version) < _version_tuple(min_version):
        raise BadRequest(f"API version {version} is too old; this service needs {min_version} or newer")
    if _version_tuple(version) > _version_tuple(max_version):
        raise BadRequest(f"API version {version} is too new; this service supports up to {max_version}")


def _media_type(headers: Headers) -> str:
    ct = headers.get("Content-Type")
    if ct is None:
        return ""
    msg = Message()
    msg["Content-Type"] = ct
    mt = msg.get_content_type()
    # email falls back to text/plain on a malformed value: detect that.
    main = ct.split(";", 1)[0].strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", main) or mt != main:
        raise BadRequest("the Content-Type header cannot be parsed")
    if mt == "application/x-www-form-urlencoded" or mt.startswith("multipart/"):
        raise BadRequest(f"form bodies ({mt}) are not accepted; send JSON")
    return mt


def parse(
    method: str,
    uri: str,
    headers: Mapping[str, str] | None,
    body_b64: str | None,
    min_version: str = "1.40",
    max_version: str = "1.41",
) -> Request:
    """Canonicalise one AuthZ request (raw fields of the plugin protocol)."""
    if method not in METHODS:
        raise BadRequest(f"method {method!r} is not supported")
    if not uri.startswith("/") or uri.startswith("//"):
        raise BadRequest("the request target must be a path starting with a single /")
    if "#" in uri or " " in uri or not uri.isprintable():  # tab, CR, LF, NUL: not printable
        raise BadRequest("the request target holds characters the engine would not route")
    raw_path, _, raw_query = uri.partition("?")
    path = _unescape(raw_path, query=False)
    if "\x00" in path or not path.isprintable():
        raise BadRequest("the request path holds control characters")
    if path != "/" and (path.endswith("/") or "//" in path or "/./" in path or "/../" in path
                        or path.endswith("/.") or path.endswith("/..")):
        raise BadRequest("the request path is not clean (//, /./, /../ or a trailing /)")

    version = None
    m = _VERSION_RE.match(path)
    if m:
        version, path = m.group(1), m.group(2)
        check_version(version, min_version, max_version)
    elif path not in UNVERSIONED_OK:
        raise BadRequest("the API version is missing from the path (e.g. /v1.41/...)")

    query = parse_query(raw_query)

    hdrs = Headers(headers)
    media_type = _media_type(hdrs)

    body = None
    if body_b64:
        try:
            body = base64.b64decode(body_b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("the request body sent by the engine is not valid base64") from None
    return Request(method=method, path=path, version=version, query=query, headers=hdrs,
                   body=body, raw_uri=uri, media_type=media_type)
