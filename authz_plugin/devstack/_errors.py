"""Errors of the local stack (under the one FDCS exception root)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FdcsError


class DevstackError(FdcsError):
    """The local stack cannot do what was asked; ``str(e)`` says what to do."""

    reason = "devstack"


class ComponentFailed(DevstackError):
    """A component did not come up (or a step of its set-up failed).

    The message always names the component and the log file to read, which is
    the contract of ``fdcs-devstack up`` (DEVSTACK.md).
    """

    def __init__(self, component: str, log: Path | str, detail: str):
        self.component = component
        self.log = Path(log)
        self.detail = detail
        super().__init__(f"{component} did not come up: {detail}; see {log}")


class Aborted(DevstackError):
    """Another step of the same ``up`` failed first; this one gave up waiting."""
