"""The name scoper's fast path for its commonest reads (``handlers._fast_read``)
gives exactly the exchange the general path (``handlers._prepare_general``)
gives, for every request it takes; and it takes the ones it is for."""

from __future__ import annotations

import asyncio
import json
from unittest import mock

from hypothesis import given, settings, strategies as st

from name_scoper import handlers
from name_scoper.handlers import Context, Response
from name_scoper.rewrite import Scope
from authz_plugin.scoping import TENANT_LABEL

TENANT = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


class _Store:
    """Ownership records for the list's rewriter: every odd id is the tenant's."""

    def owners(self, kind, ids):
        return [TENANT if int(i, 16) % 2 else OTHER for i in ids]

    def tenant_ref(self, kind, tenant, ref, scoped):
        return "none", ref


def _ctx() -> Context:
    return Context({"scoper.api_version": "1.41", "scoper.default_pids_limit": 512}, store=_Store())


async def _no_engine(method, target, body=None):
    raise AssertionError(f"unexpected engine sub-request {method} {target}")


_INSPECT = json.dumps({"Id": "ab" * 32, "Name": f"/{TENANT}_web", "HostConfig": {"NetworkMode": f"{TENANT}_bridge"},
                       "NetworkSettings": {"Networks": {}}, "Mounts": []}).encode()
_LIST = json.dumps([{"Id": f"{i:064x}", "Names": [f"/{TENANT}_c{i}"], "Labels": {TENANT_LABEL: TENANT}}
                    for i in range(4)]).encode()


def _same(fast, general, scope) -> None:
    assert (fast.method, fast.target, fast.headers, fast.request_body, fast.reject) == \
        (general.method, general.target, general.headers, general.request_body, general.reject)
    assert fast.rewrite_body is None and general.rewrite_body is None
    a, b = fast.response, general.response
    assert type(a) is Response and type(b) is Response
    assert (a.mode, a.ok, a.api_cap, a.not_owned_status, a._line, a.scope.tenant) == \
        (b.mode, b.ok, b.api_cap, b.not_owned_status, b._line, b.scope.tenant)
    for body in (_INSPECT, _LIST):
        for status in (200, 404):
            try:
                want = b.json(status, body)
            except Exception as e:  # noqa: BLE001 - the same failure, then
                want = repr(e)
            try:
                got = a.json(status, body)
            except Exception as e:  # noqa: BLE001
                got = repr(e)
            assert got == want


class _Ident:
    project_id = TENANT
    is_admin = False


def _both(target: str, headers):
    """(the fast path's exchange or None, what ``prepare`` gives with the fast
    path, what it gives without it, the scope)."""
    ctx, scope = _ctx(), Scope(TENANT)
    fast = handlers._fast_read(ctx, scope, target, headers)
    with_fast = asyncio.run(handlers.prepare(ctx, _Ident(), "GET", target, headers, _no_engine))
    with mock.patch.object(handlers, "_fast_read", return_value=None):
        general = asyncio.run(handlers.prepare(ctx, _Ident(), "GET", target, headers, _no_engine))
    if fast is not None:
        _same(fast, with_fast, scope)
    return fast, with_fast, general, scope


_HEADERS = [(b"host", b"docker"), (b"x-request-id", b"r-1")]


def test_the_fast_path_takes_the_commonest_reads_and_gives_the_general_paths_exchange():
    for target in ("/v1.41/containers/web/json", "/v1.12/containers/my_web.1-a/json", "/v1.41/containers/json",
                   "/v1.41/containers/json?all=1", "/v1.40/containers/json/json"):
        fast, with_fast, general, scope = _both(target, _HEADERS)
        assert fast is not None, target
        _same(with_fast, general, scope)
    fast = _both("/v1.41/containers/web/json", _HEADERS)[0]
    assert fast.target == f"/v1.41/containers/{TENANT}_web/json"
    assert json.loads(fast.response.json(200, _INSPECT))["Name"] == "/web"
    fast = _both("/v1.41/containers/json?all=1", _HEADERS)[0]
    assert fast.target.startswith("/v1.41/containers/json?all=1&filters=")
    assert [c["Names"] for c in json.loads(fast.response.json(200, _LIST))] == [["/c1"], ["/c3"]]


def test_the_fast_path_leaves_everything_else_to_the_general_path():
    for target in ("/v1.41/containers/cafe/json",  # may be an id: Redis decides
                   "/v1.41/containers/web/json?size=1", "/v1.41/containers/web/top",
                   "/v1.11/containers/web/json", "/v1.041/containers/web/json", "/containers/web/json",
                   "/v1.41/containers/web%41/json", "/v1.41/containers/json?all=0",
                   "/v1.41/containers/json?all=1&size=1", "/v1.41/containers/json?filters=%7B%7D",
                   "/v1.41/containers/-web/json", "/v1.41/containers/" + "w" * 201 + "/json"):
        assert _both(target, _HEADERS)[0] is None, target
    # a Content-Type is the general path's to check
    assert _both("/v1.41/containers/web/json", _HEADERS + [(b"content-type", b"text/plain")])[0] is None


_VERSIONS = st.sampled_from(["/v1.41", "/v1.12", "/v1.11", "/v1.9", "/v1.09", "/v1.041", "/v1.100", "/v1.999",
                             "/v1.1000", "/v2.0", "/v9.99", "/v1.4", "", "/v1.41/"])
_NAMES = st.one_of(st.sampled_from(["web", "json", "cafe", "abc123", "0", "A", "a.b-c_d", "_x", ".x", "-x",
                                    "w" * 200, "w" * 201, "web%41", "wéb", "web/x", "web json", "g" * 64]),
                   st.from_regex(r"[A-Za-z0-9_.%-]{1,12}", fullmatch=True))
_TAILS = st.sampled_from(["/json", "/json?size=1", "/top", "/json?", "/json/"])
_LISTS = st.sampled_from(["/containers/json", "/containers/json?all=1", "/containers/json?all=0",
                          "/containers/json?all=1&all=1", "/containers/json?limit=1", "/containers/json/",
                          "/containers/json?ALL=1", "/containers/json?all=1#x"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.tuples(_VERSIONS, st.just("/containers/"), _NAMES, _TAILS).map("".join),
                 st.tuples(_VERSIONS, _LISTS).map("".join)),
       st.booleans())
def test_fast_and_general_paths_agree(target, with_content_type):
    headers = _HEADERS + ([(b"content-type", b"application/json")] if with_content_type else [])
    _, with_fast, general, scope = _both(target, headers)
    if general.reject is not None or general.response.body_rewrite is None:
        # refused, or nothing to rewrite: the same refusal / pass-through
        assert (with_fast.target, with_fast.reject, with_fast.request_body) == \
            (general.target, general.reject, general.request_body)
    else:
        _same(with_fast, general, scope)


# -- the last rewritten inspects (handlers.Rewritten) ----------------------------------------------

def test_a_kept_inspect_is_the_rewriting_s_own_answer_for_the_same_tenant_and_bytes():
    calls = []

    def fn(body, scope):
        calls.append((scope.tenant, body))
        return handlers.rewrite.container_inspect(body, scope)
    kept = handlers.Rewritten(fn, size=2)
    mine, other = Scope(TENANT), Scope(OTHER)
    want = handlers.rewrite.container_inspect(_INSPECT, mine)
    assert json.loads(want)["Name"] == "/web"
    assert kept(_INSPECT, mine) == want and kept(bytearray(_INSPECT), mine) == want
    assert len(calls) == 1  # the second: the same tenant and bytes, kept
    # another tenant: its own rewriting (it does not own the name: left as it is)
    assert json.loads(kept(_INSPECT, other))["Name"] == f"/{TENANT}_web"
    changed = _INSPECT.replace(b'"Mounts": []', b'"Mounts": [{"Name": "x"}]')
    assert kept(changed, mine) == handlers.rewrite.container_inspect(changed, mine)  # other bytes: rewritten
    assert len(calls) == 3  # size 2 reached at the third: emptied, then kept
    assert kept(changed, mine) and len(calls) == 3
    assert kept(_INSPECT, mine) == want and len(calls) == 4


def test_nothing_is_kept_of_a_rewriting_that_fails_or_of_a_large_answer():
    calls = []

    def fn(body, scope):
        calls.append(body)
        if body == b"bad":
            raise ValueError("not JSON")
        return b"out"
    kept = handlers.Rewritten(fn, max_body=10)
    for _ in range(2):
        try:
            kept(b"bad", Scope(TENANT))
        except ValueError:
            pass
    big = b"x" * 11
    kept(big, Scope(TENANT))
    kept(big, Scope(TENANT))
    assert calls == [b"bad", b"bad", big, big]
    kept(b"small", Scope(TENANT))
    kept(b"small", Scope(TENANT))  # control: kept
    assert calls[-1] == b"small" and calls.count(b"small") == 1


def test_the_inspect_response_uses_the_contexts_kept_answers():
    ctx = _ctx()
    first = handlers._inspect_response(ctx, Scope(TENANT)).json(200, _INSPECT)
    ctx.inspects.fn = lambda body, scope: b"must not be called"
    assert handlers._inspect_response(ctx, Scope(TENANT)).json(200, _INSPECT) == first
    assert handlers._inspect_response(ctx, Scope(OTHER)).json(200, _INSPECT) == b"must not be called"
