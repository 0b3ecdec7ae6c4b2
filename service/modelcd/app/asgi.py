"""The control plane's HTTP side under an ASGI server (uvicorn, as `modelcd serve` runs it).

``POST /hooks/<source>`` (and the OPTIONS/HEAD handshakes) are answered on the event loop
without Flask: read the body (size-capped), verify it with the source's adapter, hand the row
to the inbox's group committer, and answer when its transaction has committed. Thousands of
deliveries a second pass this way with a few milliseconds of latency, where a thread per
request behind Flask manages a few hundred. Every other path goes to the Flask app through
``WSGIBridge``, which first asks ``admit``: a write to no route, without a token that works,
or by a role that may not do it, is refused before a byte of its body is read."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from flask import Flask
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect, Rule

from modelcd.app import http_error_doc, too_large_message
from modelcd.app.api import OPEN, admit, auth_kind
from modelcd.app.wsgi_bridge import Receive, Refusal, Scope, Send, WSGIBridge, body_chunks
from modelcd.auth import token_matches
from modelcd.errors import Forbidden, ModelcdError, PayloadTooLarge, Unauthorized
from modelcd.inbox.intake import MAY_BLOCK, Intake
from modelcd.sources.base import Respond

log = logging.getLogger(__name__)

HOOKS_PREFIX = "/hooks/"
HOOK_METHODS = frozenset({"POST", "OPTIONS", "HEAD"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # never need a token; their bodies are capped like any


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _query(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        out.setdefault(k, v)
    return out


async def _read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"delivery of {declared} bytes is over the limit of {limit}; "
                              "raise MODELCD_HOOKS_MAX_BODY_BYTES if it is legitimate", field="body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks(receive):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"delivery is over the limit of {limit} bytes; raise MODELCD_HOOKS_MAX_BODY_BYTES "
                                  "if it is legitimate", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None,
                  content_type: str | None = "application/json") -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if content_type and not any(k == b"content-type" for k, _ in raw):
        raw.append((b"content-type", content_type.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class ControlPlaneASGI:
    """Hooks on the loop, the rest through Flask (see the module doc)."""

    def __init__(self, flask_app: Flask, threads: int = 8) -> None:
        self.flask_app = flask_app
        self.intake: Intake = flask_app.extensions["modelcd_intake"]
        self.metrics: dict[Any, float] = flask_app.extensions["modelcd_metrics"]
        self.token: str = flask_app.extensions["modelcd_token"]
        self.urls = flask_app.url_map.bind("localhost")
        max_body = flask_app.config.get("MAX_CONTENT_LENGTH")
        self.wsgi = WSGIBridge(flask_app, threads=threads, max_body=max_body, admit=self.admit,
                               too_large=too_large_message(max_body or 0))

    def close(self) -> None:
        self.wsgi.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        source = path[len(HOOKS_PREFIX):] if path.startswith(HOOKS_PREFIX) else ""
        if source and "/" not in source and scope["method"] in HOOK_METHODS:
            status = await self.hook(scope, receive, send, source)
            key = (scope["method"], status)
            self.metrics[key] = self.metrics.get(key, 0) + 1
            return
        await self.wsgi(scope, receive, send)

    async def admit(self, scope: Scope) -> Refusal | None:
        """Refuse a write before its body is read: no such route or method, no token that
        works (401), or a role that lacks the route's action (403). The service's API token is
        checked here on the loop; any other token (a user's, or a release's pipeline token)
        needs the store, so it is looked up on the bridge's threads."""
        if scope["method"] in SAFE_METHODS:
            return None
        try:
            rule, args = self._match(scope["path"], scope["method"])
        except (NotFound, MethodNotAllowed) as e:
            return Refusal(e.code or 404, http_error_doc(e))
        kind = auth_kind(self.flask_app.view_functions.get(str(rule.endpoint)))
        if kind is None or kind == OPEN:
            return None
        header = _headers(scope).get("authorization")
        if token_matches(self.token, header):  # the first admin: every action
            return None
        release_id = str(args["release_id"]) if "release_id" in args else None
        ctx = self.intake.ctx
        try:
            await asyncio.get_running_loop().run_in_executor(self.wsgi.executor, admit, ctx, kind, header, release_id)
        except (Unauthorized, Forbidden) as e:
            return Refusal(int(e.http_status), e.to_dict())
        return None

    def _match(self, path: str, method: str) -> tuple[Rule, dict[str, Any]]:
        """The route of ``path``, or of where Flask would redirect it (``//`` merged)."""
        try:
            rule, args = self.urls.match(path, method, return_rule=True)
        except RequestRedirect as e:
            rule, args = self.urls.match(urlsplit(e.new_url).path, method, return_rule=True)
        assert isinstance(rule, Rule)
        return rule, args

    async def hook(self, scope: Scope, receive: Receive, send: Send, source: str) -> int:
        """Answer one webhook delivery; return the status sent."""
        intake = self.intake
        headers = _headers(scope)
        try:
            intake.adapter(source)  # unknown source: 404 before the body is read
            body = await _read_body(receive, headers.get("content-length"), intake.ctx.settings.hooks_max_body_bytes)
            args = (source, scope["method"], headers, _query(scope), body, time.time())
            if source in MAY_BLOCK:
                result = await asyncio.get_running_loop().run_in_executor(None, intake.verify, *args)
            else:
                result = intake.verify(*args)
            if isinstance(result, Respond):
                await _answer(send, result.status, result.body, result.headers, content_type=None)
                return result.status
            new = await intake.store_async(source, result, body)
            intake.stored(new)
            status, doc = intake.acknowledgement(result, new)
        except ModelcdError as e:
            status = int(e.http_status)
            close = {"connection": "close"} if status == 413 else None  # the rest of the body stays unread
            await _answer(send, status, _json(e.to_dict()), close)
            return status
        except Exception as e:
            log.exception("webhook delivery to /hooks/%s", source)
            await _answer(send, 500, _json({"code": "internal_error", "message": f"internal error ({type(e).__name__})",
                                            "field": None}))
            return 500
        await _answer(send, status, _json(doc))
        return status
