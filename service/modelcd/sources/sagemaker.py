"""SageMaker Model Registry events, sent by an EventBridge rule either

- straight to ``/hooks/sagemaker`` through an **API destination**, whose connection uses
  API-key auth: header ``MODELCD_HOOKS_SAGEMAKER_API_KEY_HEADER`` (default
  ``x-modelcd-api-key``) with the value ``MODELCD_HOOKS_SAGEMAKER_API_KEY``. The delivery
  id is the event ``id``; or
- through an **SNS topic** with an HTTPS subscription: the SNS signature is verified (see
  ``sources.sns``), the topic must be listed in ``MODELCD_HOOKS_SNS_TOPIC_ARNS``, and the
  delivery id is the SNS ``MessageId``; the EventBridge event is the JSON string in
  ``Message``. A ``SubscriptionConfirmation`` is confirmed (GET ``SubscribeURL``) only after
  its signature has been verified.

``SageMaker Model Package State Change`` with ``ModelPackageStatus`` ``Completed``:
``Approved`` → Registered (released), ``PendingManualApproval`` → Registered with
``release=False``, ``Rejected`` → Ignored. The package's ``CustomerMetadataProperties``
become tags, its first container's ``ModelDataUrl`` the artifact."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from modelcd import domain
from modelcd.config import Settings
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
    lower_keys,
    obj,
    optional_text,
    parse_json,
    require_secret,
    same,
    tag_map,
    text,
)
from modelcd.sources.sns import (
    MESSAGE_TYPES,
    NOTIFICATION,
    SUBSCRIPTION_CONFIRMATION,
    CertStore,
    confirm_subscription,
    shared_cert_store,
    verify_signature,
)

DETAIL_TYPE = "SageMaker Model Package State Change"
SNS_TYPE_HEADER = "x-amz-sns-message-type"
KEPT = ("content-type", "user-agent", SNS_TYPE_HEADER, "x-amz-sns-message-id", "x-amz-sns-topic-arn",
        "x-amz-sns-subscription-arn")
# SNS retries for up to an hour with the original Timestamp; accept those retries
SNS_MIN_WINDOW_S = 3600.0 + 300.0


class SageMakerSource(Source):
    """``/hooks/sagemaker``: EventBridge via API destination (API key) or via SNS (signed).

    ``cert_store`` supplies SNS signing certificates (default: the process-wide store of
    ``MODELCD_HOOKS_SNS_CERT_DIR``, then a host-checked, cached https fetch);
    ``confirm(subscribe_url)`` confirms a verified SNS subscription (default:
    ``sns.confirm_subscription``)."""

    name = "sagemaker"

    def __init__(self, settings: Settings, *, cert_store: CertStore | None = None,
                 confirm: Callable[[str], None] | None = None) -> None:
        super().__init__(settings)
        self.certs = cert_store if cert_store is not None else shared_cert_store(settings.hooks_sns_cert_dir)
        self.confirm = confirm if confirm is not None else confirm_subscription

    def receive_post(self, req: HookRequest, now: float) -> Accepted | Respond:
        if req.header(self.settings.hooks_sagemaker_api_key_header) is None and _looks_like_sns(req):
            return self._receive_sns(req, now)
        return self._receive_eventbridge(req)

    def _receive_eventbridge(self, req: HookRequest) -> Accepted:
        key = require_secret(self.settings.hooks_sagemaker_api_key, "hooks_sagemaker_api_key",
                             "SageMaker (EventBridge API destination)")
        header = self.settings.hooks_sagemaker_api_key_header
        presented = req.header(header)
        if presented is None:
            raise Unauthorized(f"no {header} header: give the EventBridge connection API-key auth with key name "
                               f"{header} and the value of {env_name('hooks_sagemaker_api_key')} (or deliver "
                               "through SNS)")
        if not same(presented, key):
            raise Unauthorized(f"the {header} header does not match: check the EventBridge connection's API key "
                               f"equals {env_name('hooks_sagemaker_api_key')}")
        event = obj(parse_json(req.body, "EventBridge event"), "event")
        return Accepted(text(event, "id", "event"), keep(req.headers, KEPT))

    def _receive_sns(self, req: HookRequest, now: float) -> Accepted | Respond:
        allowed = self.settings.hooks_sns_topic_arns
        if not allowed:
            raise Unauthorized(f"SNS deliveries are refused: {env_name('hooks_sns_topic_arns')} is empty; list "
                               "the topic ARNs to accept, comma-separated")
        msg = obj(parse_json(req.body, "SNS message"), "SNS message")
        kind = msg.get("Type")
        if kind not in MESSAGE_TYPES:
            raise InvalidInput(f"SNS message: Type {kind!r} is not one of {', '.join(MESSAGE_TYPES)}", field="Type")
        declared = req.header(SNS_TYPE_HEADER)
        if declared is not None and declared != kind:
            raise InvalidInput(f"{SNS_TYPE_HEADER} {declared!r} does not match the message Type {kind!r}",
                               field=SNS_TYPE_HEADER)
        topic = text(msg, "TopicArn", "SNS message")
        if topic not in allowed:
            raise Unauthorized(f"SNS topic {topic} is not accepted: add it to {env_name('hooks_sns_topic_arns')}")
        verify_signature(msg, self.certs, now)
        window = max(self.settings.hooks_replay_window_s, SNS_MIN_WINDOW_S)
        check_timestamp(_iso_seconds(msg.get("Timestamp")), now, window, "SNS Timestamp")
        if kind == SUBSCRIPTION_CONFIRMATION:
            self.confirm(text(msg, "SubscribeURL", "SNS message"))
            return Respond(200)
        if kind != NOTIFICATION:  # UnsubscribeConfirmation: nothing to keep
            return Respond(200)
        return Accepted(text(msg, "MessageId", "SNS message"), keep(req.headers, KEPT))

    def normalise(self, body: bytes, headers: Mapping[str, str]) -> list[Event]:
        """The SageMaker event of a stored delivery (SNS envelope or bare EventBridge event)."""
        doc = obj(parse_json(body, "SageMaker delivery"), "body")
        if SNS_TYPE_HEADER in lower_keys(headers) or _is_sns_envelope(doc):
            message = doc.get("Message")
            if not isinstance(message, str):
                raise InvalidInput("SNS message: Message is missing or not a string", field="Message")
            try:
                doc = json.loads(message)
            except (ValueError, RecursionError):
                return [Ignored("the SNS message is not JSON, so not an EventBridge event")]
            if not isinstance(doc, dict):
                return [Ignored("the SNS message is not a JSON object, so not an EventBridge event")]
        return [_normalise_event(doc)]


def _looks_like_sns(req: HookRequest) -> bool:
    if req.header(SNS_TYPE_HEADER) is not None:
        return True
    try:  # a proxy may drop the x-amz-* headers; the signed body says it all
        return _is_sns_envelope(json.loads(req.body))
    except (ValueError, RecursionError):
        return False


def _is_sns_envelope(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("Type") in MESSAGE_TYPES and "SignatureVersion" in doc


def _iso_seconds(value: Any) -> float:
    if not isinstance(value, str):
        raise InvalidInput("SNS message: Timestamp is missing", field="Timestamp")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"SNS message: Timestamp {value!r} is not ISO 8601", field="Timestamp") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _normalise_event(event: dict[str, Any]) -> Event:
    detail_type = event.get("detail-type")
    if detail_type != DETAIL_TYPE:
        return Ignored(f"event {detail_type!r} from {event.get('source')!r} is not a {DETAIL_TYPE}")
    detail = obj(event.get("detail"), "detail")
    group = text(detail, "ModelPackageGroupName", "detail")
    version = text(detail, "ModelPackageVersion", "detail", numbers=True)
    arn = text(detail, "ModelPackageArn", "detail")
    approval = text(detail, "ModelApprovalStatus", "detail")
    status = detail.get("ModelPackageStatus")
    if approval == "Rejected":
        return Ignored(f"model package {arn} was rejected")
    if approval not in ("Approved", "PendingManualApproval"):
        return Ignored(f"model package {arn} has approval status {approval!r}, neither Approved nor "
                       "PendingManualApproval")
    if status != "Completed":
        return Ignored(f"model package {arn} is {status!r}, not Completed yet; a later event will follow")
    return Registered(source=domain.Source.SAGEMAKER, model=group, external_version=version, external_ref=arn,
                      artifact_uri=_model_data_url(detail), tags=tag_map(detail.get("CustomerMetadataProperties"),
                                                                          "detail.CustomerMetadataProperties"),
                      description=optional_text(detail, "ModelPackageDescription", "detail"),
                      release=approval == "Approved", dedup_key=f"{arn}#{approval}")


def _model_data_url(detail: dict[str, Any]) -> str | None:
    """The first container's ModelDataUrl, if any (None: an image-only package)."""
    spec = detail.get("InferenceSpecification")
    containers = spec.get("Containers") if isinstance(spec, dict) else None
    if isinstance(containers, list) and containers and isinstance(containers[0], dict):
        url = containers[0].get("ModelDataUrl")
        if isinstance(url, str) and url:
            return url
    return None
