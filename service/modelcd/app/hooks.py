"""``/hooks/<source>`` in the Flask app: verify the delivery the way its sender signs it, store
it in the inbox (committed before the answer), answer fast. The work happens later, in the
inbox worker. `modelcd serve` answers these paths without Flask (``app.asgi``); this blueprint
serves them wherever the Flask app runs alone (WSGI servers, the test client)."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify, request

from modelcd.errors import PayloadTooLarge
from modelcd.inbox.intake import Intake
from modelcd.sources.base import Respond

bp = Blueprint("hooks", __name__, url_prefix="/hooks")


def _read_body(limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"delivery of {request.content_length} bytes is over the limit of {limit}; "
                              "raise MODELCD_HOOKS_MAX_BODY_BYTES if it is legitimate", field="body")
    body = request.stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"delivery is over the limit of {limit} bytes; raise MODELCD_HOOKS_MAX_BODY_BYTES "
                              "if it is legitimate", field="body")
    return body


@bp.route("/<source>", methods=["POST", "OPTIONS", "HEAD"])
def receive(source: str) -> tuple[Response, int] | Response:
    intake: Intake = current_app.extensions["modelcd_intake"]
    intake.adapter(source)  # 404 for an unknown source before the body is read
    body = _read_body(intake.ctx.settings.hooks_max_body_bytes)
    result = intake.verify(source, request.method, dict(request.headers), request.args.to_dict(), body, time.time())
    if isinstance(result, Respond):
        return Response(result.body, status=result.status, headers=result.headers)
    new = intake.store(source, result, body).result()
    intake.stored(new)
    status, doc = intake.acknowledgement(result, new)
    return jsonify(doc), status
