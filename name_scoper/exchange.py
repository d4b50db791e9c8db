"""The contract between the proxy (I/O) and the rewriting (policy of names).

For each tenant request the proxy (``proxy.py``) authenticates the caller and
then awaits ``prepare(...)`` (``handlers.py``), which returns an
:class:`Exchange`: what to send upstream, and how to treat the request body
and the response.  The proxy never looks inside bodies itself; the rewriting
never touches sockets (it may ask the proxy's :class:`Engine` for
sub-requests, e.g. to create the tenant's default network).

Body modes
----------

request  ``"stream"``  pass the body through as it comes (archive uploads);
         ``"json"``    buffer it (at most ``MAX_JSON`` bytes: over that the
                       proxy answers 413) and send ``rewrite_body(body)``
                       with a fresh ``Content-Length``;
         ``"none"``    the request has no body (the proxy still forwards one
                       if the client sent it; the plugin decides).
response ``"stream"``  pass through unbuffered (logs, export, pull progress);
         ``"json"``    buffer (at most ``MAX_RESPONSE_JSON``) and send
                       ``response.json(status, body)`` with a fresh
                       ``Content-Length``;
         ``"lines"``   a stream of JSON documents, one per line (events):
                       each complete line goes through ``response.line(line)``
                       (``None`` drops it), flushed as it arrives.
A ``101 Switching Protocols`` answer (or the engine's older ``200`` raw
stream on attach / exec start) always switches the connection to raw
bidirectional copying, whatever the mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

MAX_JSON = 1024 * 1024
MAX_RESPONSE_JSON = 64 * 1024 * 1024

Headers = list[tuple[bytes, bytes]]


class ResponseRewriter(Protocol):
    def head(self, status: int, headers: Headers) -> tuple[str, Headers]:
        """Given the engine's status and headers, return the response body
        mode (``stream``, ``json`` or ``lines``) and the headers to send to
        the client (the proxy fixes framing headers itself)."""

    def json(self, status: int, body: bytes) -> bytes | tuple[int, bytes]:
        """Rewrite a buffered JSON response body; may also change the status
        (a plugin refusal of a foreign reference becomes the engine's 404),
        by returning ``(status, body)``."""

    def line(self, line: bytes) -> bytes | None:
        """Rewrite one line of a ``lines`` stream; None drops it."""


class PassThrough:
    """A response rewriter that changes nothing."""

    def head(self, status: int, headers: Headers) -> tuple[str, Headers]:
        return "stream", headers

    def json(self, status: int, body: bytes) -> bytes:
        return body

    def line(self, line: bytes) -> bytes | None:
        return line


@dataclass
class Exchange:
    method: str
    target: str  # the request target sent upstream, e.g. /v1.41/containers/<scoped>/json
    headers: Headers  # request headers for upstream (hop-by-hop headers are the proxy's business)
    request_body: str = "none"  # stream | json | none
    rewrite_body: Callable[[bytes], bytes] | None = None
    response: ResponseRewriter = field(default_factory=PassThrough)
    #: answer the client directly, without the engine: (status, message)
    reject: tuple[int, str] | None = None


class Engine(Protocol):
    """Sub-requests to the engine on behalf of the caller (the proxy gives
    one bound to the caller's own headers, so the plugin still decides)."""

    def __call__(self, method: str, target: str, body: bytes | None = None) -> Awaitable[tuple[int, Headers, bytes]]:
        ...
