"""The plugin's HTTP face: the Docker AuthZ plugin protocol over Flask.

``create_app(cfg, authorizer=None)`` builds the app (tests inject an
:class:`~authz_plugin.policy.Authorizer` built on fakes).  Routes:

* ``POST /Plugin.Activate``        -> ``{"Implements": ["authz"]}``
* ``POST /AuthZPlugin.AuthZReq``    -> ``{"Allow": ..., "Msg": ...}``
* ``POST /AuthZPlugin.AuthZRes``    -> ``{"Allow": ..., "Msg": ...}``

A payload that is not a JSON object is denied (never a 500 that the engine
might retry into an allow: the engine treats a plugin error as a refusal,
but an explicit deny carries a message).
"""

from __future__ import annotations

import json
import logging

from flask import Flask, Response, request

from .config import Config

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"


def _reply(obj) -> Response:
    return Response(json.dumps(obj), status=200, mimetype=MEDIA_TYPE)


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
        p = payload()
        if p is None:
            return _reply({"Allow": False, "Msg": "the authorization request could not be read"})
        return _reply(authz().authz_request(p))

    @app.post("/AuthZPlugin.AuthZRes")
    def authz_res():
        p = payload()
        if p is None:
            return _reply({"Allow": False, "Msg": "the authorization response could not be read"})
        return _reply(authz().authz_response(p))

    return app
