"""The plugin's HTTP face: the Docker AuthZ plugin protocol over Flask.

``create_app(cfg, authorizer=None)`` builds the app (tests inject an
:class:`~authz_plugin.policy.Authorizer` built on fakes).  Routes:

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
import time

from flask import Flask, Response, request

from . import metrics
from .config import Config

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"


def _reply(obj) -> Response:
    return Response(json.dumps(obj), status=200, mimetype=MEDIA_TYPE)


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
    audit_stream.install(store.r, cfg["plugin.audit_stream_maxlen"])  # fdcs-manage audit reads it
    return Authorizer(cfg, IdentityService(cfg), store)


def create_app(cfg: Config, authorizer=None) -> Flask:
    app = Flask(__name__)
    app.config["FDCS"] = cfg
    # in each gunicorn worker: its counters (files, under the master's
    # PROMETHEUS_MULTIPROC_DIR) exist, at zero, from the start
    metrics.activate("plugin")
    state = {"authz": authorizer}

    def authz():
        # Built lazily so that each gunicorn worker opens its own connections
        # after the fork.
        if state["authz"] is None:
            state["authz"] = build_authorizer(cfg)
        return state["authz"]

    def payload():
        try:
            data = json.loads(request.get_data(cache=False) or b"null")
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    @app.post("/Plugin.Activate")
    def activate():
        return _reply({"Implements": ["authz"]})

    @app.post("/AuthZPlugin.AuthZReq")
    def authz_req():
        t0 = time.perf_counter()
        p = payload()
        if p is None:
            metrics.decision("request", False, "bad-request", time.perf_counter() - t0)
            return _reply({"Allow": False, "Msg": unreadable("request", not request.content_length)})
        return _reply(authz().authz_request(p))

    @app.post("/AuthZPlugin.AuthZRes")
    def authz_res():
        t0 = time.perf_counter()
        p = payload()
        if p is None:
            metrics.decision("response", False, "bad-request", time.perf_counter() - t0)
            return _reply({"Allow": False, "Msg": unreadable("response", not request.content_length)})
        return _reply(authz().authz_response(p))

    return app
