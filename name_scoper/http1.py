"""A strict, lean HTTP/1.1 state machine for the proxy: both of its sides.

The proxy used ``h11``; this module keeps h11's interface (the part the
proxy uses: the same event, state and error names, ``Connection`` with
``receive_data`` / ``next_event`` / ``send`` / ``start_next_cycle``) and its
rules, but checks and splits a head with bytes methods (C loops over the
whole head) and a few compiled regular expressions rather than an event
machinery: a third of the proxy's CPU per request was h11's
(``benchmarks/scoper_inspect.py``).

Stricter than h11 where h11 was lenient and the proxy had to refuse on its
own (request smuggling), so every refusal is in one place:

* obsolete line folding (a header line starting with a space or tab);
* more than one ``Content-Length`` (also equal ones, also ``2, 2``);
* ``Content-Length`` together with ``Transfer-Encoding``;
* any ``Transfer-Encoding`` but ``chunked`` (501);
* a chunk's size or its terminating CRLF out of grammar.

As in h11: a header name is a token, a value is visible characters with
inner spaces and tabs (no CR, LF, NUL or other control character), no space
before the colon; an HTTP/1.1 request needs ``Host``; lines may end in LF as
well as CRLF (the message is re-serialized, never passed on as bytes); a head
is at most ``max_incomplete_event_size`` bytes (431).  Only HTTP/1.0 and 1.1.

Errors: :class:`RemoteProtocolError` (the peer broke the protocol; its
``error_status_hint`` is the status to answer, and a ``plain`` message can
be shown to the peer as it is) and :class:`LocalProtocolError` (this side
tried to send something invalid).
"""

from __future__ import annotations

import re

__all__ = [
    "CLIENT", "SERVER", "Connection", "Request", "Response", "InformationalResponse", "Data",
    "EndOfMessage", "ConnectionClosed", "NEED_DATA", "PAUSED", "RemoteProtocolError",
    "LocalProtocolError", "IDLE", "SEND_RESPONSE", "SEND_BODY", "DONE", "MUST_CLOSE", "CLOSED",
    "ERROR", "SWITCHED_PROTOCOL",
]


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


CLIENT, SERVER = _Sentinel("CLIENT"), _Sentinel("SERVER")
NEED_DATA, PAUSED = _Sentinel("NEED_DATA"), _Sentinel("PAUSED")
IDLE, SEND_RESPONSE, SEND_BODY, DONE = (_Sentinel(n) for n in ("IDLE", "SEND_RESPONSE", "SEND_BODY", "DONE"))
MUST_CLOSE, CLOSED, ERROR, SWITCHED_PROTOCOL = (
    _Sentinel(n) for n in ("MUST_CLOSE", "CLOSED", "ERROR", "SWITCHED_PROTOCOL"))


class ProtocolError(Exception):
    def __init__(self, msg: str, error_status_hint: int = 400, plain: bool = False):
        super().__init__(msg)
        self.error_status_hint = error_status_hint
        #: the message may be shown to the peer as it is (it quotes nothing)
        self.plain = plain


class RemoteProtocolError(ProtocolError):
    """The peer's bytes are not HTTP/1.1 this module accepts."""


class LocalProtocolError(ProtocolError):
    """What this side asked to send is not valid HTTP/1.1 here and now."""


class Headers(list):
    """``(lower-case name, value)`` pairs, in order; ``raw_items()`` gives
    the names as sent."""

    __slots__ = ("_raw",)

    def __init__(self, pairs, raw=None):
        super().__init__(pairs)
        self._raw = raw

    def raw_items(self) -> list[tuple[bytes, bytes]]:
        return list(self._raw if self._raw is not None else self)


def _headers(headers) -> Headers:
    if type(headers) is Headers:
        return headers
    raw = [(n if type(n) is bytes else n.encode("ascii"), v if type(v) is bytes else v.encode("latin-1"))
           for n, v in headers]
    return Headers([(n.lower(), v) for n, v in raw], raw)


class Request:
    __slots__ = ("method", "target", "headers", "http_version")

    def __init__(self, *, method, target, headers, http_version: bytes = b"1.1"):
        self.method = method if type(method) is bytes else method.encode("ascii")
        self.target = target if type(target) is bytes else target.encode("ascii")
        self.headers = _headers(headers)
        self.http_version = http_version

    def __repr__(self) -> str:
        return f"Request(method={self.method!r}, target={self.target!r})"


class _ResponseBase:
    __slots__ = ("status_code", "reason", "headers", "http_version")

    def __init__(self, *, status_code: int, headers=(), reason: bytes = b"", http_version: bytes = b"1.1"):
        self.status_code = status_code
        self.reason = reason if type(reason) is bytes else reason.encode("ascii")
        self.headers = _headers(headers)
        self.http_version = http_version

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code})"


class Response(_ResponseBase):
    __slots__ = ()


class InformationalResponse(_ResponseBase):
    __slots__ = ()


class Data:
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class EndOfMessage:
    __slots__ = ()


class ConnectionClosed:
    __slots__ = ()


_EOM = EndOfMessage()

# -- grammar (RFC 9110 / 9112, as h11 has it) ---------------------------------------------

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_VALUE = _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*"
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")?[ \t]*")
# Character tables for checks at C speed: ``s.translate(None, TABLE)`` is
# empty if and only if every byte of ``s`` is in TABLE.
#: the bytes a token may hold
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: the bytes a field value may hold: visible characters, obs-text, space, tab
#: (a string of them, less leading and trailing spaces and tabs, is a value)
_VALUE_CHARS = b"\t" + bytes(range(0x20, 0x7f)) + bytes(range(0x80, 0x100))
#: the same and LF (header lines with their ends, CRLFs made LFs)
_LINES_CHARS = _VALUE_CHARS + b"\n"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^\x00\s]+) HTTP/(1\.[01])")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HEAD_END = re.compile(rb"\n\r?\n")
_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_TARGET = re.compile(rb"[^\x00\s]+")
_TOKEN_RE = re.compile(_TOKEN)
_VALUE_RE = re.compile(rb"(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?")
_REASON_RE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")

#: the longest chunked-trailer line (trailers are validated and dropped)
MAX_TRAILER_LINE = 8 * 1024

MSG_FOLDING = "obsolete line folding in request headers is not accepted"
MSG_TWO_LENGTHS = "more than one Content-Length is not accepted"
MSG_CL_AND_TE = "Content-Length together with Transfer-Encoding is not accepted"


def _parse_head(head: bytes, first_re, what: str, memo: list | None = None):
    """(first-line match, Headers, their lower-case names, content-length or
    None, chunked) of ``head``: a message head up to and with its last
    line's end (the empty line that ends it left out).

    ``memo``: a connection's ``[header lines, their parse]`` of its last head
    that parsed, updated here.  A head whose header lines are byte for byte
    the last one's gets that parse again (a new ``Headers`` of the same
    pairs) without going through them: a client repeats its headers on
    every request of a connection, the engine its own within a second.
    Nothing that failed is kept, and the first line is always parsed.

    RemoteProtocolError when any part is out of grammar, the first bad part
    named as :func:`_refuse_header_lines` names it.

    The header lines are checked as a whole with bytes methods (C loops
    rather than a regular expression per line); a block that fails is gone
    through line by line (``_HEADER``, the grammar) only for the message.
    Why this is ``_HEADER`` on every line: with each line's CR before its LF
    gone (``replace``), a CR left anywhere fails the table check, as does a
    NUL, DEL or other control character; a line is then ``name:rest`` with
    ``name`` all token characters, not empty (``_HEADER``'s greedy token ends
    at the first colon), and ``rest`` of value characters only, which
    ``[ \t]*(value)?[ \t]*`` always matches, with ``rest.strip(b" \t")`` as
    the value.  A folded line starts with a space: not a token."""
    nl = head.find(b"\n")
    first = head[:nl]
    if first[-1:] == b"\r":
        first = first[:-1]
    m = first_re.fullmatch(first)
    if m is None:
        raise RemoteProtocolError(f"illegal {what} line")
    lines = head[nl + 1:]
    if memo is not None and memo[0] == lines:
        pairs, raw, names, cl, chunked = memo[1]
        return m, Headers(pairs, raw), names, cl, chunked
    block = lines.replace(b"\r\n", b"\n")
    if block.translate(None, _LINES_CHARS):
        _refuse_header_lines(head[nl + 1:])
    raw = []
    pairs = []
    names = []
    for line in block.split(b"\n")[:-1]:  # each line ends in LF: the last part is empty
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN_CHARS):
            _refuse_header_lines(head[nl + 1:])
        value = value.strip(b" \t")
        lname = name.lower()
        raw.append((name, value))
        pairs.append((lname, value))
        names.append(lname)
    cl = None
    if b"content-length" in names:
        lengths = [v for n, v in pairs if n == b"content-length"]
        if len(lengths) > 1 or b"," in lengths[0]:
            raise RemoteProtocolError(MSG_TWO_LENGTHS, plain=True)
        if not _DIGITS.fullmatch(lengths[0]):
            raise RemoteProtocolError("bad Content-Length")
        cl = int(lengths[0])
    chunked = False
    if b"transfer-encoding" in names:
        if cl is not None:
            raise RemoteProtocolError(MSG_CL_AND_TE, plain=True)
        te = b",".join([v for n, v in pairs if n == b"transfer-encoding"])
        if te.strip().lower() != b"chunked":
            raise RemoteProtocolError("only Transfer-Encoding: chunked is supported", 501, plain=True)
        chunked = True
    if memo is not None:
        raw, names = tuple(raw), tuple(names)  # shared by every Headers of the memo: never changed
        memo[0], memo[1] = lines, (pairs, raw, names, cl, chunked)
    return m, Headers(pairs, raw), names, cl, chunked


def _refuse_header_lines(block: bytes):
    """Raise the RemoteProtocolError of the first header line of ``block``
    (lines with their ends) out of grammar; of the block if none is."""
    for line in block.split(b"\n")[:-1]:
        if line[-1:] == b"\r":
            line = line[:-1]
        if _HEADER.fullmatch(line) is None:
            if line[:1] in (b" ", b"\t"):
                raise RemoteProtocolError(MSG_FOLDING, plain=True)
            raise RemoteProtocolError("illegal header line")
    raise RemoteProtocolError("illegal header line")  # unreachable: fail closed all the same


def _connection_close(headers) -> bool:
    for n, v in headers:
        if n == b"connection" and b"close" in (t.strip().lower() for t in v.split(b",")):
            return True
    return False


def _header_block(headers: Headers) -> tuple[list[bytes], bytes]:
    """(the lower-case names, the serialized ``name: value`` CRLF lines) of
    ``headers`` to send; LocalProtocolError if a name is not a token or a
    value not a field value (as h11: visible characters with inner spaces
    and tabs).

    Checked at C speed, on the names and values serialized: every name is
    token characters only and not empty, every value is value characters
    only (no CR, LF, NUL, DEL or other control character) with no leading
    or trailing space or tab -- ``_TOKEN_RE`` and ``_VALUE_RE`` exactly."""
    raw = headers._raw if headers._raw is not None else headers
    raw_names = [n for n, _ in raw]
    values = [v for _, v in raw]
    if (b"".join(raw_names).translate(None, _TOKEN_CHARS) or not all(raw_names)
            or b"".join(values).translate(None, _VALUE_CHARS)
            or [v.strip(b" \t") for v in values] != values):
        for n, v in raw:
            if not _TOKEN_RE.fullmatch(n) or not _VALUE_RE.fullmatch(v):
                raise LocalProtocolError(f"illegal header {n.lower()[:40]!r}")
        raise LocalProtocolError("illegal header")  # unreachable: fail closed all the same
    return [n for n, _ in headers], b"".join([b"%s: %s\r\n" % (n, v) for n, v in raw])


class Connection:
    """One HTTP/1.1 connection seen from one side (``CLIENT``: we send the
    requests; ``SERVER``: we answer them), h11's model: ``receive_data``
    feeds bytes (``b""`` at EOF), ``next_event`` returns the next event or
    ``NEED_DATA`` / ``PAUSED``, ``send`` returns the bytes of an event."""

    def __init__(self, our_role, max_incomplete_event_size: int = 16 * 1024):
        self.our_role = our_role
        self._max_head = max_incomplete_event_size
        self._buf = bytearray()
        self._closed = False
        self.our_state = IDLE
        self.their_state = IDLE
        self.their_http_version: bytes | None = None
        self.they_are_waiting_for_100_continue = False
        self._keep_alive = True
        self._method: bytes | None = None  # of the current request
        # body reading: mode "length" (_in_left bytes to go), "chunked" (_in_left bytes
        # of the current chunk to go, 0: its CRLF next, -1: a chunk head next), "close"
        self._in_mode = None
        self._in_left = 0
        self._in_trailer = False
        #: the chunked body's end was read; EndOfMessage is next
        self._in_end = False
        #: how much of the buffer is known to hold no head's end
        self._scanned = 0
        #: the last head's header lines and their parse (see _parse_head)
        self._head_memo: list = [None, None]
        # body writing
        self._out_mode = None
        self._out_left = 0

    # -- receiving ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._closed:
                raise RuntimeError("received data after the end of the connection")
            self._buf += data
        else:
            self._closed = True

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return bytes(self._buf), self._closed

    def next_event(self):
        try:
            state = self.their_state
            if state is SEND_BODY:
                return self._read_body()
            if state is IDLE:
                return self._read_head()
            if state is ERROR:
                raise RemoteProtocolError("cannot read after a protocol error")
            if state in (DONE, SWITCHED_PROTOCOL) or (state is MUST_CLOSE and not self._closed):
                if state is DONE and self.our_role is CLIENT and self._closed and not self._buf:
                    return ConnectionClosed()
                return PAUSED
            if self._closed and not self._buf:
                self.their_state = CLOSED
                return ConnectionClosed()
            raise RemoteProtocolError("data after the end of the message")
        except RemoteProtocolError:
            self.their_state = ERROR
            raise

    def _read_head(self):
        buf = self._buf
        # Search only what came since the last look (less the 2 bytes a
        # head's end may already have begun with): a client trickling a
        # 64 KiB head a byte at a time must not cost 64 K scans of it.
        m = _HEAD_END.search(buf, self._scanned)
        if m is None:
            self._scanned = max(0, len(buf) - 2)
            if len(buf) > self._max_head:
                raise RemoteProtocolError("request head too large" if self.our_role is SERVER
                                          else "response head too large", 431, plain=True)
            if self._closed:
                if not buf:
                    self.their_state = CLOSED
                    return ConnectionClosed()
                raise RemoteProtocolError("the peer closed in the middle of a message head")
            return NEED_DATA
        end = m.end()
        if end > self._max_head:
            raise RemoteProtocolError("head too large", 431, plain=True)
        # the head with its last line's end (its closing empty line left out)
        head = bytes(buf[:m.start() + 1])
        del buf[:end]
        self._scanned = 0
        if self.our_role is SERVER:
            return self._request(head)
        return self._response(head)

    def _request(self, head: bytes):
        m, headers, names, cl, chunked = _parse_head(head, _REQUEST_LINE, "request", self._head_memo)
        method, target, version = m.groups()
        if version == b"1.1" and b"host" not in names:
            raise RemoteProtocolError("missing mandatory Host header", plain=True)
        self.their_http_version = version
        self._method = method
        self._keep_alive = version == b"1.1" and not (b"connection" in names and _connection_close(headers))
        self.they_are_waiting_for_100_continue = version == b"1.1" and b"expect" in names and any(
            n == b"expect" and v.lower() == b"100-continue" for n, v in headers)
        self._in_mode = "chunked" if chunked else "length"
        self._in_left = -1 if chunked else (cl or 0)
        self._in_trailer = self._in_end = False
        self.their_state = SEND_BODY
        self.our_state = SEND_RESPONSE
        return Request(method=method, target=target, headers=headers, http_version=version)

    def _response(self, head: bytes):
        if self.our_state not in (SEND_BODY, DONE, MUST_CLOSE):
            raise RemoteProtocolError("a response before a request")
        m, headers, names, cl, chunked = _parse_head(head, _STATUS_LINE, "status", self._head_memo)
        version, status, reason = m.group(1), int(m.group(2)), m.group(3) or b""
        self.their_http_version = version
        if status < 200:
            if status == 101:
                self.their_state = SWITCHED_PROTOCOL
            return InformationalResponse(status_code=status, headers=headers, reason=reason,
                                         http_version=version)
        if version != b"1.1" or (b"connection" in names and _connection_close(headers)):
            self._keep_alive = False
        if self._method == b"HEAD" or status in (204, 304):
            self._in_mode, self._in_left = "length", 0
        elif chunked:
            self._in_mode, self._in_left = "chunked", -1
        elif cl is not None:
            self._in_mode, self._in_left = "length", cl
        else:
            self._in_mode = "close"
            self._keep_alive = False
        self._in_trailer = self._in_end = False
        self.their_state = SEND_BODY
        return Response(status_code=status, headers=headers, reason=reason, http_version=version)

    def _read_body(self):
        mode = self._in_mode
        buf = self._buf
        if self._in_end:
            return self._end_of_message()
        if mode == "length":
            left = self._in_left
            if left == 0:
                return self._end_of_message()
            if not buf:
                if self._closed:
                    raise RemoteProtocolError("the peer closed before the end of the message body")
                return NEED_DATA
            if left >= len(buf):  # the usual case: all that came is body
                n = len(buf)
                data = bytes(buf)
                buf.clear()
            else:
                n = left
                data = bytes(buf[:n])
                del buf[:n]
            self._in_left = left - n
            self.they_are_waiting_for_100_continue = False
            return Data(data)
        if mode == "close":
            if buf:
                data = bytes(buf)
                buf.clear()
                return Data(data)
            if self._closed:
                return self._end_of_message()
            return NEED_DATA
        return self._read_chunked()

    def _read_chunked(self):
        """Every complete piece of chunk data already buffered, as one Data
        (chunk boundaries carry no meaning); the end of the message after
        the last chunk and its trailer."""
        buf = self._buf
        parts = []
        pos = 0
        left = self._in_left
        while not self._in_end:
            if self._in_trailer:
                # trailer fields (validated, then dropped) up to an empty line
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if len(buf) - pos > MAX_TRAILER_LINE:  # also bounds the rescans of a trickled line
                        raise RemoteProtocolError("chunked trailer line too long", 431)
                    break
                line = bytes(buf[pos:nl])
                line = line[:-1] if line[-1:] == b"\r" else line
                pos = nl + 1
                if not line:
                    self._in_end = True
                    break
                if _HEADER.fullmatch(line) is None:
                    raise RemoteProtocolError("illegal chunked trailer line")
                continue
            if left == -1:  # at a chunk head
                m = _CHUNK_HEAD.match(buf, pos)
                if m is None:
                    if buf.find(b"\n", pos) >= 0 or len(buf) - pos > 1024:
                        raise RemoteProtocolError("illegal chunk header")
                    break
                size = int(m.group(1), 16)
                pos = m.end()
                if size == 0:
                    self._in_trailer = True
                    continue
                left = size
            elif left == 0:  # after a chunk's data: exactly CRLF
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise RemoteProtocolError("a chunk's data does not end with CRLF")
                pos += 2
                left = -1
            else:
                avail = len(buf) - pos
                if avail <= 0:
                    break
                n = min(left, avail)
                parts.append(bytes(buf[pos:pos + n]))
                pos += n
                left -= n
        del buf[:pos]
        self._in_left = left
        if self._in_end and not parts:
            return self._end_of_message()
        if parts:
            self.they_are_waiting_for_100_continue = False
            return Data(parts[0] if len(parts) == 1 else b"".join(parts))
        if self._closed:
            raise RemoteProtocolError("the peer closed before the end of the chunked body")
        return NEED_DATA

    def _end_of_message(self):
        self._in_mode = None
        self._in_end = False
        self.they_are_waiting_for_100_continue = False
        self.their_state = DONE if self._keep_alive else MUST_CLOSE
        if self.our_role is SERVER and self.our_state in (DONE, MUST_CLOSE) and not self._keep_alive:
            self.our_state = MUST_CLOSE
        return _EOM

    # -- sending -------------------------------------------------------------------

    def send(self, event) -> bytes:
        try:
            kind = type(event)
            if kind is Data:
                return self._send_data(event.data)
            if kind is EndOfMessage:
                return self._send_end()
            if kind is Response:
                return self._send_response(event)
            if kind is InformationalResponse:
                return self._send_informational(event)
            if kind is Request:
                return self._send_request(event)
            raise LocalProtocolError(f"cannot send {kind.__name__}")
        except LocalProtocolError:
            self.our_state = ERROR
            raise

    def _send_request(self, ev: Request) -> bytes:
        if self.our_role is not CLIENT or self.our_state is not IDLE:
            raise LocalProtocolError("cannot send a request now")
        headers = ev.headers
        if not _TOKEN_RE.fullmatch(ev.method) or not _TARGET.fullmatch(ev.target):
            raise LocalProtocolError("illegal request line")
        names, block = _header_block(headers)
        if b"host" not in names:
            raise LocalProtocolError("missing mandatory Host header")
        self._framing_out(headers, names)
        self._method = ev.method
        if b"connection" in names and _connection_close(headers):
            self._keep_alive = False
        self.our_state = SEND_BODY
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (ev.method, ev.target, block)

    def _framing_out(self, headers: Headers, names: list[bytes]) -> None:
        if b"content-length" not in names and b"transfer-encoding" not in names:
            self._out_mode, self._out_left = "length", 0
            return
        cl = te = None
        for n, v in headers:
            if n == b"content-length":
                if cl is not None or not _DIGITS.fullmatch(v):
                    raise LocalProtocolError("bad Content-Length")
                cl = int(v)
            elif n == b"transfer-encoding":
                if te is not None or v.lower() != b"chunked":
                    raise LocalProtocolError("bad Transfer-Encoding")
                te = v
        if cl is not None and te is not None:
            raise LocalProtocolError("Content-Length and Transfer-Encoding")
        if te is not None:
            self._out_mode = "chunked"
        else:
            self._out_mode, self._out_left = "length", cl or 0

    def _send_informational(self, ev: InformationalResponse) -> bytes:
        if self.our_role is not SERVER or self.our_state is not SEND_RESPONSE:
            raise LocalProtocolError("cannot send an informational response now")
        if not 100 <= ev.status_code < 200:
            raise LocalProtocolError("an informational response needs a 1xx status")
        _, block = _header_block(ev.headers)
        if not _REASON_RE.fullmatch(ev.reason):
            raise LocalProtocolError("illegal reason phrase")
        self.they_are_waiting_for_100_continue = False
        if ev.status_code == 101:
            self.our_state = self.their_state = SWITCHED_PROTOCOL
        return b"HTTP/1.1 %d %s\r\n%s\r\n" % (ev.status_code, ev.reason, block)

    def _send_response(self, ev: Response) -> bytes:
        if self.our_role is not SERVER or self.our_state not in (SEND_RESPONSE, IDLE):
            raise LocalProtocolError("cannot send a response now")
        status = ev.status_code
        if not 200 <= status < 1000:
            raise LocalProtocolError("a response needs a status of at least 200")
        if not _REASON_RE.fullmatch(ev.reason):
            raise LocalProtocolError("illegal reason phrase")
        headers = ev.headers
        names, block = _header_block(headers)
        if b"transfer-encoding" in names:
            raise LocalProtocolError("the response framing is this module's to choose")
        cl = None
        if b"content-length" in names:
            for n, v in headers:
                if n == b"content-length":
                    if cl is not None or not _DIGITS.fullmatch(v):
                        raise LocalProtocolError("bad Content-Length")
                    cl = int(v)
        if b"connection" in names and _connection_close(headers):
            self._keep_alive = False
        if self.our_state is IDLE:  # an answer to a request that never parsed
            self._keep_alive = False
        no_body = self._method == b"HEAD" or status in (204, 304)
        if no_body:
            self._out_mode, self._out_left = "length", 0
        elif cl is not None:
            self._out_mode, self._out_left = "length", cl
        elif self.their_http_version == b"1.1":
            self._out_mode = "chunked"
            block += b"transfer-encoding: chunked\r\n"
        else:
            self._out_mode = "close"
            self._keep_alive = False
        if not self._keep_alive:
            if b"connection" in names:  # theirs out, ours in (a line of the checked
                # block is name ": " value CRLF, neither holding a CR or LF)
                block = b"".join([line for line in block.splitlines(keepends=True)
                                  if not line.lower().startswith(b"connection:")])
            block += b"connection: close\r\n"
        self.they_are_waiting_for_100_continue = False
        self.our_state = SEND_BODY
        return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, ev.reason, block)

    def _send_data(self, data) -> bytes:
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError("cannot send body data now")
        mode = self._out_mode
        if mode == "length":
            if len(data) > self._out_left:
                raise LocalProtocolError("more body data than the Content-Length")
            self._out_left -= len(data)
            return bytes(data)
        if mode == "chunked":
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        return bytes(data)

    def _send_end(self) -> bytes:
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError("cannot end a message now")
        mode = self._out_mode
        if mode == "length" and self._out_left:
            raise LocalProtocolError("less body data than the Content-Length")
        self._out_mode = None
        self.our_state = DONE if self._keep_alive else MUST_CLOSE
        if self.our_role is SERVER and self.their_state is DONE and not self._keep_alive:
            self.their_state = MUST_CLOSE
        return b"0\r\n\r\n" if mode == "chunked" else b""

    def start_next_cycle(self) -> None:
        """After a kept-alive exchange (both sides DONE): ready for the next."""
        if self.our_state is not DONE or self.their_state is not DONE:
            raise LocalProtocolError("not in a reusable state")
        self.our_state = self.their_state = IDLE
        self._method = None
        self._keep_alive = True
        self.they_are_waiting_for_100_continue = False
