"""Request canonicalisation: the plugin reads the path and query like the engine."""

import pytest

from authz_plugin.errors import BadRequest
from authz_plugin.request import parse


def p(uri, method="GET", headers=None, body=None):
    return parse(method, uri, headers or {}, body)


def test_plain():
    r = p("/v1.41/containers/abc/json?size=1")
    assert (r.path, r.version, r.q("size")) == ("/containers/abc/json", "1.41", "1")


def test_percent_decoding_like_go():
    assert p("/v1.41/%63ontainers/%61bc/json").path == "/containers/abc/json"
    assert p("/v1.41/containers/json?filters=%7B%7D&x=a+b").q("x") == "a b"
    assert p("/v1.41/containers/a+b/json").path == "/containers/a+b/json"  # + is literal in a path


@pytest.mark.parametrize("uri", [
    "/v1.041/containers/json", "/v1.41.0/containers/json", "/v01.41/containers/json",
    "/containers/json", "/v1.23/containers/json", "/v1.42/containers/json",
    "//v1.41/containers/json", "/v1.41//containers/json", "/v1.41/containers/json/",
    "/v1.41/containers/x/../y/json", "/v1.41/containers/./json", "/v1.41/%2e%2e/containers/json",
    "/v1.41/containers/%zz/json", "/v1.41/containers/%4", "http://x/v1.41/containers/json",
    "/v1.41/containers/json#x", "/v1.41/containers/json?a=1;b=2", "/v1.41/containers/a%00b/json",
    "/v1.41/containers/a%2F%2Fb/json",
])
def test_refused_targets(uri):
    with pytest.raises(BadRequest):
        p(uri)


def test_unversioned_ping_and_version_are_allowed():
    assert p("/_ping").path == "/_ping" and p("/version").version is None


def test_first_query_value_wins_and_all_are_kept():
    r = p("/v1.41/containers/create?name=a&name=b")
    assert r.q("name") == "a" and r.qall("name") == ["a", "b"]


@pytest.mark.parametrize("ct", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                "APPLICATION/X-WWW-FORM-URLENCODED", "not a type", "/json"])
def test_form_and_malformed_content_types_refused(ct):
    with pytest.raises(BadRequest):
        p("/v1.41/containers/x/rename?name=y", "POST", {"Content-Type": ct})


def test_json_with_charset_is_json():
    r = p("/v1.41/containers/create", "POST", {"Content-Type": "application/json; charset=utf-8"})
    assert r.media_type == "application/json"


def test_headers_case_insensitive():
    r = p("/v1.41/info", headers={"X-Auth-Tenantid": "t"})
    assert r.headers.get("x-auth-tenantid") == "t" and "X-AUTH-TENANTID" in r.headers


def test_declared_body():
    post = lambda h: parse("POST", "/v1.41/containers/x/start", h, None).declared_body()
    assert post({"Content-Length": "0"}) is False
    assert post({"Content-Length": "12"}) is True
    assert post({}) is True  # chunked: Go hides Transfer-Encoding and drops Content-Length
    assert parse("GET", "/v1.41/info", {}, None).declared_body() is False
