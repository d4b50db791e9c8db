"""``fdcs-login``: get a Keystone token and put it where the docker CLI sends it.

The token (by password, or by Keystone application credential) and its
project id go into ``HttpHeaders`` (``X-Auth-Token``, ``X-Auth-TenantId``)
of the docker ``config.json`` in ``--config DIR``, ``$DOCKER_CONFIG`` or
``~/.docker``; every other key of that file is kept.  The docker CLI,
docker-py and docker-compose then send both headers with every request.

Settings come from the OpenStack CLI's variables (``OS_AUTH_URL``,
``OS_USERNAME``, ``OS_PROJECT_NAME``...), a flag overriding its variable.
A password or application-credential secret is read from
``--password-stdin``, else ``OS_PASSWORD`` / ``OS_APPLICATION_CREDENTIAL_SECRET``,
else a terminal prompt; never from the command line, where other users of
the host could read it.

The docker CLI sends ``HttpHeaders`` to every daemon it talks to with that
configuration, so a configuration directory used only for FDCS is
recommended (``--config ~/.fdcs``, then ``DOCKER_CONFIG=~/.fdcs``).

Reusable pieces: :func:`password_token`, :func:`app_credential_token`,
:func:`write_docker_config`, :func:`check_token`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping

from keystoneauth1 import exceptions as ksa_exc
from keystoneauth1.identity import v3

from .errors import AuthenticationError, ConfigError, FdcsError, IdentityUnavailable
from .identity._keystone import KeystoneClient, default_session

DEFAULT_TIMEOUT = 10.0
TOKEN_HEADER = "X-Auth-Token"
TENANT_HEADER = "X-Auth-TenantId"


@dataclasses.dataclass(frozen=True)
class Login:
    """A token obtained from Keystone (``expires_at`` in epoch seconds)."""

    token: str
    project_id: str
    project_name: str
    user_name: str
    expires_at: float


def v3_url(auth_url: str) -> str:
    """``OS_AUTH_URL`` with or without the ``/v3`` suffix -> the v3 endpoint."""
    url = auth_url.rstrip("/")
    return url if url.endswith("/v3") else url + "/v3"


def _why(e: ksa_exc.ConnectionError) -> str:
    """A short cause for a user: keystoneauth1's messages nest three libraries deep."""
    if isinstance(e, ksa_exc.ConnectTimeout):
        return "timed out"
    if isinstance(e, ksa_exc.SSLError):
        return "TLS error; check --os-cacert"
    text = str(e)
    for marker, why in (("Connection refused", "connection refused"),
                        ("Name or service not known", "unknown host"),
                        ("No route to host", "no route to host")):
        if marker in text:
            return why
    return "connection failed"


class _Refused(AuthenticationError):
    """Keystone answered 401 to an authentication request."""


def _get_access(auth: v3.Auth, auth_url: str, ca_file: str | None, timeout: float):
    """Authenticate with ``auth``; keystoneauth1 errors become FdcsErrors."""
    try:
        return auth.get_access(default_session(ca_file or "", timeout))
    except ksa_exc.Unauthorized as e:
        raise _Refused("Keystone refused the credentials") from e
    except ksa_exc.ConnectionError as e:
        raise IdentityUnavailable(f"cannot reach Keystone at {auth_url} ({_why(e)})") from e
    except ksa_exc.NotFound as e:
        raise ConfigError(f"no Keystone v3 identity API at {auth_url} (check OS_AUTH_URL)") from e
    except ksa_exc.HttpError as e:
        if e.http_status and e.http_status >= 500:
            raise IdentityUnavailable(f"Keystone at {auth_url} answered HTTP {e.http_status}; "
                                      "retry later") from e
        raise AuthenticationError(f"Keystone refused the request: HTTP {e.http_status}") from e
    except ksa_exc.ClientException as e:
        raise IdentityUnavailable(f"unexpected answer from Keystone at {auth_url}: {e}") from e


def _access(auth: v3.Auth, auth_url: str, ca_file: str | None, timeout: float) -> Login:
    access = _get_access(auth, auth_url, ca_file, timeout)
    if not access.project_id:
        raise AuthenticationError("Keystone issued a token that is not scoped to a project")
    return Login(token=access.auth_token, project_id=access.project_id,
                 project_name=access.project_name or "", user_name=access.username or "",
                 expires_at=access.expires.timestamp())


def _user_args(username: str | None, user_id: str | None, user_domain: str | None,
               user_domain_id: str | None) -> dict[str, Any]:
    if user_id:
        return {"user_id": user_id}
    if user_domain_id:
        return {"username": username, "user_domain_id": user_domain_id}
    return {"username": username, "user_domain_name": user_domain or "Default"}


def password_login(auth_url: str, password: str, *, username: str | None = None,
                   user_id: str | None = None, project_name: str | None = None,
                   project_id: str | None = None, user_domain: str | None = "Default",
                   user_domain_id: str | None = None, project_domain: str | None = "Default",
                   project_domain_id: str | None = None, ca_file: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> Login:
    """A project-scoped token by password.

    On refusal, tells a wrong password from a project the user cannot use
    (Keystone answers 401 to both) by asking for an unscoped token, and then
    lists the projects the user may use.

    :raises AuthenticationError: wrong user/password, or unknown project.
    :raises IdentityUnavailable: Keystone unreachable or failing.
    """
    if not (username or user_id):
        raise ConfigError("no user: set OS_USERNAME (or --os-username)")
    if not (project_name or project_id):
        raise ConfigError("no project: set OS_PROJECT_NAME or OS_PROJECT_ID (or --os-project-name)")
    user = _user_args(username, user_id, user_domain, user_domain_id)
    if project_id:
        scope: dict[str, Any] = {"project_id": project_id}
        wanted = f"project id {project_id}"
    elif project_domain_id:
        scope = {"project_name": project_name, "project_domain_id": project_domain_id}
        wanted = f"project {project_name} (domain id {project_domain_id})"
    else:
        scope = {"project_name": project_name, "project_domain_name": project_domain or "Default"}
        wanted = f"project {project_name} (domain {project_domain or 'Default'})"
    auth_url = v3_url(auth_url)
    try:
        return _access(v3.Password(auth_url, password=password, include_catalog=False,
                                   **user, **scope), auth_url, ca_file, timeout)
    except _Refused:
        pass
    who = user.get("username") or user.get("user_id")
    try:
        unscoped = _get_access(v3.Password(auth_url, password=password, unscoped=True,
                                           include_catalog=False, **user),
                               auth_url, ca_file, timeout).auth_token
    except _Refused:
        raise AuthenticationError(f"wrong user name or password for {who} "
                                  "(or wrong user domain)") from None
    client = KeystoneClient(auth_url, default_session(ca_file or "", timeout), timeout)
    try:
        projects = client.projects(unscoped)
    except FdcsError:
        projects = []
    mine = ", ".join(f"{p['name']} ({p['id']})" for p in projects) or "none"
    raise AuthenticationError(f"{wanted} does not exist or {who} has no role on it; "
                              f"{who}'s projects: {mine}")


def password_token(auth_url: str, username: str, password: str, project_name: str | None = None,
                   user_domain: str = "Default", project_domain: str = "Default", *,
                   project_id: str | None = None, ca_file: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> tuple[str, str, float]:
    """``(token, project_id, expires_at)`` for ``username`` on a project given
    by name (positional, in ``project_domain``) or by ``project_id=``.
    Domains are domain *names*.  Errors as :func:`password_login`."""
    got = password_login(auth_url, password, username=username, project_name=project_name,
                         project_id=project_id, user_domain=user_domain,
                         project_domain=project_domain, ca_file=ca_file, timeout=timeout)
    return got.token, got.project_id, got.expires_at


def app_credential_login(auth_url: str, secret: str, *, credential_id: str | None = None,
                         credential_name: str | None = None, username: str | None = None,
                         user_id: str | None = None, user_domain: str | None = "Default",
                         user_domain_id: str | None = None, ca_file: str | None = None,
                         timeout: float = DEFAULT_TIMEOUT) -> Login:
    """A token from a Keystone application credential (by id, or by name and
    user); it is scoped to the credential's project, which Keystone decides."""
    if not (credential_id or credential_name):
        raise ConfigError("no application credential: set OS_APPLICATION_CREDENTIAL_ID")
    kwargs: dict[str, Any] = {"application_credential_id": credential_id}
    if not credential_id:
        if not (username or user_id):
            raise ConfigError("an application credential given by name needs OS_USERNAME or OS_USER_ID")
        kwargs = {"application_credential_name": credential_name,
                  **_user_args(username, user_id, user_domain, user_domain_id)}
    auth_url = v3_url(auth_url)
    try:
        return _access(v3.ApplicationCredential(auth_url, application_credential_secret=secret,
                                                include_catalog=False, **kwargs),
                       auth_url, ca_file, timeout)
    except _Refused as e:
        raise AuthenticationError(f"{e}: unknown or expired application credential "
                                  f"{credential_id or credential_name}, or wrong secret") from None


def app_credential_token(auth_url: str, secret: str, **kwargs: Any) -> tuple[str, str, float]:
    """``(token, project_id, expires_at)``; arguments as :func:`app_credential_login`."""
    got = app_credential_login(auth_url, secret, **kwargs)
    return got.token, got.project_id, got.expires_at


# -- the docker configuration ---------------------------------------------------


def _owner(path: str) -> tuple[int, int] | None:
    """Who files written at ``path`` should belong to when we run as root
    (writing another user's directory, as the devstack helper does): the
    existing file's owner, else the directory's.  None: leave as created."""
    if os.geteuid() != 0:
        return None
    for p in (path, os.path.dirname(path)):
        try:
            st = os.stat(p)
            return st.st_uid, st.st_gid
        except FileNotFoundError:
            continue
    return None


def _atomic_write(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` by ``data`` all at once: a reader sees the old file or
    the new one, never a half-written one, and never a mode wider than ``mode``."""
    owner = _owner(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _install_tls(config_dir: str, ca_file: str) -> None:
    """``ca.pem`` from ``ca_file``, plus a throwaway self-signed client pair
    ``cert.pem`` / ``key.pem`` (the docker CLI and docker-py want all three in
    ``DOCKER_CERT_PATH``; FDCS authenticates by token, not by certificate).
    An existing pair is kept: it may be a real client certificate."""
    try:
        with open(ca_file, "rb") as f:
            ca = f.read()
    except OSError as e:
        raise FdcsError(f"cannot read the CA file {ca_file}: {e.strerror}") from e
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise FdcsError(f"{ca_file} is not a PEM certificate")
    _atomic_write(os.path.join(config_dir, "ca.pem"), ca, 0o644)
    cert, key = os.path.join(config_dir, "cert.pem"), os.path.join(config_dir, "key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        return
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FdcsError("the openssl command is needed to create the client key pair (--ca)")
    owner = _owner(os.path.join(config_dir, "key.pem"))
    # mkdtemp is 0700: the key is never readable by others, even before chmod.
    with tempfile.TemporaryDirectory(prefix=".fdcs-tls.", dir=config_dir) as tmp:
        tkey, tcert = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
        proc = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", tkey, "-out", tcert, "-days", "3650", "-subj", "/CN=fdcs-client"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise FdcsError(f"openssl could not create the client key pair: {proc.stderr.strip()}")
        os.chmod(tkey, 0o600)
        os.chmod(tcert, 0o644)
        if owner is not None:
            os.chown(tkey, *owner)
            os.chown(tcert, *owner)
        os.replace(tkey, key)
        os.replace(tcert, cert)


def config_path(config_dir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(config_dir)), "config.json")


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise FdcsError(f"cannot read {path}: {e.strerror}") from e
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise FdcsError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("HttpHeaders", {}), dict):
        raise FdcsError(f"{path} is not a docker configuration (expected an object with an "
                        "HttpHeaders object); fix or remove it")
    return doc


def write_docker_config(config_dir: str, token: str, tenant_id: str, *,
                        ca_file: str | None = None) -> str:
    """Set ``X-Auth-Token`` and ``X-Auth-TenantId`` in ``HttpHeaders`` of
    ``config_dir/config.json``; return that file's path.

    Every other key is kept; case variants of the two headers are replaced.
    The directory is created (0700) if needed; the file is replaced
    atomically with mode 0600 (a symlinked config.json is written through).
    With ``ca_file``, also installs ``ca.pem`` and a client pair (see
    :func:`_install_tls`) so that ``DOCKER_CERT_PATH=config_dir`` works.
    An unreadable or non-JSON existing file is an error and left untouched.
    """
    path = config_path(config_dir)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        target = os.path.realpath(path)
        doc = _read_config(target)
        if ca_file:
            _install_tls(directory, ca_file)
        headers = {k: v for k, v in (doc.get("HttpHeaders") or {}).items()
                   if k.lower() not in (TOKEN_HEADER.lower(), TENANT_HEADER.lower())}
        headers[TOKEN_HEADER] = token
        headers[TENANT_HEADER] = tenant_id
        doc["HttpHeaders"] = headers
        # The docker CLI writes its config tab-indented; so do we.
        _atomic_write(target, (json.dumps(doc, indent="\t") + "\n").encode(), 0o600)
    except OSError as e:
        raise FdcsError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def stored_headers(config_dir: str) -> tuple[str | None, str | None]:
    """``(token, tenant_id)`` from ``config_dir/config.json`` (None when absent)."""
    headers = _read_config(config_path(config_dir)).get("HttpHeaders") or {}
    low = {k.lower(): v for k, v in headers.items()}
    return low.get(TOKEN_HEADER.lower()), low.get(TENANT_HEADER.lower())


def _until(expires_at: float, now: float) -> str:
    when = datetime.datetime.fromtimestamp(expires_at, datetime.timezone.utc)
    left = int(expires_at - now)
    if left <= 0:
        span = "expired"
    elif left < 60:
        span = f"in {left} s"
    elif left < 3600:
        span = f"in {left // 60} min"
    else:
        span = f"in {left // 3600} h {left % 3600 // 60} min"
    return f"{when:%Y-%m-%d %H:%M:%S} UTC ({span})"


def check_token(config_dir: str, auth_url: str, *, ca_file: str | None = None,
                timeout: float = DEFAULT_TIMEOUT, clock=time.time) -> tuple[bool, str]:
    """Is the token stored in ``config_dir`` valid now, and for how long?

    Returns ``(valid, one-line explanation)``.
    :raises IdentityUnavailable: Keystone cannot say.
    """
    token, tenant = stored_headers(config_dir)
    if not token:
        return False, f"no {TOKEN_HEADER} in {config_path(config_dir)}; run fdcs-login"
    client = KeystoneClient(v3_url(auth_url), default_session(ca_file or "", timeout), timeout)
    try:
        info = client.validate(token)
    except AuthenticationError:
        return False, "the stored token is invalid or expired; run fdcs-login"
    except IdentityUnavailable as e:
        raise IdentityUnavailable(f"cannot check the token: Keystone at {client.url} is "
                                  "unavailable, retry later") from e
    if not info.project_id:
        return False, "the stored token is not scoped to a project; run fdcs-login"
    if tenant and tenant != info.project_id:
        return False, (f"{TENANT_HEADER} {tenant} does not match the token's project "
                       f"{info.project_id}; run fdcs-login")
    return True, (f"token valid for project {info.project_name} ({info.project_id}) as "
                  f"{info.user_name}, expires {_until(info.expires_at, clock())}")


# -- command line --------------------------------------------------------------

#: flag dest -> OpenStack CLI variable it overrides
_ENV = {
    "os_auth_url": "OS_AUTH_URL",
    "os_username": "OS_USERNAME",
    "os_user_id": "OS_USER_ID",
    "os_user_domain_name": "OS_USER_DOMAIN_NAME",
    "os_user_domain_id": "OS_USER_DOMAIN_ID",
    "os_project_name": "OS_PROJECT_NAME",
    "os_project_id": "OS_PROJECT_ID",
    "os_project_domain_name": "OS_PROJECT_DOMAIN_NAME",
    "os_project_domain_id": "OS_PROJECT_DOMAIN_ID",
    "os_application_credential_id": "OS_APPLICATION_CREDENTIAL_ID",
    "os_application_credential_name": "OS_APPLICATION_CREDENTIAL_NAME",
    "os_cacert": "OS_CACERT",
}


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: "--password x" must not pass as "--password-stdin".
    p = argparse.ArgumentParser(
        prog="fdcs-login", allow_abbrev=False,
        description="Get a Keystone token and store it (X-Auth-Token, X-Auth-TenantId) in the "
                    "HttpHeaders of a docker config.json. Each --os-* flag overrides the "
                    "OS_* variable of the same name. The password or secret is read from "
                    "--password-stdin, OS_PASSWORD / OS_APPLICATION_CREDENTIAL_SECRET, or a prompt.",
        epilog="docker sends HttpHeaders to every daemon it talks to with that config: prefer a "
               "directory used only for FDCS, e.g. --config ~/.fdcs and DOCKER_CONFIG=~/.fdcs.")
    for dest, var in _ENV.items():
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, metavar=var.removeprefix("OS_"),
                       help=f"default ${var}")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password (or application credential secret) from standard input")
    p.add_argument("--config", metavar="DIR",
                   help="docker configuration directory (default $DOCKER_CONFIG, else ~/.docker)")
    p.add_argument("--ca", metavar="FILE",
                   help="the service's CA certificate: copy it to DIR/ca.pem and create a "
                        "throwaway client pair DIR/cert.pem, DIR/key.pem, for DOCKER_CERT_PATH=DIR")
    p.add_argument("--check", action="store_true",
                   help="only report whether the stored token is valid and for how long "
                        "(exit 0 valid, 1 not)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds to wait for Keystone (default %(default)s)")
    return p


def _secret(args: argparse.Namespace, env: Mapping[str, str], var: str, what: str) -> str:
    if args.password_stdin:
        value = sys.stdin.read().rstrip("\r\n")
    elif env.get(var):
        value = env[var]
    elif sys.stdin is not None and sys.stdin.isatty():
        value = getpass.getpass(f"{what}: ")
    else:
        raise ConfigError(f"no {what.lower()}: use --password-stdin, set {var}, or run on a terminal")
    if not value:
        raise ConfigError(f"empty {what.lower()}")
    return value


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    o = {dest: getattr(args, dest) or env.get(var) or None for dest, var in _ENV.items()}
    default_dir = not (args.config or env.get("DOCKER_CONFIG"))
    config_dir = args.config or env.get("DOCKER_CONFIG") or os.path.join("~", ".docker")
    if not o["os_auth_url"]:
        raise ConfigError("no Keystone URL: set OS_AUTH_URL (or --os-auth-url)")

    if args.check:
        valid, why = check_token(config_dir, o["os_auth_url"], ca_file=o["os_cacert"],
                                 timeout=args.timeout)
        print(why, file=sys.stdout if valid else sys.stderr)
        return 0 if valid else 1

    common = dict(ca_file=o["os_cacert"], timeout=args.timeout, username=o["os_username"],
                  user_id=o["os_user_id"], user_domain=o["os_user_domain_name"] or "Default",
                  user_domain_id=o["os_user_domain_id"])
    if o["os_application_credential_id"] or o["os_application_credential_name"]:
        secret = _secret(args, env, "OS_APPLICATION_CREDENTIAL_SECRET", "Application credential secret")
        got = app_credential_login(o["os_auth_url"], secret,
                                   credential_id=o["os_application_credential_id"],
                                   credential_name=o["os_application_credential_name"], **common)
    else:
        password = _secret(args, env, "OS_PASSWORD", "Password")
        got = password_login(o["os_auth_url"], password, project_name=o["os_project_name"],
                             project_id=o["os_project_id"],
                             project_domain=o["os_project_domain_name"] or "Default",
                             project_domain_id=o["os_project_domain_id"], **common)
    path = write_docker_config(config_dir, got.token, got.project_id, ca_file=args.ca)
    directory = os.path.dirname(path)
    print(f"Logged in as {got.user_name} to project {got.project_name} ({got.project_id})")
    print(f"Token expires {_until(got.expires_at, time.time())}")
    print(f"Wrote {TOKEN_HEADER} and {TENANT_HEADER} to {path}")
    if args.ca:
        print(f"TLS files in {directory}: export DOCKER_CERT_PATH={directory} DOCKER_TLS_VERIFY=1")
    if default_dir:
        print("Note: docker sends these headers to every daemon it talks to with this "
              "configuration; prefer a directory for FDCS only (--config DIR, DOCKER_CONFIG=DIR).")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script ``fdcs-login``: 0 on success, 1 on any error (one line
    on stderr, no traceback), 2 on a usage error."""
    args = _parser().parse_args(argv)
    try:
        return _run(args, os.environ)
    except FdcsError as e:
        print(f"fdcs-login: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
