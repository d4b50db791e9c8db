"""Fixtures for the plugin's unit tests: a fake identity and fakeredis."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import fakeredis
import pytest

from authz_plugin.config import load
from authz_plugin.errors import AuthenticationError
from authz_plugin.ownership import Store
from authz_plugin.policy import Authorizer

TA = "a" * 32  # tenant-a's project id
TB = "b" * 32


@dataclass(frozen=True)
class FakeIdentity:
    user_name: str
    project_id: str
    is_admin: bool = False
    writer: bool = True

    def may(self, method: str, path: str = "") -> bool:
        return self.is_admin or self.writer or (method in ("GET", "HEAD") and not path.endswith("/attach/ws"))


class FakeIdentityService:
    """Token -> identity, the contract of authz_plugin.identity.IdentityService."""

    TOKENS = {
        "tok-alice": FakeIdentity("alice", TA),
        "tok-bob": FakeIdentity("bob", TB),
        "tok-dave": FakeIdentity("dave", TA, writer=False),
        "tok-admin": FakeIdentity("admin", "admin-project", is_admin=True),
    }

    def authenticate(self, headers, source=""):
        token = headers.get("X-Auth-Token")
        if token not in self.TOKENS:
            raise AuthenticationError("authentication required: X-Auth-Token is missing or invalid; run fdcs-login")
        return self.TOKENS[token]


def cfg(**overrides):
    base = {"keystone.url": "http://127.0.0.1:1/v3", "keystone.admin_project_id": "admin-project",
            "redis.url": "redis://127.0.0.1:1/0", "host.id": "h1"}
    base.update(overrides)
    return load(None, env={}, overrides=base)


@pytest.fixture
def redis_server():
    return fakeredis.FakeServer()


@pytest.fixture
def store(redis_server):
    """Host h1's view, with its records complete (as after a reconcile)."""
    s = Store(fakeredis.FakeRedis(server=redis_server, decode_responses=True), host="h1")
    s.mark_complete(0)
    return s


@pytest.fixture
def store_h2(redis_server):
    s = Store(fakeredis.FakeRedis(server=redis_server, decode_responses=True), host="h2")
    s.mark_complete(0)
    return s


@pytest.fixture
def authz(store):
    return Authorizer(cfg(), FakeIdentityService(), store)


def payload(method, uri, body=None, token="tok-alice", headers=None, status=None, response=None):
    """An AuthZ payload as the engine sends it."""
    h = {"X-Auth-Token": token} if token else {}
    if body is not None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(raw))
    elif method in ("POST", "PUT"):
        h["Content-Type"] = "text/plain"
        h["Content-Length"] = "0"
    h.update(headers or {})
    p = {"RequestMethod": method, "RequestUri": uri, "RequestHeaders": h}
    if body is not None:
        p["RequestBody"] = base64.b64encode(raw).decode()
    if status is not None:
        p["ResponseStatusCode"] = status
        if status != 204:  # the engine sends no body with a 204
            p["ResponseBody"] = base64.b64encode(json.dumps(response).encode()).decode()
    return p
