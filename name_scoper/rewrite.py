"""Pure rewriting of names between a tenant's view and the engine's.

A :class:`Scope` is bound to one tenant.  Requests go *in* (original name ->
scoped name, labels injected, the tenant filter merged); responses come
*out* (scoped name -> original name, foreign items dropped).  Everything here
is data to data; the lookups that need Redis or the engine happen in
``handlers.py`` and reach these functions as arguments.

Bodies are decoded with the plugin's Go-faithful decoder (``gojson`` and
``shapes``) and re-encoded with canonical keys, so the engine -- and the
plugin behind it -- read exactly the body that was rewritten; anything the
decoder refuses is refused here too (400) before the engine sees it.

The scheme itself lives in ``authz_plugin.scoping``; this module only
applies it field by field (API-POLICY.md, "Name-bearing fields").
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable

import orjson

from authz_plugin import gojson, shapes
from authz_plugin.errors import BadRequest
from authz_plugin.scoping import (LABEL_PREFIX, NAME_LABEL, TENANT_LABEL, looks_like_id, scope, unscope_for,
                                  valid_name)

DEFAULT_NETWORK = "bridge"  # the name tenants see for their own default network
_DEFAULT_MODES = ("", "default", "bridge")


class Scope:
    """Name translation for one tenant."""

    def __init__(self, tenant: str):
        self.tenant = tenant
        self.prefix = tenant + "_"
        self._scoped_re: re.Pattern | None = None  # built by text(), which few answers need

    # -- in -------------------------------------------------------------------
    def name(self, name: str) -> str:
        """The scoped form of an original name (ValueError when invalid)."""
        try:
            return scope(self.tenant, name)
        except ValueError:
            raise BadRequest(f"invalid name {name!r}: use letters, digits, '_', '.' and '-'") from None

    def ref(self, ref: str) -> str:
        """An original-name-or-id reference with no lookup: hex stays (the
        handler resolves those), anything else is scoped."""
        if looks_like_id(ref):
            return ref
        return self.name(ref)

    @property
    def default_network(self) -> str:
        return scope(self.tenant, DEFAULT_NETWORK)

    def network_ref(self, ref: str) -> str:
        return self.default_network if ref in ("bridge", "default") else self.ref(ref)

    # -- out ------------------------------------------------------------------
    def original(self, scoped: str) -> str | None:
        """The original name of one of this tenant's scoped names, else None."""
        return unscope_for(self.tenant, scoped)

    def out(self, name: str) -> str:
        """A name for display: the caller's scoped names unscoped, others kept."""
        orig = self.original(name)
        return orig if orig is not None else name

    def out_path(self, name: str) -> str:
        """``/T_web`` -> ``/web``; link names ``/T_web/T_db`` -> ``/web/db``."""
        lead = "/" if name.startswith("/") else ""
        return lead + "/".join(self.out(part) for part in name.lstrip("/").split("/"))

    def text(self, message: str) -> str:
        """Unscope every scoped name of this tenant inside free text."""
        if self._scoped_re is None:
            self._scoped_re = re.compile(re.escape(self.prefix) + r"(?=[A-Za-z0-9])")
        return self._scoped_re.sub("", message)

    def owns_name(self, name: str) -> bool:
        return self.original(name.lstrip("/")) is not None


def _dump(obj: Any) -> bytes:
    """A request body for the engine (and the plugin behind it): compact,
    ASCII-only JSON, exactly as it has always been sent."""
    return json.dumps(obj, separators=(",", ":")).encode()


#: every digit as "9": a run of 19 of them is the shortest that can spell an
#: integer beyond 64 bits, which orjson reads as a float (translate and find:
#: ~5 us for an inspect, where the regex ``[0-9]{19}`` takes ~100)
_DIGITS_AS_9 = bytes.maketrans(b"012345678", b"999999999")
_LONG_NUMBER = b"9" * 19


def load(body: bytes) -> Any:
    """An engine document, exactly as ``json.loads`` reads it, about three
    times faster: by ``orjson``, unless ``json.loads`` would read it
    differently -- a number of 19 digits or more (``orjson`` turns integers
    beyond 64 bits into floats) -- or ``orjson`` refuses what ``json.loads``
    accepts (NaN, lone surrogates, UTF-16 or UTF-32); those go through
    ``json.loads`` itself, which also raises what it always raised.  Every
    answer that is rewritten is decoded once."""
    if _LONG_NUMBER not in body.translate(_DIGITS_AS_9):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def _dump_out(obj: Any) -> bytes:
    """A response document for the client: compact JSON, by ``orjson``
    (several times faster than ``json.dumps``; a response is re-encoded on
    every rewritten answer).  The values are those ``json.loads`` read:
    ``orjson`` writes non-ASCII characters as UTF-8 rather than ``\\u``
    escapes (as the engine does) and floats in their shortest form, the same
    JSON values.  What it cannot encode (an integer beyond 64 bits, a lone
    surrogate) goes through ``json.dumps`` instead, unchanged."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(obj, separators=(",", ":")).encode()


def _link(resolve: Callable[[str, str], str], link: str) -> str:
    """``db`` -> ``T_db:db``; ``db:alias`` -> ``T_db:alias`` (the alias is
    what the container sees, so it keeps the original)."""
    name, sep, alias = link.partition(":")
    name = name.lstrip("/")
    return f"{resolve('container', name)}:{alias if sep else name}"


def _check_labels(labels: dict | None) -> dict:
    labels = dict(labels or {})
    for key in labels:
        if key.startswith(LABEL_PREFIX):
            raise BadRequest(f"labels under {LABEL_PREFIX} are reserved for FDCS (got {key})")
    return labels


def _volume_source(scope: Scope, source: str) -> str:
    if not source or source.startswith("/") or looks_like_id(source) and len(source) == 64:
        return source  # anonymous, a host path (the plugin refuses it), or an anonymous volume's id
    return scope.name(source)


# -- request bodies -----------------------------------------------------------


def container_create(body: bytes, scope: Scope, name: str | None, pids_default: int,
                     resolve: Callable[[str, str], str],
                     size_defaults: Callable[[dict], dict] | None = None) -> tuple[bytes, bool]:
    """Rewrite a container-create body; returns the new body and whether the
    tenant's default network is used (the handler makes sure it exists).

    ``name`` is the original container name (None: the engine picks one).
    ``resolve(kind, ref)`` maps a reference to what the engine should see
    (scoped name, or the caller's full id for an id prefix).
    ``size_defaults(host_config)`` (quotas on) names the memory and CPU
    fields to add to a container that sets none (``QuotaPolicy.create_defaults``).
    """
    cfg = gojson.decode(body, shapes.CONTAINER_CREATE)
    if name is not None:
        scope.name(name)  # validates
    labels = _check_labels(cfg.get("Labels"))
    labels[TENANT_LABEL] = scope.tenant
    if name is not None:
        labels[NAME_LABEL] = name
    cfg["Labels"] = labels

    hc = cfg.get("HostConfig")
    if hc is None:
        hc = cfg["HostConfig"] = {}
    if hc.get("PidsLimit") in (None, 0):
        hc["PidsLimit"] = pids_default
    if size_defaults is not None:
        hc.update(size_defaults(hc))
    if not hc.get("CgroupnsMode"):
        # Left empty, the engine picks the host's cgroup namespace on a
        # cgroup v1 host (its default there, and forced for API < 1.41):
        # every tenant container gets a namespace of its own instead.
        hc["CgroupnsMode"] = "private"
    if hc.get("Binds"):
        out = []
        for spec in hc["Binds"]:
            parts = spec.split(":")
            if len(parts) >= 2:
                parts[0] = _volume_source(scope, parts[0])
            out.append(":".join(parts))
        hc["Binds"] = out
    for m in hc.get("Mounts") or []:
        if m and m.get("Type") == "volume" and m.get("Source"):
            m["Source"] = _volume_source(scope, m["Source"])
    if hc.get("VolumesFrom"):
        hc["VolumesFrom"] = [":".join([resolve("container", v.split(":", 1)[0])] + v.split(":", 1)[1:])
                             for v in hc["VolumesFrom"]]
    for key in ("PidMode", "IpcMode"):
        mode = hc.get(key) or ""
        if mode.startswith("container:"):
            hc[key] = "container:" + resolve("container", mode[len("container:"):])

    links = [_link(resolve, l) for l in hc.get("Links") or []]
    mode = hc.get("NetworkMode") or ""
    uses_default = False
    endpoints = (cfg.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}
    new_endpoints: dict[str, Any] = {}
    for key, ep in endpoints.items():
        new_endpoints[resolve("network", key) if key not in _DEFAULT_MODES else scope.default_network] = ep
    if mode in _DEFAULT_MODES:
        mode = scope.default_network
        uses_default = True
    elif mode.startswith("container:"):
        mode = "container:" + resolve("container", mode[len("container:"):])
    elif mode not in ("none", "host"):
        mode = resolve("network", mode)
    hc["NetworkMode"] = mode
    uses_default = uses_default or scope.default_network in new_endpoints

    if not mode.startswith("container:") and mode not in ("none", "host"):
        # On a user-defined network the engine ignores HostConfig.Links; the
        # CLI moves them to the endpoint when it knows the network is
        # user-defined, so do the same for the default network we chose.
        ep = new_endpoints.setdefault(mode, {}) or {}
        new_endpoints[mode] = ep
        if links:
            ep["Links"] = list(ep.get("Links") or []) + links
            links = []
        for net, ep in new_endpoints.items():
            ep = ep or {}
            if ep.get("Links"):
                ep["Links"] = [l if l.startswith(scope.prefix) else _link(resolve, l) for l in ep["Links"]]
            if name is not None:
                aliases = list(ep.get("Aliases") or [])
                if name not in aliases:
                    aliases.append(name)
                ep["Aliases"] = aliases
            new_endpoints[net] = ep
    hc["Links"] = links or None
    if new_endpoints:
        cfg["NetworkingConfig"] = {"EndpointsConfig": new_endpoints}
    return _dump(cfg), uses_default


def network_create(body: bytes, scope: Scope) -> bytes:
    cfg = gojson.decode(body, shapes.NETWORK_CREATE)
    name = cfg.get("Name") or ""
    if not name:
        raise BadRequest("a network needs a name")
    if name in ("bridge", "default", "host", "none"):
        raise BadRequest(f"network name {name!r} is reserved")
    cfg["Name"] = scope.name(name)
    labels = _check_labels(cfg.get("Labels"))
    labels.update({TENANT_LABEL: scope.tenant, NAME_LABEL: name})
    cfg["Labels"] = labels
    return _dump(cfg)


def volume_create(body: bytes, scope: Scope, generated: str) -> bytes:
    """``generated`` is the original name to use when the client gave none."""
    cfg = gojson.decode(body, shapes.VOLUME_CREATE)
    name = cfg.get("Name") or generated
    cfg["Name"] = scope.name(name)
    labels = _check_labels(cfg.get("Labels"))
    labels.update({TENANT_LABEL: scope.tenant, NAME_LABEL: name})
    cfg["Labels"] = labels
    return _dump(cfg)


def network_connect(body: bytes, scope: Scope, resolve: Callable[[str, str], str], disconnect: bool) -> bytes:
    cfg = gojson.decode(body, shapes.NETWORK_DISCONNECT if disconnect else shapes.NETWORK_CONNECT)
    container = cfg.get("Container") or ""
    if container:
        cfg["Container"] = resolve("container", container.lstrip("/"))
    if not disconnect:
        ep = cfg.get("EndpointConfig") or {}
        if ep.get("Links"):
            ep["Links"] = [_link(resolve, l) for l in ep["Links"]]
        original = scope.original(cfg["Container"]) if container else None
        if original:
            aliases = list(ep.get("Aliases") or [])
            if original not in aliases:
                aliases.append(original)
            ep["Aliases"] = aliases
        cfg["EndpointConfig"] = ep
    return _dump(cfg)


def canonical(body: bytes, shape) -> bytes:
    """Decode and re-encode (exec create, update, exec start)."""
    return _dump(gojson.decode(body, shape))


# -- queries --------------------------------------------------------------------


def filters(raw: list[str], scope: Scope, resource: str) -> str:
    """Merge the tenant label into a ``filters`` query value and scope the
    name-bearing filters.  ``resource`` is containers, networks, volumes or
    events."""
    if len(raw) > 1:
        raise BadRequest("the filters parameter is given more than once")
    parsed = gojson.parse(raw[0], "the filters parameter") if raw and raw[0] else gojson._Pairs()
    if not isinstance(parsed, gojson._Pairs):
        raise BadRequest("the filters parameter must be a JSON object")
    out: dict[str, dict[str, bool]] = {}
    for key, value in parsed:
        if key in out:
            raise BadRequest(f"the filter {key!r} is given more than once")
        if isinstance(value, gojson._Pairs):
            items = [k for k, _ in value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise BadRequest(f"the filter {key!r} must be a list of strings or an object")
        out[key] = {_filter_value(scope, resource, key, v): True for v in items}
    labels = out.setdefault("label", {})
    for v in labels:
        if v.startswith(TENANT_LABEL):
            raise BadRequest("the tenant label filter is set by the service")
    labels[f"{TENANT_LABEL}={scope.tenant}"] = True
    return json.dumps(out, separators=(",", ":"))


def _filter_value(scope: Scope, resource: str, key: str, value: str) -> str:
    if key == "name" and resource in ("containers", "networks", "volumes"):
        # name filters are unanchored regular expressions (containers) or
        # substrings: anchor at the start of the scoped form when asked to.
        if value.startswith("^/"):
            return "^/" + re.escape(scope.prefix) + value[2:]
        if value.startswith("^"):
            return "^/?" + re.escape(scope.prefix) + value[1:]
        return value
    if key in ("volume", "network") and resource == "containers":
        if key == "volume" and value.startswith("/"):
            return value
        return scope.network_ref(value) if key == "network" else scope.ref(value)
    if key in ("container", "network", "volume") and resource == "events":
        return scope.network_ref(value) if key == "network" else scope.ref(value)
    return value


# -- responses --------------------------------------------------------------------


def _labels_mine(scope: Scope, labels: dict | None) -> bool:
    return (labels or {}).get(TENANT_LABEL) == scope.tenant


def _networks_out(scope: Scope, networks: dict | None) -> dict | None:
    if not isinstance(networks, dict):
        return networks
    return {scope.out(k): v for k, v in networks.items()}


def container_list(body: bytes, scope: Scope, owned: Callable[[list[str]], set[str]] | None = None) -> bytes:
    """The caller's containers of a list, names unscoped.

    A container's labels include its image's: an administrator's container
    started from an image that carries a tenant's label looks like that
    tenant's.  ``owned(ids)``, when given, returns which of the ids the
    ownership records give to the caller (the records ignore an inherited
    label); the others are dropped too.
    """
    mine, ids = containers_labelled(body, scope)
    return containers_out(mine, scope, owned(ids) if owned is not None and mine else None)


def containers_labelled(body: bytes, scope: Scope) -> tuple[list[dict], list[str]]:
    """The first half of :func:`container_list`: the list's containers that
    carry the caller's label, and their ids (for the ownership records)."""
    items = load(body)
    items = [c for c in items if isinstance(c, dict)] if isinstance(items, list) else []
    mine = [c for c in items if _labels_mine(scope, c.get("Labels"))]
    return mine, [c.get("Id") or "" for c in mine]


def containers_out(mine: list[dict], scope: Scope, keep: set[str] | None) -> bytes:
    """The second half of :func:`container_list`: of ``mine``, those whose
    id is in ``keep`` (None: all), names unscoped."""
    if keep is not None:
        mine = [c for c in mine if c.get("Id") in keep]
    out = []
    for c in mine:
        c["Names"] = [scope.out_path(n) for n in c.get("Names") or []]
        ns = c.get("NetworkSettings") or {}
        if "Networks" in ns:
            ns["Networks"] = _networks_out(scope, ns["Networks"])
        hc = c.get("HostConfig") or {}
        if "NetworkMode" in hc:
            hc["NetworkMode"] = scope.out(hc["NetworkMode"])
        for m in c.get("Mounts") or []:
            if m.get("Name"):
                m["Name"] = scope.out(m["Name"])
        out.append(c)
    return _dump_out(out)


def container_inspect(body: bytes, scope: Scope) -> bytes:
    c = load(body)
    if not isinstance(c, dict):
        return body
    if c.get("Name"):
        c["Name"] = scope.out_path(c["Name"])
    hc = c.get("HostConfig") or {}
    if hc.get("NetworkMode"):
        mode = hc["NetworkMode"]
        hc["NetworkMode"] = ("container:" + scope.out(mode[10:])) if mode.startswith("container:") else scope.out(mode)
    if hc.get("Links"):
        hc["Links"] = [":".join(scope.out_path(p) for p in l.split(":", 1)) for l in hc["Links"]]
    if hc.get("VolumesFrom"):
        hc["VolumesFrom"] = [scope.out(v.split(":", 1)[0]) + (":" + v.split(":", 1)[1] if ":" in v else "")
                             for v in hc["VolumesFrom"]]
    if hc.get("Binds"):
        hc["Binds"] = [":".join([scope.out(b.split(":")[0])] + b.split(":")[1:]) for b in hc["Binds"]]
    ns = c.get("NetworkSettings") or {}
    if "Networks" in ns:
        ns["Networks"] = _networks_out(scope, ns["Networks"])
    for m in c.get("Mounts") or []:
        if m.get("Name"):
            m["Name"] = scope.out(m["Name"])
    return _dump_out(c)


def network_out(n: dict, scope: Scope) -> dict:
    n["Name"] = scope.out(n.get("Name") or "")
    if isinstance(n.get("Containers"), dict):
        n["Containers"] = {cid: dict(ep, Name=scope.out(ep.get("Name") or ""))
                           for cid, ep in n["Containers"].items()
                           if scope.owns_name(ep.get("Name") or "")}
    return n


def network_list(body: bytes, scope: Scope) -> bytes:
    items = load(body)
    return _dump_out([network_out(n, scope) for n in items if isinstance(n, dict) and _labels_mine(scope, n.get("Labels"))])


def network_inspect(body: bytes, scope: Scope) -> bytes:
    n = load(body)
    return _dump_out(network_out(n, scope)) if isinstance(n, dict) else body


def volume_out(v: dict, scope: Scope) -> dict:
    v["Name"] = scope.out(v.get("Name") or "")
    return v


def volume_list(body: bytes, scope: Scope) -> bytes:
    doc = load(body)
    if isinstance(doc, dict):
        doc["Volumes"] = [volume_out(v, scope) for v in doc.get("Volumes") or []
                          if isinstance(v, dict) and _labels_mine(scope, v.get("Labels"))]
    return _dump_out(doc)


def volume_inspect(body: bytes, scope: Scope) -> bytes:
    v = load(body)
    return _dump_out(volume_out(v, scope)) if isinstance(v, dict) else body


def prune_result(body: bytes, scope: Scope) -> bytes:
    doc = load(body)
    if isinstance(doc, dict):
        for key in ("NetworksDeleted", "VolumesDeleted"):
            if isinstance(doc.get(key), list):
                doc[key] = [scope.out(n) for n in doc[key]]
    return _dump_out(doc)


_EVENT_NAME_ATTRS = ("name", "container", "network", "volume", "destination")


def _json_line(line: bytes, rewrite_doc: Callable[[dict], bool]) -> bytes | None:
    """One line of a JSON-lines stream through ``rewrite_doc`` (which edits
    the document in place and says whether to keep it); blank lines pass,
    unreadable ones are dropped."""
    if not line.strip():
        return line
    try:
        doc = load(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not rewrite_doc(doc):
        return None
    return _dump_out(doc) + b"\n"


def event_line(line: bytes, scope: Scope) -> bytes | None:
    """One event: dropped unless it is the caller's; names unscoped."""
    return _json_line(line, lambda ev: _event(ev, scope))


def _event(ev: dict, scope: Scope) -> bool:
    actor = ev.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    if attrs.get(TENANT_LABEL) not in (None, scope.tenant):
        return False
    if attrs.get(TENANT_LABEL) is None and not scope.owns_name(attrs.get("name", "")):
        return False  # no label (network, volume events): only if its name is the caller's
    for key in _EVENT_NAME_ATTRS:
        if isinstance(attrs.get(key), str):
            attrs[key] = scope.out(attrs[key])
    return True


_NOT_OWNED = re.compile(
    r"^authorization denied by plugin [^:]+: "
    r"(No such container: .*|No such exec instance: .*|network .* not found|get .*: no such volume)$",
    re.S)


def error(status: int, body: bytes, scope: Scope, not_owned_status: int = 404) -> tuple[int, bytes]:
    """Engine and plugin errors: scoped names unscoped; a plugin refusal of a
    reference the caller does not own becomes the engine's own answer for a
    missing resource: 404 for a path reference, but ``not_owned_status``
    (400, as the engine answers for a missing link target) for a reference
    inside a create body, where clients read 404 as "no such image" and
    start pulling."""
    try:
        doc = load(body)
    except ValueError:
        return status, body
    if not isinstance(doc, dict) or not isinstance(doc.get("message"), str):
        return status, body
    msg = doc["message"].rstrip("\n")
    m = _NOT_OWNED.match(msg)
    if m:
        status, msg = not_owned_status, m.group(1)
    doc["message"] = scope.text(msg)
    return status, _dump_out(doc)


def stats_line(line: bytes, scope: Scope) -> bytes | None:
    """One stats document: the container's name unscoped."""
    def name(doc: dict) -> bool:
        if isinstance(doc.get("name"), str):
            doc["name"] = scope.out_path(doc["name"])
        return True
    return _json_line(line, name)


def registry_auth_has_credentials(value: str) -> bool:
    """Whether an ``X-Registry-Auth`` header carries credentials.  The CLI
    sends ``e30=`` (``{}``) on every pull; anything that does not decode to
    an object without credentials counts as credentials."""
    import base64
    try:
        raw = base64.urlsafe_b64decode(value.strip() + "=" * (-len(value.strip()) % 4))
        doc = load(raw or b"{}")
    except ValueError:
        return True
    if not isinstance(doc, dict):
        return True
    # the engine decodes the header with Go's case-insensitive key matching
    return any(v for k, v in doc.items() if k.lower() in _CREDENTIAL_KEYS)


_CREDENTIAL_KEYS = frozenset({"username", "password", "auth", "identitytoken", "registrytoken"})


@functools.lru_cache(maxsize=256)  # on every answer; the engine's versions are few
def version_cap(version: str, cap: str) -> str:
    def t(v):
        try:
            return tuple(int(x) for x in v.split("."))
        except ValueError:
            return (0,)
    return cap if t(version) > t(cap) else version


def valid_original(name: str) -> bool:
    return valid_name(name)
