"""The name scoper's pure rewriting: names in, names out."""

import json

import pytest

from authz_plugin import shapes
from authz_plugin.errors import BadRequest
from authz_plugin.scoping import NAME_LABEL, TENANT_LABEL
from name_scoper import rewrite
from name_scoper.rewrite import Scope

TA, TB = "a" * 32, "b" * 32
S = Scope(TA)


def resolver(kind, ref):
    """As handlers._resolve with an empty store: names are scoped."""
    if kind == "network" and ref in ("bridge", "default"):
        return S.default_network
    return ref if len(ref) == 64 else S.name(ref)


def create(body, name="web"):
    out, default = rewrite.container_create(json.dumps(body).encode(), S, name, 512, resolver)
    return json.loads(out), default


def test_create_scopes_every_name_and_injects_labels_and_defaults():
    body = {"Image": "busybox", "Labels": {"x": "y"},
            "HostConfig": {"NetworkMode": "default", "Binds": ["data:/data:ro", "/anon"],
                           "VolumesFrom": ["db:ro"], "Links": ["db", "cache:c"],
                           "Mounts": [{"Type": "volume", "Source": "v2", "Target": "/v2"}],
                           "PidMode": "container:db"}}
    out, default = create(body)
    hc = out["HostConfig"]
    assert default and hc["NetworkMode"] == f"{TA}_bridge"
    assert out["Labels"] == {"x": "y", TENANT_LABEL: TA, NAME_LABEL: "web"}
    assert hc["Binds"] == [f"{TA}_data:/data:ro", "/anon"]
    assert hc["VolumesFrom"] == [f"{TA}_db:ro"]
    assert hc["Mounts"][0]["Source"] == f"{TA}_v2"
    assert hc["PidMode"] == f"container:{TA}_db"
    assert hc["PidsLimit"] == 512
    assert hc["Links"] is None  # moved to the endpoint: the engine ignores them on a user-defined network
    ep = out["NetworkingConfig"]["EndpointsConfig"][f"{TA}_bridge"]
    assert ep["Links"] == [f"{TA}_db:db", f"{TA}_cache:c"] and ep["Aliases"] == ["web"]


def test_create_keeps_explicit_networks_and_none():
    out, default = create({"Image": "x", "HostConfig": {"NetworkMode": "none"}})
    assert out["HostConfig"]["NetworkMode"] == "none" and not default
    out, default = create({"Image": "x", "HostConfig": {"NetworkMode": "backend"},
                           "NetworkingConfig": {"EndpointsConfig": {"backend": {"Aliases": ["api"]}}}})
    assert out["HostConfig"]["NetworkMode"] == f"{TA}_backend"
    assert out["NetworkingConfig"]["EndpointsConfig"][f"{TA}_backend"]["Aliases"] == ["api", "web"]
    assert not default


def test_create_refuses_reserved_labels_and_bad_names():
    with pytest.raises(BadRequest, match="reserved"):
        create({"Image": "x", "Labels": {TENANT_LABEL: TB}})
    with pytest.raises(BadRequest, match="invalid name"):
        create({"Image": "x"}, name="we b")


def test_create_refuses_what_the_engine_would_read_differently():
    with pytest.raises(BadRequest):
        rewrite.container_create(b'{"Image":"x","HostConfig":{},"hostconfig":{"Privileged":true}}', S, None, 5, resolver)


def test_host_paths_are_left_for_the_plugin_to_refuse():
    out, _ = create({"Image": "x", "HostConfig": {"Binds": ["/etc:/h"]}})
    assert out["HostConfig"]["Binds"] == ["/etc:/h"]


def test_network_and_volume_create():
    out = json.loads(rewrite.network_create(b'{"Name":"backend","Labels":{}}', S))
    assert out["Name"] == f"{TA}_backend" and out["Labels"] == {TENANT_LABEL: TA, NAME_LABEL: "backend"}
    with pytest.raises(BadRequest):
        rewrite.network_create(b'{"Name":"bridge"}', S)
    out = json.loads(rewrite.volume_create(b'{"Name":""}', S, "f" * 64))
    assert out["Name"] == f"{TA}_" + "f" * 64
    out = json.loads(rewrite.volume_create(b'{"Name":"data"}', S, "x"))
    assert out["Name"] == f"{TA}_data" and out["Labels"][NAME_LABEL] == "data"


def test_connect_adds_the_original_name_as_alias():
    out = json.loads(rewrite.network_connect(b'{"Container":"web"}', S, resolver, False))
    assert out["Container"] == f"{TA}_web" and out["EndpointConfig"]["Aliases"] == ["web"]


@pytest.mark.parametrize("raw,expect_label", [
    ([], True), (['{"name":["web"]}'], True), (['{"label":{"x=y":true}}'], True), (['{"label":["x=y"]}'], True),
])
def test_filters_merge_the_tenant_label_in_both_shapes(raw, expect_label):
    out = json.loads(rewrite.filters(raw, S, "containers"))
    assert out["label"][f"{TENANT_LABEL}={TA}"] is True


def test_filters_refuse_forged_and_duplicate():
    with pytest.raises(BadRequest):
        rewrite.filters([json.dumps({"label": [f"{TENANT_LABEL}={TB}"]})], S, "containers")
    with pytest.raises(BadRequest):
        rewrite.filters(["{}", "{}"], S, "containers")
    with pytest.raises(BadRequest):
        rewrite.filters(['{"label":["a"],"label":["b"]}'], S, "containers")


def test_filters_scope_name_bearing_values():
    out = json.loads(rewrite.filters([json.dumps({"network": ["backend"], "volume": ["data", "/mnt"],
                                                  "name": ["^web$"]})], S, "containers"))
    assert list(out["network"]) == [f"{TA}_backend"]
    assert set(out["volume"]) == {f"{TA}_data", "/mnt"}
    assert list(out["name"]) == [f"^/?{TA}_web$"]


def test_container_list_out():
    items = [{"Names": [f"/{TA}_web", f"/{TA}_app/{TA}_web"], "Labels": {TENANT_LABEL: TA},
              "HostConfig": {"NetworkMode": f"{TA}_bridge"},
              "NetworkSettings": {"Networks": {f"{TA}_bridge": {}}}, "Mounts": [{"Name": f"{TA}_data"}]},
             {"Names": [f"/{TB}_web"], "Labels": {TENANT_LABEL: TB}}]
    out = json.loads(rewrite.container_list(json.dumps(items).encode(), S))
    assert len(out) == 1
    assert out[0]["Names"] == ["/web", "/app/web"] and out[0]["HostConfig"]["NetworkMode"] == "bridge"
    assert list(out[0]["NetworkSettings"]["Networks"]) == ["bridge"] and out[0]["Mounts"][0]["Name"] == "data"


def test_inspect_out():
    c = {"Name": f"/{TA}_web", "HostConfig": {"NetworkMode": f"container:{TA}_db", "Links": [f"/{TA}_db:/{TA}_web/db"],
                                               "VolumesFrom": [f"{TA}_db:ro"], "Binds": [f"{TA}_data:/d"]},
         "NetworkSettings": {"Networks": {f"{TA}_backend": {}}}, "Mounts": [{"Name": f"{TA}_data"}]}
    out = json.loads(rewrite.container_inspect(json.dumps(c).encode(), S))
    assert out["Name"] == "/web" and out["HostConfig"]["NetworkMode"] == "container:db"
    assert out["HostConfig"]["Links"] == ["/db:/web/db"] and out["HostConfig"]["VolumesFrom"] == ["db:ro"]
    assert out["HostConfig"]["Binds"] == ["data:/d"] and list(out["NetworkSettings"]["Networks"]) == ["backend"]


def test_network_inspect_shows_only_own_containers():
    n = {"Name": f"{TA}_backend", "Labels": {TENANT_LABEL: TA},
         "Containers": {"1": {"Name": f"{TA}_web"}, "2": {"Name": f"{TB}_web"}}}
    out = json.loads(rewrite.network_inspect(json.dumps(n).encode(), S))
    assert out["Name"] == "backend" and out["Containers"] == {"1": {"Name": "web"}}
    lst = json.loads(rewrite.network_list(json.dumps([n, dict(n, Labels={TENANT_LABEL: TB})]).encode(), S))
    assert [x["Name"] for x in lst] == ["backend"]


def test_volume_list_out():
    doc = {"Volumes": [{"Name": f"{TA}_data", "Labels": {TENANT_LABEL: TA}},
                       {"Name": f"{TB}_data", "Labels": {TENANT_LABEL: TB}}], "Warnings": None}
    out = json.loads(rewrite.volume_list(json.dumps(doc).encode(), S))
    assert [v["Name"] for v in out["Volumes"]] == ["data"]


def test_events():
    mine = {"Type": "container", "Actor": {"Attributes": {"name": f"{TA}_web", TENANT_LABEL: TA}}}
    other = {"Type": "container", "Actor": {"Attributes": {"name": f"{TB}_web", TENANT_LABEL: TB}}}
    out = json.loads(rewrite.event_line(json.dumps(mine).encode(), S))
    assert out["Actor"]["Attributes"]["name"] == "web"
    assert rewrite.event_line(json.dumps(other).encode(), S) is None
    net = {"Type": "network", "Actor": {"Attributes": {"name": f"{TB}_n"}}}
    assert rewrite.event_line(json.dumps(net).encode(), S) is None


def test_errors():
    status, body = rewrite.error(404, json.dumps({"message": f"No such container: {TA}_web"}).encode(), S)
    assert (status, json.loads(body)["message"]) == (404, "No such container: web")
    denial = {"message": "authorization denied by plugin fdcs-x: No such container: web"}
    status, body = rewrite.error(403, json.dumps(denial).encode(), S)
    assert (status, json.loads(body)["message"]) == (404, "No such container: web")
    other = {"message": "authorization denied by plugin fdcs-x: HostConfig.Privileged is not allowed"}
    status, body = rewrite.error(403, json.dumps(other).encode(), S)
    assert status == 403 and json.loads(body) == other
    conflict = {"message": f'Conflict. The container name "/{TA}_web" is already in use by container "abc".'}
    assert '"/web"' in json.loads(rewrite.error(409, json.dumps(conflict).encode(), S)[1])["message"]


def test_version_cap():
    assert rewrite.version_cap("1.41", "1.41") == "1.41"
    assert rewrite.version_cap("1.43", "1.41") == "1.41"
    assert rewrite.version_cap("1.40", "1.41") == "1.40"


@pytest.mark.parametrize("given", [None, ""])
def test_create_gives_every_container_a_private_cgroup_namespace(given):
    # empty, the engine uses the host's cgroup namespace on cgroup v1 hosts
    hc = {"NetworkMode": "none"} if given is None else {"NetworkMode": "none", "CgroupnsMode": given}
    out, _ = create({"Image": "busybox", "HostConfig": hc})
    assert out["HostConfig"]["CgroupnsMode"] == "private"


def test_create_keeps_an_explicit_cgroup_namespace_for_the_plugin_to_judge():
    out, _ = create({"Image": "busybox", "HostConfig": {"NetworkMode": "none", "CgroupnsMode": "host"}})
    assert out["HostConfig"]["CgroupnsMode"] == "host"  # the plugin refuses it


def test_container_list_drops_what_the_records_do_not_give_the_caller():
    # the admin's container "adm" carries TA's label only because its image does
    items = [{"Id": "c1", "Names": [f"/{TA}_web"], "Labels": {TENANT_LABEL: TA}},
             {"Id": "adm", "Names": ["/admin-job"], "Labels": {TENANT_LABEL: TA}},
             {"Id": "b1", "Names": [f"/{TB}_web"], "Labels": {TENANT_LABEL: TB}}]
    asked = []

    def owned(ids):
        asked.append(ids)
        return {"c1"}
    out = json.loads(rewrite.container_list(json.dumps(items).encode(), S, owned))
    assert [c["Id"] for c in out] == ["c1"]
    assert asked == [["c1", "adm"]]  # only the label-matched ones are looked up
    # positive control: without the records, the label decides
    assert [c["Id"] for c in json.loads(rewrite.container_list(json.dumps(items).encode(), S))] == ["c1", "adm"]


def test_a_rewritten_answer_keeps_every_value_json_loads_read():
    """Answers are re-encoded by orjson: the same JSON values as before, also
    where orjson cannot encode (an integer beyond 64 bits, a lone surrogate:
    json.dumps takes over)."""
    doc = {"Id": "c1", "Name": f"/{TA}_web", "Labels": {"k": "é<>&\u2028"}, "Size": 2**63 - 1,
           "Ratio": 0.1, "Big": 1e300, "Neg": -0.0, "Nested": [None, True, False, {"a": []}]}
    out = rewrite.container_inspect(json.dumps(doc).encode(), S)
    back = json.loads(out)
    assert back == dict(doc, Name="/web")
    assert b'"Name":"/web"' in out and "é".encode() in out  # compact, UTF-8 as the engine writes it
    for odd in ({"Id": "c1", "Name": "/x", "Huge": 2**64 + 1}, {"Id": "c1", "Name": "/x", "S": "\ud800"}):
        raw = json.dumps(odd).encode()
        assert json.loads(rewrite.container_inspect(raw, S)) == odd
    # control: the request side is unchanged, ASCII-only
    assert rewrite.canonical(b'{"Cmd":["\xc3\xa9"]}', shapes.EXEC_CONFIG) == b'{"Cmd":["\\u00e9"]}'


# -- rewrite.load: json.loads's answers, orjson's speed ------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(_JSON, st.booleans())
def test_load_reads_what_json_loads_reads(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(raw)
    except ValueError as e:  # e.g. a lone surrogate written raw: both refuse it alike
        with pytest.raises(type(e)):
            rewrite.load(raw)
        return
    got = rewrite.load(raw)
    assert got == expected and json.dumps(got) == json.dumps(expected)


@pytest.mark.parametrize("raw", [
    b'[NaN, Infinity, -Infinity]',            # json.loads accepts, orjson refuses
    b'{"n": 123456789012345678901234567890}',  # beyond 64 bits
    b'{"s": "\\ud800"}',                      # a lone surrogate, escaped
    '{"a": "\u00e9"}'.encode("utf-16"),       # not UTF-8
    b'{"k": 1, "k": 2}',                      # a repeated key: the last one wins
    b' {"x": [1.5e300, -0, 0.1]} ',
])
def test_load_falls_back_to_json_loads_for_what_orjson_refuses(raw):
    assert json.dumps(rewrite.load(raw)) == json.dumps(json.loads(raw))


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a":}', b"[1,]", b"\xff"])
def test_load_refuses_what_json_loads_refuses(raw):
    with pytest.raises(ValueError) as want:
        json.loads(raw)
    with pytest.raises(type(want.value)):
        rewrite.load(raw)
