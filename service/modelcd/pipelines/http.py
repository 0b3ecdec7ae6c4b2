"""The JSON-over-HTTP plumbing shared by the GitHub and Azure DevOps clients
(``pipelines/github.py``, ``pipelines/azure.py``), and the stage outcomes both report.

- ``JsonHttp`` sends one JSON request through a ``requests.Session`` with a per-request
  timeout and bounded retries: connection errors, timeouts, 5xx, 429 and rate-limit 403s
  (``x-ratelimit-remaining: 0``, a ``Retry-After``, or GitHub's "secondary rate limit"
  message, which means a minute) are tried again after an exponential backoff with jitter,
  or after the server's ``Retry-After`` / ``x-ratelimit-reset`` when it gives one. A server
  wait longer than ``max_wait`` is not slept through: the call gives up at once with a
  retryable error carrying ``retry_after``, so the caller can reschedule. 400, 401, other
  403s, 404 and 422 are never retried.
- A request that may already have been acted on (a POST that timed out after it was sent,
  or whose connection dropped) is not re-sent unless the caller marks it idempotent: the
  error says ``ambiguous``, and the caller looks for the run before sending it again
  (``reference/integrations.md`` §5).
- Every failure is a ``PipelineApiError`` naming the method, the URL path (never the query),
  the status and the service's own message. The known secrets (tokens, the Basic
  credential, webhook secrets) are replaced by ``***`` in every message and log line.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, Self, cast
from urllib.parse import quote, urlsplit

import requests

from modelcd import __version__
from modelcd.errors import InvalidInput, StageFailed

log = logging.getLogger(__name__)

USER_AGENT = f"modelcd/{__version__}"
DEFAULT_TIMEOUT = 10.0  # seconds per attempt (connect and read)
DEFAULT_RETRIES = 3  # attempts after the first one
DEFAULT_BACKOFF = 0.5  # seconds before the first retry; doubles each time, with jitter
DEFAULT_MAX_WAIT = 60.0  # never sleep longer than this between attempts
# GitHub's secondary rate limits may come without a Retry-After: wait at least a minute
SECONDARY_RATE_LIMIT_WAIT = 60.0
MAX_MESSAGE = 500  # characters of the service's error message kept in ours

Outcome = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]
OUTCOMES: tuple[Outcome, ...] = ("pending", "running", "succeeded", "failed", "skipped", "cancelled")
# the release stages a CI pipeline runs for modelcd (the gate waits inside modelcd itself)
STAGES = ("build", "deploy", "smoke", "promote", "rollback")


class PipelineApiError(StageFailed):
    """A CI system's API (GitHub, Azure DevOps) refused a request or could not be reached.

    ``status`` is the HTTP status (None when no answer came back), ``retryable`` says whether
    the same call may succeed later (network trouble, 5xx, 429, rate limits),
    ``retry_after`` the seconds the service asked to wait when it said so, and ``ambiguous``
    that the request may have been acted on although no answer came back (look for the run
    before sending it again). The message never contains a token or secret."""

    code = "pipeline_api_error"
    http_status = HTTPStatus.BAD_GATEWAY

    def __init__(self, message: str, *, method: str, path: str, status: int | None, retryable: bool,
                 service_message: str | None = None, retry_after: float | None = None,
                 ambiguous: bool = False, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.method = method
        self.path = path
        self.status = status
        self.retryable = retryable
        self.service_message = service_message
        self.retry_after = retry_after
        self.ambiguous = ambiguous

    def __repr__(self) -> str:
        return (f"PipelineApiError({self.message!r}, method={self.method!r}, path={self.path!r}, "
                f"status={self.status!r}, retryable={self.retryable!r})")


@dataclass(frozen=True)
class Reply:
    """A successful answer: its status, headers and parsed JSON body (None when empty)."""

    status: int
    headers: Mapping[str, str]
    body: Any


# --------------------------------------------------------------------------- small helpers


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty secret (and its URL-encoded form) replaced by ``***``;
    longest first, so a secret containing another is replaced whole."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
        encoded = quote(secret, safe="")
        if encoded != secret:
            text = text.replace(encoded, "***")
    return text


def basic_credential(user: str, password: str) -> str:
    """The value of an ``Authorization: Basic`` header."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def check_base_url(url: str, field: str) -> str:
    """``url`` without a trailing slash, when it is an http(s) URL without credentials,
    query or fragment; InvalidInput naming ``field`` otherwise."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{field}: {url!r} is not an http(s) URL", field=field)
    if parts.username or parts.password:
        raise InvalidInput(f"{field}: credentials in the URL are not supported; pass the token instead",
                           field=field)
    if parts.query or parts.fragment:
        raise InvalidInput(f"{field}: {url!r} must not have a query or fragment", field=field)
    return url.rstrip("/")


def segment(value: str | int) -> str:
    """One URL path segment, percent-encoded (``/`` included)."""
    return quote(str(value), safe="")


def positive_id(value: object, field: str) -> int:
    """``value`` as a positive integer id (ints or digit strings); InvalidInput otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit() or int(value) < 1:
        raise InvalidInput(f"{field}: {value!r} is not a positive integer id", field=field)
    return int(value)


def compact_json(value: Any, field: str) -> bytes:
    """``value`` as compact UTF-8 JSON, the exact bytes sent; InvalidInput naming ``field``
    when it cannot be serialised (a set, a NaN, an object...)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{field}: not JSON-serialisable ({e})", field=field) from None


def as_string(value: object, field: str) -> str:
    """A parameter value as the string CI systems expect: strings as they are, booleans as
    ``true``/``false``, numbers in decimal; InvalidInput for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise InvalidInput(f"{field}: {type(value).__name__} is not a string, number or boolean; "
                       "send scalar values only", field=field)


def service_message(body: Any, text: str = "") -> str | None:
    """The error message a service put in its answer: ``message`` (GitHub, Azure DevOps)
    plus GitHub's ``errors[].message``/``code``, or a short plain-text body."""
    if isinstance(body, Mapping):
        parts: list[str] = []
        if isinstance(body.get("message"), str) and body["message"].strip():
            parts.append(body["message"].strip())
        errors = body.get("errors")
        for item in errors if isinstance(errors, list) else ():
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, Mapping):
                detail = item.get("message") or " ".join(
                    str(item[k]) for k in ("resource", "field", "code") if item.get(k))
                if detail:
                    parts.append(str(detail))
        message = "; ".join(parts)
    else:
        stripped = text.strip()
        message = "" if stripped.startswith("<") else " ".join(stripped.split())  # no HTML pages
    if not message:
        return None
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."


def _parse_date_seconds(value: str, now: float) -> float | None:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError, IndexError):
        return None


def server_wait(status: int, headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the service asked to wait before trying again: ``Retry-After`` (seconds or an
    HTTP date), else ``x-ratelimit-reset`` (epoch seconds) when ``x-ratelimit-remaining`` is
    0; None when it said nothing."""
    retry_after = headers.get("retry-after")
    if retry_after:
        wait = _parse_date_seconds(retry_after.strip(), now)
        if wait is not None:
            return max(wait, 0.0)
    if headers.get("x-ratelimit-remaining", "").strip() == "0" and headers.get("x-ratelimit-reset"):
        try:
            return max(float(headers["x-ratelimit-reset"]) - now, 0.0)
        except ValueError:
            return None
    return None


def is_rate_limited(status: int, headers: Mapping[str, str]) -> bool:
    """429, or a 403 that is a rate limit rather than a missing permission (GitHub answers
    403 with ``x-ratelimit-remaining: 0`` or a ``Retry-After`` for its rate limits)."""
    if status == 429:
        return True
    return status == 403 and (headers.get("x-ratelimit-remaining", "").strip() == "0"
                              or bool(headers.get("retry-after")))


def _reason(e: requests.RequestException) -> str:
    if isinstance(e, requests.ConnectTimeout):
        return "could not connect in time"
    if isinstance(e, requests.Timeout):
        return "no answer in time"
    cur: BaseException = e
    seen = {id(e)}
    while True:  # the innermost cause says it best ("Connection refused")
        inner = cur.__cause__ or cur.__context__ or getattr(cur, "reason", None) or next(
            (a for a in cur.args if isinstance(a, BaseException)), None)
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        seen.add(id(inner))
        cur = inner
    text = " ".join(str(cur).split())
    return f"{type(e).__name__}: {text}"[:300]


def _maybe_sent(e: requests.RequestException) -> bool:
    """Whether the request may have reached the service before ``e`` (so re-sending a
    non-idempotent request could do it twice): False only when no connection was made."""
    if isinstance(e, requests.ConnectTimeout):
        return False
    if isinstance(e, requests.ConnectionError):
        seen: set[int] = set()
        stack: list[BaseException] = [e]
        while stack:
            cur = stack.pop()
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            if type(cur).__name__ in ("NewConnectionError", "NameResolutionError", "ConnectTimeoutError"):
                return False
            stack.extend(x for x in (cur.__cause__, cur.__context__, getattr(cur, "reason", None), *cur.args)
                         if isinstance(x, BaseException))
    return True


# --------------------------------------------------------------------------- the client


class JsonHttp:
    """JSON requests to one service at ``base_url`` (which may carry a path prefix, e.g. an
    Azure DevOps organization or GitHub Enterprise's ``/api/v3``).

    ``headers`` go with every request (a request can drop one by passing it as None);
    ``secrets`` are redacted from every message and log line; ``hints`` map a status to the
    fix appended to its error message, ``not_json_hint`` is appended when a success answer
    is not JSON (e.g. a sign-in page). ``sleep`` is injectable so tests never wait."""

    def __init__(self, base_url: str, *, service: str, headers: Mapping[str, str], secrets: Iterable[str] = (),
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF, max_wait: float = DEFAULT_MAX_WAIT,
                 sleep: Callable[[float], None] = time.sleep, session: requests.Session | None = None,
                 hints: Mapping[int, str] | None = None, not_json_hint: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if timeout <= 0:
            raise InvalidInput(f"timeout: {timeout!r} is not a positive number of seconds", field="timeout")
        if retries < 0:
            raise InvalidInput(f"retries: {retries!r} is negative; 0 means one attempt only", field="retries")
        if backoff < 0 or max_wait < 0:
            raise InvalidInput("backoff and max_wait must not be negative", field="backoff")
        self.base_url = base_url.rstrip("/")
        self.base_path = urlsplit(self.base_url).path
        self.service = service
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.hints = dict(hints or {})
        self.not_json_hint = not_json_hint
        self._sleep = sleep
        self._clock = clock
        self._secrets = tuple(s for s in secrets if s)
        self._session = session or requests.Session()
        self._session.headers.update(headers)

    def __repr__(self) -> str:
        return f"JsonHttp({self.service!r}, {self.base_url!r})"

    def close(self) -> None:
        self._session.close()

    # ----------------------------------------------------------------------- requests

    def call(self, method: str, path: str, *, what: str, params: Mapping[str, str | int] | None = None,
             body: Any = None, raw: bytes | None = None, headers: Mapping[str, str | None] | None = None,
             ok: Collection[int] = (200,), idempotent: bool | None = None, hints: Mapping[int, str] | None = None,
             secrets: Sequence[str] = (),
             not_retried: Callable[[int, Any], str | None] | None = None) -> Reply:
        """Send ``method`` ``path`` (under ``base_url``; quote its segments with ``segment``)
        with ``body`` as compact JSON (or ``raw`` bytes as they are) and return the answer
        when its status is in ``ok``; raise PipelineApiError otherwise.

        ``what`` names the action in messages ("start workflow 'release.yml'").
        ``idempotent`` (default: GET/HEAD/PUT/DELETE) allows re-sending after a timeout or a
        dropped connection that may have reached the service. ``not_retried(status, body)``
        may return a hint to stop retrying a 5xx the service means for good. Extra
        ``secrets`` are redacted for this call."""
        method = method.upper()
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
        if raw is None and body is not None:
            raw = compact_json(body, "body")
        send_headers: dict[str, str | None] = {}
        if raw is not None:
            send_headers["Content-Type"] = "application/json"
        send_headers.update(headers or {})
        url = self.base_url + path
        show = f"{method} {self.base_path}{path}"
        all_secrets = (*self._secrets, *secrets)
        all_hints = {**self.hints, **(hints or {})}
        attempt = 0
        while True:
            try:
                # a None value drops a session header (requests merges them so)
                resp = self._session.request(method, url, params=params, data=raw, headers=cast(Any, send_headers),
                                             timeout=self.timeout, allow_redirects=method == "GET")
            except requests.RequestException as e:
                reason = _reason(e)
                sent = _maybe_sent(e)
                if sent and not idempotent:
                    raise self._error(
                        f"{what}: {show} got no answer ({reason}); the request may have been acted on, so it "
                        "was not sent again: look for the run it started before sending it again",
                        method, path, None, True, all_secrets, ambiguous=True) from None
                if attempt >= self.retries:
                    raise self._error(f"{what}: {show} failed after {attempt + 1} attempt(s) ({reason}); check "
                                      f"that {self.service} can be reached, then retry",
                                      method, path, None, True, all_secrets, ambiguous=sent) from None
                self._pause(attempt, None, f"{show}: {reason}", all_secrets)
                attempt += 1
                continue
            try:
                return self._answer(resp, what, show, method, path, ok, all_hints, all_secrets, not_retried)
            except _Retry as r:
                if r.wait is not None and r.wait > self.max_wait:
                    raise self._error(f"{r.message}; {self.service} asked to wait {r.wait:.0f} s, more than "
                                      f"the {self.max_wait:.0f} s allowed here: retry later",
                                      method, path, resp.status_code, True, all_secrets,
                                      service_msg=r.service_msg, retry_after=r.wait) from None
                if attempt >= self.retries:
                    raise self._error(f"{r.message}; gave up after {attempt + 1} attempt(s), retry later",
                                      method, path, resp.status_code, True, all_secrets,
                                      service_msg=r.service_msg, retry_after=r.wait) from None
                self._pause(attempt, r.wait, f"{show}: {resp.status_code}", all_secrets)
                attempt += 1
            finally:
                resp.close()

    def _answer(self, resp: requests.Response, what: str, show: str, method: str, path: str,
                ok: Collection[int], hints: Mapping[int, str], secrets: Sequence[str],
                not_retried: Callable[[int, Any], str | None] | None) -> Reply:
        status = resp.status_code
        text = resp.text
        body: Any = None
        bad_json = False
        if text.strip():
            try:
                body = json.loads(text)
            except ValueError:
                bad_json = True
        if status in ok:
            if bad_json:
                raise self._error(f"{what}: {show} answered {_status_text(status)} with a body that is not JSON"
                                  f"{_hint(self.not_json_hint)}", method, path, status, False, secrets)
            return Reply(status, resp.headers, body)
        message = service_message(body, text)
        head = f"{what}: {show} answered {_status_text(status)}" + (f": {message}" if message else "")
        secondary = status == 403 and "rate limit" in (message or "").lower()
        if status >= 500 or secondary or is_rate_limited(status, resp.headers):
            final = not_retried(status, body) if not_retried and status >= 500 else None
            if final is None:
                wait = server_wait(status, resp.headers, self._clock())
                if wait is None and secondary:
                    wait = SECONDARY_RATE_LIMIT_WAIT
                raise _Retry(redact(head, secrets), message, wait)
            raise self._error(head + _hint(final), method, path, status, False, secrets, service_msg=message)
        if 200 <= status < 300:
            head = f"{what}: {show} answered {_status_text(status)}, expected {' or '.join(map(str, ok))}"
        raise self._error(head + _hint(hints.get(status)), method, path, status, False, secrets,
                          service_msg=message)

    def _pause(self, attempt: int, wait: float | None, why: str, secrets: Sequence[str]) -> None:
        if wait is None:
            step = min(self.max_wait, self.backoff * (2 ** attempt))
            wait = step / 2 + random.uniform(0, step / 2)
        log.warning("%s: %s; retry %d/%d in %.2f s", self.service, redact(why, secrets), attempt + 1,
                    self.retries, wait)
        self._sleep(wait)

    def _error(self, message: str, method: str, path: str, status: int | None, retryable: bool,
               secrets: Sequence[str], *, service_msg: str | None = None, retry_after: float | None = None,
               ambiguous: bool = False) -> PipelineApiError:
        safe = redact(f"{self.service}: {message}", secrets)
        log.debug("%s", safe)
        return PipelineApiError(safe, method=method, path=self.base_path + path, status=status,
                                retryable=retryable,
                                service_message=redact(service_msg, secrets) if service_msg else None,
                                retry_after=retry_after, ambiguous=ambiguous)


class _Retry(Exception):
    def __init__(self, message: str, service_msg: str | None, wait: float | None) -> None:
        super().__init__(message)
        self.message = message
        self.service_msg = service_msg
        self.wait = wait


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _hint(hint: str | None) -> str:
    return f"; {hint}" if hint else ""


# --------------------------------------------------------------------------- stage outcomes


def check_stage_map(stage_map: Mapping[str, str], field: str) -> None:
    """InvalidInput unless every key is a modelcd stage and every value a non-empty name."""
    for stage, name in stage_map.items():
        if stage not in STAGES:
            raise InvalidInput(f"{field}: {stage!r} is not a pipeline stage; use {', '.join(STAGES)}", field=field)
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput(f"{field}: stage {stage!r} needs the name of its job or stage", field=field)


def combine(outcomes: Sequence[Outcome]) -> Outcome:
    """One stage's outcome from the outcomes of the jobs (or records) that make it up."""
    if not outcomes:
        return "pending"
    if "failed" in outcomes:
        return "failed"
    if "cancelled" in outcomes:
        return "cancelled"
    if all(o == "skipped" for o in outcomes):
        return "skipped"
    if all(o in ("succeeded", "skipped") for o in outcomes):
        return "succeeded"
    if all(o == "pending" for o in outcomes):
        return "pending"
    return "running"


def stage_result(outcomes: Sequence[Outcome], finished: bool, cancelled: bool) -> Outcome:
    """One stage's outcome in a run: ``combine`` while the run goes on; once it has finished,
    a stage with nothing recorded was skipped (cancelled with the run), and parts still
    pending or running failed (or were cancelled with the run)."""
    if not finished:
        return combine(outcomes)
    if not outcomes:
        return "cancelled" if cancelled else "skipped"
    unfinished: Outcome = "cancelled" if cancelled else "failed"
    return combine([unfinished if o in ("pending", "running") else o for o in outcomes])


class ApiClient:
    """What every client over ``JsonHttp`` shares: close, and use as a context manager."""

    _http: JsonHttp

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
