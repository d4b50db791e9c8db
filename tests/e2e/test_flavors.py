"""Flavors enforced, on a one-host stack of their own (the session stack
runs with flavors defined but not required): ``fdcs.local.toml`` in its
state dir sets ``quota.flavor_required`` and ``quota.default_flavor``.

The stack's flavors: small (256 MiB, 0.5 CPUs), medium (512 MiB, 1 CPU),
large (1 GiB, 2 CPUs).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from .conftest import Raw, Stack

MiB = 1024**2
T = "org.fiware.fdcs.tenant"


@pytest.fixture(scope="module")
def flavored():
    if os.geteuid() != 0:
        pytest.skip("the real stack needs root")
    d = Path(tempfile.mkdtemp(prefix="fdcs-flavors-", dir="/tmp"))
    (d / "fdcs.local.toml").write_text('[quota]\nflavor_required = true\ndefault_flavor = "small"\n')
    s = Stack(d)
    try:
        s.up(hosts=1)
        if not s.env["FDCS_DOCKER_HOST"].startswith("tcp://"):
            pytest.skip("fdcs-name-scoper is not installed")
        yield s
    finally:
        s.cmd("down", check=False)


def sizes(cli, ref):
    return cli("inspect", "-f", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}", ref).stdout.split()


def test_a_container_without_a_size_gets_the_default_flavor(flavored):
    alice = flavored.scoper_cli("FDCS_CONFIG_A1")
    c = alice("create", "busybox", "true").stdout.strip()
    try:
        assert sizes(alice, c) == [str(256 * MiB), str(500_000_000)]
    finally:
        alice("rm", c)


def test_a_size_that_is_not_a_flavor_is_refused_with_the_list(flavored):
    alice = flavored.scoper_cli("FDCS_CONFIG_A1")
    err = alice.fails("create", "-m", "300m", "busybox", "true", match="is not one of this service's flavors")
    assert "small (256 MiB, 0.5 CPUs), medium (512 MiB, 1 CPUs), large (1 GiB, 2 CPUs)" in err
    alice.fails("create", "-m", "512m", "--cpus", "2", "busybox", "true", match="flavors")
    c = alice("create", "-m", "512m", "--cpus", "1", "busybox", "true").stdout.strip()  # medium
    try:
        assert sizes(alice, c) == [str(512 * MiB), str(1_000_000_000)]
        alice.fails("update", "--memory", "300m", c, match="flavors")
        alice("update", "--memory", "1g", "--memory-swap", "2g", "--cpus", "2", c)  # large
        assert sizes(alice, c) == [str(1024 * MiB), str(2_000_000_000)]
    finally:
        alice("rm", c)


def test_plugin_only_mode_refuses_what_the_scoper_would_have_sized(flavored):
    cfg = json.loads((Path(flavored.env["FDCS_CONFIG_A1"]) / "config.json").read_text())
    raw = Raw(flavored.env["FDCS_ENGINE_HOSTS"].split()[0].removeprefix("unix://"), cfg["HttpHeaders"])
    tenant = flavored.env["FDCS_TENANT_A"]
    body = {"Image": "busybox", "Cmd": ["true"], "Labels": {T: tenant},
            "HostConfig": {"NetworkMode": "none", "PidsLimit": 10, "CgroupnsMode": "private"}}
    status, out = raw.request("POST", "/v1.41/containers/create", body)
    assert status == 403 and b"flavors" in out, out
    body["HostConfig"].update(Memory=256 * MiB, NanoCpus=500_000_000)
    status, out = raw.request("POST", "/v1.41/containers/create", body)
    assert status == 201, out
    cid = json.loads(out)["Id"]
    status, _ = raw.request("DELETE", f"/v1.41/containers/{cid}")
    assert status == 204
