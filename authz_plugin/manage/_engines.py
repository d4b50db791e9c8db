"""Every host's engine, as a site administrator (the break-glass admin key).

``manage.engines`` maps host ids to engine URLs; empty means this host only:
``{host.id: "unix://" + reconciler.engine_socket}``.  Each engine is
reached with docker-py and the header ``keystone.admin_key_header`` carrying
the key of ``reconciler.admin_key_file`` (else ``keystone.admin_key_file``),
exactly as the reconciler reaches its own: the plugin on that host lets the
key through without Keystone.

Failures are FdcsErrors: :class:`NoEngine` (a host that is not configured:
"run fdcs-manage on that host"), :class:`EngineUnavailable` (the engine
does not answer), :class:`~authz_plugin.errors.ConfigError` (an unusable
key file).  :func:`stats_usage` is the pure reading of a stats sample.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..errors import FdcsError, Unavailable
from ..identity import read_admin_key

API_VERSION = "1.41"


class NoEngine(FdcsError):
    reason = "no-engine"


class EngineUnavailable(Unavailable):
    reason = "engine-unavailable"


def engine_urls(cfg: Mapping) -> dict[str, str]:
    """host id -> engine URL (see module doc)."""
    return dict(cfg["manage.engines"]) or {cfg["host.id"]: "unix://" + cfg["reconciler.engine_socket"]}



class Engines:
    """Admin docker clients, one per configured host, made on first use."""

    def __init__(self, cfg: Mapping, factory: Callable[[str], Any] | None = None):
        self.cfg = cfg
        self.urls = engine_urls(cfg)
        self._factory = factory
        self._clients: dict[str, Any] = {}

    def hosts(self) -> list[str]:
        return sorted(self.urls)

    def has(self, host: str) -> bool:
        return host in self.urls

    def require(self, host: str) -> None:
        if host not in self.urls:
            raise NoEngine(f"host {host} has no engine in manage.engines: run fdcs-manage on that host "
                           f"(configured: {', '.join(self.hosts()) or 'none'})")

    def client(self, host: str):
        """The admin docker client of ``host``'s engine."""
        self.require(host)
        if host not in self._clients:
            if self._factory is not None:
                self._clients[host] = self._factory(host)
            else:
                import docker
                key = read_admin_key(self.cfg)
                try:
                    c = docker.DockerClient(base_url=self.urls[host], version=API_VERSION, timeout=60)
                except docker.errors.DockerException as e:
                    raise EngineUnavailable(f"engine of host {host} ({self.urls[host]}): {e}") from e
                c.api.headers[self.cfg["keystone.admin_key_header"]] = key
                self._clients[host] = c
        return self._clients[host]

    def call(self, host: str, fn: Callable[[Any], Any]):
        """``fn(client.api)`` with every engine failure made an FdcsError
        (a 404 is re-raised as docker's NotFound for the caller to read)."""
        return self.guard(host, lambda: fn(self.client(host).api))

    def guard(self, host: str, fn: Callable[[], Any]):
        """``fn()``, which talks to ``host``'s engine, with its failures made
        :class:`EngineUnavailable` (docker's NotFound passes through)."""
        import docker.errors
        import requests
        try:
            return fn()
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as e:
            raise EngineUnavailable(f"engine of host {host} refused: {e.explanation or e}") from e
        except (requests.RequestException, docker.errors.DockerException, OSError) as e:
            raise EngineUnavailable(f"engine of host {host} ({self.urls[host]}) is unreachable: "
                                    f"{e.__class__.__name__}") from e

    def ping(self, host: str) -> str:
        """``yes`` when the engine answers as administrator, else why not."""
        try:
            self.call(host, lambda api: api.ping())
            return "yes"
        except FdcsError as e:
            return f"no: {e}"


def stats_usage(s: Mapping[str, Any]) -> dict[str, Any]:
    """One ``GET /containers/{id}/stats?stream=false`` sample -> ``cpu_percent``
    (of one CPU: 100 = one full CPU, the docker CLI's measure),
    ``memory`` (bytes in use, page cache excluded as the docker CLI does)
    and ``memory_limit``."""
    cpu = s.get("cpu_stats") or {}
    pre = s.get("precpu_stats") or {}
    cpu_delta = ((cpu.get("cpu_usage") or {}).get("total_usage") or 0) - \
        ((pre.get("cpu_usage") or {}).get("total_usage") or 0)
    sys_delta = (cpu.get("system_cpu_usage") or 0) - (pre.get("system_cpu_usage") or 0)
    online = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1
    cpu_percent = round(100.0 * cpu_delta / sys_delta * online, 2) if cpu_delta > 0 and sys_delta > 0 else 0.0
    mem = s.get("memory_stats") or {}
    usage = mem.get("usage") or 0
    detail = mem.get("stats") or {}
    cache = detail.get("total_inactive_file", detail.get("inactive_file", 0)) or 0  # cgroup v1, v2
    return {"cpu_percent": cpu_percent, "memory": usage - cache if cache < usage else usage,
            "memory_limit": mem.get("limit") or 0}
