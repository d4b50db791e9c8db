"""Go's encoding/json key matching, as the engine decodes bodies."""

import pytest

from authz_plugin import gojson, shapes
from authz_plugin.errors import BadRequest


def dec(body, shape=shapes.CONTAINER_CREATE):
    return gojson.decode(body, shape)


def test_exact_keys_decode():
    out = dec('{"Image":"busybox","HostConfig":{"Privileged":true}}')
    assert out["HostConfig"]["Privileged"] is True


@pytest.mark.parametrize("key", ["hostconfig", "HOSTCONFIG", "hOstConfig", "\\u0048ostConfig"])
def test_case_variants_map_to_the_field(key):
    out = dec('{"%s":{"privileged":true}}' % key)
    assert out["HostConfig"]["Privileged"] is True


def test_go_folds_kelvin_and_long_s_like_k_and_s():
    # "Lin\u212a" is not "Link" for Python's lower(), but it is for Go.
    out = dec('{"HostConfig":{"Lin\u212as":["x"],"\u017fecurityOpt":["y"]}}')
    assert out["HostConfig"]["Links"] == ["x"]
    assert out["HostConfig"]["SecurityOpt"] == ["y"]
    assert gojson.gofold("\u212a") == "k" and gojson.gofold("\u017f") == "s"
    assert gojson.gofold("\u0130") is None  # dotted I folds to nothing ASCII in Go


@pytest.mark.parametrize("body", [
    '{"HostConfig":{"Privileged":false},"hostconfig":{"Privileged":true}}',
    '{"HostConfig":{"Privileged":false,"PRIVILEGED":true}}',
    '{"Image":"a","Image":"b"}',
    '{"Labels":{"a":"1","a":"2"}}',
])
def test_duplicates_are_refused(body):
    with pytest.raises(BadRequest, match="more than once|twice"):
        dec(body)


def test_positive_control_for_duplicates():
    assert dec('{"Labels":{"a":"1","A":"2"}}')["Labels"] == {"a": "1", "A": "2"}  # map keys are exact


@pytest.mark.parametrize("body,match", [
    ('{"Privileged":true}', "deprecated top-level"),
    ('{"Binds":["/:/host"]}', "deprecated top-level"),
    ('{"Cpuset":"0"}', "deprecated top-level"),
    ('{"Privileged":false}', "deprecated top-level"),
])
def test_top_level_host_config_fields_are_refused(body, match):
    with pytest.raises(BadRequest, match=match):
        dec(body)


@pytest.mark.parametrize("body", [
    '{"HostConfig":{"Privileged":"true"}}',  # string where bool expected
    '{"HostConfig":{"PidsLimit":1.5}}',
    '{"HostConfig":{"PidsLimit":1e3}}',
    '{"HostConfig":{"Binds":"/:/x"}}',
    '{"HostConfig":{"Memory":NaN}}',
    '{"Image":"x"} {"HostConfig":{}}',
    '{"Unknown":1}',
    '[]',
    'null',
    '',
])
def test_wrong_types_and_garbage_are_refused(body):
    with pytest.raises(BadRequest):
        dec(body)


def test_strslice_accepts_a_string():
    out = dec('{"HostConfig":{"CapAdd":"SYS_ADMIN"}}')
    assert out["HostConfig"]["CapAdd"] == ["SYS_ADMIN"]


def test_null_is_absent_but_empty_list_is_not():
    out = dec('{"HostConfig":{"MaskedPaths":null,"ReadonlyPaths":[]}}')
    assert out["HostConfig"]["MaskedPaths"] is None
    assert out["HostConfig"]["ReadonlyPaths"] == []


def test_invalid_utf8_refused():
    with pytest.raises(BadRequest, match="UTF-8"):
        dec(b'{"Image":"\xff"}')


def test_deep_nesting_refused_not_crashing():
    deep = '{"HostConfig":{"Sysctls":' + '[' * 5000 + ']' * 5000 + '}}'
    with pytest.raises(BadRequest):
        dec(deep)


@pytest.mark.parametrize("body,expected", [
    ('{"HostConfig":{"SecurityOpt":[null]}}', {"SecurityOpt": [""]}),
    ('{"HostConfig":{"CapAdd":["x"],"LogConfig":{"Config":{"max-size":null}}}}',
     {"CapAdd": ["x"], "LogConfig": {"Config": {"max-size": ""}}}),
    ('{"HostConfig":{"Ulimits":[null],"Binds":["a:/b",null]}}', {"Ulimits": [None], "Binds": ["a:/b", ""]}),
])
def test_null_elements_take_gos_zero_value(body, expected):
    # Go stores "" / 0 / false for a null element of a list or map of
    # scalars; the rules must see that value, never a None they cannot read.
    assert dec(body)["HostConfig"] == expected


def test_null_element_positive_control():
    assert dec('{"HostConfig":{"SecurityOpt":null}}')["HostConfig"] == {"SecurityOpt": None}
