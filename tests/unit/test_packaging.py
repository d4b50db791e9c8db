"""Packaging and units are code: console scripts load, units verify."""

import configparser
import importlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _console_scripts():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return [tuple(part.strip() for part in line.split("=")) for line in lines]


@pytest.mark.parametrize("name,target", _console_scripts())
def test_console_scripts_load(name, target):
    module, _, func = target.partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert shutil.which(name), f"{name} is not installed on PATH"


def test_pyproject_names_the_setuptools_backend():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'build-backend = "setuptools.build_meta"' in text


def test_plugin_manifest_is_an_authz_plugin():
    manifest = json.loads((ROOT / "plugin-config.json").read_text())
    assert manifest["interface"]["types"] == ["docker.authz/1.0"]
    assert manifest["interface"]["socket"].endswith(".sock")
    assert manifest["entrypoint"][0].endswith("fdcs-authz")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_units_verify():
    bindir = os.path.dirname(shutil.which("fdcs-authz"))
    with tempfile.TemporaryDirectory() as d:
        units = []
        for src in [*(ROOT / "systemd").glob("*.service"), *(ROOT / "systemd").glob("*.socket")]:
            text = src.read_text().replace("/usr/local/bin/", bindir + "/")
            (Path(d) / src.name).write_text(text)
            units.append(str(Path(d) / src.name))
        p = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True,
                           env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
        problems = [l for l in (p.stdout + p.stderr).splitlines()
                    if "fdcs" in l and "docker.service" not in l]
        assert p.returncode == 0 and not problems, p.stdout + p.stderr


def test_systemd_units_verify_catches_a_broken_unit():
    """Positive control for the check above: a typo is reported."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    with tempfile.TemporaryDirectory() as d:
        bad = Path(d) / "fdcs-bad.service"
        bad.write_text("[Service]\nExecStart=/nonexistent/fdcs-bad\nTyp=notify\n")
        p = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
        assert "fdcs-bad" in p.stdout + p.stderr


def test_docker_drop_in_adds_the_plugin():
    text = (ROOT / "systemd" / "docker.service.d" / "fdcs-authz.conf").read_text()
    assert "--authorization-plugin=fdcs-authz" in text and "ExecStart=\n" in text
