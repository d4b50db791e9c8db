"""One configuration for every FDCS daemon, declared once.

The file is TOML (``/etc/fdcs/fdcs.toml`` by default, or ``--config`` /
``FDCS_CONFIG``).  Every option is declared in :data:`OPTIONS` with its type,
default and help; nothing else reads configuration.  An environment variable
``FDCS_<SECTION>_<KEY>`` (upper case) overrides the file; lists are written
comma-separated there, tables as ``k=v,k=v``.

:func:`load` validates everything at start-up and raises
:class:`~authz_plugin.errors.ConfigError` naming the offending key, so that a
daemon never starts half-configured.  Tests inject values with
``load(path=None, overrides={...})``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from typing import Any, Callable, Mapping

from .errors import ConfigError

DEFAULT_PATH = "/etc/fdcs/fdcs.toml"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)b?\s*$", re.I)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any) -> int:
    """``"10m"`` -> 10485760; an int is taken as bytes.  Docker's units (base 1024)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10m")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 10m, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, str):
        v = v.strip()
        if not re.fullmatch(r"-?\d+", v):
            raise ValueError(f"expected an integer, got {v!r}")
        return int(v)
    if not isinstance(v, int):
        raise ValueError("expected an integer")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {v!r}") from None


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _strlist(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ValueError("expected a list of strings")
    return tuple(v)


def _intmap(v: Any) -> dict[str, int]:
    if isinstance(v, str):
        out = {}
        for part in filter(None, (p.strip() for p in v.split(","))):
            k, sep, val = part.partition("=")
            if not sep:
                raise ValueError(f"expected name=number, got {part!r}")
            out[k.strip()] = _int(val)
        return out
    if not isinstance(v, Mapping):
        raise ValueError("expected a table of name = number")
    return {str(k): _int(val) for k, val in v.items()}


def _port_range(v: Any) -> tuple[int, int]:
    s = _str(v).strip()
    m = re.fullmatch(r"(\d+)-(\d+)", s)
    if not m:
        raise ValueError(f"expected LOW-HIGH, got {s!r}")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"expected 1 <= LOW <= HIGH <= 65535, got {s!r}")
    return lo, hi


def _metrics_listen(v: Any) -> str:
    """``HOST:PORT`` of a metrics listener, or "" (none); the host is required."""
    s = _str(v).strip()
    host, sep, port = s.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if s and (not sep or not host or any(c in host for c in "[]/ ") or not port.isdigit()
              or not 0 < int(port) < 65536):
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9464 (empty: no metrics listener), got {s!r}")
    return s


def _limit(parse: Callable[[Any], int]) -> Callable[[Any], int]:
    """A quota limit: ``unlimited`` (or -1) or a value ``parse`` reads."""
    def read(v: Any) -> int:
        if v == -1 or (isinstance(v, str) and v.strip().lower() in ("unlimited", "-1")):
            return -1
        n = parse(v)
        if n < 0:
            raise ValueError(f"expected 'unlimited' or a value of at least 0, got {v!r}")
        return n
    return read


def _cpus(v: Any) -> int:
    from .quota import parse_cpus  # nano-CPUs
    return parse_cpus(v)


def _flavors(v: Any) -> tuple:
    """``{small = "512m,0.5", ...}`` (env: ``small=512m/0.5,...``)."""
    from .quota import parse_flavor
    if isinstance(v, str):
        pairs = []
        for part in filter(None, (p.strip() for p in v.split(","))):
            k, sep, spec = part.partition("=")
            if not sep:
                raise ValueError(f"expected name=MEMORY/CPUS, got {part!r}")
            pairs.append((k.strip(), spec.replace("/", ",")))
    elif isinstance(v, Mapping):
        pairs = [(str(k), str(spec)) for k, spec in v.items()]
    else:
        raise ValueError("expected a table of name = \"MEMORY,CPUS\"")
    for name, _ in pairs:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,31}", name):
            raise ValueError(f"flavor name {name!r}: lower-case letters, digits, '_', '.', '-'")
    return tuple(parse_flavor(name, spec) for name, spec in pairs)


def _engine_map(v: Any) -> dict[str, str]:
    """``{h1 = "unix:///run/docker.sock", ...}`` (env: ``h1=unix:///...,h2=...``):
    host id -> the URL of that host's engine (unix://, tcp:// or ssh://)."""
    if isinstance(v, str):
        pairs = []
        for part in filter(None, (p.strip() for p in v.split(","))):
            k, sep, url = part.partition("=")
            if not sep:
                raise ValueError(f"expected host=URL, got {part!r}")
            pairs.append((k.strip(), url.strip()))
    elif isinstance(v, Mapping):
        pairs = [(str(k), v[k]) for k in v]
    else:
        raise ValueError('expected a table of host = "unix:///path/docker.sock"')
    out = {}
    for host, url in pairs:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", host):
            raise ValueError(f"host id {host!r}: letters, digits, '_', '.', '-' (at most 64)")
        if not isinstance(url, str) or not re.match(r"^(unix:///|tcp://|ssh://).+", url):
            raise ValueError(f"host {host}: expected unix:///PATH, tcp://HOST:PORT or ssh://HOST, got {url!r}")
        out[host] = url
    return out


def _url(v: Any) -> str:
    s = _str(v)
    if s and not re.match(r"^(https?|redis|rediss|unix)://", s):
        raise ValueError(f"expected a URL, got {s!r}")
    return s.rstrip("/") if s.startswith("http") else s


@dataclasses.dataclass(frozen=True)
class Option:
    section: str
    key: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    required: bool = False

    @property
    def env(self) -> str:
        return f"FDCS_{self.section}_{self.key}".upper()

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


OPTIONS: tuple[Option, ...] = (
    # -- this host ------------------------------------------------------------
    Option("host", "id", _str, socket.gethostname(), "this Docker host's id in the shared records (unique per host; default: the hostname)"),
    # -- identity ---------------------------------------------------------
    Option("keystone", "url", _url, "", "Keystone v3 endpoint, e.g. http://keystone:5000/v3", True),
    Option("keystone", "ca_file", _str, "", "CA bundle to verify Keystone's TLS certificate (empty: system bundle)"),
    Option("keystone", "timeout", _float, 5.0, "seconds to wait for Keystone before answering 'identity service unavailable'"),
    Option("keystone", "admin_project_id", _str, "", "id of the admin project; the admin role on it makes a site administrator", True),
    Option("keystone", "admin_roles", _strlist, ("admin",), "roles that, on the admin project, make a site administrator"),
    Option("keystone", "member_roles", _strlist, ("member", "admin"), "roles that may write (any method)"),
    Option("keystone", "reader_roles", _strlist, ("reader",), "roles that may read (GET and HEAD only)"),
    Option("keystone", "cache_ttl", _int, 300, "seconds a validated token is trusted without asking Keystone (also the revocation delay)"),
    Option("keystone", "cache_size", _int, 10000, "validated tokens kept in the cache (LRU beyond that)"),
    Option("keystone", "negative_ttl", _int, 10, "seconds a token Keystone rejected is remembered as invalid"),
    Option("keystone", "reject_rate", _float, 5.0, "Keystone look-ups per second allowed for unknown tokens (burst 4x) before 'too many invalid tokens'"),
    Option("keystone", "admin_key_file", _str, "/etc/fdcs/admin.key", "root-only file holding the break-glass admin key (empty: disabled)"),
    Option("keystone", "admin_key_header", _str, "X-FDCS-Admin-Key", "header that carries the break-glass admin key"),
    # -- state store --------------------------------------------------------
    Option("redis", "url", _url, "", "Redis URL, e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS)", False),
    Option("redis", "sentinels", _strlist, (), "Sentinel addresses host:port, used instead of url when set"),
    Option("redis", "service_name", _str, "fdcs", "Sentinel service name of the primary"),
    Option("redis", "timeout", _float, 2.0, "seconds per Redis operation before 'ownership store unavailable'"),
    Option("redis", "track_refs", _bool, True, "keep each plugin worker's answers to container references while Redis's client tracking reports no change to the records they read (Redis >= 6; off: Redis is asked every time)"),
    Option("redis", "exec_ttl", _int, 7 * 86400, "seconds an exec ownership record lives (execs die with their container)"),
    # -- authorization plugin -----------------------------------------------
    Option("plugin", "name", _str, "fdcs-authz", "plugin name given to dockerd --authorization-plugin"),
    Option("plugin", "socket", _str, "", "unix socket to serve on (default /run/docker/plugins/<name>.sock)"),
    Option("plugin", "workers", _int, 2, "gunicorn worker processes"),
    Option("plugin", "threads", _int, 8, "engine connections per worker, a thread each (the engine keeps them alive)"),
    Option("plugin", "log_level", _str, "info", "debug, info, warning or error"),
    # -- name scoper ------------------------------------------------------------
    Option("scoper", "listen", _str, "0.0.0.0:2376", "address:port of the tenants' TLS listener"),
    Option("scoper", "tls_cert", _str, "/etc/fdcs/tls/server-cert.pem", "server certificate (PEM, with its chain)"),
    Option("scoper", "tls_key", _str, "/etc/fdcs/tls/server-key.pem", "server private key (PEM)"),
    Option("scoper", "tls_client_ca", _str, "", "CA that client certificates must chain to (empty: no client certificates asked)"),
    Option("scoper", "engine_socket", _str, "/run/docker.sock", "the engine's unix socket (upstream)"),
    Option("scoper", "api_version", _str, "1.41", "highest API version advertised to tenants (the rewriter's)"),
    Option("scoper", "default_pids_limit", _int, 512, "PidsLimit given to a container that sets none"),
    Option("scoper", "max_connections", _int, 2000, "concurrent client connections before new ones wait"),
    Option("scoper", "log_level", _str, "info", "debug, info, warning or error"),
    # -- reconciler ---------------------------------------------------------------
    Option("reconciler", "engine_socket", _str, "/run/docker.sock", "the engine's unix socket the reconciler reads"),
    Option("reconciler", "interval", _float, 60.0, "seconds between full reconciles (also the bound on rebuilding after a Redis loss)"),
    Option("reconciler", "admin_key_file", _str, "", "break-glass key the reconciler uses (empty: keystone.admin_key_file)"),
    # -- monitoring (Prometheus text exposition over plain HTTP; keep it off the tenants' networks) --
    Option("plugin", "metrics_listen", _metrics_listen, "127.0.0.1:9464", "HOST:PORT where the plugin's gunicorn master serves /metrics (empty: none)"),
    Option("scoper", "metrics_listen", _metrics_listen, "127.0.0.1:9465", "HOST:PORT where the name scoper serves /metrics (empty: none; never the tenants' port)"),
    Option("reconciler", "metrics_listen", _metrics_listen, "127.0.0.1:9466", "HOST:PORT where the reconciler serves /metrics (empty: none)"),
    # -- policy ---------------------------------------------------------------
    Option("policy", "min_api_version", _str, "1.40", "oldest Docker API version accepted"),
    Option("policy", "max_api_version", _str, "1.41", "newest Docker API version accepted (the engine's own)"),
    Option("policy", "cap_add_allowed", _strlist, (), "capabilities a tenant may add (CapAdd), e.g. NET_ADMIN"),
    Option("policy", "log_drivers", _strlist, ("json-file", "local"), "log drivers a tenant may choose"),
    Option("policy", "log_max_size", parse_size, parse_size("10m"), "largest max-size log option (the engine must run with --log-opt max-size within it)"),
    Option("policy", "log_max_file", _int, 5, "largest max-file log option"),
    Option("policy", "pids_limit_max", _int, 1024, "largest HostConfig.PidsLimit; a container must set one"),
    Option("policy", "cpu_shares_max", _int, 1024, "largest HostConfig.CpuShares"),
    Option("policy", "ulimits_max", _intmap, {"nofile": 65536, "nproc": 4096, "core": 0}, "ulimits a tenant may set and the largest soft/hard value of each"),
    Option("policy", "host_port_range", _port_range, (30000, 32767), "host ports a tenant may publish explicitly (ephemeral ports are always allowed)"),
    Option("policy", "default_runtime", _str, "runc", "the only OCI runtime a tenant may name"),
    Option("policy", "registries", _strlist, ("docker.io",), "registries tenants may pull from, search and log in to"),
    Option("policy", "container_names", _str, "cluster", "'cluster': a tenant's container names are unique across all hosts; 'host': per host"),
    # -- quotas (limits are per tenant; fdcs-manage quota set overrides them per tenant) ----------
    Option("quota", "enabled", _bool, False, "account every tenant's containers, memory, CPUs, volumes and networks, and enforce the limits below"),
    Option("quota", "containers", _limit(_int), -1, "default limit on a tenant's containers, on all hosts together ('unlimited' or -1: none)"),
    Option("quota", "memory", _limit(parse_size), -1, "default limit on the sum of a tenant's HostConfig.Memory, e.g. 16g"),
    Option("quota", "cpus", _limit(_cpus), -1, "default limit on the sum of a tenant's CPUs (NanoCpus, or CpuQuota/CpuPeriod), e.g. 8"),
    Option("quota", "volumes", _limit(_int), -1, "default limit on a tenant's named volumes"),
    Option("quota", "networks", _limit(_int), -1, "default limit on a tenant's networks (its default network counts)"),
    Option("quota", "default_memory", parse_size, 0, "HostConfig.Memory the name scoper gives a container that sets none (0: none)"),
    Option("quota", "default_cpus", _cpus, 0, "CPUs the name scoper gives a container that sets none (0: none)"),
    Option("quota", "flavors", _flavors, (), "named sizes: a table name = \"MEMORY,CPUS\", e.g. small = \"512m,0.5\""),
    Option("quota", "flavor_required", _bool, False, "every container's memory and CPUs must be one of the flavors"),
    Option("quota", "default_flavor", _str, "", "the flavor the name scoper gives a container that sets no size (with flavor_required)"),
    # -- fdcs-manage (the site administrators' tool) and the audit stream it reads --------
    Option("plugin", "audit_stream_maxlen", _int, 100000, "audit lines kept (approximately) in the Redis stream fdcs:audit that fdcs-manage audit reads (0: no stream)"),
    Option("manage", "engines", _engine_map, {}, "every host's engine: a table host id = \"unix:///run/docker.sock\" (empty: this host's reconciler.engine_socket only)"),
    Option("manage", "keystone_user", _str, "admin", "Keystone user fdcs-manage looks projects up as (a site administrator)"),
    Option("manage", "keystone_user_domain", _str, "Default", "that user's domain name"),
    Option("manage", "keystone_password_file", _str, "", "root-only file with that user's password (empty: OS_PASSWORD from the environment)"),
    Option("manage", "keystone_project", _str, "", "project id that user's token is scoped to (empty: keystone.admin_project_id)"),
)

_BY_NAME = {o.dotted: o for o in OPTIONS}


class Config(Mapping[str, Any]):
    """Validated, read-only configuration: ``cfg["keystone.url"]``."""

    def __init__(self, values: dict[str, Any], source: str | None):
        self._values = values
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def section(self, name: str) -> dict[str, Any]:
        return {k.split(".", 1)[1]: v for k, v in self._values.items() if k.startswith(name + ".")}

    @property
    def plugin_socket(self) -> str:
        return self["plugin.socket"] or f"/run/docker/plugins/{self['plugin.name']}.sock"


def load(
    path: str | None = DEFAULT_PATH,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    require: tuple[str, ...] = ("keystone", "redis"),
) -> Config:
    """Read ``path`` (None: no file), apply ``FDCS_*`` from ``env``, then
    ``overrides`` (dotted keys), validate, and return a :class:`Config`.

    ``require`` names the sections whose required options must be set (a
    command-line tool that needs only Keystone passes ``("keystone",)``).
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"configuration file {path} cannot be read: {e}") from e
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                dotted = f"{section}.{key}"
                if dotted not in _BY_NAME:
                    raise ConfigError(f"{path}: unknown option {dotted}")
                raw[dotted] = value
    for opt in OPTIONS:
        if opt.env in env:
            raw[opt.dotted] = env[opt.env]
    for key, value in (overrides or {}).items():
        if key not in _BY_NAME:
            raise ConfigError(f"unknown option {key}")
        raw[key] = value

    values: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.dotted in raw:
            try:
                values[opt.dotted] = opt.parse(raw[opt.dotted])
            except ValueError as e:
                raise ConfigError(f"option {opt.dotted} ({opt.env}): {e}") from None
        else:
            values[opt.dotted] = opt.default
        if opt.required and opt.section in require and not values[opt.dotted]:
            raise ConfigError(f"option {opt.dotted} is required (set it in the file or {opt.env})")
    if "redis" in require and not (values["redis.url"] or values["redis.sentinels"]):
        raise ConfigError("option redis.url (or redis.sentinels) is required")
    for key in ("policy.min_api_version", "policy.max_api_version"):
        if not re.fullmatch(r"1\.\d+", values[key]):
            raise ConfigError(f"option {key}: expected a version such as 1.41")
    if values["policy.container_names"] not in ("cluster", "host"):
        raise ConfigError("option policy.container_names: expected 'cluster' or 'host'")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", values["host.id"]):
        raise ConfigError("option host.id: letters, digits, '_', '.', '-' (at most 64)")
    if values["quota.flavor_required"] and not values["quota.flavors"]:
        raise ConfigError("option quota.flavor_required needs quota.flavors")
    names = [f.name for f in values["quota.flavors"]]
    if values["quota.default_flavor"] and values["quota.default_flavor"] not in names:
        raise ConfigError(f"option quota.default_flavor: {values['quota.default_flavor']!r} is not one of "
                          f"quota.flavors ({', '.join(names) or 'none'})")
    if (values["quota.flavor_required"] or values["quota.flavors"]) and not values["quota.enabled"]:
        raise ConfigError("options quota.flavors and quota.flavor_required need quota.enabled = true")
    if values["plugin.audit_stream_maxlen"] < 0:
        raise ConfigError("option plugin.audit_stream_maxlen: must be 0 (no stream) or more")
    for key in ("plugin.workers", "plugin.threads", "keystone.cache_size"):
        if values[key] < 1:
            raise ConfigError(f"option {key}: must be at least 1")
    return Config(values, path)


def reference() -> str:
    """The configuration reference (for README and ``fdcs-authz --help-config``)."""
    lines = []
    section = None
    # grouped by section in the order sections first appear: a section's
    # options need not be contiguous in OPTIONS (sorted() is stable)
    order = list(dict.fromkeys(o.section for o in OPTIONS))
    for o in sorted(OPTIONS, key=lambda o: order.index(o.section)):
        if o.section != section:
            section = o.section
            lines.append(f"[{section}]")
        default = o.default
        if isinstance(default, tuple):
            default = list(default)
        lines.append(f"  {o.key} = {default!r}{'  (required)' if o.required else ''}")
        lines.append(f"      {o.help}; env {o.env}")
    return "\n".join(lines)
