"""Flask app factory: ``create_app(ctx, token)`` builds the HTTP side; each part registers
itself. Domain errors become ``{code, message, field}`` JSON with their HTTP status."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from modelcd.context import Context
from modelcd.errors import ModelcdError
from modelcd.inbox.intake import Intake
from modelcd.strict_json import strict_json_loads


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON with ``strict_json_loads`` for every request body."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return strict_json_loads(s)


def too_large_message(limit: int) -> str:
    return f"request body over the limit of {limit} bytes; raise MODELCD_MAX_ARTIFACT_BYTES or send a smaller artifact"


def http_error_doc(e: HTTPException) -> dict[str, Any]:
    """``{code, message, field}`` of a routing or HTTP error (404, 405, 413…)."""
    code = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(e.code or 500, "http_error")
    return {"code": code, "message": e.description or e.name, "field": None}


def create_app(ctx: Context, token: str) -> Flask:
    app = Flask("modelcd")
    app.json = StrictJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = ctx.settings.max_artifact_bytes
    app.extensions["modelcd"] = ctx
    app.extensions["modelcd_token"] = token
    ctx.users.api_token = token  # the first admin (users.principal_for)
    app.extensions["modelcd_metrics"] = {}
    app.extensions["modelcd_intake"] = Intake(ctx)

    from modelcd.app import api, hooks, ops, ui, users_api

    app.register_blueprint(api.bp)
    app.register_blueprint(users_api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(hooks.bp)
    ui.register(app)

    @app.errorhandler(ModelcdError)
    def _domain_error(e: ModelcdError) -> tuple[Response, int]:
        return jsonify(e.to_dict()), int(e.http_status)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> tuple[Response, int]:
        doc = http_error_doc(e)
        if e.code == 413:
            doc["message"] = too_large_message(ctx.settings.max_artifact_bytes)
        return jsonify(doc), e.code or 500

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> tuple[Response, int]:
        app.logger.exception("unhandled error")
        return jsonify({"code": "internal_error", "message": f"internal error ({type(e).__name__})",
                        "field": None}), 500

    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _count(resp: Response) -> Response:
        metrics: dict[Any, float] = app.extensions["modelcd_metrics"]
        key = (request.method, resp.status_code)
        metrics[key] = metrics.get(key, 0) + 1
        return resp

    return app
