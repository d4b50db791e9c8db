"""The site fdcs-manage works on: configuration, Redis, engines, Keystone.

Each part is opened on first use, so that a command needing only Redis
works while Keystone is down and the other way round.  Tests inject fakes
through the constructor; the command line sets ``emit`` (print one line),
``confirm(prompt, yes)`` and ``sleep``.
"""

from __future__ import annotations

import os
import time
from functools import cached_property
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from ..ownership import KINDS, Store, call_redis, connect
from ..quota import QuotaPolicy, QuotaStore
from ._engines import Engines
from ._tenants import Directory, Project, names, resolve

ADOPTED = "fdcs:adopted:"


def redis_where(cfg: Mapping) -> str:
    """The Redis location for messages, without credentials."""
    if cfg["redis.sentinels"]:
        return f"Sentinel {', '.join(cfg['redis.sentinels'])} ({cfg['redis.service_name']})"
    u = urlsplit(cfg["redis.url"])
    host = u.hostname or ""
    netloc = f"{host}:{u.port}" if u.port else host
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


class Site:
    def __init__(self, cfg: Mapping, *, redis_client=None, directory: Directory | None = None,
                 engine_factory: Callable[[str], Any] | None = None, env: Mapping[str, str] | None = None):
        self.cfg = cfg
        self.env = os.environ if env is None else env
        self._redis = redis_client
        self._directory = directory
        self.engines = Engines(cfg, engine_factory)
        self.emit: Callable[[str], None] = print
        self.confirm: Callable[[str, bool], bool] = lambda prompt, yes: yes
        self.sleep: Callable[[float], None] = time.sleep

    # -- Redis -------------------------------------------------------------------

    @property
    def redis(self):
        if self._redis is None:
            self._redis = connect(self.cfg)
        return self._redis

    def store(self, host: str | None = None) -> Store:
        """The ownership store as host ``host`` (default: this host)."""
        return Store(self.redis, self.cfg["redis.exec_ttl"], host or self.cfg["host.id"])

    @cached_property
    def policy(self) -> QuotaPolicy:
        return QuotaPolicy.from_config(self.cfg)

    def quota(self, host: str | None = None) -> QuotaStore:
        return QuotaStore(self.redis, self.policy, host or self.cfg["host.id"])

    def call(self, fn, *args, **kw):
        return call_redis(fn, *args, **kw)

    # -- what FDCS holds of tenants -----------------------------------------------------

    def records(self) -> dict[str, dict[str, tuple[str, str, str]]]:
        """kind -> id -> (tenant, host, name), every host."""
        store = self.store()
        return {kind: store.all_records(kind) for kind in KINDS}

    def adopted(self, host: str | None = None) -> dict[str, dict[str, str]]:
        """kind -> id -> tenant of the adoptions (of ``host`` only, if given).
        Each is stored as ``fdcs:adopted:<kind>`` id -> ``<tenant> <host>``."""
        out: dict[str, dict[str, str]] = {}
        for kind in KINDS:
            raw = self.call(self.redis.hgetall, ADOPTED + kind)
            out[kind] = {}
            for id_, v in raw.items():
                tenant, _, h = v.partition(" ")
                if host is None or h == host:
                    out[kind][id_] = tenant
        return out

    def adoption_hosts(self, kind: str) -> dict[str, str]:
        """id -> host of the adoptions of ``kind``."""
        return {i: v.partition(" ")[2] for i, v in self.call(self.redis.hgetall, ADOPTED + kind).items()}

    def known_tenants(self) -> set[str]:
        """Every tenant FDCS holds something of: records, usage or quota
        overrides, a suspension, an adoption."""
        out = {t for recs in self.records().values() for t, _, _ in recs.values() if t}
        out |= self.quota().tenants()
        out |= set(self.store().suspended())
        out |= {t for kind in self.adopted().values() for t in kind.values()}
        return out

    # -- Keystone ----------------------------------------------------------------------

    @property
    def directory(self) -> Directory:
        if self._directory is None:
            self._directory = Directory(self.cfg, self.env)
        return self._directory

    def tenant(self, ref: str) -> Project:
        """TENANT (id or name) -> the project (``_tenants.resolve``)."""
        return resolve(ref, self.directory, self.known_tenants())

    def names(self, ids) -> tuple[dict[str, str], str | None]:
        return names(ids, self.directory)
