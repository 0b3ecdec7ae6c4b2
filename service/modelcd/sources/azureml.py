"""Azure Machine Learning events delivered by Azure Event Grid.

Both delivery schemas are read:

- **Event Grid schema**: the body is a JSON array of events (``id``, ``topic``, ``subject``,
  ``eventType``, ``data``...), even for one event.
- **CloudEvents 1.0**: structured mode, one object (``application/cloudevents+json``) or an
  array (``application/cloudevents-batch+json``); binary mode (attributes in ``ce-*``
  headers, the data alone in the body) is read too.

Event Grid does not sign payloads. The subscription's endpoint carries a shared secret,
either in the URL (``https://.../hooks/azureml?code=<secret>``) or as a static delivery
property header ``X-Modelcd-Secret: <secret>`` (mark it secret in Azure); it must equal
``MODELCD_HOOKS_AZUREML_SECRET``. Microsoft Entra (JWT) authentication is not supported.

Handshakes: an Event Grid ``SubscriptionValidationEvent`` is answered with 200
``{"validationResponse": <code>}`` only after the secret has been checked. A CloudEvents
abuse-protection ``OPTIONS`` request is answered with 200 and ``WebHook-Allowed-Origin``
when the source is configured; if it presents a secret, the secret must match (so a wrong
``?code=`` fails when the subscription is created rather than on every delivery).

The delivery id is the event ``id``; a batch is one delivery, named by ``batch_id``.
``ModelRegistered`` becomes a ``Registered`` whose ``artifact_uri`` is the version's asset id
(``azureml:/subscriptions/…/workspaces/{ws}/models/{name}/versions/{v}``, from the event's
``topic`` or ``source`` and its data): the inbox importer resolves its files through the
Azure ML REST API and downloads them (``azureml_fetch.py``). An event that names no workspace
is recorded by reference only. Everything else (``RunCompleted``, ``ModelDeployed``...) is
ignored."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from modelcd import domain
from modelcd.errors import InvalidInput, Unauthorized
from modelcd.sources.azureml_api import ModelVersionRef, parse_workspace
from modelcd.sources.base import (
    Accepted,
    Event,
    HookRequest,
    Ignored,
    Registered,
    Respond,
    Source,
    batch_id,
    env_name,
    keep,
    lower_keys,
    obj,
    parse_json,
    require_secret,
    respond_json,
    same,
    tag_map,
    text,
)

SECRET_HEADER = "X-Modelcd-Secret"
SECRET_QUERY = "code"
VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
MODEL_REGISTERED = "Microsoft.MachineLearningServices.ModelRegistered"
KEPT = ("content-type", "aeg-event-type", "aeg-subscription-name", "aeg-delivery-count", "aeg-data-version",
        "aeg-metadata-version")
_ORIGIN_RE = re.compile(r"[A-Za-z0-9.-]{1,253}")


class AzureMLSource(Source):
    """``/hooks/azureml``: Event Grid (both schemas) with a shared secret in the URL or a header."""

    name = "azureml"

    def _check_secret(self, req: HookRequest, *, required: bool = True) -> None:
        secret = require_secret(self.settings.hooks_azureml_secret, "hooks_azureml_secret", "Azure ML")
        setting = env_name("hooks_azureml_secret")
        presented, where = req.header(SECRET_HEADER), f"the {SECRET_HEADER} header"
        if presented is None:
            presented, where = req.query.get(SECRET_QUERY), f"?{SECRET_QUERY}="
        if presented is None:
            if not required:
                return
            raise Unauthorized(f"no secret: add ?{SECRET_QUERY}=<{setting}> to the Event Grid subscription's "
                               f"endpoint URL, or a secret delivery property header {SECRET_HEADER}")
        if not same(presented, secret):
            raise Unauthorized(f"the secret in {where} does not match: check it equals {setting}")

    def receive_post(self, req: HookRequest, now: float) -> Accepted | Respond:
        self._check_secret(req)
        kept = keep(req.headers, KEPT, prefixes=("ce-",))
        if "ce-specversion" in req.headers:  # CloudEvents binary mode
            event_id = req.header("ce-id")
            if not event_id:
                raise InvalidInput("ce-id header is missing from a binary-mode CloudEvent", field="ce-id")
            return Accepted(event_id, kept)
        events = _events(parse_json(req.body, "Event Grid delivery"))
        for i, event in enumerate(events):
            if event.get("eventType") == VALIDATION_EVENT:
                data = obj(event.get("data"), f"[{i}].data")
                return respond_json(200, {"validationResponse": text(data, "validationCode", f"[{i}].data")})
        return Accepted(batch_id([text(e, "id", f"[{i}]") for i, e in enumerate(events)]), kept)

    def receive_other(self, req: HookRequest, now: float) -> Accepted | Respond:
        """CloudEvents abuse protection: OPTIONS → 200 with the WebHook-Allowed-* headers."""
        if req.method != "OPTIONS":
            return respond_json(405, {"code": "method_not_allowed", "message": "/hooks/azureml takes POST and "
                                      f"OPTIONS, not {req.method}"}, {"Allow": "POST, OPTIONS"})
        self._check_secret(req, required=False)
        origin = req.header("webhook-request-origin") or ""
        return Respond(200, b"", {"WebHook-Allowed-Origin": origin if _ORIGIN_RE.fullmatch(origin) else "*",
                                  "WebHook-Allowed-Rate": "*", "Allow": "POST"})

    def normalise(self, body: bytes, headers: Mapping[str, str]) -> list[Event]:
        """``ModelRegistered`` (either schema) → Registered with the version's asset id; others → Ignored."""
        hdrs = lower_keys(headers)
        if "ce-specversion" in hdrs:
            events = [{"id": hdrs.get("ce-id"), "type": hdrs.get("ce-type"), "source": hdrs.get("ce-source"),
                       "subject": hdrs.get("ce-subject"), "data": parse_json(body, "CloudEvent data")}]
        else:
            events = _events(parse_json(body, "Event Grid delivery"))
        return [_normalise_one(e, f"[{i}]") for i, e in enumerate(events)]


def _events(doc: Any) -> list[dict[str, Any]]:
    """The events of a body: an array of objects, or one object."""
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InvalidInput("body: an empty array holds no events", field="body")
    return [obj(item, f"[{i}]") for i, item in enumerate(items)]


def _data(event: dict[str, Any], where: str) -> dict[str, Any]:
    if "data" not in event and isinstance(event.get("data_base64"), str):  # CloudEvents binary data
        try:
            raw = base64.b64decode(event["data_base64"], validate=True)
        except binascii.Error:
            raise InvalidInput(f"{where}.data_base64: not base64", field=f"{where}.data_base64") from None
        return obj(parse_json(raw, f"{where}.data_base64"), f"{where}.data")
    return obj(event.get("data"), f"{where}.data")


def _normalise_one(event: dict[str, Any], where: str) -> Event:
    event_type = event.get("eventType", event.get("type"))
    if not isinstance(event_type, str) or not event_type:
        raise InvalidInput(f"{where}: no eventType (Event Grid schema) or type (CloudEvents)", field=where)
    if event_type != MODEL_REGISTERED:
        return Ignored(f"Azure event {event_type} does not announce a new model version (only "
                       f"{MODEL_REGISTERED} does)")
    data = _data(event, where)
    name = text(data, "ModelName", f"{where}.data")
    version = text(data, "ModelVersion", f"{where}.data", numbers=True)
    subject = event.get("subject")
    if not isinstance(subject, str) or not subject:
        subject = f"models/{name}:{version}"
    workspace = event.get("topic", event.get("source"))
    found = parse_workspace(workspace) if isinstance(workspace, str) else None
    return Registered(source=domain.Source.AZUREML, model=name, external_version=version, external_ref=subject,
                      artifact_uri=ModelVersionRef(found, name, version).uri if found else None,
                      tags=tag_map(data.get("ModelTags"), f"{where}.data.ModelTags"),
                      dedup_key=f"azureml:{workspace}/{subject}" if isinstance(workspace, str) and workspace
                      else "")
