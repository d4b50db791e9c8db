"""The security corpus runs against the same kind of real local stack as
the end-to-end tests (its own session stack, so that an attack that does
damage cannot disturb the other suites): the fixtures are the e2e ones."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Cli, Raw, Stack, client_env, scoper, stack, wait_for  # noqa: F401  (fixtures)


def pytest_collection_modifyitems(items):
    for item in items:
        if "/security/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
