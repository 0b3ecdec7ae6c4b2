"""``POST /-/wake/<deployment_id>``: the built-in router asks the control plane to wake a
sleeping deployment (``releases.idle``). Loopback clients only, with the secret of the router's
wake file (``Authorization: Bearer <secret>``), not an API token: the router holds no token.

The answer is a stream of server-sent events, one per step of ``wake_steps``: ``starting`` (no
sleep is stopping its process any more: a healthy answer on its port is the new process), then
``awake`` once it is healthy and the table that routes to it is applied, or ``failed`` with a
message. A deployment that cannot wake at all is refused before the stream (404/409)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request

from modelcd.app.api import open_route
from modelcd.auth import bearer
from modelcd.context import Context
from modelcd.errors import Forbidden, InvalidInput, ModelcdError, Unauthorized
from modelcd.releases.idle import WAKE_ROUTE, wake_secret, wake_steps

log = logging.getLogger(__name__)
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
    steps = wake_steps(ctx, deployment_id, float(timeout))
    first = next(steps)  # refusals before the stream starts are plain HTTP errors

    def stream() -> Iterator[bytes]:
        yield _event(first)
        try:
            for step in steps:
                yield _event(step)
        except ModelcdError as e:
            yield _event({"phase": "failed", "message": ctx.redact(e.message)})
        except Exception as e:  # the router must hear the end either way
            log.exception("waking %s", deployment_id)
            yield _event({"phase": "failed", "message": f"internal error ({type(e).__name__})"})

    return Response(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-store"})


def _event(step: dict[str, Any]) -> bytes:
    return f"event: {step['phase']}\ndata: {json.dumps(step)}\n\n".encode()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
