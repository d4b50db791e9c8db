"""Raw bidirectional copying for hijacked streams (attach, exec start, run -it).

Once the engine has answered ``101 UPGRADED`` (or, for old clients, ``200``
with a raw-stream content type), the connection carries no more HTTP: bytes
are copied both ways as they come, and the end of each direction is passed
on as a half-close, so ``echo x | docker run -i busybox cat`` ends the
container's stdin and still gets its output back.
"""

from __future__ import annotations

import asyncio

from ._streams import Stream, StreamClosed


async def _pipe(src: Stream, dst: Stream, first: bytes, counts: list[int], i: int) -> None:
    """Copy ``first`` then ``src`` to ``dst`` until EOF, then half-close ``dst``."""
    if first:
        dst.write(first)
        counts[i] += len(first)
        await dst.drain()
    while True:
        data = await src.recv()
        if not data:
            break
        dst.write(data)
        counts[i] += len(data)
        await dst.drain()
    dst.write_eof()


async def splice(client: Stream, engine: Stream, client_first: bytes = b"",
                 engine_first: bytes = b"") -> tuple[int, int]:
    """Copy ``client`` <-> ``engine`` until both directions have ended.

    ``client_first`` / ``engine_first`` are bytes already read from either
    side (what the HTTP parsers held after the response head).  Returns the
    byte counts ``(client to engine, engine to client)``.  A reset in either
    direction ends both, except a failure to pass the client's input on to
    an engine that is closing: its remaining output still goes to the
    client.  The caller closes or aborts the streams.  There is deliberately
    no idle timeout: an attached shell may be quiet for hours.
    """
    counts = [0, 0]
    up = asyncio.ensure_future(_pipe(client, engine, client_first, counts, 0))
    down = asyncio.ensure_future(_pipe(engine, client, engine_first, counts, 1))
    try:
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is None:
                    continue
                if t is up and isinstance(exc, StreamClosed) and not client.lost:
                    # the engine stopped taking input (it is closing): what it
                    # still has to say must reach the client all the same
                    continue
                raise exc
    finally:
        for t in (up, down):
            if not t.done():
                t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    return counts[0], counts[1]
