"""What the plugin remembers about tokens, and how often it may ask about new ones.

* :class:`TokenCache` -- validated identities (bounded, TTL per entry =
  ``min(cache_ttl, expires_at - now)``) and, apart from them, refusals
  (bounded, ``negative_ttl``).  Keys are :func:`cache_key` digests: a token is
  never stored, not even as a key.  Keeping refusals in their own cache means
  a flood of garbage tokens can evict other garbage, never a valid identity.
* :class:`RejectLimiter` -- token buckets (one per client source, one global)
  that bound how many Keystone look-ups invalid tokens can cause.

Failures to reach Keystone are not stored anywhere here, by design.
Both classes are thread-safe.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import TYPE_CHECKING, Callable, Union

import cachetools

if TYPE_CHECKING:
    from . import Identity

Clock = Callable[[], float]


def cache_key(token: str, tenant: str) -> str:
    """SHA-256 hex of ``token + "\\0" + tenant``: the identity depends on both."""
    return hashlib.sha256(f"{token}\0{tenant}".encode("utf-8", "surrogatepass")).hexdigest()


def token_handle(token: str) -> str:
    """A log-safe handle for a token: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8]


class TLRU:
    """A bounded map whose entries each live until a time of their own:
    what ``cachetools.TLRUCache`` does for :class:`TokenCache`, with a hit
    in one call (``TLRUCache.get`` takes about ten, under the cache's lock
    on every request; a differential test holds the two equal).

    ``ttu(key, value, now)`` gives an entry's end when it is stored; an
    entry at or past its end is never returned, and one that ends before it
    is stored is not stored (any older value for its key goes).  Beyond
    ``maxsize`` entries, the ended ones go first, then the least recently
    used.  Not thread-safe (the cache's lock covers it)."""

    __slots__ = ("maxsize", "_ttu", "_timer", "_d")

    def __init__(self, maxsize: int, ttu: Callable[[str, object, float], float], timer: Clock):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._ttu = ttu
        self._timer = timer
        self._d: collections.OrderedDict[str, tuple[object, float]] = collections.OrderedDict()

    def get(self, key: str, default=None):
        e = self._d.get(key)
        if e is None:
            return default
        if self._timer() < e[1]:
            self._d.move_to_end(key)
            return e[0]
        del self._d[key]
        return default

    def __setitem__(self, key: str, value) -> None:
        now = self._timer()
        expires = self._ttu(key, value, now)
        d = self._d
        if not now < expires:
            d.pop(key, None)
            return
        d[key] = (value, expires)
        d.move_to_end(key)
        if len(d) > self.maxsize:
            for k in [k for k, (_, end) in d.items() if not now < end]:
                del d[k]
            while len(d) > self.maxsize:
                d.popitem(last=False)

    def pop(self, key: str, default=None):
        e = self._d.pop(key, None)
        return default if e is None or not self._timer() < e[1] else e[0]

    def keys(self):
        """The keys stored, ended entries included (tests)."""
        return self._d.keys()

    def __len__(self) -> int:
        now = self._timer()
        return sum(1 for _, end in self._d.values() if now < end)


class TokenCache:
    """Identities and refusals by :func:`cache_key`.

    :meth:`get` returns the cached :class:`Identity`, the cached refusal
    message (``str``), or ``None``.  It does not judge expiry: the caller
    checks ``expires_at`` on every hit, whatever this cache's TTL did.
    """

    def __init__(self, maxsize: int, ttl: float, negative_ttl: float, clock: Clock):
        self._ttl = ttl
        self._ok = TLRU(maxsize, self._ttu, clock)
        self._refused = (cachetools.TTLCache(maxsize, negative_ttl, timer=clock)
                         if negative_ttl > 0 else None)
        self._lock = threading.Lock()

    def _ttu(self, _key: str, ident: "Identity", now: float) -> float:
        return now + min(self._ttl, ident.expires_at - now)

    def get(self, key: str) -> Union["Identity", str, None]:
        with self._lock:
            ident = self._ok.get(key)
            if ident is not None:
                return ident
            return self._refused.get(key) if self._refused is not None else None

    def put(self, key: str, ident: "Identity") -> None:
        with self._lock:
            if self._refused is not None:
                self._refused.pop(key, None)
            # TLRU drops an entry whose TTL is already <= 0 by itself.
            self._ok[key] = ident

    def put_refusal(self, key: str, message: str) -> None:
        """Remember a refusal *Keystone* gave (never an outage)."""
        if self._refused is None:
            return
        with self._lock:
            self._ok.pop(key, None)
            self._refused[key] = message

    def evict(self, key: str) -> None:
        with self._lock:
            self._ok.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ok)


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float):
        self.level = level
        self.stamp = stamp


class RejectLimiter:
    """Token buckets bounding Keystone look-ups of tokens not in the cache.

    Each look-up reserves one unit from the source's bucket and one from the
    global bucket (:meth:`try_acquire`); a look-up that did *not* end in a
    refusal gives them back (:meth:`refund`).  So in the long run only
    refusals are charged: valid tokens never exhaust a bucket, and invalid
    ones cost Keystone at most ``rate``/s per source (burst ``4 * rate``) and
    ``GLOBAL_FACTOR * rate``/s overall.  Reserving before the call (rather
    than charging after) also bounds concurrent look-ups of garbage.

    ``rate <= 0`` disables the limiter.  Per-source buckets live in an LRU of
    ``max_sources`` entries so that spoofed sources cannot grow memory.
    """

    BURST_FACTOR = 4
    #: the global bucket allows this many sources' worth of refusals
    GLOBAL_FACTOR = 10

    def __init__(self, rate: float, clock: Clock, max_sources: int = 10000):
        self._rate = rate
        self._clock = clock
        # at least one whole look-up, or a small rate would refuse every new token
        self._cap = max(1.0, rate * self.BURST_FACTOR)
        self._gcap = self._cap * self.GLOBAL_FACTOR
        self._grate = rate * self.GLOBAL_FACTOR
        self._sources: cachetools.LRUCache = cachetools.LRUCache(max_sources)
        self._global = _Bucket(self._gcap, clock())
        self._lock = threading.Lock()

    @staticmethod
    def _refill(b: _Bucket, rate: float, cap: float, now: float) -> None:
        if now > b.stamp:
            b.level = min(cap, b.level + (now - b.stamp) * rate)
        b.stamp = now

    def _buckets(self, source: str, now: float) -> tuple[_Bucket, _Bucket]:
        b = self._sources.get(source)
        if b is None:
            b = self._sources[source] = _Bucket(self._cap, now)
        self._refill(b, self._rate, self._cap, now)
        self._refill(self._global, self._grate, self._gcap, now)
        return b, self._global

    def try_acquire(self, source: str) -> bool:
        """Reserve one look-up for ``source``; False: refuse without asking Keystone."""
        if self._rate <= 0:
            return True
        with self._lock:
            b, g = self._buckets(source, self._clock())
            if b.level < 1 or g.level < 1:
                return False
            b.level -= 1
            g.level -= 1
            return True

    def refund(self, source: str) -> None:
        """Give back a reservation whose look-up was not a refusal."""
        if self._rate <= 0:
            return
        with self._lock:
            b, g = self._buckets(source, self._clock())
            b.level = min(self._cap, b.level + 1)
            g.level = min(self._gcap, g.level + 1)
