"""MLflow OSS model registry webhooks (MLflow ≥ 3.3).

MLflow signs every delivery of a webhook that has a secret::

    X-MLflow-Delivery-Id: <uuid4>
    X-MLflow-Timestamp:   <unix seconds>
    X-MLflow-Signature:   v1,<base64 HMAC-SHA256(secret, delivery_id + "." + timestamp + "." + raw_body)>

Retries re-send the identical request, so the delivery id is stable. Only
``model_version.created`` announces a version; tag, alias and registered-model events and
MLflow's test deliveries (``example_model`` / ``models:/123``) are ignored."""

from __future__ import annotations

import base64
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

DELIVERY_ID = "X-MLflow-Delivery-Id"
TIMESTAMP = "X-MLflow-Timestamp"
SIGNATURE = "X-MLflow-Signature"
KEPT = (DELIVERY_ID, TIMESTAMP, "content-type", "user-agent")
# MLflow's test_webhook() sends this fixed example data; it must never be deployed
TEST_NAME, TEST_SOURCE = "example_model", "models:/123"


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    msg = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


class MlflowSource(Source):
    """``/hooks/mlflow``: HMAC-signed deliveries from an MLflow tracking server."""

    name = "mlflow"

    def receive_post(self, req: HookRequest, now: float) -> Accepted | Respond:
        secret = require_secret(self.settings.hooks_mlflow_secret, "hooks_mlflow_secret", "MLflow")
        delivery_id = req.header(DELIVERY_ID)
        if not delivery_id:
            raise Unauthorized(f"{DELIVERY_ID} header is missing: is this an MLflow webhook delivery?")
        signature = req.header(SIGNATURE)
        if not signature:
            raise Unauthorized(f"{SIGNATURE} header is missing: give the MLflow webhook a secret equal to "
                               f"{env_name('hooks_mlflow_secret')}")
        timestamp = req.header(TIMESTAMP) or ""
        ts = parse_unix_ts(timestamp, TIMESTAMP)
        expected = sign(secret.decode(), delivery_id, timestamp, req.body)
        # several space-separated signatures are allowed (Standard Webhooks), one must match
        if not any(same(candidate, expected) for candidate in signature.split()):
            raise Unauthorized(f"{SIGNATURE} does not match the body: check {env_name('hooks_mlflow_secret')} "
                               "equals the webhook's secret, and that nothing between MLflow and modelcd "
                               "changes the body")
        check_timestamp(ts, now, self.settings.hooks_replay_window_s, TIMESTAMP)
        return Accepted(delivery_id, keep(req.headers, KEPT))

    def normalise(self, body: bytes, headers: Mapping[str, str]) -> list[Event]:
        """``model_version.created`` → Registered; every other event → Ignored."""
        envelope = obj(parse_json(body, "MLflow delivery"), "body")
        entity, action = text(envelope, "entity", "body"), text(envelope, "action", "body")
        event = f"{entity}.{action}"
        if event != "model_version.created":
            return [Ignored(f"MLflow event {event} does not announce a new model version "
                            "(only model_version.created does)")]
        return [_registered(obj(envelope.get("data"), "data"))]


def _registered(data: dict[str, Any]) -> Event:
    name = text(data, "name", "data")
    version = text(data, "version", "data", numbers=True)
    if name == TEST_NAME and data.get("source") == TEST_SOURCE:
        return Ignored(f"MLflow test delivery (name {TEST_NAME!r}, source {TEST_SOURCE!r}): "
                       "the webhook works; nothing to deploy")
    if "/" in name:
        raise InvalidInput(f"data.name: {name!r} contains '/', which no MLflow model name can", field="data.name")
    ref = f"models:/{name}/{version}"
    return Registered(source=domain.Source.MLFLOW, model=name, external_version=version, external_ref=ref,
                      artifact_uri=ref, tags=tag_map(data.get("tags"), "data.tags"),
                      description=optional_text(data, "description", "data"))
