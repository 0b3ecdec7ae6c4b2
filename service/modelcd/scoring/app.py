"""The scoring HTTP protocol, independent of any server, and thin ASGI and WSGI adapters.

``ScoringApp.handle`` takes the few request parts it needs and returns a ``Reply``; the
adapters only move bytes. The runtime's own server runs the ASGI adapter (see ``server.py``);
``asgi_from_env``/``wsgi_from_env`` let other servers host the same app, which is how the
benchmark compared them.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from .config import ScoringConfig, load_config
from .flavors import LoadError, ModelError, Scorer, load_scorer
from .metrics import Metrics
from .openapi import build_document
from .protocol import BadInput

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
MAX_BODY_BYTES = 64 * 1024 * 1024
KEY_ENV = "MODELCD_SCORING_KEY"

_SCORE_PATHS = frozenset({"/score", "/invocations"})
_HEALTH_PATHS = frozenset({"/healthz", "/", "/ping", "/health"})
# Media types a custom entry script may receive besides JSON (it gets the body as text).
_TEXT_PREFIX = "text/"


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, body bytes, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(status: int, error: str, message: str, **extra: str) -> Reply:
    """A JSON error body ``{"error": code, "message": text, ...}``."""
    return Reply(status, _dumps({"error": error, "message": message, **extra}))


class ScoringApp:
    """Routes: ``POST /score`` (alias ``/invocations``), ``GET /healthz`` (aliases ``/``, ``/ping``,
    ``/health``), ``GET /swagger.json[?version=3]`` and ``GET /metrics``.

    Only the scoring routes need the bearer key when one is set.
    """

    def __init__(
        self,
        config: ScoringConfig,
        scorer: Scorer,
        metrics: Metrics,
        key: str | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.config = config
        self.scorer = scorer
        self.metrics = metrics
        self.max_body = max_body
        self._auth = f"Bearer {key}".encode() if key else None
        self._health = Reply(200, _dumps({"status": "ok", "model": config.model, "version": config.version}))
        self._swagger = {v: Reply(200, _dumps(build_document(config, version=v, auth=bool(key)))) for v in (2, 3)}
        self._labels = {"model": config.model, "version": str(config.version), "flavor": config.flavor}
        self._custom = config.flavor == "custom"
        metrics.open()

    def handle(
        self,
        method: str,
        path: str,
        query: str,
        content_type: str | None,
        authorization: str | None,
        body: bytes | None,
    ) -> Reply:
        """Answer one request; ``body`` is None when it was larger than ``max_body``."""
        if path in _SCORE_PATHS:
            started = time.perf_counter()
            reply, rows = self._score(method, content_type, authorization, body)
            self.metrics.observe("score", reply.status, time.perf_counter() - started, rows)
            return reply
        if path in _HEALTH_PATHS:
            reply, route = self._get(method, self._health), "healthz"
        elif path == "/swagger.json":
            version = 3 if parse_qs(query).get("version") == ["3"] else 2
            reply, route = self._get(method, self._swagger[version]), "swagger"
        elif path == "/metrics":
            reply, route = self._get(method, None), "metrics"
        else:
            reply, route = error_reply(404, "not_found", f"no route {path}; try POST /score"), "other"
        self.metrics.observe(route, reply.status)
        return reply

    def _get(self, method: str, reply: Reply | None) -> Reply:
        """A GET-only route: the prepared ``reply``, or the metrics text when None."""
        if method != "GET":
            return Reply(
                405, _dumps({"error": "method_not_allowed", "message": "use GET"}), headers=(("Allow", "GET"),)
            )
        if reply is None:
            return Reply(200, self.metrics.render(self._labels).encode(), PROMETHEUS)
        return reply

    def _score(
        self, method: str, content_type: str | None, authorization: str | None, body: bytes | None
    ) -> tuple[Reply, int]:
        """Check method, key, media type and size, then score; return the reply and rows predicted."""
        if method != "POST":
            reply = error_reply(405, "method_not_allowed", "use POST with a JSON body")
            return Reply(reply.status, reply.body, headers=(("Allow", "POST"),)), 0
        if self._auth is not None and not hmac.compare_digest(
            (authorization or "").encode("utf-8", "replace"), self._auth
        ):
            reply = error_reply(401, "unauthorized", "missing or wrong key: send 'Authorization: Bearer <key>'")
            return Reply(reply.status, reply.body, headers=(("WWW-Authenticate", "Bearer"),)), 0
        problem = self._media_type_problem(content_type)
        if problem:
            return error_reply(415, "unsupported_media_type", problem), 0
        if body is None:
            return error_reply(413, "payload_too_large", f"the body exceeds {self.max_body} bytes"), 0
        try:
            result = self.scorer.score(body)
            payload = _dumps(result)
        except BadInput as e:
            return error_reply(e.status, e.error, e.message), 0
        except ModelError as e:
            _log_exception(f"the model raised {e.exception} while scoring", e.__cause__ or e)
            return error_reply(500, "model_error", e.message, exception=e.exception), 0
        except (TypeError, ValueError) as e:
            _log_exception("the model's output is not JSON-serialisable", e)
            message = f"the model returned a value that is not JSON-serialisable: {e}"
            return error_reply(500, "model_error", message, exception=type(e).__name__), 0
        except Exception as e:
            _log_exception("unexpected error while scoring", e)
            return error_reply(500, "internal_error", str(e), exception=type(e).__name__), 0
        predictions = result.get("predictions") if isinstance(result, dict) and not self._custom else None
        return Reply(200, payload), len(predictions) if isinstance(predictions, list) else 0

    def _media_type_problem(self, content_type: str | None) -> str | None:
        """Why ``content_type`` cannot be scored, or None (absent means JSON)."""
        if not content_type:
            return None
        media, _, params = content_type.partition(";")
        media = media.strip().lower()
        if media != JSON and not (self._custom and media.startswith(_TEXT_PREFIX)):
            accepted = "application/json or text/*" if self._custom else "application/json"
            return f"Content-Type {media!r} is not supported; send {accepted}"
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
                return f"charset {value.strip()!r} is not supported; send utf-8"
        return None


def build_app(
    model_dir: str, config: ScoringConfig, key: str | None = None, metrics_dir: str | None = None
) -> ScoringApp:
    """Load the model (raising ``LoadError``), warm it up with the sample, and build the app."""
    scorer = load_scorer(config, os.path.abspath(model_dir))
    app = ScoringApp(config, scorer, Metrics(metrics_dir), key=key)
    warm_up(scorer, config)
    return app


def warm_up(scorer: Scorer, config: ScoringConfig) -> None:
    """Score the sample once so the first real request is not the slow one (built-in flavors only).

    A custom ``run()`` may have side effects, so it is not called. A failure is only logged:
    judging the model is the smoke stage's job.
    """
    if config.sample is None or scorer.flavor == "custom":
        return
    try:
        scorer.score(_dumps(config.sample))
    except Exception as e:
        print(f"modelcd-scoring: warning: the sample does not score: {type(e).__name__}: {e}", file=sys.stderr)


def _from_env() -> ScoringApp:
    """Build the app from ``MODELCD_SCORING_MODEL_DIR``/``_CONFIG``/``_KEY``/``_METRICS_DIR``."""
    config = load_config(os.environ["MODELCD_SCORING_CONFIG"])
    try:
        return build_app(
            os.environ["MODELCD_SCORING_MODEL_DIR"],
            config,
            key=os.environ.get(KEY_ENV) or None,
            metrics_dir=os.environ.get("MODELCD_SCORING_METRICS_DIR") or None,
        )
    except LoadError as e:
        print(f"modelcd-scoring: cannot load model {config.model!r}: {e}", file=sys.stderr)
        raise


def asgi_from_env() -> AsgiApp:
    """An ASGI app factory for other servers (``uvicorn --factory``, ``granian --factory``)."""
    return AsgiApp(_from_env())


def wsgi_from_env() -> WsgiApp:
    """A WSGI app factory for other servers (``gunicorn 'modelcd.scoring.app:wsgi_from_env()'``)."""
    return WsgiApp(_from_env())


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class AsgiApp:
    """ASGI 3 adapter. Scoring runs on the event loop thread: a worker scores one request at a
    time (the model is CPU-bound) while the loop keeps many keep-alive connections open."""

    def __init__(self, app: ScoringApp) -> None:
        self.app = app
        self._content_types: dict[str, list[tuple[bytes, bytes]]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Serve one HTTP request or the lifespan protocol."""
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Read the body (up to the limit), handle, write the reply."""
        content_type = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        chunks: list[bytes] = []
        size, limit = 0, self.app.max_body
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk and size <= limit:
                size += len(chunk)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = None if size > limit else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        query = scope.get("query_string", b"").decode("latin-1")
        reply = self.app.handle(scope["method"], scope["path"], query, content_type, authorization, body)
        headers = [
            *self._base_headers(reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in reply.headers),
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    def _base_headers(self, content_type: str) -> list[tuple[bytes, bytes]]:
        """The cached content-type header list for ``content_type``."""
        headers = self._content_types.get(content_type)
        if headers is None:
            headers = self._content_types[content_type] = [(b"content-type", content_type.encode())]
        return headers


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge lifespan startup and shutdown: the model is loaded before the app exists."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class WsgiApp:
    """WSGI adapter over the same ``ScoringApp`` (used to compare servers)."""

    def __init__(self, app: ScoringApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Serve one request."""
        body = self._read_body(environ)
        reply = self.app.handle(
            environ["REQUEST_METHOD"],
            environ.get("PATH_INFO") or "/",
            environ.get("QUERY_STRING", ""),
            environ.get("CONTENT_TYPE"),
            environ.get("HTTP_AUTHORIZATION"),
            body,
        )
        status = f"{reply.status} {HTTPStatus(reply.status).phrase}"
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))), *reply.headers]
        start_response(status, headers)
        return [reply.body]

    def _read_body(self, environ: dict[str, Any]) -> bytes | None:
        """The request body, or None when it exceeds the limit."""
        stream = environ["wsgi.input"]
        limit = self.app.max_body
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length > limit:
            return None
        if length >= 0:
            return stream.read(length) if length else b""
        data = stream.read(limit + 1)
        return None if len(data) > limit else data


def _dumps(value: Any) -> bytes:
    """Compact JSON bytes; numpy arrays and scalars become lists and numbers."""
    return json.dumps(value, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    """Convert objects with ``tolist()`` (numpy, pandas) or ``item()``; refuse anything else."""
    for attribute in ("tolist", "item"):
        convert = getattr(value, attribute, None)
        if callable(convert):
            return convert()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _log_exception(what: str, error: BaseException) -> None:
    """Write a traceback to stderr (never into a response body)."""
    text = "".join(traceback.format_exception(error))
    print(f"modelcd-scoring: {what}\n{text}", file=sys.stderr, end="", flush=True)
