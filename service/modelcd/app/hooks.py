"""``/hooks/<source>``: verify the delivery the way its sender signs it, store it in the inbox
(committed before the answer), answer fast. The work happens later, in the inbox worker."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify, request

from modelcd.context import Context
from modelcd.errors import PayloadTooLarge

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
    from modelcd.sources.base import HookRequest, Respond, get_source

    ctx: Context = current_app.extensions["modelcd"]
    adapter = get_source(source, ctx.settings)
    body = _read_body(ctx.settings.hooks_max_body_bytes)
    result = adapter.receive(HookRequest(method=request.method, headers=dict(request.headers),
                                         query=request.args.to_dict(), body=body), time.time())
    if isinstance(result, Respond):
        return Response(result.body, status=result.status, headers=result.headers)
    new = ctx.inbox.accept(source, result.delivery_id, dict(result.kept_headers), body)
    if new:
        ctx.inbox_wake.set()
    return jsonify({"status": "accepted" if new else "duplicate", "delivery_id": result.delivery_id}), (
        202 if new else 200)
