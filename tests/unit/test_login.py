"""fdcs-login against the fake Keystone over real HTTP."""

from __future__ import annotations

import configparser
import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authz_plugin import login
from authz_plugin.errors import AuthenticationError, FdcsError, IdentityUnavailable
from tests.fakes import FakeKeystone

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ks():
    with FakeKeystone() as fake:
        fake.demo = fake.add_project("demo")
        fake.other = fake.add_project("other")
        fake.alice = fake.add_user("alice", password="wonderland")
        fake.assign(fake.alice, fake.demo, "member")
        fake.assign(fake.alice, fake.other, "reader")
        yield fake


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No OS_* or DOCKER_CONFIG from the machine, and a HOME of our own."""
    for var in list(os.environ):
        if var.startswith("OS_") or var in ("DOCKER_CONFIG", "DOCKER_CERT_PATH"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def env(monkeypatch, ks):
    """An openrc for alice on demo, without the password."""
    for k, v in {"OS_AUTH_URL": ks.url, "OS_USERNAME": "alice", "OS_PROJECT_NAME": "demo",
                 "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default"}.items():
        monkeypatch.setenv(k, v)


def stdin(monkeypatch, text, tty=False):
    s = io.StringIO(text)
    s.isatty = lambda: tty
    monkeypatch.setattr(sys, "stdin", s)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def headers(config_dir):
    return json.loads((Path(config_dir) / "config.json").read_text())["HttpHeaders"]


def token_project(ks, token):
    t = ks.tokens[token]
    return t.project_id


# -- password_token / app_credential_token ------------------------------------------------

def test_password_token_returns_token_project_and_expiry(ks):
    token, project_id, expires_at = login.password_token(ks.url, "alice", "wonderland", "demo")
    assert project_id == ks.demo and token_project(ks, token) == ks.demo
    assert expires_at == pytest.approx(time.time() + ks.token_ttl, abs=30)


def test_password_token_positional_domains_and_project_id(ks):
    token, pid, _ = login.password_token(ks.url, "alice", "wonderland", "other", "Default", "Default")
    assert pid == ks.other
    token, pid, _ = login.password_token(ks.url, "alice", "wonderland", project_id=ks.demo)
    assert pid == ks.demo


def test_auth_url_without_v3_suffix_works(ks):
    base = ks.url.removesuffix("/v3")
    assert login.password_token(base, "alice", "wonderland", "demo")[1] == ks.demo


@pytest.mark.parametrize("user, password", [("alice", "looking-glass"), ("bob", "wonderland")])
def test_wrong_user_or_password_is_reported_as_such(ks, user, password):
    with pytest.raises(AuthenticationError, match="wrong user name or password") as e:
        login.password_token(ks.url, user, password, "demo")
    assert password not in str(e.value)
    assert login.password_token(ks.url, "alice", "wonderland", "demo")[1] == ks.demo


def test_unknown_project_is_reported_with_the_users_projects(ks):
    with pytest.raises(AuthenticationError) as e:
        login.password_token(ks.url, "alice", "wonderland", "nope")
    msg = str(e.value)
    assert "project nope" in msg and "no role" in msg and "wrong" not in msg
    assert f"demo ({ks.demo})" in msg and f"other ({ks.other})" in msg


def test_keystone_unreachable_is_reported():
    with pytest.raises(IdentityUnavailable, match=r"cannot reach Keystone .* \(connection refused\)"):
        login.password_token(f"http://127.0.0.1:{closed_port()}/v3", "alice", "pw", "demo")


def test_keystone_failing_is_reported(ks):
    ks.fail = 503
    with pytest.raises(IdentityUnavailable, match="503"):
        login.password_token(ks.url, "alice", "wonderland", "demo")


def test_application_credential_by_id_and_by_name(ks):
    cred = ks.add_app_credential(ks.alice, ks.demo, name="ci", secret="s3cret")
    token, pid, _ = login.app_credential_token(ks.url, "s3cret", credential_id=cred)
    assert pid == ks.demo and token_project(ks, token) == ks.demo
    token, pid, _ = login.app_credential_token(ks.url, "s3cret", credential_name="ci",
                                               username="alice")
    assert pid == ks.demo
    with pytest.raises(AuthenticationError, match="wrong secret"):
        login.app_credential_token(ks.url, "nope", credential_id=cred)


# -- write_docker_config ----------------------------------------------------------------------

def test_write_docker_config_creates_a_private_file(tmp_path):
    d = tmp_path / "new" / "dir"
    path = login.write_docker_config(str(d), "tok", "proj")
    assert path == str(d / "config.json")
    assert headers(d) == {"X-Auth-Token": "tok", "X-Auth-TenantId": "proj"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_write_docker_config_keeps_every_other_key(tmp_path):
    existing = {"auths": {"https://index.docker.io/v1/": {"auth": "xyz"}},
                "credsStore": "pass", "detachKeys": "ctrl-e,e",
                "HttpHeaders": {"User-Agent": "me", "x-auth-token": "old", "X-AUTH-TENANTID": "old"}}
    (tmp_path / "config.json").write_text(json.dumps(existing))
    (tmp_path / "config.json").chmod(0o644)
    login.write_docker_config(str(tmp_path), "tok", "proj")
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["auths"] == existing["auths"] and doc["credsStore"] == "pass"
    assert doc["detachKeys"] == "ctrl-e,e"
    assert doc["HttpHeaders"] == {"User-Agent": "me", "X-Auth-Token": "tok", "X-Auth-TenantId": "proj"}
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp file left


def test_write_docker_config_writes_through_a_symlink(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").symlink_to(real)
    login.write_docker_config(str(tmp_path / "d"), "tok", "proj")
    assert (tmp_path / "d" / "config.json").is_symlink()
    assert json.loads(real.read_text())["HttpHeaders"]["X-Auth-Token"] == "tok"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"HttpHeaders": "x"}'])
def test_write_docker_config_leaves_a_broken_file_alone(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(FdcsError, match="fix or remove it"):
        login.write_docker_config(str(tmp_path), "tok", "proj")
    assert (tmp_path / "config.json").read_text() == content
    (tmp_path / "config.json").write_text("")          # control: empty is fine
    login.write_docker_config(str(tmp_path), "tok", "proj")
    assert headers(tmp_path)["X-Auth-Token"] == "tok"


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "ca.key"),
                    "-out", str(d / "ca.crt"), "-days", "1", "-subj", "/CN=test-ca"],
                   check=True, capture_output=True)
    return d / "ca.crt"


def openssl(*args):
    return subprocess.run(["openssl", *args], check=True, capture_output=True, text=True).stdout


def test_ca_option_installs_ca_and_a_client_pair(tmp_path, ca_pem):
    login.write_docker_config(str(tmp_path), "tok", "proj", ca_file=str(ca_pem))
    assert (tmp_path / "ca.pem").read_bytes() == ca_pem.read_bytes()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "CN = fdcs-client" in openssl("x509", "-in", str(cert), "-noout", "-subject")
    # the key belongs to the certificate
    assert openssl("pkey", "-in", str(key), "-pubout") == openssl("x509", "-in", str(cert), "-noout", "-pubkey")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "cert.pem", "config.json", "key.pem"]


def test_ca_option_keeps_an_existing_client_pair(tmp_path, ca_pem):
    login.write_docker_config(str(tmp_path), "tok", "proj", ca_file=str(ca_pem))
    before = (tmp_path / "key.pem").read_bytes(), (tmp_path / "cert.pem").read_bytes()
    login.write_docker_config(str(tmp_path), "tok2", "proj", ca_file=str(ca_pem))
    assert ((tmp_path / "key.pem").read_bytes(), (tmp_path / "cert.pem").read_bytes()) == before


def test_ca_option_refuses_a_file_that_is_not_a_certificate(tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("hello")
    with pytest.raises(FdcsError, match="not a PEM certificate"):
        login.write_docker_config(str(tmp_path / "d"), "tok", "proj", ca_file=str(bogus))
    assert not (tmp_path / "d" / "config.json").exists()


# -- the command ------------------------------------------------------------------------------

def test_login_with_password_from_stdin(ks, env, monkeypatch, tmp_path, capsys):
    stdin(monkeypatch, "wonderland\n")
    d = tmp_path / "fdcs"
    assert login.main(["--config", str(d), "--password-stdin"]) == 0
    out = capsys.readouterr().out
    h = headers(d)
    assert h["X-Auth-TenantId"] == ks.demo and token_project(ks, h["X-Auth-Token"]) == ks.demo
    assert "demo" in out and ks.demo in out and "expires" in out and "in 59 min" in out
    assert h["X-Auth-Token"] not in out and "wonderland" not in out


def test_password_from_os_password(ks, env, monkeypatch, tmp_path):
    monkeypatch.setenv("OS_PASSWORD", "wonderland")
    stdin(monkeypatch, "")
    assert login.main(["--config", str(tmp_path)]) == 0
    assert headers(tmp_path)["X-Auth-TenantId"] == ks.demo


def test_password_from_a_prompt_on_a_terminal(ks, env, monkeypatch, tmp_path):
    stdin(monkeypatch, "", tty=True)
    asked = []
    monkeypatch.setattr(login.getpass, "getpass", lambda prompt: asked.append(prompt) or "wonderland")
    assert login.main(["--config", str(tmp_path)]) == 0
    assert asked == ["Password: "]


def test_no_password_anywhere_is_an_error(ks, env, monkeypatch, tmp_path, capsys):
    stdin(monkeypatch, "", tty=False)
    assert login.main(["--config", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--password-stdin" in err and "Traceback" not in err
    assert not (tmp_path / "config.json").exists()


def test_password_is_never_taken_from_the_command_line(ks, env, tmp_path):
    for argv in (["--password", "wonderland"], ["--password=wonderland"], ["--os-password", "x"]):
        with pytest.raises(SystemExit) as e:
            login.main(["--config", str(tmp_path), *argv])
        assert e.value.code == 2
    assert not (tmp_path / "config.json").exists()


def test_flags_override_environment(ks, env, monkeypatch, tmp_path):
    monkeypatch.setenv("OS_AUTH_URL", f"http://127.0.0.1:{closed_port()}/v3")
    monkeypatch.setenv("OS_PROJECT_NAME", "nope")
    stdin(monkeypatch, "wonderland")
    assert login.main(["--config", str(tmp_path), "--password-stdin", "--os-auth-url", ks.url,
                       "--os-project-name", "other"]) == 0
    assert headers(tmp_path)["X-Auth-TenantId"] == ks.other


def test_docker_config_variable_picks_the_directory(ks, env, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    monkeypatch.setenv("OS_PASSWORD", "wonderland")
    assert login.main([]) == 0
    assert headers(tmp_path / "dc")["X-Auth-TenantId"] == ks.demo


def test_default_directory_is_home_docker_with_a_warning(ks, env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OS_PASSWORD", "wonderland")
    assert login.main([]) == 0
    assert headers(tmp_path / "home" / ".docker")["X-Auth-TenantId"] == ks.demo
    assert "every daemon" in capsys.readouterr().out


def test_login_with_application_credential(ks, monkeypatch, tmp_path):
    cred = ks.add_app_credential(ks.alice, ks.other, secret="s3cret")
    monkeypatch.setenv("OS_AUTH_URL", ks.url)
    monkeypatch.setenv("OS_APPLICATION_CREDENTIAL_ID", cred)
    stdin(monkeypatch, "s3cret\n")
    assert login.main(["--config", str(tmp_path), "--password-stdin"]) == 0
    assert headers(tmp_path)["X-Auth-TenantId"] == ks.other


@pytest.mark.parametrize("case, expect", [
    ("wrong-password", "wrong user name or password"),
    ("unknown-project", "does not exist or alice has no role"),
    ("unreachable", "cannot reach Keystone"),
    ("no-url", "OS_AUTH_URL"),
])
def test_errors_exit_1_with_one_clear_line(ks, env, monkeypatch, tmp_path, capsys, case, expect):
    monkeypatch.setenv("OS_PASSWORD", "wrong" if case == "wrong-password" else "wonderland")
    if case == "unknown-project":
        monkeypatch.setenv("OS_PROJECT_NAME", "nope")
    if case == "unreachable":
        monkeypatch.setenv("OS_AUTH_URL", f"http://127.0.0.1:{closed_port()}/v3")
    if case == "no-url":
        monkeypatch.delenv("OS_AUTH_URL")
    assert login.main(["--config", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fdcs-login: ") and expect in err
    assert "Traceback" not in err and err.count("\n") == 1 and "wonderland" not in err
    assert not (tmp_path / "config.json").exists()


def test_check_reports_validity_and_remaining_time(ks, env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OS_PASSWORD", "wonderland")
    assert login.main(["--config", str(tmp_path)]) == 0
    capsys.readouterr()
    assert login.main(["--config", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and ks.demo in out and "in 59 min" in out
    ks.revoke(headers(tmp_path)["X-Auth-Token"])
    assert login.main(["--config", str(tmp_path), "--check"]) == 1
    assert "invalid or expired" in capsys.readouterr().err


def test_check_refuses_a_tenant_header_of_another_project(ks, env, monkeypatch, tmp_path, capsys):
    login.write_docker_config(str(tmp_path), ks.issue(ks.alice, ks.demo), ks.other)
    assert login.main(["--config", str(tmp_path), "--check"]) == 1
    assert "does not match" in capsys.readouterr().err
    login.write_docker_config(str(tmp_path), ks.issue(ks.alice, ks.demo), ks.demo)
    assert login.main(["--config", str(tmp_path), "--check"]) == 0


def test_check_without_a_stored_token(ks, env, tmp_path, capsys):
    assert login.main(["--config", str(tmp_path), "--check"]) == 1
    assert "no X-Auth-Token" in capsys.readouterr().err


def test_check_while_keystone_is_down_is_an_error_not_a_verdict(ks, env, tmp_path, capsys):
    login.write_docker_config(str(tmp_path), ks.issue(ks.alice, ks.demo), ks.demo)
    ks.fail = 503
    assert login.main(["--config", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "unavailable" in err and "invalid" not in err


def test_login_with_ca_prints_the_docker_variables(ks, env, monkeypatch, tmp_path, ca_pem, capsys):
    monkeypatch.setenv("OS_PASSWORD", "wonderland")
    assert login.main(["--config", str(tmp_path), "--ca", str(ca_pem)]) == 0
    assert f"DOCKER_CERT_PATH={tmp_path}" in capsys.readouterr().out
    assert (tmp_path / "key.pem").exists() and (tmp_path / "ca.pem").exists()


def test_console_script_is_declared_and_loads():
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   cp["options.entry_points"]["console_scripts"].strip().splitlines())
    module, func = scripts["fdcs-login"].split(":")
    assert module == "authz_plugin.login" and callable(getattr(login, func))
    proc = subprocess.run([sys.executable, "-c", "import sys; from authz_plugin.login import main; "
                           "sys.exit(main(['--help']))"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--password-stdin" in proc.stdout
