"""Fakes at the I/O boundary for unit tests (style: fakes, never mocks of our own code)."""

from __future__ import annotations

import threading

from .keystone import FakeKeystone

__all__ = ["FakeClock", "FakeKeystone"]


class FakeClock:
    """An epoch clock that moves only when told: ``clock()``, ``clock.advance(s)``."""

    def __init__(self, start: float = 1_900_000_000.0):
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
