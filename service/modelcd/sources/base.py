"""The ``Source`` interface: one adapter per external registry that sends webhooks.

A source does two things, both without Flask or a database:

- ``receive(req, now)`` runs while the sender waits. It checks the size, then authenticity
  (signature, shared secret or token, replay window), and returns either ``Accepted`` (store
  the body and the kept headers, answer 202) or ``Respond`` (a handshake or probe to answer
  at once, storing nothing). It raises ``Unauthorized`` (401), ``InvalidInput`` (400) or
  ``PayloadTooLarge`` (413); their messages say what is wrong and how to fix it and never
  contain a secret or a signature.
- ``normalise(body, headers)`` runs later, on the stored delivery. It is pure: it turns the
  body into ``Registered`` events (a new model version) or ``Ignored`` ones (anything else,
  with the reason) and raises ``InvalidInput`` only when the body cannot be understood.
  ``receive`` calls it once too, so a delivery that could never be processed is refused with
  400 while the sender still waits, instead of reaching the dead letter later.

Pick a source by name with ``get_source(name, settings, **opts)``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from modelcd import domain
from modelcd.config import ENV_PREFIX, Settings
from modelcd.errors import InvalidInput, NotFound, PayloadTooLarge, Unauthorized
from modelcd.ports import Ports

# A delivery id that is not 1-128 printable ASCII characters is replaced by a digest of it,
# so ids are always safe to store, log and show.
_SAFE_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")


def lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with lower-case names (HTTP header names are case-insensitive)."""
    return {str(k).lower(): str(v) for k, v in headers.items()}


@dataclass(frozen=True)
class HookRequest:
    """One HTTP request to ``/hooks/<source>``, as the handler read it. ``headers`` are
    stored with lower-case names whatever the caller passed; use ``header()`` to read one."""

    method: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", self.method.upper())
        object.__setattr__(self, "headers", lower_keys(self.headers))
        object.__setattr__(self, "query", dict(self.query))

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header ``name`` (any case), or ``default``."""
        return self.headers.get(name.lower(), default)


@dataclass(frozen=True)
class Accepted:
    """An authentic delivery: store ``body`` with ``kept_headers`` (never secrets) under
    ``delivery_id`` (the sender's id, stable across its retries) and answer 202."""

    delivery_id: str
    kept_headers: dict[str, str]


@dataclass(frozen=True)
class Respond:
    """Answer at once with this status, body and headers; store nothing."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Registered:
    """A model version appeared in an external registry.

    ``artifact_uri`` says where its files can be fetched (``models:/name/3``, ``s3://...``);
    None means the version is recorded by reference only. ``release`` False records it
    without starting a release (e.g. SageMaker ``PendingManualApproval``). ``dedup_key``
    is the same for every event about the same fact, whatever delivery carried it; it
    defaults to ``"<source>:<external_ref>"``."""

    source: domain.Source
    model: str
    external_version: str
    external_ref: str
    artifact_uri: str | None
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    release: bool = True
    dedup_key: str = ""

    def __post_init__(self) -> None:
        if not self.dedup_key:
            object.__setattr__(self, "dedup_key", f"{self.source}:{self.external_ref}")


@dataclass(frozen=True)
class Ignored:
    """An authentic event that announces no new model version; ``reason`` says why."""

    reason: str


Event = Registered | Ignored


class Source(ABC):
    """One external registry's webhooks: verify, name the delivery, normalise.

    Contract: ``receive`` is fast (no network, except SNS certificate fetches and
    subscription confirmations in the SageMaker source), thread-safe and side-effect free
    apart from those; calling it twice with the same request gives the same result, so
    deduplication on ``delivery_id`` is the caller's. ``normalise`` is pure and
    deterministic. Neither ever puts a secret or a signature into an error message."""

    name: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def receive(self, req: HookRequest, now: float) -> Accepted | Respond:
        """Check size and authenticity of ``req`` at unix time ``now``; see the module doc."""
        limit = self.settings.hooks_max_body_bytes
        if len(req.body) > limit:
            raise PayloadTooLarge(f"delivery of {len(req.body)} bytes is over the limit of {limit}; raise "
                                  f"{env_name('hooks_max_body_bytes')} if it is legitimate", field="body")
        if req.method == "POST":
            result = self.receive_post(req, now)
        else:
            result = self.receive_other(req, now)
        if isinstance(result, Accepted):
            result = Accepted(safe_delivery_id(result.delivery_id), result.kept_headers)
            self.normalise(req.body, result.kept_headers)
        return result

    @abstractmethod
    def receive_post(self, req: HookRequest, now: float) -> Accepted | Respond:
        """Authenticate a POST and name the delivery (or answer a handshake)."""

    def receive_other(self, req: HookRequest, now: float) -> Accepted | Respond:
        """Answer a method other than POST; by default 405."""
        return respond_json(405, {"code": "method_not_allowed",
                                  "message": f"/hooks/{self.name} takes POST, not {req.method}"},
                            {"Allow": "POST"})

    @abstractmethod
    def normalise(self, body: bytes, headers: Mapping[str, str]) -> list[Event]:
        """The events a stored delivery announces (pure; InvalidInput if unreadable)."""


# name → the Source class, called with the settings (and an adapter's own keyword options,
# which tests pass); modules are imported on first use (sagemaker pulls in cryptography).
KNOWN_SOURCES: Ports[..., Source] = Ports(
    {"mlflow": "modelcd.sources.mlflow:MlflowSource",
     "azureml": "modelcd.sources.azureml:AzureMLSource",
     "sagemaker": "modelcd.sources.sagemaker:SageMakerSource",
     "s3": "modelcd.sources.s3:S3Source",
     "generic": "modelcd.sources.generic:GenericSource"},
    unknown="unknown webhook source {name!r}; known sources: {known} (POST to /hooks/<source>)", field="source",
    error=NotFound)


def get_source(name: str, settings: Settings, **opts: Any) -> Source:
    """The source adapter called ``name``, configured from ``settings`` (and ``opts``,
    passed to its constructor); NotFound listing the known names otherwise."""
    return KNOWN_SOURCES.create(name, settings, **opts)


# --- helpers shared by the sources -------------------------------------------------------


def env_name(setting: str) -> str:
    """The environment variable of a setting, as users configure it."""
    return ENV_PREFIX + setting.upper()


def require_secret(value: str | None, setting: str, what: str) -> bytes:
    """The configured secret as bytes; Unauthorized naming the setting when it is unset."""
    if not value:
        raise Unauthorized(f"{what} deliveries are refused: {env_name(setting)} is not set; set it to the "
                           "shared secret configured at the sender")
    return value.encode("utf-8")


def same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time equality of two secrets, signatures or tokens."""
    ab = a.encode("utf-8") if isinstance(a, str) else a
    bb = b.encode("utf-8") if isinstance(b, str) else b
    return hmac.compare_digest(ab, bb)


def check_timestamp(ts: int | float, now: float, window: float, header: str) -> None:
    """Unauthorized unless ``ts`` is within ``window`` seconds of ``now`` (past or future)."""
    skew = now - ts
    if skew > window:
        raise Unauthorized(f"{header} is {int(skew)} s old, outside the replay window of {int(window)} s: a "
                           f"replayed or long-delayed delivery; check the sender's clock, or raise "
                           f"{env_name('hooks_replay_window_s')}")
    if -skew > window:
        raise Unauthorized(f"{header} is {int(-skew)} s in the future, outside the replay window of "
                           f"{int(window)} s; check the sender's clock")


def parse_unix_ts(value: str | None, header: str) -> int:
    """A unix-seconds header value; Unauthorized when missing or not an integer."""
    if value is None or not value.strip():
        raise Unauthorized(f"{header} header is missing; the sender must send it with every delivery")
    try:
        return int(value.strip())
    except ValueError:
        raise Unauthorized(f"{header} is not unix seconds (an integer); is the sender configured for this "
                           "endpoint?") from None


def safe_delivery_id(value: str) -> str:
    """``value`` if it is 1-128 printable ASCII characters, else ``sha256:<hex of it>``."""
    if _SAFE_ID_RE.fullmatch(value):
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def batch_id(ids: list[str]) -> str:
    """One deterministic delivery id for a batch of event ids: the id itself for one event,
    else ``<first>+<n-1>:<sha256 of all ids, 16 hex>``."""
    if len(ids) == 1:
        return ids[0]
    digest = hashlib.sha256("\n".join(ids).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{ids[0]}+{len(ids) - 1}:{digest}"


def keep(headers: Mapping[str, str], names: Iterable[str], prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The headers (lower-case names) that are in ``names`` or start with ``prefixes``."""
    wanted = {n.lower() for n in names}
    return {k: v for k, v in lower_keys(headers).items() if k in wanted or (prefixes and k.startswith(prefixes))}


def parse_json(body: bytes, what: str) -> Any:
    """``body`` decoded as JSON; InvalidInput saying where it broke (never echoing it)."""
    try:
        return json.loads(body)
    except ValueError as e:
        detail = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else \
            "not UTF-8 text"
        raise InvalidInput(f"{what} is not valid JSON ({detail}); the sender must POST a JSON body",
                           field="body") from None
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply to read", field="body") from None


def respond_json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Respond:
    """A ``Respond`` carrying ``payload`` as JSON."""
    return Respond(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def obj(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object; InvalidInput naming ``where`` otherwise."""
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: must be a JSON object, got {_kind(value)}", field=where)
    return value


def text(data: Mapping[str, Any], key: str, where: str, *, numbers: bool = False) -> str:
    """``data[key]`` as a non-empty string (an integer too when ``numbers``); InvalidInput
    naming the field otherwise."""
    value = data.get(key)
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        what = "missing" if value is None else f"must be a non-empty string, got {_kind(value)}"
        raise InvalidInput(f"{where}.{key}: {what}", field=f"{where}.{key}")
    return value


def optional_text(data: Mapping[str, Any], key: str, where: str) -> str:
    """``data[key]`` as a string, "" when absent or null; InvalidInput for other types."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{where}.{key}: must be a string, got {_kind(value)}", field=f"{where}.{key}")
    return value


def tag_map(value: Any, where: str) -> dict[str, str]:
    """A tag object with its scalar values as text (``true`` → "true", ``3`` → "3"), as the
    policy matcher reads them; null is {}. Name and length rules are the registry's."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: must be an object of tag: value, got {_kind(value)}", field=where)
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, str | int | float):
            out[k] = str(v)
        elif v is None:
            out[k] = ""
        else:
            raise InvalidInput(f"{where}.{k}: tag values must be strings, got {_kind(v)}", field=f"{where}.{k}")
    return out


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
