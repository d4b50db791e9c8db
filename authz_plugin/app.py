"""The plugin's protocol (:class:`Hooks`) and its Flask face.

``create_app(cfg, authorizer=None)`` builds the app (tests inject an
:class:`~authz_plugin.policy.Authorizer` built on fakes); in production the
gunicorn worker of :mod:`authz_plugin.worker` calls the same :class:`Hooks`
directly (it costs a fraction of a WSGI round per call).  Routes:

* ``POST /Plugin.Activate``        -> ``{"Implements": ["authz"]}``
* ``POST /AuthZPlugin.AuthZReq``    -> ``{"Allow": ..., "Msg": ...}``
* ``POST /AuthZPlugin.AuthZRes``    -> ``{"Allow": ..., "Msg": ...}``

A payload that is not a JSON object is denied (never a 500 that the engine
might retry into an allow: the engine treats a plugin error as a refusal,
but an explicit deny carries a message).  An *empty* payload is the engine
retrying a call whose connection broke (a worker was killed, the plugin
restarted): moby's plugin client re-sends the request with its body buffer
already drained (``pkg/plugins/client.go``, ``callWithRetry``), so the deny
says that, and what the tenant should do (:func:`unreadable`).
"""

from __future__ import annotations

import json
import logging
import re
import time

import orjson

from flask import Flask, Response, request

from . import metrics
from .config import Config
from .policy import RECORDING_METHODS

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"


#: deny messages for an empty payload (see the module docstring), per hook
MSG_RETRIED = {
    "request": "the authorization plugin restarted while checking this request; retry",
    "response": "the authorization plugin restarted while this request was being answered; it may have been "
                "carried out (what it created is adopted from its labels within seconds): check, then retry",
}


def unreadable(hook: str, empty: bool) -> str:
    """The deny message for a ``hook`` ("request" or "response") payload
    that is not a JSON object; ``empty``: the engine sent no body at all."""
    if empty:
        log.warning("empty AuthZ %s payload (the engine retried a call cut off by a plugin restart): denied", hook)
        return MSG_RETRIED[hook]
    return f"the authorization {hook} could not be read"


def build_authorizer(cfg: Config):
    """The production wiring: Keystone identity and the Redis store."""
    from .identity import IdentityService
    from .ownership import Store
    from .policy import Authorizer

    from . import audit_stream

    store = Store.from_config(cfg)
    audit_stream.install(store.r, cfg["plugin.audit_stream_maxlen"], lean=store.lean)  # fdcs-manage audit reads it
    return Authorizer(cfg, IdentityService(cfg), store)


class Hooks:
    """The plugin protocol without a transport: ``call(path, body)`` answers
    one engine call with the JSON bytes of a 200 answer, or None for a path
    that is not the protocol's (404).  Both HTTP faces use it: the Flask app
    below (any WSGI server, the unit tests) and the plugin's gunicorn worker
    (:mod:`authz_plugin.worker`), which calls it without a WSGI round."""

    def __init__(self, cfg: Config, authorizer=None):
        self.cfg = cfg
        self._authz = authorizer
        # in each gunicorn worker: its counters (files, under the master's
        # PROMETHEUS_MULTIPROC_DIR) exist, at zero, from the start
        metrics.activate("plugin")

    def authorizer(self):
        # Built lazily so that each gunicorn worker opens its own connections
        # after the fork.
        if self._authz is None:
            self._authz = build_authorizer(self.cfg)
        return self._authz

    def call(self, path: str, body: bytes) -> bytes | None:
        if path == "/AuthZPlugin.AuthZReq":
            return self._hook("request", body)
        if path == "/AuthZPlugin.AuthZRes":
            return self._hook("response", body)
        if path == "/Plugin.Activate":
            return _ACTIVATE
        return None

    def _hook(self, hook: str, body: bytes) -> bytes:
        if hook == "response" and reads_only(body):
            return _ALLOW  # what Authorizer.authz_response answers, without decoding the answer's body
        t0 = time.perf_counter()
        try:
            # orjson: the engine marshals the payload with Go's encoder (UTF-8,
            # no NaN, the request body inside as base64), all of which it reads
            # exactly; a few times json's speed, on every hook
            data = orjson.loads(body or b"null")
        except ValueError:  # orjson.JSONDecodeError
            data = None
        if not isinstance(data, dict):
            metrics.decision(hook, False, "bad-request", time.perf_counter() - t0)
            return orjson.dumps({"Allow": False, "Msg": unreadable(hook, not body)})
        authz = self.authorizer()
        out = authz.authz_request(data) if hook == "request" else authz.authz_response(data)
        return orjson.dumps(out)


_ACTIVATE = json.dumps({"Implements": ["authz"]}).encode()
_ALLOW = json.dumps({"Allow": True}).encode()

# The head of an AuthZ payload as moby 20.10 marshals it
# (pkg/authorization/api.go, ``Request``: Go's encoder writes the fields in
# declaration order, each string escaped; ``User`` and ``UserAuthNMethod``
# are omitted when empty).  A method is an HTTP token, so it has no quote.
_HEAD = re.compile(rb'\{(?:"User":"(?:[^"\\]|\\.)*",)?(?:"UserAuthNMethod":"(?:[^"\\]|\\.)*",)?'
                   rb'"RequestMethod":"([^"\\]*)"')


def reads_only(payload: bytes) -> bool:
    """True when an ``AuthZRes`` payload is that of a request whose method
    the response hook has nothing to record for (not one of
    ``policy.RECORDING_METHODS``), read from the payload's head alone.  An
    inspect or list answer is in the payload in full, base64 in JSON; the
    response hook of every read would otherwise decode it to learn only
    the method.  False (decode it all) for anything else."""
    m = _HEAD.match(payload)
    return m is not None and m.group(1).decode("ascii", "replace") not in RECORDING_METHODS


def create_app(cfg: Config, authorizer=None) -> Flask:
    """The protocol as a Flask app; ``app.fdcs_hooks`` is its :class:`Hooks`."""
    app = Flask(__name__)
    app.config["FDCS"] = cfg
    hooks = app.fdcs_hooks = Hooks(cfg, authorizer)

    @app.post("/<name>")
    def hook(name):
        out = hooks.call(request.path, request.get_data(cache=False))
        if out is None:
            return Response(status=404)
        return Response(out, status=200, mimetype=MEDIA_TYPE)

    return app
