"""``/hooks/generic``: a small signed webhook any system (a CI job, a script) can send.

Sign like Stripe, with the secret ``MODELCD_HOOKS_GENERIC_SECRET``::

    t  = unix seconds now
    v1 = hex(HMAC-SHA256(secret, f"{t}." + raw_body))
    X-Modelcd-Signature: t=<t>,v1=<v1>          (more v1= entries allowed, one must match)
    X-Modelcd-Delivery-Id: <unique id>          (optional; default sha256:<hex of the body>)

``t`` must be within ``MODELCD_HOOKS_REPLAY_WINDOW_S`` of the receiver's clock. The body::

    {"model": "churn", "version": "3",                  # version: string or integer
     "artifact_uri": "s3://bucket/churn/3/" | "models:/churn/3" | null,   # null: reference only
     "tags": {"deploy": "true"}, "description": "",
     "source": "native",                                 # optional: native (default), mlflow, ...
     "external_ref": "...",                              # optional: default the artifact_uri,
                                                         #   else generic:<model>/<version>
     "release": true,                                    # optional: false records without releasing
     "event": "model_version.created"}                   # optional: any other value is ignored

Example with curl::

    body='{"model":"churn","version":"3","artifact_uri":"s3://models/churn/3/"}'
    t=$(date +%s); sig=$(printf '%s' "$t.$body" | openssl dgst -sha256 -hmac "$SECRET" -hex | cut -d' ' -f2)
    curl -H "X-Modelcd-Signature: t=$t,v1=$sig" -H 'Content-Type: application/json' -d "$body" .../hooks/generic
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from modelcd import domain
from modelcd.errors import InvalidInput, Unauthorized
from modelcd.sources.base import (
    Accepted,
    Event,
    HookRequest,
    Ignored,
    Registered,
    Respond,
    Source,
    check_timestamp,
    env_name,
    keep,
    obj,
    optional_text,
    parse_json,
    parse_unix_ts,
    require_secret,
    same,
    tag_map,
    text,
)

SIGNATURE = "X-Modelcd-Signature"
DELIVERY_ID = "X-Modelcd-Delivery-Id"
KEPT = (DELIVERY_ID, "content-type", "user-agent")
EVENTS = ("model_version.created", "model_version.registered")
URI_SCHEMES = ("s3://", "models:/")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Modelcd-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _parse_signature(value: str | None) -> tuple[str | None, list[str]]:
    """(t, [v1...]) from ``t=...,v1=...``."""
    t: str | None = None
    v1: list[str] = []
    for item in (value or "").split(","):
        key, _, val = item.strip().partition("=")
        if key == "t":
            t = val
        elif key == "v1" and val:
            v1.append(val.lower())
    return t, v1


class GenericSource(Source):
    """``/hooks/generic``: HMAC-SHA256 signed registrations (see the module doc)."""

    name = "generic"

    def receive_post(self, req: HookRequest, now: float) -> Accepted | Respond:
        secret = require_secret(self.settings.hooks_generic_secret, "hooks_generic_secret", "generic")
        t, candidates = _parse_signature(req.header(SIGNATURE))
        if not candidates:
            raise Unauthorized(f"{SIGNATURE} header is missing or has no v1= signature; send "
                               f"t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'> keyed with "
                               f"{env_name('hooks_generic_secret')}")
        ts = parse_unix_ts(t, f"{SIGNATURE} t=")
        expected = hmac.new(secret, f"{ts}.".encode() + req.body, hashlib.sha256).hexdigest()
        if t != str(ts) or not any(same(c, expected) for c in candidates):
            raise Unauthorized(f"{SIGNATURE} does not match the body: sign '<t>.<raw body>' with HMAC-SHA256 "
                               f"keyed with {env_name('hooks_generic_secret')}, hex-encoded")
        check_timestamp(ts, now, self.settings.hooks_replay_window_s, f"{SIGNATURE} t=")
        delivery_id = req.header(DELIVERY_ID) or "sha256:" + hashlib.sha256(req.body).hexdigest()
        return Accepted(delivery_id, keep(req.headers, KEPT))

    def normalise(self, body: bytes, headers: Mapping[str, str]) -> list[Event]:
        """The one registration a body announces (or Ignored for another ``event``)."""
        doc = obj(parse_json(body, "generic delivery"), "body")
        event = doc.get("event", EVENTS[0])
        if event not in EVENTS:
            return [Ignored(f"event {event!r} is not a model version registration ({' or '.join(EVENTS)})")]
        return [_registered(doc)]


def _registered(doc: dict[str, Any]) -> Registered:
    model = text(doc, "model", "body")
    version = text(doc, "version", "body", numbers=True)
    uri = doc.get("artifact_uri")
    if uri is not None and not (isinstance(uri, str) and uri.startswith(URI_SCHEMES) and len(uri) > 6):
        raise InvalidInput(f"body.artifact_uri: must be an s3://bucket/prefix/ or models:/name/version URI, or null "
                           f"for a version recorded by reference only (got {str(uri)[:200]!r})",
                           field="body.artifact_uri")
    source = doc.get("source", domain.Source.NATIVE.value)
    if not isinstance(source, str) or source not in {s.value for s in domain.Source}:
        raise InvalidInput(f"body.source: must be one of {', '.join(s.value for s in domain.Source)} "
                           f"(got {str(source)[:100]!r})", field="body.source")
    release = doc.get("release", True)
    if not isinstance(release, bool):
        raise InvalidInput("body.release: must be true or false", field="body.release")
    ref = optional_text(doc, "external_ref", "body") or uri or f"generic:{model}/{version}"
    return Registered(source=domain.Source(source), model=model, external_version=version, external_ref=ref,
                      artifact_uri=uri, tags=tag_map(doc.get("tags"), "body.tags"),
                      description=optional_text(doc, "description", "body"), release=release)
