"""``POST /-/wake/<deployment_id>``: the built-in router asks the control plane to wake a
sleeping deployment (``releases.idle``). Loopback clients only, with the secret of the router's
wake file (``Authorization: Bearer <secret>``), not an API token: the router holds no token.
Answers once the deployment is healthy and the table that routes to it is applied."""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, current_app, jsonify, request

from modelcd.app.api import open_route
from modelcd.auth import bearer
from modelcd.context import Context
from modelcd.errors import Forbidden, InvalidInput, Unauthorized
from modelcd.releases.idle import WAKE_ROUTE, wake, wake_secret

bp = Blueprint("wake", __name__)
MAX_WAKE_TIMEOUT_S = 300.0


@bp.post(f"{WAKE_ROUTE}/<deployment_id>")
@open_route  # not an API route: the wake secret is checked here
def wake_deployment(deployment_id: str) -> Response:
    ctx: Context = current_app.extensions["modelcd"]
    if not _loopback(request.remote_addr or ""):
        raise Forbidden("the wake route answers loopback clients (the built-in router) only")
    secret = wake_secret(ctx.router.wake_file())
    given = bearer(request.headers.get("Authorization")) or ""
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        raise Unauthorized("missing or wrong wake secret: the router sends the one in its wake file")
    body = request.get_json(silent=True) or {}
    timeout = body.get("timeout_s", 10.0) if isinstance(body, dict) else None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_WAKE_TIMEOUT_S:
        raise InvalidInput(f"timeout_s: must be a number of seconds above 0, at most {MAX_WAKE_TIMEOUT_S:g}",
                           field="timeout_s")
    return jsonify(wake(ctx, deployment_id, float(timeout)))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
