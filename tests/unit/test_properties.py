"""Properties of the pure cores, checked with hypothesis (no real stack).

* the naming scheme (``scoping``): round trips, no collision and no prefix
  between tenants;
* request canonicalisation (``request.parse``): only ``BadRequest`` escapes,
  the scoper's re-serialisation (``handlers._target``) reads back the same,
  and the query is read as Go's ``url.ParseQuery`` reads it;
* ``gojson``: object keys are matched to struct fields exactly as Go 1.19's
  ``encoding/json`` matches them (a port of its ``fold.go`` is the oracle);
  two keys for one field are refused;
* container-create bodies through the name scoper's rewriter and then the
  plugin's rules and ownership check: whatever the plugin allows reaches
  only the caller's resources, and the rewriting keeps the tenant's meaning.

The ownership store is fakeredis (with its Lua), filled the way the
reconciler fills it from an engine snapshot (``reconcile.desired``/``diff``,
``Reconciler.apply``).  "The engine" is :class:`EngineModel`, a transcription
of moby 20.10.24's lookups:

* containers, ``daemon.GetContainer``: full id, then exact name (one leading
  ``/`` ignored), then a unique id prefix (``truncindex``);
* networks, ``daemon.FindNetwork``: full id, then exact name (several: an
  error), then a unique id prefix;
* volumes: exact name; a missing named volume is created;
* legacy links, ``daemon.registerLinks``/``registerLink`` (only when
  ``NetworkMode`` is not user-defined): the engine reserves the container
  name ``path.Join(<parent name>, alias)`` for the link's target;
* ``opts.ParseLink``, ``linuxParser.ParseMountRaw``/``ParseVolumesFrom``.

Two properties found holes, each through the scoper and in plugin-only
mode, both now closed: link aliases that reserved names outside the caller's
(``rules._link_need``), and hex-looking references that the engine resolved
to an unowned resource's name (``fdcs:unowned:<kind>:<host>``, written by the
reconciler).  Their tests keep the counterexamples as explicit ``@example``s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import re
import string
import urllib.parse
from dataclasses import dataclass, field
from types import SimpleNamespace

import fakeredis
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from authz_plugin import endpoints, gojson, rules
from authz_plugin.errors import BadRequest, FdcsError
from authz_plugin.ownership import Store
from authz_plugin.policy import Authorizer
from authz_plugin.request import parse
from authz_plugin.scoping import TENANT_LABEL, is_scoped_for, looks_like_id, scope, unscope, unscope_for, valid_name
from name_scoper import handlers, reconcile, rewrite
from name_scoper.reconciler import Reconciler
from name_scoper.rewrite import Scope

from .conftest import TA, TB, FakeIdentityService, cfg, payload

HEX = "0123456789abcdef"
ALNUM = string.ascii_letters + string.digits
NAME_CHARS = ALNUM + "_.-"
#: moby daemon/names: container and volume names (``RestrictedNamePattern``)
ENGINE_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")

# deadline=None: the machine is shared and slow at times; database=None: no
# example database written into the tree, every run searches afresh
FAST = settings(max_examples=200, deadline=None, database=None)
SLOW = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# == the naming scheme ==========================================================

keystone_ids = st.text(HEX, min_size=32, max_size=32)
tenant_ids = st.one_of(keystone_ids, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", fullmatch=True))
#: every name the engine accepts that the scheme keeps (at most 200 characters)
engine_names = st.builds(str.__add__, st.sampled_from(ALNUM), st.text(NAME_CHARS, min_size=1, max_size=199))
original_names = st.builds(str.__add__, st.sampled_from(ALNUM), st.text(NAME_CHARS, max_size=40))


@st.composite
def tenant_pairs(draw):
    """Two different tenants, often one a prefix of the other."""
    a = draw(tenant_ids)
    how = draw(st.sampled_from(["independent", "longer", "shorter"]))
    if how == "longer" and len(a) < 64:
        b = a + draw(st.text(ALNUM + "-", min_size=1, max_size=64 - len(a)))
    elif how == "shorter" and len(a) > 1:
        b = a[:draw(st.integers(1, len(a) - 1))]
    else:
        b = draw(tenant_ids)
    assume(a != b)
    return a, b


@FAST
@given(tenant_ids, engine_names)
def test_scope_round_trips_for_every_name_the_engine_accepts(tenant, name):
    scoped = scope(tenant, name)
    assert unscope(scoped) == (tenant, name)
    assert is_scoped_for(tenant, scoped)
    assert ENGINE_NAME_RE.fullmatch(scoped), "the engine must accept every scoped name"
    assert not looks_like_id(scoped), "a scoped name must never read as an id prefix"


@FAST
@given(st.one_of(tenant_ids, st.text(max_size=8)), st.one_of(tenant_ids, st.text(max_size=8)),
       st.one_of(st.text(max_size=12), original_names))
def test_unscope_for_answers_what_unscope_answers_for_that_tenant(tenant, other, name):
    """The scoper's per-tenant short cut (rewrite.Scope.original) against the rule itself."""
    for scoped in (f"{tenant}_{name}", f"{other}_{name}", name):
        parts = unscope(scoped)
        assert unscope_for(tenant, scoped) == (parts[1] if parts and parts[0] == tenant else None)


@given(tenant_ids, st.text(NAME_CHARS, min_size=200, max_size=300))
def test_names_longer_than_200_are_refused(tenant, rest):
    name = "a" + rest
    assert ENGINE_NAME_RE.fullmatch(name)  # the engine would accept it ...
    with pytest.raises(ValueError):  # ... but the scheme refuses, with a message
        scope(tenant, name)


@FAST
@given(tenant_ids, st.one_of(st.text(max_size=12), original_names))
def test_scope_accepts_exactly_the_valid_names(tenant, name):
    if valid_name(name):
        assert unscope(scope(tenant, name)) == (tenant, name)
        assert len(name) == 1 or ENGINE_NAME_RE.fullmatch(name)
    else:
        with pytest.raises(ValueError):
            scope(tenant, name)


@FAST
@given(st.one_of(st.text(), st.builds(lambda t, n, s: t + s + n, tenant_ids, original_names,
                                      st.sampled_from(["_", "-", "__", "_/"]))))
def test_unscope_inverts_scope_only(text):
    """A string unscopes only when it is exactly one scoped name."""
    parts = unscope(text)
    if parts is not None:
        assert scope(*parts) == text


@FAST
@given(tenant_pairs(), original_names, original_names, st.booleans())
def test_no_scoped_name_of_one_tenant_equals_or_prefixes_another_tenants(pair, x, y, embed):
    a, b = pair
    if embed:  # b's original name spells a's scoped form, e.g. "<a>_web"
        y = (a + "_" + x)[:200]
    sa, sb = scope(a, x), scope(b, y)
    assert sa != sb
    assert not sb.startswith(sa) and not sa.startswith(sb)
    assert not is_scoped_for(b, sa) and not is_scoped_for(a, sb)
    assert is_scoped_for(a, sa) and is_scoped_for(b, sb)  # positive control


# == request canonicalisation ======================================================

_SEGMENTS = st.one_of(
    st.sampled_from(["containers", "json", "create", "networks", "volumes", "exec", "start", "web",
                     "T_web", "", ".", "..", "%2e", "%2E%2e", "%2F", "%2f%2f", "a%20b", "%41b", "%zz", "%4",
                     "%", "ü", "%C3%BC", "%FF", "%00", "+", "a+b", "%3F", "%23", ";", "%3B", "~", "@", "_ping",
                     "version"]),
    st.text(ALNUM + "%._-~+;=:@!$&'()*,", max_size=6),
)
_QUERY_PARTS = st.one_of(
    st.sampled_from(["name=web", "name=%2Fweb", "all=1", "filters=%7B%7D", "a=1&a=2", "=x", "x", "",
                     "a%3Db=c", "q=a+b", "q=%2B", "q=%zz", "q=%", "k;v", "q=%C3%BC", "q=%FF", "&&"]),
    st.text(ALNUM + "%+=&;./", max_size=8),
)
_VERSIONS = st.sampled_from(["/v1.41", "/v1.40", "/v1.12", "/v1.041", "/v1.41.0", "/v2.0", "/v1.4", "/v1.",
                             "/v", "/v1.999", "/v1.1000", ""])


@st.composite
def request_uris(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=30))
    path = draw(_VERSIONS) + "/" + "/".join(draw(st.lists(_SEGMENTS, min_size=1, max_size=5)))
    if draw(st.booleans()):
        path += "?" + "&".join(draw(st.lists(_QUERY_PARTS, max_size=4)))
    return path


_CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "",
                     "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "json",
                     "application/json;", "a/b; c", "APPLICATION/JSON", "application/json\r\nX: y"]),
    st.text(max_size=20),
)


def _parse(method, uri, content_type=None):
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return parse(method, uri, headers, None, "1.12", "9.99")


def go_unescape_query(s: str) -> bytes:
    """Go's ``url.QueryUnescape`` (mode encodeQueryComponent), on bytes."""
    raw, out, i = s.encode(), bytearray(), 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25:
            h = raw[i + 1:i + 3]
            if len(h) < 2 or any(x not in HEX.encode() + b"ABCDEF" for x in h):
                raise ValueError("invalid URL escape")
            out.append(int(h, 16))
            i += 3
        else:
            out.append(0x20 if c == 0x2B else c)
            i += 1
    return bytes(out)


def go_parse_query(query: str) -> tuple[dict[bytes, list[bytes]], bool]:
    """Go 1.19's ``url.ParseQuery``: the values and whether it reported an error."""
    values: dict[bytes, list[bytes]] = {}
    failed = False
    for key in query.split("&"):
        if ";" in key:
            failed = True
            continue
        if key == "":
            continue
        key, _, value = key.partition("=")
        try:
            k, v = go_unescape_query(key), go_unescape_query(value)
        except ValueError:
            failed = True
            continue
        values.setdefault(k, []).append(v)
    return values, failed


@FAST
@given(st.sampled_from(sorted(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "get"])), request_uris(),
       _CONTENT_TYPES)
def test_canonicalisation_fails_only_with_bad_request(method, uri, content_type):
    try:
        req = _parse(method, uri, content_type)
    except BadRequest as e:
        assert str(e)  # a message the tenant can act on
        return
    # what the plugin accepts is clean: the engine routes it without redirecting
    assert req.path.startswith("/") and "//" not in req.path and "/./" not in req.path
    assert "/../" not in req.path and not req.path.endswith(("/.", "/.."))
    assert req.path == "/" or not req.path.endswith("/")
    assert req.version is None or re.fullmatch(r"1\.(0|[1-9][0-9]{0,2})", req.version)


@FAST
@given(st.sampled_from(["GET", "POST", "DELETE"]), request_uris())
@example("GET", "/v1.41/containers/a%2Fb/json?name=%2Fweb&q=a+b")
@example("GET", "/v1.41/containers/%3F%23%25/json?=x&k")
def test_canonical_form_reads_back_the_same(method, uri):
    """The scoper forwards ``_target(req)``; the plugin must read exactly
    the request the scoper read."""
    try:
        req = _parse(method, uri)
    except BadRequest:
        return
    target = handlers._target(req.version, req.path, list(req.query))
    again = _parse(method, target)
    assert (again.path, again.version, again.query) == (req.path, req.version, req.query)
    assert handlers._target(again.version, again.path, list(again.query)) == target


@FAST
@given(st.lists(_QUERY_PARTS, max_size=5).map("&".join))
def test_query_is_read_as_go_reads_it(query):
    go, go_failed = go_parse_query(query)
    try:
        req = _parse("GET", "/v1.41/containers/json?" + query)
    except BadRequest:
        return  # refused: fine whatever Go would have done
    assert not go_failed, "Go would have answered 400 to a query the plugin accepted"
    mine: dict[bytes, list[bytes]] = {}
    for k, v in req.query:
        mine.setdefault(k.encode(), []).append(v.encode())
    assert mine == go
    for k, vs in go.items():  # the value the engine reads is the first one
        assert req.q(k.decode()) == vs[0].decode()


# == gojson: Go's case-insensitive field matching ======================================

_CASE_MASK = 0xDF
_KELVIN, _LONG_S = "\u212a", "\u017f"


def _go_equal_fold_right(s: bytes, t: bytes) -> bool:
    """Go 1.19 encoding/json fold.go ``equalFoldRight``."""
    i = 0
    for sb in s:
        if i >= len(t):
            return False
        tb = t[i]
        if tb < 0x80:
            if sb != tb:
                sb_upper = sb & _CASE_MASK
                if not (0x41 <= sb_upper <= 0x5A) or sb_upper != tb & _CASE_MASK:
                    return False
            i += 1
            continue
        # a multi-byte rune: only KELVIN SIGN for k and LONG S for s
        rune = None
        for n in (2, 3, 4):
            try:
                rune = t[i:i + n].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        if rune is None or len(rune) != 1:
            return False
        if chr(sb) in "sS":
            if rune != _LONG_S:
                return False
        elif chr(sb) in "kK":
            if rune != _KELVIN:
                return False
        else:
            return False
        i += len(rune.encode())
    return i == len(t)


def _go_ascii_equal_fold(s: bytes, t: bytes) -> bool:
    if len(s) != len(t):
        return False
    for sb, tb in zip(s, t):
        if sb == tb:
            continue
        if chr(sb).isascii() and chr(sb).isalpha():
            if sb & _CASE_MASK != tb & _CASE_MASK:
                return False
        else:
            return False
    return True


def _go_simple_letter_equal_fold(s: bytes, t: bytes) -> bool:
    return len(s) == len(t) and all(sb & _CASE_MASK == tb & _CASE_MASK for sb, tb in zip(s, t))


def go_fold_func(name: bytes):
    """Go 1.19 encoding/json fold.go ``foldFunc`` (field names are ASCII here)."""
    non_letter = special = False
    for b in name:
        assert b < 0x80
        upper = b & _CASE_MASK
        if upper < 0x41 or upper > 0x5A:
            non_letter = True
        elif upper in (0x4B, 0x53):
            special = True
    if special:
        return _go_equal_fold_right
    if non_letter:
        return _go_ascii_equal_fold
    return _go_simple_letter_equal_fold


def go_field_for(names: list[str], key: str) -> str | None:
    """The field Go's decoder fills for ``key``: an exact match, else the
    first field whose fold function matches."""
    kb = key.encode("utf-8", "surrogatepass")
    if key in names:
        return key
    for n in names:
        if go_fold_func(n.encode())(n.encode(), kb):
            return n
    return None


def _all_field_names() -> list[str]:
    from authz_plugin import shapes
    seen: dict[str, str] = {}
    for value in vars(shapes).values():
        if isinstance(value, gojson.Struct):
            for f in value.fields.values():
                seen.setdefault(f.name.lower(), f.name)
    return sorted(seen.values())


FIELD_NAMES = _all_field_names()


@st.composite
def key_variant(draw, name: str) -> str:
    """``name`` as a client might spell it: any casing, the two non-ASCII
    letters Go folds onto k and s, or a look-alike Go does not fold."""
    out = []
    for ch in name:
        choices = [ch.lower(), ch.upper()]
        if ch in "kK":
            choices.append(_KELVIN)
        if ch in "sS":
            choices.append(_LONG_S)
        if ch in "iI":
            choices += ["\u0131", "\u0130"]  # dotless i, dotted I: not folded by Go
        out.append(draw(st.sampled_from(choices)) if draw(st.integers(0, 3)) else ch)
    return "".join(out)


@st.composite
def keyed_bodies(draw):
    names = draw(st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=5, unique=True))
    keys = []
    for _ in range(draw(st.integers(1, 6))):
        keys.append(draw(key_variant(draw(st.sampled_from(names)))))
    if draw(st.integers(0, 5)) == 0:
        keys.append(draw(st.text(max_size=8)))
    values = [f"v{i}" for i in range(len(keys))]
    ascii_only = draw(st.booleans())
    body = "{" + ",".join(json.dumps(k, ensure_ascii=ascii_only) + ":" + json.dumps(v)
                          for k, v in zip(keys, values)) + "}"
    return names, keys, values, body


@FAST
@given(keyed_bodies())
@example((["Links", "Isolation"], ["LINKS", "lin\u212as"], ["v0", "v1"], '{"LINKS":"v0","lin\\u212as":"v1"}'))
@example((["Privileged"], ["Pr\u0131vileged"], ["v0"], '{"Pr\u0131vileged":"v0"}'))
def test_keys_match_fields_as_go_matches_them(case):
    names, keys, values, body = case
    shape = gojson.Struct("T", [gojson.Field(n, gojson.STR) for n in names])
    targets = [go_field_for(names, k) for k in keys]
    if None in targets or len(set(targets)) < len(targets):
        # Go ignores an unknown key and lets the last of two keys win:
        # both are refused, so that the plugin never reads another value
        with pytest.raises(BadRequest):
            gojson.decode(body, shape)
        return
    assert gojson.decode(body, shape) == dict(zip(targets, values))


@FAST
@given(st.lists(st.tuples(st.text(ALNUM + "._-", min_size=1, max_size=4), st.text(max_size=3)), max_size=5))
def test_map_keys_are_exact_and_a_repeated_one_is_refused(pairs):
    body = "{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in pairs) + "}"
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        with pytest.raises(BadRequest):
            gojson.Map(gojson.STR).decode(gojson.parse(body), "Labels")
    else:  # case variants are different labels, for Go as here
        assert gojson.Map(gojson.STR).decode(gojson.parse(body), "Labels") == dict(pairs)


# == create bodies: scoper -> plugin -> engine ===========================================

CALLER, OTHER, THIRD = TA, TB, "c" * 32
TENANTS = (CALLER, OTHER, THIRD)
#: names an administrator may well give that read as hex (and so as id prefixes)
HEX_NAMES = ["db", "cafe", "ab", "abc", "add", "0a", "20240101"]
ID_HEADS = ["a", "ab", "abc", "cafe", "db", "0", "7"]
ORIGINALS = ["web", "db", "cafe", "api", "x.y", "ab", "a-1", f"{OTHER}_web", f"{CALLER}_web"]

NOT_FOUND = object()
AMBIGUOUS = object()


@dataclass(frozen=True)
class Res:
    kind: str
    id: str
    name: str
    owner: str | None  # None: unowned (an administrator's, or predefined)


@dataclass
class EngineModel:
    """One engine's resources and moby 20.10's way of finding them."""

    containers: list[Res] = field(default_factory=list)
    networks: list[Res] = field(default_factory=list)
    volumes: list[Res] = field(default_factory=list)

    def container(self, ref: str):
        if not ref:
            return NOT_FOUND
        for c in self.containers:
            if c.id == ref:
                return c
        name = ref[1:] if ref.startswith("/") else ref
        for c in self.containers:
            if c.name == name:
                return c
        hits = [c for c in self.containers if c.id.startswith(ref)]
        return hits[0] if len(hits) == 1 else AMBIGUOUS if hits else NOT_FOUND

    def network(self, ref: str):
        for n in self.networks:
            if n.id == ref:
                return n
        by_name = [n for n in self.networks if n.name == ref]
        if by_name:
            return by_name[0] if len(by_name) == 1 else AMBIGUOUS
        hits = [n for n in self.networks if n.id.startswith(ref)]
        return hits[0] if len(hits) == 1 else AMBIGUOUS if hits else NOT_FOUND

    def volume(self, name: str):
        for v in self.volumes:
            if v.name == name:
                return v
        return NOT_FOUND

    def lookup(self, kind: str, ref: str):
        return {"container": self.container, "network": self.network, "volume": self.volume}[kind](ref)

    def snapshot(self) -> reconcile.Snapshot:
        def labels(r):
            return {TENANT_LABEL: r.owner} if r.owner else {}
        return reconcile.Snapshot(
            containers=[{"Id": c.id, "Name": c.name, "Labels": labels(c), "ImageLabels": {}, "ExecIDs": [],
                         "Volumes": []} for c in self.containers],
            networks=[{"Id": n.id, "Name": n.name, "Labels": labels(n)} for n in self.networks],
            volumes=[{"Name": v.name, "Labels": labels(v)} for v in self.volumes])


@st.composite
def engines(draw, unowned_hex: bool = True) -> EngineModel:
    """A random engine: each tenant's containers, networks and volumes, ids
    that share prefixes across tenants, the predefined networks and
    unowned resources (with ``unowned_hex``, some named like "db" or "cafe",
    names the engine also reads as id prefixes)."""
    count = iter(range(1000))

    def new_id() -> str:
        # the drawn head makes ids share prefixes; the tail only makes them unique
        head = draw(st.sampled_from(ID_HEADS))
        return head + hashlib.sha256(str(next(count)).encode()).hexdigest()[:64 - len(head)]

    e = EngineModel()
    for t in TENANTS:
        for orig in draw(st.lists(st.sampled_from(ORIGINALS), max_size=3, unique=True)):
            e.containers.append(Res("container", new_id(), scope(t, orig), t))
        for orig in draw(st.lists(st.sampled_from(["backend", "cafe", "db", "net1"]), max_size=2, unique=True)):
            e.networks.append(Res("network", new_id(), scope(t, orig), t))
        for orig in draw(st.lists(st.sampled_from(["data", "cafe", "logs"]), max_size=2, unique=True)):
            e.volumes.append(Res("volume", scope(t, orig), scope(t, orig), t))
    # the scoper makes sure the caller's default network exists before a create
    e.networks.append(Res("network", new_id(), scope(CALLER, rewrite.DEFAULT_NETWORK), CALLER))
    for name in ("bridge", "host", "none"):
        e.networks.append(Res("network", new_id(), name, None))
    # an administrator's resources: unlabelled, often with hex-looking names
    hex_names = HEX_NAMES if unowned_hex else []
    for name in draw(st.lists(st.sampled_from(hex_names + ["admin-tool", "admin_db"]), max_size=2, unique=True)):
        e.containers.append(Res("container", new_id(), name, None))
    for name in draw(st.lists(st.sampled_from(hex_names + ["admin-net"]), max_size=1, unique=True)):
        e.networks.append(Res("network", new_id(), name, None))
    anon = new_id()
    e.volumes.append(Res("volume", anon, anon, None))
    e.volumes.append(Res("volume", "shared", "shared", None))
    return e


def _store(engine: EngineModel) -> Store:
    """A store after the reconciler's full pass over ``engine`` (the model
    stands in for the engine's API)."""
    store = Store(fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True), host="h1")
    reconciler = Reconciler(None, store)
    reconciler.snapshot = engine.snapshot
    reconciler.full()
    return store


# -- what the engine reads in a create body -----------------------------------------


def go_parse_link(val: str) -> tuple[str, str] | None:
    """moby opts.ParseLink: (name, alias), None where the engine errors."""
    if val == "":
        return None
    arr = val.split(":")
    if len(arr) > 2:
        return None
    if len(arr) == 1:
        return val, val
    if arr[0].startswith("/"):
        return arr[0][1:], arr[1].rsplit("/", 1)[-1]  # path.Split: the last element
    return arr[0], arr[1]


def go_join(parent: str, alias: str) -> str:
    """Go's path.Join(parent, alias) for a parent "/<name>": posixpath's
    normpath cleans a path with one leading "/" exactly as path.Clean does."""
    return posixpath.normpath(parent + "/" + alias) if alias else parent


def _user_defined(mode: str) -> bool:
    """moby NetworkMode.IsUserDefined."""
    return mode not in ("default", "bridge", "host", "none") and not (
        mode.split(":", 1)[0] == "container" and ":" in mode)


def engine_reads(body: dict, name: str | None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The references the engine resolves in a create body, as
    ``(kind, ref, field)`` (kind ``host`` for a host path), and the
    container names it reserves (the container's own and legacy link names)."""
    refs: list[tuple[str, str, str]] = []
    hc = body.get("HostConfig") or {}
    mode = hc.get("NetworkMode") or ""
    if mode.split(":", 1)[0] == "container" and ":" in mode:
        refs.append(("container", mode.split(":", 1)[1], "NetworkMode"))
    elif mode in ("", "default", "bridge", "host"):
        refs.append(("network", "host" if mode == "host" else "bridge", "NetworkMode"))
    elif mode != "none":
        refs.append(("network", mode, "NetworkMode"))
    for key in ("PidMode", "IpcMode"):
        v = hc.get(key) or ""
        if v.split(":", 1)[0] == "container" and ":" in v:
            refs.append(("container", v.split(":", 1)[1], key))
    for vf in hc.get("VolumesFrom") or []:
        refs.append(("container", vf.split(":", 1)[0], "VolumesFrom"))
    links = [go_parse_link(link) for link in hc.get("Links") or []]
    for parsed in links:
        if parsed:
            refs.append(("container", parsed[0], "Links"))
    for net, ep in ((body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}).items():
        if net != "none":
            refs.append(("network", "bridge" if net == "default" else net, "EndpointsConfig"))
        for link in (ep or {}).get("Links") or []:
            parsed = go_parse_link(link)
            if parsed:
                refs.append(("container", parsed[0], "EndpointsConfig.Links"))
    for spec in hc.get("Binds") or []:
        arr = spec.split(":")
        if len(arr) >= 2 and arr[0]:
            refs.append(("host" if arr[0].startswith("/") else "volume", arr[0], "Binds"))
    for m in hc.get("Mounts") or []:
        m = m or {}
        if m.get("Type") == "bind":
            refs.append(("host", m.get("Source") or "", "Mounts"))
        elif m.get("Type") == "volume" and m.get("Source"):
            refs.append(("volume", m["Source"], "Mounts"))
    reserved: list[str] = []
    parent = "/" + (name or "generated_name")  # the engine names an unnamed container adjective_surname
    if name:
        reserved.append(parent)
    if not _user_defined(mode):
        for parsed in links:
            if parsed:
                reserved.append(go_join(parent, parsed[1]))
    return refs, reserved


def foreign(engine: EngineModel, caller: str, refs, reserved, name: str | None) -> list[str]:
    """What in the engine's reading of a create body is not ``caller``'s."""
    bad = []
    for kind, ref, where in refs:
        if kind == "host":
            bad.append(f"{where}: host path {ref}")
            continue
        target = engine.lookup(kind, ref)
        if target is NOT_FOUND:
            if kind == "volume" and not is_scoped_for(caller, ref):
                bad.append(f"{where}: creates volume {ref!r} outside the caller's names")
        elif target is AMBIGUOUS:
            pass  # the engine answers an error
        elif target.owner != caller:
            bad.append(f"{where}: {ref!r} is {target.kind} {target.name} of {target.owner or 'nobody (unowned)'}")
    parent = "/" + (name or "generated_name")
    for r in reserved:
        if r == parent:
            if name and not is_scoped_for(caller, name):
                bad.append(f"the container is named {name!r}")
        elif not r.startswith(parent + "/"):
            bad.append(f"a link reserves the container name {r!r}, outside its parent {parent!r}")
    return bad


# -- references a tenant might write ---------------------------------------------------


@st.composite
def container_refs(draw, e: EngineModel, scoped: bool):
    """A container reference as the caller might write it: its own names
    (original, or scoped when it talks to the engine directly), others'
    scoped names, unowned names, id prefixes of anyone's."""
    pool = [c.name for c in e.containers if c.owner != CALLER]
    pool += [c.name if scoped else unscope(c.name)[1] for c in e.containers if c.owner == CALLER]
    pool += HEX_NAMES + ["web", "nobody"]
    ids = [c.id for c in e.containers] + ["f" * 64]
    kind = draw(st.integers(0, 2))
    if kind == 0 and pool:
        ref = draw(st.sampled_from(sorted(pool)))
    else:
        cid = draw(st.sampled_from(ids))
        ref = cid[:draw(st.sampled_from([1, 2, 3, 4, 6, 12, 64]))]
    return ("/" if draw(st.integers(0, 5)) == 0 else "") + ref


@st.composite
def network_refs(draw, e: EngineModel, scoped: bool):
    pool = [n.name for n in e.networks if n.owner != CALLER]
    pool += [n.name if scoped else unscope(n.name)[1] for n in e.networks if n.owner == CALLER]
    pool += ["default", "bridge", "none", "host", "nowhere"]
    if draw(st.integers(0, 2)):
        return draw(st.sampled_from(sorted(pool)))
    nid = draw(st.sampled_from([n.id for n in e.networks]))
    return nid[:draw(st.sampled_from([1, 2, 3, 4, 12, 64]))]


@st.composite
def volume_refs(draw, e: EngineModel, scoped: bool):
    pool = [v.name for v in e.volumes if v.owner != CALLER]
    pool += [v.name if scoped else unscope(v.name)[1] for v in e.volumes if v.owner == CALLER]
    pool += ["fresh", "/etc", "/var/run/docker.sock"]
    return draw(st.sampled_from(sorted(pool)))


ALIASES = ["alias", "db", f"../{OTHER}_web", f"x/../../{OTHER}_api", "..", ".", "a/b", f"/{OTHER}_web"]


@st.composite
def link_specs(draw, e, scoped):
    ref = draw(container_refs(e, scoped))
    how = draw(st.integers(0, 2))
    if how == 0:
        return ref
    return ref + ":" + draw(st.sampled_from(ALIASES))


@st.composite
def create_requests(draw, e: EngineModel, scoped: bool):
    """(name, body): a container create as a tenant sends it; ``scoped``:
    straight to the engine (scoped names, the label, a pids limit written by
    the tenant), else through the name scoper (original names)."""
    hc: dict = {}
    mode = draw(st.one_of(st.sampled_from(["", "default", "bridge", "none", "host"]),
                          network_refs(e, scoped),
                          container_refs(e, scoped).map(lambda r: "container:" + r)))
    if mode:
        hc["NetworkMode"] = mode
    if draw(st.booleans()):
        hc["Links"] = draw(st.lists(link_specs(e, scoped), min_size=1, max_size=2))
    if draw(st.integers(0, 2)) == 0:
        hc["VolumesFrom"] = [r + draw(st.sampled_from(["", ":ro"])) for r in
                             draw(st.lists(container_refs(e, scoped), min_size=1, max_size=2))]
    for key in ("PidMode", "IpcMode"):
        if draw(st.integers(0, 4)) == 0:
            hc[key] = "container:" + draw(container_refs(e, scoped))
    if draw(st.booleans()):
        hc["Binds"] = [v + ":/m" + str(i) + draw(st.sampled_from(["", ":ro"]))
                       for i, v in enumerate(draw(st.lists(volume_refs(e, scoped), min_size=1, max_size=2)))]
    if draw(st.integers(0, 2)) == 0:
        hc["Mounts"] = [{"Type": draw(st.sampled_from(["volume", "volume", "bind", "tmpfs"])),
                         "Source": v, "Target": f"/n{i}"}
                        for i, v in enumerate(draw(st.lists(volume_refs(e, scoped), min_size=1, max_size=2)))]
        for m in hc["Mounts"]:
            if m["Type"] == "tmpfs":
                del m["Source"]
    body: dict = {"Image": "busybox", "HostConfig": hc}
    if draw(st.booleans()):
        nets = draw(st.lists(network_refs(e, scoped), min_size=1, max_size=2, unique=True))
        body["NetworkingConfig"] = {"EndpointsConfig": {
            n: ({"Links": draw(st.lists(link_specs(e, scoped), max_size=1))} if draw(st.booleans()) else {})
            for n in nets}}
    name = draw(st.sampled_from([None, "web", "fresh", f"{OTHER}_x"]))
    if scoped:
        hc["PidsLimit"] = 100
        hc["CgroupnsMode"] = "private"
        body["Labels"] = {TENANT_LABEL: CALLER}
        if name is not None and draw(st.integers(0, 4)):
            name = scope(CALLER, name)
    return name, body


# -- the two paths --------------------------------------------------------------------


def plugin_decides(store: Store, name: str | None, body: bytes) -> tuple[bool, list[rules.Need]]:
    """The plugin's decision on a create as the engine forwards it, and the
    references its rules ask the store about."""
    uri = "/v1.41/containers/create" + ("?name=" + urllib.parse.quote(name, safe="") if name is not None else "")
    authz = Authorizer(cfg(), FakeIdentityService(), store)
    allowed = authz.authz_request(payload("POST", uri, body=body))["Allow"]
    needs: list[rules.Need] = []
    try:
        req = parse("POST", uri, {"Content-Type": "application/json"}, base64.b64encode(body).decode())
        ep = endpoints.match(req.method, req.path)
        needs = rules.plan(req, ep, {}, CALLER, authz.policy).needs
    except FdcsError:
        assert not allowed
    return allowed, needs


def scoper_rewrites(store: Store, name: str | None, body: dict) -> tuple[str | None, bytes] | None:
    """What the name scoper forwards for a tenant's create (None: it refused)."""
    scope_ = Scope(CALLER)
    ctx = SimpleNamespace(store=store)
    try:
        scoped_name = scope_.name(name.lstrip("/")) if name else None
        out, _ = rewrite.container_create(json.dumps(body).encode(), scope_, name, 512,
                                          lambda kind, ref: handlers._resolve(ctx, scope_, kind, ref))
    except BadRequest:
        return None
    return scoped_name, out


@st.composite
def cases(draw, scoped: bool, unowned_hex: bool = True):
    """(engine, name, body): a tenant's create against a random engine."""
    e = draw(engines(unowned_hex))
    name, body = draw(create_requests(e, scoped))
    return e, name, body


def _allowed_reading(e: EngineModel, name, body: dict, scoped: bool):
    """The body the engine reads (decoded), the container name and the
    plugin's needs, when the plugin allows the create; None when refused
    (by the scoper or the plugin)."""
    store = _store(e)
    if scoped:
        forwarded = (name, json.dumps(body).encode())
    else:
        forwarded = scoper_rewrites(store, name, body)
        if forwarded is None:
            return None
    fname, out = forwarded
    allowed, needs = plugin_decides(store, fname, out)
    return (json.loads(out), fname, needs) if allowed else None


def check_only_callers(e: EngineModel, name, body: dict, scoped: bool, link_names: bool) -> None:
    got = _allowed_reading(e, name, body, scoped)
    if got is None:
        return
    doc, fname, needs = got
    refs, reserved = engine_reads(doc, fname)
    bad = foreign(e, CALLER, refs, reserved if link_names else [], fname)
    assert not bad, f"allowed, yet the engine reaches: {bad}\nbody: {json.dumps(doc)}"
    # the rules asked about every container and network the engine resolves ...
    asked = {(n.kind, n.ref.lstrip("/")) for n in needs}
    for kind, ref, where in refs:
        if kind in ("container", "network"):
            assert (kind, ref.lstrip("/")) in asked, f"{where}: {kind} {ref!r} was never checked"
    # ... and each of those is the caller's (or missing / ambiguous: an engine error)
    for n in needs:
        target = e.lookup(n.kind, n.ref)
        assert target in (NOT_FOUND, AMBIGUOUS) or target.owner == CALLER, (n, target)


@SLOW
@given(cases(scoped=False, unowned_hex=False))
def test_through_the_scoper_the_plugin_allows_only_the_callers_references(case):
    """Containers, networks, volumes and host paths (link names: see below),
    on an engine whose unowned resources have names that do not read as hex."""
    check_only_callers(*case, scoped=False, link_names=False)


@SLOW
@given(cases(scoped=True, unowned_hex=False))
def test_plugin_only_allows_only_the_callers_references(case):
    check_only_callers(*case, scoped=True, link_names=False)


def _engine(*resources: Res) -> EngineModel:
    e = EngineModel()
    for r in resources:
        getattr(e, r.kind + "s").append(r)
    return e


_DB_NAMED_ENGINE = _engine(
    Res("container", "db" + "1" * 62, f"{CALLER}_web", CALLER),
    Res("container", "db" + "2" * 62, f"{CALLER}_api", CALLER),
    Res("container", "e" * 64, "db", None),  # an administrator's container named "db"
    Res("network", "f" * 64, f"{CALLER}_bridge", CALLER))
@SLOW
@given(cases(scoped=False))
@example((_DB_NAMED_ENGINE, "x", {"Image": "busybox", "HostConfig": {"NetworkMode": "none", "VolumesFrom": ["db"]}}))
def test_through_the_scoper_hex_references_never_reach_unowned_names(case):
    check_only_callers(*case, scoped=False, link_names=False)


@SLOW
@given(cases(scoped=True))
@example((_DB_NAMED_ENGINE, None, {"Image": "busybox", "Labels": {TENANT_LABEL: CALLER},
                                   "HostConfig": {"NetworkMode": "none", "PidsLimit": 100, "CgroupnsMode": "private", "VolumesFrom": ["db"]}}))
def test_plugin_only_hex_references_never_reach_unowned_names(case):
    check_only_callers(*case, scoped=True, link_names=False)


_ALIAS_ENGINE = _engine(Res("container", "ab" + "1" * 62, f"{CALLER}_db", CALLER),
                        Res("network", "cd" + "2" * 62, f"{CALLER}_bridge", CALLER))
@SLOW
@given(cases(scoped=False, unowned_hex=False))
@example((_ALIAS_ENGINE, "web", {"Image": "busybox", "HostConfig": {"NetworkMode": "none",
                                                                   "Links": [f"db:../{OTHER}_web"]}}))
def test_through_the_scoper_link_aliases_reserve_names_only_under_their_container(case):
    check_only_callers(*case, scoped=False, link_names=True)


@SLOW
@given(cases(scoped=True, unowned_hex=False))
@example((_ALIAS_ENGINE, f"{CALLER}_web", {
    "Image": "busybox", "Labels": {TENANT_LABEL: CALLER},
    "HostConfig": {"NetworkMode": "none", "PidsLimit": 100, "CgroupnsMode": "private", "Links": [f"{CALLER}_db:x/../../{OTHER}_web"]}}))
def test_plugin_only_link_aliases_reserve_names_only_under_their_container(case):
    check_only_callers(*case, scoped=True, link_names=True)


# -- positive control: the scoper keeps the tenant's meaning, and the plugin agrees --


def tenant_view(e: EngineModel) -> EngineModel:
    """The caller's resources under their original names: the private engine
    the tenant believes it talks to (its default network is "bridge")."""
    def mine(rs):
        return [Res(r.kind, r.id if r.kind != "volume" else unscope(r.name)[1], unscope(r.name)[1], CALLER)
                for r in rs if r.owner == CALLER]
    return EngineModel(mine(e.containers), mine(e.networks), mine(e.volumes))


def _own_refs(e: EngineModel, view: EngineModel, kind: str) -> list[str]:
    """References that name one of the caller's ``kind`` unambiguously in
    its own view: original names, full ids, prefixes unique among its own."""
    out = []
    for r in getattr(view, kind + "s"):
        out.append(r.name)
        if kind != "volume":
            out += [r.id[:k] for k in (1, 2, 3, 4, 12, 64) if view.lookup(kind, r.id[:k]) == r]
    return sorted(set(out))


@st.composite
def own_cases(draw):
    e = draw(engines())
    view = tenant_view(e)
    containers = _own_refs(e, view, "container")
    networks = [r for r in _own_refs(e, view, "network") if r != rewrite.DEFAULT_NETWORK]
    volumes = _own_refs(e, view, "volume")
    hc: dict = {"NetworkMode": draw(st.sampled_from(
        ["default", "bridge", "none"] + networks + ["container:" + c for c in containers]))}
    if containers and not hc["NetworkMode"].startswith("container:") and draw(st.booleans()):
        hc["Links"] = [c + ":alias" + str(i) for i, c in enumerate(draw(st.lists(st.sampled_from(containers),
                                                                                   min_size=1, max_size=2)))]
    if containers and draw(st.booleans()):
        hc["VolumesFrom"] = draw(st.lists(st.sampled_from(containers), min_size=1, max_size=2))
    if containers and draw(st.booleans()):
        hc["PidMode"] = "container:" + draw(st.sampled_from(containers))
    if volumes and draw(st.booleans()):
        hc["Binds"] = [v + f":/m{i}:ro" for i, v in enumerate(draw(st.lists(st.sampled_from(volumes),
                                                                            min_size=1, max_size=2)))]
    body = {"Image": "busybox", "HostConfig": hc}
    if networks and hc["NetworkMode"] not in ("none",) and not hc["NetworkMode"].startswith("container:") \
            and draw(st.booleans()):
        body["NetworkingConfig"] = {"EndpointsConfig": {n: {} for n in draw(st.lists(
            st.sampled_from(networks), min_size=1, max_size=2, unique=True))}}
    return e, draw(st.sampled_from([None, "web", "fresh"])), body


def _targets(model: EngineModel, doc: dict, name) -> set:
    refs, _ = engine_reads(doc, name)
    out = set()
    for kind, ref, _where in refs:
        t = model.lookup(kind, ref)
        assert t not in (NOT_FOUND, AMBIGUOUS), (kind, ref)
        out.add((kind, t.id))
    return out


@SLOW
@given(own_cases())
def test_the_scoper_keeps_the_tenants_meaning_and_the_plugin_allows_it(case):
    """Positive control for the properties above: a create that names only
    the caller's own resources -- by original name, full id or an id prefix
    unique among its own, on an engine where other tenants' ids share those
    prefixes and unowned resources have hex names -- is allowed, and the
    engine reaches exactly what the tenant meant in its own view."""
    e, name, body = case
    got = _allowed_reading(e, name, body, scoped=False)
    assert got is not None, "the plugin refused a create that names only the caller's own resources"
    doc, fname, _ = got
    meant = _targets(tenant_view(e), body, name)
    reached = _targets(e, doc, fname)
    # volumes: the engine's name is the scoped one, the view's the original
    assert {t for t in reached if t[0] != "volume"} == {t for t in meant if t[0] != "volume"}
    assert {(k, unscope(i)[1]) for k, i in reached if k == "volume"} == {t for t in meant if t[0] == "volume"}
