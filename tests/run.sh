#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: installs what
# is missing (.ci/install-deps), then runs the unit tests and the end-to-end
# tests against the real local stack (dockerd, Redis, Keystone).  Extra
# arguments go to pytest.  Exits non-zero on any failure, including "no
# tests ran".
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps
echo "== running the tests"
exec ${PYTHON:-python3} -m pytest -ra -p no:cacheprovider "$@" tests
